//! Render: the routing table as `haproxy.cfg` and its map files.
//!
//! A pure function of the table and the settings: the same input gives byte-identical output,
//! so every edge node renders the same files and "nothing changed" is a string comparison.
//!
//! Routing in HAProxy, in the order it is tried:
//! 1. `paths.map` (`map_beg`): `host/path/` -> backend, longest prefix first; the frontend
//!    looks up `host + path + "/"`, so `/api` matches `/api` and `/api/x` but not `/apix`;
//! 2. `hosts.map` (exact): `host` -> backend;
//! 3. `wildcards.map` (`map_end`): `.example.com` -> backend for `*.example.com`, longest first;
//! 4. `no_route`: 404.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use askama::Template;

use crate::config::HaproxyConfig;
// Config owns the config file's name (its `haproxy.config_file` default is made of it). It is
// re-exported here, beside the other names of HAProxy's files.
pub use crate::config::CONFIG_FILE;
use crate::model::RoutingTable;
use crate::slots::{slot_name, Slots, PARKED};

/// The names of HAProxy's files, in the one place every part of weft reads them from. The
/// map files the config refers to, by file name inside the map directory:
pub const HOSTS_MAP: &str = "hosts.map";
pub const PATHS_MAP: &str = "paths.map";
pub const WILDCARDS_MAP: &str = "wildcards.map";
/// In the run directory: the admin stats socket the config opens, and the server state that
/// a reload hands from the old worker to the new.
pub const ADMIN_SOCKET: &str = "admin.sock";
pub const SERVER_STATE_FILE: &str = "server-state";
/// An empty server-state file in the format HAProxy writes: version line only. Without it
/// HAProxy warns that it cannot read the file.
pub const EMPTY_SERVER_STATE: &str = "1\n";

/// What the rendered files depend on besides the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderSettings {
    /// Where HAProxy listens for clients.
    pub bind: SocketAddr,
    /// Absolute directory of the admin socket and the server-state file.
    pub run_dir: PathBuf,
    /// Absolute directory the map files are read from.
    pub map_dir: PathBuf,
    /// `hard-stop-after`: how long an old worker may finish its connections after a reload.
    pub hard_stop_after: Duration,
    /// `mworker-max-reloads`: old workers that survived this many reloads are killed.
    pub max_reloads: u32,
    /// `maxconn` in `global`: HAProxy's concurrent connections, and so its fd limit; `None`:
    /// none rendered, HAProxy's own choice.
    pub maxconn: Option<u32>,
    /// Slots per backend come in multiples of this (see [`crate::slots`]).
    pub slots: usize,
    /// Syslog target of the access log (`haproxy.log`), if any.
    pub log: Option<String>,
    /// This edge's name in the loop guard header, [`loop_header`] (hex digits).
    pub edge_id: String,
    /// The uid and gid HAProxy's workers switch to; `None`: they stay who started HAProxy.
    pub worker: Option<(u32, u32)>,
}

/// A request passing this edge once more than this many times is in a loop (508).
pub const MAX_EDGE_PASSES: u32 = 3;

/// The header each pass through the edge `edge_id` adds to a request: `X-Weft-Via-<id>`.
pub fn loop_header(edge_id: &str) -> String {
    format!("X-Weft-Via-{edge_id}")
}

impl RenderSettings {
    /// The settings of `haproxy` for files installed in `run_dir` (maps and sockets there).
    pub fn new(haproxy: &HaproxyConfig, run_dir: &Path) -> RenderSettings {
        RenderSettings {
            bind: haproxy.bind,
            run_dir: run_dir.to_path_buf(),
            map_dir: run_dir.to_path_buf(),
            hard_stop_after: haproxy.hard_stop_after,
            max_reloads: haproxy.max_reloads,
            maxconn: haproxy.maxconn(),
            slots: haproxy.server_slots,
            log: haproxy.log.clone(),
            edge_id: haproxy.edge_id(),
            worker: haproxy.worker_ids(),
        }
    }
}

/// Every file HAProxy needs, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub config: String,
    pub hosts_map: String,
    pub paths_map: String,
    pub wildcards_map: String,
}

impl Rendered {
    /// `(file name, content)` of each file, maps first: they must be in place before the
    /// config that reads them.
    pub fn files(&self) -> [(&'static str, &str); 4] {
        [
            (HOSTS_MAP, &self.hosts_map),
            (PATHS_MAP, &self.paths_map),
            (WILDCARDS_MAP, &self.wildcards_map),
            (CONFIG_FILE, &self.config),
        ]
    }
}

struct BackendView {
    name: String,
    balance: &'static str,
    /// `(path, interval, fall)` of the HTTP health check.
    check: Option<(String, String, u32)>,
    /// `(slot name, server address)`; `None` is a free slot.
    servers: Vec<(String, Option<String>)>,
}

#[derive(Template)]
#[template(path = "haproxy.cfg", escape = "none")]
struct ConfigTemplate<'a> {
    version: &'a str,
    bind: SocketAddr,
    admin_socket: String,
    server_state: String,
    hosts_map: String,
    paths_map: String,
    wildcards_map: String,
    parked: SocketAddr,
    hard_stop_after: String,
    max_reloads: u32,
    maxconn: Option<u32>,
    worker: Option<(u32, u32)>,
    log: Option<&'a str>,
    loop_header: String,
    max_passes: u32,
    backends: Vec<BackendView>,
}

/// Renders the config and the maps.
/// Renders the config and the maps from scratch: servers in sorted slots.
pub fn render(table: &RoutingTable, settings: &RenderSettings) -> Result<Rendered, askama::Error> {
    let slots = Slots::assign(&Slots::default(), table, settings.slots);
    render_with(table, &slots, settings)
}

/// Renders the config and the maps with servers in the given slots.
pub fn render_with(
    table: &RoutingTable,
    slots: &Slots,
    settings: &RenderSettings,
) -> Result<Rendered, askama::Error> {
    let backends = table
        .backends
        .iter()
        .map(|(name, backend)| BackendView {
            name: name.backend(),
            balance: backend.balance.as_str(),
            check: backend
                .check
                .as_ref()
                .map(|c| (c.path.to_string(), haproxy_duration(c.interval), c.fall)),
            servers: slots
                .backends
                .get(name)
                .map(|slots| {
                    slots
                        .iter()
                        .enumerate()
                        .map(|(i, slot)| (slot_name(i), slot.map(|a| a.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    let config = ConfigTemplate {
        version: env!("CARGO_PKG_VERSION"),
        bind: settings.bind,
        admin_socket: in_dir(&settings.run_dir, ADMIN_SOCKET),
        server_state: in_dir(&settings.run_dir, SERVER_STATE_FILE),
        hosts_map: in_dir(&settings.map_dir, HOSTS_MAP),
        paths_map: in_dir(&settings.map_dir, PATHS_MAP),
        wildcards_map: in_dir(&settings.map_dir, WILDCARDS_MAP),
        parked: PARKED,
        hard_stop_after: haproxy_duration(settings.hard_stop_after),
        max_reloads: settings.max_reloads,
        maxconn: settings.maxconn,
        worker: settings.worker,
        log: settings.log.as_deref(),
        loop_header: loop_header(&settings.edge_id),
        max_passes: MAX_EDGE_PASSES,
        backends,
    }
    .render()?;
    let (hosts_map, paths_map, wildcards_map) = render_maps(table);
    Ok(Rendered {
        config,
        hosts_map,
        paths_map,
        wildcards_map,
    })
}

/// HAProxy's time format: whole seconds as `30s`, anything finer in milliseconds.
fn haproxy_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// `dir/name` as the config spells it.
fn in_dir(dir: &Path, name: &str) -> String {
    format!("{}/{name}", dir.display().to_string().trim_end_matches('/'))
}

/// The three maps. `map_beg` and `map_end` take the first match in file order, so longer keys
/// come first; ties sort by key, keeping the output deterministic.
fn render_maps(table: &RoutingTable) -> (String, String, String) {
    let mut hosts = Vec::new();
    let mut paths = Vec::new();
    let mut wildcards = Vec::new();
    for (key, service) in &table.routes {
        let backend = service.backend();
        match (key.host.wildcard_suffix(), key.path.is_root()) {
            (Some(suffix), _) => wildcards.push((suffix.to_string(), backend)),
            (None, true) => hosts.push((key.host.to_string(), backend)),
            (None, false) => paths.push((format!("{}{}/", key.host, key.path), backend)),
        }
    }
    let longest_first =
        |a: &(String, String), b: &(String, String)| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0));
    paths.sort_by(longest_first);
    wildcards.sort_by(longest_first);
    (map_text(&hosts), map_text(&paths), map_text(&wildcards))
}

fn map_text(entries: &[(String, String)]) -> String {
    let mut text = String::new();
    for (key, value) in entries {
        let _ = writeln!(text, "{key} {value}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_table, ServiceDef};

    fn settings() -> RenderSettings {
        RenderSettings {
            bind: "0.0.0.0:80".parse().unwrap(),
            run_dir: "/var/lib/weft".into(),
            map_dir: "/var/lib/weft".into(),
            hard_stop_after: Duration::from_secs(30),
            max_reloads: 50,
            maxconn: Some(100_000),
            slots: 4,
            log: None,
            edge_id: "0123456789abcdef".into(),
            worker: None,
        }
    }

    fn svc(name: &str, hosts: &[&str], path: Option<&str>, servers: &[&str]) -> ServiceDef {
        ServiceDef {
            path: path.map(Into::into),
            ..ServiceDef::new(name, hosts, servers)
        }
    }

    fn table(services: Vec<ServiceDef>) -> RoutingTable {
        test_table(services)
    }

    /// Compares against a golden file; `WEFT_BLESS=1` rewrites it.
    fn golden(name: &str, actual: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("WEFT_BLESS").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (run with WEFT_BLESS=1 to create)", path.display())
        });
        if expected != actual {
            let diff = similar::TextDiff::from_lines(expected.as_str(), actual);
            panic!(
                "{name} differs from the golden file (- expected, + actual):\n{}",
                diff.unified_diff().header("expected", "actual")
            );
        }
    }

    fn sample() -> RoutingTable {
        let mut shop = svc(
            "shop",
            &["shop.example.com", "www.shop.example.com"],
            None,
            &["10.2.2.7:8080", "10.2.1.5:8080"],
        );
        shop.check = Some("/health".into());
        let mut api = svc(
            "shop-api",
            &["shop.example.com"],
            Some("/api"),
            &["10.2.1.9:9000"],
        );
        api.balance = Some("leastconn".into());
        let v2 = svc(
            "shop-api-v2",
            &["shop.example.com"],
            Some("/api/v2"),
            &["10.2.3.4:9000"],
        );
        let wild = svc(
            "tenants",
            &["*.tenants.example.com"],
            None,
            &["10.2.1.20:80"],
        );
        let empty = svc("scaled-down", &["down.example.com"], None, &[]);
        table(vec![shop, api, v2, wild, empty])
    }

    #[test]
    fn golden_config_and_maps() {
        let with_log = RenderSettings {
            log: Some("/dev/log".into()),
            maxconn: Some(2000),
            ..settings()
        };
        let rendered = render(&sample(), &with_log).unwrap();
        golden("sample.haproxy.cfg", &rendered.config);
        golden("sample.hosts.map", &rendered.hosts_map);
        golden("sample.paths.map", &rendered.paths_map);
        golden("sample.wildcards.map", &rendered.wildcards_map);
    }

    #[test]
    fn golden_empty_table() {
        let rendered = render(&RoutingTable::default(), &settings()).unwrap();
        golden("empty.haproxy.cfg", &rendered.config);
        assert_eq!(rendered.hosts_map, "");
    }

    #[test]
    fn longest_path_prefix_comes_first() {
        let rendered = render(&sample(), &settings()).unwrap();
        assert_eq!(
            rendered.paths_map,
            "shop.example.com/api/v2/ be_shop-api-v2\nshop.example.com/api/ be_shop-api\n"
        );
    }

    #[test]
    fn durations_in_haproxy_format() {
        assert_eq!(haproxy_duration(Duration::from_secs(30)), "30s");
        assert_eq!(haproxy_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn same_input_same_bytes() {
        let a = render(&sample(), &settings()).unwrap();
        let b = render(&sample(), &settings()).unwrap();
        assert_eq!(a, b);
    }
}
