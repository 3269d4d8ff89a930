//! `[sources.*]`: each source's keys, defaults and validation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{absolute, duration, duration_at_least, Issues};

pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// `[sources]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSources {
    file: Option<RawFileSource>,
    consul: Option<RawConsulSource>,
    marathon: Option<RawMarathonSource>,
}

/// `[sources.marathon]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMarathonSource {
    /// Marathon's API, one URL per master, tried in order (the last one that answered first).
    /// Default `["http://127.0.0.1:8080"]`.
    urls: Option<Vec<String>>,
    /// The `HAPROXY_GROUP` an app must carry to be routed; `*`: every app. Default `external`.
    group: Option<String>,
    /// File holding `user:password` for HTTP basic auth. Default: none.
    credentials_file: Option<PathBuf>,
    /// File holding a token, sent as `Authorization: token=<token>` (DC/OS). Default: none.
    token_file: Option<PathBuf>,
    /// Event types weft subscribes to. Default: marathon-lb's `status_update_event`,
    /// `health_status_changed_event`, `api_post_event`, and `app_terminated_event`.
    event_types: Option<Vec<String>>,
    /// Full refetch as a safety net for missed events. Default `5m`.
    resync: Option<String>,
    /// Full fetches are at least this far apart (the first is not delayed). Default `5s`.
    full_fetch_interval: Option<String>,
    /// An event stream silent this long is reconnected (and the state refetched). Default
    /// `60s`.
    read_timeout: Option<String>,
    /// Timeout of one `/v2/apps` or `/v2/apps/{id}` request. Default `30s`.
    request_timeout: Option<String>,
    /// `deny` (default): route only to a task's weave IP and container port; `allow`: tasks
    /// without one are routed to the agent's host and host port.
    host_ports: Option<String>,
}

/// `[sources.consul]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsulSource {
    /// Consul's HTTP API, http or https. Default `http://127.0.0.1:8500`.
    url: Option<String>,
    /// File holding the ACL token (sent as `X-Consul-Token`). Default: the environment
    /// variable `CONSUL_HTTP_TOKEN`, else no token.
    token_file: Option<PathBuf>,
    /// Datacenter to query (`?dc=`). Default: the agent's own.
    datacenter: Option<String>,
    /// How long one blocking query may wait for a change (Consul caps it at 10m). Default `5m`.
    wait: Option<String>,
    /// `default` (the leader answers) or `stale` (any server; spreads the load). Default
    /// `default`.
    consistency: Option<String>,
    /// Prefix of weft's tags (`weft.host=...`). Default `weft.`.
    tag_prefix: Option<String>,
    /// Most requests per second one watch may make (token bucket, burst 5). Default 5.
    max_rate: Option<u32>,
    /// Most connections weft holds to Consul at once, whatever the catalog's size: two
    /// blocking watches and the rest for reading changed services. Default 16, at least 3.
    max_connections: Option<u32>,
    /// Every exposed service is read again within this time, spread evenly: the safety net
    /// for a change the watches cannot see. Default `10m`.
    resync: Option<String>,
}

/// `[sources.file]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSource {
    /// The services file; relative paths are relative to weft.toml's directory. Required.
    path: Option<PathBuf>,
    /// A burst of changes is read this long after its first event. Default `200ms`.
    debounce: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSourceConfig {
    pub path: PathBuf,
    pub debounce: Duration,
}

/// A secret: never printed, not even by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(secret: String) -> Token {
        Token(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// The leader answers (Consul's default mode).
    Leader,
    /// Any server answers (`?stale`).
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulSourceConfig {
    pub url: reqwest::Url,
    pub token: Option<Token>,
    pub datacenter: Option<String>,
    pub wait: Duration,
    pub consistency: Consistency,
    pub tag_prefix: String,
    pub max_rate: std::num::NonZeroU32,
    pub max_connections: usize,
    pub resync: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourcesConfig {
    pub file: Option<FileSourceConfig>,
    pub consul: Option<ConsulSourceConfig>,
    pub marathon: Option<MarathonSourceConfig>,
}

/// Which apps the Marathon source routes, by `HAPROXY_GROUP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarathonGroup {
    All,
    Named(String),
}

impl MarathonGroup {
    pub fn parse(text: &str) -> MarathonGroup {
        match text {
            "*" => MarathonGroup::All,
            name => MarathonGroup::Named(name.to_string()),
        }
    }

    /// Whether `group` misses this one only by letter case or surrounding spaces (`External`,
    /// `external `): almost certainly meant to match, so it is worth saying why it does not.
    pub fn near_miss(&self, group: Option<&str>) -> bool {
        match (self, group) {
            (MarathonGroup::Named(name), Some(group)) => {
                group != name && group.trim().eq_ignore_ascii_case(name)
            }
            _ => false,
        }
    }

    /// Whether an app (or service port) in `group` is routed.
    pub fn matches(&self, group: Option<&str>) -> bool {
        match self {
            MarathonGroup::All => true,
            MarathonGroup::Named(name) => group == Some(name.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPorts {
    Deny,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarathonAuth {
    Basic { user: String, password: Token },
    Token(Token),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarathonSourceConfig {
    pub urls: Vec<reqwest::Url>,
    pub group: MarathonGroup,
    pub auth: Option<MarathonAuth>,
    pub event_types: Vec<String>,
    pub resync: Duration,
    pub full_fetch_interval: Duration,
    pub read_timeout: Duration,
    pub request_timeout: Duration,
    pub host_ports: HostPorts,
}

pub const DEFAULT_MARATHON_URL: &str = "http://127.0.0.1:8080";
pub const DEFAULT_MARATHON_GROUP: &str = "external";
pub const DEFAULT_EVENT_TYPES: [&str; 4] = [
    "status_update_event",
    "health_status_changed_event",
    "api_post_event",
    "app_terminated_event",
];
pub const DEFAULT_FULL_FETCH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(300);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a secret file: trimmed, not empty.
fn read_secret(path: PathBuf, base: &Path, key: &str, issues: &mut Issues) -> Option<String> {
    let path = absolute(path, base);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Some(text.trim().to_string()),
        Ok(_) => {
            issues.add(key, format!("{} is empty", path.display()));
            None
        }
        Err(err) => {
            issues.add(key, format!("cannot read {}: {err}", path.display()));
            None
        }
    }
}

/// `url` as it may be printed: without its userinfo (`user:password@`) and with the value of
/// every query parameter whose name looks like a secret (`token`, `password`, `key`, ...)
/// replaced by `redacted`. Every message that names a source URL prints it through this.
pub fn redact(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    // Only URLs that cannot have a host (`mailto:`) refuse these; there is nothing to hide.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if url.query_pairs().any(|(name, _)| secret_name(&name)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret_name(&name) {
                    "redacted".to_string()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// A URL's text as it may be printed, whether it parses or not: [`redact`] for a URL, and for
/// text that does not parse, everything between `://` and the last `@` of the authority
/// replaced by `redacted`.
pub fn redact_text(text: &str) -> String {
    if let Ok(url) = reqwest::Url::parse(text) {
        return redact(&url);
    }
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_string();
    };
    let authority_end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    match text[start..authority_end].rfind('@') {
        Some(at) => format!("{}redacted@{}", &text[..start], &text[start + at + 1..]),
        None => text.to_string(),
    }
}

/// Whether a query parameter's name looks like it carries a secret.
fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "token",
        "pass",
        "pwd",
        "secret",
        "key",
        "auth",
        "credential",
        "signature",
        "sig",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// An http(s) URL without credentials: a URL's userinfo or a secret in its query would be
/// printed in logs, `/status` and errors, and sent along wherever the URL leads; `secret_keys`
/// names the keys that hold them instead.
fn http_url(text: &str, key: &str, secret_keys: &str, issues: &mut Issues) -> Option<reqwest::Url> {
    let shown = redact_text(text);
    match reqwest::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
            if !url.username().is_empty() || url.password().is_some() {
                issues.add(
                    key,
                    format!(
                        "{shown:?}: credentials in the URL (user:password@) are refused, they \
                         would be printed in logs and errors; use {secret_keys}"
                    ),
                );
                return None;
            }
            if let Some((name, _)) = url.query_pairs().find(|(name, _)| secret_name(name)) {
                issues.add(
                    key,
                    format!(
                        "{shown:?}: a secret in the query ({name}=) is refused, it would be \
                         printed in logs and errors; use {secret_keys}"
                    ),
                );
                return None;
            }
            Some(url)
        }
        Ok(_) => {
            issues.add(key, format!("{shown:?} is not an http(s) URL"));
            None
        }
        Err(err) => {
            issues.add(key, format!("{shown:?}: {err}"));
            None
        }
    }
}

fn validate_marathon(
    raw: RawMarathonSource,
    base: &Path,
    issues: &mut Issues,
) -> MarathonSourceConfig {
    let texts = raw
        .urls
        .unwrap_or_else(|| vec![DEFAULT_MARATHON_URL.into()]);
    if texts.is_empty() {
        issues.add("sources.marathon.urls", "is empty");
    }
    let urls = texts
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            http_url(
                text,
                &format!("sources.marathon.urls[{i}]"),
                "sources.marathon.credentials_file (user:password) or sources.marathon.token_file",
                issues,
            )
        })
        .collect();
    let group = MarathonGroup::parse(&raw.group.unwrap_or_else(|| DEFAULT_MARATHON_GROUP.into()));
    let basic = raw.credentials_file.and_then(|path| {
        let key = "sources.marathon.credentials_file";
        let secret = read_secret(path, base, key, issues)?;
        match secret.split_once(':') {
            Some((user, password)) if !user.is_empty() => Some(MarathonAuth::Basic {
                user: user.to_string(),
                password: Token::new(password.to_string()),
            }),
            _ => {
                issues.add(key, "must hold user:password");
                None
            }
        }
    });
    let token = raw.token_file.and_then(|path| {
        read_secret(path, base, "sources.marathon.token_file", issues)
            .map(|t| MarathonAuth::Token(Token::new(t)))
    });
    if basic.is_some() && token.is_some() {
        issues.add(
            "sources.marathon",
            "credentials_file and token_file exclude each other",
        );
    }
    let event_types = raw
        .event_types
        .unwrap_or_else(|| DEFAULT_EVENT_TYPES.iter().map(|t| t.to_string()).collect());
    for (i, event) in event_types.iter().enumerate() {
        if event.is_empty() || !event.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            issues.add(
                &format!("sources.marathon.event_types[{i}]"),
                format!("{event:?} is not an event type like \"status_update_event\""),
            );
        }
    }
    let host_ports = match raw.host_ports.as_deref() {
        None | Some("deny") => HostPorts::Deny,
        Some("allow") => HostPorts::Allow,
        Some(other) => {
            issues.add(
                "sources.marathon.host_ports",
                format!("{other:?} is not one of deny, allow"),
            );
            HostPorts::Deny
        }
    };
    let full_fetch_interval = duration(
        raw.full_fetch_interval,
        DEFAULT_FULL_FETCH_INTERVAL,
        "sources.marathon.full_fetch_interval",
        issues,
    );
    let mut positive = |raw: Option<String>, default, key: &str| {
        let value = duration(raw, default, key, issues);
        if value.is_zero() {
            issues.add(key, "must be above zero");
        }
        value
    };
    MarathonSourceConfig {
        urls,
        group,
        auth: basic.or(token),
        event_types,
        resync: positive(raw.resync, DEFAULT_RESYNC, "sources.marathon.resync"),
        full_fetch_interval,
        read_timeout: positive(
            raw.read_timeout,
            DEFAULT_READ_TIMEOUT,
            "sources.marathon.read_timeout",
        ),
        request_timeout: positive(
            raw.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
            "sources.marathon.request_timeout",
        ),
        host_ports,
    }
}

pub(super) fn validate_sources(raw: RawSources, base: &Path, issues: &mut Issues) -> SourcesConfig {
    let file = raw.file.and_then(|file| {
        let debounce = duration(
            file.debounce,
            DEFAULT_DEBOUNCE,
            "sources.file.debounce",
            issues,
        );
        match file.path {
            Some(path) => Some(FileSourceConfig {
                path: absolute(path, base),
                debounce,
            }),
            None => {
                issues.add("sources.file.path", "is required");
                None
            }
        }
    });
    let consul = raw
        .consul
        .map(|consul| validate_consul(consul, base, issues));
    let marathon = raw
        .marathon
        .map(|marathon| validate_marathon(marathon, base, issues));
    let none = file.is_none() && consul.is_none() && marathon.is_none();
    if none && !issues.0.iter().any(|i| i.key.starts_with("sources")) {
        issues.add(
            "sources",
            "no source is configured: add [sources.file], [sources.consul] or [sources.marathon]",
        );
    }
    SourcesConfig {
        file,
        consul,
        marathon,
    }
}

/// Consul's own upper bound for a blocking query's wait.
const CONSUL_MAX_WAIT: Duration = Duration::from_secs(600);
pub const DEFAULT_CONSUL_URL: &str = "http://127.0.0.1:8500";
pub const DEFAULT_CONSUL_WAIT: Duration = Duration::from_secs(300);
pub const DEFAULT_TAG_PREFIX: &str = "weft.";
pub const DEFAULT_CONSUL_MAX_RATE: u32 = 5;
/// Consul's `limits.http_max_conns_per_client` is 200 per client IP by default, and the
/// local agent is shared by everything on the host (registrator, consul-template, health
/// scripts, the CLI): weft takes a twelfth of it.
pub const DEFAULT_CONSUL_MAX_CONNECTIONS: u32 = 16;
/// Two blocking watches and one connection to read services with.
pub const MIN_CONSUL_CONNECTIONS: u32 = 3;
pub const DEFAULT_CONSUL_RESYNC: Duration = Duration::from_secs(600);
/// The environment variable Consul's own tools read the token from.
pub const CONSUL_TOKEN_ENV: &str = "CONSUL_HTTP_TOKEN";

fn validate_consul(raw: RawConsulSource, base: &Path, issues: &mut Issues) -> ConsulSourceConfig {
    let url_text = raw.url.unwrap_or_else(|| DEFAULT_CONSUL_URL.into());
    let url = http_url(
        &url_text,
        "sources.consul.url",
        "sources.consul.token_file (or $CONSUL_HTTP_TOKEN)",
        issues,
    )
    .unwrap_or_else(|| reqwest::Url::parse(DEFAULT_CONSUL_URL).expect("the default URL parses"));
    let token = match raw.token_file {
        Some(path) => read_secret(path, base, "sources.consul.token_file", issues).map(Token),
        None => std::env::var(CONSUL_TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(|t| Token(t.trim().to_string())),
    };
    let wait = duration(raw.wait, DEFAULT_CONSUL_WAIT, "sources.consul.wait", issues);
    if wait.is_zero() || wait > CONSUL_MAX_WAIT {
        issues.add(
            "sources.consul.wait",
            "must be above zero and at most 10m (Consul's limit)",
        );
    }
    let consistency = match raw.consistency.as_deref() {
        None | Some("default") => Consistency::Leader,
        Some("stale") => Consistency::Stale,
        Some(other) => {
            issues.add(
                "sources.consul.consistency",
                format!("{other:?} is not one of default, stale"),
            );
            Consistency::Leader
        }
    };
    let tag_prefix = raw.tag_prefix.unwrap_or_else(|| DEFAULT_TAG_PREFIX.into());
    if tag_prefix.contains(char::is_whitespace) || tag_prefix.contains('=') {
        issues.add(
            "sources.consul.tag_prefix",
            "must not contain whitespace or '='",
        );
    }
    let datacenter = raw.datacenter.filter(|dc| {
        let ok = !dc.is_empty()
            && dc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            issues.add(
                "sources.consul.datacenter",
                format!("{dc:?} is not a datacenter name"),
            );
        }
        ok
    });
    let max_rate = std::num::NonZeroU32::new(raw.max_rate.unwrap_or(DEFAULT_CONSUL_MAX_RATE))
        .unwrap_or_else(|| {
            issues.add("sources.consul.max_rate", "must be at least 1");
            std::num::NonZeroU32::MIN
        });
    let max_connections = raw
        .max_connections
        .unwrap_or(DEFAULT_CONSUL_MAX_CONNECTIONS);
    if max_connections < MIN_CONSUL_CONNECTIONS {
        issues.add(
            "sources.consul.max_connections",
            format!("must be at least {MIN_CONSUL_CONNECTIONS} (two watches and one reader)"),
        );
    }
    let resync = duration_at_least(
        raw.resync,
        DEFAULT_CONSUL_RESYNC,
        Duration::from_secs(1),
        "sources.consul.resync",
        "",
        issues,
    );
    ConsulSourceConfig {
        url,
        token,
        datacenter,
        wait,
        consistency,
        tag_prefix,
        max_rate,
        max_connections: max_connections.max(MIN_CONSUL_CONNECTIONS) as usize,
        resync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> reqwest::Url {
        reqwest::Url::parse(text).unwrap()
    }

    #[test]
    fn redact_removes_userinfo() {
        assert_eq!(
            redact(&url("http://user:pass@consul:8500/v1/catalog")),
            "http://consul:8500/v1/catalog"
        );
        assert_eq!(redact(&url("https://user@m:8443/")), "https://m:8443/");
        assert_eq!(redact(&url("http://:pass@m/")), "http://m/");
        assert_eq!(
            redact(&url(
                "http://consul:8500/v1/health/state/any?index=3&wait=300s"
            )),
            "http://consul:8500/v1/health/state/any?index=3&wait=300s"
        );
    }

    #[test]
    fn redact_hides_secret_query_values_only() {
        assert_eq!(
            redact(&url(
                "http://c:8500/v1/kv/x?token=abc&dc=dc1&Api_Key=k&password=p"
            )),
            "http://c:8500/v1/kv/x?token=redacted&dc=dc1&Api_Key=redacted&password=redacted"
        );
        assert_eq!(
            redact(&url(
                "http://u:p@m:8080/v2/events?access_token=t&event_type=a"
            )),
            "http://m:8080/v2/events?access_token=redacted&event_type=a"
        );
    }

    #[test]
    fn redact_text_handles_what_does_not_parse() {
        assert_eq!(
            redact_text("http://u:p@[bad:8500"),
            "http://redacted@[bad:8500"
        );
        assert_eq!(
            redact_text("http://u:p@a@[bad/x@y"),
            "http://redacted@[bad/x@y"
        );
        assert_eq!(redact_text("http://u:p@a@host/x@y"), "http://host/x@y");
        assert_eq!(redact_text("http://[bad:8500"), "http://[bad:8500");
        assert_eq!(redact_text("no scheme u:p@x"), "no scheme u:p@x");
        assert_eq!(redact_text("http://u:p@ok:1/"), "http://ok:1/");
        assert_eq!(redact_text("http://u:p@a@host/x@y"), "http://host/x@y");
    }
}
