//! Network maths: which backend addresses weft may route to.
//!
//! The weave network (default `10.2.0.0/16`) is the only place containers live; an address
//! outside every allowed network is a registration mistake (a node address, a host port) and is
//! dropped with a reason.

use std::fmt;
use std::net::IpAddr;

use ipnetwork::Ipv4Network;

/// The weave network of the Apollo layout: every container address lies inside it.
pub const WEAVE_NETWORK: &str = "10.2.0.0/16";

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

    #[test]
    fn several_networks() {
        let nets = allowed(&["10.2.0.0/16", "127.0.0.0/8"]);
        assert!(nets.contains("127.0.0.1".parse().unwrap()));
        assert!(nets.contains("10.2.3.4".parse().unwrap()));
        assert_eq!(nets.to_string(), "10.2.0.0/16, 127.0.0.0/8");
    }
}
