//! The process-wide state every service shares: the published snapshot, the
//! health registry, and the config loader that swaps them.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::acme::AcmeManager;
use crate::admin::{AdminState, CancelledShift};
use crate::config::{Config, ConfigErrors};
use crate::health::HealthRegistry;
use crate::snapshot::{Overrides, Snapshot, SnapshotCell};
use crate::tls::CertStore;

/// Answers ACME HTTP-01 challenges on the plain listener.
pub trait Http01Responder: Send + Sync {
    /// The key authorization for a pending challenge token, if any.
    fn key_authorization(&self, token: &str) -> Option<String>;
}

pub struct App {
    pub snapshots: SnapshotCell,
    pub registry: Arc<HealthRegistry>,
    pub config_path: PathBuf,
    /// Admin socket state: shifts in progress, their outcome windows, the
    /// certificate control hook.
    pub admin: AdminState,
    http01: OnceLock<Arc<dyn Http01Responder>>,
    certs: OnceLock<Arc<CertStore>>,
    acme: OnceLock<Arc<AcmeManager>>,
}

/// What a successful reload changed.
#[derive(Debug)]
pub struct Reloaded {
    pub generation: u64,
    /// Settings that only take effect after a restart or binary upgrade.
    pub needs_restart: Vec<String>,
    /// Shifts stopped because the reload removed their route or changed
    /// its pools.
    pub cancelled_shifts: Vec<CancelledShift>,
    /// False when the state file could not be rewritten after the reload.
    pub state_file_written: bool,
}

impl App {
    /// Builds generation 1 from `config`. Health checks start later, when
    /// the runtime exists (see [`HealthRegistry::start_probes`]).
    pub fn new(config: Config, overrides: Overrides) -> Arc<App> {
        let registry = Arc::new(HealthRegistry::new());
        let config_path = config.source.clone();
        let snapshot = Snapshot::build(Arc::new(config), overrides, &registry, 1);
        registry.mark_started();
        Arc::new(App {
            snapshots: SnapshotCell::new(snapshot),
            registry,
            config_path,
            admin: AdminState::new(),
            http01: OnceLock::new(),
            certs: OnceLock::new(),
            acme: OnceLock::new(),
        })
    }

    pub fn set_http01_responder(&self, responder: Arc<dyn Http01Responder>) {
        if self.http01.set(responder).is_err() {
            tracing::warn!("an ACME HTTP-01 responder was already installed; keeping the first");
        }
    }

    /// Attaches the certificate store; called once at start when TLS is on.
    pub fn set_cert_store(&self, store: Arc<CertStore>) {
        if self.certs.set(store).is_err() {
            tracing::warn!("a certificate store was already attached; keeping the first");
        }
    }

    pub fn cert_store(&self) -> Option<&Arc<CertStore>> {
        self.certs.get()
    }

    /// Attaches the ACME manager; called once at start when `[acme]` is on.
    pub fn set_acme(&self, manager: Arc<AcmeManager>) {
        if self.acme.set(manager).is_err() {
            tracing::warn!("an ACME manager was already attached; keeping the first");
        }
    }

    pub fn acme(&self) -> Option<&Arc<AcmeManager>> {
        self.acme.get()
    }

    pub fn http01_response(&self, token: &str) -> Option<String> {
        self.http01.get()?.key_authorization(token)
    }

    /// Re-reads the config file and swaps it in atomically. An invalid file
    /// changes nothing and returns every error. Runtime overrides (weights,
    /// drains) and shifts carry over where the new file still has their
    /// routes and pools; other shifts are cancelled in the same swap.
    pub fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let config = Config::load(&self.config_path)?;
        let _writer = self.snapshots.lock_writer();
        let current = self.snapshots.load();
        let needs_restart = restart_only_changes(&current.config, &config);
        let generation = current.generation + 1;
        let next = Snapshot::build(
            Arc::new(config),
            current.overrides.clone(),
            &self.registry,
            generation,
        );
        let keys = next.health_keys();
        self.snapshots.store(next);
        let published = self.snapshots.load();
        let cancelled_shifts = self.admin.cancel_stale_shifts(&current, &published);
        self.registry.retain(&keys);
        Ok(Reloaded {
            generation,
            needs_restart,
            cancelled_shifts,
            state_file_written: true,
        })
    }
}

fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    if old.listeners.http != new.listeners.http {
        changed.push("listeners.http".to_string());
    }
    if old.listeners.https != new.listeners.https {
        changed.push("listeners.https".to_string());
    }
    if old.listeners.threads != new.listeners.threads {
        changed.push("listeners.threads".to_string());
    }
    if old.limits.max_connections != new.limits.max_connections {
        changed.push("limits.max_connections".to_string());
    }
    if old.admin.socket != new.admin.socket {
        changed.push("admin.socket".to_string());
    }
    if old.tls.default_certificate != new.tls.default_certificate
        || old.tls.reject_unknown_sni != new.tls.reject_unknown_sni
        || old.tls.store != new.tls.store
    {
        changed.push("tls".to_string());
    }
    if old.admin.metrics != new.admin.metrics {
        changed.push("admin.metrics".to_string());
    }
    changed
}
