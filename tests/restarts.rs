//! weft restarts cost no request: a new weft adopts the HAProxy the old one left serving
//! (`haproxy.on_exit = "keep"`, the default), whether the old one was killed outright or
//! stopped; and a HAProxy that dies comes back on the last good files at once, even when
//! run_dir's disk is full.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use support::{patience, service, wait_for_backends, Backend, Weft};

/// Requests through HAProxy on fresh connections, from `clients` loops, until stopped:
/// (answered 200, failed with what).
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, host: &'static str, clients: usize) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let tasks = (0..clients)
            .map(|_| {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        match support::get(port, host, "/").await {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, body)) => {
                                failures.lock().unwrap().push(format!("{status}: {body}"))
                            }
                            Err(err) => failures.lock().unwrap().push(err),
                        }
                    }
                })
            })
            .collect();
        Load {
            ok,
            failures,
            stop,
            tasks,
        }
    }

    /// Stops the clients: (requests answered 200, failures).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }

    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
}

/// Waits until the load has had `more` requests answered since now.
async fn more_answers(load: &Load, more: u64) {
    let from = load.answered();
    support::eventually(Duration::from_secs(10), "the load goes on", || async {
        (load.answered() >= from + more)
            .then_some(())
            .ok_or(load.answered())
    })
    .await
}

/// A weft routing alpha.test to `a`, serving it.
async fn serving(a: &Backend) -> Weft {
    let weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    weft
}

/// Waits until the current weft logged that it adopted the HAProxy and applied its own
/// config to it (the first apply of an adopted HAProxy reloads it).
async fn adopted_and_reloaded(weft: &Weft) {
    weft.wait_for_log("adopted the haproxy").await;
    weft.wait_for_log("haproxy reloaded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_killed_three_times_then_stopped_and_started_fails_no_request() {
    let a = Backend::start("a").await;
    let mut weft = serving(&a).await;
    let master = weft.haproxy_pid().unwrap();
    let load = Load::start(weft.port, "alpha.test", 4);
    more_answers(&load, 50).await;

    for round in 0..3 {
        weft.kill();
        more_answers(&load, 50).await;
        weft.restart().await;
        adopted_and_reloaded(&weft).await;
        more_answers(&load, 50).await;
        assert_eq!(
            weft.haproxy_pid(),
            Some(master),
            "round {round}: the same master serves"
        );
    }
    let status = weft.stop().unwrap();
    assert!(status.success(), "{status}");
    more_answers(&load, 50).await;
    weft.restart().await;
    adopted_and_reloaded(&weft).await;

    // The adopting weft is in charge: a change reaches HAProxy.
    let b = Backend::start("b").await;
    weft.write_services(&service("alpha", &["alpha.test"], None, &[b.addr]));
    wait_for_backends(&weft, "alpha.test", "/", &["b"]).await;
    more_answers(&load, 50).await;

    let (answered, failures) = load.finish().await;
    eprintln!("{answered} requests answered, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(weft.haproxy_pid(), Some(master));
}

/// A backend whose one answer takes `chunks` x 200 ms: 100 bytes each time.
async fn slow_backend(chunks: usize) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(move || async move {
        let stream = futures::stream::unfold(0, move |sent| async move {
            if sent == chunks {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some((Ok::<_, std::io::Error>(vec![b'x'; 100]), sent + 1))
        });
        Body::from_stream(stream)
    });
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, task)
}

/// Starts a GET of the slow download through HAProxy: the whole answer, once it ends.
fn download(port: u16) -> tokio::task::JoinHandle<Result<Vec<u8>, String>> {
    tokio::spawn(async move {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok(answer)
    })
}

/// The body of a chunked HTTP/1.1 answer, and its status line.
fn dechunk(answer: &[u8]) -> (String, Vec<u8>) {
    let text = String::from_utf8_lossy(answer);
    let (head, mut rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    let mut body = Vec::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        body.extend_from_slice(&after.as_bytes()[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_started_before_weft_restarts_completes() {
    // 3 s of download (within the harness's hard_stop_after of 5 s, which bounds the old
    // worker that the adopting weft's reload leaves to finish it).
    let (slow, _server) = slow_backend(15).await;
    let mut weft = Weft::builder()
        .services(&service("slow", &["slow.test"], None, &[slow]))
        .start()
        .await;
    // HAProxy serves (a host without a route gets its 404) with slow.test routed.
    support::eventually(Duration::from_secs(10), "slow.test routed", || async {
        let (status, _) = weft.get("nothing.test", "/").await?;
        let (_, body) = weft.status("/status").await?;
        (status == 404 && body.contains("slow.test"))
            .then_some(())
            .ok_or(body)
    })
    .await;
    weft.wait_for_log("routing applied").await;

    for stop in ["KILL", "TERM"] {
        let started = Instant::now();
        let running = download(weft.port);
        tokio::time::sleep(Duration::from_millis(500)).await;
        match stop {
            "KILL" => weft.kill(),
            _ => assert!(weft.stop().unwrap().success()),
        }
        weft.restart().await;
        adopted_and_reloaded(&weft).await;
        let answer = tokio::time::timeout(patience(Duration::from_secs(15)), running)
            .await
            .expect("the download ends")
            .unwrap()
            .unwrap();
        let (status, body) = dechunk(&answer);
        assert!(status.contains("200"), "{stop}: {status}");
        assert_eq!(body.len(), 1500, "{stop}: the whole download arrived");
        eprintln!(
            "{stop}: download of 1500 bytes took {:?}",
            started.elapsed()
        );
    }
}

/// A tmpfs of its own for run_dir, unmounted when dropped (after the weft that uses it).
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", path.display());
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Fills the disk: a file grows until a write fails (ENOSPC).
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        let err = std::fs::write(self.path.join("probe"), vec![0u8; 8192]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
    }
}

impl Drop for SmallDisk {
    /// After the weft that used it: its temporary directory could not remove the mount point,
    /// so the mount point and that directory go here.
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir(&self.path);
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_haproxy_comes_back_on_the_last_good_files_while_the_disk_is_full() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let a = Backend::start("a").await;
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    let disk = SmallDisk::mount(&dir.path().join("run"));
    let weft = Weft::builder()
        .dir(dir)
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let first = weft.haproxy_pid().unwrap();

    disk.fill();
    // A change that needs a reload, so a new config to write: it cannot be.
    let b = Backend::start("b").await;
    weft.write_services(
        &(service("alpha", &["alpha.test"], None, &[a.addr])
            + &service("beta", &["beta.test"], None, &[b.addr])),
    );
    weft.wait_for_log("cannot write").await;

    support::signal(first, "KILL");
    let killed = Instant::now();
    while support::process_alive(first) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Up again: the port answers alpha.test from a new master.
    let back = loop {
        if let Ok((200, body)) = weft.get("alpha.test", "/").await {
            if weft.haproxy_pid().is_some_and(|pid| pid != first) {
                assert_eq!(body, "a");
                break killed.elapsed();
            }
        }
        assert!(
            killed.elapsed() < patience(Duration::from_secs(2)),
            "haproxy not back within 2 s of its death on a full disk\n{}",
            weft.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("haproxy back {back:?} after it was killed, disk full");
    weft.wait_for_log("haproxy started again on the last good config")
        .await;

    // Room again: the pending change goes through.
    std::fs::remove_file(disk.path.join("filler")).unwrap();
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
    drop(weft);
}

/// `weft` with `args` on this test's weft.toml: (success, stdout + stderr).
fn weft_command(weft: &Weft, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .arg("-c")
        .arg(weft.path("weft.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// One weft per run_dir; `weft stop` takes a kept HAProxy out of service, and only once no
/// weft runs (a running one would start it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_weft_per_run_dir_and_weft_stop_stops_the_kept_haproxy() {
    let a = Backend::start("a").await;
    let mut weft = serving(&a).await;
    let master = weft.haproxy_pid().unwrap();
    let pid = weft.pid().unwrap();

    let (ok, text) = weft_command(&weft, &["run"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("another weft (pid {pid})")),
        "{text}"
    );
    let (ok, text) = weft_command(&weft, &["stop"]);
    assert!(!ok, "{text}");
    assert!(support::process_alive(master), "{text}");

    assert!(weft.stop().unwrap().success());
    assert!(
        support::process_alive(master),
        "haproxy serves on after weft"
    );
    assert_eq!(weft.get("alpha.test", "/").await.unwrap().0, 200);
    let (ok, text) = weft_command(&weft, &["stop"]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("haproxy (pid {master}) stopped")),
        "{text}"
    );
    assert!(!support::process_alive(master));
    assert!(
        weft.get("alpha.test", "/").await.is_err(),
        "nothing listens"
    );
    let (ok, text) = weft_command(&weft, &["stop"]);
    assert!(ok && text.contains("no haproxy of weft's runs"), "{text}");
}

/// A weft killed in the middle of installing leaves a torn set (here: a map naming a backend
/// the config lacks, a config cut short). Nothing loads it: the next weft adopts HAProxy and
/// installs a whole set of its own before it reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_set_of_files_is_never_loaded() {
    let a = Backend::start("a").await;
    let mut weft = serving(&a).await;
    weft.kill();
    let run = weft.run_dir();
    let mut map = std::fs::read_to_string(run.join("hosts.map")).unwrap();
    map.push_str("ghost.test be_ghost\n");
    std::fs::write(run.join("hosts.map"), map).unwrap();
    let config = std::fs::read_to_string(run.join("haproxy.cfg")).unwrap();
    std::fs::write(run.join("haproxy.cfg"), &config[..config.len() / 2]).unwrap();
    let (reloads, _, _) = weft.show_proc().await.unwrap();

    weft.restart().await;
    adopted_and_reloaded(&weft).await;
    let (after, failed, _) = weft.show_proc().await.unwrap();
    assert_eq!((after, failed), (reloads + 1, 0));
    assert!(!std::fs::read_to_string(run.join("hosts.map"))
        .unwrap()
        .contains("ghost"));
    assert_eq!(
        std::fs::read_to_string(run.join("haproxy.cfg")).unwrap(),
        config
    );
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
}

/// weft signals only a HAProxy it recognises as its own: a pid file that names another
/// process (a pid reused after a reboot) leaves that process alone; and an adopted master
/// that dies is started again like weft's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_in_the_pid_file_is_left_alone_and_an_adopted_master_that_dies_comes_back() {
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let mut stranger = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(run.join("haproxy.pid"), format!("{}\n", stranger.id())).unwrap();

    let a = Backend::start("a").await;
    let mut weft = Weft::builder()
        .dir(dir)
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    assert!(
        support::process_alive(stranger.id() as i32),
        "the stranger was signalled"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();

    weft.kill();
    weft.restart().await;
    adopted_and_reloaded(&weft).await;
    let adopted = weft.haproxy_pid().unwrap();
    support::signal(adopted, "KILL");
    support::eventually(Duration::from_secs(10), "a new master", || async {
        match weft.haproxy_pid() {
            Some(pid) if pid != adopted && support::process_alive(pid) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    weft.wait_for_log("the adopted master").await;
}

/// A HAProxy of weft's that does not answer on its master socket (here: stopped with
/// SIGSTOP, as a wedged process would be) is not adopted: the new weft stops it (SIGKILL
/// after the grace) and starts its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_whose_master_does_not_answer_is_replaced() {
    let a = Backend::start("a").await;
    let mut weft = serving(&a).await;
    let wedged = weft.haproxy_pid().unwrap();
    weft.kill();
    support::signal(wedged, "STOP");

    weft.restart().await;
    weft.wait_for_log("does not answer as expected: stopping it")
        .await;
    support::eventually(Duration::from_secs(20), "a master of its own", || async {
        match weft.haproxy_pid() {
            Some(pid) if pid != wedged && support::process_alive(pid) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(!support::process_alive(wedged), "the wedged master is gone");
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    assert!(
        !weft.log().contains("adopted the haproxy"),
        "{}",
        weft.log()
    );
}
