//! Selection algorithms: smooth weighted round robin and least connections.
//!
//! Smooth weighted round robin is the algorithm nginx uses for its upstreams:
//! on each pick every eligible peer's current value grows by its weight, the
//! peer with the highest value wins and loses the sum of the eligible weights.
//! Weights 90/10 therefore interleave (nine picks of one, then one of the
//! other, spread out) instead of arriving in bursts of ninety. A peer with
//! weight 0 is never picked, whatever else is unavailable.

use std::sync::Mutex;

/// Smooth weighted round robin state over a fixed list of peers.
#[derive(Debug)]
pub struct SmoothWrr {
    current: Mutex<Vec<i64>>,
}

impl SmoothWrr {
    pub fn new(peers: usize) -> SmoothWrr {
        SmoothWrr {
            current: Mutex::new(vec![0; peers]),
        }
    }

    /// Picks a peer among those with `weight(i) > 0`; `weight` returns 0 for
    /// peers that are currently ineligible (unhealthy, drained, excluded).
    pub fn pick(&self, weight: impl Fn(usize) -> u32) -> Option<usize> {
        // A poisoned lock only means another thread panicked mid-pick; the
        // counters are still plain integers, so keep using them.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, value) in current.iter_mut().enumerate() {
            let w = i64::from(weight(i));
            if w == 0 {
                continue;
            }
            *value += w;
            total += w;
            if best.is_none_or(|(_, best_value)| *value > best_value) {
                best = Some((i, *value));
            }
        }
        let (best, _) = best?;
        current[best] -= total;
        Some(best)
    }
}

/// Picks the eligible peer with the fewest requests in flight relative to its
/// weight. Ties go to the first such peer after `start`, so that equal peers
/// share the load instead of the first one taking every tie.
pub fn least_connections(
    peers: usize,
    start: usize,
    weight: impl Fn(usize) -> u32,
    in_flight: impl Fn(usize) -> usize,
) -> Option<usize> {
    let mut best: Option<(usize, u128, u128)> = None;
    for step in 0..peers {
        let i = (start + step) % peers;
        let w = weight(i);
        if w == 0 {
            continue;
        }
        let load = in_flight(i) as u128;
        let w = u128::from(w);
        // Compare load_i / w_i < load_b / w_b without division.
        let better = match best {
            None => true,
            Some((_, best_load, best_w)) => load * best_w < best_load * w,
        };
        if better {
            best = Some((i, load, w));
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(weights: &[u32], picks: usize) -> Vec<usize> {
        let wrr = SmoothWrr::new(weights.len());
        (0..picks)
            .filter_map(|_| wrr.pick(|i| weights[i]))
            .collect()
    }

    #[test]
    fn smooth_interleaves() {
        let picks = sequence(&[5, 1, 1], 7);
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn ninety_ten_has_no_long_bursts() {
        let picks = sequence(&[90, 10], 1000);
        let ones = picks.iter().filter(|p| **p == 1).count();
        assert_eq!(ones, 100);
        let mut longest = 0;
        let mut run = 0;
        for p in &picks {
            run = if *p == 0 { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        assert!(longest <= 9, "run of {longest} picks of the heavy peer");
    }

    #[test]
    fn zero_weight_never_picked() {
        let picks = sequence(&[0, 3], 50);
        assert!(picks.iter().all(|p| *p == 1));
        assert_eq!(sequence(&[0, 0], 5), Vec::<usize>::new());
    }

    #[test]
    fn least_connections_prefers_idle_and_weight() {
        let in_flight = [3usize, 1, 1];
        assert_eq!(least_connections(3, 0, |_| 1, |i| in_flight[i]), Some(1));
        assert_eq!(least_connections(3, 2, |_| 1, |i| in_flight[i]), Some(2));
        // Weight 4 with 3 in flight beats weight 1 with 1 in flight.
        let weights = [4u32, 1, 1];
        assert_eq!(
            least_connections(3, 0, |i| weights[i], |i| in_flight[i]),
            Some(0)
        );
        assert_eq!(least_connections(3, 0, |_| 0, |i| in_flight[i]), None);
    }
}
