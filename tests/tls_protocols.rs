//! TLS versions and ALPN on the HTTPS listener, with openssl, curl, h2load
//! and rustls as clients.

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::process::Command;

async fn start() -> (TestBackend, tempfile::TempDir, TestCert, ProxyProcess) {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(&["a.test"]);
    cert.write(store.path(), "a");
    let proxy = ProxyProcess::start_tls("", &single_route(&backend), store.path()).await;
    (backend, store, cert, proxy)
}

/// Runs `openssl s_client` with `version_flag`; returns whether it
/// succeeded and its combined output.
async fn s_client(https: SocketAddr, version_flag: &str) -> (bool, String) {
    // Debian's OpenSSL 3 refuses to offer TLS 1.0 and 1.1 at its default
    // security level, so the client could not even try without level 0.
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &https.to_string()])
        .args(["-servername", "a.test", version_flag])
        .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_tls_versions_rejected() {
    let (_backend, _store, _cert, proxy) = start().await;
    for flag in ["-tls1", "-tls1_1"] {
        let (ok, text) = s_client(proxy.https(), flag).await;
        assert!(!ok, "{flag} handshake succeeded:\n{text}");
        assert!(text.contains("Cipher is (NONE)"), "{flag}:\n{text}");
        // A fatal alert from the server proves that the ClientHello went
        // out and the server rejected it, rather than the client giving up
        // on its own. rustls 0.23 rejects both versions with a
        // handshake_failure alert; protocol_version would be as good.
        assert!(
            text.contains("alert protocol version") || text.contains("alert handshake failure"),
            "{flag}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_accepted() {
    let (_backend, _store, cert, proxy) = start().await;
    for (flag, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, text) = s_client(proxy.https(), flag).await;
        assert!(ok, "{flag} handshake failed:\n{text}");
        assert!(
            text.contains(&format!("Protocol  : {protocol}"))
                || text.contains(&format!("New, {protocol}")),
            "{flag}:\n{text}"
        );
        assert!(!text.contains("Cipher is (NONE)"), "{flag}:\n{text}");
    }
    // rustls negotiates TLS 1.3 by default.
    let (_, handshake) = tls_connect(proxy.https(), Some("a.test"), &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(handshake.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(handshake.serial, cert.serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_prefers_h2() {
    let (_backend, _store, _cert, proxy) = start().await;
    let https = proxy.https();
    // Protocols the client offers, in its order, and the one expected.
    type Case = (&'static [&'static [u8]], Option<&'static [u8]>);
    let cases: [Case; 4] = [
        (&[b"h2", b"http/1.1"], Some(b"h2")),
        (&[b"http/1.1", b"h2"], Some(b"h2")),
        (&[b"http/1.1"], Some(b"http/1.1")),
        (&[], None),
    ];
    for (offered, expected) in cases {
        let (_, handshake) = tls_connect(https, Some("a.test"), offered).await.unwrap();
        assert_eq!(handshake.alpn.as_deref(), expected, "offered {offered:?}");
    }
}

/// Runs curl against `https` with the given HTTP version switch; returns
/// `(http_version, status, body)`.
async fn curl(https: SocketAddr, version_flag: &str) -> (String, String, String) {
    let body = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new("curl")
        .args(["-sS", "-k", version_flag, "-o"])
        .arg(body.path())
        .args(["-w", "%{http_version} %{http_code}"])
        .args(["--resolve", &format!("a.test:{}:127.0.0.1", https.port())])
        .arg(format!("https://a.test:{}/hello", https.port()))
        .output()
        .await
        .expect("run curl");
    let written = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "curl {version_flag} failed: {written} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (version, status) = written.split_once(' ').unwrap();
    let text = std::fs::read_to_string(body.path()).unwrap();
    (
        version.to_string(),
        status.to_string(),
        text.trim().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_and_http11() {
    let (backend, _store, _cert, proxy) = start().await;
    let (version, status, body) = curl(proxy.https(), "--http2").await;
    assert_eq!(version, "2");
    assert_eq!(status, "200");
    assert_eq!(body, "app");

    let (version, status, body) = curl(proxy.https(), "--http1.1").await;
    assert_eq!(version, "1.1");
    assert_eq!(status, "200");
    assert_eq!(body, "app");

    let requests = backend.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.target, "/hello");
        assert_eq!(
            request.header("host").as_deref(),
            Some(&*format!("a.test:{}", proxy.https().port()))
        );
        assert_eq!(
            request.header("x-forwarded-proto").as_deref(),
            Some("https")
        );
    }
}

/// Parses the counters of h2load's `requests:` line, by name.
fn h2load_counts(output: &str) -> std::collections::HashMap<String, u64> {
    let line = output
        .lines()
        .find(|line| line.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no requests line in h2load output:\n{output}"));
    line["requests:".len()..]
        .split(',')
        .filter_map(|part| {
            let (count, name) = part.trim().split_once(' ')?;
            Some((name.to_string(), count.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_completes_all_requests() {
    let (backend, _store, _cert, proxy) = start().await;
    let output = Command::new("h2load")
        .args(["-n", "200", "-c", "4", "-m", "4"])
        .arg(format!("https://127.0.0.1:{}/load", proxy.https().port()))
        .output()
        .await
        .expect("run h2load");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{text}");
    assert!(text.contains("Application protocol: h2"), "{text}");
    let counts = h2load_counts(&text);
    assert_eq!(counts.get("total"), Some(&200), "{text}");
    assert_eq!(counts.get("succeeded"), Some(&200), "{text}");
    assert_eq!(counts.get("failed"), Some(&0), "{text}");
    assert_eq!(counts.get("errored"), Some(&0), "{text}");
    assert_eq!(counts.get("timeout"), Some(&0), "{text}");
    assert!(text.contains("status codes: 200 2xx"), "{text}");
    assert_eq!(backend.hits(), 200);
}
