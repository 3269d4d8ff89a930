//! Services whose backend `haproxy -c` rejected: left out of the routing while their
//! definition stays the same, shown on the status page as dropped, given a new chance as soon
//! as their definition changes.
//!
//! The definition is what HAProxy can reject: the balance algorithm and the health check.
//! Servers are validated addresses: their churn (a flapping instance, a scaling app) must not
//! lift the blame, or every change would cost another rejected `haproxy -c`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::error;

use crate::escape::clip;
use crate::model::{
    Backend, Balance, Built, HealthCheck, RoutingTable, ServiceName, SourceId, MAX_DROPPED_REASON,
};
use crate::status::{ApplyStatus, RejectedService};

/// A service whose backend `haproxy -c` rejected, as it was defined then.
struct Blame {
    definition: Definition,
    source: SourceId,
    reason: String,
}

/// The part of a backend HAProxy's check can refuse.
#[derive(PartialEq)]
struct Definition {
    balance: Balance,
    check: Option<HealthCheck>,
}

impl Definition {
    fn of(backend: &Backend) -> Definition {
        Definition {
            balance: backend.balance,
            check: backend.check.clone(),
        }
    }

    fn matches(&self, backend: Option<&Backend>) -> bool {
        backend.is_some_and(|b| Definition::of(b) == *self)
    }
}

/// Services `haproxy -c` rejected, kept out while their definition stays the same.
#[derive(Default)]
pub(super) struct Blamed(BTreeMap<ServiceName, Blame>);

impl Blamed {
    /// Forgets the blame of services that changed or went away: a new definition gets a new
    /// chance.
    pub(super) fn prune(&mut self, table: &RoutingTable) {
        self.0
            .retain(|name, blame| blame.definition.matches(table.backends.get(name)));
    }

    /// `table` without the blamed services and their routes; `table` itself, shared, when no
    /// blame applies to it (the usual case: no copy of the whole table per change).
    pub(super) fn apply_to(&self, table: &Arc<RoutingTable>) -> Arc<RoutingTable> {
        let applies = |(service, blame): (&ServiceName, &Blame)| {
            blame.definition.matches(table.backends.get(service))
        };
        if !self.0.iter().any(applies) {
            return Arc::clone(table);
        }
        let mut table = RoutingTable::clone(table);
        for (service, blame) in &self.0 {
            if blame.definition.matches(table.backends.get(service)) {
                table.backends.remove(service);
                table.routes.retain(|_, s| s != service);
            }
        }
        Arc::new(table)
    }

    /// Blames `service` (the one behind the backend `haproxy -c` named) in `validated`;
    /// `false` if there is none.
    pub(super) fn add(
        &mut self,
        service: Option<&ServiceName>,
        validated: &RoutingTable,
        stderr: &str,
    ) -> bool {
        let Some((service, backend)) = service.cloned().and_then(|service| {
            let backend = validated.backends.get(&service)?;
            Some((service, backend))
        }) else {
            return false;
        };
        error!(service = %service, %stderr, "haproxy rejected this service's backend, dropping it");
        // HAProxy's alert line, else its whole stderr: cut as the model's drops are, for the
        // page, `/status` and `weft check` alike.
        let reason = stderr
            .lines()
            .find(|l| l.contains("[ALERT]"))
            .unwrap_or(stderr)
            .trim();
        let reason = clip(reason, MAX_DROPPED_REASON).into_owned();
        let blame = Blame {
            definition: Definition::of(backend),
            source: backend.source,
            reason,
        };
        self.0.insert(service, blame);
        true
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// For the status page: who is out and why.
    pub(super) fn report(&self, table: &RoutingTable) -> Vec<RejectedService> {
        self.0
            .iter()
            .map(|(service, blame)| RejectedService {
                service: service.to_string(),
                source: table
                    .backends
                    .get(service)
                    .map_or(blame.source, |b| b.source)
                    .to_string(),
                reason: format!("haproxy rejected its backend: {}", blame.reason),
            })
            .collect()
    }
}

/// The latest desired table, the blamed services taken out (their blame pruned first).
pub(super) fn effective(
    built: &Built,
    blamed: &mut Blamed,
    status: &watch::Sender<ApplyStatus>,
) -> Arc<RoutingTable> {
    blamed.prune(&built.table);
    let rejected = blamed.report(&built.table);
    status.send_if_modified(|s| {
        if s.rejected == rejected {
            return false;
        }
        s.rejected = rejected;
        true
    });
    blamed.apply_to(&built.table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_table, ServiceDef};

    fn table(shop_server: &str, shop_balance: &str) -> Arc<RoutingTable> {
        let shop = ServiceDef {
            balance: Some(shop_balance.to_string()),
            ..ServiceDef::new("shop", &["shop.example.com"], &[shop_server])
        };
        let cart = ServiceDef::new("cart", &["cart.example.com"], &["10.2.1.9:80"]);
        Arc::new(test_table(vec![shop, cart]))
    }

    const ALERT: &str = "[ALERT]    (1) : config : parsing [/x/haproxy.cfg:40] : bad\n";

    #[test]
    fn a_blamed_service_stays_out_until_its_definition_changes() {
        let mut blamed = Blamed::default();
        let before = table("10.2.1.5:80", "roundrobin");
        let name = |n: &str| ServiceName::parse(n).unwrap();
        assert!(blamed.add(Some(&name("shop")), &before, ALERT));
        assert!(!blamed.add(None, &before, ALERT));
        assert!(!blamed.add(Some(&name("gone")), &before, ALERT));

        let out = blamed.apply_to(&before);
        let names: Vec<&str> = out.backends.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["cart"]);
        assert!(out.routes.values().all(|s| s.as_str() == "cart"));
        let report = blamed.report(&before);
        assert_eq!(report[0].service, "shop");
        assert!(report[0]
            .reason
            .ends_with("parsing [/x/haproxy.cfg:40] : bad"));

        // New servers, same definition: still out (server churn must not cost another
        // rejected check). A changed definition: a new chance.
        let moved = table("10.2.1.6:80", "roundrobin");
        blamed.prune(&moved);
        assert_eq!(blamed.len(), 1);
        assert!(!blamed
            .apply_to(&moved)
            .backends
            .keys()
            .any(|n| n.as_str() == "shop"));
        let changed = table("10.2.1.6:80", "leastconn");
        blamed.prune(&changed);
        assert_eq!(blamed.len(), 0);
        // No blame applies: the table itself, not a copy.
        assert!(Arc::ptr_eq(&blamed.apply_to(&changed), &changed));
    }
}
