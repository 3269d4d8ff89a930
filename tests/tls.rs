//! HTTPS against real HAProxy: certificates by SNI, weft's default certificate, certificates
//! added, renewed and removed at runtime (no reload, no failed request), broken ones dropped
//! with their reason. Certificates are issued at test time by a test CA (rcgen); what is served
//! is read with `openssl s_client`, requests go through `curl` (HTTP/2 by ALPN).

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::tls::{
    curl, curl_body, curl_headers, install, require_tool, served, unix_now, wait_for_serial, TestCa,
};
use support::{eventually, patience, service, wait_for_backends, Backend, Weft};

/// The tools checked, a backend, a test CA.
async fn setup() -> (Backend, TestCa) {
    require_tool("openssl", "openssl");
    require_tool("curl", "curl");
    (Backend::start("backend").await, TestCa::new())
}

/// weft with `[tls]`, routing a.test and b.test to `backend`, the certificates' directory
/// holding `files` before it starts.
async fn weft_with(backend: &Backend, files: &[(&str, &str)]) -> Weft {
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join("certs").join(name), content).unwrap();
    }
    let weft = Weft::builder()
        .dir(dir)
        .tls()
        .services(&service(
            "alpha",
            &["a.test", "b.test", "c.test"],
            None,
            &[backend.addr],
        ))
        .start()
        .await;
    wait_for_backends(&weft, "a.test", "/", &[&backend.name]).await;
    weft
}

async fn status_json(weft: &Weft) -> serde_json::Value {
    let (code, body) = weft.status("/status").await.unwrap();
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

async fn metric(weft: &Weft, name: &str) -> Option<String> {
    let (_, body) = weft.status("/metrics").await.unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")).map(str::to_string))
}

/// Waits until `sni` gets weft's default certificate.
async fn wait_for_default(port: u16, sni: &str) {
    eventually(
        Duration::from_secs(2),
        &format!("{sni} gets the default certificate"),
        || async {
            match served(port, Some(sni)) {
                Ok(s) if s.common_name == "weft default" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

async fn reloads(weft: &Weft) -> u64 {
    weft.show_proc().await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_hosts_certificate_and_a_client_without_sni_gets_the_default() {
    let (backend, ca) = setup().await;
    let a = ca.issue(&["a.test"], 30);
    let b = ca.issue(&["b.test", "www.b.test"], 60);
    let weft = weft_with(&backend, &[("a.pem", &a.pem), ("b.pem", &b.pem)]).await;
    let port = weft.tls_port.unwrap();

    assert_eq!(served(port, Some("a.test")).unwrap().serial, a.serial);
    assert_eq!(served(port, Some("b.test")).unwrap().serial, b.serial);
    assert_eq!(served(port, Some("www.b.test")).unwrap().serial, b.serial);
    for sni in [None, Some("unknown.test")] {
        let default = served(port, sni).unwrap();
        assert_eq!(default.common_name, "weft default", "{sni:?}");
    }
    // Routed as on port 80, verified against the CA, HTTP/2 by ALPN.
    assert_eq!(curl_body(port, "a.test", &ca.file).unwrap(), "backend");
    let answers = curl(port, "b.test", Some(&ca.file), true, 3).unwrap();
    assert!(
        answers.iter().all(|a| *a == (200, "2".into())),
        "{answers:?}"
    );
    // No route: the same 404 as on port 80.
    let answers = curl(port, "nowhere.test", None, true, 1).unwrap();
    assert_eq!(answers[0].0, 404);

    let status = status_json(&weft).await;
    let certs = status["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert_eq!(certs[1]["name"], "b");
    assert_eq!(
        certs[1]["sans"],
        serde_json::json!(["b.test", "www.b.test"])
    );
    assert_eq!(certs[1]["serial"], b.serial.as_str());
    let earliest = served(port, Some("a.test")).unwrap().not_after;
    assert_eq!(certs[0]["not_after"], earliest);
    assert_eq!(metric(&weft, "weft_tls_certificates").await.unwrap(), "2");
    let (_, page) = weft.status("/").await.unwrap();
    assert!(
        page.contains("TLS certificates (2)") && page.contains("<code>www.b.test</code>"),
        "{page}"
    );
    assert_eq!(
        metric(&weft, "weft_tls_certificate_earliest_expiry_seconds")
            .await
            .unwrap(),
        earliest.to_string()
    );
    // What runs is on disk: the crt-list names weft's default first, then each certificate.
    let list = std::fs::read_to_string(weft.run_dir().join("certs.list")).unwrap();
    let run = weft.run_dir().display().to_string();
    assert_eq!(
        list,
        format!("{run}/tls-default.pem\n{run}/certs/a.pem\n{run}/certs/b.pem\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_under_http2_load_fails_no_request_and_reloads_nothing() {
    let (backend, ca) = setup().await;
    let first = ca.issue(&["a.test"], 30);
    let weft = weft_with(&backend, &[("a.pem", &first.pem)]).await;
    let port = weft.tls_port.unwrap();
    wait_for_serial(port, Some("a.test"), &first.serial).await;
    let reloads_before = reloads(&weft).await;
    let metric_before = metric(&weft, "weft_haproxy_reloads_total").await;

    // Clients: each curl run makes a new TLS handshake and 10 HTTP/2 requests on it.
    let stop = Arc::new(AtomicBool::new(false));
    let ca_file = ca.file.clone();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        let ca_file = ca_file.clone();
        clients.push(tokio::task::spawn_blocking(move || {
            let (mut ok, mut failed, mut errors) = (0usize, 0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match curl(port, "a.test", Some(&ca_file), true, 10) {
                    Ok(answers) => {
                        for answer in answers {
                            if answer == (200, "2".into()) {
                                ok += 1;
                            } else {
                                failed += 1;
                                errors.push(format!("{answer:?}"));
                            }
                        }
                    }
                    Err(err) => {
                        failed += 10;
                        errors.push(err);
                    }
                }
            }
            (ok, failed, errors)
        }));
    }
    let mut last = first.clone();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        last = ca.issue(&["a.test"], 60);
        install(&weft.certs_dir(), "a.pem", &last.pem);
        let took = wait_for_serial(port, Some("a.test"), &last.serial).await;
        println!("renewed certificate served after {took:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    for client in clients {
        let (o, f, e) = client.await.unwrap();
        ok += o;
        failed += f;
        errors.extend(e);
    }
    println!("HTTP/2 requests during 3 renewals: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 50, "too few requests to show anything: {ok}");
    assert_eq!(reloads(&weft).await, reloads_before, "show proc: reloads");
    assert_eq!(
        metric(&weft, "weft_haproxy_reloads_total").await,
        metric_before,
        "weft's reload metric"
    );
    assert_eq!(served(port, Some("a.test")).unwrap().serial, last.serial);
    // A reload at any later moment serves the same: the installed file is the renewed one.
    let installed = std::fs::read_to_string(weft.run_dir().join("certs/a.pem")).unwrap();
    assert!(installed.starts_with(last.cert.trim_end()), "{installed}");
    assert!(weft.log().contains("certificates ~a"), "{}", weft.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_served_within_a_second_and_a_removed_one_goes() {
    let (backend, ca) = setup().await;
    let weft = weft_with(&backend, &[]).await;
    let port = weft.tls_port.unwrap();
    let reloads_before = reloads(&weft).await;
    assert_eq!(
        served(port, Some("c.test")).unwrap().common_name,
        "weft default"
    );

    let c = ca.issue(&["c.test"], 30);
    let written = Instant::now();
    install(&weft.certs_dir(), "c.pem", &c.pem);
    wait_for_serial(port, Some("c.test"), &c.serial).await;
    let took = written.elapsed();
    println!("a new certificate was served {took:?} after its file appeared");
    assert!(
        took <= patience(Duration::from_secs(1)),
        "a new certificate took {took:?}"
    );
    assert_eq!(curl_body(port, "c.test", &ca.file).unwrap(), "backend");

    std::fs::remove_file(weft.certs_dir().join("c.pem")).unwrap();
    wait_for_default(port, "c.test").await;
    // HAProxy changes first, the files right after (a managed HAProxy).
    let installed = weft.run_dir().join("certs/c.pem");
    eventually(Duration::from_secs(2), "certs/c.pem removed", || async {
        match installed.exists() {
            false => Ok(()),
            true => Err("still there"),
        }
    })
    .await;
    assert_eq!(
        reloads(&weft).await,
        reloads_before,
        "no reload for any of it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_pems_are_dropped_with_their_reason_while_the_others_serve() {
    let (backend, ca) = setup().await;
    let good = ca.issue(&["a.test"], 30);
    let other = ca.issue(&["b.test"], 30);
    let now = unix_now();
    let expired = ca.issue_between(&["c.test"], now - 10 * 86_400, now - 86_400);
    let mismatch = format!("{}{}", other.cert, good.key);
    let weft = weft_with(
        &backend,
        &[
            ("a.pem", &good.pem),
            ("garbage.pem", "this is not a certificate\n"),
            ("mismatch.pem", &mismatch),
            ("expired.pem", &expired.pem),
        ],
    )
    .await;
    let port = weft.tls_port.unwrap();
    assert_eq!(served(port, Some("a.test")).unwrap().serial, good.serial);
    assert_eq!(
        served(port, Some("c.test")).unwrap().common_name,
        "weft default"
    );

    let status = status_json(&weft).await;
    let dropped: Vec<(String, String)> = support::dropped(&status)
        .into_iter()
        .filter(|(source, _, _)| source == "tls")
        .map(|(_, subject, reason)| (subject, reason))
        .collect();
    assert_eq!(dropped.len(), 3, "{dropped:?}");
    let reason = |file: &str| {
        dropped
            .iter()
            .find(|(subject, _)| subject.contains(file))
            .map(|(_, reason)| reason.clone())
            .unwrap_or_default()
    };
    assert!(
        reason("expired.pem").starts_with("expired on"),
        "{dropped:?}"
    );
    assert!(reason("garbage.pem").starts_with("not PEM"), "{dropped:?}");
    assert_eq!(
        reason("mismatch.pem"),
        "the private key does not match the certificate"
    );
    assert_eq!(status["certificates"].as_array().unwrap().len(), 1);
    assert_eq!(
        metric(&weft, "weft_dropped_inputs{source=\"tls\"}")
            .await
            .unwrap(),
        "3"
    );
    weft.wait_for_log("reason=the private key does not match the certificate")
        .await;
    // A good certificate broken in place keeps nothing of it: a.test falls back to the
    // default, and says why.
    install(
        &weft.certs_dir(),
        "a.pem",
        &format!("{}{}", good.cert, other.key),
    );
    wait_for_default(port, "a.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_certificate_haproxy_serves_port_80_and_the_default_on_tls() {
    let (backend, _) = setup().await;
    let weft = weft_with(&backend, &[]).await;
    let port = weft.tls_port.unwrap();
    // Port 80 serves (weft_with waited for it), and TLS answers with weft's default.
    let default = served(port, Some("a.test")).unwrap();
    assert_eq!(default.common_name, "weft default");
    assert_eq!(served(port, None).unwrap(), default);
    let answers = curl(port, "a.test", None, true, 2).unwrap();
    assert_eq!(answers, [(200, "2".into()), (200, "2".into())]);
    let status = status_json(&weft).await;
    assert_eq!(status["certificates"], serde_json::json!([]));
    assert_eq!(metric(&weft, "weft_tls_certificates").await.unwrap(), "0");
    assert_eq!(
        metric(&weft, "weft_tls_certificate_earliest_expiry_seconds").await,
        None
    );
    // The default is made once: a restarted weft serves the same one.
    let kept = std::fs::read_to_string(weft.run_dir().join("tls-default.pem")).unwrap();
    assert!(kept.contains("PRIVATE KEY"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(weft.run_dir().join("tls-default.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_runtime_api_refuses_is_applied_by_a_reload() {
    let (backend, ca) = setup().await;
    let weft = weft_with(&backend, &[]).await;
    let port = weft.tls_port.unwrap();
    let reloads_before = reloads(&weft).await;
    // A long chain: more than HAProxy's CLI takes as one payload (its buffer, 16 KiB).
    let leaf = ca.issue(&["c.test"], 30);
    let chain = ca.issue(&["chain.test"], 30).cert.repeat(40);
    assert!(chain.len() > 20_000);
    install(
        &weft.certs_dir(),
        "c.pem",
        &format!("{}{chain}{}", leaf.cert, leaf.key),
    );
    wait_for_serial(port, Some("c.test"), &leaf.serial).await;
    assert!(
        reloads(&weft).await > reloads_before,
        "served without a reload: the payload was taken after all"
    );
    weft.wait_for_log("runtime update failed, reloading instead")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_https_and_hsts_where_a_certificate_covers_the_host() {
    let (backend, ca) = setup().await;
    let a = ca.issue(&["a.test"], 30);
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/a.pem"), &a.pem).unwrap();
    let services = format!(
        "[[service]]\nname = \"alpha\"\nhosts = [\"a.test\", \"c.test\"]\n\
         servers = [\"{}\"]\nredirect = \"https\"\nhsts = true\n\
         [[service]]\nname = \"beta\"\nhosts = [\"b.test\"]\nservers = [\"{}\"]\n",
        backend.addr, backend.addr
    );
    let weft = Weft::builder()
        .dir(dir)
        .tls()
        .services(&services)
        .start()
        .await;
    wait_for_backends(&weft, "c.test", "/", &[&backend.name]).await;
    let (http, https) = (weft.port, weft.tls_port.unwrap());
    let header = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };

    // Covered: plain HTTP is redirected, path and query kept.
    let (status, headers) = curl_headers("http", http, "a.test", "/x?y=1", &ca.file).unwrap();
    assert_eq!(status, 301);
    // (The TLS bind's port, as it is not 443 here.)
    assert_eq!(
        header(&headers, "location"),
        Some(format!("https://a.test:{https}/x?y=1"))
    );
    assert_eq!(header(&headers, "strict-transport-security"), None);
    // ACME HTTP-01 challenges stay on HTTP.
    let (status, _) = curl_headers(
        "http",
        http,
        "a.test",
        "/.well-known/acme-challenge/token",
        &ca.file,
    )
    .unwrap();
    assert_eq!(status, 200);
    // HTTPS answers carry HSTS.
    let (status, headers) = curl_headers("https", https, "a.test", "/", &ca.file).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "strict-transport-security").as_deref(),
        Some("max-age=31536000")
    );
    // Not covered: served on HTTP, and reported.
    let (status, _) = curl_headers("http", http, "c.test", "/", &ca.file).unwrap();
    assert_eq!(status, 200);
    let status = status_json(&weft).await;
    let reported = status["dropped"].as_array().unwrap().iter().any(|d| {
        d["subject"] == "service \"alpha\" redirect of host \"c.test\""
            && d["reason"]
                .as_str()
                .unwrap()
                .starts_with("no TLS certificate covers c.test")
    });
    assert!(reported, "{status}");
    // A service that asks for no redirect: neither.
    let (status, headers) = curl_headers("http", http, "b.test", "/", &ca.file).unwrap();
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "strict-transport-security"), None);

    // A certificate for c.test arrives: its redirect follows (a config change: a reload).
    let c = ca.issue(&["c.test"], 30);
    install(&weft.certs_dir(), "c.pem", &c.pem);
    eventually(Duration::from_secs(5), "c.test redirected", || async {
        match curl_headers("http", http, "c.test", "/", &ca.file) {
            Ok((301, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
