//! Load targets: loopback URLs only.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A parsed `http://` or `https://` URL whose host is a loopback address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub addr: SocketAddr,
    /// Host as written in the URL (without port), sent as `Host`/`:authority` and SNI.
    pub host: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TargetError(pub String);

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TargetError {}

impl Target {
    /// Parses `url`, rejecting any host that is not in 127.0.0.0/8, `::1`
    /// or `localhost`, so the harness never sends load off the machine.
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(TargetError(format!(
                "invalid URL {url:?}: it must start with http:// or https://"
            )));
        };
        let (authority, path) = match rest.find('/') {
            Some(index) => (&rest[..index], rest[index..].to_string()),
            None => (rest, "/".to_string()),
        };
        let default_port = if https { 443 } else { 80 };
        let (host, port) = split_host_port(authority, default_port).ok_or_else(|| {
            TargetError(format!(
                "invalid URL {url:?}: cannot parse host and port from {authority:?}"
            ))
        })?;
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse().map_err(|_| {
                TargetError(format!(
                    "rejected URL {url:?}: the host {host:?} is not a loopback address; \
                     use 127.0.0.1, ::1 or localhost (the harness only loads this machine)"
                ))
            })?
        };
        if !ip.is_loopback() {
            return Err(TargetError(format!(
                "rejected URL {url:?}: {ip} is not a loopback address; use 127.0.0.0/8, ::1 or localhost"
            )));
        }
        Ok(Target {
            https,
            addr: SocketAddr::new(ip, port),
            host: host.to_string(),
            path,
        })
    }

    /// Builds the target for a plain HTTP listener at `addr`.
    pub fn http(addr: SocketAddr, path: &str) -> Target {
        Target {
            https: false,
            addr,
            host: addr.ip().to_string(),
            path: path.to_string(),
        }
    }

    /// Builds the target for an HTTPS listener at `addr`.
    pub fn https(addr: SocketAddr, path: &str) -> Target {
        Target {
            https: true,
            ..Target::http(addr, path)
        }
    }

    /// `Host` header value: the host, plus the port when it is not the default.
    pub fn authority(&self) -> String {
        let default_port = if self.https { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.addr.port() == default_port {
            host
        } else {
            format!("{host}:{}", self.addr.port())
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_urls() {
        let t = Target::parse("http://127.0.0.1:8080/x?y=1").unwrap();
        assert!(!t.https);
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/x?y=1");
        let t = Target::parse("https://localhost:8443").unwrap();
        assert!(t.https);
        assert_eq!(t.path, "/");
        assert_eq!(t.authority(), "localhost:8443");
        let t = Target::parse("http://[::1]:9000/").unwrap();
        assert_eq!(t.addr, "[::1]:9000".parse().unwrap());
        let t = Target::parse("http://127.3.4.5/").unwrap();
        assert_eq!(t.addr.port(), 80);
    }

    #[test]
    fn rejects_other_hosts() {
        for url in [
            "http://10.0.0.1:80/",
            "http://example.com/",
            "https://8.8.8.8/",
            "http://[2001:db8::1]:80/",
            "ftp://127.0.0.1/",
            "127.0.0.1:80",
        ] {
            assert!(Target::parse(url).is_err(), "{url} was accepted");
        }
        let err = Target::parse("http://example.com/").unwrap_err();
        assert!(err.0.contains("not a loopback address"), "{err}");
    }
}
