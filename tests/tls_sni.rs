//! Certificate selection by SNI through the real proxy binary, seen by a
//! rustls client that reads the served leaf's serial.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

/// The store used by most tests here: two hosts, a wildcard and a default.
struct Certs {
    a: TestCert,
    b: TestCert,
    wild: TestCert,
    default: TestCert,
}

fn write_certs(dir: &Path) -> Certs {
    let certs = Certs {
        a: TestCert::generate(&["a.test"]),
        b: TestCert::generate(&["b.test", "www.b.test"]),
        wild: TestCert::generate(&["*.wild.test"]),
        default: TestCert::generate(&["default.test"]),
    };
    certs.a.write(dir, "a");
    certs.b.write(dir, "b");
    certs.wild.write(dir, "wild");
    certs.default.write(dir, "fallback");
    certs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_wildcard_default() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let certs = write_certs(store.path());
    let proxy = ProxyProcess::start_tls(
        "default_certificate = \"fallback\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    let https = proxy.https();

    let cases = [
        ("a.test", &certs.a.serial),
        ("A.Test", &certs.a.serial),
        ("b.test", &certs.b.serial),
        ("www.b.test", &certs.b.serial),
        ("x.wild.test", &certs.wild.serial),
        ("other.wild.test", &certs.wild.serial),
        // A wildcard covers exactly one label.
        ("deep.x.wild.test", &certs.default.serial),
        ("wild.test", &certs.default.serial),
        ("default.test", &certs.default.serial),
        ("unknown.test", &certs.default.serial),
    ];
    for (sni, expected) in cases {
        let served = served_serial(https, Some(sni)).await.unwrap();
        assert_eq!(&served, expected, "SNI {sni}");
    }

    let no_sni = served_serial(https, None).await.unwrap();
    assert_eq!(no_sni, certs.default.serial, "no SNI");

    // The certificate serves real requests, not only handshakes.
    let (mut client, handshake) = Client::connect_tls(https, "b.test").await.unwrap();
    assert_eq!(handshake.serial, certs.b.serial);
    let reply = client.get_host("b.test", "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_rejected_when_configured() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let certs = write_certs(store.path());
    let proxy = ProxyProcess::start_tls(
        "default_certificate = \"fallback\"\nunknown_sni = \"reject\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    let https = proxy.https();

    let refused = served_serial(https, Some("unknown.test")).await;
    assert!(refused.is_err(), "unknown SNI got {refused:?}");
    let refused = served_serial(https, Some("deep.x.wild.test")).await;
    assert!(
        refused.is_err(),
        "two labels under the wildcard got {refused:?}"
    );

    // Known names and clients without SNI are unaffected.
    assert_eq!(
        served_serial(https, Some("a.test")).await.unwrap(),
        certs.a.serial
    );
    assert_eq!(
        served_serial(https, Some("x.wild.test")).await.unwrap(),
        certs.wild.serial
    );
    assert_eq!(
        served_serial(https, None).await.unwrap(),
        certs.default.serial
    );

    // The handshake fails for openssl as well.
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &https.to_string()])
        .args(["-servername", "unknown.test"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("Cipher is (NONE)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_default_with_openssl() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let certs = write_certs(store.path());
    let proxy = ProxyProcess::start_tls(
        "default_certificate = \"fallback\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    for (sni, expected) in [
        (Some("x.wild.test"), &certs.wild.serial),
        (Some("unknown.test"), &certs.default.serial),
        (None, &certs.default.serial),
    ] {
        let mut command = std::process::Command::new("openssl");
        command
            .args(["s_client", "-connect", &proxy.https().to_string()])
            .stdin(std::process::Stdio::null());
        match sni {
            Some(name) => command.args(["-servername", name]),
            None => command.arg("-noservername"),
        };
        let output = command.output().expect("run openssl");
        let pem = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{pem}");
        let serial = openssl_serial(&pem);
        assert_eq!(&serial, expected, "SNI {sni:?}");
    }
}

/// Returns the serial of the first certificate in `s_client` output, through
/// `openssl x509`, normalized to lower-case hex without leading zeros.
fn openssl_serial(s_client_output: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl x509");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(s_client_output.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let hex = line.strip_prefix("serial=").unwrap_or(&line);
    hex.trim_start_matches('0').to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_readable_key_warns() {
    use std::os::unix::fs::PermissionsExt;
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(&["a.test"]);
    cert.write(store.path(), "a");
    let key_path = store.path().join("a.key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let proxy = ProxyProcess::start_tls("", &single_route(&backend), store.path()).await;
    assert!(
        proxy
            .wait_log("run chmod 600", Duration::from_secs(5))
            .await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.plain_logs();
    let warning = logs
        .lines()
        .find(|line| line.contains("run chmod 600"))
        .unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&key_path.display().to_string()),
        "{warning}"
    );
    assert!(warning.contains("640"), "{warning}");
    // The key still loads: the warning does not block serving.
    assert_eq!(
        served_serial(proxy.https(), Some("a.test")).await.unwrap(),
        cert.serial
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_mode_600_is_quiet() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(&["a.test"]);
    cert.write(store.path(), "a");
    let proxy = ProxyProcess::start_tls("", &single_route(&backend), store.path()).await;
    assert_eq!(
        served_serial(proxy.https(), Some("a.test")).await.unwrap(),
        cert.serial
    );
    assert!(
        proxy
            .wait_log("certificate loaded", Duration::from_secs(5))
            .await
    );
    assert!(!proxy.logs().contains("chmod"), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_default_certificate_warns() {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    let certs = write_certs(store.path());
    let proxy = ProxyProcess::start_tls(
        "default_certificate = \"missing\"\n",
        &single_route(&backend),
        store.path(),
    )
    .await;
    assert!(
        proxy
            .wait_log(
                "the default certificate is not in the store",
                Duration::from_secs(5)
            )
            .await,
        "{}",
        proxy.logs()
    );
    assert!(proxy.plain_logs().contains("default_certificate=missing"));

    let no_sni = served_serial(proxy.https(), None).await;
    assert!(no_sni.is_err(), "no SNI got {no_sni:?}");
    assert_eq!(
        served_serial(proxy.https(), Some("a.test")).await.unwrap(),
        certs.a.serial
    );

    // The default starts working once its files arrive.
    let late = TestCert::generate(&["late.test"]);
    late.write(store.path(), "missing");
    proxy.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut served = served_serial(proxy.https(), None).await;
    while served.as_ref() != Ok(&late.serial) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        served = served_serial(proxy.https(), None).await;
    }
    assert_eq!(served, Ok(late.serial.clone()));
}
