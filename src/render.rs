//! Render: the routing table as `haproxy.cfg` and its map files.
//!
//! A pure function of the table, the slots and the settings: the same input gives
//! byte-identical output, so "nothing changed" is a string comparison. From scratch (`render`,
//! as `weft render` does) every edge renders the same files; a running edge's slots also
//! depend on the changes it saw (which spare a new service took, which slot a server holds).
//!
//! Routing in HAProxy, in the order it is tried:
//! 1. `paths.map` (`map_beg`): `host/path/` -> backend, longest prefix first; the frontend
//!    looks up `host + path + "/"`, so `/api` matches `/api` and `/api/x` but not `/apix`;
//! 2. `hosts.map` (exact): `host` -> backend;
//! 3. `wildcards.map` (`map_end`): `.example.com` -> backend for `*.example.com`, longest first;
//! 4. `no_route`: 404.
//!
//! With `[tls]`, the same frontend has a second bind, `ssl crt-list certs.list alpn
//! h2,http/1.1`: the same rules, the same maps. `certs.list` names weft's own default
//! certificate first (what a client without SNI, or with a name no certificate covers, gets),
//! then each certificate of the table, whose SANs HAProxy serves by SNI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use askama::Template;

use crate::config::{HaproxyConfig, ProxyProtocol, DEFAULT_TUNNEL_TIMEOUT};
// Config owns the config file's name (its `haproxy.config_file` default is made of it). It is
// re-exported here, beside the other names of HAProxy's files.
pub use crate::config::CONFIG_FILE;
use crate::model::{CheckKind, HealthCheck, Hsts, Redirect, RoutingTable};
use crate::slots::{Declared, Pool, Slots, PARKED};

/// The names of HAProxy's files, in the one place every part of weft reads them from. The
/// map files the config refers to, by file name inside the map directory:
pub const HOSTS_MAP: &str = "hosts.map";
pub const PATHS_MAP: &str = "paths.map";
pub const WILDCARDS_MAP: &str = "wildcards.map";
/// With `[tls.acme]`: the pending HTTP-01 challenges, `/.well-known/acme-challenge/TOKEN` ->
/// key authorization (exact match on the whole path).
pub const CHALLENGES_MAP: &str = "acme-challenges.map";
/// In the run directory: the admin stats socket the config opens, and the server state that
/// a reload hands from the old worker to the new.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// HAProxy's Prometheus exporter's socket in run_dir: `http-request use-service
/// prometheus-exporter` on a frontend of its own that only weft (run_dir is private) reaches.
pub const PROMETHEUS_SOCKET: &str = "prometheus.sock";
pub const SERVER_STATE_FILE: &str = "server-state";
/// An empty server-state file in the format HAProxy writes: version line only. Without it
/// HAProxy warns that it cannot read the file.
pub const EMPTY_SERVER_STATE: &str = "1\n";
/// With `[tls]`, in the map directory: the crt-list of the TLS bind, weft's default
/// certificate, and the directory of the installed certificates (`certs/NAME.pem`).
pub const CRT_LIST: &str = "certs.list";
pub const DEFAULT_CERT: &str = "tls-default.pem";
pub const CERTS_DIR: &str = "certs";
/// ALPN offered on the TLS bind: HTTP/2 first.
pub const ALPN: &str = "h2,http/1.1";

/// The file name (relative to the map directory) of the installed certificate `name`.
pub fn cert_file(name: &str) -> String {
    format!("{CERTS_DIR}/{name}.pem")
}

/// The TLS bind, when `[tls]` is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    /// weft's own self-signed certificate and key (PEM), served to clients without SNI or
    /// with a name no certificate covers; it names no real host.
    pub default_cert: String,
    /// `[tls.acme]`: HTTP-01 challenges are answered from [`CHALLENGES_MAP`].
    pub acme: bool,
}

/// What the rendered files depend on besides the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderSettings {
    /// Where HAProxy listens for clients.
    pub bind: SocketAddr,
    /// What the binds expect from in front of them, and how long tunnels live.
    pub clients: ClientSettings,
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
    /// The spare backends each reload declares (see [`crate::slots`]).
    pub pool: Pool,
    /// Syslog target of the access log (`haproxy.log`), if any.
    pub log: Option<String>,
    /// This edge's name in the loop guard header, [`loop_header`] (hex digits).
    pub edge_id: String,
    /// Who HAProxy's workers become once started; `None`: they stay who started HAProxy.
    pub worker: Option<Worker>,
    /// The TLS bind; `None`: none.
    pub tls: Option<TlsSettings>,
}

/// What HAProxy's workers, which parse every request from the internet, give up at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// The uid and gid they switch to (`haproxy.user`'s).
    pub uid: u32,
    pub gid: u32,
    /// The empty directory they are chrooted into ([`JAIL_DIR`] in run_dir): a worker taken
    /// over through a flaw in HAProxy sees no file at all. `None` when the access log goes to
    /// a unix socket, whose path would be outside.
    pub jail: Option<PathBuf>,
}

/// The empty directory inside run_dir that HAProxy's workers are chrooted into.
pub const JAIL_DIR: &str = "empty";

/// What the frontend does with what arrives from in front of it (see [`HaproxyConfig`]'s
/// fields of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Peers whose `X-Forwarded-For/Proto/Port` are kept; from any other peer they are
    /// replaced by HAProxy's own.
    pub trusted_proxies: Vec<ipnetwork::IpNetwork>,
    /// `accept-proxy` on the binds.
    pub proxy_protocol: ProxyProtocol,
    /// `timeout tunnel`: the idle timeout of a WebSocket once upgraded.
    pub tunnel_timeout: Duration,
}

impl Default for ClientSettings {
    /// Nobody trusted, no PROXY protocol, weft's default tunnel timeout.
    fn default() -> Self {
        ClientSettings {
            trusted_proxies: Vec::new(),
            proxy_protocol: ProxyProtocol::Off,
            tunnel_timeout: DEFAULT_TUNNEL_TIMEOUT,
        }
    }
}

impl ClientSettings {
    fn new(haproxy: &HaproxyConfig) -> Self {
        ClientSettings {
            trusted_proxies: haproxy.trusted_proxies.clone(),
            proxy_protocol: haproxy.proxy_protocol,
            tunnel_timeout: haproxy.tunnel_timeout,
        }
    }

    /// What every client bind carries after its address (`accept-proxy`), with its leading
    /// space; the same for any bind the frontend gets.
    fn bind_options(&self) -> &'static str {
        match self.proxy_protocol {
            ProxyProtocol::Off => "",
            ProxyProtocol::Accept => " accept-proxy",
        }
    }

    /// The trusted proxies as an ACL's patterns, space-separated; `None` when there are none.
    fn trusted_patterns(&self) -> Option<String> {
        (!self.trusted_proxies.is_empty()).then(|| {
            self.trusted_proxies
                .iter()
                .map(|net| net.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
    }
}

/// A request passing this edge once more than this many times is in a loop (508).
pub const MAX_EDGE_PASSES: u32 = 3;

/// The header each pass through the edge `edge_id` adds to a request: `X-Weft-Via-<id>`.
pub fn loop_header(edge_id: &str) -> String {
    format!("X-Weft-Via-{edge_id}")
}

impl RenderSettings {
    /// Every TCP address the rendered config binds: the one frontend's (the admin socket is a
    /// unix socket). Whoever else listens there takes a share of HAProxy's connections.
    pub fn binds(&self) -> Vec<SocketAddr> {
        let mut binds = vec![self.bind];
        binds.extend(self.tls.as_ref().map(|tls| tls.listen));
        binds
    }

    /// The settings of `haproxy` for files installed in `run_dir` (maps and sockets there);
    /// `default_cert` is weft's default certificate for the TLS bind, if `[tls]` is set.
    pub fn new(haproxy: &HaproxyConfig, run_dir: &Path, default_cert: &str) -> RenderSettings {
        RenderSettings {
            bind: haproxy.bind,
            clients: ClientSettings::new(haproxy),
            run_dir: run_dir.to_path_buf(),
            map_dir: run_dir.to_path_buf(),
            hard_stop_after: haproxy.hard_stop_after,
            max_reloads: haproxy.max_reloads,
            maxconn: haproxy.maxconn(),
            pool: haproxy.pool(),
            log: haproxy.log.clone(),
            edge_id: haproxy.edge_id(),
            worker: haproxy.worker_ids().map(|(uid, gid)| Worker {
                uid,
                gid,
                jail: match &haproxy.log {
                    Some(log) if log.starts_with('/') => None,
                    _ => Some(run_dir.join(JAIL_DIR)),
                },
            }),
            tls: haproxy.tls.as_ref().map(|tls| TlsSettings {
                listen: tls.listen,
                default_cert: default_cert.to_string(),
                acme: tls.acme.is_some(),
            }),
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
    /// With `[tls.acme]`: the pending challenges' map.
    pub challenges_map: Option<String>,
    /// With `[tls]`: the crt-list and the certificates it names.
    pub tls: Option<RenderedTls>,
    /// Where each backend's section lies in `config`, in the order of the slots' backends it
    /// was rendered from: the next render copies the sections whose backend did not change
    /// (see [`rerender`]). Empty for files not rendered here.
    pub sections: Vec<Range<usize>>,
}

/// The TLS bind's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedTls {
    pub crt_list: String,
    pub default_cert: String,
    /// PEM of each certificate, by name (installed as [`cert_file`]).
    pub certs: BTreeMap<String, String>,
}

impl Rendered {
    /// `(file name, content)` of each file, relative to the map directory (the config: its
    /// own name), in the order they must be written: what a file names is in place before it
    /// (maps and certificates, the crt-list, the config last).
    pub fn files(&self) -> Vec<(String, &str)> {
        let mut files = vec![
            (HOSTS_MAP.to_string(), self.hosts_map.as_str()),
            (PATHS_MAP.to_string(), self.paths_map.as_str()),
            (WILDCARDS_MAP.to_string(), self.wildcards_map.as_str()),
        ];
        if let Some(challenges) = &self.challenges_map {
            files.push((CHALLENGES_MAP.to_string(), challenges.as_str()));
        }
        if let Some(tls) = &self.tls {
            files.push((DEFAULT_CERT.to_string(), tls.default_cert.as_str()));
            files.extend(
                tls.certs
                    .iter()
                    .map(|(name, pem)| (cert_file(name), pem.as_str())),
            );
            files.push((CRT_LIST.to_string(), tls.crt_list.as_str()));
        }
        files.push((CONFIG_FILE.to_string(), self.config.as_str()));
        files
    }
}

/// One backend's section of the config (`templates/backend.cfg`): a pure function of its name
/// and its [`Declared`] slots, so that a section whose backend did not change is copied from
/// the last render rather than rendered again.
#[derive(Template)]
#[template(path = "backend.cfg", escape = "none")]
struct BackendView<'a> {
    name: &'a str,
    balance: &'static str,
    check: Option<CheckView>,
    /// `(slot number, server address)`: the server `s<number>` (see
    /// [`crate::slots::slot_name`]); `None` is a free slot.
    servers: Vec<(usize, Option<ServerAddr>)>,
    parked: ServerAddr,
}

/// A server's address as the config writes it: `10.2.1.5:8080`, `[fd00::5]:8080`. An IPv4
/// address is written straight into the config, in pieces, its numbers by `itoa`: std's
/// `Display` goes through the formatting machinery for each of its four numbers and the port,
/// and a config holds one address for each slot of each backend (40,000 at 10,000 apps of
/// three tasks).
#[derive(Clone, Copy)]
struct ServerAddr(SocketAddr);

impl ServerAddr {
    fn write_to<W: std::fmt::Write + ?Sized>(&self, dest: &mut W) -> std::fmt::Result {
        match self.0 {
            SocketAddr::V4(v4) => {
                let mut digits = itoa::Buffer::new();
                let [a, b, c, d] = v4.ip().octets();
                for (number, after) in [(a, "."), (b, "."), (c, "."), (d, ":")] {
                    dest.write_str(digits.format(number))?;
                    dest.write_str(after)?;
                }
                dest.write_str(digits.format(v4.port()))
            }
            SocketAddr::V6(v6) => write!(dest, "{v6}"),
        }
    }
}

/// How askama writes it (`{{ addr }}`): without a `Formatter` in between.
impl askama::FastWritable for ServerAddr {
    fn write_into<W: std::fmt::Write + ?Sized>(
        &self,
        dest: &mut W,
        _: &dyn askama::Values,
    ) -> askama::Result<()> {
        Ok(self.write_to(dest)?)
    }
}

/// As `SocketAddr` displays it; with a width or a precision, by `SocketAddr` itself.
impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if f.width().is_some() || f.precision().is_some() {
            return std::fmt::Display::fmt(&self.0, f);
        }
        self.write_to(f)
    }
}

impl<'a> BackendView<'a> {
    fn new(name: &'a str, declared: &Declared) -> BackendView<'a> {
        BackendView {
            name,
            balance: declared.flavour.balance.as_str(),
            check: declared.flavour.check.as_ref().map(CheckView::new),
            servers: declared
                .slots
                .iter()
                .enumerate()
                .map(|(i, slot)| (i + 1, slot.map(ServerAddr)))
                .collect(),
            parked: ServerAddr(PARKED),
        }
    }
}

/// ACME HTTP-01 challenges are answered on plain HTTP: never redirected.
pub use crate::model::certs::ACME_CHALLENGE;
/// The `Strict-Transport-Security` value of a service with HSTS.
pub const HSTS_VALUE: &str = "max-age=31536000";

/// A backend's health check as the template writes it.
struct CheckView {
    /// `option httpchk GET <path>`; `None`: a TCP check.
    httpchk: Option<String>,
    interval: String,
    fall: u32,
    /// `timeout check`, if set.
    timeout: Option<String>,
}

impl CheckView {
    fn new(check: &HealthCheck) -> CheckView {
        CheckView {
            httpchk: match &check.kind {
                CheckKind::Http(path) => Some(path.to_string()),
                CheckKind::Tcp => None,
            },
            interval: haproxy_duration(check.interval),
            fall: check.fall,
            timeout: check.timeout.map(haproxy_duration),
        }
    }
}

#[derive(Template)]
#[template(path = "haproxy.cfg", escape = "none")]
struct ConfigTemplate<'a> {
    version: &'a str,
    bind: SocketAddr,
    bind_options: &'static str,
    trusted_proxies: Option<String>,
    tunnel_timeout: String,
    admin_socket: String,
    prometheus_socket: String,
    server_state: String,
    hosts_map: String,
    paths_map: String,
    wildcards_map: String,
    hard_stop_after: String,
    max_reloads: u32,
    maxconn: Option<u32>,
    worker: Option<Worker>,
    log: Option<&'a str>,
    loop_header: String,
    max_passes: u32,
    /// `(listen, crt-list path, ALPN)` of the TLS bind.
    tls: Option<(SocketAddr, String, &'static str)>,
    acme_challenge: &'static str,
    /// With `[tls.acme]`: the path of the challenges' map.
    challenges_map: Option<String>,
    hsts_value: &'static str,
    /// `:PORT` of the TLS bind in redirects, empty for 443.
    https_port: String,
}

/// Renders the config and the maps from scratch: every service on its own backend, servers
/// in sorted slots, the pool full.
pub fn render(table: &RoutingTable, settings: &RenderSettings) -> Result<Rendered, askama::Error> {
    let slots = Slots::assign(&Slots::default(), table, settings.pool);
    render_with(table, &slots, settings)
}

/// Renders the config and the maps with servers in the given slots.
pub fn render_with(
    table: &RoutingTable,
    slots: &Slots,
    settings: &RenderSettings,
) -> Result<Rendered, askama::Error> {
    render_sections(table, slots, settings, None)
}

/// [`render_with`], copying from `previous` (the slots and the files last rendered from them,
/// with the same settings but for the map directory) the section of every backend whose slots
/// did not change: a server moved at 10,000 services renders one section, not 10,000.
pub fn rerender(
    previous: (&Slots, &Rendered),
    table: &RoutingTable,
    slots: &Slots,
    settings: &RenderSettings,
) -> Result<Rendered, askama::Error> {
    render_sections(table, slots, settings, Some(previous))
}

/// A table with at least this many routes has its maps written beside its sections, at once.
const MAPS_APART: usize = 1000;
/// About the bytes of a backend's section (a first render's buffer is sized from it).
const SECTION_GUESS: usize = 200;

fn render_sections(
    table: &RoutingTable,
    slots: &Slots,
    settings: &RenderSettings,
    previous: Option<(&Slots, &Rendered)>,
) -> Result<Rendered, askama::Error> {
    let head = ConfigTemplate {
        version: env!("CARGO_PKG_VERSION"),
        bind: settings.bind,
        bind_options: settings.clients.bind_options(),
        trusted_proxies: settings.clients.trusted_patterns(),
        tunnel_timeout: haproxy_duration(settings.clients.tunnel_timeout),
        admin_socket: in_dir(&settings.run_dir, ADMIN_SOCKET),
        prometheus_socket: in_dir(&settings.run_dir, PROMETHEUS_SOCKET),
        server_state: in_dir(&settings.run_dir, SERVER_STATE_FILE),
        hosts_map: in_dir(&settings.map_dir, HOSTS_MAP),
        paths_map: in_dir(&settings.map_dir, PATHS_MAP),
        wildcards_map: in_dir(&settings.map_dir, WILDCARDS_MAP),
        hard_stop_after: haproxy_duration(settings.hard_stop_after),
        max_reloads: settings.max_reloads,
        maxconn: settings.maxconn,
        worker: settings.worker.clone(),
        log: settings.log.as_deref(),
        loop_header: loop_header(&settings.edge_id),
        max_passes: MAX_EDGE_PASSES,
        tls: settings
            .tls
            .as_ref()
            .map(|tls| (tls.listen, in_dir(&settings.map_dir, CRT_LIST), ALPN)),
        acme_challenge: ACME_CHALLENGE,
        challenges_map: settings
            .tls
            .as_ref()
            .filter(|tls| tls.acme)
            .map(|_| in_dir(&settings.map_dir, CHALLENGES_MAP)),
        hsts_value: HSTS_VALUE,
        https_port: match settings.tls.as_ref().map(|tls| tls.listen.port()) {
            None | Some(443) => String::new(),
            Some(port) => format!(":{port}"),
        },
    };
    // About the size of the last one: the sections are most of it.
    let mut config = String::with_capacity(
        previous.map_or(slots.backends.len() * SECTION_GUESS, |(_, r)| {
            r.config.len() + 4096
        }),
    );
    head.render_into(&mut config)?;
    // A large table's maps are written beside its sections, at once (rayon's pool).
    let (sections, (hosts_map, paths_map, wildcards_map)) = if table.routes.len() >= MAPS_APART {
        rayon::join(
            || render_backends(slots, previous, &mut config),
            || render_maps(table, slots),
        )
    } else {
        (
            render_backends(slots, previous, &mut config),
            render_maps(table, slots),
        )
    };
    let sections = sections?;
    let tls = settings
        .tls
        .as_ref()
        .map(|tls| render_tls(table, tls, &settings.map_dir));
    let challenges_map = settings.tls.as_ref().filter(|tls| tls.acme).map(|_| {
        let mut text = String::new();
        for (token, key) in &table.challenges {
            let _ = writeln!(text, "{ACME_CHALLENGE}{token} {key}");
        }
        text
    });
    Ok(Rendered {
        config,
        hosts_map,
        paths_map,
        wildcards_map,
        challenges_map,
        tls,
        sections,
    })
}

/// Appends every backend's section to `config`, copied from `previous` where the backend has
/// the same name and slots there, and returns where each one lies.
fn render_backends(
    slots: &Slots,
    previous: Option<(&Slots, &Rendered)>,
    config: &mut String,
) -> Result<Vec<Range<usize>>, askama::Error> {
    let count = slots.backends.len();
    if count < MAPS_APART {
        return render_some(slots.backends.iter(), previous, config);
    }
    // A large table's sections in two halves at once, the second into a text of its own that
    // is then appended.
    let half = count / 2;
    let room = config.capacity().saturating_sub(config.len()) / 2;
    let (first, second) = rayon::join(
        || render_some(slots.backends.iter().take(half), previous, config),
        || {
            let mut text = String::with_capacity(room);
            render_some(slots.backends.iter().skip(half), previous, &mut text)
                .map(|sections| (text, sections))
        },
    );
    let (mut sections, (text, second)) = (first?, second?);
    let base = config.len();
    config.push_str(&text);
    sections.extend(
        second
            .into_iter()
            .map(|span| span.start + base..span.end + base),
    );
    Ok(sections)
}

/// The sections of `backends` (in name order) appended to `config`; their spans in it.
fn render_some<'a>(
    backends: impl Iterator<Item = (&'a String, &'a Declared)>,
    previous: Option<(&Slots, &Rendered)>,
    config: &mut String,
) -> Result<Vec<Range<usize>>, askama::Error> {
    // The previous sections, in name order beside their backends (as they were rendered); a
    // rendered without sections (not rendered here) lends none.
    let mut before = previous
        .filter(|(slots, rendered)| slots.backends.len() == rendered.sections.len())
        .map(|(slots, rendered)| {
            let sections = slots.backends.iter().zip(rendered.sections.iter());
            (sections.peekable(), rendered.config.as_str())
        });
    let mut sections = Vec::with_capacity(backends.size_hint().0);
    for (name, declared) in backends {
        let start = config.len();
        let same = before.as_mut().and_then(|(old, text)| {
            while old.next_if(|((old, _), _)| *old < name).is_some() {}
            let ((_, _), span) = old.next_if(|((old, d), _)| *old == name && *d == declared)?;
            text.get(span.clone())
        });
        match same {
            Some(section) => config.push_str(section),
            None => BackendView::new(name, declared).render_into(config)?,
        }
        sections.push(start..config.len());
    }
    Ok(sections)
}

/// The crt-list (weft's default certificate first: HAProxy serves the first one to a client
/// whose SNI no certificate covers, and never lets it be removed at runtime) and the
/// certificates. No SNI filters: HAProxy takes each certificate's names from its SANs.
fn render_tls(table: &RoutingTable, tls: &TlsSettings, dir: &Path) -> RenderedTls {
    let mut crt_list = format!("{}\n", in_dir(dir, DEFAULT_CERT));
    for name in table.certificates.keys() {
        let _ = writeln!(crt_list, "{}", in_dir(dir, &cert_file(name)));
    }
    RenderedTls {
        crt_list,
        default_cert: tls.default_cert.clone(),
        certs: table
            .certificates
            .iter()
            .map(|(name, cert)| (name.clone(), cert.pem.clone()))
            .collect(),
    }
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
///
/// Each value is a [`RouteValue`]: the backend, the service (the access log names it, never a
/// spare's name) and the route's flags, so that a spare takes any service at runtime.
fn render_maps(table: &RoutingTable, slots: &Slots) -> (String, String, String) {
    // The hosts' map is most of the routes, already in order: written as it goes, with no
    // string per entry.
    let mut hosts = String::with_capacity(table.routes.len() * 48);
    let mut paths = Vec::new();
    let mut wildcards = Vec::new();
    for (key, service) in &table.routes {
        let Some(backend) = slots.backend_of(service) else {
            continue;
        };
        let https = table.backends.get(service).map(|b| {
            let redirect =
                matches!(&b.redirect, Redirect::Https(covered) if covered.contains(&key.host));
            (redirect, b.hsts == Hsts::On)
        });
        let (redirect, hsts) = https.unwrap_or_default();
        let value = RouteValue {
            backend,
            service: service.as_str(),
            redirect,
            hsts,
        };
        match (key.host.wildcard_suffix(), key.path.is_root()) {
            (Some(suffix), _) => wildcards.push((suffix.to_string(), value)),
            (None, true) => push_entry(&mut hosts, key.host.as_str(), &value),
            (None, false) => paths.push((format!("{}{}/", key.host, key.path), value)),
        }
    }
    let longest_first = |a: &(String, RouteValue), b: &(String, RouteValue)| {
        b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0))
    };
    paths.sort_by(longest_first);
    wildcards.sort_by(longest_first);
    (hosts, map_text(&paths), map_text(&wildcards))
}

/// A route's value in the maps: `BACKEND;SERVICE;FLAGS`, FLAGS holding `r` (plain HTTP is
/// redirected to HTTPS: the service asks for it and a certificate covers the host) and `h`
/// (HSTS on HTTPS answers). The frontend reads the fields with `field(N,;)`; no part can hold
/// a `;` (service names are `[a-z0-9._:-]`).
struct RouteValue<'a> {
    backend: &'a str,
    service: &'a str,
    redirect: bool,
    hsts: bool,
}

/// Appends the map line `KEY VALUE`.
fn push_entry(text: &mut String, key: &str, value: &RouteValue) {
    for part in [key, " ", value.backend, ";", value.service, ";"] {
        text.push_str(part);
    }
    if value.redirect {
        text.push('r');
    }
    if value.hsts {
        text.push('h');
    }
    text.push('\n');
}

fn map_text(entries: &[(String, RouteValue)]) -> String {
    let mut text = String::new();
    for (key, value) in entries {
        push_entry(&mut text, key, value);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_table, Balance, CheckDef, ServiceDef, ServiceName};

    #[test]
    fn a_server_address_is_written_as_std_writes_it() {
        for text in [
            "0.0.0.0:0",
            "10.2.1.5:8080",
            "10.20.100.255:9",
            "127.0.0.1:1",
            "255.255.255.255:65535",
            "[::1]:80",
            "[fd00::5]:8080",
            "[fe80::1%3]:80",
            "[::ffff:10.0.0.1]:65535",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(ServerAddr(addr).to_string(), text);
            assert_eq!(ServerAddr(addr).to_string(), addr.to_string());
            let mut written = String::new();
            askama::FastWritable::write_into(&ServerAddr(addr), &mut written, askama::NO_VALUES)
                .unwrap();
            assert_eq!(written, text);
            assert_eq!(format!("{:>30}", ServerAddr(addr)), format!("{addr:>30}"));
        }
    }

    fn settings() -> RenderSettings {
        RenderSettings {
            bind: "0.0.0.0:80".parse().unwrap(),
            clients: ClientSettings::default(),
            run_dir: "/var/lib/weft".into(),
            map_dir: "/var/lib/weft".into(),
            hard_stop_after: Duration::from_secs(30),
            max_reloads: 50,
            maxconn: Some(100_000),
            pool: Pool {
                spares: 2,
                spare_slots: 4,
            },
            log: None,
            edge_id: "0123456789abcdef".into(),
            worker: None,
            tls: None,
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
        shop.check = Some(CheckDef::Http("/health".into()));
        shop.check_timeout = Some("5s".into());
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
        let mut wild = svc(
            "tenants",
            &["*.tenants.example.com"],
            None,
            &["10.2.1.20:80"],
        );
        // A Marathon TCP check: no httpchk, marathon-lb's fall.
        wild.check = Some(CheckDef::Tcp);
        wild.check_fall = Some(4);
        let empty = svc("scaled-down", &["down.example.com"], None, &[]);
        table(vec![shop, api, v2, wild, empty])
    }

    #[test]
    fn golden_config_and_maps() {
        let with_log = RenderSettings {
            log: Some("/dev/log".into()),
            maxconn: Some(2000),
            clients: behind_a_load_balancer(),
            ..settings()
        };
        let rendered = render(&sample(), &with_log).unwrap();
        golden("sample.haproxy.cfg", &rendered.config);
        golden("sample.hosts.map", &rendered.hosts_map);
        golden("sample.paths.map", &rendered.paths_map);
        golden("sample.wildcards.map", &rendered.wildcards_map);
    }

    /// An edge behind a load balancer that speaks the PROXY protocol and sets X-Forwarded-*.
    fn behind_a_load_balancer() -> ClientSettings {
        ClientSettings {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            proxy_protocol: ProxyProtocol::Accept,
            tunnel_timeout: Duration::from_secs(7200),
        }
    }

    #[test]
    fn forwarded_headers_are_replaced_unless_from_a_trusted_proxy() {
        let plain = render(&sample(), &settings()).unwrap().config;
        assert!(plain.contains("\n    http-request del-header X-Forwarded-For\n"));
        assert!(plain.contains("\n    option forwardfor\n"));
        assert!(plain.contains("\n    timeout tunnel 3600s\n"));
        assert!(!plain.contains("acl trusted_proxy"));
        assert!(plain.contains("\n    bind 0.0.0.0:80\n"));
        let behind = RenderSettings {
            clients: behind_a_load_balancer(),
            ..settings()
        };
        let config = render(&sample(), &behind).unwrap().config;
        assert!(config.contains("\n    acl trusted_proxy src 10.0.0.0/8 fd00::/8\n"));
        assert!(config.contains("del-header X-Forwarded-For unless trusted_proxy\n"));
        assert!(config.contains("\n    bind 0.0.0.0:80 accept-proxy\n"));
        assert!(config.contains("\n    timeout tunnel 7200s\n"));
    }

    /// HAProxy itself accepts both forms of the forwarded headers' rules.
    #[test]
    fn haproxy_accepts_the_forwarded_rules() {
        let haproxy = Path::new("/usr/sbin/haproxy");
        assert!(
            haproxy.exists(),
            "/usr/sbin/haproxy is missing: apt-get install haproxy"
        );
        for clients in [ClientSettings::default(), behind_a_load_balancer()] {
            let dir = tempfile::tempdir().unwrap();
            let settings = RenderSettings {
                bind: "127.0.0.1:1".parse().unwrap(),
                run_dir: dir.path().into(),
                map_dir: dir.path().into(),
                clients,
                ..settings()
            };
            let rendered = render(&sample(), &settings).unwrap();
            for (name, text) in rendered.files() {
                std::fs::write(dir.path().join(name), text).unwrap();
            }
            std::fs::write(dir.path().join(SERVER_STATE_FILE), EMPTY_SERVER_STATE).unwrap();
            let out = std::process::Command::new(haproxy)
                .arg("-c")
                .arg("-f")
                .arg(dir.path().join(CONFIG_FILE))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "haproxy -c: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
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
            "shop.example.com/api/v2/ be_shop-api-v2;shop-api-v2;\nshop.example.com/api/ be_shop-api;shop-api;\n"
        );
    }

    #[test]
    fn golden_tls_bind_and_crt_list() {
        let mut table = sample();
        for name in ["shop", "api"] {
            table.certificates.insert(
                name.into(),
                crate::model::certs::Certificate {
                    name: name.into(),
                    sans: vec![format!("{name}.example.com")],
                    not_after: 1_800_000_000,
                    serial: "01".into(),
                    pem: format!("PEM of {name}\n"),
                },
            );
        }
        let with_tls = RenderSettings {
            tls: Some(TlsSettings {
                listen: "0.0.0.0:443".parse().unwrap(),
                default_cert: "DEFAULT\n".into(),
                acme: false,
            }),
            ..settings()
        };
        let rendered = render(&table, &with_tls).unwrap();
        assert_eq!(rendered.challenges_map, None);
        assert!(!rendered.config.contains("acme-challenges.map"));
        golden("tls.haproxy.cfg", &rendered.config);
        let tls = rendered.tls.as_ref().unwrap();
        assert_eq!(
            tls.crt_list,
            "/var/lib/weft/tls-default.pem\n/var/lib/weft/certs/api.pem\n/var/lib/weft/certs/shop.pem\n"
        );
        let names: Vec<String> = rendered.files().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "hosts.map",
                "paths.map",
                "wildcards.map",
                "tls-default.pem",
                "certs/api.pem",
                "certs/shop.pem",
                "certs.list",
                "haproxy.cfg"
            ]
        );
        // Without [tls], nothing of it.
        let plain = render(&table, &settings()).unwrap();
        assert!(plain.tls.is_none() && !plain.config.contains("ssl crt-list"));
        assert_eq!(with_tls.binds().len(), 2);
    }

    #[test]
    fn golden_redirect_and_hsts() {
        let mut shop = svc(
            "shop",
            &["shop.example.com", "*.t.example.com", "plain.example.com"],
            None,
            &["10.2.1.5:8080"],
        );
        shop.redirect = Some("https".into());
        shop.hsts = Some(true);
        let report = crate::model::SourceReport {
            services: vec![std::sync::Arc::new(shop)],
            health: crate::model::Health::Ok,
            ..crate::model::SourceReport::starting(crate::model::SourceId::File)
        };
        let tls = crate::model::tests::tls_report(&["shop.example.com", "*.t.example.com"]);
        let settings =
            crate::model::ModelSettings::new(crate::network::AllowedNetworks::new(["10.2.0.0/16"
                .parse()
                .unwrap()]));
        let built = crate::model::build(&[&report, &tls], &settings, &Default::default());
        let rendered = render(&built.table, &self::tests::settings()).unwrap();
        golden("redirect.haproxy.cfg", &rendered.config);
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

    /// With `[tls.acme]`, pending challenges are a map the frontend answers from on plain
    /// HTTP, before any routing.
    #[test]
    fn acme_challenges_are_answered_from_their_map() {
        let mut table = sample();
        table
            .challenges
            .insert("tok-EN_1".into(), "tok-EN_1.thumb_print".into());
        let with_acme = RenderSettings {
            tls: Some(TlsSettings {
                listen: "0.0.0.0:443".parse().unwrap(),
                default_cert: "DEFAULT\n".into(),
                acme: true,
            }),
            ..settings()
        };
        let rendered = render(&table, &with_acme).unwrap();
        assert_eq!(
            rendered.challenges_map.as_deref(),
            Some("/.well-known/acme-challenge/tok-EN_1 tok-EN_1.thumb_print\n")
        );
        let rule = rendered
            .config
            .lines()
            .find(|line| line.contains("acme-challenges.map"))
            .expect("the challenge rule");
        assert!(rule.contains("if !{ ssl_fc } { path_beg /.well-known/acme-challenge/ }"));
        let files = rendered.files();
        assert!(files.iter().any(|(name, _)| name == CHALLENGES_MAP));
        // The rule comes before the routes are looked up.
        let at = |needle: &str| rendered.config.find(needle).unwrap();
        assert!(at("acme-challenges.map") < at("set-var(txn.route)"));
    }

    /// A render that copies the unchanged backends' sections from the last one is the render
    /// from scratch, byte for byte, through moves, new and removed services, another flavour,
    /// a pack for a reload and another map directory (staging).
    #[test]
    fn a_rerender_is_the_render_from_scratch() {
        let mut moved = sample();
        let shop = ServiceName::parse("shop").unwrap();
        let backend = moved.backends.get_mut(&shop).unwrap();
        backend.servers = ["10.2.2.8:8080".parse().unwrap()].into();
        let mut more = moved.clone();
        let extra = table(vec![svc(
            "new",
            &["new.example.com"],
            None,
            &["10.2.9.9:80"],
        )]);
        more.backends.extend(extra.backends);
        more.routes.extend(extra.routes);
        let mut flavoured = more.clone();
        let api = ServiceName::parse("shop-api").unwrap();
        flavoured.backends.get_mut(&api).unwrap().balance = Balance::default();
        let mut fewer = flavoured.clone();
        fewer.backends.remove(&shop);
        fewer.routes.retain(|_, service| *service != shop);

        let live = settings();
        let staging = RenderSettings {
            map_dir: PathBuf::from("/run/weft/staging"),
            ..settings()
        };
        let mut slots = Slots::assign(&Slots::default(), &sample(), live.pool);
        let mut rendered = render_with(&sample(), &slots, &live).unwrap();
        assert_eq!(rendered.sections.len(), slots.backends.len());
        for next in [&moved, &more, &flavoured, &fewer, &sample()] {
            for packed in [false, true] {
                let next_slots = match packed {
                    false => Slots::assign(&slots, next, live.pool),
                    true => Slots::pack(&slots, next, live.pool),
                };
                let again = rerender((&slots, &rendered), next, &next_slots, &live).unwrap();
                assert_eq!(again, render_with(next, &next_slots, &live).unwrap());
                let staged = rerender((&next_slots, &again), next, &next_slots, &staging);
                assert_eq!(
                    staged.unwrap(),
                    render_with(next, &next_slots, &staging).unwrap()
                );
                (slots, rendered) = (next_slots, again);
            }
        }
        // Files without sections (not rendered here) lend none.
        let bare = Rendered {
            sections: Vec::new(),
            ..rendered.clone()
        };
        let again = rerender((&slots, &bare), &moved, &slots, &live).unwrap();
        assert_eq!(again, render_with(&moved, &slots, &live).unwrap());
    }

    /// A large table's sections are rendered in two halves at once: the text is the one a
    /// single pass gives, each span is its own backend's, and a rerender after a move (in the
    /// second half) copies the rest and equals a full render.
    #[test]
    fn a_large_tables_sections_in_halves_are_one_pass_text() {
        let services: Vec<ServiceDef> = (0..1500)
            .map(|i| {
                let host = format!("s{i}.example.com");
                let server = format!("10.2.{}.{}:80", i / 200 + 1, i % 200 + 2);
                svc(&format!("s{i}"), &[&host], None, &[&server])
            })
            .collect();
        let big = table(services);
        let live = settings();
        let slots = Slots::assign(&Slots::default(), &big, live.pool);
        assert!(slots.backends.len() >= MAPS_APART);
        let rendered = render_with(&big, &slots, &live).unwrap();
        let mut one_pass = String::new();
        render_some(slots.backends.iter(), None, &mut one_pass).unwrap();
        let (start, end) = (
            rendered.sections[0].start,
            rendered.sections.last().unwrap().end,
        );
        assert_eq!(&rendered.config[start..end], one_pass);
        assert_eq!(end, rendered.config.len());
        for ((name, _), span) in slots.backends.iter().zip(&rendered.sections) {
            assert!(rendered.config[span.clone()].starts_with(&format!("\nbackend {name}\n")));
        }
        let mut moved = big.clone();
        let last = ServiceName::parse("s999").unwrap();
        moved.backends.get_mut(&last).unwrap().servers = ["10.2.9.9:80".parse().unwrap()].into();
        let next = Slots::assign(&slots, &moved, live.pool);
        let again = rerender((&slots, &rendered), &moved, &next, &live).unwrap();
        assert_eq!(again, render_with(&moved, &next, &live).unwrap());
    }
}
