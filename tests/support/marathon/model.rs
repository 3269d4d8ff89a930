//! Builders for Marathon apps and tasks, rendered as the JSON that `GET /v2/apps?embed=apps.tasks`
//! returns (keys as in tests/fixtures/marathon/zdd_apps.json, plus the 1.5+ ones).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// Where a task's host comes from when a test does not say: TEST-NET-1, never routable, so a
/// client that routes to host + hostPort by mistake cannot reach a loopback backend.
pub const DEFAULT_HOST: &str = "192.0.2.20";
pub const DEFAULT_SLAVE_ID: &str = "1f09399d-0cb0-4484-afd7-f08e99d2acbb-S1";
pub const DEFAULT_IMAGE: &str = "nginx:1.25";

/// How an app is networked, in the JSON shape of the Marathon version that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// Marathon < 1.5: `container.docker.network: BRIDGE`, mappings in `container.docker` with
    /// `hostPort: 0`; `ipAddress: null`. Clients route to task host + `ports[]`.
    DockerBridge,
    /// Marathon < 1.5: `container.docker.network: HOST`, ports in `portDefinitions`.
    DockerHost,
    /// Marathon 1.1-1.4 IP-per-task: `container.docker.network: USER`, mappings (no hostPort) in
    /// `container.docker`, `ipAddress {networkName, discovery {ports: []}}`. The default.
    DockerUser(String),
    /// Marathon 1.5+: `container.portMappings` (no hostPort), `networks: [{mode: container, name}]`,
    /// no `ipAddress`.
    Container(String),
    /// Marathon 1.5+: `container.portMappings` with `hostPort: 0`,
    /// `networks: [{mode: container/bridge}]`.
    ContainerBridge,
    /// Marathon 1.5+: `networks: [{mode: host}]`, ports in `portDefinitions`.
    Host,
    /// Marathon < 1.5 IP-per-task with the Mesos containerizer (`container.type: MESOS`: Marathon
    /// refused discovery ports on Docker apps): `ipAddress.discovery.ports [{number, name,
    /// protocol}]`, no port mappings.
    IpAddress(String),
}

/// One port of an app: `containerPort` (or the host port for host networking) and its
/// `servicePort`; 0 asks the double to assign one from 10000 up, as Marathon does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub container_port: u16,
    pub service_port: u16,
    pub name: Option<String>,
}

/// A Marathon app, for `MarathonDouble::put_app`.
#[derive(Clone, Debug)]
pub struct App {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub instances: u32,
    pub image: String,
    pub network: NetworkMode,
    pub ports: Vec<Port>,
    pub health_checks: Vec<Value>,
    /// `None`: the double stamps the time of `put_app`, as Marathon does on every change.
    pub version: Option<String>,
    /// Started by `put_app` after the app is stored, each with its status update.
    pub tasks: Vec<Task>,
}

impl App {
    /// An app on the Docker USER network `weave`, with no ports, labels or health checks yet.
    /// `id` is absolute, as Marathon answers it ("/group/app").
    pub fn new(id: &str) -> App {
        assert!(id.starts_with('/'), "app ids are absolute: {id:?}");
        App {
            id: id.to_string(),
            labels: BTreeMap::new(),
            instances: 1,
            image: DEFAULT_IMAGE.to_string(),
            network: NetworkMode::DockerUser("weave".to_string()),
            ports: Vec::new(),
            health_checks: Vec::new(),
            version: None,
            tasks: Vec::new(),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> App {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn instances(mut self, instances: u32) -> App {
        self.instances = instances;
        self
    }

    pub fn image(mut self, image: &str) -> App {
        self.image = image.to_string();
        self
    }

    pub fn network_mode(mut self, network: NetworkMode) -> App {
        self.network = network;
        self
    }

    /// Adds a port (port index = number of earlier calls) with a service port assigned later.
    pub fn container_port(mut self, port: u16) -> App {
        self.ports.push(Port {
            container_port: port,
            service_port: 0,
            name: None,
        });
        self
    }

    /// Sets the service port of the last port added.
    pub fn service_port(mut self, port: u16) -> App {
        self.last_port().service_port = port;
        self
    }

    /// Names the last port added (`portMappings[].name`, `discovery.ports[].name`).
    pub fn port_name(mut self, name: &str) -> App {
        self.last_port().name = Some(name.to_string());
        self
    }

    /// An HTTP health check on port index 0 (Marathon's defaults for the rest: 300 s grace,
    /// 20 s timeout).
    pub fn http_health_check(mut self, path: &str, interval_s: u32, max_failures: u32) -> App {
        self.health_checks.push(json!({
            "protocol": "HTTP",
            "path": path,
            "portIndex": 0,
            "gracePeriodSeconds": 300,
            "intervalSeconds": interval_s,
            "timeoutSeconds": 20,
            "maxConsecutiveFailures": max_failures,
            "delaySeconds": 15,
            "ignoreHttp1xx": false
        }));
        self
    }

    /// Any health check, as Marathon's JSON (TCP, MESOS_HTTP, COMMAND, `port` instead of
    /// `portIndex`, ...).
    pub fn health_check(mut self, check: Value) -> App {
        self.health_checks.push(check);
        self
    }

    pub fn version(mut self, version: &str) -> App {
        self.version = Some(version.to_string());
        self
    }

    pub fn task(mut self, task: Task) -> App {
        self.tasks.push(task);
        self
    }

    fn last_port(&mut self) -> &mut Port {
        self.ports
            .last_mut()
            .expect("container_port() before service_port()/port_name()")
    }

    /// The app definition (what `api_post_event` carries): every key of /v2/apps but the
    /// counts, `deployments` and `tasks`. Service ports must be assigned already.
    pub fn definition_json(&self, version: &str) -> Value {
        let mut app = json!({
            "id": self.id,
            "cmd": null,
            "args": null,
            "user": null,
            "env": {},
            "instances": self.instances,
            "cpus": 0.1,
            "mem": 128.0,
            "disk": 0.0,
            "gpus": 0,
            "executor": "",
            "constraints": [],
            "uris": [],
            "fetch": [],
            "storeUrls": [],
            "backoffSeconds": 1,
            "backoffFactor": 1.15,
            "maxLaunchDelaySeconds": 3600,
            "container": self.container_json(),
            "healthChecks": self.health_checks,
            "readinessChecks": [],
            "dependencies": [],
            "upgradeStrategy": {"minimumHealthCapacity": 1.0, "maximumOverCapacity": 1.0},
            "labels": self.labels,
            "acceptedResourceRoles": ["*"],
            "requirePorts": false,
            "portDefinitions": self.port_definitions(),
            "killSelection": "YOUNGEST_FIRST",
            "unreachableStrategy": {"inactiveAfterSeconds": 0, "expungeAfterSeconds": 0},
            "secrets": {},
            "version": version,
            "versionInfo": {"lastScalingAt": version, "lastConfigChangeAt": version}
        });
        let object = app.as_object_mut().unwrap();
        match &self.network {
            NetworkMode::DockerBridge | NetworkMode::DockerHost => {
                object.insert("ipAddress".into(), Value::Null);
            }
            NetworkMode::DockerUser(name) => {
                object.insert("ipAddress".into(), ip_address(name, Vec::new()));
            }
            NetworkMode::IpAddress(name) => {
                let ports = self
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(i, port)| {
                        json!({
                            "number": port.container_port,
                            "name": port.name.clone().unwrap_or_else(|| format!("port{i}")),
                            "protocol": "tcp"
                        })
                    })
                    .collect();
                object.insert("ipAddress".into(), ip_address(name, ports));
            }
            NetworkMode::Container(name) => {
                object.insert(
                    "networks".into(),
                    json!([{"mode": "container", "name": name}]),
                );
            }
            NetworkMode::ContainerBridge => {
                object.insert("networks".into(), json!([{"mode": "container/bridge"}]));
            }
            NetworkMode::Host => {
                object.insert("networks".into(), json!([{"mode": "host"}]));
            }
        }
        app
    }

    pub fn service_ports(&self) -> Vec<u16> {
        self.ports.iter().map(|port| port.service_port).collect()
    }

    fn container_json(&self) -> Value {
        let mut docker = Map::new();
        docker.insert("image".into(), json!(self.image));
        if matches!(self.network, NetworkMode::IpAddress(_)) {
            docker.insert("forcePullImage".into(), json!(false));
            return json!({"type": "MESOS", "volumes": [], "docker": docker});
        }
        docker.insert("privileged".into(), json!(false));
        docker.insert("parameters".into(), json!([]));
        docker.insert("forcePullImage".into(), json!(false));
        let mut container = Map::new();
        container.insert("type".into(), json!("DOCKER"));
        container.insert("volumes".into(), json!([]));
        match &self.network {
            NetworkMode::DockerBridge => {
                docker.insert("network".into(), json!("BRIDGE"));
                docker.insert("portMappings".into(), self.port_mappings(true));
            }
            NetworkMode::DockerHost => {
                docker.insert("network".into(), json!("HOST"));
            }
            NetworkMode::DockerUser(_) => {
                docker.insert("network".into(), json!("USER"));
                docker.insert("portMappings".into(), self.port_mappings(false));
            }
            NetworkMode::Container(_) => {
                container.insert("portMappings".into(), self.port_mappings(false));
            }
            NetworkMode::ContainerBridge => {
                container.insert("portMappings".into(), self.port_mappings(true));
            }
            NetworkMode::Host | NetworkMode::IpAddress(_) => {}
        }
        container.insert("docker".into(), Value::Object(docker));
        Value::Object(container)
    }

    fn port_mappings(&self, with_host_port: bool) -> Value {
        self.ports
            .iter()
            .map(|port| {
                let mut mapping = json!({
                    "containerPort": port.container_port,
                    "servicePort": port.service_port,
                    "protocol": "tcp",
                    "labels": {}
                });
                if with_host_port {
                    mapping["hostPort"] = json!(0);
                }
                if let Some(name) = &port.name {
                    mapping["name"] = json!(name);
                }
                mapping
            })
            .collect()
    }

    /// Host networking declares its ports here; the other shapes have none (Marathon refuses
    /// both port definitions and port mappings).
    fn port_definitions(&self) -> Value {
        if !matches!(
            self.network,
            NetworkMode::DockerBridge | NetworkMode::DockerHost | NetworkMode::Host
        ) {
            return json!([]);
        }
        self.ports
            .iter()
            .map(|port| {
                let mut definition = json!({
                    "port": port.service_port,
                    "protocol": "tcp",
                    "labels": {}
                });
                if let Some(name) = &port.name {
                    definition["name"] = json!(name);
                }
                definition
            })
            .collect()
    }
}

fn ip_address(network: &str, discovery_ports: Vec<Value>) -> Value {
    json!({
        "groups": [],
        "labels": {},
        "discovery": {"ports": discovery_ports},
        "networkName": network
    })
}

/// A Marathon task, for `MarathonDouble::add_task` (or `App::task`).
#[derive(Clone, Debug)]
pub struct Task {
    pub id: String,
    pub host: String,
    pub ip_addresses: Vec<String>,
    pub host_ports: Vec<u16>,
    /// `None`: no `state` key, as Marathon < 1.3 wrote tasks.
    pub state: Option<String>,
    /// The first health check's result: `None` = no result yet (`healthCheckResults: []`).
    pub health: Option<bool>,
    pub slave_id: String,
    /// `None`: the app's version when the task is added.
    pub version: Option<String>,
}

impl Task {
    /// A TASK_RUNNING task on `DEFAULT_HOST`, without IPs, ports or health results.
    pub fn new(id: &str) -> Task {
        Task {
            id: id.to_string(),
            host: DEFAULT_HOST.to_string(),
            ip_addresses: Vec::new(),
            host_ports: Vec::new(),
            state: Some("TASK_RUNNING".to_string()),
            health: None,
            slave_id: DEFAULT_SLAVE_ID.to_string(),
            version: None,
        }
    }

    /// Adds an IPv4 address (`ipAddresses[]`); on weave the first is the container's IP.
    pub fn ip(mut self, ip: &str) -> Task {
        self.ip_addresses.push(ip.to_string());
        self
    }

    /// The agent the task runs on (`host`).
    pub fn host(mut self, host: &str) -> Task {
        self.host = host.to_string();
        self
    }

    /// Adds a host port (`ports[]`).
    pub fn host_port(mut self, port: u16) -> Task {
        self.host_ports.push(port);
        self
    }

    pub fn state(mut self, state: &str) -> Task {
        self.state = Some(state.to_string());
        self
    }

    /// No `state` key (Marathon < 1.3); `startedAt` still says whether it runs.
    pub fn without_state(mut self) -> Task {
        self.state = None;
        self
    }

    pub fn health(mut self, alive: Option<bool>) -> Task {
        self.health = alive;
        self
    }

    pub fn slave_id(mut self, slave_id: &str) -> Task {
        self.slave_id = slave_id.to_string();
        self
    }

    pub fn version(mut self, version: &str) -> Task {
        self.version = Some(version.to_string());
        self
    }

    /// The task as /v2/apps embeds it. `startedAt` is null while staging or starting.
    pub fn to_json(
        &self,
        app_id: &str,
        app_version: &str,
        service_ports: &[u16],
        now: &str,
    ) -> Value {
        let started = !matches!(
            self.state.as_deref(),
            Some("TASK_STAGING" | "TASK_STARTING")
        );
        let ip_addresses: Vec<Value> = self
            .ip_addresses
            .iter()
            .map(|ip| json!({"ipAddress": ip, "protocol": "IPv4"}))
            .collect();
        let mut task = json!({
            "id": self.id,
            "appId": app_id,
            "host": self.host,
            "ipAddresses": ip_addresses,
            "ports": self.host_ports,
            "servicePorts": service_ports,
            "startedAt": if started { json!(now) } else { Value::Null },
            "stagedAt": now,
            "version": self.version.as_deref().unwrap_or(app_version),
            "slaveId": self.slave_id,
            "localVolumes": [],
            "healthCheckResults": []
        });
        if let Some(state) = &self.state {
            task["state"] = json!(state);
        }
        if let Some(alive) = self.health {
            record_health(&mut task, alive, now);
        }
        task
    }
}

/// Records a result of the task's first health check, as Marathon's health check actor does.
pub fn record_health(task: &mut Value, alive: bool, now: &str) {
    let task_id = task["id"].clone();
    let results = &mut task["healthCheckResults"];
    if !results.is_array() {
        *results = json!([]);
    }
    let results = results.as_array_mut().unwrap();
    if results.is_empty() {
        results.push(json!({
            "alive": alive,
            "consecutiveFailures": 0,
            "firstSuccess": null,
            "lastFailure": null,
            "lastSuccess": null,
            "lastFailureCause": null,
            "taskId": task_id
        }));
    }
    let result = &mut results[0];
    result["alive"] = json!(alive);
    if alive {
        result["consecutiveFailures"] = json!(0);
        result["lastSuccess"] = json!(now);
        if result["firstSuccess"].is_null() {
            result["firstSuccess"] = json!(now);
        }
    } else {
        let failures = result["consecutiveFailures"].as_u64().unwrap_or(0);
        result["consecutiveFailures"] = json!(failures + 1);
        result["lastFailure"] = json!(now);
        result["lastFailureCause"] = json!("503 Service Unavailable");
    }
}

/// States after which Marathon expunges a task from the app.
pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "TASK_FINISHED"
            | "TASK_FAILED"
            | "TASK_KILLED"
            | "TASK_LOST"
            | "TASK_ERROR"
            | "TASK_DROPPED"
            | "TASK_GONE"
            | "TASK_GONE_BY_OPERATOR"
    )
}

/// `tasksStaged`, `tasksRunning`, `tasksHealthy`, `tasksUnhealthy` from the embedded tasks.
/// Tasks without `state` (old Marathons) count as running once started.
pub fn counts(tasks: &[Value]) -> [(&'static str, u64); 4] {
    let mut staged = 0;
    let mut running = 0;
    let mut healthy = 0;
    let mut unhealthy = 0;
    for task in tasks {
        match task["state"].as_str() {
            Some("TASK_RUNNING") => running += 1,
            None if !task["startedAt"].is_null() => running += 1,
            _ => {}
        }
        if task["startedAt"].is_null() {
            staged += 1;
        }
        let results = task["healthCheckResults"].as_array().map_or(&[][..], |r| r);
        if !results.is_empty() {
            if results.iter().all(|r| r["alive"] == json!(true)) {
                healthy += 1;
            } else {
                unhealthy += 1;
            }
        }
    }
    [
        ("tasksStaged", staged),
        ("tasksRunning", running),
        ("tasksHealthy", healthy),
        ("tasksUnhealthy", unhealthy),
    ]
}

/// Marathon's instance ID for a task ID: `app.instance-<uuid>._app.1` -> `app.instance-<uuid>`;
/// older IDs (`app.<uuid>`) are their own instance.
pub fn instance_id(task_id: &str) -> &str {
    task_id.find("._app.").map_or(task_id, |i| &task_id[..i])
}
