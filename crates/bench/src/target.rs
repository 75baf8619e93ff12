//! Benchmark targets: `ws://` URLs, the loopback guard and the derived `/metrics` URL.
//!
//! The load generator only talks to loopback addresses (`127.0.0.0/8`, `::1`, `localhost`)
//! unless `--allow-remote` is given: it can open tens of thousands of sockets and push a million
//! deliveries per second, which must never be pointed at someone else's server by accident.

use std::net::{IpAddr, SocketAddr};
use url::{Host, Url};

/// Why a URL cannot be a benchmark target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not a URL at all.
    #[error("`{0}` is not a valid URL: {1}")]
    Invalid(String, String),
    /// Only `ws://` is supported (the raw client has no TLS).
    #[error("`{0}`: only ws:// URLs are supported")]
    Scheme(String),
    /// The URL has no host.
    #[error("`{0}` has no host")]
    NoHost(String),
    /// The host is not loopback and `--allow-remote` was not given.
    #[error("`{0}` is not a loopback address (127.0.0.0/8, ::1, localhost); pass --allow-remote to target it")]
    NotLoopback(String),
    /// The host name did not resolve.
    #[error("cannot resolve `{0}`: {1}")]
    Resolve(String, String),
}

/// A parsed, checked benchmark target (one gateway node's `/ws` endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// Host name or address literal (IPv6 without brackets).
    pub host: String,
    /// TCP port (80 when the URL has none).
    pub port: u16,
    /// `Host` header value: host and, when the URL names one, port (IPv6 in brackets).
    pub authority: String,
    /// Path and query of the upgrade request, e.g. `/ws?token=abc`.
    pub path_and_query: String,
    /// Whether the host is a loopback name or address.
    pub loopback: bool,
}

/// True for `localhost` (any case, with or without a trailing dot), `127.0.0.0/8`, `::1` and
/// IPv4-mapped loopback (`::ffff:127.x.y.z`).
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") || h.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    match h.parse::<IpAddr>() {
        Ok(ip) => is_loopback_ip(ip),
        Err(_) => false,
    }
}

/// True for `127.0.0.0/8`, `::1` and IPv4-mapped loopback addresses.
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

impl Target {
    /// Parses `url` (`ws://host[:port]/path[?query]`) and applies the loopback guard.
    pub fn parse(url: &str, allow_remote: bool) -> Result<Self, TargetError> {
        let parsed = Url::parse(url).map_err(|e| TargetError::Invalid(url.to_owned(), e.to_string()))?;
        if parsed.scheme() != "ws" {
            return Err(TargetError::Scheme(url.to_owned()));
        }
        let (host, loopback) = match parsed.host() {
            None => return Err(TargetError::NoHost(url.to_owned())),
            Some(Host::Domain(d)) => (d.to_owned(), is_loopback_host(d)),
            Some(Host::Ipv4(ip)) => (ip.to_string(), is_loopback_ip(IpAddr::V4(ip))),
            Some(Host::Ipv6(ip)) => (ip.to_string(), is_loopback_ip(IpAddr::V6(ip))),
        };
        if !loopback && !allow_remote {
            return Err(TargetError::NotLoopback(url.to_owned()));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let host_str = parsed.host_str().unwrap_or(&host).to_owned();
        let authority = match parsed.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str,
        };
        let mut path_and_query = parsed.path().to_owned();
        if path_and_query.is_empty() {
            path_and_query.push('/');
        }
        if let Some(q) = parsed.query() {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Ok(Self { url: url.to_owned(), host, port, authority, path_and_query, loopback })
    }

    /// The node's Prometheus endpoint: same host and port, `http://`, path `/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.authority)
    }

    /// Resolves the host once (so that ten thousand connects do not each do a DNS lookup) and
    /// re-applies the loopback guard to the address it resolved to.
    pub async fn resolve(&self, allow_remote: bool) -> Result<SocketAddr, TargetError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| TargetError::Resolve(self.host.clone(), e.to_string()))?
            .collect();
        // Prefer IPv4: servers commonly listen on 127.0.0.1 only, and `localhost` may list ::1 first.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| TargetError::Resolve(self.host.clone(), "no address".to_owned()))?;
        if !allow_remote && !is_loopback_ip(addr.ip()) {
            return Err(TargetError::NotLoopback(format!("{} (resolved to {addr})", self.url)));
        }
        Ok(addr)
    }
}

/// A target together with the address it resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The parsed URL.
    pub target: Target,
    /// Where to connect.
    pub addr: SocketAddr,
}

/// Parses and resolves every URL; fails on the first one that is invalid or not allowed.
pub async fn resolve_all(urls: &[String], allow_remote: bool) -> Result<Vec<Resolved>, TargetError> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let target = Target::parse(url, allow_remote)?;
        let addr = target.resolve(allow_remote).await?;
        out.push(Resolved { target, addr });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1"]
        {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1", "0.0.0.0", "::", "128.0.0.1", "localhost.example.com"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
