//! Runtime state across a restart and a binary upgrade.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::*;

async fn wait_healthy(admin: &mut AdminClient) {
    for _ in 0..100 {
        let status = admin.ok(json!({"cmd":"status"})).await;
        let healthy = status["pools"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["backends"].as_array().unwrap().clone())
            .all(|b| b["health"] == json!("healthy"));
        if healthy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backends never became healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_runtime_state() {
    let a = TestBackend::start("blue").await;
    let b = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let mut proxy = ProxyProcess::start_with_admin(
        &blue_green(&[&a, &b], &[&green], (100, 0), FAST_HEALTH),
        admin_lines(),
    )
    .await;
    let mut admin = proxy.admin().await;
    wait_healthy(&mut admin).await;
    admin
        .ok(json!({"cmd":"weights","route":"app","weights":{"blue":30,"green":70}}))
        .await;
    admin
        .ok(json!({"cmd":"drain","pool":"blue","backend":a.addr.to_string()}))
        .await;
    admin
        .ok(json!({"cmd":"shift","route":"app","to":"green","step":10,"every":"5s","min_requests":1000}))
        .await;
    drop(admin);

    proxy.restart().await;
    let mut admin = proxy.admin().await;
    let status = admin.ok(json!({"cmd":"status"})).await;
    let route = &status["routes"][0];
    assert_eq!(route["weights"], json!({"blue":20,"green":80}), "{route}");
    assert_eq!(route["weights_from"], json!("runtime"));
    assert_eq!(route["shift"]["to"], json!("green"), "{route}");
    assert_eq!(route["shift"]["state"], json!("resumed after a restart"));
    assert_eq!(
        route["shift"]["start_weights"],
        json!({"blue":30,"green":70})
    );
    let drained: Vec<bool> = status["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["drained"].as_bool().unwrap())
        .collect();
    assert_eq!(drained, vec![true, false]);
    assert!(proxy.logs().contains("restored runtime state"));

    // The resumed shift can be rolled back to where it began.
    let rolled = admin.ok(json!({"cmd":"rollback","route":"app"})).await;
    assert_eq!(rolled["weights"], json!({"blue":30,"green":70}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_pools_drop_runtime_weights() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let mut proxy = ProxyProcess::start_with_admin(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        admin_lines(),
    )
    .await;
    let mut admin = proxy.admin().await;
    wait_healthy(&mut admin).await;
    admin
        .ok(json!({"cmd":"weights","route":"app","weights":{"blue":0,"green":100}}))
        .await;
    drop(admin);
    // The route gains a third pool in the file: the file's weights win.
    let text = std::fs::read_to_string(&proxy.config_path)
        .unwrap()
        .replace(
            "pools = { blue = 100, green = 0 }",
            "pools = { blue = 100, green = 0, red = 0 }",
        )
        + &format!("\n[pools.red]\nbackends = [\"{}\"]\n", green.addr);
    proxy.write_raw_config(&text);
    proxy.restart().await;
    let mut admin = proxy.admin().await;
    let status = admin.ok(json!({"cmd":"status"})).await;
    assert_eq!(
        status["routes"][0]["weights"],
        json!({"blue":100,"green":0,"red":0})
    );
    assert_eq!(status["routes"][0]["weights_from"], json!("config"));
    assert!(proxy
        .logs()
        .contains("dropping runtime weights because the route's pools changed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_keeps_weights_without_failures() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let mut proxy = ProxyProcess::start_with_admin(
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
        admin_lines(),
    )
    .await;
    let mut admin = proxy.admin().await;
    wait_healthy(&mut admin).await;
    admin
        .ok(json!({"cmd":"weights","route":"app","weights":{"blue":0,"green":100}}))
        .await;
    drop(admin);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, failures, answered, addr) = (
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&answered),
            proxy.http,
        );
        clients.push(tokio::spawn(async move {
            // New connections each time, so some land on the new process.
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match get(addr, "app.test", "/").await {
                    Ok(reply) if reply.status == 200 => answered.lock().unwrap().push(reply.text()),
                    Ok(reply) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", reply.status)),
                    Err(err) => failures.lock().unwrap().push(err),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.upgrade().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 100, "only {} requests", answered.len());
    assert!(
        answered.iter().all(|pool| pool == "green"),
        "a request reached blue"
    );

    // The new process serves the socket and kept the weights.
    let mut admin = proxy.admin().await;
    let status = admin.ok(json!({"cmd":"status"})).await;
    assert_eq!(
        status["routes"][0]["weights"],
        json!({"blue":0,"green":100})
    );
    let changed = admin
        .ok(json!({"cmd":"weights","route":"app","weights":{"blue":100,"green":0}}))
        .await;
    assert_eq!(changed["previous"], json!({"blue":0,"green":100}));
    let reply = get(proxy.http, "app.test", "/").await.unwrap();
    assert_eq!(reply.text(), "blue");
    let logs = proxy.logs();
    assert!(logs.contains("handing the admin socket"), "{logs}");
    assert!(!logs.contains("still holds the admin socket"), "{logs}");
}
