//! Server slots: which `server sN` line of its backend each server occupies.
//!
//! ```text
//! backend be_shop            slots: [10.2.1.5:80, 10.2.2.7:80, -, -, -, -, -, -]
//!   server s1 10.2.1.5:80    a server keeps its slot while it exists; a new one takes the
//!   server s2 10.2.2.7:80    lowest free slot; free slots are `127.0.0.1:1 disabled`
//!   server s3 127.0.0.1:1 disabled
//! ```
//!
//! Spare slots let HAProxy take added, removed and moved servers at runtime (`set server
//! addr/state`) instead of a reload. The assignment depends on the previous one (that is what
//! keeps a server in place), so it is computed from it: `Slots::assign(&previous, &table)`.
//! From an empty history it is simply sorted, so a fresh render is deterministic.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::model::{RoutingTable, ServiceName};

/// Where a free slot points: nothing listens on port 1, and the slot is disabled besides.
pub const PARKED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

/// Every backend's slots; `None` is a free slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    pub backends: BTreeMap<ServiceName, Vec<Option<SocketAddr>>>,
}

impl Slots {
    /// Slots for `table`, keeping each server where `previous` had it. A backend whose servers
    /// no longer fit grows to the next multiple of `step` that leaves a free slot.
    pub fn assign(previous: &Slots, table: &RoutingTable, step: usize) -> Slots {
        let step = step.max(1);
        let mut backends = BTreeMap::new();
        for (name, backend) in &table.backends {
            let wanted = &backend.servers;
            let mut slots: Vec<Option<SocketAddr>> = match previous.backends.get(name) {
                Some(old) if old.len() >= wanted.len() => old
                    .iter()
                    .map(|slot| slot.filter(|addr| wanted.contains(addr)))
                    .collect(),
                _ => {
                    let capacity = (wanted.len() / step + 1) * step;
                    vec![None; capacity]
                }
            };
            for addr in wanted {
                if slots.contains(&Some(*addr)) {
                    continue;
                }
                if let Some(free) = slots.iter_mut().find(|slot| slot.is_none()) {
                    *free = Some(*addr);
                }
            }
            backends.insert(name.clone(), slots);
        }
        Slots { backends }
    }
}

/// A slot's server name in HAProxy: `s1`, `s2`, ...
pub fn slot_name(index: usize) -> String {
    format!("s{}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_table, ServiceDef};

    fn table(servers: &[&str]) -> RoutingTable {
        test_table(vec![ServiceDef::new(
            "shop",
            &["shop.example.com"],
            servers,
        )])
    }

    fn addrs(slots: &Slots) -> Vec<String> {
        slots
            .backends
            .values()
            .next()
            .unwrap()
            .iter()
            .map(|s| s.map(|a| a.to_string()).unwrap_or_else(|| "-".into()))
            .collect()
    }

    #[test]
    fn fresh_is_sorted_with_spare_slots() {
        let slots = Slots::assign(
            &Slots::default(),
            &table(&["10.2.2.7:80", "10.2.1.5:80"]),
            4,
        );
        assert_eq!(addrs(&slots), ["10.2.1.5:80", "10.2.2.7:80", "-", "-"]);
    }

    #[test]
    fn servers_keep_their_slots() {
        let first = Slots::assign(
            &Slots::default(),
            &table(&["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80"]),
            4,
        );
        // .2 goes, .9 comes: .9 takes the freed slot, the others stay where they were.
        let second = Slots::assign(
            &first,
            &table(&["10.2.1.1:80", "10.2.1.3:80", "10.2.1.9:80"]),
            4,
        );
        assert_eq!(
            addrs(&second),
            ["10.2.1.1:80", "10.2.1.9:80", "10.2.1.3:80", "-"]
        );
        let capacities = |slots: &Slots| slots.backends.values().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(capacities(&first), capacities(&second));
    }

    #[test]
    fn a_full_backend_grows() {
        let first = Slots::assign(&Slots::default(), &table(&["10.2.1.1:80"]), 2);
        assert_eq!(addrs(&first), ["10.2.1.1:80", "-"]);
        let grown = Slots::assign(
            &first,
            &table(&["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80"]),
            2,
        );
        assert_eq!(
            addrs(&grown),
            ["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80", "-"]
        );
    }

    #[test]
    fn same_history_same_slots() {
        let t = table(&["10.2.1.1:80", "10.2.1.2:80"]);
        assert_eq!(
            Slots::assign(&Slots::default(), &t, 8),
            Slots::assign(&Slots::default(), &t, 8)
        );
        assert_eq!(slot_name(0), "s1");
    }
}
