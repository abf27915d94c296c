//! The compare scenario: the same closed-loop load direct to the backend
//! and through each proxy, in alternating rounds so slow drift in machine
//! load spreads over all targets. The headline is proxy CPU per request.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::affinity;
use crate::load::{self, LoadSpec, RequestKind};
use crate::procstat;
use crate::proxies::{self, Process, SwitchyardConfig};
use crate::report::{median, ms, Report};
use crate::target::Target;

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub switchyard: Option<PathBuf>,
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    /// Proxy on core 1, load generator and backend on core 0, 1 worker each.
    pub pin: bool,
    pub include_nginx: bool,
    pub include_haproxy: bool,
    pub switchyard_access_log: bool,
    pub request: RequestKind,
    /// Folder for configs and logs.
    pub work_dir: PathBuf,
}

/// One measured run of one target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub target: String,
    pub round: usize,
    pub report: Report,
    pub proxy_cpu_s: f64,
    pub backend_cpu_s: f64,
    pub client_cpu_s: f64,
    /// Proxy CPU (user + system, whole process tree) per response, in µs.
    pub proxy_cpu_us_per_request: f64,
    pub backend_cpu_us_per_request: f64,
    pub client_cpu_us_per_request: f64,
    /// Peak RSS of the proxy tree during the run (VmHWM after a reset), KiB.
    pub proxy_peak_rss_kib: u64,
    /// Busy share of all CPUs during the run, percent.
    pub machine_busy_pct: f64,
    /// Busy CPU not used by the proxy, backend or load generator, percent
    /// of all CPUs: other tenants, compilers, softirq.
    pub other_pct: f64,
}

/// Medians over a target's runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub target: String,
    pub runs: usize,
    pub rps: f64,
    pub rps_min: f64,
    pub rps_max: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub errors: u64,
    pub proxy_cpu_us_per_request: f64,
    pub backend_cpu_us_per_request: f64,
    pub client_cpu_us_per_request: f64,
    pub proxy_peak_rss_kib: f64,
    pub other_pct: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub clock_ticks_per_second: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareResult {
    pub machine: Machine,
    pub layout: String,
    pub workers: usize,
    pub rounds: usize,
    pub duration_s: f64,
    pub connections: usize,
    pub runs: Vec<Run>,
    pub summaries: Vec<Summary>,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    Machine {
        cpus: affinity::online_cpus(),
        cpu_model,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        clock_ticks_per_second: procstat::clock_ticks_per_second(),
    }
}

struct Subject {
    name: String,
    addr: SocketAddr,
    /// `None` for the direct target.
    process: Option<Process>,
}

/// Runs the comparison. Must be called outside any Tokio runtime: it builds
/// its own single-threaded runtime for the load generator.
pub fn run(options: &CompareOptions) -> Result<CompareResult, String> {
    fs::create_dir_all(&options.work_dir)
        .map_err(|e| format!("cannot create {}: {e}", options.work_dir.display()))?;
    let workers = if options.pin {
        1
    } else {
        affinity::online_cpus()
    };
    let (client_core, proxy_core) = if options.pin {
        if affinity::online_cpus() < 2 {
            return Err("--pin needs at least 2 CPUs".to_string());
        }
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    if let Some(core) = client_core {
        affinity::pin_current_thread(core)
            .map_err(|e| format!("cannot pin to core {core}: {e}"))?;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let (backend, backend_addr) =
        proxies::start_backend_process(&exe, &options.work_dir, "blue", client_core)?;
    let mut subjects = vec![Subject {
        name: "direct".to_string(),
        addr: backend_addr,
        process: None,
    }];
    if let Some(bin) = &options.switchyard {
        let dir = subdir(&options.work_dir, "switchyard")?;
        let mut config = SwitchyardConfig::new(&dir);
        config.http = Some(SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)));
        config.threads = workers;
        config.access_log = options.switchyard_access_log;
        config.pools = vec![("blue".to_string(), 100, vec![backend_addr])];
        let path = config.write()?;
        let process = proxies::start_switchyard(bin, &path, false, proxy_core, "switchyard.log")?;
        subjects.push(Subject {
            name: "switchyard".to_string(),
            addr: config.http.unwrap_or(backend_addr),
            process: Some(process),
        });
    }
    let nginx = options.include_nginx && proxies::installed("nginx");
    let haproxy = options.include_haproxy && proxies::installed("haproxy");
    if options.include_nginx && !nginx {
        eprintln!("nginx is not installed; skipping it");
    }
    if options.include_haproxy && !haproxy {
        eprintln!("haproxy is not installed; skipping it");
    }
    if nginx {
        let dir = subdir(&options.work_dir, "nginx")?;
        fs::create_dir_all(dir.join("nginx-tmp")).map_err(|e| e.to_string())?;
        let (process, addr) = proxies::start_nginx(&dir, backend_addr, workers, proxy_core)?;
        subjects.push(Subject {
            name: "nginx".to_string(),
            addr,
            process: Some(process),
        });
    }
    if haproxy {
        let dir = subdir(&options.work_dir, "haproxy")?;
        let (process, addr) =
            proxies::start_haproxy(&dir, backend_addr, workers, 5000, proxy_core)?;
        subjects.push(Subject {
            name: "haproxy".to_string(),
            addr,
            process: Some(process),
        });
    }
    for subject in &mut subjects {
        if let Err(err) = proxies::wait_ready(subject.addr, "/", Duration::from_secs(15)) {
            let log = subject
                .process
                .as_ref()
                .map(|p| p.log_tail(20))
                .unwrap_or_default();
            return Err(format!("{} is not ready: {err}\n{log}", subject.name));
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the load runtime: {e}"))?;
    let mut runs = Vec::new();
    for round in 1..=options.rounds {
        for subject in &subjects {
            let run = measure(&runtime, options, subject, backend.pid(), round)?;
            eprintln!(
                "round {round} {:<11} {:>8.0} req/s  p50 {} ms  p99 {} ms  proxy {:.1} µs/req  errors {}  other {:.0}%",
                run.target,
                run.report.throughput_rps,
                ms(run.report.latency.p50_us),
                ms(run.report.latency.p99_us),
                run.proxy_cpu_us_per_request,
                run.report.errors.total(),
                run.other_pct
            );
            runs.push(run);
        }
    }
    let summaries = subjects.iter().map(|s| summarize(&s.name, &runs)).collect();
    drop(subjects);
    drop(backend);
    Ok(CompareResult {
        machine: machine(),
        layout: if options.pin { "pinned" } else { "unpinned" }.to_string(),
        workers,
        rounds: options.rounds,
        duration_s: options.duration.as_secs_f64(),
        connections: options.connections,
        runs,
        summaries,
    })
}

fn subdir(parent: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    options: &CompareOptions,
    subject: &Subject,
    backend_pid: u32,
    round: usize,
) -> Result<Run, String> {
    let mut spec = LoadSpec::new(&subject.name, Target::http(subject.addr, "/"));
    spec.connections = options.connections;
    spec.request = options.request.clone();
    if !options.warmup.is_zero() {
        spec.duration = options.warmup;
        runtime.block_on(load::run(&spec, Arc::new(AtomicBool::new(false))))?;
    }
    spec.duration = options.duration;
    let proxy_pid = subject.process.as_ref().map(Process::pid);
    if let Some(pid) = proxy_pid {
        procstat::reset_peak_rss(pid);
    }
    let cpu = |pid: Option<u32>| pid.map_or(0.0, procstat::tree_cpu_seconds);
    // The proxies and the backend are children of this process, so the
    // load generator's own CPU is this process alone, not its tree.
    let own = || procstat::process_cpu_seconds(std::process::id());
    let before = (
        cpu(proxy_pid),
        cpu(Some(backend_pid)),
        own(),
        procstat::machine_ticks(),
    );
    let outcome = runtime.block_on(load::run(&spec, Arc::new(AtomicBool::new(false))))?;
    let after = (
        cpu(proxy_pid),
        cpu(Some(backend_pid)),
        own(),
        procstat::machine_ticks(),
    );
    let responses = (outcome.report.latency.count).max(1) as f64;
    let proxy_cpu_s = after.0 - before.0;
    let backend_cpu_s = after.1 - before.1;
    let client_cpu_s = after.2 - before.2;
    let ticks = procstat::clock_ticks_per_second() as f64;
    let busy = after.3.busy.saturating_sub(before.3.busy) as f64;
    let total = after.3.total.saturating_sub(before.3.total).max(1) as f64;
    let accounted = (proxy_cpu_s + backend_cpu_s + client_cpu_s) * ticks;
    Ok(Run {
        target: subject.name.clone(),
        round,
        proxy_cpu_us_per_request: proxy_cpu_s * 1e6 / responses,
        backend_cpu_us_per_request: backend_cpu_s * 1e6 / responses,
        client_cpu_us_per_request: client_cpu_s * 1e6 / responses,
        proxy_cpu_s,
        backend_cpu_s,
        client_cpu_s,
        proxy_peak_rss_kib: proxy_pid.map_or(0, |pid| procstat::tree_kib(pid, "VmHWM")),
        machine_busy_pct: busy * 100.0 / total,
        other_pct: (busy - accounted) * 100.0 / total,
        report: outcome.report,
    })
}

fn summarize(target: &str, runs: &[Run]) -> Summary {
    let mine: Vec<&Run> = runs.iter().filter(|r| r.target == target).collect();
    let pick = |f: &dyn Fn(&Run) -> f64| -> f64 {
        median(&mine.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    let rps: Vec<f64> = mine.iter().map(|r| r.report.throughput_rps).collect();
    Summary {
        target: target.to_string(),
        runs: mine.len(),
        rps: median(&rps).unwrap_or(0.0),
        rps_min: rps.iter().cloned().fold(f64::INFINITY, f64::min),
        rps_max: rps.iter().cloned().fold(0.0, f64::max),
        p50_us: pick(&|r| r.report.latency.p50_us as f64),
        p90_us: pick(&|r| r.report.latency.p90_us as f64),
        p99_us: pick(&|r| r.report.latency.p99_us as f64),
        p999_us: pick(&|r| r.report.latency.p999_us as f64),
        max_us: pick(&|r| r.report.latency.max_us as f64),
        errors: mine.iter().map(|r| r.report.errors.total()).sum(),
        proxy_cpu_us_per_request: pick(&|r| r.proxy_cpu_us_per_request),
        backend_cpu_us_per_request: pick(&|r| r.backend_cpu_us_per_request),
        client_cpu_us_per_request: pick(&|r| r.client_cpu_us_per_request),
        proxy_peak_rss_kib: pick(&|r| r.proxy_peak_rss_kib as f64),
        other_pct: pick(&|r| r.other_pct),
    }
}

/// Renders the summary table and the ratios as Markdown.
pub fn render(result: &CompareResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} layout, {} worker(s) per proxy, {} round(s) of {:.0} s, {} connections, medians\n",
        result.layout, result.workers, result.rounds, result.duration_s, result.connections
    );
    let _ = writeln!(
        out,
        "| target | req/s median (min–max) | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | proxy CPU µs/req | backend µs/req | client µs/req | proxy peak RSS MiB | other % |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &result.summaries {
        let proxy = if s.target == "direct" {
            "—".to_string()
        } else {
            format!("{:.1}", s.proxy_cpu_us_per_request)
        };
        let rss = if s.target == "direct" {
            "—".to_string()
        } else {
            format!("{:.1}", s.proxy_peak_rss_kib / 1024.0)
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} | {:.1} | {} | {:.0} |",
            s.target,
            s.rps,
            s.rps_min,
            s.rps_max,
            s.p50_us / 1000.0,
            s.p90_us / 1000.0,
            s.p99_us / 1000.0,
            s.p999_us / 1000.0,
            s.errors,
            proxy,
            s.backend_cpu_us_per_request,
            s.client_cpu_us_per_request,
            rss,
            s.other_pct
        );
    }
    let by_name: BTreeMap<&str, &Summary> = result
        .summaries
        .iter()
        .map(|s| (s.target.as_str(), s))
        .collect();
    if let Some(sy) = by_name.get("switchyard") {
        let _ = writeln!(out);
        for other in ["nginx", "haproxy"] {
            if let Some(o) = by_name.get(other) {
                let _ = writeln!(
                    out,
                    "- Switchyard/{other}: req/s ×{:.2}, proxy CPU per request ×{:.2}, p99 ×{:.2}",
                    sy.rps / o.rps.max(1e-9),
                    sy.proxy_cpu_us_per_request / o.proxy_cpu_us_per_request.max(1e-9),
                    sy.p99_us / o.p99_us.max(1e-9)
                );
            }
        }
        if let Some(direct) = by_name.get("direct") {
            let _ = writeln!(
                out,
                "- Switchyard/direct: req/s ×{:.2}; p50 added {:.2} ms, p99 added {:.2} ms",
                sy.rps / direct.rps.max(1e-9),
                (sy.p50_us - direct.p50_us) / 1000.0,
                (sy.p99_us - direct.p99_us) / 1000.0
            );
        }
        for other in ["nginx", "haproxy"] {
            if let (Some(o), Some(direct)) = (by_name.get(other), by_name.get("direct")) {
                let _ = writeln!(
                    out,
                    "- {other}/direct: req/s ×{:.2}; p99 added {:.2} ms",
                    o.rps / direct.rps.max(1e-9),
                    (o.p99_us - direct.p99_us) / 1000.0
                );
            }
        }
    }
    out
}
