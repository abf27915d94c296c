//! Test support: real backends, the real `switchyard` binary and real HTTP
//! clients, all on 127.0.0.1 ephemeral ports.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One request as a backend received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as they arrived on the request line.
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

/// A real HTTP/1.1 backend. Answers its name on any path with an `x-pool`
/// header; `/health` answers with the status in `health_status`;
/// `/status/NNN` answers NNN; `/sleep/MS` waits MS milliseconds first.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub health_status: Arc<AtomicU16>,
    /// When not 0, every request other than a health check gets this status.
    pub fail_status: Arc<AtomicU16>,
    /// Requests other than health checks.
    pub hits: Arc<AtomicUsize>,
    pub recorded: Arc<Mutex<Vec<Recorded>>>,
    /// When N > 0, every Nth request other than a health check answers 500.
    pub fail_every: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        TestBackend::serve(listener, name)
    }

    /// Serves on an already bound listener (for restarting on the same port).
    pub fn serve(listener: TcpListener, name: &str) -> TestBackend {
        let addr = listener.local_addr().expect("backend address");
        let (stop, stopped) = watch::channel(false);
        let backend = TestBackend {
            addr,
            name: name.to_string(),
            health_status: Arc::new(AtomicU16::new(200)),
            fail_status: Arc::new(AtomicU16::new(0)),
            hits: Arc::new(AtomicUsize::new(0)),
            recorded: Arc::new(Mutex::new(Vec::new())),
            fail_every: Arc::new(AtomicUsize::new(0)),
            stop,
        };
        let name: Arc<str> = Arc::from(name);
        let health = Arc::clone(&backend.health_status);
        let fail = Arc::clone(&backend.fail_status);
        let hits = Arc::clone(&backend.hits);
        let recorded = Arc::clone(&backend.recorded);
        let fail_every = Arc::clone(&backend.fail_every);
        tokio::spawn(async move {
            let mut stopped_accept = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped_accept.changed() => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (name, health, fail, hits, recorded, fail_every) = (
                    Arc::clone(&name),
                    Arc::clone(&health),
                    Arc::clone(&fail),
                    Arc::clone(&hits),
                    Arc::clone(&recorded),
                    Arc::clone(&fail_every),
                );
                let mut stopped_conn = stopped.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (name, health, fail, hits, recorded, fail_every) = (
                            Arc::clone(&name),
                            Arc::clone(&health),
                            Arc::clone(&fail),
                            Arc::clone(&hits),
                            Arc::clone(&recorded),
                            Arc::clone(&fail_every),
                        );
                        async move {
                            let mut response =
                                answer(request, &name, &health, &fail, &hits, &recorded).await;
                            let every = fail_every.load(Ordering::SeqCst);
                            let counted = response.headers().contains_key("x-pool");
                            if counted && every > 0 && hits.load(Ordering::SeqCst) % every == 0 {
                                *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let connection = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = connection => {}
                        _ = stopped_conn.changed() => {}
                    }
                });
            }
        });
        backend
    }

    /// Stops accepting and drops every open connection, like a killed process.
    pub fn kill(&self) {
        let _ = self.stop.send(true);
    }

    /// Answers `status` to every request other than health checks; 0 stops.
    pub fn set_fail(&self, status: u16) {
        self.fail_status.store(status, Ordering::SeqCst);
    }

    pub fn set_health(&self, status: u16) {
        self.health_status.store(status, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Makes every `n`th request (health checks aside) answer 500; 0 turns it off.
    pub fn set_fail_every(&self, n: usize) {
        self.fail_every.store(n, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    mut request: Request<hyper::body::Incoming>,
    name: &str,
    health: &AtomicU16,
    fail: &AtomicU16,
    hits: &AtomicUsize,
    recorded: &Mutex<Vec<Recorded>>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    let websocket_key = request
        .headers()
        .get("upgrade")
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .and(request.headers().get("sec-websocket-key"))
        .map(|v| v.as_bytes().to_vec());
    if let Some(key) = websocket_key {
        return accept_websocket(&mut request, &key, hits, recorded);
    }
    if path == "/health" {
        let status = health.load(Ordering::SeqCst);
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::from("health\n")))
            .unwrap();
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let method = request.method().to_string();
    let target = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    recorded.lock().unwrap().push(Recorded {
        method,
        target,
        headers,
        body,
    });
    let mut status = match fail.load(Ordering::SeqCst) {
        0 => 200,
        code => code,
    };
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().unwrap_or(500);
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    Response::builder()
        .status(status)
        .header("x-pool", name)
        .header("connection", "keep-alive, x-backend-secret")
        .header("x-backend-secret", "hop-by-hop")
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::from(format!("{name}\n"))))
        .unwrap()
}

/// Accepts a WebSocket upgrade with 101 and, once the connection is
/// upgraded, echoes every byte back. The echo works on raw bytes, not on
/// WebSocket frames, which is enough to see that the proxy forwards both ways.
fn accept_websocket(
    request: &mut Request<hyper::body::Incoming>,
    key: &[u8],
    hits: &AtomicUsize,
    recorded: &Mutex<Vec<Recorded>>,
) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    recorded.lock().unwrap().push(Recorded {
        method: request.method().to_string(),
        target: request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_default(),
        headers: request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: Vec::new(),
    });
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        let mut buffer = [0u8; 4096];
        loop {
            match io.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if io.write_all(&buffer[..n]).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", websocket_accept(key))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2):
/// base64 of the SHA-1 of the key followed by a fixed GUID.
pub fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(GUID);
    base64(context.finish().as_ref())
}

/// Standard base64 with padding (RFC 4648 section 4).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Returns a loopback port that was free a moment ago, for a listener the
/// proxy binds itself.
///
/// Ports come from 20000-32767, below Linux's ephemeral range (32768 and
/// up), so a port handed out here is never taken meanwhile by a backend or
/// client of a parallel test that binds port 0. Each test process starts at
/// an offset derived from its pid, and counts up from there.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) * 30,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2000 {
        let candidate = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (candidate - 20_000) % 12_768;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in 20000-32767");
}

/// A running `switchyard run` process with its own temp dir and config.
pub struct ProxyProcess {
    child: Child,
    pub http: SocketAddr,
    /// The HTTPS listener, when started with [`ProxyProcess::start_tls`].
    pub https: Option<SocketAddr>,
    /// The `[tls]` keys other than `store`, kept for `reload_with`.
    tls_keys: Option<String>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl ProxyProcess {
    /// Writes a config (the `[listeners]` table is added here) and starts
    /// the proxy; returns once the HTTP listener accepts connections.
    pub async fn start(body: &str) -> ProxyProcess {
        ProxyProcess::start_with_grace("1s", "1s", body).await
    }

    /// Like [`ProxyProcess::start`], with the shutdown grace period and the
    /// runtime shutdown timeout given.
    pub async fn start_with_grace(grace: &str, shutdown_timeout: &str, body: &str) -> ProxyProcess {
        let grace = format!("grace_period = \"{grace}\"");
        let shutdown_timeout = format!("graceful_shutdown_timeout = \"{shutdown_timeout}\"");
        ProxyProcess::start_rewritten(body, |text| {
            text.replace("grace_period = \"1s\"", &grace)
                .replace("graceful_shutdown_timeout = \"1s\"", &shutdown_timeout)
        })
        .await
    }

    /// Starts the proxy with an HTTPS listener next to the HTTP one and a
    /// `[tls]` table: `store` points at `certs_dir`, and `tls_keys` adds
    /// lines such as `unknown_sni = "reject"`. `body` must not contain a
    /// `[tls]` table. Returns once both listeners accept connections.
    pub async fn start_tls(tls_keys: &str, body: &str, certs_dir: &Path) -> ProxyProcess {
        let tls_keys = format!("store = \"{}\"\n{tls_keys}", certs_dir.display());
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        ProxyProcess::launch(http, Some(tls_keys), body, |text| text).await
    }

    /// Like [`ProxyProcess::start_tls`], with `rewrite` applied to the whole
    /// config text first (for example to turn the metrics listener on).
    pub async fn start_tls_rewritten(
        tls_keys: &str,
        body: &str,
        certs_dir: &Path,
        rewrite: impl FnOnce(String) -> String,
    ) -> ProxyProcess {
        let tls_keys = format!("store = \"{}\"\n{tls_keys}", certs_dir.display());
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        ProxyProcess::launch(http, Some(tls_keys), body, rewrite).await
    }

    /// Like [`ProxyProcess::start`], with `rewrite` applied to the whole
    /// config text first (for example to turn the metrics listener on).
    pub async fn start_rewritten(
        body: &str,
        rewrite: impl FnOnce(String) -> String,
    ) -> ProxyProcess {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        ProxyProcess::launch(http, None, body, rewrite).await
    }

    /// Like [`ProxyProcess::start_rewritten`], with the plain HTTP listener
    /// on `http` (for a test that must know the port before the proxy starts).
    pub async fn start_at(
        http: SocketAddr,
        body: &str,
        rewrite: impl FnOnce(String) -> String,
    ) -> ProxyProcess {
        ProxyProcess::launch(http, None, body, rewrite).await
    }

    async fn launch(
        http: SocketAddr,
        tls_keys: Option<String>,
        body: &str,
        rewrite: impl FnOnce(String) -> String,
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let https = tls_keys
            .as_ref()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let config_path = dir.path().join("switchyard.toml");
        let tls = https.zip(tls_keys.as_deref());
        let text = rewrite(proxy_config(dir.path(), http, tls, body));
        std::fs::write(&config_path, text).expect("write config");
        let log_path = dir.path().join("switchyard.log");
        let child = spawn_proxy(&config_path, &log_path, false);
        let proxy = ProxyProcess {
            child,
            http,
            https,
            tls_keys,
            dir,
            config_path,
            log_path,
        };
        proxy.wait_listening().await;
        proxy
    }

    /// Like [`ProxyProcess::start`], with extra lines for the `[admin]`
    /// table, such as the lines [`admin_lines`] returns.
    pub async fn start_with_admin(body: &str, admin: &str) -> ProxyProcess {
        let admin = format!("[admin]\nmetrics = \"off\"\n{admin}\n");
        ProxyProcess::start_rewritten(body, |text| {
            text.replace("[admin]\nmetrics = \"off\"\n", &admin)
        })
        .await
    }

    /// Kills the process (SIGKILL, so nothing is saved at exit) and starts
    /// it again with the same config; returns once it listens.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_proxy(&self.config_path, &self.log_path, false);
        self.wait_listening().await;
    }

    /// Performs a binary upgrade: starts `switchyard run --upgrade` with the
    /// same config, sends SIGQUIT to the running process and waits until it
    /// has exited. The new process replaces it in `self`.
    pub async fn upgrade(&mut self) {
        let next = spawn_proxy(&self.config_path, &self.log_path, true);
        // The new process must be waiting on the upgrade socket before the
        // old one sends its listeners there.
        let upgrade_socket = self.dir.path().join("upgrade.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !upgrade_socket.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut old = std::mem::replace(&mut self.child, next);
        unsafe {
            libc::kill(old.id() as i32, libc::SIGQUIT);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if old.try_wait().ok().flatten().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = old.kill();
                panic!(
                    "the old process did not exit within 20 s of SIGQUIT; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// Connects to the admin socket set up by [`admin_lines`].
    pub async fn admin(&self) -> AdminClient {
        AdminClient::connect(&self.admin_socket()).await
    }

    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in std::iter::once(self.http).chain(self.https) {
            loop {
                if TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "switchyard did not listen on {addr} within 15 s; log:\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Returns the HTTPS listener address; panics for a proxy started without one.
    pub fn https(&self) -> SocketAddr {
        self.https.expect("the proxy was started without HTTPS")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Starts a second process on the same config with `--upgrade`, which
    /// takes over the listening sockets once this one gets SIGQUIT. Its
    /// output goes to `upgrade.log` in the same directory.
    pub fn spawn_upgrade(&self) -> ChildGuard {
        let log_path = self.dir.path().join("upgrade.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("run")
            .arg("-u")
            .arg("-c")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log clone")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn switchyard --upgrade");
        ChildGuard { child, log_path }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log without terminal colour codes, so `key=value` fields match.
    pub fn plain_logs(&self) -> String {
        strip_ansi(&self.logs())
    }

    /// Replaces the config file body (listeners are kept) and sends SIGHUP.
    pub fn reload_with(&self, body: &str) {
        let tls = self.https.zip(self.tls_keys.as_deref());
        std::fs::write(
            &self.config_path,
            proxy_config(self.dir.path(), self.http, tls, body),
        )
        .expect("write config");
        self.signal(libc::SIGHUP);
    }

    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write config");
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits until the log contains `needle`, up to `timeout`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for next in chars.by_ref() {
                if next == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// A child process killed when dropped.
pub struct ChildGuard {
    pub child: Child,
    pub log_path: PathBuf,
}

impl ChildGuard {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-written TCP backend: `handler` gets each accepted connection and
/// its 0-based index. Lets tests misbehave in ways a real server will not.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start<F, Fut>(handler: F) -> RawBackend
    where
        F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        let connections = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream, index));
            }
        });
        RawBackend {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request (header and a Content-Length body) from a
/// raw backend connection; `None` when the peer closed first.
pub async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).into_owned();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Some((head, buffer[header_end..header_end + length].to_vec()))
}

fn spawn_proxy(config_path: &Path, log_path: &Path, upgrade: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command.arg("run").arg("-c").arg(config_path);
    if upgrade {
        command.arg("--upgrade");
    }
    command
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().expect("log clone")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn switchyard")
}

/// `[admin]` lines for an admin socket and state file in the proxy's dir.
pub fn admin_lines() -> &'static str {
    "socket = \"admin.sock\"\nstate_file = \"state.json\""
}

/// A client of the admin socket: one JSON request line, one response line.
pub struct AdminClient {
    reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl AdminClient {
    /// Connects, retrying for up to 10 s while the socket does not exist yet
    /// or nobody accepts on it (a process that is still starting).
    pub async fn connect(path: &Path) -> AdminClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("connect to {}: {err}", path.display()),
            }
        };
        let (read, writer) = stream.into_split();
        AdminClient {
            reader: tokio::io::BufReader::new(read),
            writer,
        }
    }

    /// Sends raw bytes (a newline is not added) and reads one response line;
    /// `None` when the server closed the connection first.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Option<serde_json::Value> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        // A server that rejects a long line stops reading, so the write may
        // fail; the response is read regardless.
        let _ = self.writer.write_all(bytes).await;
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .expect("admin response within 10 s");
        match read {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("response {line:?}: {e}")),
            ),
        }
    }

    pub async fn request(&mut self, request: serde_json::Value) -> serde_json::Value {
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');
        self.send_raw(&line).await.expect("a response line")
    }

    /// Sends a request that must succeed and returns its response.
    pub async fn ok(&mut self, request: serde_json::Value) -> serde_json::Value {
        let response = self.request(request.clone()).await;
        assert_eq!(
            response["ok"],
            serde_json::json!(true),
            "{request} -> {response}"
        );
        response
    }

    /// Whether the server has closed the connection.
    pub async fn is_closed(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.reader.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Builds the config file text: listeners, admin, the optional HTTPS listener
/// with its `[tls]` keys, then `body`.
fn proxy_config(
    dir: &Path,
    http: SocketAddr,
    tls: Option<(SocketAddr, &str)>,
    body: &str,
) -> String {
    let (https, tls_table) = match tls {
        Some((https, keys)) => (
            format!("https = \"{https}\"\n"),
            format!("[tls]\n{keys}\n\n"),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "[listeners]\nhttp = \"{http}\"\n{https}threads = 2\nupgrade_socket = \"{dir}/upgrade.sock\"\npid_file = \"{dir}/switchyard.pid\"\ngrace_period = \"1s\"\ngraceful_shutdown_timeout = \"1s\"\n\n[admin]\nmetrics = \"off\"\n\n{tls_table}{body}",
        dir = dir.display()
    )
}

/// A response as the test client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// An HTTP/1.1 client over one keep-alive connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(Client { sender, addr })
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, String> {
        let request = Request::get(path)
            .header("host", "app.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(request).await
    }
}

/// GET over a new connection, with the given Host.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Reply, String> {
    let mut client = Client::connect(addr).await.map_err(|e| e.to_string())?;
    let request = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.send(request).await
}

/// Sends raw bytes and reads until the server closes or `timeout` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition()
}

/// A two-pool route config over the given backends.
pub fn blue_green(
    blue: &[&TestBackend],
    green: &[&TestBackend],
    weights: (u32, u32),
    health: &str,
) -> String {
    let list = |backends: &[&TestBackend]| {
        backends
            .iter()
            .map(|b| format!("\"{}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[proxy]\nno_backend_wait = \"500ms\"\n\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = {}, green = {} }}\n\n[pools.blue]\nbackends = [{}]\n{health}\n\n[pools.green]\nbackends = [{}]\n{health}\n",
        weights.0,
        weights.1,
        list(blue),
        list(green),
    )
}

/// The health table used by most tests: fast checks with default thresholds.
pub const FAST_HEALTH: &str =
    "health = { path = \"/health\", interval = \"200ms\", timeout = \"150ms\" }";

/// A self-signed certificate generated for a test, with its serial.
pub struct TestCert {
    pub chain_pem: String,
    pub key_pem: String,
    /// Serial in lower-case hex without leading zeros, as the served leaf
    /// shows it.
    pub serial: String,
}

/// Serials for [`TestCert::generate`]; distinct within one test process.
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x5000);

impl TestCert {
    /// Generates a self-signed certificate with an ECDSA P-256 key whose
    /// DNS subject alternative names are `names`.
    pub fn generate(names: &[&str]) -> TestCert {
        let serial = NEXT_SERIAL.fetch_add(1, Ordering::SeqCst);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("certificate names");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let key = rcgen::KeyPair::generate().expect("key pair");
        let cert = params.self_signed(&key).expect("self-signed certificate");
        TestCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: format!("{serial:x}"),
        }
    }

    /// Writes `NAME.key` (mode 0600) then `NAME.crt` into `dir`, each by
    /// rename so that a scan never reads a half-written file.
    pub fn write(&self, dir: &Path, name: &str) {
        switchyard::tls::write_atomically(
            &dir.join(format!("{name}.key")),
            self.key_pem.as_bytes(),
            0o600,
        )
        .expect("write key");
        switchyard::tls::write_atomically(
            &dir.join(format!("{name}.crt")),
            self.chain_pem.as_bytes(),
            0o644,
        )
        .expect("write certificate");
    }
}

/// A certificate verifier that accepts any server certificate. The tests
/// read the served chain from the connection instead of trusting it, so
/// that one client can see every certificate the proxy picks. Handshake
/// signatures are still checked, which proves the server has the private key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds a rustls client config offering `alpn`; `sni` false sends no server name.
pub fn tls_client_config(alpn: &[&[u8]], sni: bool) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = sni;
    Arc::new(config)
}

/// What the client saw of a completed handshake.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// Serial of the served leaf, lower-case hex without leading zeros.
    pub serial: String,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
}

/// Opens a TLS connection offering `alpn`. `sni` `None` sends no server
/// name. Fails when the TCP connect or the handshake fails.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: Option<&str>,
    alpn: &[&[u8]],
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Handshake), String> {
    let config = tls_client_config(alpn, sni.is_some());
    // Without SNI the name only feeds the (disabled) certificate check.
    let name = rustls_pki_types::ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_string())
        .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (_, connection) = stream.get_ref();
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or("the server sent no certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("invalid leaf certificate: {e}"))?;
    let handshake = Handshake {
        serial: format!("{:x}", parsed.serial),
        alpn: connection.alpn_protocol().map(|p| p.to_vec()),
        version: connection.protocol_version(),
    };
    Ok((stream, handshake))
}

/// Completes a handshake and returns the served leaf's serial.
pub async fn served_serial(addr: SocketAddr, sni: Option<&str>) -> Result<String, String> {
    let (_, handshake) = tls_connect(addr, sni, &[b"http/1.1"]).await?;
    Ok(handshake.serial)
}

impl Client {
    /// An HTTP/1.1 client over one keep-alive TLS connection; also returns
    /// the handshake.
    pub async fn connect_tls(addr: SocketAddr, sni: &str) -> Result<(Client, Handshake), String> {
        let (stream, handshake) = tls_connect(addr, Some(sni), &[b"http/1.1"]).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok((Client { sender, addr }, handshake))
    }

    /// GET `path` with the given `Host`.
    pub async fn get_host(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        let request = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(request).await
    }
}

/// Builds a config with one catch-all route to `backend`.
pub fn single_route(backend: &TestBackend) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ main = 100 }}\n\n[pools.main]\nbackends = [\"{}\"]\n",
        backend.addr
    )
}
