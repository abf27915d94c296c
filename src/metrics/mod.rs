//! Prometheus metrics.
//!
//! Counters and the latency histogram are updated on the request path.
//! Gauges that describe state (health, in-flight, weights, generation,
//! certificate expiry) are rebuilt from the current snapshot on each scrape,
//! so `/metrics` always agrees with `ctl status` and label sets of removed
//! routes, pools and backends disappear after a reload.
//!
//! Label values come only from the config (route, pool and backend names)
//! and from fixed sets (status class, reason, result), never from request
//! data, so the number of series is bounded by the config.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::app::App;

mod listener;

pub use listener::{readiness, serve};

/// Latency buckets in seconds: 1 ms to 10 s, dense where webhook handlers
/// respond (tens to hundreds of milliseconds).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_connect_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub no_healthy_backend: IntCounterVec,
    pub rejected_requests: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub admin_commands: IntCounterVec,
    pub acme_orders: IntCounterVec,
    backend_healthy: IntGaugeVec,
    backend_ejected: IntGaugeVec,
    backend_in_flight: IntGaugeVec,
    pool_weight: IntGaugeVec,
    config_generation: IntGauge,
    certificate_expiry: IntGaugeVec,
    pub acme_next_renewal: IntGaugeVec,
    pub shift_state: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(vec.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    vec
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(vec.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    vec
}

impl Metrics {
    /// Creates every metric family. The names and labels are constants, so
    /// a failure here is a programming error caught by the unit tests.
    fn new() -> Metrics {
        let registry = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from the start of a request to the end of its response, by route and pool.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "pool"],
        )
        .unwrap_or_else(|e| panic!("histogram: {e}"));
        registry
            .register(Box::new(request_duration.clone()))
            .unwrap_or_else(|e| panic!("histogram: {e}"));
        let config_generation = IntGauge::new(
            "switchyard_config_generation",
            "Generation of the running config snapshot; every reload and admin change adds one.",
        )
        .unwrap_or_else(|e| panic!("gauge: {e}"));
        registry
            .register(Box::new(config_generation.clone()))
            .unwrap_or_else(|e| panic!("gauge: {e}"));
        Metrics {
            requests: counter(&registry, "switchyard_requests_total", "Requests answered, by route, pool and status class (1xx to 5xx). Pool is empty when no backend was picked.", &["route", "pool", "class"]),
            request_duration,
            upstream_connect_errors: counter(&registry, "switchyard_upstream_connect_errors_total", "Failed connections to a backend.", &["route", "pool", "backend"]),
            retries: counter(&registry, "switchyard_retries_total", "Requests sent again to a backend, by reason (connect or reused_connection).", &["route", "reason"]),
            no_healthy_backend: counter(&registry, "switchyard_no_healthy_backend_total", "Requests answered 503 because no backend of the route was healthy in time.", &["route"]),
            rejected_requests: counter(&registry, "switchyard_rejected_requests_total", "Requests and connections rejected before routing, by status: 400 malformed or ambiguous, 408 header timeout, 431 header too large, 503 connection limit.", &["status"]),
            config_reloads: counter(&registry, "switchyard_config_reloads_total", "Config reloads by result (ok or rejected).", &["result"]),
            admin_commands: counter(&registry, "switchyard_admin_commands_total", "Admin socket commands by command and result (ok or error).", &["command", "result"]),
            acme_orders: counter(&registry, "switchyard_acme_orders_total", "ACME certificate orders by host and result.", &["host", "result"]),
            backend_healthy: gauge(&registry, "switchyard_backend_healthy", "1 when the backend passes its health checks and is not ejected, else 0.", &["pool", "backend"]),
            backend_ejected: gauge(&registry, "switchyard_backend_ejected", "1 while passive health has ejected the backend, else 0.", &["pool", "backend"]),
            backend_in_flight: gauge(&registry, "switchyard_backend_in_flight", "Requests in flight to the backend.", &["pool", "backend"]),
            pool_weight: gauge(&registry, "switchyard_pool_weight", "Current weight of a pool in a route.", &["route", "pool"]),
            config_generation,
            certificate_expiry: gauge(&registry, "switchyard_certificate_expiry_timestamp_seconds", "Expiry (notAfter) of each certificate in the store, as a Unix timestamp.", &["name"]),
            acme_next_renewal: gauge(&registry, "switchyard_acme_next_renewal_timestamp_seconds", "When the ACME manager plans to renew the host's certificate, as a Unix timestamp.", &["host"]),
            shift_state: gauge(&registry, "switchyard_shift_state", "Progressive shift state per route: 0 idle, 1 running, 2 holding, 3 rolled back, 4 completed.", &["route"]),
            registry,
        }
    }

    /// Counts one finished request. `status` 0 means no response was sent.
    pub fn record_request(&self, route: &str, pool: &str, status: u16, duration: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.requests.with_label_values(&[route, pool, class]).inc();
        self.request_duration
            .with_label_values(&[route, pool])
            .observe(duration.as_secs_f64());
    }

    /// Rebuilds the state gauges from the app's current snapshot and store.
    pub fn refresh(&self, app: &App) {
        let snapshot = app.snapshots.load();
        self.config_generation.set(snapshot.generation as i64);
        self.backend_healthy.reset();
        self.backend_ejected.reset();
        self.backend_in_flight.reset();
        for (name, pool) in &snapshot.pools {
            for backend in &pool.backends {
                let address = backend.address.to_string();
                let labels = [name.as_str(), address.as_str()];
                self.backend_healthy
                    .with_label_values(&labels)
                    .set(i64::from(backend.health.is_healthy()));
                self.backend_ejected
                    .with_label_values(&labels)
                    .set(i64::from(backend.health.is_ejected()));
                self.backend_in_flight
                    .with_label_values(&labels)
                    .set(backend.health.in_flight() as i64);
            }
        }
        self.pool_weight.reset();
        for route in &snapshot.route_states {
            for entry in &route.pools {
                self.pool_weight
                    .with_label_values(&[route.name.as_str(), entry.pool.name.as_str()])
                    .set(i64::from(entry.weight));
            }
        }
        self.shift_state.reset();
        let shifts = app.admin.shift_gauges();
        for route in &snapshot.route_states {
            let value = shifts.get(&route.name).copied().unwrap_or(0);
            self.shift_state
                .with_label_values(&[route.name.as_str()])
                .set(value);
        }
        self.certificate_expiry.reset();
        if let Some(store) = app.cert_store() {
            for cert in store.certificates() {
                self.certificate_expiry
                    .with_label_values(&[cert.name.as_str()])
                    .set(cert.not_after);
            }
        }
    }

    /// The registry in the Prometheus text format, version 0.0.4.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Returns the process-wide metrics, created on first use.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_register_and_encode() {
        let metrics = Metrics::new();
        metrics.record_request("webhook", "blue", 204, Duration::from_millis(3));
        metrics.record_request("webhook", "blue", 502, Duration::from_millis(30));
        let text = metrics.encode();
        assert!(
            text.contains(
                "switchyard_requests_total{class=\"2xx\",pool=\"blue\",route=\"webhook\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "switchyard_requests_total{class=\"5xx\",pool=\"blue\",route=\"webhook\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("switchyard_request_duration_seconds_bucket{pool=\"blue\",route=\"webhook\",le=\"0.005\"} 1"), "{text}");
    }
}
