//! `weft.toml`: read, validated once at start-up, every problem reported at once.
//!
//! ```text
//! weft.toml ──toml──> sections ──serde (deny_unknown_fields)──> Raw* ──validate──> Config
//!                     every section is read even when another fails; every key is checked,
//!                     and all errors come back together, each with its key path
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::model::ModelSettings;
use crate::network::{
    normalise, AllowedNetworks, DenyRule, RefusedAddresses, BRIDGES, WEAVE_NETWORK,
};

mod bridge;
mod forwarded;
mod routing;
mod sources;
mod tls;

use bridge::{validate_bridge, RawBridge};
pub use bridge::{BridgeConfig, BridgeMode, DEFAULT_BRIDGE_INTERVAL, DEFAULT_BRIDGE_NAME};
pub use forwarded::{ProxyProtocol, DEFAULT_TUNNEL_TIMEOUT, MAX_TRUSTED_PROXIES};
use routing::{validate_routing, RawRouting};
pub use routing::{ClaimsStore, RoutingConfig, CLAIMS_CONNECTIONS, DEFAULT_CLAIMS_PREFIX};
pub use sources::*;
use sources::{validate_sources, RawSources};
use tls::{validate_tls, RawTls};
pub use tls::{AcmeConfig, AcmeStore, TlsConfig, ACME_CONNECTIONS, DEFAULT_TLS_LISTEN};

/// Default path of the HAProxy binary (Debian's package). Always absolute: the master re-execs
/// its argv[0] on reload.
pub const DEFAULT_BINARY: &str = "/usr/sbin/haproxy";
pub const DEFAULT_RUN_DIR: &str = "/var/lib/weft";
pub const DEFAULT_BIND: &str = "0.0.0.0:80";
pub const DEFAULT_HARD_STOP_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RELOADS: u32 = 50;
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// The most `haproxy.maxconn` is when it is not set. Without `maxconn`, HAProxy 2.6 takes
/// (fd limit - 40) / 2, so its capacity and memory would follow the limit it inherits (under
/// systemd's default 524288: 262124 connections, 39 MiB per idle worker, old workers
/// included). 100000 needs 200040 descriptors, plus one per health-checked server; 19 MiB per
/// idle worker, ~3.3 GB at full load. See BENCHMARKS.md.
pub const AUTO_MAXCONN_CAP: u32 = 100_000;
/// The largest `haproxy.maxconn`, against typos. Above 524268 HAProxy needs more descriptors
/// than Linux's default `fs.nr_open` (1048576) lets a process have: raise that sysctl too.
pub const MAX_MAXCONN: u32 = 1_000_000;
/// Default `haproxy.spare_backends`: the pool's spare backends, declared at every reload.
pub const DEFAULT_SPARE_BACKENDS: usize = 20;
/// Default `haproxy.spare_slots`: the server slots of each spare backend.
pub const DEFAULT_SPARE_SLOTS: usize = 8;
/// How many spare backends each reload declares, and the slots of each (see `crate::slots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub spares: usize,
    pub spare_slots: usize,
}

impl Pool {
    /// No spare backend: every new service reloads.
    pub const NONE: Pool = Pool {
        spares: 0,
        spare_slots: 0,
    };
}

/// The largest pool and spare, against typos: each slot costs HAProxy about 5 KB.
const MAX_SPARE_BACKENDS: usize = 10_000;
const MAX_SPARE_SLOTS: usize = 1_000;
/// The rendered config's file name: `haproxy.config_file` defaults to `<run_dir>/haproxy.cfg`,
/// and render writes the config under this name.
pub const CONFIG_FILE: &str = "haproxy.cfg";

/// Whether changes may go through the runtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeUpdates {
    On,
    Off,
}

/// `[haproxy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHaproxy {
    /// HAProxy binary, absolute. Default `/usr/sbin/haproxy`.
    binary: Option<PathBuf>,
    /// `managed` (default): weft runs HAProxy as its child. `external`: HAProxy runs already
    /// (e.g. systemd's unit with `-S`); weft writes `config_file` and reloads through
    /// `master_socket`.
    mode: Option<String>,
    /// Directory for haproxy.cfg, the maps, the server-state file and the sockets; created if
    /// missing. Default `/var/lib/weft`.
    run_dir: Option<PathBuf>,
    /// Where HAProxy listens for clients. Default `0.0.0.0:80`.
    bind: Option<String>,
    /// Master CLI socket. Default `<run_dir>/master.sock`; required in external mode.
    master_socket: Option<PathBuf>,
    /// The config file HAProxy loads. Default `<run_dir>/haproxy.cfg`; in external mode the
    /// file the running HAProxy was started with.
    config_file: Option<PathBuf>,
    /// `hard-stop-after`: the longest an old worker may live after a reload. Default `30s`.
    hard_stop_after: Option<String>,
    /// `mworker-max-reloads`. Default 50.
    max_reloads: Option<u32>,
    /// `maxconn` in `global`: HAProxy's limit on concurrent connections, 1 to 1000000.
    /// HAProxy raises its own open-files limit to fit (two per connection). Default: a
    /// quarter of the hard open-files limit, at most 100000 (see `HaproxyConfig::maxconn`).
    maxconn: Option<u32>,
    /// How long a reload may take to be confirmed by `show proc`. Default `10s`.
    reload_timeout: Option<String>,
    /// Least time between two reloads; changes that arrive meanwhile coalesce into the next
    /// one. Default `1s`.
    min_reload_interval: Option<String>,
    /// `on` (default): servers added, removed or moved within a backend's slots, and new hosts
    /// or paths of existing backends, are applied through the runtime API without a reload.
    /// `off`: every change reloads (what marathon-lb does; for comparison).
    runtime_updates: Option<String>,
    /// Replaced by `spare_backends` and `spare_slots`: a backend's slots follow its servers.
    /// Refused with that reason, so that nobody believes it still works.
    server_slots: Option<usize>,
    /// Spare backends each reload declares, which new services take at runtime. Default 20;
    /// 0: every new service reloads.
    spare_backends: Option<usize>,
    /// Server slots of each spare backend. Default 8.
    spare_slots: Option<usize>,
    /// HAProxy's access log (`option httplog`) to syslog: a unix socket path such as
    /// `/dev/log`, or `ip:port` (UDP). Default: unset, no access log.
    log: Option<String>,
    /// The user HAProxy's workers run as when weft runs as root. Default `haproxy` (Debian's
    /// package makes it); `root` keeps them root.
    user: Option<String>,
    /// What becomes of a managed HAProxy when weft exits (SIGTERM, SIGINT, SIGHUP's re-exec,
    /// an error): `keep` (default) leaves it serving its last good config, and the next weft
    /// adopts it, so restarts and upgrades of weft cost no request; `stop` stops it gracefully
    /// with weft. `weft stop` stops a kept one.
    on_exit: Option<String>,
    /// Upstream proxies (a cloud load balancer) whose `X-Forwarded-For`, `-Proto` and `-Port`
    /// headers are kept (HAProxy appends the peer to `X-Forwarded-For`): networks or
    /// addresses, IPv4 or IPv6. From anyone else these headers are replaced by HAProxy's own.
    /// Default `[]`: nobody is trusted.
    trusted_proxies: Option<Vec<String>>,
    /// `off` (default) or `accept`: every connection on HAProxy's binds opens with a PROXY
    /// protocol header (v1 or v2) from a load balancer, which gives the client's address.
    proxy_protocol: Option<String>,
    /// `timeout tunnel`: how long a connection that became a tunnel (a WebSocket after its
    /// upgrade) may stay idle. Default `1h`.
    tunnel_timeout: Option<String>,
}

/// `[network]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    /// Backends outside these IPv4 networks are dropped. Default `["10.2.0.0/16"]`.
    allowed: Option<Vec<String>>,
    /// Where the hosts' bridges live, never a container: backends inside are dropped.
    /// Default `["10.2.0.0/24"]`, the weave layout's bridges' slice (host N's bridge is
    /// `10.2.0.N/16`); `[]` for a layout without one.
    bridges: Option<Vec<String>>,
    /// Backends refused although inside `allowed`: `"10.2.3.4"`, `"10.2.7.0/24"` (every
    /// port), `":8500"`, `":8000-8999"` (that port on every address), `"10.2.0.0/16:22"`
    /// (both). Default `[]`.
    deny: Option<Vec<String>>,
}

/// `[status]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    /// Where the status page, `/status` (JSON) and `/healthz` listen. Default
    /// `127.0.0.1:9090`.
    listen: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaproxyMode {
    Managed,
    External,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyConfig {
    pub binary: PathBuf,
    pub mode: HaproxyMode,
    pub run_dir: PathBuf,
    pub bind: SocketAddr,
    pub master_socket: PathBuf,
    pub config_file: PathBuf,
    pub hard_stop_after: Duration,
    pub max_reloads: u32,
    /// HAProxy's `maxconn` (global): concurrent connections; `None`: from the open-files
    /// limit ([`HaproxyConfig::maxconn`]).
    pub maxconn: Option<u32>,
    pub reload_timeout: Duration,
    pub min_reload_interval: Duration,
    pub runtime_updates: RuntimeUpdates,
    /// The spare backends (`haproxy.spare_backends`, `haproxy.spare_slots`).
    pub pool: Pool,
    /// Syslog target of the access log, as HAProxy's `log` line takes it.
    pub log: Option<String>,
    /// `haproxy.user`: who HAProxy's workers run as (see [`HaproxyConfig::worker_ids`]).
    pub user: String,
    /// `haproxy.on_exit`.
    pub on_exit: OnExit,
    /// `haproxy.trusted_proxies`: peers whose `X-Forwarded-*` headers are kept; sorted.
    pub trusted_proxies: Vec<ipnetwork::IpNetwork>,
    /// `haproxy.proxy_protocol`.
    pub proxy_protocol: ProxyProtocol,
    /// `haproxy.tunnel_timeout`: HAProxy's `timeout tunnel`.
    pub tunnel_timeout: Duration,
    /// `[tls]`: the TLS bind and its certificates' directory (`None`: no TLS bind). Its own
    /// section in weft.toml, kept here because it is what HAProxy binds.
    pub tls: Option<TlsConfig>,
}

/// What becomes of a managed HAProxy when weft exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// It keeps serving; the next weft adopts it.
    Keep,
    /// weft stops it gracefully on its way out.
    Stop,
}

/// Default `haproxy.user`.
pub const DEFAULT_USER: &str = "haproxy";

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub haproxy: HaproxyConfig,
    pub allowed: AllowedNetworks,
    /// `network.bridges`: the hosts' bridges' networks, never a backend.
    pub bridges: Vec<Ipv4Network>,
    /// `network.deny`: backends refused inside `allowed`.
    pub deny: Vec<DenyRule>,
    /// The weave bridge weft keeps up.
    pub bridge: BridgeConfig,
    pub routing: RoutingConfig,
    pub sources: SourcesConfig,
    /// Where the status endpoints listen.
    pub status_listen: SocketAddr,
}

pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:9090";

/// One problem in weft.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `haproxy.bind`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {}", issues.iter().map(|i| format!("\n  {}: {}", i.key, i.message)).collect::<String>())]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

impl Config {
    /// Reads and validates a weft.toml.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|issues| ConfigError::Invalid {
            path: path.to_path_buf(),
            issues,
        })
    }

    /// Parses config text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
        let mut issues = Issues::default();
        let mut table: toml::Table = match text.parse() {
            Ok(table) => table,
            Err(err) => {
                issues.add("", err.to_string().trim());
                return Err(issues.0);
            }
        };
        let haproxy: RawHaproxy = section(&mut table, "haproxy", &mut issues);
        let network: RawNetwork = section(&mut table, "network", &mut issues);
        let bridge: RawBridge = section(&mut table, "bridge", &mut issues);
        let routing: RawRouting = section(&mut table, "routing", &mut issues);
        let sources: RawSources = section(&mut table, "sources", &mut issues);
        let status: RawStatus = section(&mut table, "status", &mut issues);
        let tls: Option<RawTls> = table
            .contains_key("tls")
            .then(|| section(&mut table, "tls", &mut issues));
        for key in table.keys() {
            issues.add(
                key,
                "unknown section (known: haproxy, network, bridge, routing, sources, status, tls)",
            );
        }

        let mut haproxy = validate_haproxy(haproxy, base, &mut issues);
        let (allowed, bridges, deny) = validate_network(network, &mut issues);
        let bridge = validate_bridge(bridge, &mut issues);
        let sources = validate_sources(sources, base, &mut issues);
        let consul_connections = sources.consul.as_ref().map(|c| c.max_connections);
        haproxy.tls = validate_tls(tls, base, consul_connections, &mut issues);
        let routing = validate_routing(
            routing,
            sources.consul.as_ref().map(|c| c.max_connections),
            &mut issues,
        );
        if let (Some(budget), Some(AcmeStore::Consul { .. })) = (
            consul_connections,
            haproxy
                .tls
                .as_ref()
                .and_then(|tls| tls.acme.as_ref())
                .map(|acme| &acme.store),
        ) {
            let claims = match routing.claims {
                ClaimsStore::Consul { .. } => CLAIMS_CONNECTIONS,
                ClaimsStore::Local => 0,
            };
            let least = MIN_CONSUL_CONNECTIONS as usize + claims + ACME_CONNECTIONS;
            if budget < least {
                issues.add(
                    "sources.consul.max_connections",
                    format!(
                        "must be at least {least} with the ACME state in Consul (tls.acme.store): \
                         it takes {ACME_CONNECTIONS} of them"
                    ),
                );
            }
        }
        let listen_text = status
            .listen
            .unwrap_or_else(|| DEFAULT_STATUS_LISTEN.into());
        let status_listen = listen_text.parse().unwrap_or_else(|_| {
            issues.add(
                "status.listen",
                format!("{listen_text:?} is not an address like \"127.0.0.1:9090\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        });
        if !issues.0.is_empty() {
            return Err(issues.0);
        }
        Ok(Config {
            haproxy,
            allowed,
            bridges,
            deny,
            bridge,
            routing,
            sources,
            status_listen,
        })
    }
}

impl Config {
    /// `[tls.acme]`, when configured.
    pub fn acme(&self) -> Option<&AcmeConfig> {
        self.haproxy.tls.as_ref()?.acme.as_ref()
    }

    /// Whether the ACME state lives in Consul's KV (and takes its connections).
    pub fn acme_in_consul(&self) -> bool {
        matches!(
            self.acme().map(|acme| &acme.store),
            Some(AcmeStore::Consul { .. })
        )
    }

    /// What the model validates servers with: the allowed networks, and the addresses inside
    /// them that are refused. `local` is this host's interface addresses (see
    /// [`crate::network::local_addresses`]); the bridge's configured address counts as one
    /// (unless `bridge.mode = "off"`), as do the ports HAProxy and the status page listen on.
    pub fn model_settings(&self, local: impl IntoIterator<Item = IpAddr>) -> ModelSettings {
        let mut own: Vec<IpAddr> = local.into_iter().collect();
        if self.bridge.mode != BridgeMode::Off {
            own.push(IpAddr::V4(self.bridge.address.ip()));
        }
        let mut ports = vec![self.haproxy.bind.port(), self.status_listen.port()];
        ports.extend(self.haproxy.tls.as_ref().map(|tls| tls.listen.port()));
        ModelSettings {
            allowed: self.allowed.clone(),
            refused: RefusedAddresses::new(&self.allowed, &self.bridges, &self.deny)
                .with_own(own, ports),
            ownership: self.routing.ownership.clone(),
        }
    }
}

#[derive(Default)]
struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn add(&mut self, key: &str, message: impl fmt::Display) {
        self.0.push(ConfigIssue {
            key: key.to_string(),
            message: message.to_string(),
        });
    }
}

/// Takes one section out of the table. Every key the section refuses (unknown, or of the
/// wrong type) is reported at its dotted path and left out, so one bad key neither hides the
/// others nor throws away the section's good keys, which are still checked.
fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    key: &str,
    issues: &mut Issues,
) -> T {
    let Some(value) = table.remove(key) else {
        return T::default();
    };
    let accepts = |candidate: toml::Value| {
        candidate
            .try_into::<T>()
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let value = match value {
        toml::Value::Table(inner) if accepts(toml::Value::Table(inner.clone())).is_err() => {
            toml::Value::Table(keep_accepted(inner, &[key], &accepts, issues))
        }
        toml::Value::Table(inner) => toml::Value::Table(inner),
        other => other,
    };
    match value.try_into() {
        Ok(raw) => raw,
        Err(err) => {
            issues.add(key, first_line(&err.to_string()));
            T::default()
        }
    }
}

/// The keys of `table` (at `path` in the section) that the section's type accepts one by one;
/// a refused subtable where the type takes a table is searched key by key, anything else
/// refused is reported at its own path and left out.
fn keep_accepted(
    table: toml::Table,
    path: &[&str],
    accepts: &dyn Fn(toml::Value) -> Result<(), String>,
    issues: &mut Issues,
) -> toml::Table {
    let mut kept = toml::Table::new();
    for (key, value) in table {
        let mut inner_path = path.to_vec();
        inner_path.push(&key);
        // The section holding only `value` at this key's place.
        let alone = |value: toml::Value| {
            inner_path[1..].iter().rev().fold(value, |inner, k| {
                toml::Value::Table(toml::Table::from_iter([(k.to_string(), inner)]))
            })
        };
        match accepts(alone(value.clone())) {
            Ok(()) => {
                kept.insert(key.clone(), value);
            }
            Err(message) => match value {
                // A table is expected here (a source's section): look inside.
                toml::Value::Table(inner)
                    if accepts(alone(toml::Value::Table(toml::Table::new()))).is_ok() =>
                {
                    let inner = keep_accepted(inner, &inner_path, accepts, issues);
                    kept.insert(key.clone(), toml::Value::Table(inner));
                }
                _ => issues.add(&inner_path.join("."), first_line(&message)),
            },
        }
    }
    kept
}

/// toml adds "in `key`" on a line of its own: the key path says it already.
fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The longest duration any key takes: past it, deadlines computed from it could overflow
/// (`Instant + Duration` panics), and no timer of weft's needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn duration(raw: Option<String>, default: Duration, key: &str, issues: &mut Issues) -> Duration {
    match raw {
        None => default,
        Some(text) => match humantime::parse_duration(&text) {
            Ok(value) if value <= MAX_DURATION => value,
            Ok(_) => {
                issues.add(key, format!("{text:?} is longer than a year"));
                default
            }
            Err(err) => {
                issues.add(
                    key,
                    format!("{text:?} is not a duration like \"30s\": {err}"),
                );
                default
            }
        },
    }
}

/// A duration of at least `min`; below it, an issue at `key` saying `why` and `min` instead.
fn duration_at_least(
    raw: Option<String>,
    default: Duration,
    min: Duration,
    key: &str,
    why: &str,
    issues: &mut Issues,
) -> Duration {
    let value = duration(raw, default, key, issues);
    if value < min {
        issues.add(
            key,
            format!("must be at least {}{why}", humantime::format_duration(min)),
        );
        return min;
    }
    value
}

/// A Consul KV folder (`routing.claims_prefix`, `tls.acme.prefix`): `raw`, else `default`,
/// without slashes at either end; segments of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
fn kv_folder(raw: Option<String>, default: &str, key: &str, issues: &mut Issues) -> String {
    let prefix = raw.unwrap_or_else(|| default.into());
    let prefix = prefix.trim_matches('/').to_string();
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
        || prefix
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        issues.add(
            key,
            format!("{prefix:?} is not a KV folder like \"{default}\""),
        );
    }
    prefix
}

/// An address HAProxy binds (`haproxy.bind`, `tls.listen`): `text`, else `default` (an address
/// like it is the example in the message); port 0 is refused.
fn haproxy_bind(text: Option<String>, default: &str, key: &str, issues: &mut Issues) -> SocketAddr {
    let fallback: SocketAddr = default
        .parse()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 80)));
    let text = text.unwrap_or_else(|| default.into());
    let bind = text.parse().unwrap_or_else(|_| {
        issues.add(key, format!("{text:?} is not an address like {default:?}"));
        fallback
    });
    if bind.port() == 0 {
        issues.add(key, "needs a port: HAProxy refuses port 0");
    }
    bind
}

fn absolute(path: PathBuf, base: &Path) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        let joined = base.join(path);
        std::path::absolute(&joined).unwrap_or(joined)
    }
}

impl HaproxyConfig {
    /// HAProxy's `maxconn`: `haproxy.maxconn`, else, for a managed HAProxy, what fits a
    /// quarter of the hard open-files limit it inherits from weft (it needs two descriptors
    /// per connection, and the other half leaves room for health-checked servers, one each),
    /// at most [`AUTO_MAXCONN_CAP`], so that it starts under any limit without raising the
    /// hard one. An external HAProxy runs under its owner's limits, which weft does not know:
    /// unset, its `maxconn` is left to it.
    pub fn pool(&self) -> Pool {
        self.pool
    }

    pub fn maxconn(&self) -> Option<u32> {
        self.maxconn.or_else(|| {
            (self.mode == HaproxyMode::Managed).then(|| {
                let limit =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE);
                auto_maxconn(limit.map_or(1024, |(_, hard)| hard))
            })
        })
    }
}

impl HaproxyConfig {
    /// The uid and gid HAProxy's workers switch to (`uid`/`gid` in `global`): `haproxy.user`'s,
    /// when weft runs as root and the user exists; `None` otherwise (a non-root HAProxy cannot
    /// switch, and `root` keeps them root).
    pub fn worker_ids(&self) -> Option<(u32, u32)> {
        // Only root may switch; and `root` keeps the workers root on purpose.
        if !nix::unistd::geteuid().is_root() || self.user == "root" {
            return None;
        }
        let user = nix::unistd::User::from_name(&self.user).ok().flatten()?;
        Some((user.uid.as_raw(), user.gid.as_raw()))
    }

    /// This edge's name in HAProxy's loop guard (`X-Weft-Via-<edge id>`): 16 hex digits of a
    /// hash of `/etc/machine-id`, the hostname and `bind`. Stable across restarts (a restarted
    /// weft renders the same config, no reload) and distinct between edges, and between two
    /// HAProxies on one machine; not a secret (a client that sends it only refuses itself).
    pub fn edge_id(&self) -> String {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let seed = format!(
            "{}\n{}\n{}",
            read("/etc/machine-id").trim(),
            read("/proc/sys/kernel/hostname").trim(),
            self.bind
        );
        format!("{:016x}", fnv1a(seed.as_bytes()))
    }
}

/// FNV-1a, 64 bits: a hash whose value is fixed by its definition (std's may change).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `maxconn` for a hard open-files limit of `hard` (see [`HaproxyConfig::maxconn`]).
pub fn auto_maxconn(hard: u64) -> u32 {
    let quarter = hard.saturating_sub(40) / 4;
    u32::try_from(quarter)
        .unwrap_or(u32::MAX)
        .clamp(1, AUTO_MAXCONN_CAP)
}

fn validate_haproxy(raw: RawHaproxy, base: &Path, issues: &mut Issues) -> HaproxyConfig {
    let binary = raw.binary.unwrap_or_else(|| DEFAULT_BINARY.into());
    if !binary.is_absolute() {
        issues.add(
            "haproxy.binary",
            "must be an absolute path: HAProxy re-executes it on every reload",
        );
    }
    let mode = match raw.mode.as_deref() {
        None | Some("managed") => HaproxyMode::Managed,
        Some("external") => HaproxyMode::External,
        Some(other) => {
            issues.add(
                "haproxy.mode",
                format!("{other:?} is not one of managed, external"),
            );
            HaproxyMode::Managed
        }
    };
    let run_dir = absolute(raw.run_dir.unwrap_or_else(|| DEFAULT_RUN_DIR.into()), base);
    let bind = haproxy_bind(raw.bind, DEFAULT_BIND, "haproxy.bind", issues);
    if mode == HaproxyMode::External && raw.master_socket.is_none() {
        issues.add(
            "haproxy.master_socket",
            "is required in external mode: the master CLI socket HAProxy was started with (-S)",
        );
    }
    if mode == HaproxyMode::External && raw.config_file.is_none() {
        issues.add(
            "haproxy.config_file",
            "is required in external mode: the file HAProxy was started with (-f)",
        );
    }
    let master_socket = absolute(
        raw.master_socket
            .unwrap_or_else(|| run_dir.join("master.sock")),
        base,
    );
    let config_file = absolute(
        raw.config_file.unwrap_or_else(|| run_dir.join(CONFIG_FILE)),
        base,
    );
    let hard_stop_after = duration(
        raw.hard_stop_after,
        DEFAULT_HARD_STOP_AFTER,
        "haproxy.hard_stop_after",
        issues,
    );
    let reload_timeout = duration(
        raw.reload_timeout,
        DEFAULT_RELOAD_TIMEOUT,
        "haproxy.reload_timeout",
        issues,
    );
    if hard_stop_after.is_zero() {
        issues.add(
            "haproxy.hard_stop_after",
            "must be above zero: old workers need time to finish their requests",
        );
    }
    if reload_timeout.is_zero() {
        issues.add("haproxy.reload_timeout", "must be above zero");
    }
    let min_reload_interval = duration(
        raw.min_reload_interval,
        DEFAULT_MIN_RELOAD_INTERVAL,
        "haproxy.min_reload_interval",
        issues,
    );
    let runtime_updates = match raw.runtime_updates.as_deref() {
        None | Some("on") => RuntimeUpdates::On,
        Some("off") => RuntimeUpdates::Off,
        Some(other) => {
            issues.add(
                "haproxy.runtime_updates",
                format!("{other:?} is not one of on, off"),
            );
            RuntimeUpdates::On
        }
    };
    if raw.server_slots.is_some() {
        issues.add(
            "haproxy.server_slots",
            "is gone: a backend's slots now follow its servers, and new services take spare \
             backends (haproxy.spare_backends, haproxy.spare_slots); remove it",
        );
    }
    let pool = Pool {
        spares: raw.spare_backends.unwrap_or(DEFAULT_SPARE_BACKENDS),
        spare_slots: raw.spare_slots.unwrap_or(DEFAULT_SPARE_SLOTS),
    };
    if pool.spares > MAX_SPARE_BACKENDS {
        issues.add(
            "haproxy.spare_backends",
            format!("must lie between 0 and {MAX_SPARE_BACKENDS}"),
        );
    }
    if !(1..=MAX_SPARE_SLOTS).contains(&pool.spare_slots) {
        issues.add(
            "haproxy.spare_slots",
            format!("must lie between 1 and {MAX_SPARE_SLOTS}"),
        );
    }
    let max_reloads = raw.max_reloads.unwrap_or(DEFAULT_MAX_RELOADS);
    if max_reloads == 0 {
        issues.add("haproxy.max_reloads", "must be at least 1");
    }
    let maxconn = raw.maxconn.filter(|maxconn| {
        let ok = (1..=MAX_MAXCONN).contains(maxconn);
        if !ok {
            issues.add(
                "haproxy.maxconn",
                format!("must lie between 1 and {MAX_MAXCONN}"),
            );
        }
        ok
    });
    let user = raw.user.unwrap_or_else(|| DEFAULT_USER.into());
    let user_ok = !user.is_empty()
        && user.len() <= 32
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !user_ok {
        issues.add("haproxy.user", format!("{user:?} is not a user name"));
    }
    let on_exit = match raw.on_exit.as_deref() {
        None | Some("keep") => OnExit::Keep,
        Some("stop") => OnExit::Stop,
        Some(other) => {
            issues.add(
                "haproxy.on_exit",
                format!("{other:?} is not one of keep, stop"),
            );
            OnExit::Keep
        }
    };
    let log = raw.log.and_then(|text| match log_target(&text) {
        Ok(target) => Some(target),
        Err(reason) => {
            issues.add("haproxy.log", format!("{text:?} {reason}"));
            None
        }
    });
    HaproxyConfig {
        binary,
        mode,
        run_dir,
        bind,
        master_socket,
        config_file,
        hard_stop_after,
        max_reloads,
        maxconn,
        reload_timeout,
        min_reload_interval,
        runtime_updates,
        pool,
        log,
        user,
        on_exit,
        trusted_proxies: forwarded::trusted_proxies(raw.trusted_proxies, issues),
        proxy_protocol: forwarded::proxy_protocol(raw.proxy_protocol, issues),
        tunnel_timeout: forwarded::tunnel_timeout(raw.tunnel_timeout, issues),
        tls: None,
    }
}

/// A syslog target for HAProxy's `log` line: an absolute unix socket path, or IPv4 `ip:port`.
fn log_target(text: &str) -> Result<String, String> {
    if text.starts_with('/') {
        let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-');
        return match text.chars().find(|c| !safe(*c)) {
            None => Ok(text.to_string()),
            Some(c) => Err(format!(
                "contains {c:?}: a socket path may hold letters, digits and / . _ -"
            )),
        };
    }
    match text.parse::<std::net::SocketAddrV4>() {
        Ok(addr) if addr.port() != 0 => Ok(addr.to_string()),
        _ => Err(
            "is neither a unix socket path (\"/dev/log\") nor an IPv4 ip:port (UDP syslog)".into(),
        ),
    }
}

fn validate_network(
    raw: RawNetwork,
    issues: &mut Issues,
) -> (AllowedNetworks, Vec<Ipv4Network>, Vec<DenyRule>) {
    let texts = raw
        .allowed
        .unwrap_or_else(|| vec![WEAVE_NETWORK.to_string()]);
    let mut networks = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        match text.parse::<Ipv4Network>() {
            Ok(net) => networks.push(net),
            Err(err) => issues.add(
                &format!("network.allowed[{i}]"),
                format!("{text:?} is not an IPv4 network like \"10.2.0.0/16\": {err}"),
            ),
        }
    }
    if texts.is_empty() {
        issues.add(
            "network.allowed",
            "is empty: no backend could ever be routed",
        );
    }
    let bridge_texts = raw.bridges.unwrap_or_else(|| vec![BRIDGES.to_string()]);
    let mut bridges = Vec::new();
    for (i, text) in bridge_texts.iter().enumerate() {
        match text.parse::<Ipv4Network>() {
            Ok(net) => bridges.push(normalise(net)),
            Err(err) => issues.add(
                &format!("network.bridges[{i}]"),
                format!("{text:?} is not an IPv4 network like \"10.2.0.0/24\": {err}"),
            ),
        }
    }
    // An allowed network wholly inside the bridges could never route a backend: a typo.
    for (i, net) in networks.iter().enumerate() {
        let net = normalise(*net);
        if let Some(bridge) = bridges.iter().find(|b| net.is_subnet_of(**b)) {
            issues.add(
                &format!("network.allowed[{i}]"),
                format!(
                    "{net} lies inside network.bridges ({bridge}), which never holds a \
                     backend: allow the containers' network, or change network.bridges"
                ),
            );
        }
    }
    let mut deny = Vec::new();
    for (i, text) in raw.deny.unwrap_or_default().iter().enumerate() {
        match DenyRule::parse(text) {
            Ok(rule) => deny.push(rule),
            Err(reason) => issues.add(&format!("network.deny[{i}]"), format!("{text:?}: {reason}")),
        }
    }
    (AllowedNetworks::new(networks), bridges, deny)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key paths of `issues`, in order.
    fn keys_of(issues: &[ConfigIssue]) -> Vec<&str> {
        issues.iter().map(|i| i.key.as_str()).collect()
    }

    #[test]
    fn defaults() {
        let config = Config::parse(
            "[sources.file]\npath = \"services.toml\"\n",
            Path::new("/etc/weft"),
        )
        .unwrap();
        assert_eq!(config.haproxy.binary, PathBuf::from("/usr/sbin/haproxy"));
        assert_eq!(config.haproxy.mode, HaproxyMode::Managed);
        assert_eq!(config.haproxy.bind, "0.0.0.0:80".parse().unwrap());
        assert_eq!(config.haproxy.run_dir, PathBuf::from("/var/lib/weft"));
        assert_eq!(
            config.haproxy.master_socket,
            PathBuf::from("/var/lib/weft/master.sock")
        );
        assert_eq!(config.haproxy.hard_stop_after, Duration::from_secs(30));
        assert!(config.allowed.contains("10.2.1.5".parse().unwrap()));
        assert_eq!(
            config.sources.file.unwrap().path,
            PathBuf::from("/etc/weft/services.toml")
        );
    }

    /// A duration so long that a deadline computed from it would overflow (and panic) is a
    /// config error, for every key that takes one.
    #[test]
    fn the_pool_is_bounded_and_the_old_slots_key_refused_with_what_replaced_it() {
        let text = "[haproxy]\nserver_slots = 8\nspare_backends = 20000\nspare_slots = 0\n";
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        let keys = keys_of(&issues);
        for key in [
            "haproxy.server_slots",
            "haproxy.spare_backends",
            "haproxy.spare_slots",
        ] {
            assert!(keys.contains(&key), "{key} not in {issues:?}");
        }
        assert!(
            issues.iter().any(|i| i.message.contains("spare_backends")),
            "{issues:?}"
        );
        let text = "[haproxy]\nspare_backends = 0\n[sources.file]\npath = \"s.toml\"\n";
        let config = Config::parse(text, Path::new("/")).unwrap();
        assert_eq!(config.haproxy.pool().spares, 0);
    }

    #[test]
    fn durations_longer_than_a_year_are_refused() {
        let text = r#"
[haproxy]
hard_stop_after = "1000000000y"
[routing]
release_after = "2y"
[sources.consul]
url = "http://127.0.0.1:8500"
resync = "500000000y"
"#;
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        let keys = keys_of(&issues);
        for key in [
            "haproxy.hard_stop_after",
            "routing.release_after",
            "sources.consul.resync",
        ] {
            assert!(keys.contains(&key), "{key} not in {issues:?}");
        }
        assert!(
            issues
                .iter()
                .all(|i| i.message.contains("longer than a year")),
            "{issues:?}"
        );
    }

    #[test]
    fn all_errors_at_once_with_key_paths() {
        let text = r#"
[haproxy]
bind = "nowhere"
binary = "haproxy"
mode = "sideways"
hard_stop_after = "soon"

[network]
allowed = ["10.2.0.0/16", "10.2.0.0/33", "bogus"]

[sources.file]
debounce = "1s"

[stauts]
listen = "x"

[status]
listen = "nowhere"
"#;
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        let keys = keys_of(&issues);
        assert_eq!(
            keys,
            [
                "stauts",
                "haproxy.binary",
                "haproxy.mode",
                "haproxy.bind",
                "haproxy.hard_stop_after",
                "network.allowed[1]",
                "network.allowed[2]",
                "sources.file.path",
                "status.listen",
            ]
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = "[haproxy]\nbnd = \"0.0.0.0:80\"\n[network]\nallowed = 3\n";
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        assert_eq!(issues[0].key, "haproxy.bnd");
        assert!(
            issues[0].message.contains("unknown field `bnd`"),
            "{:?}",
            issues[0]
        );
        assert_eq!(issues[1].key, "network.allowed");
    }

    /// A bad key hides neither the section's other bad keys nor its good ones, also nested.
    #[test]
    fn each_bad_key_is_reported_at_its_own_path() {
        let text = r#"
[haproxy]
bnd = "0.0.0.0:80"
max_reloads = "many"
bind = "nowhere"

[sources.consul]
wiat = "5m"
wait = "soon"
stale = "yes"

[sources.marathon]
urls = "http://m:8080"

[sources.file]
path = "s.toml"
x = {}

[sources.consul.sub]
y = 1

[status]
listen = { a = 1 }
"#;
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        let keys = keys_of(&issues);
        assert_eq!(
            keys,
            [
                "haproxy.bnd",
                "haproxy.max_reloads",
                "sources.consul.stale",
                "sources.consul.sub",
                "sources.consul.wiat",
                "sources.file.x",
                "sources.marathon.urls",
                "status.listen",
                "haproxy.bind",
                "sources.consul.wait",
            ]
        );
        assert_eq!(
            issues[1].message,
            "invalid type: string \"many\", expected u32"
        );
    }

    #[test]
    fn credentials_in_source_urls_are_refused_with_their_key() {
        let text = r#"
[sources.consul]
url = "http://weft:hunter2@consul:8500"
[sources.marathon]
urls = ["http://m1:8080", "http://u:s3cret@m2:8080", "https://m3:8443/?access_token=abc123"]
"#;
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        assert_eq!(
            keys_of(&issues),
            [
                "sources.consul.url",
                "sources.marathon.urls[1]",
                "sources.marathon.urls[2]",
            ]
        );
        let messages: Vec<&str> = issues.iter().map(|i| i.message.as_str()).collect();
        assert!(messages[0].contains("sources.consul.token_file"));
        assert!(
            messages[1].contains("credentials in the URL"),
            "{messages:?}"
        );
        assert!(messages[1].contains("sources.marathon.credentials_file"));
        assert!(messages[1].contains("sources.marathon.token_file"));
        assert!(messages[2].contains("access_token="), "{messages:?}");
        for message in messages {
            for secret in ["hunter2", "s3cret", "abc123", "weft:"] {
                assert!(!message.contains(secret), "{message}");
            }
        }
        // A user name alone is a credential too.
        let issues = Config::parse(
            "[sources.consul]\nurl = \"http://weft@consul:8500\"\n",
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(keys_of(&issues), ["sources.consul.url"]);
        // An unparseable URL is not echoed with its credentials either.
        let issues = Config::parse(
            "[sources.consul]\nurl = \"http://u:pw@[bad:8500\"\n",
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(keys_of(&issues), ["sources.consul.url"]);
        assert!(!issues[0].message.contains("pw"), "{}", issues[0].message);
    }

    #[test]
    fn external_mode_needs_the_socket_and_the_file() {
        let text = "[haproxy]\nmode = \"external\"\n[sources.file]\npath = \"s.toml\"\n";
        let issues = Config::parse(text, Path::new("/")).unwrap_err();
        let keys = keys_of(&issues);
        assert_eq!(keys, ["haproxy.master_socket", "haproxy.config_file"]);
    }

    /// `[haproxy]` with `keys` (TOML lines) and a file source.
    fn parse_haproxy(keys: &str) -> Result<HaproxyConfig, Vec<ConfigIssue>> {
        let text = format!("[haproxy]\n{keys}\n[sources.file]\npath = \"s.toml\"\n");
        Config::parse(&text, Path::new("/")).map(|c| c.haproxy)
    }

    #[test]
    fn maxconn_is_1_to_1000000_or_a_quarter_of_the_open_files_limit() {
        let maxconn = |keys: &str| parse_haproxy(keys).map(|h| h.maxconn);
        assert_eq!(maxconn(""), Ok(None));
        assert_eq!(maxconn("maxconn = 1"), Ok(Some(1)));
        assert_eq!(maxconn("maxconn = 1000000"), Ok(Some(1_000_000)));
        // Under 1024 (a shell's default), 20000 (this CI's), and systemd's 524288 and more.
        assert_eq!(auto_maxconn(1024), 246);
        assert_eq!(auto_maxconn(20_000), 4990);
        assert_eq!(auto_maxconn(524_288), 100_000);
        assert_eq!(auto_maxconn(u64::MAX), 100_000);
        assert_eq!(auto_maxconn(0), 1);
        for bad in ["maxconn = 0", "maxconn = 1000001"] {
            let issues = maxconn(bad).unwrap_err();
            assert_eq!(
                issues,
                [ConfigIssue {
                    key: "haproxy.maxconn".into(),
                    message: "must lie between 1 and 1000000".into(),
                }],
                "{bad}"
            );
        }
        // Resolved: managed, a quarter of the hard limit; external, the owner's choice.
        let resolved = |keys: &str| parse_haproxy(keys).unwrap().maxconn();
        assert!(resolved("").is_some_and(|m| (1..=AUTO_MAXCONN_CAP).contains(&m)));
        let external =
            "mode = \"external\"\nmaster_socket = \"/run/m.sock\"\nconfig_file = \"/etc/h.cfg\"";
        assert_eq!(resolved(external), None);
        assert_eq!(resolved(&format!("{external}\nmaxconn = 5")), Some(5));
        let issues = maxconn("maxconn = -1").unwrap_err();
        assert_eq!(keys_of(&issues), ["haproxy.maxconn"]);
    }

    #[test]
    fn the_access_log_takes_a_socket_path_or_a_udp_address() {
        let parse = |value: &str| parse_haproxy(&format!("log = {value:?}")).map(|h| h.log);
        assert_eq!(parse("/dev/log").unwrap().as_deref(), Some("/dev/log"));
        assert_eq!(
            parse("127.0.0.1:514").unwrap().as_deref(),
            Some("127.0.0.1:514")
        );
        for bad in [
            "/dev/log local7",
            "/dev/log\n  stats socket /x",
            "syslog",
            "127.0.0.1:0",
            "dev/log",
        ] {
            let issues = parse(bad).unwrap_err();
            assert_eq!(issues[0].key, "haproxy.log", "{bad:?}");
        }
    }

    /// `[network]` with `keys` (TOML lines) and a file source.
    fn parse_network(keys: &str) -> Result<Config, Vec<ConfigIssue>> {
        let text = format!("[network]\n{keys}\n[sources.file]\npath = \"s.toml\"\n");
        Config::parse(&text, Path::new("/"))
    }

    #[test]
    fn bridges_and_deny_entries() {
        let config = parse_network("").unwrap();
        assert_eq!(config.bridges, [BRIDGES]);
        assert!(config.deny.is_empty());
        let config = parse_network(
            "bridges = []\ndeny = [\"10.2.7.0/24\", \"10.2.3.4\", \":8500\", \"10.2.0.0/16:22\"]",
        )
        .unwrap();
        assert!(config.bridges.is_empty());
        let shown: Vec<String> = config.deny.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["10.2.7.0/24", "10.2.3.4", ":8500", "10.2.0.0/16:22"]
        );

        let issues = parse_network(
            "allowed = [\"10.2.0.0/16\", \"10.2.0.128/25\"]\n\
             bridges = [\"10.2.0.0/24\", \"nope\"]\n\
             deny = [\"10.2.7.1/24\", \":0\", \"\", \"::1\", \"10.2.3.4:22\"]",
        )
        .unwrap_err();
        assert_eq!(
            keys_of(&issues),
            [
                "network.bridges[1]",
                "network.allowed[1]",
                "network.deny[0]",
                "network.deny[1]",
                "network.deny[2]",
                "network.deny[3]",
            ]
        );
        assert!(issues[1]
            .message
            .contains("lies inside network.bridges (10.2.0.0/24)"));
        assert!(
            issues[2].message.contains("write 10.2.7.0/24"),
            "{:?}",
            issues[2]
        );
        assert!(issues[5].message.contains("IPv6"));
        let issues = parse_network("deny = \"10.2.3.4\"").unwrap_err();
        assert_eq!(keys_of(&issues), ["network.deny"]);
    }

    #[test]
    fn model_settings_refuse_this_host() {
        let config = parse_network("deny = [\":22\"]").unwrap();
        let settings = config.model_settings(["10.2.5.5".parse().unwrap()]);
        let why = |addr: &str| {
            settings
                .refused
                .refusal(addr.parse().unwrap())
                .map(|r| r.to_string())
                .unwrap_or_default()
        };
        assert!(why("10.2.5.5:8080").contains("this edge's own"));
        // bridge.mode ensure (the default): its configured address is this host's too.
        assert!(why("10.2.0.1:80").contains("this edge's own"));
        assert!(why("127.0.0.1:80").contains("where this edge listens"));
        assert!(why("127.0.0.1:9090").contains("where this edge listens"));
        assert!(why("10.2.1.5:22").contains("network.deny"));
        assert_eq!(why("10.2.1.5:80"), "");
    }

    #[test]
    fn trusted_proxies_proxy_protocol_and_tunnel_timeout() {
        let h = parse_haproxy(
            "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"fd00::/8\", \"10.0.0.0/8\"]\n\
             proxy_protocol = \"accept\"\ntunnel_timeout = \"2h\"",
        )
        .unwrap();
        let nets: Vec<String> = h.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]);
        assert_eq!(h.proxy_protocol, ProxyProtocol::Accept);
        assert_eq!(h.tunnel_timeout, Duration::from_secs(7200));

        let defaults = parse_haproxy("").unwrap();
        assert!(defaults.trusted_proxies.is_empty());
        assert_eq!(defaults.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(defaults.tunnel_timeout, DEFAULT_TUNNEL_TIMEOUT);

        let issues = parse_haproxy(
            "trusted_proxies = [\"10.0.0.1/8\", \"nope\"]\nproxy_protocol = \"yes\"\n\
             tunnel_timeout = \"10ms\"",
        )
        .unwrap_err();
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "haproxy.trusted_proxies[0]",
                "haproxy.trusted_proxies[1]",
                "haproxy.proxy_protocol",
                "haproxy.tunnel_timeout"
            ],
            "{issues:?}"
        );
        assert!(issues[0].message.contains("say 10.0.0.0/8 or 10.0.0.1"));
    }

    #[test]
    fn edge_ids_are_stable_and_differ_by_bind() {
        let a = parse_haproxy("bind = \"0.0.0.0:80\"").unwrap();
        let b = parse_haproxy("bind = \"127.0.0.1:8080\"").unwrap();
        assert_eq!(a.edge_id(), a.edge_id());
        assert_ne!(a.edge_id(), b.edge_id());
        assert_eq!(a.edge_id().len(), 16);
        assert!(a.edge_id().chars().all(|c| c.is_ascii_hexdigit()));
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// README's config reference lists real keys with the real defaults.
    #[test]
    fn readme_reference_matches_the_defaults() {
        let readme = include_str!("../../README.md");
        let start = readme.find("<!-- config-reference -->\n```toml\n").unwrap();
        let block = &readme[start..];
        let block = &block[block.find("```toml\n").unwrap() + 8..block.find("```\n<!--").unwrap()];
        let base = Path::new("/etc/weft");
        let documented = Config::parse(block, base).unwrap();
        let defaults = Config::parse(
            "[sources.file]\npath = \"services.toml\"\n[sources.consul]\n[sources.marathon]\n\
             [tls]\ncerts = \"certs\"\n",
            base,
        )
        .unwrap();
        assert_eq!(documented, defaults);
    }

    #[test]
    fn tls_takes_listen_and_a_required_certs_directory() {
        let base = Path::new("/etc/weft");
        let parse = |tls: &str| {
            Config::parse(
                &format!("[sources.file]\npath = \"s.toml\"\n[tls]\n{tls}"),
                base,
            )
        };
        let tls = parse("certs = \"certs\"\n").unwrap().haproxy.tls.unwrap();
        assert_eq!(tls.listen.to_string(), DEFAULT_TLS_LISTEN);
        assert_eq!(tls.certs, Path::new("/etc/weft/certs"));
        let issues = parse("listen = \"nope\"\ncrts = \"x\"\n").unwrap_err();
        assert_eq!(keys_of(&issues), ["tls.crts", "tls.listen", "tls.certs"]);
        let none = Config::parse("[sources.file]\npath = \"s.toml\"\n", base).unwrap();
        assert_eq!(none.haproxy.tls, None);
    }

    #[test]
    fn syntax_error_is_reported() {
        let issues = Config::parse("[haproxy\n", Path::new("/")).unwrap_err();
        assert_eq!(issues.len(), 1);
    }
}
