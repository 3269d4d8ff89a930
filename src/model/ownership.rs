//! Who may route which host: teams, the claims ledger, and how a contested host is settled.
//!
//! ```text
//! a service's hosts ──may its team claim them? (teams' host patterns, public-suffix rule)──┐
//!                                                                                          v
//! the ledger (host -> holder, recorded at first claim, shared by every edge) ── holder keeps it
//!                                                                                          │
//! routes under a host: only its holder's team ──────────────────────────────────────────────┘
//! ```
//!
//! Rules, in order:
//! - The file source is the operator's own: a host it routes is the operator's, whoever else
//!   claims it, and its wildcards need no public-suffix check.
//! - A host named in a team's `hosts` may be claimed only by that team's services; a host no
//!   team names, by anyone (`unlisted_hosts = "allow"`, the default) or by no one (`"deny"`).
//! - A wildcard needs at least two labels beneath its public suffix: `*.shop.example.com`, never
//!   `*.example.com` or `*.co.uk`.
//! - The first claim on a host is recorded in the ledger; from then on the host stays with its
//!   holder's team, whatever sorts first and whichever edge looks. A newcomer from another team
//!   is dropped with a reason that names the holder. A service in no declared team is a team of
//!   its own.
//! - A holder that stops claiming keeps the host for `release_after`, so a redeploy does not
//!   hand it away; meanwhile a service of its declared team may serve it, and takes it over
//!   when it is released. Only a holder whose source this edge reads in full (`Ok`) can be
//!   found gone: a degraded or missing source never releases a host.
//! - Paths under a host are added only by the holder's team.
//! - A host beneath a wildcard held by another team is that team's; a wildcard above a host
//!   another team holds is refused.
//!
//! Everything here is pure: the ledger comes in as data, and what should be written to it goes
//! out as [`ClaimIntents`] for the controller to record.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use super::{Hostname, ServiceName, SourceId};

/// Default `routing.release_after`.
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(3600);

/// A team of services, as `[[routing.teams]]` declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub name: String,
    /// Consul service names starting with one of these belong to the team.
    pub consul: Vec<String>,
    /// Marathon app ids starting with one of these (`/shop/`) belong to the team.
    pub marathon: Vec<String>,
    /// The hosts the team may claim, and no other team may.
    pub hosts: Vec<HostPattern>,
}

/// A host in a team's list: `shop.example.com` (that host) or `*.shop.example.com` (every host
/// beneath it, and wildcards beneath it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(Hostname);

impl HostPattern {
    pub fn new(host: Hostname) -> HostPattern {
        HostPattern(host)
    }

    /// Whether a claim on `host` falls under this pattern.
    pub fn covers(&self, host: &Hostname) -> bool {
        match self.0.wildcard_suffix() {
            None => self.0 == *host,
            Some(suffix) => host.as_str().ends_with(suffix),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Hosts that no team names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unlisted {
    /// Any service may claim them (a single-team estate).
    #[default]
    Allow,
    /// None may: only the operator's file and the teams' own hosts route.
    Deny,
}

/// `[routing]`'s ownership rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub teams: Vec<Team>,
    pub unlisted: Unlisted,
    pub release_after: Duration,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            teams: Vec::new(),
            unlisted: Unlisted::Allow,
            release_after: DEFAULT_RELEASE_AFTER,
        }
    }
}

/// Which team a service belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TeamId {
    /// The file source: the operator's own.
    Operator,
    /// A declared team.
    Named(String),
    /// A service in no declared team: a team of its own.
    Alone(Holder),
}

impl TeamId {
    /// The form kept in the ledger: `shop`, `@consul:web` for a service in no team, `@file`
    /// (a team name never holds `@`).
    pub fn key(&self) -> String {
        match self {
            TeamId::Operator => "@file".into(),
            TeamId::Named(name) => name.clone(),
            TeamId::Alone(holder) => format!("@{}:{}", holder.source, holder.service),
        }
    }

    pub fn from_key(key: &str) -> TeamId {
        let Some(rest) = key.strip_prefix('@') else {
            return TeamId::Named(key.to_string());
        };
        if rest == "file" {
            return TeamId::Operator;
        }
        let alone = rest.split_once(':').and_then(|(source, name)| {
            Some(Holder {
                source: SourceId::parse(source)?,
                service: ServiceName::parse(name).ok()?,
            })
        });
        // An unreadable key names no team anyone is in: the host stays with its holder.
        alone.map_or_else(|| TeamId::Named(key.to_string()), TeamId::Alone)
    }
}

impl fmt::Display for TeamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeamId::Operator => f.write_str("the operator (file source)"),
            TeamId::Named(name) => write!(f, "team {name:?}"),
            TeamId::Alone(_) => f.write_str("in no team"),
        }
    }
}

impl Ownership {
    /// The team of a service: the first team whose prefixes match its origin (Consul service
    /// name, Marathon app id; letter case aside), else a team of its own.
    pub fn team_of(&self, holder: &Holder, origin: &str) -> TeamId {
        if self.teams.is_empty() || holder.source == SourceId::File {
            return match holder.source {
                SourceId::File => TeamId::Operator,
                _ => TeamId::Alone(holder.clone()),
            };
        }
        // Looked at in place, letter case aside: no copy of any team's prefixes per service
        // (a build asks this for every one of 10,000 services).
        fn prefixes(team: &Team, source: SourceId) -> &[String] {
            match source {
                SourceId::File | SourceId::Tls | SourceId::Acme => &[],
                SourceId::Consul => &team.consul,
                SourceId::Marathon => &team.marathon,
            }
        }
        let starts_with = |prefix: &String| {
            let Some(rest) = origin
                .as_bytes()
                .get(..prefix.len())
                .filter(|start| start.eq_ignore_ascii_case(prefix.as_bytes()))
                .map(|_| &origin[prefix.len()..])
            else {
                return false;
            };
            // A Marathon prefix is whole groups: `/shop` is the app `/shop` and what lies under
            // `/shop/`, never `/shopping` (another group, perhaps another team's).
            holder.source != SourceId::Marathon
                || prefix.ends_with('/')
                || rest.is_empty()
                || rest.starts_with('/')
        };
        self.teams
            .iter()
            .find(|team| prefixes(team, holder.source).iter().any(starts_with))
            .map_or_else(
                || TeamId::Alone(holder.clone()),
                |team| TeamId::Named(team.name.clone()),
            )
    }

    /// Whether `team` may claim `host` at all; `Err` says why not.
    pub fn may_claim(&self, team: &TeamId, host: &Hostname) -> Result<(), String> {
        if *team == TeamId::Operator {
            return Ok(());
        }
        wildcard_breadth(host)?;
        // A wildcard over a host or pattern another team reserves would route that host to
        // this service until the team claimed it, and then hold it against the team (a host
        // beneath a held wildcard is the wildcard holder's to give). A wildcard the claimant's
        // own team reserves is the operator's decision, and stands as before.
        let own = |t: &Team| *team == TeamId::Named(t.name.clone());
        let reserved_for_own = || {
            self.teams
                .iter()
                .any(|t| own(t) && t.hosts.iter().any(|p| p.covers(host)))
        };
        if let Some(suffix) = host.wildcard_suffix().filter(|_| !reserved_for_own()) {
            let beneath = self.teams.iter().filter(|t| !own(t)).find_map(|t| {
                t.hosts
                    .iter()
                    .find(|p| p.0 != *host && p.0.as_str().ends_with(suffix))
                    .map(|p| (t, p))
            });
            if let Some((other, pattern)) = beneath {
                return Err(format!(
                    "wildcard {host} would cover {pattern}, reserved for team {:?} in \
                     routing.teams, and this service is {team}",
                    other.name
                ));
            }
        }
        let listed: Vec<&Team> = self
            .teams
            .iter()
            .filter(|t| t.hosts.iter().any(|p| p.covers(host)))
            .collect();
        if listed.is_empty() {
            return match self.unlisted {
                Unlisted::Allow => Ok(()),
                Unlisted::Deny => Err(format!(
                    "no team lists host {host}, and routing.unlisted_hosts is \"deny\""
                )),
            };
        }
        if listed
            .iter()
            .any(|t| *team == TeamId::Named(t.name.clone()))
        {
            return Ok(());
        }
        let names: Vec<String> = listed.iter().map(|t| format!("{:?}", t.name)).collect();
        Err(format!(
            "host {host} is reserved for team {} in routing.teams, and this service is {team}",
            names.join(", ")
        ))
    }
}

/// A wildcard must leave at least two labels beneath the public suffix: `*.example.com` would
/// catch every host of someone's domain.
fn wildcard_breadth(host: &Hostname) -> Result<(), String> {
    let Some(suffix) = host.wildcard_suffix() else {
        return Ok(());
    };
    let rest = &suffix[1..];
    match psl::domain_str(rest) {
        Some(domain) if domain != rest => Ok(()),
        domain => {
            let example = match domain {
                Some(domain) => format!("*.shop.{domain}"),
                None => format!("*.shop.example.{rest}"),
            };
            Err(format!(
                "wildcard {host} is too broad: it needs at least two labels beneath the public \
                 suffix (e.g. {example})"
            ))
        }
    }
}

/// Who else may add paths under a holder's hosts: `name` or `name*` (a prefix) of the
/// holder's own source, or `consul:name`, `marathon:name*`, `file:name` of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    source: Option<SourceId>,
    name: String,
    prefix: bool,
}

impl Share {
    pub fn parse(raw: &str) -> Result<Share, String> {
        let (source, rest) = match raw.split_once(':') {
            Some((source, rest)) => (
                Some(SourceId::parse(source).ok_or_else(|| {
                    format!("{source:?} is not a source (file, consul, marathon)")
                })?),
                rest,
            ),
            None => (None, raw),
        };
        let (name, prefix) = match rest.strip_suffix('*') {
            Some(name) => (name, true),
            None => (rest, false),
        };
        // A bare `*` would open the host to every service: name at least a prefix.
        ServiceName::parse(name).map_err(|reason| format!("{raw:?}: the name {reason}"))?;
        Ok(Share {
            source,
            name: name.to_ascii_lowercase(),
            prefix,
        })
    }

    /// Whether a service of `owner`'s source shares with `guest` by this pattern.
    pub fn admits(&self, owner: SourceId, guest: &Holder) -> bool {
        let name = guest.service.as_str();
        self.source.unwrap_or(owner) == guest.source
            && if self.prefix {
                name.starts_with(&self.name)
            } else {
                name == self.name
            }
    }
}

/// Who holds a host: one service of one source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder {
    pub source: SourceId,
    pub service: ServiceName,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} service {:?}", self.source, self.service.as_str())
    }
}

/// One entry of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub holder: Holder,
    /// The holder's team when it was recorded ([`TeamId::key`]).
    pub team: String,
    /// The store's version of the entry (Consul's ModifyIndex; the local ledger's counter),
    /// for check-and-set writes.
    pub version: u64,
    /// In the store. `false`: this edge routes by it but could not record it yet, so that a
    /// store that fails never hands a host to whatever claims it next.
    pub recorded: bool,
}

/// The claims ledger: which service holds each host, as recorded when it first claimed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub hosts: BTreeMap<Hostname, Holding>,
    /// Not read yet (its store did not answer in time): a host that one team alone claims is
    /// routed, a contested one waits for the ledger, and nothing is recorded.
    pub unread: bool,
    /// What is wrong with the store now (a read or a write failing), for the operator.
    pub trouble: Option<String>,
}

impl Ledger {
    /// The stand-in for a ledger whose store has not answered yet.
    pub fn unread(trouble: Option<String>) -> Ledger {
        Ledger {
            hosts: BTreeMap::new(),
            unread: true,
            trouble,
        }
    }

    /// The closest wildcard entry above `host` (`*.b.c` for `a.b.c`), if any.
    fn covering_wildcard(&self, host: &Hostname) -> Option<(&Hostname, &Holding)> {
        if self.hosts.is_empty() {
            return None;
        }
        first_wildcard_above(host, |wildcard| {
            self.hosts
                .get_key_value(wildcard)
                .filter(|(key, _)| *key != host)
        })
    }

    /// Hosts beneath the wildcard `host` that the ledger holds.
    fn beneath<'a>(
        &'a self,
        host: &'a Hostname,
    ) -> impl Iterator<Item = (&'a Hostname, &'a Holding)> + 'a {
        let suffix = host.wildcard_suffix().unwrap_or("\0");
        self.hosts
            .iter()
            .filter(move |(h, _)| *h != host && h.as_str().ends_with(suffix))
    }
}

/// What the ledger should record after a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimIntents {
    /// First claims, to be created where the store has no entry yet.
    pub record: Vec<Record>,
    /// Entries whose holder claims them no more (seen from a source read in full): each
    /// released, or handed to its team's heir, after `release_after`.
    pub absent: Vec<Absent>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub host: Hostname,
    pub holder: Holder,
    pub team: TeamId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Absent {
    pub host: Hostname,
    /// The version of the entry seen: the release is a check-and-set on it.
    pub version: u64,
    /// A service of the holder's declared team that claims the host now: it takes the entry
    /// over instead of it being deleted.
    pub heir: Option<Record>,
}

/// One service's claim on one host, as `settle` sees it.
#[derive(Debug, Clone)]
pub struct Claim {
    pub holder: Holder,
    pub team: TeamId,
}

/// The outcome for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// These claimants may route under the host; the first is its holder.
    Owned { team: TeamId, holder: Holder },
    /// Nobody routes it now (its holder is absent, or nobody may claim it).
    Held { reason: String },
}

/// The ledger entries nobody claims any more, whose holder's source is read in full here: the
/// rest of [`ClaimIntents::absent`], so that the ledger does not grow with every host ever
/// routed.
pub fn unclaimed<'a>(
    ledger: &'a Ledger,
    claimed: impl Fn(&Hostname) -> bool + 'a,
    healthy: &'a BTreeSet<SourceId>,
) -> impl Iterator<Item = Absent> + 'a {
    ledger
        .hosts
        .iter()
        .filter(move |(host, holding)| {
            holding.recorded && healthy.contains(&holding.holder.source) && !claimed(host)
        })
        .map(|(host, holding)| Absent {
            host: host.clone(),
            version: holding.version,
            heir: None,
        })
}

/// The first of `visit`'s answers for the wildcards above `host`, closest first (`*.b.c`, then
/// `*.c`, for `a.b.c` and for `*.a.b.c`). One buffer for them all: the ledger asks this for every
/// host of every build.
fn first_wildcard_above<T>(host: &Hostname, mut visit: impl FnMut(&str) -> Option<T>) -> Option<T> {
    let name = host.wildcard_suffix().map_or(host.as_str(), |s| &s[1..]);
    let mut rest = name;
    let mut wildcard = String::with_capacity(name.len() + 1);
    while let Some((_, parent)) = rest.split_once('.') {
        wildcard.clear();
        wildcard.push_str("*.");
        wildcard.push_str(parent);
        if let Some(found) = visit(&wildcard) {
            return Some(found);
        }
        rest = parent;
    }
    None
}

/// The claims of one build by host, to find those related through a wildcard while the
/// ledger is unread: without it, nobody knows whether a wildcard's holder or the holder of a
/// host beneath it came first, so either waits, as a host two teams claim does.
pub struct WildcardClaims<'a> {
    claims: BTreeMap<&'a str, Vec<&'a TeamId>>,
}

impl<'a> WildcardClaims<'a> {
    /// The operator's claims are left out: the file outranks every claim and is never in the
    /// ledger, so it never waits for it, nor makes another claim wait.
    pub fn new(claims: impl IntoIterator<Item = (&'a Hostname, &'a TeamId)>) -> Self {
        let mut by_host: BTreeMap<&str, Vec<&TeamId>> = BTreeMap::new();
        for (host, team) in claims {
            if *team != TeamId::Operator {
                by_host.entry(host.as_str()).or_default().push(team);
            }
        }
        WildcardClaims { claims: by_host }
    }

    /// A claim of another team than `team` on a wildcard above `host` or, for a wildcard, on a
    /// host beneath it: that host.
    pub fn other_team(&self, host: &Hostname, team: &TeamId) -> Option<&'a str> {
        let other = |(claimed, teams): (&&'a str, &Vec<&TeamId>)| {
            (*claimed != host.as_str() && teams.iter().any(|t| *t != team)).then_some(*claimed)
        };
        if let Some(above) = first_wildcard_above(host, |wildcard| {
            self.claims.get_key_value(wildcard).and_then(other)
        }) {
            return Some(above);
        }
        let suffix = host.wildcard_suffix()?;
        self.claims
            .iter()
            .filter(|(claimed, _)| claimed.ends_with(suffix))
            .find_map(other)
    }
}

/// Settles one host among its claimants (every claimant already passed [`Ownership::may_claim`];
/// `healthy`: the sources this edge reads in full; `wildcards`: the build's claims, given while
/// the ledger is unread). Returns the outcome, and the losing claimants each with its reason.
pub fn settle(
    host: &Hostname,
    claims: &[Claim],
    ledger: &Ledger,
    ownership: &Ownership,
    healthy: &BTreeSet<SourceId>,
    wildcards: Option<&WildcardClaims>,
    intents: &mut ClaimIntents,
) -> (Settled, Vec<(Holder, String)>) {
    let mut sorted: Vec<&Claim> = claims.iter().collect();
    sorted.sort_by(|a, b| a.holder.cmp(&b.holder));
    let all_lose = |reason: &str| -> Vec<(Holder, String)> {
        sorted
            .iter()
            .map(|c| (c.holder.clone(), reason.to_string()))
            .collect()
    };
    // The reason is written only when someone lost: most hosts have one claimant.
    let owned = |team: TeamId, holder: Holder, why: &dyn Fn() -> String| {
        let mut losers = sorted.iter().filter(|c| c.team != team).peekable();
        let lost = match losers.peek() {
            None => Vec::new(),
            Some(_) => {
                let why = why();
                losers.map(|c| (c.holder.clone(), why.clone())).collect()
            }
        };
        (Settled::Owned { team, holder }, lost)
    };

    // The operator's file outranks every ledger entry.
    if let Some(file) = sorted.iter().find(|c| c.team == TeamId::Operator) {
        let why = || {
            format!(
                "host {host} belongs to the operator: the file source routes it ({})",
                file.holder
            )
        };
        return owned(TeamId::Operator, file.holder.clone(), &why);
    }

    // A holding this edge could not record yet counts only while its holder claims the host.
    let holding = ledger
        .hosts
        .get(host)
        .filter(|h| h.recorded || sorted.iter().any(|c| c.holder == h.holder));
    if let Some(holding) = holding {
        if let Some(present) = sorted.iter().find(|c| c.holder == holding.holder) {
            if !holding.recorded {
                intents.record.push(Record {
                    host: host.clone(),
                    holder: present.holder.clone(),
                    team: present.team.clone(),
                });
            }
            let why = || {
                format!(
                    "host {host} is held by {} ({}), which claimed it first",
                    holding.holder, present.team
                )
            };
            return owned(present.team.clone(), holding.holder.clone(), &why);
        }
        if !healthy.contains(&holding.holder.source) {
            let reason = format!(
                "host {host} is held by {}, and this edge does not read that source in full now \
                 (degraded, or not configured): the host waits for it",
                holding.holder
            );
            return (
                Settled::Held {
                    reason: reason.clone(),
                },
                all_lose(&reason),
            );
        }
        // Its holder claims it no more: its declared team may serve it, nobody else until the
        // ledger releases it.
        let team = TeamId::from_key(&holding.team);
        let heir = sorted.iter().find(|c| c.team == team);
        intents.absent.push(Absent {
            host: host.clone(),
            version: holding.version,
            heir: heir.map(|c| Record {
                host: host.clone(),
                holder: c.holder.clone(),
                team: team.clone(),
            }),
        });
        let released = humantime::format_duration(ownership.release_after);
        if let Some(heir) = heir {
            let why = || {
                format!(
                    "host {host} is held by {team}, served by {} while {} is gone",
                    heir.holder, holding.holder
                )
            };
            return owned(team.clone(), heir.holder.clone(), &why);
        }
        let reason = format!(
            "host {host} is held by {}, which claims it no more; it is released {released} \
             after that service was last seen",
            holding.holder
        );
        return (
            Settled::Held {
                reason: reason.clone(),
            },
            all_lose(&reason),
        );
    }

    // A host beneath another team's wildcard is that team's.
    let mut open: Vec<&Claim> = sorted.clone();
    let mut lost = Vec::new();
    if let Some((wildcard, holding)) = ledger.covering_wildcard(host) {
        let team = TeamId::from_key(&holding.team);
        let reason = format!(
            "host {host} lies beneath {wildcard}, held by {} ({team})",
            holding.holder
        );
        open.retain(|c| {
            let keep = c.team == team;
            if !keep {
                lost.push((c.holder.clone(), reason.clone()));
            }
            keep
        });
    }
    // A wildcard above a host another team holds would catch that host's other paths.
    if host.wildcard_suffix().is_some() {
        let beneath: Vec<(&Hostname, &Holding)> = ledger.beneath(host).collect();
        open.retain(|c| {
            let other = beneath
                .iter()
                .find(|(_, h)| TeamId::from_key(&h.team) != c.team);
            if let Some((below, h)) = other {
                lost.push((
                    c.holder.clone(),
                    format!("host {below}, beneath {host}, is held by {}", h.holder),
                ));
            }
            other.is_none()
        });
    }

    // A first claim: recorded, so that every edge and every later claimant sees its holder.
    // Claims that arrive together are settled alike on every edge: source, then name.
    let Some(first) = open.first() else {
        let reason = lost
            .first()
            .map_or_else(|| format!("nobody claims host {host}"), |(_, r)| r.clone());
        return (Settled::Held { reason }, lost);
    };
    let (team, holder) = (first.team.clone(), first.holder.clone());
    if ledger.unread {
        let related = wildcards.and_then(|w| w.other_team(host, &team));
        if open.iter().all(|c| c.team == team) && related.is_none() {
            return (Settled::Owned { team, holder }, lost);
        }
        let reason = match related {
            Some(other) => format!(
                "host {host} and {other}, a wildcard over the other or a host beneath it, are \
                 claimed by different teams, and the claims ledger is not read yet: it waits \
                 for the ledger"
            ),
            None => format!(
                "host {host} is claimed by more than one team, and the claims ledger is not \
                 read yet: it waits for the ledger"
            ),
        };
        lost.extend(open.iter().map(|c| (c.holder.clone(), reason.clone())));
        return (Settled::Held { reason }, lost);
    }
    intents.record.push(Record {
        host: host.clone(),
        holder: holder.clone(),
        team: team.clone(),
    });
    if open.iter().any(|c| c.team != team) {
        let why = format!("host {host} is claimed at the same time by {holder}, which sorts first");
        lost.extend(
            open.iter()
                .filter(|c| c.team != team)
                .map(|c| (c.holder.clone(), why.clone())),
        );
    }
    (Settled::Owned { team, holder }, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> Hostname {
        Hostname::parse(h).unwrap()
    }

    fn holder(source: SourceId, name: &str) -> Holder {
        Holder {
            source,
            service: ServiceName::parse(name).unwrap(),
        }
    }

    /// A claim by a service in no team.
    fn alone(source: SourceId, name: &str) -> Claim {
        let holder = holder(source, name);
        Claim {
            team: TeamId::Alone(holder.clone()),
            holder,
        }
    }

    fn in_team(source: SourceId, name: &str, team: &str) -> Claim {
        Claim {
            holder: holder(source, name),
            team: TeamId::Named(team.into()),
        }
    }

    fn ledger(entries: &[(&str, &Claim)]) -> Ledger {
        Ledger {
            hosts: entries
                .iter()
                .map(|(h, claim)| {
                    (
                        host(h),
                        Holding {
                            holder: claim.holder.clone(),
                            team: claim.team.key(),
                            version: 7,
                            recorded: true,
                        },
                    )
                })
                .collect(),
            ..Ledger::default()
        }
    }

    fn everything() -> BTreeSet<SourceId> {
        [SourceId::File, SourceId::Consul, SourceId::Marathon].into()
    }

    fn settle_now(
        h: &str,
        claims: &[Claim],
        book: &Ledger,
    ) -> (Settled, Vec<(Holder, String)>, ClaimIntents) {
        let mut intents = ClaimIntents::default();
        let (settled, lost) = settle(
            &host(h),
            claims,
            book,
            &Ownership::default(),
            &everything(),
            None,
            &mut intents,
        );
        (settled, lost, intents)
    }

    #[test]
    fn wildcards_need_two_labels_beneath_the_public_suffix() {
        let rules = Ownership::default();
        let consul = alone(SourceId::Consul, "x").team;
        for bad in ["*.com", "*.example.com", "*.co.uk", "*.example.co.uk"] {
            let err = rules.may_claim(&consul, &host(bad)).unwrap_err();
            assert!(err.contains("too broad"), "{bad}: {err}");
        }
        for good in [
            "*.shop.example.com",
            "*.shop.example.co.uk",
            "shop.example.com",
        ] {
            rules.may_claim(&consul, &host(good)).unwrap();
        }
        rules
            .may_claim(&TeamId::Operator, &host("*.example.com"))
            .unwrap();
    }

    /// A wildcard over another team's reserved host or pattern is refused before anyone
    /// holds them: it would route them to its service, then hold them against their team.
    #[test]
    fn a_wildcard_above_another_teams_reservation_is_refused() {
        let rules = Ownership {
            teams: vec![
                Team {
                    name: "pay".into(),
                    consul: vec!["pay-".into()],
                    marathon: vec![],
                    hosts: vec![
                        HostPattern::new(host("pay.eu.example.com")),
                        HostPattern::new(host("*.cards.example.com")),
                    ],
                },
                Team {
                    name: "eu".into(),
                    consul: vec!["eu-".into()],
                    marathon: vec![],
                    hosts: vec![HostPattern::new(host("*.eu.example.com"))],
                },
            ],
            ..Ownership::default()
        };
        let evil = alone(SourceId::Consul, "evil").team;
        for (wildcard, reserved) in [
            (
                "*.eu.example.com",
                "would cover pay.eu.example.com, reserved for team \"pay\"",
            ),
            ("*.example.com", "too broad"),
            ("*.cards.example.com", "reserved for team \"pay\""),
            ("*.a.cards.example.com", "reserved for team \"pay\""),
        ] {
            let err = rules.may_claim(&evil, &host(wildcard)).unwrap_err();
            assert!(err.contains(reserved), "{wildcard}: {err}");
        }
        rules.may_claim(&evil, &host("*.x.example.com")).unwrap();
        // Its own reservations beneath do not stop a team. A wildcard its own team reserves
        // stands (the operator's layout), other teams' reservations beneath or not.
        let pay = TeamId::Named("pay".into());
        rules
            .may_claim(&pay, &host("*.x.cards.example.com"))
            .unwrap();
        let eu = TeamId::Named("eu".into());
        rules.may_claim(&eu, &host("*.eu.example.com")).unwrap();
        rules.may_claim(&eu, &host("*.de.eu.example.com")).unwrap();
        rules.may_claim(&eu, &host("shop.eu.example.com")).unwrap();
        // Another team's wildcard that it does not reserve, over pay's reservation: refused.
        let web_rules = Ownership {
            teams: vec![
                rules.teams[0].clone(),
                Team {
                    name: "web".into(),
                    consul: vec!["web-".into()],
                    marathon: vec![],
                    hosts: vec![HostPattern::new(host("www.example.com"))],
                },
            ],
            ..Ownership::default()
        };
        let web = TeamId::Named("web".into());
        let err = web_rules
            .may_claim(&web, &host("*.eu.example.com"))
            .unwrap_err();
        assert!(
            err.contains("would cover pay.eu.example.com, reserved for team \"pay\""),
            "{err}"
        );
    }

    #[test]
    fn a_teams_hosts_are_its_own() {
        let rules = Ownership {
            teams: vec![Team {
                name: "shop".into(),
                consul: vec!["shop-".into()],
                marathon: vec!["/shop/".into()],
                hosts: vec![
                    HostPattern::new(host("shop.example.com")),
                    HostPattern::new(host("*.shop.example.com")),
                ],
            }],
            ..Ownership::default()
        };
        let shop = rules.team_of(&holder(SourceId::Marathon, "shop_web"), "/shop/web");
        assert_eq!(shop, TeamId::Named("shop".into()));
        // Letter case does not take a service out of its team, nor into another.
        assert_eq!(
            rules.team_of(&holder(SourceId::Consul, "shop-web"), "SHOP-web"),
            shop
        );
        let outsider = holder(SourceId::Consul, "shopping");
        assert_eq!(
            rules.team_of(&outsider, "shopping"),
            TeamId::Alone(outsider.clone())
        );
        // A Marathon prefix without its `/` is still whole groups: `/pay` is `/pay` and
        // `/pay/...`, never `/payroll-x`.
        let pay = Ownership {
            teams: vec![Team {
                name: "pay".into(),
                consul: vec![],
                marathon: vec!["/pay".into()],
                hosts: vec![],
            }],
            ..Ownership::default()
        };
        let named = TeamId::Named("pay".into());
        for id in ["/pay", "/PAY/web", "/pay/a/b"] {
            assert_eq!(
                pay.team_of(&holder(SourceId::Marathon, "x"), id),
                named,
                "{id}"
            );
        }
        for id in ["/payroll-x", "/pay-web", "/pa"] {
            let outsider = holder(SourceId::Marathon, "x");
            assert_eq!(
                pay.team_of(&outsider, id),
                TeamId::Alone(outsider.clone()),
                "{id}"
            );
        }
        let other = rules.team_of(&holder(SourceId::Consul, "ads"), "ads");
        for h in [
            "shop.example.com",
            "a.shop.example.com",
            "*.x.shop.example.com",
        ] {
            rules.may_claim(&shop, &host(h)).unwrap();
            let err = rules.may_claim(&other, &host(h)).unwrap_err();
            assert!(err.contains("reserved for team \"shop\""), "{err}");
        }
        rules.may_claim(&other, &host("ads.example.com")).unwrap();
        let locked = Ownership {
            unlisted: Unlisted::Deny,
            ..rules
        };
        assert!(locked.may_claim(&other, &host("ads.example.com")).is_err());
    }

    #[test]
    fn share_patterns_name_services_of_the_holders_source_unless_qualified() {
        let owner = SourceId::Consul;
        let svc15 = holder(SourceId::Consul, "svc15");
        assert!(Share::parse("svc*").unwrap().admits(owner, &svc15));
        assert!(Share::parse("svc15").unwrap().admits(owner, &svc15));
        assert!(!Share::parse("svc1").unwrap().admits(owner, &svc15));
        assert!(!Share::parse("marathon:svc*").unwrap().admits(owner, &svc15));
        assert!(Share::parse("marathon:svc*")
            .unwrap()
            .admits(owner, &holder(SourceId::Marathon, "svc_a")));
        for bad in ["*", "ldap:x", "a b*", ""] {
            assert!(Share::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn team_keys_read_back() {
        for team in [
            TeamId::Operator,
            TeamId::Named("shop".into()),
            TeamId::Alone(holder(SourceId::Marathon, "team_web")),
        ] {
            assert_eq!(TeamId::from_key(&team.key()), team);
        }
    }

    #[test]
    fn the_holder_keeps_its_host_whatever_sorts_first() {
        let holder_claim = alone(SourceId::Marathon, "zzz");
        let book = ledger(&[("shop.example.com", &holder_claim)]);
        let claims = [alone(SourceId::Consul, "aaa"), holder_claim.clone()];
        let (settled, lost, intents) = settle_now("shop.example.com", &claims, &book);
        assert_eq!(
            settled,
            Settled::Owned {
                team: holder_claim.team.clone(),
                holder: holder_claim.holder.clone()
            }
        );
        assert_eq!(lost.len(), 1);
        assert!(
            lost[0].1.contains("held by marathon service \"zzz\""),
            "{lost:?}"
        );
        assert_eq!(intents, ClaimIntents::default());
    }

    #[test]
    fn the_file_outranks_the_ledger() {
        let squatter = alone(SourceId::Consul, "aaa");
        let book = ledger(&[("shop.example.com", &squatter)]);
        let file = Claim {
            holder: holder(SourceId::File, "shop"),
            team: TeamId::Operator,
        };
        let (settled, lost, _) = settle_now("shop.example.com", &[squatter, file], &book);
        assert!(matches!(
            settled,
            Settled::Owned {
                team: TeamId::Operator,
                ..
            }
        ));
        assert!(lost[0].1.contains("belongs to the operator"));
    }

    #[test]
    fn a_gone_holder_in_no_team_keeps_its_host_from_everyone() {
        let gone = alone(SourceId::Consul, "shop");
        let book = ledger(&[("shop.example.com", &gone)]);
        // Even a service of the same source: a service in no team is a team of its own.
        let (settled, lost, intents) =
            settle_now("shop.example.com", &[alone(SourceId::Consul, "aaa")], &book);
        assert!(matches!(settled, Settled::Held { .. }));
        assert!(lost[0].1.contains("claims it no more"), "{lost:?}");
        assert_eq!(
            intents.absent,
            [Absent {
                host: host("shop.example.com"),
                version: 7,
                heir: None
            }]
        );
        assert!(intents.record.is_empty());
    }

    #[test]
    fn a_gone_holders_team_serves_its_host_and_inherits_it_on_release() {
        let gone = in_team(SourceId::Marathon, "old", "shop");
        let book = ledger(&[("shop.example.com", &gone)]);
        let heir = in_team(SourceId::Consul, "shop-new", "shop");
        let (settled, lost, intents) = settle_now(
            "shop.example.com",
            &[alone(SourceId::Consul, "aaa"), heir.clone()],
            &book,
        );
        assert_eq!(
            settled,
            Settled::Owned {
                team: heir.team.clone(),
                holder: heir.holder.clone()
            }
        );
        assert_eq!(lost.len(), 1);
        // Nothing written now: the heir takes the entry over only when it is released.
        assert!(intents.record.is_empty());
        assert_eq!(intents.absent[0].heir.as_ref().unwrap().holder, heir.holder);
    }

    #[test]
    fn a_holder_whose_source_is_not_read_in_full_is_never_found_gone() {
        let holder_claim = alone(SourceId::Marathon, "shop");
        let book = ledger(&[("shop.example.com", &holder_claim)]);
        let mut intents = ClaimIntents::default();
        let (settled, lost) = settle(
            &host("shop.example.com"),
            &[alone(SourceId::Consul, "aaa")],
            &book,
            &Ownership::default(),
            &[SourceId::Consul].into(),
            None,
            &mut intents,
        );
        assert!(matches!(settled, Settled::Held { .. }));
        assert!(
            lost[0].1.contains("does not read that source in full"),
            "{lost:?}"
        );
        assert_eq!(intents, ClaimIntents::default());
        let unclaimed: Vec<Absent> =
            unclaimed(&book, |_| false, &[SourceId::Consul].into()).collect();
        assert!(unclaimed.is_empty());
        let unclaimed: Vec<Absent> = unclaimed_all(&book);
        assert_eq!(unclaimed.len(), 1);
    }

    fn unclaimed_all(book: &Ledger) -> Vec<Absent> {
        let healthy = everything();
        unclaimed(book, |_| false, &healthy).collect()
    }

    #[test]
    fn a_first_claim_is_recorded_and_settled_alike_in_any_order() {
        let a = alone(SourceId::Marathon, "zzz");
        let b = alone(SourceId::Consul, "zzz");
        let first = settle_now(
            "new.example.com",
            &[a.clone(), b.clone()],
            &Ledger::default(),
        );
        let second = settle_now("new.example.com", &[b, a], &Ledger::default());
        assert_eq!(first, second);
        assert_eq!(first.2.record.len(), 1);
        assert_eq!(first.2.record[0].holder.source, SourceId::Consul);
    }

    #[test]
    fn an_unrecorded_holding_keeps_its_host_and_is_recorded_again() {
        let incumbent = alone(SourceId::Consul, "zzz");
        let mut book = ledger(&[("shop.example.com", &incumbent)]);
        book.hosts.values_mut().for_each(|h| h.recorded = false);
        let (settled, _, intents) = settle_now(
            "shop.example.com",
            &[alone(SourceId::Consul, "aaa"), incumbent.clone()],
            &book,
        );
        assert!(
            matches!(settled, Settled::Owned { ref holder, .. } if *holder == incumbent.holder)
        );
        assert_eq!(intents.record[0].holder, incumbent.holder);
        // Gone before it was recorded: it is forgotten, not waited for.
        let (settled, _, intents) =
            settle_now("shop.example.com", &[alone(SourceId::Consul, "aaa")], &book);
        assert!(matches!(settled, Settled::Owned { .. }));
        assert!(intents.absent.is_empty());
    }

    #[test]
    fn an_unread_ledger_routes_uncontested_hosts_only_and_records_nothing() {
        let shop = in_team(SourceId::Consul, "shop", "shop");
        let (settled, _, intents) = settle_now(
            "shop.example.com",
            std::slice::from_ref(&shop),
            &Ledger::unread(None),
        );
        assert!(matches!(settled, Settled::Owned { .. }));
        assert_eq!(intents, ClaimIntents::default());
        let contested = [shop, alone(SourceId::Marathon, "aaa")];
        let (settled, lost, intents) =
            settle_now("shop.example.com", &contested, &Ledger::unread(None));
        assert!(matches!(settled, Settled::Held { .. }));
        assert_eq!(lost.len(), 2);
        assert_eq!(intents, ClaimIntents::default());
    }

    #[test]
    fn a_host_beneath_another_teams_wildcard_is_theirs_and_the_reverse() {
        let wide = in_team(SourceId::Consul, "shop-web", "shop");
        let book = ledger(&[("*.shop.example.com", &wide)]);
        let (settled, lost, _) = settle_now(
            "login.shop.example.com",
            &[alone(SourceId::Consul, "evil")],
            &book,
        );
        assert!(matches!(settled, Settled::Held { .. }));
        assert!(
            lost[0].1.contains("lies beneath *.shop.example.com"),
            "{lost:?}"
        );
        let (settled, _, _) = settle_now(
            "login.shop.example.com",
            &[in_team(SourceId::Consul, "shop-login", "shop")],
            &book,
        );
        assert!(matches!(settled, Settled::Owned { .. }));

        // A later wildcard above a host another team holds is refused.
        let login = alone(SourceId::Marathon, "login");
        let book = ledger(&[("login.shop.example.com", &login)]);
        let (settled, lost, intents) = settle_now(
            "*.shop.example.com",
            &[alone(SourceId::Consul, "wild")],
            &book,
        );
        assert!(matches!(settled, Settled::Held { .. }));
        assert!(
            lost[0].1.contains("beneath *.shop.example.com, is held by"),
            "{lost:?}"
        );
        assert!(intents.record.is_empty());
    }
}
