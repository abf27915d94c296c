//! The admin socket against the real proxy binary: atomic flips under load,
//! compare-and-swap, bad input, drains, the socket's mode and the audit log.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

async fn blue_green_proxy(weights: (u32, u32)) -> (TestBackend, TestBackend, ProxyProcess) {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start_with_admin(
        &blue_green(&[&blue], &[&green], weights, FAST_HEALTH),
        admin_lines(),
    )
    .await;
    // Both pools must be healthy before weights can move to them.
    let mut admin = proxy.admin().await;
    let healthy = async {
        for _ in 0..100 {
            let status = admin.ok(json!({"cmd":"status"})).await;
            let all = status["pools"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|p| p["backends"].as_array().unwrap().clone())
                .all(|b| b["health"] == json!("healthy"));
            if all {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(
        healthy.await,
        "backends never became healthy: {}",
        proxy.logs()
    );
    (blue, green, proxy)
}

/// One request as the load clients saw it.
struct Sample {
    sent: Instant,
    received: Instant,
    pool: String,
    status: u16,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flips_under_load_lose_nothing() {
    let (_blue, _green, proxy) = blue_green_proxy((100, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, samples, failures, addr) = (
            Arc::clone(&stop),
            Arc::clone(&samples),
            Arc::clone(&failures),
            proxy.http,
        );
        clients.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            // Bounded: the flips take about two seconds.
            for _ in 0..200_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let sent = Instant::now();
                match client.get("/").await {
                    Ok(reply) => samples.lock().unwrap().push(Sample {
                        sent,
                        received: Instant::now(),
                        pool: reply.header("x-pool").unwrap_or_default(),
                        status: reply.status,
                    }),
                    Err(err) => {
                        failures.lock().unwrap().push(err);
                        client = Client::connect(addr).await.unwrap();
                    }
                }
            }
        }));
    }

    let mut admin = proxy.admin().await;
    // (time the command was sent, time of its acknowledgement, pool that
    // went to 0). The swap happens somewhere between the two times.
    let mut acks: Vec<(Instant, Instant, &str)> = Vec::new();
    for _ in 0..20 {
        for (weights, zero) in [
            (json!({"blue":0,"green":100}), "blue"),
            (json!({"blue":100,"green":0}), "green"),
        ] {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let sent = Instant::now();
            admin
                .ok(json!({"cmd":"weights","route":"app","weights":weights}))
                .await;
            acks.push((sent, Instant::now(), zero));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let samples = samples.lock().unwrap();
    assert!(samples.len() > 200, "only {} requests", samples.len());
    let bad_status: Vec<u16> = samples
        .iter()
        .map(|s| s.status)
        .filter(|s| *s != 200)
        .collect();
    assert!(bad_status.is_empty(), "non-200 answers: {bad_status:?}");
    let mut checked = 0;
    for sample in samples.iter() {
        // The last flip acknowledged before the request was sent.
        let Some(index) = acks.iter().rposition(|(_, ack, _)| *ack < sample.sent) else {
            continue;
        };
        // A request still on its way when the next flip was sent may see
        // either weights, so it is not judged.
        if acks
            .get(index + 1)
            .is_some_and(|(next_sent, _, _)| *next_sent <= sample.received)
        {
            continue;
        }
        let (_, ack, zero) = acks[index];
        checked += 1;
        assert_ne!(
            sample.pool,
            zero,
            "a request sent {:?} after the acknowledgement reached the pool at weight 0",
            sample.sent - ack
        );
    }
    assert!(
        checked > 100,
        "only {checked} requests were sent after an acknowledgement"
    );
    let green = samples.iter().filter(|s| s.pool == "green").count();
    assert!(
        green > 0 && green < samples.len(),
        "green got {green} of {}",
        samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generation_is_refused() {
    let (_blue, _green, proxy) = blue_green_proxy((100, 0)).await;
    let mut admin = proxy.admin().await;
    let generation = admin.ok(json!({"cmd":"status"})).await["generation"]
        .as_u64()
        .unwrap();
    let first = admin
        .ok(json!({"cmd":"weights","route":"app","weights":{"blue":90,"green":10},"expect_generation":generation}))
        .await;
    assert_eq!(first["generation"], json!(generation + 1));
    assert_eq!(first["previous"], json!({"blue":100,"green":0}));
    assert_eq!(first["weights"], json!({"blue":90,"green":10}));
    let state_before = std::fs::read(proxy.state_file()).unwrap();

    let stale = admin
        .request(json!({"cmd":"weights","route":"app","weights":{"blue":0,"green":100},"expect_generation":generation}))
        .await;
    assert_eq!(stale["ok"], json!(false));
    assert_eq!(stale["code"], json!("stale_generation"));
    assert_eq!(stale["generation"], json!(generation + 1));

    let status = admin.ok(json!({"cmd":"status"})).await;
    assert_eq!(status["generation"], json!(generation + 1));
    assert_eq!(
        status["routes"][0]["weights"],
        json!({"blue":90,"green":10})
    );
    assert_eq!(std::fs::read(proxy.state_file()).unwrap(), state_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_change_nothing() {
    let (_blue, green, proxy) = blue_green_proxy((100, 0)).await;
    let mut admin = proxy.admin().await;
    let before = admin.ok(json!({"cmd":"status"})).await;

    let cases: Vec<(&[u8], &str, &str)> = vec![
        (
            br#"{"cmd":"weights","route":"nope","weights":{"blue":1}}"#,
            "not_found",
            "\"nope\"",
        ),
        (
            br#"{"cmd":"weights","route":"app","weights":{"purple":1}}"#,
            "not_found",
            "\"purple\"",
        ),
        (
            br#"{"cmd":"weights","route":"app","weights":{"green":-5}}"#,
            "invalid_request",
            "-5",
        ),
        (
            br#"{"cmd":"weights","route":"app","weights":{"blue":0,"green":0}}"#,
            "invalid_request",
            "weight 0",
        ),
        (
            br#"{"cmd":"weights","route":"app""#,
            "invalid_request",
            "invalid JSON",
        ),
        (br#"{"cmd":"launch"}"#, "invalid_request", "\"launch\""),
        (
            br#"{"cmd":"drain","pool":"blue","backend":"127.0.0.1:1"}"#,
            "not_found",
            "127.0.0.1:1",
        ),
        (
            br#"{"cmd":"rollback","route":"app"}"#,
            "conflict",
            "no shift",
        ),
        (br#"{"cmd":"certs"}"#, "not_configured", "not managed"),
    ];
    for (line, code, needle) in cases {
        let mut line = line.to_vec();
        line.push(b'\n');
        let response = admin.send_raw(&line).await.expect("a response");
        assert_eq!(response["ok"], json!(false), "{response}");
        assert_eq!(response["code"], json!(code), "{response}");
        let message = response["error"].as_str().unwrap();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    // Weight for a pool with no healthy backend needs force.
    green.set_health(500);
    let mut unhealthy = false;
    for _ in 0..60 {
        let status = admin.ok(json!({"cmd":"status"})).await;
        if status["pools"][1]["name"] == json!("green")
            && status["pools"][1]["backends"][0]["health"] == json!("unhealthy")
        {
            unhealthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(unhealthy, "green never turned unhealthy");
    let refused = admin
        .request(json!({"cmd":"weights","route":"app","weights":{"green":10}}))
        .await;
    assert_eq!(refused["code"], json!("unsafe"), "{refused}");

    // A 1 MiB line is rejected and its connection closed, while another
    // client keeps being served.
    let socket = proxy.admin_socket();
    let other = tokio::spawn(async move {
        let mut client = AdminClient::connect(&socket).await;
        for _ in 0..20 {
            client.ok(json!({"cmd":"status"})).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut long = proxy.admin().await;
    let mut huge = br#"{"cmd":"status","pad":""#.to_vec();
    huge.resize(1024 * 1024, b'x');
    huge.extend_from_slice(b"\"}\n");
    let response = long.send_raw(&huge).await.expect("an error response");
    assert_eq!(response["code"], json!("too_long"), "{response}");
    assert!(long.is_closed().await, "the connection stayed open");
    other.await.unwrap();

    let after = admin.ok(json!({"cmd":"status"})).await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["routes"], before["routes"]);
    assert!(
        !proxy.state_file().exists(),
        "a rejected command wrote the state file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_requests_only() {
    let a = TestBackend::start("blue").await;
    let b = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start_with_admin(
        &blue_green(&[&a, &b], &[&green], (100, 0), FAST_HEALTH),
        admin_lines(),
    )
    .await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..10 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    // A slow request in flight on each blue backend.
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(get(proxy.http, "app.test", "/sleep/800")))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut admin = proxy.admin().await;
    let drained = admin
        .ok(json!({"cmd":"drain","pool":"blue","backend":a.addr.to_string()}))
        .await;
    assert_eq!(drained["drained"], json!(true));
    assert_eq!(drained["in_flight"], json!(1), "{drained}");
    let before = a.hits();
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(a.hits(), before, "a drained backend got a new request");
    for request in slow {
        assert_eq!(request.await.unwrap().unwrap().status, 200);
    }

    let last = admin
        .request(json!({"cmd":"drain","pool":"blue","backend":b.addr.to_string()}))
        .await;
    assert_eq!(last["code"], json!("unsafe"), "{last}");

    admin
        .ok(json!({"cmd":"enable","pool":"blue","backend":a.addr.to_string()}))
        .await;
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert!(a.hits() > before, "the enabled backend got no traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_and_audit_uid() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start_with_admin(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        &format!("{}\nsocket_mode = \"0640\"", admin_lines()),
    )
    .await;
    let mode = std::fs::metadata(proxy.admin_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);

    let mut admin = proxy.admin().await;
    admin
        .ok(json!({"cmd":"weights","route":"app","weights":{"blue":70,"green":30},"force":true}))
        .await;
    let uid = unsafe { libc::getuid() };
    let pid = std::process::id();
    assert!(
        proxy.wait_log("admin change", Duration::from_secs(5)).await,
        "{}",
        proxy.logs()
    );
    let logs = strip_ansi(&proxy.logs());
    let line = logs
        .lines()
        .find(|l| l.contains("switchyard::audit") && l.contains("admin change"))
        .expect("an audit line");
    assert!(line.contains(&format!("uid={uid}")), "{line}");
    assert!(line.contains(&format!("pid={pid}")), "{line}");
    assert!(line.contains("command=\"weights\""), "{line}");
    let state_mode = std::fs::metadata(proxy.state_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(state_mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_blocks_second_process() {
    let (blue, green, proxy) = blue_green_proxy((100, 0)).await;
    // A second proxy on another port, pointed at the first one's socket.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("second.toml");
    let text = std::fs::read_to_string(&proxy.config_path)
        .unwrap()
        .replace(
            &proxy.http.to_string(),
            &format!("127.0.0.1:{}", free_port()),
        )
        .replace(
            &proxy.dir.path().display().to_string(),
            &dir.path().display().to_string(),
        )
        .replace(
            "socket = \"admin.sock\"",
            &format!("socket = \"{}\"", proxy.admin_socket().display()),
        )
        .replace("state_file = \"state.json\"", "");
    std::fs::write(&config, text).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = eventually(Duration::from_secs(10), || {
        second.try_wait().ok().flatten().is_some()
    })
    .await;
    if !exited {
        let _ = second.kill();
    }
    let output = second.wait_with_output().unwrap();
    assert!(exited, "the second process kept running");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by a running process"), "{stderr}");
    // The first process still serves its socket.
    proxy.admin().await.ok(json!({"cmd":"status"})).await;

    // A socket file nobody listens on is removed at start.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let third = ProxyProcess::start_with_admin(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        &format!("socket = \"{}\"", stale.display()),
    )
    .await;
    AdminClient::connect(&stale)
        .await
        .ok(json!({"cmd":"status"}))
        .await;
    drop(third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_prints_and_exits_by_result() {
    let (_blue, _green, proxy) = blue_green_proxy((100, 0)).await;
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("ctl")
            .arg("-c")
            .arg(&proxy.config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let set = ctl(&["weights", "app", "blue=0", "green=100"]);
    assert!(set.status.success(), "{set:?}");
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(
        stdout.contains("blue=100 green=0 -> blue=0 green=100"),
        "{stdout}"
    );

    let status = ctl(&["--json", "status"]);
    assert!(status.status.success());
    let value: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(value["routes"][0]["weights"], json!({"blue":0,"green":100}));

    let table = ctl(&["status"]);
    let stdout = String::from_utf8_lossy(&table.stdout);
    assert!(
        stdout.contains("ROUTE") && stdout.contains("blue=0 green=100"),
        "{stdout}"
    );

    let bad = ctl(&["weights", "nope", "blue=1"]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("route \"nope\" not found"), "{stderr}");

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "-s", "/nonexistent/admin.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_works_with_broken_config() {
    let (_blue, _green, proxy) = blue_green_proxy((100, 0)).await;
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("ctl")
            .arg("-c")
            .arg(&proxy.config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let original = std::fs::read_to_string(&proxy.config_path).unwrap();
    let file = proxy.config_path.display().to_string();

    // A validation error: the TOML parses, but a pool is undefined.
    let invalid = original.replacen("green = 0 }", "green = 0, purple = 1 }", 1);
    assert_ne!(invalid, original);
    proxy.write_raw_config(&invalid);
    let status = ctl(&["status"]);
    assert!(status.status.success(), "{status:?}");
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("blue=100 green=0"), "{stdout}");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warning: "), "{stderr}");
    assert!(stderr.contains(&file), "{stderr}");
    assert!(stderr.contains("switchyard check"), "{stderr}");

    let set = ctl(&["weights", "app", "blue=0", "green=100"]);
    assert!(set.status.success(), "{set:?}");
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(
        stdout.contains("blue=100 green=0 -> blue=0 green=100"),
        "{stdout}"
    );

    // A TOML syntax error further down the file.
    proxy.write_raw_config(&format!("{original}\n[[routes]\nname =\n"));
    let status = ctl(&["--json", "status"]);
    assert!(status.status.success(), "{status:?}");
    let value: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(value["routes"][0]["weights"], json!({"blue":0,"green":100}));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("switchyard check"), "{stderr}");

    let set = ctl(&["weights", "app", "blue=100", "green=0"]);
    assert!(set.status.success(), "{set:?}");

    // Without a readable admin.socket, ctl names the file and suggests -s.
    proxy.write_raw_config("[admin\nsocket =\n");
    let unreadable = ctl(&["status"]);
    assert_eq!(unreadable.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unreadable.stderr);
    assert!(stderr.contains(&file), "{stderr}");
    assert!(stderr.contains("-s SOCKET"), "{stderr}");
}

/// Removes terminal color sequences (`ESC [ ... m`) from log text.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for next in chars.by_ref() {
                if next == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}
