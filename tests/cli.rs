//! `weft render` and `weft check`, as an operator runs them.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};

const HOSTILE: &str = r#"
[[service]]
name = "space"
hosts = ["bad host.test"]
servers = ["10.2.1.5:8080"]

[[service]]
name = "newline"
hosts = ["bad\nhost.test"]
servers = ["10.2.1.5:8080"]

[[service]]
name = "hash"
hosts = ["bad#host.test"]
servers = ["10.2.1.5:8080"]

[[service]]
name = "port0"
hosts = ["port0.test"]
servers = ["10.2.1.5:0"]

[[service]]
name = "port70000"
hosts = ["port70000.test"]
servers = ["10.2.1.5:70000"]

[[service]]
name = "outside"
hosts = ["outside.test"]
servers = ["192.168.7.10:80"]

[[service]]
name = "shop"
hosts = ["shop.example.com", "www.shop.example.com"]
servers = ["10.2.1.5:8080", "10.2.2.7:8080"]
check = "/health"

[[service]]
name = "shop-api"
hosts = ["shop.example.com"]
path = "/api"
servers = ["10.2.1.9:9000"]
balance = "leastconn"
"#;

fn setup(services: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.toml"),
        // The bridge is off: these tests never look at the host's links.
        "[sources.file]\npath = \"services.toml\"\n[bridge]\nmode = \"off\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("services.toml"), services).unwrap();
    dir
}

fn weft(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .arg("-c")
        .arg(dir.join("weft.toml"))
        .output()
        .unwrap()
}

#[test]
fn render_is_byte_identical_for_the_same_input() {
    let dir = setup(HOSTILE);
    let first = weft(dir.path(), &["render"]);
    let second = weft(dir.path(), &["render"]);
    assert!(first.status.success());
    assert!(!first.stdout.is_empty());
    assert_eq!(first.stdout, second.stdout);

    // The order services are listed in does not matter either.
    let mut entries: Vec<&str> = HOSTILE.split("[[service]]").skip(1).collect();
    entries.reverse();
    let reversed: String = entries.iter().map(|e| format!("[[service]]{e}")).collect();
    let other = setup(&reversed);
    let third = weft(other.path(), &["render"]);
    assert_eq!(first.stdout, third.stdout);
}

#[test]
fn render_drops_hostile_entries_with_reasons_and_haproxy_accepts_the_rest() {
    support::require_haproxy();
    let dir = setup(HOSTILE);
    let out = dir.path().join("out");
    let output = weft(dir.path(), &["render", "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for expected in [
        r#"dropped: file: service "space" host "bad host.test": invalid hostname: contains a space"#,
        r#"dropped: file: service "newline" host "bad\nhost.test": invalid hostname: contains a newline"#,
        r#"dropped: file: service "hash" host "bad#host.test": invalid hostname: contains '#'"#,
        r#"dropped: file: service "port0" server "10.2.1.5:0": invalid server port 0"#,
        r#"dropped: file: service "port70000" server "10.2.1.5:70000": invalid server port 70000"#,
        r#"dropped: file: service "outside" server "192.168.7.10:80": address 192.168.7.10 is outside the allowed networks"#,
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let config = std::fs::read_to_string(out.join("haproxy.cfg")).unwrap();
    assert!(config.contains(&format!("map({}/hosts.map)", out.display())));
    assert!(config.contains("server s1 10.2.1.5:8080 check"));
    assert!(!config.contains("192.168.7.10"));
    let hosts = std::fs::read_to_string(out.join("hosts.map")).unwrap();
    assert_eq!(
        hosts,
        "outside.test be_outside;outside;\nport0.test be_port0;port0;\n\
         port70000.test be_port70000;port70000;\n\
         shop.example.com be_shop;shop;\nwww.shop.example.com be_shop;shop;\n"
    );

    let check = Command::new(support::HAPROXY)
        .arg("-c")
        .arg("-f")
        .arg(out.join("haproxy.cfg"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn check_reports_problems_and_exit_codes() {
    support::require_haproxy();
    let good = setup(
        "[[service]]\nname = \"shop\"\nhosts = [\"shop.test\"]\nservers = [\"10.2.1.5:80\"]\n",
    );
    let output = weft(good.path(), &["check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("haproxy -c: ok"), "{stdout}");

    // Drops are reported; only --strict turns them into a failure.
    let hostile = setup(HOSTILE);
    assert!(weft(hostile.path(), &["check"]).status.success());
    let strict = weft(hostile.path(), &["check", "--strict"]);
    assert!(!strict.status.success());

    // A broken services file is a problem.
    let broken = setup("[[service]\n");
    let output = weft(broken.path(), &["check"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("is not valid TOML"));

    // A broken weft.toml names every bad key.
    std::fs::write(
        broken.path().join("weft.toml"),
        "[haproxy]\nbind = \"x\"\nbinary = \"haproxy\"\n[network]\nallowed = [\"nope\"]\n",
    )
    .unwrap();
    let output = weft(broken.path(), &["check"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    for key in [
        "haproxy.bind",
        "haproxy.binary",
        "network.allowed[0]",
        "sources",
    ] {
        assert!(stderr.contains(key), "{key} missing in {stderr}");
    }
}

/// `weft render | head -1` and `weft check | head -1`: the reader closes the pipe before weft
/// has written everything. weft stops quietly with 0, as ripgrep does, rather than failing
/// (or panicking in a print) with "Broken pipe".
#[test]
fn a_reader_that_goes_away_early_is_no_error() {
    let dir = setup(HOSTILE);
    for args in [["render"], ["check"]] {
        // The reading end is closed before weft starts: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .arg("-c")
            .arg(dir.path().join("weft.toml"))
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // `check` on this input reports problems (exit 1) if it gets to say them; with
        // nobody reading, there is nobody to tell.
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// A run_dir that others may write (umask 000, a careless chmod) is refused at start: whoever
/// can write it can replace haproxy.cfg. A fresh one is made 0750 whatever the umask.
#[test]
fn weft_run_refuses_a_run_dir_others_may_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.toml"),
        "[haproxy]\nrun_dir = \"run\"\nbind = \"127.0.0.1:1\"\n\
         [bridge]\nmode = \"off\"\n[status]\nlisten = \"127.0.0.1:0\"\n\
         [sources.file]\npath = \"services.toml\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("services.toml"), "").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = weft(dir.path(), &["run"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("lets a group or other users write it"),
        "{stderr}"
    );
    assert!(!run.join("haproxy.cfg").exists());
}

/// Services-file text that would rewrite the operator's terminal (`ESC [31m`) or forge a log
/// line (a newline, then a timestamp). TOML decodes the escapes: the file holds them raw.
const FORGING: &str = r#"
[[service]]
name = "paint\u001b[31m\n2026-01-01T00:00:00Z  INFO forged"
hosts = ["paint.test"]
servers = ["10.2.1.5:8080"]

[[service]]
name = "key"
hosts = ["key.test"]
servers = ["10.2.1.5:8080"]
"unknown\u001b[31m\n2026-01-01T00:00:00Z  INFO forged" = 1

[[service]]
name = "balance"
hosts = ["balance.test"]
servers = ["10.2.1.5:8080"]
balance = "x\u001b[31m\n2026-01-01T00:00:00Z  INFO forged"
"#;

/// Every drop of [`FORGING`] is one line holding the forged text escaped, and nothing
/// printed holds a raw ESC or starts a line with the forged timestamp.
fn assert_escaped(output: &str, prefix: &str) {
    assert!(!output.contains('\x1b'), "a raw ESC in:\n{output}");
    assert!(
        !output
            .lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line in:\n{output}"
    );
    let drops: Vec<&str> = output.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(drops.len(), 3, "{output}");
    for drop in drops {
        assert!(
            drop.contains(r"\u{1b}[31m\n2026-01-01T00:00:00Z  INFO forged"),
            "{drop}"
        );
    }
}

#[test]
fn check_and_render_escape_source_text() {
    let dir = setup(FORGING);
    let check = weft(dir.path(), &["check"]);
    assert_escaped(&String::from_utf8_lossy(&check.stdout), "dropped: ");
    let render = weft(dir.path(), &["render"]);
    assert!(render.status.success());
    assert_escaped(&String::from_utf8_lossy(&render.stderr), "dropped: ");
}

/// `weft run` logs each drop as one line: the newline in a source's text cannot start a
/// forged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_logs_each_drop_on_one_line() {
    let weft = support::Weft::builder().services(FORGING).start().await;
    support::eventually(
        std::time::Duration::from_secs(10),
        "three drops logged",
        || async {
            let log = weft.log();
            let count = log.lines().filter(|l| l.contains("input dropped")).count();
            (count == 3).then_some(()).ok_or(count)
        },
    )
    .await;
    let log = weft.log();
    let drops: String = log
        .lines()
        .filter(|l| l.contains("input dropped"))
        .map(|l| format!("{l}\n"))
        .collect();
    // The log's lines start with their own timestamp: take them from "input dropped" on.
    let from_message: String = drops
        .lines()
        .map(|l| format!("dropped: {}\n", &l[l.find("input dropped").unwrap()..]))
        .collect();
    assert_escaped(&from_message, "dropped: ");
    assert!(!log.contains('\x1b'), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("INFO forged") && !l.contains("input dropped")),
        "{log}"
    );
}
