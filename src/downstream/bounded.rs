//! A client connection that lets Pingora read one request and no further.
//!
//! Pingora 0.9.1 reads the client socket while a request is in flight, to
//! notice a client that goes away. Bytes that arrive then (a pipelined next
//! request) make it fail the current request with `400`, although the
//! backend may already have it, or, with its own pipelining on, parse the
//! next request without the front's checks. This wrapper hands Pingora at
//! most the rest of the current request's body. Reads past that point go
//! to a side buffer that the front takes back with the stream and checks
//! as the next request. Pingora gets such a read as pending, even at the
//! end of the stream. So a client that half-closes after its request still
//! gets the response (RFC 9112 section 9.6), and a request the backend is
//! working on is not cut because the client stopped sending.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Maximum bytes of pipelined requests kept while one request is in
/// flight. Beyond it the side buffer stops reading, so TCP flow control
/// slows the client down.
const MAX_NEXT_REQUESTS: usize = 64 * 1024;

pub struct BoundedReads {
    inner: Stream,
    /// Bytes Pingora may still read: the rest of the current request body,
    /// or `u64::MAX` when its end is unknown here (chunked, upgraded).
    allowed: u64,
    /// Bytes read past the current request.
    next_requests: BytesMut,
    /// The client closed its sending side.
    closed: bool,
}

impl BoundedReads {
    /// Wraps `inner` so that Pingora reads at most `allowed` more bytes.
    pub fn wrap(inner: Stream, allowed: u64) -> Stream {
        Box::new(BoundedReads {
            inner,
            allowed,
            next_requests: BytesMut::new(),
            closed: false,
        })
    }

    /// Takes the connection back from a stream that Pingora returned for
    /// reuse: the inner stream and the bytes read past the request. `None`
    /// for a stream not made by [`BoundedReads::wrap`], which is then
    /// closed.
    pub fn unwrap(stream: Stream) -> Option<(Stream, BytesMut)> {
        let bounded = stream.into_any().downcast::<BoundedReads>().ok()?;
        Some((bounded.inner, bounded.next_requests))
    }
}

impl fmt::Debug for BoundedReads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedReads")
            .field("inner", &self.inner)
            .field("allowed", &self.allowed)
            .field("next_requests", &self.next_requests.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl AsyncRead for BoundedReads {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.allowed > 0 {
            let limit = usize::try_from(this.allowed)
                .unwrap_or(usize::MAX)
                .min(buf.remaining());
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(limit));
            let result = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            if let Poll::Ready(Ok(())) = result {
                buf.advance(n);
                if this.allowed != u64::MAX {
                    this.allowed -= n as u64;
                }
            }
            return result;
        }
        // Past the request: keep what arrives for the front, and report
        // only a close with nothing pending as the end of the stream.
        while !this.closed && this.next_requests.len() < MAX_NEXT_REQUESTS {
            this.next_requests.reserve(4096);
            let spare = this.next_requests.spare_capacity_mut();
            let mut side = ReadBuf::uninit(spare);
            match Pin::new(&mut this.inner).poll_read(cx, &mut side) {
                Poll::Ready(Ok(())) => {
                    let n = side.filled().len();
                    if n == 0 {
                        this.closed = true;
                        break;
                    }
                    // SAFETY: `poll_read` initialized the first `n` bytes of
                    // the spare capacity.
                    unsafe { this.next_requests.set_len(this.next_requests.len() + n) };
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // A pipelined request, or the end of the stream, waits for this
        // request to finish; Pingora is woken by its other work (the
        // backend's response), not by this read. The front then finds the
        // pipelined bytes, or the end of the stream again, on its next read.
        Poll::Pending
    }
}

impl AsyncWrite for BoundedReads {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for BoundedReads {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for BoundedReads {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for BoundedReads {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for BoundedReads {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for BoundedReads {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for BoundedReads {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest)
    }
}

#[async_trait]
impl Peek for BoundedReads {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // A peek would show bytes past the request; refusing it keeps
        // Pingora to the bounded reads.
        let _ = buf;
        Ok(false)
    }
}
