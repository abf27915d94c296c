//! ACME certificate manager: obtains and renews a certificate for every
//! exact host name the routes list, from an RFC 8555 CA such as Let's
//! Encrypt, and hands each new chain and key to the certificate store.
//!
//! Parts:
//! - [`AcmeManager`]: the schedule and the run loop (one order at a time).
//! - [`ChallengeResponder`]: pending HTTP-01 tokens and TLS-ALPN-01
//!   challenge certificates, read by the listeners.
//! - [`TlsAlpnInterceptor`]: a Pingora pre-TLS hook that completes
//!   `acme-tls/1` handshakes itself, because Pingora's rustls listener
//!   advertises one ALPN list for every connection.
//! - [`CertificateStore`]: the two store operations the manager needs.
//! - The journal (`journal.json` in the state folder): recent orders and
//!   failures per host, so that a restart loop keeps the back-off.
//!
//! Renewal time: inside the CA's suggested window when the directory offers
//! ACME Renewal Information (RFC 9773), otherwise when a configured share of
//! the lifetime remains, moved earlier by a random jitter.

mod account;
mod challenge;
mod journal;
mod manager;
mod metrics;
mod options;
mod order;
pub mod schedule;
mod store;

pub use challenge::{ChallengeResponder, Interception, TlsAlpnInterceptor, ACME_TLS_ALPN};
pub use journal::{JournalEntry, Outcome};
pub use manager::{AcmeManager, AcmeObserver, HostStatus, LastResult, OrderCounters, OrderResult};
pub use metrics::PrometheusObserver;
pub use options::{
    AcmeOptions, ChallengeKind, KeyType, RenewalPolicy, LETS_ENCRYPT_PRODUCTION,
    LETS_ENCRYPT_STAGING,
};
pub use store::{acme_certificate_name, CertificateStore, CurrentCert};

use std::fmt;

/// An error the manager reports to its caller: invalid options or hosts, an
/// unknown host, or a failed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeError(pub String);

impl fmt::Display for AcmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AcmeError {}
