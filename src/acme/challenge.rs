//! Challenge responses: HTTP-01 key authorizations by token, and TLS-ALPN-01
//! challenge certificates by SNI name (RFC 8737), plus the pre-TLS hook
//! that serves the latter on the HTTPS listener.
//!
//! Pingora's rustls listener offers one ALPN list (`h2`, `http/1.1`) to
//! every client, so rustls would reject a validator that offers only
//! `acme-tls/1`. The hook reads the ClientHello before Pingora does, puts
//! the bytes back, and completes `acme-tls/1` handshakes itself.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// ALPN protocol of TLS-ALPN-01 validation requests.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Largest ClientHello the hook reads: a ClientHello fits in one 16 KiB
/// TLS record, plus the record header.
const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

/// Pending challenge responses, filled during an order and emptied after it.
#[derive(Default)]
pub struct ChallengeResponder {
    http01: RwLock<HashMap<String, String>>,
    tls_alpn01: RwLock<HashMap<String, Arc<ServerConfig>>>,
}

impl fmt::Debug for ChallengeResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChallengeResponder").finish_non_exhaustive()
    }
}

impl ChallengeResponder {
    pub fn new() -> ChallengeResponder {
        ChallengeResponder::default()
    }

    /// The key authorization to send as the body of
    /// `GET /.well-known/acme-challenge/TOKEN`, if `token` is pending.
    pub fn http01_response(&self, token: &str) -> Option<String> {
        let map = self.http01.read().unwrap_or_else(|e| e.into_inner());
        map.get(token).cloned()
    }

    /// The server config for an `acme-tls/1` handshake for `sni`, if a
    /// TLS-ALPN-01 challenge for that name is pending.
    pub fn tls_alpn01_config(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        let map = self.tls_alpn01.read().unwrap_or_else(|e| e.into_inner());
        map.get(&sni.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
    }

    /// True while any TLS-ALPN-01 challenge is pending.
    pub fn tls_alpn01_pending(&self) -> bool {
        let map = self.tls_alpn01.read().unwrap_or_else(|e| e.into_inner());
        !map.is_empty()
    }

    pub(crate) fn add_http01(&self, token: &str, key_authorization: &str) {
        let mut map = self.http01.write().unwrap_or_else(|e| e.into_inner());
        map.insert(token.to_string(), key_authorization.to_string());
    }

    pub(crate) fn remove_http01(&self, token: &str) {
        let mut map = self.http01.write().unwrap_or_else(|e| e.into_inner());
        map.remove(token);
    }

    /// Builds the challenge certificate for `host`: self-signed, the host as
    /// its only SAN, and the critical acmeIdentifier extension carrying the
    /// SHA-256 digest of the key authorization.
    pub(crate) fn add_tls_alpn01(&self, host: &str, digest: &[u8]) -> Result<(), String> {
        let key = rcgen::KeyPair::generate()
            .map_err(|e| format!("cannot generate a TLS-ALPN-01 key: {e}"))?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| format!("invalid host name {host:?} for TLS-ALPN-01: {e}"))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("cannot build the TLS-ALPN-01 certificate: {e}"))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| format!("cannot load the TLS-ALPN-01 key: {e}"))?;
        let certified = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(cert.der().to_vec())],
            signing_key,
        ));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("cannot set up TLS for TLS-ALPN-01: {e}"))?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(FixedCert(certified)));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let mut map = self.tls_alpn01.write().unwrap_or_else(|e| e.into_inner());
        map.insert(host.to_ascii_lowercase(), Arc::new(config));
        Ok(())
    }

    pub(crate) fn remove_tls_alpn01(&self, host: &str) {
        let mut map = self.tls_alpn01.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&host.to_ascii_lowercase());
    }
}

impl crate::app::Http01Responder for ChallengeResponder {
    fn key_authorization(&self, token: &str) -> Option<String> {
        self.http01_response(token)
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// What the hook did with a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Interception {
    /// Not a TLS-ALPN-01 validation: the bytes read were put back and the
    /// listener's own handshake runs.
    PassThrough,
    /// An `acme-tls/1` handshake was completed with the challenge
    /// certificate; the connection must be closed.
    ChallengeServed,
}

/// The pre-TLS hook. Install it on the HTTPS listener with
/// `service.endpoints().set_pre_tls_callback(...)` (Pingora 0.9.1).
pub struct TlsAlpnInterceptor {
    responder: Arc<ChallengeResponder>,
    timeout: Duration,
}

impl TlsAlpnInterceptor {
    pub fn new(responder: Arc<ChallengeResponder>) -> TlsAlpnInterceptor {
        TlsAlpnInterceptor {
            responder,
            timeout: Duration::from_secs(10),
        }
    }

    /// Serves `stream` if it is a TLS-ALPN-01 validation, otherwise leaves
    /// it as it was. Costs one lock read while no challenge is pending.
    pub async fn intercept(&self, stream: &mut L4Stream) -> Result<Interception, String> {
        if !self.responder.tls_alpn01_pending() {
            return Ok(Interception::PassThrough);
        }
        let mut read = Vec::new();
        let hello = tokio::time::timeout(self.timeout, read_client_hello(stream, &mut read)).await;
        // Whatever happens next, the handshake must see the stream from the
        // first byte: either ours below or the listener's.
        stream.rewind(&read);
        let (sni, offers_acme) = match hello {
            Ok(Some(found)) => found,
            // Not TLS, truncated, or too slow: the listener's handshake
            // reports the problem in its usual way.
            Ok(None) | Err(_) => return Ok(Interception::PassThrough),
        };
        if !offers_acme {
            return Ok(Interception::PassThrough);
        }
        let Some(sni) = sni else {
            return Err("acme-tls/1 handshake without SNI; closing".to_string());
        };
        let Some(config) = self.responder.tls_alpn01_config(&sni) else {
            tracing::warn!(sni = %sni, "acme-tls/1 handshake for a name with no pending challenge; closing");
            return Err(format!("no pending TLS-ALPN-01 challenge for {sni}"));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshake = tokio::time::timeout(self.timeout, acceptor.accept(&mut *stream)).await;
        match handshake {
            Ok(Ok(mut tls)) => {
                tracing::info!(sni = %sni, "served a TLS-ALPN-01 challenge certificate");
                let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
                Ok(Interception::ChallengeServed)
            }
            Ok(Err(err)) => Err(format!("TLS-ALPN-01 handshake for {sni} failed: {err}")),
            Err(_) => Err(format!("TLS-ALPN-01 handshake for {sni} timed out")),
        }
    }
}

/// Reads until rustls has a whole ClientHello; returns its SNI and whether
/// it offers `acme-tls/1`, or `None` if the stream is not a TLS ClientHello.
/// Every byte read is appended to `read`.
async fn read_client_hello(
    stream: &mut L4Stream,
    read: &mut Vec<u8>,
) -> Option<(Option<String>, bool)> {
    let mut acceptor = Acceptor::default();
    let mut chunk = [0u8; 4096];
    loop {
        if read.len() >= MAX_CLIENT_HELLO {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        read.extend_from_slice(&chunk[..n]);
        let mut fresh: &[u8] = &chunk[..n];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh).ok()?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let sni = hello.server_name().map(str::to_string);
                let offers_acme = hello
                    .alpn()
                    .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
                return Some((sni, offers_acme));
            }
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
}

#[async_trait]
impl PreTlsProcess for TlsAlpnInterceptor {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        match self.intercept(stream).await {
            Ok(Interception::PassThrough) => Ok(()),
            // Returning an error is how the hook tells Pingora to drop the
            // connection; Pingora logs it as a handshake error.
            Ok(Interception::ChallengeServed) => Err(pingora::Error::explain(
                pingora::ErrorType::Custom("ACME challenge"),
                "TLS-ALPN-01 challenge served; connection closed",
            )),
            Err(message) => Err(pingora::Error::explain(
                pingora::ErrorType::Custom("ACME challenge"),
                message,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::net::{TcpListener, TcpStream};

    /// Accepts any server certificate: the test inspects the certificate
    /// itself instead of trusting it.
    #[derive(Debug)]
    struct AcceptAny;

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A listener that runs the hook, then (on pass-through) a normal
    /// handshake with a certificate for `fallback.test` and ALPN h2.
    async fn start_listener(responder: Arc<ChallengeResponder>) -> std::net::SocketAddr {
        let fallback = rcgen::generate_simple_self_signed(vec!["fallback.test".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            fallback.signing_key.serialize_der(),
        ));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![fallback.cert.der().clone()], key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let fallback_acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let interceptor = Arc::new(TlsAlpnInterceptor::new(responder));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let interceptor = Arc::clone(&interceptor);
                let fallback_acceptor = fallback_acceptor.clone();
                tokio::spawn(async move {
                    let mut stream = L4Stream::from(tcp);
                    if interceptor.process(&mut stream).await.is_ok() {
                        if let Ok(mut tls) = fallback_acceptor.accept(stream).await {
                            let _ = tls.write_all(b"fallback").await;
                            let _ = tls.shutdown().await;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn handshake(
        addr: std::net::SocketAddr,
        sni: &str,
        alpn: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await?;
        connector
            .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
            .await
    }

    fn acme_identifier(cert: &CertificateDer<'_>) -> Option<(bool, Vec<u8>)> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
        parsed
            .extensions()
            .iter()
            .find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .map(|ext| (ext.critical, ext.value.to_vec()))
    }

    #[tokio::test]
    async fn alpn_challenge_served_and_others_pass() {
        let responder = Arc::new(ChallengeResponder::new());
        let addr = start_listener(Arc::clone(&responder)).await;
        let digest = ring::digest::digest(&ring::digest::SHA256, b"token123.thumbprint");
        responder.add_tls_alpn01("c.test", digest.as_ref()).unwrap();

        let tls = handshake(addr, "c.test", ACME_TLS_ALPN).await.unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ACME_TLS_ALPN));
        let cert = &conn.peer_certificates().unwrap()[0];
        let (critical, value) = acme_identifier(cert).expect("acmeIdentifier extension");
        assert!(critical);
        let mut expected = vec![0x04, 0x20];
        expected.extend_from_slice(digest.as_ref());
        assert_eq!(value, expected);

        // A normal client on the same listener gets the normal handshake,
        // which proves the hook put the ClientHello back.
        let mut tls = handshake(addr, "fallback.test", b"h2").await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut body = Vec::new();
        let _ = tls.read_to_end(&mut body).await;
        assert_eq!(body, b"fallback");

        // acme-tls/1 for a name without a pending challenge is closed.
        assert!(handshake(addr, "other.test", ACME_TLS_ALPN).await.is_err());

        responder.remove_tls_alpn01("c.test");
        assert!(!responder.tls_alpn01_pending());
        assert!(handshake(addr, "c.test", ACME_TLS_ALPN).await.is_err());
    }

    #[tokio::test]
    async fn non_tls_bytes_pass_through() {
        let responder = Arc::new(ChallengeResponder::new());
        let digest = [7u8; 32];
        responder.add_tls_alpn01("c.test", &digest).unwrap();
        let interceptor = TlsAlpnInterceptor::new(responder);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut stream = L4Stream::from(tcp);
        assert_eq!(
            interceptor.intercept(&mut stream).await,
            Ok(Interception::PassThrough)
        );
        let mut again = [0u8; 18];
        stream.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn http01_tokens_added_and_removed() {
        let responder = ChallengeResponder::new();
        responder.add_http01("tok", "tok.thumb");
        assert_eq!(
            responder.http01_response("tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(responder.http01_response("other"), None);
        responder.remove_http01("tok");
        assert_eq!(responder.http01_response("tok"), None);
    }
}
