//! What weft knows of Marathon's apps between full fetches: the last full answer, changed in
//! place by the events that carry enough, and app by app by the answers of single-app fetches.
//!
//! ```text
//! full answer ──> Apps (app id -> app, its services, what of it is rejected)
//!   status_update_event         task started, running, killed, failed, lost: changed in place
//!   health_status_changed_event the task's health (an app with one health check)
//!   app_terminated_event        the app removed
//!   anything that carries less  ──> Outcome::FetchApps (an unknown app, a newer version,
//!     (api_post_event, deployments,   an app's last task gone, a task that did not decode)
//!      an app whose tasks did not decode)
//!   an event that does not decode, or of a type weft does not know ──> Outcome::FetchAll
//! ```
//!
//! Each change recomputes only its app's services, with the same [`app_services`] a full
//! fetch uses: after any sequence of events (and the fetches they ask for), the services equal
//! those a full fetch would give.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::api::{self, FetchedApp, HealthCheckResult, MarathonApp, MarathonTask};
use super::routing::{app_services, RoutingSettings};
use crate::model::{Rejected, ServiceDef};
use crate::sources::records::{quoted, Records};

/// What an event asks of the fetcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied in place (the services may or may not have changed).
    Applied,
    /// Nothing weft routes depends on it.
    Ignored,
    /// The event does not carry enough: fetch this app alone.
    FetchApp(String),
    /// Nothing short of a full fetch can be trusted.
    FetchAll,
}

/// One app, as the last answer about it and the events since made it.
enum Entry {
    App {
        app: Box<MarathonApp>,
        /// Shared with the reports: publishing copies no definition.
        services: Vec<Arc<ServiceDef>>,
        rejected: Vec<Rejected>,
    },
    /// It did not decode (its own answer said so).
    Broken(Vec<Rejected>),
}

/// Each definition in its own shared box, in a list of just the pointers. (Collected in
/// place, `into_iter().map(Arc::new).collect()`, the list would keep the definitions' own
/// room, 272 bytes each, to hold 8-byte pointers: for as long as the daemon keeps the app.)
fn shared(services: Vec<ServiceDef>) -> Vec<Arc<ServiceDef>> {
    let mut shared = Vec::with_capacity(services.len());
    shared.extend(services.into_iter().map(Arc::new));
    shared
}

impl Entry {
    fn app(app: MarathonApp, settings: &RoutingSettings) -> Entry {
        let (services, rejected) = app_services(&app, settings);
        Entry::App {
            app: Box::new(app),
            services: shared(services),
            rejected,
        }
    }

    fn broken(id: &str, reason: String) -> Entry {
        let mut one = Records::<MarathonApp>::default();
        one.push(Err(reason), || Some(quoted(id)));
        Entry::Broken(one.rejected("app", |app| app.subject("app")))
    }
}

/// The apps, by id.
pub struct Apps {
    settings: RoutingSettings,
    entries: BTreeMap<String, Entry>,
    /// The apps of the last full answer that did not decode (named by it, not by id).
    broken: Vec<Rejected>,
    changed: bool,
}

/// An app of a full answer read once ([`Apps::content_of_full`]): its services and what of it
/// is rejected, the app itself freed. The services are shared already, as the reports hold
/// them, moved into their boxes on the thread that decoded the app (which reuses the memory
/// the apps before it freed), not on the thread that gathers them.
pub struct ReadApp {
    id: String,
    services: Vec<Arc<ServiceDef>>,
    rejected: Vec<Rejected>,
}

impl Apps {
    /// The state a full `/v2/apps?embed=apps.tasks` answer gives.
    pub fn from_full(answer: api::AppsResponse, settings: &RoutingSettings) -> Apps {
        let broken = answer.apps.rejected("app", |app| app.subject("app"));
        let entries = answer
            .apps
            .map(|app| (app.id.clone(), Entry::app(app, settings)))
            .records;
        Apps {
            settings: settings.clone(),
            entries: entries.into_iter().collect(),
            broken,
            changed: true,
        }
    }

    /// What [`Apps::content_of_full`] keeps of one app: handed to
    /// [`api::apps_as_they_come`], each app is freed as soon as its services are worked out,
    /// its memory taken by the next one's.
    pub fn read_app(app: MarathonApp, settings: &RoutingSettings) -> ReadApp {
        let (services, rejected) = app_services(&app, settings);
        ReadApp {
            id: app.id,
            services: shared(services),
            rejected,
        }
    }

    /// What `Apps::from_full(answer, settings).content()` gives, from the answer's apps read
    /// once ([`Apps::read_app`]), for `weft render` and `weft check`.
    pub fn content_of_full(answer: Records<ReadApp>) -> (Vec<Arc<ServiceDef>>, Vec<Rejected>) {
        let mut rejected = answer.rejected("app", |app| app.subject("app"));
        let mut apps = answer.records;
        // In id order, the last of one id kept: as the state's map has them.
        apps.reverse();
        apps.sort_by(|a, b| a.id.cmp(&b.id));
        apps.dedup_by(|later, kept| later.id == kept.id);
        let mut services = Vec::with_capacity(apps.iter().map(|app| app.services.len()).sum());
        for app in apps {
            services.extend(app.services);
            rejected.extend(app.rejected);
        }
        (services, rejected)
    }

    /// Whether the services may have changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Every app's services, and what is rejected, in app id order.
    pub fn content(&self) -> (Vec<Arc<ServiceDef>>, Vec<Rejected>) {
        let mut services = Vec::new();
        let mut rejected = self.broken.clone();
        for entry in self.entries.values() {
            match entry {
                Entry::App {
                    services: own,
                    rejected: own_rejected,
                    ..
                } => {
                    services.extend(own.iter().cloned());
                    rejected.extend(own_rejected.iter().cloned());
                }
                Entry::Broken(own) => rejected.extend(own.iter().cloned()),
            }
        }
        (services, rejected)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What `GET /v2/apps/{id}` answered; `None`: 404, the app is gone.
    pub fn replace(&mut self, id: &str, fetched: Option<FetchedApp>) {
        let subject = format!("app {}", quoted(id));
        self.broken.retain(|rejected| rejected.subject != subject);
        match fetched {
            Some(FetchedApp::Found(app)) if app.id == id => {
                self.entries
                    .insert(id.to_string(), Entry::app(*app, &self.settings));
            }
            Some(FetchedApp::Found(app)) => {
                let reason = format!("its own answer names another app, {}", quoted(&app.id));
                self.entries
                    .insert(id.to_string(), Entry::broken(id, reason));
            }
            Some(FetchedApp::Broken(reason)) => {
                self.entries
                    .insert(id.to_string(), Entry::broken(id, reason));
            }
            None => {
                self.entries.remove(id);
            }
        }
        self.changed = true;
    }

    /// Applies one event of the stream.
    pub fn apply(&mut self, event_type: &str, data: &str) -> Outcome {
        match event_type {
            "status_update_event" => match serde_json::from_str(data) {
                Ok(update) => self.task_status(update),
                Err(_) => Outcome::FetchAll,
            },
            "health_status_changed_event" => match serde_json::from_str(data) {
                Ok(health) => self.health(health),
                Err(_) => Outcome::FetchAll,
            },
            // Fetched rather than dropped: the app may be created again already (a forced
            // delete), and a 404 also clears what a full answer said of it.
            "app_terminated_event" => match serde_json::from_str::<api::AppTerminated>(data) {
                Ok(gone) if is_app_id(&gone.app_id) => Outcome::FetchApp(gone.app_id),
                _ => Outcome::FetchAll,
            },
            "api_post_event" => match serde_json::from_str::<api::ApiPost>(data) {
                // A group's definition (`/v2/groups`) may change any of its apps.
                Ok(post) => match post.app_definition.and_then(|d| d.id) {
                    Some(id)
                        if is_app_id(&id)
                            && post
                                .uri
                                .as_deref()
                                .map_or(true, |uri| uri.starts_with("/v2/apps")) =>
                    {
                        Outcome::FetchApp(id)
                    }
                    _ => Outcome::FetchAll,
                },
                Err(_) => Outcome::FetchAll,
            },
            "deployment_info"
            | "deployment_success"
            | "deployment_failed"
            | "deployment_step_success"
            | "deployment_step_failure" => {
                match serde_json::from_str::<api::DeploymentEvent>(data) {
                    Ok(deployment) => {
                        let apps: Vec<String> = deployment
                            .plan
                            .steps
                            .into_iter()
                            .flat_map(|step| step.actions)
                            .filter_map(|action| action.app)
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        match apps.as_slice() {
                            [] => Outcome::Ignored,
                            [one] if is_app_id(one) => Outcome::FetchApp(one.clone()),
                            // Several apps: fetched all at once, as they may be many.
                            _ => Outcome::FetchAll,
                        }
                    }
                    Err(_) => Outcome::FetchAll,
                }
            }
            _ => Outcome::FetchAll,
        }
    }

    /// The app an event names, where weft can change it in place: `Err` says what to fetch.
    fn app_mut(&mut self, id: &str) -> Result<&mut MarathonApp, Outcome> {
        if !is_app_id(id) {
            return Err(Outcome::FetchAll);
        }
        match self.entries.get_mut(id) {
            // A task that did not decode might be the one the event is about.
            Some(Entry::App { app, .. })
                if app.tasks.dropped.is_empty() && app.tasks.more_dropped == 0 =>
            {
                Ok(app)
            }
            _ => Err(Outcome::FetchApp(id.to_string())),
        }
    }

    /// Recomputes the services of an app changed in place.
    fn recompute(&mut self, id: &str) {
        if let Some(Entry::App {
            app,
            services,
            rejected,
        }) = self.entries.get_mut(id)
        {
            let (own, own_rejected) = app_services(app, &self.settings);
            *services = own.into_iter().map(Arc::new).collect();
            *rejected = own_rejected;
            self.changed = true;
        }
    }

    fn task_status(&mut self, update: api::StatusUpdate) -> Outcome {
        let app = match self.app_mut(&update.app_id) {
            Ok(app) => app,
            Err(outcome) => return outcome,
        };
        // A task of a version weft has not seen: the definition changed (ports, labels,
        // health checks), and the event does not carry it.
        if is_newer(update.version.as_deref(), app.version.as_deref()) {
            return Outcome::FetchApp(update.app_id);
        }
        let tasks = &mut app.tasks.records;
        let position = tasks.iter().position(|task| task.id == update.task_id);
        if is_expunged(&update.task_status) {
            let Some(index) = position else {
                return Outcome::Ignored;
            };
            tasks.remove(index);
            let emptied = tasks.is_empty();
            self.recompute(&update.app_id);
            // Its last task gone: the app may be gone too (its deletion kills its tasks first),
            // which only `app_terminated_event` says, and only if subscribed to.
            return if emptied {
                Outcome::FetchApp(update.app_id)
            } else {
                Outcome::Applied
            };
        }
        let started = !matches!(
            update.task_status.as_str(),
            "TASK_STAGING" | "TASK_STARTING" | "TASK_PROVISIONED"
        );
        // A task relaunched in its instance (`<instance>._app.2` and later) may run with the
        // instance's earlier health results, which Marathon keeps and sends no event for.
        let relaunched = update.task_status == "TASK_RUNNING"
            && !app.health_checks.is_empty()
            && incarnation(&update.task_id) > 1;
        match position {
            Some(index) => {
                let task = &mut tasks[index];
                task.state = Some(update.task_status);
                if update.host.is_some() {
                    task.host = update.host;
                }
                if !update.ip_addresses.is_empty() {
                    task.ip_addresses = update.ip_addresses;
                }
                if !update.ports.is_empty() {
                    task.ports = update.ports;
                }
                task.started |= started;
            }
            None => tasks.push(MarathonTask {
                id: update.task_id,
                host: update.host,
                ports: update.ports,
                ip_addresses: update.ip_addresses,
                state: Some(update.task_status),
                started,
                // A new task has no health result yet: Marathon checks it once it runs.
                health_check_results: Vec::new(),
            }),
        }
        self.recompute(&update.app_id);
        if relaunched {
            Outcome::FetchApp(update.app_id)
        } else {
            Outcome::Applied
        }
    }

    fn health(&mut self, health: api::HealthChanged) -> Outcome {
        let app = match self.app_mut(&health.app_id) {
            Ok(app) => app,
            Err(outcome) => return outcome,
        };
        // A task of another version has that version's checks, which weft does not know.
        if health.version.is_some() && health.version != app.version {
            return Outcome::FetchApp(health.app_id);
        }
        match app.health_checks.len() {
            // Routing ignores health results of an app without checks.
            0 => return Outcome::Ignored,
            1 => {}
            // The event does not say which check changed.
            _ => return Outcome::FetchApp(health.app_id),
        }
        let named = |task: &&mut MarathonTask| match (&health.task_id, &health.instance_id) {
            (Some(task_id), _) => task.id == *task_id,
            (None, Some(instance)) => is_instance_of(&task.id, instance),
            (None, None) => false,
        };
        let Some(task) = app.tasks.records.iter_mut().find(named) else {
            return Outcome::FetchApp(health.app_id);
        };
        task.health_check_results = vec![HealthCheckResult {
            alive: health.alive,
        }];
        self.recompute(&health.app_id);
        Outcome::Applied
    }
}

/// States after which Marathon expunges a task from its app.
fn is_expunged(state: &str) -> bool {
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

/// Which launch of its instance a task is: `<instance>._app.<n>` is the n-th; other ids are
/// the first.
fn incarnation(task_id: &str) -> u64 {
    task_id
        .rsplit_once("._app.")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1)
}

/// Whether `event` names a later app version than `known` (Marathon's versions are ISO 8601
/// UTC timestamps of one format, so they sort as text).
fn is_newer(event: Option<&str>, known: Option<&str>) -> bool {
    matches!((event, known), (Some(event), Some(known)) if event > known)
}

/// Whether `task_id` belongs to `instance_id`: Marathon 1.4+ task IDs are
/// `<instance>._app.<n>`; an older `<app>.<uuid>` is the instance `<app>.marathon-<uuid>`.
fn is_instance_of(task_id: &str, instance_id: &str) -> bool {
    if let Some((instance, _)) = task_id.split_once("._app.") {
        return instance == instance_id;
    }
    if task_id == instance_id {
        return true;
    }
    match (task_id.rsplit_once('.'), instance_id.rsplit_once('.')) {
        (Some((app, uuid)), Some((instance_app, instance_uuid))) => {
            app == instance_app && instance_uuid.strip_prefix("marathon-") == Some(uuid)
        }
        _ => false,
    }
}

/// A Marathon app id weft fetches alone: `/` and path segments of lowercase letters, digits,
/// hyphens and dots (Marathon's own rule), never `.` or `..`.
pub fn is_app_id(id: &str) -> bool {
    let Some(path) = id.strip_prefix('/') else {
        return false;
    };
    id.len() <= 1024
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostPorts, MarathonGroup};

    fn settings() -> RoutingSettings {
        RoutingSettings {
            group: MarathonGroup::All,
            domain: None,
            host_ports: HostPorts::Deny,
        }
    }

    fn apps(body: &str) -> Apps {
        Apps::from_full(api::decode_apps(body.as_bytes()).unwrap(), &settings())
    }

    #[test]
    fn shared_definitions_are_listed_in_room_for_pointers_only() {
        let def = |name: &str| ServiceDef::new(name, &["a.test"], &["10.2.1.1:80"]);
        let one = shared(vec![def("a")]);
        assert_eq!(one.capacity(), 1);
        let mut four = Vec::with_capacity(4);
        four.extend(["a", "b", "c"].map(def));
        let three = shared(four);
        assert_eq!(three.capacity(), 3);
        assert_eq!(three[2].name, "c");
    }

    const SHOP: &str = r#"{"apps":[{"id":"/shop","version":"2026-01-01T00:00:00.000Z",
        "labels":{"HAPROXY_0_VHOST":"shop.test"},
        "container":{"portMappings":[{"containerPort":8080}]},
        "healthChecks":[{"protocol":"HTTP","path":"/"}],
        "tasks":[{"id":"shop.a","state":"TASK_RUNNING","startedAt":"x",
                  "ipAddresses":[{"ipAddress":"10.2.1.5"}],"healthCheckResults":[{"alive":true}]}]}]}"#;

    fn servers(apps: &Apps) -> Vec<String> {
        apps.content().0[0]
            .servers
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn status(task: &str, state: &str, ip: &str, version: &str) -> String {
        format!(
            r#"{{"taskId":"{task}","taskStatus":"{state}","appId":"/shop","host":"h",
                "ipAddresses":[{{"ipAddress":"{ip}","protocol":"IPv4"}}],"ports":[],
                "version":"{version}","timestamp":"t"}}"#
        )
    }

    #[test]
    fn a_task_runs_becomes_healthy_and_is_killed_in_place() {
        let mut apps = apps(SHOP);
        assert_eq!(servers(&apps), ["10.2.1.5:8080"]);
        let v = "2026-01-01T00:00:00.000Z";
        let running = status("shop.b", "TASK_RUNNING", "10.2.1.6", v);
        assert_eq!(
            apps.apply("status_update_event", &running),
            Outcome::Applied
        );
        // Running, but no health result yet.
        assert_eq!(servers(&apps), ["10.2.1.5:8080"]);
        let healthy = r#"{"appId":"/shop","instanceId":"shop.b","alive":true}"#;
        assert_eq!(
            apps.apply("health_status_changed_event", healthy),
            Outcome::Applied
        );
        assert_eq!(servers(&apps), ["10.2.1.5:8080", "10.2.1.6:8080"]);
        let killed = status("shop.a", "TASK_KILLED", "10.2.1.5", v);
        assert_eq!(apps.apply("status_update_event", &killed), Outcome::Applied);
        assert_eq!(servers(&apps), ["10.2.1.6:8080"]);
        // The last task gone: is the app?
        let killed = status("shop.b", "TASK_KILLED", "10.2.1.6", v);
        assert_eq!(
            apps.apply("status_update_event", &killed),
            Outcome::FetchApp("/shop".into())
        );
    }

    #[test]
    fn what_an_event_does_not_carry_is_fetched() {
        let mut apps = apps(SHOP);
        let newer = status(
            "shop.b",
            "TASK_RUNNING",
            "10.2.1.6",
            "2026-02-01T00:00:00.000Z",
        );
        assert_eq!(
            apps.apply("status_update_event", &newer),
            Outcome::FetchApp("/shop".into())
        );
        let other = newer.replace("\"/shop\"", "\"/new\"");
        assert_eq!(
            apps.apply("status_update_event", &other),
            Outcome::FetchApp("/new".into())
        );
        let post = r#"{"uri":"/v2/apps/shop","appDefinition":{"id":"/shop"}}"#;
        assert_eq!(
            apps.apply("api_post_event", post),
            Outcome::FetchApp("/shop".into())
        );
        let group = r#"{"uri":"/v2/groups/x","appDefinition":{"id":"/x"}}"#;
        assert_eq!(apps.apply("api_post_event", group), Outcome::FetchAll);
        assert_eq!(apps.apply("status_update_event", "{"), Outcome::FetchAll);
        assert_eq!(apps.apply("some_new_event", "{}"), Outcome::FetchAll);
        let hostile = other.replace("\"/new\"", "\"/../v2/events\"");
        assert_eq!(
            apps.apply("status_update_event", &hostile),
            Outcome::FetchAll
        );
    }

    #[test]
    fn a_fetched_app_replaces_what_was_known() {
        let mut apps = apps(SHOP);
        apps.replace("/shop", Some(FetchedApp::Broken("labels: bad".into())));
        let (services, rejected) = apps.content();
        assert!(services.is_empty());
        assert_eq!(rejected[0].subject, "app \"/shop\"");
        apps.replace("/shop", None);
        assert!(apps.content().1.is_empty());
        assert!(apps.is_empty());
    }

    #[test]
    fn a_relaunched_task_or_another_versions_health_fetches_the_app() {
        let mut apps = apps(SHOP);
        let v = "2026-01-01T00:00:00.000Z";
        let relaunched = status("shop.i._app.2", "TASK_RUNNING", "10.2.1.7", v);
        assert_eq!(
            apps.apply("status_update_event", &relaunched),
            Outcome::FetchApp("/shop".into())
        );
        let first = status("shop.j._app.1", "TASK_RUNNING", "10.2.1.8", v);
        assert_eq!(apps.apply("status_update_event", &first), Outcome::Applied);
        let old = r#"{"appId":"/shop","taskId":"shop.a","alive":false,"version":"2025-01-01T00:00:00.000Z"}"#;
        assert_eq!(
            apps.apply("health_status_changed_event", old),
            Outcome::FetchApp("/shop".into())
        );
        let gone = r#"{"appId":"/shop"}"#;
        assert_eq!(
            apps.apply("app_terminated_event", gone),
            Outcome::FetchApp("/shop".into())
        );
    }

    #[test]
    fn instance_ids_old_and_new() {
        assert!(is_instance_of(
            "shop.instance-1234._app.1",
            "shop.instance-1234"
        ));
        assert!(is_instance_of("shop.1234", "shop.marathon-1234"));
        assert!(is_instance_of("shop.1234", "shop.1234"));
        assert!(!is_instance_of("shop.1234", "shop.marathon-9999"));
    }

    #[test]
    fn app_ids_fetched_alone() {
        assert!(is_app_id("/team/shop-1.v2"));
        for bad in ["shop", "/", "/a//b", "/a/../b", "/A", "/a?b", "/a%2f"] {
            assert!(!is_app_id(bad), "{bad}");
        }
    }

    /// Read once, an answer gives what the state made of it gives: the same services and
    /// rejections in the same order, also for a large answer (decoded in segments, each app read
    /// as it comes) whose ids are out of order and repeated, and for one with apps that do not
    /// decode (decoded the usual way, then read).
    #[test]
    fn content_of_full_is_the_states_content() {
        let app = |i: usize| {
            format!(
                r#"{{"id":"/app-{i}","labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"app-{}.test"}},"container":{{"portMappings":[{{"containerPort":8080}}]}},"tasks":[{{"id":"app-{i}.1","ipAddresses":[{{"ipAddress":"10.2.1.{}"}}],"ports":[31000],"state":"TASK_RUNNING","startedAt":"x"}}]}}"#,
                i % 3900,
                i % 250 + 2
            )
        };
        let mut list: Vec<String> = (0..4000).rev().map(app).collect();
        list.push(app(7).replace("app-7.test", "seven.test"));
        list.push(r#"{"id":"/no-port","labels":{"HAPROXY_0_VHOST":"np.test"},"tasks":[{"id":"t","ipAddresses":[{"ipAddress":"10.2.1.9"}],"state":"TASK_RUNNING","startedAt":"x"}]}"#.into());
        let large = format!(r#"{{"apps":[{}]}}"#, list.join(","));
        // Split, and read app by app as decoded.
        let ids = api::decode_apps_each(large.as_bytes(), 65536, |app| app.id);
        assert_eq!(
            ids.map(|ids| (ids.records.len(), ids.dropped.len())),
            Ok((4002, 0))
        );
        list.push(r#"{"id":"/bad","instances":-1,"labels":{"HAPROXY_0_VHOST":5}}"#.into());
        let broken = format!(r#"{{"apps":[{}]}}"#, list.join(","));
        let zdd = String::from_utf8(crate::sources::fixture("marathon/zdd_apps.json")).unwrap();
        for body in [&large, &broken, &zdd] {
            let answer = api::decode_apps(body.as_bytes()).unwrap();
            let state = Apps::from_full(answer, &settings()).content();
            let read = api::decode_apps_each(body.as_bytes(), 65536, |app| {
                Apps::read_app(app, &settings())
            });
            let once = Apps::content_of_full(read.unwrap());
            assert!(!state.0.is_empty() && !state.1.is_empty() || body == &zdd);
            assert_eq!(format!("{once:?}"), format!("{state:?}"));
        }
    }
}
