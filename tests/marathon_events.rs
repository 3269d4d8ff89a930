//! The Marathon source's state after any sequence of changes equals what a full fetch gives:
//! random sequences of Marathon changes (apps created, relabelled and removed; tasks staged,
//! started, failed, killed; health results) are made on the double, whose events the source
//! follows, and the services it publishes are compared with those of the double's full
//! `/v2/apps?embed=apps.tasks` answer at the end. No full fetch may happen after the first.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;
use support::marathon::{App, MarathonDouble, Task};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft::config::Config;
use weft::model::{Health, Rejected, ServiceDef, SourceId, SourceReport};
use weft::sources::marathon::routing::RoutingSettings;
use weft::sources::marathon::{api, state::Apps};

/// One change to Marathon. Indexes pick among what exists when the change is made (modulo its
/// number); a change with nothing to act on does nothing.
#[derive(Debug, Clone)]
enum Change {
    /// A new app (or a redeployed one, keeping its tasks) with a host label, 0 to 2 health
    /// checks and maybe a task at once.
    PutApp {
        app: u8,
        host: u8,
        checks: u8,
        in_group: bool,
        with_task: bool,
    },
    RemoveApp(u8),
    /// A task staged or started on an app.
    AddTask {
        app: u8,
        running: bool,
        ip: u8,
    },
    /// A task moves to a state (terminal ones remove it).
    SetState {
        task: u8,
        state: &'static str,
    },
    Health {
        task: u8,
        alive: bool,
    },
    /// Time for the source to catch up (ms), so fetches and events interleave.
    Pause(u8),
}

const STATES: [&str; 7] = [
    "TASK_RUNNING",
    "TASK_STARTING",
    "TASK_KILLING",
    "TASK_UNREACHABLE",
    "TASK_KILLED",
    "TASK_FAILED",
    "TASK_LOST",
];

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (
            any::<u8>(),
            0u8..4,
            0u8..3,
            prop::bool::weighted(0.8),
            any::<bool>()
        )
            .prop_map(|(app, host, checks, in_group, with_task)| Change::PutApp {
                app,
                host,
                checks,
                in_group,
                with_task
            }),
        any::<u8>().prop_map(Change::RemoveApp),
        (any::<u8>(), any::<bool>(), any::<u8>()).prop_map(|(app, running, ip)| Change::AddTask {
            app,
            running,
            ip
        }),
        (any::<u8>(), prop::sample::select(&STATES[..]))
            .prop_map(|(task, state)| Change::SetState { task, state }),
        (any::<u8>(), any::<bool>()).prop_map(|(task, alive)| Change::Health { task, alive }),
        (0u8..30).prop_map(Change::Pause),
    ]
}

const APP_NAMES: [&str; 6] = [
    "/shop",
    "/cart",
    "/team/web",
    "/team/api",
    "/search",
    "/mail",
];

fn app(id: &str, host: u8, checks: u8, in_group: bool) -> App {
    let mut app = App::new(id)
        .label("HAPROXY_0_VHOST", &format!("host{host}.test"))
        .container_port(8080);
    if in_group {
        app = app.label("HAPROXY_GROUP", "external");
    }
    for i in 0..checks {
        app = app.http_health_check(&format!("/health{i}"), 5, 3);
    }
    app
}

/// What the double holds now: (app ids, task ids, ids of the apps with a task).
fn existing(marathon: &MarathonDouble) -> (Vec<String>, Vec<String>, Vec<String>) {
    let apps = marathon.apps_json();
    let apps = apps["apps"].as_array().cloned().unwrap_or_default();
    let ids = apps
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    let tasks = apps
        .iter()
        .flat_map(|a| a["tasks"].as_array().cloned().unwrap_or_default())
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    let with_tasks = apps
        .iter()
        .filter(|a| a["tasks"].as_array().is_some_and(|t| !t.is_empty()))
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    (ids, tasks, with_tasks)
}

fn pick(list: &[String], index: u8) -> Option<&String> {
    (!list.is_empty()).then(|| &list[usize::from(index) % list.len()])
}

/// Makes one change. With marathon-lb's event types, an app is removed only while it has a
/// task: deleting one without sends none of those events (only `app_terminated_event`), so
/// that is seen at the next resync, by weft as by marathon-lb.
fn make(marathon: &MarathonDouble, change: &Change, serial: &mut u32, marathon_lb_events: bool) {
    let (apps, tasks, with_tasks) = existing(marathon);
    *serial += 1;
    match *change {
        Change::PutApp {
            app: index,
            host,
            checks,
            in_group,
            with_task,
        } => {
            let id = APP_NAMES[usize::from(index) % APP_NAMES.len()];
            let mut definition = app(id, host, checks, in_group);
            if with_task {
                let task = Task::new(&format!("{}.t{serial}", id.trim_start_matches('/')))
                    .ip(&format!("10.2.1.{}", *serial % 250 + 1))
                    .health((checks > 0).then_some(true));
                definition = definition.task(task);
            }
            marathon.put_app(definition);
        }
        Change::RemoveApp(index) => {
            let removable = if marathon_lb_events {
                &with_tasks
            } else {
                &apps
            };
            if let Some(id) = pick(removable, index) {
                marathon.remove_app(id);
            }
        }
        Change::AddTask {
            app: index,
            running,
            ip,
        } => {
            if let Some(id) = pick(&apps, index) {
                let task = Task::new(&format!("{}.t{serial}", id.trim_start_matches('/')))
                    .ip(&format!("10.2.2.{}", ip % 250 + 1))
                    .state(if running {
                        "TASK_RUNNING"
                    } else {
                        "TASK_STAGING"
                    });
                marathon.add_task(id, task);
            }
        }
        Change::SetState { task, state } => {
            if let Some(id) = pick(&tasks, task) {
                marathon.set_task_state(id, state);
            }
        }
        Change::Health { task, alive } => {
            if let Some(id) = pick(&tasks, task) {
                marathon.set_task_health(id, alive);
            }
        }
        Change::Pause(_) => {}
    }
}

/// weft's default event types, or marathon-lb's (without `app_terminated_event`).
fn config(marathon: &MarathonDouble, marathon_lb_events: bool) -> Config {
    let mut text = format!(
        "[sources.marathon]\nurls = [\"{}\"]\ngroup = \"external\"\nresync = \"1h\"\n",
        marathon.url()
    );
    if marathon_lb_events {
        text.push_str(
            "event_types = [\"status_update_event\", \"health_status_changed_event\", \"api_post_event\"]\n",
        );
    }
    Config::parse(&text, Path::new("/")).unwrap()
}

/// Services and rejected inputs, in one order whatever the order they came in.
fn sorted(
    (mut services, mut rejected): (Vec<std::sync::Arc<ServiceDef>>, Vec<Rejected>),
) -> String {
    services.sort_by(|a, b| a.name.cmp(&b.name));
    rejected.sort_by(|a, b| (&a.subject, &a.reason).cmp(&(&b.subject, &b.reason)));
    format!("{services:#?}\n{rejected:#?}")
}

/// What a full fetch of the double's apps gives, through the source's own decoding.
fn full_fetch(marathon: &MarathonDouble, config: &Config) -> String {
    let marathon_config = config.sources.marathon.as_ref().unwrap();
    let settings = RoutingSettings {
        group: marathon_config.group.clone(),
        domain: None,
        host_ports: marathon_config.host_ports,
    };
    let body = serde_json::to_vec(&marathon.apps_json()).unwrap();
    sorted(Apps::from_full(api::decode_apps(&body).unwrap(), &settings).content())
}

fn published(report: &SourceReport) -> String {
    sorted((report.services.clone(), report.rejected.clone()))
}

async fn replay(
    initial: Vec<Change>,
    changes: Vec<Change>,
    marathon_lb_events: bool,
) -> Result<(), TestCaseError> {
    let marathon = MarathonDouble::start().await;
    let mut serial = 0;
    for change in &initial {
        make(&marathon, change, &mut serial, marathon_lb_events);
    }
    let config = config(&marathon, marathon_lb_events);
    let (tx, mut rx) = watch::channel(SourceReport::starting(SourceId::Marathon));
    let shutdown = CancellationToken::new();
    let source = tokio::spawn(weft::sources::marathon::run(
        config.sources.marathon.clone().unwrap(),
        None,
        tx,
        shutdown.clone(),
    ));
    let _stop = shutdown.clone().drop_guard();
    // The first full fetch (after the stream attached).
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|report| report.health == Health::Ok),
    )
    .await
    .map_err(|_| TestCaseError::fail("no first report"))?
    .map_err(|_| TestCaseError::fail("source ended"))?;
    prop_assert_eq!(marathon.apps_requests(), 1);

    for change in &changes {
        make(&marathon, change, &mut serial, marathon_lb_events);
        if let Change::Pause(ms) = change {
            tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await;
        }
    }
    let expected = full_fetch(&marathon, &config);
    let deadline = tokio::time::Instant::now() + support::patience(Duration::from_secs(5));
    loop {
        let now = published(&rx.borrow_and_update());
        if now == expected {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            prop_assert_eq!(now, expected.clone(), "after {:?}", changes);
        }
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
    // And it stays there: no fetch still under way undoes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    prop_assert_eq!(published(&rx.borrow()), expected);
    prop_assert_eq!(
        marathon.apps_requests(),
        1,
        "a full fetch after the first: {:?}",
        changes
    );
    shutdown.cancel();
    let _ = source.await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // A failing case waits out its deadline: shrinking is bounded to keep a failure quick.
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn after_any_events_the_services_equal_a_full_fetch(
        initial in prop::collection::vec(change(), 0..8),
        changes in prop::collection::vec(change(), 1..40),
        marathon_lb_events in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(replay(initial, changes, marathon_lb_events))?;
    }
}

/// The double's events carry what real Marathon's do: the event JSON a source reads.
#[tokio::test]
async fn the_doubles_events_carry_marathons_fields() {
    let marathon = MarathonDouble::start().await;
    marathon.put_app(
        app("/shop", 1, 1, true).task(Task::new("shop.1").ip("10.2.1.5").health(Some(true))),
    );
    let published = marathon.published();
    let kinds: Vec<&str> = published.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "api_post_event",
            "deployment_info",
            "status_update_event",
            "health_status_changed_event",
            "deployment_success"
        ]
    );
    let status: &Value = &published[2].1;
    let keys: Vec<&str> = status
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "slaveId",
        "taskId",
        "taskStatus",
        "message",
        "appId",
        "host",
        "ipAddresses",
        "ports",
        "version",
        "eventType",
        "timestamp",
    ] {
        assert!(
            keys.contains(&key),
            "status_update_event lacks {key}: {status}"
        );
    }
    let health: &Value = &published[3].1;
    assert_eq!(health["appId"], "/shop");
    assert_eq!(health["alive"], true);
}
