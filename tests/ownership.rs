//! Hosts belong to someone: what one team writes (a Consul tag, a Marathon label) cannot take
//! another's host, a path under it, the world beneath a public suffix, or another source's
//! service by its name; and every edge settles a contested host alike. End to end: the doubles
//! -> weft -> real HAProxy -> loopback backends.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::consul::{ConsulDouble, Instance};
use support::marathon::{App, MarathonDouble, Task};
use support::{
    eventually, service, wait_for_404, wait_for_backends, wait_for_healthz, Backend, Weft,
    WeftBuilder,
};

fn consul_service(name: &str, backend: &Backend, tags: &[&str]) -> Instance {
    let mut instance = Instance::new(
        name,
        &format!("{name}-1"),
        &backend.addr.ip().to_string(),
        backend.addr.port(),
    );
    for tag in tags {
        instance = instance.tag(tag);
    }
    instance
}

fn marathon_app(id: &str, backend: &Backend, labels: &[(&str, &str)]) -> App {
    let mut app = App::new(id)
        .label("HAPROXY_GROUP", "external")
        .container_port(backend.addr.port());
    for (key, value) in labels {
        app = app.label(key, value);
    }
    app.task(
        Task::new(&format!(
            "{}.1",
            id.trim_start_matches('/').replace('/', "_")
        ))
        .ip(&backend.addr.ip().to_string())
        .health(Some(true)),
    )
}

/// weft on all three sources.
fn weft_on(consul: &ConsulDouble, marathon: &MarathonDouble) -> WeftBuilder {
    Weft::builder()
        .consul(&consul.url(), "wait = \"5m\"")
        .marathon(&[marathon.url()], "")
}

/// `/status`'s conflicts, as `(source, subject, reason)`.
async fn conflicts(weft: &Weft) -> Vec<(String, String, String)> {
    let (_, body) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap().to_string();
            (field("source"), field("subject"), field("reason"))
        })
        .collect()
}

/// Waits until `/status` lists a conflict for each `(source, subject part, reason part)`.
async fn wait_for_conflicts(weft: &Weft, want: &[(&str, &str, &str)]) {
    eventually(
        Duration::from_secs(20),
        "the conflicts are listed",
        || async {
            let now = conflicts(weft).await;
            for (source, subject, reason) in want {
                if !now
                    .iter()
                    .any(|(s, sub, r)| s == source && sub.contains(subject) && r.contains(reason))
                {
                    return Err(format!(
                        "no {source} conflict {subject:?} ({reason:?}) in {now:#?}"
                    ));
                }
            }
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_file_keeps_its_host_and_its_paths_from_consul_and_marathon() {
    let shop = Backend::start("shop").await;
    let evil = Backend::start_at("evil", "127.0.0.2:0").await;
    let consul = ConsulDouble::start().await;
    let marathon = MarathonDouble::start().await;
    // Names that sort before and after "shop", on its host and on a path under it.
    consul.register(consul_service("aaa", &evil, &["weft.host=shop.test"]));
    consul.register(consul_service(
        "zzz",
        &evil,
        &["weft.host=shop.test", "weft.path=/login"],
    ));
    marathon.put_app(marathon_app(
        "/aaa",
        &evil,
        &[("HAPROXY_0_VHOST", "shop.test")],
    ));
    marathon.put_app(marathon_app(
        "/zzz",
        &evil,
        &[
            ("HAPROXY_0_VHOST", "shop.test"),
            ("HAPROXY_0_PATH", "/login"),
        ],
    ));
    // The operator lets one Consul service add its path.
    let api = Backend::start_at("api", "127.0.0.4:0").await;
    consul.register(consul_service(
        "api",
        &api,
        &["weft.host=shop.test", "weft.path=/api"],
    ));
    let weft = weft_on(&consul, &marathon)
        .services(&format!(
            "{}share = [\"consul:api\"]\n",
            service("shop", &["shop.test"], None, &[shop.addr])
        ))
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/api/x", &["api"]).await;

    wait_for_conflicts(
        &weft,
        &[
            ("consul", "aaa\" route shop.test", "belongs to the operator"),
            (
                "consul",
                "zzz\" route shop.test/login",
                "belongs to the operator",
            ),
            (
                "marathon",
                "aaa\" route shop.test",
                "belongs to the operator",
            ),
            (
                "marathon",
                "zzz\" route shop.test/login",
                "belongs to the operator",
            ),
        ],
    )
    .await;
    for path in ["/", "/login", "/login/x"] {
        wait_for_backends(&weft, "shop.test", path, &["shop"]).await;
    }
    // A tenant cannot fail the edge's health; the operator alerts on the metric instead.
    wait_for_healthz(&weft, "ok").await;
    let (_, metrics) = weft.status("/metrics").await.unwrap();
    for line in [
        "weft_host_conflicts{source=\"consul\"} 2",
        "weft_host_conflicts{source=\"marathon\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_stays_with_its_holder_across_sources_whatever_the_newcomer_is_named() {
    let m = Backend::start("m").await;
    let c = Backend::start_at("c", "127.0.0.2:0").await;
    let evil = Backend::start_at("evil", "127.0.0.3:0").await;
    let consul = ConsulDouble::start().await;
    let marathon = MarathonDouble::start().await;
    // One name in both sources: neither hides the other.
    marathon.put_app(marathon_app(
        "/mapp",
        &m,
        &[("HAPROXY_0_VHOST", "mapp.test")],
    ));
    consul.register(consul_service("mapp", &c, &["weft.host=capp.test"]));
    let weft = weft_on(&consul, &marathon).start().await;
    wait_for_backends(&weft, "mapp.test", "/", &["m"]).await;
    wait_for_backends(&weft, "capp.test", "/", &["c"]).await;
    // Both recorded in Consul's KV, where every edge reads them.
    eventually(
        Duration::from_secs(10),
        "the claims are in Consul",
        || async {
            let marathon_claim = consul.kv_get("weft/claims/test/mapp");
            let consul_claim = consul.kv_get("weft/claims/test/capp");
            match (marathon_claim, consul_claim) {
                (Some(m), Some(c)) => Ok((m, c)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let recorded: serde_json::Value =
        serde_json::from_slice(&consul.kv_get("weft/claims/test/mapp").unwrap()).unwrap();
    assert_eq!(recorded["source"], "marathon");
    assert_eq!(recorded["service"], "mapp");

    // Newcomers that sort first, each on the other source's host.
    consul.register(consul_service("aaa", &evil, &["weft.host=mapp.test"]));
    marathon.put_app(marathon_app(
        "/aaa",
        &evil,
        &[("HAPROXY_0_VHOST", "capp.test")],
    ));
    wait_for_conflicts(
        &weft,
        &[
            (
                "consul",
                "aaa\" route mapp.test",
                "held by marathon service \"mapp\"",
            ),
            (
                "marathon",
                "aaa\" route capp.test",
                "held by consul service \"mapp\"",
            ),
        ],
    )
    .await;
    wait_for_backends(&weft, "mapp.test", "/", &["m"]).await;
    wait_for_backends(&weft, "capp.test", "/", &["c"]).await;
    wait_for_healthz(&weft, "ok").await;
}

/// A `Host` that is no host name reaches no route: `evil.net/.wild.test` would end in a
/// wildcard's key (and, with the redirect to HTTPS, in the `Location` sent back), and
/// `app.test/admin` would begin with a path's key, on any path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_no_host_name_is_refused() {
    let wild = Backend::start("wild").await;
    let admin = Backend::start_at("admin", "127.0.0.2:0").await;
    let app = Backend::start_at("app", "127.0.0.3:0").await;
    let weft = Weft::builder()
        .services(&format!(
            "{}{}{}",
            service("wild", &["*.wild.test"], None, &[wild.addr]),
            service("admin", &["app.test"], Some("/admin"), &[admin.addr]),
            service("app", &["app.test"], None, &[app.addr]),
        ))
        .start()
        .await;
    wait_for_backends(&weft, "a.wild.test", "/", &["wild"]).await;
    wait_for_backends(&weft, "app.test", "/admin", &["admin"]).await;
    wait_for_backends(&weft, "app.test", "/", &["app"]).await;
    for (host, want) in [
        ("a.wild.test", 200),
        ("APP.test.", 200),
        ("app.test:8080", 200),
        ("evil.net/.wild.test", 400),
        ("evil.net?.wild.test", 400),
        ("app.test/admin", 400),
        ("app.test%2fadmin", 400),
        ("", 400),
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(
            support::raw(weft.port, &request).await.0,
            want,
            "Host: {host:?}"
        );
    }
    // The routes themselves are as they were.
    assert_eq!(
        support::get(weft.port, "app.test", "/admin/x")
            .await
            .unwrap(),
        (200, "admin".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_need_two_labels_beneath_the_public_suffix_and_are_claims_themselves() {
    let wide = Backend::start("wide").await;
    let evil = Backend::start_at("evil", "127.0.0.2:0").await;
    let consul = ConsulDouble::start().await;
    let marathon = MarathonDouble::start().await;
    consul.register(consul_service("world", &evil, &["weft.host=*.com"]));
    marathon.put_app(marathon_app(
        "/world",
        &evil,
        &[("HAPROXY_0_VHOST", "*.example.com")],
    ));
    consul.register(consul_service(
        "wide",
        &wide,
        &["weft.host=*.shop.example.com"],
    ));
    let weft = weft_on(&consul, &marathon).start().await;
    wait_for_backends(&weft, "login.shop.example.com", "/", &["wide"]).await;
    let (_, body) = weft.status("/status").await.unwrap();
    for subject in [
        "consul:world\\\" route *.com",
        "marathon:world\\\" route *.example.com",
    ] {
        assert!(body.contains(subject), "{subject} not dropped:\n{body}");
    }
    assert!(body.contains("too broad"), "{body}");
    wait_for_404(&weft, "other.example.com", "/").await;

    // A host beneath the held wildcard, claimed by another team later: refused.
    marathon.put_app(marathon_app(
        "/sneak",
        &evil,
        &[("HAPROXY_0_VHOST", "login.shop.example.com")],
    ));
    wait_for_conflicts(
        &weft,
        &[(
            "marathon",
            "login.shop.example.com",
            "lies beneath *.shop.example.com",
        )],
    )
    .await;
    wait_for_backends(&weft, "login.shop.example.com", "/", &["wide"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_keep_their_hosts_and_their_paths() {
    let web = Backend::start("web").await;
    let api = Backend::start_at("api", "127.0.0.2:0").await;
    let evil = Backend::start_at("evil", "127.0.0.3:0").await;
    let consul = ConsulDouble::start().await;
    let marathon = MarathonDouble::start().await;
    consul.register(consul_service("shop-web", &web, &["weft.host=shop.test"]));
    marathon.put_app(marathon_app(
        "/shop/api",
        &api,
        &[("HAPROXY_0_VHOST", "shop.test"), ("HAPROXY_0_PATH", "/api")],
    ));
    // Not the shop team: neither its host, a path under it, nor a host no team lists.
    consul.register(consul_service("aaa", &evil, &["weft.host=shop.test"]));
    marathon.put_app(marathon_app(
        "/evil",
        &evil,
        &[
            ("HAPROXY_0_VHOST", "shop.test"),
            ("HAPROXY_0_PATH", "/login"),
        ],
    ));
    consul.register(consul_service("ads", &evil, &["weft.host=ads.test"]));
    let weft = weft_on(&consul, &marathon)
        .routing(
            "unlisted_hosts = \"deny\"\n\
             [[routing.teams]]\nname = \"shop\"\nconsul = [\"shop-\"]\nmarathon = [\"/shop/\"]\n\
             hosts = [\"shop.test\", \"*.shop.test\"]",
        )
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/", &["web"]).await;
    wait_for_backends(&weft, "shop.test", "/api/x", &["api"]).await;
    wait_for_backends(&weft, "shop.test", "/login", &["web"]).await;
    wait_for_404(&weft, "ads.test", "/").await;
    let (_, body) = weft.status("/status").await.unwrap();
    for reason in [
        "host shop.test is reserved for team \\\"shop\\\"",
        "no team lists host ads.test",
    ] {
        assert!(body.contains(reason), "{reason} not in:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_started_apart_route_a_contested_host_alike_until_it_is_released() {
    let z = Backend::start("z").await;
    let a = Backend::start_at("a", "127.0.0.2:0").await;
    let consul = ConsulDouble::start().await;
    let marathon = MarathonDouble::start().await;
    consul.register(consul_service("zzz", &z, &["weft.host=contested.test"]));
    let edge = |consul: &ConsulDouble| weft_on(consul, &marathon).routing("release_after = \"3s\"");
    let first = edge(&consul).start().await;
    wait_for_backends(&first, "contested.test", "/", &["z"]).await;
    eventually(
        Duration::from_secs(10),
        "zzz's claim is recorded",
        || async { consul.kv_get("weft/claims/test/contested").ok_or("not yet") },
    )
    .await;

    // A newcomer of another team that sorts first; then a second edge, which sees both at once.
    marathon.put_app(marathon_app(
        "/aaa",
        &a,
        &[("HAPROXY_0_VHOST", "contested.test")],
    ));
    let held = [(
        "marathon",
        "\"aaa\" route contested.test",
        "held by consul service \"zzz\"",
    )];
    wait_for_conflicts(&first, &held).await;
    let second = edge(&consul).start().await;
    wait_for_conflicts(&second, &held).await;
    for weft in [&first, &second] {
        wait_for_backends(weft, "contested.test", "/", &["z"]).await;
    }

    // The holder goes: the host waits for it (release_after), then both edges hand it over.
    consul.deregister("zzz-1");
    for weft in [&first, &second] {
        wait_for_backends(weft, "contested.test", "/", &["a"]).await;
    }
    let recorded: serde_json::Value =
        serde_json::from_slice(&consul.kv_get("weft/claims/test/contested").unwrap()).unwrap();
    assert_eq!(recorded["source"], "marathon");
    assert_eq!(recorded["service"], "aaa");
    for weft in [&first, &second] {
        let log = weft.log();
        assert!(
            log.contains("claims it no more"),
            "the wait was not seen:\n{log}"
        );
    }
}
