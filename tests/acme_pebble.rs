//! The ACME manager against a real CA: pebble on 127.0.0.1, real HTTP-01
//! and TLS-ALPN-01 responders, and the real certificate store. Issued
//! certificates are checked with a rustls client that trusts only pebble's
//! issuing root.
//!
//! Skips (with a message on stderr) only when the `pebble` binaries are
//! missing; install them with `apt-get install pebble`.

#[path = "support/pebble.rs"]
mod pebble;

use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pingora::protocols::l4::stream::Stream as L4Stream;
use rustls::pki_types::{CertificateDer, ServerName};
use switchyard::acme::{
    AcmeManager, AcmeOptions, CertificateStore, ChallengeKind, ChallengeResponder, Interception,
    Outcome, TlsAlpnInterceptor,
};
use switchyard::tls::{CertStore, ResolverOptions, SniResolver};
use tokio::net::TcpListener;

use pebble::{Pebble, PebbleSettings};

// ---------------------------------------------------------------- logs

/// Everything the process logs through `tracing`, for the check that no key
/// material reaches the logs. Set `ACME_TEST_LOG=1` to also print it.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .try_init();
        buffer
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        if std::env::var_os("ACME_TEST_LOG").is_some() {
            std::io::stderr().write_all(bytes)?;
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned()
}

// ---------------------------------------------------------- responders

/// The responder the current manager publishes challenges in; swapped when
/// a test restarts the manager.
type ResponderSlot = Arc<RwLock<Arc<ChallengeResponder>>>;

fn slot() -> ResponderSlot {
    Arc::new(RwLock::new(Arc::new(ChallengeResponder::new())))
}

/// Serves `GET /.well-known/acme-challenge/TOKEN` from the responder, as
/// the proxy's plain listener does.
fn serve_http01(listener: TcpListener, slot: ResponderSlot) {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let slot = Arc::clone(&slot);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let responder = Arc::clone(&slot.read().unwrap());
                    async move {
                        let token = request
                            .uri()
                            .path()
                            .strip_prefix("/.well-known/acme-challenge/")
                            .unwrap_or("");
                        let response = match responder.http01_response(token) {
                            Some(body) => Response::new(Full::new(Bytes::from(body))),
                            None => Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"unknown token")))
                                .unwrap(),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

/// Runs the manager's Pingora pre-TLS hook on every connection, as the
/// HTTPS listener does; other handshakes are dropped here.
fn serve_tls_alpn01(listener: TcpListener, slot: ResponderSlot) {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let interceptor = TlsAlpnInterceptor::new(Arc::clone(&slot.read().unwrap()));
            tokio::spawn(async move {
                let mut stream = L4Stream::from(tcp);
                if let Ok(Interception::PassThrough) = interceptor.intercept(&mut stream).await {
                    eprintln!("TLS-ALPN-01 responder: a handshake without acme-tls/1 was dropped");
                }
            });
        }
    });
}

// ------------------------------------------------------------- helpers

fn pebble_missing() -> bool {
    if Pebble::installed() {
        return false;
    }
    eprintln!(
        "\n\n*** SKIPPED: the pebble ACME test CA is not installed (apt-get install pebble); \
         the ACME tests did NOT run ***\n"
    );
    true
}

fn options(pebble: &Pebble, state_dir: &Path, challenge: ChallengeKind) -> AcmeOptions {
    let mut options = AcmeOptions::new(state_dir);
    options.directory_url = pebble.directory_url();
    options.ca_roots = vec![pebble.api_root_path()];
    options.contact = vec!["mailto:ops@example.test".to_string()];
    options.challenge = challenge;
    options.renewal.retry_initial = Duration::from_secs(2);
    options.renewal.retry_max = Duration::from_secs(8);
    options.renewal.check_interval = Duration::from_secs(2);
    options.request_timeout = Duration::from_secs(5);
    options.order_timeout = Duration::from_secs(30);
    options
}

fn start_manager(
    options: AcmeOptions,
    store: &Arc<CertStore>,
    hosts: &[&str],
    slot: &ResponderSlot,
) -> (Arc<AcmeManager>, tokio::task::JoinHandle<()>) {
    let store: Arc<dyn CertificateStore> = store.clone();
    let hosts = hosts.iter().map(|h| h.to_string()).collect();
    let manager = Arc::new(AcmeManager::new(options, store, hosts).unwrap());
    *slot.write().unwrap() = manager.responder();
    let task = tokio::spawn(Arc::clone(&manager).run());
    (manager, task)
}

/// Polls `check` every 100 ms until it returns true or `limit` passes.
async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn served_serial(store: &CertStore, host: &str) -> Option<String> {
    CertificateStore::current(store, host).map(|c| c.serial)
}

fn managed(store: &CertStore, host: &str) -> bool {
    CertificateStore::current(store, host).is_some_and(|c| c.managed_by_acme)
}

/// Serves the store through the real SNI resolver and connects with a
/// rustls client that trusts only `root`. Returns the serial of the leaf
/// that the client verified.
async fn verified_serial(
    store: &Arc<CertStore>,
    host: &str,
    root: &CertificateDer<'static>,
) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = SniResolver::new(
        Arc::clone(store),
        ResolverOptions {
            default_certificate: None,
            reject_unknown_sni: true,
        },
    );
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| {
            panic!("handshake for {host} failed to verify against pebble's root: {e}")
        });
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    server.abort();
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    format!("{:x}", parsed.serial)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn account_files(state_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(state_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("account-") && name.ends_with(".json")
        })
        .collect();
    files.sort();
    files
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Checks that neither the account key nor any certificate key from the
/// store appears in the captured logs.
fn assert_no_key_material_logged(state_dir: &Path, certs_dir: &Path) {
    let logs = logs_text();
    assert!(!logs.is_empty(), "no logs were captured");
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a PEM private key was logged"
    );
    for account in account_files(state_dir) {
        let stored: serde_json::Value =
            serde_json::from_slice(&fs::read(&account).unwrap()).unwrap();
        let key = stored["credentials"]["key_pkcs8"].as_str().unwrap();
        assert!(key.len() > 40);
        assert!(!logs.contains(key), "the account key was logged");
    }
    for entry in fs::read_dir(certs_dir).unwrap().filter_map(|e| e.ok()) {
        if entry.path().extension().is_some_and(|e| e == "key") {
            let pem = fs::read_to_string(entry.path()).unwrap();
            for line in pem
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 20)
            {
                assert!(
                    !logs.contains(line),
                    "key material of {} was logged",
                    entry.path().display()
                );
            }
        }
    }
}

// --------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_then_restart_reuses_state() {
    if pebble_missing() {
        return;
    }
    captured_logs();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pebble = Pebble::start(PebbleSettings {
        http_port: http.local_addr().unwrap().port(),
        tls_port: 9, // TLS-ALPN-01 is not used in this test.
        validity_secs: 3600,
    })
    .await
    .unwrap();
    let responders = slot();
    serve_http01(http, Arc::clone(&responders));

    let certs = tempfile::tempdir().unwrap();
    let state_dir = certs.path().join("acme");
    let store = CertStore::open(certs.path()).unwrap();
    let hosts = ["a.test", "b.test"];
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::Http01),
        &store,
        &hosts,
        &responders,
    );
    wait_for(Duration::from_secs(40), "both certificates", || {
        hosts.iter().all(|h| managed(&store, h))
    })
    .await;

    let root = pebble.issuer_root().await.unwrap();
    for host in hosts {
        let served = served_serial(&store, host).unwrap();
        assert_eq!(verified_serial(&store, host, &root).await, served);
    }
    assert_eq!(manager.counters().issued, 2);
    assert_eq!(manager.counters().failed, 0);
    let journal = manager.journal();
    assert_eq!(journal.len(), 2);
    assert!(journal
        .iter()
        .all(|e| e.outcome == Outcome::Issued && e.trigger == "no certificate"));
    let status = manager.status();
    assert!(status.iter().all(|s| s.managed_by_acme && s.failures == 0));
    assert!(status
        .iter()
        .all(|s| s.last_result.as_ref().unwrap().result == "issued"));

    // Files: account and keys private, state folder private.
    let accounts = account_files(&state_dir);
    assert_eq!(accounts.len(), 1);
    assert_eq!(mode(&accounts[0]), 0o600);
    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(mode(&state_dir.join("journal.json")), 0o600);
    for host in hosts {
        assert_eq!(mode(&certs.path().join(format!("acme_{host}.key"))), 0o600);
    }

    // Restart: a new manager over the same folders places no order.
    task.abort();
    let _ = task.await;
    let account_before = fs::read(&accounts[0]).unwrap();
    let serials_before: Vec<_> = hosts.iter().map(|h| served_serial(&store, h)).collect();
    let store = CertStore::open(certs.path()).unwrap();
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::Http01),
        &store,
        &hosts,
        &responders,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(manager.counters().issued, 0);
    assert_eq!(manager.counters().failed, 0);
    assert_eq!(manager.journal().len(), 2);
    let serials_after: Vec<_> = hosts.iter().map(|h| served_serial(&store, h)).collect();
    assert_eq!(serials_after, serials_before);
    for status in manager.status() {
        assert_eq!(status.renewal_basis, "lifetime");
        assert!(status.next_renewal.unwrap() > unix_now() + 60);
    }

    // The stored account still works with the CA: a manual renewal succeeds
    // without registering another account.
    let renewed = manager.renew_now("a.test").await.unwrap();
    assert_ne!(renewed.serial, serials_before[0]);
    assert_eq!(
        verified_serial(&store, "a.test", &root).await,
        renewed.serial.clone().unwrap()
    );
    assert_eq!(account_files(&state_dir), accounts);
    assert_eq!(fs::read(&accounts[0]).unwrap(), account_before);
    assert_eq!(manager.journal().last().unwrap().trigger, "manual");
    assert!(manager
        .renew_now("unknown.test")
        .await
        .unwrap_err()
        .0
        .contains("unknown.test"));

    task.abort();
    assert_no_key_material_logged(&state_dir, certs.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_two_hosts() {
    if pebble_missing() {
        return;
    }
    captured_logs();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pebble = Pebble::start(PebbleSettings {
        http_port: 9, // HTTP-01 is not used in this test.
        tls_port: tls.local_addr().unwrap().port(),
        validity_secs: 3600,
    })
    .await
    .unwrap();
    let responders = slot();
    serve_tls_alpn01(tls, Arc::clone(&responders));

    let certs = tempfile::tempdir().unwrap();
    let state_dir = certs.path().join("acme");
    let store = CertStore::open(certs.path()).unwrap();
    let hosts = ["alpn-a.test", "alpn-b.test"];
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::TlsAlpn01),
        &store,
        &hosts,
        &responders,
    );
    wait_for(Duration::from_secs(40), "both certificates", || {
        hosts.iter().all(|h| managed(&store, h))
    })
    .await;

    // A config reload adds a host; an invalid list changes nothing.
    let error = manager
        .set_hosts(vec!["alpn-a.test".into(), "*.alpn.test".into()])
        .unwrap_err();
    assert!(error.0.contains("*.alpn.test"), "{error}");
    assert_eq!(manager.hosts(), hosts);
    let reloaded = vec![
        "alpn-a.test".into(),
        "alpn-b.test".into(),
        "alpn-c.test".into(),
    ];
    manager.set_hosts(reloaded).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the added host's certificate",
        || managed(&store, "alpn-c.test"),
    )
    .await;
    task.abort();
    assert_eq!(manager.counters().issued, 3);

    let root = pebble.issuer_root().await.unwrap();
    assert_eq!(
        verified_serial(&store, "alpn-c.test", &root).await,
        served_serial(&store, "alpn-c.test").unwrap()
    );
    for host in hosts {
        let served = served_serial(&store, host).unwrap();
        assert_eq!(verified_serial(&store, host, &root).await, served);
    }
    assert_eq!(manager.counters().failed, 0);
    // Challenge certificates are withdrawn once the orders end.
    let responder = manager.responder();
    assert!(!responder.tls_alpn01_pending());
    assert_no_key_material_logged(&state_dir, certs.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificate_renews_itself() {
    if pebble_missing() {
        return;
    }
    captured_logs();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pebble = Pebble::start(PebbleSettings {
        http_port: http.local_addr().unwrap().port(),
        tls_port: 9,
        validity_secs: 30,
    })
    .await
    .unwrap();
    let responders = slot();
    serve_http01(http, Arc::clone(&responders));

    let certs = tempfile::tempdir().unwrap();
    let state_dir = certs.path().join("acme");
    let store = CertStore::open(certs.path()).unwrap();
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::Http01),
        &store,
        &["renew.test"],
        &responders,
    );
    wait_for(Duration::from_secs(30), "the first certificate", || {
        managed(&store, "renew.test")
    })
    .await;
    let first = served_serial(&store, "renew.test").unwrap();
    let first_not_after = manager.status()[0].not_after.unwrap();

    // Renewal is planned at 2/3 of the 30 s lifetime, moved earlier by at
    // most 5 % of it (1.5 s) of jitter.
    wait_for(
        Duration::from_secs(5),
        "a renewal planned by lifetime",
        || manager.status()[0].renewal_basis == "lifetime",
    )
    .await;
    let next = manager.status()[0].next_renewal.unwrap();
    assert!(
        next <= first_not_after - 9,
        "renewal at {next} is too close to expiry {first_not_after}"
    );
    assert!(
        next >= first_not_after - 12,
        "renewal at {next} is too early for expiry {first_not_after}"
    );

    wait_for(Duration::from_secs(40), "the renewed certificate", || {
        served_serial(&store, "renew.test").is_some_and(|s| s != first)
    })
    .await;
    task.abort();
    let renewed = served_serial(&store, "renew.test").unwrap();
    let root = pebble.issuer_root().await.unwrap();
    assert_eq!(verified_serial(&store, "renew.test", &root).await, renewed);
    let journal = manager.journal();
    assert!(journal.len() >= 2);
    assert_eq!(journal[1].trigger, "renewal at the lifetime threshold");
    assert_eq!(journal[1].outcome, Outcome::Issued);
    assert!(manager.status()[0].not_after.unwrap() > first_not_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_backs_off_then_recovers() {
    if pebble_missing() {
        return;
    }
    captured_logs();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut pebble = Pebble::start(PebbleSettings {
        http_port: http.local_addr().unwrap().port(),
        tls_port: 9,
        validity_secs: 30,
    })
    .await
    .unwrap();
    let responders = slot();
    serve_http01(http, Arc::clone(&responders));

    let certs = tempfile::tempdir().unwrap();
    let state_dir = certs.path().join("acme");
    let store = CertStore::open(certs.path()).unwrap();
    let host = "outage.test";
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::Http01),
        &store,
        &[host],
        &responders,
    );
    wait_for(Duration::from_secs(30), "the first certificate", || {
        managed(&store, host)
    })
    .await;
    let first = served_serial(&store, host).unwrap();

    // CA down: the renewal fails, is retried with growing delays, and the
    // current certificate stays in service.
    pebble.stop_ca();
    let failed = |manager: &AcmeManager| {
        manager
            .journal()
            .into_iter()
            .filter(|e| e.outcome == Outcome::Failed)
            .collect::<Vec<_>>()
    };
    wait_for(Duration::from_secs(45), "three failed renewals", || {
        failed(&manager).len() >= 3
    })
    .await;
    let failures = failed(&manager);
    // Delays are 1-2 s after the first failure and 2-4 s after the second,
    // so the third attempt starts at least 3 s after the first (2 s in
    // whole seconds).
    assert!(
        failures[2].started_at - failures[0].started_at >= 2,
        "no back-off between attempts: {failures:?}"
    );
    assert!(failures
        .iter()
        .all(|e| e.error.as_deref().is_some_and(|m| !m.is_empty())));
    assert_eq!(served_serial(&store, host).unwrap(), first);
    let status = manager.status()[0].clone();
    assert!(status.failures >= 3);
    assert_eq!(status.last_result.unwrap().result, "failed");

    // A restarted manager reads the failures from the journal and waits out
    // the back-off instead of ordering at once.
    task.abort();
    let _ = task.await;
    let entries_before = manager.journal().len();
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::Http01),
        &store,
        &[host],
        &responders,
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        manager.journal().len(),
        entries_before,
        "ordered during the back-off"
    );
    let status = manager.status()[0].clone();
    assert!(status.failures >= 3);
    assert_eq!(status.renewal_basis, "retry");
    assert!(status.next_renewal.unwrap() >= unix_now());

    // CA back (with fresh state, so the stored account is unknown to it):
    // the manager registers again and renews.
    pebble.start_ca().await.unwrap();
    wait_for(
        Duration::from_secs(45),
        "a renewed certificate after the outage",
        || served_serial(&store, host).is_some_and(|s| s != first),
    )
    .await;
    task.abort();
    let root = pebble.issuer_root().await.unwrap();
    let renewed = served_serial(&store, host).unwrap();
    assert_eq!(verified_serial(&store, host, &root).await, renewed);
    let status = manager.status()[0].clone();
    assert_eq!(status.failures, 0);
    assert_eq!(status.last_result.unwrap().result, "issued");
    let journal = manager.journal();
    assert_eq!(journal.last().unwrap().outcome, Outcome::Issued);
    // The restarted CA rejected the old account with a problem document;
    // its credentials were moved aside and a new account was registered.
    let logs = logs_text();
    assert!(logs.contains("the CA does not know the stored ACME account"));
    let retired = fs::read_dir(&state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".rejected-"))
        .count();
    assert_eq!(retired, 1);
    assert_eq!(account_files(&state_dir).len(), 1);
    assert_no_key_material_logged(&state_dir, certs.path());
}

/// Writes a self-signed certificate for `host` valid between two Unix
/// times, as an operator would place one in the store.
fn write_hand_placed(dir: &Path, host: &str, not_before: i64, not_after: i64) {
    use x509_parser::time::ASN1Time;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    params.not_before = ASN1Time::from_timestamp(not_before).unwrap().to_datetime();
    params.not_after = ASN1Time::from_timestamp(not_after).unwrap().to_datetime();
    let cert = params.self_signed(&key).unwrap();
    let key_path = dir.join(format!("{host}.key"));
    fs::write(&key_path, key.serialize_pem()).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join(format!("{host}.crt")), cert.pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_placed_certificates_left_alone() {
    if pebble_missing() {
        return;
    }
    captured_logs();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pebble = Pebble::start(PebbleSettings {
        http_port: http.local_addr().unwrap().port(),
        tls_port: 9,
        validity_secs: 3600,
    })
    .await
    .unwrap();
    let responders = slot();
    serve_http01(http, Arc::clone(&responders));

    let day = 86_400;
    let now = unix_now();
    let certs = tempfile::tempdir().unwrap();
    // Valid for another year: left alone.
    write_hand_placed(certs.path(), "hand.test", now - 365 * day, now + 365 * day);
    // 10 of 90 days left: replaced by an ACME certificate.
    write_hand_placed(
        certs.path(),
        "expiring.test",
        now - 80 * day,
        now + 10 * day,
    );
    let store = CertStore::open(certs.path()).unwrap();
    let state_dir = certs.path().join("acme");
    let (manager, task) = start_manager(
        options(&pebble, &state_dir, ChallengeKind::Http01),
        &store,
        &["hand.test", "expiring.test"],
        &responders,
    );
    wait_for(Duration::from_secs(30), "the replacement order", || {
        manager.counters().issued == 1
    })
    .await;
    // Several passes of the run loop (pause 0.5 s or more).
    tokio::time::sleep(Duration::from_secs(3)).await;
    task.abort();

    let journal = manager.journal();
    assert_eq!(journal.len(), 1, "{journal:#?}");
    assert_eq!(journal[0].host, "expiring.test");
    assert_eq!(journal[0].trigger, "hand-placed certificate near expiry");
    assert_eq!(journal[0].outcome, Outcome::Issued);
    assert!(certs.path().join("acme_expiring.test.crt").is_file());
    assert!(!certs.path().join("acme_hand.test.crt").exists());

    let status = manager.status();
    let hand = status.iter().find(|s| s.host == "hand.test").unwrap();
    assert!(!hand.managed_by_acme);
    assert_eq!(hand.renewal_basis, "hand-placed");
    let next = hand.next_renewal.unwrap();
    assert!((next - (now + 335 * day)).abs() <= 5, "next renewal {next}");

    // The store keeps serving the hand-placed certificate because it is
    // valid longer than the 1-hour ACME one; the manager must not order
    // again and again to replace it.
    let expiring = status.iter().find(|s| s.host == "expiring.test").unwrap();
    assert!(!expiring.managed_by_acme);
    assert_eq!(expiring.renewal_basis, "hand-placed");
    assert!(expiring.next_renewal.unwrap() > unix_now() + 600);
}
