//! The load generator: closed loop (each connection sends its next request
//! as soon as the previous one completes) or open loop (requests due on a
//! fixed schedule, latency measured from the due time).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::Method;
use ring::hmac;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

use crate::client::{self, Connection, RequestTemplate, Trust};
use crate::report::{FailureKind, Recorder, Report};
use crate::schedule::Schedule;
use crate::target::Target;

/// Size of the webhook-like POST body, in bytes.
pub const WEBHOOK_BODY_BYTES: usize = 2048;

/// Pause after a failed connect before the same connection slot tries
/// again, so a closed port does not turn into a busy loop.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(10);

#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Closed,
    /// Fixed arrival rate in requests per second.
    Open {
        rate: f64,
    },
}

#[derive(Clone, Debug)]
pub enum RequestKind {
    Get,
    /// POST of a 2 KiB JSON body signed like a GitHub webhook:
    /// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
    SignedPost {
        secret: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub label: String,
    pub target: Target,
    /// Concurrent connections (closed loop), or the most requests in
    /// flight at once (open loop).
    pub connections: usize,
    pub mode: Mode,
    pub duration: Duration,
    /// Stop after this many requests even if time remains.
    pub max_requests: Option<u64>,
    /// Reuse connections; without it every request opens a new one and
    /// sends `Connection: close`.
    pub keep_alive: bool,
    pub request: RequestKind,
    /// Time allowed for connect, handshake and response together.
    pub timeout: Duration,
    /// Offer HTTP/2 by ALPN on HTTPS targets.
    pub http2: bool,
    pub trust: Trust,
    /// Keep one [`TraceEvent`] per request.
    pub trace: bool,
}

impl LoadSpec {
    pub fn new(label: &str, target: Target) -> LoadSpec {
        LoadSpec {
            label: label.to_string(),
            target,
            connections: 50,
            mode: Mode::Closed,
            duration: Duration::from_secs(10),
            max_requests: None,
            keep_alive: true,
            request: RequestKind::Get,
            timeout: Duration::from_secs(5),
            http2: true,
            trust: Trust::Insecure,
            trace: false,
        }
    }
}

/// One request, for scenarios that check what happened when.
#[derive(Clone, Debug)]
pub struct TraceEvent {
    /// Microseconds from the run's start to the moment the request was
    /// handed to the connection (after any connect and handshake).
    pub sent_us: u64,
    pub done_us: u64,
    /// Response status, or 0 when no response arrived.
    pub status: u16,
    /// `x-pool` of the response; empty when absent or no response.
    pub pool: String,
    /// Leaf certificate fingerprint when this request opened a TLS connection.
    pub cert: Option<String>,
}

pub struct LoadOutcome {
    pub report: Report,
    /// Per-request events in no particular order; empty unless `trace`.
    pub trace: Vec<TraceEvent>,
    pub start: Instant,
}

/// Builds the 2 KiB JSON body of the signed POST. It is the same for every
/// request, which is how retried deliveries look to a receiver.
pub fn webhook_body() -> Bytes {
    let head = r#"{"action":"completed","delivery":"7d1f4c2e-bench","repository":{"id":4242,"full_name":"example/switchyard","private":false},"sender":{"login":"bench","id":1},"check_run":{"status":"completed","conclusion":"success","head_sha":"0123456789abcdef0123456789abcdef01234567"},"padding":""#;
    let tail = "\"}";
    let padding = WEBHOOK_BODY_BYTES - head.len() - tail.len();
    let mut body = String::with_capacity(WEBHOOK_BODY_BYTES);
    body.push_str(head);
    body.extend(std::iter::repeat_n('x', padding));
    body.push_str(tail);
    Bytes::from(body)
}

/// Hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn template(spec: &LoadSpec) -> Result<RequestTemplate, String> {
    let mut template = RequestTemplate::get(&spec.target);
    if let RequestKind::SignedPost { secret } = &spec.request {
        let body = webhook_body();
        let signature = format!("sha256={}", sign(secret, &body));
        template.method = Method::POST;
        template.headers = vec![
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (
                HeaderName::from_static("x-hub-signature-256"),
                HeaderValue::from_str(&signature).map_err(|e| e.to_string())?,
            ),
            (
                HeaderName::from_static("x-github-event"),
                HeaderValue::from_static("check_run"),
            ),
        ];
        template.body = body;
    }
    Ok(template)
}

struct Shared {
    target: Target,
    tls: Option<TlsConnector>,
    template: RequestTemplate,
    keep_alive: bool,
    timeout: Duration,
    trace: bool,
    start: Instant,
    deadline: Instant,
    schedule: Option<Schedule>,
    /// Open loop: one permit per request that has come due, released by
    /// the pacer thread.
    due_permits: Arc<Semaphore>,
    /// Open loop: requests in the whole schedule.
    scheduled: u64,
    max_requests: Option<u64>,
    next: AtomicU64,
    stop: Arc<AtomicBool>,
    http2_seen: AtomicBool,
}

/// Runs the load on the current Tokio runtime until the duration passes,
/// `max_requests` have started, or `stop` is set. Requests in flight at the
/// end complete (or time out) and are counted.
pub async fn run(spec: &LoadSpec, stop: Arc<AtomicBool>) -> Result<LoadOutcome, String> {
    if spec.connections == 0 {
        return Err("connections must be at least 1".to_string());
    }
    let tls = if spec.target.https {
        Some(TlsConnector::from(client::tls_config(
            &spec.trust,
            spec.http2,
        )?))
    } else {
        None
    };
    let start = Instant::now();
    let schedule = match spec.mode {
        Mode::Closed => None,
        Mode::Open { rate } => Some(Schedule::new(start, rate).ok_or_else(|| {
            format!(
                "invalid rate {rate}: it must be a finite number of requests per second above 0"
            )
        })?),
    };
    let scheduled = schedule.map_or(0, |s| {
        let total = s.count_before(spec.duration);
        spec.max_requests.map_or(total, |max| total.min(max))
    });
    let due_permits = Arc::new(Semaphore::new(0));
    let shared = Arc::new(Shared {
        target: spec.target.clone(),
        tls,
        template: template(spec)?,
        keep_alive: spec.keep_alive,
        timeout: spec.timeout,
        trace: spec.trace,
        start,
        deadline: start + spec.duration,
        schedule,
        due_permits: Arc::clone(&due_permits),
        scheduled,
        max_requests: spec.max_requests,
        next: AtomicU64::new(0),
        stop,
        http2_seen: AtomicBool::new(false),
    });
    let pacer = match schedule {
        Some(schedule) => Some(start_pacer(
            schedule,
            scheduled,
            spec.connections,
            due_permits,
            Arc::clone(&shared.stop),
        )?),
        None => None,
    };
    let mut tasks = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        tasks.push(tokio::spawn(worker(Arc::clone(&shared))));
    }
    let mut recorder = Recorder::new();
    let mut trace = Vec::new();
    for task in tasks {
        let (part, events) = task.await.map_err(|e| format!("a load task failed: {e}"))?;
        recorder.merge(&part);
        trace.extend(events);
    }
    let elapsed = start.elapsed();
    if let Some(pacer) = pacer {
        // Workers only finish after the pacer released its last permits.
        let _ = pacer.join();
    }
    let mut report = recorder.into_report(elapsed);
    report.label = spec.label.clone();
    report.url = spec.target.to_string();
    report.mode = match spec.mode {
        Mode::Closed => "closed".to_string(),
        Mode::Open { rate } => format!("open@{rate}"),
    };
    report.connections = spec.connections;
    report.keep_alive = spec.keep_alive;
    report.protocol = if shared.http2_seen.load(Ordering::Relaxed) {
        "HTTP/2".to_string()
    } else {
        "HTTP/1.1".to_string()
    };
    report.method = match spec.request {
        RequestKind::Get => "GET".to_string(),
        RequestKind::SignedPost { .. } => "POST signed 2KiB JSON".to_string(),
    };
    Ok(LoadOutcome {
        report,
        trace,
        start,
    })
}

/// Starts the pacer thread of an open-loop run. It releases one permit per
/// request at the request's due time, then one per worker so every worker
/// sees the end. A plain OS thread with 1 µs timer slack wakes within tens
/// of microseconds, where Tokio's timer wheel rounds sleeps up to whole
/// milliseconds, which would add up to 1 ms to every latency.
fn start_pacer(
    schedule: Schedule,
    scheduled: u64,
    workers: usize,
    permits: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's
            // timer slack; a failure leaves the default 50 µs.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
            }
            let mut released = 0u64;
            while released < scheduled && !stop.load(Ordering::Relaxed) {
                let due = schedule.due(released);
                let now = Instant::now();
                if due > now {
                    // Bounded so a stop request is noticed within 50 ms.
                    std::thread::sleep((due - now).min(Duration::from_millis(50)));
                    continue;
                }
                let ready = schedule
                    .count_before(
                        now.saturating_duration_since(schedule.due(0)) + Duration::from_nanos(1),
                    )
                    .min(scheduled);
                let count = ready.saturating_sub(released).max(1);
                permits.add_permits(count as usize);
                released += count;
            }
            permits.add_permits(workers);
        })
        .map_err(|e| format!("cannot start the pacer thread: {e}"))
}

fn micros_since(start: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(start).as_micros() as u64
}

async fn worker(shared: Arc<Shared>) -> (Recorder, Vec<TraceEvent>) {
    let mut recorder = Recorder::new();
    let mut events = Vec::new();
    let mut connection: Option<Connection> = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if shared.schedule.is_some() {
            match shared.due_permits.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if shared.max_requests.is_some_and(|max| n >= max) {
            break;
        }
        let due = match &shared.schedule {
            Some(schedule) => {
                if n >= shared.scheduled {
                    break;
                }
                schedule.due(n)
            }
            None => {
                let now = Instant::now();
                if now >= shared.deadline {
                    break;
                }
                now
            }
        };
        recorder.requests += 1;
        let give_up = due + shared.timeout;
        let mut opened_cert = None;
        let usable = match connection.as_mut() {
            Some(open) => open.ready().await,
            None => false,
        };
        if !usable {
            connection = None;
            let attempt = tokio::time::timeout_at(
                give_up.into(),
                client::connect(&shared.target, shared.tls.as_ref()),
            )
            .await;
            match attempt {
                Ok(Ok(open)) => {
                    if let Some(cert) = &open.cert_fingerprint {
                        recorder.handshake(cert);
                        opened_cert = Some(cert.clone());
                    }
                    if open.is_http2() {
                        shared.http2_seen.store(true, Ordering::Relaxed);
                    }
                    connection = Some(open);
                }
                Ok(Err((kind, message))) => {
                    fail(
                        &shared,
                        &mut recorder,
                        &mut events,
                        kind,
                        &message,
                        Instant::now(),
                    );
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    let message = format!("connect and handshake took over {:?}", shared.timeout);
                    fail(
                        &shared,
                        &mut recorder,
                        &mut events,
                        FailureKind::Timeout,
                        &message,
                        Instant::now(),
                    );
                    continue;
                }
            }
        }
        let Some(open) = connection.as_mut() else {
            continue;
        };
        let http2 = open.is_http2();
        let request = match shared.template.build(http2, !shared.keep_alive) {
            Ok(request) => request,
            Err(message) => {
                fail(
                    &shared,
                    &mut recorder,
                    &mut events,
                    FailureKind::Io,
                    &message,
                    Instant::now(),
                );
                break;
            }
        };
        let sent = Instant::now();
        let result = tokio::time::timeout_at(give_up.into(), open.send(request)).await;
        let done = Instant::now();
        match result {
            Ok(Ok(reply)) => {
                let pool = reply
                    .pool
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                recorder.response(reply.status, done - due, pool);
                if shared.trace {
                    events.push(TraceEvent {
                        sent_us: micros_since(shared.start, sent),
                        done_us: micros_since(shared.start, done),
                        status: reply.status,
                        pool: pool.to_string(),
                        cert: opened_cert,
                    });
                }
                if !shared.keep_alive {
                    connection = None;
                }
            }
            Ok(Err((kind, message))) => {
                connection = None;
                fail_traced(
                    &shared,
                    &mut recorder,
                    &mut events,
                    kind,
                    &message,
                    sent,
                    done,
                );
            }
            Err(_) => {
                connection = None;
                let message = format!("no response within {:?}", shared.timeout);
                fail_traced(
                    &shared,
                    &mut recorder,
                    &mut events,
                    FailureKind::Timeout,
                    &message,
                    sent,
                    done,
                );
            }
        }
    }
    (recorder, events)
}

fn fail(
    shared: &Shared,
    recorder: &mut Recorder,
    events: &mut Vec<TraceEvent>,
    kind: FailureKind,
    message: &str,
    at: Instant,
) {
    fail_traced(shared, recorder, events, kind, message, at, at);
}

fn fail_traced(
    shared: &Shared,
    recorder: &mut Recorder,
    events: &mut Vec<TraceEvent>,
    kind: FailureKind,
    message: &str,
    sent: Instant,
    done: Instant,
) {
    recorder.failure(kind, message);
    if shared.trace {
        events.push(TraceEvent {
            sent_us: micros_since(shared.start, sent),
            done_us: micros_since(shared.start, done),
            status: 0,
            pool: String::new(),
            cert: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_body_is_2kib_json() {
        let body = webhook_body();
        assert_eq!(body.len(), WEBHOOK_BODY_BYTES);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["action"], "completed");
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
