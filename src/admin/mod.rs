//! Operator control: the admin socket, its commands, the state file that
//! keeps runtime changes across restarts, and the shift controller.
//!
//! Start-up order, as `main` calls it:
//! 1. [`state::restore`] reads the state file into the overrides that
//!    [`crate::app::App::new`] applies.
//! 2. [`prepare`] binds the socket (or, with `--upgrade`, defers that until
//!    the previous process lets go of it) and records shifts to resume.
//! 3. [`start`], from the control service's runtime, serves the socket and
//!    runs the shift controllers until shutdown.

pub mod certs;
pub mod commands;
pub mod ctl;
pub mod protocol;
pub mod shift;
pub mod socket;
pub mod state;
pub mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use serde_json::Value;

use crate::app::App;
use crate::snapshot::Snapshot;
use protocol::{AdminError, ErrorCode};
use shift::{ActiveShift, ShiftPlan};
use window::Outcomes;

/// The certificate manager interface the admin socket calls. The TLS and ACME
/// modules install one with [`AdminState::set_cert_control`]; until then
/// `certs` and `renew` return "not configured".
#[async_trait]
pub trait CertControl: Send + Sync {
    /// Lists the certificates with their names and expiry, as JSON.
    fn list(&self) -> Result<Value, String>;
    /// Renews the certificate for `domain` now; returns a JSON summary.
    async fn renew(&self, domain: &str) -> Result<Value, String>;
}

/// Admin state shared by the socket, the shift controllers and the proxy.
pub struct AdminState {
    /// Outcome windows of pools under a shift; the proxy records into them.
    pub outcomes: Outcomes,
    certs: OnceLock<Arc<dyn CertControl>>,
    /// Shifts in progress by route. Changed only under the snapshot writer lock.
    shifts: Mutex<BTreeMap<String, ActiveShift>>,
    /// The outcome of each route's last shift, for `status`.
    finished: Mutex<BTreeMap<String, String>>,
    startup: Mutex<Option<Startup>>,
    handing_over: AtomicBool,
}

/// A shift that a config reload cancelled because its route or pools
/// changed, for the caller's warning and audit event.
#[derive(Clone, Debug)]
pub struct CancelledShift {
    pub route: String,
    pub plan: ShiftPlan,
    /// The `last_shift` text that `status` shows for the route.
    pub outcome: String,
    /// The route's weights before the reload.
    pub weights_before: BTreeMap<String, u32>,
    /// The route's weights after the reload, or `None` when it is gone.
    pub weights_after: Option<BTreeMap<String, u32>>,
}

/// The bound socket and mode that [`prepare`] leaves for [`start`].
struct Startup {
    socket: Option<socket::BoundSocket>,
    upgrade: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for AdminState {
    fn default() -> AdminState {
        AdminState::new()
    }
}

impl AdminState {
    pub fn new() -> AdminState {
        AdminState {
            outcomes: Outcomes::default(),
            certs: OnceLock::new(),
            shifts: Mutex::new(BTreeMap::new()),
            finished: Mutex::new(BTreeMap::new()),
            startup: Mutex::new(None),
            handing_over: AtomicBool::new(false),
        }
    }

    pub fn set_cert_control(&self, control: Arc<dyn CertControl>) {
        if self.certs.set(control).is_err() {
            tracing::warn!("a certificate control was already installed; keeping the first");
        }
    }

    fn cert_control(&self) -> Result<Arc<dyn CertControl>, AdminError> {
        self.certs.get().cloned().ok_or_else(|| {
            AdminError::new(
                ErrorCode::NotConfigured,
                "certificates are not managed by this process: no TLS or ACME manager is configured",
            )
        })
    }

    /// Shift state per route for the `switchyard_shift_state` gauge:
    /// 1 running, 2 holding, 3 rolled back or stopped (also by a reload),
    /// 4 completed. Routes without a shift are left out (the gauge shows
    /// them as 0).
    pub fn shift_gauges(&self) -> BTreeMap<String, i64> {
        let mut gauges: BTreeMap<String, i64> = self
            .finished()
            .into_iter()
            .map(|(route, outcome)| {
                let value = if outcome.starts_with("completed") {
                    4
                } else {
                    3
                };
                (route, value)
            })
            .collect();
        for (route, shift) in self.shifts() {
            let value = if shift.state.starts_with("holding") {
                2
            } else {
                1
            };
            gauges.insert(route, value);
        }
        gauges
    }

    /// Returns a copy of the shifts in progress.
    fn shifts(&self) -> BTreeMap<String, ActiveShift> {
        lock(&self.shifts).clone()
    }

    fn finished(&self) -> BTreeMap<String, String> {
        lock(&self.finished).clone()
    }

    /// Publishes the shifts in progress and the windows the proxy records
    /// into. The caller holds the snapshot writer lock.
    fn install_shifts(&self, shifts: BTreeMap<String, ActiveShift>) {
        let windows: HashMap<String, Arc<window::PoolWindow>> = shifts
            .iter()
            .map(|(route, shift)| (route.clone(), Arc::clone(&shift.window)))
            .collect();
        *lock(&self.shifts) = shifts;
        self.outcomes.set(windows);
    }

    /// Cancels the shifts that no longer fit `after`, the snapshot a reload
    /// just published, and records their outcome for `status`. The caller
    /// holds the snapshot writer lock. A cancelled shift's controller task
    /// stops on its next tick because the shift is no longer installed.
    pub fn cancel_stale_shifts(&self, before: &Snapshot, after: &Snapshot) -> Vec<CancelledShift> {
        let mut shifts = self.shifts();
        let mut cancelled = Vec::new();
        shifts.retain(|route, active| {
            let Some(reason) = stale_shift_reason(after, route, &active.plan) else {
                return true;
            };
            let weights_before = before
                .route_index(route)
                .map(|index| before.weights(index))
                .unwrap_or_default();
            let weights_after = after.route_index(route).map(|index| after.weights(index));
            cancelled.push(CancelledShift {
                route: route.clone(),
                plan: active.plan.clone(),
                outcome: format!("cancelled by a config reload: {reason}"),
                weights_before,
                weights_after,
            });
            false
        });
        if cancelled.is_empty() {
            return cancelled;
        }
        self.install_shifts(shifts);
        for shift in &cancelled {
            self.finish_shift(&shift.route, shift.outcome.clone());
        }
        cancelled
    }

    fn finish_shift(&self, route: &str, outcome: String) {
        lock(&self.finished).insert(route.to_string(), outcome);
    }

    fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }
}

/// Returns why the shift `plan` on `route` cannot go on under `snapshot`,
/// or `None` when it can: the route still exists, still has runtime
/// weights, and has exactly the pools the shift started with.
fn stale_shift_reason(snapshot: &Snapshot, route: &str, plan: &ShiftPlan) -> Option<&'static str> {
    let Some(index) = snapshot.route_index(route) else {
        return Some("the route is no longer in the config file");
    };
    let pools_match = snapshot.overrides.weights.contains_key(route)
        && snapshot.weights(index).keys().eq(plan.start_weights.keys());
    if pools_match {
        None
    } else {
        Some("the route's pools changed in the config file")
    }
}

/// Binds the admin socket named by the config and records the shifts to
/// resume. Returns an error for the operator when the socket path cannot be
/// used; the process should then exit. With `upgrade`, a socket still held
/// by the running process is taken over later, in [`start`].
pub fn prepare(
    app: &App,
    resume: BTreeMap<String, ShiftPlan>,
    upgrade: bool,
) -> Result<(), String> {
    let snapshot = app.snapshots.load();
    let admin = &snapshot.config.admin;
    let socket = match &admin.socket {
        None => {
            tracing::warn!(
                "admin.socket is not set, so the admin socket and switchyard ctl are off"
            );
            None
        }
        Some(path) => socket::bind_at_start(path, admin.socket_mode, upgrade)?,
    };
    {
        let _writer = app.snapshots.lock_writer();
        let shifts = resume
            .into_iter()
            .map(|(route, plan)| (route, ActiveShift::new(plan, "resumed after a restart")))
            .collect();
        app.admin.install_shifts(shifts);
    }
    *lock(&app.admin.startup) = Some(Startup { socket, upgrade });
    Ok(())
}

/// Serves the admin socket and runs the shift controllers on the current
/// runtime until `shutdown`. Call once, from the control service.
pub fn start(app: &Arc<App>, shutdown: ShutdownWatch) {
    let Some(startup) = lock(&app.admin.startup).take() else {
        tracing::warn!("the admin socket was not prepared; switchyard ctl is off");
        return;
    };
    let app = Arc::clone(app);
    tokio::spawn(async move {
        let snapshot = app.snapshots.load();
        let admin = snapshot.config.admin.clone();
        drop(snapshot);
        let bound = match (startup.socket, &admin.socket) {
            (Some(bound), _) => Some(bound),
            (None, Some(path)) if startup.upgrade => {
                match socket::take_over(path, admin.socket_mode).await {
                    Ok(bound) => Some(bound),
                    Err(err) => {
                        tracing::error!(socket = %path.display(), error = %err, "cannot bind the admin socket after the upgrade; switchyard ctl is off");
                        None
                    }
                }
            }
            _ => None,
        };
        if startup.upgrade {
            commands::adopt_state_file(&app);
        }
        for (route, active) in app.admin.shifts() {
            commands::spawn_shift(
                Arc::clone(&app),
                route,
                active.controller,
                active.plan.every(),
            );
        }
        socket::serve(app, bound, shutdown).await;
    });
}
