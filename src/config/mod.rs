//! Configuration: the TOML file, its validation and the typed config the
//! rest of the proxy runs on.
//!
//! Loading never stops at the first problem: every error is collected with
//! the key path and line it concerns, so `switchyard check` can list them all
//! at once, like `nginx -t`.

mod duration;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use duration::format_duration;
pub use validate::MAX_WEIGHT;

/// One problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line in the file, when the problem can be placed.
    pub line: Option<usize>,
    /// Key path of the problem, such as `route "webhook": pool "green"`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(line), false) => write!(f, "line {line}: {}: {}", self.key, self.message),
            (Some(line), true) => write!(f, "line {line}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.key, self.message),
            (None, true) => write!(f, "{}", self.message),
        }
    }
}

/// Every error found in one config file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {err}", self.file.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated configuration with every default filled in.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: PathBuf,
    pub listeners: Listeners,
    pub admin: Admin,
    pub tls: Tls,
    pub acme: Option<Acme>,
    pub log: Log,
    pub proxy: ProxySettings,
    pub limits: Limits,
    pub routes: Vec<Route>,
    pub pools: BTreeMap<String, Pool>,
}

#[derive(Clone, Debug)]
pub struct Listeners {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub plain_http: PlainHttp,
    pub h2c: bool,
    pub threads: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub upgrade_socket: PathBuf,
    pub pid_file: PathBuf,
}

/// Handling of plain HTTP requests other than ACME HTTP-01 challenges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainHttp {
    /// Respond `308 Permanent Redirect` to the same URL over `https://`,
    /// except on routes that set `plain_http = true`.
    Redirect,
    /// Proxy every request as the HTTPS listener would.
    Proxy,
}

#[derive(Clone, Debug)]
pub struct Admin {
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub metrics: Option<SocketAddr>,
    pub state_file: Option<PathBuf>,
    /// Share of failed requests (0 to 1) above which a shift rolls back.
    pub shift_max_error_rate: f64,
    /// 99th percentile latency above which a shift rolls back.
    pub shift_max_p99: Duration,
    /// Requests a shift window needs before the controller decides.
    pub shift_min_requests: u64,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub store: PathBuf,
    pub default_certificate: Option<String>,
    pub reject_unknown_sni: bool,
    pub hsts: Option<String>,
    pub rescan_interval: Duration,
}

#[derive(Clone, Debug)]
pub struct Acme {
    pub directory: String,
    pub contact: Vec<String>,
    pub challenge: AcmeChallenge,
    pub ca_roots: Vec<PathBuf>,
    pub key_type: String,
    pub renew_remaining_fraction: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcmeChallenge {
    Http01,
    TlsAlpn01,
}

#[derive(Clone, Debug)]
pub struct Log {
    pub level: String,
    pub json: bool,
    pub access_log: bool,
    pub log_query: bool,
}

/// Proxy-wide request handling settings; routes may override the timeouts.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub trusted_proxies: Vec<IpNet>,
    /// How long a request waits for a healthy backend before it gets 503.
    pub no_backend_wait: Duration,
    /// How long requests wait at process start for the first health checks.
    pub startup_wait: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// How long an idle upstream keep-alive connection is kept for reuse.
    /// Below uvicorn's 5 s keep-alive so that the proxy, not the backend,
    /// closes idle connections and a reused one is never closed under a request.
    pub upstream_idle_timeout: Duration,
}

/// Largest accepted `limits.max_header_count`.
pub const MAX_HEADER_COUNT: usize = 250;

/// Limits on what a client may hold or send. They protect the proxy and the
/// backends from slow or oversized clients; each default is explained in
/// docs/OPERATIONS.md.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From a connection's first request byte to the end of its header.
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive client connection stays open.
    pub keepalive_timeout: Duration,
    /// Longest gap between two reads of a request body; routes may override.
    pub body_read_timeout: Duration,
    /// Longest wait for a client to accept response bytes.
    pub response_write_timeout: Duration,
    /// Request line plus headers, in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Header fields per request; more gets 431.
    pub max_header_count: usize,
    /// Client connections open at once across all listeners.
    pub max_connections: usize,
    /// How long a connection over `max_connections` waits for a slot before
    /// it gets 503.
    pub connection_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(30),
            response_write_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_header_count: 100,
            max_connections: 10_000,
            connection_wait: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    /// Pools in the order the file names them, with their weights.
    pub pools: Vec<(String, u32)>,
    pub plain_http: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub websocket_idle_timeout: Duration,
    /// Extra attempts on another backend after a failed connection.
    pub retries: u32,
    /// Whether idempotent requests are also retried after a failure on a
    /// reused connection.
    pub retry_idempotent: bool,
    pub max_body: Option<u64>,
    /// Longest gap between two reads of a request body on this route.
    pub body_read_timeout: Duration,
}

/// A host pattern a route serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.example.com`, compared case-insensitively.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com`. The suffix is
    /// stored with its leading dot.
    Wildcard(String),
    /// `*`: any host.
    Any,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth weighted round robin; weights default to 1.
    RoundRobin,
    /// Fewest requests in flight relative to weight.
    LeastConnections,
}

#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
    pub health: Option<HealthCheck>,
    /// Outlier detection from live traffic; `None` when disabled.
    pub passive: Option<PassiveHealth>,
}

/// Outlier detection: a backend that fails `consecutive_failures` requests
/// in a row (connection errors or 5xx answers) gets no traffic for an
/// ejection time that doubles with each repeated ejection.
#[derive(Clone, Debug, PartialEq)]
pub struct PassiveHealth {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Share of a pool's backends that may be ejected at once, 0 to 1.
    pub max_ejection_share: f64,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejection_share: 0.5,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub path: String,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Inclusive status ranges that count as a pass.
    pub expected_status: Vec<(u16, u16)>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    pub fn accepts(&self, status: u16) -> bool {
        self.expected_status
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&status))
    }
}

/// An IP network in CIDR notation, such as `10.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

impl Config {
    /// Reads and validates a config file, collecting every error.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigErrors {
            file: path.to_path_buf(),
            errors: vec![ConfigError {
                line: None,
                key: String::new(),
                message: format!("cannot read the config file: {err}"),
            }],
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text; `path` names the file in messages and anchors
    /// relative paths in the config.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        validate::parse(text, path).map_err(|errors| ConfigErrors {
            file: path.to_path_buf(),
            errors,
        })
    }

    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.name == name)
    }

    /// Lists every exact host name that the routes name, for certificates.
    pub fn exact_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .routes
            .iter()
            .flat_map(|route| route.hosts.iter())
            .filter_map(|host| match host {
                HostPattern::Exact(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Formats the one-line summary that `switchyard check` prints.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.values().map(|pool| pool.backends.len()).sum();
        format!(
            "{}: ok: {} route(s), {} pool(s), {} backend(s)",
            self.source.display(),
            self.routes.len(),
            self.pools.len(),
            backends
        )
    }
}
