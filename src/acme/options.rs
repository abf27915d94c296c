//! Settings of the ACME manager. The config loader maps `[acme]` onto
//! [`AcmeOptions`]; everything else has a default suited to a public CA.

use std::path::PathBuf;
use std::time::Duration;

use super::AcmeError;

pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Challenge type the CA uses to validate control of a host name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeKind {
    /// `GET http://HOST/.well-known/acme-challenge/TOKEN` on port 80.
    Http01,
    /// A TLS handshake to HOST on port 443 with ALPN `acme-tls/1` (RFC 8737).
    TlsAlpn01,
}

impl ChallengeKind {
    /// Parses the config spelling: `http-01` or `tls-alpn-01`.
    pub fn parse(value: &str) -> Result<ChallengeKind, AcmeError> {
        match value {
            "http-01" => Ok(ChallengeKind::Http01),
            "tls-alpn-01" => Ok(ChallengeKind::TlsAlpn01),
            other => Err(AcmeError(format!(
                "invalid ACME challenge {other:?}; use \"http-01\" or \"tls-alpn-01\""
            ))),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// Key type of the certificates (the account key is always ECDSA P-256,
/// the only type instant-acme 0.8 signs with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
}

impl KeyType {
    /// Parses the config spelling: `ecdsa-p256` or `ecdsa-p384`.
    pub fn parse(value: &str) -> Result<KeyType, AcmeError> {
        match value {
            "ecdsa-p256" => Ok(KeyType::EcdsaP256),
            "ecdsa-p384" => Ok(KeyType::EcdsaP384),
            other => Err(AcmeError(format!(
                "invalid ACME key type {other:?}; use \"ecdsa-p256\" or \"ecdsa-p384\""
            ))),
        }
    }

    pub(crate) fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

/// When to renew and how to retry.
#[derive(Clone, Debug)]
pub struct RenewalPolicy {
    /// Renew when this share of the lifetime remains: 1/3 renews a 90-day
    /// certificate after 60 days. Used when the CA offers no ARI window.
    pub remaining_fraction: f64,
    /// The lifetime renewal point moves earlier by a random share of the
    /// lifetime up to this value, so that many proxies do not renew at once.
    pub jitter_fraction: f64,
    /// Ask the CA for a renewal window (RFC 9773) when its directory offers
    /// `renewalInfo`.
    pub use_ari: bool,
    /// Delay after the first failed order; it doubles per further failure.
    pub retry_initial: Duration,
    /// Upper bound of the retry delay.
    pub retry_max: Duration,
    /// Maximum sleep of the run loop, so that certificates changed by hand
    /// in the store are noticed.
    pub check_interval: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> RenewalPolicy {
        RenewalPolicy {
            remaining_fraction: 1.0 / 3.0,
            jitter_fraction: 0.05,
            use_ari: true,
            // Let's Encrypt allows 5 failed validations per account, host
            // name and hour (letsencrypt.org/docs/failed-validation-limit).
            // Starting at 5 min and doubling makes at most 4 in the first hour.
            retry_initial: Duration::from_secs(300),
            retry_max: Duration::from_secs(6 * 3600),
            check_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AcmeOptions {
    /// ACME directory URL; must be `https://`.
    pub directory_url: String,
    /// Account contacts such as `mailto:ops@example.com`.
    pub contact: Vec<String>,
    pub challenge: ChallengeKind,
    /// PEM files with extra roots to trust for the CA's own HTTPS API, in
    /// addition to the system roots (a private CA or a test CA).
    pub ca_roots: Vec<PathBuf>,
    pub key_type: KeyType,
    pub renewal: RenewalPolicy,
    /// Folder for the account credentials and the journal, such as
    /// `certs/acme`. Created with mode 0700.
    pub state_dir: PathBuf,
    /// Time limit for one HTTP request to the CA (until response headers).
    pub request_timeout: Duration,
    /// Time limit for one whole order, validation and download included.
    pub order_timeout: Duration,
}

impl AcmeOptions {
    /// Options with the defaults: Let's Encrypt production, HTTP-01,
    /// ECDSA P-256, renewal at 2/3 of the lifetime or inside the ARI window.
    pub fn new(state_dir: impl Into<PathBuf>) -> AcmeOptions {
        AcmeOptions {
            directory_url: LETS_ENCRYPT_PRODUCTION.to_string(),
            contact: Vec::new(),
            challenge: ChallengeKind::Http01,
            ca_roots: Vec::new(),
            key_type: KeyType::EcdsaP256,
            renewal: RenewalPolicy::default(),
            state_dir: state_dir.into(),
            request_timeout: Duration::from_secs(30),
            order_timeout: Duration::from_secs(300),
        }
    }

    /// Options from the validated `[acme]` config section. The state folder
    /// is `acme/` inside the certificate store folder.
    pub fn from_config(
        acme: &crate::config::Acme,
        cert_store_dir: &std::path::Path,
    ) -> Result<AcmeOptions, AcmeError> {
        let mut options = AcmeOptions::new(cert_store_dir.join("acme"));
        options.directory_url = acme.directory.clone();
        options.contact = acme.contact.clone();
        options.challenge = match acme.challenge {
            crate::config::AcmeChallenge::Http01 => ChallengeKind::Http01,
            crate::config::AcmeChallenge::TlsAlpn01 => ChallengeKind::TlsAlpn01,
        };
        options.ca_roots = acme.ca_roots.clone();
        options.key_type = KeyType::parse(&acme.key_type)?;
        options.renewal.remaining_fraction = acme.renew_remaining_fraction;
        // The jitter must stay below the renewal fraction, which the config
        // allows to be small.
        options.renewal.jitter_fraction = options
            .renewal
            .jitter_fraction
            .min(acme.renew_remaining_fraction / 4.0);
        options.validate()?;
        Ok(options)
    }

    /// Checks every value and returns all problems at once.
    pub fn validate(&self) -> Result<(), AcmeError> {
        let mut problems = Vec::new();
        if !self.directory_url.starts_with("https://") {
            problems.push(format!(
                "invalid ACME directory URL {:?}: ACME requires https://, such as {LETS_ENCRYPT_STAGING}",
                self.directory_url
            ));
        }
        for contact in &self.contact {
            if !contact.starts_with("mailto:") || contact.len() <= "mailto:".len() {
                problems.push(format!(
                    "invalid ACME contact {contact:?}; write it as \"mailto:ops@example.com\""
                ));
            }
        }
        let renewal = &self.renewal;
        if !(renewal.remaining_fraction > 0.0 && renewal.remaining_fraction < 1.0) {
            problems.push(format!(
                "invalid renewal fraction {}; use a number between 0 and 1, such as 0.33",
                renewal.remaining_fraction
            ));
        }
        if !(0.0..0.5).contains(&renewal.jitter_fraction)
            || renewal.jitter_fraction >= renewal.remaining_fraction
        {
            problems.push(format!(
                "invalid renewal jitter {}; use a number from 0 up to below both 0.5 and the renewal fraction, such as 0.05",
                renewal.jitter_fraction
            ));
        }
        if renewal.retry_initial.is_zero() || renewal.retry_max < renewal.retry_initial {
            problems.push(format!(
                "invalid retry delays {:?} to {:?}; the first must be above zero and at most the maximum",
                renewal.retry_initial, renewal.retry_max
            ));
        }
        if renewal.check_interval.is_zero() {
            problems.push("invalid check interval 0s; use a duration such as 1h".to_string());
        }
        if self.request_timeout.is_zero() || self.order_timeout.is_zero() {
            problems.push("invalid ACME timeouts: both must be above zero".to_string());
        }
        for path in &self.ca_roots {
            if !path.is_file() {
                problems.push(format!(
                    "ACME CA root file {} not found; give the path of a PEM certificate",
                    path.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AcmeError(problems.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let options = AcmeOptions::new("/tmp/acme-state");
        assert_eq!(options.directory_url, LETS_ENCRYPT_PRODUCTION);
        assert_eq!(options.key_type, KeyType::EcdsaP256);
        assert!(options.validate().is_ok());
    }

    #[test]
    fn validate_names_each_bad_value() {
        let mut options = AcmeOptions::new("/tmp/acme-state");
        options.directory_url = "http://127.0.0.1:14000/dir".to_string();
        options.contact = vec!["ops@example.com".to_string()];
        options.renewal.remaining_fraction = 1.5;
        options.ca_roots = vec![PathBuf::from("/nonexistent/root.pem")];
        let error = options.validate().unwrap_err().0;
        assert!(error.contains("http://127.0.0.1:14000/dir"), "{error}");
        assert!(error.contains("\"ops@example.com\""), "{error}");
        assert!(error.contains("1.5"), "{error}");
        assert!(error.contains("/nonexistent/root.pem"), "{error}");
    }

    #[test]
    fn from_config_maps_every_field() {
        let acme = crate::config::Acme {
            directory: LETS_ENCRYPT_STAGING.to_string(),
            contact: vec!["mailto:ops@example.com".to_string()],
            challenge: crate::config::AcmeChallenge::TlsAlpn01,
            ca_roots: Vec::new(),
            key_type: "ecdsa-p384".to_string(),
            renew_remaining_fraction: 0.02,
        };
        let options = AcmeOptions::from_config(&acme, std::path::Path::new("/srv/certs")).unwrap();
        assert_eq!(options.state_dir, PathBuf::from("/srv/certs/acme"));
        assert_eq!(options.directory_url, LETS_ENCRYPT_STAGING);
        assert_eq!(options.contact, acme.contact);
        assert_eq!(options.challenge, ChallengeKind::TlsAlpn01);
        assert_eq!(options.key_type, KeyType::EcdsaP384);
        assert_eq!(options.renewal.remaining_fraction, 0.02);
        assert!(options.renewal.jitter_fraction < 0.02);
    }

    #[test]
    fn parse_config_spellings() {
        assert_eq!(ChallengeKind::parse("http-01"), Ok(ChallengeKind::Http01));
        assert_eq!(
            ChallengeKind::parse("tls-alpn-01"),
            Ok(ChallengeKind::TlsAlpn01)
        );
        assert!(ChallengeKind::parse("dns-01").is_err());
        assert_eq!(KeyType::parse("ecdsa-p384"), Ok(KeyType::EcdsaP384));
        assert!(KeyType::parse("rsa-2048")
            .unwrap_err()
            .0
            .contains("rsa-2048"));
    }
}
