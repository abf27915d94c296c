//! The manager's metrics hooks on the process-wide Prometheus registry:
//! `switchyard_acme_orders_total{host,result}` and
//! `switchyard_acme_next_renewal_timestamp_seconds{host}`. Host labels come
//! from the routes in the config, so the series count is bounded by it.

use std::time::SystemTime;

use super::manager::{AcmeObserver, OrderResult};
use super::schedule::unix_seconds;

/// Pass to [`super::AcmeManager::with_observer`].
pub struct PrometheusObserver;

impl AcmeObserver for PrometheusObserver {
    fn order_finished(&self, host: &str, result: OrderResult) {
        crate::metrics::global()
            .acme_orders
            .with_label_values(&[host, result.as_str()])
            .inc();
    }

    fn renewal_scheduled(&self, host: &str, at: Option<SystemTime>) {
        let gauge = &crate::metrics::global().acme_next_renewal;
        match at {
            Some(at) => gauge.with_label_values(&[host]).set(unix_seconds(at)),
            None => {
                let _ = gauge.remove_label_values(&[host]);
            }
        }
    }
}
