//! Request routing: host first, then the longest path prefix.
//!
//! Hosts are tried from the most specific pattern to the least: an exact
//! name, then the longest matching `*.suffix` wildcard, then `*`. Within a
//! host pattern the route with the longest matching path prefix wins. When no
//! prefix of a more specific host matches, the next less specific host
//! pattern is tried, so a `*` route can serve as the catch-all.
//! Prefixes compare bytes, like nginx `location` prefixes and Envoy
//! `prefix` matches: `/api` matches `/api`, `/api/x` and `/apiv2`.

use std::collections::HashMap;

use crate::config::{HostPattern, Route};

/// Routes sorted by longest path prefix first, as indices into the config's
/// route list.
type PrefixList = Vec<(String, usize)>;

#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, PrefixList>,
    /// Sorted by longest suffix first.
    wildcard: Vec<(String, PrefixList)>,
    any: PrefixList,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> RouteTable {
        let mut table = RouteTable::default();
        for (index, route) in routes.iter().enumerate() {
            let entry = (route.path_prefix.clone(), index);
            for host in &route.hosts {
                match host {
                    HostPattern::Exact(name) => table
                        .exact
                        .entry(name.clone())
                        .or_default()
                        .push(entry.clone()),
                    HostPattern::Wildcard(suffix) => {
                        match table.wildcard.iter_mut().find(|(s, _)| s == suffix) {
                            Some((_, list)) => list.push(entry.clone()),
                            None => table.wildcard.push((suffix.clone(), vec![entry.clone()])),
                        }
                    }
                    HostPattern::Any => table.any.push(entry.clone()),
                }
            }
        }
        let by_prefix_len =
            |list: &mut PrefixList| list.sort_by_key(|entry| std::cmp::Reverse(entry.0.len()));
        table.exact.values_mut().for_each(by_prefix_len);
        table
            .wildcard
            .iter_mut()
            .for_each(|(_, list)| by_prefix_len(list));
        by_prefix_len(&mut table.any);
        table
            .wildcard
            .sort_by_key(|entry| std::cmp::Reverse(entry.0.len()));
        table
    }

    /// Finds the route for a request. `host` must already be lower-case and
    /// without a port.
    pub fn find(&self, host: &str, path: &str) -> Option<usize> {
        if let Some(found) = self
            .exact
            .get(host)
            .and_then(|list| longest_prefix(list, path))
        {
            return Some(found);
        }
        for (suffix, list) in &self.wildcard {
            // `*.example.com` covers `a.example.com` and `a.b.example.com`,
            // but not `example.com` itself.
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                if let Some(found) = longest_prefix(list, path) {
                    return Some(found);
                }
            }
        }
        longest_prefix(&self.any, path)
    }
}

fn longest_prefix(list: &PrefixList, path: &str) -> Option<usize> {
    list.iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, index)| *index)
}

/// Extracts the host name from a `Host` header or URI authority: lower-case,
/// without port, trailing dot or IPv6 brackets.
pub fn normalize_host(raw: &str) -> String {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(raw, |(host, _)| host)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(text: &str) -> RouteTable {
        let config = crate::config::Config::parse(text, Path::new("test.toml")).unwrap();
        RouteTable::new(&config.routes)
    }

    const ROUTES: &str = r#"
        [listeners]
        http = "127.0.0.1:0"
        [pools.p]
        backends = ["127.0.0.1:1"]
        [[routes]]
        name = "exact-root"
        hosts = ["api.example.com"]
        pools = { p = 1 }
        [[routes]]
        name = "exact-webhook"
        hosts = ["api.example.com"]
        path_prefix = "/webhook"
        pools = { p = 1 }
        [[routes]]
        name = "wild"
        hosts = ["*.example.com"]
        pools = { p = 1 }
        [[routes]]
        name = "deep-wild"
        hosts = ["*.eu.example.com"]
        path_prefix = "/eu"
        pools = { p = 1 }
        [[routes]]
        name = "any-static"
        hosts = ["*"]
        path_prefix = "/static"
        pools = { p = 1 }
    "#;

    #[test]
    fn host_then_longest_prefix() {
        let t = table(ROUTES);
        assert_eq!(t.find("api.example.com", "/webhook?x=1"), Some(1));
        assert_eq!(t.find("api.example.com", "/other"), Some(0));
        assert_eq!(t.find("www.example.com", "/"), Some(2));
        assert_eq!(t.find("a.eu.example.com", "/eu/x"), Some(3));
        // The deeper wildcard has no matching prefix, so the shorter one serves.
        assert_eq!(t.find("a.eu.example.com", "/x"), Some(2));
        assert_eq!(t.find("example.com", "/x"), None);
        assert_eq!(t.find("other.org", "/static/a.css"), Some(4));
        assert_eq!(t.find("other.org", "/"), None);
    }

    #[test]
    fn exact_host_beats_longer_catch_all_prefix() {
        let t = table(ROUTES);
        // Host specificity comes first: the exact host's "/" route wins over
        // the catch-all's longer "/static" prefix.
        assert_eq!(t.find("api.example.com", "/static/x"), Some(0));
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("API.Example.com:8443"), "api.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }
}
