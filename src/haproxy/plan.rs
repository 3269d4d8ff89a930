//! The apply plan: what it takes to go from the applied state to the desired one.
//!
//! ```text
//! applied (table, slots, files) ─┐
//!                                ├─ same structure?  ── yes ─> runtime: set server / replace map
//! desired (table, slots, files) ─┘   (backends, their      no ─> reload (the runtime part first,
//!                                     balance, checks,           if the reload must wait)
//!                                     slot counts)
//! ```
//!
//! Pure functions; `apply` runs what they decide.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::model::{Balance, HealthCheck, RoutingTable, ServiceName};
use crate::render::{Rendered, HOSTS_MAP, PATHS_MAP, WILDCARDS_MAP};
use crate::slots::{slot_name, Slots, PARKED};

/// What HAProxy runs, as weft installed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub table: RoutingTable,
    pub slots: Slots,
    pub rendered: Rendered,
}

type Structure<'a> = Vec<(&'a ServiceName, Balance, Option<&'a HealthCheck>, usize)>;

/// What only a reload can change: the backends, their balance and checks, their slot counts.
fn structure<'a>(table: &'a RoutingTable, slots: &'a Slots) -> Structure<'a> {
    table
        .backends
        .iter()
        .map(|(name, backend)| {
            let capacity = slots.backends.get(name).map_or(0, Vec::len);
            (name, backend.balance, backend.check.as_ref(), capacity)
        })
        .collect()
}

pub fn same_structure(applied: &Applied, table: &RoutingTable, slots: &Slots) -> bool {
    structure(&applied.table, &applied.slots) == structure(table, slots)
}

/// One slot of a backend, pointed at a server (put in service) or parked (taken out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotChange {
    pub backend: ServiceName,
    pub index: usize,
    pub addr: Option<SocketAddr>,
}

impl SlotChange {
    /// The admin socket commands that make this change.
    pub fn commands(&self) -> [String; 2] {
        let server = format!("{}/{}", self.backend.backend(), slot_name(self.index));
        let addr = |addr: SocketAddr| {
            format!(
                "set server {server} addr {} port {}",
                addr.ip(),
                addr.port()
            )
        };
        match self.addr {
            Some(to) => [addr(to), format!("set server {server} state ready")],
            // Out of service (new requests stop, running ones finish), then parked.
            None => [format!("set server {server} state maint"), addr(PARKED)],
        }
    }
}

/// The runtime changes that turn `applied` into `slots` + `rendered` (same structure).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuntimePlan {
    /// Servers put in service: run first, so that a moved backend is never empty.
    pub enable: Vec<SlotChange>,
    /// Servers taken out: run last.
    pub disable: Vec<SlotChange>,
    /// Map files whose content changes, with their entries in order.
    pub maps: Vec<(&'static str, Vec<(String, String)>)>,
    /// Every slot of each touched backend, as it must run afterwards.
    pub expected: BTreeMap<String, BTreeMap<String, SocketAddr>>,
}

impl RuntimePlan {
    /// Runtime updates: one per server changed, one per map replaced.
    pub fn updates(&self) -> usize {
        self.enable.len() + self.disable.len() + self.maps.len()
    }
}

/// The commands of `changes`, in order.
pub fn commands(changes: &[SlotChange]) -> Vec<String> {
    changes.iter().flat_map(SlotChange::commands).collect()
}

pub fn runtime_plan(applied: &Applied, slots: &Slots, rendered: &Rendered) -> RuntimePlan {
    let mut plan = RuntimePlan::default();
    for (name, wanted) in &slots.backends {
        let Some(running) = applied.slots.backends.get(name) else {
            continue;
        };
        let mut touched = false;
        for (index, (now, next)) in running.iter().zip(wanted).enumerate() {
            if now == next {
                continue;
            }
            touched = true;
            let change = SlotChange {
                backend: name.clone(),
                index,
                addr: *next,
            };
            match next {
                Some(_) => plan.enable.push(change),
                None => plan.disable.push(change),
            }
        }
        if touched {
            let expected = wanted
                .iter()
                .enumerate()
                .map(|(i, slot)| (slot_name(i), slot.unwrap_or(PARKED)))
                .collect();
            plan.expected.insert(name.backend(), expected);
        }
    }
    let maps = [
        (HOSTS_MAP, &applied.rendered.hosts_map, &rendered.hosts_map),
        (PATHS_MAP, &applied.rendered.paths_map, &rendered.paths_map),
        (
            WILDCARDS_MAP,
            &applied.rendered.wildcards_map,
            &rendered.wildcards_map,
        ),
    ];
    for (file, old, new) in maps {
        if old != new {
            plan.maps.push((file, map_entries(new)));
        }
    }
    plan
}

/// `key value` lines of a rendered map.
fn map_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The part of `desired` that fits the applied structure, for when the rest must wait for a
/// reload: existing backends take their new servers if they fit their slots, routes to
/// existing backends change, routes to backends that do not exist yet wait (a route moving
/// to a new backend keeps its old one until the reload: never a 404 in between).
pub fn runtime_part(applied: &Applied, desired: &RoutingTable) -> RoutingTable {
    let mut part = applied.table.clone();
    for (name, backend) in part.backends.iter_mut() {
        let Some(next) = desired.backends.get(name) else {
            continue;
        };
        let capacity = applied.slots.backends.get(name).map_or(0, Vec::len);
        if next.balance == backend.balance
            && next.check == backend.check
            && next.servers.len() <= capacity
        {
            backend.servers = next.servers.clone();
        }
    }
    part.routes = desired
        .routes
        .iter()
        .filter_map(|(key, service)| {
            if part.backends.contains_key(service) {
                return Some((key.clone(), service.clone()));
            }
            let old = applied.table.routes.get(key)?;
            Some((key.clone(), old.clone()))
        })
        .collect();
    part
}

/// Keeps the `show servers state` lines of servers that keep their address in `slots`.
///
/// HAProxy restores a server's address from the state file over the config's: a line for a
/// slot that now holds another server would send its traffic to the old one.
pub fn filter_server_state(state: &str, slots: &Slots) -> String {
    let mut kept = String::new();
    for line in state.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let keep = if fields.len() <= 18 {
            // The version line and the column names.
            line.starts_with('1') && fields.len() == 1 || line.starts_with('#')
        } else {
            let expected = fields[1]
                .strip_prefix(crate::model::BACKEND_PREFIX)
                .and_then(|name| ServiceName::parse(name).ok())
                .and_then(|name| slots.backends.get(&name))
                .and_then(|slots| {
                    let index: usize = fields[3].strip_prefix('s')?.parse().ok()?;
                    slots.get(index.checked_sub(1)?)
                })
                .map(|slot| slot.unwrap_or(PARKED).to_string());
            expected.is_some_and(|e| e == format!("{}:{}", fields[4], fields[18]))
        };
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{test_table, ServiceDef};
    use crate::render::{render_with, RenderSettings};

    /// Services `name` on `name.example.com` with their servers.
    pub(crate) fn table(services: &[(&str, &[&str])]) -> RoutingTable {
        let hosted: Vec<(&str, String, &[&str])> = services
            .iter()
            .map(|(name, servers)| (*name, format!("{name}.example.com"), *servers))
            .collect();
        let hosted: Vec<(&str, &str, &[&str])> = hosted
            .iter()
            .map(|(name, host, servers)| (*name, host.as_str(), *servers))
            .collect();
        table_with_hosts(&hosted)
    }

    fn table_with_hosts(services: &[(&str, &str, &[&str])]) -> RoutingTable {
        test_table(
            services
                .iter()
                .map(|(name, host, servers)| ServiceDef::new(name, &[host], servers))
                .collect(),
        )
    }

    fn settings() -> RenderSettings {
        RenderSettings {
            bind: "0.0.0.0:80".parse().unwrap(),
            run_dir: "/run/weft".into(),
            map_dir: "/run/weft".into(),
            hard_stop_after: std::time::Duration::from_secs(30),
            max_reloads: 50,
            maxconn: Some(100_000),
            slots: 4,
            log: None,
            edge_id: "0123456789abcdef".into(),
            worker: None,
        }
    }

    /// `table` as a fresh start would run it (4 slots per backend).
    pub(crate) fn applied(table: RoutingTable) -> Applied {
        let slots = Slots::assign(&Slots::default(), &table, 4);
        let rendered = render_with(&table, &slots, &settings()).unwrap();
        Applied {
            table,
            slots,
            rendered,
        }
    }

    #[test]
    fn a_moved_server_is_two_runtime_steps_enable_first() {
        let before = applied(table(&[("shop", &["10.2.1.5:80", "10.2.1.6:80"])]));
        let next = table(&[("shop", &["10.2.1.5:80", "10.2.9.9:80"])]);
        let slots = Slots::assign(&before.slots, &next, 4);
        assert!(same_structure(&before, &next, &slots));
        let rendered = render_with(&next, &slots, &settings()).unwrap();
        let plan = runtime_plan(&before, &slots, &rendered);
        assert_eq!(
            commands(&plan.enable),
            [
                "set server be_shop/s2 addr 10.2.9.9 port 80",
                "set server be_shop/s2 state ready"
            ]
        );
        assert!(plan.disable.is_empty());
        assert!(plan.maps.is_empty());
        assert_eq!(
            plan.expected["be_shop"]["s2"],
            "10.2.9.9:80".parse().unwrap()
        );
        assert_eq!(plan.expected["be_shop"]["s3"], PARKED);
        assert_eq!(plan.updates(), 1);
    }

    #[test]
    fn new_services_and_full_slots_are_structural() {
        let before = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let more = table(&[("shop", &["10.2.1.5:80"]), ("cart", &["10.2.1.7:80"])]);
        assert!(!same_structure(
            &before,
            &more,
            &Slots::assign(&before.slots, &more, 4)
        ));
        let full = table(&[(
            "shop",
            &[
                "10.2.1.1:80",
                "10.2.1.2:80",
                "10.2.1.3:80",
                "10.2.1.4:80",
                "10.2.1.5:80",
            ],
        )]);
        assert!(!same_structure(
            &before,
            &full,
            &Slots::assign(&before.slots, &full, 4)
        ));
    }

    #[test]
    fn the_runtime_part_waits_for_new_backends_only() {
        let before = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let desired = table(&[("shop", &["10.2.1.6:80"]), ("cart", &["10.2.1.7:80"])]);
        let part = runtime_part(&before, &desired);
        assert_eq!(part.backends.len(), 1);
        assert_eq!(part.routes.len(), 1);
        let shop = part.backends.values().next().unwrap();
        assert_eq!(
            shop.servers.iter().next().unwrap().to_string(),
            "10.2.1.6:80"
        );
    }

    #[test]
    fn a_route_moving_to_a_new_backend_keeps_the_old_one_until_the_reload() {
        let before = applied(table_with_hosts(&[(
            "shop-blue",
            "shop.example.com",
            &["10.2.1.5:80"],
        )]));
        let desired = table_with_hosts(&[("shop-green", "shop.example.com", &["10.2.1.6:80"])]);
        let part = runtime_part(&before, &desired);
        let targets: Vec<&str> = part.routes.values().map(|s| s.as_str()).collect();
        assert_eq!(targets, ["shop-blue"]);
        // A route that goes away goes at once.
        let gone = runtime_part(&before, &RoutingTable::default());
        assert!(gone.routes.is_empty());
    }

    #[test]
    fn server_state_lines_survive_only_where_the_address_stays() {
        let slots = Slots::assign(&Slots::default(), &table(&[("shop", &["10.2.1.5:80"])]), 2);
        let state = "1\n# be_id be_name srv_id srv_name srv_addr ...\n\
3 be_shop 1 s1 10.2.1.5 2 0 1 1 3 15 3 4 6 0 0 0 - 80 - 0 0 - - 0\n\
3 be_shop 2 s2 10.2.1.9 2 0 1 1 3 15 3 4 6 0 0 0 - 80 - 0 0 - - 0\n\
4 be_gone 1 s1 10.2.1.5 2 0 1 1 3 15 3 4 6 0 0 0 - 80 - 0 0 - - 0\n";
        let kept = filter_server_state(state, &slots);
        assert_eq!(
            kept,
            "1\n# be_id be_name srv_id srv_name srv_addr ...\n3 be_shop 1 s1 10.2.1.5 2 0 1 1 3 15 3 4 6 0 0 0 - 80 - 0 0 - - 0\n"
        );
    }

    /// What HAProxy holds after `plan` runs on `applied`: its slots, and its map entries.
    fn replay(applied: &Applied, plan: &RuntimePlan) -> (Slots, Vec<Vec<(String, String)>>) {
        let mut slots = applied.slots.clone();
        for change in plan.enable.iter().chain(&plan.disable) {
            slots.backends.get_mut(&change.backend).unwrap()[change.index] = change.addr;
        }
        let mut maps: Vec<Vec<(String, String)>> = [
            &applied.rendered.hosts_map,
            &applied.rendered.paths_map,
            &applied.rendered.wildcards_map,
        ]
        .map(|text| map_entries(text))
        .into();
        for (file, entries) in &plan.maps {
            let at = [HOSTS_MAP, PATHS_MAP, WILDCARDS_MAP]
                .iter()
                .position(|f| f == file)
                .unwrap();
            maps[at] = entries.clone();
        }
        (slots, maps)
    }

    fn maps_of(rendered: &Rendered) -> Vec<Vec<(String, String)>> {
        [
            &rendered.hosts_map,
            &rendered.paths_map,
            &rendered.wildcards_map,
        ]
        .map(|text| map_entries(text))
        .into()
    }

    /// A random table over `services`: each has 0-6 of 10 servers, some of 3 hosts (one
    /// exact, one wildcard, one shared by all), and maybe a path.
    fn random_table(rng: &mut fastrand::Rng, services: &[&str]) -> RoutingTable {
        let defs = services
            .iter()
            .map(|name| {
                let servers: Vec<String> = (0..rng.usize(0..=6))
                    .map(|_| format!("10.2.{}.{}:80", rng.u8(1..3), rng.u8(1..6)))
                    .collect();
                let hosts: Vec<String> = [
                    format!("{name}.example.com"),
                    format!("*.{name}.example.org"),
                    "www.example.net".to_string(),
                ]
                .into_iter()
                .filter(|_| rng.bool())
                .collect();
                let servers: Vec<&str> = servers.iter().map(String::as_str).collect();
                let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
                ServiceDef {
                    path: rng.bool().then(|| format!("/{name}")),
                    ..ServiceDef::new(name, &hosts, &servers)
                }
            })
            .collect();
        test_table(defs)
    }

    /// In the spirit of sozu's state diff tests: the runtime plan, replayed on what runs,
    /// gives exactly the desired slots and maps, for every same-structure change; and the
    /// runtime part of any change replays to the part.
    #[test]
    fn runtime_plans_replay_to_the_desired_state() {
        let mut rng = fastrand::Rng::with_seed(9);
        let services = ["shop", "cart", "pay"];
        let (mut runtime, mut parts, mut paths) = (0, 0, 0);
        let mut before = applied(random_table(&mut rng, &services));
        for _ in 0..500 {
            let count = rng.usize(1..=3);
            let next = random_table(&mut rng, &services[..count]);
            let slots = Slots::assign(&before.slots, &next, 4);
            paths += usize::from(!next.routes.keys().all(|k| k.path.is_root()));
            if same_structure(&before, &next, &slots) {
                runtime += 1;
                let rendered = render_with(&next, &slots, &settings()).unwrap();
                let plan = runtime_plan(&before, &slots, &rendered);
                assert_eq!(replay(&before, &plan), (slots.clone(), maps_of(&rendered)));
                // Every slot of a touched backend is expected where the plan puts it.
                for (backend, expected) in &plan.expected {
                    let name = ServiceName::parse(&backend[3..]).unwrap();
                    for (i, slot) in slots.backends[&name].iter().enumerate() {
                        assert_eq!(expected[&slot_name(i)], slot.unwrap_or(PARKED));
                    }
                }
                before = Applied {
                    table: next,
                    slots,
                    rendered,
                };
            } else {
                parts += 1;
                let part = runtime_part(&before, &next);
                let slots = Slots::assign(&before.slots, &part, 4);
                assert!(same_structure(&before, &part, &slots), "{part:?}");
                let rendered = render_with(&part, &slots, &settings()).unwrap();
                let plan = runtime_plan(&before, &slots, &rendered);
                assert_eq!(replay(&before, &plan), (slots, maps_of(&rendered)));
                // Then the reload: what runs is the whole desired state.
                before = applied(next);
            }
        }
        assert!(
            runtime > 50 && parts > 50,
            "{runtime} runtime, {parts} parts"
        );
        assert!(paths > 50, "{paths} changes with paths");
    }
}
