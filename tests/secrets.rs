//! Secrets stay secret: credentials in a source URL are refused, source clients follow no
//! redirect (so no token reaches another host), and HAProxy runs with a scrubbed environment
//! (nothing of weft's, such as `CONSUL_HTTP_TOKEN`, shows in its `show env`).

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use support::{cli, eventually, service, Backend, Weft};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// `weft check -c <dir>/weft.toml`: its stdout and stderr together.
async fn check(dir: &Path) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("check")
        .arg("-c")
        .arg(dir.join("weft.toml"))
        .output()
        .await
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// An HTTP server on a free loopback port that records every request's path and headers and
/// answers each with `answer`.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    async fn start(answer: fn() -> Response) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let app = Router::new().fallback(move |request: Request| {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .push((request.uri().to_string(), request.headers().clone()));
                answer()
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Recorder { addr, seen, task }
    }

    fn requests(&self) -> Vec<(String, HeaderMap)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the redirector sends every request: set once per test before it starts.
static TARGET: Mutex<String> = Mutex::new(String::new());

fn redirect_to_target() -> Response {
    let location = TARGET.lock().unwrap().clone();
    (StatusCode::FOUND, [("Location", location)], "moved").into_response()
}

fn empty_json() -> Response {
    (StatusCode::OK, "{}").into_response()
}

/// A dir with weft.toml holding `sources` (the bridge off), and a token file.
fn config_dir(sources: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "secret-token-123\n").unwrap();
    std::fs::write(
        dir.path().join("weft.toml"),
        format!("[bridge]\nmode = \"off\"\n{sources}\n"),
    )
    .unwrap();
    dir
}

/// One test for both sources: the redirector's target is a single static.
#[tokio::test]
async fn source_clients_follow_no_redirect() {
    let target = Recorder::start(empty_json).await;
    *TARGET.lock().unwrap() = format!(
        "http://someone:pw@127.0.0.1:{}/elsewhere?token=x",
        target.addr.port()
    );
    let redirector = Recorder::start(redirect_to_target).await;
    let named = format!("redirected to http://127.0.0.1:{};", target.addr.port());

    // Marathon (reqwest), with a token.
    let dir = config_dir(&format!(
        "[sources.marathon]\nurls = [\"http://{}\"]\ntoken_file = \"token\"\n\
         request_timeout = \"3s\"\nread_timeout = \"3s\"\n",
        redirector.addr
    ));
    let output = check(dir.path()).await;
    assert!(output.contains("302 Found"), "{output}");
    assert!(output.contains(&named), "{output}");
    assert!(output.contains("follows no redirects"), "{output}");
    for secret in ["secret-token-123", "pw@", "token=x"] {
        assert!(!output.contains(secret), "{output}");
    }
    let asked = redirector.requests();
    assert!(!asked.is_empty(), "weft never asked marathon");
    assert_eq!(
        asked[0].1.get("authorization").unwrap(),
        "token=secret-token-123"
    );

    // Consul (its own connections), with a token.
    let dir = config_dir(&format!(
        "[sources.consul]\nurl = \"http://{}\"\ntoken_file = \"token\"\n\
         [routing]\nclaims = \"local\"\n",
        redirector.addr
    ));
    let output = eventually_output(dir.path(), &named).await;
    assert!(output.contains("follows no redirects"), "{output}");
    assert!(!output.contains("secret-token-123"), "{output}");
    assert!(redirector
        .requests()
        .iter()
        .any(|(_, headers)| headers.get("x-consul-token").is_some()));

    // `weft run`: the fetch and the event stream are refused alike, and /status says why.
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("marathon.token"), "secret-token-123\n").unwrap();
    let weft = Weft::builder()
        .dir(dir)
        .marathon(
            &[format!("http://{}", redirector.addr)],
            "token_file = \"marathon.token\"\nread_timeout = \"2s\"",
        )
        .start()
        .await;
    let status = eventually(
        Duration::from_secs(10),
        "/status names the redirect",
        || async {
            let (_, body) = weft.status("/status").await?;
            if body.contains(&named) {
                Ok(body)
            } else {
                Err(body)
            }
        },
    )
    .await;
    assert!(!status.contains("secret-token-123"), "{status}");
    let (_, healthz) = weft.status("/healthz").await.unwrap();
    assert!(!healthz.contains("secret-token-123"), "{healthz}");
    // The event stream is refused alike (a WARN line).
    eventually(
        Duration::from_secs(10),
        "the stream's redirect logged",
        || async {
            let log = weft.log();
            let stream = log
                .lines()
                .any(|line| line.contains("/v2/events?") && line.contains(&named));
            if stream {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    assert!(!weft.log().contains("secret-token-123"));
    drop(weft);

    // The redirect's target never heard of weft: no request, so no token.
    assert_eq!(
        target.requests().len(),
        0,
        "followed: {:?}",
        target.requests()
    );
}

/// `weft check`'s output once it names `want` (it is asked once; a source read may take a
/// moment to fail).
async fn eventually_output(dir: &Path, want: &str) -> String {
    let output = check(dir).await;
    assert!(output.contains(want), "{output}");
    output
}

#[tokio::test]
async fn credentials_in_a_source_url_are_refused_and_never_printed() {
    let dir = config_dir(
        "[sources.consul]\nurl = \"http://weft:hunter2@127.0.0.1:1\"\n\
         [sources.marathon]\nurls = [\"http://ops:s3cret@127.0.0.1:1\"]\n",
    );
    let output = check(dir.path()).await;
    assert!(output.contains("sources.consul.url"), "{output}");
    assert!(output.contains("sources.consul.token_file"), "{output}");
    assert!(output.contains("sources.marathon.urls[0]"), "{output}");
    assert!(
        output.contains("sources.marathon.credentials_file"),
        "{output}"
    );
    for secret in ["hunter2", "s3cret", "weft:hunter2", "ops:s3cret"] {
        assert!(!output.contains(secret), "{output}");
    }
    // `weft render` and `weft run` refuse the same config, printing no secret either.
    for command in ["render", "run"] {
        let output = tokio::time::timeout(
            support::patience(Duration::from_secs(10)),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"))
                .arg(command)
                .arg("-c")
                .arg(dir.path().join("weft.toml"))
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(!output.status.success(), "weft {command} took the config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(text.contains("sources.consul.url"), "{command}: {text}");
        for secret in ["hunter2", "s3cret"] {
            assert!(!text.contains(secret), "{command}: {text}");
        }
    }
}

/// `@1 show env` on the master CLI: the current worker's environment.
async fn worker_env(weft: &Weft) -> String {
    let socket = weft.run_dir().join("master.sock");
    eventually(
        Duration::from_secs(5),
        "the worker shows its env",
        || async {
            let answer = cli(&socket, "@1 show env").await?;
            if answer.contains("PATH=") || answer.contains("HAPROXY_") {
                Ok(answer)
            } else {
                Err(answer)
            }
        },
    )
    .await
}

#[tokio::test]
async fn haproxy_runs_with_a_scrubbed_environment_across_reloads() {
    let shop = Backend::start("shop").await;
    let weft = Weft::builder()
        .services(&service("shop", &["shop.test"], None, &[shop.addr]))
        .env("CONSUL_HTTP_TOKEN", "secret-xyz")
        .env("WEFT_TEST_SECRET", "secret-abc")
        .start()
        .await;
    support::wait_for_backends(&weft, "shop.test", "/", &["shop"]).await;
    let env = worker_env(&weft).await;
    for secret in [
        "CONSUL_HTTP_TOKEN",
        "secret-xyz",
        "WEFT_TEST_SECRET",
        "WEFT_LOG",
    ] {
        assert!(!env.contains(secret), "{secret} in HAProxy's env:\n{env}");
    }
    assert!(env.contains("PATH="), "{env}");

    // A new service is a reload: the master re-executes itself with its own environment.
    let (reloads, _, _) = weft.show_proc().await.unwrap();
    let cart = Backend::start("cart").await;
    weft.overwrite_services(&format!(
        "{}{}",
        service("shop", &["shop.test"], None, &[shop.addr]),
        support::reloading_service("cart", &["cart.test"], &[cart.addr])
    ));
    support::wait_for_backends(&weft, "cart.test", "/", &["cart"]).await;
    eventually(Duration::from_secs(10), "the reload is done", || async {
        match weft.show_proc().await {
            Ok((now, _, 1)) if now > reloads => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let env = worker_env(&weft).await;
    for secret in ["CONSUL_HTTP_TOKEN", "secret-xyz", "WEFT_TEST_SECRET"] {
        assert!(
            !env.contains(secret),
            "{secret} in HAProxy's env after a reload:\n{env}"
        );
    }
}
