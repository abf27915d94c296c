//! Starting and stopping the processes a scenario measures: the backend,
//! Switchyard, nginx and HAProxy, each with a config written for the run.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::affinity;

/// A child process that is stopped (SIGINT, then SIGKILL) when dropped.
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) -> Result<(), String> {
        // SAFETY: kill(2) with the pid of a child this handle still owns.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "cannot signal {} (pid {}): {}",
                self.name,
                self.pid(),
                std::io::Error::last_os_error()
            ))
        }
    }

    /// Waits up to `limit` for the process to exit; returns whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops the process: SIGINT (fast shutdown for all three proxies),
    /// then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = self.signal(libc::SIGINT);
        if !self.wait_exit(Duration::from_secs(10)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Reads the last `lines` lines of the process's output, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns `command` with output to `log`, pinned to `core` (`None`: any CPU).
pub fn spawn(
    name: &str,
    mut command: Command,
    log: &Path,
    core: Option<usize>,
) -> Result<Process, String> {
    let out = fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    command.stdout(out).stderr(err).stdin(Stdio::null());
    affinity::pin_command(&mut command, core);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {name} ({command:?}): {e}"))?;
    Ok(Process {
        name: name.to_string(),
        child,
        log: log.to_path_buf(),
    })
}

/// Finds an unused loopback port. Another process could take it before the
/// caller binds it, which would show as a failed start.
pub fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// Sends `GET path` until it returns 200 or `limit` passes.
pub fn wait_ready(addr: SocketAddr, path: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match probe(addr, path) {
            Ok(200) => return Ok(()),
            Ok(status) => last = format!("status {status}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{addr} did not answer GET {path} with 200 within {limit:?}; last result: {last}"
    ))
}

/// One HTTP/1.1 GET with `Connection: close`; returns the status code.
pub fn probe(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut head);
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "no HTTP status in {:?}",
                text.chars().take(80).collect::<String>()
            )
        })
}

/// Starts `switchyard-bench backend` as a child process (so its CPU can be
/// measured and pinned apart from the load generator) and returns it with
/// the address it printed.
pub fn start_backend_process(
    exe: &Path,
    dir: &Path,
    name: &str,
    core: Option<usize>,
) -> Result<(Process, SocketAddr), String> {
    let mut command = Command::new(exe);
    command.args([
        "backend",
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
        "--body-bytes",
        "100",
    ]);
    let log = dir.join(format!("backend-{name}.log"));
    let mut process = spawn(&format!("backend {name}"), command, &log, core)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let file = fs::File::open(&log).map_err(|e| e.to_string())?;
        if let Some(Ok(line)) = BufReader::new(file).lines().next() {
            let addr: SocketAddr = line
                .trim()
                .parse()
                .map_err(|_| format!("backend printed {line:?} instead of its address"))?;
            return Ok((process, addr));
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            return Err(format!(
                "backend exited with {status}: {}",
                process.log_tail(10)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("backend did not print its address within 10 s".to_string())
}

/// Settings of a Switchyard config written for a scenario.
#[derive(Clone, Debug)]
pub struct SwitchyardConfig {
    pub dir: PathBuf,
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub threads: usize,
    /// Pools in order, each with its initial weight and backends.
    pub pools: Vec<(String, u32, Vec<SocketAddr>)>,
    pub access_log: bool,
    pub admin_socket: Option<PathBuf>,
    /// Certificate store folder; needed with `https`.
    pub tls_store: Option<PathBuf>,
    pub tls_rescan: Duration,
    pub health_interval: Duration,
}

impl SwitchyardConfig {
    pub fn new(dir: &Path) -> SwitchyardConfig {
        SwitchyardConfig {
            dir: dir.to_path_buf(),
            http: None,
            https: None,
            threads: 1,
            pools: Vec::new(),
            access_log: false,
            admin_socket: None,
            tls_store: None,
            tls_rescan: Duration::from_secs(1),
            health_interval: Duration::from_secs(1),
        }
    }

    pub fn render(&self) -> String {
        let dir = self.dir.display();
        let mut out = String::from("[listeners]\n");
        if let Some(http) = self.http {
            out += &format!("http = \"{http}\"\n");
        }
        if let Some(https) = self.https {
            out += &format!("https = \"{https}\"\nplain_http = \"proxy\"\n");
        }
        out += &format!(
            "threads = {}\nupgrade_socket = \"{dir}/upgrade.sock\"\npid_file = \"{dir}/switchyard.pid\"\n",
            self.threads
        );
        out += "\n[admin]\nmetrics = \"off\"\n";
        if let Some(socket) = &self.admin_socket {
            out += &format!("socket = \"{}\"\n", socket.display());
        }
        if let Some(store) = &self.tls_store {
            out += &format!(
                "\n[tls]\nstore = \"{}\"\nrescan_interval = \"{}ms\"\n",
                store.display(),
                self.tls_rescan.as_millis()
            );
        }
        // Access log events are at info level, so a warn filter would drop them.
        let level = if self.access_log { "info" } else { "warn" };
        out += &format!(
            "\n[log]\nlevel = \"{level}\"\naccess_log = {}\n",
            self.access_log
        );
        let weights: Vec<String> = self
            .pools
            .iter()
            .map(|(name, weight, _)| format!("{name} = {weight}"))
            .collect();
        out += &format!(
            "\n[[routes]]\nname = \"bench\"\nhosts = [\"*\"]\nplain_http = true\npools = {{ {} }}\n",
            weights.join(", ")
        );
        for (name, _, backends) in &self.pools {
            let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
            out += &format!(
                "\n[pools.{name}]\nbackends = [{}]\nhealth = {{ path = \"/health\", interval = \"{}ms\", timeout = \"{}ms\" }}\n",
                list.join(", "),
                self.health_interval.as_millis(),
                self.health_interval.as_millis().min(1000)
            );
        }
        out
    }

    pub fn write(&self) -> Result<PathBuf, String> {
        let path = self.dir.join("switchyard.toml");
        fs::write(&path, self.render())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// Starts `switchyard run -c CONFIG` (with `--upgrade` when taking over
/// from a running instance).
pub fn start_switchyard(
    bin: &Path,
    config: &Path,
    upgrade: bool,
    core: Option<usize>,
    log_name: &str,
) -> Result<Process, String> {
    let mut command = Command::new(bin);
    command.arg("run").arg("-c").arg(config);
    if upgrade {
        command.arg("--upgrade");
    }
    let dir = config.parent().unwrap_or(Path::new("."));
    spawn("switchyard", command, &dir.join(log_name), core)
}

/// Writes the nginx reverse-proxy config used for comparisons: upstream
/// keep-alive, HTTP/1.1 upstream, no access log, `workers` processes.
pub fn nginx_config(dir: &Path, listen: SocketAddr, backend: SocketAddr, workers: usize) -> String {
    let dir = dir.display();
    format!(
        r#"worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/nginx-tmp;
    proxy_temp_path {dir}/nginx-tmp;
    fastcgi_temp_path {dir}/nginx-tmp;
    uwsgi_temp_path {dir}/nginx-tmp;
    scgi_temp_path {dir}/nginx-tmp;
    upstream backend {{ server {backend}; keepalive 128; keepalive_requests 10000000; keepalive_timeout 60s; }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"#
    )
}

pub fn start_nginx(
    dir: &Path,
    backend: SocketAddr,
    workers: usize,
    core: Option<usize>,
) -> Result<(Process, SocketAddr), String> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let path = dir.join("nginx.conf");
    fs::write(&path, nginx_config(dir, listen, backend, workers))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut command = Command::new("nginx");
    command
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    let process = spawn("nginx", command, &dir.join("nginx.log"), core)?;
    Ok((process, listen))
}

/// Writes the HAProxy config used for comparisons: HTTP mode with
/// keep-alive, `http-reuse always` (so one-request client connections
/// still reuse server connections, like nginx's pool), `threads` threads.
pub fn haproxy_config(
    listen: SocketAddr,
    backend: SocketAddr,
    threads: usize,
    maxconn: usize,
) -> String {
    format!(
        r#"global
    nbthread {threads}
    maxconn {maxconn}
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 75s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend fe
    bind {listen} backlog 4096
    http-request set-header X-Forwarded-Proto http
    default_backend be
backend be
    server s1 {backend}
"#
    )
}

pub fn start_haproxy(
    dir: &Path,
    backend: SocketAddr,
    threads: usize,
    maxconn: usize,
    core: Option<usize>,
) -> Result<(Process, SocketAddr), String> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let path = dir.join("haproxy.cfg");
    fs::write(&path, haproxy_config(listen, backend, threads, maxconn))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut command = Command::new("haproxy");
    command.arg("-f").arg(&path).arg("-db");
    let process = spawn("haproxy", command, &dir.join("haproxy.log"), core)?;
    Ok((process, listen))
}

/// Checks whether `program` can be run (is found on PATH).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switchyard_config_lists_pools() {
        let mut config = SwitchyardConfig::new(Path::new("/tmp/x"));
        config.http = Some("127.0.0.1:8080".parse().unwrap());
        config.pools = vec![
            ("blue".into(), 100, vec!["127.0.0.1:1".parse().unwrap()]),
            ("green".into(), 0, vec!["127.0.0.1:2".parse().unwrap()]),
        ];
        config.admin_socket = Some(PathBuf::from("/tmp/x/admin.sock"));
        let text = config.render();
        assert!(text.contains("pools = { blue = 100, green = 0 }"), "{text}");
        assert!(
            text.contains("[pools.green]\nbackends = [\"127.0.0.1:2\"]"),
            "{text}"
        );
        assert!(text.contains("socket = \"/tmp/x/admin.sock\""), "{text}");
        assert!(text.contains("access_log = false"), "{text}");
    }
}
