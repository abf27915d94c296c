//! `switchyard-bench`: load generator, fixed-response backend and the
//! compare, release and memory scenarios.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use switchyard_bench::backend::{self, BackendOptions};
use switchyard_bench::client::Trust;
use switchyard_bench::compare::{self, CompareOptions};
use switchyard_bench::load::{self, LoadSpec, Mode, RequestKind};
use switchyard_bench::memory::{self, MemoryOptions};
use switchyard_bench::release::{self, ReleaseOptions, Verdict};
use switchyard_bench::report::render_table;
use switchyard_bench::target::Target;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard-bench",
    about = "Benchmarks and release checks for Switchyard (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send load to one loopback URL and report latency, throughput and errors.
    Load(LoadArgs),
    /// Serve a fixed response with `x-pool: NAME`; prints the bound address.
    Backend(BackendArgs),
    /// Compare direct, Switchyard, nginx and HAProxy in alternating rounds.
    Compare(CompareArgs),
    /// Run the release scenarios against a Switchyard binary; exits 1 on any failure.
    Release(ReleaseArgs),
    /// Hold idle keep-alive connections and report proxy RSS per connection.
    Memory(MemoryArgs),
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Target URL: http:// or https:// on 127.0.0.0/8, ::1 or localhost.
    url: String,
    /// Connections (closed loop) or maximum requests in flight (open loop).
    #[arg(short, long, default_value_t = 50)]
    connections: usize,
    /// Open loop at this many requests per second; latency counts from
    /// each request's scheduled time. Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Run time, such as 10s, 500ms or 2m.
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many requests.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Open a new connection for every request (sends Connection: close).
    #[arg(long)]
    new_conn: bool,
    /// Offer only http/1.1 by ALPN on HTTPS (default offers h2 first).
    #[arg(long)]
    http1: bool,
    /// Accept any server certificate.
    #[arg(short = 'k', long, conflicts_with = "cacert")]
    insecure: bool,
    /// Verify the server certificate against this PEM file.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// POST a 2 KiB JSON body with X-Hub-Signature-256 computed with this secret.
    #[arg(long)]
    webhook_secret: Option<String>,
    /// Time allowed per request (connect, handshake and response).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Load generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Label in the report.
    #[arg(long, default_value = "load")]
    label: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BackendArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Value of the x-pool response header.
    #[arg(long, default_value = "blue")]
    name: String,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Share of requests (0 to 1) that get a 500 response; /health always returns 200.
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// Delay before each response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Path to the switchyard release binary; without it Switchyard is skipped.
    #[arg(long)]
    switchyard: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured time per run.
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before each run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    #[arg(short, long, default_value_t = 50)]
    connections: usize,
    /// Proxy on core 1 with 1 worker; load generator and backend on core 0.
    #[arg(long)]
    pin: bool,
    #[arg(long)]
    no_nginx: bool,
    #[arg(long)]
    no_haproxy: bool,
    /// Keep Switchyard's access log on (nginx and HAProxy run without one).
    #[arg(long)]
    access_log: bool,
    /// POST the signed 2 KiB JSON body with this secret instead of GET.
    #[arg(long)]
    webhook_secret: Option<String>,
    /// Folder for configs and logs [default: a new folder under /tmp].
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    #[arg(long)]
    switchyard: PathBuf,
    /// Run only these scenarios: flip, shift, rollback, upgrade, certswap.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 40)]
    flips: usize,
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    flip_every: Duration,
    #[arg(long, default_value_t = 2)]
    upgrades: usize,
    #[arg(long, default_value_t = 4)]
    swaps: usize,
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct MemoryArgs {
    #[arg(long)]
    switchyard: Option<PathBuf>,
    /// Idle keep-alive client connections to hold open.
    #[arg(short, long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long)]
    no_nginx: bool,
    #[arg(long)]
    no_haproxy: bool,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| {
        format!("invalid duration {text:?}: use a number with ms, s or m, such as 10s")
    })?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "invalid duration {text:?}: it must be zero or more"
        ));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

fn work_dir(dir: Option<PathBuf>, kind: &str) -> PathBuf {
    dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("switchyard-bench-{kind}-{}", std::process::id()))
    })
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Load(args) => run_load(args),
        Command::Backend(args) => run_backend(args),
        Command::Compare(args) => run_compare(args),
        Command::Release(args) => run_release(args),
        Command::Memory(args) => run_memory(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn run_load(args: LoadArgs) -> Result<ExitCode, String> {
    let target = Target::parse(&args.url).map_err(|e| e.to_string())?;
    let mut spec = LoadSpec::new(&args.label, target);
    spec.connections = args.connections;
    spec.mode = match args.rate {
        Some(rate) => Mode::Open { rate },
        None => Mode::Closed,
    };
    spec.duration = args.duration;
    spec.max_requests = args.requests;
    spec.keep_alive = !args.new_conn;
    spec.http2 = !args.http1;
    spec.timeout = args.timeout;
    spec.trust = match (&args.cacert, args.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => Trust::Insecure,
        (None, false) if spec.target.https => {
            return Err("HTTPS needs --insecure or --cacert FILE to decide how the server certificate is checked".to_string())
        }
        (None, false) => Trust::Insecure,
    };
    if let Some(secret) = args.webhook_secret {
        spec.request = RequestKind::SignedPost {
            secret: secret.into_bytes(),
        };
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let outcome = runtime.block_on(load::run(&spec, Arc::new(AtomicBool::new(false))))?;
    print!("{}", render_table(std::slice::from_ref(&outcome.report)));
    for (kind, message) in &outcome.report.error_samples {
        println!("first {kind} error: {message}");
    }
    if let Some(path) = args.json {
        write_json(&path, &outcome.report)?;
    }
    Ok(if outcome.report.errors.total() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_backend(args: BackendArgs) -> Result<ExitCode, String> {
    let options = BackendOptions {
        name: args.name,
        body_bytes: args.body_bytes,
        fail_ratio: args.fail_ratio,
        delay: Duration::from_millis(args.delay_ms),
    };
    options.validate()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("{addr}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        backend::serve(listener, options, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn run_compare(args: CompareArgs) -> Result<ExitCode, String> {
    let options = CompareOptions {
        switchyard: args.switchyard,
        rounds: args.rounds.max(1),
        duration: args.duration,
        warmup: args.warmup,
        connections: args.connections,
        pin: args.pin,
        include_nginx: !args.no_nginx,
        include_haproxy: !args.no_haproxy,
        switchyard_access_log: args.access_log,
        request: match args.webhook_secret {
            Some(secret) => RequestKind::SignedPost {
                secret: secret.into_bytes(),
            },
            None => RequestKind::Get,
        },
        work_dir: work_dir(args.dir, "compare"),
    };
    let result = compare::run(&options)?;
    print!("{}", compare::render(&result));
    if let Some(path) = args.json {
        write_json(&path, &result)?;
    }
    let errors: u64 = result.summaries.iter().map(|s| s.errors).sum();
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_release(args: ReleaseArgs) -> Result<ExitCode, String> {
    for name in &args.only {
        if !release::SCENARIOS.contains(&name.as_str()) {
            return Err(format!(
                "unknown scenario {name:?}; choose from {}",
                release::SCENARIOS.join(", ")
            ));
        }
    }
    let options = ReleaseOptions {
        switchyard: args.switchyard,
        work_dir: work_dir(args.dir, "release"),
        connections: args.connections.max(2),
        flips: args.flips,
        flip_every: args.flip_every,
        upgrades: args.upgrades,
        swaps: args.swaps,
        only: args.only,
    };
    let results = release::run_all(&options);
    println!("{:<10} verdict", "scenario");
    for result in &results {
        println!("{:<10} {:?}", result.name, result.verdict);
    }
    if let Some(path) = args.json {
        write_json(&path, &results)?;
    }
    let all_passed = results.iter().all(|r| r.verdict == Verdict::Passed);
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_memory(args: MemoryArgs) -> Result<ExitCode, String> {
    let options = MemoryOptions {
        switchyard: args.switchyard,
        connections: args.connections,
        include_nginx: !args.no_nginx,
        include_haproxy: !args.no_haproxy,
        work_dir: work_dir(args.dir, "memory"),
        settle: args.settle,
    };
    let results = memory::run(&options)?;
    println!(
        "{:<11} {:>6} {:>7} {:>12} {:>12} {:>12} {:>10}  note",
        "target", "open", "failed", "RSS before", "RSS idle", "peak RSS", "B/conn"
    );
    for r in &results {
        println!(
            "{:<11} {:>6} {:>7} {:>9} KiB {:>9} KiB {:>9} KiB {:>10.0}  {}",
            r.target,
            r.connections_open,
            r.failed,
            r.rss_before_kib,
            r.rss_idle_kib,
            r.peak_rss_kib,
            r.bytes_per_connection,
            r.note
        );
    }
    if let Some(path) = args.json {
        write_json(&path, &results)?;
    }
    let failed: usize = results.iter().map(|r| r.failed).sum();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
