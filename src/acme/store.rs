//! What the manager needs from the certificate store, and its
//! implementation for the store the TLS listener serves from.

use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::schedule::from_unix_seconds;
use crate::tls::CertStore;

/// The certificate a client sending `host` as SNI currently gets.
#[derive(Clone, Debug)]
pub struct CurrentCert {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number in lower-case hex without leading zeros.
    pub serial: String,
    /// True when the ACME manager installed it; false for a certificate
    /// placed by hand, which the manager leaves alone until it nears expiry.
    pub managed_by_acme: bool,
    /// DER of the leaf, for the ARI certificate identifier.
    pub leaf_der: Vec<u8>,
}

pub trait CertificateStore: Send + Sync {
    /// The certificate served for `host`, without any default fallback.
    fn current(&self, host: &str) -> Option<CurrentCert>;

    /// Validates the chain and key, writes them atomically (the key with
    /// mode 0600) and serves them from the next handshake.
    fn install(&self, host: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String>;
}

/// File stem under which the manager installs the certificate for `host`:
/// `acme_HOST`, so `acme_HOST.crt` and `acme_HOST.key`. An underscore never
/// appears in a host name, so no hand-placed `HOST.crt` is overwritten.
pub fn acme_certificate_name(host: &str) -> String {
    format!("acme_{host}")
}

impl CertificateStore for CertStore {
    fn current(&self, host: &str) -> Option<CurrentCert> {
        let info = self.lookup(host)?;
        let leaf_der = match CertificateDer::pem_file_iter(&info.cert_path)
            .ok()
            .and_then(|mut certs| certs.next())
        {
            Some(Ok(leaf)) => leaf.to_vec(),
            _ => {
                tracing::warn!(
                    file = %info.cert_path.display(),
                    host,
                    "cannot re-read the served certificate; ARI is skipped for it"
                );
                Vec::new()
            }
        };
        Some(CurrentCert {
            not_before: from_unix_seconds(info.not_before),
            not_after: from_unix_seconds(info.not_after),
            serial: info.serial,
            managed_by_acme: info.name == acme_certificate_name(host),
            leaf_der,
        })
    }

    fn install(&self, host: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
        CertStore::install(self, &acme_certificate_name(host), chain_pem, key_pem)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
