//! Process lifecycle under traffic: graceful stop on SIGTERM and the
//! zero-downtime binary upgrade.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_in_flight_requests_finish() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let mut proxy = ProxyProcess::start_with_grace(
        "4s",
        "2s",
        &blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH),
    )
    .await;
    // An idle keep-alive client, to see it closed at shutdown.
    let mut idle = Client::connect(proxy.http).await.unwrap();
    assert_eq!(idle.get("/").await.unwrap().status, 200);

    let mut requests = Vec::new();
    for _ in 0..200 {
        let addr = proxy.http;
        requests.push(tokio::spawn(
            async move { get(addr, "a", "/sleep/1500").await },
        ));
    }
    assert!(
        eventually(Duration::from_secs(5), || blue.hits() >= 201).await,
        "only {} requests reached the backend",
        blue.hits()
    );
    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);

    let mut ok = 0;
    for request in requests {
        match request.await.unwrap() {
            Ok(reply) if reply.status == 200 => ok += 1,
            other => panic!("an in-flight request failed: {other:?}"),
        }
    }
    assert_eq!(ok, 200);

    // New connections are refused once the listener is closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(proxy.http).await.is_err(),
        "the listener still accepts after SIGTERM"
    );
    // The idle keep-alive connection is closed rather than kept.
    assert!(idle.get("/").await.is_err());

    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the proxy did not exit after its grace period");
    assert!(status.success() || status.code().is_some(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(9),
        "exit took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_upgrade_under_load_fails_nothing() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let mut old =
        ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (addr, stop, done, failures) = (
            old.http,
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&failures),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // A new connection each time, so every request goes through
                // the listening socket being handed over.
                match get(addr, "a", "/sleep/20").await {
                    Ok(reply) if reply.status == 200 => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(reply) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", reply.status)),
                    Err(err) => failures.lock().unwrap().push(err),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = old.spawn_upgrade();
    // The new process waits on the upgrade socket for the old one's fds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    old.signal(libc::SIGQUIT);
    let exited = old.wait_exit(Duration::from_secs(15)).await;
    assert!(exited.is_some(), "the old process did not exit");
    let served_before = done.load(Ordering::SeqCst);
    // Only the new process is left; keep the load on it for a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}\nold log:\n{}\nnew log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        old.logs(),
        new.logs()
    );
    assert!(
        done.load(Ordering::SeqCst) > served_before,
        "nothing was served after the old process exited"
    );
    assert_eq!(get(old.http, "a", "/").await.unwrap().status, 200);
}

/// During a binary upgrade the new process serves `/readyz` while the old
/// one, which keeps the metrics address for its grace period, still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_up_during_upgrade() {
    let backend = TestBackend::start("blue").await;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let body = format!(
        "[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 1 }}\n\n[pools.blue]\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let mut old = ProxyProcess::start_rewritten(&body, |text| {
        text.replace("metrics = \"off\"", &format!("metrics = \"{metrics}\""))
    })
    .await;
    let new = old.spawn_upgrade();
    tokio::time::sleep(Duration::from_secs(1)).await;
    old.signal(libc::SIGQUIT);
    let started = eventually(Duration::from_secs(3), || {
        new.logs().contains("metrics listener started")
    })
    .await;
    let old_running = old.wait_exit(Duration::from_millis(1)).await.is_none();
    assert!(started, "new process log:\n{}", new.logs());
    assert!(
        old_running,
        "the old process exited before the new one bound the metrics address"
    );
    let exited = old.wait_exit(Duration::from_secs(15)).await;
    assert!(exited.is_some(), "the old process did not exit");
}
