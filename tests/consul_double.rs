//! Tests of the Consul test double itself: it must answer like the documented API, since weft's
//! Consul source is only ever tested against it.

#![allow(clippy::unwrap_used)]

mod support;

use support::consul;
use support::fixtures::{self, ShapeRules};
use support::killable::Served;
use support::Answer;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use consul::{
    parse_go_duration, Behavior, ConsulDouble, Fault, Instance, Status, CATALOG_SERVICES,
    HEALTH_SERVICE, HEALTH_STATE, KV, SESSION,
};
use serde_json::{Map, Value};

/// Bounds every request of these tests, blocking ones included (scaled by patience).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn request_timeout() -> Duration {
    support::patience(REQUEST_TIMEOUT)
}

/// Consul's `X-Consul-Index` of an answer.
trait ConsulIndex {
    fn index(&self) -> u64;
}

impl ConsulIndex for Answer {
    fn index(&self) -> u64 {
        self.header("x-consul-index").parse().unwrap()
    }
}

async fn get(consul: &ConsulDouble, path_and_query: &str) -> Answer {
    get_with(consul, path_and_query, &[]).await
}

async fn get_with(consul: &ConsulDouble, path_and_query: &str, headers: &[(&str, &str)]) -> Answer {
    let url = format!("{}{path_and_query}", consul.url());
    support::get_answer(&url, headers, REQUEST_TIMEOUT).await
}

fn read_fixture(name: &str) -> Value {
    fixtures::read("consul", name)
}

/// Checks are paired by CheckID (their order differs: Consul puts node checks first). The one
/// known difference: the docs sample writes `address`/`port` inside `Service.TaggedAddresses`,
/// real agents (and the double) `Address`/`Port`.
struct ConsulShape;

impl ShapeRules for ConsulShape {
    fn counterpart<'a>(
        &self,
        ours: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<&'a Value> {
        ours.get(key).or_else(|| {
            let mut upper = key.to_string();
            upper[..1].make_ascii_uppercase();
            path.contains(".Service.TaggedAddresses.")
                .then(|| ours.get(&upper))
                .flatten()
        })
    }

    fn item<'a>(&self, ours: &'a [Value], i: usize, fixture: &Value) -> Option<&'a Value> {
        match fixture.get("CheckID") {
            Some(id) => ours.iter().find(|o| o.get("CheckID") == Some(id)),
            None => ours.get(i),
        }
    }
}

/// The docs sample's redis, registered in the double.
fn register_docs_redis(consul: &ConsulDouble) {
    consul.register_node("foobar", "10.1.10.12");
    consul.set_node_meta("foobar", "instance_type", "t2.medium");
    consul.register(
        Instance::new("redis", "redis", "10.1.10.12", 8000)
            .node("foobar")
            .tag("primary")
            .meta("redis_version", "4.0")
            .tagged_address("lan", "10.1.10.12", 8000)
            .tagged_address("wan", "198.18.1.2", 80),
    );
}

/// The double's answer on `path` with the docs sample's redis registered, held to the docs
/// sample `fixture`: a 200 with every key of the sample.
async fn docs_redis_answer(path: &str, fixture: &str) -> (ConsulDouble, Value) {
    let fixture = read_fixture(fixture);
    let consul = ConsulDouble::start().await;
    register_docs_redis(&consul);
    let answer = get(&consul, path).await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    assert_eq!(answer.content_type(), "application/json");
    let ours = answer.json();
    let differences = fixtures::shape_differences(&fixture, &ours, "", &ConsulShape);
    assert!(
        differences.is_empty(),
        "{differences:#?}\nours: {ours:#}\nfixture: {fixture:#}"
    );
    (consul, ours)
}

fn ids(answer: &Answer) -> Vec<String> {
    let mut ids: Vec<String> = answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["Service"]["ID"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The parts of a health answer a router uses: no Output, no indexes.
fn routing_content(answer: &Answer) -> Vec<Value> {
    answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let statuses: Vec<Value> = entry["Checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["Status"].clone())
                .collect();
            serde_json::json!([
                entry["Node"]["Address"],
                entry["Service"]["ID"],
                entry["Service"]["Address"],
                entry["Service"]["Port"],
                entry["Service"]["Tags"],
                statuses
            ])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answer_has_every_key_of_the_docs_sample() {
    let (_consul, ours) =
        docs_redis_answer("/v1/health/service/redis", "health-service-redis.docs.json").await;

    // Beyond the sample: what real agents send and the brief asks for.
    let entry = &ours[0];
    for key in ["CreateIndex", "ModifyIndex"] {
        assert!(entry["Node"][key].as_u64().unwrap() > 0, "Node.{key}");
        assert!(entry["Service"][key].as_u64().unwrap() > 0, "Service.{key}");
    }
    assert_eq!(entry["Service"]["EnableTagOverride"], false);
    assert_eq!(
        entry["Service"]["TaggedAddresses"]["wan"],
        serde_json::json!({"Address": "198.18.1.2", "Port": 80})
    );
    assert_eq!(
        entry["Service"]["TaggedAddresses"]["lan_ipv4"],
        serde_json::json!({"Address": "10.1.10.12", "Port": 8000})
    );
    for check in entry["Checks"].as_array().unwrap() {
        for key in ["Type", "CreateIndex", "ModifyIndex", "ServiceTags"] {
            assert!(check.get(key).is_some(), "check without {key}: {check}");
        }
    }
    assert_eq!(entry["Checks"][0]["CheckID"], "serfHealth");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_answer_matches_the_docs_sample() {
    let fixture = read_fixture("catalog-services.docs.json");
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("redis", "redis-1", "10.1.10.12", 6379));
    consul.register(Instance::new("postgresql", "pg-1", "10.1.10.13", 5432).tag("secondary"));
    consul.register(
        Instance::new("postgresql", "pg-2", "10.1.10.14", 5432)
            .tag("primary")
            .tag("secondary"),
    );

    let answer = get(&consul, CATALOG_SERVICES).await;
    assert_eq!(answer.status, 200);
    let differences = fixtures::shape_differences(&fixture, &answer.json(), "", &ConsulShape);
    assert!(differences.is_empty(), "{differences:#?}");
    // Tags are a sorted union without duplicates, and the consul service is always listed.
    assert_eq!(answer.json(), fixture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_catalog_lists_consul_and_an_index_of_at_least_one() {
    let consul = ConsulDouble::start().await;
    let answer = get(&consul, CATALOG_SERVICES).await;
    assert_eq!(answer.json(), serde_json::json!({"consul": []}));
    assert!(answer.index() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_200_carries_the_consul_headers() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    for path in [
        CATALOG_SERVICES,
        "/v1/health/service/shop",
        "/v1/health/service/shop?passing",
        "/v1/health/service/nothing",
        "/v1/catalog/services?stale",
        "/v1/health/state/any",
        "/v1/health/state/critical?stale",
    ] {
        let answer = get(&consul, path).await;
        assert_eq!(answer.status, 200, "{path}");
        assert!(answer.index() >= 1, "{path}");
        assert_eq!(answer.header("x-consul-knownleader"), "true", "{path}");
        assert_eq!(answer.header("x-consul-lastcontact"), "0", "{path}");
        assert_eq!(answer.content_type(), "application/json", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_an_empty_200() {
    let consul = ConsulDouble::start().await;
    let answer = get(&consul, "/v1/health/service/nothing").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "[]");
    assert!(answer.index() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_service_address_stays_empty_beside_the_node_address() {
    let consul = ConsulDouble::start().await;
    consul.register_node("host-a", "172.16.0.7");
    consul.register(Instance::new("shop", "shop-1", "", 8080).node("host-a"));
    let answer = get(&consul, "/v1/health/service/shop").await;
    let entry = &answer.json()[0];
    assert_eq!(entry["Service"]["Address"], "");
    assert_eq!(entry["Node"]["Address"], "172.16.0.7");
    assert!(entry["Service"].get("TaggedAddresses").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_keeps_instances_whose_checks_all_pass_node_checks_included() {
    let consul = ConsulDouble::start().await;
    consul.register_node("n1", "10.0.0.1");
    consul.register_node("n2", "10.0.0.2");
    consul.register(Instance::new("shop", "a", "10.2.1.1", 80).node("n1"));
    consul.register(
        Instance::new("shop", "b", "10.2.1.2", 80)
            .node("n1")
            .status(Status::Warning),
    );
    consul.register(Instance::new("shop", "c", "10.2.1.3", 80).node("n2"));
    consul.register(
        Instance::new("shop", "d", "10.2.1.4", 80)
            .node("n2")
            .without_check(),
    );
    consul.register(Instance::new("shop", "e", "10.2.1.5", 80).node("n1"));
    consul.set_check("e", Status::Maintenance);

    let all = ["a", "b", "c", "d", "e"];
    assert_eq!(ids(&get(&consul, "/v1/health/service/shop").await), all);
    for query in [
        "passing",
        "passing=",
        "passing=1",
        "passing=t",
        "passing=TRUE",
    ] {
        let answer = get(&consul, &format!("/v1/health/service/shop?{query}")).await;
        assert_eq!(ids(&answer), ["a", "c", "d"], "?{query}");
    }
    for query in ["passing=0", "passing=f", "passing=False"] {
        let answer = get(&consul, &format!("/v1/health/service/shop?{query}")).await;
        assert_eq!(ids(&answer), all, "?{query}");
    }

    // A node whose serfHealth fails hides every instance on it.
    consul.set_node_check("n2", Status::Critical);
    assert_eq!(
        ids(&get(&consul, "/v1/health/service/shop?passing").await),
        ["a"]
    );
    let answer = get(&consul, "/v1/health/service/shop").await;
    let c = answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Service"]["ID"] == "c")
        .cloned()
        .unwrap();
    assert_eq!(c["Checks"][0]["CheckID"], "serfHealth");
    assert_eq!(c["Checks"][0]["Status"], "critical");

    consul.set_node_check("n2", Status::Passing);
    consul.set_check("b", Status::Passing);
    consul.set_check("e", Status::Critical);
    assert_eq!(
        ids(&get(&consul, "/v1/health/service/shop?passing").await),
        ["a", "b", "c", "d"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_tags_are_anded_case_insensitively() {
    let consul = ConsulDouble::start().await;
    consul.register(
        Instance::new("web", "both", "10.0.0.1", 80)
            .tag("edge")
            .tag("v2"),
    );
    consul.register(Instance::new("web", "edge", "10.0.0.2", 80).tag("edge"));
    consul.register(Instance::new("web", "v2", "10.0.0.3", 80).tag("V2"));
    let cases: [(&str, &[&str]); 4] = [
        ("tag=edge", &["both", "edge"]),
        ("tag=edge&tag=v2", &["both"]),
        ("tag=v2", &["both", "v2"]),
        ("tag=edge&tag=none", &[]),
    ];
    for (query, expected) in cases {
        let answer = get(&consul, &format!("/v1/health/service/web?{query}")).await;
        assert_eq!(ids(&answer), expected, "?{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_plain_text_400s() {
    let consul = ConsulDouble::start().await;
    let stale_consistent = "Cannot specify ?stale with ?consistent, conflicting semantics.";
    let cases = [
        ("/v1/health/service/", "Missing service name"),
        (
            "/v1/health/service/x?passing=yes",
            "Invalid value for ?passing",
        ),
        (
            "/v1/health/service/x?passing=2",
            "Invalid value for ?passing",
        ),
        ("/v1/health/service/x?index=1&wait=abc", "Invalid wait time"),
        ("/v1/health/service/x?wait=5", "Invalid wait time"),
        ("/v1/catalog/services?wait=5S", "Invalid wait time"),
        ("/v1/catalog/services?wait=1d", "Invalid wait time"),
        ("/v1/catalog/services?wait=.s", "Invalid wait time"),
        ("/v1/catalog/services?wait=%205s", "Invalid wait time"),
        ("/v1/catalog/services?index=abc", "Invalid index"),
        ("/v1/catalog/services?index=-1", "Invalid index"),
        ("/v1/catalog/services?index=%2B1", "Invalid index"),
        ("/v1/catalog/services?index=1.5", "Invalid index"),
        (
            "/v1/catalog/services?index=18446744073709551616",
            "Invalid index",
        ),
        ("/v1/catalog/services?stale&consistent", stale_consistent),
        ("/v1/health/service/x?stale=&consistent=", stale_consistent),
        ("/v1/health/state/", "Missing check state"),
        // Query options are parsed before the state is looked at, as in Consul.
        ("/v1/health/state/?wait=abc", "Invalid wait time"),
        ("/v1/health/state/any?index=abc", "Invalid index"),
        ("/v1/health/state/any?stale&consistent", stale_consistent),
    ];
    for (path, message) in cases {
        let answer = get(&consul, path).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (400, message),
            "{path}"
        );
        assert!(answer.content_type().starts_with("text/plain"), "{path}");
        assert!(answer.headers.get("x-consul-index").is_none(), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_durations_are_accepted_as_go_accepts_them() {
    let consul = ConsulDouble::start().await;
    // index=0 never blocks: only the parsing is under test.
    for wait in [
        "5s", "100ms", "5m", "1m30s", "1.5h", ".5s", "1.s", "0", "-5s", "300us", "2%C2%B5s", "20m",
        "",
    ] {
        let answer = get(
            &consul,
            &format!("/v1/catalog/services?index=0&wait={wait}"),
        )
        .await;
        assert_eq!(answer.status, 200, "wait={wait}: {}", answer.body);
    }
    let second = 1_000_000_000;
    assert_eq!(
        parse_go_duration("1h2m3.5s"),
        Some(3723 * second + second / 2)
    );
    assert_eq!(parse_go_duration("-1.5ms"), Some(-1_500_000));
    assert_eq!(
        parse_go_duration("9223372036854775807ns"),
        Some(i128::from(i64::MAX))
    );
    assert_eq!(parse_go_duration("9223372036854775808ns"), None);
    assert_eq!(
        parse_go_duration("-9223372036854775808ns"),
        Some(i128::from(i64::MIN))
    );
    for bad in [
        "", "-", "s", "1", "1S", "1 s", "1s ", "ms5", "1..5s", "+-1s",
    ] {
        assert_eq!(parse_go_duration(bad), None, "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_returns_after_wait_without_change() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    let wait = Duration::from_millis(200);
    for path in [CATALOG_SERVICES, "/v1/health/service/shop"] {
        let first = get(&consul, path).await;
        let start = Instant::now();
        let again = get(
            &consul,
            &format!("{path}?index={}&wait=200ms", first.index()),
        )
        .await;
        let elapsed = start.elapsed();
        assert_eq!(again.status, 200);
        // No sooner than the wait; how much later is the machine's business (the request
        // timeout bounds it).
        assert!(elapsed >= wait, "{path}: returned after {elapsed:?}");
        assert_eq!(again.index(), first.index(), "{path}");
        assert_eq!(again.body, first.body, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_returns_early_on_a_change() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    let health = "/v1/health/service/shop";
    let catalog_index = get(&consul, CATALOG_SERVICES).await.index();
    let health_index = get(&consul, health).await.index();

    // Consul's longest wait: an answer at all (within the request timeout) is an early one.
    let wait = Duration::from_secs(600);
    let consul = std::sync::Arc::new(consul);
    let start = Instant::now();
    let catalog_query = tokio::spawn({
        let consul = consul.clone();
        async move {
            let path = format!("{CATALOG_SERVICES}?index={catalog_index}&wait=10m");
            get(&consul, &path).await
        }
    });
    let health_query = tokio::spawn({
        let consul = consul.clone();
        async move { get(&consul, &format!("{health}?index={health_index}&wait=10m")).await }
    });
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;
    consul.wait_for_blocked_queries(health, 1).await;
    assert!(!catalog_query.is_finished() && !health_query.is_finished());
    consul.register(Instance::new("shop", "shop-2", "10.2.1.6", 8080).tag("new"));

    let catalog = catalog_query.await.unwrap();
    let health_answer = health_query.await.unwrap();
    assert!(start.elapsed() < wait, "{:?}", start.elapsed());
    assert!(catalog.index() > catalog_index);
    assert_eq!(catalog.json()["shop"], serde_json::json!(["new"]));
    assert!(health_answer.index() > health_index);
    assert_eq!(ids(&health_answer), ["shop-1", "shop-2"]);
    assert_eq!(consul.blocked_queries(health), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_on_one_service_ignores_changes_to_another() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    consul.register(Instance::new("blog", "blog-1", "10.2.1.6", 8080));
    let health = "/v1/health/service/shop";
    let index = get(&consul, health).await.index();
    let consul = std::sync::Arc::new(consul);
    let wait = Duration::from_millis(300);
    let start = Instant::now();
    let query = tokio::spawn({
        let consul = consul.clone();
        async move { get(&consul, &format!("{health}?index={index}&wait=300ms")).await }
    });
    consul.wait_for_blocked_queries(health, 1).await;
    consul.set_check("blog-1", Status::Critical);
    consul.set_check_output("blog-1", "connection refused");
    let answer = query.await.unwrap();
    // It ran to its wait, through blog's changes, and answers the same index.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= wait,
        "returned after {elapsed:?}, before its wait"
    );
    assert_eq!(answer.index(), index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_change_and_bump_wake_blockers_with_identical_routing_content() {
    let consul = ConsulDouble::start().await;
    consul.register(
        Instance::new("shop", "shop-1", "10.2.1.5", 8080).tag("weft.host=shop.example.com"),
    );
    let health = "/v1/health/service/shop";
    let consul = std::sync::Arc::new(consul);

    type Change = fn(&ConsulDouble);
    let changes: [(&str, Change); 2] = [
        ("output", |c| {
            c.set_check_output("shop-1", "HTTP GET: 200 OK at 12:00:01")
        }),
        ("bump", |c| c.bump_index()),
    ];
    for (what, change) in changes {
        let before = get(&consul, health).await;
        let catalog_before = get(&consul, CATALOG_SERVICES).await;
        let query = tokio::spawn({
            let consul = consul.clone();
            let index = before.index();
            async move { get(&consul, &format!("{health}?index={index}&wait=30s")).await }
        });
        consul.wait_for_blocked_queries(health, 1).await;
        change(&consul);
        let after = tokio::time::timeout(request_timeout(), query)
            .await
            .unwrap()
            .unwrap();
        assert!(after.index() > before.index(), "{what}");
        assert_eq!(routing_content(&after), routing_content(&before), "{what}");
        let catalog_after = get(&consul, CATALOG_SERVICES).await;
        assert_eq!(catalog_after.body, catalog_before.body, "{what}");
        if what == "bump" {
            assert!(catalog_after.index() > catalog_before.index());
        }
    }
    let answer = get(&consul, health).await;
    assert_eq!(
        answer.json()[0]["Checks"][1]["Output"],
        "HTTP GET: 200 OK at 12:00:01"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_wakes_blockers_and_empties_the_service() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    let health = "/v1/health/service/shop";
    let index = get(&consul, health).await.index();
    let consul = std::sync::Arc::new(consul);
    let query = tokio::spawn({
        let consul = consul.clone();
        async move { get(&consul, &format!("{health}?index={index}&wait=30s")).await }
    });
    consul.wait_for_blocked_queries(health, 1).await;
    consul.deregister("shop-1");
    let answer = tokio::time::timeout(request_timeout(), query)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.body, "[]");
    assert!(answer.index() > index);
    let catalog = get(&consul, CATALOG_SERVICES).await.json();
    assert_eq!(catalog, serde_json::json!({"consul": []}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_filter_the_anonymous_and_refuse_unknown_tokens() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    consul.set_token(Some("s3cret".to_string()));
    // No token: the anonymous token reads nothing, and Consul says so in a normal answer.
    let catalog = get(&consul, CATALOG_SERVICES).await;
    assert_eq!((catalog.status, catalog.body.as_str()), (200, "{}"));
    assert_eq!(catalog.header("X-Consul-Results-Filtered-By-ACLs"), "true");
    assert!(catalog.index() >= 1);
    for path in ["/v1/health/service/shop", "/v1/health/state/any"] {
        let answer = get(&consul, path).await;
        assert_eq!((answer.status, answer.body.as_str()), (200, "[]"), "{path}");
        assert_eq!(answer.header("X-Consul-Results-Filtered-By-ACLs"), "true");
    }
    // A token Consul does not know: 403, plain text.
    for path in [
        CATALOG_SERVICES,
        "/v1/health/service/shop",
        "/v1/health/state/any",
    ] {
        for headers in [
            &[("X-Consul-Token", "wrong")][..],
            &[("Authorization", "Bearer wrong")][..],
            // The first place that holds a token counts: ?token= before the header.
            &[("X-Consul-Token", "s3cret")][..],
        ] {
            let path = if headers[0].1 == "s3cret" {
                format!("{path}?token=wrong")
            } else {
                path.to_string()
            };
            let answer = get_with(&consul, &path, headers).await;
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (403, "ACL not found"),
                "{path} {headers:?}"
            );
            assert!(answer.content_type().starts_with("text/plain"));
        }
        for headers in [
            &[("X-Consul-Token", "s3cret")][..],
            &[("Authorization", "Bearer s3cret")][..],
            &[("Authorization", "bearer s3cret")][..],
        ] {
            let answer = get_with(&consul, path, headers).await;
            assert_eq!(answer.status, 200, "{path} {headers:?}");
            assert_ne!(answer.body, "[]", "{path} {headers:?}");
        }
    }
    consul.set_token(None);
    assert_eq!(get(&consul, CATALOG_SERVICES).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_faults_answer_plain_text() {
    let consul = ConsulDouble::start().await;
    let cases = [
        (Fault::NoLeader, 500, "No cluster leader"),
        (Fault::RateLimited, 429, "RPC rate limit exceeded"),
    ];
    for (fault, status, message) in cases {
        consul.set_fault(fault);
        for path in [
            CATALOG_SERVICES,
            "/v1/health/service/shop",
            "/v1/health/state/any",
        ] {
            let answer = get(&consul, path).await;
            assert_eq!((answer.status, answer.body.as_str()), (status, message));
            assert!(answer.content_type().starts_with("text/plain"));
        }
    }
    consul.set_fault(Fault::None);
    assert_eq!(get(&consul, CATALOG_SERVICES).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_stale_reads_still_answer() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    consul.set_fault(Fault::NoLeader);
    let stale = get(&consul, "/v1/health/service/shop?stale").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-consul-knownleader"), "false");
    assert!(stale.header("x-consul-lastcontact").parse::<u64>().unwrap() > 0);
    assert_eq!(stale.json().as_array().unwrap().len(), 1);
    let consistent = get(&consul, "/v1/health/service/shop?consistent").await;
    assert_eq!(consistent.status, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_accepts_and_never_answers() {
    let consul = ConsulDouble::start().await;
    consul.set_fault(Fault::Stall);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let error = client
        .get(format!("{}{CATALOG_SERVICES}", consul.url()))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    // The request arrived: it is the answer that never came.
    assert_eq!(consul.requests().count(CATALOG_SERVICES), 1);
    consul.set_fault(Fault::None);
    assert_eq!(get(&consul, CATALOG_SERVICES).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_a_200_with_headers_and_a_body_that_does_not_parse() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    consul.set_fault(Fault::Garbage);
    for path in [
        CATALOG_SERVICES,
        "/v1/health/service/shop",
        "/v1/health/service/nothing",
        "/v1/health/state/any",
    ] {
        let answer = get(&consul, path).await;
        assert_eq!(answer.status, 200);
        assert!(answer.index() >= 1);
        assert_eq!(answer.content_type(), "application/json");
        assert!(!answer.body.is_empty(), "{path}");
        assert!(
            serde_json::from_str::<Value>(&answer.body).is_err(),
            "{path}: {}",
            answer.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_backwards_is_lower_and_consistent() {
    let consul = ConsulDouble::start().await;
    for n in 0..6 {
        consul.register(Instance::new(
            "shop",
            &format!("shop-{n}"),
            "10.2.1.5",
            8080 + n,
        ));
    }
    let health = "/v1/health/service/shop";
    let catalog_before = get(&consul, CATALOG_SERVICES).await.index();
    let health_before = get(&consul, health).await.index();

    consul.set_fault(Fault::IndexBackwards);
    let catalog_after = get(&consul, CATALOG_SERVICES).await.index();
    let health_after = get(&consul, health).await;
    assert!(
        catalog_after < catalog_before,
        "{catalog_after} !< {catalog_before}"
    );
    assert!(health_after.index() < health_before);
    assert_eq!(ids(&health_after).len(), 6);

    // A client that resets and blocks on the lower index really blocks, and wakes on a change.
    let consul = std::sync::Arc::new(consul);
    let query = tokio::spawn({
        let consul = consul.clone();
        let index = health_after.index();
        async move { get(&consul, &format!("{health}?index={index}&wait=30s")).await }
    });
    consul.wait_for_blocked_queries(health, 1).await;
    consul.set_check("shop-0", Status::Critical);
    let woken = tokio::time::timeout(request_timeout(), query)
        .await
        .unwrap()
        .unwrap();
    assert!(woken.index() > health_after.index());
    assert!(woken.index() < consul.index());

    consul.set_fault(Fault::None);
    assert_eq!(get(&consul, CATALOG_SERVICES).await.index(), catalog_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_per_path_with_their_last_query() {
    let consul = ConsulDouble::start().await;
    get(&consul, CATALOG_SERVICES).await;
    get(&consul, "/v1/health/service/shop?passing&index=0").await;
    get(&consul, "/v1/health/service/shop?tag=a").await;
    get(&consul, "/v1/health/service/").await;
    let requests = consul.requests();
    assert_eq!(requests.total, 4);
    assert_eq!(requests.count(CATALOG_SERVICES), 1);
    assert_eq!(requests.count("/v1/health/service/shop"), 2);
    assert_eq!(requests.count(HEALTH_SERVICE), 1);
    assert_eq!(requests.count("/v1/health/service/blog"), 0);
    assert_eq!(
        consul.last_query("/v1/health/service/shop").as_deref(),
        Some("tag=a")
    );
    assert_eq!(consul.last_query(CATALOG_SERVICES).as_deref(), Some(""));
    assert_eq!(consul.last_query("/v1/health/service/blog"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_double_kills_blocked_queries_and_refuses_new_ones() {
    let consul = ConsulDouble::start().await;
    let addr = consul.addr;
    let index = get(&consul, CATALOG_SERVICES).await.index();
    let client = reqwest::Client::builder()
        .timeout(request_timeout())
        .build()
        .unwrap();
    let query = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get(format!(
                    "http://{addr}{CATALOG_SERVICES}?index={index}&wait=60s"
                ))
                .send()
                .await
        }
    });
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;
    drop(consul);
    // Broken off by the double, not given up on by the client (its timeout is the test's
    // deadline, long before the query's wait).
    let error = query.await.unwrap().unwrap_err();
    assert!(!error.is_timeout(), "{error:?}");
    let refused = client
        .get(format!("http://{addr}{CATALOG_SERVICES}"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
}

/// A bug in a double: it panics with `message`.
fn bug<T>(message: &str) -> T {
    panic!("{message}")
}

/// The server under both doubles: a panic in a handler reaches the test, although axum runs
/// the handler in a connection task of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_fails_the_test() {
    let serve = |app: axum::Router| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        (Served::start(listener, app), url)
    };
    let panicking = || {
        axum::Router::new().route(
            "/",
            axum::routing::get(|| async { bug::<&str>("the handler's own panic") }),
        )
    };

    // The client gets a 500; `check` re-raises the panic, once.
    let (served, url) = serve(panicking()).await;
    let answer = reqwest::get(&url).await.map(|r| r.status());
    let raised = std::panic::catch_unwind(AssertUnwindSafe(|| served.check()))
        .expect_err("check re-raises the handler's panic");
    assert_eq!(support::panic_message(&*raised), "the handler's own panic");
    assert_eq!(answer.unwrap(), 500);
    served.check();
    drop(served);

    // Dropping the double re-raises it too, and so does a body that panics while it streams.
    let (served, url) = serve(panicking()).await;
    let _ = reqwest::get(&url).await;
    let raised = std::panic::catch_unwind(AssertUnwindSafe(|| drop(served)))
        .expect_err("dropping the double re-raises the handler's panic");
    assert_eq!(support::panic_message(&*raised), "the handler's own panic");
    let streaming = axum::Router::new().route(
        "/",
        axum::routing::get(|| async {
            let chunks = futures::stream::iter([Ok::<_, std::io::Error>("first chunk")]).chain(
                futures::stream::once(async { bug("the stream's own panic") }),
            );
            axum::body::Body::from_stream(chunks)
        }),
    );
    let (served, url) = serve(streaming).await;
    // Hyper may read the panic before it sends the headers: either way the answer breaks off.
    let answer = match reqwest::get(&url).await {
        Ok(response) => response.bytes().await,
        Err(error) => Err(error),
    };
    assert!(answer.is_err(), "{answer:?}");
    let raised = std::panic::catch_unwind(AssertUnwindSafe(|| drop(served)))
        .expect_err("dropping the double re-raises the stream's panic");
    assert_eq!(support::panic_message(&*raised), "the stream's own panic");
}

// /v1/health/state/:state

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_answer_has_every_key_of_the_docs_sample() {
    let (consul, ours) =
        docs_redis_answer("/v1/health/state/any", "health-state-any.docs.json").await;
    // Beyond the sample: the keys of Consul's structs.HealthCheck, in the order of Consul's
    // checks table (node, then check ID), node checks and service checks alike.
    let checks = ours.as_array().unwrap();
    let ids: Vec<&str> = checks
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["serfHealth", "service:redis"]);
    for check in checks {
        for key in [
            "Node",
            "CheckID",
            "Name",
            "Status",
            "Notes",
            "Output",
            "ServiceID",
            "ServiceName",
            "ServiceTags",
            "Type",
            "Interval",
            "Timeout",
            "ExposedPort",
            "Definition",
            "CreateIndex",
            "ModifyIndex",
        ] {
            assert!(check.get(key).is_some(), "check without {key}: {check}");
        }
        assert!(check["ModifyIndex"].as_u64().unwrap() >= 1, "{check}");
    }
    // Every check of the sample passes: ?passing is the same list.
    assert_eq!(get(&consul, "/v1/health/state/passing").await.json(), ours);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_lists_the_checks_in_a_status_node_checks_included() {
    let consul = ConsulDouble::start().await;
    consul.register_node("n2", "10.0.0.2");
    consul.register(Instance::new("shop", "a", "10.2.1.1", 80));
    consul.register(Instance::new("shop", "b", "10.2.1.2", 80).status(Status::Warning));
    consul.register(
        Instance::new("blog", "c", "10.2.1.3", 80)
            .node("n2")
            .status(Status::Critical),
    );
    consul.register(Instance::new("blog", "d", "10.2.1.4", 80).without_check());
    consul.set_node_check("n2", Status::Critical);

    let cases: [(&str, &[&str]); 8] = [
        (
            "any",
            &[
                "n2/serfHealth",
                "n2/service:c",
                "node1/serfHealth",
                "node1/service:a",
                "node1/service:b",
            ],
        ),
        ("passing", &["node1/serfHealth", "node1/service:a"]),
        ("warning", &["node1/service:b"]),
        ("critical", &["n2/serfHealth", "n2/service:c"]),
        // Consul's status index ignores case; `any` is a word of its own.
        ("CRITICAL", &["n2/serfHealth", "n2/service:c"]),
        ("ANY", &[]),
        ("maintenance", &[]),
        // A state no check has is an empty answer, not an error.
        ("bogus", &[]),
    ];
    for (state, expected) in cases {
        let answer = get(&consul, &format!("{HEALTH_STATE}{state}")).await;
        assert_eq!(answer.status, 200, "{state}: {}", answer.body);
        assert!(answer.index() >= 1, "{state}");
        let found: Vec<String> = answer
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                format!(
                    "{}/{}",
                    c["Node"].as_str().unwrap(),
                    c["CheckID"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(found, expected, "{state}");
    }
}

/// `X-Consul-Index` of `/v1/catalog/services`, of shop's and blog's health, and of
/// `/v1/health/state/any`, in that order.
async fn endpoint_indexes(consul: &ConsulDouble) -> [u64; 4] {
    let mut indexes = [0; 4];
    let paths = [
        CATALOG_SERVICES,
        "/v1/health/service/shop",
        "/v1/health/service/blog",
        "/v1/health/state/any",
    ];
    for (index, path) in indexes.iter_mut().zip(paths) {
        *index = get(consul, path).await.index();
    }
    indexes
}

/// shop-1 on node n1.
fn shop_at(address: &str) -> Instance {
    Instance::new("shop", "shop-1", address, 8080).node("n1")
}

/// blog-1, without a check, on node1.
fn blog_at(address: &str) -> Instance {
    Instance::new("blog", "blog-1", address, 8080).without_check()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_moves_the_indexes_consul_moves() {
    let consul = ConsulDouble::start().await;
    consul.register_node("n1", "10.0.0.1");
    consul.register(shop_at("10.2.1.5"));
    consul.register(blog_at("10.2.1.6"));

    type Write = fn(&ConsulDouble);
    // Which moved: [catalog, shop's health, blog's health, state/any].
    let cases: [(&str, Write, [bool; 4]); 12] = [
        (
            "shop registered again as it is",
            |c| c.register(shop_at("10.2.1.5")),
            [false; 4],
        ),
        (
            "shop's check set to its status",
            |c| c.set_check("shop-1", Status::Passing),
            [false; 4],
        ),
        (
            "blog moved, it has no check",
            |c| c.register(blog_at("10.2.1.7")),
            [true, false, true, false],
        ),
        (
            "shop moved, its check unchanged",
            |c| c.register(shop_at("10.2.1.8")),
            [true, true, false, false],
        ),
        (
            "shop's check critical",
            |c| c.set_check("shop-1", Status::Critical),
            [false, true, false, true],
        ),
        (
            "shop's check output",
            |c| c.set_check_output("shop-1", "refused"),
            [false, true, false, true],
        ),
        // Its check carries the service's tags: it changes too.
        (
            "shop tagged",
            |c| {
                c.register(
                    shop_at("10.2.1.8")
                        .status(Status::Critical)
                        .output("refused")
                        .tag("v2"),
                )
            },
            [true, true, false, true],
        ),
        (
            "shop's node moved",
            |c| c.register_node("n1", "10.0.0.9"),
            [false, true, false, false],
        ),
        (
            "shop's node failing",
            |c| c.set_node_check("n1", Status::Critical),
            [false, true, false, true],
        ),
        (
            "blog gets a check",
            |c| c.register(Instance::new("blog", "blog-1", "10.2.1.7", 8080)),
            [false, false, true, true],
        ),
        (
            "blog deregistered",
            |c| c.deregister("blog-1"),
            [true, false, true, true],
        ),
        ("bump", |c| c.bump_index(), [true; 4]),
    ];
    for (what, write, expected) in cases {
        let before = endpoint_indexes(&consul).await;
        let raft = consul.index();
        write(&consul);
        assert_eq!(consul.index(), raft + 1, "{what}: one raft write");
        let after = endpoint_indexes(&consul).await;
        let mut moved = [false; 4];
        for (i, moved) in moved.iter_mut().enumerate() {
            assert!(
                after[i] >= before[i],
                "{what}: backwards {before:?} -> {after:?}"
            );
            // What moves, moves to the write's index.
            *moved = after[i] > before[i];
            if *moved {
                assert_eq!(after[i], raft + 1, "{what}: {before:?} -> {after:?}");
            }
        }
        assert_eq!(moved, expected, "{what}: {before:?} -> {after:?}");
    }
}

/// The one entry of a health answer, and its check by CheckID.
async fn health_entry(consul: &ConsulDouble, service: &str) -> Value {
    let answer = get(consul, &format!("{HEALTH_SERVICE}{service}")).await;
    answer.json()[0].clone()
}

fn check_of<'a>(entry: &'a Value, check_id: &str) -> &'a Value {
    entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .unwrap()
}

fn raft_indexes(object: &Value) -> (u64, u64) {
    let index = |key: &str| object[key].as_u64().unwrap();
    (index("CreateIndex"), index("ModifyIndex"))
}

/// (CreateIndex, ModifyIndex) of shop's node, of shop-1, of its check and of the node's
/// serfHealth, from shop's health answer.
async fn shop_indexes(consul: &ConsulDouble) -> [(u64, u64); 4] {
    let entry = health_entry(consul, "shop").await;
    [
        raft_indexes(&entry["Node"]),
        raft_indexes(&entry["Service"]),
        raft_indexes(check_of(&entry, "service:shop-1")),
        raft_indexes(check_of(&entry, "serfHealth")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_keep_their_create_index_and_move_their_modify_index_on_their_own_changes() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    let first = consul.index();
    // Node, service, service check, serfHealth.
    assert_eq!(shop_indexes(&consul).await, [(first, first); 4]);

    consul.register(Instance::new("shop", "shop-1", "10.2.1.6", 8080));
    let moved = consul.index();
    let expected = [
        (first, first),
        (first, moved),
        (first, first),
        (first, first),
    ];
    assert_eq!(shop_indexes(&consul).await, expected);

    consul.set_check("shop-1", Status::Critical);
    let failed = consul.index();
    consul.register_node(consul::DEFAULT_NODE, "10.0.0.9");
    let node_moved = consul.index();
    let expected = [
        (first, node_moved),
        (first, moved),
        (first, failed),
        (first, first),
    ];
    assert_eq!(shop_indexes(&consul).await, expected);

    // /v1/health/state/critical shows the same check, indexes and all.
    let state = get(&consul, "/v1/health/state/critical").await.json();
    let entry = health_entry(&consul, "shop").await;
    assert_eq!(&state[0], check_of(&entry, "service:shop-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_any_wakes_on_a_check_change_not_on_a_move() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    consul.register(blog_at("10.2.1.6"));
    let state_index = get(&consul, "/v1/health/state/any").await.index();
    let catalog_index = get(&consul, CATALOG_SERVICES).await.index();
    let blog = "/v1/health/service/blog";
    let blog_index = get(&consul, blog).await.index();

    let consul = std::sync::Arc::new(consul);
    let spawn_get = |path: String| {
        let consul = consul.clone();
        tokio::spawn(async move { get(&consul, &path).await })
    };
    let wait = Duration::from_millis(500);
    let start = Instant::now();
    let state_query = spawn_get(format!(
        "/v1/health/state/any?index={state_index}&wait=500ms"
    ));
    // Consul's longest wait: an answer at all is an early one.
    let catalog_query = spawn_get(format!("{CATALOG_SERVICES}?index={catalog_index}&wait=10m"));
    let blog_query = spawn_get(format!("{blog}?index={blog_index}&wait=10m"));
    consul
        .wait_for_blocked_queries("/v1/health/state/any", 1)
        .await;
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;
    consul.wait_for_blocked_queries(blog, 1).await;
    consul.register(blog_at("10.2.1.7"));

    let catalog = catalog_query.await.unwrap();
    assert!(catalog.index() > catalog_index);
    let blog_answer = blog_query.await.unwrap();
    assert!(blog_answer.index() > blog_index);
    assert_eq!(blog_answer.json()[0]["Service"]["Address"], "10.2.1.7");
    // The checks did not change: state/any ran to its wait, with the same index.
    let state = state_query.await.unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed >= wait, "state/any returned after {elapsed:?}");
    assert_eq!(state.index(), state_index);

    let state_query = spawn_get(format!("/v1/health/state/any?index={state_index}&wait=10m"));
    consul
        .wait_for_blocked_queries("/v1/health/state/any", 1)
        .await;
    consul.set_check("shop-1", Status::Critical);
    let state = tokio::time::timeout(request_timeout(), state_query)
        .await
        .unwrap()
        .unwrap();
    assert!(state.index() > state_index);
    let shop = &state.json().as_array().unwrap().clone();
    let shop = shop.iter().find(|c| c["ServiceID"] == "shop-1").unwrap();
    assert_eq!(shop["Status"], "critical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_all_loads_ten_thousand_services_in_one_write() {
    const SERVICES: usize = 10_000;
    let consul = ConsulDouble::start().await;
    let before = consul.index();
    let start = Instant::now();
    consul.register_all((0..SERVICES).map(|i| {
        let octets = [10, 3, (i / 250) as u8, (i % 250) as u8 + 1];
        let address = Ipv4Addr::from(octets).to_string();
        Instance::new(&format!("svc{i}"), &format!("svc{i}-1"), &address, 8080)
    }));
    eprintln!("{SERVICES} instances registered in {:?}", start.elapsed());
    let write = consul.index();
    assert_eq!(write, before + 1, "one write");

    let catalog = get(&consul, CATALOG_SERVICES).await;
    assert_eq!(catalog.index(), write);
    assert_eq!(catalog.json().as_object().unwrap().len(), SERVICES + 1);
    let state = get(&consul, "/v1/health/state/any").await;
    assert_eq!(state.index(), write);
    // One service check each, and node1's serfHealth.
    assert_eq!(state.json().as_array().unwrap().len(), SERVICES + 1);
    let health = get(&consul, "/v1/health/service/svc9999").await;
    assert_eq!(health.index(), write);
    assert_eq!(raft_indexes(&health.json()[0]["Service"]), (write, write));
}

// limits.http_max_conns_per_client

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LOOPBACK_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to the double from `source` (any 127/8 address works on loopback),
/// sending nothing.
async fn connect_from(consul: &ConsulDouble, source: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(consul.addr).await.unwrap()
}

/// Everything the double sends on `stream` until it closes it; fails if it does not.
async fn read_until_closed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    tokio::time::timeout(request_timeout(), stream.read_to_end(&mut bytes))
        .await
        .expect("the double did not close the connection")?;
    Ok(bytes)
}

/// Consul's answer past the limit, built from its parts as go-connlimit's connlimit.go does.
fn consuls_429() -> String {
    let message =
        "Your IP is issuing too many concurrent connections, please rate limit your calls\n";
    format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{message}",
        message.len()
    )
}

/// Connects from `source` expecting the 429 and the close, before sending anything.
async fn assert_refused(consul: &ConsulDouble, source: IpAddr) {
    let mut stream = connect_from(consul, source).await;
    let bytes = read_until_closed(&mut stream).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes), consuls_429());
}

/// Waits until `source` holds `count` open connections to the double.
async fn wait_for_open(consul: &ConsulDouble, source: IpAddr, count: usize) {
    let what = format!("{count} connections open from {source}");
    support::eventually(Duration::from_secs(10), &what, || async {
        match consul.connections().open_from(source) {
            open if open == count => Ok(()),
            open => Err(open),
        }
    })
    .await
}

/// A GET written on a raw connection; the status line of the answer.
async fn get_on(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: consul\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(request_timeout(), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).to_string();
    answer.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_limit_a_connection_gets_consuls_429_and_is_closed() {
    let consul = ConsulDouble::builder()
        .max_conns_per_client(2)
        .start()
        .await;
    let _first = connect_from(&consul, LOOPBACK).await;
    let _second = connect_from(&consul, LOOPBACK).await;
    wait_for_open(&consul, LOOPBACK, 2).await;

    // Before any request is read, as Consul's ConnState hook does: the exact bytes, then EOF.
    assert_refused(&consul, LOOPBACK).await;
    assert_eq!(consuls_429().as_bytes(), consul::TOO_MANY_CONNECTIONS);
    let connections = consul.connections();
    assert_eq!(connections.refused_from(LOOPBACK), 1);
    assert_eq!(connections.open_from(LOOPBACK), 2);
    assert_eq!(connections.accepted, 2);

    // A client that sends its request at once reads the 429, or a reset when the close finds
    // its request unread: as with a real Consul.
    let mut eager = connect_from(&consul, LOOPBACK).await;
    eager
        .write_all(b"GET /v1/catalog/services HTTP/1.1\r\nHost: consul\r\n\r\n")
        .await
        .unwrap();
    match read_until_closed(&mut eager).await {
        Ok(bytes) => assert_eq!(String::from_utf8_lossy(&bytes), consuls_429()),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    // Refused connections never reach the HTTP server.
    assert_eq!(consul.requests().total, 0);
    assert_eq!(consul.connections().refused_total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_ip_has_its_own_budget() {
    let consul = ConsulDouble::builder()
        .max_conns_per_client(1)
        .start()
        .await;
    let _first = connect_from(&consul, LOOPBACK).await;
    wait_for_open(&consul, LOOPBACK, 1).await;
    assert_refused(&consul, LOOPBACK).await;

    let mut other = connect_from(&consul, LOOPBACK_2).await;
    wait_for_open(&consul, LOOPBACK_2, 1).await;
    assert_eq!(
        get_on(&mut other, CATALOG_SERVICES).await,
        "HTTP/1.1 200 OK"
    );
    assert_refused(&consul, LOOPBACK_2).await;

    let connections = consul.connections();
    assert_eq!(connections.open_total(), 2);
    assert_eq!(connections.peak_total, 2);
    assert_eq!(
        (
            connections.refused_from(LOOPBACK),
            connections.refused_from(LOOPBACK_2)
        ),
        (1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_counts_from_accept_to_close_blocked_and_idle_time_included() {
    let consul = std::sync::Arc::new(
        ConsulDouble::builder()
            .max_conns_per_client(1)
            .start()
            .await,
    );
    let index = get(&consul, CATALOG_SERVICES).await.index();
    wait_for_open(&consul, LOOPBACK, 0).await;

    // A blocking query holds its connection for its whole wait.
    let client = reqwest::Client::builder()
        .timeout(request_timeout())
        .build()
        .unwrap();
    let query = tokio::spawn({
        let (client, url) = (client.clone(), consul.url());
        async move {
            let url = format!("{url}{CATALOG_SERVICES}?index={index}&wait=10m");
            client.get(url).send().await.unwrap().status()
        }
    });
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;
    assert_eq!(consul.connections().open_from(LOOPBACK), 1);
    assert_refused(&consul, LOOPBACK).await;

    // Answered, the connection idles in the client's pool: still open, still counted.
    consul.bump_index();
    assert_eq!(query.await.unwrap(), 200);
    assert_refused(&consul, LOOPBACK).await;
    assert_eq!(consul.connections().open_from(LOOPBACK), 1);

    // Closed, it frees its place.
    drop(client);
    wait_for_open(&consul, LOOPBACK, 0).await;
    let mut next = connect_from(&consul, LOOPBACK).await;
    assert_eq!(get_on(&mut next, CATALOG_SERVICES).await, "HTTP/1.1 200 OK");
    let connections = consul.connections();
    assert_eq!(connections.peak_from(LOOPBACK), 1);
    assert_eq!(connections.refused_from(LOOPBACK), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limit_is_200_zero_is_none_and_a_lower_limit_closes_nothing() {
    let consul = ConsulDouble::start().await;
    let mut held = Vec::new();
    for _ in 0..consul::DEFAULT_MAX_CONNS_PER_CLIENT {
        held.push(connect_from(&consul, LOOPBACK).await);
    }
    wait_for_open(&consul, LOOPBACK, 200).await;
    assert_refused(&consul, LOOPBACK).await;

    consul.set_max_conns_per_client(0);
    held.push(connect_from(&consul, LOOPBACK).await);
    wait_for_open(&consul, LOOPBACK, 201).await;

    // A reload to a lower limit: the open connections stay, and still answer.
    consul.set_max_conns_per_client(1);
    assert_refused(&consul, LOOPBACK).await;
    assert_eq!(
        get_on(&mut held[0], CATALOG_SERVICES).await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(consul.connections().open_from(LOOPBACK), 201);
    assert_eq!(consul.connections().peak_total, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_body_bytes_are_counted_per_endpoint() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    let paths = [
        (CATALOG_SERVICES, CATALOG_SERVICES),
        ("/v1/health/service/shop?passing", HEALTH_SERVICE),
        ("/v1/health/service/", HEALTH_SERVICE),
        ("/v1/health/state/any", HEALTH_STATE),
        ("/v1/agent/self", consul::OTHER_PATHS),
    ];
    let mut expected: std::collections::BTreeMap<&str, consul::Traffic> = Default::default();
    for (path, endpoint) in paths {
        let answer = get(&consul, path).await;
        let traffic = expected.entry(endpoint).or_default();
        traffic.requests += 1;
        traffic.body_bytes += answer.body.len() as u64;
    }
    let requests = consul.requests();
    assert_eq!(requests.by_endpoint, expected);
    assert_eq!(
        requests.body_bytes,
        expected.values().map(|t| t.body_bytes).sum::<u64>()
    );
    assert!(requests.endpoint(HEALTH_STATE).body_bytes > 200);
    assert_eq!(requests.total, 5);
}

// The KV store.

/// A request with any method and body, on a fresh client.
async fn send(
    consul: &ConsulDouble,
    method: reqwest::Method,
    path_and_query: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> Answer {
    let client = reqwest::Client::builder()
        .timeout(request_timeout())
        .build()
        .unwrap();
    let url = format!("{}{path_and_query}", consul.url());
    let mut request = client.request(method.clone(), &url).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

async fn put(consul: &ConsulDouble, path_and_query: &str, body: &str) -> Answer {
    let path = format!("{KV}{path_and_query}");
    send(consul, reqwest::Method::PUT, &path, body.to_string(), &[]).await
}

async fn delete(consul: &ConsulDouble, path_and_query: &str) -> Answer {
    let path = format!("{KV}{path_and_query}");
    send(consul, reqwest::Method::DELETE, &path, "", &[]).await
}

/// A write's answer: 200 and a JSON boolean, without the read headers.
fn outcome(answer: &Answer) -> bool {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.content_type(), "application/json");
    assert!(answer.headers.get("x-consul-index").is_none());
    answer.json().as_bool().unwrap()
}

fn kv_keys_of(answer: &Answer) -> Vec<String> {
    let entries = answer.json();
    let entries = entries.as_array().unwrap();
    entries
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_put_get_and_delete_as_the_docs_describe() {
    let consul = ConsulDouble::start().await;
    assert!(outcome(&put(&consul, "weft/claims/shop", "edge-1").await));
    let written = consul.index();
    let answer = get(&consul, &format!("{KV}weft/claims/shop")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type(), "application/json");
    // Consul's field order, `Value` in base64, no `Session` on an unlocked key.
    assert_eq!(
        answer.body,
        format!(
            r#"[{{"LockIndex":0,"Key":"weft/claims/shop","Flags":0,"Value":"ZWRnZS0x","CreateIndex":{written},"ModifyIndex":{written}}}]"#
        )
    );
    assert_eq!(answer.index(), written);
    assert_eq!(answer.header("x-consul-knownleader"), "true");
    assert_eq!(answer.header("x-consul-lastcontact"), "0");
    assert_eq!(consul.kv_get("weft/claims/shop"), Some(b"edge-1".to_vec()));

    let raw = get(&consul, &format!("{KV}weft/claims/shop?raw")).await;
    assert_eq!((raw.status, raw.body.as_str()), (200, "edge-1"));
    assert_eq!(raw.content_type(), "text/plain");
    assert_eq!(raw.header("x-content-type-options"), "nosniff");
    assert_eq!(raw.header("content-security-policy"), "sandbox");
    assert_eq!(raw.index(), written);

    // A new value: CreateIndex stays, ModifyIndex moves; the same value again moves nothing.
    assert!(outcome(
        &put(&consul, "weft/claims/shop?flags=42", "edge-2").await
    ));
    let rewritten = consul.index();
    assert!(outcome(
        &put(&consul, "weft/claims/shop?flags=42", "edge-2").await
    ));
    let entry = consul.kv_entry("weft/claims/shop").unwrap();
    assert_eq!(
        (entry.flags, entry.create_index, entry.modify_index),
        (42, written, rewritten)
    );
    let answer = get(&consul, &format!("{KV}weft/claims/shop")).await;
    assert_eq!(answer.index(), rewritten);
    assert_eq!(answer.json()[0]["Flags"], 42);

    // A key without a body has a null Value.
    assert!(outcome(&put(&consul, "weft/claims/", "").await));
    let folder = get(&consul, &format!("{KV}weft/claims/")).await;
    assert_eq!(folder.json()[0]["Value"], Value::Null);

    assert!(outcome(&delete(&consul, "weft/claims/shop").await));
    let deleted = consul.index();
    assert_eq!(consul.kv_get("weft/claims/shop"), None);
    let gone = get(&consul, &format!("{KV}weft/claims/shop")).await;
    assert_eq!((gone.status, gone.body.as_str()), (404, ""));
    assert_eq!(gone.index(), deleted);
    // Deleting what is not there is still `true`.
    assert!(outcome(&delete(&consul, "weft/claims/shop").await));

    // Every KV request counts under one endpoint, whatever its method.
    let kv = consul.requests().endpoint(KV);
    assert_eq!(kv.requests, 11);
    assert!(kv.body_bytes > 100);
    assert_eq!(consul.requests().endpoint(consul::OTHER_PATHS).requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cas_zero_lets_exactly_one_of_two_racing_creates_win() {
    let consul = std::sync::Arc::new(ConsulDouble::start().await);
    let claim = |edge: &'static str| {
        let consul = consul.clone();
        tokio::spawn(async move { put(&consul, "weft/claims/shop?cas=0", edge).await })
    };
    let (first, second) = (claim("edge-1"), claim("edge-2"));
    let first = outcome(&first.await.unwrap());
    let second = outcome(&second.await.unwrap());
    assert!(first ^ second, "exactly one create wins: {first} {second}");
    let winner = if first { "edge-1" } else { "edge-2" };
    assert_eq!(
        consul.kv_get("weft/claims/shop"),
        Some(winner.as_bytes().to_vec())
    );
    // A losing create is still a raft entry that changes nothing.
    let entry = consul.kv_entry("weft/claims/shop").unwrap();
    let before = consul.index();
    assert!(!outcome(
        &put(&consul, "weft/claims/shop?cas=0", "late").await
    ));
    assert_eq!(consul.index(), before + 1);
    assert_eq!(consul.kv_entry("weft/claims/shop").unwrap(), entry);

    // cas=N: only at ModifyIndex N; a missing key never matches.
    let current = entry.modify_index;
    let stale = put(
        &consul,
        &format!("weft/claims/shop?cas={}", current - 1),
        "x",
    )
    .await;
    assert!(!outcome(&stale));
    assert!(!outcome(&put(&consul, "weft/claims/blog?cas=5", "x").await));
    assert_eq!(consul.kv_get("weft/claims/blog"), None);
    let now = put(
        &consul,
        &format!("weft/claims/shop?cas={current}"),
        "edge-3",
    )
    .await;
    assert!(outcome(&now));
    assert_eq!(consul.kv_get("weft/claims/shop"), Some(b"edge-3".to_vec()));

    // DELETE ?cas: a stale index keeps the key; the current one deletes it; a missing key is
    // `true` (`kvsDeleteCASTxn`).
    let current = consul.kv_entry("weft/claims/shop").unwrap().modify_index;
    let stale = delete(&consul, &format!("weft/claims/shop?cas={current}0")).await;
    assert!(!outcome(&stale));
    assert!(consul.kv_get("weft/claims/shop").is_some());
    let now = delete(&consul, &format!("weft/claims/shop?cas={current}")).await;
    assert!(outcome(&now));
    assert_eq!(consul.kv_get("weft/claims/shop"), None);
    assert!(outcome(&delete(&consul, "weft/claims/shop?cas=7").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_recurse_lists_a_prefix_and_keys_stop_at_the_separator() {
    let consul = ConsulDouble::start().await;
    let empty = get(&consul, &format!("{KV}?keys")).await;
    assert_eq!((empty.status, empty.body.as_str()), (200, "[]"));
    for key in [
        "claims/b",
        "claims/a",
        "claims/x/1",
        "claimsmore",
        "acme/account",
    ] {
        consul.kv_put(key, key);
    }
    let newest = consul.kv_entry("claims/x/1").unwrap().modify_index;
    let list = get(&consul, &format!("{KV}claims/?recurse")).await;
    assert_eq!(list.status, 200);
    assert_eq!(kv_keys_of(&list), ["claims/a", "claims/b", "claims/x/1"]);
    // The highest ModifyIndex under the prefix (claims/x/1, the last of the three written), not
    // the later writes beside it.
    assert!(newest < consul.index());
    assert_eq!(list.index(), newest);
    assert_eq!(list.json()[0]["Value"], "Y2xhaW1zL2E=");
    assert_eq!(
        consul.kv_keys("claims"),
        ["claims/a", "claims/b", "claims/x/1", "claimsmore"]
    );

    let keys = get(&consul, &format!("{KV}?keys&separator=/")).await;
    assert_eq!(
        keys.json(),
        serde_json::json!(["acme/", "claims/", "claimsmore"])
    );
    let keys = get(&consul, &format!("{KV}claims/?keys&separator=/")).await;
    assert_eq!(
        keys.json(),
        serde_json::json!(["claims/a", "claims/b", "claims/x/"])
    );
    assert_eq!(keys.index(), newest);
    let keys = get(&consul, &format!("{KV}claims/?keys")).await;
    assert_eq!(keys.json().as_array().unwrap().len(), 3);
    let none = get(&consul, &format!("{KV}nothing/?keys")).await;
    assert_eq!((none.status, none.body.as_str()), (404, ""));

    assert!(outcome(&delete(&consul, "claims/?recurse").await));
    assert_eq!(consul.kv_keys(""), ["acme/account", "claimsmore"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_404s_carry_the_kv_index_and_catalog_writes_do_not_move_it() {
    let consul = ConsulDouble::start().await;
    let missing = get(&consul, &format!("{KV}missing")).await;
    assert_eq!((missing.status, missing.body.as_str()), (404, ""));
    assert_eq!(missing.index(), 1);
    assert_eq!(missing.header("x-consul-knownleader"), "true");

    consul.kv_put("acme/account", "key");
    let kv_write = consul.index();
    // A missing key answers the KV table's index (`kvsMaxIndex`).
    assert_eq!(
        get(&consul, &format!("{KV}missing")).await.index(),
        kv_write
    );
    // A catalog write moves no KV index, a KV write no catalog index.
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    let catalog_write = consul.index();
    assert_eq!(
        get(&consul, &format!("{KV}missing")).await.index(),
        kv_write
    );
    assert_eq!(
        get(&consul, &format!("{KV}acme/account")).await.index(),
        kv_write
    );
    consul.kv_put("acme/order", "1");
    assert_eq!(get(&consul, CATALOG_SERVICES).await.index(), catalog_write);

    // A prefix whose last key went answers its tombstone's index, not the table's.
    consul.kv_put("claims/shop", "edge-1");
    consul.kv_delete("claims/shop");
    let deletion = consul.index();
    consul.kv_put("acme/order", "2");
    let list = get(&consul, &format!("{KV}claims/?recurse")).await;
    assert_eq!((list.status, list.index()), (404, deletion));
    // An empty prefix without entries or tombstones answers the table's index.
    let list = get(&consul, &format!("{KV}other/?recurse")).await;
    assert_eq!((list.status, list.index()), (404, consul.index()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_blocking_list_wakes_on_a_write_under_its_prefix_not_elsewhere() {
    let consul = std::sync::Arc::new(ConsulDouble::start().await);
    consul.kv_put("claims/shop", "edge-1");
    let path = format!("{KV}claims/");
    let index = get(&consul, &format!("{path}?recurse")).await.index();
    let query = tokio::spawn({
        let consul = consul.clone();
        let path = path.clone();
        async move { get(&consul, &format!("{path}?recurse&index={index}&wait=10m")).await }
    });
    consul.wait_for_blocked_queries(&path, 1).await;
    // Writes elsewhere, one right beside the prefix: the query stays blocked.
    consul.kv_put("acme/account", "key");
    consul.kv_put("claimsmore", "x");
    consul.kv_delete("acme/account");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!query.is_finished());
    assert_eq!(consul.blocked_queries(&path), 1);

    consul.kv_put("claims/blog", "edge-2");
    let answer = query.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.index(), consul.index());
    assert_eq!(kv_keys_of(&answer), ["claims/blog", "claims/shop"]);

    // A deletion under the prefix wakes it too, with the tombstone's index.
    let index = answer.index();
    let query = tokio::spawn({
        let consul = consul.clone();
        let path = path.clone();
        async move { get(&consul, &format!("{path}?recurse&index={index}&wait=10m")).await }
    });
    consul.wait_for_blocked_queries(&path, 1).await;
    consul.kv_delete("claims/shop");
    let answer = query.await.unwrap();
    assert_eq!(answer.index(), consul.index());
    assert_eq!(kv_keys_of(&answer), ["claims/blog"]);

    // A blocking query on one key returns after its wait when nothing changed it.
    let key = format!("{KV}claims/blog");
    let index = get(&consul, &key).await.index();
    let start = Instant::now();
    let again = get(&consul, &format!("{key}?index={index}&wait=200ms")).await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(again.index(), index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_values_past_512_kib_are_a_413() {
    let consul = ConsulDouble::start().await;
    let largest = "v".repeat(consul::KV_MAX_VALUE_SIZE);
    assert!(outcome(&put(&consul, "acme/cert", &largest).await));
    let too_large = format!("{largest}v");
    let answer = put(&consul, "acme/cert", &too_large).await;
    assert_eq!(answer.status, 413);
    assert_eq!(
        answer.body,
        "Request body(524289 bytes) too large, max size: 524288 bytes. See \
         https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
    );
    assert_eq!(consul.kv_get("acme/cert").unwrap().len(), largest.len());

    // A chunked body (no Content-Length) is held to the same bound.
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(too_large.into_bytes())]);
    let path = format!("{KV}acme/chunked");
    let body = reqwest::Body::wrap_stream(chunks);
    let answer = send(&consul, reqwest::Method::PUT, &path, body, &[]).await;
    assert_eq!(answer.status, 413);
    assert_eq!(consul.kv_get("acme/chunked"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_tokens_are_checked_for_reads_and_writes() {
    let consul = ConsulDouble::start().await;
    consul.kv_put("claims/shop", "edge-1");
    consul.set_token(Some("s3cret".to_string()));
    let index = consul.index();

    // The anonymous token: no key, no write, lists filtered to nothing.
    let key = get(&consul, &format!("{KV}claims/shop")).await;
    assert_eq!((key.status, key.body.as_str()), (403, "Permission denied"));
    let write = put(&consul, "claims/shop", "edge-2").await;
    assert_eq!(
        (write.status, write.body.as_str()),
        (403, "Permission denied")
    );
    let removal = delete(&consul, "claims/shop").await;
    assert_eq!(
        (removal.status, removal.body.as_str()),
        (403, "Permission denied")
    );
    let list = get(&consul, &format!("{KV}claims/?recurse")).await;
    assert_eq!((list.status, list.index()), (404, index));
    assert_eq!(list.header("X-Consul-Results-Filtered-By-ACLs"), "true");
    let keys = get(&consul, &format!("{KV}?keys")).await;
    assert_eq!((keys.status, keys.body.as_str()), (200, "[]"));
    // Nothing to filter: no header.
    let nothing = get(&consul, &format!("{KV}other/?recurse")).await;
    assert_eq!(nothing.status, 404);
    assert!(nothing
        .headers
        .get("X-Consul-Results-Filtered-By-ACLs")
        .is_none());

    // A token Consul does not know.
    let wrong = [("X-Consul-Token", "wrong")];
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let path = format!("{KV}claims/shop");
        let answer = send(&consul, method.clone(), &path, "edge-3", &wrong).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (403, "ACL not found"),
            "{method}"
        );
    }
    assert_eq!(consul.kv_get("claims/shop"), Some(b"edge-1".to_vec()));

    // The right one, wherever it is.
    let path = format!("{KV}claims/shop?token=s3cret");
    let write = send(&consul, reqwest::Method::PUT, &path, "edge-4", &[]).await;
    assert!(outcome(&write));
    let right = [("Authorization", "Bearer s3cret")];
    let read = get_with(&consul, &format!("{KV}claims/shop?raw"), &right).await;
    assert_eq!((read.status, read.body.as_str()), (200, "edge-4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_bad_requests_answer_as_consul_does() {
    let consul = ConsulDouble::start().await;
    let cases = [
        (reqwest::Method::GET, "", 400, "Missing key name"),
        (reqwest::Method::PUT, "", 400, "Missing key name"),
        (reqwest::Method::DELETE, "", 400, "Missing key name"),
        (
            reqwest::Method::PUT,
            "k?cas=x",
            500,
            "strconv.ParseUint: parsing \"x\": invalid syntax",
        ),
        (
            reqwest::Method::PUT,
            "k?flags=-1",
            500,
            "strconv.ParseUint: parsing \"-1\": invalid syntax",
        ),
        (
            reqwest::Method::PUT,
            "k?cas=1&acquire=a b",
            400,
            "Conflicting flags: acquire=a+b&cas=1\n",
        ),
        (
            reqwest::Method::DELETE,
            "k?recurse&cas=1",
            400,
            "Conflicting flags: cas=1&recurse=\n",
        ),
        (
            reqwest::Method::GET,
            "k?wait=soon",
            400,
            "Invalid wait time",
        ),
        (reqwest::Method::POST, "k", 405, "method POST not allowed"),
    ];
    for (method, path, status, body) in cases {
        let answer = send(&consul, method.clone(), &format!("{KV}{path}"), "", &[]).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (status, body),
            "{method} {path}"
        );
    }
    assert!(consul.kv_keys("").is_empty());
    // Writes go to the leader: ?stale does not get a write past a lost leader.
    consul.set_fault(Fault::NoLeader);
    let answer = put(&consul, "k?stale", "v").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (500, "No cluster leader")
    );
}

// Sessions and KV locks.

/// `PUT /v1/session/<path>` with `body` (`""`: an empty body, `Content-Length: 0`).
async fn session_put(consul: &ConsulDouble, path: &str, body: &str) -> Answer {
    let path = format!("{SESSION}{path}");
    send(consul, reqwest::Method::PUT, &path, body.to_string(), &[]).await
}

/// Creates a session through the API; its ID.
async fn create_session(consul: &ConsulDouble, body: &str) -> String {
    let answer = session_put(consul, "create", body).await;
    assert_eq!(answer.status, 200, "{body}: {}", answer.body);
    assert_eq!(answer.content_type(), "application/json");
    assert!(answer.headers.get("x-consul-index").is_none());
    let id = answer.json()["ID"].as_str().unwrap().to_string();
    // hashicorp/go-uuid's form: 8-4-4-4-12 lower-case hex.
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
    assert!(id
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    id
}

async fn acquire(consul: &ConsulDouble, key: &str, session: &str, value: &str) -> bool {
    outcome(&put(consul, &format!("{key}?acquire={session}"), value).await)
}

async fn release(consul: &ConsulDouble, key: &str, session: &str, value: &str) -> bool {
    outcome(&put(consul, &format!("{key}?release={session}"), value).await)
}

/// The key's entry as the API answers it.
async fn kv_json(consul: &ConsulDouble, key: &str) -> Value {
    let answer = get(consul, &format!("{KV}{key}")).await;
    assert_eq!(answer.status, 200, "{key}: {}", answer.body);
    answer.json()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_created_read_renewed_and_destroyed_as_the_docs_describe() {
    let consul = ConsulDouble::start().await;
    let before = consul.index();
    let id = create_session(&consul, "").await;
    let created = consul.index();
    assert_eq!(created, before + 1, "one raft write");

    // The docs sample's keys, in Consul's order, with `SessionCreate`'s defaults: the agent's
    // node, its serfHealth, 15 s of lock delay, release, no TTL; no `Checks` (only the default
    // serfHealth, emptied by `fixupEmptySessionChecks`).
    let info = get(&consul, &format!("{SESSION}info/{id}")).await;
    assert_eq!(info.status, 200);
    assert_eq!(info.content_type(), "application/json");
    assert_eq!(
        info.body,
        format!(
            r#"[{{"ID":"{id}","Name":"","Node":"node1","LockDelay":15000000000,"Behavior":"release","TTL":"","NodeChecks":["serfHealth"],"ServiceChecks":null,"CreateIndex":{created},"ModifyIndex":{created}}}]"#
        )
    );
    assert_eq!(info.index(), created);
    assert_eq!(info.header("x-consul-knownleader"), "true");
    let session = consul.session(&id).unwrap();
    assert_eq!(
        (session.node.as_str(), session.behavior, session.lock_delay),
        ("node1", Behavior::Release, 15_000_000_000)
    );
    // The agent's node joined the catalog with the session, as a real agent's always is.
    let node_checks = get(&consul, &format!("{HEALTH_STATE}any")).await;
    assert_eq!(node_checks.json()[0]["Node"], "node1");
    assert_eq!(node_checks.json()[0]["CheckID"], "serfHealth");

    // A body: names, a TTL, a lock delay as a duration or as a number of seconds (below 1000
    // nanoseconds), keys matched without case, unknown keys ignored.
    let named = create_session(
        &consul,
        r#"{"Name":"weft-leader","TTL":"10s","LockDelay":"5s","Behavior":"delete","Unknown":1}"#,
    )
    .await;
    let seconds = create_session(&consul, r#"{"lockdelay":7,"name":"short"}"#).await;
    let named_json = get(&consul, &format!("{SESSION}info/{named}")).await.json();
    assert_eq!(named_json[0]["Name"], "weft-leader");
    assert_eq!(named_json[0]["TTL"], "10s");
    assert_eq!(named_json[0]["LockDelay"], 5_000_000_000u64);
    assert_eq!(named_json[0]["Behavior"], "delete");
    assert_eq!(consul.session(&seconds).unwrap().lock_delay, 7_000_000_000);
    assert_eq!(consul.session(&seconds).unwrap().name, "short");
    // No checks at all: an empty `Checks` empties `NodeChecks`.
    let unchecked = create_session(&consul, r#"{"Checks":[]}"#).await;
    assert_eq!(
        consul.session(&unchecked).unwrap().node_checks,
        Some(Vec::new())
    );

    // The list and the node's sessions, in ID order; another node has none.
    let mut ids = vec![
        id.clone(),
        named.clone(),
        seconds.clone(),
        unchecked.clone(),
    ];
    ids.sort();
    let list = get(&consul, &format!("{SESSION}list")).await;
    let listed: Vec<String> = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(list.index(), consul.index());
    let on_node = get(&consul, &format!("{SESSION}node/node1")).await;
    assert_eq!(on_node.json().as_array().unwrap().len(), 4);
    let elsewhere = get(&consul, &format!("{SESSION}node/node2")).await;
    assert_eq!((elsewhere.status, elsewhere.body.as_str()), (200, "[]"));
    assert_eq!(consul.sessions().len(), 4);

    // Renewing: the session in a list, no raft write, no query meta.
    let index = consul.index();
    let renewed = session_put(&consul, &format!("renew/{named}"), "").await;
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    assert_eq!(renewed.json(), named_json);
    assert!(renewed.headers.get("x-consul-index").is_none());
    assert_eq!(consul.index(), index);
    let unknown = session_put(&consul, "renew/no-such-session", "").await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, "Session id 'no-such-session' not found")
    );

    // Destroying: `true`, one raft write; then it is gone (`[]`), and destroying it again, or
    // any unknown session, is `true` without a write.
    assert!(outcome(
        &session_put(&consul, &format!("destroy/{id}"), "").await
    ));
    let destroyed = consul.index();
    assert_eq!(destroyed, index + 1);
    assert!(!consul.session_exists(&id));
    let gone = get(&consul, &format!("{SESSION}info/{id}")).await;
    assert_eq!((gone.status, gone.body.as_str()), (200, "[]"));
    assert_eq!(gone.index(), destroyed);
    assert!(outcome(
        &session_put(&consul, &format!("destroy/{id}"), "").await
    ));
    assert_eq!(consul.index(), destroyed);

    // Missing names, a node that is not registered, other methods.
    let cases = [
        (reqwest::Method::PUT, "destroy/", 400, "Missing session"),
        (reqwest::Method::PUT, "renew/", 400, "Missing session"),
        (reqwest::Method::GET, "info/", 400, "Missing session"),
        (reqwest::Method::GET, "node/", 400, "Missing node name"),
        (
            reqwest::Method::GET,
            "create",
            405,
            "method GET not allowed",
        ),
        (reqwest::Method::PUT, "list", 405, "method PUT not allowed"),
    ];
    for (method, path, status, body) in cases {
        let answer = send(
            &consul,
            method.clone(),
            &format!("{SESSION}{path}"),
            "",
            &[],
        )
        .await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (status, body),
            "{method} {path}"
        );
    }
    let not_allowed = send(
        &consul,
        reqwest::Method::GET,
        &format!("{SESSION}create"),
        "",
        &[],
    )
    .await;
    assert_eq!(not_allowed.header("allow"), "OPTIONS,PUT");
    let elsewhere = session_put(&consul, "create", r#"{"Node":"node2"}"#).await;
    assert_eq!(
        (elsewhere.status, elsewhere.body.as_str()),
        (500, "apply failed: Missing node registration")
    );
    let sessions = consul.requests().endpoint(SESSION);
    assert!(sessions.requests >= 20, "{sessions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_errors_answer_as_consul_does() {
    let consul = ConsulDouble::start().await;
    let index = consul.index();
    // `Session.Apply`'s errors are plain RPC errors: Consul's HTTP layer answers them with a
    // 500 and their text. A body that does not decode is `SessionCreate`'s own 400.
    let cases = [
        (
            r#"{"TTL":"5s"}"#,
            500,
            "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]",
        ),
        (
            r#"{"TTL":"86401s"}"#,
            500,
            "Invalid Session TTL '86401000000000', must be between [10s=24h0m0s]",
        ),
        (
            r#"{"TTL":"soon"}"#,
            500,
            r#"Session TTL 'soon' invalid: time: invalid duration "soon""#,
        ),
        (
            r#"{"TTL":"10"}"#,
            500,
            r#"Session TTL '10' invalid: time: missing unit in duration "10""#,
        ),
        (
            r#"{"TTL":"1d"}"#,
            500,
            r#"Session TTL '1d' invalid: time: unknown unit "d" in duration "1d""#,
        ),
        (
            r#"{"Behavior":"keep"}"#,
            500,
            "Invalid Behavior setting 'keep'",
        ),
        (r#"{"Node":""}"#, 500, "Must provide Node"),
        (
            r#"{"LockDelay":"15"}"#,
            400,
            r#"Request decode failed: time: missing unit in duration "15""#,
        ),
        (
            r#"{"NodeChecks":["no-such-check"]}"#,
            500,
            "apply failed: Missing check 'no-such-check' registration",
        ),
    ];
    for (body, status, text) in cases {
        let answer = session_put(&consul, "create", body).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (status, text),
            "{body}"
        );
    }
    let broken = session_put(&consul, "create", "{").await;
    assert_eq!(broken.status, 400);
    assert!(
        broken.body.starts_with("Request decode failed: "),
        "{}",
        broken.body
    );
    // Only the one that reached raft (the missing check) moved the index, and it made no
    // session.
    assert!(consul.sessions().is_empty());
    assert_eq!(consul.index(), index + 1);

    // The bounds: 10 s and 24 h are taken, 0 is no TTL.
    for ttl in ["10s", "24h", "0s"] {
        let id = create_session(&consul, &format!(r#"{{"TTL":"{ttl}"}}"#)).await;
        assert_eq!(consul.session(&id).unwrap().ttl, ttl);
    }

    // A critical serfHealth: no session on that node.
    consul.set_node_check("node1", Status::Critical);
    let critical = session_put(&consul, "create", "").await;
    assert_eq!(
        (critical.status, critical.body.as_str()),
        (500, "apply failed: Check 'serfHealth' is in critical state")
    );

    // `session_ttl_min` moves the lower bound, and its text.
    let quick = ConsulDouble::builder()
        .session_ttl_min(Duration::from_millis(100))
        .start()
        .await;
    let answer = session_put(&quick, "create", r#"{"TTL":"50ms"}"#).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (
            500,
            "Invalid Session TTL '50000000', must be between [100ms=24h0m0s]"
        )
    );

    // ACLs: the anonymous token may not create or destroy, and reads no session.
    let id = create_session(&quick, "").await;
    quick.set_token(Some("s3cret".to_string()));
    let anonymous = session_put(&quick, "create", "").await;
    assert_eq!(
        (anonymous.status, anonymous.body.as_str()),
        (403, "Permission denied")
    );
    let anonymous = session_put(&quick, &format!("destroy/{id}"), "").await;
    assert_eq!(
        (anonymous.status, anonymous.body.as_str()),
        (403, "Permission denied")
    );
    let list = get(&quick, &format!("{SESSION}list")).await;
    assert_eq!((list.status, list.body.as_str()), (200, "[]"));
    assert_eq!(list.header("X-Consul-Results-Filtered-By-ACLs"), "true");
    let path = format!("{SESSION}destroy/{id}?token=s3cret");
    assert!(outcome(
        &send(&quick, reqwest::Method::PUT, &path, "", &[]).await
    ));
    assert!(!quick.session_exists(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_held_by_one_session_until_it_releases_it() {
    let consul = ConsulDouble::start().await;
    let edge1 = create_session(&consul, r#"{"Name":"edge-1"}"#).await;
    let edge2 = create_session(&consul, r#"{"Name":"edge-2"}"#).await;

    // A fresh acquisition of a new key: LockIndex 1, the Session, the value.
    assert!(acquire(&consul, "weft/leader", &edge1, "edge-1").await);
    let locked = consul.index();
    let entry = kv_json(&consul, "weft/leader").await;
    assert_eq!(entry["Session"], edge1.as_str());
    assert_eq!(entry["LockIndex"], 1);
    assert_eq!(entry["Value"], "ZWRnZS0x");
    assert_eq!(
        (entry["CreateIndex"].as_u64(), entry["ModifyIndex"].as_u64()),
        (Some(locked), Some(locked))
    );
    assert_eq!(consul.kv_lock_holder("weft/leader"), Some(edge1.clone()));

    // Another session is refused: a raft entry that changes nothing.
    let held = consul.kv_entry("weft/leader").unwrap();
    assert!(!acquire(&consul, "weft/leader", &edge2, "edge-2").await);
    assert_eq!(consul.index(), locked + 1);
    assert_eq!(consul.kv_entry("weft/leader").unwrap(), held);

    // The holder acquires again: the value changes, the LockIndex does not.
    assert!(acquire(&consul, "weft/leader", &edge1, "edge-1 again").await);
    let entry = consul.kv_entry("weft/leader").unwrap();
    assert_eq!(
        (entry.lock_index, entry.value.as_slice()),
        (1, b"edge-1 again".as_slice())
    );

    // Only the holder releases; the Session goes (and leaves the JSON), the LockIndex stays,
    // the release's body is the value.
    assert!(!release(&consul, "weft/leader", &edge2, "").await);
    assert!(release(&consul, "weft/leader", &edge1, "edge-1").await);
    let entry = kv_json(&consul, "weft/leader").await;
    assert!(entry.get("Session").is_none(), "{entry}");
    assert_eq!(entry["LockIndex"], 1);
    assert_eq!(entry["Value"], "ZWRnZS0x");
    assert_eq!(consul.kv_lock_holder("weft/leader"), None);
    assert!(!release(&consul, "weft/leader", &edge1, "").await);
    assert!(!release(&consul, "weft/missing", &edge1, "").await);

    // Then the other one gets it: a fresh acquisition.
    assert!(acquire(&consul, "weft/leader", &edge2, "edge-2").await);
    assert_eq!(consul.kv_entry("weft/leader").unwrap().lock_index, 2);
    assert_eq!(consul.kv_lock_holder("weft/leader"), Some(edge2.clone()));

    // Locks are advisory: a plain PUT writes a held key and keeps its Session (its LockIndex
    // becomes the PUT's, 0); a DELETE deletes it.
    assert!(outcome(&put(&consul, "weft/leader", "intruder").await));
    let entry = consul.kv_entry("weft/leader").unwrap();
    assert_eq!(
        (
            entry.session.as_deref(),
            entry.lock_index,
            entry.value.as_slice()
        ),
        (Some(edge2.as_str()), 0, b"intruder".as_slice())
    );
    assert!(outcome(&delete(&consul, "weft/leader").await));
    assert_eq!(consul.kv_entry("weft/leader"), None);

    // A session Consul does not know, or none: the FSM's errors, after a raft entry.
    let before = consul.index();
    let unknown = put(&consul, "weft/leader?acquire=no-such-session", "x").await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (
            500,
            r#"raft apply failed: invalid session "no-such-session""#
        )
    );
    let none = put(&consul, "weft/leader?acquire=", "x").await;
    assert_eq!(
        (none.status, none.body.as_str()),
        (500, "raft apply failed: missing session")
    );
    assert_eq!(consul.index(), before + 2);
    assert_eq!(consul.kv_entry("weft/leader"), None);
    // `?cas` with `?acquire` conflicts.
    let conflict = put(&consul, &format!("weft/leader?cas=0&acquire={edge1}"), "x").await;
    assert_eq!(conflict.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_on_a_prefix_wakes_on_acquire_release_and_invalidation() {
    let consul = std::sync::Arc::new(ConsulDouble::start().await);
    let edge1 = create_session(&consul, r#"{"LockDelay":"0s"}"#).await;
    consul.kv_put("locks/shop", "");
    let path = format!("{KV}locks/");
    let blocked = |index: u64| {
        let consul = consul.clone();
        let path = path.clone();
        tokio::spawn(async move {
            get(&consul, &format!("{path}?recurse&index={index}&wait=10m")).await
        })
    };

    let index = get(&consul, &format!("{path}?recurse")).await.index();
    let query = blocked(index);
    consul.wait_for_blocked_queries(&path, 1).await;
    assert!(acquire(&consul, "locks/shop", &edge1, "edge-1").await);
    let answer = query.await.unwrap();
    assert_eq!(answer.index(), consul.index());
    assert_eq!(answer.json()[0]["Session"], edge1.as_str());

    let query = blocked(answer.index());
    consul.wait_for_blocked_queries(&path, 1).await;
    assert!(release(&consul, "locks/shop", &edge1, "").await);
    let answer = query.await.unwrap();
    assert!(answer.json()[0].get("Session").is_none());

    // The session's invalidation releases the key: a write under the prefix.
    assert!(acquire(&consul, "locks/shop", &edge1, "edge-1").await);
    let index = get(&consul, &format!("{path}?recurse")).await.index();
    let query = blocked(index);
    consul.wait_for_blocked_queries(&path, 1).await;
    assert!(outcome(
        &session_put(&consul, &format!("destroy/{edge1}"), "").await
    ));
    let answer = query.await.unwrap();
    assert_eq!(answer.index(), consul.index());
    assert!(answer.json()[0].get("Session").is_none());
    assert_eq!(answer.json()[0]["LockIndex"], 2);

    // The session list blocks on the sessions table: a creation wakes it.
    let list = format!("{SESSION}list");
    let index = get(&consul, &list).await.index();
    let query = tokio::spawn({
        let consul = consul.clone();
        let list = list.clone();
        async move { get(&consul, &format!("{list}?index={index}&wait=10m")).await }
    });
    consul.wait_for_blocked_queries(&list, 1).await;
    let edge2 = create_session(&consul, "").await;
    let answer = query.await.unwrap();
    assert_eq!(answer.json()[0]["ID"], edge2.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_delay_refuses_every_session_after_an_invalidation_until_it_passes() {
    let consul = ConsulDouble::start().await;
    let edge1 = create_session(&consul, r#"{"LockDelay":"2s"}"#).await;
    let edge2 = create_session(&consul, "").await;
    assert!(acquire(&consul, "weft/leader", &edge1, "edge-1").await);
    let acquired = consul.kv_entry("weft/leader").unwrap();

    // As if edge-1's node failed: released (LockIndex and value kept, ModifyIndex moved).
    consul.invalidate_session(&edge1);
    let invalidated = consul.index();
    let released = consul.kv_entry("weft/leader").unwrap();
    assert_eq!(released.session, None);
    assert_eq!(
        (
            released.lock_index,
            released.value.as_slice(),
            released.modify_index
        ),
        (1, b"edge-1".as_slice(), invalidated)
    );
    assert_eq!(released.create_index, acquired.create_index);
    assert!(!consul.session_exists(&edge1));

    // Within the delay every acquisition is refused before raft: no index moves.
    let start = Instant::now();
    assert!(!acquire(&consul, "weft/leader", &edge2, "edge-2").await);
    assert_eq!(consul.index(), invalidated);
    let left = consul.kv_lock_delay("weft/leader").unwrap();
    assert!(left <= Duration::from_secs(2), "{left:?}");
    // A key the session did not hold has no delay; a release is not refused.
    assert_eq!(consul.kv_lock_delay("weft/other"), None);
    assert!(acquire(&consul, "weft/other", &edge2, "edge-2").await);

    support::eventually(Duration::from_secs(5), "the lock delay to pass", || async {
        match consul.kv_lock_delay("weft/leader") {
            None => Ok(()),
            Some(left) => Err(left),
        }
    })
    .await;
    assert!(start.elapsed() + Duration::from_millis(50) >= left);
    assert!(acquire(&consul, "weft/leader", &edge2, "edge-2").await);
    assert_eq!(consul.kv_entry("weft/leader").unwrap().lock_index, 2);

    // The default delay is 15 s; a longer one is kept on the session but applies for 60 s at
    // most (`MaxLockDelay`). A failed serfHealth invalidates the node's sessions in its write.
    let long = create_session(&consul, r#"{"LockDelay":"2m"}"#).await;
    assert_eq!(consul.session(&long).unwrap().lock_delay, 120_000_000_000);
    assert!(acquire(&consul, "weft/long", &long, "").await);
    consul.set_node_check("node1", Status::Critical);
    assert!(consul.sessions().is_empty(), "{:?}", consul.sessions());
    assert_eq!(consul.kv_lock_holder("weft/leader"), None);
    let long_delay = consul.kv_lock_delay("weft/long").unwrap();
    assert!(long_delay > Duration::from_secs(55) && long_delay <= Duration::from_secs(60));
    let default_delay = consul.kv_lock_delay("weft/leader").unwrap();
    assert!(default_delay > Duration::from_secs(10) && default_delay <= Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behavior_delete_deletes_the_keys_of_an_invalidated_session() {
    let consul = ConsulDouble::start().await;
    let ephemeral = create_session(&consul, r#"{"Behavior":"delete","LockDelay":"0s"}"#).await;
    let other = create_session(&consul, "").await;
    assert!(acquire(&consul, "edges/edge-1", &ephemeral, "10.0.0.1").await);
    assert!(acquire(&consul, "edges/edge-2", &ephemeral, "10.0.0.2").await);
    assert!(acquire(&consul, "edges/edge-3", &other, "10.0.0.3").await);
    assert!(outcome(
        &session_put(&consul, &format!("destroy/{ephemeral}"), "").await
    ));
    let destroyed = consul.index();
    assert_eq!(consul.kv_keys("edges/"), ["edges/edge-3"]);
    let gone = get(&consul, &format!("{KV}edges/edge-1")).await;
    assert_eq!((gone.status, gone.index()), (404, destroyed));
    // A lock delay of 0: the key can be taken again at once.
    assert_eq!(consul.kv_lock_delay("edges/edge-1"), None);
    assert!(acquire(&consul, "edges/edge-1", &other, "10.0.0.3").await);
    assert_eq!(consul.kv_entry("edges/edge-1").unwrap().lock_index, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_not_renewed_within_twice_its_ttl_expires_and_releases_its_lock() {
    // `session_ttl_min` lowered so that a TTL of 1 s is taken: the session expires 2 s (TTL × 2)
    // after its creation or last renewal.
    let consul = std::sync::Arc::new(
        ConsulDouble::builder()
            .session_ttl_min(Duration::from_millis(100))
            .start()
            .await,
    );
    let id = create_session(&consul, r#"{"TTL":"1s","LockDelay":"0s"}"#).await;
    assert!(acquire(&consul, "weft/leader", &id, "edge-1").await);

    // Renewed every 500 ms for 3 s: still there, past the 2 s it would have had.
    let mut renewed = Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        renewed = Instant::now();
        let answer = session_put(&consul, &format!("renew/{id}"), "").await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()[0]["TTL"], "1s");
    }
    assert!(consul.session_exists(&id));

    // Then left alone: a blocking query on the key wakes when the expiry releases it.
    let key = format!("{KV}weft/leader");
    let index = get(&consul, &key).await.index();
    let answer = get(&consul, &format!("{key}?index={index}&wait=1m")).await;
    let expired_after = renewed.elapsed();
    assert!(expired_after >= Duration::from_secs(2), "{expired_after:?}");
    assert!(
        expired_after < support::patience(Duration::from_secs(6)),
        "{expired_after:?}"
    );
    assert!(answer.json()[0].get("Session").is_none(), "{}", answer.body);
    assert!(!consul.session_exists(&id));
    let info = get(&consul, &format!("{SESSION}info/{id}")).await;
    assert_eq!(info.body, "[]");
    let renew = session_put(&consul, &format!("renew/{id}"), "").await;
    assert_eq!(renew.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_goes_when_a_check_it_names_turns_critical_or_goes_away() {
    let consul = ConsulDouble::start().await;
    consul.register(Instance::new("shop", "shop-1", "10.2.1.5", 8080));
    consul.register(Instance::new("shop", "shop-2", "10.2.1.6", 8080));
    let body = |id: &str| format!(r#"{{"ServiceChecks":[{{"ID":"service:{id}"}}]}}"#);
    let first = create_session(&consul, &body("shop-1")).await;
    let second = create_session(&consul, &body("shop-2")).await;
    let info = get(&consul, &format!("{SESSION}info/{first}")).await.json();
    assert_eq!(
        info[0]["ServiceChecks"],
        serde_json::json!([{"ID": "service:shop-1", "Namespace": ""}])
    );
    assert_eq!(info[0]["NodeChecks"], serde_json::json!(["serfHealth"]));
    assert!(acquire(&consul, "weft/leader", &first, "edge-1").await);

    // Warning and maintenance are not critical.
    consul.set_check("shop-1", Status::Warning);
    consul.set_check("shop-1", Status::Maintenance);
    assert!(consul.session_exists(&first));
    // Critical: invalidated in the check's own write, its lock released.
    consul.set_check("shop-1", Status::Critical);
    let failed = consul.index();
    assert!(!consul.session_exists(&first));
    let entry = consul.kv_entry("weft/leader").unwrap();
    assert_eq!((entry.session, entry.modify_index), (None, failed));
    assert!(get(&consul, &format!("{SESSION}info/{first}")).await.body == "[]");
    // A critical check refuses a new session; a deregistered instance takes its check, and the
    // session naming it, away.
    let refused = session_put(&consul, "create", &body("shop-1")).await;
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (
            500,
            "apply failed: Check 'service:shop-1' is in critical state"
        )
    );
    assert!(consul.session_exists(&second));
    consul.deregister("shop-2");
    assert!(!consul.session_exists(&second));
    assert_eq!(
        get(&consul, &format!("{SESSION}list")).await.index(),
        consul.index()
    );
}

// Transactions (`PUT /v1/txn`).

async fn txn(consul: &ConsulDouble, query: &str, body: &str) -> Answer {
    let path = format!("{}{query}", consul::TXN);
    send(consul, reqwest::Method::PUT, &path, body.to_string(), &[]).await
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A 409's `Errors`, as (OpIndex, What); `Results` must be null.
fn txn_errors(answer: &Answer) -> Vec<(u64, String)> {
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert_eq!(answer.content_type(), "application/json");
    let body = answer.json();
    assert_eq!(body["Results"], Value::Null, "{}", answer.body);
    body["Errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let what = e["What"].as_str().unwrap().to_string();
            (e["OpIndex"].as_u64().unwrap(), what)
        })
        .collect()
}

/// A committed write transaction's `Results`: 200, `Errors` null, no read headers.
fn txn_results(answer: &Answer) -> Vec<Value> {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.content_type(), "application/json");
    assert!(answer.headers.get("x-consul-index").is_none());
    let body = answer.json();
    assert_eq!(body["Errors"], Value::Null, "{}", answer.body);
    body["Results"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_set_guarded_by_check_session_commits_while_the_lock_is_held_and_never_after() {
    let consul = ConsulDouble::start().await;
    let leader = create_session(&consul, "").await;
    assert!(acquire(&consul, "weft/leader", &leader, "edge-1").await);
    let locked = consul.kv_entry("weft/leader").unwrap();
    let guarded = |state: &str| {
        serde_json::json!([
            {"KV": {"Verb": "check-session", "Key": "weft/leader", "Session": leader}},
            {"KV": {"Verb": "set", "Key": "weft/state", "Value": b64(state), "Flags": 7}},
        ])
        .to_string()
    };

    // Held: one raft write; the check answers the lock's entry and the set the new one, both
    // without their value.
    let before = consul.index();
    let results = txn_results(&txn(&consul, "", &guarded("v1")).await);
    let written = before + 1;
    assert_eq!(consul.index(), written);
    assert_eq!(
        results,
        [
            serde_json::json!({"KV": {"LockIndex": 1, "Key": "weft/leader", "Flags": 0,
                "Value": null, "Session": leader, "CreateIndex": locked.create_index,
                "ModifyIndex": locked.modify_index}}),
            serde_json::json!({"KV": {"LockIndex": 0, "Key": "weft/state", "Flags": 7,
                "Value": null, "CreateIndex": written, "ModifyIndex": written}}),
        ]
    );
    assert_eq!(kv_json(&consul, "weft/state").await["Value"], b64("v1"));

    // The session goes and its lock with it: the same transaction is refused whole.
    assert!(outcome(
        &session_put(&consul, &format!("destroy/{leader}"), "").await
    ));
    assert_eq!(consul.kv_lock_holder("weft/leader"), None);
    let state_index = get(&consul, &format!("{KV}weft/state")).await.index();
    let before = consul.index();
    let refused = txn(&consul, "", &guarded("v2")).await;
    let what = format!(
        "failed session check for key \"weft/leader\", current session \"\" != \"{leader}\""
    );
    assert_eq!(txn_errors(&refused), [(0, what.clone())]);
    assert_eq!(
        refused.json(),
        serde_json::json!({"Results": null, "Errors": [{"OpIndex": 0, "What": what}]})
    );
    // Nothing written: the value, its ModifyIndex and the key's index stay; the raft entry was
    // spent (the FSM refused it), as a failed ?cas spends it.
    assert_eq!(consul.kv_get("weft/state").unwrap(), b"v1");
    assert_eq!(consul.kv_entry("weft/state").unwrap().modify_index, written);
    assert_eq!(
        get(&consul, &format!("{KV}weft/state")).await.index(),
        state_index
    );
    assert_eq!(consul.index(), before + 1);

    // A check on a key that is not there.
    let missing = serde_json::json!([
        {"KV": {"Verb": "check-session", "Key": "weft/none", "Session": leader}}
    ]);
    let refused = txn(&consul, "", &missing.to_string()).await;
    assert_eq!(
        txn_errors(&refused),
        [(
            0,
            "failed to check session, key \"weft/none\" doesn't exist".to_string()
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_check_index_and_cas_follow_the_modify_index_and_fail_together() {
    let consul = ConsulDouble::start().await;
    consul.kv_put("cfg/a", "1");
    let a = consul.kv_entry("cfg/a").unwrap().modify_index;
    let body = serde_json::json!([
        {"KV": {"Verb": "check-index", "Key": "cfg/a", "Index": a}},
        {"KV": {"Verb": "cas", "Key": "cfg/b", "Index": 0, "Value": b64("x")}},
    ])
    .to_string();
    let results = txn_results(&txn(&consul, "", &body).await);
    let written = consul.index();
    assert_eq!(results[0]["KV"]["ModifyIndex"], a);
    assert_eq!(results[0]["KV"]["Value"], Value::Null);
    assert_eq!(results[1]["KV"]["CreateIndex"], written);
    assert_eq!(consul.kv_get("cfg/b").unwrap(), b"x");

    // cfg/a moves and cfg/b exists: both operations fail, each reported, nothing applied.
    consul.kv_put("cfg/a", "2");
    let moved = consul.index();
    let list = get(&consul, &format!("{KV}cfg/?recurse")).await.index();
    let refused = txn(&consul, "", &body).await;
    assert_eq!(
        txn_errors(&refused),
        [
            (
                0,
                format!(
                    "failed index check for key \"cfg/a\", current modify index {moved} != {a}"
                )
            ),
            (1, "failed to set key \"cfg/b\", index is stale".to_string()),
        ]
    );
    assert_eq!(
        get(&consul, &format!("{KV}cfg/?recurse")).await.index(),
        list
    );

    // Each operation sees the ones before it: a set, then a check at the write's own index.
    let next = consul.index() + 1;
    let body = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "cfg/c", "Value": b64("1")}},
        {"KV": {"Verb": "check-index", "Key": "cfg/c", "Index": next}},
        {"KV": {"Verb": "cas", "Key": "cfg/c", "Index": next, "Value": b64("2")}},
        {"KV": {"Verb": "delete-cas", "Key": "cfg/b", "Index": written}},
    ]);
    let results = txn_results(&txn(&consul, "", &body.to_string()).await);
    assert_eq!(consul.index(), next);
    assert_eq!(results.len(), 3, "a deletion answers nothing: {results:?}");
    assert_eq!(consul.kv_get("cfg/c").unwrap(), b"2");
    assert_eq!(consul.kv_get("cfg/b"), None);

    // A failed operation late in a transaction undoes the writes before it.
    let list = get(&consul, &format!("{KV}cfg/?recurse")).await.index();
    let body = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "cfg/d", "Value": b64("new")}},
        {"KV": {"Verb": "delete", "Key": "cfg/c"}},
        {"KV": {"Verb": "check-not-exists", "Key": "cfg/a"}},
        {"KV": {"Verb": "delete-cas", "Key": "cfg/a", "Index": a}},
    ]);
    let refused = txn(&consul, "", &body.to_string()).await;
    assert_eq!(
        txn_errors(&refused),
        [
            (2, "key \"cfg/a\" exists".to_string()),
            (
                3,
                "failed to delete key \"cfg/a\", index is stale".to_string()
            ),
        ]
    );
    assert_eq!(consul.kv_keys("cfg/"), ["cfg/a", "cfg/c"]);
    assert_eq!(
        get(&consul, &format!("{KV}cfg/?recurse")).await.index(),
        list
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_limits_and_bad_bodies_answer_as_consul_does() {
    let consul = ConsulDouble::start().await;
    let sets = |count: usize| {
        let ops: Vec<Value> = (0..count)
            .map(|i| serde_json::json!({"KV": {"Verb": "set", "Key": format!("bulk/{i:03}")}}))
            .collect();
        Value::Array(ops).to_string()
    };
    // 128 operations: one write, one index.
    let before = consul.index();
    let results = txn_results(&txn(&consul, "", &sets(consul::TXN_MAX_OPS)).await);
    assert_eq!(results.len(), 128);
    assert_eq!(consul.index(), before + 1);
    assert_eq!(consul.kv_keys("bulk/").len(), 128);
    let index = consul.index();

    let plain = |answer: Answer| (answer.status, answer.body);
    let too_many = sets(consul::TXN_MAX_OPS + 1).replace("bulk/", "more/");
    assert_eq!(
        plain(txn(&consul, "", &too_many).await),
        (
            413,
            "Transaction contains too many operations (129 > 128)".to_string()
        )
    );
    let huge = format!("[{}]", " ".repeat(consul::TXN_MAX_REQ_LEN));
    assert_eq!(
        plain(txn(&consul, "", &huge).await),
        (
            413,
            "Request body(524290 bytes) too large, max size: 524288 bytes. See \
             https://www.consul.io/docs/agent/config/config-files#txn_max_req_len."
                .to_string()
        )
    );
    // Without a Content-Length: the 413 comes when the JSON runs past the limit; Go's decoder
    // stops at the end of the first value and never reads what follows it.
    let chunked = |body: String| {
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(body.into_bytes())]);
        reqwest::Body::wrap_stream(chunks)
    };
    let answer = send(
        &consul,
        reqwest::Method::PUT,
        consul::TXN,
        chunked(huge),
        &[],
    )
    .await;
    assert_eq!(
        plain(answer),
        (
            413,
            "Request body too large, max size: 524288 bytes. See \
             https://www.consul.io/docs/agent/config/config-files#txn_max_req_len."
                .to_string()
        )
    );
    let trailing = format!("[] {}", "x".repeat(consul::TXN_MAX_REQ_LEN));
    let answer = send(
        &consul,
        reqwest::Method::PUT,
        consul::TXN,
        chunked(trailing),
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["Results"], serde_json::json!([]));
    let bad = [
        ("", "EOF"),
        ("[{\"KV\":", "unexpected EOF"),
        (
            "{}",
            "json: cannot unmarshal object into Go value of type api.TxnOps",
        ),
        (
            r#"[{"KV": {"Verb": "set", "Key": "a", "Value": "not base64!"}}]"#,
            "illegal base64 data at input byte 3",
        ),
        (
            r#"[{"KV": {"Verb": "set", "Key": "a", "Value": "eA="}}]"#,
            "illegal base64 data at input byte 3",
        ),
        (
            r#"[{"KV": {"Verb": "set", "Key": "a", "Value": "eA==eA=="}}]"#,
            "illegal base64 data at input byte 4",
        ),
        (
            r#"[{"KV": {"Verb": "set", "Key": "a", "Valeu": "eA=="}}]"#,
            "json: unknown field \"Valeu\"",
        ),
        (
            r#"[{"KV": {"Verb": "set", "Key": "a", "Flags": "7"}}]"#,
            "json: cannot unmarshal string into Go struct field KVTxnOp.KV.Flags of type uint64",
        ),
        (
            r#"[{"KV": {"Verb": "set", "Key": "a", "Index": -1}}]"#,
            "json: cannot unmarshal number -1 into Go struct field KVTxnOp.KV.Index of type uint64",
        ),
        (
            r#"[{"kv": "set"}]"#,
            "json: cannot unmarshal string into Go struct field TxnOp.KV of type api.KVTxnOp",
        ),
    ];
    for (body, why) in bad {
        assert_eq!(
            plain(txn(&consul, "", body).await),
            (400, format!("Failed to parse body: {why}")),
            "{body}"
        );
    }
    // Keys without case, and a base64 value with its padding.
    let lower = r#"[{"kv": {"verb": "set", "key": "bulk/000", "value": "eA=="}}]"#;
    txn_results(&txn(&consul, "", lower).await);
    assert_eq!(consul.kv_get("bulk/000").unwrap(), b"x");
    let index = index + 1;
    // Catalog operations are not the double's: a 400 that says so.
    let node = r#"[{"Node": {"Verb": "set", "Node": {"Node": "n1", "Address": "10.0.0.1"}}}]"#;
    let answer = txn(&consul, "", node).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("not implemented by the Consul test double"),
        "{}",
        answer.body
    );
    // Refused by the leader's checks (no raft write) or a read: no index moved.
    let empty_key = r#"[{"KV": {"Verb": "set", "Key": ""}}]"#;
    let refused = txn(&consul, "", empty_key).await;
    assert_eq!(txn_errors(&refused), [(0, "Must provide key".to_string())]);
    let unknown = r#"[{"KV": {"Verb": "frobnicate", "Key": "a"}}]"#;
    let refused = txn(&consul, "", unknown).await;
    assert_eq!(
        txn_errors(&refused),
        [(0, "unknown KV verb \"frobnicate\"".to_string())]
    );
    let other_method = send(&consul, reqwest::Method::GET, consul::TXN, "", &[]).await;
    assert_eq!(other_method.status, 405);
    assert_eq!(other_method.header("allow"), "OPTIONS,PUT");
    assert_eq!(consul.index(), index);
    assert_eq!(consul.kv_keys("more/"), Vec::<String>::new());
    assert_eq!(consul.requests().endpoint(consul::TXN).requests, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_txn_wakes_a_blocked_kv_query_and_a_refused_one_does_not() {
    let consul = std::sync::Arc::new(ConsulDouble::start().await);
    consul.kv_put("claims/shop", "edge-1");
    let path = format!("{KV}claims/");
    let index = get(&consul, &format!("{path}?recurse")).await.index();
    let query = tokio::spawn({
        let consul = consul.clone();
        let path = path.clone();
        async move { get(&consul, &format!("{path}?recurse&index={index}&wait=10m")).await }
    });
    consul.wait_for_blocked_queries(&path, 1).await;

    // Refused in the FSM: a raft write that changes nothing, the query stays blocked.
    let refused = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "claims/blog", "Value": b64("edge-2")}},
        {"KV": {"Verb": "check-not-exists", "Key": "claims/shop"}},
    ]);
    let answer = txn(&consul, "", &refused.to_string()).await;
    assert_eq!(txn_errors(&answer).len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!query.is_finished());
    assert_eq!(consul.blocked_queries(&path), 1);

    let committed = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "claims/blog", "Value": b64("edge-2")}},
        {"KV": {"Verb": "delete", "Key": "claims/shop"}},
    ]);
    txn_results(&txn(&consul, "", &committed.to_string()).await);
    let answer = query.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.index(), consul.index());
    assert_eq!(kv_keys_of(&answer), ["claims/blog"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_without_writes_is_a_read_with_its_query_meta() {
    let consul = ConsulDouble::start().await;
    consul.kv_put("app/a", "hello");
    let entry = consul.kv_entry("app/a").unwrap();
    let index = consul.index();
    let reads = serde_json::json!([
        {"KV": {"Verb": "get", "Key": "app/a"}},
        {"KV": {"Verb": "get-tree", "Key": "app/"}},
        {"KV": {"Verb": "check-not-exists", "Key": "app/b"}},
        {"KV": {"Verb": "get-or-empty", "Key": "app/b", "Flags": 3}},
    ]);
    let answer = txn(&consul, "", &reads.to_string()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("x-consul-knownleader"), "true");
    assert_eq!(answer.header("x-consul-lastcontact"), "0");
    assert!(answer.headers.get("x-consul-index").is_none());
    let a = serde_json::json!({"KV": {"LockIndex": 0, "Key": "app/a", "Flags": 0,
        "Value": b64("hello"), "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index}});
    let b = serde_json::json!({"KV": {"LockIndex": 0, "Key": "app/b", "Flags": 3,
        "Value": null, "CreateIndex": 0, "ModifyIndex": 0}});
    assert_eq!(
        answer.json(),
        serde_json::json!({"Results": [a, a, b], "Errors": null, "Index": 1, "LastContact": 0,
            "KnownLeader": true, "ConsistencyLevel": "", "NotModified": false, "Backend": 0,
            "ResultsFilteredByACLs": false})
    );
    assert_eq!(consul.index(), index);

    let missing = r#"[{"KV": {"Verb": "get", "Key": "app/none"}}]"#;
    let answer = txn(&consul, "?stale", missing).await;
    assert_eq!(
        txn_errors(&answer),
        [(0, "key \"app/none\" doesn't exist".to_string())]
    );
    assert_eq!(answer.json()["KnownLeader"], true);
    let answer = txn(&consul, "?stale&consistent", missing).await;
    assert_eq!(answer.status, 400);

    // A stale read without a leader answers; a write does not.
    consul.set_fault(Fault::NoLeader);
    let answer = txn(&consul, "?stale", &reads.to_string()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-consul-knownleader"), "false");
    assert_eq!(answer.json()["KnownLeader"], false);
    let write = r#"[{"KV": {"Verb": "set", "Key": "app/c"}}]"#;
    let answer = txn(&consul, "?stale", write).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (500, "No cluster leader")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_locks_are_acquisitions_and_tokens_are_checked_per_operation() {
    let consul = ConsulDouble::start().await;
    let edge1 = create_session(&consul, r#"{"LockDelay":"2s"}"#).await;
    let edge2 = create_session(&consul, "").await;
    let op = |verb: &str, session: &str| {
        serde_json::json!([{"KV": {"Verb": verb, "Key": "weft/leader", "Session": session,
            "Value": b64(session)}}])
        .to_string()
    };
    let results = txn_results(&txn(&consul, "", &op("lock", &edge1)).await);
    let locked = consul.index();
    assert_eq!(
        results,
        [
            serde_json::json!({"KV": {"LockIndex": 1, "Key": "weft/leader", "Flags": 0,
            "Value": null, "Session": edge1, "CreateIndex": locked, "ModifyIndex": locked}})
        ]
    );
    assert_eq!(consul.kv_get("weft/leader").unwrap(), edge1.as_bytes());
    let refused = |answer: Answer| txn_errors(&answer).remove(0).1;
    assert_eq!(
        refused(txn(&consul, "", &op("lock", &edge2)).await),
        "failed to lock key \"weft/leader\", lock is already held"
    );
    assert_eq!(
        refused(txn(&consul, "", &op("lock", "no-such-session")).await),
        "invalid session \"no-such-session\""
    );
    assert_eq!(
        refused(txn(&consul, "", &op("unlock", &edge2)).await),
        "failed to unlock key \"weft/leader\", lock isn't held, or is held by another session"
    );
    let results = txn_results(&txn(&consul, "", &op("unlock", &edge1)).await);
    assert_eq!(results[0]["KV"]["LockIndex"], 1);
    assert!(results[0]["KV"].get("Session").is_none());

    // An invalidated holder's lock delay refuses a lock before raft.
    assert!(acquire(&consul, "weft/leader", &edge1, "edge-1").await);
    consul.invalidate_session(&edge1);
    let index = consul.index();
    assert_eq!(
        refused(txn(&consul, "", &op("lock", &edge2)).await),
        "failed to lock key \"weft/leader\" due to lock delay"
    );
    assert_eq!(consul.index(), index);

    // ACLs: the anonymous token reads nothing (filtered) and writes nothing; an unknown token
    // is refused before anything.
    consul.set_token(Some("s3cret".to_string()));
    let read = r#"[{"KV": {"Verb": "get", "Key": "weft/leader"}}]"#;
    let answer = txn(&consul, "", read).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["Results"], serde_json::json!([]));
    let write = r#"[{"KV": {"Verb": "get", "Key": "weft/leader"}},
        {"KV": {"Verb": "set", "Key": "weft/other"}}]"#;
    assert_eq!(
        txn_errors(&txn(&consul, "", write).await),
        [(1, "Permission denied".to_string())]
    );
    let wrong = txn(&consul, "?token=nope", write).await;
    assert_eq!((wrong.status, wrong.body.as_str()), (403, "ACL not found"));
    let results = txn_results(&txn(&consul, "?token=s3cret", write).await);
    assert_eq!(results[0]["KV"]["Value"], b64("edge-1"));
    assert_eq!(consul.index(), index + 1);
}
