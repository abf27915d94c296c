//! Forwarding headers, request ids and hop-by-hop header removal.

use std::net::IpAddr;

use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::IpNet;

pub const REQUEST_ID: &str = "x-request-id";

/// Maximum length of a client-supplied request id that is kept as is.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Keeps a well-formed incoming request id (1 to 128 visible ASCII characters
/// from `[A-Za-z0-9._:-]`), otherwise generates a random 128-bit hex id.
pub fn request_id(incoming: Option<&[u8]>) -> String {
    if let Some(value) = incoming {
        let well_formed = !value.is_empty()
            && value.len() <= MAX_REQUEST_ID_LEN
            && value
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if well_formed {
            // The bytes are ASCII, so this conversion cannot fail.
            if let Ok(text) = std::str::from_utf8(value) {
                return text.to_string();
            }
        }
    }
    format!("{:032x}", rand::random::<u128>())
}

pub fn is_trusted(peer: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    peer.is_some_and(|ip| trusted.iter().any(|net| net.contains(ip)))
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host` on the upstream request.
///
/// From a trusted proxy the incoming chain is kept and the peer appended;
/// from anyone else every incoming forwarding header is replaced, so a
/// client cannot forge its address or scheme.
pub fn set_forwarding_headers(
    request: &mut RequestHeader,
    peer: Option<IpAddr>,
    trusted: bool,
    scheme: &str,
    host: &str,
) -> pingora::Result<()> {
    let peer_text = peer.map(|ip| ip.to_string()).unwrap_or_default();
    let existing_for = request
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    let forwarded_for = if trusted && !existing_for.is_empty() {
        format!("{existing_for}, {peer_text}")
    } else {
        peer_text
    };
    let keep_proto = trusted && request.headers.contains_key("x-forwarded-proto");
    let keep_host = trusted && request.headers.contains_key("x-forwarded-host");
    if !trusted {
        request.remove_header("forwarded");
        request.remove_header("x-real-ip");
    }
    request.insert_header("x-forwarded-for", forwarded_for)?;
    if !keep_proto {
        request.insert_header("x-forwarded-proto", scheme)?;
    }
    if !keep_host && !host.is_empty() {
        request.insert_header("x-forwarded-host", host)?;
    }
    Ok(())
}

/// Removes hop-by-hop headers from a response before it goes downstream:
/// the fields named by `Connection` and the standard hop-by-hop fields.
/// A `101 Switching Protocols` keeps `Connection` and `Upgrade`, which the
/// protocol switch needs. Pingora applies the same rule to requests.
pub fn strip_response_hop_by_hop(response: &mut ResponseHeader) {
    let switching = response.status.as_u16() == 101;
    let nominated: Vec<String> = response
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    for name in nominated {
        let protected = matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "upgrade" | "close" | "keep-alive"
        );
        if !protected {
            response.remove_header(name.as_str());
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
    ] {
        response.remove_header(name);
    }
    if !switching {
        response.remove_header("connection");
        response.remove_header("upgrade");
    }
}

/// Splits an absolute-form request target (`http://host:port/path?query`,
/// RFC 9112 section 3.2.2) into its authority and the origin-form target a
/// backend expects; `None` for any other form. The path and query bytes are
/// kept exactly as sent.
pub fn split_absolute_form(target: &[u8]) -> Option<(&[u8], Vec<u8>)> {
    let scheme_end = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..scheme_end];
    if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let origin = if tail.starts_with(b"/") {
        tail.to_vec()
    } else {
        [b"/".as_slice(), tail].concat()
    };
    Some((authority, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_kept_or_generated() {
        assert_eq!(request_id(Some(b"abc-123.X:y_z")), "abc-123.X:y_z");
        let generated = request_id(Some(b"bad id\r\n"));
        assert_eq!(generated.len(), 32);
        assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(request_id(None).len(), 32);
        assert_eq!(request_id(Some(&[b'a'; 129])).len(), 32);
    }

    #[test]
    fn untrusted_peer_replaces_chain() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-forwarded-for", "6.6.6.6").unwrap();
        req.insert_header("x-forwarded-proto", "https").unwrap();
        req.insert_header("forwarded", "for=6.6.6.6").unwrap();
        set_forwarding_headers(
            &mut req,
            Some("10.0.0.1".parse().unwrap()),
            false,
            "http",
            "a.test",
        )
        .unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "10.0.0.1");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-forwarded-host"], "a.test");
        assert!(req.headers.get("forwarded").is_none());
    }

    #[test]
    fn trusted_peer_appends() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-forwarded-for", "1.2.3.4").unwrap();
        req.insert_header("x-forwarded-proto", "https").unwrap();
        set_forwarding_headers(
            &mut req,
            Some("10.0.0.1".parse().unwrap()),
            true,
            "http",
            "a.test",
        )
        .unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(req.headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn response_hop_by_hop_removed() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "keep-alive, x-secret")
            .unwrap();
        resp.insert_header("x-secret", "1").unwrap();
        resp.insert_header("keep-alive", "timeout=5").unwrap();
        resp.insert_header("content-type", "text/plain").unwrap();
        strip_response_hop_by_hop(&mut resp);
        assert!(resp.headers.get("x-secret").is_none());
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("connection").is_none());
        assert_eq!(resp.headers["content-type"], "text/plain");
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let split = |t: &str| {
            split_absolute_form(t.as_bytes()).map(|(a, o)| {
                (
                    String::from_utf8(a.to_vec()).unwrap(),
                    String::from_utf8(o).unwrap(),
                )
            })
        };
        assert_eq!(
            split("http://api.example.com/webhook?a=%2F+b"),
            Some(("api.example.com".into(), "/webhook?a=%2F+b".into()))
        );
        assert_eq!(
            split("HTTPS://h:8443?x=1"),
            Some(("h:8443".into(), "/?x=1".into()))
        );
        assert_eq!(split("http://h"), Some(("h".into(), "/".into())));
        assert_eq!(split("/webhook"), None);
        assert_eq!(split("ftp://h/x"), None);
    }
}
