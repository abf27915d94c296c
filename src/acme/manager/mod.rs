//! The ACME manager: decides per host when to order, places one order at a
//! time, installs the result, and keeps the journal and the retry back-off.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use instant_acme::{Account, CertificateIdentifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, Der};
use serde::Serialize;
use tokio::sync::Notify;

mod planning;

use super::account::{load_or_create, retire_credentials, AcmeHttpClient};
use super::challenge::{ChallengeResponder, TlsAlpnInterceptor};
use super::journal::{Journal, JournalEntry, Outcome};
use super::order::{issue, OrderFailure};
use super::schedule::{from_unix_seconds, retry_delay, unix_seconds};
use super::store::{CertificateStore, CurrentCert};
use super::{AcmeError, AcmeOptions};

/// A hand-placed certificate is replaced once less than this remains, or
/// less than the renewal fraction of its lifetime if that is shorter.
const HAND_PLACED_MARGIN: Duration = Duration::from_secs(30 * 86_400);

/// Shortest pause of the run loop between two passes over the hosts.
const MIN_LOOP_PAUSE: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderResult {
    Issued,
    Failed,
}

impl OrderResult {
    /// Label value for metrics: `issued` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OrderResult::Issued => "issued",
            OrderResult::Failed => "failed",
        }
    }
}

/// Hooks for metrics. Both are called from the manager's task and must not
/// block.
pub trait AcmeObserver: Send + Sync {
    /// Called once per finished order.
    fn order_finished(&self, host: &str, result: OrderResult);
    /// Called whenever the planned time of the next order for `host`
    /// changes; `None` when nothing is planned.
    fn renewal_scheduled(&self, host: &str, at: Option<SystemTime>);
}

/// Orders since start, by result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OrderCounters {
    pub issued: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastResult {
    /// Unix seconds.
    pub at: i64,
    pub result: &'static str,
    /// The error of a failed order; for an issued one, the new serial.
    pub message: String,
}

/// One host as `status()` reports it. Times are Unix seconds.
#[derive(Clone, Debug, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub serial: Option<String>,
    pub not_after: Option<i64>,
    pub managed_by_acme: bool,
    pub next_renewal: Option<i64>,
    /// Basis of `next_renewal`: `ari`, `lifetime`, `hand-placed`,
    /// `retry` (back-off after a failure) or `missing` (no certificate yet).
    pub renewal_basis: &'static str,
    pub last_result: Option<LastResult>,
    /// Consecutive failed orders since the last issued certificate.
    pub failures: u32,
}

#[derive(Default)]
struct HostState {
    failures: u32,
    retry_at: Option<SystemTime>,
    last_result: Option<LastResult>,
    /// Serial the schedule below belongs to.
    serial: Option<String>,
    lifetime_renew_at: Option<SystemTime>,
    ari: Option<AriState>,
    ari_next_check: Option<SystemTime>,
    next_renewal: Option<SystemTime>,
    basis: &'static str,
}

#[derive(Clone, Copy)]
struct AriState {
    window: (SystemTime, SystemTime),
    renew_at: SystemTime,
}

enum Decision {
    Order(&'static str),
    Wait(SystemTime),
}

pub struct AcmeManager {
    options: AcmeOptions,
    store: Arc<dyn CertificateStore>,
    responder: Arc<ChallengeResponder>,
    hosts: RwLock<Vec<String>>,
    states: Mutex<HashMap<String, HostState>>,
    journal: Mutex<Journal>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// Set once the CA returned renewal information.
    ari_seen: AtomicBool,
    /// Set once the CA's directory turned out to have no `renewalInfo`.
    ari_unsupported: AtomicBool,
    /// One order at a time, from the run loop or `renew_now`.
    order_lock: tokio::sync::Mutex<()>,
    wake: Notify,
    issued: AtomicU64,
    failed: AtomicU64,
    observer: Option<Arc<dyn AcmeObserver>>,
}

impl AcmeManager {
    /// Validates the options and hosts, creates the state folder (mode
    /// 0700) and reads the journal. No network traffic happens before
    /// [`AcmeManager::run`] or [`AcmeManager::renew_now`].
    pub fn new(
        options: AcmeOptions,
        store: Arc<dyn CertificateStore>,
        hosts: Vec<String>,
    ) -> Result<AcmeManager, AcmeError> {
        options.validate()?;
        let hosts = normalize_hosts(hosts)?;
        create_state_dir(&options)?;
        // Fail at start, not at the first order, on unreadable CA roots.
        AcmeHttpClient::new(&options.ca_roots, options.request_timeout)?;
        let journal = Journal::load(&options.state_dir.join("journal.json"))?;
        let ari_unsupported = !options.renewal.use_ari;
        let manager = AcmeManager {
            options,
            store,
            responder: Arc::new(ChallengeResponder::new()),
            hosts: RwLock::new(Vec::new()),
            states: Mutex::new(HashMap::new()),
            journal: Mutex::new(journal),
            account: tokio::sync::Mutex::new(None),
            ari_seen: AtomicBool::new(false),
            ari_unsupported: AtomicBool::new(ari_unsupported),
            order_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            issued: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            observer: None,
        };
        manager.replace_hosts(hosts);
        Ok(manager)
    }

    /// Adds the metrics hooks.
    pub fn with_observer(mut self, observer: Arc<dyn AcmeObserver>) -> AcmeManager {
        self.observer = Some(observer);
        self
    }

    pub fn options(&self) -> &AcmeOptions {
        &self.options
    }

    /// Returns the pending challenge responses, for the plain listener
    /// (HTTP-01).
    pub fn responder(&self) -> Arc<ChallengeResponder> {
        Arc::clone(&self.responder)
    }

    /// Returns the key authorization for an HTTP-01 `token`, if one is
    /// pending.
    pub fn http01_response(&self, token: &str) -> Option<String> {
        self.responder.http01_response(token)
    }

    /// A pre-TLS hook for the HTTPS listener that serves TLS-ALPN-01.
    pub fn tls_alpn_interceptor(&self) -> Arc<TlsAlpnInterceptor> {
        Arc::new(TlsAlpnInterceptor::new(self.responder()))
    }

    pub fn hosts(&self) -> Vec<String> {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the host list (after a config reload). An invalid name
    /// rejects the whole list and keeps the current one. Certificates of
    /// removed hosts stay in the store.
    pub fn set_hosts(&self, hosts: Vec<String>) -> Result<(), AcmeError> {
        let hosts = normalize_hosts(hosts)?;
        self.replace_hosts(hosts);
        self.wake.notify_one();
        Ok(())
    }

    fn replace_hosts(&self, hosts: Vec<String>) {
        let now = SystemTime::now();
        {
            let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            states.retain(|host, _| hosts.contains(host));
            for host in &hosts {
                states
                    .entry(host.clone())
                    .or_insert_with(|| self.state_from_journal(&journal, host, now));
            }
        }
        *self.hosts.write().unwrap_or_else(|e| e.into_inner()) = hosts;
    }

    /// Restores the failure streak of `host` from the journal, so that the
    /// first order after a restart waits out the back-off.
    fn state_from_journal(&self, journal: &Journal, host: &str, now: SystemTime) -> HostState {
        let mut state = HostState {
            basis: "missing",
            ..HostState::default()
        };
        let (failures, last_failure) = journal.failure_streak(host);
        if let Some(last) = last_failure.filter(|_| failures > 0) {
            let renewal = &self.options.renewal;
            let delay = retry_delay(
                failures,
                renewal.retry_initial,
                renewal.retry_max,
                rand::random(),
            );
            let retry_at = from_unix_seconds(last) + delay;
            state.failures = failures;
            if retry_at > now {
                state.retry_at = Some(retry_at);
                tracing::info!(
                    host,
                    failures,
                    retry_in_secs = retry_at.duration_since(now).unwrap_or_default().as_secs(),
                    "the ACME journal shows recent failed orders; waiting out the back-off"
                );
            }
        }
        if let Some(entry) = journal.entries().iter().rev().find(|e| e.host == host) {
            state.last_result = Some(LastResult {
                at: entry.finished_at.unwrap_or(entry.started_at),
                result: match entry.outcome {
                    Outcome::Issued => "issued",
                    _ => "failed",
                },
                message: entry
                    .error
                    .clone()
                    .or_else(|| entry.serial.clone())
                    .unwrap_or_default(),
            });
        }
        state
    }

    pub fn counters(&self) -> OrderCounters {
        OrderCounters {
            issued: self.issued.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Returns the journal entries, oldest first.
    pub fn journal(&self) -> Vec<JournalEntry> {
        let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal.entries().to_vec()
    }

    /// Returns one status per host, in host order.
    pub fn status(&self) -> Vec<HostStatus> {
        self.hosts()
            .iter()
            .map(|host| self.host_status(host))
            .collect()
    }

    fn host_status(&self, host: &str) -> HostStatus {
        let current = self.store.current(host);
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states.get(host);
        HostStatus {
            host: host.to_string(),
            serial: current.as_ref().map(|c| c.serial.clone()),
            not_after: current.as_ref().map(|c| unix_seconds(c.not_after)),
            managed_by_acme: current.as_ref().is_some_and(|c| c.managed_by_acme),
            next_renewal: state.and_then(|s| s.next_renewal).map(unix_seconds),
            renewal_basis: state.map_or("missing", |s| s.basis),
            last_result: state.and_then(|s| s.last_result.clone()),
            failures: state.map_or(0, |s| s.failures),
        }
    }

    /// Places an order for `host` now, regardless of the schedule and the
    /// back-off, and waits for it. For the admin API.
    pub async fn renew_now(&self, host: &str) -> Result<HostStatus, AcmeError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.hosts().contains(&host) {
            return Err(AcmeError(format!(
                "{host} is not an ACME host; the manager handles: {}",
                self.hosts().join(", ")
            )));
        }
        let result = {
            let _order = self.order_lock.lock().await;
            self.place_order(&host, "manual").await
        };
        self.wake.notify_one();
        result.map(|()| self.host_status(&host))
    }

    /// Runs forever: orders missing certificates, renews the managed ones
    /// on schedule, retries failures with back-off. Spawn it once.
    pub async fn run(self: Arc<Self>) {
        tracing::info!(
            directory = %self.options.directory_url,
            challenge = self.options.challenge.as_str(),
            hosts = self.hosts().join(","),
            "ACME manager started"
        );
        loop {
            let mut wake = SystemTime::now() + self.options.renewal.check_interval;
            {
                let _order = self.order_lock.lock().await;
                for host in self.hosts() {
                    let now = SystemTime::now();
                    match self.decide(&host, now).await {
                        Decision::Order(trigger) => {
                            let _ = self.place_order(&host, trigger).await;
                            // Plan this host again on the next pass.
                            wake = SystemTime::now();
                        }
                        Decision::Wait(at) => wake = wake.min(at),
                    }
                }
            }
            let pause = wake
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(MIN_LOOP_PAUSE);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    fn with_state<T>(&self, host: &str, f: impl FnOnce(&mut HostState) -> T) -> T {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        f(states.entry(host.to_string()).or_default())
    }

    async fn account(&self) -> Result<Account, OrderFailure> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        let account = load_or_create(&self.options)
            .await
            .map_err(|e| OrderFailure {
                message: e.0,
                problem: None,
            })?;
        *cached = Some(account.clone());
        Ok(account)
    }

    /// Places one order, installs the certificate, and records the result in
    /// the journal, the counters and the back-off. The caller must lock
    /// `order_lock` first.
    async fn place_order(&self, host: &str, trigger: &'static str) -> Result<(), AcmeError> {
        let started = SystemTime::now();
        let id = {
            let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            journal.begin(host, trigger, started)
        };
        let id = match id {
            Ok(id) => id,
            Err(err) => {
                // Without a journal a crash loop could not be throttled, so
                // no order is placed.
                tracing::error!(host, error = %err, "cannot write the ACME journal; no order placed");
                self.record_failure(host, None, &err.0, None);
                return Err(err);
            }
        };
        tracing::info!(host, trigger, "placing an ACME order");
        let mut outcome = self.order_with_timeout(host).await;
        if outcome.as_ref().is_err_and(|f| f.account_unknown()) {
            // The CA lost or removed the account: register a new one and
            // try once more at once instead of waiting out a back-off.
            retire_credentials(&self.options);
            *self.account.lock().await = None;
            outcome = self.order_with_timeout(host).await;
        }
        match outcome {
            Ok(installed) => {
                let serial = installed.serial.clone();
                self.record_success(host, id, &installed);
                tracing::info!(
                    host,
                    serial = %serial,
                    not_after = unix_seconds(installed.not_after),
                    elapsed_ms = started.elapsed().unwrap_or_default().as_millis() as u64,
                    "ACME certificate issued and installed"
                );
                Ok(())
            }
            Err(failure) => {
                if failure.account_unknown() {
                    retire_credentials(&self.options);
                    *self.account.lock().await = None;
                }
                self.record_failure(host, Some(id), &failure.message, failure.problem.as_ref());
                Err(AcmeError(failure.message))
            }
        }
    }

    async fn order_with_timeout(&self, host: &str) -> Result<CurrentCert, OrderFailure> {
        let replaces = self.replaced_certificate(host);
        tokio::time::timeout(
            self.options.order_timeout,
            self.order_and_install(host, replaces),
        )
        .await
        .unwrap_or_else(|_| {
            Err(OrderFailure {
                message: format!(
                    "order for {host} timed out after {:?}",
                    self.options.order_timeout
                ),
                problem: None,
            })
        })
    }

    async fn order_and_install(
        &self,
        host: &str,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<CurrentCert, OrderFailure> {
        let account = self.account().await?;
        let issued = issue(
            &account,
            host,
            self.options.challenge,
            self.options.key_type,
            &self.responder,
            replaces,
            self.options.order_timeout,
        )
        .await?;
        let installed = leaf_summary(&issued.chain_pem).ok_or_else(|| OrderFailure {
            message: "the CA returned no parsable certificate".to_string(),
            problem: None,
        })?;
        self.store
            .install(host, issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
            .map_err(|e| OrderFailure {
                message: format!("the certificate store rejected the new certificate: {e}"),
                problem: None,
            })?;
        Ok(installed)
    }

    /// Returns the ARI identifier of the served ACME certificate, sent as
    /// `replaces` when the CA supports ARI.
    fn replaced_certificate(&self, host: &str) -> Option<CertificateIdentifier<'static>> {
        if !self.ari_seen.load(Ordering::Relaxed) {
            return None;
        }
        let current = self.store.current(host).filter(|c| c.managed_by_acme)?;
        certificate_identifier(&current.leaf_der)
    }

    fn record_success(&self, host: &str, id: u64, installed: &CurrentCert) {
        let now = SystemTime::now();
        {
            let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(err) = journal.finish(
                id,
                Outcome::Issued,
                now,
                Some(installed.serial.clone()),
                Some(unix_seconds(installed.not_after)),
                None,
            ) {
                tracing::error!(host, error = %err, "cannot write the ACME journal");
            }
        }
        self.with_state(host, |s| {
            s.failures = 0;
            s.retry_at = None;
            s.last_result = Some(LastResult {
                at: unix_seconds(now),
                result: OrderResult::Issued.as_str(),
                message: installed.serial.clone(),
            });
        });
        self.issued.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.order_finished(host, OrderResult::Issued);
        }
    }

    fn record_failure(
        &self,
        host: &str,
        id: Option<u64>,
        message: &str,
        problem: Option<&instant_acme::Problem>,
    ) {
        let now = SystemTime::now();
        if let Some(id) = id {
            let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(err) = journal.finish(
                id,
                Outcome::Failed,
                now,
                None,
                None,
                Some(message.to_string()),
            ) {
                tracing::error!(host, error = %err, "cannot write the ACME journal");
            }
        }
        let renewal = &self.options.renewal;
        let (failures, retry_at) = self.with_state(host, |s| {
            s.failures += 1;
            let delay = retry_delay(
                s.failures,
                renewal.retry_initial,
                renewal.retry_max,
                rand::random(),
            );
            s.retry_at = Some(now + delay);
            s.last_result = Some(LastResult {
                at: unix_seconds(now),
                result: OrderResult::Failed.as_str(),
                message: message.to_string(),
            });
            (s.failures, now + delay)
        });
        let current = self.store.current(host);
        tracing::warn!(
            host,
            error = %message,
            problem_type = problem.and_then(|p| p.r#type.as_deref()).unwrap_or(""),
            problem_detail = problem.and_then(|p| p.detail.as_deref()).unwrap_or(""),
            problem_status = problem.and_then(|p| p.status).unwrap_or(0),
            failures,
            retry_in_secs = retry_at.duration_since(now).unwrap_or_default().as_secs(),
            serving_serial = current.as_ref().map_or("none", |c| c.serial.as_str()),
            "ACME order failed; the current certificate stays in service"
        );
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.order_finished(host, OrderResult::Failed);
        }
    }
}

/// Serial, validity and DER of the first certificate of a PEM chain.
fn leaf_summary(chain_pem: &str) -> Option<CurrentCert> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(CurrentCert {
        not_before: from_unix_seconds(parsed.validity().not_before.timestamp()),
        not_after: from_unix_seconds(parsed.validity().not_after.timestamp()),
        serial: format!("{:x}", parsed.serial),
        managed_by_acme: true,
        leaf_der: leaf.to_vec(),
    })
}

/// Returns the RFC 9773 identifier of a certificate: its AKI key identifier
/// and its DER serial. `None` without an AKI.
fn certificate_identifier(leaf_der: &[u8]) -> Option<CertificateIdentifier<'static>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf_der).ok()?;
    let aki = parsed
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        })?;
    let serial = parsed.tbs_certificate.raw_serial().to_vec();
    Some(CertificateIdentifier::new(Der::from_slice(&aki), Der::from_slice(&serial)).into_owned())
}

fn create_state_dir(options: &AcmeOptions) -> Result<(), AcmeError> {
    let dir = &options.state_dir;
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| {
            AcmeError(format!(
                "cannot create the ACME state folder {}: {e}",
                dir.display()
            ))
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            AcmeError(format!(
                "cannot set mode 0700 on the ACME state folder {}: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// Lower-cases, drops a trailing dot, removes duplicates, and rejects
/// anything that is not a DNS host name (wildcards and IP addresses too).
fn normalize_hosts(hosts: Vec<String>) -> Result<Vec<String>, AcmeError> {
    let mut normalized = Vec::with_capacity(hosts.len());
    let mut invalid = Vec::new();
    for host in hosts {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if is_dns_host(&name) {
            if !normalized.contains(&name) {
                normalized.push(name);
            }
        } else {
            invalid.push(format!("{host:?}"));
        }
    }
    if invalid.is_empty() {
        Ok(normalized)
    } else {
        Err(AcmeError(format!(
            "invalid ACME host name(s) {}; use DNS names such as \"app.example.com\" (no wildcards, IP addresses or ports)",
            invalid.join(", ")
        )))
    }
}

fn is_dns_host(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 || name.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::planning::hand_placed_due;
    use super::*;

    #[test]
    fn hosts_are_normalized_and_checked() {
        let hosts = normalize_hosts(vec![
            "App.Example.com.".into(),
            "app.example.com".into(),
            "b.test".into(),
        ])
        .unwrap();
        assert_eq!(hosts, vec!["app.example.com", "b.test"]);
        let error = normalize_hosts(vec![
            "ok.test".into(),
            "*.example.com".into(),
            "127.0.0.1".into(),
            "a_b.test".into(),
        ])
        .unwrap_err()
        .0;
        assert!(error.contains("\"*.example.com\""), "{error}");
        assert!(error.contains("\"127.0.0.1\""), "{error}");
        assert!(error.contains("\"a_b.test\""), "{error}");
        assert!(!error.contains("ok.test"), "{error}");
    }

    #[test]
    fn hand_placed_certificate_kept_until_margin() {
        let day = 86_400;
        let current = CurrentCert {
            not_before: from_unix_seconds(0),
            not_after: from_unix_seconds(365 * day),
            serial: "1".into(),
            managed_by_acme: false,
            leaf_der: Vec::new(),
        };
        let due = hand_placed_due(&current, 1.0 / 3.0);
        assert_eq!(unix_seconds(due), 335 * day);

        let short = CurrentCert {
            not_after: from_unix_seconds(30 * day),
            ..current
        };
        assert_eq!(unix_seconds(hand_placed_due(&short, 1.0 / 3.0)), 20 * day);
    }
}
