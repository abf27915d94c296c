//! Active HTTP health checks and the registry of backend health.
//!
//! Health lives outside the config snapshot, keyed by backend address and
//! check settings, so that a config swap which keeps a backend keeps its
//! health and its in-flight count. Each checked backend has one probe task.
//!
//! State rules:
//! - At process start every checked backend is `Pending`; its first probe
//!   decides directly, and requests wait (bounded) for that first round
//!   instead of returning 503 for a backend that is about to pass.
//! - A backend that first appears in a later config starts `Unhealthy` and
//!   needs `healthy_threshold` passes in a row.
//! - A backend whose address stays but whose check changes in a later config
//!   gets a new entry that starts from the old entry's state (see
//!   [`HealthRegistry::entry`]) and is then probed with the new check.
//! - A healthy backend turns unhealthy after `unhealthy_threshold` failures
//!   in a row, and back after `healthy_threshold` passes in a row.
//! - A backend of a pool without a health check is always healthy.
//!
//! Passive health (outlier detection) sits on top: live requests report
//! connection errors and 5xx answers, and a backend that fails too many in a
//! row is ejected for a while (see [`BackendHealth::report`]). An ejected
//! backend is not available even when its active checks pass; it returns when
//! its ejection ends, and only if its active state is still healthy.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{HealthCheck, PassiveHealth};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthState {
    /// Not probed yet at process start.
    Pending,
    Healthy,
    Unhealthy,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Pending => "pending",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }

    fn from_u8(value: u8) -> HealthState {
        match value {
            0 => HealthState::Pending,
            1 => HealthState::Healthy,
            _ => HealthState::Unhealthy,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            HealthState::Pending => 0,
            HealthState::Healthy => 1,
            HealthState::Unhealthy => 2,
        }
    }
}

/// Live state of one backend under one health check.
#[derive(Debug)]
pub struct BackendHealth {
    pub address: SocketAddr,
    state: AtomicU8,
    passes: AtomicU32,
    failures: AtomicU32,
    /// Shared with the entry this one was carried over from, so requests
    /// started under the old check still count while they finish.
    in_flight: Arc<AtomicUsize>,
    last_error: Mutex<Option<String>>,
    outlier: Mutex<Outlier>,
}

/// Passive health bookkeeping of one backend.
#[derive(Clone, Debug, Default)]
struct Outlier {
    /// Live requests that failed in a row.
    consecutive_failures: u32,
    /// Set while ejected.
    ejected_until: Option<Instant>,
    /// Ejections in the current series; each one doubles the ejection time.
    ejections: u32,
    /// When the last ejection ended, to restart the series after a calm period.
    last_ejection_end: Option<Instant>,
}

/// What one live request taught about its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A connection error, a timeout, or a 5xx response.
    Failure,
}

/// The result of reporting a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// Nothing changed, or the threshold is not reached yet.
    None,
    /// The backend is ejected for this long.
    Ejected(Duration),
    /// The threshold was reached but the pool's ejection cap held it back;
    /// `first` on the failure that reached it, so the caller can log the
    /// streak once rather than on every failure that follows.
    Capped { first: bool },
}

impl BackendHealth {
    fn new(address: SocketAddr, state: HealthState) -> BackendHealth {
        BackendHealth {
            address,
            state: AtomicU8::new(state.to_u8()),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            in_flight: Arc::new(AtomicUsize::new(0)),
            last_error: Mutex::new(None),
            outlier: Mutex::new(Outlier::default()),
        }
    }

    /// Creates the entry of the same backend under a new check, starting
    /// from `old`: its state, pass and failure counts, last error and
    /// ejection. The in-flight count is shared with `old`. A backend
    /// without a check (`checked` false) is always healthy instead.
    fn carried_over(old: &BackendHealth, checked: bool) -> BackendHealth {
        let state = if checked {
            old.state()
        } else {
            HealthState::Healthy
        };
        BackendHealth {
            address: old.address,
            state: AtomicU8::new(state.to_u8()),
            passes: AtomicU32::new(old.passes.load(Ordering::Relaxed)),
            failures: AtomicU32::new(old.failures.load(Ordering::Relaxed)),
            in_flight: Arc::clone(&old.in_flight),
            last_error: Mutex::new(old.last_error()),
            outlier: Mutex::new(
                old.outlier
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            ),
        }
    }

    /// Whether passive health has ejected this backend right now.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until().is_some()
    }

    /// The end of the current ejection, if the backend is ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        let outlier = self.outlier.lock().unwrap_or_else(|e| e.into_inner());
        outlier
            .ejected_until
            .filter(|until| *until > Instant::now())
    }

    /// Records the outcome of a live request. `may_eject` is asked only when
    /// this failure reaches the threshold; it enforces the pool's cap and
    /// must not lock this backend. Returns what happened.
    pub fn report(
        &self,
        outcome: Outcome,
        passive: &PassiveHealth,
        may_eject: impl FnOnce() -> bool,
    ) -> Ejection {
        let now = Instant::now();
        let mut outlier = self.outlier.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = outlier.ejected_until {
            if until <= now {
                outlier.ejected_until = None;
                outlier.last_ejection_end = Some(until);
            }
        }
        match outcome {
            Outcome::Success => {
                outlier.consecutive_failures = 0;
                Ejection::None
            }
            Outcome::Failure => {
                if outlier.ejected_until.is_some() {
                    // Requests that were already in flight when it was ejected.
                    return Ejection::None;
                }
                outlier.consecutive_failures += 1;
                if outlier.consecutive_failures < passive.consecutive_failures {
                    return Ejection::None;
                }
                // Release our lock while the pool counts its ejected backends.
                drop(outlier);
                let allowed = may_eject();
                let mut outlier = self.outlier.lock().unwrap_or_else(|e| e.into_inner());
                if !allowed {
                    return Ejection::Capped {
                        first: outlier.consecutive_failures == passive.consecutive_failures,
                    };
                }
                if outlier.ejected_until.is_some_and(|until| until > now) {
                    return Ejection::None;
                }
                // A backend that stayed in for a whole maximum ejection time
                // starts a new series at the base time.
                if outlier
                    .last_ejection_end
                    .is_some_and(|end| now.duration_since(end) > passive.max_ejection)
                {
                    outlier.ejections = 0;
                }
                let factor = 1u32
                    .checked_shl(outlier.ejections.min(16))
                    .unwrap_or(u32::MAX);
                let duration = passive
                    .base_ejection
                    .saturating_mul(factor)
                    .min(passive.max_ejection);
                outlier.ejections = outlier.ejections.saturating_add(1);
                outlier.consecutive_failures = 0;
                outlier.ejected_until = Some(now + duration);
                Ejection::Ejected(duration)
            }
        }
    }

    pub fn state(&self) -> HealthState {
        HealthState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether new requests may go to this backend: healthy by its active
    /// checks and not ejected by passive health.
    pub fn is_healthy(&self) -> bool {
        self.state() == HealthState::Healthy && !self.is_ejected()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            backend: Arc::clone(self),
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies one probe result; returns the new state when it changed.
    fn observe(&self, passed: bool, check: &HealthCheck) -> Option<HealthState> {
        let current = self.state();
        let next = if passed {
            self.failures.store(0, Ordering::Relaxed);
            let passes = self.passes.fetch_add(1, Ordering::Relaxed) + 1;
            match current {
                HealthState::Pending => HealthState::Healthy,
                HealthState::Unhealthy if passes >= check.healthy_threshold => HealthState::Healthy,
                other => other,
            }
        } else {
            self.passes.store(0, Ordering::Relaxed);
            let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            match current {
                HealthState::Pending => HealthState::Unhealthy,
                HealthState::Healthy if failures >= check.unhealthy_threshold => {
                    HealthState::Unhealthy
                }
                other => other,
            }
        };
        if next == current {
            return None;
        }
        self.state.store(next.to_u8(), Ordering::Release);
        Some(next)
    }
}

/// Decrements a backend's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    backend: Arc<BackendHealth>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthKey {
    pub address: SocketAddr,
    pub check: Option<HealthCheck>,
}

struct Entry {
    health: Arc<BackendHealth>,
    probe: Option<JoinHandle<()>>,
}

/// Every backend's health, shared by all config generations.
pub struct HealthRegistry {
    entries: Mutex<HashMap<HealthKey, Entry>>,
    /// Set once the process's first config is in place: backends seen after
    /// that start unhealthy instead of pending.
    started: AtomicBool,
    runtime: Mutex<Option<tokio::runtime::Handle>>,
    changed: Notify,
}

impl Default for HealthRegistry {
    fn default() -> Self {
        HealthRegistry::new()
    }
}

impl HealthRegistry {
    pub fn new() -> HealthRegistry {
        HealthRegistry {
            entries: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
            runtime: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// Returns the health of a backend under a check, creating it if new.
    ///
    /// A new key whose address already has an entry under another check
    /// (a reload changed the pool's check) starts from that entry, or from
    /// the least healthy one when there are several. A checked address seen
    /// for the first time starts `Pending` before [`Self::mark_started`]
    /// and `Unhealthy` after it.
    pub fn entry(&self, key: &HealthKey) -> Arc<BackendHealth> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get(key) {
            return Arc::clone(&entry.health);
        }
        let previous = entries
            .iter()
            .filter(|(other, _)| other.address == key.address)
            .map(|(_, entry)| &entry.health)
            .max_by_key(|health| match health.state() {
                HealthState::Healthy => 0,
                HealthState::Pending => 1,
                HealthState::Unhealthy => 2,
            });
        let health = match previous {
            Some(previous) => BackendHealth::carried_over(previous, key.check.is_some()),
            None => {
                let state = match (&key.check, self.started.load(Ordering::Acquire)) {
                    (None, _) => HealthState::Healthy,
                    (Some(_), false) => HealthState::Pending,
                    (Some(_), true) => HealthState::Unhealthy,
                };
                BackendHealth::new(key.address, state)
            }
        };
        let health = Arc::new(health);
        entries.insert(
            key.clone(),
            Entry {
                health: Arc::clone(&health),
                probe: None,
            },
        );
        health
    }

    /// Marks the end of process start-up: backends added from now on start
    /// unhealthy until they pass their checks.
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Starts the probe tasks on `runtime`, now and for later entries.
    pub fn start_probes(self: &Arc<Self>, runtime: tokio::runtime::Handle) {
        *self.runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime);
        self.spawn_missing_probes();
    }

    /// Drops entries that `in_use` no longer lists and starts probes for new
    /// ones. Called after each config swap.
    pub fn retain(self: &Arc<Self>, in_use: &HashSet<HealthKey>) {
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.retain(|key, entry| {
                let keep = in_use.contains(key);
                if !keep {
                    if let Some(probe) = entry.probe.take() {
                        probe.abort();
                    }
                }
                keep
            });
        }
        self.spawn_missing_probes();
    }

    fn spawn_missing_probes(self: &Arc<Self>) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(runtime) = runtime else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (key, entry) in entries.iter_mut() {
            let Some(check) = key.check.clone() else {
                continue;
            };
            if entry.probe.is_none() {
                let registry = Arc::clone(self);
                let health = Arc::clone(&entry.health);
                entry.probe = Some(runtime.spawn(async move {
                    registry.probe_loop(health, check).await;
                }));
            }
        }
    }

    /// Waits until some backend's health changes, or `timeout` passes.
    pub async fn wait_for_change(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    async fn probe_loop(&self, health: Arc<BackendHealth>, check: HealthCheck) {
        let mut ticker = tokio::time::interval(check.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let result = probe(health.address, &check).await;
            let passed = match &result {
                Ok(status) if check.accepts(*status) => None,
                Ok(status) => Some(format!("status {status} is not in the expected list")),
                Err(err) => Some(err.clone()),
            };
            *health.last_error.lock().unwrap_or_else(|e| e.into_inner()) = passed.clone();
            if let Some(state) = health.observe(passed.is_none(), &check) {
                match (state, &passed) {
                    (HealthState::Healthy, _) => tracing::info!(
                        backend = %health.address,
                        path = %check.path,
                        "backend is healthy"
                    ),
                    (_, reason) => tracing::warn!(
                        backend = %health.address,
                        path = %check.path,
                        reason = reason.as_deref().unwrap_or(""),
                        "backend is unhealthy"
                    ),
                }
                self.changed.notify_waiters();
            }
        }
    }
}

/// Sends one `GET` to the backend and returns the response status.
/// Redirects are not followed: a 3xx is a status like any other.
async fn probe(address: SocketAddr, check: &HealthCheck) -> Result<u16, String> {
    let attempt = async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|err| format!("connect failed: {err}"))?;
        let host = check.host.clone().unwrap_or_else(|| address.to_string());
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: switchyard-health-check\r\nConnection: close\r\n\r\n",
            check.path
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| format!("write failed: {err}"))?;
        let mut buffer = [0u8; 64];
        let mut filled = 0;
        // The status line "HTTP/1.1 200" fits in 12 bytes.
        while filled < 12 {
            let n = stream
                .read(&mut buffer[filled..])
                .await
                .map_err(|err| format!("read failed: {err}"))?;
            if n == 0 {
                return Err("connection closed before a status line".to_string());
            }
            filled += n;
        }
        parse_status_line(&buffer[..filled])
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "timed out after {}",
            crate::config::format_duration(check.timeout)
        )),
    }
}

fn parse_status_line(bytes: &[u8]) -> Result<u16, String> {
    let valid_prefix = bytes.starts_with(b"HTTP/1.1 ") || bytes.starts_with(b"HTTP/1.0 ");
    let code = bytes
        .get(9..12)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<u16>().ok());
    match (valid_prefix, code) {
        (true, Some(code)) if (100..=599).contains(&code) => Ok(code),
        _ => Err("the response is not HTTP/1.x".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> HealthCheck {
        HealthCheck {
            path: "/health".into(),
            host: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            expected_status: vec![(200, 299)],
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    #[test]
    fn thresholds() {
        let h = BackendHealth::new("127.0.0.1:1".parse().unwrap(), HealthState::Pending);
        let c = check();
        assert_eq!(h.observe(true, &c), Some(HealthState::Healthy));
        assert_eq!(h.observe(false, &c), None);
        assert_eq!(h.observe(false, &c), None);
        assert_eq!(h.observe(false, &c), Some(HealthState::Unhealthy));
        assert_eq!(h.observe(true, &c), None);
        assert_eq!(h.observe(false, &c), None);
        assert_eq!(h.observe(true, &c), None);
        assert_eq!(h.observe(true, &c), Some(HealthState::Healthy));
    }

    #[test]
    fn pending_failure_is_unhealthy_at_once() {
        let h = BackendHealth::new("127.0.0.1:1".parse().unwrap(), HealthState::Pending);
        assert_eq!(h.observe(false, &check()), Some(HealthState::Unhealthy));
    }

    fn passive() -> PassiveHealth {
        PassiveHealth {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
            max_ejection_share: 0.5,
        }
    }

    #[test]
    fn ejection_after_consecutive_failures() {
        let h = BackendHealth::new("127.0.0.1:1".parse().unwrap(), HealthState::Healthy);
        let p = passive();
        assert_eq!(h.report(Outcome::Failure, &p, || true), Ejection::None);
        assert_eq!(h.report(Outcome::Failure, &p, || true), Ejection::None);
        assert_eq!(h.report(Outcome::Success, &p, || true), Ejection::None);
        assert_eq!(h.report(Outcome::Failure, &p, || true), Ejection::None);
        assert_eq!(h.report(Outcome::Failure, &p, || true), Ejection::None);
        assert!(h.is_healthy());
        assert_eq!(
            h.report(Outcome::Failure, &p, || true),
            Ejection::Ejected(Duration::from_secs(10))
        );
        assert!(h.is_ejected() && !h.is_healthy());
        // Late failures of requests already in flight do not extend it.
        assert_eq!(h.report(Outcome::Failure, &p, || true), Ejection::None);
    }

    #[test]
    fn ejection_time_doubles_up_to_the_cap() {
        let h = BackendHealth::new("127.0.0.1:1".parse().unwrap(), HealthState::Healthy);
        let p = passive();
        let mut seen = Vec::new();
        for _ in 0..4 {
            // End the ejection by hand, as if its time had passed.
            h.outlier.lock().unwrap().ejected_until = Some(Instant::now());
            for _ in 0..3 {
                if let Ejection::Ejected(d) = h.report(Outcome::Failure, &p, || true) {
                    seen.push(d.as_secs());
                }
            }
        }
        assert_eq!(seen, vec![10, 20, 35, 35]);
    }

    #[test]
    fn cap_holds_ejection_back() {
        let h = BackendHealth::new("127.0.0.1:1".parse().unwrap(), HealthState::Healthy);
        let p = passive();
        for _ in 0..2 {
            h.report(Outcome::Failure, &p, || false);
        }
        assert_eq!(
            h.report(Outcome::Failure, &p, || false),
            Ejection::Capped { first: true }
        );
        assert_eq!(
            h.report(Outcome::Failure, &p, || false),
            Ejection::Capped { first: false }
        );
        assert!(h.is_healthy());
    }

    #[test]
    fn changed_check_carries_state_over() {
        let registry = HealthRegistry::new();
        registry.mark_started();
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let before = registry.entry(&HealthKey {
            address,
            check: Some(check()),
        });
        // A backend added after start needs healthy_threshold (2) passes.
        assert_eq!(before.observe(true, &check()), None);
        assert_eq!(before.observe(true, &check()), Some(HealthState::Healthy));
        let _in_flight = before.begin_request();

        let slower = HealthCheck {
            interval: Duration::from_secs(5),
            ..check()
        };
        let after = registry.entry(&HealthKey {
            address,
            check: Some(slower),
        });
        assert!(!Arc::ptr_eq(&before, &after));
        assert_eq!(after.state(), HealthState::Healthy);
        assert_eq!(after.in_flight(), 1);

        let newcomer = registry.entry(&HealthKey {
            address: "127.0.0.1:2".parse().unwrap(),
            check: Some(check()),
        });
        assert_eq!(newcomer.state(), HealthState::Unhealthy);
    }

    #[test]
    fn changed_check_keeps_unhealthy_backend_out() {
        let registry = HealthRegistry::new();
        registry.mark_started();
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let before = registry.entry(&HealthKey {
            address,
            check: Some(check()),
        });
        assert_eq!(before.state(), HealthState::Unhealthy);
        let after = registry.entry(&HealthKey {
            address,
            check: Some(HealthCheck {
                path: "/ready".into(),
                ..check()
            }),
        });
        assert_eq!(after.state(), HealthState::Unhealthy);
        let unchecked = registry.entry(&HealthKey {
            address,
            check: None,
        });
        assert_eq!(unchecked.state(), HealthState::Healthy);
    }

    #[test]
    fn status_line() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 302 Found"), Ok(302));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
    }
}
