//! Release scenarios: traffic switches, progressive shifts, rollbacks,
//! binary upgrades and certificate swaps, each under load, each checked
//! for failed requests. The weight and shift scenarios drive the admin
//! socket: one JSON request per line, one JSON response per line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backend::{self, BackendHandle, BackendOptions};
use crate::certs;
use crate::client::Trust;
use crate::load::{self, LoadOutcome, LoadSpec, TraceEvent};
use crate::proxies::{self, Process, SwitchyardConfig};
use crate::report::{describe_errors, Report};
use crate::target::Target;

/// Scenario names, in the order they run.
pub const SCENARIOS: &[&str] = &["flip", "shift", "rollback", "upgrade", "certswap"];

/// Maximum run time of any scenario's load, a bound in case a step hangs.
const LOAD_LIMIT: Duration = Duration::from_secs(180);

#[derive(Clone, Debug)]
pub struct ReleaseOptions {
    pub switchyard: PathBuf,
    pub work_dir: PathBuf,
    pub connections: usize,
    /// Weight flips in the flip scenario.
    pub flips: usize,
    pub flip_every: Duration,
    /// Binary upgrades in the upgrade scenario.
    pub upgrades: usize,
    /// Certificate swaps in the certswap scenario.
    pub swaps: usize,
    pub only: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Passed,
    Failed,
    /// A prerequisite failed (the proxy did not start, the admin socket is
    /// missing), so the checks never ran.
    NotRun,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub verdict: Verdict,
    /// Findings: one check and its outcome per entry.
    pub findings: Vec<String>,
    pub reports: Vec<Report>,
}

impl ScenarioResult {
    fn new(name: &str) -> ScenarioResult {
        ScenarioResult {
            name: name.to_string(),
            verdict: Verdict::Passed,
            findings: Vec::new(),
            reports: Vec::new(),
        }
    }

    /// Records a check; a false `ok` fails the scenario.
    fn check(&mut self, ok: bool, finding: String) {
        if !ok {
            self.verdict = Verdict::Failed;
        }
        let mark = if ok { "ok" } else { "FAILED" };
        self.findings.push(format!("{mark}: {finding}"));
    }

    fn not_run(name: &str, reason: String) -> ScenarioResult {
        ScenarioResult {
            name: name.to_string(),
            verdict: Verdict::NotRun,
            findings: vec![format!("not run: {reason}")],
            reports: Vec::new(),
        }
    }
}

/// Runs the selected scenarios one after another.
pub fn run_all(options: &ReleaseOptions) -> Vec<ScenarioResult> {
    let selected: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|name| options.only.is_empty() || options.only.iter().any(|o| o == name))
        .collect();
    let mut results = Vec::new();
    for name in selected {
        eprintln!("scenario {name}: starting");
        let result = match name {
            "flip" => flip(options),
            "shift" => shift(options),
            "rollback" => rollback(options),
            "upgrade" => upgrade(options),
            _ => certswap(options),
        };
        let result = result.unwrap_or_else(|reason| ScenarioResult::not_run(name, reason));
        eprintln!("scenario {name}: {:?}", result.verdict);
        for finding in &result.findings {
            eprintln!("  {finding}");
        }
        results.push(result);
    }
    results
}

/// Sends one admin request and returns the parsed response line.
pub fn admin(socket: &Path, request: &Value) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to the admin socket {}: {e}; the binary must support [admin] socket",
            socket.display()
        )
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("cannot write to the admin socket: {e}"))?;
    let mut response = String::new();
    BufReader::new(stream)
        .read_line(&mut response)
        .map_err(|e| format!("no response from the admin socket: {e}"))?;
    serde_json::from_str(&response)
        .map_err(|e| format!("invalid JSON from the admin socket ({e}): {response:?}"))
}

fn admin_ok(socket: &Path, request: &Value) -> Result<Value, String> {
    let response = admin(socket, request)?;
    if response["ok"] == Value::Bool(true) {
        Ok(response)
    } else {
        Err(format!("admin request {request} was rejected: {response}"))
    }
}

/// Finds the `bench` route's entry in a status response.
fn route_status(status: &Value) -> Option<&Value> {
    let routes = status
        .get("routes")
        .or_else(|| status.pointer("/status/routes"))?;
    routes
        .as_array()?
        .iter()
        .find(|r| r["name"] == Value::String("bench".into()))
}

fn weight(route: &Value, pool: &str) -> Option<u64> {
    route.get("weights")?.get(pool)?.as_u64()
}

/// A running Switchyard with a blue and a green backend.
struct Fixture {
    _blue: BackendHandle,
    _green: BackendHandle,
    proxy: Process,
    config: PathBuf,
    http: std::net::SocketAddr,
    https: Option<std::net::SocketAddr>,
    admin: PathBuf,
}

fn start_fixture(
    options: &ReleaseOptions,
    name: &str,
    green_fail_ratio: f64,
    https_store: Option<PathBuf>,
) -> Result<Fixture, String> {
    let dir = options.work_dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let listen = "127.0.0.1:0"
        .parse()
        .map_err(|_| "bad address".to_string())?;
    let blue = backend::spawn(listen, BackendOptions::new("blue"))?;
    let mut green_options = BackendOptions::new("green");
    green_options.fail_ratio = green_fail_ratio;
    let green = backend::spawn(listen, green_options)?;
    let mut config = SwitchyardConfig::new(&dir);
    config.http = Some(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        proxies::free_port()?,
    )));
    if let Some(store) = &https_store {
        config.https = Some(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            proxies::free_port()?,
        )));
        config.tls_store = Some(store.clone());
    }
    config.threads = 2;
    config.health_interval = Duration::from_millis(500);
    config.admin_socket = Some(dir.join("admin.sock"));
    config.pools = vec![
        ("blue".to_string(), 100, vec![blue.addr]),
        ("green".to_string(), 0, vec![green.addr]),
    ];
    let path = config.write()?;
    let mut proxy =
        proxies::start_switchyard(&options.switchyard, &path, false, None, "switchyard.log")?;
    let http = config.http.unwrap_or(blue.addr);
    if let Err(err) = proxies::wait_ready(http, "/", Duration::from_secs(15)) {
        proxy.stop();
        return Err(format!(
            "Switchyard did not start: {err}\n{}",
            proxy.log_tail(20)
        ));
    }
    Ok(Fixture {
        _blue: blue,
        _green: green,
        proxy,
        config: path,
        http,
        https: config.https,
        admin: dir.join("admin.sock"),
    })
}

/// Load running on a runtime of its own while the caller's thread drives
/// the change; [`Background::finish`] stops it and returns the outcome.
struct Background {
    runtime: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<LoadOutcome, String>>>,
}

impl Background {
    fn start(specs: Vec<LoadSpec>) -> Result<Background, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the load runtime: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = specs
            .into_iter()
            .map(|spec| {
                let stop = Arc::clone(&stop);
                runtime.spawn(async move { load::run(&spec, stop).await })
            })
            .collect();
        Ok(Background {
            runtime,
            stop,
            tasks,
        })
    }

    fn finish(self) -> Result<Vec<LoadOutcome>, String> {
        self.stop.store(true, Ordering::SeqCst);
        let mut outcomes = Vec::new();
        for task in self.tasks {
            let outcome = self
                .runtime
                .block_on(task)
                .map_err(|e| format!("the load task failed: {e}"))??;
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

fn traced_load(label: &str, target: Target, connections: usize, keep_alive: bool) -> LoadSpec {
    let mut spec = LoadSpec::new(label, target);
    spec.connections = connections;
    spec.duration = LOAD_LIMIT;
    spec.keep_alive = keep_alive;
    spec.trace = true;
    spec
}

fn micros(outcome: &LoadOutcome, at: Instant) -> u64 {
    at.saturating_duration_since(outcome.start).as_micros() as u64
}

fn check_no_failures(result: &mut ScenarioResult, report: &Report) {
    result.check(
        report.errors.total() == 0,
        format!(
            "{}: {} requests, {} failed ({})",
            report.label,
            report.requests,
            report.errors.total(),
            describe_errors(&report.errors)
        ),
    );
}

/// Checks whether `event` was sent after `from` and completed before `until` (µs
/// since the load start). A request still in flight at `until` may be
/// served under the next change, so it is left out.
fn within(event: &TraceEvent, from: u64, until: u64) -> bool {
    event.sent_us > from && event.done_us < until
}

/// Responses to requests [`within`] the window whose pool differs from
/// `expected`.
fn wrong_pool(trace: &[TraceEvent], from: u64, until: u64, expected: &str) -> usize {
    trace
        .iter()
        .filter(|e| within(e, from, until) && e.status != 0)
        .filter(|e| e.pool != expected)
        .count()
}

/// (a) Flip the route between 100/0 and 0/100 under load. No request may
/// fail, and every request sent after a flip's acknowledgement and
/// completed before the next flip is sent must be served by the pool just
/// switched to.
fn flip(options: &ReleaseOptions) -> Result<ScenarioResult, String> {
    let fixture = start_fixture(options, "flip", 0.0, None)?;
    admin_ok(&fixture.admin, &json!({"cmd": "status"}))?;
    let load = Background::start(vec![traced_load(
        "flip keep-alive",
        Target::http(fixture.http, "/"),
        options.connections,
        true,
    )])?;
    std::thread::sleep(Duration::from_millis(500));
    // (sent, acknowledged, pool now at 100)
    let mut flips: Vec<(Instant, Instant, &str)> = Vec::new();
    let mut admin_error = None;
    for i in 0..options.flips {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        let weights = if to == "green" {
            json!({"blue": 0, "green": 100})
        } else {
            json!({"blue": 100, "green": 0})
        };
        let sent = Instant::now();
        match admin_ok(
            &fixture.admin,
            &json!({"cmd": "weights", "route": "bench", "weights": weights}),
        ) {
            Ok(_) => flips.push((sent, Instant::now(), to)),
            Err(err) => {
                admin_error = Some(err);
                break;
            }
        }
        std::thread::sleep(options.flip_every);
    }
    let outcomes = load.finish()?;
    let outcome = &outcomes[0];
    let mut result = ScenarioResult::new("flip");
    result.check(
        admin_error.is_none(),
        format!(
            "{} of {} weight changes acknowledged{}",
            flips.len(),
            options.flips,
            admin_error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
    );
    check_no_failures(&mut result, &outcome.report);
    let mut wrong = 0;
    let mut checked = 0;
    // For each request on the zeroed pool: µs between the acknowledgement
    // and the request being sent, to tell a lagging switch from a race.
    let mut lateness = Vec::new();
    for (index, (_, acknowledged, pool)) in flips.iter().enumerate() {
        let from = micros(outcome, *acknowledged);
        let until = flips
            .get(index + 1)
            .map_or(u64::MAX, |next| micros(outcome, next.0));
        checked += outcome
            .trace
            .iter()
            .filter(|e| within(e, from, until))
            .count();
        wrong += wrong_pool(&outcome.trace, from, until, pool);
        lateness.extend(
            outcome
                .trace
                .iter()
                .filter(|e| within(e, from, until) && e.status != 0 && e.pool != *pool)
                .map(|e| e.sent_us - from),
        );
    }
    lateness.sort_unstable();
    let spread = match (lateness.first(), lateness.last()) {
        (Some(first), Some(last)) => format!(
            "; those were sent {first} to {last} µs after the acknowledgement (median {} µs)",
            lateness[lateness.len() / 2]
        ),
        _ => String::new(),
    };
    result.check(
        wrong == 0 && checked > 0,
        format!("{checked} requests sent after an acknowledgement and done before the next change, {wrong} served by the zeroed pool{spread}"),
    );
    result.check(
        outcome.report.pools.contains_key("blue") && outcome.report.pools.contains_key("green"),
        format!("pools answering: {:?}", outcome.report.pools),
    );
    result.reports.push(outcome.report.clone());
    drop(fixture);
    Ok(result)
}

/// Polls status until `done` returns true for the route or `limit` passes.
fn wait_route(
    socket: &Path,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<(Value, Instant), String> {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let status = admin_ok(socket, &json!({"cmd": "status"}))?;
        if let Some(route) = route_status(&status) {
            if done(route) {
                return Ok((route.clone(), Instant::now()));
            }
            last = route.clone();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the route did not reach the expected state within {limit:?}; last status: {last}"
    ))
}

/// (b) Shift to a healthy green in steps of 10 every second: it must reach
/// 100 % green with no failed request.
fn shift(options: &ReleaseOptions) -> Result<ScenarioResult, String> {
    let fixture = start_fixture(options, "shift", 0.0, None)?;
    admin_ok(&fixture.admin, &json!({"cmd": "status"}))?;
    let load = Background::start(vec![traced_load(
        "shift keep-alive",
        Target::http(fixture.http, "/"),
        options.connections,
        true,
    )])?;
    std::thread::sleep(Duration::from_millis(500));
    let started = admin_ok(
        &fixture.admin,
        &json!({"cmd": "shift", "route": "bench", "to": "green", "step": 10, "every": "1s"}),
    );
    let finished = started.as_ref().map_err(Clone::clone).and_then(|_| {
        wait_route(&fixture.admin, Duration::from_secs(60), |route| {
            weight(route, "green") == Some(100)
                && weight(route, "blue") == Some(0)
                && route.get("shift").is_none_or(Value::is_null)
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.finish()?;
    let outcome = &outcomes[0];
    let mut result = ScenarioResult::new("shift");
    match &finished {
        Ok((route, at)) => {
            result.check(
                true,
                format!(
                    "shift reached 100 % green after {:.1} s; last_shift: {}",
                    at.duration_since(outcome.start).as_secs_f64(),
                    route.get("last_shift").unwrap_or(&Value::Null)
                ),
            );
            let from = micros(outcome, *at);
            let wrong = wrong_pool(&outcome.trace, from, u64::MAX, "green");
            result.check(
                wrong == 0,
                format!("{wrong} requests sent after completion answered by blue"),
            );
        }
        Err(err) => result.check(false, err.clone()),
    }
    check_no_failures(&mut result, &outcome.report);
    result.reports.push(outcome.report.clone());
    Ok(result)
}

/// (c) Shift to a green that fails 20 % of requests: the controller must
/// roll back to 100 % blue, failures must come only from green, and no
/// request sent after the rollback is seen may reach green.
fn rollback(options: &ReleaseOptions) -> Result<ScenarioResult, String> {
    let fixture = start_fixture(options, "rollback", 0.2, None)?;
    admin_ok(&fixture.admin, &json!({"cmd": "status"}))?;
    let load = Background::start(vec![traced_load(
        "rollback keep-alive",
        Target::http(fixture.http, "/"),
        options.connections,
        true,
    )])?;
    std::thread::sleep(Duration::from_millis(500));
    let started = admin_ok(
        &fixture.admin,
        &json!({
            "cmd": "shift", "route": "bench", "to": "green", "step": 10, "every": "1s",
            "max_error_rate": 0.05, "min_requests": 50
        }),
    );
    let finished = started.as_ref().map_err(Clone::clone).and_then(|_| {
        wait_route(&fixture.admin, Duration::from_secs(60), |route| {
            route.get("shift").is_none_or(Value::is_null)
                && route.get("last_shift").is_some_and(|s| !s.is_null())
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.finish()?;
    let outcome = &outcomes[0];
    let mut result = ScenarioResult::new("rollback");
    match &finished {
        Ok((route, at)) => {
            let last = route.get("last_shift").cloned().unwrap_or(Value::Null);
            result.check(
                last.to_string().contains("rolled back"),
                format!("shift ended: {last}"),
            );
            result.check(
                weight(route, "blue") == Some(100) && weight(route, "green") == Some(0),
                format!(
                    "weights after the rollback: {}",
                    route.get("weights").unwrap_or(&Value::Null)
                ),
            );
            let from = micros(outcome, *at);
            let wrong = wrong_pool(&outcome.trace, from, u64::MAX, "blue");
            result.check(
                wrong == 0,
                format!("{wrong} requests sent after the rollback answered by green"),
            );
        }
        Err(err) => result.check(false, err.clone()),
    }
    let report = &outcome.report;
    result.check(
        report.errors.transport() == 0,
        format!(
            "{} transport failures; all errors: {}",
            report.errors.transport(),
            describe_errors(&report.errors)
        ),
    );
    let failed_elsewhere = outcome
        .trace
        .iter()
        .filter(|e| e.status != 0 && !(200..300).contains(&e.status) && e.pool != "green")
        .count();
    let failed_green = outcome
        .trace
        .iter()
        .filter(|e| e.status != 0 && !(200..300).contains(&e.status) && e.pool == "green")
        .count();
    result.check(
        failed_elsewhere == 0,
        format!("{failed_green} failed responses from green, {failed_elsewhere} from elsewhere"),
    );
    result.reports.push(report.clone());
    Ok(result)
}

/// (d) Replace the binary under load `upgrades` times: start `run
/// --upgrade`, then SIGQUIT the old process. No request may fail, on new
/// connections or on keep-alive ones.
fn upgrade(options: &ReleaseOptions) -> Result<ScenarioResult, String> {
    let mut fixture = start_fixture(options, "upgrade", 0.0, None)?;
    let target = Target::http(fixture.http, "/");
    let load = Background::start(vec![
        traced_load(
            "upgrade new-conn",
            target.clone(),
            options.connections / 2 + 1,
            false,
        ),
        traced_load(
            "upgrade keep-alive",
            target,
            options.connections / 2 + 1,
            true,
        ),
    ])?;
    std::thread::sleep(Duration::from_millis(500));
    let mut result = ScenarioResult::new("upgrade");
    let mut exits = Vec::new();
    let mut signals = Vec::new();
    for round in 1..=options.upgrades {
        let new = proxies::start_switchyard(
            &options.switchyard,
            &fixture.config,
            true,
            None,
            &format!("switchyard-upgrade-{round}.log"),
        )?;
        // The new process takes the listening sockets over the upgrade
        // socket once the old one offers them on SIGQUIT.
        std::thread::sleep(Duration::from_secs(1));
        let mut old = std::mem::replace(&mut fixture.proxy, new);
        old.signal(libc::SIGQUIT)?;
        let signalled = Instant::now();
        signals.push(signalled);
        let exited = old.wait_exit(Duration::from_secs(20));
        exits.push(format!("{:.1} s", signalled.elapsed().as_secs_f64()));
        if !exited {
            result.check(
                false,
                format!("upgrade {round}: the old process did not exit within 20 s"),
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        let status = proxies::probe(fixture.http, "/");
        result.check(
            status == Ok(200),
            format!("upgrade {round}: the new process answers GET / with {status:?}"),
        );
    }
    let outcomes = load.finish()?;
    result.findings.push(format!(
        "old processes exited after SIGQUIT in: {}",
        exits.join(", ")
    ));
    for outcome in &outcomes {
        check_no_failures(&mut result, &outcome.report);
        if outcome.report.errors.total() > 0 {
            result
                .findings
                .push(format!("error samples: {:?}", outcome.report.error_samples));
            let marks: Vec<u64> = signals.iter().map(|at| micros(outcome, *at)).collect();
            let offsets: Vec<String> = outcome
                .trace
                .iter()
                .filter(|e| e.status == 0 || !(200..300).contains(&e.status))
                .map(|e| {
                    let last = marks.iter().filter(|m| **m <= e.done_us).max();
                    match last {
                        Some(mark) => format!("+{:.2} s", (e.done_us - mark) as f64 / 1e6),
                        None => "before the first SIGQUIT".to_string(),
                    }
                })
                .collect();
            result.findings.push(format!(
                "{}: failures ended at these times after the latest SIGQUIT: {}",
                outcome.report.label,
                offsets.join(", ")
            ));
        }
        result.reports.push(outcome.report.clone());
    }
    Ok(result)
}

/// (e) Rewrite the certificate files under HTTPS load: no handshake or
/// request may fail, and after each swap plus one rescan interval (and a
/// 1 s margin) new handshakes must present the new certificate.
fn certswap(options: &ReleaseOptions) -> Result<ScenarioResult, String> {
    let store = options.work_dir.join("certswap-store");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store)
        .map_err(|e| format!("cannot create {}: {e}", store.display()))?;
    let first = certs::generate()?;
    let second = certs::generate()?;
    certs::install(&store, "bench", &first)?;
    let fingerprints = [
        crate::client::fingerprint(&first.der),
        crate::client::fingerprint(&second.der),
    ];
    let fixture = start_fixture(options, "certswap", 0.0, Some(store.clone()))?;
    let https = fixture.https.ok_or("the fixture has no HTTPS listener")?;
    let trust = Trust::Pinned(vec![first.der.clone(), second.der.clone()]);
    let mut handshakes = traced_load(
        "certswap new-conn",
        Target::https(https, "/"),
        options.connections / 2 + 1,
        false,
    );
    handshakes.trust = trust.clone();
    handshakes.http2 = false;
    let mut streams = traced_load("certswap h2 keep-alive", Target::https(https, "/"), 4, true);
    streams.trust = trust;
    let load = Background::start(vec![handshakes, streams])?;
    std::thread::sleep(Duration::from_millis(1500));
    let rescan = Duration::from_secs(1);
    let mut swaps: Vec<(Instant, usize)> = Vec::new();
    for i in 0..options.swaps {
        let index = (i + 1) % 2;
        let cert = if index == 0 { &first } else { &second };
        certs::install(&store, "bench", cert)?;
        swaps.push((Instant::now(), index));
        std::thread::sleep(rescan * 3);
    }
    let outcomes = load.finish()?;
    let mut result = ScenarioResult::new("certswap");
    for outcome in &outcomes {
        check_no_failures(&mut result, &outcome.report);
        result.reports.push(outcome.report.clone());
    }
    let outcome = &outcomes[0];
    let mut stale = 0;
    let mut checked = 0;
    let mut per_swap = Vec::new();
    for (k, (at, index)) in swaps.iter().enumerate() {
        let swapped = micros(outcome, *at);
        let mut last_stale = None;
        let from = micros(outcome, *at + rescan + Duration::from_secs(1));
        let until = swaps
            .get(k + 1)
            .map_or(u64::MAX, |next| micros(outcome, next.0));
        for event in outcome
            .trace
            .iter()
            .filter(|e| e.sent_us > from && e.sent_us < until)
        {
            if let Some(cert) = &event.cert {
                checked += 1;
                if cert != &fingerprints[*index] {
                    stale += 1;
                    last_stale = Some(event.sent_us - swapped);
                }
            }
        }
        if let Some(late) = last_stale {
            per_swap.push(format!(
                "swap {}: old certificate still served {:.2} s after the write",
                k + 1,
                late as f64 / 1e6
            ));
        }
    }
    result.findings.extend(per_swap);
    result.check(
        stale == 0 && checked > 0,
        format!("{checked} handshakes checked after swaps settled, {stale} presented the replaced certificate"),
    );
    let seen: BTreeMap<&String, u64> = outcome.report.certs.iter().map(|(k, v)| (k, *v)).collect();
    result.check(
        fingerprints.iter().all(|f| seen.contains_key(f)),
        format!("handshakes by certificate: {seen:?}"),
    );
    drop(fixture);
    Ok(result)
}
