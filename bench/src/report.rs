//! Results of a load run: latency percentiles, errors by kind and pool
//! counts, as a terminal table and as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histogram tracks, in microseconds (one hour).
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// Failed requests by kind. A response with a status outside 200-299 is
/// counted under its status code and still has its latency recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// TCP connect failed or was refused.
    pub connect: u64,
    /// TLS handshake failed.
    pub tls: u64,
    /// No complete response within the request timeout.
    pub timeout: u64,
    /// The connection broke mid-request: reset, closed early, bad framing.
    pub io: u64,
    /// Responses outside 200-299, keyed by status code.
    pub status: BTreeMap<String, u64>,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.transport() + self.status.values().sum::<u64>()
    }

    /// Failures where no response arrived.
    pub fn transport(&self) -> u64 {
        self.connect + self.tls + self.timeout + self.io
    }

    fn merge(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.tls += other.tls;
        self.timeout += other.timeout;
        self.io += other.io;
        for (status, count) in &other.status {
            *self.status.entry(status.clone()).or_default() += count;
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    /// Reads the percentiles of `histogram`, whose values are microseconds.
    /// Each percentile is the highest value equivalent to the recorded one
    /// at the histogram's precision (3 significant digits).
    pub fn from_histogram(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

/// One load run's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub url: String,
    /// `closed`, or `open@RATE` for a fixed arrival rate.
    pub mode: String,
    pub connections: usize,
    pub keep_alive: bool,
    /// Negotiated HTTP version of the last connection (`HTTP/1.1` or `HTTP/2`).
    pub protocol: String,
    pub method: String,
    pub elapsed_s: f64,
    /// Requests started, whatever their outcome.
    pub requests: u64,
    /// Responses with status 200-299.
    pub ok: u64,
    /// Responses (any status) per second of elapsed time.
    pub throughput_rps: f64,
    /// Latency of every response; in open-loop mode it is measured from the
    /// request's scheduled send time, so queueing delay counts.
    pub latency: LatencySummary,
    pub errors: ErrorCounts,
    /// Responses by their `x-pool` header value; `-` when absent.
    pub pools: BTreeMap<String, u64>,
    /// TLS handshakes by the first 16 hex digits of the server leaf
    /// certificate's SHA-256.
    pub certs: BTreeMap<String, u64>,
    /// The first error message seen of each kind, to explain the counts.
    pub error_samples: BTreeMap<String, String>,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn from_json(text: &str) -> Result<Report, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Compares with `other`: true when equal, with floating-point fields
    /// allowed to differ in the last bits (serde_json's default float
    /// parsing does not always round-trip exactly).
    pub fn same_as(&self, other: &Report) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
        let mut adjusted = other.clone();
        let floats_close = close(self.elapsed_s, other.elapsed_s)
            && close(self.throughput_rps, other.throughput_rps)
            && close(self.latency.mean_us, other.latency.mean_us);
        adjusted.elapsed_s = self.elapsed_s;
        adjusted.throughput_rps = self.throughput_rps;
        adjusted.latency.mean_us = self.latency.mean_us;
        floats_close && &adjusted == self
    }
}

/// Per-task accumulator, merged into one [`Report`] at the end of a run.
#[derive(Clone, Debug)]
pub struct Recorder {
    pub latency: Histogram<u64>,
    pub requests: u64,
    pub ok: u64,
    pub responses: u64,
    pub errors: ErrorCounts,
    pub pools: BTreeMap<String, u64>,
    pub certs: BTreeMap<String, u64>,
    pub error_samples: BTreeMap<String, String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// Kind of a failed request without a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Tls,
    Timeout,
    Io,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Tls => "tls",
            FailureKind::Timeout => "timeout",
            FailureKind::Io => "io",
        }
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        // The bounds are constants within hdrhistogram's limits, so this
        // cannot fail.
        let latency = Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
            .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
        Recorder {
            latency,
            requests: 0,
            ok: 0,
            responses: 0,
            errors: ErrorCounts::default(),
            pools: BTreeMap::new(),
            certs: BTreeMap::new(),
            error_samples: BTreeMap::new(),
        }
    }

    /// Records a response with `status` after `latency`, served by `pool`.
    pub fn response(&mut self, status: u16, latency: Duration, pool: &str) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_TRACKED_US);
        // Clamped into the histogram's range, so recording cannot fail.
        let _ = self.latency.record(micros);
        self.responses += 1;
        if (200..300).contains(&status) {
            self.ok += 1;
        } else {
            *self.errors.status.entry(status.to_string()).or_default() += 1;
        }
        match self.pools.get_mut(pool) {
            Some(count) => *count += 1,
            None => {
                self.pools.insert(pool.to_string(), 1);
            }
        }
    }

    pub fn failure(&mut self, kind: FailureKind, message: &str) {
        match kind {
            FailureKind::Connect => self.errors.connect += 1,
            FailureKind::Tls => self.errors.tls += 1,
            FailureKind::Timeout => self.errors.timeout += 1,
            FailureKind::Io => self.errors.io += 1,
        }
        self.error_samples
            .entry(kind.as_str().to_string())
            .or_insert_with(|| message.to_string());
    }

    pub fn handshake(&mut self, cert_fingerprint: &str) {
        *self.certs.entry(cert_fingerprint.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.requests += other.requests;
        self.ok += other.ok;
        self.responses += other.responses;
        self.errors.merge(&other.errors);
        for (pool, count) in &other.pools {
            *self.pools.entry(pool.clone()).or_default() += count;
        }
        for (cert, count) in &other.certs {
            *self.certs.entry(cert.clone()).or_default() += count;
        }
        for (kind, message) in &other.error_samples {
            self.error_samples
                .entry(kind.clone())
                .or_insert_with(|| message.clone());
        }
    }

    /// Builds the report; `elapsed` is the measured wall time of the run.
    pub fn into_report(self, elapsed: Duration) -> Report {
        let seconds = elapsed.as_secs_f64();
        Report {
            elapsed_s: seconds,
            requests: self.requests,
            ok: self.ok,
            throughput_rps: if seconds > 0.0 {
                self.responses as f64 / seconds
            } else {
                0.0
            },
            latency: LatencySummary::from_histogram(&self.latency),
            errors: self.errors,
            pools: self.pools,
            certs: self.certs,
            error_samples: self.error_samples,
            ..Report::default()
        }
    }
}

/// Median of `values` (the mean of the middle two for an even count);
/// `None` when empty. NaN values sort last.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        Some(sorted[middle])
    } else {
        Some((sorted[middle - 1] + sorted[middle]) / 2.0)
    }
}

/// Formats microseconds as milliseconds with two decimals.
pub fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

/// Renders reports as a fixed-width terminal table, one row per report.
pub fn render_table(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<20} pools",
        "label",
        "req/s",
        "requests",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "errors by kind"
    );
    for report in reports {
        let _ = writeln!(
            out,
            "{:<14} {:>10.0} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<20} {}",
            report.label,
            report.throughput_rps,
            report.requests,
            ms(report.latency.p50_us),
            ms(report.latency.p90_us),
            ms(report.latency.p99_us),
            ms(report.latency.p999_us),
            ms(report.latency.max_us),
            report.errors.total(),
            describe_errors(&report.errors),
            describe_counts(&report.pools),
        );
    }
    out
}

/// `connect=1 status_503=4`, or `-` when there were no errors.
pub fn describe_errors(errors: &ErrorCounts) -> String {
    let mut parts = Vec::new();
    for (name, count) in [
        ("connect", errors.connect),
        ("tls", errors.tls),
        ("timeout", errors.timeout),
        ("io", errors.io),
    ] {
        if count > 0 {
            parts.push(format!("{name}={count}"));
        }
    }
    for (status, count) in &errors.status {
        parts.push(format!("status_{status}={count}"));
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(" ")
    }
}

fn describe_counts(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(name, count)| format!("{name}={count}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_uniform_values() {
        let mut recorder = Recorder::new();
        for micros in 1..=1000u64 {
            recorder.response(200, Duration::from_micros(micros), "blue");
        }
        let summary = LatencySummary::from_histogram(&recorder.latency);
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50_us, 500);
        assert_eq!(summary.p90_us, 900);
        assert_eq!(summary.p99_us, 990);
        assert_eq!(summary.p999_us, 999);
        assert_eq!(summary.max_us, 1000);
        assert!(
            (summary.mean_us - 500.5).abs() < 0.01,
            "{}",
            summary.mean_us
        );
    }

    #[test]
    fn percentiles_keep_three_digits() {
        let mut recorder = Recorder::new();
        // 990 fast responses and 10 slow ones: p99 is fast, p99.9 is slow.
        for _ in 0..990 {
            recorder.response(200, Duration::from_micros(250), "a");
        }
        for _ in 0..10 {
            recorder.response(200, Duration::from_millis(1234), "a");
        }
        let summary = LatencySummary::from_histogram(&recorder.latency);
        assert_eq!(summary.p99_us, 250);
        let slow = summary.p999_us as f64;
        assert!((slow - 1_234_000.0).abs() / 1_234_000.0 < 0.001, "{slow}");
        assert_eq!(summary.max_us, summary.p999_us);
    }

    #[test]
    fn errors_counted_by_kind() {
        let mut a = Recorder::new();
        a.response(200, Duration::from_micros(10), "blue");
        a.response(503, Duration::from_micros(10), "-");
        a.failure(FailureKind::Connect, "refused");
        let mut b = Recorder::new();
        b.response(503, Duration::from_micros(10), "green");
        b.failure(FailureKind::Io, "reset");
        b.failure(FailureKind::Connect, "later message");
        a.merge(&b);
        assert_eq!(a.ok, 1);
        assert_eq!(a.responses, 3);
        assert_eq!(a.errors.connect, 2);
        assert_eq!(a.errors.io, 1);
        assert_eq!(a.errors.status.get("503"), Some(&2));
        assert_eq!(a.errors.total(), 5);
        assert_eq!(a.error_samples.get("connect").unwrap(), "refused");
        assert_eq!(a.pools.get("blue"), Some(&1));
        assert_eq!(a.pools.get("green"), Some(&1));
        assert_eq!(describe_errors(&a.errors), "connect=2 io=1 status_503=2");
    }

    #[test]
    fn report_json_round_trip() {
        let mut recorder = Recorder::new();
        for micros in [120, 340, 560, 9000] {
            recorder.response(200, Duration::from_micros(micros), "blue");
        }
        recorder.response(500, Duration::from_micros(800), "green");
        recorder.failure(FailureKind::Timeout, "timed out after 5s");
        recorder.handshake("00112233aabbccdd");
        recorder.requests = 6;
        let mut report = recorder.into_report(Duration::from_millis(2500));
        report.label = "direct".into();
        report.mode = "open@1000".into();
        let text = report.to_json();
        let back = Report::from_json(&text).unwrap();
        assert!(report.same_as(&back), "{back:?}");
        assert_eq!(back.throughput_rps, 2.0);
        assert_eq!(back.errors.status.get("500"), Some(&1));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // 9000 µs lies in a bucket 8 µs wide at 3 significant digits.
        let max = value["latency"]["max_us"].as_u64().unwrap();
        assert!((9000..9009).contains(&max), "{max}");
        assert_eq!(value["pools"]["green"], 1);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
