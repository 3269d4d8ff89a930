//! The apply plan: what it takes to go from the applied state to the desired one.
//!
//! ```text
//! applied (slots, files) ─┐
//!                         ├─ same structure?  ── yes ─> runtime: set server / map entries
//! desired (slots, files) ─┘   (the backends         no ─> reload (the runtime part first,
//!                              declared: names,           if the reload must wait)
//!                              flavours, slots)
//! ```
//!
//! A new service that takes a spare backend, a removed one that gives its backend back, hosts
//! and paths, redirects and HSTS (all in the maps' values) keep the structure.
//!
//! Pure functions; `apply` runs what they decide.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use itertools::{EitherOrBoth, Itertools};

use crate::model::{RoutingTable, ServiceName};
use crate::render::{Rendered, CHALLENGES_MAP, HOSTS_MAP, PATHS_MAP, WILDCARDS_MAP};
use crate::slots::{slot_name, Flavour, Slots, PARKED};

/// What HAProxy runs, as weft installed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Shared with the apply loop, which keeps it for the change log: never copied.
    pub table: Arc<RoutingTable>,
    pub slots: Slots,
    pub rendered: Rendered,
}

/// What only a reload can change: the backends the config declares, with their flavours
/// (balance, check) and slot counts.
fn structure(slots: &Slots) -> Vec<(&String, &Flavour, usize)> {
    slots
        .backends
        .iter()
        .map(|(name, declared)| (name, &declared.flavour, declared.slots.len()))
        .collect()
}

pub fn same_structure(applied: &Slots, slots: &Slots) -> bool {
    structure(applied) == structure(slots)
}

/// One slot of a backend, pointed at a server (put in service) or parked (taken out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotChange {
    /// The HAProxy backend's name.
    pub backend: String,
    pub index: usize,
    pub addr: Option<SocketAddr>,
}

impl SlotChange {
    /// The admin socket commands that make this change.
    pub fn commands(&self) -> [String; 2] {
        let server = format!("{}/{}", self.backend, slot_name(self.index));
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
    /// Map files whose content changes, and how.
    pub maps: Vec<(&'static str, MapUpdate)>,
    /// Every slot of each touched backend, as it must run afterwards.
    pub expected: BTreeMap<String, BTreeMap<String, SocketAddr>>,
    /// TLS certificates added, renewed or removed.
    pub certs: Vec<CertChange>,
}

/// How a map changes at runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapUpdate {
    /// Entry by entry (`del map`, `set map`, `add map`): each lookup sees the entry before or
    /// after, never a map in between. For the exact-match map always, and for the ordered ones
    /// (`map_beg`, `map_end`: the first match in file order wins) when no entry is added.
    Entries {
        del: Vec<String>,
        set: Vec<(String, String)>,
        add: Vec<(String, String)>,
    },
    /// The whole map, in order, swapped at once (`prepare map`, `add map @version`, `commit
    /// map`): an added entry of an ordered map must take its place in the order.
    Replace(Vec<(String, String)>),
}

/// One certificate of the TLS bind's crt-list, by name (installed as `certs/NAME.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertChange {
    /// A new certificate: `new ssl cert`, `set ssl cert`, `commit ssl cert`, `add ssl crt-list`.
    Add { name: String, pem: String },
    /// A renewed one (same name, new content): `set ssl cert`, `commit ssl cert`.
    Update { name: String, pem: String },
    /// A removed one: `del ssl crt-list`, `del ssl cert`.
    Remove { name: String },
}

impl RuntimePlan {
    /// Runtime updates: one per server changed, one per map replaced, one per certificate.
    pub fn updates(&self) -> usize {
        self.enable.len() + self.disable.len() + self.maps.len() + self.certs.len()
    }
}

/// The certificate changes from `applied` to `rendered` (the same TLS bind, or none).
fn cert_changes(applied: &Rendered, rendered: &Rendered) -> Vec<CertChange> {
    let (Some(old), Some(new)) = (&applied.tls, &rendered.tls) else {
        return Vec::new();
    };
    let mut changes = Vec::new();
    for (name, pem) in &new.certs {
        match old.certs.get(name) {
            None => changes.push(CertChange::Add {
                name: name.clone(),
                pem: pem.clone(),
            }),
            Some(before) if before != pem => changes.push(CertChange::Update {
                name: name.clone(),
                pem: pem.clone(),
            }),
            Some(_) => {}
        }
    }
    for name in old
        .certs
        .keys()
        .filter(|name| !new.certs.contains_key(*name))
    {
        changes.push(CertChange::Remove { name: name.clone() });
    }
    changes
}

/// The commands of `changes`, in order.
pub fn commands(changes: &[SlotChange]) -> Vec<String> {
    changes.iter().flat_map(SlotChange::commands).collect()
}

pub fn runtime_plan(applied: &Applied, slots: &Slots, rendered: &Rendered) -> RuntimePlan {
    let mut plan = RuntimePlan::default();
    // Both in name order, walked side by side: no search per backend.
    let backends = slots
        .backends
        .iter()
        .merge_join_by(&applied.slots.backends, |a, b| a.0.cmp(b.0));
    for pair in backends {
        let EitherOrBoth::Both((name, wanted), (_, running)) = pair else {
            continue;
        };
        let mut touched = false;
        for (index, (now, next)) in running.slots.iter().zip(&wanted.slots).enumerate() {
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
                .slots
                .iter()
                .enumerate()
                .map(|(i, slot)| (slot_name(i), slot.unwrap_or(PARKED)))
                .collect();
            plan.expected.insert(name.clone(), expected);
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
            plan.maps.push((file, map_update(file, old, new)));
        }
    }
    if let (Some(old), Some(new)) = (&applied.rendered.challenges_map, &rendered.challenges_map) {
        if old != new {
            plan.maps
                .push((CHALLENGES_MAP, map_update(CHALLENGES_MAP, old, new)));
        }
    }
    plan.certs = cert_changes(&applied.rendered, rendered);
    plan
}

/// The runtime form of a map's change from `old` to `new` (see [`MapUpdate`]). Compared on
/// the texts' own lines: only the entries that change are copied (a hosts map of 10,000
/// entries, copied twice into sorted maps, was a new service's slowest step).
fn map_update(file: &str, old: &str, new: &str) -> MapUpdate {
    let before: HashMap<&str, &str> = map_entries(old).collect();
    let after: Vec<(&str, &str)> = map_entries(new).collect();
    let keys: HashSet<&str> = after.iter().map(|(k, _)| *k).collect();
    let mut del: Vec<String> = before
        .keys()
        .filter(|k| !keys.contains(*k))
        .map(|k| k.to_string())
        .collect();
    del.sort_unstable();
    let owned = |(key, value): &(&str, &str)| (key.to_string(), value.to_string());
    let (mut set, mut add) = (Vec::new(), Vec::new());
    for entry in &after {
        match before.get(entry.0) {
            Some(was) if *was == entry.1 => {}
            Some(_) => set.push(owned(entry)),
            None => add.push(owned(entry)),
        }
    }
    if file == HOSTS_MAP || file == CHALLENGES_MAP || add.is_empty() {
        MapUpdate::Entries { del, set, add }
    } else {
        MapUpdate::Replace(after.iter().map(owned).collect())
    }
}

/// `key value` lines of a rendered map, borrowed from its text.
fn map_entries(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|line| line.split_once(' '))
}

/// The part of `desired` that fits the applied structure, for when the rest must wait for a
/// reload: services that stay on their backend or find a spare take their new definition, a
/// service that found no place keeps the one it runs (a new one waits), and a route moving to
/// a service that must wait keeps its old one until the reload (never a 404 in between).
pub fn runtime_part(applied: &Applied, desired: &RoutingTable) -> RoutingTable {
    let (_, unplaced) = applied.slots.place(desired);
    let unplaced: BTreeSet<&ServiceName> = unplaced.iter().collect();
    let mut part = desired.clone();
    for service in &unplaced {
        match applied.table.backends.get(*service) {
            Some(running) => part.backends.insert((*service).clone(), running.clone()),
            None => part.backends.remove(*service),
        };
    }
    let mut kept = Vec::new();
    part.routes.retain(|key, service| {
        if !unplaced.contains(service) || applied.table.backends.contains_key(service) {
            return true;
        }
        if let Some(old) = applied.table.routes.get(key) {
            kept.push((key.clone(), old.clone()));
        }
        false
    });
    for (key, old) in kept {
        // The old service stays as it runs while a route still leads to it.
        if let (false, Some(running)) = (
            part.backends.contains_key(&old),
            applied.table.backends.get(&old),
        ) {
            part.backends.insert(old.clone(), running.clone());
        }
        part.routes.insert(key, old);
    }
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
            let expected = slots
                .backends
                .get(fields[1])
                .and_then(|declared| {
                    let index: usize = fields[3].strip_prefix('s')?.parse().ok()?;
                    declared.slots.get(index.checked_sub(1)?)
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
    use crate::slots::{Declared, Pool};

    /// Two spares of 4 slots.
    pub(crate) const POOL: Pool = Pool {
        spares: 2,
        spare_slots: 4,
    };

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
            clients: crate::render::ClientSettings::default(),
            run_dir: "/run/weft".into(),
            map_dir: "/run/weft".into(),
            hard_stop_after: std::time::Duration::from_secs(30),
            max_reloads: 50,
            maxconn: Some(100_000),
            pool: POOL,
            log: None,
            edge_id: "0123456789abcdef".into(),
            worker: None,
            tls: None,
        }
    }

    #[test]
    fn certificates_added_renewed_and_removed() {
        use crate::render::RenderedTls;
        let with = |certs: &[(&str, &str)]| Rendered {
            config: String::new(),
            hosts_map: String::new(),
            paths_map: String::new(),
            wildcards_map: String::new(),
            challenges_map: None,
            sections: Vec::new(),
            tls: Some(RenderedTls {
                crt_list: String::new(),
                default_cert: "D".into(),
                certs: certs
                    .iter()
                    .map(|(n, p)| (n.to_string(), p.to_string()))
                    .collect(),
            }),
        };
        let before = with(&[("a", "A1"), ("b", "B1"), ("c", "C1")]);
        let after = with(&[("a", "A1"), ("b", "B2"), ("d", "D1")]);
        assert_eq!(
            cert_changes(&before, &after),
            [
                CertChange::Update {
                    name: "b".into(),
                    pem: "B2".into()
                },
                CertChange::Add {
                    name: "d".into(),
                    pem: "D1".into()
                },
                CertChange::Remove { name: "c".into() },
            ]
        );
        assert!(cert_changes(&after, &after).is_empty());
    }

    /// `table` as a fresh start would run it (with [`POOL`]).
    pub(crate) fn applied(table: RoutingTable) -> Applied {
        applied_with(table, POOL)
    }

    pub(crate) fn applied_with(table: RoutingTable, pool: Pool) -> Applied {
        let slots = Slots::assign(&Slots::default(), &table, pool);
        let rendered = render_with(&table, &slots, &settings()).unwrap();
        Applied {
            table: table.into(),
            slots,
            rendered,
        }
    }

    #[test]
    fn a_moved_server_is_two_runtime_steps_enable_first() {
        let before = applied(table(&[("shop", &["10.2.1.5:80", "10.2.1.6:80"])]));
        let next = table(&[("shop", &["10.2.1.5:80", "10.2.9.9:80"])]);
        let slots = Slots::assign(&before.slots, &next, POOL);
        assert!(same_structure(&before.slots, &slots));
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
    fn a_new_service_takes_a_spare_at_runtime_and_a_removed_one_gives_it_back() {
        let before = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let more = table(&[("shop", &["10.2.1.5:80"]), ("cart", &["10.2.1.7:80"])]);
        let slots = Slots::assign(&before.slots, &more, POOL);
        assert!(same_structure(&before.slots, &slots));
        let rendered = render_with(&more, &slots, &settings()).unwrap();
        let plan = runtime_plan(&before, &slots, &rendered);
        assert_eq!(
            commands(&plan.enable),
            [
                "set server spare_1/s1 addr 10.2.1.7 port 80",
                "set server spare_1/s1 state ready"
            ]
        );
        assert_eq!(
            plan.maps,
            [(
                HOSTS_MAP,
                MapUpdate::Entries {
                    del: vec![],
                    set: vec![],
                    add: vec![("cart.example.com".into(), "spare_1;cart;".into())]
                }
            )]
        );
        let after = Applied {
            table: more.into(),
            slots,
            rendered,
        };
        let fewer = table(&[("shop", &["10.2.1.5:80"])]);
        let slots = Slots::assign(&after.slots, &fewer, POOL);
        assert!(same_structure(&after.slots, &slots));
        let rendered = render_with(&fewer, &slots, &settings()).unwrap();
        let plan = runtime_plan(&after, &slots, &rendered);
        assert_eq!(
            commands(&plan.disable),
            [
                "set server spare_1/s1 state maint",
                "set server spare_1/s1 addr 127.0.0.1 port 1"
            ]
        );
    }

    #[test]
    fn new_services_without_a_spare_and_outgrown_slots_are_structural() {
        let before = applied_with(table(&[("shop", &["10.2.1.5:80"])]), Pool::NONE);
        let more = table(&[("shop", &["10.2.1.5:80"]), ("cart", &["10.2.1.7:80"])]);
        assert!(!same_structure(
            &before.slots,
            &Slots::assign(&before.slots, &more, Pool::NONE)
        ));
        let before = applied(table(&[("shop", &["10.2.1.5:80"])]));
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
            &before.slots,
            &Slots::assign(&before.slots, &full, POOL)
        ));
    }

    #[test]
    fn the_runtime_part_waits_for_new_backends_only() {
        let before = applied_with(table(&[("shop", &["10.2.1.5:80"])]), Pool::NONE);
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
        let before = applied_with(
            table_with_hosts(&[("shop-blue", "shop.example.com", &["10.2.1.5:80"])]),
            Pool::NONE,
        );
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
        let slots = Slots::assign(
            &Slots::default(),
            &table(&[("shop", &["10.2.1.5:80"])]),
            POOL,
        );
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
    /// Backends' slots by name, and the three maps' entries.
    type Running = (BTreeMap<String, Declared>, Vec<Vec<(String, String)>>);

    fn replay(applied: &Applied, plan: &RuntimePlan) -> Running {
        let mut slots = applied.slots.backends.clone();
        for change in plan.enable.iter().chain(&plan.disable) {
            slots.get_mut(&change.backend).unwrap().slots[change.index] = change.addr;
        }
        let mut maps: Vec<Vec<(String, String)>> = [
            &applied.rendered.hosts_map,
            &applied.rendered.paths_map,
            &applied.rendered.wildcards_map,
        ]
        .map(|text| owned_entries(text))
        .into();
        for (file, update) in &plan.maps {
            let at = [HOSTS_MAP, PATHS_MAP, WILDCARDS_MAP]
                .iter()
                .position(|f| f == file)
                .unwrap();
            match update {
                MapUpdate::Replace(entries) => maps[at] = entries.clone(),
                MapUpdate::Entries { del, set, add } => {
                    let map = &mut maps[at];
                    map.retain(|(k, _)| !del.contains(k));
                    for (key, value) in set {
                        map.iter_mut().find(|(k, _)| k == key).unwrap().1 = value.clone();
                    }
                    map.extend(add.iter().cloned());
                }
            }
        }
        // The exact-match map has no order.
        maps[0].sort();
        (slots, maps)
    }

    fn owned_entries(text: &str) -> Vec<(String, String)> {
        map_entries(text)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn maps_of(rendered: &Rendered) -> Vec<Vec<(String, String)>> {
        let mut maps: Vec<Vec<(String, String)>> = [
            &rendered.hosts_map,
            &rendered.paths_map,
            &rendered.wildcards_map,
        ]
        .map(|text| owned_entries(text))
        .into();
        maps[0].sort();
        maps
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
        // Without a pool, new services reload; with a small one, they and outgrown services
        // mostly take spares, and the spares run out.
        for pool in [
            Pool::NONE,
            Pool {
                spares: 1,
                spare_slots: 3,
            },
        ] {
            replay_random_changes(pool);
        }
    }

    fn replay_random_changes(pool: Pool) {
        let mut rng = fastrand::Rng::with_seed(9);
        let services = ["shop", "cart", "pay"];
        let (mut runtime, mut parts, mut paths) = (0, 0, 0);
        let mut before = applied_with(random_table(&mut rng, &services), pool);
        for _ in 0..500 {
            let count = rng.usize(1..=3);
            let next = random_table(&mut rng, &services[..count]);
            let slots = Slots::assign(&before.slots, &next, pool);
            paths += usize::from(!next.routes.keys().all(|k| k.path.is_root()));
            if same_structure(&before.slots, &slots) {
                runtime += 1;
                let rendered = render_with(&next, &slots, &settings()).unwrap();
                let plan = runtime_plan(&before, &slots, &rendered);
                assert_eq!(
                    replay(&before, &plan),
                    (slots.backends.clone(), maps_of(&rendered))
                );
                // Every slot of a touched backend is expected where the plan puts it.
                for (backend, expected) in &plan.expected {
                    for (i, slot) in slots.backends[backend].slots.iter().enumerate() {
                        assert_eq!(expected[&slot_name(i)], slot.unwrap_or(PARKED));
                    }
                }
                before = Applied {
                    table: next.into(),
                    slots,
                    rendered,
                };
            } else {
                parts += 1;
                let part = runtime_part(&before, &next);
                let slots = Slots::assign(&before.slots, &part, pool);
                assert!(same_structure(&before.slots, &slots), "{part:?}");
                let rendered = render_with(&part, &slots, &settings()).unwrap();
                let plan = runtime_plan(&before, &slots, &rendered);
                assert_eq!(replay(&before, &plan), (slots.backends, maps_of(&rendered)));
                // Then the reload: what runs is the whole desired state.
                let slots = Slots::assign(&before.slots, &next, pool);
                let rendered = render_with(&next, &slots, &settings()).unwrap();
                before = Applied {
                    table: next.into(),
                    slots,
                    rendered,
                };
            }
        }
        assert!(
            runtime > 50 && parts > 5,
            "{pool:?}: {runtime} runtime, {parts} parts"
        );
        assert!(paths > 50, "{paths} changes with paths");
    }
}
