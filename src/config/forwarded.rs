//! `[haproxy]` keys about what reaches the edge from in front of it: trusted upstream proxies
//! (their `X-Forwarded-*` headers are kept), the PROXY protocol on the binds, and how long a
//! tunnel (a WebSocket) may stay idle.

use std::time::Duration;

use ipnetwork::IpNetwork;

use super::{duration, Issues};

/// Default `haproxy.tunnel_timeout`: marathon-lb's `timeout tunnel 3600s`.
pub const DEFAULT_TUNNEL_TIMEOUT: Duration = Duration::from_secs(3600);

/// The most entries `haproxy.trusted_proxies` takes (each is one pattern of an ACL on every
/// request).
pub const MAX_TRUSTED_PROXIES: usize = 256;

/// Whether HAProxy's binds expect the PROXY protocol (`accept-proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Plain connections: the peer is the client.
    Off,
    /// Every connection opens with a PROXY v1 or v2 header (a load balancer in front says
    /// who the client is); one without it is refused.
    Accept,
}

/// `haproxy.trusted_proxies`: networks (IPv4 or IPv6, `10.0.0.0/8`, or one address) whose
/// `X-Forwarded-For/Proto/Port` headers are kept.
pub(super) fn trusted_proxies(raw: Option<Vec<String>>, issues: &mut Issues) -> Vec<IpNetwork> {
    let texts = raw.unwrap_or_default();
    if texts.len() > MAX_TRUSTED_PROXIES {
        issues.add(
            "haproxy.trusted_proxies",
            format!(
                "lists {} networks, at most {MAX_TRUSTED_PROXIES}",
                texts.len()
            ),
        );
    }
    let mut networks = Vec::new();
    for (i, text) in texts.iter().take(MAX_TRUSTED_PROXIES).enumerate() {
        match text.parse::<IpNetwork>() {
            // A host part set (`10.0.0.1/8`) is most likely a typo for the network or the
            // address: refused, as `network.deny` does.
            Ok(net) if net.network() != net.ip() => issues.add(
                &format!("haproxy.trusted_proxies[{i}]"),
                format!(
                    "{text:?} has host bits set: say {}/{} or {}",
                    net.network(),
                    net.prefix(),
                    net.ip()
                ),
            ),
            Ok(net) => networks.push(net),
            Err(err) => issues.add(
                &format!("haproxy.trusted_proxies[{i}]"),
                format!("{text:?} is not a network like \"10.0.0.0/8\" or an address: {err}"),
            ),
        }
    }
    networks.sort();
    networks.dedup();
    networks
}

/// `haproxy.proxy_protocol`: `off` (default) or `accept`.
pub(super) fn proxy_protocol(raw: Option<String>, issues: &mut Issues) -> ProxyProtocol {
    match raw.as_deref() {
        None | Some("off") => ProxyProtocol::Off,
        Some("accept") => ProxyProtocol::Accept,
        Some(other) => {
            issues.add(
                "haproxy.proxy_protocol",
                format!("{other:?} is not one of off, accept"),
            );
            ProxyProtocol::Off
        }
    }
}

/// `haproxy.tunnel_timeout`: at least a second (HAProxy's `timeout tunnel` replaces the client
/// and server timeouts once a connection is a tunnel; shorter would cut WebSockets sooner
/// than plain requests).
pub(super) fn tunnel_timeout(raw: Option<String>, issues: &mut Issues) -> Duration {
    let value = duration(
        raw,
        DEFAULT_TUNNEL_TIMEOUT,
        "haproxy.tunnel_timeout",
        issues,
    );
    if value < Duration::from_secs(1) {
        issues.add("haproxy.tunnel_timeout", "must be at least 1s");
        return DEFAULT_TUNNEL_TIMEOUT;
    }
    value
}
