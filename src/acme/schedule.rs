//! Pure renewal-time arithmetic: the lifetime rule, the ARI window
//! (RFC 9773) and the retry back-off. Randomness comes in as a number in
//! `[0, 1)` so that tests can pin it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bounds for a renewal-information `Retry-After`: RFC 9773 section 4.3
/// names one minute and one day as reasonable limits.
pub const ARI_RETRY_AFTER_MIN: Duration = Duration::from_secs(60);
pub const ARI_RETRY_AFTER_MAX: Duration = Duration::from_secs(24 * 3600);

/// Returns the point at which a certificate valid from `not_before` to `not_after`
/// is renewed: when `remaining_fraction` of the lifetime remains, moved
/// earlier by `random * jitter_fraction` of the lifetime. Never before
/// `not_before`. A certificate whose `not_after` does not follow its
/// `not_before` is due at `not_before`.
pub fn lifetime_renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    remaining_fraction: f64,
    jitter_fraction: f64,
    random: f64,
) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    let remaining = lifetime.mul_f64(remaining_fraction.clamp(0.0, 1.0));
    let jitter = lifetime.mul_f64((jitter_fraction * random.clamp(0.0, 1.0)).clamp(0.0, 1.0));
    let point = not_after
        .checked_sub(remaining + jitter)
        .unwrap_or(not_before);
    point.max(not_before)
}

/// A renewal plan taken from an ARI response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AriPlan {
    /// When to place the order: a uniformly random point of the window, or
    /// `now` when that point has passed.
    pub renew_at: SystemTime,
    /// When to fetch the renewal information again: `now` plus the server's
    /// `Retry-After`, clamped to one minute to one day.
    pub next_check: SystemTime,
}

/// Turns a suggested window into a plan. An invalid window (end not after
/// start) is an error, which RFC 9773 section 4.2 requires clients to
/// treat as no response at all.
pub fn ari_plan(
    window_start: SystemTime,
    window_end: SystemTime,
    retry_after: Duration,
    now: SystemTime,
    random: f64,
) -> Result<AriPlan, String> {
    let width = match window_end.duration_since(window_start) {
        Ok(width) if !width.is_zero() => width,
        _ => {
            return Err(format!(
                "invalid ARI window: end {} is not after start {}",
                unix_seconds(window_end),
                unix_seconds(window_start)
            ))
        }
    };
    let pick = window_start + width.mul_f64(random.clamp(0.0, 1.0));
    let retry = retry_after.clamp(ARI_RETRY_AFTER_MIN, ARI_RETRY_AFTER_MAX);
    Ok(AriPlan {
        renew_at: pick.max(now),
        next_check: now + retry,
    })
}

/// Delay before the next order after `failures` consecutive failures:
/// `initial * 2^(failures-1)`, capped at `max`, then scaled to between half
/// and all of it by `random`. Zero failures means no delay.
pub fn retry_delay(failures: u32, initial: Duration, max: Duration, random: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
    let base = initial.saturating_mul(factor).min(max);
    base.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
}

/// Seconds since the Unix epoch; negative before 1970.
pub fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs() as i64,
        Err(before) => -(before.duration().as_secs() as i64),
    }
}

/// Returns the time `seconds` after the Unix epoch.
pub fn from_unix_seconds(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instant_acme::RenewalInfo;

    fn at(seconds: i64) -> SystemTime {
        from_unix_seconds(seconds)
    }

    /// Parses the window of an RFC 9773 JSON response as the manager does.
    fn window(json: &str) -> (SystemTime, SystemTime, Option<String>) {
        let info: RenewalInfo = serde_json::from_str(json).unwrap();
        (
            at(info.suggested_window.start.unix_timestamp()),
            at(info.suggested_window.end.unix_timestamp()),
            info.explanation_url,
        )
    }

    #[test]
    fn lifetime_renews_at_two_thirds() {
        let not_before = at(1_000_000);
        let not_after = at(1_000_000 + 90 * 86_400);
        let point = lifetime_renewal_time(not_before, not_after, 1.0 / 3.0, 0.05, 0.0);
        assert_eq!(unix_seconds(point), 1_000_000 + 60 * 86_400);
    }

    #[test]
    fn lifetime_jitter_only_moves_earlier() {
        let not_before = at(0);
        let not_after = at(900);
        let early = lifetime_renewal_time(not_before, not_after, 1.0 / 3.0, 0.1, 1.0);
        let late = lifetime_renewal_time(not_before, not_after, 1.0 / 3.0, 0.1, 0.0);
        assert_eq!(unix_seconds(late), 600);
        assert_eq!(unix_seconds(early), 510);
    }

    #[test]
    fn lifetime_inverted_validity_is_due_now() {
        let point = lifetime_renewal_time(at(500), at(100), 1.0 / 3.0, 0.05, 0.5);
        assert_eq!(unix_seconds(point), 500);
    }

    #[test]
    fn ari_window_in_future_picks_inside() {
        let (start, end, explanation) = window(
            r#"{"suggestedWindow": {"start": "2030-01-02T04:00:00Z", "end": "2030-01-03T04:00:00Z"},
                "explanationURL": "https://acme.example.com/docs/ari"}"#,
        );
        assert_eq!(
            explanation.as_deref(),
            Some("https://acme.example.com/docs/ari")
        );
        let now = at(unix_seconds(start) - 86_400);
        let plan = ari_plan(start, end, Duration::from_secs(21_600), now, 0.25).unwrap();
        assert_eq!(unix_seconds(plan.renew_at), unix_seconds(start) + 21_600);
        assert!(plan.renew_at >= start);
        assert!(plan.renew_at < end);
        assert_eq!(unix_seconds(plan.next_check), unix_seconds(now) + 21_600);
    }

    #[test]
    fn ari_window_in_past_renews_now() {
        let (start, end, explanation) = window(
            r#"{"suggestedWindow": {"start": "2021-01-02T04:00:00Z", "end": "2021-01-03T04:00:00Z"}}"#,
        );
        assert_eq!(explanation, None);
        let now = at(unix_seconds(end) + 3600);
        let plan = ari_plan(start, end, Duration::from_secs(3600), now, 0.9).unwrap();
        assert_eq!(plan.renew_at, now);
    }

    #[test]
    fn ari_window_around_now_may_pick_future() {
        let now = at(10_000);
        let plan = ari_plan(at(9_000), at(13_000), Duration::from_secs(600), now, 0.75).unwrap();
        assert_eq!(unix_seconds(plan.renew_at), 12_000);
        let plan = ari_plan(at(9_000), at(13_000), Duration::from_secs(600), now, 0.1).unwrap();
        assert_eq!(plan.renew_at, now);
    }

    #[test]
    fn ari_retry_after_is_clamped() {
        let now = at(50_000);
        let short = ari_plan(at(60_000), at(70_000), Duration::from_secs(5), now, 0.5).unwrap();
        assert_eq!(unix_seconds(short.next_check), 50_060);
        let long = ari_plan(
            at(60_000),
            at(70_000),
            Duration::from_secs(7 * 86_400),
            now,
            0.5,
        )
        .unwrap();
        assert_eq!(unix_seconds(long.next_check), 50_000 + 86_400);
    }

    #[test]
    fn ari_inverted_window_is_rejected() {
        let (start, end, _) = window(
            r#"{"suggestedWindow": {"start": "2030-01-03T04:00:00Z", "end": "2030-01-02T04:00:00Z"}}"#,
        );
        let error = ari_plan(start, end, Duration::from_secs(60), at(0), 0.5).unwrap_err();
        assert!(error.contains("invalid ARI window"), "{error}");
        let error = ari_plan(start, start, Duration::from_secs(60), at(0), 0.5).unwrap_err();
        assert!(error.contains("not after start"), "{error}");
    }

    #[test]
    fn retry_delay_doubles_and_caps() {
        let initial = Duration::from_secs(300);
        let max = Duration::from_secs(3600);
        assert_eq!(retry_delay(0, initial, max, 1.0), Duration::ZERO);
        assert_eq!(retry_delay(1, initial, max, 1.0), Duration::from_secs(300));
        assert_eq!(retry_delay(2, initial, max, 1.0), Duration::from_secs(600));
        assert_eq!(retry_delay(3, initial, max, 0.0), Duration::from_secs(600));
        assert_eq!(retry_delay(5, initial, max, 1.0), Duration::from_secs(3600));
        assert_eq!(retry_delay(u32::MAX, initial, max, 1.0), max);
    }

    #[test]
    fn unix_seconds_round_trip() {
        for seconds in [-86_400, 0, 1_700_000_000] {
            assert_eq!(unix_seconds(from_unix_seconds(seconds)), seconds);
        }
    }
}
