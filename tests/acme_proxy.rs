//! ACME end to end through the real proxy binary: pebble validates against
//! the proxy's own listeners, and the issued certificates are served on the
//! HTTPS listener to a client that trusts only pebble's issuing root.

#[path = "support/pebble.rs"]
mod pebble;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pebble::{Pebble, PebbleSettings};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::net::TcpStream;

/// Handshakes with `host` as SNI, trusting only `root`; returns the served
/// leaf's serial in hex, or the handshake error.
async fn verified_serial(
    https: SocketAddr,
    host: &str,
    root: &CertificateDer<'static>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(https).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first().cloned())
        .ok_or("no certificate")?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| e.to_string())?;
    Ok(format!("{:x}", parsed.serial))
}

async fn wait_for_certificate(
    https: SocketAddr,
    host: &str,
    root: &CertificateDer<'static>,
    proxy: &ProxyProcess,
    pebble: &Pebble,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = String::new();
    while Instant::now() < deadline {
        match verified_serial(https, host, root).await {
            Ok(serial) => return serial,
            Err(err) => last = err,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "no verified certificate for {host} within 40 s: {last}\nproxy log:\n{}\npebble log:\n{}",
        proxy.logs(),
        pebble.logs()
    );
}

async fn issue_through_proxy(challenge: &str) {
    if !Pebble::installed() {
        eprintln!("SKIPPED: pebble is not installed (apt-get install pebble)");
        return;
    }
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let pebble = Pebble::start(PebbleSettings {
        http_port: http.port(),
        tls_port: https.port(),
        validity_secs: 3600,
    })
    .await
    .expect("start pebble");
    let backend = TestBackend::start("blue").await;
    let body = format!(
        "[acme]\ndirectory = \"{directory}\"\nca_roots = [\"{api_root}\"]\nchallenge = \"{challenge}\"\ncontact = [\"mailto:ops@example.test\"]\n\n\
         [[routes]]\nname = \"app\"\nhosts = [\"a.example.test\", \"b.example.test\"]\npools = {{ blue = 1 }}\n\n\
         [pools.blue]\nbackends = [\"{backend}\"]\n",
        directory = pebble.directory_url(),
        api_root = pebble.api_root_path().display(),
        backend = backend.addr,
    );
    let proxy = ProxyProcess::start_at(http, &body, |text| {
        text.replacen(
            &format!("http = \"{http}\"\n"),
            &format!("http = \"{http}\"\nhttps = \"{https}\"\n"),
            1,
        )
        .replace("[admin]\n", "[tls]\nstore = \"certs\"\n\n[admin]\n")
    })
    .await;
    let root = pebble.issuer_root().await.expect("pebble issuing root");
    for host in ["a.example.test", "b.example.test"] {
        let serial = wait_for_certificate(https, host, &root, &proxy, &pebble).await;
        assert!(!serial.is_empty());
    }
    // HTTP/2 on the same listener is unaffected by the challenge hook.
    let output = std::process::Command::new("curl")
        .args([
            "-sk",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("a.example.test:{}:127.0.0.1", https.port()))
        .arg(format!("https://a.example.test:{}/", https.port()))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "2 200");
    let logs = proxy.logs();
    assert!(
        !logs.contains("PRIVATE KEY"),
        "key material in the proxy log"
    );
    let key = proxy.dir.path().join("certs/acme_a.example.test.key");
    let mode = std::fs::metadata(&key)
        .expect("issued key file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_certificates_served_by_proxy() {
    issue_through_proxy("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_certificates_served_by_proxy() {
    issue_through_proxy("tls-alpn-01").await;
}
