//! Starts Let's Encrypt's test CA, pebble, with its mock DNS server
//! pebble-challtestsrv, on free 127.0.0.1 ports for one test.
//!
//! Safety rules this harness enforces:
//! - pebble always gets `-dnsserver` pointing at the challtestsrv, so it
//!   never queries the machine's resolver (which may be off the machine);
//! - the challtestsrv answers every name with 127.0.0.1 and no AAAA record
//!   (`-defaultIPv6 ""`), and its own challenge responders are off;
//! - every port is checked free before start, and each process must still
//!   be alive once its port answers, so a test never talks to a stale
//!   instance with other settings.
//!
//! pebble validates HTTP-01 at `http://HOST:http_port/` and TLS-ALPN-01 at
//! `HOST:tls_port`; point those at the responders under test. A new issuing
//! root is generated on every pebble start: fetch it with `issuer_root()`.

#![allow(dead_code)]

use std::fs;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time allowed for each process to respond after start.
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct PebbleSettings {
    /// Port pebble sends HTTP-01 validation requests to.
    pub http_port: u16,
    /// Port pebble sends TLS-ALPN-01 validation handshakes to.
    pub tls_port: u16,
    /// Lifetime of issued certificates, in seconds.
    pub validity_secs: u64,
}

pub struct Pebble {
    dir: tempfile::TempDir,
    settings: PebbleSettings,
    pub acme_port: u16,
    pub management_port: u16,
    pub dns_port: u16,
    pub challtestsrv_port: u16,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
}

impl Pebble {
    /// True when both binaries are on `PATH` (Debian package `pebble`).
    /// With `SWITCHYARD_REQUIRE_PEBBLE` set, as `.ci/run` sets it, a missing
    /// pebble fails the test instead of skipping it, so that CI cannot pass
    /// with the ACME tests unrun.
    pub fn installed() -> bool {
        let found = on_path("pebble") && on_path("pebble-challtestsrv");
        assert!(
            found || std::env::var_os("SWITCHYARD_REQUIRE_PEBBLE").is_none(),
            "pebble and pebble-challtestsrv are not on PATH; run scripts/install-deps.sh (apt-get install pebble)"
        );
        found
    }

    /// Starts challtestsrv and pebble. Retries with new ports if another
    /// process took a port between the check and the start.
    pub async fn start(settings: PebbleSettings) -> Result<Pebble, String> {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Pebble::try_start(settings.clone()).await {
                Ok(pebble) => return Ok(pebble),
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    }

    async fn try_start(settings: PebbleSettings) -> Result<Pebble, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
        write_api_certificate(dir.path())?;
        let mut pebble = Pebble {
            dir,
            settings,
            acme_port: free_tcp_port()?,
            management_port: free_tcp_port()?,
            dns_port: free_udp_and_tcp_port()?,
            challtestsrv_port: free_tcp_port()?,
            pebble: None,
            challtestsrv: None,
        };
        pebble.start_challtestsrv().await?;
        pebble.start_ca().await?;
        Ok(pebble)
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// PEM root of pebble's own HTTPS API; the ACME client must trust it.
    pub fn api_root_path(&self) -> PathBuf {
        self.dir.path().join("api-root.pem")
    }

    pub fn settings(&self) -> &PebbleSettings {
        &self.settings
    }

    /// Fetches the root that signs issued certificates (`/roots/0` on the
    /// management port). It changes on every pebble start.
    pub async fn issuer_root(&self) -> Result<CertificateDer<'static>, String> {
        let (status, body) = self.https_get(self.management_port, "/roots/0").await?;
        if status != 200 {
            return Err(format!("GET /roots/0 returned {status}"));
        }
        CertificateDer::from_pem_slice(&body).map_err(|e| format!("invalid /roots/0 PEM: {e}"))
    }

    /// Stops pebble (the CA), keeping challtestsrv. Its state is lost.
    pub fn stop_ca(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts pebble on its ports (again, after `stop_ca`) and waits until
    /// its directory responds.
    pub async fn start_ca(&mut self) -> Result<(), String> {
        for port in [self.acme_port, self.management_port] {
            ensure_tcp_port_free(port)?;
        }
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.acme_port),
                "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
                "certificate": self.dir.path().join("api-cert.pem"),
                "privateKey": self.dir.path().join("api-key.pem"),
                "httpPort": self.settings.http_port,
                "tlsPort": self.settings.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": self.settings.validity_secs,
            }
        });
        let config_path = self.dir.path().join("pebble-config.json");
        fs::write(&config_path, config.to_string())
            .map_err(|e| format!("cannot write the pebble config: {e}"))?;
        let log = self.log_file("pebble.log")?;
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .arg("-strict=false")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            // Validate on every order, renewals included.
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start pebble: {e}"))?;
        self.pebble = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.ensure_alive()?;
            if let Ok((200, body)) = self.https_get(self.acme_port, "/dir").await {
                if String::from_utf8_lossy(&body).contains("newOrder") {
                    // Still alive after the response, so the response came
                    // from this process and not from a stale one.
                    return self.ensure_alive();
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pebble did not answer on 127.0.0.1:{} within {START_TIMEOUT:?}; log:\n{}",
                    self.acme_port,
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn start_challtestsrv(&mut self) -> Result<(), String> {
        ensure_tcp_port_free(self.challtestsrv_port)?;
        ensure_tcp_port_free(self.dns_port)?;
        let log = self.log_file("challtestsrv.log")?;
        let child = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .arg("-dns01")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .arg("-management")
            .arg(format!("127.0.0.1:{}", self.challtestsrv_port))
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start pebble-challtestsrv: {e}"))?;
        self.challtestsrv = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.ensure_alive()?;
            let dns_bound = UdpSocket::bind(("127.0.0.1", self.dns_port)).is_err();
            let management = TcpStream::connect(("127.0.0.1", self.challtestsrv_port)).is_ok();
            if dns_bound && management {
                return self.ensure_alive();
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pebble-challtestsrv did not start within {START_TIMEOUT:?}; log:\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails with the logs if a started process has exited.
    fn ensure_alive(&mut self) -> Result<(), String> {
        let mut exited = None;
        for (name, child) in [
            ("pebble", &mut self.pebble),
            ("pebble-challtestsrv", &mut self.challtestsrv),
        ] {
            if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
                exited = Some(format!("{name} exited with {status}"));
            }
        }
        match exited {
            Some(message) => Err(format!("{message}; logs:\n{}", self.logs())),
            None => Ok(()),
        }
    }

    /// Both processes' output so far.
    pub fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- pebble.log\n{}\n--- challtestsrv.log\n{}",
            read("pebble.log"),
            read("challtestsrv.log")
        )
    }

    fn log_file(&self, name: &str) -> Result<fs::File, String> {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .map_err(|e| format!("cannot open {name}: {e}"))
    }

    /// Sends a one-shot HTTP/1.0 GET over TLS to pebble, trusting only the API
    /// root. HTTP/1.0 keeps Go from chunking the body.
    async fn https_get(&self, port: u16, path: &str) -> Result<(u16, Vec<u8>), String> {
        let mut roots = rustls::RootCertStore::empty();
        let root = CertificateDer::from_pem_file(self.api_root_path())
            .map_err(|e| format!("cannot read the API root: {e}"))?;
        roots.add(root).map_err(|e| e.to_string())?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
            tls.write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut response = Vec::new();
            let _ = tls.read_to_end(&mut response).await;
            Ok::<_, String>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| format!("GET {path} on port {port} timed out"))??;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("GET {path}: no HTTP header end"))?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("GET {path}: invalid status line {head:?}"))?;
        Ok((status, response[split + 4..].to_vec()))
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [self.pebble.take(), self.challtestsrv.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

fn free_tcp_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// Finds a port free for both UDP and TCP, for the mock DNS server.
fn free_udp_and_tcp_port() -> Result<u16, String> {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = udp.local_addr().map_err(|e| e.to_string())?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("cannot find a port free for both UDP and TCP".to_string())
}

fn ensure_tcp_port_free(port: u16) -> Result<(), String> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| {
            format!("port 127.0.0.1:{port} is in use ({e}); refusing to start pebble on it")
        })
}

/// Writes a throwaway CA and a certificate for `localhost`/127.0.0.1
/// signed by it, for pebble's own HTTPS API (Debian ships none).
fn write_api_certificate(dir: &Path) -> Result<(), String> {
    let ca_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pebble test API root");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| e.to_string())?;

    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).map_err(|e| e.to_string())?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).map_err(|e| e.to_string())?;

    fs::write(dir.join("api-root.pem"), ca.pem()).map_err(|e| e.to_string())?;
    fs::write(dir.join("api-cert.pem"), cert.pem()).map_err(|e| e.to_string())?;
    fs::write(dir.join("api-key.pem"), key.serialize_pem()).map_err(|e| e.to_string())?;
    Ok(())
}
