//! Network maths: the weave network's layout, and which backend addresses weft may route to.
//!
//! ```text
//! 10.2.0.0/16      the weave network: one L2 overlay across every host
//! ├ 10.2.0.0/24    reserved for the bridges: host N's bridge carries 10.2.0.N/16
//! ├ 10.2.1.0/24    host 1's docker subnet (--fixed-cidr): its containers
//! ├ 10.2.2.0/24    host 2's
//! └ ...            up to host 255
//! ```
//!
//! The weave network is the only place containers live; an address outside every allowed
//! network is a registration mistake (a node address, a host port) and is dropped with a reason.
//! Inside them, [`RefusedAddresses`] refuses what is no container's: this edge's own addresses
//! (a request there comes back to this HAProxy, in a loop), the bridges' slice, the network
//! and broadcast address of each allowed network, and the operator's `network.deny` entries.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnetwork::Ipv4Network;

/// The weave network of the Apollo layout: every container address lies inside it.
pub const WEAVE_NETWORK: &str = "10.2.0.0/16";

/// [`WEAVE_NETWORK`] as a network.
pub const WEAVE: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::new(10, 2, 0, 0), 16) {
    Some(net) => net,
    // Evaluated at compile time: a typo above fails the build, never a running weft.
    None => panic!("the weave network constant is not a network"),
};

/// The weave layout's bridges' slice, `10.2.0.0/24`: host N's bridge carries `10.2.0.N/16`,
/// and no container lives there. The default of `network.bridges`.
pub const BRIDGES: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::new(10, 2, 0, 0), 24) {
    Some(net) => net,
    None => panic!("the bridges' slice constant is not a network"),
};

/// A host's 1-based position in the inventory: host N owns `10.2.N.0/24` and its bridge
/// carries `10.2.0.N/16`. Index 0 is the bridges' own slice, so it is no host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostIndex(u8);

/// A host index outside 1..=255.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host index {0} is outside 1..=255 (10.2.0.0/24 holds the bridges, so 0 is no host's)")]
pub struct HostIndexError(pub i64);

impl HostIndex {
    pub fn new(index: i64) -> Result<HostIndex, HostIndexError> {
        match u8::try_from(index) {
            Ok(n) if n >= 1 => Ok(HostIndex(n)),
            _ => Err(HostIndexError(index)),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for HostIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The address host N's bridge carries, `10.2.0.N/16`; without an index the documented
/// default `10.2.0.1/16`.
pub fn bridge_address(index: Option<HostIndex>) -> Ipv4Network {
    let host = index.map_or(1, HostIndex::get);
    let ip = Ipv4Addr::from(u32::from(WEAVE.network()) + u32::from(host));
    Ipv4Network::new_checked(ip, WEAVE.prefix()).unwrap_or(WEAVE)
}

/// Whether `ip` lies on the weave network.
pub fn in_weave_network(ip: Ipv4Addr) -> bool {
    WEAVE.contains(ip)
}

/// The networks backends may live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedNetworks {
    networks: Vec<Ipv4Network>,
}

impl AllowedNetworks {
    /// Normalises each network to its base address (`10.2.0.1/16` -> `10.2.0.0/16`), so that
    /// comparisons never see the address as written.
    pub fn new(networks: impl IntoIterator<Item = Ipv4Network>) -> Self {
        let networks = networks.into_iter().map(normalise).collect();
        AllowedNetworks { networks }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.networks.iter().any(|net| net.contains(v4)),
            IpAddr::V6(_) => false,
        }
    }

    pub fn networks(&self) -> &[Ipv4Network] {
        &self.networks
    }
}

impl fmt::Display for AllowedNetworks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.networks.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(", "))
    }
}

/// `Ipv4Network` keeps the address as written; masking it makes two spellings of one network
/// compare equal.
pub fn normalise(net: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net)
}

/// Ports `low..=high` (one port: `low == high`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    /// `8500` or `8000-8999`; ports run from 1 to 65535.
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
            Ok(port) => Ok(port),
        };
        let (low, high) = match text.split_once('-') {
            Some((low, high)) => (port(low)?, port(high)?),
            None => (port(text)?, port(text)?),
        };
        if low > high {
            return Err(format!("the port range {low}-{high} runs backwards"));
        }
        Ok(PortRange { low, high })
    }

    pub fn contains(self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// One `network.deny` entry: an IPv4 address or network, a port (range), or both.
///
/// ```text
/// "10.2.3.4"              that address, every port
/// "10.2.7.0/24"           that network, every port
/// ":8500"                 port 8500 on every address ("8000-8999": a range)
/// "10.2.0.0/16:22"        port 22 in that network ("10.2.3.4:22": on one address)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    /// `None`: every address.
    network: Option<Ipv4Network>,
    /// `None`: every port.
    ports: Option<PortRange>,
}

impl DenyRule {
    /// ```
    /// use weft::network::DenyRule;
    /// let rule = DenyRule::parse("10.2.0.0/16:22").unwrap();
    /// assert!(rule.matches("10.2.3.4:22".parse().unwrap()));
    /// assert!(!rule.matches("10.2.3.4:80".parse().unwrap()));
    /// assert!(DenyRule::parse("10.2.7.1/24").unwrap_err().contains("10.2.7.0/24"));
    /// ```
    pub fn parse(text: &str) -> Result<DenyRule, String> {
        if text.contains('[') || text.matches(':').count() > 1 {
            return Err("is IPv6: weft routes to IPv4 backends only".into());
        }
        let (address, ports) = match text.split_once(':') {
            Some((address, ports)) => (address, Some(ports)),
            None => (text, None),
        };
        let ports = ports.map(PortRange::parse).transpose()?;
        let network = match address {
            "" if ports.is_some() => None,
            "" => return Err("is empty: write an address, a network, :port or both".into()),
            address => Some(parse_exact_network(address)?),
        };
        Ok(DenyRule { network, ports })
    }

    pub fn matches(&self, addr: SocketAddr) -> bool {
        let IpAddr::V4(ip) = addr.ip() else {
            return false;
        };
        self.network.map_or(true, |net| net.contains(ip))
            && self.ports.map_or(true, |ports| ports.contains(addr.port()))
    }
}

impl fmt::Display for DenyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.network {
            Some(net) if net.prefix() == 32 => write!(f, "{}", net.ip())?,
            Some(net) => write!(f, "{net}")?,
            None => {}
        }
        match self.ports {
            Some(ports) => write!(f, ":{ports}"),
            None => Ok(()),
        }
    }
}

/// `10.2.3.4` (a /32) or `10.2.7.0/24`, refusing host bits after the prefix: in a list that
/// refuses addresses, `10.2.7.1/24` is too likely a typo to guess what it meant.
pub fn parse_exact_network(text: &str) -> Result<Ipv4Network, String> {
    let net = if text.contains('/') {
        text.parse::<Ipv4Network>()
            .map_err(|err| format!("{text:?} is not an IPv4 network like \"10.2.7.0/24\": {err}"))?
    } else {
        let ip = text
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{text:?} is not an IPv4 address like \"10.2.3.4\""))?;
        Ipv4Network::from(ip)
    };
    if net.ip() != net.network() {
        return Err(format!(
            "{text:?} has bits set after its prefix: write {} (the whole network) or {} (one address)",
            normalise(net),
            net.ip()
        ));
    }
    Ok(net)
}

/// Why an address inside the allowed networks is still no backend's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// One of this host's interface addresses (or its configured bridge address).
    OwnAddress(IpAddr),
    /// A loopback address at a port this edge listens on (HAProxy, the status page).
    OwnListener(SocketAddr),
    /// The first address of an allowed network.
    NetworkAddress(Ipv4Addr, Ipv4Network),
    /// The last address of an allowed network.
    Broadcast(Ipv4Addr, Ipv4Network),
    /// Inside `network.bridges`.
    Bridges(Ipv4Addr, Ipv4Network),
    /// Matched by a `network.deny` entry.
    Denied(SocketAddr, DenyRule),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::OwnAddress(ip) => write!(
                f,
                "address {ip} is this edge's own: HAProxy would send the request back to itself"
            ),
            Refusal::OwnListener(addr) => write!(
                f,
                "address {addr} is where this edge listens (haproxy.bind, tls.listen or status.listen): \
                 HAProxy would send the request back to itself"
            ),
            Refusal::NetworkAddress(ip, net) => write!(
                f,
                "address {ip} is the network address of {net}, not a container's"
            ),
            Refusal::Broadcast(ip, net) => write!(
                f,
                "address {ip} is the broadcast address of {net}, not a container's"
            ),
            Refusal::Bridges(ip, net) => write!(
                f,
                "address {ip} lies in {net} (network.bridges), which holds the hosts' bridges, \
                 not containers"
            ),
            Refusal::Denied(addr, rule) => write!(
                f,
                "address {addr} is refused by network.deny entry \"{rule}\""
            ),
        }
    }
}

/// The addresses inside the allowed networks that are still refused, each with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefusedAddresses {
    /// `(network, network address, broadcast address)` of every allowed network with room
    /// for both (prefix /30 or shorter; a /31 or /32 has neither, RFC 3021).
    ends: Vec<(Ipv4Network, Ipv4Addr, Ipv4Addr)>,
    bridges: Vec<Ipv4Network>,
    deny: Vec<DenyRule>,
    /// This host's addresses; a loopback one is refused only at `own_ports`, since allowing
    /// a loopback network is the operator's explicit choice to route to this host (the demo).
    own: BTreeSet<IpAddr>,
    own_ports: BTreeSet<u16>,
}

impl RefusedAddresses {
    pub fn new(allowed: &AllowedNetworks, bridges: &[Ipv4Network], deny: &[DenyRule]) -> Self {
        let ends = allowed
            .networks()
            .iter()
            .filter(|net| net.prefix() <= 30)
            .map(|net| (*net, net.network(), net.broadcast()))
            .collect();
        RefusedAddresses {
            ends,
            bridges: bridges.iter().copied().map(normalise).collect(),
            deny: deny.to_vec(),
            own: BTreeSet::new(),
            own_ports: BTreeSet::new(),
        }
    }

    /// Adds this host's addresses, and the ports it listens on (where even a loopback
    /// address is refused).
    pub fn with_own(
        mut self,
        addresses: impl IntoIterator<Item = IpAddr>,
        ports: impl IntoIterator<Item = u16>,
    ) -> Self {
        self.own.extend(addresses);
        self.own_ports.extend(ports);
        self
    }

    /// Why `addr` may not be a backend, if it may not; the most specific reason first.
    pub fn refusal(&self, addr: SocketAddr) -> Option<Refusal> {
        let ip = addr.ip();
        if ip.is_loopback() || ip.is_unspecified() {
            if self.own_ports.contains(&addr.port()) {
                return Some(Refusal::OwnListener(addr));
            }
        } else if self.own.contains(&ip) {
            return Some(Refusal::OwnAddress(ip));
        }
        if let IpAddr::V4(v4) = ip {
            for (net, network, broadcast) in &self.ends {
                if v4 == *network {
                    return Some(Refusal::NetworkAddress(v4, *net));
                }
                if v4 == *broadcast {
                    return Some(Refusal::Broadcast(v4, *net));
                }
            }
            if let Some(net) = self.bridges.iter().find(|net| net.contains(v4)) {
                return Some(Refusal::Bridges(v4, *net));
            }
        }
        let rule = self.deny.iter().find(|rule| rule.matches(addr))?;
        Some(Refusal::Denied(addr, rule.clone()))
    }
}

/// Every address of this host's interfaces (in the network namespace weft runs in), as the
/// kernel lists them now.
pub fn local_addresses() -> Result<BTreeSet<IpAddr>, nix::Error> {
    let mut addresses = BTreeSet::new();
    for interface in nix::ifaddrs::getifaddrs()? {
        let Some(address) = interface.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            addresses.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6() {
            addresses.insert(IpAddr::V6(v6.ip()));
        }
    }
    Ok(addresses)
}

/// [`local_addresses`], logged; none, with a warning, when the kernel cannot list them (the
/// loop guard in HAProxy's config still stops a request that comes back).
pub fn own_addresses() -> BTreeSet<IpAddr> {
    match local_addresses() {
        Ok(addresses) => {
            let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            tracing::info!(addresses = %list.join(", "), "this host's addresses, refused as backends");
            addresses
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot list this host's addresses: only the bridge's configured one is refused as a backend");
            BTreeSet::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(nets: &[&str]) -> AllowedNetworks {
        AllowedNetworks::new(nets.iter().map(|n| n.parse().unwrap()))
    }

    #[test]
    fn contains_masks_the_written_address() {
        let nets = allowed(&["10.2.0.1/16"]);
        assert_eq!(nets.networks()[0].to_string(), "10.2.0.0/16");
        assert!(nets.contains("10.2.1.5".parse().unwrap()));
        assert!(nets.contains("10.2.255.255".parse().unwrap()));
        assert!(!nets.contains("10.3.0.1".parse().unwrap()));
        assert!(!nets.contains("192.168.1.10".parse().unwrap()));
    }

    #[test]
    fn ipv6_is_never_allowed() {
        let nets = allowed(&["10.2.0.0/16"]);
        assert!(!nets.contains("::1".parse().unwrap()));
    }

    fn net(text: &str) -> Ipv4Network {
        text.parse().unwrap()
    }

    // Weft itself needs neither of these two (it routes by the allowed networks and sets only
    // the bridge's address): they state the rest of the module diagram's layout, for the tests.

    /// Host N's docker subnet, `10.2.N.0/24`: `network + (N << 8)`.
    fn host_subnet(index: HostIndex) -> Ipv4Network {
        let base = u32::from(WEAVE.network()) + (u32::from(index.get()) << 8);
        Ipv4Network::new_checked(Ipv4Addr::from(base), 24).unwrap_or(WEAVE)
    }

    /// Whether every address of `inner` lies in `outer`. Unlike `Ipv4Network::is_subnet_of`,
    /// which compares the addresses as written (`10.2.0.0/24` is "not inside" `10.2.0.1/16`
    /// there), both sides are masked first.
    fn is_within(inner: Ipv4Network, outer: Ipv4Network) -> bool {
        normalise(inner).is_subnet_of(normalise(outer))
    }

    #[test]
    fn host_subnets() {
        let first = HostIndex::new(1).unwrap();
        let last = HostIndex::new(255).unwrap();
        assert_eq!(host_subnet(first), net("10.2.1.0/24"));
        assert_eq!(host_subnet(HostIndex::new(2).unwrap()), net("10.2.2.0/24"));
        assert_eq!(host_subnet(last), net("10.2.255.0/24"));
        assert!(is_within(host_subnet(last), WEAVE));
        assert!(!host_subnet(first).contains("10.2.0.1".parse().unwrap()));
    }

    #[test]
    fn host_index_range() {
        assert_eq!(HostIndex::new(0), Err(HostIndexError(0)));
        assert_eq!(HostIndex::new(256), Err(HostIndexError(256)));
        assert_eq!(HostIndex::new(-1), Err(HostIndexError(-1)));
        assert_eq!(HostIndex::new(7).unwrap().get(), 7);
        assert!(HostIndexError(0).to_string().contains("1..=255"));
    }

    #[test]
    fn bridge_addresses() {
        assert_eq!(bridge_address(None).to_string(), "10.2.0.1/16");
        let third = bridge_address(Some(HostIndex::new(3).unwrap()));
        assert_eq!(third.to_string(), "10.2.0.3/16");
        assert_eq!(third.ip(), Ipv4Addr::new(10, 2, 0, 3));
        let last = bridge_address(Some(HostIndex::new(255).unwrap()));
        assert_eq!(last.to_string(), "10.2.0.255/16");
        // Every bridge address sits in the bridges' slice, outside every host's subnet.
        assert!(net("10.2.0.0/24").contains(last.ip()));
        assert_eq!(normalise(last), WEAVE);
    }

    #[test]
    fn weave_membership() {
        assert_eq!(WEAVE.to_string(), WEAVE_NETWORK);
        assert!(in_weave_network("10.2.0.1".parse().unwrap()));
        assert!(in_weave_network("10.2.255.254".parse().unwrap()));
        assert!(!in_weave_network("10.3.0.1".parse().unwrap()));
        assert!(!in_weave_network("10.1.255.255".parse().unwrap()));
    }

    /// reference/weave.md: `Ipv4Network` keeps the address as written, and `is_subnet_of`
    /// compares those raw addresses.
    #[test]
    fn is_subnet_of_compares_the_written_address() {
        let bridge = net("10.2.0.1/16");
        let slice = net("10.2.0.0/24");
        // The pitfall: the bridges' own slice "is not inside" the bridge's network...
        assert!(!slice.is_subnet_of(bridge));
        // ...and a /16 written with its host address "is not inside" itself.
        assert!(!WEAVE.is_subnet_of(bridge));
        assert_eq!(bridge.ip(), Ipv4Addr::new(10, 2, 0, 1));
        // Masked first, both answers are right.
        assert!(is_within(slice, bridge));
        assert!(is_within(WEAVE, bridge));
        assert!(is_within(net("10.2.1.5/32"), bridge));
        assert!(!is_within(net("10.3.0.0/24"), bridge));
        assert!(!is_within(net("10.0.0.0/8"), bridge));
        // contains() masks by itself.
        assert!(bridge.contains("10.2.0.0".parse().unwrap()));
    }

    #[test]
    fn several_networks() {
        let nets = allowed(&["10.2.0.0/16", "127.0.0.0/8"]);
        assert!(nets.contains("127.0.0.1".parse().unwrap()));
        assert!(nets.contains("10.2.3.4".parse().unwrap()));
        assert_eq!(nets.to_string(), "10.2.0.0/16, 127.0.0.0/8");
    }

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn deny(rules: &[&str]) -> Vec<DenyRule> {
        rules.iter().map(|r| DenyRule::parse(r).unwrap()).collect()
    }

    #[test]
    fn deny_rules_parse_and_match() {
        for (text, shown, hits, misses) in [
            (
                "10.2.3.4",
                "10.2.3.4",
                &["10.2.3.4:1", "10.2.3.4:65535"][..],
                &["10.2.3.5:80"][..],
            ),
            (
                "10.2.7.0/24",
                "10.2.7.0/24",
                &["10.2.7.0:80", "10.2.7.255:8080"],
                &["10.2.8.1:80"],
            ),
            (
                ":8500",
                ":8500",
                &["10.2.1.5:8500", "127.0.0.1:8500"],
                &["10.2.1.5:8501"],
            ),
            (
                ":8000-8999",
                ":8000-8999",
                &["10.2.1.5:8000", "10.2.1.5:8999"],
                &["10.2.1.5:9000"],
            ),
            (
                "10.2.0.0/16:22",
                "10.2.0.0/16:22",
                &["10.2.9.9:22"],
                &["10.2.9.9:23", "10.3.0.1:22"],
            ),
            (
                "10.2.3.4:22",
                "10.2.3.4:22",
                &["10.2.3.4:22"],
                &["10.2.3.4:80", "10.2.3.5:22"],
            ),
        ] {
            let rule = DenyRule::parse(text).unwrap();
            assert_eq!(rule.to_string(), shown);
            for hit in hits {
                assert!(rule.matches(sock(hit)), "{text} should match {hit}");
            }
            for miss in misses {
                assert!(!rule.matches(sock(miss)), "{text} should not match {miss}");
            }
            assert!(!rule.matches(sock("[::1]:22")));
        }
        for (bad, why) in [
            ("", "empty"),
            (":", "not a port"),
            ("10.2.0.0/16:", "not a port"),
            (":0", "not a port"),
            (":70000", "not a port"),
            (":http", "not a port"),
            (":9000-8000", "backwards"),
            (
                "10.2.7.1/24",
                "write 10.2.7.0/24 (the whole network) or 10.2.7.1 (one address)",
            ),
            ("10.2.0.0/33", "not an IPv4 network"),
            ("shop", "not an IPv4 address"),
            ("::1", "IPv6"),
            ("[::1]:80", "IPv6"),
            ("fd00::/8", "IPv6"),
        ] {
            let err = DenyRule::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    fn refused(allowed_nets: &[&str], bridges: &[&str], rules: &[&str]) -> RefusedAddresses {
        let bridges: Vec<Ipv4Network> = bridges.iter().map(|b| net(b)).collect();
        RefusedAddresses::new(&allowed(allowed_nets), &bridges, &deny(rules))
    }

    #[test]
    fn refusals_name_their_reason() {
        let refused = refused(
            &["10.2.0.0/16"],
            &["10.2.0.0/24"],
            &["10.2.7.0/24", ":8500"],
        )
        .with_own(
            [
                "10.2.0.1".parse().unwrap(),
                "192.168.1.10".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            ],
            [80, 9090],
        );
        let why = |addr: &str| refused.refusal(sock(addr)).map(|r| r.to_string());
        assert_eq!(why("10.2.1.5:8080"), None);
        assert!(why("10.2.0.1:80").unwrap().contains("this edge's own"));
        assert!(why("10.2.0.1:8080").unwrap().contains("this edge's own"));
        assert!(why("10.2.0.0:80")
            .unwrap()
            .contains("network address of 10.2.0.0/16"));
        assert!(why("10.2.255.255:80")
            .unwrap()
            .contains("broadcast address of 10.2.0.0/16"));
        assert!(why("10.2.0.9:80")
            .unwrap()
            .contains("lies in 10.2.0.0/24 (network.bridges)"));
        assert!(why("10.2.0.255:80").unwrap().contains("hosts' bridges"));
        assert!(why("10.2.7.3:80")
            .unwrap()
            .contains("network.deny entry \"10.2.7.0/24\""));
        assert!(why("10.2.1.5:8500")
            .unwrap()
            .contains("network.deny entry \":8500\""));
        // Loopback is this host too, but allowing it is the operator's choice: refused only
        // where this edge listens.
        assert_eq!(why("127.0.0.1:8080"), None);
        assert!(why("127.0.0.1:80")
            .unwrap()
            .contains("where this edge listens"));
        assert!(why("127.0.0.2:9090")
            .unwrap()
            .contains("where this edge listens"));
        assert_eq!(
            why("10.2.1.0:80"),
            None,
            "a host's /24 is no network of its own"
        );
    }

    #[test]
    fn small_networks_have_no_network_or_broadcast_address() {
        let refused = refused(&["10.9.0.0/31", "10.8.0.7/32", "10.7.0.0/30"], &[], &[]);
        assert_eq!(refused.refusal(sock("10.9.0.0:80")), None);
        assert_eq!(refused.refusal(sock("10.9.0.1:80")), None);
        assert_eq!(refused.refusal(sock("10.8.0.7:80")), None);
        assert!(matches!(
            refused.refusal(sock("10.7.0.0:80")),
            Some(Refusal::NetworkAddress(..))
        ));
        assert!(matches!(
            refused.refusal(sock("10.7.0.3:80")),
            Some(Refusal::Broadcast(..))
        ));
        assert_eq!(refused.refusal(sock("10.7.0.1:80")), None);
    }

    #[test]
    fn bridges_are_the_first_slice_of_weave() {
        assert_eq!(BRIDGES, net("10.2.0.0/24"));
        assert!(BRIDGES.contains(bridge_address(None).ip()));
        assert!(BRIDGES.contains(bridge_address(Some(HostIndex::new(255).unwrap())).ip()));
        // Written with a host address, a bridges entry still covers its whole network.
        let refused = refused(&["10.2.0.0/16"], &["10.2.0.1/24"], &[]);
        assert!(matches!(
            refused.refusal(sock("10.2.0.200:80")),
            Some(Refusal::Bridges(..))
        ));
    }

    #[test]
    fn local_addresses_include_loopback() {
        let local = local_addresses().unwrap();
        assert!(
            local.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()),
            "{local:?}"
        );
    }
}
