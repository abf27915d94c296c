//! Progressive shifts: moving a route's traffic to one pool in steps, with
//! a check of that pool's own errors and latency before every step.
//!
//! During a shift the route's weights are percentages that add up to 100.
//! Each step gives the target pool `step` more percentage points and splits
//! the rest among the other pools in proportion to their weights when the
//! shift began. Before each step the controller reads the target pool's
//! window (see [`super::window`]): with fewer than `min_requests` samples it
//! holds and keeps collecting; above `max_error_rate` or `max_p99` it puts
//! back the weights the shift started from. After the step that reaches
//! 100 %, one more window must pass before the shift counts as complete.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::window::{PoolWindow, WindowStats};

/// Limits a shift is checked against, with the request's values or the
/// config's defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Highest tolerated share of failed requests, from 0 to 1.
    pub max_error_rate: f64,
    /// Highest tolerated 99th percentile latency, in milliseconds.
    pub max_p99_ms: u64,
    /// Minimum samples a window needs before a decision is made.
    pub min_requests: u64,
}

/// A shift as the state file stores it, enough to resume it after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShiftPlan {
    pub route: String,
    pub to: String,
    /// Percentage points moved per step.
    pub step: u32,
    /// Time between steps, in milliseconds.
    pub every_ms: u64,
    pub limits: Limits,
    /// The route's weights before the shift; a rollback restores them.
    pub start_weights: BTreeMap<String, u32>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
}

impl ShiftPlan {
    pub fn every(&self) -> Duration {
        Duration::from_millis(self.every_ms)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "to": self.to,
            "step": self.step,
            "every": humantime::format_duration(self.every()).to_string(),
            "max_error_rate": self.limits.max_error_rate,
            "max_p99": humantime::format_duration(Duration::from_millis(self.limits.max_p99_ms)).to_string(),
            "min_requests": self.limits.min_requests,
            "start_weights": self.start_weights,
            "started_at": self.started_at,
        })
    }
}

/// A shift in progress: its plan plus what the controller has seen so far.
#[derive(Clone, Debug)]
pub struct ActiveShift {
    pub plan: ShiftPlan,
    /// Identifies the controller task that owns this shift, so a task left
    /// over from a stopped shift never acts on a newer one.
    pub controller: u64,
    pub window: Arc<PoolWindow>,
    /// Samples of windows that held because they had too few requests;
    /// they count toward the next decision.
    pub pending: WindowStats,
    /// The controller's last action, for `status`.
    pub state: String,
    pub last_window: Option<Value>,
}

impl ActiveShift {
    pub fn new(plan: ShiftPlan, state: &str) -> ActiveShift {
        static NEXT_CONTROLLER: AtomicU64 = AtomicU64::new(1);
        let window = Arc::new(PoolWindow::new(&plan.to));
        ActiveShift {
            plan,
            controller: NEXT_CONTROLLER.fetch_add(1, Ordering::Relaxed),
            window,
            pending: WindowStats::default(),
            state: state.to_string(),
            last_window: None,
        }
    }

    pub fn to_json(&self) -> Value {
        let mut value = self.plan.to_json();
        if let Value::Object(map) = &mut value {
            map.insert("state".into(), Value::String(self.state.clone()));
            map.insert(
                "last_window".into(),
                self.last_window.clone().unwrap_or(Value::Null),
            );
        }
        value
    }
}

/// What the controller decides after reading a window.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Too few samples; keep the weights and keep collecting.
    Hold(String),
    /// A limit was exceeded; put the starting weights back.
    Breach(String),
    /// Within limits; take the next step, or finish when at 100 %.
    Pass,
}

/// Checks accumulated samples against the limits.
pub fn judge(stats: &WindowStats, limits: &Limits) -> Verdict {
    if stats.requests < limits.min_requests {
        return Verdict::Hold(format!(
            "holding: {} requests < {} (min_requests)",
            stats.requests, limits.min_requests
        ));
    }
    let rate = stats.error_rate();
    if rate > limits.max_error_rate {
        return Verdict::Breach(format!(
            "error rate {:.3} ({} of {} requests) > max_error_rate {}",
            rate, stats.errors, stats.requests, limits.max_error_rate
        ));
    }
    if let Some(p99) = stats.p99() {
        let limit = Duration::from_millis(limits.max_p99_ms);
        if p99 > limit {
            let measured = if p99 == Duration::MAX {
                "above 30s".to_string()
            } else {
                format!("<= {}", humantime::format_duration(p99))
            };
            return Verdict::Breach(format!(
                "p99 latency {measured} over {} requests > max_p99 {}",
                stats.requests,
                humantime::format_duration(limit)
            ));
        }
    }
    Verdict::Pass
}

/// Summarizes a window for `status` and logs.
pub fn window_json(stats: &WindowStats) -> Value {
    json!({
        "requests": stats.requests,
        "errors": stats.errors,
        "error_rate": stats.error_rate(),
        "p99_ms": stats.p99().map(|d| if d == Duration::MAX { Value::Null } else { json!(d.as_millis() as u64) }),
    })
}

/// Returns the target pool's share of `weights` in whole percent.
pub fn share_percent(weights: &BTreeMap<String, u32>, to: &str) -> u32 {
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let target = u64::from(weights.get(to).copied().unwrap_or(0));
    if total == 0 {
        return 0;
    }
    ((target * 100 + total / 2) / total) as u32
}

/// Returns whether `weights` already send everything to `to`.
pub fn is_complete(weights: &BTreeMap<String, u32>, to: &str) -> bool {
    weights
        .iter()
        .all(|(pool, weight)| pool == to || *weight == 0)
        && weights.get(to).is_some_and(|w| *w > 0)
}

/// Computes the weights after one more step toward `to`, as percentages adding up
/// to 100. The other pools share the rest in proportion to `start`, with
/// the largest remainders rounded up so the sum is exact.
pub fn next_weights(
    current: &BTreeMap<String, u32>,
    start: &BTreeMap<String, u32>,
    to: &str,
    step: u32,
) -> BTreeMap<String, u32> {
    let share = (share_percent(current, to) + step).min(100);
    let rest = 100 - share;
    let others: Vec<(&String, u64)> = start
        .iter()
        .filter(|(pool, _)| pool.as_str() != to)
        .map(|(pool, weight)| (pool, u64::from(*weight)))
        .collect();
    let mut total: u64 = others.iter().map(|(_, w)| w).sum();
    // Pools that had no weight at the start share nothing, unless none had.
    let even = total == 0;
    if even {
        total = others.len() as u64;
    }
    let mut next = BTreeMap::new();
    next.insert(to.to_string(), share);
    if others.is_empty() || total == 0 {
        next.insert(to.to_string(), 100);
        return next;
    }
    let mut assigned = 0u32;
    let mut remainders = Vec::new();
    for (pool, weight) in &others {
        let weight = if even { 1 } else { *weight };
        let exact = u64::from(rest) * weight;
        let floor = (exact / total) as u32;
        assigned += floor;
        remainders.push((exact % total, (*pool).clone()));
        next.insert((*pool).clone(), floor);
    }
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, pool) in remainders.iter().take((rest - assigned) as usize) {
        if let Some(weight) = next.get_mut(pool) {
            *weight += 1;
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(p, w)| (p.to_string(), *w)).collect()
    }

    #[test]
    fn steps_reach_one_hundred() {
        let start = weights(&[("blue", 100), ("green", 0)]);
        let mut current = start.clone();
        let mut seen = Vec::new();
        while !is_complete(&current, "green") {
            current = next_weights(&current, &start, "green", 30);
            seen.push(current["green"]);
            assert_eq!(current.values().sum::<u32>(), 100);
        }
        assert_eq!(seen, vec![30, 60, 90, 100]);
    }

    #[test]
    fn rest_follows_start_proportions() {
        let start = weights(&[("a", 3), ("b", 1), ("green", 0)]);
        let next = next_weights(&start, &start, "green", 20);
        assert_eq!(next, weights(&[("a", 60), ("b", 20), ("green", 20)]));
        let odd = weights(&[("a", 1), ("b", 1), ("c", 1), ("green", 0)]);
        let next = next_weights(&odd, &odd, "green", 10);
        assert_eq!(next.values().sum::<u32>(), 100);
        assert_eq!(next["green"], 10);
    }

    #[test]
    fn judge_holds_breaches_and_passes() {
        let limits = Limits {
            max_error_rate: 0.05,
            max_p99_ms: 500,
            min_requests: 10,
        };
        let window = PoolWindow::new("green");
        for _ in 0..5 {
            window.add(false, Duration::from_millis(2));
        }
        let mut stats = window.take();
        assert!(matches!(judge(&stats, &limits), Verdict::Hold(_)));
        for _ in 0..15 {
            window.add(false, Duration::from_millis(2));
        }
        stats.merge(&window.take());
        assert_eq!(judge(&stats, &limits), Verdict::Pass);
        for _ in 0..5 {
            window.add(true, Duration::from_millis(2));
        }
        stats.merge(&window.take());
        assert!(matches!(judge(&stats, &limits), Verdict::Breach(m) if m.contains("error rate")));
        for _ in 0..20 {
            window.add(false, Duration::from_secs(2));
        }
        let slow = window.take();
        assert!(matches!(judge(&slow, &limits), Verdict::Breach(m) if m.contains("p99")));
    }
}
