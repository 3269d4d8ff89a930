//! What an operator runs and reads: `weft status` against a healthy and an unhealthy weft, and
//! JSON logs that parse line by line.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{free_port, service, wait_for_backends, Backend, Weft};

/// alpha.test routed to `a`, and a service whose only server is outside the allowed
/// networks (dropped with its reason).
fn alpha_and_outside(a: &Backend) -> String {
    service("alpha", &["alpha.test"], None, &[a.addr])
        + &service(
            "outside",
            &["outside.test"],
            None,
            &["10.9.9.9:80".parse().unwrap()],
        )
}

/// `weft status -c` this weft's config: (exit code, stdout).
fn weft_status(weft: &Weft) -> (i32, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("status")
        .arg("-c")
        .arg(weft.path("weft.toml"))
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_status_prints_routes_and_exits_by_health() {
    let a = Backend::start("a").await;
    let mut weft = Weft::builder()
        .services(&alpha_and_outside(&a))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    // HAProxy serves a moment before weft records that its start is done.
    let text = support::eventually(Duration::from_secs(10), "weft healthy", || async {
        let (code, text) = weft_status(&weft);
        (code == 0).then_some(text.clone()).ok_or(text)
    })
    .await;
    assert!(text.contains("healthy"), "{text}");
    assert!(text.contains("haproxy: running"), "{text}");
    assert!(
        text.contains(&format!("alpha.test/ -> alpha [{}]", a.addr)),
        "{text}"
    );
    assert!(text.contains("file"), "{text}");
    assert!(text.contains("dropped (1):"), "{text}");

    // Not answering: unhealthy.
    weft.stop();
    let (code, text) = weft_status(&weft);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no weft answers"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_status_names_the_problem_of_an_unhealthy_weft() {
    // A Consul that is not there: the source is degraded, and weft unhealthy.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let weft = Weft::builder().consul(&nobody, "").start().await;
    let text = support::eventually(Duration::from_secs(15), "consul degraded", || async {
        let (code, text) = weft_status(&weft);
        (code == 1 && text.contains("problem: source consul is degraded"))
            .then_some(text.clone())
            .ok_or(text)
    })
    .await;
    assert!(text.contains("UNHEALTHY"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_with_the_text_logs_fields() {
    let a = Backend::start("a").await;
    let weft = Weft::builder()
        .env("WEFT_LOG_FORMAT", "json")
        .services(&alpha_and_outside(&a))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    weft.wait_for_log("input dropped").await;
    weft.wait_for_log("routing applied").await;
    let log = weft.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
    }
    let dropped = lines
        .iter()
        .find(|l| l["message"] == "input dropped")
        .unwrap();
    assert_eq!(dropped["level"], "WARN");
    assert_eq!(dropped["source"], "file");
    assert!(dropped["subject"].as_str().unwrap().contains("outside"));
    assert!(dropped["reason"].as_str().unwrap().contains("10.9.9.9"));
    let applied = lines
        .iter()
        .find(|l| l["message"] == "routing applied")
        .unwrap();
    assert!(applied["services"].is_number(), "{applied}");
}

/// Traffic driven through HAProxy shows in `/status` (per service, its server's state) and in
/// HAProxy's own exporter at `/metrics/haproxy`, parsed as Prometheus text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_through_haproxy_shows_in_status_and_in_the_exporter() {
    use axum::http::StatusCode;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/fail",
            axum::routing::get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .fallback(|| async { "ok" });
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &[addr]))
        .start()
        .await;
    support::eventually(Duration::from_secs(10), "alpha.test routed", || async {
        match weft.get("alpha.test", "/").await {
            Ok((200, _)) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    for _ in 0..20 {
        assert_eq!(weft.get("alpha.test", "/").await.unwrap().0, 200);
    }
    for _ in 0..5 {
        assert_eq!(weft.get("alpha.test", "/fail").await.unwrap().0, 500);
    }

    let traffic = support::eventually(Duration::from_secs(10), "traffic in /status", || async {
        let (_, body) = weft.status("/status").await?;
        let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let alpha = status["traffic"]["alpha"].clone();
        (alpha["responses"]["2xx"].as_u64() >= Some(21) && alpha["responses"]["5xx"] == 5)
            .then_some(alpha)
            .ok_or(body)
    })
    .await;
    assert!(traffic["requests"].as_u64() >= Some(26), "{traffic}");
    let servers = traffic["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "only the slot in use: {traffic}");
    assert_eq!(servers[0]["address"], addr.to_string());
    assert!(servers[0]["status"].is_string(), "{traffic}");

    let (code, body) = weft.status("/metrics/haproxy?scope=backend").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let responses = |class: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "haproxy_backend_http_responses_total"
                    && s.labels.get("proxy") == Some("be_alpha")
                    && s.labels.get("code") == Some(class)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert!(responses("2xx") >= Some(21.0), "{body}");
    assert_eq!(responses("5xx"), Some(5.0), "{body}");
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric.starts_with("haproxy_server_")),
        "scope=backend keeps servers out"
    );
    let (code, _) = weft
        .status("/metrics/haproxy?scope=backend%0d%0a")
        .await
        .unwrap();
    assert_eq!(code, 400);

    // A new service runs on a spare backend of the pool; its figures carry its name all the
    // same: in /status by service, in the exporter as its own backend's name.
    let b = Backend::start("b").await;
    weft.write_services(
        &(service("alpha", &["alpha.test"], None, &[addr])
            + &service("beta", &["beta.test"], None, &[b.addr])),
    );
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
    let (_, body) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let beta = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "beta")
        .unwrap();
    assert_eq!(beta["backend"], "spare_1", "{body}");
    for _ in 0..3 {
        assert_eq!(weft.get("beta.test", "/").await.unwrap().0, 200);
    }
    support::eventually(Duration::from_secs(10), "beta's traffic", || async {
        let (_, body) = weft.status("/status").await?;
        let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        (status["traffic"]["beta"]["requests"].as_u64() >= Some(3))
            .then_some(())
            .ok_or(body)
    })
    .await;
    let (_, body) = weft.status("/metrics/haproxy?scope=backend").await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let proxies: std::collections::BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter_map(|s| s.labels.get("proxy"))
        .collect();
    assert!(proxies.contains("be_beta"), "{proxies:?}");
    assert!(!proxies.contains("spare_1"), "{proxies:?}");
    assert!(
        proxies.contains("spare_2"),
        "a free spare keeps its name: {proxies:?}"
    );
    server.abort();
}
