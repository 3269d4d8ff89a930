//! Three edges on one Consul: each runs weft and its HAProxy in a network namespace of its own
//! and reaches the Consul double from its own address, so the double counts three clients.
//!
//! ```text
//!  edge-a: weft + HAProxy   eth0 192.168.150.11/24 ──veth──┐
//!  edge-b: weft + HAProxy   eth0 192.168.150.12/24 ──veth──┤ hub: bridge br0 192.168.150.1/24
//!  edge-c: weft + HAProxy   eth0 192.168.150.13/24 ──veth──┘      Consul double on :8500
//! ```
//!
//! The edges start a second apart while the catalog changes, then a burst of changes follows
//! (registrations, deregistrations, check flips, instances moved to another address or to
//! another service, over 20 services of 1-3 instances). Afterwards every edge's HAProxy routes
//! every host and path to the same servers, the ones the catalog's passing instances say, as
//! HAProxy's runtime state shows it (`show map`, `show servers state` on its admin socket).
//! The servers are in 10.2.0.0/16 and never receive anything: no request goes through the
//! edges, and no service has a health check.
//!
//! What may differ between the edges, and is not compared: which `server sN` slot holds which
//! server (a server keeps the slot it got, and the lowest free slot goes to the next one, so
//! the assignment depends on the order each edge saw the changes in), and so the `server`
//! lines of `haproxy.cfg` (and, in general, a backend's number of slots, which grows with the
//! most servers it ever held); the `server-state` file (written at each reload from the
//! running worker: it depends on when each edge reloaded); the pid files and logs. The map
//! files are rendered from the routing table alone, so they must be byte-identical, and are
//! compared too.
//!
//! Each edge holds at most `max_connections` connections to Consul, and Consul refuses none.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::consul::{ConsulDouble, Instance, Status};
use support::netns::{wait_for_weft, Edges, Netns, NsWeft};
use support::{cli, eventually};

/// The hub's address on the bridge, where the double listens.
const CONSUL: &str = "192.168.150.1:8500";
const EDGES: [(&str, Ipv4Addr); 3] = [
    ("edge-a", Ipv4Addr::new(192, 168, 150, 11)),
    ("edge-b", Ipv4Addr::new(192, 168, 150, 12)),
    ("edge-c", Ipv4Addr::new(192, 168, 150, 13)),
];
/// `sources.consul.max_connections` of every edge: two watches, two for the claims ledger, two
/// readers.
const BUDGET: usize = 6;
const SERVICES: usize = 20;
const MAX_INSTANCES: usize = 3;
/// Changes while the edges start (between two starts), and in the burst after.
const WARMUP_CHANGES: usize = 10;
const BURST_CHANGES: usize = 150;
/// `sources.consul.resync`: the safety net for what neither watch shows, an instance
/// re-registered under its ID at a new address with unchanged checks (docs/reference/consul.md,
/// "The design"). With `1h`, about one run in seven failed: every edge kept such an instance's
/// old address. Everything else, the watches bring.
const RESYNC: &str = "10s";
/// How long the edges may take after the burst: a resync and more.
const CONVERGENCE: Duration = Duration::from_secs(30);
/// The deliberate spacing of the edges' starts.
const START_SPACING: Duration = Duration::from_secs(1);

/// weft in an edge: HAProxy on the edge's loopback, only the Consul source.
fn start_edge(ns: &Netns) -> NsWeft {
    NsWeft::start(
        ns,
        &format!(
            "[haproxy]\nbind = \"127.0.0.1:80\"\nrun_dir = \"run\"\nhard_stop_after = \"5s\"\n\n\
             [network]\nallowed = [\"10.2.0.0/16\"]\n\n\
             [bridge]\nmode = \"off\"\n\n\
             [status]\nlisten = \"127.0.0.1:9090\"\n\n\
             [sources.consul]\nurl = \"http://{CONSUL}\"\nmax_connections = {BUDGET}\n\
             resync = \"{RESYNC}\"\n\n\
             [[routing.teams]]\nname = \"shop\"\nconsul = [\"svc14\", \"svc15\", \"svc16\", \"svc17\"]\n"
        ),
        None,
    )
}

/// A service's routes, as keys of the routing view: `host` (hosts.map), `host/path/`
/// (paths.map), `.suffix` (wildcards.map, for `*.suffix`).
fn routes(service: usize) -> (Vec<String>, Vec<String>) {
    let name = format!("svc{service}");
    match service {
        0 => (
            vec![
                format!("weft.host={name}.edge.test"),
                format!("weft.host=www.{name}.edge.test"),
            ],
            vec![format!("{name}.edge.test"), format!("www.{name}.edge.test")],
        ),
        // One host, a path each: a team, so that any of them may hold the host for the rest.
        14..=17 => (
            vec![
                "weft.host=shop.edge.test".into(),
                format!("weft.path=/{name}"),
            ],
            vec![format!("shop.edge.test/{name}/")],
        ),
        18 | 19 => (
            vec![format!("weft.host=*.{name}.edge.test")],
            vec![format!(".{name}.edge.test")],
        ),
        _ => (
            vec![format!("weft.host={name}.edge.test")],
            vec![format!("{name}.edge.test")],
        ),
    }
}

/// One instance as the test registered it.
#[derive(Clone, Debug)]
struct Placed {
    service: usize,
    addr: SocketAddr,
    status: Status,
}

/// The catalog as the test wrote it, and the changes it makes to the double.
struct Catalog<'a> {
    consul: &'a ConsulDouble,
    rng: fastrand::Rng,
    instances: BTreeMap<String, Placed>,
    next_id: usize,
    next_addr: u32,
    log: Vec<String>,
}

impl<'a> Catalog<'a> {
    fn new(consul: &'a ConsulDouble, seed: u64) -> Catalog<'a> {
        Catalog {
            consul,
            rng: fastrand::Rng::with_seed(seed),
            instances: BTreeMap::new(),
            next_id: 0,
            next_addr: 0,
            log: Vec::new(),
        }
    }

    /// An address never used before: 10.2.N.y:8000+n, in a host's /24 (N >= 1: weft refuses
    /// 10.2.0.0/24, the bridges').
    fn fresh_addr(&mut self) -> SocketAddr {
        self.next_addr += 1;
        let n = self.next_addr;
        SocketAddr::from((
            [10, 2, (n / 200 + 1) as u8, (n % 200 + 1) as u8],
            8000 + n as u16,
        ))
    }

    fn of(&self, service: usize) -> Vec<String> {
        self.instances
            .iter()
            .filter(|(_, placed)| placed.service == service)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn register(&mut self, id: &str, placed: Placed) {
        let (tags, _) = routes(placed.service);
        let mut instance = Instance::new(
            &format!("svc{}", placed.service),
            id,
            &placed.addr.ip().to_string(),
            placed.addr.port(),
        )
        .status(placed.status);
        for tag in &tags {
            instance = instance.tag(tag);
        }
        self.consul.register(instance);
        self.instances.insert(id.to_string(), placed);
    }

    /// A new passing instance of `service` on a fresh address.
    fn add(&mut self, service: usize) {
        self.next_id += 1;
        let id = format!("svc{service}-{}", self.next_id);
        let addr = self.fresh_addr();
        self.log.push(format!("register {id} {addr}"));
        let status = Status::Passing;
        self.register(
            &id,
            Placed {
                service,
                addr,
                status,
            },
        );
    }

    /// The starting catalog: the first 16 services with 1-3 instances; the rest come later.
    fn populate(&mut self) {
        for service in 0..16 {
            for _ in 0..self.rng.usize(1..=MAX_INSTANCES) {
                self.add(service);
            }
        }
    }

    /// One random change to the catalog.
    fn change(&mut self) {
        let service = self.rng.usize(0..SERVICES);
        let ids = self.of(service);
        let pick = |rng: &mut fastrand::Rng| ids[rng.usize(0..ids.len())].clone();
        match self.rng.u8(0..5) {
            0 if ids.len() < MAX_INSTANCES => self.add(service),
            1 if !ids.is_empty() => {
                let id = pick(&mut self.rng);
                self.log.push(format!("deregister {id}"));
                self.consul.deregister(&id);
                self.instances.remove(&id);
            }
            2 if !ids.is_empty() => {
                let id = pick(&mut self.rng);
                let status = match self.instances[&id].status {
                    Status::Passing if self.rng.bool() => Status::Warning,
                    Status::Passing => Status::Critical,
                    _ => Status::Passing,
                };
                self.log.push(format!("check {id} {}", status.as_str()));
                self.consul.set_check(&id, status);
                self.instances.get_mut(&id).unwrap().status = status;
            }
            // Moved to another address: same ID, same check.
            3 if !ids.is_empty() => {
                let id = pick(&mut self.rng);
                let mut placed = self.instances[&id].clone();
                placed.addr = self.fresh_addr();
                self.log.push(format!("move {id} to {}", placed.addr));
                self.register(&id, placed);
            }
            // Moved to another service that has room: same ID and address.
            4 if !ids.is_empty() => {
                let to = self.rng.usize(0..SERVICES);
                if to == service || self.of(to).len() >= MAX_INSTANCES {
                    return self.change();
                }
                let id = pick(&mut self.rng);
                let mut placed = self.instances[&id].clone();
                placed.service = to;
                self.log.push(format!("move {id} to svc{to}"));
                self.register(&id, placed);
            }
            _ => self.change(),
        }
    }

    /// Every route to the servers of its service's passing instances. A service without
    /// instances is gone from the catalog: no route; one whose instances all fail keeps its
    /// routes, without servers.
    fn expected(&self) -> Routing {
        let mut routing = Routing::default();
        for placed in self.instances.values() {
            for route in routes(placed.service).1 {
                let servers = routing.0.entry(route).or_default();
                if placed.status == Status::Passing {
                    servers.insert(placed.addr.to_string());
                }
            }
        }
        routing
    }
}

/// Route (a host, `host/path/` or `.suffix`) -> the servers it reaches (`ip:port`; a server
/// in maintenance that is not a free slot is marked so, and a free slot that is not in
/// maintenance shows as its address: both are differences).
#[derive(Default, PartialEq, Eq)]
struct Routing(BTreeMap<String, BTreeSet<String>>);

impl Routing {
    /// What differs from `expected`, one line per route; empty when nothing does.
    fn diff(&self, expected: &Routing) -> String {
        let keys: BTreeSet<&String> = self.0.keys().chain(expected.0.keys()).collect();
        let mut diff = String::new();
        for key in keys {
            let (has, want) = (self.0.get(key), expected.0.get(key));
            if has != want {
                diff += &format!("  {key}: has {has:?}, expected {want:?}\n");
            }
        }
        diff
    }
}

/// Free slots point here, in maintenance (see src/slots.rs).
const FREE_SLOT: &str = "127.0.0.1:1";
/// `srv_admin_state` bits that put a server in maintenance (HAProxy's `SRV_ADMF_MAINT`):
/// forced, inherited, from DNS. Not `SRV_ADMF_CMAINT` (0x04): it only records that the config
/// said `disabled`, and stays when `set server ... state ready` puts the server in service.
const MAINTENANCE: u32 = 0x01 | 0x02 | 0x20;

/// An edge's routing as its HAProxy runs it, from the admin socket.
async fn running_routing(edge: &NsWeft) -> Result<Routing, String> {
    let socket = edge.path("run/admin.sock");
    let state = cli(&socket, "show servers state").await?;
    let mut backends: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in state.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 19 {
            continue;
        }
        let addr = format!("{}:{}", fields[4], fields[18]);
        let admin: u32 = fields[6].parse().map_err(|_| line.to_string())?;
        let servers = backends.entry(fields[1].to_string()).or_default();
        match (addr == FREE_SLOT, admin & MAINTENANCE != 0) {
            (true, true) => {}
            (false, true) => drop(servers.insert(format!("{addr} (maintenance: {admin})"))),
            (_, false) => drop(servers.insert(addr)),
        }
    }
    let mut routing = Routing::default();
    for map in ["hosts.map", "paths.map", "wildcards.map"] {
        let file = edge.dir.path().join("run").join(map);
        let answer = cli(&socket, &format!("show map {}", file.display())).await?;
        for line in answer.lines().filter(|l| !l.trim().is_empty()) {
            // `<entry pointer> <key> <value>`
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, key, value] = fields[..] else {
                return Err(format!("show map {}: {answer}", file.display()));
            };
            // `BACKEND;SERVICE;FLAGS`: a service may run on a spare backend of the pool.
            let backend = value.split(';').next().unwrap_or(value);
            let servers = backends
                .get(backend)
                .cloned()
                .unwrap_or_else(|| BTreeSet::from([format!("(no backend {backend})")]));
            routing.0.insert(key.to_string(), servers);
        }
    }
    Ok(routing)
}

/// The map files as the edge wrote them, each value without its backend: which spare of
/// the pool a service took depends on the changes an edge saw on the way (`key SERVICE;FLAGS`).
fn map_files(edge: &NsWeft) -> Vec<String> {
    ["hosts.map", "paths.map", "wildcards.map"]
        .iter()
        .map(|map| {
            let text =
                std::fs::read_to_string(edge.path(&format!("run/{map}"))).unwrap_or_default();
            text.lines()
                .map(|line| match line.split_once(' ') {
                    Some((key, value)) => {
                        format!("{key} {}\n", value.split_once(';').map_or(value, |v| v.1))
                    }
                    None => format!("{line}\n"),
                })
                .collect()
        })
        .collect()
}

/// A failure's text as it is, newlines included, in `eventually`'s message.
struct Report(String);

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\n{}", self.0)
    }
}

/// `Ok` when every edge runs `expected` and the edges' map files are identical.
async fn converged(edges: &[NsWeft], expected: &Routing) -> Result<(), Report> {
    let mut report = String::new();
    for ((name, _), edge) in EDGES.iter().zip(edges) {
        match running_routing(edge).await {
            Ok(routing) if routing == *expected => {}
            Ok(routing) => report += &format!("{name} differs:\n{}", routing.diff(expected)),
            Err(err) => report += &format!("{name}: {err}\n"),
        }
    }
    let first = map_files(&edges[0]);
    for ((name, _), edge) in EDGES.iter().zip(edges).skip(1) {
        if map_files(edge) != first {
            report += &format!("{name}'s map files differ from {}'s\n", EDGES[0].0);
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        Err(Report(report))
    }
}

#[test]
fn three_edges_converge_on_one_consul_after_a_burst_within_their_connection_budget() {
    support::require_haproxy();
    let t = Edges::build(&EDGES);
    // The double runs on the hub's runtime, so that it listens in the hub; the test's waits,
    // which use no network, run there too. Declared after the namespaces: stopped before
    // they are deleted.
    let runtime = t.hub.runtime();
    let consul_addr: SocketAddr = CONSUL.parse().unwrap();
    let consul = runtime.block_on(async {
        tokio::spawn(ConsulDouble::start_on(consul_addr))
            .await
            .unwrap()
    });
    let seed = std::env::var("EDGES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("catalog changes from seed {seed} (EDGES_SEED={seed} replays them)");
    let mut catalog = Catalog::new(&consul, seed);
    catalog.populate();

    // The edges start a second apart, while the catalog changes: each has its own history.
    let mut edges = Vec::new();
    for ns in &t.edges {
        let started = Instant::now();
        edges.push(start_edge(ns));
        wait_for_weft(ns, edges.last().unwrap());
        for _ in 0..WARMUP_CHANGES {
            catalog.change();
        }
        // Deliberate spacing, not synchronisation.
        std::thread::sleep(START_SPACING.saturating_sub(started.elapsed()));
    }

    let burst = Instant::now();
    for _ in 0..BURST_CHANGES {
        catalog.change();
    }
    let expected = catalog.expected();
    // Shown when the test fails (cargo prints a failed test's output).
    eprintln!("changes, in order:\n  {}", catalog.log.join("\n  "));
    runtime.block_on(eventually(
        CONVERGENCE,
        "the three edges run the catalog's routing",
        || converged(&edges, &expected),
    ));
    eprintln!(
        "{} changes; converged {:?} after the burst; {} routes, {} servers",
        catalog.log.len(),
        burst.elapsed(),
        expected.0.len(),
        expected.0.values().map(BTreeSet::len).sum::<usize>()
    );

    let connections = consul.connections();
    eprintln!("{connections:?}");
    for (name, address) in EDGES {
        let ip = IpAddr::V4(address);
        let peak = connections.peak.get(&ip).copied().unwrap_or(0);
        assert!(peak > 0, "{name} never connected: {connections:?}");
        assert!(
            peak <= BUDGET,
            "{name} held {peak} connections at once, its budget is {BUDGET}: {connections:?}"
        );
    }
    assert!(connections.refused.is_empty(), "{connections:?}");
    assert_eq!(connections.peak.len(), EDGES.len(), "{connections:?}");
    consul.check();
    for edge in &mut edges {
        let status = edge.process.stop().unwrap();
        assert!(status.success(), "{status}\n{}", edge.log());
    }
}
