//! From Consul's answers to service definitions: weft's tags (`weft.host=`, ...), which
//! services are exposed, and the servers of a service's passing instances.

use super::api::HealthEntry;
use crate::model::{name_first_parts, CheckDef, Hostname, Rejected, ServiceDef};

/// The routing a service's tags ask for, with `prefix` = `weft.`.
#[derive(Debug, Default, PartialEq, Eq)]
struct TagRouting {
    hosts: Vec<String>,
    enabled: Option<bool>,
    path: Option<String>,
    balance: Option<String>,
    check: Option<String>,
    check_timeout: Option<String>,
    share: Vec<String>,
    redirect: Option<String>,
    hsts: Option<bool>,
    acme: Option<bool>,
    ignored: Vec<String>,
}

fn tag_routing(tags: &[String], prefix: &str) -> TagRouting {
    let mut routing = TagRouting::default();
    for tag in tags {
        let Some(rest) = tag.strip_prefix(prefix) else {
            continue;
        };
        match rest.split_once('=') {
            Some(("host", host)) => routing.hosts.push(host.to_string()),
            Some(("enable", value)) => routing.enabled = Some(value != "false"),
            Some(("path", path)) => routing.path = Some(path.to_string()),
            Some(("balance", balance)) => routing.balance = Some(balance.to_string()),
            Some(("check", check)) => routing.check = Some(check.to_string()),
            Some(("check_timeout", timeout)) => routing.check_timeout = Some(timeout.to_string()),
            Some(("redirect", to)) => routing.redirect = Some(to.to_string()),
            Some(("hsts", "true")) => routing.hsts = Some(true),
            Some(("hsts", "false")) => routing.hsts = Some(false),
            Some(("acme", "true")) => routing.acme = Some(true),
            Some(("acme", "false")) => routing.acme = Some(false),
            Some(("share", list)) => routing.share.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            _ => routing.ignored.push(tag.clone()),
        }
    }
    routing.hosts.sort();
    routing.hosts.dedup();
    routing
}

/// Whether weft routes a service at all: it names a host, or Apollo mode exposes every
/// service that does not opt out.
pub fn is_exposed(tags: &[String], prefix: &str, domain: Option<&Hostname>) -> bool {
    let routing = tag_routing(tags, prefix);
    if routing.enabled == Some(false) {
        return false;
    }
    !routing.hosts.is_empty() || domain.is_some()
}

/// Whether an instance counts as passing, as `?passing` decides it: every one of its checks,
/// the node's included (`serfHealth`, maintenance), passes.
pub fn is_passing(entry: &HealthEntry) -> bool {
    entry.checks.iter().all(|check| check.status == "passing")
}

/// One service's definition from its instances: the passing ones serve, and every instance's
/// tags route, so that a service whose instances all fail keeps its hosts (and answers 503,
/// not 404). Tags that weft does not know come back as rejected, with the reason.
pub fn service_def(
    name: &str,
    entries: &[HealthEntry],
    prefix: &str,
    domain: Option<&Hostname>,
) -> (ServiceDef, Vec<Rejected>) {
    let passing: Vec<&HealthEntry> = entries.iter().filter(|e| is_passing(e)).collect();
    let mut tags: Vec<String> = entries
        .iter()
        .flat_map(|e| e.service.tags.clone().unwrap_or_default())
        .collect();
    tags.sort();
    tags.dedup();
    let routing = tag_routing(&tags, prefix);
    let mut hosts = routing.hosts;
    if let Some(domain) = domain {
        hosts.push(format!("{name}.{domain}"));
    }
    let mut servers: Vec<String> = passing
        .iter()
        .map(|entry| {
            // An empty Service.Address means "use the node's address".
            let address = if entry.service.address.is_empty() {
                &entry.node.address
            } else {
                &entry.service.address
            };
            if address.contains(':') {
                format!("[{address}]:{}", entry.service.port)
            } else {
                format!("{address}:{}", entry.service.port)
            }
        })
        .collect();
    servers.sort();
    servers.dedup();
    let rejected = name_first_parts(
        routing
            .ignored
            .into_iter()
            .map(|tag| Rejected {
                subject: format!("service {name:?} tag {tag:?}"),
                reason: format!(
                    "unknown {prefix} tag or value, ignored (known: host, enable, path, balance, check, check_timeout, share, redirect, hsts=true|false, acme=true|false)"
                ),
            })
            .collect(),
        || format!("service {name:?}"),
        "tags",
    );
    (
        ServiceDef {
            name: name.to_string(),
            origin: name.to_string(),
            hosts,
            path: routing.path,
            servers,
            balance: routing.balance,
            check: routing.check.map(CheckDef::Http),
            check_interval: None,
            check_fall: None,
            check_timeout: routing.check_timeout,
            share: routing.share,
            redirect: routing.redirect,
            hsts: routing.hsts,
            acme: routing.acme,
        },
        rejected,
    )
}

#[cfg(test)]
mod tests {
    use super::super::api::decode_health;
    use super::*;

    #[test]
    fn redirect_and_hsts_tags() {
        let tags = [
            "weft.redirect=https".to_string(),
            "weft.hsts=true".to_string(),
            "weft.acme=true".to_string(),
        ];
        let routing = tag_routing(&tags, "weft.");
        assert_eq!(routing.redirect.as_deref(), Some("https"));
        assert_eq!(routing.hsts, Some(true));
        assert_eq!(routing.acme, Some(true));
        assert!(routing.ignored.is_empty());
        // A value it does not take is reported, not read as "off".
        let routing = tag_routing(&["weft.hsts=yes".to_string()], "weft.");
        assert_eq!(routing.hsts, None);
        assert_eq!(routing.ignored, ["weft.hsts=yes"]);
    }

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn exposure() {
        let domain = Hostname::parse("example.com").unwrap();
        assert!(is_exposed(&tags(&["weft.host=a.test"]), "weft.", None));
        assert!(!is_exposed(&tags(&["primary"]), "weft.", None));
        assert!(is_exposed(&tags(&["primary"]), "weft.", Some(&domain)));
        assert!(!is_exposed(
            &tags(&["weft.enable=false"]),
            "weft.",
            Some(&domain)
        ));
        assert!(!is_exposed(
            &tags(&["weft.enable=false", "weft.host=a.test"]),
            "weft.",
            None
        ));
        assert!(is_exposed(&tags(&["edge.host=a.test"]), "edge.", None));
    }

    #[test]
    fn routing_from_tags() {
        let entries = decode_health(
            br#"[{"Node":{"Node":"n1","Address":"10.1.0.1"},
                  "Service":{"ID":"b","Service":"shop","Tags":["weft.host=shop.test","weft.path=/api","weft.balance=leastconn","weft.check=/health","weft.check_timeout=2s","weft.colour=blue"],"Address":"10.2.2.7","Port":80}},
                 {"Node":{"Node":"n2","Address":"10.1.0.2"},
                  "Service":{"ID":"a","Service":"shop","Tags":["weft.host=www.shop.test","weft.host=shop.test"],"Address":"10.2.1.5","Port":80}}]"#,
        )
        .unwrap()
        .records;
        let domain = Hostname::parse("example.com").unwrap();
        let (def, rejected) = service_def("shop", &entries, "weft.", Some(&domain));
        assert_eq!(
            def.hosts,
            ["shop.test", "www.shop.test", "shop.example.com"]
        );
        assert_eq!(def.servers, ["10.2.1.5:80", "10.2.2.7:80"]);
        assert_eq!(def.path.as_deref(), Some("/api"));
        assert_eq!(def.balance.as_deref(), Some("leastconn"));
        assert_eq!(def.check, Some(CheckDef::Http("/health".into())));
        // Validated (bounds, units) in the model, as every other tag's value.
        assert_eq!(def.check_timeout.as_deref(), Some("2s"));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].subject.contains("weft.colour=blue"));
    }

    /// A thousand unknown tags are named 16 at a time, the rest counted.
    #[test]
    fn unknown_tags_are_named_up_to_the_bound() {
        let tags: Vec<String> = (0..1000).map(|i| format!(r#""weft.t{i}=x""#)).collect();
        let body = format!(
            r#"[{{"Node":{{"Node":"n1","Address":"10.1.0.1"}},"Service":{{"ID":"a","Service":"shop","Tags":["weft.host=shop.test",{}],"Address":"10.2.1.5","Port":80}}}}]"#,
            tags.join(",")
        );
        let entries = decode_health(body.as_bytes()).unwrap().records;
        let (def, rejected) = service_def("shop", &entries, "weft.", None);
        assert_eq!(def.hosts, ["shop.test"]);
        assert_eq!(rejected.len(), crate::model::MAX_NAMED_PARTS + 1);
        let last = rejected.last().unwrap();
        assert_eq!(
            (last.subject.as_str(), last.reason.as_str()),
            (
                "service \"shop\"",
                "984 more tags dropped (only the first 16 are named)"
            )
        );
    }

    /// `?passing` on the client: an instance with any check not passing, the node's included,
    /// does not serve; an empty `Service.Address` is the node's.
    #[test]
    fn only_passing_instances_serve() {
        let entries = decode_health(
            br#"[{"Node":{"Node":"n1","Address":"10.2.0.3"},
                  "Service":{"ID":"a","Service":"shop","Tags":["weft.host=shop.test"],"Address":"","Port":80},
                  "Checks":[{"CheckID":"serfHealth","Status":"passing"},{"CheckID":"service:a","Status":"passing","ServiceID":"a"}]},
                 {"Node":{"Node":"n2","Address":"10.2.0.4"},
                  "Service":{"ID":"b","Service":"shop","Tags":["weft.host=shop.test"],"Address":"10.2.2.7","Port":80},
                  "Checks":[{"CheckID":"serfHealth","Status":"critical"},{"CheckID":"service:b","Status":"passing","ServiceID":"b"}]},
                 {"Node":{"Node":"n1","Address":"10.2.0.3"},
                  "Service":{"ID":"c","Service":"shop","Tags":["weft.host=shop.test"],"Address":"10.2.1.9","Port":80},
                  "Checks":[{"CheckID":"service:c","Status":"warning","ServiceID":"c"}]}]"#,
        )
        .unwrap()
        .records;
        let (def, _) = service_def("shop", &entries, "weft.", None);
        assert_eq!(def.servers, ["10.2.0.3:80"]);
    }
}
