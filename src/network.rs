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

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;

/// The weave network of the Apollo layout: every container address lies inside it.
pub const WEAVE_NETWORK: &str = "10.2.0.0/16";

/// [`WEAVE_NETWORK`] as a network.
pub const WEAVE: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::new(10, 2, 0, 0), 16) {
    Some(net) => net,
    // Evaluated at compile time: a typo above fails the build, never a running weft.
    None => panic!("the weave network constant is not a network"),
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
}
