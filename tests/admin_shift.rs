//! Progressive shifts through the real proxy: automatic rollback on a
//! failing pool, completion on a healthy one, holding and manual rollback.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

async fn proxy_with(blue: &TestBackend, green: &TestBackend) -> ProxyProcess {
    let proxy = ProxyProcess::start_with_admin(
        &blue_green(&[blue], &[green], (100, 0), FAST_HEALTH),
        admin_lines(),
    )
    .await;
    let mut admin = proxy.admin().await;
    for _ in 0..100 {
        let status = admin.ok(json!({"cmd":"status"})).await;
        let healthy = status["pools"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["backends"][0]["health"] == json!("healthy"));
        if healthy {
            return proxy;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backends never became healthy: {}", proxy.logs());
}

/// Keeps two keep-alive clients sending GET / until the returned flag is set.
fn load(proxy: &ProxyProcess) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..2)
        .map(|_| {
            let (stop, addr) = (Arc::clone(&stop), proxy.http);
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await.unwrap();
                // Bounded in count and time: a test runs for a few seconds.
                for _ in 0..100_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if client.get("/").await.is_err() {
                        client = Client::connect(addr).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    (stop, tasks)
}

async fn route_status(admin: &mut AdminClient) -> Value {
    admin.ok(json!({"cmd":"status"})).await["routes"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_green_rolls_back_within_a_window() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    green.set_fail_every(2);
    let proxy = proxy_with(&blue, &green).await;
    let (stop, tasks) = load(&proxy);
    let mut admin = proxy.admin().await;

    let started = admin
        .ok(
            json!({"cmd":"shift","route":"app","to":"green","step":20,"every":"400ms",
                   "max_error_rate":0.1,"min_requests":5}),
        )
        .await;
    let acked = Instant::now();
    assert_eq!(started["previous"], json!({"blue":100,"green":0}));
    assert_eq!(started["weights"], json!({"blue":80,"green":20}));

    let mut route = route_status(&mut admin).await;
    while !route["shift"].is_null() && acked.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        route = route_status(&mut admin).await;
    }
    let took = acked.elapsed();
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        route["shift"].is_null(),
        "the shift is still running: {route}"
    );
    // One window of 400 ms, plus the time to notice it.
    assert!(took < Duration::from_millis(1000), "rollback took {took:?}");
    assert_eq!(route["weights"], json!({"blue":100,"green":0}));
    let last = route["last_shift"].as_str().unwrap();
    assert!(
        last.starts_with("rolled back automatically: error rate"),
        "{last}"
    );
    assert!(
        proxy
            .wait_log("shift rolled back automatically", Duration::from_secs(2))
            .await
    );

    let before = green.hits();
    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(green.hits(), before, "green got traffic after the rollback");
    let state: Value = serde_json::from_slice(&std::fs::read(proxy.state_file()).unwrap()).unwrap();
    assert_eq!(state["weights"]["app"], json!({"blue":100,"green":0}));
    assert_eq!(state["shifts"], json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_green_reaches_full_share() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = proxy_with(&blue, &green).await;
    let (stop, tasks) = load(&proxy);
    let mut admin = proxy.admin().await;
    admin
        .ok(json!({"cmd":"shift","route":"app","to":"green","step":25,"every":"300ms","min_requests":3}))
        .await;

    let mut shares = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut route = route_status(&mut admin).await;
    while !route["shift"].is_null() && Instant::now() < deadline {
        let green_weight = route["weights"]["green"].as_u64().unwrap();
        if shares.last() != Some(&green_weight) {
            shares.push(green_weight);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        route = route_status(&mut admin).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        route["shift"].is_null(),
        "the shift did not finish: {route}"
    );
    assert_eq!(route["weights"], json!({"blue":0,"green":100}));
    let last = route["last_shift"].as_str().unwrap();
    assert!(last.starts_with("completed"), "{last}");
    assert_eq!(shares, vec![25, 50, 75, 100], "steps seen");

    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..10 {
        assert_eq!(client.get("/").await.unwrap().text(), "green");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_shift_holds_until_rollback() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = proxy_with(&blue, &green).await;
    let mut admin = proxy.admin().await;
    admin
        .ok(json!({"cmd":"shift","route":"app","to":"green","step":10,"every":"200ms","min_requests":1000}))
        .await;
    let busy = admin
        .request(json!({"cmd":"weights","route":"app","weights":{"green":50}}))
        .await;
    assert_eq!(busy["code"], json!("conflict"), "{busy}");
    let again = admin
        .request(json!({"cmd":"shift","route":"app","to":"green","step":10,"every":"1s"}))
        .await;
    assert_eq!(again["code"], json!("conflict"), "{again}");

    let mut held = false;
    for _ in 0..40 {
        let route = route_status(&mut admin).await;
        let state = route["shift"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if state.starts_with("holding: 0 requests < 1000") {
            held = true;
            assert_eq!(route["weights"], json!({"blue":90,"green":10}));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held, "the shift never reported holding");

    let rolled = admin.ok(json!({"cmd":"rollback","route":"app"})).await;
    assert_eq!(rolled["previous"], json!({"blue":90,"green":10}));
    assert_eq!(rolled["weights"], json!({"blue":100,"green":0}));
    let route = route_status(&mut admin).await;
    assert!(route["shift"].is_null());
    assert_eq!(route["last_shift"], json!("rolled back by an operator"));
    // The controller task must not act after the rollback.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let route = route_status(&mut admin).await;
    assert_eq!(route["weights"], json!({"blue":100,"green":0}));
}

/// Replaces the config body (everything from the `[proxy]` table on) and
/// keeps the listener and admin tables the proxy started with.
fn write_body(proxy: &ProxyProcess, body: &str) {
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let head = &text[..text.find("[proxy]").expect("a [proxy] table")];
    proxy.write_raw_config(&format!("{head}{body}"));
}

/// Returns the audit lines of `command`, without terminal colour codes.
fn audit_lines(proxy: &ProxyProcess, command: &str) -> Vec<String> {
    proxy
        .plain_logs()
        .lines()
        .filter(|l| {
            l.contains("switchyard::audit") && l.contains(&format!("command=\"{command}\""))
        })
        .map(str::to_string)
        .collect()
}

/// Starts a shift on route `app` whose next step is an hour away, so only
/// a reload can end it during the test.
async fn start_slow_shift(admin: &mut AdminClient) {
    let started = admin
        .ok(json!({"cmd":"shift","route":"app","to":"green","step":10,"every":"1h"}))
        .await;
    assert_eq!(started["weights"], json!({"blue":90,"green":10}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removing_pool_cancels_shift() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = proxy_with(&blue, &green).await;
    let mut admin = proxy.admin().await;
    start_slow_shift(&mut admin).await;

    let blue_only = format!(
        "[proxy]\nno_backend_wait = \"500ms\"\n\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 100 }}\n\n[pools.blue]\nbackends = [\"{}\"]\n{FAST_HEALTH}\n",
        blue.addr
    );
    write_body(&proxy, &blue_only);
    proxy.signal(libc::SIGHUP);
    assert!(
        proxy
            .wait_log("shift cancelled by a config reload", Duration::from_secs(5))
            .await,
        "{}",
        proxy.logs()
    );

    let route = route_status(&mut admin).await;
    assert!(route["shift"].is_null(), "{route}");
    assert_eq!(
        route["last_shift"],
        json!("cancelled by a config reload: the route's pools changed in the config file")
    );
    assert_eq!(route["weights"], json!({"blue":100}));
    assert_eq!(route["weights_from"], json!("config"));
    // The SIGHUP reload rewrote the state file, so a restart cannot bring
    // the cancelled shift back.
    let state: Value = serde_json::from_slice(&std::fs::read(proxy.state_file()).unwrap()).unwrap();
    assert_eq!(state["shifts"], json!({}), "{state}");

    let rollback = admin.request(json!({"cmd":"rollback","route":"app"})).await;
    assert_eq!(rollback["code"], json!("conflict"), "{rollback}");
    let weights = admin
        .request(json!({"cmd":"weights","route":"app","weights":{"blue":50}}))
        .await;
    assert_eq!(weights["ok"], json!(true), "{weights}");

    let audits = audit_lines(&proxy, "shift cancel");
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert!(audits[0].contains("actor=\"SIGHUP\""), "{}", audits[0]);
    assert!(audits[0].contains("subject=\"app\""), "{}", audits[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reload_renaming_pools_cancels_shift() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = proxy_with(&blue, &green).await;
    let mut admin = proxy.admin().await;
    start_slow_shift(&mut admin).await;

    // A reload that keeps the route's pools keeps the shift.
    let unchanged = admin.ok(json!({"cmd":"reload"})).await;
    assert_eq!(unchanged["cancelled_shifts"], json!([]));
    let route = route_status(&mut admin).await;
    assert_eq!(route["shift"]["to"], json!("green"), "{route}");
    assert_eq!(route["weights"], json!({"blue":90,"green":10}));

    let renamed = blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH).replace("green", "canary");
    write_body(&proxy, &renamed);
    let reloaded = admin.ok(json!({"cmd":"reload"})).await;
    assert_eq!(
        reloaded["cancelled_shifts"],
        json!([{
            "route": "app",
            "to": "green",
            "reason": "cancelled by a config reload: the route's pools changed in the config file",
        }])
    );
    assert_eq!(reloaded["dropped_runtime_weights"], json!(["app"]));

    let route = route_status(&mut admin).await;
    assert!(route["shift"].is_null(), "{route}");
    assert_eq!(
        route["last_shift"],
        json!("cancelled by a config reload: the route's pools changed in the config file")
    );
    assert_eq!(route["weights"], json!({"blue":100,"canary":0}));
    let state: Value = serde_json::from_slice(&std::fs::read(proxy.state_file()).unwrap()).unwrap();
    assert_eq!(state["shifts"], json!({}));

    assert!(
        proxy
            .wait_log("shift cancelled by a config reload", Duration::from_secs(2))
            .await
    );
    let audits = audit_lines(&proxy, "shift cancel");
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert!(
        audits[0].contains("actor=\"admin socket\""),
        "{}",
        audits[0]
    );
    assert!(audits[0].contains("\"to\":\"green\""), "{}", audits[0]);
}
