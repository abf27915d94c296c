//! The metrics and health listener: `/metrics`, `/healthz` and `/readyz`.
//!
//! It runs on the control service's runtime, apart from the proxy's
//! listeners, and is meant for loopback or a private network only.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::app::App;
use crate::health::HealthState;

/// Opens a listening socket on `address` that another process of the same user
/// with `SO_REUSEPORT` may share; the kernel spreads connections over both.
fn bind_shared(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// Binds `address` and serves until the process exits. The socket has
/// `SO_REUSEPORT`, so during a binary upgrade the new process serves
/// `/readyz` at once while the old one, which set it too, is still bound.
/// Any other bind error is retried every second.
pub async fn serve(app: Arc<App>, address: SocketAddr) {
    let listener = loop {
        match bind_shared(address) {
            Ok(listener) => break listener,
            Err(err) => {
                tracing::warn!(%address, error = %err, "cannot bind the metrics listener; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!(%address, "metrics listener started");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(answer(&app, request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

async fn answer(app: &App, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served here\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => {
            let metrics = super::global();
            metrics.refresh(app);
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics.encode(),
            )
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness(app).await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Set once every listener of this process accepted a probe connection.
static LISTENERS_UP: AtomicBool = AtomicBool::new(false);

/// Returns an error with the reason unless all of these hold:
/// - the proxy's listeners accept connections,
/// - with HTTPS on, the certificate store contains at least one certificate,
/// - the first round of health checks is over,
/// - at least one route has a healthy backend in a pool with a weight above 0.
pub async fn readiness(app: &App) -> Result<(), String> {
    let snapshot = app.snapshots.load();
    let listeners = &snapshot.config.listeners;
    // Listeners stay bound once they accept, and a probe connection to the
    // HTTPS port makes Pingora log a failed handshake, so the listeners are
    // probed only until they have all accepted once.
    if !LISTENERS_UP.load(Ordering::Relaxed) {
        for address in [listeners.http, listeners.https].into_iter().flatten() {
            let target = SocketAddr::new(loopback_for(address.ip()), address.port());
            let connected =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target)).await;
            if !matches!(connected, Ok(Ok(_))) {
                return Err(format!(
                    "listener {address} does not accept connections yet"
                ));
            }
        }
        LISTENERS_UP.store(true, Ordering::Relaxed);
    }
    if listeners.https.is_some() {
        check_certificate_store(app)?;
    }
    let pending = snapshot
        .pools
        .values()
        .flat_map(|pool| pool.backends.iter())
        .any(|backend| backend.health.state() == HealthState::Pending);
    if pending {
        return Err("the first round of health checks is not complete".to_string());
    }
    let servable = snapshot.route_states.iter().any(|route| {
        route
            .pools
            .iter()
            .any(|entry| entry.weight > 0 && entry.pool.healthy_backends() > 0)
    });
    if !servable {
        return Err("no route has a healthy backend".to_string());
    }
    Ok(())
}

/// Returns an error while the store has no certificate at all, because
/// every HTTPS handshake fails then. One certificate is enough, because a
/// name it does not cover is a problem of that name alone.
fn check_certificate_store(app: &App) -> Result<(), String> {
    let Some(store) = app.cert_store() else {
        return Ok(());
    };
    if !store.is_empty() {
        return Ok(());
    }
    let dir = store.dir().display();
    Err(match app.acme() {
        Some(_) => format!(
            "the certificate store {dir} contains no certificate yet, and ACME has not obtained one"
        ),
        None => format!(
            "the certificate store {dir} contains no certificate, so every HTTPS handshake fails; put NAME.crt and NAME.key in it"
        ),
    })
}

/// A wildcard listen address is reached through loopback.
fn loopback_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}
