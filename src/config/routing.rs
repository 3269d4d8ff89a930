//! `[routing]`: Apollo mode's domain, and who may claim which hosts (`[[routing.teams]]`,
//! `unlisted_hosts`, `release_after`, and where claims are recorded).

use std::time::Duration;

use serde::Deserialize;

use super::{duration_at_least, Issues};
use crate::model::ownership::{HostPattern, Ownership, Team, Unlisted, DEFAULT_RELEASE_AFTER};
use crate::model::Hostname;

/// Default `routing.claims_prefix`: the Consul KV folder of the claims ledger.
pub const DEFAULT_CLAIMS_PREFIX: &str = "weft/claims";
/// The Consul connections the claims ledger takes out of `sources.consul.max_connections`: one
/// blocking read of the folder, one write at a time.
pub const CLAIMS_CONNECTIONS: usize = 2;
/// The shortest `release_after`: a redeploy must not hand a host away.
const MIN_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// `[routing]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    /// Apollo mode: every Consul service NAME (and Marathon app) is also exposed as
    /// `NAME.<domain>`. Default: unset.
    domain: Option<String>,
    /// Teams: who may claim which hosts.
    teams: Option<Vec<RawTeam>>,
    /// `allow` (default): hosts no team lists may be claimed by any service; `deny`: by none.
    unlisted_hosts: Option<String>,
    /// How long a host stays with a holder that claims it no more. Default `1h`.
    release_after: Option<String>,
    /// Where claims are recorded: `consul` (KV, shared by every edge; the default when the
    /// Consul source is configured) or `local` (`<run_dir>/claims.json`).
    claims: Option<String>,
    /// Consul KV folder of the claims. Default `weft/claims`.
    claims_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    consul: Vec<String>,
    #[serde(default)]
    marathon: Vec<String>,
}

/// Where the claims ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimsStore {
    /// `<run_dir>/claims.json`: this edge's alone.
    Local,
    /// Consul KV under this folder, shared by every edge on the same Consul.
    Consul { prefix: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Apollo mode: `NAME.<domain>` for every service.
    pub domain: Option<Hostname>,
    pub ownership: Ownership,
    pub claims: ClaimsStore,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            domain: None,
            ownership: Ownership::default(),
            claims: ClaimsStore::Local,
        }
    }
}

pub(super) fn validate_routing(
    raw: RawRouting,
    consul_connections: Option<usize>,
    issues: &mut Issues,
) -> RoutingConfig {
    let consul_configured = consul_connections.is_some();
    let domain = raw.domain.and_then(|text| match Hostname::parse(&text) {
        Ok(domain) if domain.wildcard_suffix().is_none() => Some(domain),
        Ok(_) => {
            issues.add("routing.domain", "must not be a wildcard");
            None
        }
        Err(reason) => {
            issues.add("routing.domain", format!("{text:?} {reason}"));
            None
        }
    });
    let teams = raw
        .teams
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, team)| validate_team(i, team, issues))
        .collect::<Vec<Team>>();
    let mut names = std::collections::BTreeSet::new();
    for (i, team) in teams.iter().enumerate() {
        if !names.insert(team.name.clone()) {
            issues.add(
                &format!("routing.teams[{i}].name"),
                format!("team {:?} is declared twice", team.name),
            );
        }
    }
    let unlisted = match raw.unlisted_hosts.as_deref() {
        None | Some("allow") => Unlisted::Allow,
        Some("deny") => Unlisted::Deny,
        Some(other) => {
            issues.add(
                "routing.unlisted_hosts",
                format!("{other:?} is neither \"allow\" nor \"deny\""),
            );
            Unlisted::Allow
        }
    };
    let release_after = duration_at_least(
        raw.release_after,
        DEFAULT_RELEASE_AFTER,
        MIN_RELEASE_AFTER,
        "routing.release_after",
        "",
        issues,
    );
    let prefix = super::kv_folder(
        raw.claims_prefix,
        DEFAULT_CLAIMS_PREFIX,
        "routing.claims_prefix",
        issues,
    );
    let claims = match raw.claims.as_deref() {
        None if consul_configured => ClaimsStore::Consul { prefix },
        None | Some("local") => ClaimsStore::Local,
        Some("consul") if consul_configured => ClaimsStore::Consul { prefix },
        Some("consul") => {
            issues.add(
                "routing.claims",
                "\"consul\" needs the Consul source ([sources.consul])",
            );
            ClaimsStore::Local
        }
        Some(other) => {
            issues.add(
                "routing.claims",
                format!("{other:?} is neither \"consul\" nor \"local\""),
            );
            ClaimsStore::Local
        }
    };
    let least = super::MIN_CONSUL_CONNECTIONS as usize + CLAIMS_CONNECTIONS;
    if let (ClaimsStore::Consul { .. }, Some(budget)) = (&claims, consul_connections) {
        if budget < least {
            issues.add(
                "sources.consul.max_connections",
                format!(
                    "must be at least {least} with the claims ledger in Consul (routing.claims): \
                     it takes {CLAIMS_CONNECTIONS} of them"
                ),
            );
        }
    }
    RoutingConfig {
        domain,
        ownership: Ownership {
            teams,
            unlisted,
            release_after,
        },
        claims,
    }
}

fn validate_team(i: usize, raw: RawTeam, issues: &mut Issues) -> Option<Team> {
    let key = format!("routing.teams[{i}]");
    let mut ok = true;
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        issues.add(
            &format!("{key}.name"),
            format!("{:?} must be 1 to 64 of a-z, 0-9 and '-'", raw.name),
        );
        ok = false;
    }
    let mut hosts = Vec::new();
    for (j, text) in raw.hosts.iter().enumerate() {
        match Hostname::parse(text) {
            Ok(host) => hosts.push(HostPattern::new(host)),
            Err(reason) => {
                issues.add(&format!("{key}.hosts[{j}]"), format!("{text:?} {reason}"));
                ok = false;
            }
        }
    }
    for (j, prefix) in raw.consul.iter().enumerate() {
        if prefix.is_empty() {
            issues.add(
                &format!("{key}.consul[{j}]"),
                "an empty prefix would take every Consul service",
            );
            ok = false;
        }
    }
    for (j, prefix) in raw.marathon.iter().enumerate() {
        if !prefix.starts_with('/') || prefix == "/" {
            issues.add(
                &format!("{key}.marathon[{j}]"),
                format!("{prefix:?} must be an app id prefix like \"/shop/\", not all of Marathon"),
            );
            ok = false;
        }
    }
    ok.then_some(Team {
        name: raw.name,
        consul: raw.consul,
        marathon: raw.marathon,
        hosts,
    })
}
