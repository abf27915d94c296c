//! Renewal planning: when to order for each host, from the served
//! certificate, the ARI window or the lifetime rule, and the back-off.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{certificate_identifier, AcmeManager, AriState, Decision, HAND_PLACED_MARGIN};
use crate::acme::journal::Outcome;
use crate::acme::schedule::{ari_plan, from_unix_seconds, lifetime_renewal_time, unix_seconds};
use crate::acme::store::CurrentCert;

impl AcmeManager {
    /// Decides whether to order for `host` now and updates its schedule.
    pub(super) async fn decide(&self, host: &str, now: SystemTime) -> Decision {
        let current = self.store.current(host);
        let decision = self.decide_inner(host, now, current).await;
        let next = match decision {
            Decision::Order(_) => Some(now),
            Decision::Wait(at) => Some(at),
        };
        let changed = {
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            let state = states.entry(host.to_string()).or_default();
            let changed = state.next_renewal != next;
            state.next_renewal = next;
            changed
        };
        if changed {
            if let Some(observer) = &self.observer {
                observer.renewal_scheduled(host, next);
            }
        }
        decision
    }

    async fn decide_inner(
        &self,
        host: &str,
        now: SystemTime,
        current: Option<CurrentCert>,
    ) -> Decision {
        let retry_at = self.with_state(host, |s| s.retry_at);
        if let Some(retry_at) = retry_at.filter(|at| *at > now) {
            self.with_state(host, |s| s.basis = "retry");
            return Decision::Wait(retry_at);
        }
        let Some(current) = current else {
            self.with_state(host, |s| s.basis = "missing");
            return Decision::Order("no certificate");
        };
        if !current.managed_by_acme {
            self.with_state(host, |s| s.basis = "hand-placed");
            // The store serves the certificate valid longest, so a
            // hand-placed one may hide a newer ACME certificate. Ordering
            // again would only add another hidden one.
            if let Some(due) = self.issued_certificate_due(host).filter(|due| *due > now) {
                return Decision::Wait(due);
            }
            let due = hand_placed_due(&current, self.options.renewal.remaining_fraction);
            if now >= due {
                return Decision::Order("hand-placed certificate near expiry");
            }
            return Decision::Wait(due);
        }

        let renewal = &self.options.renewal;
        let new_serial = self.with_state(host, |s| s.serial.as_deref() != Some(&current.serial));
        if new_serial {
            let lifetime_at = lifetime_renewal_time(
                current.not_before,
                current.not_after,
                renewal.remaining_fraction,
                renewal.jitter_fraction,
                rand::random(),
            );
            self.with_state(host, |s| {
                s.serial = Some(current.serial.clone());
                s.lifetime_renew_at = Some(lifetime_at);
                s.ari = None;
                s.ari_next_check = Some(now);
            });
        }
        let ari_due = self.with_state(host, |s| s.ari_next_check.is_some_and(|at| at <= now));
        if ari_due && now < current.not_after && !self.ari_unsupported.load(Ordering::Relaxed) {
            self.refresh_ari(host, &current, now).await;
        }
        let (renew_at, basis, next_check) = self.with_state(host, |s| match s.ari {
            Some(ari) => (ari.renew_at, "ari", s.ari_next_check),
            None => (
                s.lifetime_renew_at.unwrap_or(now),
                "lifetime",
                s.ari_next_check,
            ),
        });
        self.with_state(host, |s| s.basis = basis);
        if now >= renew_at {
            return Decision::Order(if basis == "ari" {
                "renewal inside the ARI window"
            } else {
                "renewal at the lifetime threshold"
            });
        }
        let ari_check = next_check.filter(|_| !self.ari_unsupported.load(Ordering::Relaxed));
        Decision::Wait(ari_check.map_or(renew_at, |at| at.min(renew_at)))
    }

    /// Fetches the CA's suggested renewal window for the served certificate
    /// and updates the plan. Errors keep the lifetime plan.
    async fn refresh_ari(&self, host: &str, current: &CurrentCert, now: SystemTime) {
        let retry_later = now
            + self
                .options
                .renewal
                .retry_initial
                .max(Duration::from_secs(60));
        let Some(cert_id) = certificate_identifier(&current.leaf_der) else {
            tracing::debug!(host, "served certificate has no AKI; ARI is skipped for it");
            self.with_state(host, |s| s.ari_next_check = None);
            return;
        };
        let account = match self.account().await {
            Ok(account) => account,
            Err(failure) => {
                tracing::warn!(host, error = %failure, "cannot fetch ACME renewal information");
                self.with_state(host, |s| s.ari_next_check = Some(retry_later));
                return;
            }
        };
        match account.renewal_info(&cert_id).await {
            Ok((info, retry_after)) => {
                self.ari_seen.store(true, Ordering::Relaxed);
                let window = (
                    from_unix_seconds(info.suggested_window.start.unix_timestamp()),
                    from_unix_seconds(info.suggested_window.end.unix_timestamp()),
                );
                let previous = self.with_state(host, |s| s.ari);
                match ari_plan(window.0, window.1, retry_after, now, rand::random()) {
                    Ok(plan) => {
                        // Keep the point already chosen while the window
                        // stays the same, so each check does not re-roll it.
                        let renew_at = match previous {
                            Some(p) if p.window == window => p.renew_at,
                            _ => {
                                tracing::info!(
                                    host,
                                    window_start = unix_seconds(window.0),
                                    window_end = unix_seconds(window.1),
                                    renew_at = unix_seconds(plan.renew_at),
                                    explanation = info.explanation_url.as_deref().unwrap_or(""),
                                    "ACME renewal window received"
                                );
                                plan.renew_at
                            }
                        };
                        let renew_at = renew_at.min(current.not_after);
                        self.with_state(host, |s| {
                            s.ari = Some(AriState { window, renew_at });
                            s.ari_next_check = Some(plan.next_check);
                        });
                    }
                    Err(message) => {
                        tracing::warn!(host, error = %message, "ignoring the ACME renewal window");
                        self.with_state(host, |s| s.ari_next_check = Some(retry_later));
                    }
                }
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                self.ari_unsupported.store(true, Ordering::Relaxed);
                tracing::info!(
                    directory = %self.options.directory_url,
                    "the CA offers no renewal information (ARI); renewing by certificate lifetime"
                );
            }
            Err(err) => {
                tracing::warn!(host, error = %err, "cannot fetch ACME renewal information");
                self.with_state(host, |s| s.ari_next_check = Some(retry_later));
            }
        }
    }

    /// When the last certificate this manager issued for `host` is due for
    /// renewal, from the journal.
    fn issued_certificate_due(&self, host: &str) -> Option<SystemTime> {
        let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let entry = journal
            .entries()
            .iter()
            .rev()
            .find(|e| e.host == host && e.outcome == Outcome::Issued)?;
        let not_after = from_unix_seconds(entry.not_after?);
        Some(lifetime_renewal_time(
            from_unix_seconds(entry.started_at),
            not_after,
            self.options.renewal.remaining_fraction,
            0.0,
            0.0,
        ))
    }
}

/// When a certificate not issued by the manager is replaced: once less than
/// 30 days or less than `remaining_fraction` of its lifetime remains,
/// whichever comes later.
pub(super) fn hand_placed_due(current: &CurrentCert, remaining_fraction: f64) -> SystemTime {
    let by_fraction = lifetime_renewal_time(
        current.not_before,
        current.not_after,
        remaining_fraction,
        0.0,
        0.0,
    );
    let by_margin = current
        .not_after
        .checked_sub(HAND_PLACED_MARGIN)
        .unwrap_or(current.not_before);
    by_fraction.max(by_margin)
}
