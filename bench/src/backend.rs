//! A fast fixed-response HTTP/1.1 backend: every path returns the same body
//! with `x-pool: NAME`, `/health` returns 200, and a share of requests can
//! fail with 500 or be delayed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// Sent as the `x-pool` header of every response.
    pub name: String,
    /// Size of the response body of non-health requests, in bytes.
    pub body_bytes: usize,
    /// Share of non-health requests (0 to 1) that get a 500 response.
    pub fail_ratio: f64,
    /// Delay before each non-health response.
    pub delay: Duration,
}

impl BackendOptions {
    pub fn new(name: &str) -> BackendOptions {
        BackendOptions {
            name: name.to_string(),
            body_bytes: 100,
            fail_ratio: 0.0,
            delay: Duration::ZERO,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fail_ratio) {
            return Err(format!(
                "invalid fail ratio {}: it must be between 0 and 1",
                self.fail_ratio
            ));
        }
        HeaderValue::from_str(&self.name).map_err(|_| {
            format!(
                "invalid backend name {:?}: it must be a valid header value",
                self.name
            )
        })?;
        Ok(())
    }
}

struct State {
    pool: HeaderValue,
    body: Bytes,
    fail_ratio: f64,
    delay: Duration,
    served: AtomicU64,
}

impl State {
    /// Spreads failures evenly: request `n` fails when `floor((n+1) * r)`
    /// exceeds `floor(n * r)`, so any window of `1/r` requests contains one.
    fn should_fail(&self, n: u64) -> bool {
        if self.fail_ratio <= 0.0 {
            return false;
        }
        let before = (n as f64 * self.fail_ratio).floor();
        let after = ((n + 1) as f64 * self.fail_ratio).floor();
        after > before
    }
}

/// Serves `listener` until `shutdown` changes. Connections in progress
/// end with the runtime.
pub async fn serve(
    listener: TcpListener,
    options: BackendOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    options.validate()?;
    let state = Arc::new(State {
        pool: HeaderValue::from_str(&options.name).map_err(|e| e.to_string())?,
        body: Bytes::from(vec![b'x'; options.body_bytes]),
        fail_ratio: options.fail_ratio,
        delay: options.delay,
        served: AtomicU64::new(0),
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return Ok(()),
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors or similar: back off instead of spinning.
                eprintln!("backend {}: accept failed: {err}", options.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(Arc::clone(&state), request));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let health = request.uri().path() == "/health";
    // Read the whole request body so the connection stays reusable.
    let _ = request.into_body().collect().await;
    let (status, body) = if health {
        (StatusCode::OK, Bytes::from_static(b"ok\n"))
    } else {
        if !state.delay.is_zero() {
            tokio::time::sleep(state.delay).await;
        }
        let n = state.served.fetch_add(1, Ordering::Relaxed);
        if state.should_fail(n) {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(b"injected failure\n"),
            )
        } else {
            (StatusCode::OK, state.body.clone())
        }
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-pool", state.pool.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

/// A backend on its own thread and single-threaded runtime; it stops when
/// the handle is dropped.
pub struct BackendHandle {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Starts a backend on `listen` (use port 0 for an ephemeral port). Safe to
/// call from inside a Tokio runtime: the backend gets a thread and runtime
/// of its own.
pub fn spawn(listen: SocketAddr, options: BackendOptions) -> Result<BackendHandle, String> {
    options.validate()?;
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make the listener non-blocking: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the backend address: {e}"))?;
    let (shutdown, receiver) = watch::channel(false);
    let name = options.name.clone();
    std::thread::Builder::new()
        .name(format!("backend-{name}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("backend {name}: cannot start the runtime: {err}");
                    return;
                }
            };
            let served = runtime.block_on(async move {
                let listener = TcpListener::from_std(listener)
                    .map_err(|e| format!("cannot register the listener: {e}"))?;
                serve(listener, options, receiver).await
            });
            if let Err(err) = served {
                eprintln!("backend {name}: {err}");
            }
        })
        .map_err(|e| format!("cannot start the backend thread: {e}"))?;
    Ok(BackendHandle { addr, shutdown })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ratio: f64) -> State {
        State {
            pool: HeaderValue::from_static("x"),
            body: Bytes::new(),
            fail_ratio: ratio,
            delay: Duration::ZERO,
            served: AtomicU64::new(0),
        }
    }

    #[test]
    fn failures_follow_the_ratio() {
        for (ratio, expected) in [(0.0, 0), (0.2, 200), (0.05, 50), (1.0, 1000)] {
            let s = state(ratio);
            let failed = (0..1000).filter(|n| s.should_fail(*n)).count();
            assert_eq!(failed, expected, "ratio {ratio}");
        }
        let s = state(0.2);
        let first_ten: Vec<bool> = (0..10).map(|n| s.should_fail(n)).collect();
        assert_eq!(first_ten.iter().filter(|f| **f).count(), 2);
    }

    #[test]
    fn rejects_bad_options() {
        let mut options = BackendOptions::new("blue");
        options.fail_ratio = 1.5;
        assert!(options.validate().unwrap_err().contains("1.5"));
        let options = BackendOptions::new("bad\nname");
        assert!(options.validate().is_err());
    }
}
