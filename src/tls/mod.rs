//! TLS termination: the certificate store, the SNI resolver and the
//! HTTPS listener settings.
//!
//! Certificate selection for a ClientHello: the exact SNI name, then a
//! `*.parent` wildcard covering one label, then the default certificate.
//! An unknown name gets the default unless `unknown_sni = "reject"`, which
//! aborts the handshake; a client without SNI always gets the default.

mod check;
mod store;

use std::fmt;
use std::sync::Arc;

use pingora::listeners::tls::TlsSettings;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub use check::certificate_warnings;
pub use store::{
    generate_self_signed, write_atomically, CertInfo, CertStore, ScanReport, TlsError,
};

/// Resolver settings for SNI names without a certificate of their own.
#[derive(Clone, Debug)]
pub struct ResolverOptions {
    /// File stem of the certificate for clients without SNI or with an
    /// unknown name.
    pub default_certificate: Option<String>,
    pub reject_unknown_sni: bool,
}

/// Picks the certificate for each handshake from the store's current map.
pub struct SniResolver {
    store: Arc<CertStore>,
    options: ResolverOptions,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("options", &self.options)
            .finish()
    }
}

impl SniResolver {
    /// Builds the resolver. A `default_certificate` missing from the store
    /// is logged, not rejected, because ACME or an operator may add it later.
    pub fn new(store: Arc<CertStore>, options: ResolverOptions) -> SniResolver {
        if let Some(name) = &options.default_certificate {
            if !store.map.load().by_stem.contains_key(name) {
                tracing::warn!(
                    default_certificate = %name,
                    store = %store.dir().display(),
                    "the default certificate is not in the store, so clients without SNI or with an unknown name fail the handshake until {name}.crt and {name}.key load"
                );
            }
        }
        SniResolver { store, options }
    }

    fn default_key(&self) -> Option<Arc<CertifiedKey>> {
        let map = self.store.map.load();
        match &self.options.default_certificate {
            Some(name) => map.by_stem.get(name).map(|l| Arc::clone(&l.key)),
            // Without a configured default, a store with one certificate
            // serves it to everyone, as a single-certificate server would.
            None if map.by_stem.len() == 1 => {
                map.by_stem.values().next().map(|l| Arc::clone(&l.key))
            }
            None => None,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) => {
                if let Some(found) = self.store.map.load().find(name) {
                    return Some(Arc::clone(&found.key));
                }
                if self.options.reject_unknown_sni {
                    tracing::debug!(
                        sni = name,
                        "handshake rejected: no certificate for this name"
                    );
                    return None;
                }
                self.default_key()
            }
            None => self.default_key(),
        }
    }
}

/// Settings for Pingora's rustls listener: TLS 1.2 and 1.3 (Pingora 0.9.1
/// builds its `ServerConfig` with exactly these two versions and the ring
/// provider's default cipher suites), ALPN `h2` then `http/1.1`, and the
/// certificate from `resolver` on every handshake.
pub fn listener_settings(resolver: Arc<SniResolver>) -> pingora::Result<TlsSettings> {
    // The paths are unused: with a resolver set, Pingora never reads them.
    let mut settings = TlsSettings::intermediate("", "")?;
    settings.set_cert_resolver(resolver);
    settings.enable_h2();
    Ok(settings)
}
