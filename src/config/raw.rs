//! The config file as written: serde types that mirror the TOML, with every
//! unknown key rejected. Validation and defaults live in `validate`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::duration::ConfigDuration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listeners: RawListeners,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub tls: RawTls,
    pub acme: Option<RawAcme>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub pools: BTreeMap<String, Spanned<RawPool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListeners {
    pub http: Option<String>,
    pub https: Option<String>,
    /// `"redirect"` (default when HTTPS is configured) or `"proxy"`.
    pub plain_http: Option<String>,
    pub h2c: Option<bool>,
    pub threads: Option<usize>,
    pub grace_period: Option<ConfigDuration>,
    pub graceful_shutdown_timeout: Option<ConfigDuration>,
    pub upgrade_socket: Option<String>,
    pub pid_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<String>,
    /// Octal file mode as a string, such as `"0600"`.
    pub socket_mode: Option<String>,
    pub metrics: Option<String>,
    pub state_file: Option<String>,
    /// Default limits of a progressive shift; a `shift` command may override each.
    pub shift_max_error_rate: Option<f64>,
    pub shift_max_p99: Option<ConfigDuration>,
    pub shift_min_requests: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub store: Option<String>,
    pub default_certificate: Option<String>,
    /// `"default"` or `"reject"`.
    pub unknown_sni: Option<String>,
    /// `"1.2"` or `"1.3"`.
    pub min_version: Option<String>,
    pub hsts: Option<String>,
    pub rescan_interval: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub enabled: Option<bool>,
    pub directory: Option<String>,
    #[serde(default)]
    pub contact: Vec<String>,
    pub challenge: Option<String>,
    #[serde(default)]
    pub ca_roots: Vec<String>,
    pub key_type: Option<String>,
    /// Renew when less than this share of the lifetime remains, when the CA
    /// offers no renewal information. Default one third.
    pub renew_remaining_fraction: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    /// `"text"` or `"json"`.
    pub format: Option<String>,
    pub access_log: Option<bool>,
    pub log_query: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub no_backend_wait: Option<ConfigDuration>,
    pub startup_wait: Option<ConfigDuration>,
    pub connect_timeout: Option<ConfigDuration>,
    pub read_timeout: Option<ConfigDuration>,
    pub write_timeout: Option<ConfigDuration>,
    pub upstream_idle_timeout: Option<ConfigDuration>,
}

/// Downstream (client-side) timeouts and limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub header_read_timeout: Option<ConfigDuration>,
    pub keepalive_timeout: Option<ConfigDuration>,
    pub body_read_timeout: Option<ConfigDuration>,
    pub response_write_timeout: Option<ConfigDuration>,
    pub max_header_bytes: Option<String>,
    pub max_header_count: Option<i64>,
    pub max_connections: Option<i64>,
    pub connection_wait: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub pools: BTreeMap<String, i64>,
    pub plain_http: Option<bool>,
    pub connect_timeout: Option<ConfigDuration>,
    pub read_timeout: Option<ConfigDuration>,
    pub websocket_idle_timeout: Option<ConfigDuration>,
    pub retries: Option<u32>,
    pub retry_idempotent: Option<bool>,
    pub max_body: Option<String>,
    pub body_read_timeout: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub algorithm: Option<String>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
}

/// Passive health (outlier detection) of a pool's backends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<i64>,
    pub base_ejection: Option<ConfigDuration>,
    pub max_ejection: Option<ConfigDuration>,
    pub max_ejection_share: Option<f64>,
}

/// A backend written either as `"127.0.0.1:8000"` or as a table with a weight.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawBackend {
    Address(String),
    Table(RawBackendTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTable {
    pub address: String,
    pub weight: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<String>,
    pub host: Option<String>,
    pub interval: Option<ConfigDuration>,
    pub timeout: Option<ConfigDuration>,
    /// Status codes or ranges: `[200, "200-299", 204]`.
    pub expected_status: Option<Vec<toml::Value>>,
    pub healthy_threshold: Option<i64>,
    pub unhealthy_threshold: Option<i64>,
}
