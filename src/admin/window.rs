//! Outcome samples of the pool a shift moves traffic to, measured by the
//! proxy itself in its `logging` phase.
//!
//! Only routes with a shift in progress are tracked, so a request on any
//! other route costs one lock-free map load. A tracked pool has one window
//! of atomic counters and a fixed-bucket latency histogram; the shift
//! controller reads and resets it once per step interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

/// Upper bounds of the latency histogram buckets, in milliseconds. A sample
/// above the last bound lands in an overflow bucket.
pub const LATENCY_BOUNDS_MS: [u64; 18] = [
    1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 5_000, 10_000, 30_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Counters of one pool on one route since the last [`PoolWindow::take`].
#[derive(Debug)]
pub struct PoolWindow {
    pub pool: String,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

/// Measurements of one or more windows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    pub requests: u64,
    /// Responses with status 5xx plus requests that failed on the upstream
    /// side (connect or read error) without a response.
    pub errors: u64,
    latency: [u64; BUCKETS],
}

impl PoolWindow {
    pub fn new(pool: &str) -> PoolWindow {
        PoolWindow {
            pool: pool.to_string(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    pub fn add(&self, failed: bool, elapsed: Duration) {
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the counts since the previous call and starts a new window.
    /// A sample recorded while this runs may be split between the two
    /// windows; one request out of a window does not change a decision.
    pub fn take(&self) -> WindowStats {
        WindowStats {
            requests: self.requests.swap(0, Ordering::Relaxed),
            errors: self.errors.swap(0, Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].swap(0, Ordering::Relaxed)),
        }
    }
}

impl WindowStats {
    pub fn merge(&mut self, other: &WindowStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (total, add) in self.latency.iter_mut().zip(other.latency.iter()) {
            *total += add;
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Returns the 99th percentile latency as the upper bound of the bucket that
    /// contains it, so it overestimates by at most one bucket width. `None`
    /// for an empty window; `Duration::MAX` when it lies in the overflow bucket.
    pub fn p99(&self) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the 99th percentile sample, rounded up.
        let rank = total.saturating_mul(99).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(
                    LATENCY_BOUNDS_MS
                        .get(i)
                        .map_or(Duration::MAX, |ms| Duration::from_millis(*ms)),
                );
            }
        }
        Some(Duration::MAX)
    }
}

/// The windows of the routes under a shift, keyed by route name.
#[derive(Default)]
pub struct Outcomes {
    tracked: ArcSwap<HashMap<String, Arc<PoolWindow>>>,
}

impl Outcomes {
    /// Records one finished request. `failed` is a 5xx status or an upstream
    /// error; `elapsed` is the whole request as the proxy timed it.
    pub fn record(&self, route: &str, pool: &str, failed: bool, elapsed: Duration) {
        let tracked = self.tracked.load();
        if let Some(window) = tracked.get(route) {
            if window.pool == pool {
                window.add(failed, elapsed);
            }
        }
    }

    /// Replaces the set of tracked windows. Called under the snapshot writer
    /// lock, so two writers never race here.
    pub fn set(&self, windows: HashMap<String, Arc<PoolWindow>>) {
        self.tracked.store(Arc::new(windows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_picks_bucket_upper_bound() {
        let window = PoolWindow::new("green");
        for _ in 0..99 {
            window.add(false, Duration::from_millis(3));
        }
        window.add(true, Duration::from_millis(900));
        let stats = window.take();
        assert_eq!(stats.requests, 100);
        assert_eq!(stats.errors, 1);
        assert_eq!(stats.p99(), Some(Duration::from_millis(5)));
        window.add(false, Duration::from_millis(900));
        window.add(false, Duration::from_millis(900));
        let mut merged = stats.clone();
        merged.merge(&window.take());
        assert_eq!(merged.requests, 102);
        assert_eq!(merged.p99(), Some(Duration::from_millis(1_000)));
    }

    #[test]
    fn take_starts_a_new_window() {
        let window = PoolWindow::new("green");
        window.add(true, Duration::from_secs(60));
        let first = window.take();
        assert_eq!(first.p99(), Some(Duration::MAX));
        assert!((first.error_rate() - 1.0).abs() < f64::EPSILON);
        let second = window.take();
        assert_eq!(second.requests, 0);
        assert_eq!(second.p99(), None);
    }

    #[test]
    fn outcomes_record_only_tracked_pool() {
        let outcomes = Outcomes::default();
        let window = Arc::new(PoolWindow::new("green"));
        outcomes.set(HashMap::from([("app".to_string(), Arc::clone(&window))]));
        outcomes.record("app", "green", false, Duration::from_millis(1));
        outcomes.record("app", "blue", false, Duration::from_millis(1));
        outcomes.record("other", "green", false, Duration::from_millis(1));
        assert_eq!(window.take().requests, 1);
    }
}
