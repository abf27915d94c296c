//! The commands: each change is validated against the current snapshot,
//! written to the state file and published as one snapshot swap, all under
//! the snapshot writer lock, and only then acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

use super::protocol::{AdminError, ErrorCode, LimitsRequest, Request};
use super::shift::{self, ActiveShift, Limits, ShiftPlan, Verdict};
use super::state;
use super::CancelledShift;
use crate::app::App;
use crate::snapshot::{Overrides, Snapshot};

/// The originator of a change, for the audit log.
#[derive(Clone, Copy, Debug)]
pub enum Actor {
    /// A client of the admin socket, as the kernel reported it.
    Client { uid: Option<u32>, pid: Option<i32> },
    /// The shift controller, acting on a window's measurements.
    ShiftController,
    /// A SIGHUP config reload; the sender of the signal is unknown.
    Signal,
}

/// Runs one request, counts it in `switchyard_admin_commands_total` and
/// returns the response fields.
pub async fn execute(app: &Arc<App>, request: Request, actor: Actor) -> Result<Value, AdminError> {
    let command = request.name();
    let result = run(app, request, actor).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    crate::metrics::global()
        .admin_commands
        .with_label_values(&[command, outcome])
        .inc();
    result
}

async fn run(app: &Arc<App>, request: Request, actor: Actor) -> Result<Value, AdminError> {
    match request {
        Request::Status => Ok(status(app)),
        Request::Certs => {
            let control = app.admin.cert_control()?;
            control
                .list()
                .map(|certificates| json!({ "certificates": certificates }))
                .map_err(|e| AdminError::new(ErrorCode::NotConfigured, e))
        }
        Request::Renew { domain } => {
            let control = app.admin.cert_control()?;
            let result = control
                .renew(&domain)
                .await
                .map_err(|e| AdminError::new(ErrorCode::NotFound, e))?;
            audit("renew", &domain, &Value::Null, &result, actor, None);
            Ok(json!({ "domain": domain, "result": result }))
        }
        request => {
            let task_app = Arc::clone(app);
            // Changes take a blocking lock and fsync the state file, so they
            // run off the async workers.
            let (response, started) =
                tokio::task::spawn_blocking(move || change(&task_app, request, actor))
                    .await
                    .map_err(|e| {
                        AdminError::new(ErrorCode::Unavailable, format!("the command failed: {e}"))
                    })??;
            if let Some((route, controller, every)) = started {
                spawn_shift(Arc::clone(app), route, controller, every);
            }
            Ok(response)
        }
    }
}

/// A new shift's route, controller id and interval, for the caller to
/// start its task.
type Started = Option<(String, u64, Duration)>;

fn change(app: &App, request: Request, actor: Actor) -> Result<(Value, Started), AdminError> {
    if app.admin.is_handing_over() {
        return Err(handing_over());
    }
    match request {
        Request::Weights {
            route,
            weights,
            expect_generation,
            force,
        } => set_weights(app, &route, weights, expect_generation, force, actor).map(|v| (v, None)),
        Request::Shift {
            route,
            to,
            step,
            every,
            limits,
            expect_generation,
            force,
        } => start_shift(
            app,
            ShiftRequest {
                route,
                to,
                step,
                every,
                limits,
                expect_generation,
                force,
            },
            actor,
        ),
        Request::Rollback { route } => rollback(app, &route, actor).map(|v| (v, None)),
        Request::Drain {
            pool,
            backend,
            force,
        } => set_drained(app, &pool, backend, true, force, actor).map(|v| (v, None)),
        Request::Enable { pool, backend } => {
            set_drained(app, &pool, backend, false, false, actor).map(|v| (v, None))
        }
        Request::Reload => reload(app, actor).map(|v| (v, None)),
        Request::Status | Request::Certs | Request::Renew { .. } => Err(AdminError::invalid(
            "this command does not change anything and runs elsewhere",
        )),
    }
}

pub fn handing_over() -> AdminError {
    AdminError::new(
        ErrorCode::Unavailable,
        "this process is handing over to a new one (binary upgrade); reconnect to reach the new process",
    )
}

/// Writes the state file and publishes the next snapshot. The caller holds
/// the writer lock and built `overrides` and `shifts` from `current`.
fn commit(
    app: &App,
    _writer: &MutexGuard<'_, ()>,
    current: &Snapshot,
    overrides: Overrides,
    shifts: BTreeMap<String, ActiveShift>,
) -> Result<Arc<Snapshot>, AdminError> {
    let next = Snapshot::build(
        Arc::clone(&current.config),
        overrides,
        &app.registry,
        current.generation + 1,
    );
    if let Some(path) = &current.config.admin.state_file {
        let plans = shifts
            .iter()
            .map(|(route, shift)| (route.clone(), shift.plan.clone()))
            .collect();
        state::write(path, &next.overrides, &plans, next.generation).map_err(|err| {
            AdminError::new(
                ErrorCode::StateFile,
                format!(
                    "cannot write the state file {}: {err}; nothing changed. Make its directory exist and be writable",
                    path.display()
                ),
            )
        })?;
    }
    app.snapshots.store(next);
    app.admin.install_shifts(shifts);
    Ok(app.snapshots.load())
}

fn audit(
    command: &str,
    subject: &str,
    old: &Value,
    new: &Value,
    actor: Actor,
    generation: Option<u64>,
) {
    let generation = generation.unwrap_or(0);
    match actor {
        Actor::Client { uid, pid } => tracing::info!(
            target: "switchyard::audit",
            command,
            subject,
            old = %old,
            new = %new,
            actor = "admin socket",
            uid = uid.map_or(-1, i64::from),
            pid = pid.map_or(-1, i64::from),
            generation,
            "admin change"
        ),
        Actor::ShiftController => tracing::info!(
            target: "switchyard::audit",
            command,
            subject,
            old = %old,
            new = %new,
            actor = "shift controller",
            uid = i64::from(unsafe { libc::getuid() }),
            pid = i64::from(std::process::id()),
            generation,
            "admin change"
        ),
        Actor::Signal => tracing::info!(
            target: "switchyard::audit",
            command,
            subject,
            old = %old,
            new = %new,
            actor = "SIGHUP",
            uid = -1i64,
            pid = -1i64,
            generation,
            "admin change"
        ),
    }
}

/// Logs a warning and an audit event (command `shift cancel`) for each
/// shift a config reload cancelled.
pub fn log_cancelled_shifts(cancelled: &[CancelledShift], actor: Actor, generation: u64) {
    for shift in cancelled {
        tracing::warn!(route = %shift.route, to = %shift.plan.to, outcome = %shift.outcome, "shift cancelled by a config reload");
        audit(
            "shift cancel",
            &shift.route,
            &json!({ "weights": shift.weights_before, "shift": shift.plan.to_json() }),
            &json!({ "weights": shift.weights_after, "reason": shift.outcome }),
            actor,
            Some(generation),
        );
    }
}

fn check_generation(current: &Snapshot, expected: Option<u64>) -> Result<(), AdminError> {
    match expected {
        Some(expected) if expected != current.generation => Err(AdminError::new(
            ErrorCode::StaleGeneration,
            format!(
                "expect_generation is {expected} but the current generation is {}; another change came first. Read status and retry",
                current.generation
            ),
        )
        .with("generation", json!(current.generation))),
        _ => Ok(()),
    }
}

fn find_route(current: &Snapshot, route: &str) -> Result<usize, AdminError> {
    current.route_index(route).ok_or_else(|| {
        let names: Vec<&str> = current
            .route_states
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        AdminError::new(
            ErrorCode::NotFound,
            format!(
                "route {route:?} not found; the routes are {}",
                names.join(", ")
            ),
        )
    })
}

fn pool_not_on_route(pool: &str, route: &str, weights: &BTreeMap<String, u32>) -> AdminError {
    let names: Vec<&str> = weights.keys().map(String::as_str).collect();
    AdminError::new(
        ErrorCode::NotFound,
        format!(
            "pool {pool:?} is not on route {route:?}; its pools are {}",
            names.join(", ")
        ),
    )
}

/// Healthy, usable backends of `pool` with `drained` as the drain set.
fn available_backends(
    current: &Snapshot,
    pool: &str,
    drained: &BTreeSet<(String, SocketAddr)>,
) -> usize {
    current.pools.get(pool).map_or(0, |state| {
        state
            .backends
            .iter()
            .filter(|b| {
                b.weight > 0
                    && b.health.is_healthy()
                    && !drained.contains(&(pool.to_string(), b.address))
            })
            .count()
    })
}

fn no_healthy_backend(pool: &str) -> AdminError {
    AdminError::new(
        ErrorCode::Unsafe,
        format!(
            "pool {pool:?} has no healthy, undrained backend, so its share would go to the other pools or fail; fix the pool first, or pass force to set it anyway"
        ),
    )
}

fn set_weights(
    app: &App,
    route: &str,
    weights: BTreeMap<String, u32>,
    expect_generation: Option<u64>,
    force: bool,
    actor: Actor,
) -> Result<Value, AdminError> {
    let writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    check_generation(&current, expect_generation)?;
    let index = find_route(&current, route)?;
    let previous = current.weights(index);
    if let Some(pool) = weights.keys().find(|p| !previous.contains_key(*p)) {
        return Err(pool_not_on_route(pool, route, &previous));
    }
    let mut next = previous.clone();
    next.extend(weights);
    if next.values().all(|w| *w == 0) {
        return Err(AdminError::invalid(format!(
            "every pool of route {route:?} would have weight 0, so it could serve nothing; give at least one pool a weight above 0"
        )));
    }
    let mut shifts = app.admin.shifts();
    if let Some(active) = shifts.get(route) {
        if !force {
            return Err(AdminError::new(
                ErrorCode::Conflict,
                format!(
                    "route {route:?} has a shift toward {:?} in progress; stop it with rollback first, or pass force to stop it and set these weights",
                    active.plan.to
                ),
            ));
        }
    }
    if !force {
        for (pool, weight) in &next {
            if *weight > previous[pool]
                && available_backends(&current, pool, &current.overrides.drained) == 0
            {
                return Err(no_healthy_backend(pool));
            }
        }
    }
    let stopped = shifts.remove(route);
    let mut overrides = current.overrides.clone();
    overrides.weights.insert(route.to_string(), next.clone());
    let published = commit(app, &writer, &current, overrides, shifts)?;
    if let Some(stopped) = stopped {
        app.admin.finish_shift(
            route,
            format!(
                "stopped by a forced weights command toward {:?}",
                stopped.plan.to
            ),
        );
        tracing::warn!(route, to = %stopped.plan.to, "a forced weights command stopped the shift in progress");
    }
    drop(writer);
    audit(
        "weights",
        route,
        &json!(previous),
        &json!(next),
        actor,
        Some(published.generation),
    );
    Ok(json!({
        "generation": published.generation,
        "route": route,
        "previous": previous,
        "weights": next,
    }))
}

struct ShiftRequest {
    route: String,
    to: String,
    step: u32,
    every: Duration,
    limits: LimitsRequest,
    expect_generation: Option<u64>,
    force: bool,
}

fn start_shift(
    app: &App,
    request: ShiftRequest,
    actor: Actor,
) -> Result<(Value, Started), AdminError> {
    let route = request.route.as_str();
    let writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    check_generation(&current, request.expect_generation)?;
    let index = find_route(&current, route)?;
    let previous = current.weights(index);
    if !previous.contains_key(&request.to) {
        return Err(pool_not_on_route(&request.to, route, &previous));
    }
    if previous.len() < 2 {
        return Err(AdminError::invalid(format!(
            "route {route:?} has only one pool, so there is nothing to shift"
        )));
    }
    if shift::is_complete(&previous, &request.to) {
        return Err(AdminError::invalid(format!(
            "pool {:?} already receives all of route {route:?}'s traffic",
            request.to
        )));
    }
    let mut shifts = app.admin.shifts();
    if let Some(active) = shifts.get(route) {
        return Err(AdminError::new(
            ErrorCode::Conflict,
            format!(
                "route {route:?} already has a shift toward {:?} in progress; stop it with rollback first",
                active.plan.to
            ),
        ));
    }
    if !request.force && available_backends(&current, &request.to, &current.overrides.drained) == 0
    {
        return Err(no_healthy_backend(&request.to));
    }
    let defaults = &current.config.admin;
    let limits = Limits {
        max_error_rate: request
            .limits
            .max_error_rate
            .unwrap_or(defaults.shift_max_error_rate),
        max_p99_ms: request
            .limits
            .max_p99
            .unwrap_or(defaults.shift_max_p99)
            .as_millis()
            .min(u128::from(u64::MAX)) as u64,
        min_requests: request
            .limits
            .min_requests
            .unwrap_or(defaults.shift_min_requests),
    };
    let plan = ShiftPlan {
        route: route.to_string(),
        to: request.to.clone(),
        step: request.step,
        every_ms: request.every.as_millis().min(u128::from(u64::MAX)) as u64,
        limits,
        start_weights: previous.clone(),
        started_at: state::now_unix(),
    };
    let first = shift::next_weights(&previous, &previous, &request.to, request.step);
    let state = format!(
        "stepping: {} at {} %",
        request.to,
        shift::share_percent(&first, &request.to)
    );
    let active = ActiveShift::new(plan.clone(), &state);
    let controller = active.controller;
    shifts.insert(route.to_string(), active);
    let mut overrides = current.overrides.clone();
    overrides.weights.insert(route.to_string(), first.clone());
    let published = commit(app, &writer, &current, overrides, shifts)?;
    drop(writer);
    tracing::info!(route, to = %plan.to, step = plan.step, every = %humantime::format_duration(request.every), "shift started");
    audit(
        "shift",
        route,
        &json!(previous),
        &json!({ "weights": first, "shift": plan.to_json() }),
        actor,
        Some(published.generation),
    );
    Ok((
        json!({
            "generation": published.generation,
            "route": route,
            "previous": previous,
            "weights": first,
            "shift": plan.to_json(),
        }),
        Some((route.to_string(), controller, request.every)),
    ))
}

fn rollback(app: &App, route: &str, actor: Actor) -> Result<Value, AdminError> {
    let writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    let index = find_route(&current, route)?;
    let mut shifts = app.admin.shifts();
    let Some(active) = shifts.remove(route) else {
        return Err(AdminError::new(
            ErrorCode::Conflict,
            format!("route {route:?} has no shift in progress; set weights with the weights command instead"),
        ));
    };
    let previous = current.weights(index);
    let mut overrides = current.overrides.clone();
    overrides
        .weights
        .insert(route.to_string(), active.plan.start_weights.clone());
    let published = commit(app, &writer, &current, overrides, shifts)?;
    app.admin
        .finish_shift(route, "rolled back by an operator".to_string());
    drop(writer);
    tracing::warn!(route, to = %active.plan.to, "shift rolled back by an operator");
    audit(
        "rollback",
        route,
        &json!(previous),
        &json!(active.plan.start_weights),
        actor,
        Some(published.generation),
    );
    Ok(json!({
        "generation": published.generation,
        "route": route,
        "previous": previous,
        "weights": active.plan.start_weights,
    }))
}

fn set_drained(
    app: &App,
    pool: &str,
    backend: SocketAddr,
    drain: bool,
    force: bool,
    actor: Actor,
) -> Result<Value, AdminError> {
    let command = if drain { "drain" } else { "enable" };
    let writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    let Some(state) = current.pools.get(pool) else {
        let names: Vec<&str> = current.pools.keys().map(String::as_str).collect();
        return Err(AdminError::new(
            ErrorCode::NotFound,
            format!(
                "pool {pool:?} not found; the pools are {}",
                names.join(", ")
            ),
        ));
    };
    let Some(slot) = state.backends.iter().find(|b| b.address == backend) else {
        let names: Vec<String> = state
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        return Err(AdminError::new(
            ErrorCode::NotFound,
            format!(
                "backend {backend} is not in pool {pool:?}; its backends are {}",
                names.join(", ")
            ),
        ));
    };
    let key = (pool.to_string(), backend);
    let was_drained = current.overrides.drained.contains(&key);
    let mut overrides = current.overrides.clone();
    if drain {
        overrides.drained.insert(key);
        if !force {
            // A route left with no usable backend in any of its weighted
            // pools would return 503 to every request.
            for route in &current.route_states {
                let uses_pool = route
                    .pools
                    .iter()
                    .any(|p| p.pool.name == pool && p.weight > 0);
                let left = route
                    .pools
                    .iter()
                    .filter(|p| p.weight > 0)
                    .map(|p| available_backends(&current, &p.pool.name, &overrides.drained))
                    .sum::<usize>();
                if uses_pool && left == 0 {
                    return Err(AdminError::new(
                        ErrorCode::Unsafe,
                        format!(
                            "draining {backend} would leave route {:?} with no healthy backend in a pool with weight; enable or fix another backend first, or pass force",
                            route.name
                        ),
                    ));
                }
            }
        }
    } else {
        overrides.drained.remove(&key);
    }
    let in_flight = slot.health.in_flight();
    let health = slot.health.state().as_str();
    let shifts = app.admin.shifts();
    let published = commit(app, &writer, &current, overrides, shifts)?;
    drop(writer);
    audit(
        command,
        &format!("{pool}/{backend}"),
        &json!({ "drained": was_drained }),
        &json!({ "drained": drain }),
        actor,
        Some(published.generation),
    );
    Ok(json!({
        "generation": published.generation,
        "pool": pool,
        "backend": backend.to_string(),
        "drained": drain,
        "was_drained": was_drained,
        "health": health,
        "in_flight": in_flight,
    }))
}

fn reload(app: &App, actor: Actor) -> Result<Value, AdminError> {
    let before = app.snapshots.load();
    let reloaded = crate::server::reload(app, "admin socket", actor).map_err(|errors| {
        let list: Vec<String> = errors.errors.iter().map(|e| e.to_string()).collect();
        AdminError::new(
            ErrorCode::ConfigInvalid,
            format!(
                "{} has {} error(s); the running config stays: {}",
                errors.file.display(),
                list.len(),
                list.join("; ")
            ),
        )
        .with("errors", json!(list))
    })?;
    let current = app.snapshots.load();
    let dropped: Vec<&String> = before
        .overrides
        .weights
        .keys()
        .filter(|route| !current.overrides.weights.contains_key(*route))
        .collect();
    let persisted = reloaded.state_file_written;
    audit(
        "reload",
        &current.config.source.display().to_string(),
        &json!(before.generation),
        &json!(current.generation),
        actor,
        Some(reloaded.generation),
    );
    Ok(json!({
        "generation": reloaded.generation,
        "needs_restart": reloaded.needs_restart,
        "dropped_runtime_weights": dropped,
        "cancelled_shifts": reloaded
            .cancelled_shifts
            .iter()
            .map(|shift| json!({ "route": shift.route, "to": shift.plan.to, "reason": shift.outcome }))
            .collect::<Vec<_>>(),
        "state_file_written": persisted,
    }))
}

/// Rewrites the state file after a config reload, so that it no longer
/// contains the weights and shifts the reload dropped or cancelled. Returns
/// false when the file could not be written, and true without a state file.
pub fn persist_after_reload(app: &App) -> bool {
    let _writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    let Some(path) = &current.config.admin.state_file else {
        return true;
    };
    let plans = app
        .admin
        .shifts()
        .into_iter()
        .map(|(route, shift)| (route, shift.plan))
        .collect();
    match state::write(path, &current.overrides, &plans, current.generation) {
        Ok(()) => true,
        Err(err) => {
            // The reload itself succeeded. The file still contains the old
            // runtime state, and routes whose pools changed are dropped
            // again at start.
            tracing::error!(state_file = %path.display(), error = %err, "failed to write the state file after a reload; check the folder's permissions and free space");
            false
        }
    }
}

/// Starts the controller task of a shift on the current runtime; it runs
/// while the route's shift is the one with this `controller` id.
pub fn spawn_shift(app: Arc<App>, route: String, controller: u64, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let task_app = Arc::clone(&app);
            let task_route = route.clone();
            let next =
                tokio::task::spawn_blocking(move || shift_tick(&task_app, &task_route, controller))
                    .await;
            match next {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    tracing::error!(route = %route, error = %err, "the shift controller failed; the weights stay as they are");
                    break;
                }
            }
        }
    });
}

/// Evaluates one window of the shift on `route` owned by `controller` and
/// acts on it. Returns whether the controller keeps running.
fn shift_tick(app: &App, route: &str, controller: u64) -> bool {
    if app.admin.is_handing_over() {
        return false;
    }
    let writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    let mut shifts = app.admin.shifts();
    let Some(mut active) = shifts.remove(route).filter(|s| s.controller == controller) else {
        return false;
    };
    let window = active.window.take();
    active.pending.merge(&window);

    // A reload cancels such a shift at once (see `cancel_stale_shifts`),
    // so this branch only guards against a snapshot published another way.
    let pools_match = super::stale_shift_reason(&current, route, &active.plan).is_none();
    let Some(index) = current.route_index(route).filter(|_| pools_match) else {
        let message = "stopped: the route or its pools changed in the config file".to_string();
        if commit(app, &writer, &current, current.overrides.clone(), shifts).is_ok() {
            app.admin.finish_shift(route, message.clone());
            tracing::warn!(route, to = %active.plan.to, "shift {message}");
            return false;
        }
        return true;
    };
    let weights = current.weights(index);
    active.last_window = Some(shift::window_json(&active.pending));
    match shift::judge(&active.pending, &active.plan.limits) {
        Verdict::Hold(state) => {
            active.state = state;
            shifts.insert(route.to_string(), active);
            app.admin.install_shifts(shifts);
            true
        }
        Verdict::Breach(reason) => {
            let mut overrides = current.overrides.clone();
            overrides
                .weights
                .insert(route.to_string(), active.plan.start_weights.clone());
            match commit(app, &writer, &current, overrides, shifts) {
                Ok(published) => {
                    let message = format!("rolled back automatically: {reason}");
                    app.admin.finish_shift(route, message.clone());
                    drop(writer);
                    tracing::warn!(route, to = %active.plan.to, reason = %reason, "shift rolled back automatically");
                    audit(
                        "rollback",
                        route,
                        &json!(weights),
                        &json!({ "weights": active.plan.start_weights, "reason": message }),
                        Actor::ShiftController,
                        Some(published.generation),
                    );
                    false
                }
                Err(err) => {
                    // NOTE: the breach is retried on the next tick; until the
                    // state file is writable, the shift weights stay.
                    tracing::error!(route, error = %err, "cannot roll back the shift");
                    active.state = format!("rollback failed: {err}");
                    let mut shifts = app.admin.shifts();
                    shifts.insert(route.to_string(), active);
                    app.admin.install_shifts(shifts);
                    true
                }
            }
        }
        Verdict::Pass if shift::is_complete(&weights, &active.plan.to) => {
            match commit(app, &writer, &current, current.overrides.clone(), shifts) {
                Ok(published) => {
                    app.admin
                        .finish_shift(route, format!("completed: {} at 100 %", active.plan.to));
                    drop(writer);
                    tracing::info!(route, to = %active.plan.to, "shift completed");
                    audit(
                        "shift",
                        route,
                        &json!(weights),
                        &json!({ "weights": weights, "completed": true }),
                        Actor::ShiftController,
                        Some(published.generation),
                    );
                    false
                }
                Err(err) => {
                    tracing::error!(route, error = %err, "cannot record the end of the shift");
                    true
                }
            }
        }
        Verdict::Pass => {
            let next = shift::next_weights(
                &weights,
                &active.plan.start_weights,
                &active.plan.to,
                active.plan.step,
            );
            active.pending = Default::default();
            active.state = format!(
                "stepping: {} at {} %",
                active.plan.to,
                shift::share_percent(&next, &active.plan.to)
            );
            let mut overrides = current.overrides.clone();
            overrides.weights.insert(route.to_string(), next.clone());
            shifts.insert(route.to_string(), active);
            match commit(app, &writer, &current, overrides, shifts) {
                Ok(published) => {
                    drop(writer);
                    tracing::info!(route, weights = %json!(next), "shift step");
                    audit(
                        "shift step",
                        route,
                        &json!(weights),
                        &json!(next),
                        Actor::ShiftController,
                        Some(published.generation),
                    );
                }
                Err(err) => {
                    tracing::error!(route, error = %err, "cannot take the shift step; retrying next window");
                }
            }
            true
        }
    }
}

/// Builds the `status` response.
pub fn status(app: &App) -> Value {
    let snapshot = app.snapshots.load();
    let shifts = app.admin.shifts();
    let finished = app.admin.finished();
    let routes: Vec<Value> = snapshot
        .route_states
        .iter()
        .enumerate()
        .map(|(index, route)| {
            let config = &snapshot.config.routes[index];
            let config_weights: BTreeMap<&String, u32> =
                config.pools.iter().map(|(p, w)| (p, *w)).collect();
            json!({
                "name": route.name,
                "path_prefix": config.path_prefix,
                "weights": snapshot.weights(index),
                "config_weights": config_weights,
                "weights_from": if snapshot.overrides.weights.contains_key(&route.name) { "runtime" } else { "config" },
                "shift": shifts.get(&route.name).map(ActiveShift::to_json),
                "last_shift": finished.get(&route.name),
            })
        })
        .collect();
    let pools: Vec<Value> = snapshot
        .pools
        .values()
        .map(|pool| {
            let backends: Vec<Value> = pool
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "health": b.health.state().as_str(),
                        "drained": b.drained,
                        "in_flight": b.health.in_flight(),
                        "last_error": b.health.last_error(),
                    })
                })
                .collect();
            json!({ "name": pool.name, "backends": backends })
        })
        .collect();
    let certificates = match app.admin.cert_control() {
        Ok(control) => control.list().unwrap_or_else(|e| json!({ "error": e })),
        Err(err) => json!({ "error": err.message }),
    };
    json!({
        "generation": snapshot.generation,
        "config": snapshot.config.source.display().to_string(),
        "state_file": snapshot.config.admin.state_file.as_ref().map(|p| p.display().to_string()),
        "routes": routes,
        "pools": pools,
        "certificates": certificates,
    })
}

/// Replaces the runtime state with what the state file holds, after a
/// binary upgrade: the previous process may have changed it after this one
/// read it at start.
pub fn adopt_state_file(app: &App) {
    let writer = app.snapshots.lock_writer();
    let current = app.snapshots.load();
    if current.config.admin.state_file.is_none() {
        return;
    }
    let restored = state::restore(&current.config);
    let shifts: BTreeMap<String, ActiveShift> = restored
        .shifts
        .into_iter()
        .map(|(route, plan)| {
            (
                route,
                ActiveShift::new(plan, "resumed after a binary upgrade"),
            )
        })
        .collect();
    let unchanged =
        restored.overrides == current.overrides && shifts.keys().eq(app.admin.shifts().keys());
    if unchanged {
        app.admin.install_shifts(shifts);
        return;
    }
    let next = Snapshot::build(
        Arc::clone(&current.config),
        restored.overrides,
        &app.registry,
        current.generation + 1,
    );
    let generation = next.generation;
    app.snapshots.store(next);
    app.admin.install_shifts(shifts);
    drop(writer);
    tracing::info!(
        generation,
        "adopted the runtime state the previous process wrote during the upgrade"
    );
}
