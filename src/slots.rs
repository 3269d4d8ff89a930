//! Backends and server slots: which HAProxy backend serves each service, and which `server sN`
//! line of that backend each server occupies.
//!
//! ```text
//! backend be_shop            a service's own backend: its servers plus headroom
//!   server s1 10.2.1.5:80    (a server keeps its slot while it exists; a new one takes
//!   server s2 10.2.2.7:80     the lowest free slot; a free slot is `127.0.0.1:1 disabled`)
//!   server s3 127.0.0.1:1 disabled
//! backend spare_1            the pool: spare backends, declared ahead of time, that a new
//!   server s1 127.0.0.1:1 disabled   service (or one that outgrew its slots) takes at runtime
//!   ...                               through the maps and `set server`; a removed service's
//!                                     backend goes back to the pool
//! ```
//!
//! HAProxy 2.6 adds neither a backend nor a server line at runtime, but it changes a server's
//! address and state, and a map's entries. So weft declares slots and spares ahead of time,
//! and a reload is needed only when a change does not fit them: a service whose balance
//! algorithm or health check (its [`Flavour`]) no free backend has, or whose servers outgrow
//! every backend it could take. Each reload packs anew: every service on a backend of its own
//! sized to its servers, and the pool full again.
//!
//! The assignment depends on the previous one (that is what keeps a server in its slot and a
//! service on its backend), so it is computed from it: `Slots::assign(&previous, &table, pool)`.
//! From an empty history it is simply sorted, so a fresh render is deterministic.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

// The pool's size is a setting; config owns it and it is re-exported here, beside its use.
pub use crate::config::Pool;
use crate::model::{Backend, Balance, HealthCheck, RoutingTable, ServiceName};

/// Where a free slot points: nothing listens on port 1, and the slot is disabled besides.
pub const PARKED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

/// The pool's backends are named this prefix and a number (`spare_1`): a service's own backend
/// always starts with [`crate::model::BACKEND_PREFIX`], so the two never meet.
pub const SPARE_PREFIX: &str = "spare_";

/// What a backend's config fixes, which only a reload changes: the balance algorithm and the
/// health check. A backend serves any service of its flavour.
/// The default is what a service that sets nothing gets: round robin, no HAProxy check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Flavour {
    pub balance: Balance,
    pub check: Option<HealthCheck>,
}

impl Flavour {
    pub fn of(backend: &Backend) -> Flavour {
        Flavour {
            balance: backend.balance,
            check: backend.check.clone(),
        }
    }

    /// Whether a backend of this flavour can serve `backend` (`Flavour::of(backend) == self`,
    /// without building one).
    fn suits(&self, backend: &Backend) -> bool {
        self.balance == backend.balance && self.check == backend.check
    }
}

/// One backend of the config: its flavour and its slots (`None`: a free slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub flavour: Flavour,
    pub slots: Vec<Option<SocketAddr>>,
}

impl Declared {
    /// The same backend with every slot free.
    fn emptied(&self) -> Declared {
        Declared {
            flavour: self.flavour.clone(),
            slots: vec![None; self.slots.len()],
        }
    }
}

/// Every backend of the config, and the one that serves each service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    /// By HAProxy backend name: the services' own (`be_shop`) and the pool's (`spare_1`).
    pub backends: BTreeMap<String, Declared>,
    /// The backend that serves each service of the table.
    pub serving: BTreeMap<ServiceName, String>,
}

/// Free slots beyond a backend's servers: a quarter of them, at least one, so that a rolling
/// deploy (a new server up before an old one goes) and a moved server stay at runtime. Each
/// `server` line costs HAProxy 2.6 about 5 KB (`docs/reference/haproxy-memory.md`), so slots follow
/// the servers that exist rather than a round number.
pub fn headroom(servers: usize) -> usize {
    servers.div_ceil(4).max(1)
}

impl Slots {
    /// Backends and slots for `table`, from `previous`: within what the config declares if the
    /// table fits it (no reload), else packed anew (for a reload).
    pub fn assign(previous: &Slots, table: &RoutingTable, pool: Pool) -> Slots {
        if !previous.backends.is_empty() {
            let (placed, unplaced) = previous.place(table);
            if unplaced.is_empty() {
                return placed;
            }
        }
        Slots::pack(previous, table, pool)
    }

    /// Places the services of `table` in the backends `self` declares, without declaring any:
    /// a service stays on its backend while its flavour matches and its servers fit; else it
    /// takes a free spare of its flavour with room for them (lowest name first). Returns the
    /// services that found no place: a new one is left out, one that ran before keeps its
    /// backend and its servers as they were.
    pub fn place(&self, table: &RoutingTable) -> (Slots, Vec<ServiceName>) {
        // Lists first, maps built from them in bulk: most services stay where they are, in
        // order, and a B-tree built from a list costs no search per entry.
        let mut staying: Vec<(String, Declared)> = Vec::with_capacity(table.backends.len());
        let mut serving: Vec<(ServiceName, String)> = Vec::with_capacity(table.backends.len());
        let mut moving = Vec::new();
        // Both in service name order: walked side by side, no search per service.
        let mut served = self.serving.iter().peekable();
        for (service, backend) in &table.backends {
            while served.next_if(|(before, _)| *before < service).is_some() {}
            let before = served.next_if(|(before, _)| *before == service);
            let current = before.and_then(|(_, name)| {
                let (name, declared) = self.backends.get_key_value(name)?;
                let fits = declared.flavour.suits(backend)
                    && backend.servers.len() <= declared.slots.len();
                fits.then_some((name, declared))
            });
            match current {
                Some((name, declared)) => {
                    staying.push((name.clone(), fill(declared, backend)));
                    serving.push((service.clone(), name.clone()));
                }
                None => moving.push((service, backend)),
            }
        }
        let mut backends: BTreeMap<String, Declared> = staying.into_iter().collect();
        let mut serving: BTreeMap<ServiceName, String> = serving.into_iter().collect();
        // Spares: free before this change (a backend given back now waits for the next one,
        // so a removed service's draining requests never meet another's servers).
        let used: HashSet<&str> = self.serving.values().map(String::as_str).collect();
        let mut spares: Vec<&String> = self
            .backends
            .keys()
            .filter(|name| !used.contains(name.as_str()))
            .collect();
        spares.sort_by_key(|name| spare_number(name));
        let mut unplaced = Vec::new();
        for (service, backend) in moving {
            let spare = spares.iter().position(|name| {
                let declared = &self.backends[*name];
                declared.flavour.suits(backend) && backend.servers.len() <= declared.slots.len()
            });
            match spare {
                Some(at) => {
                    let name = spares.remove(at);
                    let free = self.backends[name].emptied();
                    backends.insert(name.clone(), fill(&free, backend));
                    serving.insert(service.clone(), name.clone());
                }
                None => {
                    if let Some(name) = self.serving.get(service) {
                        backends.insert(name.clone(), self.backends[name].clone());
                        serving.insert(service.clone(), name.clone());
                    }
                    unplaced.push(service.clone());
                }
            }
        }
        // Every other backend stays declared, its slots free.
        for (name, declared) in &self.backends {
            if !backends.contains_key(name) {
                backends.insert(name.clone(), declared.emptied());
            }
        }
        (Slots { backends, serving }, unplaced)
    }

    /// A fresh layout for a reload: every service on its own backend (`be_NAME`) with its
    /// servers plus [`headroom`], keeping each server's slot where it ran on that backend
    /// before, and `pool.spares` free spares of the flavour most services have.
    pub fn pack(previous: &Slots, table: &RoutingTable, pool: Pool) -> Slots {
        // Lists, made maps at the end: built from sorted lists, not entry by entry.
        let mut backends = Vec::with_capacity(table.backends.len() + pool.spares);
        let mut serving = Vec::with_capacity(table.backends.len());
        // How many services each flavour has, and where it was first seen.
        let mut flavours: HashMap<Flavour, (usize, usize)> = HashMap::new();
        for (service, backend) in &table.backends {
            let name = service.backend();
            let flavour = Flavour::of(backend);
            match flavours.get_mut(&flavour) {
                Some((count, _)) => *count += 1,
                None => {
                    let seen = flavours.len();
                    flavours.insert(flavour.clone(), (1, seen));
                }
            }
            let wanted = backend.servers.len();
            let capacity = wanted + headroom(wanted);
            // Its own backend as it ran, if it still suits: same flavour, room for the
            // servers, and not more than twice the slots they need.
            let before = previous
                .backends
                .get(&name)
                .filter(|_| previous.serving.get(service) == Some(&name))
                .filter(|d| d.flavour == flavour)
                .filter(|d| wanted <= d.slots.len() && d.slots.len() <= 2 * capacity);
            let slots = match before {
                Some(declared) => declared.slots.clone(),
                None => vec![None; capacity],
            };
            backends.push((name.clone(), fill(&Declared { flavour, slots }, backend)));
            serving.push((service.clone(), name));
        }
        // The most common flavour; the first seen (in service name order) on a tie.
        let flavour = flavours
            .into_iter()
            .max_by_key(|(_, (count, first))| (*count, std::cmp::Reverse(*first)))
            .map(|(flavour, _)| flavour)
            .unwrap_or_default();
        for n in 1..=pool.spares {
            let spare = Declared {
                flavour: flavour.clone(),
                slots: vec![None; pool.spare_slots.max(1)],
            };
            backends.push((format!("{SPARE_PREFIX}{n}"), spare));
        }
        Slots {
            backends: backends.into_iter().collect(),
            serving: serving.into_iter().collect(),
        }
    }

    /// The HAProxy backend that serves `service`.
    pub fn backend_of(&self, service: &ServiceName) -> Option<&str> {
        self.serving.get(service).map(String::as_str)
    }

    /// The service an HAProxy backend serves; `None` for a free spare or an unknown name.
    pub fn service_of(&self, backend: &str) -> Option<&ServiceName> {
        self.serving
            .iter()
            .find(|(_, name)| *name == backend)
            .map(|(service, _)| service)
    }

    /// The pool: the spare backends declared, and those that serve no service now.
    pub fn spares(&self) -> PoolUse {
        let used: BTreeSet<&String> = self.serving.values().collect();
        let spares = self
            .backends
            .keys()
            .filter(|name| name.starts_with(SPARE_PREFIX));
        let (declared, free) = spares.fold((0, 0), |(declared, free), name| {
            (declared + 1, free + usize::from(!used.contains(name)))
        });
        PoolUse { declared, free }
    }

    /// Spares that serve no service now.
    #[cfg(test)]
    fn free_spares(&self) -> usize {
        self.spares().free
    }
}

/// How much of the pool is in use: what `/status` and the metrics show, so that an operator
/// sees it run dry before new services start to wait for reloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolUse {
    /// Spare backends declared by the running config.
    pub declared: usize,
    /// Of them, those that serve no service: as many new services can come without a reload.
    pub free: usize,
}

/// A spare's number, for ordering (`spare_2` before `spare_10`); other names last.
fn spare_number(name: &str) -> usize {
    name.strip_prefix(SPARE_PREFIX)
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// `declared`'s slots holding `backend`'s servers: each server that has a slot keeps it, the
/// others take the free slots in order, and a slot whose server went is freed. Linear in the
/// slots and servers. The caller made sure they fit.
fn fill(declared: &Declared, backend: &Backend) -> Declared {
    let wanted = &backend.servers;
    let flavour = declared.flavour.clone();
    let mut slots: Vec<Option<SocketAddr>> = declared
        .slots
        .iter()
        .map(|slot| slot.filter(|addr| wanted.contains(addr)))
        .collect();
    // A hash set where a backend has many slots; a scan is faster for the usual handful.
    let placed: Option<HashSet<SocketAddr>> =
        (slots.len() > 16).then(|| slots.iter().flatten().copied().collect());
    let mut free = 0;
    for addr in wanted {
        // (`wanted` is a set: a server placed in this loop is never met again.)
        let has_slot = match &placed {
            Some(set) => set.contains(addr),
            None => slots.contains(&Some(*addr)),
        };
        if has_slot {
            continue;
        }
        while free < slots.len() && slots[free].is_some() {
            free += 1;
        }
        if let Some(slot) = slots.get_mut(free) {
            *slot = Some(*addr);
        }
    }
    Declared { flavour, slots }
}

/// A slot's server name in HAProxy: `s1`, `s2`, ...
pub fn slot_name(index: usize) -> String {
    format!("s{}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_table, ServiceDef};

    const POOL: Pool = Pool {
        spares: 2,
        spare_slots: 4,
    };

    fn table(servers: &[&str]) -> RoutingTable {
        services(&[("shop", servers)])
    }

    fn services(defs: &[(&str, &[&str])]) -> RoutingTable {
        test_table(
            defs.iter()
                .map(|(name, servers)| {
                    ServiceDef::new(name, &[&format!("{name}.example.com")], servers)
                })
                .collect(),
        )
    }

    fn addrs(slots: &Slots, backend: &str) -> Vec<String> {
        slots.backends[backend]
            .slots
            .iter()
            .map(|s| s.map(|a| a.to_string()).unwrap_or_else(|| "-".into()))
            .collect()
    }

    fn shop() -> ServiceName {
        ServiceName::parse("shop").unwrap()
    }

    #[test]
    fn fresh_is_sorted_with_headroom_and_a_full_pool() {
        let slots = Slots::assign(
            &Slots::default(),
            &table(&["10.2.2.7:80", "10.2.1.5:80"]),
            POOL,
        );
        assert_eq!(
            addrs(&slots, "be_shop"),
            ["10.2.1.5:80", "10.2.2.7:80", "-"]
        );
        assert_eq!(addrs(&slots, "spare_1"), ["-", "-", "-", "-"]);
        assert_eq!(slots.backend_of(&shop()), Some("be_shop"));
        assert_eq!(slots.free_spares(), 2);
        assert_eq!(headroom(0), 1);
        assert_eq!(headroom(3), 1);
        assert_eq!(headroom(10), 3);
    }

    #[test]
    fn servers_keep_their_slots() {
        let first = Slots::assign(
            &Slots::default(),
            &table(&["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80"]),
            POOL,
        );
        // .2 goes, .9 comes: .9 takes the freed slot, the others stay where they were.
        let second = Slots::assign(
            &first,
            &table(&["10.2.1.1:80", "10.2.1.3:80", "10.2.1.9:80"]),
            POOL,
        );
        assert_eq!(
            addrs(&second, "be_shop"),
            ["10.2.1.1:80", "10.2.1.9:80", "10.2.1.3:80", "-"]
        );
        let capacities = |slots: &Slots| {
            slots
                .backends
                .values()
                .map(|d| d.slots.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(capacities(&first), capacities(&second));
    }

    #[test]
    fn a_new_service_takes_a_spare_and_a_removed_one_gives_its_backend_back() {
        let first = Slots::assign(&Slots::default(), &table(&["10.2.1.1:80"]), POOL);
        let more = services(&[("shop", &["10.2.1.1:80"]), ("cart", &["10.2.1.7:80"])]);
        let second = Slots::assign(&first, &more, POOL);
        // Same backends declared: no reload.
        assert_eq!(
            first.backends.keys().collect::<Vec<_>>(),
            second.backends.keys().collect::<Vec<_>>()
        );
        let cart = ServiceName::parse("cart").unwrap();
        assert_eq!(second.backend_of(&cart), Some("spare_1"));
        assert_eq!(second.service_of("spare_1"), Some(&cart));
        assert_eq!(addrs(&second, "spare_1"), ["10.2.1.7:80", "-", "-", "-"]);
        assert_eq!(second.free_spares(), 1);
        // shop goes: its backend is free (all slots parked) and a spare from then on.
        let third = Slots::assign(&second, &services(&[("cart", &["10.2.1.7:80"])]), POOL);
        assert_eq!(addrs(&third, "be_shop"), ["-", "-"]);
        assert_eq!(third.backend_of(&shop()), None);
        assert_eq!(third.backends.len(), first.backends.len());
        // The next new service of that flavour may take it.
        let fourth = Slots::assign(
            &third,
            &services(&[("cart", &["10.2.1.7:80"]), ("pay", &["10.2.1.8:80"])]),
            POOL,
        );
        let pay = ServiceName::parse("pay").unwrap();
        assert_eq!(fourth.backend_of(&pay), Some("spare_2"));
        assert_eq!(fourth.backends.len(), first.backends.len());
    }

    #[test]
    fn a_service_that_outgrows_its_backend_moves_to_a_spare_with_room() {
        let first = Slots::assign(&Slots::default(), &table(&["10.2.1.1:80"]), POOL);
        assert_eq!(first.backends["be_shop"].slots.len(), 2);
        let grown = table(&["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80"]);
        let second = Slots::assign(&first, &grown, POOL);
        assert_eq!(second.backend_of(&shop()), Some("spare_1"));
        assert_eq!(addrs(&second, "be_shop"), ["-", "-"]);
        assert_eq!(first.backends.len(), second.backends.len());
    }

    #[test]
    fn what_fits_nothing_is_packed_anew_for_a_reload() {
        let no_pool = Slots::assign(&Slots::default(), &table(&["10.2.1.1:80"]), Pool::NONE);
        let grown = table(&["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80"]);
        let (_, unplaced) = no_pool.place(&grown);
        assert_eq!(unplaced, [shop()]);
        let packed = Slots::assign(&no_pool, &grown, Pool::NONE);
        assert_eq!(
            addrs(&packed, "be_shop"),
            ["10.2.1.1:80", "10.2.1.2:80", "10.2.1.3:80", "-"]
        );
        // A service on a spare goes to its own backend at the next pack; the pool is full again.
        let first = Slots::assign(&Slots::default(), &table(&["10.2.1.1:80"]), POOL);
        let on_spare = Slots::assign(&first, &grown, POOL);
        let packed = Slots::pack(&on_spare, &grown, POOL);
        assert_eq!(packed.backend_of(&shop()), Some("be_shop"));
        assert_eq!(packed.free_spares(), 2);
    }

    #[test]
    fn a_new_service_of_another_flavour_finds_no_spare() {
        use crate::model::CheckDef;
        let first = Slots::assign(&Slots::default(), &table(&["10.2.1.1:80"]), POOL);
        let checked = test_table(vec![
            ServiceDef::new("shop", &["shop.example.com"], &["10.2.1.1:80"]),
            ServiceDef {
                check: Some(CheckDef::Http("/health".into())),
                ..ServiceDef::new("cart", &["cart.example.com"], &["10.2.1.7:80"])
            },
        ]);
        let (_, unplaced) = first.place(&checked);
        assert_eq!(unplaced, [ServiceName::parse("cart").unwrap()]);
    }

    #[test]
    fn same_history_same_slots() {
        let t = table(&["10.2.1.1:80", "10.2.1.2:80"]);
        assert_eq!(
            Slots::assign(&Slots::default(), &t, POOL),
            Slots::assign(&Slots::default(), &t, POOL)
        );
        assert_eq!(slot_name(0), "s1");
    }
}
