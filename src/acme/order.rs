//! One ACME order for one host: authorize with the configured challenge,
//! finalize with a fresh key and CSR, download the chain.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, Problem, RetryPolicy,
};

use super::challenge::ChallengeResponder;
use super::options::{ChallengeKind, KeyType};

/// A certificate chain (leaf first) and its private key, both PEM. The key
/// is never logged; `Debug` prints only the chain length.
pub(crate) struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("chain_pem_bytes", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

/// Failure of an order: a message, and the CA's RFC 7807 problem document
/// when the CA sent one.
#[derive(Debug)]
pub(crate) struct OrderFailure {
    pub message: String,
    pub problem: Option<Problem>,
}

impl OrderFailure {
    fn new(message: impl Into<String>) -> OrderFailure {
        OrderFailure {
            message: message.into(),
            problem: None,
        }
    }

    fn from_acme(context: &str, error: instant_acme::Error) -> OrderFailure {
        match error {
            instant_acme::Error::Api(problem) => OrderFailure {
                message: format!("{context}: {problem}"),
                problem: Some(problem),
            },
            other => OrderFailure::new(format!("{context}: {}", error_chain(&other))),
        }
    }

    /// True when the CA does not know the account, such as a CA that lost
    /// its state.
    pub fn account_unknown(&self) -> bool {
        self.problem
            .as_ref()
            .and_then(|p| p.r#type.as_deref())
            .is_some_and(|t| t == "urn:ietf:params:acme:error:accountDoesNotExist")
    }
}

/// Formats `error` with its sources, so that "client error (Connect)"
/// shows the cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl fmt::Display for OrderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Removes the challenge responses of an order when it ends, also when the
/// order future is dropped on timeout.
struct ChallengeCleanup {
    responder: Arc<ChallengeResponder>,
    tokens: Vec<String>,
    alpn_hosts: Vec<String>,
}

impl Drop for ChallengeCleanup {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.responder.remove_http01(token);
        }
        for host in &self.alpn_hosts {
            self.responder.remove_tls_alpn01(host);
        }
    }
}

/// Polling of order state: 250 ms doubling to at most the whole time limit;
/// instant-acme waits for `Retry-After` instead when the CA sends one.
fn poll_policy(limit: Duration) -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(limit)
}

/// Places and completes one order for `host`.
pub(crate) async fn issue(
    account: &Account,
    host: &str,
    challenge: ChallengeKind,
    key_type: KeyType,
    responder: &Arc<ChallengeResponder>,
    replaces: Option<CertificateIdentifier<'_>>,
    poll_limit: Duration,
) -> Result<Issued, OrderFailure> {
    let identifiers = [Identifier::Dns(host.to_string())];
    let mut request = NewOrder::new(&identifiers);
    if let Some(replaces) = replaces {
        request = request.replaces(replaces);
    }
    let mut order = account
        .new_order(&request)
        .await
        .map_err(|e| OrderFailure::from_acme("new order rejected", e))?;
    tracing::debug!(host, order = order.url(), "ACME order placed");

    let mut cleanup = ChallengeCleanup {
        responder: Arc::clone(responder),
        tokens: Vec::new(),
        alpn_hosts: Vec::new(),
    };
    let challenge_type = match challenge {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization
            .map_err(|e| OrderFailure::from_acme("cannot fetch an authorization", e))?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(OrderFailure::new(format!(
                    "authorization for {host} is {other:?}; expected pending or valid"
                )))
            }
        }
        let mut handle = authorization
            .challenge(challenge_type.clone())
            .ok_or_else(|| {
                OrderFailure::new(format!(
                    "the CA offers no {} challenge for {host}; choose another challenge type",
                    challenge.as_str()
                ))
            })?;
        let key_authorization = handle.key_authorization();
        match challenge {
            ChallengeKind::Http01 => {
                responder.add_http01(&handle.token, key_authorization.as_str());
                cleanup.tokens.push(handle.token.clone());
            }
            ChallengeKind::TlsAlpn01 => {
                responder
                    .add_tls_alpn01(host, key_authorization.digest().as_ref())
                    .map_err(OrderFailure::new)?;
                cleanup.alpn_hosts.push(host.to_string());
            }
        }
        handle
            .set_ready()
            .await
            .map_err(|e| OrderFailure::from_acme("cannot start the challenge", e))?;
    }

    let status = order
        .poll_ready(&poll_policy(poll_limit))
        .await
        .map_err(|e| OrderFailure::from_acme("order did not become ready", e))?;
    if status != OrderStatus::Ready {
        return Err(invalid_order_failure(&mut order, host).await);
    }
    drop(cleanup);

    let key = rcgen::KeyPair::generate_for(key_type.algorithm())
        .map_err(|e| OrderFailure::new(format!("cannot generate the certificate key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| OrderFailure::new(format!("invalid host name {host:?} for a CSR: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| OrderFailure::new(format!("cannot build the CSR: {e}")))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| OrderFailure::from_acme("finalize rejected", e))?;
    let chain_pem = order
        .poll_certificate(&poll_policy(poll_limit))
        .await
        .map_err(|e| OrderFailure::from_acme("certificate not issued", e))?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// Builds the failure of an order that turned invalid, with the problem document
/// of the failed challenge (the order itself often carries none).
async fn invalid_order_failure(order: &mut instant_acme::Order, host: &str) -> OrderFailure {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
            return OrderFailure {
                message: format!("validation of {host} failed: {problem}"),
                problem: Some(problem),
            };
        }
    }
    OrderFailure::new(format!(
        "order for {host} became invalid without a problem document"
    ))
}
