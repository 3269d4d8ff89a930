//! From Marathon apps to service definitions, with marathon-lb's labels.
//!
//! ```text
//! app /team/shop, service port n ──> service "team_shop" (n = 0) or "team_shop_n"
//!   HAPROXY_GROUP / HAPROXY_n_GROUP    must match weft's group ("*": every app)
//!   HAPROXY_n_VHOST  (comma list)      hosts; with routing.domain, port 0 also shop.team.<domain>
//!   HAPROXY_n_PATH / HAPROXY_n_BALANCE path prefix, balance
//!   health check of port n             the first HTTP (else TCP) one, as marathon-lb maps it:
//!                                      httpchk path, inter intervalSeconds,
//!                                      fall maxConsecutiveFailures + 1,
//!                                      timeout check timeoutSeconds
//!   running tasks (all health results alive where the app has checks)
//!     -> task weave IP (ipAddresses[0]) : container port n
//!     -> or, only with host_ports = "allow", agent host : host port n
//! ```

use super::api::{HealthCheckSpec, MarathonApp, MarathonTask, LABEL_PREFIX};
use crate::config::{HostPorts, MarathonGroup};
use crate::model::{name_first_parts, CheckDef, Hostname, Rejected, ServiceDef};

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
    let Some(rest) = label.strip_prefix(LABEL_PREFIX) else {
        return true;
    };
    match rest.split_once('_') {
        Some((index, key)) if index.parse::<usize>().is_ok() => {
            matches!(
                key,
                "VHOST"
                    | "PATH"
                    | "BALANCE"
                    | "GROUP"
                    | "SHARE"
                    | "REDIRECT_TO_HTTPS"
                    | "USE_HSTS"
                    | "ACME"
            )
        }
        _ => false,
    }
}

/// The labels of an app's service port `index`, `HAPROXY_{index}_*`: found once in the app's
/// sorted labels, then each of the port's eight keys read among those few.
struct PortLabels<'a> {
    labels: &'a [(String, String)],
    /// The length of `HAPROXY_{index}_`, which every one of `labels` begins with.
    prefix_len: usize,
}

impl<'a> PortLabels<'a> {
    fn of(app: &'a MarathonApp, index: usize) -> PortLabels<'a> {
        let mut digits = itoa::Buffer::new();
        let prefix = ["HAPROXY_", digits.format(index), "_"].concat();
        PortLabels {
            labels: app.labels.starting_with(&prefix),
            prefix_len: prefix.len(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.labels
            .iter()
            .find(|(name, _)| name.get(self.prefix_len..) == Some(key))
            .map(|(_, value)| value.as_str())
    }
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
    let mut name = String::with_capacity(app_id.len() + 4);
    for segment in app_id.split('/').filter(|s| !s.is_empty()) {
        if !name.is_empty() {
            name.push('_');
        }
        name.push_str(segment);
    }
    if index != 0 {
        use std::fmt::Write as _;
        let _ = write!(name, "_{index}");
    }
    name
}

/// Apollo mode: `/team/shop` -> `shop.team.<domain>`.
fn apollo_host(app_id: &str, domain: &Hostname) -> String {
    let mut segments: Vec<&str> = app_id.split('/').filter(|s| !s.is_empty()).collect();
    segments.reverse();
    format!("{}.{domain}", segments.join("."))
}

/// What HAProxy can check of a Marathon health check: HTTP (Marathon's default protocol) and
/// TCP ones; HTTPS and COMMAND checks have no HAProxy counterpart here.
fn check_def(check: &HealthCheckSpec) -> Option<CheckDef> {
    match check.protocol.as_deref() {
        Some("HTTP" | "MESOS_HTTP") | None => Some(CheckDef::Http(
            check.path.clone().unwrap_or_else(|| "/".into()),
        )),
        Some("TCP" | "MESOS_TCP") => Some(CheckDef::Tcp),
        Some(_) => None,
    }
}

/// The health check of service port `index`: the app's first HTTP one for that port, else
/// its first TCP one (marathon-lb takes the first of either).
fn port_check(app: &MarathonApp, index: usize) -> Option<(CheckDef, &HealthCheckSpec)> {
    let checks = app
        .health_checks
        .iter()
        .filter(|c| c.port_index.unwrap_or(0) == index)
        .filter_map(|c| Some((check_def(c)?, c)));
    let mut first_tcp = None;
    for (def, spec) in checks {
        match def {
            CheckDef::Http(_) => return Some((def, spec)),
            CheckDef::Tcp => {
                first_tcp.get_or_insert((def, spec));
            }
        }
    }
    first_tcp
}

/// Running, and (where the app has health checks) every result alive. Tasks of versions
/// without `state` count as running once started.
fn is_routable(task: &MarathonTask, app_has_checks: bool) -> bool {
    let running = match task.state.as_deref() {
        Some(state) => state == "TASK_RUNNING",
        None => task.started,
    };
    let healthy = !app_has_checks
        || (!task.health_check_results.is_empty()
            && task.health_check_results.iter().all(|r| r.alive));
    running && healthy
}

/// The most services (ports with hosts) one app defines; the rest are dropped with the
/// reason. Each keeps every task's address: without a bound, an app of N ports and N tasks,
/// a few hundred KB, would make N x N servers (and `server` lines).
pub const MAX_SERVICES_PER_APP: usize = 32;

/// The services one app asks for, and what of it cannot be routed.
pub fn app_services(
    app: &MarathonApp,
    settings: &RoutingSettings,
) -> (Vec<ServiceDef>, Vec<Rejected>) {
    // Most apps route one port: a list grown from empty has room for four definitions (1.1
    // KB), and 10,000 apps kept 8 MB of that room unused.
    let mut services = Vec::with_capacity(1);
    let mut rejected = Vec::new();
    // Named only in what is rejected, which most apps have nothing of.
    let app_subject = || format!("app {:?}", app.id);
    let app_group = app.labels.get("HAPROXY_GROUP");
    let ports = container_ports(app);
    let port_count = ports
        .len()
        .max(app.port_definitions.len())
        .max(usize::from(app.labels.contains_key("HAPROXY_0_VHOST")));

    let mut in_group = false;
    // Ports with hosts past MAX_SERVICES_PER_APP.
    let mut over = 0;
    // Ports whose group is weft's but for letter case or spaces.
    let mut near_misses = Vec::new();
    for index in 0..port_count {
        let port = PortLabels::of(app, index);
        let group = port.get("GROUP").or(app_group);
        if settings.group.near_miss(group) {
            near_misses.push(Rejected {
                subject: format!("{} port {index}", app_subject()),
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
        let mut hosts: Vec<String> = port
            .get("VHOST")
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
        if services.len() == MAX_SERVICES_PER_APP {
            over += 1;
            continue;
        }
        let (check, spec) = port_check(app, index).unzip();
        let mut servers = Vec::new();
        let mut bad_tasks = Vec::new();
        for task in &app.tasks.records {
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
                Err(reason) => bad_tasks.push(Rejected {
                    subject: format!("{} task {:?} port {index}", app_subject(), task.id),
                    reason,
                }),
            }
        }
        rejected.extend(name_first_parts(
            bad_tasks,
            || format!("{} port {index}", app_subject()),
            "tasks",
        ));
        servers.sort();
        servers.dedup();
        services.push(ServiceDef {
            name: service_name(&app.id, index),
            origin: app.id.clone(),
            hosts,
            path: port.get("PATH").map(str::to_string),
            servers,
            balance: port.get("BALANCE").map(str::to_string),
            check,
            check_interval: spec
                .and_then(|c| c.interval_seconds)
                .map(std::time::Duration::from_secs),
            // marathon-lb's mapping: Marathon kills a task after more than
            // maxConsecutiveFailures failures (0: never), HAProxy takes it out after this.
            check_fall: spec
                .and_then(|c| c.max_consecutive_failures)
                .map(|failures| failures.saturating_add(1)),
            check_timeout: spec
                .and_then(|c| c.timeout_seconds)
                .filter(|seconds| *seconds > 0)
                .map(|seconds| format!("{seconds}s")),
            share: port
                .get("SHARE")
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            // marathon-lb's labels: "true" turns them on.
            redirect: port
                .get("REDIRECT_TO_HTTPS")
                .filter(|v| v.eq_ignore_ascii_case("true"))
                .map(|_| "https".to_string()),
            hsts: port.get("USE_HSTS").map(|v| v.eq_ignore_ascii_case("true")),
            // weft's own, like SHARE: "true" asks ACME certificates for the port's hosts.
            acme: port.get("ACME").map(|v| v.eq_ignore_ascii_case("true")),
        });
    }

    rejected.extend(name_first_parts(near_misses, app_subject, "ports"));
    if over > 0 {
        rejected.push(Rejected {
            subject: app_subject(),
            reason: format!(
                "asks for {} services (ports with hosts): only the first \
                 {MAX_SERVICES_PER_APP} are routed",
                MAX_SERVICES_PER_APP + over
            ),
        });
    }
    let is_grouped = in_group || settings.group.matches(app_group);
    if is_grouped && (!app.tasks.dropped.is_empty() || app.tasks.more_dropped > 0) {
        // A task that did not decode serves none of the app's services.
        let app_subject = app_subject();
        rejected.extend(app.tasks.rejected(&format!("{app_subject} task"), |task| {
            format!("{app_subject} {}", task.subject("task"))
        }));
    }
    if is_grouped && services.is_empty() {
        rejected.push(Rejected {
            subject: app_subject(),
            reason: "no HAPROXY_{n}_VHOST label (and no routing.domain): nothing to route".into(),
        });
    }
    if is_grouped {
        let ignored: Vec<&str> = app
            .labels
            .keys()
            .filter(|label| !is_supported_label(label))
            .collect();
        if !ignored.is_empty() {
            rejected.push(Rejected {
                subject: app_subject(),
                reason: format!(
                    "labels ignored (weft reads HAPROXY_GROUP and HAPROXY_n_VHOST/PATH/BALANCE/GROUP/SHARE/REDIRECT_TO_HTTPS/USE_HSTS/ACME): {}",
                    ignored.join(", ")
                ),
            });
        }
    }
    (services, rejected)
}

/// `host:port`, written without the formatting machinery: this runs for every task of every
/// app (30,000 times for 10,000 apps of 3 tasks).
fn address(host: &str, port: u32) -> String {
    let mut digits = itoa::Buffer::new();
    let port = digits.format(port);
    let mut address = String::with_capacity(host.len() + 1 + port.len());
    address.push_str(host);
    address.push(':');
    address.push_str(port);
    address
}

/// The weave IP and container port; the agent's host port only where allowed.
fn task_address(
    task: &MarathonTask,
    container_port: Option<u32>,
    index: usize,
    host_ports: HostPorts,
) -> Result<String, String> {
    if let (Some(port), Some(ip)) = (container_port, task.ip_addresses.first()) {
        return Ok(address(&ip.ip_address, port));
    }
    match (host_ports, task.host.as_deref(), task.ports.get(index)) {
        (HostPorts::Allow, Some(host), Some(&port)) => Ok(address(host, port)),
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

    /// What one app has dropped is named 16 at a time: its ports' near-miss groups, a port's
    /// tasks without an address weft may route to.
    #[test]
    fn what_one_app_has_dropped_is_named_up_to_the_bound() {
        let ports: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"containerPort":{}}}"#, 1000 + i))
            .collect();
        let json = format!(
            r#"{{"id":"/near","labels":{{"HAPROXY_GROUP":"External ","HAPROXY_0_VHOST":"n.example.com"}},"container":{{"portMappings":[{}]}}}}"#,
            ports.join(",")
        );
        let app: MarathonApp = serde_json::from_str(&json).unwrap();
        let (_, rejected) = app_services(&app, &settings("external", None, HostPorts::Deny));
        assert_eq!(
            rejected.len(),
            crate::model::MAX_NAMED_PARTS + 1,
            "{rejected:?}"
        );
        assert_eq!(
            rejected[crate::model::MAX_NAMED_PARTS].reason,
            "24 more ports dropped (only the first 16 are named)"
        );

        let tasks: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"id":"t{i}","state":"TASK_RUNNING","startedAt":"x","host":"10.0.0.1","ports":[31000]}}"#))
            .collect();
        let json = format!(
            r#"{{"id":"/hostnet","labels":{{"HAPROXY_0_VHOST":"h.example.com"}},"portDefinitions":[{{"port":10000}}],"tasks":[{}]}}"#,
            tasks.join(",")
        );
        let app: MarathonApp = serde_json::from_str(&json).unwrap();
        let (services, rejected) = app_services(&app, &settings("*", None, HostPorts::Deny));
        assert!(services.iter().all(|s| s.servers.is_empty()));
        let tasks: Vec<&Rejected> = rejected
            .iter()
            .filter(|r| r.subject.starts_with("app \"/hostnet\" task"))
            .collect();
        assert_eq!(tasks.len(), crate::model::MAX_NAMED_PARTS, "{rejected:?}");
        assert!(rejected
            .iter()
            .any(|r| r.subject == "app \"/hostnet\" port 0"
                && r.reason == "24 more tasks dropped (only the first 16 are named)"));
    }

    /// An app of 300 ports with hosts and 300 tasks (43 KB) makes 32 services, not 300 with
    /// 90,000 servers between them.
    #[test]
    fn the_services_of_one_app_are_bounded() {
        let n = 300;
        let labels: Vec<String> = (0..n)
            .map(|i| format!(r#""HAPROXY_{i}_VHOST":"p{i}.evil.example.com""#))
            .collect();
        let ports: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"containerPort":{}}}"#, 1000 + i))
            .collect();
        let tasks: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"id":"t{i}","state":"TASK_RUNNING","startedAt":"x","ipAddresses":[{{"ipAddress":"10.2.{}.{}"}}]}}"#,
                    1 + i / 250,
                    i % 250 + 1
                )
            })
            .collect();
        let json = format!(
            r#"{{"id":"/evil","labels":{{{}}},"container":{{"portMappings":[{}]}},"tasks":[{}]}}"#,
            labels.join(","),
            ports.join(","),
            tasks.join(",")
        );
        let app: MarathonApp = serde_json::from_str(&json).unwrap();
        let (services, rejected) = app_services(&app, &settings("*", None, HostPorts::Deny));
        assert_eq!(services.len(), MAX_SERVICES_PER_APP);
        assert!(services.iter().all(|s| s.servers.len() == n));
        assert!(
            rejected.iter().any(|r| r.subject == "app \"/evil\""
                && r.reason
                    == "asks for 300 services (ports with hosts): only the first 32 are routed"),
            "{rejected:?}"
        );
    }

    #[test]
    fn labels() {
        assert!(is_supported_label("HAPROXY_GROUP"));
        assert!(is_supported_label("HAPROXY_0_VHOST"));
        assert!(is_supported_label("HAPROXY_12_PATH"));
        assert!(is_supported_label("team"));
        assert!(!is_supported_label("HAPROXY_0_STICKY"));
        assert!(!is_supported_label("HAPROXY_DEPLOYMENT_GROUP"));
        assert!(is_supported_label("HAPROXY_0_REDIRECT_TO_HTTPS"));
        assert!(!is_supported_label("HAPROXY_0_STICKY"));
    }

    #[test]
    fn port_labels_by_index_and_key() {
        let mut app = MarathonApp::default();
        for (label, value) in [
            ("HAPROXY_0_VHOST", "a"),
            ("HAPROXY_12_PATH", "b"),
            ("HAPROXY_1_PATH", "c"),
            ("HAPROXY_2_PATHS", "d"),
        ] {
            app.labels.insert(label.into(), value.into());
        }
        let label = |index, key| PortLabels::of(&app, index).get(key);
        assert_eq!(label(0, "VHOST"), Some("a"));
        assert_eq!(label(12, "PATH"), Some("b"));
        assert_eq!(label(1, "PATH"), Some("c"));
        assert_eq!(label(1, "VHOST"), None);
        assert_eq!(label(2, "PATH"), None);
        assert_eq!(label(usize::MAX, "REDIRECT_TO_HTTPS"), None);
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
        let apps = decode_apps(&fixture("zdd_apps.json")).unwrap().apps.records;
        assert_eq!(apps.len(), 2);
        let s = settings("external", None, HostPorts::Deny);
        for app in &apps {
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
        let apps = decode_apps(&fixture("zdd_apps.json")).unwrap().apps.records;
        let s = settings("external", Some("example.com"), HostPorts::Deny);
        let green = apps.iter().find(|a| a.id == "/nginx-green").unwrap();
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
        // The HTTP health check: path /, every 3 s, 10 failures (fall 11), 15 s each at most.
        assert_eq!(shop.check, Some(CheckDef::Http("/".into())));
        assert_eq!(shop.check_interval, Some(std::time::Duration::from_secs(3)));
        assert_eq!(shop.check_fall, Some(11));
        assert_eq!(shop.check_timeout.as_deref(), Some("15s"));
    }

    #[test]
    fn other_groups_are_skipped_silently() {
        let apps = decode_apps(&fixture("zdd_apps.json")).unwrap().apps.records;
        let s = settings("internal", Some("example.com"), HostPorts::Deny);
        for app in &apps {
            assert_eq!(app_services(app, &s), (vec![], vec![]));
        }
        let all = settings("*", Some("example.com"), HostPorts::Deny);
        assert_eq!(app_services(&apps[0], &all).0.len(), 1);
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
        // The HTTP check wins over the TCP one before it.
        assert_eq!(shop.check, Some(CheckDef::Http("/health".into())));
        assert_eq!(
            shop.check_fall,
            Some(1),
            "0 failures (Marathon never kills): marathon-lb's fall 1"
        );
        assert_eq!(shop.check_timeout, None);
    }

    /// marathon-lb's mapping, per protocol: `fall` = maxConsecutiveFailures + 1, `timeout
    /// check` = timeoutSeconds, `inter` = intervalSeconds; TCP checks are plain `check`s;
    /// COMMAND and HTTPS checks have no HAProxy check; each port has its own.
    #[test]
    fn health_checks_map_as_marathon_lb_maps_them() {
        let app = app(r#"{
            "id": "/checked",
            "labels": {"HAPROXY_GROUP": "external", "HAPROXY_0_VHOST": "a.example.com", "HAPROXY_1_VHOST": "b.example.com", "HAPROXY_2_VHOST": "c.example.com", "HAPROXY_3_VHOST": "d.example.com"},
            "container": {"portMappings": [{"containerPort": 80}, {"containerPort": 81}, {"containerPort": 82}, {"containerPort": 83}]},
            "healthChecks": [
                {"protocol": "COMMAND", "portIndex": 0, "intervalSeconds": 1},
                {"protocol": "TCP", "portIndex": 0, "intervalSeconds": 10, "timeoutSeconds": 20, "maxConsecutiveFailures": 3},
                {"protocol": "MESOS_TCP", "portIndex": 1, "intervalSeconds": 7, "timeoutSeconds": 2, "maxConsecutiveFailures": 0},
                {"protocol": "HTTPS", "portIndex": 2, "path": "/secure"},
                {"portIndex": 3, "path": "/ping", "intervalSeconds": 60, "timeoutSeconds": 0}
            ],
            "tasks": []}"#);
        let (services, rejected) = app_services(&app, &settings("external", None, HostPorts::Deny));
        assert!(rejected.is_empty(), "{rejected:?}");
        let check = |i: usize| {
            let s = &services[i];
            (
                s.check.clone(),
                s.check_interval.map(|d| d.as_secs()),
                s.check_fall,
                s.check_timeout.clone(),
            )
        };
        assert_eq!(
            check(0),
            (Some(CheckDef::Tcp), Some(10), Some(4), Some("20s".into()))
        );
        assert_eq!(
            check(1),
            (Some(CheckDef::Tcp), Some(7), Some(1), Some("2s".into()))
        );
        assert_eq!(check(2), (None, None, None, None));
        // Marathon's default protocol is HTTP; a timeout of 0 is none.
        assert_eq!(
            check(3),
            (Some(CheckDef::Http("/ping".into())), Some(60), None, None)
        );
    }

    /// A task that does not decode is dropped alone, named with its app; the app's other
    /// tasks serve. In an app of another group, it is nobody's concern here.
    #[test]
    fn a_task_that_does_not_decode_is_rejected_with_its_app() {
        let body = br#"{"apps":[{
            "id": "/shop",
            "labels": {"HAPROXY_GROUP": "external", "HAPROXY_0_VHOST": "shop.example.com"},
            "container": {"portMappings": [{"containerPort": 8080}]},
            "tasks": [
                {"id": "good", "ipAddresses": [{"ipAddress": "10.2.1.5"}], "state": "TASK_RUNNING"},
                {"id": "bad", "ipAddresses": [{"ipAddress": "10.2.1.6"}], "ports": [-1], "state": "TASK_RUNNING"}
            ]}]}"#;
        let apps = decode_apps(body).unwrap().apps.records;
        let (services, rejected) =
            app_services(&apps[0], &settings("external", None, HostPorts::Deny));
        assert_eq!(services[0].servers, ["10.2.1.5:8080"]);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].subject, "app \"/shop\" task \"bad\"");
        assert_eq!(
            rejected[0].reason,
            "does not decode, dropped: ports[0]: invalid value: integer `-1`, expected u32"
        );
        let (_, rejected) = app_services(&apps[0], &settings("internal", None, HostPorts::Deny));
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn marathon_lbs_redirect_and_hsts_labels() {
        let app = app(r#"{
            "id": "/shop",
            "labels": {"HAPROXY_GROUP": "external", "HAPROXY_0_VHOST": "shop.example.com", "HAPROXY_0_REDIRECT_TO_HTTPS": "true", "HAPROXY_0_USE_HSTS": "true", "HAPROXY_0_ACME": "true", "HAPROXY_1_VHOST": "plain.example.com", "HAPROXY_1_REDIRECT_TO_HTTPS": "false"},
            "container": {"portMappings": [{"containerPort": 8080}, {"containerPort": 8081}]},
            "tasks": []}"#);
        let (services, rejected) = app_services(&app, &settings("external", None, HostPorts::Deny));
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(services[0].redirect.as_deref(), Some("https"));
        assert_eq!(services[0].hsts, Some(true));
        assert_eq!(services[0].acme, Some(true));
        assert_eq!(services[1].acme, None);
        assert_eq!(services[1].redirect, None);
        assert_eq!(services[1].hsts, None);
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
