//! The weave bridge: keeps this host's bridge existing, a Linux bridge, admin-up, carrying its
//! address (and MTU), over netlink (see reference/weave.md).
//!
//! ```text
//!  trigger: start-up (before HAProxy), a link/address event, every bridge.interval
//!     │
//!  observe ── netlink reads ──> Observed: the link's kind, IFF_UP, MTU, IPv4 addresses
//!     │
//!  plan (pure) ──> Refuse: a link of another kind (never touched)
//!     │            Fixes: [] = ok; create, MTU, stale address out, address in, up
//!     │
//!  check mode: each fix is reported        ensure mode: apply each fix (WARN with what was
//!     │                                    wrong), observe again, until nothing is left
//!  BridgeState ── watch ──> status page, /status, /healthz
//! ```
//!
//! An existing bridge is never deleted or recreated: its MAC is the host's weave identity.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressMessage;
use serde::Serialize;
use tracing::warn;

use crate::config::{BridgeConfig, BridgeMode};
use crate::network::in_weave_network;

mod keeper;
mod netlink;

pub use keeper::Keeper;

/// One reconcile pass may take this long (two netlink dumps and a few changes).
const PASS_TIMEOUT: Duration = Duration::from_secs(10);
/// Repair rounds in one pass: removing a primary address takes its secondaries along, so the
/// next observation may find one more thing to put back.
const MAX_ROUNDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot open a netlink socket: {source}")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot subscribe to netlink link and address events: {source}")]
    Subscribe {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read link {name}: {}", netlink::describe(source))]
    ReadLink {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot read the addresses of {name}: {}", netlink::describe(source))]
    ReadAddresses {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "cannot {action}: operation not permitted: weft needs CAP_NET_ADMIN to repair bridge \
         {name} (run it as root or with CAP_NET_ADMIN; in a container, also in the host's \
         network namespace), or set bridge.mode = \"check\" to only report"
    )]
    NotPermitted { name: String, action: String },
    #[error("cannot {action} on {name}: {reason}")]
    Change {
        name: String,
        action: String,
        reason: String,
    },
    #[error("netlink did not answer within {0:?}")]
    Timeout(Duration),
}

/// What netlink shows of the link called `bridge.name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `None`: no link has that name.
    pub link: Option<Link>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    /// IFLA_INFO_KIND (`bridge`, `veth`, ...); `None` for a device without one (a NIC).
    pub kind: Option<String>,
    /// The admin flag IFF_UP (not operstate: an empty bridge reads UNKNOWN, and one whose only
    /// port is down reads DOWN, while admin-up).
    pub up: bool,
    pub mtu: Option<u32>,
    /// IPv4 addresses with their prefixes, as written (`10.2.0.1/16`).
    pub addresses: Vec<Ipv4Network>,
    /// The kernel's messages for those addresses: removing one sends its own message back.
    address_messages: Vec<AddressMessage>,
}

impl Link {
    /// A link as a test describes it.
    #[cfg(test)]
    pub fn new(index: u32, kind: Option<&str>, up: bool, mtu: Option<u32>) -> Link {
        Link {
            index,
            kind: kind.map(str::to_string),
            up,
            mtu,
            addresses: Vec::new(),
            address_messages: Vec::new(),
        }
    }
}

/// One change that brings the bridge to what the config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// No link has the name: create the bridge (up, with the MTU if one is configured).
    Create {
        mtu: Option<u32>,
    },
    SetMtu {
        from: Option<u32>,
        to: u32,
    },
    /// An address inside the weave network that is not this host's bridge address.
    RemoveAddress(Ipv4Network),
    AddAddress(Ipv4Network),
    SetUp,
}

impl Fix {
    /// What is wrong, as the operator reads it.
    pub fn problem(&self, name: &str) -> String {
        match self {
            Fix::Create { .. } => format!("bridge {name} is missing"),
            Fix::SetMtu {
                from: Some(from),
                to,
            } => {
                format!("bridge {name} has MTU {from}, not {to}")
            }
            Fix::SetMtu { from: None, to } => format!("bridge {name} has no MTU, not {to}"),
            Fix::RemoveAddress(address) => {
                format!("bridge {name} carries the stale address {address}")
            }
            Fix::AddAddress(address) => format!("bridge {name} lacks its address {address}"),
            Fix::SetUp => format!("bridge {name} is down (IFF_UP unset)"),
        }
    }

    /// What repairs it.
    pub fn action(&self, name: &str) -> String {
        match self {
            Fix::Create { mtu: Some(mtu) } => format!("create bridge {name} with MTU {mtu}"),
            Fix::Create { mtu: None } => format!("create bridge {name}"),
            Fix::SetMtu { to, .. } => format!("set the MTU of {name} to {to}"),
            Fix::RemoveAddress(address) => format!("remove {address} from {name}"),
            Fix::AddAddress(address) => format!("add {address} to {name}"),
            Fix::SetUp => format!("set {name} up"),
        }
    }
}

/// What a pass should do about what it observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The name belongs to a link of another kind: report it, never touch it.
    Refuse(String),
    /// The fixes, in order; none: the bridge is as configured.
    Fixes(Vec<Fix>),
}

/// Compares the link with the config. Pure: the tests feed it observations.
pub fn plan(config: &BridgeConfig, observed: &Observed) -> Plan {
    let name = &config.name;
    let Some(link) = &observed.link else {
        return Plan::Fixes(vec![Fix::Create { mtu: config.mtu }]);
    };
    if link.kind.as_deref() != Some("bridge") {
        let what = match &link.kind {
            Some(kind) => format!("a {kind} link"),
            None => "a device without a link kind (a network card?)".to_string(),
        };
        return Plan::Refuse(format!(
            "link {name} is {what}, not a bridge: weft leaves it untouched (set bridge.name, \
             or bridge.mode = \"off\" if this host's weave is not a plain bridge)"
        ));
    }
    let mut fixes = Vec::new();
    if let Some(mtu) = config.mtu {
        if link.mtu != Some(mtu) {
            fixes.push(Fix::SetMtu {
                from: link.mtu,
                to: mtu,
            });
        }
    }
    // Only the weave range is weft's: an address someone put on the bridge for another network
    // is theirs.
    for address in &link.addresses {
        if in_weave_network(address.ip()) && *address != config.address {
            fixes.push(Fix::RemoveAddress(*address));
        }
    }
    if !link.addresses.contains(&config.address) {
        fixes.push(Fix::AddAddress(config.address));
    }
    // Last: the bridge comes up with its address in place.
    if !link.up {
        fixes.push(Fix::SetUp);
    }
    Plan::Fixes(fixes)
}

/// The outcome of a pass, or of none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum BridgeHealth {
    /// `bridge.mode = "off"`: weft does not look at the bridge.
    Off,
    /// Not checked yet.
    Pending,
    /// As configured; nothing was changed.
    Ok,
    /// Was wrong, and is as configured now.
    Repaired { repairs: Vec<String> },
    /// Wrong, and not repaired (check mode, a refused link, or a failed repair).
    Problem { reasons: Vec<String> },
}

impl BridgeHealth {
    fn problem(reasons: impl IntoIterator<Item = String>) -> BridgeHealth {
        BridgeHealth::Problem {
            reasons: reasons.into_iter().collect(),
        }
    }
}

/// A pass's result, with the link's index for telling which events concern it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub health: BridgeHealth,
    pub index: Option<u32>,
}

/// The last repair, kept after the bridge reads ok again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastRepair {
    /// Unix seconds.
    pub at: u64,
    pub repairs: Vec<String>,
}

/// The bridge as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BridgeState {
    pub mode: BridgeMode,
    pub name: String,
    pub address: String,
    pub mtu: Option<u32>,
    #[serde(flatten)]
    pub health: BridgeHealth,
    /// Unix seconds of the last pass.
    pub checked_at: Option<u64>,
    pub last_repair: Option<LastRepair>,
}

impl BridgeState {
    pub fn new(config: &BridgeConfig) -> BridgeState {
        BridgeState {
            mode: config.mode,
            name: config.name.clone(),
            address: config.address.to_string(),
            mtu: config.mtu,
            health: match config.mode {
                BridgeMode::Off => BridgeHealth::Off,
                BridgeMode::Ensure | BridgeMode::Check => BridgeHealth::Pending,
            },
            checked_at: None,
            last_repair: None,
        }
    }

    /// Takes a pass's outcome, made at `now` (unix seconds).
    pub fn record(&mut self, health: BridgeHealth, now: u64) {
        if let BridgeHealth::Repaired { repairs } = &health {
            self.last_repair = Some(LastRepair {
                at: now,
                repairs: repairs.clone(),
            });
        }
        self.health = health;
        self.checked_at = Some(now);
    }

    /// `off`, `pending`, `ok`, `repaired` or `problem`.
    pub fn state(&self) -> &'static str {
        match self.health {
            BridgeHealth::Off => "off",
            BridgeHealth::Pending => "pending",
            BridgeHealth::Ok => "ok",
            BridgeHealth::Repaired { .. } => "repaired",
            BridgeHealth::Problem { .. } => "problem",
        }
    }

    /// What makes weft unhealthy, one line each; empty when the bridge is fine or off.
    pub fn problems(&self) -> Vec<String> {
        match &self.health {
            BridgeHealth::Pending => vec![format!("bridge {}: not checked yet", self.name)],
            // Most reasons name the bridge already ("bridge weave is down"); the others get it.
            BridgeHealth::Problem { reasons } => reasons
                .iter()
                .map(|r| {
                    if r.starts_with("bridge ") {
                        r.clone()
                    } else {
                        format!("bridge {}: {r}", self.name)
                    }
                })
                .collect(),
            BridgeHealth::Off | BridgeHealth::Ok | BridgeHealth::Repaired { .. } => Vec::new(),
        }
    }

    /// The reasons of a problem, or the repairs just made.
    pub fn details(&self) -> &[String] {
        match &self.health {
            BridgeHealth::Problem { reasons } => reasons,
            BridgeHealth::Repaired { repairs } => repairs,
            _ => &[],
        }
    }
}

impl fmt::Display for BridgeState {
    /// `bridge weave 10.2.0.1/16 (ensure): repaired`, then one indented line per detail.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bridge {} {}", self.name, self.address)?;
        if let Some(mtu) = self.mtu {
            write!(f, " mtu {mtu}")?;
        }
        write!(f, " ({}): {}", self.mode, self.state())?;
        for detail in self.details() {
            write!(f, "\n  {detail}")?;
        }
        Ok(())
    }
}

/// Unix seconds of `time`, as the status page shows times; 0 for a time before 1970 (a clock
/// set wrong is no reason to fail). It lives here because the bridge is the lowest layer that
/// records a time; the status page and the apply loop use it too.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

/// One pass over the bridge in `config.mode`: observe, and in ensure mode repair. Never fails:
/// what goes wrong is the pass's problem.
pub async fn reconcile(config: &BridgeConfig) -> Pass {
    if config.mode == BridgeMode::Off {
        return Pass {
            health: BridgeHealth::Off,
            index: None,
        };
    }
    match tokio::time::timeout(PASS_TIMEOUT, pass(config)).await {
        Ok(pass) => pass,
        Err(_) => Pass {
            health: BridgeHealth::problem([BridgeError::Timeout(PASS_TIMEOUT).to_string()]),
            index: None,
        },
    }
}

async fn pass(config: &BridgeConfig) -> Pass {
    let name = &config.name;
    let failed = |err: BridgeError, index| Pass {
        health: BridgeHealth::problem([err.to_string()]),
        index,
    };
    let netlink = match netlink::Netlink::connect() {
        Ok(netlink) => netlink,
        Err(err) => return failed(err, None),
    };
    let mut observed = match netlink.observe(name).await {
        Ok(observed) => observed,
        Err(err) => return failed(err, None),
    };
    let mut repairs = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let index = observed.link.as_ref().map(|link| link.index);
        let fixes = match plan(config, &observed) {
            Plan::Refuse(reason) => {
                return Pass {
                    health: BridgeHealth::problem([reason]),
                    index,
                }
            }
            Plan::Fixes(fixes) if fixes.is_empty() => {
                let health = if repairs.is_empty() {
                    BridgeHealth::Ok
                } else {
                    BridgeHealth::Repaired { repairs }
                };
                return Pass { health, index };
            }
            Plan::Fixes(fixes) => fixes,
        };
        if config.mode == BridgeMode::Check {
            return Pass {
                health: BridgeHealth::problem(fixes.iter().map(|fix| fix.problem(name))),
                index,
            };
        }
        for fix in &fixes {
            if let Err(err) = netlink.apply(name, &observed, fix).await {
                let reasons = fixes.iter().map(|fix| fix.problem(name));
                return Pass {
                    health: BridgeHealth::problem(reasons.chain([err.to_string()])),
                    index,
                };
            }
            let (wrong, repair) = (fix.problem(name), fix.action(name));
            warn!(bridge = %name, %wrong, %repair, "bridge repaired");
            repairs.push(format!("{wrong}: {repair}"));
        }
        observed = match netlink.observe(name).await {
            Ok(observed) => observed,
            Err(err) => return failed(err, index),
        };
    }
    let index = observed.link.as_ref().map(|link| link.index);
    let left = match plan(config, &observed) {
        Plan::Refuse(reason) => vec![reason],
        Plan::Fixes(fixes) => fixes.iter().map(|fix| fix.problem(name)).collect(),
    };
    let give_up = format!(
        "still wrong after {MAX_ROUNDS} rounds of repairs: is something else changing {name}?"
    );
    Pass {
        health: BridgeHealth::problem(left.into_iter().chain([give_up])),
        index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BridgeConfig {
        BridgeConfig::default()
    }

    fn net(text: &str) -> Ipv4Network {
        text.parse().unwrap()
    }

    fn bridge(up: bool, mtu: u32, addresses: &[&str]) -> Observed {
        let mut link = Link::new(4, Some("bridge"), up, Some(mtu));
        link.addresses = addresses.iter().map(|a| net(a)).collect();
        Observed { link: Some(link) }
    }

    fn fixes(config: &BridgeConfig, observed: &Observed) -> Vec<Fix> {
        match plan(config, observed) {
            Plan::Fixes(fixes) => fixes,
            Plan::Refuse(reason) => panic!("refused: {reason}"),
        }
    }

    #[test]
    fn a_good_bridge_needs_nothing() {
        let observed = bridge(true, 1500, &["10.2.0.1/16"]);
        assert_eq!(fixes(&config(), &observed), []);
    }

    #[test]
    fn a_missing_bridge_is_created_with_the_mtu() {
        let config = BridgeConfig {
            mtu: Some(65535),
            ..config()
        };
        assert_eq!(
            fixes(&config, &Observed::default()),
            [Fix::Create { mtu: Some(65535) }]
        );
        assert_eq!(
            Fix::Create { mtu: None }.problem("weave"),
            "bridge weave is missing"
        );
    }

    #[test]
    fn down_and_flushed_is_two_fixes_up_last() {
        let observed = bridge(false, 1500, &[]);
        assert_eq!(
            fixes(&config(), &observed),
            [Fix::AddAddress(net("10.2.0.1/16")), Fix::SetUp]
        );
    }

    #[test]
    fn stale_addresses_in_the_weave_range_go_others_stay() {
        let observed = bridge(
            true,
            1500,
            &[
                "10.2.0.1/24",
                "10.2.0.1/16",
                "10.2.0.9/16",
                "192.168.5.1/24",
            ],
        );
        assert_eq!(
            fixes(&config(), &observed),
            [
                Fix::RemoveAddress(net("10.2.0.1/24")),
                Fix::RemoveAddress(net("10.2.0.9/16"))
            ]
        );
    }

    #[test]
    fn host_index_address_replaces_the_default() {
        let config = BridgeConfig {
            address: crate::network::bridge_address(Some(
                crate::network::HostIndex::new(3).unwrap(),
            )),
            ..config()
        };
        let observed = bridge(true, 1500, &["10.2.0.1/16"]);
        assert_eq!(
            fixes(&config, &observed),
            [
                Fix::RemoveAddress(net("10.2.0.1/16")),
                Fix::AddAddress(net("10.2.0.3/16"))
            ]
        );
    }

    #[test]
    fn mtu_only_when_configured() {
        let observed = bridge(true, 1500, &["10.2.0.1/16"]);
        assert_eq!(fixes(&config(), &observed), []);
        let config = BridgeConfig {
            mtu: Some(65535),
            ..config()
        };
        let wanted = Fix::SetMtu {
            from: Some(1500),
            to: 65535,
        };
        assert_eq!(fixes(&config, &observed), std::slice::from_ref(&wanted));
        assert_eq!(
            wanted.problem("weave"),
            "bridge weave has MTU 1500, not 65535"
        );
    }

    #[test]
    fn another_kind_is_refused() {
        for kind in [Some("veth"), Some("dummy"), Some("openvswitch"), None] {
            let observed = Observed {
                link: Some(Link::new(2, kind, false, Some(1500))),
            };
            match plan(&config(), &observed) {
                Plan::Refuse(reason) => {
                    assert!(reason.contains("not a bridge"), "{reason}");
                    assert!(reason.contains("untouched"), "{reason}");
                }
                other => panic!("{kind:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn state_records_repairs_and_problems() {
        let mut state = BridgeState::new(&config());
        assert_eq!(state.state(), "pending");
        assert_eq!(state.problems(), ["bridge weave: not checked yet"]);
        state.record(
            BridgeHealth::Repaired {
                repairs: vec!["bridge weave is down (IFF_UP unset): set weave up".into()],
            },
            100,
        );
        assert!(state.problems().is_empty());
        state.record(BridgeHealth::Ok, 110);
        assert_eq!(state.state(), "ok");
        assert_eq!(state.last_repair.as_ref().map(|r| r.at), Some(100));
        state.record(
            BridgeHealth::problem(["link weave is a veth link".into()]),
            120,
        );
        assert_eq!(
            state.problems(),
            ["bridge weave: link weave is a veth link"]
        );
        // A reason that names the bridge is taken as it is.
        let down = Fix::SetUp.problem("weave");
        state.record(BridgeHealth::problem([down.clone()]), 130);
        assert_eq!(state.problems(), [down]);
        state.record(
            BridgeHealth::problem(["link weave is a veth link".into()]),
            140,
        );
        assert_eq!(
            state.to_string(),
            "bridge weave 10.2.0.1/16 (ensure): problem\n  link weave is a veth link"
        );
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["state"], "problem");
        assert_eq!(json["mode"], "ensure");
        assert_eq!(json["reasons"][0], "link weave is a veth link");
        assert_eq!(json["last_repair"]["at"], 100);
    }

    #[test]
    fn off_is_healthy() {
        let config = BridgeConfig {
            mode: BridgeMode::Off,
            ..config()
        };
        let state = BridgeState::new(&config);
        assert_eq!(state.state(), "off");
        assert!(state.problems().is_empty());
    }

    #[test]
    fn permission_error_says_what_weft_needs() {
        let err = BridgeError::NotPermitted {
            name: "weave".into(),
            action: "set weave up".into(),
        };
        let text = err.to_string();
        assert!(text.contains("CAP_NET_ADMIN"), "{text}");
        assert!(text.contains("host's network namespace"), "{text}");
        assert!(
            text.starts_with("cannot set weave up: operation not permitted"),
            "{text}"
        );
    }
}
