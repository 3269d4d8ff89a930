//! `[sources.*]`: each source's keys, defaults and validation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{absolute, duration, Issues};

pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// `[sources]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSources {
    file: Option<RawFileSource>,
    consul: Option<RawConsulSource>,
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
}

/// `[sources.file]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSource {
    /// The services file; relative paths are relative to weft.toml's directory. Required.
    path: Option<PathBuf>,
    /// Quiet time after the last change before the file is read. Default `200ms`.
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
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourcesConfig {
    pub file: Option<FileSourceConfig>,
    pub consul: Option<ConsulSourceConfig>,
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
    if file.is_none() && consul.is_none() && !issues.0.iter().any(|i| i.key.starts_with("sources"))
    {
        issues.add(
            "sources",
            "no source is configured: add [sources.file] or [sources.consul]",
        );
    }
    SourcesConfig { file, consul }
}

/// Consul's own upper bound for a blocking query's wait.
const CONSUL_MAX_WAIT: Duration = Duration::from_secs(600);
pub const DEFAULT_CONSUL_URL: &str = "http://127.0.0.1:8500";
pub const DEFAULT_CONSUL_WAIT: Duration = Duration::from_secs(300);
pub const DEFAULT_TAG_PREFIX: &str = "weft.";
pub const DEFAULT_CONSUL_MAX_RATE: u32 = 5;
/// The environment variable Consul's own tools read the token from.
pub const CONSUL_TOKEN_ENV: &str = "CONSUL_HTTP_TOKEN";

fn validate_consul(raw: RawConsulSource, base: &Path, issues: &mut Issues) -> ConsulSourceConfig {
    let url_text = raw.url.unwrap_or_else(|| DEFAULT_CONSUL_URL.into());
    let url = match reqwest::Url::parse(&url_text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => url,
        Ok(_) => {
            issues.add(
                "sources.consul.url",
                format!("{url_text:?} is not an http(s) URL"),
            );
            reqwest::Url::parse(DEFAULT_CONSUL_URL).expect("the default URL parses")
        }
        Err(err) => {
            issues.add("sources.consul.url", format!("{url_text:?}: {err}"));
            reqwest::Url::parse(DEFAULT_CONSUL_URL).expect("the default URL parses")
        }
    };
    let token = match raw.token_file {
        Some(path) => {
            let path = absolute(path, base);
            match std::fs::read_to_string(&path) {
                Ok(text) if !text.trim().is_empty() => Some(Token(text.trim().to_string())),
                Ok(_) => {
                    issues.add(
                        "sources.consul.token_file",
                        format!("{} is empty", path.display()),
                    );
                    None
                }
                Err(err) => {
                    issues.add(
                        "sources.consul.token_file",
                        format!("cannot read {}: {err}", path.display()),
                    );
                    None
                }
            }
        }
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
    ConsulSourceConfig {
        url,
        token,
        datacenter,
        wait,
        consistency,
        tag_prefix,
        max_rate,
    }
}
