//! Marathon's JSON, as `/v2/apps?embed=apps.tasks` and `/v2/events` send it. Every field
//! weft does not use is ignored, every field it uses may be missing or null (each Marathon
//! version added or moved some). Apps, and the tasks inside each, are decoded one by one: an
//! app or task that does not decode is dropped with its reason, never the whole answer.

use std::sync::Arc;

use serde::Deserialize;

use crate::sources::http::Sink;
use crate::sources::nullable;
use crate::sources::records::{self, quoted, Record, Records, Streamed};

/// `GET /v2/apps?embed=apps.tasks`.
#[derive(Debug, Clone, Deserialize)]
pub struct AppsResponse {
    #[serde(default, deserialize_with = "nullable")]
    pub apps: Records<MarathonApp>,
}

/// An app's labels that weft reads (`HAPROXY_*`), sorted by name: a list, as apps carry a few
/// (a map's node would cost ten times the memory, and weft keeps every app between fetches).
/// Read straight into the list; of two labels of one name, the last counts, as a map would
/// keep it. Every other label (teams' own: `DCOS_*`, `traefik.*`, build metadata...) is passed
/// over as it is read, whatever it holds: weft neither keeps nor judges it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Vec<(String, String)>);

/// The prefix of every label weft reads.
pub const LABEL_PREFIX: &str = "HAPROXY_";

/// A label's name, kept (`Some`) when it is one weft reads, else `None`, unallocated.
struct LabelName;

impl<'de> serde::de::DeserializeSeed<'de> for LabelName {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for LabelName {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a label name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Option<String>, E> {
        Ok(name.starts_with(LABEL_PREFIX).then(|| name.to_string()))
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Labels, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = Labels;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                let mut labels = Vec::new();
                while let Some(name) = map.next_key_seed(LabelName)? {
                    match name {
                        Some(name) => labels.push((name, map.next_value::<String>()?)),
                        None => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                // Last first, so that a stable sort keeps the last of one name first.
                labels.reverse();
                labels.sort_by(|a, b| a.0.cmp(&b.0));
                labels.dedup_by(|later, kept| later.0 == kept.0);
                Ok(Labels(labels))
            }
        }
        deserializer.deserialize_map(List)
    }
}

impl Labels {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(key, _)| key.as_str().cmp(name))
            .ok()
            .map(|index| self.0[index].1.as_str())
    }

    /// The labels whose names begin with `prefix`: they lie together, the list being sorted.
    pub fn starting_with(&self, prefix: &str) -> &[(String, String)] {
        let start = self.0.partition_point(|(key, _)| key.as_str() < prefix);
        let len = self.0[start..].partition_point(|(key, _)| key.starts_with(prefix));
        &self.0[start..start + len]
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(key, _)| key.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets one label (tests build apps this way).
    pub fn insert(&mut self, name: String, value: String) {
        match self.0.binary_search_by(|(key, _)| key.cmp(&name)) {
            Ok(index) => self.0[index].1 = value,
            Err(index) => self.0.insert(index, (name, value)),
        }
    }
}

/// Whether a field is there and not null, whatever it holds.
fn is_set<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Option::<serde::de::IgnoredAny>::deserialize(deserializer).map(|value| value.is_some())
}

/// Just the `id`, to name an app or task that does not decode.
#[derive(Deserialize)]
struct Id {
    id: String,
}

impl Record for MarathonApp {
    fn name(raw: &str) -> Option<String> {
        serde_json::from_str::<Id>(raw)
            .ok()
            .map(|app| quoted(&app.id))
    }
}

impl Record for MarathonTask {
    fn name(raw: &str) -> Option<String> {
        serde_json::from_str::<Id>(raw)
            .ok()
            .map(|task| quoted(&task.id))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarathonApp {
    pub id: String,
    /// When the definition (or its scale) last changed, as Marathon writes it: an ISO 8601 UTC
    /// timestamp, so that a later version sorts after an earlier one.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: Labels,
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
    pub tasks: Records<MarathonTask>,
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
    /// How long one check may take (Marathon's default 20).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
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
    /// `startedAt` is set (not null): it started.
    #[serde(default, rename = "startedAt", deserialize_with = "is_set")]
    pub started: bool,
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

/// `GET /v2/apps/{id}?embed=app.tasks`: the app is decoded on its own, as one record of a full
/// answer would be.
#[derive(Debug, Deserialize)]
pub struct AppResponse<'a> {
    #[serde(borrow)]
    pub app: &'a serde_json::value::RawValue,
}

/// What one app's own answer holds.
#[derive(Debug)]
pub enum FetchedApp {
    Found(Box<MarathonApp>),
    /// It does not decode: why.
    Broken(String),
}

/// Decodes `{"app": {...}}`: only an answer that is not JSON, or has no `app`, fails; an app
/// that does not decode is [`FetchedApp::Broken`], as in a full answer.
pub fn decode_app(body: &[u8]) -> Result<FetchedApp, String> {
    let text = std::str::from_utf8(body).map_err(|err| err.to_string())?;
    let response: AppResponse = serde_json::from_str(text).map_err(|err| err.to_string())?;
    Ok(
        match records::decode_record::<MarathonApp>(response.app.get()) {
            Ok(app) => FetchedApp::Found(Box::new(app)),
            Err(reason) => FetchedApp::Broken(reason),
        },
    )
}

/// `status_update_event`: a task moved to `task_status`, with where it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusUpdate {
    pub task_id: String,
    pub task_status: String,
    pub app_id: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_addresses: Vec<TaskIp>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<u32>,
    /// The app version the task runs.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// `health_status_changed_event`: Marathon 1.4+ names the instance, earlier ones the task.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthChanged {
    pub app_id: String,
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
    pub alive: bool,
    /// The app version the task runs.
    #[serde(default)]
    pub version: Option<String>,
}

/// `api_post_event`: a definition was posted; only its target is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiPost {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub app_definition: Option<DefinitionId>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DefinitionId {
    #[serde(default)]
    pub id: Option<String>,
}

/// `app_terminated_event`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppTerminated {
    pub app_id: String,
}

/// `deployment_info`, `deployment_success`, `deployment_failed`, `deployment_step_*`: the apps
/// of the plan's steps (`plan-format=light` keeps them).
#[derive(Debug, Clone, Deserialize)]
pub struct DeploymentEvent {
    pub plan: Plan,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Plan {
    #[serde(default, deserialize_with = "nullable")]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    #[serde(default, deserialize_with = "nullable")]
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    #[serde(default)]
    pub app: Option<String>,
}

/// The apps of an answer; an app or task that does not decode is among their `dropped`. Only
/// an answer that is not JSON, or whose `apps` is not a list, fails.
pub fn decode_apps(body: &[u8]) -> Result<AppsResponse, String> {
    records::decode_answer(body)
}

/// `/v2/apps?embed=apps.tasks` decoded as it comes ([`Streamed`]), each app handed to `each` as
/// soon as it is decoded: the answer [`decode_apps`] gives, its apps as `each` makes them.
pub fn apps_as_they_come<U: Send + 'static>(
    each: Arc<dyn Fn(MarathonApp) -> U + Send + Sync>,
) -> Streamed<MarathonApp, U> {
    Streamed::new("apps", br#"{"id":"/"#, each, |body| {
        decode_apps(body).map(|answer| answer.apps)
    })
}

/// [`apps_as_they_come`] over a body at hand, taken in pieces of `piece` bytes as from the
/// network (the tests and the benchmark read answers this way).
pub fn decode_apps_each<U: Send + 'static>(
    body: &[u8],
    piece: usize,
    each: impl Fn(MarathonApp) -> U + Send + Sync + 'static,
) -> Result<Records<U>, String> {
    let mut streamed = apps_as_they_come(Arc::new(each));
    for piece in body.chunks(piece.max(1)) {
        streamed.take(piece);
    }
    streamed.finish()
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
        let apps = &apps.apps.records;
        assert_eq!(apps.len(), 2);
        assert!(apps[0].labels.is_empty());
        assert!(apps[0].ip_address.is_none());
        assert!(apps[0].tasks.records[0].ports.is_empty());
        assert!(apps[1].tasks.records.is_empty());
    }

    fn good_app(id: &str) -> String {
        format!(
            r#"{{"id":"{id}","labels":{{"HAPROXY_0_VHOST":"{id}.test"}},
                "container":{{"portMappings":[{{"containerPort":8080}}]}},
                "tasks":[{{"id":"{id}.1","ipAddresses":[{{"ipAddress":"10.2.1.5"}}],"ports":[31000]}}]}}"#
        )
    }

    /// One bad app among good ones: the good ones decode, the bad one is named with its
    /// field and why.
    fn one_bad_app(bad: &str) -> AppsResponse {
        let body = format!(
            r#"{{"apps":[{},{bad},{}]}}"#,
            good_app("/a"),
            good_app("/c")
        );
        decode_apps(body.as_bytes()).unwrap()
    }

    #[test]
    fn an_app_with_container_port_minus_one_is_dropped_alone() {
        let apps = one_bad_app(
            r#"{"id":"/b","container":{"portMappings":[{"containerPort":-1}]},"tasks":[]}"#,
        );
        let ids: Vec<&str> = apps.apps.records.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["/a", "/c"]);
        assert_eq!(apps.apps.dropped.len(), 1);
        let dropped = &apps.apps.dropped[0];
        assert_eq!(dropped.subject("app"), "app \"/b\"");
        assert_eq!(
            dropped.reason,
            "container.portMappings[0].containerPort: invalid value: integer `-1`, expected u32"
        );
    }

    #[test]
    fn an_app_with_a_numeric_label_value_is_dropped_alone() {
        let apps = one_bad_app(r#"{"id":"/b","labels":{"HAPROXY_0_VHOST":5}}"#);
        assert_eq!(apps.apps.records.len(), 2);
        let dropped = &apps.apps.dropped[0];
        assert_eq!(dropped.subject("app"), "app \"/b\"");
        assert_eq!(
            dropped.reason,
            "labels.HAPROXY_0_VHOST: invalid type: integer `5`, expected a string"
        );
    }

    #[test]
    fn an_app_whose_id_cannot_be_read_is_named_by_its_place() {
        let apps = one_bad_app(r#"{"id":42}"#);
        assert_eq!(apps.apps.records.len(), 2);
        assert_eq!(apps.apps.dropped[0].subject("app"), "app #2");
    }

    /// A bad task drops that task, not its app.
    #[test]
    fn a_task_with_a_bad_port_is_dropped_alone() {
        let apps = one_bad_app(
            r#"{"id":"/b","labels":{"HAPROXY_0_VHOST":"b.test"},"tasks":[
                {"id":"/b.1","ports":[31000]},
                {"id":"/b.2","ports":[-5]},
                {"id":"/b.3","ports":["31002"]}]}"#,
        );
        assert!(apps.apps.dropped.is_empty());
        let b = &apps.apps.records[1];
        assert_eq!(b.id, "/b");
        let ids: Vec<&str> = b.tasks.records.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["/b.1"]);
        let dropped: Vec<(String, &str)> = b
            .tasks
            .dropped
            .iter()
            .map(|d| (d.subject("task"), d.reason.as_str()))
            .collect();
        assert_eq!(
            dropped,
            [
                (
                    "task \"/b.2\"".to_string(),
                    "ports[0]: invalid value: integer `-5`, expected u32"
                ),
                (
                    "task \"/b.3\"".to_string(),
                    "ports[0]: invalid type: string \"31002\", expected u32"
                ),
            ]
        );
    }

    /// The one pass ([`records::decode_answer`]) and the record-by-record way (what a failing
    /// record falls back to) read the same apps.
    #[test]
    fn one_pass_and_record_by_record_agree() {
        let zdd = crate::sources::fixture("marathon/zdd_apps.json");
        let mixed = format!(
            r#"{{"apps":[{},{}]}}"#,
            good_app("/a"),
            r#"{"id":"/b","labels":{"HAPROXY_0_VHOST":"b.test"},"tasks":[{"id":"/b.1","ports":[31000]}]}"#
        );
        for body in [&zdd[..], mixed.as_bytes()] {
            let one_pass = decode_apps(body).unwrap();
            let each: AppsResponse = serde_json::from_slice(body).unwrap();
            assert!(!one_pass.apps.records.is_empty());
            assert_eq!(format!("{one_pass:?}"), format!("{each:?}"));
        }
    }

    /// Bytes that are not UTF-8 fail the answer, even in a field weft ignores, as they did
    /// before the one pass (which does not look inside ignored fields).
    #[test]
    fn an_answer_that_is_not_utf8_fails() {
        assert!(decode_apps(b"{\"apps\":[{\"id\":\"/a\",\"cmd\":\"\xff\"}]}").is_err());
        assert!(decode_apps(b"{\"apps\":[{\"id\":\"/a\",\"cmd\":\"x\"}]}").is_ok());
    }

    #[test]
    fn a_malformed_envelope_still_fails() {
        assert!(decode_apps(b"<html>").is_err());
        assert!(decode_apps(br#"{"apps":{"id":"/a"}}"#).is_err());
        assert!(decode_apps(br#"{"apps":[{"id":"/a"}"#).is_err());
        // A task list that is not a list fails its app, not the answer.
        let apps = decode_apps(br#"{"apps":[{"id":"/a","tasks":{}},{"id":"/b"}]}"#).unwrap();
        assert_eq!(apps.apps.records.len(), 1);
        assert_eq!(
            apps.apps.dropped[0].reason,
            "tasks: invalid type: map, expected an array"
        );
    }

    #[test]
    fn labels_read_as_a_sorted_list_the_last_of_a_name_kept() {
        let apps = decode_apps(
            br#"{"apps":[{"id":"/a","labels":{"HAPROXY_B":"1","HAPROXY_A":"2","HAPROXY_B":"3"}}]}"#,
        )
        .unwrap();
        let labels = &apps.apps.records[0].labels;
        assert_eq!(
            labels.keys().collect::<Vec<_>>(),
            ["HAPROXY_A", "HAPROXY_B"]
        );
        assert_eq!(
            (labels.get("HAPROXY_A"), labels.get("HAPROXY_B")),
            (Some("2"), Some("3"))
        );
    }

    /// Labels weft does not read are passed over, whatever they hold (escaped names, values of
    /// another type); one weft reads must still be text.
    #[test]
    fn only_the_labels_weft_reads_are_kept() {
        let apps = decode_apps(
            br#"{"apps":[{"id":"/a","labels":{"DCOS_PACKAGE":"x","traefik.enable":"true","HAPROXY_0_VHOST":"a.test","\u0048APROXY_GROUP":"external","build":{"n":7},"big":"zzzzzzzz"}}]}"#,
        )
        .unwrap();
        let labels = &apps.apps.records[0].labels;
        assert_eq!(
            labels.keys().collect::<Vec<_>>(),
            ["HAPROXY_0_VHOST", "HAPROXY_GROUP"]
        );
        let apps =
            decode_apps(br#"{"apps":[{"id":"/a","labels":{"HAPROXY_0_VHOST":5}},{"id":"/b"}]}"#)
                .unwrap();
        assert_eq!(apps.apps.records.len(), 1);
        assert!(
            apps.apps.dropped[0].reason.contains("expected a string"),
            "{}",
            apps.apps.dropped[0].reason
        );
    }

    /// A large answer as Marathon writes it (no whitespace), `count` apps of 3 tasks, each app's
    /// `extra` text (raw JSON) after its id.
    fn large_answer(count: usize, extra: impl Fn(usize) -> String) -> String {
        let apps: Vec<String> = (0..count)
            .map(|i| {
                let tasks: Vec<String> = (0..3)
                    .map(|t| format!(r#"{{"id":"app-{i}.{t}","host":"10.0.0.1","ports":[31000],"ipAddresses":[{{"ipAddress":"10.2.1.{}"}}],"state":"TASK_RUNNING","startedAt":"2016-02-01T22:14:03.432Z"}}"#, t + 2))
                    .collect();
                format!(
                    r#"{{"id":"/app-{i}"{},"labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"app-{i}.test"}},"container":{{"type":"DOCKER","portMappings":[{{"containerPort":8080,"servicePort":{}}}]}},"tasks":[{}]}}"#,
                    extra(i),
                    10000 + i,
                    tasks.join(",")
                )
            })
            .collect();
        format!(r#"{{"apps":[{}]}}"#, apps.join(","))
    }

    /// Taken in pieces of several sizes as it comes, `body` gives the answer [`decode_apps`]
    /// gives: the same apps, drops and error.
    fn as_they_come_agree(body: &str) {
        let usual = format!(
            "{:?}",
            decode_apps(body.as_bytes()).map(|answer| answer.apps)
        );
        let mut pieces = vec![1000, 8191, 65536, records::SEGMENT - 1, body.len()];
        if body.len() < 100_000 {
            pieces.push(1);
        }
        for piece in pieces {
            let streamed = decode_apps_each(body.as_bytes(), piece, |app| app);
            assert_eq!(format!("{streamed:?}"), usual, "pieces of {piece} bytes");
        }
    }

    #[test]
    fn a_large_answer_decoded_as_it_comes_is_the_one_pass_answer() {
        let body = large_answer(2500, |_| String::new());
        assert!(body.len() >= 4 * records::SEGMENT);
        let apps = decode_apps_each(body.as_bytes(), 65536, |app| app.id).unwrap();
        assert_eq!(apps.records.len(), 2500);
        assert_eq!(apps.records[1250], "/app-1250");
        as_they_come_agree(&body);
        // Trailing whitespace, and small answers (no segment).
        as_they_come_agree(&format!("{body} \n"));
        as_they_come_agree(&large_answer(10, |_| String::new()));
        as_they_come_agree(r#"{"apps":[]}"#);
        as_they_come_agree("");
        // Another shape: decoded the usual way.
        as_they_come_agree(&body.replacen(r#"{"apps":["#, r#"{"apps": ["#, 1));
        as_they_come_agree(&format!(r#"{{"other":1,{}"#, &body[1..]));
        // A form feed is no JSON whitespace: the answer fails either way, with the same error.
        let feed = format!("{body}\x0c");
        assert!(decode_apps(feed.as_bytes()).is_err());
        as_they_come_agree(&feed);
    }

    /// The answer is held a few segments at a time, never whole: at most the segments not yet
    /// checked and the text read after them.
    #[test]
    fn a_large_answer_is_never_held_whole() {
        let body = large_answer(10_000, |_| String::new());
        let piece = 65536;
        let mut streamed = apps_as_they_come(Arc::new(|app: MarathonApp| app.id));
        for piece in body.as_bytes().chunks(piece) {
            streamed.take(piece);
        }
        let most = streamed.most_held();
        assert!(most > records::SEGMENT, "{most}");
        assert!(
            most <= (records::UNCHECKED + 2) * (records::SEGMENT + piece),
            "{most} bytes held of {}",
            body.len()
        );
        assert_eq!(streamed.finish().unwrap().records.len(), 10_000);
    }

    /// Texts that look like a record's start where none is: in a string (escaped quotes),
    /// inside an app (a nested object whose id starts with `/`), and after the list (another
    /// key). The segments either end at real boundaries or give way; the answer is the same.
    #[test]
    fn a_false_boundary_is_caught_and_the_answer_the_same() {
        let in_string = large_answer(2500, |i| format!(r#","cmd":"echo '}},{{\"id\":\"/x{i}'""#));
        let nested = large_answer(2500, |i| {
            format!(r#","dependencies":[{{"id":"/dep"}},{{"id":"/dep-{i}"}}]"#)
        });
        // Long nested lists of app-like objects: a segment ends inside one, and the next
        // segment, inside it too, would decode as a list of apps on its own.
        let deep = large_answer(300, |i| {
            let fakes: Vec<String> = (0..400)
                .map(|f| format!(r#"{{"id":"/fake-{i}-{f}"}}"#))
                .collect();
            format!(r#","dependencies":[{}]"#, fakes.join(","))
        });
        assert!(deep.len() >= 4 * records::SEGMENT);
        // An app larger than the text read without a segment's end that the segments wait
        // for: they give way.
        let huge = large_answer(2500, |i| match i {
            1200 => format!(r#","cmd":"{}""#, "x".repeat(5 * records::SEGMENT)),
            _ => String::new(),
        });
        for body in [&in_string, &nested, &deep, &huge] {
            as_they_come_agree(body);
        }
        // What a false end makes of the text (the fakes as apps) never reaches `each`, nor
        // does a panic of `each` over it.
        let apps = decode_apps_each(deep.as_bytes(), 65536, |app| {
            assert!(app.id.starts_with("/app-"), "{} is no app", app.id);
            app.id
        })
        .unwrap();
        assert_eq!(apps.records.len(), 300);
        // A cut just after the list's `[`: `[]` would decode, the answer does not.
        let long = format!(r#""cmd":"{}""#, "x".repeat(records::SEGMENT + 1000));
        for start in ["[,", "[ ,", "[\n,"] {
            let body = format!(r#"{{"apps":{start}{{"id":"/a",{long}}}]}}"#);
            assert!(decode_apps(body.as_bytes()).is_err());
            as_they_come_agree(&body);
        }
        // A key after the list, whose objects look like apps.
        let apps = large_answer(1, |_| String::new());
        let list: Vec<String> = (0..100_000)
            .map(|i| format!(r#"{{"id":"/q{i}"}}"#))
            .collect();
        let other_key = format!(
            r#"{},"other":[{}]}}"#,
            &apps[..apps.len() - 1],
            list.join(",")
        );
        as_they_come_agree(&other_key);
        assert_eq!(
            decode_apps_each(other_key.as_bytes(), 65536, |app| app.id)
                .unwrap()
                .records,
            ["/app-0"]
        );
    }

    /// An app that does not decode, early or late: from its segment on, the answer is decoded
    /// the usual way, the app dropped with its reason and its place in the whole list.
    #[test]
    fn a_bad_app_in_a_large_answer_is_dropped_as_before() {
        for bad in [0, 100, 2400, 2499] {
            let body = large_answer(2500, |i| {
                if i == bad {
                    r#","instances":-1,"portDefinitions":[{"port":-1}]"#.to_string()
                } else {
                    String::new()
                }
            });
            as_they_come_agree(&body);
            let apps = decode_apps_each(body.as_bytes(), 65536, |app| app).unwrap();
            assert_eq!(apps.records.len(), 2499);
            assert_eq!(apps.dropped.len(), 1);
            assert_eq!(apps.dropped[0].index, bad);
        }
    }

    /// An answer that is not JSON from some point on (cut short, a bad byte, text that is not
    /// UTF-8), with and without line ends inside its apps: the same error as the usual decode
    /// gives, its line and column the whole answer's.
    #[test]
    fn a_broken_answer_fails_with_the_usual_error() {
        // Line ends nowhere, in every app, and in one early app only (its line ends taken out
        // before the error's line).
        for (extra, only) in [
            ("", None),
            (",\n\"x\":1", None),
            (",\r\n\"x\":[\n1\n]", Some(5)),
        ] {
            let body = large_answer(2500, |i| match only {
                Some(only) if i != only => String::new(),
                _ => extra.to_string(),
            });
            for cut in [1, 3, 5, 6] {
                as_they_come_agree(&body[..body.len() * cut / 7]);
            }
            let broken = body.replacen(r#""id":"/app-2000","#, r#""id":"/app-2000";"#, 1);
            assert_ne!(broken, body);
            as_they_come_agree(&broken);
            let message = decode_apps(broken.as_bytes()).unwrap_err();
            assert!(message.contains(" at line "), "{message}");
            let mut bytes = body.clone().into_bytes();
            let at = body.find(r#""id":"/app-1900""#).unwrap();
            bytes[at + 3] = 0xff;
            let usual = format!("{:?}", decode_apps(&bytes).map(|answer| answer.apps));
            assert!(usual.starts_with("Err("), "{usual}");
            for piece in [8191, 65536] {
                let streamed = decode_apps_each(&bytes, piece, |app| app);
                assert_eq!(format!("{streamed:?}"), usual);
            }
        }
    }

    /// A panic while an app is made into what the caller keeps reaches the caller, as from a
    /// decode on its own thread (rayon's pool would abort the process).
    #[test]
    fn a_panic_on_the_pool_reaches_the_reader() {
        let body = large_answer(2500, |_| String::new());
        let caught = std::panic::catch_unwind(|| {
            decode_apps_each(body.as_bytes(), 65536, |app| {
                assert_ne!(app.id, "/app-1500", "a bug");
                app
            })
        });
        assert!(caught.is_err());
    }
}
