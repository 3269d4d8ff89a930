//! `[tls]`: HTTPS on a second bind of the one frontend, certificates from a watched directory;
//! `[tls.acme]`: certificates ordered from an ACME CA for the routed hosts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{absolute, duration, duration_at_least, haproxy_bind, kv_folder, Issues};

pub const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:443";
/// Default `tls.acme.renew_before`: Let's Encrypt's certificates live 90 days; renewal starts
/// with a third of that left, as Let's Encrypt advises.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default `tls.acme.prefix`: the Consul KV folder of the ACME state.
pub const DEFAULT_ACME_PREFIX: &str = "weft/acme";
/// Default `tls.acme.max_orders`: orders in flight at once, per edge.
pub const DEFAULT_MAX_ORDERS: usize = 4;
/// The most orders in flight `tls.acme.max_orders` allows.
pub const MAX_ORDERS: usize = 32;
/// Default `tls.acme.max_hosts`: the routed hosts that get ACME certificates, at most.
pub const DEFAULT_MAX_HOSTS: usize = 1000;
/// The most `tls.acme.max_hosts` allows: a certificate, its chain and key take about 5 KB in
/// the store, which every edge reads whole at each change (Consul answers at most 64 MiB).
pub const MAX_HOSTS: usize = 5000;
/// Default `tls.acme.collect_after`: how long an edge leaves the entries of a host it no
/// longer routes before deleting them from the store.
pub const DEFAULT_COLLECT_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The least `tls.acme.collect_after` with the Consul store.
pub const MIN_SHARED_COLLECT_AFTER: Duration = Duration::from_secs(600);
/// The most suffixes `tls.acme.hosts` takes.
pub const MAX_ACME_SUFFIXES: usize = 256;
/// The Consul connections the ACME state takes out of `sources.consul.max_connections`: one
/// blocking watch of its folder, one write.
pub const ACME_CONNECTIONS: usize = 2;

/// `[tls]`. Absent: no TLS bind at all.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    /// Where HAProxy listens for TLS clients. Default `0.0.0.0:443`.
    listen: Option<String>,
    /// A directory of PEM files, each one certificate, its chain and its key (as HAProxy reads
    /// them); relative paths are relative to weft.toml's directory. Required.
    certs: Option<PathBuf>,
    /// `[tls.acme]`.
    acme: Option<RawAcme>,
}

/// `[tls.acme]`: key names operators script against; keep them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    /// The ACME directory URL (https). Required.
    directory: Option<String>,
    /// The account's contact address. Required.
    email: Option<String>,
    /// Hostname suffixes whose routed hosts get certificates (`.example.com`, or a whole name).
    hosts: Option<Vec<String>>,
    /// A PEM root to trust for the directory's own HTTPS (a test CA). Optional.
    ca_file: Option<PathBuf>,
    /// How long before a certificate's expiry its renewal starts. Default `30d`.
    renew_before: Option<String>,
    /// Where the ACME state lives: `consul` (KV, shared by every edge; the default with the
    /// Consul source) or `local` (`<run_dir>/acme/`).
    store: Option<String>,
    /// Consul KV folder of the ACME state. Default `weft/acme`.
    prefix: Option<String>,
    /// Orders in flight at once on this edge. Default 4.
    max_orders: Option<usize>,
    /// The routed hosts that get certificates, at most (those holding one first). Default 1000.
    max_hosts: Option<usize>,
    /// How long the entries of a host no longer routed stay in the store. Default `24h`.
    collect_after: Option<String>,
    /// Whether a service's tag or label (`weft.acme=true`, `HAPROXY_n_ACME`, `acme = true`)
    /// may ask certificates for its hosts beyond `hosts`. Default `false`.
    opt_in: Option<bool>,
    /// How long an edge that placed an order may go silent before another edge takes it over
    /// (its Consul session's TTL). Default `15s`.
    lock_ttl: Option<String>,
    /// After a failed order, how long a host waits before the next (doubled each time, to 24 h).
    /// Default `5m`.
    retry_after: Option<String>,
}

/// Where the ACME state is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeStore {
    /// `<run_dir>/acme/`: this edge's alone.
    Local,
    /// Consul's KV under `prefix`, shared by every edge, locks by sessions.
    Consul { prefix: String },
}

/// `[tls.acme]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub directory: reqwest::Url,
    pub email: String,
    /// Lowercase suffixes: `.example.com` matches its subdomains, `example.com` that name alone.
    pub hosts: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub renew_before: Duration,
    pub store: AcmeStore,
    pub max_orders: usize,
    pub max_hosts: usize,
    pub collect_after: Duration,
    pub opt_in: bool,
    pub lock_ttl: Duration,
    pub retry_after: Duration,
}

impl AcmeConfig {
    /// Whether `host` is one the operator asked certificates for.
    pub fn wants(&self, host: &str) -> bool {
        self.hosts
            .iter()
            .any(|suffix| match suffix.strip_prefix('.') {
                Some(_) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
                None => host == suffix,
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// The watched certificate directory, absolute.
    pub certs: PathBuf,
    pub acme: Option<AcmeConfig>,
}

/// `None` when `[tls]` is absent (`raw` is `None`). `consul_connections`: the Consul source's
/// `max_connections`, when it is configured.
pub(super) fn validate_tls(
    raw: Option<RawTls>,
    base: &Path,
    consul_connections: Option<usize>,
    issues: &mut Issues,
) -> Option<TlsConfig> {
    let raw = raw?;
    let listen = haproxy_bind(raw.listen, DEFAULT_TLS_LISTEN, "tls.listen", issues);
    let acme = raw
        .acme
        .and_then(|acme| validate_acme(acme, base, consul_connections, issues));
    let Some(certs) = raw.certs else {
        issues.add("tls.certs", "is required when [tls] is present");
        return None;
    };
    Some(TlsConfig {
        listen,
        certs: absolute(certs, base),
        acme,
    })
}

fn validate_acme(
    raw: RawAcme,
    base: &Path,
    consul_connections: Option<usize>,
    issues: &mut Issues,
) -> Option<AcmeConfig> {
    let directory = match raw.directory.as_deref().map(reqwest::Url::parse) {
        None => {
            issues.add("tls.acme.directory", "is required in [tls.acme]");
            None
        }
        Some(Ok(url))
            if url.scheme() == "https"
                && url.has_host()
                && url.password().is_none()
                && url.username().is_empty() =>
        {
            Some(url)
        }
        Some(_) => {
            issues.add(
                "tls.acme.directory",
                "is not an https URL without credentials, like \"https://acme-v02.api.letsencrypt.org/directory\"",
            );
            None
        }
    };
    let email = match raw.email {
        Some(email) if valid_email(&email) => Some(email),
        Some(email) => {
            issues.add(
                "tls.acme.email",
                format!("{email:?} is not an address like \"ops@example.com\""),
            );
            None
        }
        None => {
            issues.add("tls.acme.email", "is required in [tls.acme]");
            None
        }
    };
    let mut hosts = Vec::new();
    let raw_hosts = raw.hosts.unwrap_or_default();
    if raw_hosts.len() > MAX_ACME_SUFFIXES {
        issues.add(
            "tls.acme.hosts",
            format!(
                "holds {} suffixes; at most {MAX_ACME_SUFFIXES}",
                raw_hosts.len()
            ),
        );
    }
    for suffix in raw_hosts.into_iter().take(MAX_ACME_SUFFIXES) {
        let lower = suffix.to_ascii_lowercase();
        let name = lower.strip_prefix('.').unwrap_or(&lower);
        if crate::model::Hostname::parse(name).is_err() || name.starts_with("*.") {
            issues.add(
                "tls.acme.hosts",
                format!("{suffix:?} is not a hostname or a suffix like \".example.com\""),
            );
        } else {
            hosts.push(lower);
        }
    }
    let renew_before = duration(
        raw.renew_before,
        DEFAULT_RENEW_BEFORE,
        "tls.acme.renew_before",
        issues,
    );
    let lock_ttl = duration_at_least(
        raw.lock_ttl,
        Duration::from_secs(15),
        Duration::from_secs(10),
        "tls.acme.lock_ttl",
        " (Consul's shortest session TTL)",
        issues,
    );
    let retry_after = duration_at_least(
        raw.retry_after,
        Duration::from_secs(300),
        Duration::from_secs(1),
        "tls.acme.retry_after",
        "",
        issues,
    );
    let max_orders = match raw.max_orders {
        None => DEFAULT_MAX_ORDERS,
        Some(n @ 1..=MAX_ORDERS) => n,
        Some(n) => {
            issues.add(
                "tls.acme.max_orders",
                format!("{n} is not between 1 and {MAX_ORDERS}"),
            );
            DEFAULT_MAX_ORDERS
        }
    };
    let max_hosts = match raw.max_hosts {
        None => DEFAULT_MAX_HOSTS,
        Some(n @ 1..=MAX_HOSTS) => n,
        Some(n) => {
            issues.add(
                "tls.acme.max_hosts",
                format!("{n} is not between 1 and {MAX_HOSTS}"),
            );
            DEFAULT_MAX_HOSTS
        }
    };
    let collect_after = duration_at_least(
        raw.collect_after,
        DEFAULT_COLLECT_AFTER,
        Duration::from_secs(10),
        "tls.acme.collect_after",
        "",
        issues,
    );
    let prefix = kv_folder(raw.prefix, DEFAULT_ACME_PREFIX, "tls.acme.prefix", issues);
    let store = match (raw.store.as_deref(), consul_connections) {
        (None, Some(_)) | (Some("consul"), Some(_)) => AcmeStore::Consul { prefix },
        (None | Some("local"), _) => AcmeStore::Local,
        (Some("consul"), None) => {
            issues.add(
                "tls.acme.store",
                "\"consul\" needs the Consul source ([sources.consul])",
            );
            AcmeStore::Local
        }
        (Some(other), _) => {
            issues.add(
                "tls.acme.store",
                format!("{other:?} is neither \"consul\" nor \"local\""),
            );
            AcmeStore::Local
        }
    };
    // Shared by several edges, a host is collected only once no edge alive lists it: the lists
    // are written every minute, and a session lost takes up to twice `lock_ttl` to go.
    if matches!(store, AcmeStore::Consul { .. }) && collect_after < MIN_SHARED_COLLECT_AFTER {
        issues.add(
            "tls.acme.collect_after",
            format!(
                "is at least {} with the Consul store (the edges' lists are written every minute)",
                humantime::format_duration(MIN_SHARED_COLLECT_AFTER)
            ),
        );
    }
    Some(AcmeConfig {
        directory: directory?,
        email: email?,
        hosts,
        ca_file: raw.ca_file.map(|path| absolute(path, base)),
        renew_before,
        store,
        max_orders,
        max_hosts,
        collect_after,
        opt_in: raw.opt_in.unwrap_or(false),
        lock_ttl,
        retry_after,
    })
}

/// An address an ACME CA accepts as a `mailto:` contact: one `@`, a dotted domain, nothing that
/// would need escaping in a URL.
fn valid_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    text.len() <= 254
        && !local.is_empty()
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c))
        && domain.contains('.')
        && crate::model::Hostname::parse(domain).is_ok()
}
