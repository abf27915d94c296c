//! Certificate checks for `switchyard check`. They find problems that make
//! HTTPS handshakes fail, but report them as warnings, not config errors,
//! because a certificate may still arrive after the proxy starts (from ACME
//! or an operator writing files into the store).

use super::CertStore;
use crate::acme::acme_certificate_name;
use crate::config::Config;

/// Lists one warning line per certificate problem of a config with an
/// HTTPS listener. The problems are a pair in the store that fails to
/// load, an empty store that ACME will not fill, and a
/// `default_certificate` that is neither in the store nor obtained by ACME.
/// Returns nothing for a config without HTTPS.
pub fn certificate_warnings(config: &Config) -> Vec<String> {
    if config.listeners.https.is_none() {
        return Vec::new();
    }
    let store = config.tls.store.display();
    let (certificates, report) = CertStore::inspect(&config.tls.store);
    let mut warnings: Vec<String> = report
        .errors
        .iter()
        .map(|error| format!("tls.store: certificate not loaded: {error}"))
        .collect();

    // ACME obtains a certificate for each exact host name of the routes and
    // stores it as `acme_HOST`.
    let acme_hosts = match config.acme {
        Some(_) => config.exact_hosts(),
        None => Vec::new(),
    };

    if certificates.is_empty() && acme_hosts.is_empty() {
        let acme_fix = match config.acme {
            Some(_) => "or give a route an exact host name for [acme] to obtain a certificate for",
            None => "or configure [acme]",
        };
        let state = if config.tls.store.is_dir() {
            "contains no loadable certificate"
        } else {
            "does not exist yet (run creates it)"
        };
        warnings.push(format!(
            "tls.store: the certificate store {store} {state}, so every HTTPS handshake fails; put NAME.crt and NAME.key in {store}, {acme_fix}"
        ));
    }

    if let Some(name) = &config.tls.default_certificate {
        let in_store = certificates.iter().any(|info| &info.name == name);
        let from_acme = acme_hosts
            .iter()
            .any(|host| acme_certificate_name(host) == *name);
        if !in_store && !from_acme {
            let acme_fix = match acme_hosts.first() {
                Some(host) => format!(
                    "or set it to {:?}, the certificate ACME obtains for {host}",
                    acme_certificate_name(host)
                ),
                None => {
                    "or configure [acme] and set it to \"acme_HOST\" for a route's host name HOST"
                        .to_string()
                }
            };
            warnings.push(format!(
                "tls.default_certificate: {name:?} is not in the certificate store {store}, so clients without SNI or with an unknown name fail the handshake; put {name}.crt and {name}.key in {store}, {acme_fix}"
            ));
        }
    }
    warnings
}
