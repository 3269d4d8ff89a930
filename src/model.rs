//! The routing table: what HAProxy should route, validated once, as plain data.
//!
//! ```text
//! SourceReport(s) ──build──> RoutingTable { backends, routes }  +  Vec<Dropped>
//!   raw strings               validated keys only                   every rejected input
//! ```
//!
//! Every name, hostname, path, port and address a source gives is checked here; what fails is
//! dropped with a reason and everything else goes on routing. `build` is pure and deterministic:
//! the same reports give the same table, whatever order the sources arrived in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use crate::network::AllowedNetworks;
use crate::sources::{ServiceDef, SourceId, SourceReport};

/// Longest hostname DNS allows.
const MAX_HOSTNAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;
const MAX_NAME_LEN: usize = 100;
const MAX_PATH_LEN: usize = 1024;

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

    /// The HAProxy backend that serves this service.
    pub fn backend(&self) -> String {
        format!("be_{}", self.0)
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

/// One HAProxy backend: a service and its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub balance: Balance,
    /// HTTP health check path; `None`: no active checks.
    pub check: Option<PathPrefix>,
    pub servers: BTreeSet<SocketAddr>,
    /// Where the service came from.
    pub source: SourceId,
}

/// Where a request goes: a hostname and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub host: Hostname,
    pub path: PathPrefix,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_root() {
            write!(f, "{}", self.host)
        } else {
            write!(f, "{}{}", self.host, self.path)
        }
    }
}

/// The desired routing: plain data, compared whole to decide whether anything changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    pub backends: BTreeMap<ServiceName, Backend>,
    pub routes: BTreeMap<RouteKey, ServiceName>,
}

impl RoutingTable {
    /// What changes between `self` (applied) and `desired`: `empty.diff(&t)` adds all of `t`,
    /// `t.diff(&empty)` removes it all, `t.diff(&t)` is empty.
    pub fn diff(&self, desired: &RoutingTable) -> TableDiff {
        let mut diff = TableDiff::default();
        for (name, backend) in &desired.backends {
            match self.backends.get(name) {
                None => diff.added_services.push(name.clone()),
                Some(old) if old != backend => diff.changed_services.push(name.clone()),
                Some(_) => {}
            }
        }
        diff.removed_services = self
            .backends
            .keys()
            .filter(|name| !desired.backends.contains_key(*name))
            .cloned()
            .collect();
        for (key, service) in &desired.routes {
            match self.routes.get(key) {
                None => diff.added_routes.push(key.clone()),
                Some(old) if old != service => diff.moved_routes.push(key.clone()),
                Some(_) => {}
            }
        }
        diff.removed_routes = self
            .routes
            .keys()
            .filter(|key| !desired.routes.contains_key(*key))
            .cloned()
            .collect();
        diff
    }
}

/// The difference between two routing tables, in sorted order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub added_services: Vec<ServiceName>,
    pub removed_services: Vec<ServiceName>,
    /// Same name, other servers, balance or check.
    pub changed_services: Vec<ServiceName>,
    pub added_routes: Vec<RouteKey>,
    pub removed_routes: Vec<RouteKey>,
    /// Same host and path, another service.
    pub moved_routes: Vec<RouteKey>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        *self == TableDiff::default()
    }
}

impl fmt::Display for TableDiff {
    /// `services +gamma -beta ~alpha; routes +gamma.test -beta.test >shop.test/api`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(sign: char, items: &[T]) -> Vec<String> {
            items.iter().map(|item| format!("{sign}{item}")).collect()
        }
        let services = [
            list('+', &self.added_services),
            list('-', &self.removed_services),
            list('~', &self.changed_services),
        ]
        .concat();
        let routes = [
            list('+', &self.added_routes),
            list('-', &self.removed_routes),
            list('>', &self.moved_routes),
        ]
        .concat();
        let mut parts = Vec::new();
        if !services.is_empty() {
            parts.push(format!("services {}", services.join(" ")));
        }
        if !routes.is_empty() {
            parts.push(format!("routes {}", routes.join(" ")));
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join("; "))
    }
}

/// An input that did not make it into the table, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dropped {
    pub source: SourceId,
    /// What was dropped: `service "shop" host "a b"`.
    pub subject: String,
    pub reason: String,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.subject, self.reason)
    }
}

/// What `build` needs besides the reports.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub allowed: AllowedNetworks,
}

/// The table and everything that was left out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Built {
    pub table: RoutingTable,
    pub dropped: Vec<Dropped>,
}

/// Builds the routing table from every source's report.
///
/// Conflicts are settled deterministically: a service name defined twice keeps the definition
/// from the first source (in [`SourceId`] order, then position); a host and path claimed by two
/// services goes to the service whose name sorts first. The loser is reported as dropped.
pub fn build(reports: &[&SourceReport], settings: &ModelSettings) -> Built {
    let mut built = Built::default();
    let mut sorted: Vec<&SourceReport> = reports.to_vec();
    sorted.sort_by_key(|r| r.source);

    for report in &sorted {
        for rejected in &report.rejected {
            built.dropped.push(Dropped {
                source: report.source,
                subject: rejected.subject.clone(),
                reason: rejected.reason.clone(),
            });
        }
    }

    // route -> every service claiming it, to settle conflicts after all services are read.
    let mut claims: BTreeMap<RouteKey, BTreeSet<ServiceName>> = BTreeMap::new();
    for report in &sorted {
        for def in &report.services {
            let Some((name, backend, keys)) = validate(report.source, def, settings, &mut built)
            else {
                continue;
            };
            if built.table.backends.contains_key(&name) {
                built.dropped.push(Dropped {
                    source: report.source,
                    subject: format!("service {:?}", name.as_str()),
                    reason: "the name is already defined by an earlier definition".into(),
                });
                continue;
            }
            for key in keys {
                claims.entry(key).or_default().insert(name.clone());
            }
            built.table.backends.insert(name, backend);
        }
    }

    for (key, services) in claims {
        let mut services = services.into_iter();
        let Some(winner) = services.next() else {
            continue;
        };
        for loser in services {
            let source = built.table.backends.get(&loser).map(|b| b.source);
            built.dropped.push(Dropped {
                source: source.unwrap_or(SourceId::File),
                subject: format!("service {:?} route {key}", loser.as_str()),
                reason: format!(
                    "the route is already claimed by service {:?}",
                    winner.as_str()
                ),
            });
        }
        built.table.routes.insert(key, winner);
    }

    // A service that lost every route would be an unreachable backend: say so and drop it.
    let routed: BTreeSet<&ServiceName> = built.table.routes.values().collect();
    let unrouted: Vec<ServiceName> = built
        .table
        .backends
        .keys()
        .filter(|name| !routed.contains(name))
        .cloned()
        .collect();
    for name in unrouted {
        if let Some(backend) = built.table.backends.remove(&name) {
            built.dropped.push(Dropped {
                source: backend.source,
                subject: format!("service {:?}", name.as_str()),
                reason: "every route it asked for belongs to another service".into(),
            });
        }
    }

    built.dropped.sort();
    built
}

/// Validates one definition. Bad hosts and servers are dropped one by one; a bad name, path,
/// balance or check drops the whole service (routing it differently from what was asked would
/// be worse than not routing it).
fn validate(
    source: SourceId,
    def: &ServiceDef,
    settings: &ModelSettings,
    built: &mut Built,
) -> Option<(ServiceName, Backend, Vec<RouteKey>)> {
    let mut drop = |subject: String, reason: String| {
        built.dropped.push(Dropped {
            source,
            subject,
            reason,
        })
    };

    let name = match ServiceName::parse(&def.name) {
        Ok(name) => name,
        Err(reason) => {
            drop(
                format!("service {:?}", def.name),
                format!("invalid service name: {reason}"),
            );
            return None;
        }
    };
    let subject = format!("service {:?}", name.as_str());

    let path = match def.path.as_deref().map(PathPrefix::parse).transpose() {
        Ok(path) => path.unwrap_or_else(PathPrefix::root),
        Err(reason) => {
            drop(subject, format!("invalid path: {reason}"));
            return None;
        }
    };
    let balance = match def.balance.as_deref().map(Balance::parse).transpose() {
        Ok(balance) => balance.unwrap_or_default(),
        Err(reason) => {
            drop(subject, format!("invalid balance: {reason}"));
            return None;
        }
    };
    let check = match def.check.as_deref().map(PathPrefix::parse).transpose() {
        Ok(check) => check,
        Err(reason) => {
            drop(subject, format!("invalid health check path: {reason}"));
            return None;
        }
    };

    let mut keys = Vec::new();
    for raw in &def.hosts {
        match Hostname::parse(raw) {
            Ok(host) if host.wildcard_suffix().is_some() && !path.is_root() => drop(
                format!("{subject} host {raw:?}"),
                "a wildcard host cannot have a path prefix".into(),
            ),
            Ok(host) => keys.push(RouteKey {
                host,
                path: path.clone(),
            }),
            Err(reason) => drop(
                format!("{subject} host {raw:?}"),
                format!("invalid hostname: {reason}"),
            ),
        }
    }
    if keys.is_empty() {
        drop(subject, "no valid host to route".into());
        return None;
    }

    let mut servers = BTreeSet::new();
    for raw in &def.servers {
        match parse_server(raw, &settings.allowed) {
            Ok(addr) => {
                servers.insert(addr);
            }
            Err(reason) => drop(format!("{subject} server {raw:?}"), reason),
        }
    }

    Some((
        name,
        Backend {
            balance,
            check,
            servers,
            source,
        },
        keys,
    ))
}

/// Parses `ip:port` and checks it against the allowed networks.
pub fn parse_server(raw: &str, allowed: &AllowedNetworks) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(raw)?;
    if !allowed.contains(addr.ip()) {
        return Err(format!(
            "address {} is outside the allowed networks ({allowed}); register the container's weave IP",
            addr.ip()
        ));
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

    fn settings() -> ModelSettings {
        ModelSettings {
            allowed: AllowedNetworks::new(["10.2.0.0/16".parse().unwrap()]),
        }
    }

    fn def(name: &str, hosts: &[&str], servers: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path: None,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            balance: None,
            check: None,
        }
    }

    fn report(services: Vec<ServiceDef>) -> SourceReport {
        SourceReport {
            services,
            ..SourceReport::starting(SourceId::File)
        }
    }

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
        let allowed = settings().allowed;
        assert_eq!(
            parse_server("10.2.1.5:8080", &allowed).unwrap(),
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
        ] {
            let err = parse_server(bad, &allowed).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_entries_are_dropped_one_by_one() {
        let built = build(
            &[&report(vec![
                def(
                    "shop",
                    &["shop.example.com", "bad host"],
                    &["10.2.1.5:8080", "10.2.1.6:0", "8.8.8.8:80"],
                ),
                def("bad name", &["x.example.com"], &["10.2.1.7:80"]),
                def("nohost", &["a b"], &["10.2.1.7:80"]),
            ])],
            &settings(),
        );
        let shop = &built.table.backends[&ServiceName::parse("shop").unwrap()];
        assert_eq!(shop.servers.len(), 1);
        assert_eq!(built.table.backends.len(), 1);
        assert_eq!(built.table.routes.len(), 1);
        let subjects: Vec<&str> = built.dropped.iter().map(|d| d.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "service \"bad name\"",
                "service \"nohost\"",
                "service \"nohost\" host \"a b\"",
                "service \"shop\" host \"bad host\"",
                "service \"shop\" server \"10.2.1.6:0\"",
                "service \"shop\" server \"8.8.8.8:80\"",
            ]
        );
    }

    #[test]
    fn route_conflicts_have_a_deterministic_winner() {
        let a = def("alpha", &["shop.example.com"], &["10.2.1.5:80"]);
        let b = def(
            "beta",
            &["shop.example.com", "beta.example.com"],
            &["10.2.1.6:80"],
        );
        let first = build(&[&report(vec![a.clone(), b.clone()])], &settings());
        let second = build(&[&report(vec![b, a])], &settings());
        assert_eq!(first, second);
        let key = RouteKey {
            host: Hostname::parse("shop.example.com").unwrap(),
            path: PathPrefix::root(),
        };
        assert_eq!(first.table.routes[&key].as_str(), "alpha");
        assert_eq!(first.dropped.len(), 1);
        assert!(first.dropped[0].reason.contains("claimed by service"));
    }

    #[test]
    fn a_service_left_without_routes_is_dropped() {
        let a = def("alpha", &["shop.example.com"], &["10.2.1.5:80"]);
        let b = def("beta", &["shop.example.com"], &["10.2.1.6:80"]);
        let built = build(&[&report(vec![a, b])], &settings());
        assert_eq!(built.table.backends.len(), 1);
        assert_eq!(built.dropped.len(), 2);
    }

    #[test]
    fn duplicate_names_keep_the_first() {
        let a = def("shop", &["a.example.com"], &["10.2.1.5:80"]);
        let b = def("shop", &["b.example.com"], &["10.2.1.6:80"]);
        let built = build(&[&report(vec![a, b])], &settings());
        assert_eq!(built.table.routes.len(), 1);
        assert!(built.dropped[0].reason.contains("already defined"));
    }

    #[test]
    fn diff_replays_and_tears_down() {
        let a = def("alpha", &["alpha.example.com"], &["10.2.1.5:80"]);
        let b = def("beta", &["beta.example.com"], &["10.2.1.6:80"]);
        let table = build(&[&report(vec![a.clone(), b.clone()])], &settings()).table;
        let empty = RoutingTable::default();
        let up = empty.diff(&table);
        assert_eq!(up.added_services.len(), 2);
        assert_eq!(up.added_routes.len(), 2);
        let down = table.diff(&empty);
        assert_eq!(down.removed_services.len(), 2);
        assert_eq!(down.removed_routes.len(), 2);
        assert!(table.diff(&table).is_empty());
        assert_eq!(table.diff(&table).to_string(), "none");

        let mut b2 = b;
        b2.servers.push("10.2.1.7:80".into());
        let c = def("gamma", &["gamma.example.com"], &["10.2.1.8:80"]);
        let next = build(&[&report(vec![b2, c])], &settings()).table;
        assert_eq!(
            table.diff(&next).to_string(),
            "services +gamma -alpha ~beta; routes +gamma.example.com -alpha.example.com"
        );
    }

    #[test]
    fn wildcard_with_path_is_dropped() {
        let mut d = def(
            "shop",
            &["*.example.com", "shop.example.com"],
            &["10.2.1.5:80"],
        );
        d.path = Some("/api".into());
        let built = build(&[&report(vec![d])], &settings());
        assert_eq!(built.table.routes.len(), 1);
        assert!(built.dropped[0].reason.contains("wildcard"));
    }
}
