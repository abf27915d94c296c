//! Responses the proxy writes itself: redirects, ACME tokens, 404, 413, 503.

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use super::{RequestCtx, REQUEST_ID};

/// Writes a complete response with a plain-text body.
pub async fn respond(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    headers: &[(&'static str, String)],
    body: &str,
) -> Result<()> {
    let mut response = ResponseHeader::build(status, Some(4 + headers.len()))?;
    response.insert_header("content-type", "text/plain; charset=utf-8")?;
    response.insert_header("content-length", body.len().to_string())?;
    response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    for (name, value) in headers {
        response.insert_header(*name, value.as_str())?;
    }
    if ctx.tls {
        if let Some(hsts) = ctx
            .snapshot
            .as_ref()
            .and_then(|s| s.config.tls.hsts.as_ref())
        {
            response.insert_header("strict-transport-security", hsts.as_str())?;
        }
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(response), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
            .await?;
    }
    Ok(())
}

/// The `https://` URL for a redirect: same host, path and query, with the
/// HTTPS listener's port unless it is 443.
pub fn https_location(request: &RequestHeader, host: &str, https_port: u16) -> String {
    let path_and_query = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if https_port == 443 {
        format!("https://{host}{path_and_query}")
    } else {
        format!("https://{host}:{https_port}{path_and_query}")
    }
}

/// The declared `Content-Length`, when present and valid.
pub fn content_length(request: &RequestHeader) -> Option<u64> {
    request
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
