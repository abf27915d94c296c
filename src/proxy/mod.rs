//! The Pingora `ProxyHttp` implementation: the request phases, in order.
//!
//! 1. `request_filter`: load the snapshot, assign the request id, serve
//!    ACME HTTP-01 tokens, route, redirect plain HTTP, check the body size,
//!    then pick a backend (waiting a bounded time when none is healthy).
//! 2. `upstream_peer`: turn the pick into a Pingora peer; on a retry, pick
//!    another backend.
//! 3. `upstream_request_filter`: forwarding headers and the request id.
//! 4. `response_filter`: hop-by-hop removal, request id, HSTS.
//! 5. `logging`: the access log event and metrics.
//!
//! Client-side limits that apply before a request is parsed (header
//! deadline, header size, framing, connection count) live in
//! `crate::downstream` and `framing`.

mod forwarding;
pub mod framing;
mod local;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::{FailToProxy, ProxyWarnLogContext};

use crate::app::App;
use crate::config::PlainHttp;
use crate::health::{Ejection, InFlightGuard, Outcome};
use crate::metrics;
use crate::routing::normalize_host;
use crate::snapshot::{Pick, Snapshot};

pub use forwarding::REQUEST_ID;

const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Attempts Pingora makes per request (`ServerConf::max_retries`, 16 by
/// default), counting the first.
pub const MAX_ATTEMPTS: u32 = 16;

/// Returns the pause before each attempt of a request that no backend has
/// received yet, once the route's immediate retries are used. The pause
/// spreads the remaining attempts over `no_backend_wait` and is at least
/// 100 ms.
fn unreached_pause(no_backend_wait: Duration) -> Duration {
    (no_backend_wait / (MAX_ATTEMPTS - 2)).max(Duration::from_millis(100))
}

/// Per-request state shared by the phases.
pub struct RequestCtx {
    started: Instant,
    snapshot: Option<Arc<Snapshot>>,
    request_id: String,
    tls: bool,
    host: String,
    route: Option<usize>,
    /// The pick made in `request_filter`, used by the first `upstream_peer`.
    first_pick: Option<Pick>,
    /// The backend of the current attempt; dropping it ends its in-flight count.
    current: Option<(Pick, InFlightGuard)>,
    tried: Vec<SocketAddr>,
    attempts: u32,
    upstream_started: Option<Instant>,
    upstream_header_at: Option<Instant>,
    upstream_status: Option<u16>,
    /// Request body bytes read so far, for the streaming `max_body` check.
    body_bytes: u64,
    /// When every backend tried so far refused or timed out the connection,
    /// the time of the first such failure: the request has reached no
    /// backend, so it may keep trying until `no_backend_wait` after it.
    unreached_since: Option<Instant>,
}

impl RequestCtx {
    pub fn route_name(&self) -> Option<&str> {
        let snapshot = self.snapshot.as_ref()?;
        Some(snapshot.route_states.get(self.route?)?.name.as_str())
    }
}

pub struct Proxy {
    app: Arc<App>,
}

impl Proxy {
    pub fn new(app: Arc<App>) -> Proxy {
        Proxy { app }
    }

    /// Picks a backend for the route, waiting up to the configured bound for
    /// one to become healthy. Reloads the snapshot while waiting so that a
    /// weight change or config reload takes effect for waiting requests.
    async fn pick_with_wait(&self, ctx: &mut RequestCtx) -> Option<Pick> {
        let (snapshot, route) = (ctx.snapshot.clone()?, ctx.route?);
        if let Some(pick) = snapshot.route_states[route].pick(&[]) {
            return Some(pick);
        }

        // Only a request that has to wait pays for what follows.
        let settings = &snapshot.config.proxy;
        let wait = if snapshot.route_states[route].has_pending() {
            settings.startup_wait.max(settings.no_backend_wait)
        } else {
            settings.no_backend_wait
        };
        let deadline = Instant::now() + wait;
        let route_name = snapshot.route_states[route].name.clone();
        let mut snapshot = snapshot;
        let mut route = route;
        loop {
            if let Some(pick) = snapshot.route_states[route].pick(&[]) {
                ctx.snapshot = Some(snapshot);
                ctx.route = Some(route);
                return Some(pick);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            // Wake on a health change, and at least every 100 ms to notice
            // weight changes and config swaps.
            let remaining = deadline - now;
            self.app
                .registry
                .wait_for_change(remaining.min(Duration::from_millis(100)))
                .await;
            snapshot = self.app.snapshots.load();
            route = snapshot.route_index(&route_name)?;
        }
    }

    /// Feeds passive health with the outcome of the current attempt, and
    /// ejects the backend when it failed too often in a row, unless the
    /// pool already has its share of ejected backends.
    fn report(&self, ctx: &RequestCtx, outcome: Outcome) {
        let (Some(snapshot), Some((pick, _))) = (&ctx.snapshot, &ctx.current) else {
            return;
        };
        let Some(passive) = snapshot
            .config
            .pools
            .get(&pick.pool.name)
            .and_then(|pool| pool.passive.as_ref())
        else {
            return;
        };
        let backends = &pick.pool.backends;
        let may_eject = || {
            let cap = (backends.len() as f64 * passive.max_ejection_share).floor() as usize;
            let ejected = backends.iter().filter(|b| b.health.is_ejected()).count();
            ejected < cap
        };
        match pick.health.report(outcome, passive, may_eject) {
            Ejection::None | Ejection::Capped { first: false } => {}
            Ejection::Ejected(duration) => tracing::warn!(
                request_id = %ctx.request_id,
                pool = %pick.pool.name,
                backend = %pick.address,
                ejection_ms = duration.as_millis() as u64,
                "backend ejected by passive health"
            ),
            Ejection::Capped { first: true } => tracing::warn!(
                request_id = %ctx.request_id,
                pool = %pick.pool.name,
                backend = %pick.address,
                max_ejection_share = passive.max_ejection_share,
                "backend keeps failing but the pool's ejection cap is reached; it stays in"
            ),
        }
    }

    /// Tells whether this request used up the route's immediate retries,
    /// so that it only goes on because no backend has received it yet.
    fn out_of_quick_retries(&self, ctx: &RequestCtx) -> bool {
        let allowed = ctx
            .snapshot
            .as_ref()
            .zip(ctx.route)
            .map_or(0, |(s, r)| s.config.routes[r].retries);
        ctx.attempts > allowed
    }

    /// Picks the next backend for a request that no backend has received,
    /// after a pause: a restarting backend refuses connections for a moment
    /// before its health check fails, and the request should outlive that
    /// moment rather than fail at once. Loads the current snapshot so that a
    /// weight change or reload made meanwhile applies.
    async fn pick_after_pause(&self, ctx: &mut RequestCtx) -> Result<Pick> {
        let (Some(snapshot), Some(route)) = (ctx.snapshot.clone(), ctx.route) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "upstream_peer without a route",
            ));
        };
        let wait = snapshot.config.proxy.no_backend_wait;
        tokio::time::sleep(unreached_pause(wait)).await;
        let route_name = &snapshot.route_states[route].name;
        let current = self.app.snapshots.load();
        if let Some(index) = current.route_index(route_name) {
            if let Some(pick) = current.route_states[index].pick(&[]) {
                ctx.snapshot = Some(Arc::clone(&current));
                ctx.route = Some(index);
                return Ok(pick);
            }
        }
        // No backend counts as healthy yet: try the last one again, which
        // may be the one restarting.
        match &ctx.current {
            Some((pick, _)) => Ok(pick.clone()),
            None => Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "no backend left to try",
            )),
        }
    }

    fn build_peer(&self, ctx: &RequestCtx, pick: &Pick, upgrade: bool) -> Box<HttpPeer> {
        let mut peer = HttpPeer::new(pick.address, false, String::new());
        if let (Some(snapshot), Some(route)) = (&ctx.snapshot, ctx.route) {
            let route_config = &snapshot.config.routes[route];
            let settings = &snapshot.config.proxy;
            peer.options.connection_timeout = Some(route_config.connect_timeout);
            peer.options.read_timeout = Some(if upgrade {
                route_config.websocket_idle_timeout
            } else {
                route_config.read_timeout
            });
            peer.options.write_timeout = Some(settings.write_timeout);
            peer.options.idle_timeout = Some(settings.upstream_idle_timeout);
        }
        Box::new(peer)
    }
}

/// Reports whether the error proves that the request header was never fully
/// written to the upstream connection. Pingora 0.9 reports a failed header
/// write as `WriteError` or `WriteTimedout` with the context "while writing
/// request headers", before any body byte is sent. A backend cannot act on a
/// request it never fully received.
fn request_header_unsent(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::WriteError | ErrorType::WriteTimedout)
        && e.context
            .as_ref()
            .is_some_and(|c| c.as_str().contains("request header"))
}

/// Converts a duration to milliseconds with microsecond precision, which
/// prints without binary noise (1.488, not 1.4882980000000001).
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// Errors of the connect phase: the request never reached the backend.
fn is_connect_error(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::SocketError
    )
}

fn peer_ip(session: &Session) -> Option<IpAddr> {
    match session.client_addr()? {
        PingoraAddr::Inet(addr) => Some(addr.ip()),
        _ => None,
    }
}

/// Rewrites an absolute-form target to origin-form, because backends such
/// as uvicorn route on the path only. Pingora has already refused a `Host`
/// that differs from the target's authority (RFC 9112 section 3.2.2).
fn to_origin_form(request: &mut RequestHeader) -> std::result::Result<(), &'static str> {
    let Some((authority, origin)) = forwarding::split_absolute_form(request.raw_path()) else {
        if request.raw_path() == b"*" {
            return Ok(());
        }
        // Another scheme, or a CONNECT target: this is not a forward proxy,
        // and the router would see a path the backend does not.
        return Err("the request target must be a path or an http:// or https:// URL\n");
    };
    let authority = match std::str::from_utf8(authority) {
        Ok(text) if valid_authority(text) => text.to_string(),
        _ => return Err("invalid host in the absolute-form request target\n"),
    };
    request
        .set_raw_path(&origin)
        .map_err(|_| "invalid absolute-form request target\n")?;
    request
        .insert_header(http::header::HOST, authority)
        .map_err(|_| "invalid host in the absolute-form request target\n")?;
    Ok(())
}

/// Extracts the request's host, lower-case and without port. Returns
/// `None` when it is missing or not a valid `host[:port]` (RFC 9110
/// section 7.2), so a value such as `a.test/../x` never reaches routing.
fn request_host(request: &RequestHeader) -> Option<String> {
    if let Some(host) = request.uri.host() {
        return Some(normalize_host(host));
    }
    let header = request.headers.get(http::header::HOST)?.to_str().ok()?;
    valid_authority(header).then(|| normalize_host(header))
}

fn valid_authority(value: &str) -> bool {
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((literal, after)) => {
                if literal.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, after.strip_prefix(':'))
            }
            None => return false,
        },
        None => match value.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(value), None),
        },
    };
    let host_valid = host.is_none_or(|host| {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    });
    let port_valid = port.is_none_or(|port| port.parse::<u16>().is_ok());
    host_valid && port_valid
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            snapshot: None,
            request_id: String::new(),
            tls: false,
            host: String::new(),
            route: None,
            first_pick: None,
            current: None,
            tried: Vec::new(),
            attempts: 0,
            upstream_started: None,
            upstream_header_at: None,
            upstream_status: None,
            body_bytes: 0,
            unreached_since: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.app.snapshots.load();
        ctx.request_id = forwarding::request_id(
            session
                .req_header()
                .headers
                .get(REQUEST_ID)
                .map(|v| v.as_bytes()),
        );
        ctx.tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        ctx.snapshot = Some(Arc::clone(&snapshot));

        // HTTP/1.x heads were checked by `crate::downstream` before parsing.
        if session.is_http2() {
            if let Err(rejection) =
                framing::inspect_http2_head(session.req_header(), &snapshot.config.limits)
            {
                tracing::warn!(
                    status = rejection.status,
                    reason = %rejection.reason,
                    "request rejected before routing"
                );
                let body = format!("{}\n", rejection.reason);
                local::respond(session, ctx, rejection.status, &[], &body).await?;
                return Ok(true);
            }
        }

        if !session.is_http2() && session.req_header().raw_path().first() != Some(&b'/') {
            if let Err(reason) = to_origin_form(session.req_header_mut()) {
                local::respond(session, ctx, 400, &[], reason).await?;
                return Ok(true);
            }
        }

        let Some(host) = request_host(session.req_header()) else {
            local::respond(session, ctx, 400, &[], "missing or invalid Host header\n").await?;
            return Ok(true);
        };
        ctx.host = host;
        let path = session.req_header().uri.path();

        if !ctx.tls && path.starts_with(ACME_CHALLENGE_PREFIX) {
            let token = &path[ACME_CHALLENGE_PREFIX.len()..];
            match self.app.http01_response(token) {
                Some(key_authorization) => {
                    local::respond(session, ctx, 200, &[], &key_authorization).await?
                }
                None => {
                    local::respond(session, ctx, 404, &[], "unknown ACME challenge token\n").await?
                }
            }
            return Ok(true);
        }

        let Some(route) = snapshot.routes.find(&ctx.host, path) else {
            local::respond(session, ctx, 404, &[], "no route for this host and path\n").await?;
            return Ok(true);
        };
        ctx.route = Some(route);
        let route_config = &snapshot.config.routes[route];
        let listeners = &snapshot.config.listeners;

        if !ctx.tls && listeners.plain_http == PlainHttp::Redirect && !route_config.plain_http {
            if let Some(https) = listeners.https {
                let location = local::https_location(session.req_header(), &ctx.host, https.port());
                local::respond(session, ctx, 308, &[("location", location)], "").await?;
                return Ok(true);
            }
        }

        if let (Some(limit), Some(length)) = (
            route_config.max_body,
            local::content_length(session.req_header()),
        ) {
            if length > limit {
                local::respond(
                    session,
                    ctx,
                    413,
                    &[("connection", "close".into())],
                    "request body too large\n",
                )
                .await?;
                return Ok(true);
            }
        }

        // Pingora's read timeout bounds each read of the request body, not
        // the whole body; the write timeout bounds each write of the response.
        // TODO: Pingora 0.9.1 ignores the read timeout on HTTP/2 streams, so
        // nothing here bounds a stalled h2 request body.
        session.set_read_timeout(Some(route_config.body_read_timeout));
        session.set_write_timeout(Some(snapshot.config.limits.response_write_timeout));

        if session.is_upgrade_req() {
            // Pingora's downstream read timeout (60 s by default) also
            // applies to an upgraded connection, so a quiet WebSocket would
            // be cut without this.
            session.set_read_timeout(Some(route_config.websocket_idle_timeout));
        }

        match self.pick_with_wait(ctx).await {
            Some(pick) => {
                ctx.first_pick = Some(pick);
                Ok(false)
            }
            None => {
                let retry_after = snapshot.config.proxy.no_backend_wait.as_secs().max(1);
                metrics::global()
                    .no_healthy_backend
                    .with_label_values(&[route_config.name.as_str()])
                    .inc();
                tracing::warn!(
                    request_id = %ctx.request_id,
                    route = %route_config.name,
                    "no healthy backend for the route"
                );
                local::respond(
                    session,
                    ctx,
                    503,
                    &[("retry-after", retry_after.to_string())],
                    "no healthy backend is available, retry later\n",
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let pick = match ctx.first_pick.take() {
            Some(pick) => pick,
            None => {
                // A retry: prefer a backend this request has not tried yet,
                // and fall back to the last one (a fresh connection to it).
                let (snapshot, route) = match (&ctx.snapshot, ctx.route) {
                    (Some(snapshot), Some(route)) => (snapshot, route),
                    _ => {
                        return Err(Error::explain(
                            ErrorType::InternalError,
                            "upstream_peer without a route",
                        ))
                    }
                };
                let untried = snapshot.route_states[route].pick(&ctx.tried);
                match untried {
                    Some(pick) if !self.out_of_quick_retries(ctx) => pick,
                    _ => self.pick_after_pause(ctx).await?,
                }
            }
        };
        ctx.attempts += 1;
        if !ctx.tried.contains(&pick.address) {
            ctx.tried.push(pick.address);
        }
        ctx.upstream_started.get_or_insert_with(Instant::now);
        let guard = pick.health.begin_request();
        let mut peer = self.build_peer(ctx, &pick, session.is_upgrade_req());
        if let (Some(since), Some(snapshot)) = (ctx.unreached_since, &ctx.snapshot) {
            // A retry after failed connects ends within `no_backend_wait` of
            // the first failure, even when the connects time out.
            let remaining = (since + snapshot.config.proxy.no_backend_wait)
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            peer.options.connection_timeout = peer
                .options
                .connection_timeout
                .map(|timeout| timeout.min(remaining));
        }
        ctx.current = Some((pick, guard));
        Ok(peer)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // `request_filter` already rejected a declared Content-Length over
        // the limit. A chunked body is counted here as it streams, and the
        // request is aborted with 413 once it passes the limit.
        let Some(chunk) = body.as_ref() else {
            return Ok(());
        };
        ctx.body_bytes += chunk.len() as u64;
        let limit = ctx
            .snapshot
            .as_ref()
            .zip(ctx.route)
            .and_then(|(s, r)| s.config.routes[r].max_body);
        match limit {
            Some(limit) if ctx.body_bytes > limit => Err(Error::explain(
                ErrorType::HTTPStatus(413),
                format!("request body passed the route's max_body of {limit} bytes"),
            )),
            _ => Ok(()),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.report(ctx, Outcome::Failure);
        // A failed connect never delivered a byte, so any method may be
        // retried on another backend.
        let unreached_since = *ctx.unreached_since.get_or_insert_with(Instant::now);
        let wait = ctx
            .snapshot
            .as_ref()
            .map_or(Duration::ZERO, |s| s.config.proxy.no_backend_wait);
        // Pingora stops after `MAX_ATTEMPTS`; the pause spreads those over
        // the wait.
        let retry = !self.out_of_quick_retries(ctx)
            || (unreached_since.elapsed() + unreached_pause(wait) <= wait
                && ctx.attempts < MAX_ATTEMPTS);
        let route = ctx.route_name().unwrap_or("");
        let (pool, backend) = match &ctx.current {
            Some((pick, _)) => (pick.pool.name.as_str(), pick.address.to_string()),
            None => ("", String::new()),
        };
        let metrics = metrics::global();
        metrics
            .upstream_connect_errors
            .with_label_values(&[route, pool, backend.as_str()])
            .inc();
        if retry {
            metrics.retries.with_label_values(&[route, "connect"]).inc();
        }
        // One warning per request; the paced attempts that follow while
        // a backend restarts would otherwise log one each.
        if ctx.attempts <= 1 {
            tracing::warn!(
                request_id = %ctx.request_id,
                backend = %peer,
                error = %e,
                retry,
                "upstream connect failed"
            );
        } else {
            tracing::debug!(
                request_id = %ctx.request_id,
                backend = %peer,
                error = %e,
                attempt = ctx.attempts,
                retry,
                "upstream connect failed again"
            );
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        if e.esource() == &ErrorSource::Upstream {
            self.report(ctx, Outcome::Failure);
        }
        let never_sent = request_header_unsent(&e);
        if !never_sent {
            ctx.unreached_since = None;
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        let route = ctx
            .snapshot
            .as_ref()
            .zip(ctx.route)
            .map(|(s, r)| &s.config.routes[r]);
        let within_budget = route.is_some_and(|r| ctx.attempts <= r.retries);
        let idempotent_allowed = route.is_some_and(|r| r.retry_idempotent)
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if !within_budget {
            e.set_retry(false);
        } else if never_sent {
            // The request header never made it onto the connection, so no
            // backend can have acted on it: any method may go elsewhere.
            e.set_retry(true);
        } else if idempotent_allowed {
            // Pingora marks a failure on a reused pooled connection that
            // produced no response byte as `ReusedOnly`; resolve it.
            // NOTE: a backend that dies while working on the request looks
            // the same, so such a GET goes to a second backend too, as with
            // nginx's `proxy_next_upstream error`. Setting
            // `retry_idempotent = false` on the route turns this off.
            e.retry.decide_reuse(client_reused);
        } else {
            // The request may have reached the backend: a webhook POST is
            // never sent twice.
            e.set_retry(false);
        }
        if e.retry() {
            let reason = if never_sent {
                "request_unsent"
            } else {
                "reused_connection"
            };
            metrics::global()
                .retries
                .with_label_values(&[ctx.route_name().unwrap_or(""), reason])
                .inc();
            tracing::warn!(
                request_id = %ctx.request_id,
                backend = %peer,
                error = %e,
                reason,
                "request retried: it did not reach the backend, or is idempotent"
            );
        }
        e
    }

    /// Suppresses Pingora's error line while the access log is on, because
    /// the access event already carries the error. Without the access log,
    /// Pingora's line is the only record, so it stays.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        ctx.snapshot
            .as_ref()
            .is_some_and(|s| s.config.log.access_log)
    }

    /// `fail_to_connect` and `error_while_proxy` log failed attempts with
    /// the request id; Pingora's own line for a retry would repeat them.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if ctx.unreached_since.is_some() && is_connect_error(e) {
            // No backend accepted a connection within `no_backend_wait`. The
            // response and the metric are those of a route without a healthy
            // backend.
            metrics::global()
                .no_healthy_backend
                .with_label_values(&[ctx.route_name().unwrap_or("")])
                .inc();
            let retry_after = ctx
                .snapshot
                .as_ref()
                .map_or(1, |s| s.config.proxy.no_backend_wait.as_secs().max(1));
            let sent = local::respond(
                session,
                ctx,
                503,
                &[("retry-after", retry_after.to_string())],
                "no backend accepted the connection, retry later\n",
            )
            .await;
            if let Err(err) = sent {
                tracing::debug!(error = %err, "cannot send the error response to the client");
            }
            return FailToProxy {
                error_code: 503,
                can_reuse_downstream: false,
            };
        }
        // Pingora's default mapping, except that a client too slow with its
        // body gets 408 rather than 400, and a backend read that timed out
        // gives 504, as in nginx.
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (ErrorType::ReadTimedout, ErrorSource::Upstream) => 504,
            (_, ErrorSource::Upstream) => 502,
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0,
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => 408,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0 {
            if let Err(err) = session.respond_error(code).await {
                tracing::debug!(error = %err, "cannot send the error response to the client");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer = peer_ip(session);
        let trusted = ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| forwarding::is_trusted(peer, &s.config.proxy.trusted_proxies));
        let scheme = if ctx.tls { "https" } else { "http" };
        // An HTTP/2 request carries its host in `:authority`; HTTP/1.1
        // backends need it as `Host`.
        if !upstream_request.headers.contains_key(http::header::HOST) {
            if let Some(authority) = upstream_request.uri.authority().map(|a| a.to_string()) {
                upstream_request.insert_header(http::header::HOST, authority)?;
            }
        }
        let host = upstream_request
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&ctx.host)
            .to_string();
        forwarding::set_forwarding_headers(upstream_request, peer, trusted, scheme, &host)?;
        upstream_request.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_header_at = Some(Instant::now());
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        self.report(
            ctx,
            if status >= 500 {
                Outcome::Failure
            } else {
                Outcome::Success
            },
        );
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        forwarding::strip_response_hop_by_hop(response);
        response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        if ctx.tls {
            if let Some(hsts) = ctx
                .snapshot
                .as_ref()
                .and_then(|s| s.config.tls.hsts.as_ref())
            {
                response.insert_header("strict-transport-security", hsts.as_str())?;
            }
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let pick = ctx.current.as_ref().map(|(pick, _)| pick);
        let pool = pick.map_or("", |pick| pick.pool.name.as_str());
        let route = ctx.route_name().unwrap_or("");
        let elapsed = ctx.started.elapsed();
        metrics::global().record_request(route, pool, status, elapsed);
        let (log_access, log_query) = ctx.snapshot.as_ref().map_or((true, false), |s| {
            (s.config.log.access_log, s.config.log.log_query)
        });
        if log_access {
            let request = session.req_header();
            let backend = pick
                .map(|pick| pick.address.to_string())
                .unwrap_or_default();
            let upstream_ms = match (ctx.upstream_started, ctx.upstream_header_at) {
                (Some(start), Some(header)) => millis(header.duration_since(start)),
                _ => 0.0,
            };
            // Webhook verification queries carry tokens, so the query string
            // is left out unless `log_query` is set.
            let path = match (log_query, request.uri.path_and_query()) {
                (true, Some(path_and_query)) => path_and_query.as_str(),
                _ => request.uri.path(),
            };
            tracing::info!(
                target: "switchyard::access",
                request_id = %ctx.request_id,
                client = %session.client_addr().map(|a| a.to_string()).unwrap_or_default(),
                method = %request.method,
                host = %ctx.host,
                path,
                status,
                route,
                pool,
                backend = %backend,
                upstream_ms,
                total_ms = millis(elapsed),
                bytes_in = session.body_bytes_read(),
                bytes_out = session.body_bytes_sent(),
                retries = ctx.attempts.saturating_sub(1),
                error = error.map(|e| e.to_string()).unwrap_or_default(),
                "request"
            );
        }
        if let (Some(route), Some(pick)) = (ctx.route_name(), pick) {
            // A shift judges its target pool by 5xx responses and upstream
            // failures, because a client that went away is not the pool's fault.
            let failed = status >= 500 || error.is_some_and(|e| e.esource == ErrorSource::Upstream);
            self.app
                .admin
                .outcomes
                .record(route, &pick.pool.name, failed, elapsed);
        }
        // Dropping the guard ends the backend's in-flight count.
        ctx.current.take();
    }
}

#[cfg(test)]
mod tests {
    use super::valid_authority;

    #[test]
    fn authority_values() {
        for good in [
            "api.test",
            "API.test:8443",
            "127.0.0.1:80",
            "[::1]:8080",
            "[::1]",
            "a_b.test",
        ] {
            assert!(valid_authority(good), "{good} rejected");
        }
        for bad in [
            "",
            "api.test/../x",
            "api.test:99999999",
            "api.test:",
            "a b",
            "[zz]:80",
            "u@api.test",
            "api.test:80:80",
        ] {
            assert!(!valid_authority(bad), "{bad} accepted");
        }
    }
}
