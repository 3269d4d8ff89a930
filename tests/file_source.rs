//! End to end: services.toml -> weft -> real HAProxy -> loopback backends.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{service, wait_for_404, wait_for_backends, Backend, Weft};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_answers_404_for_unknown_hosts() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let services = service("alpha", &["alpha.test"], None, &[a.addr])
        + &service(
            "beta",
            &["beta.test", "www.beta.test"],
            None,
            &[b.addr, c.addr],
        )
        + &service("beta-api", &["beta.test"], Some("/api"), &[a.addr]);
    let weft = Weft::builder().services(&services).start().await;

    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    wait_for_backends(&weft, "beta.test", "/", &["b", "c"]).await;
    wait_for_backends(&weft, "www.beta.test", "/anything", &["b", "c"]).await;
    // Host is matched without its port and case-insensitively.
    wait_for_backends(&weft, "ALPHA.test:80", "/", &["a"]).await;
    // The path prefix takes /api and /api/..., not /apix.
    wait_for_backends(&weft, "beta.test", "/api", &["a"]).await;
    wait_for_backends(&weft, "beta.test", "/api/v1/x", &["a"]).await;
    wait_for_backends(&weft, "beta.test", "/apix", &["b", "c"]).await;
    wait_for_404(&weft, "unknown.test", "/").await;
    wait_for_404(&weft, "alpha.test.evil", "/").await;
    // Nothing dropped is a 0, not a missing series.
    let (_, metrics) = weft.status("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "weft_dropped_inputs{source=\"file\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_move_traffic() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let alpha = |hosts: &[&str], path| service("alpha", hosts, path, &[a.addr]);
    let weft = Weft::builder()
        .services(
            &(alpha(&["alpha.test"], None)
                + &service("beta", &["beta.test"], None, &[b.addr, c.addr])),
        )
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    wait_for_backends(&weft, "beta.test", "/", &["b", "c"]).await;

    // Add a host (saved by rename, as editors do).
    weft.write_services(
        &(alpha(&["alpha.test", "alpha2.test"], None)
            + &service("beta", &["beta.test"], None, &[b.addr, c.addr])),
    );
    wait_for_backends(&weft, "alpha2.test", "/", &["a"]).await;

    // Remove a server (written in place).
    weft.overwrite_services(
        &(alpha(&["alpha.test", "alpha2.test"], None)
            + &service("beta", &["beta.test"], None, &[b.addr])),
    );
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;

    // Add a service.
    weft.write_services(
        &(alpha(&["alpha.test", "alpha2.test"], None)
            + &service("beta", &["beta.test"], None, &[b.addr])
            + &service("gamma", &["gamma.test"], None, &[c.addr])),
    );
    wait_for_backends(&weft, "gamma.test", "/", &["c"]).await;

    // Change a path: alpha moves from / to /v1.
    weft.write_services(
        &(alpha(&["alpha.test", "alpha2.test"], Some("/v1"))
            + &service("beta", &["beta.test"], None, &[b.addr])
            + &service("gamma", &["gamma.test"], None, &[c.addr])),
    );
    wait_for_backends(&weft, "alpha.test", "/v1/x", &["a"]).await;
    wait_for_404(&weft, "alpha.test", "/").await;

    // Remove a service: its host answers 404.
    weft.write_services(
        &(alpha(&["alpha.test", "alpha2.test"], Some("/v1"))
            + &service("beta", &["beta.test"], None, &[b.addr])),
    );
    wait_for_404(&weft, "gamma.test", "/").await;
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_keeps_the_old_routes_serving() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let good = service("alpha", &["alpha.test"], None, &[a.addr]);
    let weft = Weft::builder().services(&good).start().await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let (reloads_before, _, _) = weft.show_proc().await.unwrap();

    // Broken TOML, then a typo'd table name: both keep the last good services.
    for broken in [
        format!("{good}[[service]\nname = \"beta\""),
        "[[services]]\nname = \"alpha\"\n".to_string(),
    ] {
        weft.write_services(&broken);
        support::eventually(
            Duration::from_secs(5),
            "the broken edit is noticed",
            || async {
                if weft.log().matches("keeping the last good services").count() > 0 {
                    Ok(())
                } else {
                    Err("not yet")
                }
            },
        )
        .await;
        for _ in 0..10 {
            assert_eq!(
                weft.get("alpha.test", "/").await.unwrap(),
                (200, "a".to_string())
            );
        }
    }
    let (reloads_after, failed, _) = weft.show_proc().await.unwrap();
    assert_eq!(
        reloads_after, reloads_before,
        "a broken file must not reload HAProxy"
    );
    assert_eq!(failed, 0);

    // A valid edit is taken again.
    weft.write_services(&(good + &service("beta", &["beta.test"], None, &[b.addr])));
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_file_causes_no_reload() {
    let a = Backend::start("a").await;
    let services = service("alpha", &["alpha.test"], None, &[a.addr]);
    let weft = Weft::builder().services(&services).start().await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let (before, _, _) = weft.show_proc().await.unwrap();

    // Same content rewritten, and a comment added: the routing is the same.
    weft.write_services(&services);
    weft.write_services(&format!("# a comment\n{services}"));
    // A real change afterwards (one that reloads) proves the earlier events were processed
    // by then.
    let b = Backend::start("b").await;
    weft.write_services(&format!(
        "# a comment\n{services}{}",
        support::reloading_service("beta", &["beta.test"], &[b.addr])
    ));
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
    let (after, failed, _) = weft.show_proc().await.unwrap();
    assert_eq!(after, before + 1, "only the real change reloads");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_dropped_and_the_rest_routes() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let services = format!(
        r#"
[[service]]
name = "space"
hosts = ["bad host.test"]
servers = ["{a}"]

[[service]]
name = "newline"
hosts = ["bad\nhost.test"]
servers = ["{a}"]

[[service]]
name = "hash"
hosts = ["bad#host.test"]
servers = ["{a}"]

[[service]]
name = "port0"
hosts = ["port0.test"]
servers = ["127.0.0.1:0"]

[[service]]
name = "port70000"
hosts = ["port70000.test"]
servers = ["127.0.0.1:70000"]

[[service]]
name = "outside"
hosts = ["outside.test"]
servers = ["192.0.2.10:80"]

[[service]]
name = "quote"
hosts = ["quote.test"]
servers = ["{a}"]
check = "/it's"

[[service]]
name = "default"
hosts = ["default.test"]
servers = ["{a}"]
check = "/health/?full=1"

[[service]]
name = "good"
hosts = ["good.test"]
servers = ["{b}"]
"#,
        a = a.addr,
        b = b.addr
    );
    let weft = Weft::builder().services(&services).start().await;
    wait_for_backends(&weft, "good.test", "/", &["b"]).await;

    let log = weft.log();
    for expected in [
        r#"subject=service "space" host "bad host.test" reason=invalid hostname: contains a space"#,
        r#"subject=service "newline" host "bad\nhost.test" reason=invalid hostname: contains a newline"#,
        r#"subject=service "hash" host "bad#host.test" reason=invalid hostname: contains '#'"#,
        r#"subject=service "port0" server "127.0.0.1:0" reason=invalid server port 0"#,
        r#"subject=service "port70000" server "127.0.0.1:70000" reason=invalid server port 70000"#,
        r#"subject=service "outside" server "192.0.2.10:80" reason=address 192.0.2.10 is outside the allowed networks"#,
        r#"subject=service "quote" reason=invalid health check path: contains '\''"#,
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    // A service may be called like weft's own 404 backend; its check keeps its query.
    wait_for_backends(&weft, "default.test", "/", &["a"]).await;
    let config = std::fs::read_to_string(weft.run_dir().join("haproxy.cfg")).unwrap();
    assert!(
        config.contains("option httpchk GET /health/?full=1"),
        "{config}"
    );
    // Services left without servers route to an empty backend (503), never elsewhere.
    for host in ["port0.test", "port70000.test", "outside.test"] {
        let (status, body) = weft.get(host, "/").await.unwrap();
        assert_eq!(status, 503, "{host}");
        assert_eq!(
            body, "weft: no server of this service is available right now\n",
            "{host}"
        );
    }
    for host in ["bad host.test", "badhost.test"] {
        let (status, _) = weft.get(host, "/").await.unwrap_or((0, String::new()));
        assert_ne!(status, 200, "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_is_restarted_when_it_dies_and_stopped_with_weft() {
    let a = Backend::start("a").await;
    let mut weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .on_exit("stop")
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let first = weft.haproxy_pid().unwrap();

    support::signal(first, "KILL");
    support::eventually(Duration::from_secs(10), "a new haproxy master", || async {
        match weft.haproxy_pid() {
            Some(pid) if pid != first && support::process_alive(pid) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;

    let second = weft.haproxy_pid().unwrap();
    let status = weft.stop().unwrap();
    assert!(status.success(), "weft exits cleanly on SIGTERM: {status}");
    assert!(!support::process_alive(second), "haproxy stopped with weft");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_endpoints_show_routes_drops_and_health() {
    let a = Backend::start("a").await;
    let services = service("alpha", &["alpha.test"], None, &[a.addr])
        + &service("evil<script>", &["evil.test"], None, &[a.addr])
        + &service(
            "outside",
            &["outside.test"],
            None,
            &["192.0.2.1:80".parse().unwrap()],
        );
    let weft = Weft::builder().services(&services).start().await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;

    // The status follows right after the apply that made the route serve.
    support::eventually(Duration::from_secs(5), "healthz ok", || async {
        match weft.status("/healthz").await? {
            (200, body) if body == "ok\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (code, json) = weft.status("/status").await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["healthy"], true);
    assert_eq!(status["sources"][0]["name"], "file");
    assert_eq!(status["sources"][0]["state"], "ok");
    assert_eq!(status["routes"][0]["host"], "alpha.test");
    assert_eq!(status["routes"][0]["servers"][0], a.addr.to_string());
    assert_eq!(status["haproxy"]["running"], true);
    let dropped = status["dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 2, "{dropped:?}");

    // Prometheus sees the same.
    let (code, metrics) = weft.status("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for line in [
        "weft_routes 2",
        "weft_backends_without_servers 1",
        "weft_dropped_inputs{source=\"file\"} 2",
        "weft_source_up{source=\"file\"} 1",
        "weft_haproxy_up 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing in:\n{metrics}"
        );
    }

    // Hostile names are escaped on the HTML page.
    let (code, html) = weft.status("/").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        html.contains("evil&#60;script&#62;") || html.contains("evil&lt;script&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script>"));

    // A broken file: the source is degraded, /healthz says why, routes keep serving.
    weft.write_services("[[service]\n");
    support::eventually(
        Duration::from_secs(5),
        "healthz reports the broken file",
        || async {
            match weft.status("/healthz").await? {
                (503, body)
                    if body.contains("source file is degraded")
                        && body.contains("not valid TOML") =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        weft.get("alpha.test", "/").await.unwrap(),
        (200, "a".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_goes_to_syslog() {
    let syslog = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a = Backend::start("a").await;
    let weft = Weft::builder()
        .access_log(syslog.local_addr().unwrap())
        .services(&service("shop", &["shop.test"], None, &[a.addr]))
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    weft.get("shop.test", "/logged").await.unwrap();

    // One syslog datagram per request, in HAProxy's httplog format with the service in place
    // of the backend (a spare backend's name never shows): frontend, service/server, status,
    // request line.
    let mut buf = vec![0u8; 4096];
    let line = tokio::time::timeout(support::patience(Duration::from_secs(5)), async {
        loop {
            let n = syslog.recv(&mut buf).await.unwrap();
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            if line.contains("/logged") {
                return line;
            }
        }
    })
    .await
    .expect("an access log line for GET /logged");
    assert!(line.contains("http shop/s1"), "{line}");
    assert!(line.contains(" 200 "), "{line}");
    assert!(line.contains("\"GET /logged HTTP/1.1\""), "{line}");
}

/// HAProxy runs with `haproxy.maxconn`, not with what the open-files limit it inherits would
/// give it, and raises that limit to fit; weft raises its own soft limit to the hard one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_runs_with_the_configured_maxconn_and_weft_at_its_hard_limit() {
    let weft = Weft::builder()
        .maxconn(3000)
        .soft_open_files(512)
        .start()
        .await;
    let socket = weft.run_dir().join("admin.sock");
    let info = support::eventually(Duration::from_secs(10), "show info", || {
        support::cli(&socket, "show info")
    })
    .await;
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in show info:\n{info}"))
    };
    assert_eq!(field("Maxconn"), 3000);
    // Two per connection, from the 512 it inherited.
    assert!(field("Ulimit-n") >= 6000, "{info}");

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", weft.pid().unwrap())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[0], open_files[1],
        "weft's soft limit is its hard one"
    );
    weft.wait_for_log(&format!(
        "open files limit set to the hard limit before=512 after={}",
        open_files[1]
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_connections_fails_no_request() {
    let a = Backend::start("a").await;
    // A container that died before any health check noticed: its port refuses connections.
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let weft = Weft::builder()
        .services(&service("shop", &["shop.test"], None, &[a.addr, gone]))
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    // Round robin sends every other request to the dead server; each is redispatched.
    for _ in 0..40 {
        let (status, body) = weft.get("shop.test", "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "a"));
    }
}

/// A directory laid out as Kubernetes mounts a ConfigMap: `services.toml ->
/// ..data/services.toml`, `..data -> vN`. An update is what the kubelet does: a new `vN`, a new
/// `..data` link renamed over the old one, the old version removed.
struct ConfigMap {
    dir: std::path::PathBuf,
    version: usize,
}

impl ConfigMap {
    fn create(dir: &std::path::Path, services: &str) -> ConfigMap {
        let map = ConfigMap {
            dir: dir.to_path_buf(),
            version: 0,
        };
        map.write_version(services);
        std::os::unix::fs::symlink("v0", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/services.toml", dir.join("services.toml")).unwrap();
        map
    }

    fn write_version(&self, services: &str) {
        let version = self.dir.join(format!("v{}", self.version));
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("services.toml"), services).unwrap();
    }

    fn update(&mut self, services: &str) {
        self.version += 1;
        self.write_version(services);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(format!("v{}", self.version - 1))).unwrap();
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_followed() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dir = temp_dir("weft-test-");
    let first = service("shop", &["shop.test"], None, &[a.addr]);
    let mut map = ConfigMap::create(dir.path(), &first);
    let weft = Weft::builder().dir(dir).start().await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;

    map.update(&service("shop", &["shop.test"], None, &[b.addr]));
    // Well before the 30 s re-read.
    wait_for_backends(&weft, "shop.test", "/", &["b"]).await;
    assert!(weft.log().contains("symlinked=true"), "{}", weft.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_into_another_directory_is_followed() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let elsewhere = temp_dir("weft-test-conf-");
    let target = elsewhere.path().join("shop.toml");
    let first = service("shop", &["shop.test"], None, &[a.addr]);
    std::fs::write(&target, &first).unwrap();
    let dir = temp_dir("weft-test-");
    std::os::unix::fs::symlink(&target, dir.path().join("services.toml")).unwrap();
    let weft = Weft::builder().dir(dir).start().await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;

    // Saved the editors' way, in the target's directory.
    let tmp = elsewhere.path().join(".shop.toml.swp");
    std::fs::write(&tmp, service("shop", &["shop.test"], None, &[b.addr])).unwrap();
    std::fs::rename(&tmp, &target).unwrap();
    wait_for_backends(&weft, "shop.test", "/", &["b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_to_a_configmap_mount_follows_every_update() {
    let a = Backend::start("a").await;
    // weft's services.toml -> <mount>/services.toml -> ..data/services.toml -> vN/...
    let mount = temp_dir("weft-test-mount-");
    let first = service("shop", &["shop.test"], None, &[a.addr]);
    let mut map = ConfigMap::create(mount.path(), &first);
    let dir = temp_dir("weft-test-");
    std::os::unix::fs::symlink(
        mount.path().join("services.toml"),
        dir.path().join("services.toml"),
    )
    .unwrap();
    let weft = Weft::builder().dir(dir).start().await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;

    // The first update removes the version whose directory weft watched: the second must
    // still be seen.
    for name in ["b", "c"] {
        let backend = Backend::start(name).await;
        map.update(&service("shop", &["shop.test"], None, &[backend.addr]));
        wait_for_backends(&weft, "shop.test", "/", &[name]).await;
    }
}

/// SIGHUP (what config-management tools send) re-reads weft.toml: weft executes itself again
/// under the same pid and adopts its HAProxy (the same master serves on), and a change to
/// weft.toml takes effect. A broken weft.toml is refused and weft runs on as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_weft_toml_and_keeps_haproxy_serving() {
    let a = Backend::start("a").await;
    let weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .on_exit("stop")
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let haproxy = weft.haproxy_pid().unwrap();
    let pid = weft.pid().unwrap() as i32;
    let toml = weft.path("weft.toml");
    let original = std::fs::read_to_string(&toml).unwrap();

    std::fs::write(&toml, format!("{original}\n[nonsense]\n")).unwrap();
    support::signal(pid, "HUP");
    weft.wait_for_log("weft.toml has errors, running on as before")
        .await;
    assert!(support::process_alive(pid));

    // A change that shows: a second services file, with another backend.
    let b = Backend::start("b").await;
    std::fs::write(
        weft.path("more.toml"),
        service("beta", &["beta.test"], None, &[b.addr]),
    )
    .unwrap();
    let changed = original.replace("path = \"services.toml\"", "path = \"more.toml\"");
    assert_ne!(changed, original);
    std::fs::write(&toml, changed).unwrap();
    support::signal(pid, "HUP");
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
    assert!(support::process_alive(pid), "the same weft process runs on");
    assert_eq!(
        weft.haproxy_pid(),
        Some(haproxy),
        "the same haproxy master serves on"
    );
    assert!(weft.log().contains("adopted the haproxy"), "{}", weft.log());
}

/// HAProxy's workers, which parse every request from the internet, do not run as root: weft
/// (root here) renders `uid`/`gid` of `haproxy.user` (Debian's `haproxy`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxys_workers_do_not_run_as_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: not root, so HAProxy cannot switch users anyway");
        return;
    }
    let a = Backend::start("a").await;
    let weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let master = weft.haproxy_pid().unwrap();
    let uid_of = |pid: &str| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2)?.parse().ok()
    };
    let parent_of = |pid: &str| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let worker_pids: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        .filter(|pid| parent_of(pid) == Some(master))
        .collect();
    let workers: Vec<u32> = worker_pids.iter().filter_map(|pid| uid_of(pid)).collect();
    // Chrooted into an empty directory of run_dir's.
    let jail = weft.run_dir().canonicalize().unwrap().join("empty");
    for pid in &worker_pids {
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
        assert_eq!(root, jail, "worker {pid}'s root");
    }
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
    let haproxy = nix::unistd::User::from_name("haproxy").unwrap().unwrap();
    assert!(!workers.is_empty(), "no worker of master {master}");
    assert!(
        workers.iter().all(|uid| *uid == haproxy.uid.as_raw()),
        "workers' effective uids {workers:?}, haproxy is {}",
        haproxy.uid
    );
    // And they still serve, reload and take runtime changes as before.
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
}
