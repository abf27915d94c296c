//! One client connection: TCP, optional TLS with ALPN, HTTP/1.1 or HTTP/2.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::report::FailureKind;
use crate::target::Target;

/// Server certificate check of a TLS client.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Accept any certificate (`--insecure`); handshake signatures are still checked.
    Insecure,
    /// Verify the chain against the PEM roots in this file (`--cacert`).
    CaFile(PathBuf),
    /// Accept exactly these leaf certificates and no others.
    Pinned(Vec<CertificateDer<'static>>),
}

/// A failed connect, handshake or request, by kind.
pub type Failure = (FailureKind, String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client config, without session resumption. With
/// `offer_h2` the ALPN list is `h2, http/1.1`; without it only `http/1.1`.
pub fn tls_config(trust: &Trust, offer_h2: bool) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot build the TLS client config: {e}"))?;
    let mut config = match trust {
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("invalid PEM in CA file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("invalid CA certificate in {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "CA file {} contains no certificate; pass a PEM file with BEGIN CERTIFICATE blocks",
                    path.display()
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LeafVerifier {
                allowed: None,
                provider: provider(),
            }))
            .with_no_client_auth(),
        Trust::Pinned(allowed) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LeafVerifier {
                allowed: Some(allowed.clone()),
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    // Every new connection does a full handshake: a resumed session carries
    // no certificate, so it would hide which certificate the server serves
    // now, and it would make handshake costs depend on cache hits.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = if offer_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// Skips chain validation: accepts any leaf (`allowed` is `None`) or the
/// listed leaves. Handshake signatures are verified as usual.
#[derive(Debug)]
struct LeafVerifier {
    allowed: Option<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LeafVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.allowed {
            None => Ok(ServerCertVerified::assertion()),
            Some(allowed) if allowed.iter().any(|c| c.as_ref() == end_entity.as_ref()) => {
                Ok(ServerCertVerified::assertion())
            }
            Some(_) => Err(rustls::Error::General(format!(
                "server certificate {} is not one of the pinned certificates",
                fingerprint(end_entity)
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Formats an error with its sources, since hyper's message alone
/// ("operation was canceled") does not say why.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// First 16 hex digits of the SHA-256 of a DER certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    let hash = digest::digest(&digest::SHA256, cert);
    hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A request to send repeatedly: the body is shared, never copied.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    pub method: Method,
    pub path: String,
    pub authority: String,
    pub https: bool,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl RequestTemplate {
    pub fn get(target: &Target) -> RequestTemplate {
        RequestTemplate {
            method: Method::GET,
            path: target.path.clone(),
            authority: target.authority(),
            https: target.https,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Builds one request. HTTP/1.1 gets a `Host` header and, with `close`,
    /// `Connection: close`; HTTP/2 gets an absolute URI for `:authority`.
    pub fn build(&self, http2: bool, close: bool) -> Result<Request<Full<Bytes>>, String> {
        let uri: Uri = if http2 {
            let scheme = if self.https { "https" } else { "http" };
            format!("{scheme}://{}{}", self.authority, self.path)
                .parse()
                .map_err(|e| format!("invalid request URI: {e}"))?
        } else {
            self.path
                .parse()
                .map_err(|e| format!("invalid request path {:?}: {e}", self.path))?
        };
        let mut builder = Request::builder().method(self.method.clone()).uri(uri);
        if !http2 {
            builder = builder.header(HOST, self.authority.as_str());
            if close {
                builder = builder.header(CONNECTION, "close");
            }
        }
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        if !self.body.is_empty() && !self.headers.iter().any(|(n, _)| n == CONTENT_TYPE) {
            builder = builder.header(CONTENT_TYPE, "application/octet-stream");
        }
        builder
            .body(Full::new(self.body.clone()))
            .map_err(|e| format!("cannot build the request: {e}"))
    }
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// An open client connection.
pub struct Connection {
    sender: Sender,
    /// Fingerprint of the server's leaf certificate, for TLS connections.
    pub cert_fingerprint: Option<String>,
}

/// A received response: status and the `x-pool` header, if any.
pub struct Reply {
    pub status: u16,
    pub pool: Option<HeaderValue>,
}

/// Connects to `target`, doing the TLS handshake when `tls` is given, and
/// speaks HTTP/2 when the server selects `h2` by ALPN.
pub async fn connect(target: &Target, tls: Option<&TlsConnector>) -> Result<Connection, Failure> {
    let tcp = TcpStream::connect(target.addr).await.map_err(|e| {
        (
            FailureKind::Connect,
            format!("connect to {}: {e}", target.addr),
        )
    })?;
    let _ = tcp.set_nodelay(true);
    let Some(connector) = tls else {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| (FailureKind::Io, format!("HTTP/1.1 handshake: {e}")))?;
        tokio::spawn(connection);
        return Ok(Connection {
            sender: Sender::Http1(sender),
            cert_fingerprint: None,
        });
    };
    let server_name = match target.addr.ip() {
        _ if target.host.parse::<std::net::IpAddr>().is_err() => {
            ServerName::try_from(target.host.clone())
                .map_err(|e| (FailureKind::Tls, format!("invalid TLS server name: {e}")))?
        }
        ip => ServerName::IpAddress(ip.into()),
    };
    let stream = connector.connect(server_name, tcp).await.map_err(|e| {
        (
            FailureKind::Tls,
            format!("TLS handshake with {}: {e}", target.addr),
        )
    })?;
    let (_, session) = stream.get_ref();
    let cert_fingerprint = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|leaf| fingerprint(leaf));
    let http2 = session.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let sender = if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| (FailureKind::Io, format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(connection);
        Sender::Http2(sender)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| (FailureKind::Io, format!("HTTP/1.1 handshake: {e}")))?;
        tokio::spawn(connection);
        Sender::Http1(sender)
    };
    Ok(Connection {
        sender,
        cert_fingerprint,
    })
}

impl Connection {
    pub fn is_http2(&self) -> bool {
        matches!(self.sender, Sender::Http2(_))
    }

    /// Waits until the connection can take a request. An error means it
    /// closed while idle, which a client handles by reconnecting.
    pub async fn ready(&mut self) -> bool {
        match &mut self.sender {
            Sender::Http1(sender) => !sender.is_closed() && sender.ready().await.is_ok(),
            Sender::Http2(sender) => !sender.is_closed() && sender.ready().await.is_ok(),
        }
    }

    /// Sends `request` and reads the whole response body.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, Failure> {
        let response = match &mut self.sender {
            Sender::Http1(sender) => sender.send_request(request).await,
            Sender::Http2(sender) => sender.send_request(request).await,
        }
        .map_err(|e| (FailureKind::Io, format!("request: {}", chain(&e))))?;
        let status = response.status().as_u16();
        let pool = response.headers().get("x-pool").cloned();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| (FailureKind::Io, format!("response body: {}", chain(&e))))?;
        Ok(Reply { status, pool })
    }
}
