//! Metrics, readiness and JSON access logs from the real proxy.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::net::TcpListener;

/// One sample of the Prometheus text format: name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (comments skipped, labels unescaped).
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = value.parse().expect("numeric sample value");
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), HashMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = HashMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(
                        chars.next(),
                        Some('"'),
                        "label value starts with a quote in {line}"
                    );
                    let mut value = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => value.push(chars.next().expect("escaped char")),
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    labels.insert(key, value);
                }
                (name.to_string(), labels)
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn start_with_metrics(body: &str, json_logs: bool) -> (ProxyProcess, SocketAddr) {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let body = if json_logs {
        format!("[log]\nformat = \"json\"\n\n{body}")
    } else {
        body.to_string()
    };
    let proxy = ProxyProcess::start_rewritten(&body, |text| {
        text.replace("metrics = \"off\"", &format!("metrics = \"{metrics}\""))
    })
    .await;
    (proxy, metrics)
}

/// Scrapes `/metrics` until `ready` holds (up to 5 s): the proxy counts a
/// request in its logging phase, just after the client got the response.
async fn scrape_until(metrics: SocketAddr, ready: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let samples = parse_metrics(&scrape(metrics, "/metrics").await.text());
        if ready(&samples) || std::time::Instant::now() > deadline {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(metrics: SocketAddr, path: &str) -> Reply {
    for _ in 0..100 {
        if let Ok(reply) = get(metrics, "localhost", path).await {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("metrics listener {metrics} did not answer {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_requests_sent() {
    let app = TestBackend::start("blue").await;
    let down = TestBackend::start("down").await;
    down.set_health(500);
    let body = format!(
        "[proxy]\nno_backend_wait = \"200ms\"\n\n\
         [[routes]]\nname = \"app\"\nhosts = [\"app.test\"]\npools = {{ blue = 1 }}\n\n\
         [[routes]]\nname = \"dead\"\nhosts = [\"dead.test\"]\npools = {{ down = 1 }}\n\n\
         [pools.blue]\nbackends = [\"{}\"]\n{FAST_HEALTH}\n\n\
         [pools.down]\nbackends = [\"{}\"]\n{FAST_HEALTH}\n",
        app.addr, down.addr
    );
    let (proxy, metrics) = start_with_metrics(&body, false).await;
    for _ in 0..7 {
        assert_eq!(
            get(proxy.http, "app.test", "/ok").await.unwrap().status,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            get(proxy.http, "app.test", "/status/500")
                .await
                .unwrap()
                .status,
            500
        );
    }
    for _ in 0..2 {
        assert_eq!(get(proxy.http, "dead.test", "/").await.unwrap().status, 503);
    }
    let reply = scrape(metrics, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let samples = scrape_until(metrics, |samples| {
        value(samples, "switchyard_requests_total", &[]) >= 12.0
    })
    .await;
    let requests = "switchyard_requests_total";
    assert_eq!(
        value(
            &samples,
            requests,
            &[("route", "app"), ("pool", "blue"), ("class", "2xx")]
        ),
        7.0
    );
    assert_eq!(
        value(
            &samples,
            requests,
            &[("route", "app"), ("pool", "blue"), ("class", "5xx")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            requests,
            &[("route", "dead"), ("pool", ""), ("class", "5xx")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_no_healthy_backend_total",
            &[("route", "dead")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_request_duration_seconds_count",
            &[("route", "app"), ("pool", "blue")]
        ),
        10.0
    );
    let backend = app.addr.to_string();
    assert_eq!(
        value(
            &samples,
            "switchyard_backend_healthy",
            &[("pool", "blue"), ("backend", &backend)]
        ),
        1.0
    );
    let down_addr = down.addr.to_string();
    assert_eq!(
        value(
            &samples,
            "switchyard_backend_healthy",
            &[("pool", "down"), ("backend", &down_addr)]
        ),
        0.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_pool_weight",
            &[("route", "app"), ("pool", "blue")]
        ),
        1.0
    );
    assert_eq!(value(&samples, "switchyard_config_generation", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_follow_health_and_weights() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let (proxy, metrics) = start_with_metrics(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        false,
    )
    .await;
    let green_addr = green.addr.to_string();
    let healthy = |samples: &[Sample]| {
        value(
            samples,
            "switchyard_backend_healthy",
            &[("pool", "green"), ("backend", &green_addr)],
        )
    };
    let samples = scrape_until(metrics, |samples| healthy(samples) == 1.0).await;
    assert_eq!(healthy(&samples), 1.0);

    green.set_health(500);
    assert!(
        proxy
            .wait_log("backend is unhealthy", Duration::from_secs(3))
            .await
    );
    let samples = parse_metrics(&scrape(metrics, "/metrics").await.text());
    assert_eq!(healthy(&samples), 0.0);

    proxy.reload_with(&blue_green(&[&blue], &[&green], (30, 70), FAST_HEALTH));
    assert!(
        proxy
            .wait_log("config reloaded", Duration::from_secs(5))
            .await
    );
    let samples = parse_metrics(&scrape(metrics, "/metrics").await.text());
    assert_eq!(
        value(
            &samples,
            "switchyard_pool_weight",
            &[("route", "app"), ("pool", "blue")]
        ),
        30.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_pool_weight",
            &[("route", "app"), ("pool", "green")]
        ),
        70.0
    );
    assert_eq!(value(&samples, "switchyard_config_generation", &[]), 2.0);
    assert_eq!(
        value(
            &samples,
            "switchyard_config_reloads_total",
            &[("result", "ok")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reflects_health_rounds() {
    // A backend that accepts connections but never answers keeps the first
    // health probe pending until its 2 s timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let body = format!(
        "[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 1 }}\n\n\
         [pools.blue]\nbackends = [\"{silent_addr}\"]\n\
         health = {{ path = \"/health\", interval = \"3s\", timeout = \"2s\" }}\n"
    );
    let (proxy, metrics) = start_with_metrics(&body, false).await;
    let healthz = scrape(metrics, "/healthz").await;
    assert_eq!(healthz.status, 200);
    let first = scrape(metrics, "/readyz").await;
    assert_eq!(first.status, 503);
    assert!(
        first.text().contains("first round of health checks"),
        "{}",
        first.text()
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let down = scrape(metrics, "/readyz").await;
    assert_eq!(down.status, 503);
    assert!(
        down.text().contains("no route has a healthy backend"),
        "{}",
        down.text()
    );

    let backend = TestBackend::start("blue").await;
    proxy.reload_with(
        &body
            .replace(&silent_addr.to_string(), &backend.addr.to_string())
            .replace(
                "interval = \"3s\", timeout = \"2s\"",
                "interval = \"200ms\", timeout = \"150ms\"",
            ),
    );
    assert!(
        proxy
            .wait_log("backend is healthy", Duration::from_secs(5))
            .await,
        "{}",
        proxy.logs()
    );
    assert_eq!(scrape(metrics, "/readyz").await.status, 200);
    assert_eq!(scrape(metrics, "/nope").await.status, 404);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_certificate() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = ProxyProcess::start_tls_rewritten(
        "rescan_interval = \"200ms\"\n",
        &single_route(&backend),
        store.path(),
        |text| text.replace("metrics = \"off\"", &format!("metrics = \"{metrics}\"")),
    )
    .await;

    let empty = scrape(metrics, "/readyz").await;
    assert_eq!(empty.status, 503);
    let reason = empty.text();
    assert!(reason.contains("contains no certificate"), "{reason}");
    assert!(
        reason.contains(&store.path().display().to_string()),
        "{reason}"
    );
    assert!(reason.contains("NAME.crt and NAME.key"), "{reason}");
    assert!(
        Client::connect_tls(proxy.https(), "a.test").await.is_err(),
        "a handshake succeeded with an empty store"
    );

    // The periodic rescan loads the new pair, and readiness follows.
    let cert = TestCert::generate(&["a.test"]);
    cert.write(store.path(), "a");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = scrape(metrics, "/readyz").await;
    while last.status != 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = scrape(metrics, "/readyz").await;
    }
    assert_eq!(last.status, 200, "{}; log:\n{}", last.text(), proxy.logs());
    let (_client, handshake) = Client::connect_tls(proxy.https(), "a.test").await.unwrap();
    assert_eq!(handshake.serial, cert.serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_fields_and_no_secrets() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let (proxy, _metrics) = start_with_metrics(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        true,
    )
    .await;
    let token = "verify-token-5ecret";
    let challenge = "1158201444";
    let reply = get(
        proxy.http,
        "app.test",
        &format!("/webhook?hub.mode=subscribe&hub.verify_token={token}&hub.challenge={challenge}"),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let secret_body = "{\"message\":\"body-secret-42\"}";
    let request = format!(
        "POST /webhook HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{secret_body}",
        secret_body.len()
    );
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        eventually(Duration::from_secs(3), || proxy
            .logs()
            .matches("switchyard::access")
            .count()
            >= 2)
        .await
    );

    let logs = proxy.logs();
    let mut access = Vec::new();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if value["target"] == "switchyard::access" {
            access.push(value);
        }
    }
    assert_eq!(access.len(), 2, "{logs}");
    for event in &access {
        for field in [
            "request_id",
            "client",
            "method",
            "host",
            "path",
            "status",
            "route",
            "pool",
            "backend",
            "upstream_ms",
            "total_ms",
            "bytes_in",
            "bytes_out",
            "retries",
        ] {
            assert!(event.get(field).is_some(), "missing {field} in {event}");
        }
        assert_eq!(event["path"], "/webhook");
        assert_eq!(event["route"], "app");
        assert_eq!(event["pool"], "blue");
        assert_eq!(event["status"], 200);
    }
    assert_eq!(access[1]["method"], "POST");
    assert_eq!(access[1]["bytes_in"], secret_body.len());
    assert!(!logs.contains(token), "the verify token reached the logs");
    assert!(
        !logs.contains(challenge),
        "the query string reached the logs"
    );
    assert!(
        !logs.contains("body-secret-42"),
        "the request body reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_are_counted() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let (proxy, metrics) = start_with_metrics(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        false,
    )
    .await;
    let smuggled = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for _ in 0..2 {
        let response = raw_exchange(proxy.http, smuggled.as_bytes(), Duration::from_secs(3)).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    }
    let samples = scrape_until(metrics, |samples| {
        value(samples, "switchyard_rejected_requests_total", &[]) >= 2.0
    })
    .await;
    let rejected: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "switchyard_rejected_requests_total")
        .collect();
    assert_eq!(
        value(
            &samples,
            "switchyard_rejected_requests_total",
            &[("status", "400")]
        ),
        2.0,
        "{rejected:?}"
    );
    assert_eq!(blue.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_and_commands_are_counted() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let body = blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH);
    let proxy = ProxyProcess::start_rewritten(&body, |text| {
        text.replace(
            "metrics = \"off\"",
            &format!("metrics = \"{metrics}\"\n{}", admin_lines()),
        )
    })
    .await;
    let mut admin = AdminClient::connect(&proxy.dir.path().join("admin.sock")).await;
    admin.ok(serde_json::json!({"cmd": "reload"})).await;
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    proxy.write_raw_config(&text.replace("pools = {", "pools = { purple = 1,"));
    let rejected = admin.request(serde_json::json!({"cmd": "reload"})).await;
    assert_eq!(rejected["ok"], serde_json::json!(false), "{rejected}");
    assert!(
        proxy
            .wait_log("config reload rejected", Duration::from_secs(3))
            .await
    );

    let samples = scrape_until(metrics, |samples| {
        value(samples, "switchyard_admin_commands_total", &[]) >= 2.0
    })
    .await;
    let reloads = "switchyard_config_reloads_total";
    assert_eq!(value(&samples, reloads, &[("result", "ok")]), 1.0);
    assert_eq!(value(&samples, reloads, &[("result", "rejected")]), 1.0);
    let commands = "switchyard_admin_commands_total";
    assert_eq!(
        value(
            &samples,
            commands,
            &[("command", "reload"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            commands,
            &[("command", "reload"), ("result", "error")]
        ),
        1.0
    );
    let shift_state = samples
        .iter()
        .find(|s| {
            s.name == "switchyard_shift_state"
                && s.labels.get("route").map(String::as_str) == Some("app")
        })
        .expect("a shift state series for the route");
    assert_eq!(shift_state.value, 0.0);
}
