//! Strict HTTP/1.1 request framing on the public side.
//!
//! A proxy and a backend that disagree on where a request ends can be made
//! to see two requests where the proxy saw one (request smuggling). The
//! proxy therefore accepts only messages whose framing has one reading, and
//! rejects anything else with 400 before a byte reaches a backend:
//! - both `Content-Length` and `Transfer-Encoding`;
//! - several `Content-Length` values that differ, or one that is not digits;
//! - a `Transfer-Encoding` other than exactly `chunked`, or any
//!   `Transfer-Encoding` in an HTTP/1.0 request;
//! - bytes outside the HTTP grammar in the request line, a header name or a
//!   header value, lines ending in a bare LF, folded header lines;
//! - more than one `Host`, or none in HTTP/1.1.
//!
//! Too many header fields, or too many header bytes, get 431, over
//! HTTP/1.x and HTTP/2 alike.

use std::time::Duration;

use pingora::http::RequestHeader;

use crate::config::{format_duration, Limits, MAX_HEADER_COUNT};

/// An error response written before the request reaches Pingora.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: String,
}

impl Rejection {
    fn bad_request(reason: impl Into<String>) -> Rejection {
        Rejection {
            status: 400,
            reason: reason.into(),
        }
    }

    pub fn header_too_large(limit: usize) -> Rejection {
        Rejection {
            status: 431,
            reason: format!("the request header is larger than {limit} bytes"),
        }
    }

    fn too_many_headers(limit: usize) -> Rejection {
        Rejection {
            status: 431,
            reason: format!("the request has more than {limit} header fields"),
        }
    }

    pub fn header_timeout(limit: Duration) -> Rejection {
        Rejection {
            status: 408,
            reason: format!(
                "the request header did not arrive within {}",
                format_duration(limit)
            ),
        }
    }

    pub fn too_many_connections() -> Rejection {
        Rejection {
            status: 503,
            reason: "too many connections, retry later".to_string(),
        }
    }

    /// Renders the complete response: status line, headers and a text body.
    pub fn to_response(&self) -> Vec<u8> {
        let phrase = match self.status {
            400 => "Bad Request",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let body = format!("{}\n", self.reason);
        let retry_after = if self.status == 503 {
            "retry-after: 1\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{retry_after}connection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// The end of the body of a request that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// Exactly this many bytes follow the header (0 without a body).
    Length(u64),
    /// A chunked body, whose end only a chunk parser finds.
    Chunked,
    /// A request to switch to WebSocket (`Upgrade: websocket`): after the
    /// response, the connection may carry anything.
    Upgrade,
}

/// Checks one complete request header (request line through the blank
/// line) against the limits and the framing rules above, and returns
/// where the body ends.
pub fn inspect_head(head: &[u8], limits: &Limits) -> Result<BodyFraming, Rejection> {
    if head.len() > limits.max_header_bytes {
        return Err(Rejection::header_too_large(limits.max_header_bytes));
    }
    for (i, byte) in head.iter().enumerate() {
        if *byte == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            // Leading empty lines may be bare LF (skipped by the parser).
            if head[..i].iter().all(|b| *b == b'\r' || *b == b'\n') {
                continue;
            }
            return Err(Rejection::bad_request("a header line ends in a bare LF"));
        }
    }

    // On the stack: this runs for every HTTP/1.x request.
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADER_COUNT];
    let count = limits.max_header_count.min(MAX_HEADER_COUNT);
    let mut request = httparse::Request::new(&mut fields[..count]);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Rejection::bad_request("incomplete request header"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::too_many_headers(limits.max_header_count))
        }
        Err(err) => {
            return Err(Rejection::bad_request(format!(
                "malformed request header: {}",
                describe(err)
            )))
        }
    }

    // httparse lets bytes above 0x7F through in the target for old
    // clients; RFC 3986 has them percent-encoded, and a backend may decode
    // raw ones differently from the proxy's router.
    if request
        .path
        .is_some_and(|target| !target.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(Rejection::bad_request(
            "the request target has bytes outside printable ASCII; percent-encode them",
        ));
    }

    let http10 = request.version == Some(0);
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut codings: Vec<String> = Vec::new();
    let mut has_transfer_encoding = false;
    let mut hosts = 0;
    let mut upgrade = false;
    for field in request.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            lengths.extend(field.value.split(|b| *b == b','));
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            has_transfer_encoding = true;
            let value = String::from_utf8_lossy(field.value).to_ascii_lowercase();
            codings.extend(value.split(',').map(|c| c.trim().to_string()));
        } else if field.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if field.name.eq_ignore_ascii_case("upgrade") {
            // Only WebSocket is proxied as an upgrade. `h2c`, which curl
            // offers on http:// URLs, is served as plain HTTP/1.1.
            upgrade |= field
                .value
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"websocket"));
        }
    }

    if hosts > 1 {
        return Err(Rejection::bad_request("more than one Host header"));
    }
    if hosts == 0 && !http10 {
        return Err(Rejection::bad_request(
            "an HTTP/1.1 request needs a Host header",
        ));
    }

    if has_transfer_encoding && !lengths.is_empty() {
        return Err(Rejection::bad_request(
            "both Content-Length and Transfer-Encoding are present",
        ));
    }
    if has_transfer_encoding {
        if http10 {
            return Err(Rejection::bad_request(
                "Transfer-Encoding is not allowed in HTTP/1.0",
            ));
        }
        if codings != ["chunked"] {
            return Err(Rejection::bad_request(format!(
                "unsupported Transfer-Encoding {:?}; only \"chunked\" is accepted",
                codings.join(", ")
            )));
        }
    }

    let mut declared: Option<&[u8]> = None;
    for length in lengths {
        let length = length.trim_ascii();
        if length.is_empty() || !length.iter().all(u8::is_ascii_digit) || length.len() > 19 {
            return Err(Rejection::bad_request("invalid Content-Length"));
        }
        let length = trim_leading_zeros(length);
        match declared {
            Some(previous) if previous != length => {
                return Err(Rejection::bad_request(
                    "several Content-Length values that differ",
                ))
            }
            _ => declared = Some(length),
        }
    }
    if upgrade {
        return Ok(BodyFraming::Upgrade);
    }
    if has_transfer_encoding {
        return Ok(BodyFraming::Chunked);
    }
    match declared {
        None => Ok(BodyFraming::Length(0)),
        // Up to 19 digits: a value above u64::MAX is refused here, and any
        // value above `max_body` later, with 413.
        Some(digits) => std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .map(BodyFraming::Length)
            .ok_or_else(|| Rejection::bad_request("invalid Content-Length")),
    }
}

/// Applies the header size and count limits to an HTTP/2 request, whose
/// framing the h2 codec has already checked. Fields are counted and sized
/// as in the HTTP/1.1 form of the request, so one limit means the same over
/// both protocols. `:authority` counts as a `Host` field, and the cookie
/// crumbs of RFC 9113 section 8.2.3 as one `Cookie` field joined with `; `.
/// Each field counts as `name: value` and CRLF, plus the request line.
pub fn inspect_http2_head(header: &RequestHeader, limits: &Limits) -> Result<(), Rejection> {
    let mut count = 0;
    let mut bytes = 0;
    let mut cookies = 0;
    for (name, value) in header.headers.iter() {
        if name == http::header::COOKIE {
            cookies += 1;
            bytes += value.len() + if cookies == 1 { 10 } else { 2 };
        } else {
            count += 1;
            bytes += name.as_str().len() + value.len() + 4;
        }
    }
    count += usize::from(cookies > 0);
    if let Some(authority) = header.uri.authority() {
        if !header.headers.contains_key(http::header::HOST) {
            count += 1;
            bytes += authority.as_str().len() + 8;
        }
    }
    if count > limits.max_header_count {
        return Err(Rejection::too_many_headers(limits.max_header_count));
    }
    let target = header.uri.path_and_query().map_or(1, |p| p.as_str().len());
    bytes += header.method.as_str().len() + target + 12;
    if bytes > limits.max_header_bytes {
        return Err(Rejection::header_too_large(limits.max_header_bytes));
    }
    Ok(())
}

fn trim_leading_zeros(digits: &[u8]) -> &[u8] {
    let start = digits
        .iter()
        .position(|b| *b != b'0')
        .unwrap_or(digits.len().saturating_sub(1));
    &digits[start..]
}

fn describe(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::HeaderName => "invalid byte in a header name",
        httparse::Error::HeaderValue => "invalid byte in a header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid byte in the request line",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "invalid HTTP version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str) -> Result<(), u16> {
        inspect_head(head.as_bytes(), &Limits::default())
            .map(|_| ())
            .map_err(|r| r.status)
    }

    #[test]
    fn framing_tells_where_the_body_ends() {
        let framing = |head: &str| inspect_head(head.as_bytes(), &Limits::default());
        assert_eq!(
            framing("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(BodyFraming::Length(0))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n"),
            Ok(BodyFraming::Length(7))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(BodyFraming::Length(5))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(BodyFraming::Chunked)
        );
        let huge = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n";
        assert_eq!(framing(huge).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn http2_cookie_crumbs_count_as_one_field() {
        let limits = Limits {
            max_header_count: 5,
            ..Limits::default()
        };
        let mut header = RequestHeader::build("GET", b"/", None).unwrap();
        header.set_uri("https://a.test/".parse().unwrap());
        for i in 0..120 {
            header.append_header("cookie", format!("c{i}=v")).unwrap();
        }
        header.append_header("accept", "*/*").unwrap();
        // Host (from :authority), Cookie and Accept: three fields.
        assert_eq!(inspect_http2_head(&header, &limits), Ok(()));
        for i in 0..3 {
            header.append_header(format!("x-{i}"), "v").unwrap();
        }
        assert_eq!(
            inspect_http2_head(&header, &limits).map_err(|r| r.status),
            Err(431)
        );
    }

    #[test]
    fn raw_non_ascii_target_is_refused() {
        assert_eq!(
            check("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(400)
        );
        assert_eq!(check("GET /caf%C3%A9 HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(()));
    }

    #[test]
    fn plain_requests_pass() {
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(()));
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 005\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(())
        );
        assert_eq!(check("GET / HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(check("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(()));
    }

    #[test]
    fn ambiguous_framing_is_400() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
            "GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        ];
        for case in cases {
            assert_eq!(check(case), Err(400), "{case:?}");
        }
    }

    #[test]
    fn limits_give_431() {
        let limits = Limits {
            max_header_count: 3,
            ..Limits::default()
        };
        let head = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(
            inspect_head(head.as_bytes(), &limits)
                .map(|_| ())
                .map_err(|r| r.status),
            Err(431)
        );
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "y".repeat(40_000)
        );
        assert_eq!(check(&big), Err(431));
    }
}
