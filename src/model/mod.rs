//! The routing table: what HAProxy should route, validated once, as plain data.
//!
//! ```text
//! SourceReport(s) ──build──> RoutingTable { backends, routes }  +  Vec<Dropped>
//!   raw strings               validated keys only                   every rejected input
//! ```
//!
//! Every name, hostname, path, port and address a source gives is checked here; what fails is
//! dropped with a reason and everything else goes on routing. `build` is pure and deterministic:
//! the same reports give the same table, whatever order the sources arrived in.

pub mod certs;
mod diff;
mod input;
mod names;
pub mod ownership;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use itertools::Itertools;

pub use diff::TableDiff;
use input::more_parts_dropped;
pub use input::{
    name_first_parts, CheckDef, Health, Rejected, ServiceDef, SourceId, SourceReport,
    MAX_NAMED_PARTS,
};
pub use names::{
    parse_server, Balance, CheckPath, Hostname, PathPrefix, ServiceName, BACKEND_PREFIX,
};

use crate::escape::clip;
use crate::network::{AllowedNetworks, RefusedAddresses};
use ownership::{settle, Claim, Holder, Settled, Share, TeamId, WildcardClaims};
pub use ownership::{ClaimIntents, Ledger, Ownership};

/// One HAProxy backend: a service and its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub balance: Balance,
    /// HTTP health check; `None`: no active checks.
    pub check: Option<HealthCheck>,
    pub servers: BTreeSet<SocketAddr>,
    /// Where the service came from.
    pub source: SourceId,
    /// Plain HTTP requests redirected to HTTPS.
    pub redirect: Redirect,
    /// `Strict-Transport-Security` on HTTPS answers.
    pub hsts: Hsts,
    /// The service asks ACME certificates for its hosts (`weft.acme=true`).
    pub acme: bool,
}

/// A service's redirect to HTTPS (`redirect = "https"`, `weft.redirect=https`,
/// `HAPROXY_n_REDIRECT_TO_HTTPS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    Off,
    /// For these hosts of the service: the ones a TLS certificate covers (the others are
    /// reported, and stay on HTTP). ACME HTTP-01 challenges (`/.well-known/acme-challenge/`)
    /// are never redirected.
    Https(BTreeSet<Hostname>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hsts {
    Off,
    /// `Strict-Transport-Security: max-age=31536000` on the service's HTTPS answers.
    On,
}

/// A health check HAProxy runs against every server of a backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    /// Failed checks in a row before a server is taken out.
    pub fall: u32,
    /// `timeout check`: how long one check may take; `None`: HAProxy's default (`inter`).
    pub timeout: Option<Duration>,
}

/// What a health check asks of a server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// `option httpchk GET <path>`.
    Http(CheckPath),
    /// A TCP connection (HAProxy's plain `check`).
    Tcp,
}

pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_FALL: u32 = 3;
const CHECK_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
const MAX_CHECK_FALL: u32 = 100;
const CHECK_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// The most hosts one service routes: each is a claim, and a claim is a write to the ledger
/// that every edge reads.
pub const MAX_HOSTS_PER_SERVICE: usize = 64;
/// The most share patterns one service gives: each is matched against every claimant of its
/// hosts.
pub const MAX_SHARES_PER_SERVICE: usize = 64;

/// Where a request goes: a hostname and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub host: Hostname,
    pub path: PathPrefix,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_root() {
            write!(f, "{}", self.host)
        } else {
            write!(f, "{}{}", self.host, self.path)
        }
    }
}

/// The desired routing: plain data, compared whole to decide whether anything changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    pub backends: BTreeMap<ServiceName, Backend>,
    pub routes: BTreeMap<RouteKey, ServiceName>,
    /// The TLS certificates that passed validation (see [`certs`]); empty without `[tls]`.
    pub certificates: certs::Certificates,
    /// The pending ACME HTTP-01 challenges, token -> key authorization; empty without
    /// `[tls.acme]`.
    pub challenges: certs::Challenges,
}

/// An input that did not make it into the table, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dropped {
    pub source: SourceId,
    /// What was dropped: `service "shop" host "a b"`.
    pub subject: String,
    pub reason: String,
}

/// The longest subject of a [`Dropped`] kept, in bytes: it quotes the source's names (a
/// service name, a host, a server as written), which only the source's bounds limit.
pub const MAX_DROPPED_SUBJECT: usize = 300;
/// The longest reason of a [`Dropped`] kept, in bytes.
pub const MAX_DROPPED_REASON: usize = 500;

impl Dropped {
    /// Cuts the subject and the reason to their bounds (on a character boundary, `…` when cut).
    fn clip(&mut self) {
        for (text, max) in [
            (&mut self.subject, MAX_DROPPED_SUBJECT),
            (&mut self.reason, MAX_DROPPED_REASON),
        ] {
            if text.len() > max {
                *text = clip(text, max).into_owned();
            }
        }
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.subject, self.reason)
    }
}

/// What `build` needs besides the reports.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub allowed: AllowedNetworks,
    /// Addresses inside `allowed` that are still no backend's (this edge's own, the bridges,
    /// network and broadcast addresses, `network.deny`).
    pub refused: RefusedAddresses,
    /// Who may claim which hosts.
    pub ownership: Ownership,
}

impl ModelSettings {
    /// Routing to `allowed` except the weave layout's bridges and each network's network and
    /// broadcast addresses, with the default ownership rules.
    pub fn new(allowed: AllowedNetworks) -> ModelSettings {
        ModelSettings {
            refused: RefusedAddresses::new(&allowed, &[crate::network::BRIDGES], &[]),
            allowed,
            ownership: Ownership::default(),
        }
    }
}

/// The table and everything that was left out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Built {
    /// Shared: the apply loop takes it as it is (a copy at 10,000 services is megabytes).
    pub table: Arc<RoutingTable>,
    pub dropped: Vec<Dropped>,
    /// The claims that lost to a host's holder (each is in `dropped` too): what an operator
    /// alerts on.
    pub conflicts: Vec<Dropped>,
    /// What the claims ledger should record.
    pub intents: ClaimIntents,
}

/// For tests: the table of `services` from the file source, on the weave network.
#[cfg(test)]
pub fn test_table(services: Vec<ServiceDef>) -> RoutingTable {
    let report = SourceReport {
        certificates: Default::default(),
        challenges: Default::default(),
        services: services.into_iter().map(Arc::new).collect(),
        ..SourceReport::starting(SourceId::File)
    };
    let settings = ModelSettings::new(AllowedNetworks::new(["10.2.0.0/16".parse().unwrap()]));
    Arc::unwrap_or_clone(build(&[&report], &settings, &Ledger::default()).table)
}

/// A service that passed validation, on its way into the table.
struct Candidate {
    holder: Holder,
    team: TeamId,
    /// Its backend's name: the service name, or `source:name` when two sources use the name.
    key: ServiceName,
    backend: Backend,
    keys: Vec<RouteKey>,
    /// Who may add paths under the hosts it holds.
    share: Vec<Share>,
}

/// Builds the routing table from every source's report and the claims ledger.
///
/// A host goes to whoever holds it in the ledger, as [`ownership`] settles it; a route under a
/// host to the holder, else to the holder's team's service whose name sorts first. A service
/// name that two sources use is kept apart (`consul:shop`), never one hiding the other. The
/// result depends only on the reports and the ledger, not on the order anything arrived in.
pub fn build(reports: &[&SourceReport], settings: &ModelSettings, ledger: &Ledger) -> Built {
    let mut built = Built::default();
    let mut table = RoutingTable::default();
    let mut sorted: Vec<&SourceReport> = reports.to_vec();
    sorted.sort_by_key(|r| r.source);

    for report in &sorted {
        table.certificates.extend(report.certificates.clone());
        table.challenges.extend(report.challenges.clone());
        for rejected in &report.rejected {
            built.dropped.push(Dropped {
                source: report.source,
                subject: rejected.subject.clone(),
                reason: rejected.reason.clone(),
            });
        }
    }

    // Sized once: at 10,000 services a list grown by doubling is copied a dozen times, each time
    // into memory never touched before.
    let mut candidates: Vec<Candidate> =
        Vec::with_capacity(sorted.iter().map(|r| r.services.len()).sum());
    for report in &sorted {
        // Each definition is read once, where it is checked (on rayon's pool for a large
        // report): the loops below read only what that made, one list (and the names again
        // where one has an upper-case letter). The definitions lie apart in memory, each in
        // its own allocation; at 10,000 services, reading each once more here was most of
        // this step's time.
        let checked = validate_all(report.source, &report.services, settings);
        // Names are lowercased: `SHOP-web` would take `shop-web`'s place, and its hosts. Only
        // a report with such a name pays for the check.
        let mut spellings: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        if checked.iter().any(|c| c.upper) {
            for def in &report.services {
                spellings
                    .entry(def.name.to_ascii_lowercase())
                    .or_default()
                    .insert(&def.name);
            }
        }
        // Which definitions are kept, first: the names are compared where they lie, not copied.
        let mut seen: HashSet<&str> = HashSet::with_capacity(checked.len());
        let mut fates = Vec::with_capacity(checked.len());
        for (def, checked) in report.services.iter().zip(&checked) {
            if checked.upper {
                let lower = def.name.to_ascii_lowercase();
                if spellings.get(&lower).is_some_and(|s| s.len() > 1) {
                    built.dropped.push(Dropped {
                        source: report.source,
                        subject: format!("service {:?}", def.name),
                        reason: format!(
                            "its name differs from another service's only in letter case; \
                             names are lowercased, so it would take {lower:?}'s place"
                        ),
                    });
                    fates.push(Fate::Unheard);
                    continue;
                }
            }
            fates.push(match &checked.candidate {
                None => Fate::Dropped,
                Some(candidate) if seen.insert(candidate.key.as_str()) => Fate::Kept,
                Some(candidate) => {
                    built.dropped.push(Dropped {
                        source: report.source,
                        subject: format!("service {:?}", candidate.key.as_str()),
                        reason: "the name is already defined by an earlier definition".into(),
                    });
                    Fate::Dropped
                }
            });
        }
        drop(seen);
        for (checked, fate) in checked.into_iter().zip(fates) {
            match fate {
                Fate::Unheard => {}
                Fate::Dropped => built.dropped.extend(checked.dropped),
                Fate::Kept => {
                    built.dropped.extend(checked.dropped);
                    built.dropped.extend(checked.share_dropped);
                    candidates.extend(checked.candidate);
                }
            }
        }
    }

    // One name in two sources: both stay, apart. The file's keeps the plain name. (Only
    // when two sources give services at all.)
    if sorted.iter().filter(|r| !r.services.is_empty()).count() > 1 {
        let mut sources_of: BTreeMap<ServiceName, BTreeSet<SourceId>> = BTreeMap::new();
        for c in &candidates {
            sources_of
                .entry(c.holder.service.clone())
                .or_default()
                .insert(c.holder.source);
        }
        for c in &mut candidates {
            if sources_of[&c.holder.service].len() > 1 && c.holder.source != SourceId::File {
                c.key = c.holder.service.qualified(c.holder.source);
            }
        }
    }

    // Every claim a team may make, as (host, candidate, path), sorted by host and candidate
    // (stable: a candidate's paths stay in its order). One flat list, not a map of maps: at
    // 10,000 services the maps' nodes were a quarter of a build.
    let mut claimed: Vec<(&Hostname, usize, &PathPrefix)> = Vec::with_capacity(candidates.len());
    for (i, c) in candidates.iter().enumerate() {
        for key in &c.keys {
            if let Err(reason) = settings.ownership.may_claim(&c.team, &key.host) {
                built.dropped.push(Dropped {
                    source: c.holder.source,
                    subject: format!("service {:?} route {key}", c.key.as_str()),
                    reason,
                });
                continue;
            }
            claimed.push((&key.host, i, &key.path));
        }
    }
    claimed.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));

    // Only a source read in full can show that a holder is gone.
    let healthy: BTreeSet<SourceId> = sorted
        .iter()
        .filter(|r| r.health == Health::Ok)
        .map(|r| r.source)
        .collect();
    built.intents.absent.extend(ownership::unclaimed(
        ledger,
        |host| claimed.binary_search_by(|c| c.0.cmp(host)).is_ok(),
        &healthy,
    ));

    // Every route, in key order (hosts in order, each host's paths in order).
    let mut routes_found = Vec::with_capacity(claimed.len());
    // A host the ledger does not hold yet is recorded: at an edge's first build, and in `weft
    // render`, nearly every host.
    let hosts = claimed.chunk_by(|a, b| a.0 == b.0).count();
    built
        .intents
        .record
        .reserve(hosts.saturating_sub(ledger.hosts.len()));
    // Without the ledger, a wildcard and a host beneath it claimed by different teams wait.
    let wildcards = ledger
        .unread
        .then(|| WildcardClaims::new(claimed.iter().map(|c| (c.0, &candidates[c.1].team))));
    // Which candidates route at least one of them.
    let mut routed = vec![false; candidates.len()];
    // A host's routes as (path, candidate), kept between hosts.
    let mut routes: Vec<(&PathPrefix, usize)> = Vec::new();
    for claimants in claimed.chunk_by(|a, b| a.0 == b.0) {
        let host = claimants[0].0;
        // The host's candidates, in order, each once; and the paths one of them claims.
        let ids = || claimants.iter().map(|c| c.1).dedup();
        let paths_of = |i: usize| claimants.iter().filter(move |c| c.1 == i).map(|c| c.2);
        let claims: Vec<Claim> = ids()
            .map(|i| Claim {
                holder: candidates[i].holder.clone(),
                team: candidates[i].team.clone(),
            })
            .collect();
        let (settled, lost) = settle(
            host,
            &claims,
            ledger,
            &settings.ownership,
            &healthy,
            wildcards.as_ref(),
            &mut built.intents,
        );
        // The holder may share its host's paths (never `/`) with named services of other teams.
        // The holder is one of the host's claimants (a holder that claims it no more holds
        // it, not routes it).
        let sharing: &[Share] = match &settled {
            Settled::Owned { holder, .. } => ids()
                .find(|&i| candidates[i].holder == *holder)
                .map_or(&[], |i| candidates[i].share.as_slice()),
            Settled::Held { .. } => &[],
        };
        let owner_source = match &settled {
            Settled::Owned { holder, .. } => holder.source,
            Settled::Held { .. } => SourceId::File,
        };
        let owned = matches!(settled, Settled::Owned { .. });
        let guest = |i: usize| {
            owned
                && sharing
                    .iter()
                    .any(|s| s.admits(owner_source, &candidates[i].holder))
        };
        for (holder, reason) in lost {
            let Some(i) = ids().find(|&i| candidates[i].holder == holder) else {
                continue;
            };
            for path in paths_of(i) {
                if guest(i) && !path.is_root() {
                    continue;
                }
                let key = RouteKey {
                    host: host.clone(),
                    path: path.clone(),
                };
                let dropped = Dropped {
                    source: holder.source,
                    subject: format!("service {:?} route {key}", candidates[i].key.as_str()),
                    reason: reason.clone(),
                };
                built.conflicts.push(dropped.clone());
                built.dropped.push(dropped);
            }
        }
        let Settled::Owned { team, holder } = &settled else {
            continue;
        };
        // Each route under the host: the holder first, then its team, then the services it
        // shares paths with; within each, names in order.
        routes.clear();
        for i in ids() {
            let member = candidates[i].team == *team;
            if member || guest(i) {
                let paths = paths_of(i).filter(|p| member || !p.is_root());
                routes.extend(paths.map(|path| (path, i)));
            }
        }
        // Stable: a path's candidates stay in order.
        routes.sort_by(|a, b| a.0.cmp(b.0));
        for claims in routes.chunk_by_mut(|a, b| a.0 == b.0) {
            claims.sort_by(|&(_, a), &(_, b)| {
                let rank = |i: usize| {
                    let c = &candidates[i];
                    (c.holder != *holder, c.team != *team, &c.key)
                };
                rank(a).cmp(&rank(b))
            });
            let key = RouteKey {
                host: host.clone(),
                path: claims[0].0.clone(),
            };
            let winner = &candidates[claims[0].1].key;
            routed[claims[0].1] = true;
            for &(_, loser) in &claims[1..] {
                let dropped = Dropped {
                    source: candidates[loser].holder.source,
                    subject: format!("service {:?} route {key}", candidates[loser].key.as_str()),
                    reason: format!(
                        "the route is already claimed by service {:?}, which the host's holder \
                         lets route it",
                        winner.as_str()
                    ),
                };
                built.conflicts.push(dropped.clone());
                built.dropped.push(dropped);
            }
            routes_found.push((key, winner.clone()));
        }
    }
    table.routes = routes_found.into_iter().collect();

    // A service that lost every route would be an unreachable backend: say so and drop it.
    // The rest are built in bulk from one list (sorted once, no search per insert): at 10,000
    // services inserting one by one was a quarter of a build.
    let mut backends = Vec::with_capacity(candidates.len());
    for (candidate, routed) in candidates.into_iter().zip(routed) {
        if routed {
            backends.push((candidate.key, candidate.backend));
        } else {
            built.dropped.push(Dropped {
                source: candidate.backend.source,
                subject: format!("service {:?}", candidate.key.as_str()),
                reason: "it routes no host: every route it asked for was dropped".into(),
            });
        }
    }
    table.backends = backends.into_iter().collect();

    redirect_covered_hosts(&mut table, &mut built.dropped);
    built.table = Arc::new(table);
    for dropped in built.dropped.iter_mut().chain(&mut built.conflicts) {
        dropped.clip();
    }
    built.dropped.sort();
    built.conflicts.sort();
    built
}

/// Fills each redirecting service's hosts: those of its routes a certificate covers. A host
/// no certificate covers stays on plain HTTP (a redirect would send browsers to weft's
/// default certificate), and is reported.
fn redirect_covered_hosts(table: &mut RoutingTable, dropped: &mut Vec<Dropped>) {
    for (name, backend) in table.backends.iter_mut() {
        let Redirect::Https(covered) = &mut backend.redirect else {
            continue;
        };
        let hosts: BTreeSet<&Hostname> = table
            .routes
            .iter()
            .filter(|(_, service)| *service == name)
            .map(|(key, _)| &key.host)
            .collect();
        for host in hosts {
            if certs::covers(&table.certificates, host.as_str()) {
                covered.insert(host.clone());
            } else {
                dropped.push(Dropped {
                    source: backend.source,
                    subject: format!("service {:?} redirect of host {:?}", name.as_str(), host.as_str()),
                    reason: format!(
                        "no TLS certificate covers {host}: it is served on plain HTTP, not redirected to HTTPS"
                    ),
                });
            }
        }
    }
}

fn validate_check(def: &ServiceDef) -> Result<Option<HealthCheck>, String> {
    let kind = match &def.check {
        None => return Ok(None),
        Some(CheckDef::Http(raw)) => CheckKind::Http(
            CheckPath::parse(raw)
                .map_err(|reason| format!("invalid health check path: {reason}"))?,
        ),
        Some(CheckDef::Tcp) => CheckKind::Tcp,
    };
    let interval = def.check_interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
    let (min, max) = CHECK_INTERVAL_RANGE;
    if interval < min || interval > max {
        return Err(format!(
            "invalid health check interval {interval:?}: must lie between {min:?} and {max:?}"
        ));
    }
    let fall = def.check_fall.unwrap_or(DEFAULT_CHECK_FALL);
    if fall == 0 || fall > MAX_CHECK_FALL {
        return Err(format!(
            "invalid health check fall count {fall}: must lie between 1 and {MAX_CHECK_FALL}"
        ));
    }
    let timeout = def
        .check_timeout
        .as_deref()
        .map(validate_check_timeout)
        .transpose()?;
    Ok(Some(HealthCheck {
        kind,
        interval,
        fall,
        timeout,
    }))
}

/// `timeout check`, as a source wrote it (`"2s"`, `"500ms"`), within [`CHECK_TIMEOUT_RANGE`].
fn validate_check_timeout(raw: &str) -> Result<Duration, String> {
    let (min, max) = CHECK_TIMEOUT_RANGE;
    match humantime::parse_duration(raw) {
        Ok(timeout) if (min..=max).contains(&timeout) => Ok(timeout),
        Ok(_) => Err(format!(
            "invalid health check timeout {raw:?}: must lie between {min:?} and {max:?}"
        )),
        Err(err) => Err(format!(
            "invalid health check timeout {raw:?}: not a duration like \"2s\": {err}"
        )),
    }
}

/// A definition checked ([`check`]).
struct Checked {
    /// Its name has an upper-case letter: another spelling of it may be in the report.
    upper: bool,
    /// The definition on its way into the table, or `None`: it is dropped.
    candidate: Option<Candidate>,
    /// What of it is dropped (all of it, with no candidate).
    dropped: Vec<Dropped>,
    /// Its share patterns that are dropped: said only if the candidate is not dropped whole
    /// (as a second definition of a name).
    share_dropped: Vec<Dropped>,
}

/// What becomes of a checked definition.
enum Fate {
    /// It goes into the table; what of it is dropped is said.
    Kept,
    /// It is dropped; what its check found is said.
    Dropped,
    /// It is dropped for its name's spelling; what its check found is not said.
    Unheard,
}

/// Reports with at least this many definitions have them checked on rayon's pool.
const VALIDATE_IN_HALVES: usize = 1000;

/// Every definition of a report checked on its own ([`check`]), in order: a large report on
/// rayon's pool, in pieces of at least half [`VALIDATE_IN_HALVES`] (each definition's checks
/// are its own).
fn validate_all(
    source: SourceId,
    services: &[Arc<ServiceDef>],
    settings: &ModelSettings,
) -> Vec<Checked> {
    use rayon::iter::{IndexedParallelIterator, IntoParallelRefIterator, ParallelIterator};
    let check = |def: &Arc<ServiceDef>| check(source, def, settings);
    if services.len() < VALIDATE_IN_HALVES {
        return services.iter().map(check).collect();
    }
    services
        .par_iter()
        .with_min_len(VALIDATE_IN_HALVES / 2)
        .map(check)
        .collect()
}

/// Everything about one definition that needs no other: [`validate`], then who holds it, its
/// team and its share patterns.
fn check(source: SourceId, def: &ServiceDef, settings: &ModelSettings) -> Checked {
    let mut dropped = Vec::new();
    let mut share_dropped = Vec::new();
    let candidate = validate(source, def, settings, &mut dropped).map(|(name, backend, keys)| {
        let holder = Holder {
            source,
            service: name.clone(),
        };
        if def.share.len() > MAX_SHARES_PER_SERVICE {
            share_dropped.push(Dropped {
                source,
                subject: format!("service {:?}", name.as_str()),
                reason: format!(
                    "names {} services to share with: only the first \
                     {MAX_SHARES_PER_SERVICE} count",
                    def.share.len()
                ),
            });
        }
        let mut share = Vec::new();
        for raw in def.share.iter().take(MAX_SHARES_PER_SERVICE) {
            match Share::parse(raw) {
                Ok(pattern) => share.push(pattern),
                Err(reason) => share_dropped.push(Dropped {
                    source,
                    subject: format!("service {:?} share {raw:?}", name.as_str()),
                    reason: format!("invalid share pattern: {reason}"),
                }),
            }
        }
        Candidate {
            share,
            team: settings.ownership.team_of(&holder, &def.origin),
            holder,
            key: name,
            backend,
            keys,
        }
    });
    Checked {
        upper: def.name.bytes().any(|b| b.is_ascii_uppercase()),
        candidate,
        dropped,
        share_dropped,
    }
}

/// Validates one definition. Bad hosts and servers are dropped one by one; a bad name, path,
/// balance or check drops the whole service (routing it differently from what was asked would
/// be worse than not routing it).
fn validate(
    source: SourceId,
    def: &ServiceDef,
    settings: &ModelSettings,
    dropped: &mut Vec<Dropped>,
) -> Option<(ServiceName, Backend, Vec<RouteKey>)> {
    let mut drop = |subject: String, reason: String| {
        dropped.push(Dropped {
            source,
            subject,
            reason,
        })
    };

    let name = match ServiceName::parse(&def.name) {
        Ok(name) => name,
        Err(reason) => {
            drop(
                format!("service {:?}", def.name),
                format!("invalid service name: {reason}"),
            );
            return None;
        }
    };
    // Written only for a drop: every service passes here on every build.
    let subject = || format!("service {:?}", name.as_str());

    let path = match def.path.as_deref().map(PathPrefix::parse).transpose() {
        Ok(path) => path.unwrap_or_else(PathPrefix::root),
        Err(reason) => {
            drop(subject(), format!("invalid path: {reason}"));
            return None;
        }
    };
    let balance = match def.balance.as_deref().map(Balance::parse).transpose() {
        Ok(balance) => balance.unwrap_or_default(),
        Err(reason) => {
            drop(subject(), format!("invalid balance: {reason}"));
            return None;
        }
    };
    let check = match validate_check(def) {
        Ok(check) => check,
        Err(reason) => {
            drop(subject(), reason);
            return None;
        }
    };

    let mut keys = Vec::new();
    if def.hosts.len() > MAX_HOSTS_PER_SERVICE {
        drop(
            subject(),
            format!(
                "asks for {} hosts: only the first {MAX_HOSTS_PER_SERVICE} are routed",
                def.hosts.len()
            ),
        );
    }
    for raw in def.hosts.iter().take(MAX_HOSTS_PER_SERVICE) {
        match Hostname::parse(raw) {
            Ok(host) if host.wildcard_suffix().is_some() && !path.is_root() => drop(
                format!("{} host {raw:?}", subject()),
                "a wildcard host cannot have a path prefix".into(),
            ),
            Ok(host) => keys.push(RouteKey {
                host,
                path: path.clone(),
            }),
            Err(reason) => drop(
                format!("{} host {raw:?}", subject()),
                format!("invalid hostname: {reason}"),
            ),
        }
    }
    if keys.is_empty() {
        drop(subject(), "no valid host to route".into());
        return None;
    }

    let mut servers = BTreeSet::new();
    let mut bad_servers = 0;
    for raw in &def.servers {
        match parse_server(raw, &settings.allowed, &settings.refused) {
            Ok(addr) => {
                servers.insert(addr);
            }
            Err(reason) => {
                bad_servers += 1;
                if bad_servers <= MAX_NAMED_PARTS {
                    drop(format!("{} server {raw:?}", subject()), reason);
                }
            }
        }
    }
    if bad_servers > MAX_NAMED_PARTS {
        drop(
            subject(),
            more_parts_dropped(bad_servers - MAX_NAMED_PARTS, "servers"),
        );
    }

    let redirect = match def.redirect.as_deref() {
        None => Redirect::Off,
        Some(to) if to.eq_ignore_ascii_case("https") => Redirect::Https(BTreeSet::new()),
        Some(other) => {
            drop(
                subject(),
                format!("invalid redirect {other:?}: the one redirect is \"https\""),
            );
            return None;
        }
    };
    let hsts = match def.hsts {
        Some(true) => Hsts::On,
        _ => Hsts::Off,
    };
    Some((
        name,
        Backend {
            balance,
            check,
            servers,
            source,
            redirect,
            hsts,
            acme: def.acme == Some(true),
        },
        keys,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The certificates' report of a directory holding one certificate for `sans`.
    pub(crate) fn tls_report(sans: &[&str]) -> SourceReport {
        let cert = certs::Certificate {
            name: "cert".into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            not_after: 1_800_000_000,
            serial: "01".into(),
            pem: String::new(),
        };
        SourceReport {
            certificates: [("cert".to_string(), cert)].into(),
            health: Health::Ok,
            ..SourceReport::starting(SourceId::Tls)
        }
    }

    #[test]
    fn a_redirect_takes_the_hosts_a_certificate_covers_and_reports_the_others() {
        let mut shop = def(
            "shop",
            &[
                "shop.example.com",
                "a.t.example.com",
                "*.w.example.com",
                "plain.example.com",
            ],
            &["10.2.1.5:80"],
        );
        shop.redirect = Some("HTTPS".into());
        shop.hsts = Some(true);
        let tls = tls_report(&["shop.example.com", "*.t.example.com", "*.w.example.com"]);
        let built = build(
            &[&report(vec![shop]), &tls],
            &settings(),
            &Ledger::default(),
        );
        let backend = &built.table.backends[&ServiceName::parse("shop").unwrap()];
        let hosts: Vec<&str> = match &backend.redirect {
            Redirect::Https(hosts) => hosts.iter().map(Hostname::as_str).collect(),
            Redirect::Off => panic!("no redirect"),
        };
        assert_eq!(
            hosts,
            ["*.w.example.com", "a.t.example.com", "shop.example.com"]
        );
        assert_eq!(backend.hsts, Hsts::On);
        assert_eq!(built.dropped.len(), 1, "{:?}", built.dropped);
        assert_eq!(
            built.dropped[0].reason,
            "no TLS certificate covers plain.example.com: it is served on plain HTTP, not redirected to HTTPS"
        );
        let mut bad = def("bad", &["bad.example.com"], &["10.2.1.5:80"]);
        bad.redirect = Some("http".into());
        let built = build(&[&report(vec![bad])], &settings(), &Ledger::default());
        assert!(built.table.backends.is_empty());
        assert!(built.dropped[0]
            .reason
            .starts_with("invalid redirect \"http\""));
    }

    fn settings() -> ModelSettings {
        ModelSettings::new(AllowedNetworks::new(["10.2.0.0/16".parse().unwrap()]))
    }

    fn def(name: &str, hosts: &[&str], servers: &[&str]) -> ServiceDef {
        ServiceDef::new(name, hosts, servers)
    }

    fn report(services: Vec<ServiceDef>) -> SourceReport {
        SourceReport {
            certificates: Default::default(),
            challenges: Default::default(),
            services: services.into_iter().map(Arc::new).collect(),
            ..SourceReport::starting(SourceId::File)
        }
    }

    /// A hostile definition says what is wrong with it in a bounded number of bounded lines:
    /// 10,000 bad servers in 17 entries, and a megabyte of name or server cut short.
    #[test]
    fn what_a_definition_has_dropped_is_bounded() {
        let servers: Vec<String> = (0..10_000)
            .map(|i| format!("8.8.{}.{}:80", i / 250, i % 250))
            .collect();
        let mut servers: Vec<&str> = servers.iter().map(String::as_str).collect();
        servers.push("10.2.1.5:8080");
        let long = "x".repeat(1 << 20);
        let long_server = format!("{long}:80");
        let built = build(
            &[&report(vec![
                def("shop", &["shop.example.com"], &servers),
                def(&long, &["long.example.com"], &["10.2.1.6:80"]),
                def("other", &["other.example.com"], &[long_server.as_str()]),
            ])],
            &settings(),
            &Ledger::default(),
        );
        let shop = &built.table.backends[&ServiceName::parse("shop").unwrap()];
        assert_eq!(shop.servers.len(), 1, "the good server is routed");
        let shops: Vec<&Dropped> = built
            .dropped
            .iter()
            .filter(|d| d.subject.starts_with("service \"shop\""))
            .collect();
        assert_eq!(shops.len(), MAX_NAMED_PARTS + 1, "{shops:?}");
        assert!(shops.iter().any(|d| d.subject == "service \"shop\""
            && d.reason == "9984 more servers dropped (only the first 16 are named)"));
        for dropped in &built.dropped {
            assert!(dropped.subject.len() <= MAX_DROPPED_SUBJECT + '…'.len_utf8());
            assert!(dropped.reason.len() <= MAX_DROPPED_REASON + '…'.len_utf8());
        }
        assert!(built
            .dropped
            .iter()
            .any(|d| d.subject.starts_with("service \"xxx") && d.subject.ends_with('…')));
        assert!(built
            .dropped
            .iter()
            .any(|d| d.subject.starts_with("service \"other\" server \"xxx")));
    }

    /// Without the ledger, nobody knows whether a wildcard or a host beneath it was claimed
    /// first: claimed by different teams, both wait (as a host two teams claim does); within
    /// one team, both route.
    #[test]
    fn an_unread_ledger_holds_a_wildcard_and_a_host_beneath_it_of_different_teams() {
        let wild = def("wild", &["*.shop.example.com"], &["10.2.1.5:80"]);
        let login = def("login", &["login.shop.example.com"], &["10.2.1.6:80"]);
        let other = def("other", &["other.example.com"], &["10.2.1.7:80"]);
        let built = build(
            &[&consul(vec![wild.clone(), login.clone(), other])],
            &settings(),
            &Ledger::unread(None),
        );
        let hosts: Vec<String> = built
            .table
            .routes
            .keys()
            .map(|key| key.host.to_string())
            .collect();
        assert_eq!(hosts, ["other.example.com"]);
        let reasons: Vec<&str> = built.dropped.iter().map(|d| d.reason.as_str()).collect();
        assert!(
            reasons.iter().any(|r| r.contains(
                "host *.shop.example.com and login.shop.example.com, a wildcard over the other \
                 or a host beneath it, are claimed by different teams"
            )),
            "{reasons:?}"
        );
        // The same services in one team route.
        let mut same = settings();
        same.ownership.teams = vec![ownership::Team {
            name: "shop".into(),
            consul: vec!["wild".into(), "login".into()],
            marathon: vec![],
            hosts: vec![],
        }];
        let built = build(
            &[&consul(vec![wild, login.clone()])],
            &same,
            &Ledger::unread(None),
        );
        assert_eq!(built.table.routes.len(), 2, "{:?}", built.dropped);
        // The operator's wildcard (the services file) neither waits nor makes another wait.
        let corp = def("corp", &["*.shop.example.com"], &["10.2.1.8:80"]);
        let built = build(
            &[&report(vec![corp]), &consul(vec![login])],
            &settings(),
            &Ledger::unread(None),
        );
        assert_eq!(built.table.routes.len(), 2, "{:?}", built.dropped);
    }

    #[test]
    fn bad_entries_are_dropped_one_by_one() {
        let built = build(
            &[&report(vec![
                def(
                    "shop",
                    &["shop.example.com", "bad host"],
                    &["10.2.1.5:8080", "10.2.1.6:0", "8.8.8.8:80"],
                ),
                def("bad name", &["x.example.com"], &["10.2.1.7:80"]),
                def("nohost", &["a b"], &["10.2.1.7:80"]),
            ])],
            &settings(),
            &Ledger::default(),
        );
        let shop = &built.table.backends[&ServiceName::parse("shop").unwrap()];
        assert_eq!(shop.servers.len(), 1);
        assert_eq!(built.table.backends.len(), 1);
        assert_eq!(built.table.routes.len(), 1);
        let subjects: Vec<&str> = built.dropped.iter().map(|d| d.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "service \"bad name\"",
                "service \"nohost\"",
                "service \"nohost\" host \"a b\"",
                "service \"shop\" host \"bad host\"",
                "service \"shop\" server \"10.2.1.6:0\"",
                "service \"shop\" server \"8.8.8.8:80\"",
            ]
        );
    }

    #[test]
    fn route_conflicts_have_a_deterministic_winner() {
        let a = def("alpha", &["shop.example.com"], &["10.2.1.5:80"]);
        let b = def(
            "beta",
            &["shop.example.com", "beta.example.com"],
            &["10.2.1.6:80"],
        );
        let first = build(
            &[&report(vec![a.clone(), b.clone()])],
            &settings(),
            &Ledger::default(),
        );
        let second = build(&[&report(vec![b, a])], &settings(), &Ledger::default());
        assert_eq!(first, second);
        let key = RouteKey {
            host: Hostname::parse("shop.example.com").unwrap(),
            path: PathPrefix::root(),
        };
        assert_eq!(first.table.routes[&key].as_str(), "alpha");
        assert_eq!(first.dropped.len(), 1);
        assert!(first.dropped[0].reason.contains("claimed by service"));
    }

    #[test]
    fn a_service_left_without_routes_is_dropped() {
        let a = def("alpha", &["shop.example.com"], &["10.2.1.5:80"]);
        let b = def("beta", &["shop.example.com"], &["10.2.1.6:80"]);
        let built = build(&[&report(vec![a, b])], &settings(), &Ledger::default());
        assert_eq!(built.table.backends.len(), 1);
        assert_eq!(built.dropped.len(), 2);
    }

    #[test]
    fn duplicate_names_keep_the_first() {
        let a = def("shop", &["a.example.com"], &["10.2.1.5:80"]);
        let b = def("shop", &["b.example.com"], &["10.2.1.6:80"]);
        let built = build(&[&report(vec![a, b])], &settings(), &Ledger::default());
        assert_eq!(built.table.routes.len(), 1);
        assert!(built.dropped[0].reason.contains("already defined"));
    }

    #[test]
    fn a_report_checked_on_the_pool_says_what_each_fate_drops() {
        // Enough definitions to be checked on rayon's pool, with each fate among them: a
        // second definition of a name (its bad host said, its bad share pattern not), another
        // spelling of a name (nothing of its check said), an invalid definition, and a kept one
        // with a bad share pattern.
        let mut services: Vec<ServiceDef> = (0..VALIDATE_IN_HALVES + 200)
            .map(|i| {
                def(
                    &format!("s{i:04}"),
                    &[&format!("h{i}.example.com")],
                    &["10.2.1.5:80"],
                )
            })
            .collect();
        let mut second = def("s0005", &["other.example.com", "a b"], &["10.2.1.6:80"]);
        second.share = vec!["consul:".into()];
        services.push(second);
        let mut spelling = def("S0007", &["spelling.example.com", "a b"], &["10.2.1.6:80"]);
        spelling.share = vec!["consul:".into()];
        services.push(spelling);
        services[900].name = "-bad".into();
        services[1100].share = vec!["nosuch:web".into(), "s0001".into()];
        let report = report(services);

        // The pool's checks are each definition's own.
        let settings = settings();
        let (pooled, one_by_one): (Vec<_>, Vec<_>) = (
            validate_all(SourceId::File, &report.services, &settings),
            report
                .services
                .iter()
                .map(|def| check(SourceId::File, def, &settings))
                .collect(),
        );
        let seen = |checked: &Checked| {
            (
                checked.upper,
                checked.candidate.as_ref().map(|c| {
                    (
                        c.key.clone(),
                        c.holder.clone(),
                        c.team.clone(),
                        c.keys.clone(),
                    )
                }),
                checked.dropped.clone(),
                checked.share_dropped.clone(),
            )
        };
        assert!(pooled.iter().map(seen).eq(one_by_one.iter().map(seen)));

        let built = build(&[&report], &settings, &Ledger::default());
        assert_eq!(built.table.backends.len(), VALIDATE_IN_HALVES + 199);
        let reasons: Vec<(&str, &str)> = built
            .dropped
            .iter()
            .map(|d| (d.subject.as_str(), d.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:#?}");
        let says = |subject: &str, reason: &str| {
            reasons
                .iter()
                .any(|(s, r)| *s == subject && r.contains(reason))
        };
        assert!(says("service \"s0005\"", "already defined"));
        assert!(says("service \"s0005\" host \"a b\"", "invalid hostname"));
        assert!(says("service \"S0007\"", "letter case"));
        assert!(says("service \"-bad\"", "invalid service name"));
        assert!(says(
            "service \"s1100\" share \"nosuch:web\"",
            "not a source"
        ));
        let five = &built.table.backends[&ServiceName::parse("s0005").unwrap()];
        assert!(five.servers.contains(&"10.2.1.5:80".parse().unwrap()));
    }

    #[test]
    fn health_checks_are_bounded() {
        let mut d = def("shop", &["shop.example.com"], &["10.2.1.5:80"]);
        d.check = Some(CheckDef::Http("/health".into()));
        let built = build(&[&report(vec![d.clone()])], &settings(), &Ledger::default());
        let check = built
            .table
            .backends
            .values()
            .next()
            .unwrap()
            .check
            .clone()
            .unwrap();
        assert_eq!(
            (check.interval, check.fall),
            (DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_FALL)
        );
        assert_eq!(check.timeout, None);
        for (interval, fall, timeout, why) in [
            (Some(Duration::from_millis(10)), None, None, "interval"),
            (None, Some(0), None, "fall"),
            (None, Some(1000), None, "fall"),
            (
                None,
                None,
                Some("50ms"),
                "timeout \"50ms\": must lie between",
            ),
            (None, None, Some("2h"), "timeout \"2h\": must lie between"),
            (None, None, Some("soon"), "timeout \"soon\": not a duration"),
        ] {
            let mut bad = d.clone();
            bad.check_interval = interval;
            bad.check_fall = fall;
            bad.check_timeout = timeout.map(Into::into);
            let built = build(&[&report(vec![bad])], &settings(), &Ledger::default());
            assert!(built.table.backends.is_empty());
            assert!(built.dropped[0].reason.contains(why), "{:?}", built.dropped);
        }
    }

    #[test]
    fn check_timeouts_and_tcp_checks() {
        let mut d = def("shop", &["shop.example.com"], &["10.2.1.5:80"]);
        d.check = Some(CheckDef::Tcp);
        d.check_timeout = Some("1500ms".into());
        d.check_fall = Some(4);
        let built = build(&[&report(vec![d])], &settings(), &Ledger::default());
        let check = built.table.backends.values().next().unwrap().check.clone();
        assert_eq!(
            check,
            Some(HealthCheck {
                kind: CheckKind::Tcp,
                interval: DEFAULT_CHECK_INTERVAL,
                fall: 4,
                timeout: Some(Duration::from_millis(1500)),
            })
        );
    }

    fn consul(services: Vec<ServiceDef>) -> SourceReport {
        SourceReport {
            certificates: Default::default(),
            challenges: Default::default(),
            services: services.into_iter().map(Arc::new).collect(),
            health: Health::Ok,
            ..SourceReport::starting(SourceId::Consul)
        }
    }

    /// `build`, then the ledger as a store would hold it after the intents were written.
    fn build_and_record(reports: &[&SourceReport], ledger: &mut Ledger) -> Built {
        let built = build(reports, &settings(), ledger);
        for record in &built.intents.record {
            ledger
                .hosts
                .entry(record.host.clone())
                .or_insert(ownership::Holding {
                    holder: record.holder.clone(),
                    team: record.team.key(),
                    version: 1,
                    recorded: true,
                });
        }
        built
    }

    #[test]
    fn a_name_that_differs_only_in_case_never_takes_the_services_place() {
        let real = def("shop-web", &["shop.example.com"], &["10.2.1.5:80"]);
        let mut ledger = Ledger::default();
        build_and_record(&[&consul(vec![real.clone()])], &mut ledger);
        let impostor = def("SHOP-WEB", &["shop.example.com"], &["10.2.9.9:80"]);
        for services in [vec![impostor.clone(), real.clone()], vec![real, impostor]] {
            let built = build(&[&consul(services)], &settings(), &ledger);
            let shop = &built.table.backends[&ServiceName::parse("shop-web").unwrap()];
            assert_eq!(shop.servers.len(), 1);
            assert!(shop.servers.contains(&"10.2.1.5:80".parse().unwrap()));
            assert!(built
                .dropped
                .iter()
                .any(|d| d.subject == "service \"SHOP-WEB\"" && d.reason.contains("letter case")));
        }
    }

    #[test]
    fn a_squatter_of_the_same_source_inherits_nothing_and_adds_no_path() {
        let shop = def("shop", &["shop.example.com"], &["10.2.1.5:80"]);
        let squatter = def("aaa", &["shop.example.com"], &["10.2.9.9:80"]);
        let mut login = def("zzz", &["shop.example.com"], &["10.2.9.9:80"]);
        login.path = Some("/login".into());
        let mut ledger = Ledger::default();
        build_and_record(&[&consul(vec![shop.clone()])], &mut ledger);
        let built = build(
            &[&consul(vec![shop.clone(), squatter.clone(), login])],
            &settings(),
            &ledger,
        );
        assert_eq!(built.table.routes.len(), 1, "{:?}", built.table.routes);
        assert_eq!(built.conflicts.len(), 2, "{:?}", built.conflicts);
        // The holder redeploys: gone from one build. The host waits for it.
        let built = build_and_record(&[&consul(vec![squatter.clone()])], &mut ledger);
        assert!(built.table.routes.is_empty());
        assert_eq!(built.intents.absent.len(), 1);
        assert!(built.intents.absent[0].heir.is_none());
        let built = build(&[&consul(vec![squatter, shop])], &settings(), &ledger);
        let key = RouteKey {
            host: Hostname::parse("shop.example.com").unwrap(),
            path: PathPrefix::root(),
        };
        assert_eq!(built.table.routes[&key].as_str(), "shop");
    }

    #[test]
    fn a_ledger_entry_nobody_claims_is_released_in_time() {
        let shop = def("shop", &["shop.example.com"], &["10.2.1.5:80"]);
        let mut ledger = Ledger::default();
        build_and_record(&[&consul(vec![shop])], &mut ledger);
        let built = build(&[&consul(Vec::new())], &settings(), &ledger);
        assert_eq!(built.intents.absent.len(), 1);
        // Not while the source is not read in full.
        let degraded = SourceReport {
            certificates: Default::default(),
            challenges: Default::default(),
            health: Health::Degraded {
                reason: "down".into(),
                since: std::time::SystemTime::now(),
            },
            ..consul(Vec::new())
        };
        let built = build(&[&degraded], &settings(), &ledger);
        assert!(built.intents.absent.is_empty());
    }

    #[test]
    fn a_service_routes_at_most_so_many_hosts() {
        let hosts: Vec<String> = (0..MAX_HOSTS_PER_SERVICE + 10)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let built = build(
            &[&consul(vec![def("many", &hosts, &["10.2.1.5:80"])])],
            &settings(),
            &Ledger::default(),
        );
        assert_eq!(built.table.routes.len(), MAX_HOSTS_PER_SERVICE);
        assert!(built
            .dropped
            .iter()
            .any(|d| d.reason.contains("only the first 64")));

        let mut sharing = def("sharing", &["s.example.com"], &["10.2.1.5:80"]);
        sharing.share = (0..MAX_SHARES_PER_SERVICE + 1)
            .map(|i| format!("svc{i}"))
            .collect();
        let built = build(&[&consul(vec![sharing])], &settings(), &Ledger::default());
        assert!(built
            .dropped
            .iter()
            .any(|d| d.reason.contains("names 65 services to share with")));
    }

    #[test]
    fn wildcard_with_path_is_dropped() {
        let mut d = def(
            "shop",
            &["*.example.com", "shop.example.com"],
            &["10.2.1.5:80"],
        );
        d.path = Some("/api".into());
        let built = build(&[&report(vec![d])], &settings(), &Ledger::default());
        assert_eq!(built.table.routes.len(), 1);
        assert!(built.dropped[0].reason.contains("wildcard"));
    }

    /// Inside the allowed network but no container's: each server dropped with its own
    /// reason, the service's other servers kept.
    #[test]
    fn refused_servers_are_dropped_with_their_reason() {
        let allowed = AllowedNetworks::new(["10.2.0.0/16".parse().unwrap()]);
        let deny = [crate::network::DenyRule::parse("10.2.0.0/16:22").unwrap()];
        let settings = ModelSettings {
            refused: RefusedAddresses::new(&allowed, &[crate::network::BRIDGES], &deny)
                .with_own(["10.2.0.1".parse().unwrap()], [80]),
            allowed,
            ownership: Ownership::default(),
        };
        let d = def(
            "shop",
            &["shop.example.com"],
            &[
                "10.2.0.1:80",
                "10.2.0.0:80",
                "10.2.255.255:80",
                "10.2.0.5:80",
                "10.2.1.5:22",
                "10.2.1.5:80",
            ],
        );
        let built = build(&[&report(vec![d])], &settings, &Ledger::default());
        let shop = &built.table.backends[&ServiceName::parse("shop").unwrap()];
        assert_eq!(
            shop.servers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.2.1.5:80"]
        );
        let reasons: Vec<String> = built
            .dropped
            .iter()
            .map(|d| format!("{}: {}", d.subject, d.reason))
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:#?}");
        for want in [
            "server \"10.2.0.1:80\": address 10.2.0.1 is this edge's own",
            "server \"10.2.0.0:80\": address 10.2.0.0 is the network address of 10.2.0.0/16",
            "server \"10.2.255.255:80\": address 10.2.255.255 is the broadcast address",
            "server \"10.2.0.5:80\": address 10.2.0.5 lies in 10.2.0.0/24 (network.bridges)",
            "server \"10.2.1.5:22\": address 10.2.1.5:22 is refused by network.deny entry \"10.2.0.0/16:22\"",
        ] {
            assert!(reasons.iter().any(|r| r.contains(want)), "{want}: {reasons:#?}");
        }
    }
}
