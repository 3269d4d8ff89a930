//! `[bridge]`: which weave bridge weft keeps up, and how hard it tries.

use std::fmt;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::{duration_at_least, Issues};
use crate::network::{bridge_address, normalise, HostIndex, WEAVE, WEAVE_NETWORK};

pub const DEFAULT_BRIDGE_NAME: &str = "weave";
pub const DEFAULT_BRIDGE_INTERVAL: Duration = Duration::from_secs(10);
/// The kernel refuses a bridge MTU outside these (68: IPv4's minimum; 65535: the bridge's
/// maximum, what `weave create-bridge` set).
const MTU_RANGE: std::ops::RangeInclusive<i64> = 68..=65535;

/// `[bridge]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBridge {
    /// `ensure` (default): create the bridge if missing and repair it; `check`: report only,
    /// change nothing; `off`: leave it alone entirely.
    mode: Option<String>,
    /// The bridge's link name. Default `weave`.
    name: Option<String>,
    /// This host's bridge address, inside the weave network `10.2.0.0/16` (as a /16).
    /// Default `10.2.0.1/16`.
    address: Option<String>,
    /// Instead of `address`: this host's 1-based index N, whose bridge carries `10.2.0.N/16`.
    host_index: Option<i64>,
    /// The bridge's MTU in bytes (68-65535). Default: unset, the MTU is left as it is.
    mtu: Option<i64>,
    /// Time between two periodic checks, besides the netlink events. Default `10s`.
    interval: Option<String>,
}

/// What weft does about the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeMode {
    /// Create the bridge if missing, repair what is wrong.
    Ensure,
    /// Report what is wrong, change nothing.
    Check,
    /// Leave the bridge alone (it is someone else's, or this is not a weave host).
    Off,
}

impl fmt::Display for BridgeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BridgeMode::Ensure => "ensure",
            BridgeMode::Check => "check",
            BridgeMode::Off => "off",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub mode: BridgeMode,
    /// A valid Linux interface name.
    pub name: String,
    /// This host's bridge address with the weave network's prefix, e.g. `10.2.0.1/16`.
    pub address: Ipv4Network,
    pub mtu: Option<u32>,
    pub interval: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            mode: BridgeMode::Ensure,
            name: DEFAULT_BRIDGE_NAME.into(),
            address: bridge_address(None),
            mtu: None,
            interval: DEFAULT_BRIDGE_INTERVAL,
        }
    }
}

pub(super) fn validate_bridge(raw: RawBridge, issues: &mut Issues) -> BridgeConfig {
    let defaults = BridgeConfig::default();
    let mode = match raw.mode.as_deref() {
        None | Some("ensure") => BridgeMode::Ensure,
        Some("check") => BridgeMode::Check,
        Some("off") => BridgeMode::Off,
        Some(other) => {
            issues.add(
                "bridge.mode",
                format!("{other:?} is not one of ensure, check, off"),
            );
            defaults.mode
        }
    };
    let name = raw.name.unwrap_or(defaults.name);
    if let Err(reason) = check_link_name(&name) {
        issues.add("bridge.name", format!("{name:?} {reason}"));
    }
    let index = raw.host_index.and_then(|n| match HostIndex::new(n) {
        Ok(index) => Some(index),
        Err(err) => {
            issues.add("bridge.host_index", err);
            None
        }
    });
    let address = match (raw.address, raw.host_index) {
        (Some(_), Some(_)) => {
            issues.add(
                "bridge.address",
                "and bridge.host_index are exclusive: host_index = N means address = \"10.2.0.N/16\"",
            );
            defaults.address
        }
        (Some(text), None) => parse_address(&text).unwrap_or_else(|reason| {
            issues.add("bridge.address", format!("{text:?} {reason}"));
            defaults.address
        }),
        (None, _) => bridge_address(index),
    };
    let mtu = raw.mtu.and_then(|mtu| {
        if MTU_RANGE.contains(&mtu) {
            u32::try_from(mtu).ok()
        } else {
            issues.add(
                "bridge.mtu",
                format!("{mtu} is outside 68-65535, the MTUs a bridge takes"),
            );
            None
        }
    });
    let interval = duration_at_least(
        raw.interval,
        DEFAULT_BRIDGE_INTERVAL,
        Duration::from_secs(1),
        "bridge.interval",
        ": netlink events catch changes at once, the check is a safety net",
        issues,
    );
    BridgeConfig {
        mode,
        name,
        address,
        mtu,
        interval,
    }
}

/// The kernel's rules for an interface name (`dev_valid_name`): 1-15 bytes, not `.` or `..`,
/// no `/`, `:` or whitespace.
fn check_link_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("is not a link name: 1 to 15 characters");
    }
    if name == "." || name == ".." {
        return Err("is not a link name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("is not a link name: no '/', ':' or whitespace");
    }
    Ok(())
}

/// A bridge address must be a host address of the weave network, with its prefix (the on-link
/// route to every host's containers comes from it), in the bridges' slice `10.2.0.0/24` (any
/// other would be some host's container address).
fn parse_address(text: &str) -> Result<Ipv4Network, String> {
    let address: Ipv4Network = text
        .parse()
        .map_err(|err| format!("is not an address like \"10.2.0.1/16\": {err}"))?;
    if normalise(address) != WEAVE {
        return Err(format!(
            "is not an address of the weave network {WEAVE_NETWORK} with its /16 prefix"
        ));
    }
    let host = u32::from(address.ip()) - u32::from(WEAVE.network());
    if host == 0 || host > 255 {
        return Err(
            "must lie in 10.2.0.1-10.2.0.255: 10.2.0.0/24 holds the bridges, the rest is containers'"
                .into(),
        );
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(bridge: &str) -> Result<BridgeConfig, Vec<String>> {
        let text = format!("[sources.file]\npath = \"s.toml\"\n[bridge]\n{bridge}");
        Config::parse(&text, Path::new("/"))
            .map(|c| c.bridge)
            .map_err(|issues| {
                issues
                    .into_iter()
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect()
            })
    }

    #[test]
    fn defaults() {
        let bridge = parse("").unwrap();
        assert_eq!(bridge, BridgeConfig::default());
        assert_eq!(bridge.mode, BridgeMode::Ensure);
        assert_eq!(bridge.name, "weave");
        assert_eq!(bridge.address.to_string(), "10.2.0.1/16");
        assert_eq!(bridge.mtu, None);
        assert_eq!(bridge.interval, Duration::from_secs(10));
    }

    #[test]
    fn host_index_sets_the_address() {
        let bridge = parse("host_index = 3\nmode = \"check\"\nmtu = 65535\n").unwrap();
        assert_eq!(bridge.address.to_string(), "10.2.0.3/16");
        assert_eq!(bridge.mode, BridgeMode::Check);
        assert_eq!(bridge.mtu, Some(65535));
        let bridge = parse("address = \"10.2.0.7/16\"\nmode = \"off\"\n").unwrap();
        assert_eq!(bridge.address.to_string(), "10.2.0.7/16");
        assert_eq!(bridge.mode, BridgeMode::Off);
    }

    #[test]
    fn every_bad_key_is_reported() {
        let issues = parse(
            "mode = \"repair\"\nname = \"we ave\"\nhost_index = 0\nmtu = 9\ninterval = \"10ms\"\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = issues
            .iter()
            .map(|i| i.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "bridge.mode",
                "bridge.name",
                "bridge.host_index",
                "bridge.mtu",
                "bridge.interval"
            ],
            "{issues:?}"
        );
    }

    #[test]
    fn address_and_host_index_are_exclusive() {
        let issues = parse("address = \"10.2.0.1/16\"\nhost_index = 2\n").unwrap_err();
        assert_eq!(issues.len(), 1);
        assert!(issues[0].contains("exclusive"), "{issues:?}");
    }

    #[test]
    fn addresses_outside_the_bridge_slice_are_refused() {
        for (address, why) in [
            ("10.2.0.1/24", "/16 prefix"),
            ("10.3.0.1/16", "weave network"),
            ("10.2.0.0/16", "10.2.0.1-10.2.0.255"),
            ("10.2.1.5/16", "10.2.0.1-10.2.0.255"),
            ("10.2.0.1", "/16 prefix"),
            ("weave", "not an address"),
        ] {
            let issues = parse(&format!("address = {address:?}\n")).unwrap_err();
            assert!(issues[0].contains(why), "{address}: {issues:?}");
        }
    }

    #[test]
    fn link_names() {
        assert!(check_link_name("weave").is_ok());
        assert!(check_link_name("weave-br.0_1").is_ok());
        assert!(check_link_name("").is_err());
        assert!(check_link_name("sixteen-chars-xx").is_err());
        assert!(check_link_name("a/b").is_err());
        assert!(check_link_name("a:b").is_err());
        assert!(check_link_name("..").is_err());
    }
}
