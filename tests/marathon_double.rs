//! Tests of the Marathon test double itself: it must answer like Marathon's documented REST and
//! event-bus API, since weft's Marathon source is only ever tested against it.

#![allow(clippy::unwrap_used)]

mod support;

use support::fixtures;
use support::marathon;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use marathon::probe::{
    client, get, get_with, open_stream, open_stream_with, read_fixture, MarathonShape,
};
use marathon::{
    timestamp, App, Fault, HealthEventId, LineEnding, MarathonDouble, NetworkMode, Task, APPS,
    EVENTS, UNAUTHORIZED_MESSAGE,
};
use serde_json::{json, Value};

const TIME: &str = "2017-02-18T19:12:00.102Z";

/// nginx-green of zdd_apps.json, built with the builders.
fn nginx_green() -> App {
    App::new("/nginx-green")
        .network_mode(NetworkMode::DockerBridge)
        .image("brndnmtthws/nginx-echo-sleep")
        .instances(3)
        .container_port(8080)
        .service_port(10000)
        .http_health_check("/", 3, 10)
        .label("HAPROXY_GROUP", "external")
        .label("HAPROXY_0_PORT", "10000")
        .task(
            Task::new("nginx-green.1883a887-c931-11e5-9836-026ee08d9f6f")
                .host("10.0.6.25")
                .ip("172.17.1.72")
                .host_port(16916)
                .health(Some(true)),
        )
}

fn shop() -> App {
    App::new("/shop")
        .label("HAPROXY_GROUP", "external")
        .label("HAPROXY_0_VHOST", "shop.example.com")
        .container_port(8080)
        .http_health_check("/health", 5, 3)
}

fn shop_task() -> Task {
    Task::new("shop.1")
        .ip("10.2.1.5")
        .host("agent1")
        .host_port(31001)
}

fn app<'a>(apps: &'a Value, id: &str) -> &'a Value {
    apps["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|app| app["id"] == json!(id))
        .unwrap_or_else(|| panic!("no app {id} in {apps}"))
}

fn keys(value: &Value) -> Vec<&str> {
    value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_is_served_back_verbatim_with_and_without_tasks() {
    let marathon = MarathonDouble::start().await;
    let fixture = read_fixture("zdd_apps.json");
    marathon.load_apps_json(fixture.clone());

    let embedded = get(&marathon, "/v2/apps?embed=apps.tasks").await;
    assert_eq!(embedded.status, 200);
    assert_eq!(embedded.header("content-type"), "application/json");
    assert_eq!(embedded.json(), fixture);

    let mut bare = fixture.clone();
    for app in bare["apps"].as_array_mut().unwrap() {
        app.as_object_mut().unwrap().remove("tasks").unwrap();
    }
    assert_eq!(get(&marathon, APPS).await.json(), bare);
    assert!(marathon.published().is_empty(), "a snapshot is no change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builders_have_every_key_of_the_fixtures() {
    let marathon = MarathonDouble::start().await;
    marathon.put_app(nginx_green());
    let ours = get(&marathon, "/v2/apps?embed=apps.tasks").await.json();
    let ours = app(&ours, "/nginx-green");
    let mut found = Vec::new();
    for fixture in read_fixture("zdd_apps.json")["apps"].as_array().unwrap() {
        let id = fixture["id"].as_str().unwrap();
        let root = format!("apps[{id}]");
        found.extend(fixtures::shape_differences(
            fixture,
            ours,
            &root,
            &MarathonShape,
        ));
    }
    // An app definition as posted, against what api_post_event carries.
    let (event_type, event) = marathon.published()[0].clone();
    assert_eq!(event_type, "api_post_event");
    let posted = read_fixture("1-nginx.json");
    let posted_shape =
        fixtures::shape_differences(&posted, &event["appDefinition"], "1-nginx", &MarathonShape);
    found.extend(posted_shape);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_modes_have_the_shape_of_their_marathon_version() {
    let marathon = MarathonDouble::start().await;
    let modes = [
        ("/user", NetworkMode::DockerUser("weave".into())),
        ("/bridge", NetworkMode::DockerBridge),
        ("/dockerhost", NetworkMode::DockerHost),
        ("/container", NetworkMode::Container("weave".into())),
        ("/cbridge", NetworkMode::ContainerBridge),
        ("/host", NetworkMode::Host),
        ("/ipaddress", NetworkMode::IpAddress("weave".into())),
    ];
    for (id, mode) in modes {
        let app = App::new(id)
            .network_mode(mode)
            .container_port(8080)
            .port_name("http");
        marathon.put_app(app);
    }
    let apps = get(&marathon, APPS).await.json();

    let user = app(&apps, "/user");
    assert_eq!(user["container"]["type"], "DOCKER");
    assert_eq!(user["container"]["docker"]["network"], "USER");
    let mapping = &user["container"]["docker"]["portMappings"][0];
    assert_eq!(mapping["containerPort"], 8080);
    assert_eq!(mapping["servicePort"], 10000);
    assert_eq!(mapping["name"], "http");
    assert!(mapping.get("hostPort").is_none(), "{mapping}");
    assert_eq!(user["ipAddress"]["networkName"], "weave");
    assert_eq!(user["ipAddress"]["discovery"]["ports"], json!([]));
    assert_eq!(user["portDefinitions"], json!([]));
    assert!(user.get("networks").is_none());
    // The default shape is this one.
    assert_eq!(
        App::new("/x").network,
        NetworkMode::DockerUser("weave".into())
    );

    let bridge = app(&apps, "/bridge");
    assert_eq!(bridge["container"]["docker"]["network"], "BRIDGE");
    assert_eq!(
        bridge["container"]["docker"]["portMappings"][0]["hostPort"],
        0
    );
    assert_eq!(bridge["portDefinitions"][0]["port"], 10001);
    assert_eq!(bridge["ipAddress"], Value::Null);

    let docker_host = app(&apps, "/dockerhost");
    assert_eq!(docker_host["container"]["docker"]["network"], "HOST");
    assert!(docker_host["container"]["docker"]
        .get("portMappings")
        .is_none());
    assert_eq!(docker_host["portDefinitions"][0]["port"], 10002);

    let container = app(&apps, "/container");
    assert_eq!(
        container["networks"],
        json!([{"mode": "container", "name": "weave"}])
    );
    assert_eq!(
        container["container"]["portMappings"][0]["containerPort"],
        8080
    );
    assert!(container["container"]["docker"].get("network").is_none());
    assert!(container.get("ipAddress").is_none());

    let container_bridge = app(&apps, "/cbridge");
    assert_eq!(
        container_bridge["networks"],
        json!([{"mode": "container/bridge"}])
    );
    assert_eq!(
        container_bridge["container"]["portMappings"][0]["hostPort"],
        0
    );

    let host = app(&apps, "/host");
    assert_eq!(host["networks"], json!([{"mode": "host"}]));
    assert_eq!(host["portDefinitions"][0]["port"], 10005);

    let ip_address = app(&apps, "/ipaddress");
    assert_eq!(ip_address["container"]["type"], "MESOS");
    assert_eq!(
        ip_address["ipAddress"]["discovery"]["ports"],
        json!([{"number": 8080, "name": "http", "protocol": "tcp"}])
    );
    assert_eq!(ip_address["ipAddress"]["networkName"], "weave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_app_replaces_in_place_keeping_tasks_and_service_ports() {
    let marathon = MarathonDouble::start().await;
    marathon.put_app(shop().container_port(9090).task(shop_task()));
    marathon.put_app(App::new("/blog").container_port(80).service_port(12000));
    let before = marathon.apps_json();
    marathon.put_app(
        shop()
            .container_port(9090)
            .label("HAPROXY_GROUP", "internal"),
    );
    let after = marathon.apps_json();
    let ids: Vec<&Value> = after["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["id"])
        .collect();
    assert_eq!(ids, [&json!("/shop"), &json!("/blog")]);
    let shop = app(&after, "/shop");
    assert_eq!(shop["labels"]["HAPROXY_GROUP"], "internal");
    assert_eq!(shop["tasks"], app(&before, "/shop")["tasks"]);
    let mappings = &shop["container"]["docker"]["portMappings"];
    assert_eq!(mappings[0]["servicePort"], 10000);
    assert_eq!(mappings[1]["servicePort"], 10001);
    assert_eq!(shop["tasks"][0]["servicePorts"], json!([10000, 10001]));
    assert_eq!(
        app(&after, "/blog")["container"]["docker"]["portMappings"][0]["servicePort"],
        12000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_embedded_only_when_asked_like_marathon() {
    let marathon = MarathonDouble::start().await;
    marathon.put_app(shop().task(shop_task().health(Some(true))));
    marathon.put_app(App::new("/group/blog").container_port(80));
    for query in [
        "embed=apps.tasks",
        "embed=tasks",
        "embed=app.tasks",
        "embed=group.apps.tasks",
        "embed=apps.failures",
        "embed=apps.counts&embed=apps.tasks",
    ] {
        let apps = get(&marathon, &format!("{APPS}?{query}")).await.json();
        assert_eq!(app(&apps, "/shop")["tasks"][0]["id"], "shop.1", "{query}");
        assert_eq!(app(&apps, "/group/blog")["tasks"], json!([]), "{query}");
    }
    for query in [
        "",
        "?embed=apps.counts",
        "?embed=apps.deployments",
        "?embed=task",
    ] {
        let apps = get(&marathon, &format!("{APPS}{query}")).await.json();
        let shop = app(&apps, "/shop");
        assert!(shop.get("tasks").is_none(), "{query}: {shop}");
        assert_eq!(shop["tasksRunning"], 1, "{query}");
        assert_eq!(shop["tasksHealthy"], 1, "{query}");
    }
    assert_eq!(marathon.last_apps_query().as_deref(), Some("embed=task"));

    let one = get(&marathon, "/v2/apps/group/blog").await;
    assert_eq!(one.status, 200);
    assert_eq!(keys(&one.json()), ["app"]);
    assert_eq!(one.json()["app"]["id"], "/group/blog");
    assert_eq!(one.json()["app"]["tasks"], json!([]));
    let missing = get(&marathon, "/v2/apps/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.json(),
        json!({"message": "App '/nope' does not exist"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frames_are_byte_exact_with_crlf_like_jetty() {
    let marathon = MarathonDouble::start().await;
    marathon.freeze_time(Some(TIME));
    let mut stream = open_stream(&marathon, EVENTS).await;
    let attached = "event: event_stream_attached\r\n\
        data: {\"remoteAddress\":\"127.0.0.1\",\"eventType\":\"event_stream_attached\",\
        \"timestamp\":\"2017-02-18T19:12:00.102Z\"}\r\n\r\n";
    assert_eq!(stream.raw(attached.len()).await, attached);

    marathon.put_app(shop());
    let post = stream.raw_frame().await;
    let head = "event: api_post_event\r\ndata: {\"clientIp\":\"127.0.0.1\",\
        \"uri\":\"/v2/apps/shop\",\"appDefinition\":{";
    let tail =
        "},\"eventType\":\"api_post_event\",\"timestamp\":\"2017-02-18T19:12:00.102Z\"}\r\n\r\n";
    assert!(post.starts_with(head) && post.ends_with(tail), "{post:?}");
    assert_eq!(post.matches('\n').count(), 3, "one data line: {post:?}");
    assert!(stream
        .raw_frame()
        .await
        .starts_with("event: deployment_info\r\ndata: {"));
    assert!(stream
        .raw_frame()
        .await
        .starts_with("event: deployment_success\r\ndata: {"));

    marathon.add_task("/shop", shop_task());
    let status = "event: status_update_event\r\n\
        data: {\"slaveId\":\"1f09399d-0cb0-4484-afd7-f08e99d2acbb-S1\",\"taskId\":\"shop.1\",\
        \"taskStatus\":\"TASK_RUNNING\",\"message\":\"\",\"appId\":\"/shop\",\"host\":\"agent1\",\
        \"ipAddresses\":[{\"ipAddress\":\"10.2.1.5\",\"protocol\":\"IPv4\"}],\"ports\":[31001],\
        \"version\":\"2017-02-18T19:12:00.102Z\",\"eventType\":\"status_update_event\",\
        \"timestamp\":\"2017-02-18T19:12:00.102Z\"}\r\n\r\n";
    assert_eq!(stream.raw(status.len()).await, status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_feed_framing_is_available_for_parser_tests() {
    let marathon = MarathonDouble::start().await;
    marathon.freeze_time(Some(TIME));
    marathon.set_line_ending(LineEnding::Lf);
    let mut stream = open_stream(&marathon, EVENTS).await;
    let attached = "event: event_stream_attached\n\
        data: {\"remoteAddress\":\"127.0.0.1\",\"eventType\":\"event_stream_attached\",\
        \"timestamp\":\"2017-02-18T19:12:00.102Z\"}\n\n";
    assert_eq!(stream.raw(attached.len()).await, attached);
    marathon.emit("deployment_success", json!({"id": "d1"}));
    assert_eq!(stream.next_of("deployment_success").await["id"], "d1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_need_the_exact_event_stream_accept_header() {
    let marathon = MarathonDouble::start().await;
    let no_accept = get(&marathon, EVENTS).await;
    assert_eq!(no_accept.status, 405);
    assert!(no_accept
        .body
        .contains("HTTP method GET is not supported by this URL"));
    let listed = get_with(&marathon, EVENTS, &[("Accept", "text/event-stream, */*")]).await;
    assert_eq!(listed.status, 405, "Jetty compares the whole header");
    assert_eq!(
        (marathon.events_requests(), marathon.event_connections()),
        (2, 0)
    );
    let _stream = open_stream(&marathon, EVENTS).await;
    assert_eq!(
        (marathon.events_requests(), marathon.event_connections()),
        (3, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_type_filters_on_the_server_attachments_included() {
    let marathon = MarathonDouble::start().await;
    let mut all = open_stream(&marathon, EVENTS).await;
    let filtered_path = "/v2/events?event_type=status_update_event&plan-format=light";
    let mut filtered = open_stream(&marathon, filtered_path).await;
    assert_eq!(
        marathon.last_events_query().as_deref(),
        Some("event_type=status_update_event&plan-format=light")
    );
    let mut pair_path = "/v2/events?event_type=event_stream_attached".to_string();
    pair_path.push_str("&event_type=app_terminated_event");
    let mut pair = open_stream(&marathon, &pair_path).await;
    marathon.wait_for_open_streams(3).await;

    marathon.put_app(shop().task(shop_task()));
    marathon.emit("some_future_event", json!({"anything": [1, 2]}));
    marathon.set_task_state("shop.1", "TASK_KILLING");
    marathon.remove_app("/shop");

    assert_eq!(
        all.types(10).await,
        [
            "event_stream_attached",
            "event_stream_attached",
            "event_stream_attached",
            "api_post_event",
            "deployment_info",
            "status_update_event",
            "deployment_success",
            "some_future_event",
            "status_update_event",
            "status_update_event",
        ]
    );
    assert_eq!(all.next_event().await.0, "app_terminated_event");

    // No attachment for a stream that did not ask for it: it starts with the first update.
    let statuses: Vec<Value> = [
        filtered.next_event().await,
        filtered.next_event().await,
        filtered.next_event().await,
    ]
    .into_iter()
    .map(|(event_type, data)| {
        assert_eq!(event_type, "status_update_event");
        data["taskStatus"].clone()
    })
    .collect();
    assert_eq!(statuses, ["TASK_RUNNING", "TASK_KILLING", "TASK_KILLED"]);
    assert!(filtered.is_silent().await);

    assert_eq!(
        pair.types(2).await,
        ["event_stream_attached", "app_terminated_event"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_publishes_marathons_event_and_is_visible_first() {
    let marathon = MarathonDouble::start().await;
    let mut stream = open_stream(&marathon, EVENTS).await;
    stream.next_of("event_stream_attached").await;

    marathon.put_app(shop());
    let post = stream.next_of("api_post_event").await;
    assert_eq!(
        keys(&post),
        ["appDefinition", "clientIp", "eventType", "timestamp", "uri"]
    );
    assert_eq!(post["uri"], "/v2/apps/shop");
    assert_eq!(post["appDefinition"]["id"], "/shop");
    assert!(post["appDefinition"].get("tasks").is_none());
    assert_eq!(
        stream.next_of("deployment_info").await["plan"]["steps"][0]["actions"][0]["app"],
        "/shop"
    );

    marathon.add_task("/shop", shop_task().state("TASK_STAGING"));
    let staging = stream.next_of("status_update_event").await;
    assert_eq!(
        keys(&staging),
        [
            "appId",
            "eventType",
            "host",
            "ipAddresses",
            "message",
            "ports",
            "slaveId",
            "taskId",
            "taskStatus",
            "timestamp",
            "version"
        ]
    );
    assert_eq!(staging["taskStatus"], "TASK_STAGING");
    assert_eq!(staging["version"], post["appDefinition"]["version"]);
    let apps = get(&marathon, "/v2/apps?embed=apps.tasks").await.json();
    let task = &app(&apps, "/shop")["tasks"][0];
    assert_eq!(
        (&task["state"], &task["startedAt"]),
        (&json!("TASK_STAGING"), &Value::Null)
    );
    assert_eq!(app(&apps, "/shop")["tasksStaged"], 1);

    marathon.set_task_state("shop.1", "TASK_RUNNING");
    assert_eq!(
        stream.next_of("status_update_event").await["taskStatus"],
        "TASK_RUNNING"
    );
    let apps = get(&marathon, "/v2/apps?embed=apps.tasks").await.json();
    assert!(app(&apps, "/shop")["tasks"][0]["startedAt"].is_string());
    assert_eq!(app(&apps, "/shop")["tasksRunning"], 1);

    marathon.set_task_health("shop.1", true);
    let healthy = stream.next_of("health_status_changed_event").await;
    assert_eq!(
        keys(&healthy),
        [
            "alive",
            "appId",
            "eventType",
            "instanceId",
            "timestamp",
            "version"
        ]
    );
    assert_eq!(
        (&healthy["instanceId"], &healthy["alive"]),
        (&json!("shop.1"), &json!(true))
    );
    marathon.set_health_event_id(HealthEventId::TaskId);
    marathon.set_task_health("shop.1", false);
    let sick = stream.next_of("health_status_changed_event").await;
    assert_eq!(
        (&sick["taskId"], &sick["alive"]),
        (&json!("shop.1"), &json!(false))
    );
    assert!(sick.get("instanceId").is_none());
    let apps = get(&marathon, "/v2/apps?embed=apps.tasks").await.json();
    let result = &app(&apps, "/shop")["tasks"][0]["healthCheckResults"][0];
    assert_eq!(
        (&result["alive"], &result["consecutiveFailures"]),
        (&json!(false), &json!(1))
    );
    assert!(result["firstSuccess"].is_string() && result["lastFailure"].is_string());
    assert_eq!(app(&apps, "/shop")["tasksUnhealthy"], 1);

    marathon.remove_task("shop.1");
    assert_eq!(
        stream.next_of("status_update_event").await["taskStatus"],
        "TASK_KILLED"
    );
    let apps = get(&marathon, "/v2/apps?embed=apps.tasks").await.json();
    assert_eq!(app(&apps, "/shop")["tasks"], json!([]));

    marathon.remove_app("/shop");
    let terminated = stream.next_of("app_terminated_event").await;
    assert_eq!(keys(&terminated), ["appId", "eventType", "timestamp"]);
    assert_eq!(terminated["appId"], "/shop");
    assert_eq!(get(&marathon, APPS).await.json(), json!({"apps": []}));

    marathon.emit("unknown_future_event", json!({"foo": "bar"}));
    let unknown = stream.next_of("unknown_future_event").await;
    assert_eq!(unknown["foo"], "bar");
    assert_eq!(unknown["eventType"], "unknown_future_event");
    assert!(unknown["timestamp"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_states_follow_marathon() {
    let marathon = MarathonDouble::start().await;
    marathon.put_app(
        shop()
            .task(shop_task())
            .task(Task::new("shop.2").without_state())
            .task(Task::new("shop.3").state("TASK_STARTING")),
    );
    marathon.set_task_state("shop.1", "TASK_KILLING");
    marathon.set_task_state("shop.2", "TASK_FAILED");
    let apps = marathon.apps_json();
    let tasks = app(&apps, "/shop")["tasks"].as_array().unwrap().clone();
    let ids: Vec<&Value> = tasks.iter().map(|t| &t["id"]).collect();
    assert_eq!(ids, [&json!("shop.1"), &json!("shop.3")]);
    assert_eq!(tasks[0]["state"], "TASK_KILLING");
    assert_eq!(app(&apps, "/shop")["tasksRunning"], 0);
    assert_eq!(app(&apps, "/shop")["tasksStaged"], 1);

    marathon.put_app(App::new("/old").task(Task::new("old.1").without_state()));
    let apps = marathon.apps_json();
    assert!(app(&apps, "/old")["tasks"][0].get("state").is_none());
    assert_eq!(app(&apps, "/old")["tasksRunning"], 1);
    let last = marathon.published().last().unwrap().clone();
    assert_eq!(last.0, "deployment_success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_keeps_streams_open_and_silent_while_changes_apply() {
    let marathon = MarathonDouble::start().await;
    marathon.set_heartbeat(Some(Duration::from_millis(50)));
    let mut stalled = open_stream(&marathon, EVENTS).await;
    stalled.next_of("event_stream_attached").await;
    marathon.stall_streams();
    marathon.put_app(shop());
    assert!(
        stalled.is_silent_after_stall().await,
        "no event, no heartbeat, no end"
    );
    assert_eq!(marathon.open_streams(), 1);
    assert!(app(&get(&marathon, APPS).await.json(), "/shop").is_object());

    let mut fresh = open_stream(&marathon, EVENTS).await;
    marathon.remove_app("/shop");
    fresh.next_of("app_terminated_event").await;
    assert!(stalled.is_silent().await);
    assert_eq!(marathon.open_streams(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_a_bare_line_ending_when_asked_for() {
    let marathon = MarathonDouble::start().await;
    marathon.set_heartbeat(Some(Duration::from_millis(50)));
    let mut stream = open_stream(&marathon, EVENTS).await;
    stream.raw_frame().await;
    assert_eq!(stream.raw(4).await, "\r\n\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_ends_streams_cleanly_and_abort_breaks_them() {
    let marathon = MarathonDouble::start().await;
    let mut first = open_stream(&marathon, EVENTS).await;
    first.next_of("event_stream_attached").await;
    marathon.cut_streams();
    assert_eq!(marathon.open_streams(), 0);
    first.end().await.unwrap();

    let mut second = open_stream(&marathon, EVENTS).await;
    second.next_of("event_stream_attached").await;
    marathon.put_app(shop());
    second.next_of("api_post_event").await;
    marathon.abort_streams();
    let error = second.end().await.unwrap_err();
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    assert_eq!(marathon.event_connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leader_answers_jettys_html_error_page() {
    let marathon = MarathonDouble::start().await;
    marathon.set_apps_fault(Fault::NoLeader);
    let apps = get(&marathon, APPS).await;
    assert_eq!(apps.status, 503);
    assert!(apps.header("content-type").starts_with("text/html"));
    assert!(apps
        .body
        .contains("<title>Error 503 Could not determine the current leader</title>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_faults_answer_marathons_json_error() {
    let marathon = MarathonDouble::start().await;
    marathon.set_apps_fault(Fault::Status(503));
    let apps = get(&marathon, APPS).await;
    assert_eq!(apps.status, 503);
    assert_eq!(apps.header("content-type"), "application/json");
    assert_eq!(apps.json(), json!({"message": "Service Unavailable"}));
    assert_eq!(get(&marathon, "/v2/apps/shop").await.status, 503);
    // Each endpoint has its own switch.
    open_stream(&marathon, EVENTS).await;

    marathon.set_apps_fault(Fault::None);
    marathon.set_events_fault(Fault::Status(500));
    let events = get_with(&marathon, EVENTS, &[("Accept", "text/event-stream")]).await;
    assert_eq!(events.status, 500);
    assert_eq!(events.json(), json!({"message": "Internal Server Error"}));
    assert_eq!(get(&marathon, APPS).await.status, 200);
    assert_eq!(marathon.apps_requests(), 2, "/v2/apps/shop is not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_faults_delay_the_answer() {
    let marathon = MarathonDouble::start().await;
    let delay = Duration::from_millis(400);
    marathon.set_apps_fault(Fault::Slow(delay));
    let start = Instant::now();
    assert_eq!(get(&marathon, APPS).await.status, 200);
    assert!(start.elapsed() >= delay, "{:?}", start.elapsed());
    let impatient = client()
        .get(format!("{}{APPS}", marathon.url()))
        .timeout(Duration::from_millis(100))
        .send()
        .await
        .unwrap_err();
    assert!(impatient.is_timeout(), "{impatient:?}");

    marathon.set_apps_fault(Fault::None);
    marathon.set_events_fault(Fault::Slow(delay));
    let start = Instant::now();
    let mut stream = open_stream(&marathon, EVENTS).await;
    assert!(start.elapsed() >= delay, "{:?}", start.elapsed());
    stream.next_of("event_stream_attached").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_guards_every_endpoint() {
    let marathon = MarathonDouble::start().await;
    marathon.set_basic_auth(Some(("weft", "s3cret")));
    for path in [APPS, EVENTS] {
        for headers in [
            &[][..],
            &[("Authorization", "Basic d2VmdDp3cm9uZw==")][..], // weft:wrong
            &[("Authorization", "token=s3cret")][..],
        ] {
            let answer = get_with(&marathon, path, headers).await;
            assert_eq!(answer.status, 401, "{path} {headers:?}");
            assert_eq!(answer.json(), json!({"message": UNAUTHORIZED_MESSAGE}));
            assert_eq!(
                answer.header("www-authenticate"),
                "Basic realm=\"Mesosphere\""
            );
        }
    }
    let with_auth = client()
        .get(format!("{}{APPS}", marathon.url()))
        .basic_auth("weft", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(with_auth.status(), 200);
    let request = client()
        .get(format!("{}{EVENTS}", marathon.url()))
        .basic_auth("weft", Some("s3cret"));
    let mut stream = open_stream_with(&marathon, EVENTS, request).await;
    stream.next_of("event_stream_attached").await;
    assert_eq!(marathon.event_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_is_dcos_style() {
    let marathon = MarathonDouble::start().await;
    marathon.set_token(Some("abc"));
    let good = get_with(&marathon, APPS, &[("Authorization", "token=abc")]).await;
    assert_eq!(good.status, 200);
    for headers in [
        &[][..],
        &[("Authorization", "token=abd")][..],
        &[("Authorization", "Bearer abc")][..],
    ] {
        let answer = get_with(&marathon, APPS, headers).await;
        assert_eq!(answer.status, 401, "{headers:?}");
        assert_eq!(answer.header("www-authenticate"), "acsjwt");
        assert_eq!(answer.json(), json!({"message": UNAUTHORIZED_MESSAGE}));
    }
    marathon.set_token(None);
    assert_eq!(get(&marathon, APPS).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_counted_and_leaving_clients_detach() {
    let marathon = MarathonDouble::start().await;
    let mut staying = open_stream(&marathon, EVENTS).await;
    staying.next_of("event_stream_attached").await;
    let leaving = open_stream(&marathon, EVENTS).await;
    assert_eq!(
        (marathon.event_connections(), marathon.open_streams()),
        (2, 2)
    );
    drop(leaving);
    marathon.wait_for_open_streams(1).await;
    staying.next_of("event_stream_attached").await;
    assert_eq!(
        staying.next_of("event_stream_detached").await["remoteAddress"],
        "127.0.0.1"
    );
    assert_eq!(marathon.event_connections(), 2);
    get(&marathon, APPS).await;
    get(&marathon, "/v2/apps/x").await;
    assert_eq!(marathon.apps_requests(), 1, "the list only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_double_kills_streams_and_refuses_connections() {
    let marathon = MarathonDouble::start().await;
    // No heartbeat: a stream the drop failed to kill would stay silent, and `end` would fail.
    marathon.set_heartbeat(None);
    let url = marathon.url();
    let mut stream = open_stream(&marathon, EVENTS).await;
    stream.next_of("event_stream_attached").await;
    drop(marathon);
    let _ = stream.end().await;
    // The listener closes once the aborted server task is dropped: soon, not at once.
    support::eventually(Duration::from_secs(10), "connections refused", || async {
        match client().get(format!("{url}{APPS}")).send().await {
            Err(error) if error.is_connect() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let dead = client()
        .get(format!("{}{APPS}", MarathonDouble::dead_url()))
        .send()
        .await
        .unwrap_err();
    assert!(dead.is_connect(), "{dead:?}");
}

#[test]
fn timestamps_are_marathons_utc_milliseconds() {
    let at = |secs: u64, millis: u64| {
        timestamp(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
    };
    assert_eq!(at(1_487_445_120, 102), TIME);
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
    assert_eq!(at(4_107_542_400, 7), "2100-03-01T00:00:00.007Z");
    let now = timestamp(SystemTime::now());
    assert_eq!((now.len(), &now[10..11], &now[23..]), (24, "T", "Z"));
}
