//! From Marathon apps to service definitions, with marathon-lb's labels.
//!
//! ```text
//! app /team/shop, service port n ──> service "team_shop" (n = 0) or "team_shop_n"
//!   HAPROXY_GROUP / HAPROXY_n_GROUP    must match weft's group ("*": every app)
//!   HAPROXY_n_VHOST  (comma list)      hosts; with routing.domain, port 0 also shop.team.<domain>
//!   HAPROXY_n_PATH / HAPROXY_n_BALANCE path prefix, balance
//!   first HTTP health check of port n  httpchk path, interval, fall
//!   running tasks (all health results alive where the app has checks)
//!     -> task weave IP (ipAddresses[0]) : container port n
//!     -> or, only with host_ports = "allow", agent host : host port n
//! ```

use super::api::{HealthCheckSpec, MarathonApp, MarathonTask};
use crate::config::{HostPorts, MarathonGroup};
use crate::model::{Hostname, Rejected, ServiceDef};

/// What turning apps into services depends on.
#[derive(Debug, Clone)]
pub struct RoutingSettings {
    pub group: MarathonGroup,
    pub domain: Option<Hostname>,
    pub host_ports: HostPorts,
}

/// Labels weft reads; any other `HAPROXY_*` label is reported as ignored.
fn is_supported_label(label: &str) -> bool {
    if label == "HAPROXY_GROUP" {
        return true;
    }
    let Some(rest) = label.strip_prefix("HAPROXY_") else {
        return true;
    };
    match rest.split_once('_') {
        Some((index, key)) if index.parse::<usize>().is_ok() => {
            matches!(key, "VHOST" | "PATH" | "BALANCE" | "GROUP" | "SHARE")
        }
        _ => false,
    }
}

fn port_label<'a>(app: &'a MarathonApp, index: usize, key: &str) -> Option<&'a str> {
    app.labels
        .get(&format!("HAPROXY_{index}_{key}"))
        .map(String::as_str)
}

/// Container ports, by service port index: 1.5+ `container.portMappings`, then
/// `container.docker.portMappings`, then pre-1.5 `ipAddress.discovery.ports`.
fn container_ports(app: &MarathonApp) -> Vec<Option<u32>> {
    let container = app.container.as_ref();
    let mappings = container
        .and_then(|c| c.port_mappings.as_ref())
        .or_else(|| container.and_then(|c| c.docker.as_ref()?.port_mappings.as_ref()));
    if let Some(mappings) = mappings {
        return mappings.iter().map(|m| m.container_port).collect();
    }
    app.ip_address
        .as_ref()
        .and_then(|ip| ip.discovery.as_ref())
        .map(|d| d.ports.iter().map(|p| p.number).collect())
        .unwrap_or_default()
}

/// `/team/shop` -> `team_shop` (Marathon ids never hold `_`, so no two apps collide).
fn service_name(app_id: &str, index: usize) -> String {
    let base: Vec<&str> = app_id.split('/').filter(|s| !s.is_empty()).collect();
    let base = base.join("_");
    if index == 0 {
        base
    } else {
        format!("{base}_{index}")
    }
}

/// Apollo mode: `/team/shop` -> `shop.team.<domain>`.
fn apollo_host(app_id: &str, domain: &Hostname) -> String {
    let mut segments: Vec<&str> = app_id.split('/').filter(|s| !s.is_empty()).collect();
    segments.reverse();
    format!("{}.{domain}", segments.join("."))
}

fn is_http_check(check: &HealthCheckSpec) -> bool {
    matches!(
        check.protocol.as_deref(),
        Some("HTTP" | "MESOS_HTTP") | None
    )
}

/// Running, and (where the app has health checks) every result alive. Tasks of versions
/// without `state` count as running once started.
fn is_routable(task: &MarathonTask, app_has_checks: bool) -> bool {
    let running = match task.state.as_deref() {
        Some(state) => state == "TASK_RUNNING",
        None => task.started_at.is_some(),
    };
    let healthy = !app_has_checks
        || (!task.health_check_results.is_empty()
            && task.health_check_results.iter().all(|r| r.alive));
    running && healthy
}

/// The services one app asks for, and what of it cannot be routed.
pub fn app_services(
    app: &MarathonApp,
    settings: &RoutingSettings,
) -> (Vec<ServiceDef>, Vec<Rejected>) {
    let mut services = Vec::new();
    let mut rejected = Vec::new();
    let app_subject = format!("app {:?}", app.id);
    let app_group = app.labels.get("HAPROXY_GROUP").map(String::as_str);
    let ports = container_ports(app);
    let port_count = ports
        .len()
        .max(app.port_definitions.len())
        .max(usize::from(app.labels.contains_key("HAPROXY_0_VHOST")));

    let mut in_group = false;
    for index in 0..port_count {
        let group = port_label(app, index, "GROUP").or(app_group);
        if settings.group.near_miss(group) {
            rejected.push(Rejected {
                subject: format!("{app_subject} port {index}"),
                reason: format!(
                    "its group {:?} is not weft's {:?}: groups match exactly, letter case and \
                     spaces included, so it is not routed",
                    group.unwrap_or_default(),
                    match &settings.group {
                        crate::config::MarathonGroup::Named(name) => name.as_str(),
                        crate::config::MarathonGroup::All => "*",
                    }
                ),
            });
        }
        if !settings.group.matches(group) {
            continue;
        }
        in_group = true;
        let mut hosts: Vec<String> = port_label(app, index, "VHOST")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if let (Some(domain), 0) = (&settings.domain, index) {
            hosts.push(apollo_host(&app.id, domain));
        }
        if hosts.is_empty() {
            continue;
        }
        let check = app
            .health_checks
            .iter()
            .find(|c| is_http_check(c) && c.port_index.unwrap_or(0) == index);
        let mut servers = Vec::new();
        for task in &app.tasks {
            if !is_routable(task, !app.health_checks.is_empty()) {
                continue;
            }
            match task_address(
                task,
                ports.get(index).copied().flatten(),
                index,
                settings.host_ports,
            ) {
                Ok(address) => servers.push(address),
                Err(reason) => rejected.push(Rejected {
                    subject: format!("{app_subject} task {:?} port {index}", task.id),
                    reason,
                }),
            }
        }
        servers.sort();
        servers.dedup();
        services.push(ServiceDef {
            name: service_name(&app.id, index),
            origin: app.id.clone(),
            hosts,
            path: port_label(app, index, "PATH").map(str::to_string),
            servers,
            balance: port_label(app, index, "BALANCE").map(str::to_string),
            check: check.map(|c| c.path.clone().unwrap_or_else(|| "/".into())),
            check_interval: check
                .and_then(|c| c.interval_seconds)
                .map(std::time::Duration::from_secs),
            check_fall: check
                .and_then(|c| c.max_consecutive_failures)
                .filter(|f| *f > 0),
            share: port_label(app, index, "SHARE")
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }

    let is_grouped = in_group || settings.group.matches(app_group);
    if is_grouped && services.is_empty() {
        rejected.push(Rejected {
            subject: app_subject.clone(),
            reason: "no HAPROXY_{n}_VHOST label (and no routing.domain): nothing to route".into(),
        });
    }
    if is_grouped {
        let ignored: Vec<&str> = app
            .labels
            .keys()
            .map(String::as_str)
            .filter(|label| !is_supported_label(label))
            .collect();
        if !ignored.is_empty() {
            rejected.push(Rejected {
                subject: app_subject,
                reason: format!(
                    "labels ignored (weft reads HAPROXY_GROUP and HAPROXY_n_VHOST/PATH/BALANCE/GROUP/SHARE): {}",
                    ignored.join(", ")
                ),
            });
        }
    }
    (services, rejected)
}

/// The weave IP and container port; the agent's host port only where allowed.
fn task_address(
    task: &MarathonTask,
    container_port: Option<u32>,
    index: usize,
    host_ports: HostPorts,
) -> Result<String, String> {
    if let (Some(port), Some(ip)) = (container_port, task.ip_addresses.first()) {
        return Ok(format!("{}:{port}", ip.ip_address));
    }
    match (host_ports, task.host.as_deref(), task.ports.get(index)) {
        (HostPorts::Allow, Some(host), Some(port)) => Ok(format!("{host}:{port}")),
        (HostPorts::Allow, _, _) => Err(format!(
            "no container port and no host port {index} for this task"
        )),
        (HostPorts::Deny, _, _) => Err(
            "no weave IP with a container port (host networking?); routing to the agent's host port is off (sources.marathon.host_ports = \"allow\")"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::marathon::api::decode_apps;

    fn settings(group: &str, domain: Option<&str>, host_ports: HostPorts) -> RoutingSettings {
        RoutingSettings {
            group: MarathonGroup::parse(group),
            domain: domain.map(|d| Hostname::parse(d).unwrap()),
            host_ports,
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        crate::sources::fixture(&format!("marathon/{name}"))
    }

    #[test]
    fn labels() {
        assert!(is_supported_label("HAPROXY_GROUP"));
        assert!(is_supported_label("HAPROXY_0_VHOST"));
        assert!(is_supported_label("HAPROXY_12_PATH"));
        assert!(is_supported_label("team"));
        assert!(!is_supported_label("HAPROXY_0_STICKY"));
        assert!(!is_supported_label("HAPROXY_DEPLOYMENT_GROUP"));
        assert!(!is_supported_label("HAPROXY_0_REDIRECT_TO_HTTPS"));
    }

    #[test]
    fn names_and_apollo_hosts() {
        assert_eq!(service_name("/team/shop", 0), "team_shop");
        assert_eq!(service_name("/shop", 2), "shop_2");
        let domain = Hostname::parse("example.com").unwrap();
        assert_eq!(apollo_host("/team/shop", &domain), "shop.team.example.com");
        assert_eq!(apollo_host("/shop", &domain), "shop.example.com");
    }

    /// zdd_apps.json: two Docker BRIDGE apps of marathon-lb's blue/green deployment, without
    /// VHOST labels, tasks on docker0 (172.17.x) with healthy results.
    #[test]
    fn zdd_fixture_without_domain_routes_nothing_and_says_why() {
        let apps = decode_apps(&fixture("zdd_apps.json")).unwrap();
        assert_eq!(apps.apps.len(), 2);
        let s = settings("external", None, HostPorts::Deny);
        for app in &apps.apps {
            let (services, rejected) = app_services(app, &s);
            assert!(services.is_empty());
            let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
            assert!(reasons[0].contains("no HAPROXY_{n}_VHOST"), "{reasons:?}");
            assert!(
                reasons[1].contains("HAPROXY_DEPLOYMENT_GROUP"),
                "{reasons:?}"
            );
            assert!(!reasons[1].contains("HAPROXY_GROUP,"), "{reasons:?}");
        }
    }

    #[test]
    fn zdd_fixture_in_apollo_mode() {
        let apps = decode_apps(&fixture("zdd_apps.json")).unwrap();
        let s = settings("external", Some("example.com"), HostPorts::Deny);
        let green = apps.apps.iter().find(|a| a.id == "/nginx-green").unwrap();
        let (services, _) = app_services(green, &s);
        assert_eq!(services.len(), 1);
        let shop = &services[0];
        assert_eq!(shop.name, "nginx-green");
        assert_eq!(shop.hosts, ["nginx-green.example.com"]);
        // BRIDGE with portMappings: the task's IP and the container port 8080. These IPs are
        // on docker0, so the model will drop them as outside the weave network.
        assert_eq!(shop.servers.len(), 3);
        assert!(
            shop.servers
                .iter()
                .all(|s| s.starts_with("172.17.") && s.ends_with(":8080")),
            "{:?}",
            shop.servers
        );
        // The HTTP health check: path /, every 3 s, 10 failures.
        assert_eq!(shop.check.as_deref(), Some("/"));
        assert_eq!(shop.check_interval, Some(std::time::Duration::from_secs(3)));
        assert_eq!(shop.check_fall, Some(10));
    }

    #[test]
    fn other_groups_are_skipped_silently() {
        let apps = decode_apps(&fixture("zdd_apps.json")).unwrap();
        let s = settings("internal", Some("example.com"), HostPorts::Deny);
        for app in &apps.apps {
            assert_eq!(app_services(app, &s), (vec![], vec![]));
        }
        let all = settings("*", Some("example.com"), HostPorts::Deny);
        assert_eq!(app_services(&apps.apps[0], &all).0.len(), 1);
    }

    #[test]
    fn nginx_fixture_app_definition() {
        // 1-nginx.json is an app as posted: no tasks yet.
        let app: MarathonApp = serde_json::from_slice(&fixture("1-nginx.json")).unwrap();
        let (services, rejected) = app_services(
            &app,
            &settings("external", Some("example.com"), HostPorts::Deny),
        );
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].hosts, ["nginx.example.com"]);
        assert!(services[0].servers.is_empty());
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].reason.contains("HAPROXY_DEPLOYMENT_ALT_PORT"));
    }

    fn app(json: &str) -> MarathonApp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_group_that_misses_by_case_or_spaces_is_said_not_silently_skipped() {
        let shop = app(r#"{
            "id": "/shop",
            "labels": {"HAPROXY_GROUP": "External ", "HAPROXY_0_VHOST": "shop.example.com"},
            "tasks": []
        }"#);
        let (services, rejected) =
            app_services(&shop, &settings("external", None, HostPorts::Deny));
        assert!(services.is_empty());
        assert!(
            rejected[0]
                .reason
                .contains("its group \"External \" is not weft's \"external\""),
            "{rejected:?}"
        );
        let other = app(r#"{"id": "/db", "labels": {"HAPROXY_GROUP": "internal"}, "tasks": []}"#);
        let (_, rejected) = app_services(&other, &settings("external", None, HostPorts::Deny));
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn tasks_running_and_healthy_only_weave_ip_and_container_port() {
        let app = app(r#"{
            "id": "/team/shop",
            "labels": {"HAPROXY_GROUP": "external", "HAPROXY_0_VHOST": "shop.example.com, WWW.shop.example.com", "HAPROXY_0_PATH": "/api", "HAPROXY_0_BALANCE": "leastconn"},
            "container": {"type": "DOCKER", "docker": {"network": "USER"}, "portMappings": [{"containerPort": 8080, "hostPort": 0}]},
            "networks": [{"mode": "container", "name": "weave"}],
            "healthChecks": [{"protocol": "TCP", "portIndex": 0}, {"protocol": "MESOS_HTTP", "path": "/health", "portIndex": 0, "intervalSeconds": 5, "maxConsecutiveFailures": 0}],
            "tasks": [
                {"id": "ok", "host": "agent1", "ports": [31000], "ipAddresses": [{"ipAddress": "10.2.1.5", "protocol": "IPv4"}], "state": "TASK_RUNNING", "healthCheckResults": [{"alive": true}, {"alive": true}]},
                {"id": "sick", "ipAddresses": [{"ipAddress": "10.2.1.6"}], "state": "TASK_RUNNING", "healthCheckResults": [{"alive": true}, {"alive": false}]},
                {"id": "unchecked", "ipAddresses": [{"ipAddress": "10.2.1.7"}], "state": "TASK_RUNNING", "healthCheckResults": []},
                {"id": "staging", "ipAddresses": [{"ipAddress": "10.2.1.8"}], "state": "TASK_STAGING", "healthCheckResults": [{"alive": true}]},
                {"id": "killing", "ipAddresses": [{"ipAddress": "10.2.1.9"}], "state": "TASK_KILLING", "healthCheckResults": [{"alive": true}]}
            ]}"#);
        let (services, rejected) = app_services(&app, &settings("external", None, HostPorts::Deny));
        assert!(rejected.is_empty(), "{rejected:?}");
        let shop = &services[0];
        assert_eq!(shop.name, "team_shop");
        assert_eq!(shop.hosts, ["shop.example.com", "WWW.shop.example.com"]);
        assert_eq!(shop.servers, ["10.2.1.5:8080"]);
        assert_eq!(shop.path.as_deref(), Some("/api"));
        assert_eq!(shop.balance.as_deref(), Some("leastconn"));
        assert_eq!(shop.check.as_deref(), Some("/health"));
        assert_eq!(
            shop.check_fall, None,
            "0 failures means never kill: weft's default"
        );
    }

    #[test]
    fn host_networking_needs_host_ports_allowed() {
        let app = app(r#"{
            "id": "/legacy",
            "labels": {"HAPROXY_GROUP": "external", "HAPROXY_0_VHOST": "legacy.example.com"},
            "portDefinitions": [{"port": 10001}],
            "tasks": [{"id": "t1", "host": "10.2.0.3", "ports": [31005], "ipAddresses": [{"ipAddress": "10.2.0.3"}], "state": "TASK_RUNNING"}]}"#);
        let (services, rejected) = app_services(&app, &settings("external", None, HostPorts::Deny));
        assert!(services[0].servers.is_empty());
        assert!(rejected[0].reason.contains("host_ports"), "{rejected:?}");
        let (services, rejected) =
            app_services(&app, &settings("external", None, HostPorts::Allow));
        assert_eq!(services[0].servers, ["10.2.0.3:31005"]);
        assert!(rejected.is_empty());
    }

    #[test]
    fn pre_1_5_ip_per_task_and_per_port_groups() {
        let app = app(r#"{
            "id": "/multi",
            "labels": {"HAPROXY_GROUP": "internal", "HAPROXY_1_GROUP": "external", "HAPROXY_0_VHOST": "admin.example.com", "HAPROXY_1_VHOST": "multi.example.com"},
            "ipAddress": {"networkName": "weave", "discovery": {"ports": [{"number": 9000, "name": "admin"}, {"number": 8080, "name": "http"}]}},
            "tasks": [{"id": "t1", "ipAddresses": [{"ipAddress": "10.2.2.7"}], "startedAt": "2017-01-01T00:00:00Z"}]}"#);
        let (services, rejected) = app_services(&app, &settings("external", None, HostPorts::Deny));
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].name, "multi_1");
        assert_eq!(services[0].servers, ["10.2.2.7:8080"]);
    }
}
