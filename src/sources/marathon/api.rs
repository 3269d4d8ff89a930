//! Marathon's JSON, as `/v2/apps?embed=apps.tasks` and `/v2/events` send it. Every field
//! weft does not use is ignored, every field it uses may be missing or null (each Marathon
//! version added or moved some).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::sources::nullable;

/// `GET /v2/apps?embed=apps.tasks`.
#[derive(Debug, Clone, Deserialize)]
pub struct AppsResponse {
    #[serde(default, deserialize_with = "nullable")]
    pub apps: Vec<MarathonApp>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarathonApp {
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub port_definitions: Vec<PortDefinition>,
    #[serde(default)]
    pub container: Option<Container>,
    #[serde(default, deserialize_with = "nullable")]
    pub networks: Vec<Network>,
    /// Pre-1.5 IP-per-task.
    #[serde(default)]
    pub ip_address: Option<IpAddressSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub health_checks: Vec<HealthCheckSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub tasks: Vec<MarathonTask>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortDefinition {
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub docker: Option<Docker>,
    /// Marathon 1.5+ keeps the port mappings here.
    #[serde(default)]
    pub port_mappings: Option<Vec<PortMapping>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Docker {
    /// BRIDGE, HOST or USER (before 1.5).
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub port_mappings: Option<Vec<PortMapping>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[serde(default)]
    pub container_port: Option<u32>,
    #[serde(default)]
    pub host_port: Option<u32>,
    #[serde(default)]
    pub service_port: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Network {
    /// host, container or container/bridge.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressSpec {
    #[serde(default)]
    pub network_name: Option<String>,
    #[serde(default)]
    pub discovery: Option<Discovery>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Discovery {
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<DiscoveryPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DiscoveryPort {
    #[serde(default)]
    pub number: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// HTTP, HTTPS, TCP, MESOS_HTTP, MESOS_HTTPS, MESOS_TCP, COMMAND.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub port_index: Option<usize>,
    #[serde(default)]
    pub interval_seconds: Option<u64>,
    #[serde(default)]
    pub max_consecutive_failures: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarathonTask {
    pub id: String,
    /// The agent.
    #[serde(default)]
    pub host: Option<String>,
    /// Host ports, one per service port.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_addresses: Vec<TaskIp>,
    /// TASK_RUNNING, TASK_STAGING, ...; older versions omit it.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub health_check_results: Vec<HealthCheckResult>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskIp {
    pub ip_address: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HealthCheckResult {
    #[serde(default)]
    pub alive: bool,
}

pub fn decode_apps(body: &[u8]) -> Result<AppsResponse, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_missing_fields_read_as_empty() {
        let apps = decode_apps(
            br#"{"apps":[{"id":"/a","labels":null,"ipAddress":null,"tasks":[{"id":"t","ports":null,"startedAt":null,"extra":1}]},{"id":"/b"}]}"#,
        )
        .unwrap();
        assert_eq!(apps.apps.len(), 2);
        assert!(apps.apps[0].labels.is_empty());
        assert!(apps.apps[0].ip_address.is_none());
        assert!(apps.apps[0].tasks[0].ports.is_empty());
        assert!(apps.apps[1].tasks.is_empty());
    }
}
