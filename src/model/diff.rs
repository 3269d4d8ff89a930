//! What changes between two routing tables: `applied.diff(&desired)`.

use std::fmt;

use super::{RouteKey, RoutingTable, ServiceName};

impl RoutingTable {
    /// What changes between `self` (applied) and `desired`: `empty.diff(&t)` adds all of `t`,
    /// `t.diff(&empty)` removes it all, `t.diff(&t)` is empty.
    pub fn diff(&self, desired: &RoutingTable) -> TableDiff {
        let mut diff = TableDiff::default();
        for (name, backend) in &desired.backends {
            match self.backends.get(name) {
                None => diff.added_services.push(name.clone()),
                Some(old) if old != backend => diff.changed_services.push(name.clone()),
                Some(_) => {}
            }
        }
        diff.removed_services = self
            .backends
            .keys()
            .filter(|name| !desired.backends.contains_key(*name))
            .cloned()
            .collect();
        for (key, service) in &desired.routes {
            match self.routes.get(key) {
                None => diff.added_routes.push(key.clone()),
                Some(old) if old != service => diff.moved_routes.push(key.clone()),
                Some(_) => {}
            }
        }
        diff.removed_routes = self
            .routes
            .keys()
            .filter(|key| !desired.routes.contains_key(*key))
            .cloned()
            .collect();
        diff
    }
}

/// The difference between two routing tables, in sorted order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub added_services: Vec<ServiceName>,
    pub removed_services: Vec<ServiceName>,
    /// Same name, other servers, balance or check.
    pub changed_services: Vec<ServiceName>,
    pub added_routes: Vec<RouteKey>,
    pub removed_routes: Vec<RouteKey>,
    /// Same host and path, another service.
    pub moved_routes: Vec<RouteKey>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        *self == TableDiff::default()
    }
}

impl fmt::Display for TableDiff {
    /// `services +gamma -beta ~alpha; routes +gamma.test -beta.test >shop.test/api`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(sign: char, items: &[T]) -> Vec<String> {
            items.iter().map(|item| format!("{sign}{item}")).collect()
        }
        let services = [
            list('+', &self.added_services),
            list('-', &self.removed_services),
            list('~', &self.changed_services),
        ]
        .concat();
        let routes = [
            list('+', &self.added_routes),
            list('-', &self.removed_routes),
            list('>', &self.moved_routes),
        ]
        .concat();
        let mut parts = Vec::new();
        if !services.is_empty() {
            parts.push(format!("services {}", services.join(" ")));
        }
        if !routes.is_empty() {
            parts.push(format!("routes {}", routes.join(" ")));
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join("; "))
    }
}
