//! Open-loop arrival schedule: request `n` is due at `start + n / rate`,
//! whatever happened to earlier requests. Latency is measured from that
//! due time, so a stalled server is charged for the requests it delayed
//! (no coordinated omission).

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    /// Requests per second; finite and above zero.
    rate: f64,
}

impl Schedule {
    /// Returns `None` unless `rate` is finite and above zero.
    pub fn new(start: Instant, rate: f64) -> Option<Schedule> {
        if rate.is_finite() && rate > 0.0 {
            Some(Schedule { start, rate })
        } else {
            None
        }
    }

    /// Offset of request `n` from the start. Computed by multiplication,
    /// not by summing intervals, so rounding never accumulates.
    pub fn offset(&self, n: u64) -> Duration {
        Duration::from_secs_f64(n as f64 / self.rate)
    }

    /// Due time of request `n`.
    pub fn due(&self, n: u64) -> Instant {
        self.start + self.offset(n)
    }

    /// Number of requests due strictly before `elapsed` from the start.
    pub fn count_before(&self, elapsed: Duration) -> u64 {
        let exact = elapsed.as_secs_f64() * self.rate;
        let count = exact.ceil() as u64;
        // `n` is due before `elapsed` when n / rate < elapsed.
        if count > 0 && self.offset(count - 1) >= elapsed {
            count - 1
        } else {
            count
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_evenly_spaced() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000.0).unwrap();
        assert_eq!(schedule.due(0), start);
        assert_eq!(schedule.offset(1), Duration::from_millis(1));
        assert_eq!(schedule.offset(1500), Duration::from_millis(1500));
        for n in 1..2000 {
            let gap = schedule.offset(n) - schedule.offset(n - 1);
            let error = gap.as_nanos() as i128 - 1_000_000;
            assert!(error.abs() <= 1, "gap before {n} was {gap:?}");
        }
    }

    #[test]
    fn no_drift_over_long_runs() {
        let schedule = Schedule::new(Instant::now(), 3.0).unwrap();
        // One hour at 3 req/s: request 10,800 is due at exactly 3,600 s.
        let offset = schedule.offset(10_800);
        let error = offset.as_nanos() as i128 - 3_600_000_000_000;
        assert!(error.abs() < 1_000, "{offset:?}");
    }

    #[test]
    fn counts_requests_in_a_window() {
        let schedule = Schedule::new(Instant::now(), 100.0).unwrap();
        assert_eq!(schedule.count_before(Duration::ZERO), 0);
        assert_eq!(schedule.count_before(Duration::from_secs(10)), 1000);
        assert_eq!(schedule.count_before(Duration::from_millis(15)), 2);
        assert_eq!(schedule.count_before(Duration::from_millis(10)), 1);
        assert_eq!(schedule.count_before(Duration::from_micros(10_001)), 2);
    }

    #[test]
    fn rejects_bad_rates() {
        let now = Instant::now();
        assert!(Schedule::new(now, 0.0).is_none());
        assert!(Schedule::new(now, -5.0).is_none());
        assert!(Schedule::new(now, f64::NAN).is_none());
        assert!(Schedule::new(now, f64::INFINITY).is_none());
    }
}
