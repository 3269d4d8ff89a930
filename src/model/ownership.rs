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
//!   is dropped with a reason that names the holder. A holder that stops claiming keeps the host
//!   for `release_after`, so a redeploy does not hand it away; its own team may take it over at
//!   once.
//! - Paths under a host are added only by the holder's team.
//! - A host beneath a wildcard held by another team is that team's.
//!
//! Everything here is pure: the ledger comes in as data, and what should be written to it goes
//! out as [`ClaimIntents`] for the controller to record.

use std::collections::BTreeMap;
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
    /// The services of a source that no team claims: each source is one team by default.
    Source(SourceId),
}

impl TeamId {
    /// The form kept in the ledger: `shop`, or `@consul` for a source's default team (a team
    /// name never holds `@`).
    pub fn key(&self) -> String {
        match self {
            TeamId::Operator => "@file".into(),
            TeamId::Named(name) => name.clone(),
            TeamId::Source(source) => format!("@{source}"),
        }
    }

    pub fn from_key(key: &str) -> TeamId {
        match key.strip_prefix('@') {
            Some("file") => TeamId::Operator,
            Some("consul") => TeamId::Source(SourceId::Consul),
            Some("marathon") => TeamId::Source(SourceId::Marathon),
            _ => TeamId::Named(key.to_string()),
        }
    }
}

impl fmt::Display for TeamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeamId::Operator => f.write_str("the operator (file source)"),
            TeamId::Named(name) => write!(f, "team {name:?}"),
            TeamId::Source(source) => write!(f, "the {source} services of no team"),
        }
    }
}

impl Ownership {
    /// The team of a service: the first team whose prefixes match its origin (Consul service
    /// name, Marathon app id), else its source's default team.
    pub fn team_of(&self, source: SourceId, origin: &str) -> TeamId {
        let prefixes = |team: &Team| match source {
            SourceId::File => Vec::new(),
            SourceId::Consul => team.consul.clone(),
            SourceId::Marathon => team.marathon.clone(),
        };
        if source == SourceId::File {
            return TeamId::Operator;
        }
        self.teams
            .iter()
            .find(|team| {
                prefixes(team)
                    .iter()
                    .any(|p| origin.starts_with(p.as_str()))
            })
            .map_or(TeamId::Source(source), |team| {
                TeamId::Named(team.name.clone())
            })
    }

    /// Whether `team` may claim `host` at all; `Err` says why not.
    pub fn may_claim(&self, team: &TeamId, host: &Hostname) -> Result<(), String> {
        if *team == TeamId::Operator {
            return Ok(());
        }
        wildcard_breadth(host)?;
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
    /// The store's version of the entry (Consul's ModifyIndex; 0 in a local ledger), for
    /// check-and-set writes.
    pub version: u64,
}

/// The claims ledger: which service holds each host, as recorded when it first claimed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub hosts: BTreeMap<Hostname, Holding>,
    /// Not read yet (its store did not answer in time): a host that one team alone claims is
    /// routed, a contested one waits for the ledger, and nothing is recorded.
    pub unread: bool,
}

impl Ledger {
    /// The stand-in for a ledger whose store has not answered yet.
    pub fn unread() -> Ledger {
        Ledger {
            hosts: BTreeMap::new(),
            unread: true,
        }
    }

    /// The closest wildcard entry above `host` (`*.b.c` for `a.b.c`), if any.
    fn covering_wildcard(&self, host: &Hostname) -> Option<(&Hostname, &Holding)> {
        let name = host.wildcard_suffix().map_or(host.as_str(), |s| &s[1..]);
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            let wildcard = format!("*.{parent}");
            if let Some((key, holding)) = self.hosts.get_key_value(wildcard.as_str()) {
                if key != host {
                    return Some((key, holding));
                }
            }
            rest = parent;
        }
        None
    }
}

/// What the ledger should record after a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimIntents {
    /// Hosts to record for a holder: new ones (`replaces` None), or taken over by the absent
    /// holder's own team (`replaces` the version seen).
    pub record: Vec<Record>,
    /// Hosts whose recorded holder claims them no more: released after `release_after`.
    pub absent: Vec<Hostname>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub host: Hostname,
    pub holder: Holder,
    pub team: TeamId,
    /// The version of the entry this replaces; `None`: create only if absent.
    pub replaces: Option<u64>,
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

/// Settles one host among its claimants (every claimant already passed [`Ownership::may_claim`]).
/// Returns the outcome, and the losing claimants each with its reason.
pub fn settle(
    host: &Hostname,
    claims: &[Claim],
    ledger: &Ledger,
    ownership: &Ownership,
    intents: &mut ClaimIntents,
) -> (Settled, Vec<(Holder, String)>) {
    let mut sorted: Vec<&Claim> = claims.iter().collect();
    sorted.sort_by(|a, b| a.holder.cmp(&b.holder));
    let losers = |owner: &TeamId, why: &dyn Fn() -> String| -> Vec<(Holder, String)> {
        sorted
            .iter()
            .filter(|c| c.team != *owner)
            .map(|c| (c.holder.clone(), why()))
            .collect()
    };

    // The operator's file outranks every ledger entry.
    if let Some(file) = sorted.iter().find(|c| c.team == TeamId::Operator) {
        let holder = file.holder.clone();
        let lost = losers(&TeamId::Operator, &|| {
            format!("host {host} belongs to the operator: the file source routes it ({holder})")
        });
        return (
            Settled::Owned {
                team: TeamId::Operator,
                holder: file.holder.clone(),
            },
            lost,
        );
    }

    if let Some(holding) = ledger.hosts.get(host) {
        if let Some(present) = sorted.iter().find(|c| c.holder == holding.holder) {
            let team = present.team.clone();
            let holder = holding.holder.clone();
            let lost = losers(&team, &|| {
                format!("host {host} is held by {holder} ({team}), which claimed it first")
            });
            return (Settled::Owned { team, holder }, lost);
        }
        // Its holder claims it no more: its own team may take it over, nobody else until the
        // ledger releases it.
        intents.absent.push(host.clone());
        let team = TeamId::from_key(&holding.team);
        if let Some(heir) = sorted.iter().find(|c| c.team == team) {
            intents.record.push(Record {
                host: host.clone(),
                holder: heir.holder.clone(),
                team: team.clone(),
                replaces: Some(holding.version),
            });
            let holder = heir.holder.clone();
            let lost = losers(&team, &|| {
                format!("host {host} is held by {team}, now through {holder}")
            });
            return (Settled::Owned { team, holder }, lost);
        }
        let reason = format!(
            "host {host} is held by {} ({team}), which claims it no more; it is released {} \
             after that service was last seen",
            holding.holder,
            humantime::format_duration(ownership.release_after)
        );
        let lost = sorted
            .iter()
            .map(|c| (c.holder.clone(), reason.clone()))
            .collect();
        return (Settled::Held { reason }, lost);
    }

    // A host beneath another team's wildcard is that team's.
    if let Some((wildcard, holding)) = ledger.covering_wildcard(host) {
        let team = TeamId::from_key(&holding.team);
        let outsiders = sorted.iter().all(|c| c.team != team);
        if outsiders {
            let reason = format!(
                "host {host} lies beneath {wildcard}, held by {} ({team})",
                holding.holder
            );
            let lost = sorted
                .iter()
                .map(|c| (c.holder.clone(), reason.clone()))
                .collect();
            return (Settled::Held { reason }, lost);
        }
    }

    // A first claim: recorded, so that every edge and every later claimant sees its holder.
    // Claims that arrive together are settled alike on every edge: source, then name.
    let Some(first) = sorted.first() else {
        return (
            Settled::Held {
                reason: format!("nobody claims host {host}"),
            },
            Vec::new(),
        );
    };
    if ledger.unread {
        let (team, holder) = (first.team.clone(), first.holder.clone());
        if sorted.iter().all(|c| c.team == team) {
            return (Settled::Owned { team, holder }, Vec::new());
        }
        let reason = format!(
            "host {host} is claimed by more than one team, and the claims ledger is not read \
             yet: it waits for the ledger"
        );
        let lost = sorted
            .iter()
            .map(|c| (c.holder.clone(), reason.clone()))
            .collect();
        return (Settled::Held { reason }, lost);
    }
    intents.record.push(Record {
        host: host.clone(),
        holder: first.holder.clone(),
        team: first.team.clone(),
        replaces: None,
    });
    let (team, holder) = (first.team.clone(), first.holder.clone());
    let lost = losers(&team, &|| {
        format!("host {host} is claimed at the same time by {holder} ({team}), which sorts first")
    });
    (Settled::Owned { team, holder }, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> Hostname {
        Hostname::parse(h).unwrap()
    }

    fn claim(source: SourceId, name: &str, team: TeamId) -> Claim {
        Claim {
            holder: Holder {
                source,
                service: ServiceName::parse(name).unwrap(),
            },
            team,
        }
    }

    fn ledger(entries: &[(&str, SourceId, &str, TeamId)]) -> Ledger {
        Ledger {
            hosts: entries
                .iter()
                .map(|(h, source, name, team)| {
                    (
                        host(h),
                        Holding {
                            holder: Holder {
                                source: *source,
                                service: ServiceName::parse(name).unwrap(),
                            },
                            team: team.key(),
                            version: 7,
                        },
                    )
                })
                .collect(),
            unread: false,
        }
    }

    #[test]
    fn wildcards_need_two_labels_beneath_the_public_suffix() {
        let rules = Ownership::default();
        let consul = TeamId::Source(SourceId::Consul);
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
        let shop = rules.team_of(SourceId::Marathon, "/shop/web");
        assert_eq!(shop, TeamId::Named("shop".into()));
        assert_eq!(
            rules.team_of(SourceId::Consul, "shopping"),
            TeamId::Source(SourceId::Consul)
        );
        let other = rules.team_of(SourceId::Consul, "ads");
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
    fn the_holder_keeps_its_host_whatever_sorts_first() {
        let h = host("shop.example.com");
        let marathon = TeamId::Source(SourceId::Marathon);
        let consul = TeamId::Source(SourceId::Consul);
        let book = ledger(&[(
            "shop.example.com",
            SourceId::Marathon,
            "zzz",
            marathon.clone(),
        )]);
        let claims = [
            claim(SourceId::Consul, "aaa", consul),
            claim(SourceId::Marathon, "zzz", marathon.clone()),
        ];
        let mut intents = ClaimIntents::default();
        let (settled, lost) = settle(&h, &claims, &book, &Ownership::default(), &mut intents);
        assert_eq!(
            settled,
            Settled::Owned {
                team: marathon,
                holder: claims[1].holder.clone()
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
        let h = host("shop.example.com");
        let consul = TeamId::Source(SourceId::Consul);
        let book = ledger(&[("shop.example.com", SourceId::Consul, "aaa", consul.clone())]);
        let claims = [
            claim(SourceId::Consul, "aaa", consul),
            claim(SourceId::File, "shop", TeamId::Operator),
        ];
        let (settled, lost) = settle(
            &h,
            &claims,
            &book,
            &Ownership::default(),
            &mut ClaimIntents::default(),
        );
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
    fn an_absent_holder_keeps_its_host_from_other_teams_but_not_its_own() {
        let h = host("shop.example.com");
        let marathon = TeamId::Source(SourceId::Marathon);
        let consul = TeamId::Source(SourceId::Consul);
        let book = ledger(&[(
            "shop.example.com",
            SourceId::Marathon,
            "old",
            marathon.clone(),
        )]);
        let mut intents = ClaimIntents::default();
        let (settled, lost) = settle(
            &h,
            &[claim(SourceId::Consul, "aaa", consul.clone())],
            &book,
            &Ownership::default(),
            &mut intents,
        );
        assert!(matches!(settled, Settled::Held { .. }));
        assert!(lost[0].1.contains("claims it no more"), "{lost:?}");
        assert_eq!(intents.absent, std::slice::from_ref(&h));
        assert!(intents.record.is_empty());

        let mut intents = ClaimIntents::default();
        let (settled, _) = settle(
            &h,
            &[
                claim(SourceId::Consul, "aaa", consul),
                claim(SourceId::Marathon, "new", marathon.clone()),
            ],
            &book,
            &Ownership::default(),
            &mut intents,
        );
        assert!(matches!(settled, Settled::Owned { ref team, .. } if *team == marathon));
        assert_eq!(intents.record[0].replaces, Some(7));
    }

    #[test]
    fn a_first_claim_is_recorded_and_settled_alike_in_any_order() {
        let h = host("new.example.com");
        let a = claim(
            SourceId::Marathon,
            "zzz",
            TeamId::Source(SourceId::Marathon),
        );
        let b = claim(SourceId::Consul, "zzz", TeamId::Source(SourceId::Consul));
        let mut one = ClaimIntents::default();
        let mut two = ClaimIntents::default();
        let rules = Ownership::default();
        let first = settle(
            &h,
            &[a.clone(), b.clone()],
            &Ledger::default(),
            &rules,
            &mut one,
        );
        let second = settle(&h, &[b, a], &Ledger::default(), &rules, &mut two);
        assert_eq!(first, second);
        assert_eq!(one, two);
        assert_eq!(one.record.len(), 1);
        assert_eq!(one.record[0].holder.source, SourceId::Consul);
    }

    #[test]
    fn an_unread_ledger_routes_uncontested_hosts_only_and_records_nothing() {
        let h = host("shop.example.com");
        let consul = TeamId::Source(SourceId::Consul);
        let mut intents = ClaimIntents::default();
        let alone = [claim(SourceId::Consul, "shop", consul.clone())];
        let (settled, _) = settle(
            &h,
            &alone,
            &Ledger::unread(),
            &Ownership::default(),
            &mut intents,
        );
        assert!(matches!(settled, Settled::Owned { .. }));
        let contested = [
            claim(SourceId::Consul, "shop", consul),
            claim(
                SourceId::Marathon,
                "aaa",
                TeamId::Source(SourceId::Marathon),
            ),
        ];
        let (settled, lost) = settle(
            &h,
            &contested,
            &Ledger::unread(),
            &Ownership::default(),
            &mut intents,
        );
        assert!(matches!(settled, Settled::Held { .. }));
        assert_eq!(lost.len(), 2);
        assert_eq!(intents, ClaimIntents::default());
    }

    #[test]
    fn a_host_beneath_another_teams_wildcard_is_theirs() {
        let shop = TeamId::Named("shop".into());
        let book = ledger(&[(
            "*.shop.example.com",
            SourceId::Consul,
            "shop-web",
            shop.clone(),
        )]);
        let (settled, lost) = settle(
            &host("login.shop.example.com"),
            &[claim(
                SourceId::Consul,
                "evil",
                TeamId::Source(SourceId::Consul),
            )],
            &book,
            &Ownership::default(),
            &mut ClaimIntents::default(),
        );
        assert!(matches!(settled, Settled::Held { .. }));
        assert!(
            lost[0].1.contains("lies beneath *.shop.example.com"),
            "{lost:?}"
        );
        let (settled, _) = settle(
            &host("login.shop.example.com"),
            &[claim(SourceId::Consul, "shop-login", shop)],
            &book,
            &Ownership::default(),
            &mut ClaimIntents::default(),
        );
        assert!(matches!(settled, Settled::Owned { .. }));
    }
}
