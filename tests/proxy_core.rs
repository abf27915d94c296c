//! Routing, weights, health and failover through the real proxy binary.

mod support;

use std::time::Duration;

use support::*;

async fn pools_answering(proxy: &ProxyProcess, requests: usize) -> Vec<String> {
    let mut client = Client::connect(proxy.http).await.unwrap();
    let mut pools = Vec::with_capacity(requests);
    for _ in 0..requests {
        let reply = client.get("/").await.unwrap();
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        pools.push(reply.header("x-pool").unwrap_or_default());
    }
    pools
}

fn longest_run(pools: &[String], name: &str) -> usize {
    let (mut longest, mut run) = (0, 0);
    for pool in pools {
        run = if pool == name { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_send_all_to_one_pool() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH)).await;
    let pools = pools_answering(&proxy, 50).await;
    assert!(pools.iter().all(|p| p == "blue"), "{pools:?}");
    assert_eq!(green.hits(), 0);

    proxy.reload_with(&blue_green(&[&blue], &[&green], (0, 100), FAST_HEALTH));
    assert!(
        proxy
            .wait_log("config reloaded", Duration::from_secs(5))
            .await
    );
    let pools = pools_answering(&proxy, 50).await;
    assert!(pools.iter().all(|p| p == "green"), "{pools:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seventy_thirty_split_is_smooth() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (70, 30), FAST_HEALTH)).await;
    let pools = pools_answering(&proxy, 2000).await;
    let blue_share = pools.iter().filter(|p| *p == "blue").count() as f64 / 20.0;
    assert!(
        (67.0..=73.0).contains(&blue_share),
        "blue share {blue_share}%"
    );
    // Smooth WRR over 7:3 never sends more than 3 blue or 1 green in a row.
    assert!(
        longest_run(&pools, "blue") <= 3,
        "blue run {}",
        longest_run(&pools, "blue")
    );
    assert_eq!(longest_run(&pools, "green"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flip_leaves_and_rejoins() {
    let a = TestBackend::start("blue").await;
    let b = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start(&blue_green(&[&a, &b], &[&green], (100, 0), FAST_HEALTH)).await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert!(a.hits() > 0 && b.hits() > 0);

    a.set_health(500);
    let log_has = |needle: &str| proxy.logs().contains(needle);
    // Three failures at 200 ms; keep sending meanwhile, none may fail.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline && !log_has("backend is unhealthy") {
        assert_eq!(client.get("/").await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(log_has("backend is unhealthy"), "{}", proxy.logs());
    let before = a.hits();
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(a.hits(), before, "an unhealthy backend got traffic");

    a.set_health(200);
    assert!(
        proxy
            .wait_log("backend is healthy", Duration::from_secs(3))
            .await
    );
    let returned = eventually(Duration::from_secs(3), || a.hits() > before).await;
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert!(
        returned || a.hits() > before,
        "the healthy backend got no traffic again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_no_failed_get() {
    let a = TestBackend::start("blue").await;
    let b = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    // Slow health checks, so requests meet the dead backend before the
    // checker notices and the connect retry has to save them.
    let slow_health = "health = { path = \"/health\", interval = \"10s\", timeout = \"1s\" }";
    let proxy = ProxyProcess::start(&blue_green(&[&a, &b], &[&green], (100, 0), slow_health)).await;
    let mut warm = Client::connect(proxy.http).await.unwrap();
    assert_eq!(warm.get("/").await.unwrap().status, 200);
    a.kill();
    for i in 0..40 {
        // New connections each time, so no pooled connection hides the kill.
        let reply = get(proxy.http, "app.test", "/").await.unwrap();
        assert_eq!(reply.status, 200, "request {i} failed: {}", reply.text());
    }
    assert!(proxy.logs().contains("upstream connect failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_pools_down_gives_503_with_retry_after() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    blue.set_health(500);
    green.set_health(503);
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (50, 50), FAST_HEALTH)).await;
    let started = std::time::Instant::now();
    let reply = get(proxy.http, "app.test", "/").await.unwrap();
    assert_eq!(reply.status, 503);
    assert!(reply.header("retry-after").is_some());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered without waiting"
    );
    assert_eq!(blue.hits() + green.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_pool_share_moves_to_other_pool() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    green.set_health(500);
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (10, 90), FAST_HEALTH)).await;
    let pools = pools_answering(&proxy, 40).await;
    assert!(pools.iter().all(|p| p == "blue"), "{pools:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_first_health_round() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    // The first request is sent as soon as the listener accepts; it must
    // wait for the first probe rather than answer 503.
    let health = "health = { path = \"/health\", interval = \"1s\", timeout = \"500ms\" }";
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), health)).await;
    let reply = get(proxy.http, "app.test", "/").await.unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_invalid_config_keeps_running_one() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH)).await;
    assert_eq!(get(proxy.http, "a", "/").await.unwrap().text(), "blue");

    let broken = blue_green(&[&blue], &[&green], (0, 100), FAST_HEALTH)
        .replace("pools = {", "pools = { purple = 5,");
    proxy.reload_with(&broken);
    assert!(
        proxy
            .wait_log("config reload rejected", Duration::from_secs(5))
            .await
    );
    assert!(
        proxy.logs().contains("pool \\\"purple\\\"") || proxy.logs().contains("pool \"purple\""),
        "{}",
        proxy.logs()
    );
    assert_eq!(get(proxy.http, "a", "/").await.unwrap().text(), "blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_survives_reload() {
    let blue = TestBackend::start("blue").await;
    let down = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    down.set_health(500);
    let proxy = ProxyProcess::start(&blue_green(
        &[&blue, &down],
        &[&green],
        (100, 0),
        FAST_HEALTH,
    ))
    .await;
    assert!(
        proxy
            .wait_log("backend is unhealthy", Duration::from_secs(3))
            .await
    );
    let hits_before = down.hits();
    // Same backends, new weights: the unhealthy one must stay out at once,
    // without a window where it counts as healthy again.
    proxy.reload_with(&blue_green(
        &[&blue, &down],
        &[&green],
        (100, 1),
        FAST_HEALTH,
    ));
    assert!(
        proxy
            .wait_log("config reloaded", Duration::from_secs(5))
            .await
    );
    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(down.hits(), hits_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_added_by_reload_starts_unhealthy() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let newcomer = TestBackend::start("blue-new").await;
    newcomer.set_health(500);
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH)).await;
    assert_eq!(get(proxy.http, "a", "/").await.unwrap().status, 200);
    proxy.reload_with(&blue_green(
        &[&blue, &newcomer],
        &[&green],
        (100, 0),
        FAST_HEALTH,
    ));
    assert!(
        proxy
            .wait_log("config reloaded", Duration::from_secs(5))
            .await
    );
    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(
        newcomer.hits(),
        0,
        "a new backend got traffic before passing a check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_change_keeps_pool_serving() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH)).await;
    assert_eq!(get(proxy.http, "a", "/").await.unwrap().status, 200);

    // Only the interval changes. With the default healthy_threshold of 2,
    // a backend that restarted as unhealthy would need a second probe 5 s
    // later, so every request would wait no_backend_wait (500ms) and fail.
    let slow_health = FAST_HEALTH.replace("interval = \"200ms\"", "interval = \"5s\"");
    assert_ne!(slow_health, FAST_HEALTH);
    let http = proxy.http;
    let requests = tokio::spawn(async move {
        let mut client = Client::connect(http).await.unwrap();
        let mut results = Vec::new();
        for _ in 0..150 {
            let started = std::time::Instant::now();
            let status = client.get("/").await.map(|reply| reply.status);
            results.push((status, started.elapsed()));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        results
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.reload_with(&blue_green(&[&blue], &[&green], (100, 0), &slow_health));
    assert!(
        proxy
            .wait_log("config reloaded", Duration::from_secs(5))
            .await
    );
    let results = requests.await.unwrap();

    let failed: Vec<_> = results.iter().filter(|(s, _)| *s != Ok(200)).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let slowest = results.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_millis(250),
        "a request waited {slowest:?}; no_backend_wait is 500ms"
    );
    let logs = proxy.plain_logs();
    assert!(
        !logs.contains("backend is unhealthy"),
        "a backend turned unhealthy: {logs}"
    );
}
