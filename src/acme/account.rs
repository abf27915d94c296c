//! The HTTPS client for the CA's API and the ACME account, whose
//! credentials are stored once per directory URL and reused on every start.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, HttpClient, NewAccount,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::schedule::unix_seconds;
use super::{AcmeError, AcmeOptions};
use crate::tls::write_atomically;

/// The hyper client instant-acme would build, with the extra roots added to
/// the system roots and a time limit on every request.
pub(crate) struct AcmeHttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    timeout: Duration,
}

impl AcmeHttpClient {
    pub fn new(ca_roots: &[PathBuf], timeout: Duration) -> Result<AcmeHttpClient, AcmeError> {
        let mut extra = Vec::new();
        for path in ca_roots {
            extra.extend(read_roots(path)?);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
                .map_err(|e| AcmeError(format!("cannot set up the ACME server verifier: {e}")))?;
        // `dangerous()` is only the API path for a custom verifier; this one
        // is the platform verifier with the system roots plus `ca_roots`.
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError(format!("cannot set up TLS for the ACME client: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(AcmeHttpClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        })
    }
}

fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, AcmeError> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|e| {
            AcmeError(format!(
                "invalid ACME CA root file {}: {e}; give a PEM certificate",
                path.display()
            ))
        })?;
    if roots.is_empty() {
        return Err(AcmeError(format!(
            "ACME CA root file {} contains no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

impl HttpClient for AcmeHttpClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().to_string();
        let response = HttpClient::request(&self.inner, req);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(result) => result,
                Err(_) => Err(instant_acme::Error::Other(
                    format!("ACME request to {uri} timed out after {timeout:?}").into(),
                )),
            }
        })
    }
}

/// The credentials file: the account URL and its private key. Never logged.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory_url: String,
    created_at: i64,
    credentials: AccountCredentials,
}

/// Path of the credentials for `directory_url`: one file per CA, so that
/// switching from staging to production creates a second account instead
/// of presenting the staging account to production.
pub(crate) fn credentials_path(state_dir: &Path, directory_url: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory_url.as_bytes());
    let short: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    state_dir.join(format!("account-{short}.json"))
}

/// Restores the stored account for the configured CA, or registers a new
/// one and stores its credentials (mode 0600, written atomically).
pub(crate) async fn load_or_create(options: &AcmeOptions) -> Result<Account, AcmeError> {
    let path = credentials_path(&options.state_dir, &options.directory_url);
    let client = || -> Result<Box<dyn HttpClient>, AcmeError> {
        Ok(Box::new(AcmeHttpClient::new(
            &options.ca_roots,
            options.request_timeout,
        )?))
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let stored: StoredAccount = serde_json::from_slice(&bytes).map_err(|e| {
                AcmeError(format!(
                    "invalid ACME account file {}: {e}; move it away to register a new account",
                    path.display()
                ))
            })?;
            let account = Account::builder_with_http(client()?)
                .from_credentials(stored.credentials)
                .await
                .map_err(|e| AcmeError(format!("cannot restore the ACME account: {e}")))?;
            tracing::debug!(account = account.id(), "restored the ACME account");
            Ok(account)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let contact: Vec<&str> = options.contact.iter().map(String::as_str).collect();
            let (account, credentials) = Account::builder_with_http(client()?)
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    options.directory_url.clone(),
                    None,
                )
                .await
                .map_err(|e| AcmeError(format!("cannot register an ACME account: {e}")))?;
            let stored = StoredAccount {
                directory_url: options.directory_url.clone(),
                created_at: unix_seconds(SystemTime::now()),
                credentials,
            };
            let json = serde_json::to_vec_pretty(&stored)
                .map_err(|e| AcmeError(format!("cannot encode the ACME account: {e}")))?;
            write_atomically(&path, &json, 0o600).map_err(|e| AcmeError(e.to_string()))?;
            tracing::info!(
                account = account.id(),
                directory = %options.directory_url,
                file = %path.display(),
                "registered a new ACME account"
            );
            Ok(account)
        }
        Err(err) => Err(AcmeError(format!(
            "cannot read the ACME account file {}: {err}",
            path.display()
        ))),
    }
}

/// Moves the credentials aside after the CA said the account does not
/// exist (a CA that lost its state, such as a restarted test CA), so that
/// the next order registers a new account.
pub(crate) fn retire_credentials(options: &AcmeOptions) {
    let path = credentials_path(&options.state_dir, &options.directory_url);
    let aside = path.with_extension(format!("rejected-{}", unix_seconds(SystemTime::now())));
    match fs::rename(&path, &aside) {
        Ok(()) => tracing::warn!(
            file = %aside.display(),
            "the CA does not know the stored ACME account; moved its credentials aside and will register a new account"
        ),
        Err(err) => tracing::error!(
            file = %path.display(),
            error = %err,
            "cannot move the rejected ACME account credentials aside"
        ),
    }
}
