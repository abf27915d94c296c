//! Hot reload of the certificate store: replaced files serve new
//! handshakes, open connections keep working, broken files keep the old
//! certificate, and a swap under load fails no handshake.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// Polls new handshakes for `sni` until one serves `serial`.
async fn wait_for_serial(proxy: &ProxyProcess, sni: &str, serial: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if served_serial(proxy.https(), Some(sni)).await.as_deref() == Ok(serial) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_serves_new_handshakes() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let old = TestCert::generate(&["a.test"]);
    old.write(store.path(), "a");
    let proxy = ProxyProcess::start_tls(
        "rescan_interval = \"200ms\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;

    let (mut open, handshake) = Client::connect_tls(proxy.https(), "a.test").await.unwrap();
    assert_eq!(handshake.serial, old.serial);
    assert_eq!(open.get_host("a.test", "/").await.unwrap().status, 200);

    let new = TestCert::generate(&["a.test"]);
    new.write(store.path(), "a");
    assert!(
        wait_for_serial(&proxy, "a.test", &new.serial, Duration::from_secs(5)).await,
        "the new certificate was not served; log:\n{}",
        proxy.logs()
    );
    assert_ne!(new.serial, old.serial);

    // The connection opened under the old certificate keeps serving.
    for _ in 0..5 {
        let reply = open.get_host("a.test", "/").await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "app");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rescans_the_store() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let old = TestCert::generate(&["a.test"]);
    old.write(store.path(), "a");
    // A zero interval turns periodic scans off: only SIGHUP rescans.
    let proxy = ProxyProcess::start_tls(
        "rescan_interval = \"0s\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    assert!(
        proxy
            .wait_log(
                "periodic certificate rescans are off",
                Duration::from_secs(5)
            )
            .await,
        "{}",
        proxy.logs()
    );
    assert_eq!(
        served_serial(proxy.https(), Some("a.test")).await.unwrap(),
        old.serial
    );

    let new = TestCert::generate(&["a.test"]);
    new.write(store.path(), "a");
    let added = TestCert::generate(&["c.test"]);
    added.write(store.path(), "c");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_serial(proxy.https(), Some("a.test")).await.unwrap(),
        old.serial,
        "the store changed before SIGHUP"
    );

    proxy.signal(libc::SIGHUP);
    assert!(
        wait_for_serial(&proxy, "a.test", &new.serial, Duration::from_secs(5)).await,
        "{}",
        proxy.logs()
    );
    assert_eq!(
        served_serial(proxy.https(), Some("c.test")).await.unwrap(),
        added.serial
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_replacement_keeps_old_certificate() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let old = TestCert::generate(&["a.test"]);
    old.write(store.path(), "a");
    let proxy = ProxyProcess::start_tls(
        "rescan_interval = \"200ms\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    let https = proxy.https();
    let (mut open, _) = Client::connect_tls(https, "a.test").await.unwrap();
    let crt = store.path().join("a.crt");
    let key = store.path().join("a.key");

    // Garbage in place of the chain.
    switchyard::tls::write_atomically(
        &crt,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
        0o644,
    )
    .unwrap();
    let needle = format!("{}: ", crt.display());
    assert!(
        proxy.wait_log(&needle, Duration::from_secs(5)).await,
        "no error naming {}; log:\n{}",
        crt.display(),
        proxy.logs()
    );
    let line = error_line(&proxy, &needle);
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("certificate not loaded"), "{line}");
    let still = format!(
        "still serving the previously loaded certificate (serial {})",
        old.serial
    );
    assert!(line.contains(&still), "{line}");
    // Five more scans of the same broken file add no new error line.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let repeats = proxy.plain_logs().matches(&needle).count();
    assert_eq!(repeats, 1, "{}", proxy.logs());
    assert_eq!(
        served_serial(https, Some("a.test")).await.unwrap(),
        old.serial
    );
    assert_eq!(open.get_host("a.test", "/").await.unwrap().status, 200);

    // A valid chain with the key of another certificate.
    let other = TestCert::generate(&["a.test"]);
    switchyard::tls::write_atomically(&crt, old.chain_pem.as_bytes(), 0o644).unwrap();
    switchyard::tls::write_atomically(&key, other.key_pem.as_bytes(), 0o600).unwrap();
    let needle = format!("{}: the private key does not match", key.display());
    assert!(
        proxy.wait_log(&needle, Duration::from_secs(5)).await,
        "no mismatch error naming {}; log:\n{}",
        key.display(),
        proxy.logs()
    );
    assert_eq!(
        served_serial(https, Some("a.test")).await.unwrap(),
        old.serial
    );

    // A private key that is no PEM at all.
    switchyard::tls::write_atomically(&key, b"garbage\n", 0o600).unwrap();
    let needle = format!("{}: invalid PEM private key", key.display());
    assert!(
        proxy.wait_log(&needle, Duration::from_secs(5)).await,
        "{}",
        proxy.logs()
    );
    assert_eq!(
        served_serial(https, Some("a.test")).await.unwrap(),
        old.serial
    );

    // A good pair afterwards is picked up again.
    let fixed = TestCert::generate(&["a.test"]);
    fixed.write(store.path(), "a");
    assert!(
        wait_for_serial(&proxy, "a.test", &fixed.serial, Duration::from_secs(5)).await,
        "{}",
        proxy.logs()
    );
    assert_eq!(open.get_host("a.test", "/").await.unwrap().status, 200);
}

fn error_line(proxy: &ProxyProcess, needle: &str) -> String {
    proxy
        .plain_logs()
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_under_load_fails_nothing() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let certs: Vec<TestCert> = (0..4).map(|_| TestCert::generate(&["a.test"])).collect();
    certs[0].write(store.path(), "a");
    let proxy = ProxyProcess::start_tls(
        "rescan_interval = \"50ms\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    let https = proxy.https();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, done, failures, seen) = (
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&failures),
            Arc::clone(&seen),
        );
        clients.push(tokio::spawn(async move {
            // Bounded in count as well as by the stop flag.
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match Client::connect_tls(https, "a.test").await {
                    Ok((mut client, handshake)) => {
                        seen.lock().unwrap().insert(handshake.serial);
                        match client.get_host("a.test", "/").await {
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
                    Err(err) => failures.lock().unwrap().push(err),
                }
            }
        }));
    }

    let started = Instant::now();
    let mut swaps = 0;
    while started.elapsed() < Duration::from_secs(4) {
        swaps += 1;
        certs[swaps % certs.len()].write(store.path(), "a");
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let done = done.load(Ordering::SeqCst);
    assert!(done > 100, "only {done} requests completed");
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() >= 3,
        "only {} of the rotated certificates were served: {seen:?}",
        seen.len()
    );
    for serial in seen.iter() {
        assert!(
            certs.iter().any(|c| &c.serial == serial),
            "unexpected serial {serial}"
        );
    }
}
