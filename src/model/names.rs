//! Validated input types: service names, hostnames, path prefixes, balance algorithms and
//! server addresses. Each is checked once, at construction, with a reason an operator can read.

use std::fmt;
use std::net::SocketAddr;

use crate::network::{AllowedNetworks, RefusedAddresses};

/// Longest hostname DNS allows.
const MAX_HOSTNAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;
const MAX_NAME_LEN: usize = 100;
const MAX_PATH_LEN: usize = 1024;

/// Every service's HAProxy backend is named this prefix + the service name, so no service can
/// take the name of a backend weft defines itself (`no_route`).
pub const BACKEND_PREFIX: &str = "be_";

/// A service name, usable as an HAProxy backend name: `[a-z0-9][a-z0-9._-]*`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is empty".into());
        }
        if raw.len() > MAX_NAME_LEN {
            return Err(format!("is longer than {MAX_NAME_LEN} characters"));
        }
        let name = raw.to_ascii_lowercase();
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!("contains {}", describe_char(c)));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err("must start with a letter or digit".into());
        }
        Ok(ServiceName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of a service whose name another source uses too: `consul:shop`. A parsed name
    /// never holds ':', so this never meets one.
    pub fn qualified(&self, source: impl fmt::Display) -> ServiceName {
        ServiceName(format!("{source}:{}", self.0))
    }

    /// The HAProxy backend that serves this service.
    pub fn backend(&self) -> String {
        [BACKEND_PREFIX, self.0.as_str()].concat()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An RFC 1123 hostname, lowercased, with at most one leading `*.` wildcard label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hostname(String);

impl Hostname {
    /// Validates and lowercases a hostname.
    ///
    /// ```
    /// use weft::model::Hostname;
    /// assert_eq!(Hostname::parse("Shop.Example.com").unwrap().as_str(), "shop.example.com");
    /// assert!(Hostname::parse("*.example.com").is_ok());
    /// assert_eq!(Hostname::parse("a b.example.com").unwrap_err(), "contains a space");
    /// assert!(Hostname::parse("shop.example.com:80").is_err());
    /// ```
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is empty".into());
        }
        if raw.len() > MAX_HOSTNAME_LEN {
            return Err(format!("is longer than {MAX_HOSTNAME_LEN} characters"));
        }
        let host = raw.to_ascii_lowercase();
        let rest = host.strip_prefix("*.").unwrap_or(&host);
        if rest.is_empty() {
            return Err("is a bare wildcard".into());
        }
        for label in rest.split('.') {
            if label.is_empty() {
                return Err("has an empty label".into());
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!(
                    "has a label longer than {MAX_LABEL_LEN} characters"
                ));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
            {
                return Err(match c {
                    '*' => "may only have a wildcard as its whole first label".into(),
                    ':' => "must not carry a port".into(),
                    c => format!("contains {}", describe_char(c)),
                });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!(
                    "has a label starting or ending with '-': {label:?}"
                ));
            }
        }
        Ok(Hostname(host))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For `*.example.com`, the suffix `.example.com` that HAProxy matches with `map_end`.
    pub fn wildcard_suffix(&self) -> Option<&str> {
        self.0.strip_prefix('*')
    }
}

/// Lets a map keyed by hostnames be searched with a `&str` (the same order and hash).
impl std::borrow::Borrow<str> for Hostname {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A URL path prefix: starts with `/`, no trailing `/` (but `/` itself), no empty, `.` or `..`
/// segment, only characters a path may hold unescaped (RFC 3986 `pchar`, `%` for escapes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathPrefix(String);

impl PathPrefix {
    pub fn root() -> Self {
        PathPrefix("/".into())
    }

    /// ```
    /// use weft::model::PathPrefix;
    /// assert_eq!(PathPrefix::parse("/api/").unwrap().as_str(), "/api");
    /// assert!(PathPrefix::parse("/a/../b").is_err());
    /// ```
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err("must start with '/'".into());
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(format!("is longer than {MAX_PATH_LEN} characters"));
        }
        if let Some(c) = raw.chars().find(|c| !is_path_char(*c)) {
            return Err(format!("contains {}", describe_char(c)));
        }
        let trimmed = raw.trim_end_matches('/');
        if trimmed.is_empty() {
            return Ok(PathPrefix::root());
        }
        for segment in trimmed[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(format!("has an empty, '.' or '..' segment: {raw:?}"));
            }
        }
        Ok(PathPrefix(trimmed.to_string()))
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The request target of an HTTP health check (`option httpchk GET <target>`): a path with an
/// optional query, as given (`/health/` stays), without the characters HAProxy's config
/// parser reads as quotes, escapes, comments or variables.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckPath(String);

impl CheckPath {
    /// ```
    /// use weft::model::CheckPath;
    /// assert_eq!(CheckPath::parse("/health?full=1").unwrap().as_str(), "/health?full=1");
    /// assert_eq!(CheckPath::parse("/it's").unwrap_err(), "contains '\\''");
    /// ```
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err("must start with '/'".into());
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(format!("is longer than {MAX_PATH_LEN} characters"));
        }
        let allowed = |c: char| (is_path_char(c) || c == '?') && !matches!(c, '\'' | '$');
        if let Some(c) = raw.chars().find(|c| !allowed(*c)) {
            return Err(format!("contains {}", describe_char(c)));
        }
        Ok(CheckPath(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CheckPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '/' | '-'
                | '.'
                | '_'
                | '~'
                | '%'
                | '!'
                | '$'
                | '&'
                | '\''
                | '('
                | ')'
                | '*'
                | '+'
                | ','
                | ';'
                | '='
                | ':'
                | '@'
        )
}

/// Names a character the way an operator can read it in a log line.
fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".into(),
        '\n' => "a newline".into(),
        '\t' => "a tab".into(),
        '\r' => "a carriage return".into(),
        c if c.is_control() => format!("a control character (U+{:04X})", c as u32),
        c if !c.is_ascii() => format!("a non-ASCII character {c:?} (U+{:04X})", c as u32),
        c => format!("{c:?}"),
    }
}

/// HAProxy's load-balancing algorithms that weft offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    First,
    Source,
    Random,
}

impl Balance {
    pub fn parse(raw: &str) -> Result<Self, String> {
        Ok(match raw {
            "roundrobin" => Balance::RoundRobin,
            "leastconn" => Balance::LeastConn,
            "first" => Balance::First,
            "source" => Balance::Source,
            "random" => Balance::Random,
            other => {
                return Err(format!(
                    "{other:?} is not one of roundrobin, leastconn, first, source, random"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
            Balance::First => "first",
            Balance::Source => "source",
            Balance::Random => "random",
        }
    }
}

/// Parses `ip:port` and checks it against the allowed networks, then against the addresses
/// inside them that are still no container's (this edge's own, the bridges, ...).
pub fn parse_server(
    raw: &str,
    allowed: &AllowedNetworks,
    refused: &RefusedAddresses,
) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(raw)?;
    if !allowed.contains(addr.ip()) {
        return Err(format!(
            "address {} is outside the allowed networks ({allowed}); register the container's weave IP",
            addr.ip()
        ));
    }
    if let Some(refusal) = refused.refusal(addr) {
        return Err(refusal.to_string());
    }
    Ok(addr)
}

fn parse_socket_addr(raw: &str) -> Result<SocketAddr, String> {
    let Some((ip, port)) = raw.rsplit_once(':') else {
        return Err("invalid server: expected ip:port".into());
    };
    let ip = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map_err(|_| format!("invalid server address {ip:?}: not an IP address"))?;
    let port: u32 = port
        .parse()
        .map_err(|_| format!("invalid server port {port:?}: not a number"))?;
    let port = match u16::try_from(port) {
        Ok(0) => return Err("invalid server port 0: ports run from 1 to 65535".into()),
        Ok(port) => port,
        Err(_) => {
            return Err(format!(
                "invalid server port {port}: ports run from 1 to 65535"
            ))
        }
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn hostnames() {
        for ok in [
            "shop.example.com",
            "SHOP.Example.COM",
            "*.example.com",
            "a",
            "1-2.x",
        ] {
            assert!(Hostname::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            Hostname::parse("Shop.Example.com").unwrap().as_str(),
            "shop.example.com"
        );
        for (bad, why) in [
            ("shop example.com", "a space"),
            ("shop\n.example.com", "a newline"),
            ("shop#.example.com", "'#'"),
            ("shop.example.com:80", "port"),
            ("*.*.example.com", "wildcard"),
            ("a.*.com", "wildcard"),
            ("-a.com", "'-'"),
            ("a..com", "empty label"),
            ("", "empty"),
            ("*.", "bare wildcard"),
            ("shop\u{a0}.example.com", "non-ASCII"),
        ] {
            let err = Hostname::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(Hostname::parse(&"a".repeat(64)).is_err());
        assert!(Hostname::parse(&["a"; 130].join(".")).is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(PathPrefix::parse("/").unwrap().as_str(), "/");
        assert_eq!(PathPrefix::parse("/api/").unwrap().as_str(), "/api");
        assert_eq!(PathPrefix::parse("/a/b").unwrap().as_str(), "/a/b");
        for bad in [
            "api", "/a b", "/a#b", "/a//b", "/a/../b", "/a\"b", "/a\\b", "/a\nb",
        ] {
            assert!(PathPrefix::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn service_names() {
        assert_eq!(ServiceName::parse("Shop_1").unwrap().as_str(), "shop_1");
        for bad in ["", "-x", "a b", "a/b", "a\"b", "a{b}"] {
            assert!(ServiceName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn servers() {
        let allowed = AllowedNetworks::new(["10.2.0.0/16".parse().unwrap()]);
        let refused = RefusedAddresses::new(&allowed, &[crate::network::BRIDGES], &[])
            .with_own(["10.2.0.1".parse().unwrap()], [80]);
        assert_eq!(
            parse_server("10.2.1.5:8080", &allowed, &refused).unwrap(),
            "10.2.1.5:8080".parse().unwrap()
        );
        for (bad, why) in [
            ("10.2.1.5:0", "port 0"),
            ("10.2.1.5:70000", "70000"),
            ("10.2.1.5", "ip:port"),
            ("10.2.1.5:http", "not a number"),
            ("shop:80", "not an IP"),
            ("192.168.1.4:80", "outside the allowed networks"),
            ("[::1]:80", "outside the allowed networks"),
            ("10.2.0.1:80", "this edge's own"),
            ("10.2.0.0:80", "network address of 10.2.0.0/16"),
            ("10.2.255.255:80", "broadcast address of 10.2.0.0/16"),
            ("10.2.0.7:80", "hosts' bridges"),
        ] {
            let err = parse_server(bad, &allowed, &refused).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
