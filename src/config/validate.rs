//! Turns the raw file into a [`Config`], filling defaults and collecting
//! every error with its key path and line.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawBackend, RawConfig, RawHealth, RawPassive, RawPool, RawRoute};
use super::*;

/// Maximum weight of a pool or backend, so that sums never overflow.
pub const MAX_WEIGHT: u32 = 1_000_000;

const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;

struct Collector<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The key written on the line holding `offset`, with the table above it
    /// (`listeners.threads`), for TOML errors that carry only a position. An
    /// inline table gives its own key (`health` in `health = { … }`).
    fn key_at(&self, offset: usize) -> String {
        let end = offset.min(self.text.len());
        let start = self.text[..end].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("");
        let Some((key, _)) = line.split_once('=') else {
            return String::new();
        };
        let key = key.trim().trim_matches('"');
        let table = self.text[..start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
        match table {
            Some(table) if !table.is_empty() => format!("{table}.{key}"),
            _ => key.to_string(),
        }
    }

    fn error(&mut self, line: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            line,
            key: key.into(),
            message: message.into(),
        });
    }
}

pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut c = Collector {
        text,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            let line = err.span().map(|span| c.line_of(span.start));
            let key = err
                .span()
                .map(|span| c.key_at(span.start))
                .unwrap_or_default();
            // The TOML reader gives some errors (such as `key =` with no
            // value) an empty message; say what is wrong in that case.
            let message = match err.message().trim() {
                "" => "invalid TOML: a value is missing or malformed here".to_string(),
                text => text.to_string(),
            };
            c.error(line, key, message);
            return Err(c.errors);
        }
    };
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();

    let listeners = listeners(&mut c, &raw);
    let admin = admin(&mut c, &raw, &base);
    let tls = tls(&mut c, &raw, &base);
    let acme = acme(&mut c, &raw, &base);
    let log = log(&mut c, &raw);
    let proxy = proxy(&mut c, &raw);
    let limits = limits(&mut c, &raw);

    let mut pools = BTreeMap::new();
    for (name, spanned) in &raw.pools {
        let line = Some(c.line_of(spanned.span().start));
        if let Some(pool) = pool(&mut c, line, name, spanned.get_ref()) {
            pools.insert(name.clone(), pool);
        }
    }

    let mut routes: Vec<Route> = Vec::new();
    let mut names = HashSet::new();
    let mut matchers = HashSet::new();
    for spanned in &raw.routes {
        let line = Some(c.line_of(spanned.span().start));
        let raw_route = spanned.get_ref();
        if !names.insert(raw_route.name.clone()) {
            c.error(
                line,
                format!("route {:?}", raw_route.name),
                "duplicate route name; give each route a unique name",
            );
        }
        let Some(route) = route(&mut c, line, raw_route, &raw.pools, &proxy, &limits) else {
            continue;
        };
        for host in &route.hosts {
            let key = (format!("{host:?}"), route.path_prefix.clone());
            if !matchers.insert(key) {
                c.error(
                    line,
                    format!("route {:?}", route.name),
                    format!(
                        "host {} with path prefix {:?} is already taken by an earlier route; each host and prefix pair may appear once",
                        host_label(host),
                        route.path_prefix
                    ),
                );
            }
        }
        routes.push(route);
    }
    if raw.routes.is_empty() {
        c.error(
            None,
            "routes",
            "no route is defined; add a [[routes]] table",
        );
    }
    if let Some(acme) = &acme {
        if listeners.https.is_none() {
            c.error(
                None,
                "acme",
                "ACME certificates need an HTTPS listener; set listeners.https or remove [acme]",
            );
        }
        if acme.challenge == AcmeChallenge::Http01 && listeners.http.is_none() {
            c.error(None, "acme.challenge", "\"http-01\" is answered on the plain HTTP listener; set listeners.http or use \"tls-alpn-01\"");
        }
    }
    if let Some(metrics) = admin.metrics {
        if Some(metrics) == listeners.http || Some(metrics) == listeners.https {
            c.error(
                None,
                "admin.metrics",
                format!(
                    "{metrics} is also a proxy listener; give the metrics listener its own port"
                ),
            );
        }
    }
    if listeners.https.is_some() && tls.store.as_os_str().is_empty() {
        c.error(
            None,
            "tls.store",
            "an HTTPS listener needs a certificate store directory",
        );
    }

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Config {
        source: path.to_path_buf(),
        listeners,
        admin,
        tls,
        acme,
        log,
        proxy,
        limits,
        routes,
        pools,
    })
}

fn host_label(host: &HostPattern) -> String {
    match host {
        HostPattern::Exact(name) => format!("{name:?}"),
        HostPattern::Wildcard(suffix) => format!("\"*{suffix}\""),
        HostPattern::Any => "\"*\"".to_string(),
    }
}

fn socket_addr(c: &mut Collector, key: &str, value: &str) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.error(
                None,
                key,
                format!("invalid address {value:?}; write IP:PORT, such as \"127.0.0.1:8080\" or \"[::]:443\""),
            );
            None
        }
    }
}

fn relative(base: &Path, value: &str) -> PathBuf {
    let path = PathBuf::from(value);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn listeners(c: &mut Collector, raw: &RawConfig) -> Listeners {
    let l = &raw.listeners;
    let http = l
        .http
        .as_deref()
        .and_then(|v| socket_addr(c, "listeners.http", v));
    let https = l
        .https
        .as_deref()
        .and_then(|v| socket_addr(c, "listeners.https", v));
    if l.http.is_none() && l.https.is_none() {
        c.error(
            None,
            "listeners",
            "no listener is configured; set listeners.http, listeners.https or both",
        );
    }
    if http.is_some() && http == https {
        c.error(
            None,
            "listeners.https",
            "the HTTP and HTTPS listeners need different addresses",
        );
    }
    let plain_http = match l.plain_http.as_deref() {
        None if https.is_some() => PlainHttp::Redirect,
        None => PlainHttp::Proxy,
        Some("redirect") => PlainHttp::Redirect,
        Some("proxy") => PlainHttp::Proxy,
        Some(other) => {
            c.error(
                None,
                "listeners.plain_http",
                format!("invalid value {other:?}; use \"redirect\" or \"proxy\""),
            );
            PlainHttp::Proxy
        }
    };
    if plain_http == PlainHttp::Redirect && https.is_none() && l.plain_http.is_some() {
        c.error(
            None,
            "listeners.plain_http",
            "\"redirect\" needs an HTTPS listener; set listeners.https or use \"proxy\"",
        );
    }
    let threads = l
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > 256 {
        c.error(
            None,
            "listeners.threads",
            format!("invalid thread count {threads}; use 1 to 256"),
        );
    }
    Listeners {
        http,
        https,
        plain_http,
        h2c: l.h2c.unwrap_or(false),
        threads,
        // Pingora sleeps the whole grace period on SIGTERM before it stops its
        // runtimes, so the two together must fit in a container's stop timeout
        // (Docker sends SIGKILL 10 s after SIGTERM by default).
        grace_period: l.grace_period.map_or(Duration::from_secs(5), |d| d.0),
        graceful_shutdown_timeout: l
            .graceful_shutdown_timeout
            .map_or(Duration::from_secs(3), |d| d.0),
        upgrade_socket: PathBuf::from(
            l.upgrade_socket
                .as_deref()
                .unwrap_or("/tmp/switchyard-upgrade.sock"),
        ),
        pid_file: PathBuf::from(l.pid_file.as_deref().unwrap_or("/tmp/switchyard.pid")),
    }
}

fn admin(c: &mut Collector, raw: &RawConfig, base: &Path) -> Admin {
    let a = &raw.admin;
    let socket_mode = match a.socket_mode.as_deref() {
        None => 0o600,
        Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                c.error(
                    None,
                    "admin.socket_mode",
                    format!("invalid file mode {text:?}; write octal digits, such as \"0600\""),
                );
                0o600
            }
        },
    };
    let metrics = match a.metrics.as_deref() {
        Some("off") => None,
        Some(value) => socket_addr(c, "admin.metrics", value),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
    };
    let shift_max_error_rate = a.shift_max_error_rate.unwrap_or(0.05);
    if !(0.0..=1.0).contains(&shift_max_error_rate) {
        c.error(
            None,
            "admin.shift_max_error_rate",
            format!("invalid rate {shift_max_error_rate}; use a fraction from 0 to 1, such as 0.05 for 5 %"),
        );
    }
    Admin {
        socket: a.socket.as_deref().map(|v| relative(base, v)),
        socket_mode,
        metrics,
        state_file: a.state_file.as_deref().map(|v| relative(base, v)),
        shift_max_error_rate,
        shift_max_p99: a.shift_max_p99.map_or(Duration::from_secs(1), |d| d.0),
        shift_min_requests: a.shift_min_requests.unwrap_or(20),
    }
}

fn tls(c: &mut Collector, raw: &RawConfig, base: &Path) -> Tls {
    let t = &raw.tls;
    let reject_unknown_sni = match t.unknown_sni.as_deref() {
        None | Some("default") => false,
        Some("reject") => true,
        Some(other) => {
            c.error(
                None,
                "tls.unknown_sni",
                format!("invalid value {other:?}; use \"default\" or \"reject\""),
            );
            false
        }
    };
    match t.min_version.as_deref() {
        None | Some("1.2") => {}
        // NOTE: Pingora 0.9.1's rustls listener always builds its config
        // with TLS 1.2 and 1.3 enabled and offers no setting to drop 1.2.
        Some("1.3") => c.error(
            None,
            "tls.min_version",
            "\"1.3\" is not supported: the listener always accepts TLS 1.2 and 1.3; remove the key or set \"1.2\"",
        ),
        Some(other) => c.error(
            None,
            "tls.min_version",
            format!("invalid TLS version {other:?}; use \"1.2\""),
        ),
    }
    Tls {
        store: relative(base, t.store.as_deref().unwrap_or("certs")),
        default_certificate: t.default_certificate.clone(),
        reject_unknown_sni,
        hsts: t.hsts.clone(),
        rescan_interval: t.rescan_interval.map_or(Duration::from_secs(5), |d| d.0),
    }
}

fn acme(c: &mut Collector, raw: &RawConfig, base: &Path) -> Option<Acme> {
    let a = raw.acme.as_ref()?;
    if a.enabled == Some(false) {
        return None;
    }
    let challenge = match a.challenge.as_deref() {
        None | Some("http-01") => AcmeChallenge::Http01,
        Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
        Some(other) => {
            c.error(
                None,
                "acme.challenge",
                format!("invalid challenge {other:?}; use \"http-01\" or \"tls-alpn-01\""),
            );
            AcmeChallenge::Http01
        }
    };
    let key_type = a
        .key_type
        .clone()
        .unwrap_or_else(|| "ecdsa-p256".to_string());
    if !matches!(key_type.as_str(), "ecdsa-p256" | "ecdsa-p384") {
        c.error(
            None,
            "acme.key_type",
            format!("invalid key type {key_type:?}; use \"ecdsa-p256\" or \"ecdsa-p384\""),
        );
    }
    let fraction = a.renew_remaining_fraction.unwrap_or(1.0 / 3.0);
    if !(fraction > 0.0 && fraction < 1.0) {
        c.error(
            None,
            "acme.renew_remaining_fraction",
            format!("invalid fraction {fraction}; use a number between 0 and 1, such as 0.33"),
        );
    }
    Some(Acme {
        directory: a
            .directory
            .clone()
            .unwrap_or_else(|| "https://acme-v02.api.letsencrypt.org/directory".to_string()),
        contact: a.contact.clone(),
        challenge,
        ca_roots: a.ca_roots.iter().map(|p| relative(base, p)).collect(),
        key_type,
        renew_remaining_fraction: fraction,
    })
}

fn log(c: &mut Collector, raw: &RawConfig) -> Log {
    let l = &raw.log;
    let json = match l.format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            c.error(
                None,
                "log.format",
                format!("invalid log format {other:?}; use \"text\" or \"json\""),
            );
            false
        }
    };
    let level = l.level.clone().unwrap_or_else(|| "info".to_string());
    // A misspelt level such as "debgu" would parse as a target name and
    // silence every other log line, so only known level names pass.
    let known = ["trace", "debug", "info", "warn", "error", "off"];
    let directives_valid = level.split(',').all(|directive| {
        let level_part = directive.rsplit('=').next().unwrap_or("").trim();
        known.contains(&level_part.to_ascii_lowercase().as_str())
    });
    if !directives_valid {
        c.error(
            None,
            "log.level",
            format!("invalid log level {level:?}; use trace, debug, info, warn, error or off, optionally per target such as \"info,switchyard::access=off\""),
        );
    }
    Log {
        level,
        json,
        access_log: l.access_log.unwrap_or(true),
        log_query: l.log_query.unwrap_or(false),
    }
}

fn proxy(c: &mut Collector, raw: &RawConfig) -> ProxySettings {
    let p = &raw.proxy;
    let mut trusted_proxies = Vec::new();
    for (i, value) in p.trusted_proxies.iter().enumerate() {
        match parse_ip_net(value) {
            Some(net) => trusted_proxies.push(net),
            None => c.error(
                None,
                format!("proxy.trusted_proxies[{i}]"),
                format!("invalid network {value:?}; write an IP address or CIDR, such as \"10.0.0.0/8\""),
            ),
        }
    }
    ProxySettings {
        trusted_proxies,
        no_backend_wait: p.no_backend_wait.map_or(Duration::from_secs(3), |d| d.0),
        startup_wait: p.startup_wait.map_or(Duration::from_secs(5), |d| d.0),
        connect_timeout: p.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
        read_timeout: p.read_timeout.map_or(Duration::from_secs(60), |d| d.0),
        write_timeout: p.write_timeout.map_or(Duration::from_secs(60), |d| d.0),
        upstream_idle_timeout: p
            .upstream_idle_timeout
            .map_or(Duration::from_secs(4), |d| d.0),
    }
}

fn limits(c: &mut Collector, raw: &RawConfig) -> Limits {
    let l = &raw.limits;
    let defaults = Limits::default();
    let mut positive = |key: &str, value: Option<Duration>, default: Duration| -> Duration {
        match value {
            None => default,
            Some(d) if d.is_zero() => {
                c.error(
                    None,
                    format!("limits.{key}"),
                    "a zero timeout would cut every connection; use a duration above 0, such as \"10s\"",
                );
                default
            }
            Some(d) => d,
        }
    };
    let header_read_timeout = positive(
        "header_read_timeout",
        l.header_read_timeout.map(|d| d.0),
        defaults.header_read_timeout,
    );
    let keepalive_timeout = positive(
        "keepalive_timeout",
        l.keepalive_timeout.map(|d| d.0),
        defaults.keepalive_timeout,
    );
    let body_read_timeout = positive(
        "body_read_timeout",
        l.body_read_timeout.map(|d| d.0),
        defaults.body_read_timeout,
    );
    let response_write_timeout = positive(
        "response_write_timeout",
        l.response_write_timeout.map(|d| d.0),
        defaults.response_write_timeout,
    );
    let max_header_bytes = match l.max_header_bytes.as_deref() {
        None => defaults.max_header_bytes,
        Some(text) => match parse_size(text) {
            Some(size) if (1024..=1024 * 1024).contains(&size) => size as usize,
            _ => {
                c.error(
                    None,
                    "limits.max_header_bytes",
                    format!("invalid size {text:?}; use 1KiB to 1MiB, such as \"32KiB\""),
                );
                defaults.max_header_bytes
            }
        },
    };
    let mut count = |key: &str,
                     value: Option<i64>,
                     range: std::ops::RangeInclusive<i64>,
                     default: usize|
     -> usize {
        match value {
            None => default,
            Some(v) if range.contains(&v) => v as usize,
            Some(v) => {
                c.error(
                    None,
                    format!("limits.{key}"),
                    format!(
                        "invalid value {v}; use {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    };
    // 250 stays below the 256 header fields Pingora's parser accepts, so
    // the proxy returns 431 itself instead of Pingora returning 400.
    let max_header_count = count(
        "max_header_count",
        l.max_header_count,
        1..=MAX_HEADER_COUNT as i64,
        defaults.max_header_count,
    );
    let max_connections = count(
        "max_connections",
        l.max_connections,
        1..=1_000_000,
        defaults.max_connections,
    );
    Limits {
        header_read_timeout,
        keepalive_timeout,
        body_read_timeout,
        response_write_timeout,
        max_header_bytes,
        max_header_count,
        max_connections,
        connection_wait: l.connection_wait.map_or(defaults.connection_wait, |d| d.0),
    }
}

pub fn parse_ip_net(value: &str) -> Option<IpNet> {
    let (addr, prefix) = match value.split_once('/') {
        Some((addr, prefix)) => (
            addr.parse::<IpAddr>().ok()?,
            Some(prefix.parse::<u8>().ok()?),
        ),
        None => (value.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max).then_some(IpNet { addr, prefix })
}

/// Parses a byte size such as `"512"`, `"64KiB"`, `"10MiB"` or `"1GB"`.
pub fn parse_size(value: &str) -> Option<u64> {
    let value = value.trim();
    let split = value
        .find(|ch: char| !ch.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" => 1024,
        "M" | "MB" | "MiB" | "m" => 1024 * 1024,
        "G" | "GB" | "GiB" | "g" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

fn host_pattern(value: &str) -> Result<HostPattern, String> {
    let raw = value.trim().to_ascii_lowercase();
    if raw == "*" {
        return Ok(HostPattern::Any);
    }
    let host = raw.strip_suffix('.').unwrap_or(&raw);
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, host.to_string()),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(format!(
            "invalid host {value:?}; write a DNS name such as \"api.example.com\", a wildcard such as \"*.example.com\", or \"*\""
        ));
    }
    Ok(if wildcard {
        HostPattern::Wildcard(format!(".{name}"))
    } else {
        HostPattern::Exact(name)
    })
}

fn route(
    c: &mut Collector,
    line: Option<usize>,
    raw: &RawRoute,
    raw_pools: &BTreeMap<String, toml::Spanned<RawPool>>,
    proxy: &ProxySettings,
    limits: &Limits,
) -> Option<Route> {
    let key = format!("route {:?}", raw.name);
    let before = c.errors.len();
    if raw.name.trim().is_empty() {
        c.error(line, "route", "a route needs a non-empty name");
    }
    let mut hosts = Vec::new();
    if raw.hosts.is_empty() {
        c.error(
            line,
            &key,
            "no hosts; set hosts = [\"api.example.com\"] or [\"*\"] for any host",
        );
    }
    for host in &raw.hosts {
        match host_pattern(host) {
            Ok(pattern) => hosts.push(pattern),
            Err(message) => c.error(line, &key, message),
        }
    }
    let path_prefix = raw.path_prefix.clone().unwrap_or_else(|| "/".to_string());
    if !path_prefix.starts_with('/') {
        c.error(
            line,
            &key,
            format!("invalid path_prefix {path_prefix:?}; it must start with \"/\""),
        );
    }
    let mut pools = Vec::new();
    if raw.pools.is_empty() {
        c.error(
            line,
            &key,
            "no pools; set pools = { blue = 100, green = 0 }",
        );
    }
    for (pool, weight) in &raw.pools {
        if !raw_pools.contains_key(pool) {
            c.error(
                line,
                &key,
                format!("pool {pool:?} is not defined; add a [pools.{pool}] table or fix the name"),
            );
        }
        match u32::try_from(*weight) {
            Ok(w) if w <= MAX_WEIGHT => pools.push((pool.clone(), w)),
            _ => c.error(
                line,
                format!("{key}: pool {pool:?}"),
                format!("invalid weight {weight}; use an integer from 0 to {MAX_WEIGHT}"),
            ),
        }
    }
    if !raw.pools.is_empty() && raw.pools.values().all(|w| *w == 0) {
        c.error(line, &key, "every pool has weight 0, so the route could serve nothing; give at least one pool a weight above 0");
    }
    let max_body = match raw.max_body.as_deref() {
        None => Some(DEFAULT_MAX_BODY),
        Some("unlimited") => None,
        Some(text) => match parse_size(text) {
            Some(size) => Some(size),
            None => {
                c.error(line, format!("{key}: max_body"), format!("invalid size {text:?}; write bytes with a unit, such as \"10MiB\", or \"unlimited\""));
                None
            }
        },
    };
    let body_read_timeout = raw
        .body_read_timeout
        .map_or(limits.body_read_timeout, |d| d.0);
    if body_read_timeout.is_zero() {
        c.error(
            line,
            format!("{key}: body_read_timeout"),
            "a zero timeout would cut every request body; use a duration above 0, such as \"30s\"",
        );
    }
    let retries = raw.retries.unwrap_or(1);
    if retries > 5 {
        c.error(
            line,
            format!("{key}: retries"),
            format!("invalid retry count {retries}; use 0 to 5"),
        );
    }
    if c.errors.len() > before {
        return None;
    }
    Some(Route {
        name: raw.name.clone(),
        hosts,
        path_prefix,
        pools,
        plain_http: raw.plain_http.unwrap_or(false),
        connect_timeout: raw.connect_timeout.map_or(proxy.connect_timeout, |d| d.0),
        read_timeout: raw.read_timeout.map_or(proxy.read_timeout, |d| d.0),
        websocket_idle_timeout: raw
            .websocket_idle_timeout
            .map_or(Duration::from_secs(300), |d| d.0),
        retries,
        retry_idempotent: raw.retry_idempotent.unwrap_or(true),
        max_body,
        body_read_timeout,
    })
}

fn pool(c: &mut Collector, line: Option<usize>, name: &str, raw: &RawPool) -> Option<Pool> {
    let key = format!("pool {name:?}");
    let before = c.errors.len();
    let algorithm = match raw.algorithm.as_deref() {
        None | Some("round_robin") | Some("weighted") => Algorithm::RoundRobin,
        Some("least_conn") | Some("least_connections") => Algorithm::LeastConnections,
        Some(other) => {
            c.error(line, format!("{key}: algorithm"), format!("invalid algorithm {other:?}; use \"round_robin\", \"weighted\" or \"least_conn\""));
            Algorithm::RoundRobin
        }
    };
    if raw.backends.is_empty() {
        c.error(
            line,
            &key,
            "no backends; add backends = [\"127.0.0.1:8000\"]",
        );
    }
    let mut backends: Vec<Backend> = Vec::new();
    for (i, backend) in raw.backends.iter().enumerate() {
        let (address, weight) = match backend {
            RawBackend::Address(address) => (address.as_str(), 1),
            RawBackend::Table(table) => (table.address.as_str(), table.weight.unwrap_or(1)),
        };
        let backend_key = format!("{key}: backend {address:?}");
        let Some(addr) = resolve(address) else {
            c.error(
                line,
                &backend_key,
                "invalid or unresolvable address; write HOST:PORT, such as \"127.0.0.1:8000\"",
            );
            continue;
        };
        let weight = match u32::try_from(weight) {
            Ok(w) if w <= MAX_WEIGHT => w,
            _ => {
                c.error(
                    line,
                    &backend_key,
                    format!("invalid weight {weight}; use an integer from 0 to {MAX_WEIGHT}"),
                );
                continue;
            }
        };
        if backends.iter().any(|b| b.address == addr) {
            c.error(
                line,
                &backend_key,
                format!(
                    "duplicate backend (entry {}); list each address once",
                    i + 1
                ),
            );
            continue;
        }
        backends.push(Backend {
            address: addr,
            weight,
        });
    }
    let health = raw.health.as_ref().and_then(|h| health(c, line, &key, h));
    let passive = passive(c, line, &key, raw.passive.as_ref());
    if c.errors.len() > before {
        return None;
    }
    Some(Pool {
        name: name.to_string(),
        algorithm,
        backends,
        health,
        passive,
    })
}

fn resolve(address: &str) -> Option<SocketAddr> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some(addr);
    }
    // Names are resolved once, at load time, like nginx does without a resolver.
    address.to_socket_addrs().ok()?.next()
}

fn health(
    c: &mut Collector,
    line: Option<usize>,
    pool_key: &str,
    raw: &RawHealth,
) -> Option<HealthCheck> {
    let key = format!("{pool_key}: health");
    let before = c.errors.len();
    let path = raw.path.clone().unwrap_or_else(|| "/health".to_string());
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        c.error(
            line,
            format!("{key}.path"),
            format!("invalid path {path:?}; it must start with \"/\" and contain no spaces"),
        );
    }
    let interval = raw.interval.map_or(Duration::from_secs(2), |d| d.0);
    let timeout = raw.timeout.map_or(Duration::from_secs(1), |d| d.0);
    if interval < Duration::from_millis(100) {
        c.error(
            line,
            format!("{key}.interval"),
            "interval below 100ms; use at least \"100ms\"",
        );
    }
    if timeout.is_zero() || timeout > interval {
        c.error(
            line,
            format!("{key}.timeout"),
            "timeout must be above 0 and at most the interval",
        );
    }
    let mut expected_status = Vec::new();
    match &raw.expected_status {
        None => expected_status.push((200, 299)),
        Some(values) => {
            for value in values {
                match status_range(value) {
                    Some(range) => expected_status.push(range),
                    None => c.error(
                        line,
                        format!("{key}.expected_status"),
                        format!("invalid status {value}; write a code such as 200 or a range such as \"200-299\""),
                    ),
                }
            }
            if values.is_empty() {
                c.error(
                    line,
                    format!("{key}.expected_status"),
                    "empty list; list at least one status",
                );
            }
        }
    }
    let mut threshold = |name: &str, value: Option<i64>, default: u32| -> u32 {
        match value {
            None => default,
            Some(v) if (1..=100).contains(&v) => v as u32,
            Some(v) => {
                c.error(
                    line,
                    format!("{key}.{name}"),
                    format!("invalid threshold {v}; use 1 to 100"),
                );
                default
            }
        }
    };
    let healthy_threshold = threshold("healthy_threshold", raw.healthy_threshold, 2);
    let unhealthy_threshold = threshold("unhealthy_threshold", raw.unhealthy_threshold, 3);
    if c.errors.len() > before {
        return None;
    }
    Some(HealthCheck {
        path,
        host: raw.host.clone(),
        interval,
        timeout,
        expected_status,
        healthy_threshold,
        unhealthy_threshold,
    })
}

fn passive(
    c: &mut Collector,
    line: Option<usize>,
    pool_key: &str,
    raw: Option<&RawPassive>,
) -> Option<PassiveHealth> {
    let defaults = PassiveHealth::default();
    let Some(raw) = raw else {
        return Some(defaults);
    };
    let key = format!("{pool_key}: passive");
    let consecutive_failures = match raw.consecutive_failures {
        None => defaults.consecutive_failures,
        Some(v) if (1..=1000).contains(&v) => v as u32,
        Some(v) => {
            c.error(
                line,
                format!("{key}.consecutive_failures"),
                format!("invalid count {v}; use 1 to 1000"),
            );
            defaults.consecutive_failures
        }
    };
    let base_ejection = raw.base_ejection.map_or(defaults.base_ejection, |d| d.0);
    let max_ejection = raw
        .max_ejection
        .map_or(defaults.max_ejection.max(base_ejection), |d| d.0);
    if base_ejection < Duration::from_millis(100) {
        c.error(
            line,
            format!("{key}.base_ejection"),
            "ejection below 100ms; use at least \"100ms\", such as \"10s\"",
        );
    }
    if max_ejection < base_ejection {
        c.error(
            line,
            format!("{key}.max_ejection"),
            "max_ejection is below base_ejection; set it to at least the base",
        );
    }
    let max_ejection_share = raw
        .max_ejection_share
        .unwrap_or(defaults.max_ejection_share);
    if !(0.0..=1.0).contains(&max_ejection_share) {
        c.error(
            line,
            format!("{key}.max_ejection_share"),
            format!("invalid share {max_ejection_share}; use a number from 0 to 1, such as 0.5"),
        );
    }
    if raw.enabled == Some(false) {
        return None;
    }
    Some(PassiveHealth {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejection_share,
    })
}

fn status_range(value: &toml::Value) -> Option<(u16, u16)> {
    let (low, high) = match value {
        toml::Value::Integer(code) => (*code, *code),
        toml::Value::String(text) => match text.split_once('-') {
            Some((low, high)) => (low.trim().parse().ok()?, high.trim().parse().ok()?),
            None => {
                let code = text.trim().parse().ok()?;
                (code, code)
            }
        },
        _ => return None,
    };
    let valid = (100..=599).contains(&low) && (100..=599).contains(&high) && low <= high;
    valid.then_some((low as u16, high as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_error_always_has_a_message() {
        let errors = parse("A=", Path::new("/x.toml")).unwrap_err();
        assert!(errors.iter().all(|e| !e.message.is_empty()), "{errors:?}");
    }

    #[test]
    fn type_error_names_its_key() {
        let text = "[listeners]\nhttp = \"127.0.0.1:8080\"\nthreads = \"2\"\n";
        let errors = parse(text, Path::new("/x.toml")).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "listeners.threads");
        assert_eq!(errors[0].line, Some(3));
    }

    #[test]
    fn size_units() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("10MiB"), Some(10 * 1024 * 1024));
        assert_eq!(parse_size("10 parsecs"), None);
    }

    #[test]
    fn ip_net_contains() {
        let net = parse_ip_net("10.0.0.0/8").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let single = parse_ip_net("127.0.0.1").unwrap();
        assert!(single.contains("127.0.0.1".parse().unwrap()));
        assert!(!single.contains("127.0.0.2".parse().unwrap()));
        assert!(parse_ip_net("10.0.0.0/33").is_none());
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            host_pattern("API.Example.com."),
            Ok(HostPattern::Exact("api.example.com".into()))
        );
        assert_eq!(
            host_pattern("*.example.com"),
            Ok(HostPattern::Wildcard(".example.com".into()))
        );
        assert_eq!(host_pattern("*"), Ok(HostPattern::Any));
        assert!(host_pattern("a b.com").is_err());
        assert!(host_pattern("*.").is_err());
    }
}
