//! What changes between two routing tables: `applied.diff(&desired)`.

use std::fmt;

use itertools::{EitherOrBoth, Itertools};

use super::{RouteKey, RoutingTable, ServiceName};

/// Two map entries in the order of their keys.
fn by_key<K: Ord, V>(a: &(&K, &V), b: &(&K, &V)) -> std::cmp::Ordering {
    a.0.cmp(b.0)
}

impl RoutingTable {
    /// What changes between `self` (applied) and `desired`: `empty.diff(&t)` adds all of `t`,
    /// `t.diff(&empty)` removes it all, `t.diff(&t)` is empty.
    pub fn diff(&self, desired: &RoutingTable) -> TableDiff {
        let mut diff = TableDiff::default();
        // Both sides in key order, walked side by side: no search per entry (10,000 services
        // after every change).
        let services = self
            .backends
            .iter()
            .merge_join_by(&desired.backends, by_key);
        for pair in services {
            match pair {
                EitherOrBoth::Right((name, _)) => diff.added_services.push(name.clone()),
                EitherOrBoth::Left((name, _)) => diff.removed_services.push(name.clone()),
                EitherOrBoth::Both((name, old), (_, new)) if old != new => {
                    diff.changed_services.push(name.clone())
                }
                EitherOrBoth::Both(..) => {}
            }
        }
        for pair in self.routes.iter().merge_join_by(&desired.routes, by_key) {
            match pair {
                EitherOrBoth::Right((key, _)) => diff.added_routes.push(key.clone()),
                EitherOrBoth::Left((key, _)) => diff.removed_routes.push(key.clone()),
                EitherOrBoth::Both((key, old), (_, new)) if old != new => {
                    diff.moved_routes.push(key.clone())
                }
                EitherOrBoth::Both(..) => {}
            }
        }
        for (name, cert) in &desired.certificates {
            match self.certificates.get(name) {
                None => diff.certificates.push(format!("+{name}")),
                Some(old) if old != cert => diff.certificates.push(format!("~{name}")),
                Some(_) => {}
            }
        }
        for name in self.certificates.keys() {
            if !desired.certificates.contains_key(name) {
                diff.certificates.push(format!("-{name}"));
            }
        }
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
    /// TLS certificates, by name: `+new`, `~renewed`, `-removed`.
    pub certificates: Vec<String>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        *self == TableDiff::default()
    }
}

/// The entries of each kind a [`TableDiff`]'s text names; the rest are counted. A first apply
/// at 10,000 services, or a source's full read after a gap, changes thousands: the log line
/// stays one readable line.
pub const MAX_NAMED_CHANGES: usize = 16;

impl fmt::Display for TableDiff {
    /// `services +gamma -beta ~alpha; routes +gamma.test -beta.test >shop.test/api`; past
    /// [`MAX_NAMED_CHANGES`] of a kind, `+(9984 more)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(sign: char, items: &[T]) -> Vec<String> {
            let mut named: Vec<String> = items
                .iter()
                .take(MAX_NAMED_CHANGES)
                .map(|item| format!("{sign}{item}"))
                .collect();
            if items.len() > MAX_NAMED_CHANGES {
                named.push(format!("{sign}({} more)", items.len() - MAX_NAMED_CHANGES));
            }
            named
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
        if !self.certificates.is_empty() {
            parts.push(format!("certificates {}", self.certificates.join(" ")));
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fmt::Debug;

    use super::*;
    use crate::model::test_table;
    use crate::model::ServiceDef;

    /// Replays `diff` on `applied` the way the apply plan uses it: what it names is taken from
    /// `desired` or removed, nothing else is touched. Strict, as sozu's state is with its
    /// requests: an added entry must be new, a changed one must exist and differ, a removed one
    /// must exist.
    fn replay(applied: &RoutingTable, diff: &TableDiff, desired: &RoutingTable) -> RoutingTable {
        let mut table = applied.clone();
        replay_map(
            &mut table.backends,
            &desired.backends,
            [
                &diff.added_services,
                &diff.changed_services,
                &diff.removed_services,
            ],
        );
        replay_map(
            &mut table.routes,
            &desired.routes,
            [&diff.added_routes, &diff.moved_routes, &diff.removed_routes],
        );
        table
    }

    fn replay_map<K: Ord + Clone + Debug, V: Clone + PartialEq>(
        map: &mut BTreeMap<K, V>,
        desired: &BTreeMap<K, V>,
        [added, changed, removed]: [&Vec<K>; 3],
    ) {
        for key in added {
            let old = map.insert(key.clone(), desired[key].clone());
            assert!(old.is_none(), "added {key:?} was there already");
        }
        for key in changed {
            let old = map.insert(key.clone(), desired[key].clone());
            assert!(
                old.is_some_and(|old| old != desired[key]),
                "changed {key:?} was missing or the same"
            );
        }
        for key in removed {
            assert!(map.remove(key).is_some(), "removed {key:?} was not there");
        }
    }

    /// The diff without one of its entries, for each entry.
    fn without_each(diff: &TableDiff) -> Vec<TableDiff> {
        let services: [fn(&mut TableDiff) -> &mut Vec<ServiceName>; 3] = [
            |d| &mut d.added_services,
            |d| &mut d.removed_services,
            |d| &mut d.changed_services,
        ];
        let routes: [fn(&mut TableDiff) -> &mut Vec<RouteKey>; 3] = [
            |d| &mut d.added_routes,
            |d| &mut d.removed_routes,
            |d| &mut d.moved_routes,
        ];
        let mut partial = Vec::new();
        for field in services {
            drop_each(diff, field, &mut partial);
        }
        for field in routes {
            drop_each(diff, field, &mut partial);
        }
        partial
    }

    fn drop_each<T>(
        diff: &TableDiff,
        field: fn(&mut TableDiff) -> &mut Vec<T>,
        partial: &mut Vec<TableDiff>,
    ) {
        for i in 0..field(&mut diff.clone()).len() {
            let mut without = diff.clone();
            field(&mut without).remove(i);
            partial.push(without);
        }
    }

    fn def(name: &str, hosts: &[&str], servers: &[&str]) -> ServiceDef {
        ServiceDef::new(name, hosts, servers)
    }

    /// alpha and beta, each on its own host.
    fn two() -> RoutingTable {
        test_table(vec![
            def("alpha", &["alpha.example.com"], &["10.2.1.5:80"]),
            def("beta", &["beta.example.com"], &["10.2.1.6:80"]),
        ])
    }

    /// Tables with every kind of change between them: services added, removed and changed,
    /// routes added, removed and moved to another service, a path route.
    fn tables() -> Vec<(&'static str, RoutingTable)> {
        let mut api = def("api", &["shop.example.com"], &["10.2.1.9:80"]);
        api.path = Some("/api".into());
        vec![
            ("empty", RoutingTable::default()),
            ("two", two()),
            (
                "next",
                test_table(vec![
                    def(
                        "beta",
                        &["beta.example.com"],
                        &["10.2.1.6:80", "10.2.1.7:80"],
                    ),
                    def("gamma", &["gamma.example.com"], &["10.2.1.8:80"]),
                ]),
            ),
            (
                "shop on alpha",
                test_table(vec![
                    def(
                        "alpha",
                        &["alpha.example.com", "shop.example.com"],
                        &["10.2.1.5:80"],
                    ),
                    def("beta", &["beta.example.com"], &["10.2.1.6:80"]),
                    api.clone(),
                ]),
            ),
            (
                "shop on beta",
                test_table(vec![
                    def("alpha", &["alpha.example.com"], &["10.2.1.5:80"]),
                    def(
                        "beta",
                        &["beta.example.com", "shop.example.com"],
                        &["10.2.1.6:80"],
                    ),
                    api,
                ]),
            ),
        ]
    }

    #[test]
    fn diff_replays_and_tears_down() {
        let empty = RoutingTable::default();
        let table = two();
        assert_eq!(replay(&empty, &empty.diff(&table), &table), table);
        assert_eq!(replay(&table, &table.diff(&empty), &empty), empty);
        assert!(table.diff(&table).is_empty());
    }

    /// Between any two tables, the diff replays to the target, and it needs every one of its
    /// entries: nothing is missing, nothing is there for nothing.
    #[test]
    fn every_diff_replays_exactly() {
        let tables = tables();
        for (from_name, from) in &tables {
            for (to_name, to) in &tables {
                let diff = from.diff(to);
                assert_eq!(
                    replay(from, &diff, to),
                    *to,
                    "{from_name} -> {to_name}: {diff}"
                );
                for partial in without_each(&diff) {
                    assert_ne!(
                        replay(from, &partial, to),
                        *to,
                        "{from_name} -> {to_name}: {diff} replays without an entry: {partial}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_diff_reads_as_signed_names() {
        let tables: BTreeMap<&str, RoutingTable> = tables().into_iter().collect();
        assert_eq!(tables["two"].diff(&tables["two"]).to_string(), "none");
        let many = TableDiff {
            added_services: (0..MAX_NAMED_CHANGES + 3)
                .map(|i| ServiceName::parse(&format!("s{i:02}")).unwrap())
                .collect(),
            ..TableDiff::default()
        };
        let text = many.to_string();
        assert!(text.starts_with("services +s00 +s01 "), "{text}");
        assert!(
            text.ends_with(&format!("+s{:02} +(3 more)", MAX_NAMED_CHANGES - 1)),
            "{text}"
        );
        assert_eq!(
            tables["two"].diff(&tables["next"]).to_string(),
            "services +gamma -alpha ~beta; routes +gamma.example.com -alpha.example.com"
        );
        assert_eq!(
            tables["shop on alpha"]
                .diff(&tables["shop on beta"])
                .to_string(),
            "routes >shop.example.com"
        );
    }
}
