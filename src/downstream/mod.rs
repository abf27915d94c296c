//! The client side of every connection, in front of Pingora's HTTP/1 parser.
//!
//! Pingora reads a request header with a timeout per `read()` call only, so
//! a client that sends one byte every few seconds keeps a connection and its
//! task forever. Pingora also accepts a request with both `Content-Length`
//! and `Transfer-Encoding` (it drops the length) and rewrites illegal bytes
//! in the request line instead of refusing them. This front reads each
//! request header itself, under one deadline, checks its framing strictly,
//! and hands the bytes to Pingora as a pipelined prefix, so Pingora parses a
//! header that is already complete and never waits on the socket for it.
//!
//! Per connection, in order:
//! 1. admission: a slot under `limits.max_connections`, waiting up to
//!    `limits.connection_wait` (idle keep-alive connections are asked to
//!    close to make room), else `503` and close;
//! 2. HTTP/2 (TLS ALPN `h2` or an h2c preface) goes to Pingora unchanged;
//! 3. HTTP/1.x, per request: wait for the first byte (`header_read_timeout`
//!    on a new connection, `keepalive_timeout` between requests), then read
//!    the whole header within `header_read_timeout` of that byte, answer
//!    `408`, `431` or `400` and close when it is late, too large or
//!    malformed; else let Pingora run the request and loop on keep-alive.
//!    Bytes read past a request whose body length is known are a pipelined
//!    next request: they stay here and are checked in turn, and Pingora
//!    reads the client only up to the end of the current body (`bounded`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

mod bounded;

use crate::app::App;
use crate::config::Limits;
use crate::proxy::framing::{inspect_head, BodyFraming, Rejection};
use crate::proxy::Proxy;
use bounded::BoundedReads;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long an idle keep-alive connection stays open once shutdown starts,
/// waiting for a request to serve with `Connection: close`. Well below
/// the shutdown grace period (5 s by default).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// How long a rejected client gets to read the error response before the
/// socket closes; bounded so that a client that never reads cannot hold it.
const REJECT_LINGER: Duration = Duration::from_secs(2);

/// Wraps the Pingora proxy app with the client-side limits.
pub struct Downstream {
    proxy: Arc<HttpProxy<Proxy>>,
    app: Arc<App>,
    slots: Arc<Semaphore>,
    /// Signalled when a new connection finds no free slot; one idle
    /// keep-alive connection closes to make room.
    pressure: Notify,
}

/// The outcome of reading one request header.
enum Head {
    /// The complete header with the bytes read after it: body bytes, and
    /// possibly pipelined requests.
    Ready {
        buffer: BytesMut,
        header_len: usize,
        framing: BodyFraming,
    },
    /// The client closed, stayed idle, or the server is stopping.
    Closed,
    /// Send this rejection and close.
    Reject(Rejection),
}

impl Downstream {
    /// `max_connections` is read once: the limit needs a restart to change.
    pub fn new(proxy: HttpProxy<Proxy>, app: Arc<App>, max_connections: usize) -> Downstream {
        Downstream {
            proxy: Arc::new(proxy),
            app,
            slots: Arc::new(Semaphore::new(max_connections)),
            pressure: Notify::new(),
        }
    }

    fn limits(&self) -> Limits {
        self.app.snapshots.load().config.limits.clone()
    }

    async fn admit(&self, stream: &mut Stream, limits: &Limits) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(permit);
        }
        self.pressure.notify_one();
        match timeout(
            limits.connection_wait,
            Arc::clone(&self.slots).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Some(permit),
            _ => {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection refused: the connection limit is reached"
                );
                reject(stream, &Rejection::too_many_connections()).await;
                None
            }
        }
    }

    async fn serve_h1(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut first = true;
        // Bytes read past the end of the previous request: the start of a
        // pipelined one.
        let mut pipelined = BytesMut::new();
        loop {
            let limits = self.limits();
            let head = read_head(
                &mut stream,
                pipelined,
                &limits,
                first,
                shutdown,
                &self.pressure,
            )
            .await;
            let (prefix, allowed) = match head {
                Head::Ready {
                    mut buffer,
                    header_len,
                    framing,
                } => {
                    // Pingora gets this request's bytes only, already read
                    // or still to come (see `bounded`). Bytes past them are
                    // a pipelined request, which goes through `read_head`
                    // and its checks like any other. The end of a chunked
                    // body or of an upgraded connection is unknown here, so
                    // Pingora reads those without a bound.
                    let (end, allowed) = match framing {
                        BodyFraming::Length(body) => {
                            let in_buffer = (buffer.len() - header_len) as u64;
                            let end = usize::try_from(body)
                                .ok()
                                .and_then(|body| header_len.checked_add(body))
                                .map_or(buffer.len(), |end| end.min(buffer.len()));
                            (end, body.saturating_sub(in_buffer))
                        }
                        // TODO: a request pipelined behind a chunked one (or a
                        // rejected WebSocket upgrade) that arrives while it
                        // waits for the backend makes Pingora return 400 for
                        // it. Bounding it needs a chunk parser in `bounded`.
                        BodyFraming::Chunked | BodyFraming::Upgrade => (buffer.len(), u64::MAX),
                    };
                    // An empty tail would still share, and so keep alive,
                    // the allocation Pingora gets for this request.
                    pipelined = if end < buffer.len() {
                        buffer.split_off(end)
                    } else {
                        BytesMut::new()
                    };
                    (buffer, allowed)
                }
                Head::Closed => return,
                Head::Reject(rejection) => {
                    tracing::warn!(
                        status = rejection.status,
                        reason = %rejection.reason,
                        "request rejected before routing"
                    );
                    reject(&mut stream, &rejection).await;
                    return;
                }
            };
            let mut session = ServerSession::new_http1(BoundedReads::wrap(stream, allowed));
            match settings.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => session.set_keepalive(Some(limits.keepalive_timeout.as_secs().max(1))),
            }
            if *shutdown.borrow() {
                // A request that arrives while the server stops is served
                // with `Connection: close`, so the client reconnects to the
                // new process instead of meeting a closed socket.
                session.set_keepalive(None);
            }
            session.set_pipelined_prefix(prefix);
            // Boxed so that the proxy's large future lives only while a
            // request runs, not in the state of every idle connection.
            let reused = Box::pin(HttpServerApp::process_new_http(
                &self.proxy,
                session,
                shutdown,
            ))
            .await;
            let Some(reused) = reused else {
                return;
            };
            let (next, next_settings) = reused.consume();
            let Some((inner, held)) = BoundedReads::unwrap(next) else {
                return;
            };
            pipelined.unsplit(held);
            stream = inner;
            settings = next_settings;
            first = false;
        }
    }
}

#[async_trait]
impl ServerApp for Downstream {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.limits();
        let _slot = self.admit(&mut stream, &limits).await?;
        if self.is_h2(&mut stream, &limits).await {
            // HTTP/2 has its own framing; Pingora's h2 server handles it,
            // with `h2_idle_timeout` set from `keepalive_timeout`.
            return Box::pin(ServerApp::process_new(&self.proxy, stream, shutdown)).await;
        }
        self.serve_h1(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

impl Downstream {
    async fn is_h2(&self, stream: &mut Stream, limits: &Limits) -> bool {
        if stream.get_ssl_digest().is_some() {
            return matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        }
        let h2c = self.proxy.server_options.as_ref().is_some_and(|o| o.h2c);
        if !h2c {
            return false;
        }
        let mut buffer = [0u8; H2_PREFACE.len()];
        match timeout(limits.header_read_timeout, stream.try_peek(&mut buffer)).await {
            Ok(Ok(true)) => buffer == H2_PREFACE,
            _ => false,
        }
    }
}

/// Waits until the shutdown watch turns true.
async fn stopping(shutdown: &ShutdownWatch) {
    let mut watch = shutdown.clone();
    let _ = watch.wait_for(|stopping| *stopping).await;
}

/// Reads one request header. Between requests on a keep-alive connection,
/// a server shutdown or connection pressure closes the idle connection.
async fn read_head(
    stream: &mut Stream,
    pipelined: BytesMut,
    limits: &Limits,
    first: bool,
    shutdown: &ShutdownWatch,
    pressure: &Notify,
) -> Head {
    if pipelined.is_empty() {
        let mut buffer = BytesMut::with_capacity(4096);
        if !wait_for_request(stream, &mut buffer, limits, first, shutdown, pressure).await {
            return Head::Closed;
        }
        read_rest_of_head(stream, buffer, limits).await
    } else {
        read_rest_of_head(stream, pipelined, limits).await
    }
}

/// Waits for the first bytes of a request on a new or idle keep-alive
/// connection. Returns false when the client closed, stayed idle too long,
/// or the server is closing idle connections.
async fn wait_for_request(
    stream: &mut Stream,
    buffer: &mut BytesMut,
    limits: &Limits,
    first: bool,
    shutdown: &ShutdownWatch,
    pressure: &Notify,
) -> bool {
    let idle = if first {
        limits.header_read_timeout
    } else if *shutdown.borrow() {
        SHUTDOWN_DRAIN
    } else {
        limits.keepalive_timeout
    };
    // A new connection is not cut by shutdown or pressure while it waits
    // for its first request, because the client has just been accepted and
    // may be sending already. Pingora's grace period bounds the wait.
    // An idle keep-alive connection gets `SHUTDOWN_DRAIN` after shutdown
    // starts. A client in the middle of a request burst sends its next
    // request in that window and gets its response with `Connection: close`.
    // Closing at once would reset the request it was about to send.
    let first_read = async {
        tokio::select! {
            read = timeout(idle, stream.read_buf(buffer)) => Some(read),
            _ = stopping(shutdown), if !first && !*shutdown.borrow() => {
                Some(timeout(SHUTDOWN_DRAIN, stream.read_buf(buffer)).await)
            }
            _ = pressure.notified(), if !first => None,
        }
    };
    matches!(first_read.await, Some(Ok(Ok(n))) if n > 0)
}

/// Reads until `buffer` contains a complete header, within
/// `header_read_timeout`, and checks it.
async fn read_rest_of_head(stream: &mut Stream, mut buffer: BytesMut, limits: &Limits) -> Head {
    let deadline = Instant::now() + limits.header_read_timeout;
    loop {
        match head_end(&buffer) {
            Some(end) if end > limits.max_header_bytes => {
                return Head::Reject(Rejection::header_too_large(limits.max_header_bytes))
            }
            Some(end) => {
                return match inspect_head(&buffer[..end], limits) {
                    Ok(framing) => Head::Ready {
                        buffer,
                        header_len: end,
                        framing,
                    },
                    Err(rejection) => Head::Reject(rejection),
                };
            }
            None if buffer.len() > limits.max_header_bytes => {
                return Head::Reject(Rejection::header_too_large(limits.max_header_bytes))
            }
            None => {}
        }
        buffer.reserve(4096);
        match timeout_at(deadline, stream.read_buf(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Head::Closed,
            Err(_) => return Head::Reject(Rejection::header_timeout(limits.header_read_timeout)),
        }
    }
}

/// The length of the header section including its blank line, once the
/// buffer contains it. Empty lines before the request line are skipped, as
/// RFC 9112 section 2.2 allows.
fn head_end(buffer: &[u8]) -> Option<usize> {
    let start = buffer
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buffer.len());
    let rest = &buffer[start..];
    // A bare LF also ends a line for httparse; finding "\n\n" as well makes
    // such a header complete here, so that `inspect_head` rejects it.
    let crlf = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = rest.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(start + end)
}

/// Writes the rejection and closes the connection, leaving the client a
/// short time to read it (closing with unread input would send a reset
/// that can destroy the response in flight).
async fn reject(stream: &mut Stream, rejection: &Rejection) {
    crate::metrics::global()
        .rejected_requests
        .with_label_values(&[rejection.status.to_string().as_str()])
        .inc();
    let response = rejection.to_response();
    let linger = async {
        if stream.write_all(&response).await.is_err() {
            return;
        }
        if stream.flush().await.is_err() {
            return;
        }
        let _ = AsyncWriteExt::shutdown(stream).await;
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        while drained < 1024 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = timeout(REJECT_LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::head_end;

    #[test]
    fn head_end_finds_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"\r\nGET / HTTP/1.1\r\n\r\n"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
    }
}
