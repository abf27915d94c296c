//! The memory scenario: hold many idle keep-alive client connections open
//! through a proxy and measure the proxy's resident memory per connection.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::backend::{self, BackendOptions};
use crate::client::{self, RequestTemplate};
use crate::procstat;
use crate::proxies::{self, Process, SwitchyardConfig};
use crate::target::Target;

/// Connections opened at once while building up the idle set, well below
/// the listen backlogs (4096 for nginx and HAProxy here).
const OPEN_CONCURRENCY: usize = 200;

#[derive(Clone, Debug)]
pub struct MemoryOptions {
    pub switchyard: Option<PathBuf>,
    pub connections: usize,
    pub include_nginx: bool,
    pub include_haproxy: bool,
    pub work_dir: PathBuf,
    /// How long the connections stay idle before RSS is read.
    pub settle: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryResult {
    pub target: String,
    pub connections_requested: usize,
    pub connections_open: usize,
    pub failed: usize,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
    pub peak_rss_kib: u64,
    /// (idle RSS − RSS before) / open connections, in bytes.
    pub bytes_per_connection: f64,
    pub note: String,
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> Result<u64, String> {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(format!(
                "getrlimit failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(format!(
                "setrlimit failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(limit.rlim_cur)
    }
}

/// A started proxy and its listener, or why it did not start.
type Started = Result<(Process, SocketAddr), String>;

pub fn run(options: &MemoryOptions) -> Result<Vec<MemoryResult>, String> {
    let limit = raise_nofile_limit()?;
    // The client uses one socket per connection and the proxy two.
    let needed = options.connections as u64 + 200;
    if limit < needed {
        return Err(format!(
            "the open-file limit is {limit}, below the {needed} needed for {} connections; lower --connections or raise the hard limit (ulimit -Hn)",
            options.connections
        ));
    }
    fs::create_dir_all(&options.work_dir)
        .map_err(|e| format!("cannot create {}: {e}", options.work_dir.display()))?;
    let backend = backend::spawn(
        "127.0.0.1:0"
            .parse()
            .map_err(|_| "bad address".to_string())?,
        BackendOptions::new("blue"),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))?;
    let mut results = Vec::new();
    let mut subjects: Vec<(String, Started, String)> = Vec::new();
    if let Some(bin) = &options.switchyard {
        let dir = options.work_dir.join("memory-switchyard");
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut config = SwitchyardConfig::new(&dir);
        let addr = SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?));
        config.http = Some(addr);
        config.threads = 1;
        config.pools = vec![("blue".to_string(), 100, vec![backend.addr])];
        let started = config
            .write()
            .and_then(|path| proxies::start_switchyard(bin, &path, false, None, "switchyard.log"))
            .map(|p| (p, addr));
        subjects.push(("switchyard".into(), started, "1 thread".into()));
    }
    if options.include_nginx {
        let dir = options.work_dir.join("memory-nginx");
        fs::create_dir_all(dir.join("nginx-tmp")).map_err(|e| e.to_string())?;
        let started = proxies::start_nginx(&dir, backend.addr, 1, None);
        subjects.push((
            "nginx".into(),
            started,
            "1 worker; RSS of master + worker".into(),
        ));
    }
    if options.include_haproxy {
        // HAProxy reserves about 2 descriptors per maxconn at start and
        // refuses to run when that exceeds the hard limit.
        let maxconn = options.connections + 100;
        if (maxconn as u64) * 2 + 100 > limit {
            results.push(MemoryResult {
                target: "haproxy".into(),
                connections_requested: options.connections,
                connections_open: 0,
                failed: 0,
                rss_before_kib: 0,
                rss_idle_kib: 0,
                peak_rss_kib: 0,
                bytes_per_connection: 0.0,
                note: format!("not run: maxconn {maxconn} needs about {} descriptors, the hard limit is {limit}", maxconn * 2 + 100),
            });
        } else {
            let dir = options.work_dir.join("memory-haproxy");
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let started = proxies::start_haproxy(&dir, backend.addr, 1, maxconn, None);
            subjects.push((
                "haproxy".into(),
                started,
                format!("1 thread, maxconn {maxconn}"),
            ));
        }
    }
    for (name, started, note) in subjects {
        let (process, addr) = started?;
        proxies::wait_ready(addr, "/", Duration::from_secs(15))
            .map_err(|e| format!("{name} is not ready: {e}\n{}", process.log_tail(20)))?;
        let result = runtime.block_on(measure(&name, &process, addr, options, note))?;
        eprintln!(
            "{name}: {} idle connections, {:.0} bytes/connection (RSS {} → {} KiB)",
            result.connections_open,
            result.bytes_per_connection,
            result.rss_before_kib,
            result.rss_idle_kib
        );
        results.push(result);
        drop(process);
    }
    Ok(results)
}

async fn measure(
    name: &str,
    process: &Process,
    addr: SocketAddr,
    options: &MemoryOptions,
    note: String,
) -> Result<MemoryResult, String> {
    let target = Target::http(addr, "/");
    let template = RequestTemplate::get(&target);
    // Warm the proxy with a few requests so lazy allocations (upstream
    // pool, buffers) are in the baseline and not charged to connections.
    for _ in 0..3 {
        let mut connection = client::connect(&target, None).await.map_err(|e| e.1)?;
        for _ in 0..100 {
            if !connection.ready().await {
                return Err(format!("{name} closed a warm-up connection"));
            }
            let request = template.build(false, false)?;
            connection.send(request).await.map_err(|e| e.1)?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = process.pid();
    let rss_before_kib = procstat::tree_kib(pid, "VmRSS");
    procstat::reset_peak_rss(pid);
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut tasks = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        let gate = Arc::clone(&gate);
        let target = target.clone();
        let template = template.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let mut connection = client::connect(&target, None).await.ok()?;
            let request = template.build(false, false).ok()?;
            let reply = connection.send(request).await.ok()?;
            (reply.status == 200).then_some(connection)
        }));
    }
    let mut open = Vec::with_capacity(options.connections);
    let mut failed = 0;
    for task in tasks {
        match task.await {
            Ok(Some(connection)) => open.push(connection),
            _ => failed += 1,
        }
    }
    tokio::time::sleep(options.settle).await;
    let rss_idle_kib = procstat::tree_kib(pid, "VmRSS");
    let peak_rss_kib = procstat::tree_kib(pid, "VmHWM");
    let connections_open = open.len();
    drop(open);
    let grown = rss_idle_kib.saturating_sub(rss_before_kib) as f64 * 1024.0;
    Ok(MemoryResult {
        target: name.to_string(),
        connections_requested: options.connections,
        connections_open,
        failed,
        rss_before_kib,
        rss_idle_kib,
        peak_rss_kib,
        bytes_per_connection: grown / connections_open.max(1) as f64,
        note,
    })
}
