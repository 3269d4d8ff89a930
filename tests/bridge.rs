//! The bridge reconciler against a real kernel: `weft bridge` run inside network namespaces
//! that each test makes and removes. Nothing here touches the host's own links.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::netns::{run, text, wait_until, LinkSnapshot, Netns, NsProcess};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// `ip` arguments for a `weave` that is a veth, not a bridge.
const WEAVE_VETH: &[&str] = &[
    "link",
    "add",
    "weave",
    "type",
    "veth",
    "peer",
    "name",
    "weave-peer",
];

/// One namespace and a weft.toml whose `[bridge]` section holds `bridge_keys`.
struct Case {
    // Declared first, dropped first: nothing of the test outlives its namespace.
    dir: tempfile::TempDir,
    ns: Netns,
    /// The weft binary the case runs.
    binary: PathBuf,
}

impl Case {
    fn new(tag: &str, bridge_keys: &str) -> Case {
        let ns = Netns::new(tag);
        let dir = tempfile::Builder::new()
            .prefix("weft-bridge-")
            .tempdir()
            .unwrap();
        // Readable by the unprivileged user the permission tests run weft as.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let case = Case {
            dir,
            ns,
            binary: PathBuf::from(WEFT),
        };
        case.write_config(bridge_keys);
        std::fs::write(case.dir.path().join("services.toml"), "").unwrap();
        case
    }

    fn write_config(&self, bridge_keys: &str) {
        let config = self.config();
        std::fs::write(
            &config,
            format!("[sources.file]\npath = \"services.toml\"\n\n[bridge]\n{bridge_keys}"),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("weft.toml")
    }

    /// `weft <args> -c weft.toml` inside the namespace, optionally wrapped (setpriv ...).
    fn weft_as(&self, wrapper: &[&str], args: &[&str]) -> Output {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = self.ns.exec(program);
                command.args(rest).arg(&self.binary);
                command
            }
            None => self.ns.exec(&self.binary),
        };
        command
            .args(args)
            .arg("-c")
            .arg(self.config())
            .env("WEFT_LOG", "info")
            .output()
            .unwrap()
    }

    fn weft(&self, args: &[&str]) -> Output {
        self.weft_as(&[], args)
    }

    /// `weft ARGS` with `ip monitor` listening: its output, and every link or address change
    /// the kernel saw meanwhile.
    fn weft_monitored(&self, args: &[&str]) -> (Output, Vec<String>) {
        let monitor = Monitor::start(self);
        let output = self.weft(args);
        (output, monitor.finish())
    }

    fn weave(&self) -> Option<LinkSnapshot> {
        self.ns.link("weave")
    }

    /// `weave` as `weave create-bridge` would leave it before anyone configured it: a bridge,
    /// down, no address.
    fn add_bare_bridge(&self) -> LinkSnapshot {
        self.ns.ip(&["link", "add", "weave", "type", "bridge"]);
        self.weave().unwrap()
    }

    /// A bridge exactly as weft's defaults want it.
    fn add_good_bridge(&self) -> LinkSnapshot {
        self.add_bare_bridge();
        self.ns.ip(&["addr", "add", "10.2.0.1/16", "dev", "weave"]);
        self.ns.ip(&["link", "set", "weave", "up"]);
        self.weave().unwrap()
    }

    /// A good bridge, broken by `breakage` (`ip` arguments), then one `weft bridge`: it ends
    /// well and reports `report`. Returns the good bridge as it was before the breakage.
    fn break_and_repair(&self, breakage: &[&[&str]], report: &str) -> LinkSnapshot {
        let good = self.add_good_bridge();
        for args in breakage {
            self.ns.ip(args);
        }
        if !breakage.is_empty() {
            assert_ne!(self.weave().as_ref(), Some(&good), "nothing broke");
        }
        assert_reports(&self.weft(&["bridge"]), true, &[report]);
        good
    }
}

/// The weft binary where the unprivileged user `nobody` can run it: the build's own when its
/// directories let everyone in, else a copy in `dir` (removed with it).
fn weft_binary_for_nobody(dir: &std::path::Path) -> PathBuf {
    let nobody_can_run = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            WEFT,
            "--version",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if nobody_can_run {
        return PathBuf::from(WEFT);
    }
    let copy = dir.join("weft");
    std::fs::copy(WEFT, &copy).unwrap();
    copy
}

/// `weft bridge --watch` in the case's namespace, logging to `watch.log`.
fn watch(case: &Case) -> NsProcess {
    let mut command = case.ns.exec(&case.binary);
    command
        .args(["bridge", "--watch", "-c"])
        .arg(case.config())
        .env("WEFT_LOG", "info,weft=debug");
    NsProcess::spawn(&mut command, case.dir.path().join("watch.log"))
}

fn setpriv_exists() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_exit(output: &Output, success: bool) {
    assert_eq!(output.status.success(), success, "{}", text(output));
}

/// The command ended as `success` says and its report holds each of `needles`.
fn assert_reports(output: &Output, success: bool, needles: &[&str]) {
    assert_exit(output, success);
    let out = stdout(output);
    for needle in needles {
        assert!(out.contains(needle), "no {needle:?} in {}", text(output));
    }
}

/// `ip monitor` on a namespace, between two marker links: what changed in between.
struct Monitor {
    ns_name: String,
    process: NsProcess,
}

impl Monitor {
    /// Starts `ip monitor link address` and waits until it sees a marker link come and go,
    /// so that it surely listens from here on (it may subscribe after the first ones).
    fn start(case: &Case) -> Monitor {
        let log = case.dir.path().join("monitor.log");
        let mut command = Command::new("ip");
        command.args(["-n", &case.ns.name, "-4", "monitor", "link", "address"]);
        let process = NsProcess::spawn(&mut command, log);
        let monitor = Monitor {
            ns_name: case.ns.name.clone(),
            process,
        };
        wait_until(Duration::from_secs(10), "ip monitor sees a marker", || {
            let log = monitor.process.log();
            if log.contains("mark-start") {
                return Ok(());
            }
            let _ = case.ns.try_ip(&["link", "del", "mark-start"]);
            case.ns.ip(&["link", "add", "mark-start", "type", "bridge"]);
            Err(log)
        });
        monitor
    }

    fn wait_for(&self, marker: &str) {
        wait_until(Duration::from_secs(5), "ip monitor sees the marker", || {
            let log = self.process.log();
            if log.contains(marker) {
                Ok(())
            } else {
                Err(log)
            }
        });
    }

    /// The monitor's lines between the markers.
    fn finish(self) -> Vec<String> {
        run(Command::new("ip").args([
            "-n",
            &self.ns_name,
            "link",
            "add",
            "mark-end",
            "type",
            "bridge",
        ]));
        self.wait_for("mark-end");
        // An event is a line and its indented continuation lines; the markers' own go.
        let log = self.process.log();
        let mut events: Vec<String> = Vec::new();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            if line.starts_with(char::is_whitespace) {
                if let Some(event) = events.last_mut() {
                    event.push('\n');
                    event.push_str(line);
                }
            } else {
                events.push(line.to_string());
            }
        }
        events
            .into_iter()
            .skip_while(|e| !e.contains("mark-start"))
            .filter(|e| !e.contains("mark-start"))
            .take_while(|e| !e.contains("mark-end"))
            .collect()
    }
}

#[test]
fn creates_the_bridge_from_nothing_and_a_second_run_changes_nothing() {
    let case = Case::new("create", "mtu = 65535\n");
    assert_eq!(case.weave(), None);

    let first = case.weft(&["bridge"]);
    assert_reports(
        &first,
        true,
        &[
            "bridge weave 10.2.0.1/16 mtu 65535 (ensure): repaired",
            "bridge weave is missing: create bridge weave with MTU 65535",
            "bridge weave lacks its address 10.2.0.1/16: add 10.2.0.1/16 to weave",
        ],
    );
    let created = case.weave().unwrap();
    assert_eq!(created.kind.as_deref(), Some("bridge"));
    assert!(created.up);
    assert_eq!(created.mtu, 65535);
    assert_eq!(created.addresses, ["10.2.0.1/16"]);
    // Every repair is logged at WARN with what was wrong.
    let log = String::from_utf8_lossy(&first.stderr);
    assert_eq!(log.matches("WARN").count(), 2, "{log}");
    assert!(log.contains("wrong=bridge weave is missing"), "{log}");

    // The second run finds nothing to do, and the kernel sees no change at all.
    let (second, changes) = case.weft_monitored(&["bridge"]);
    assert_exit(&second, true);
    assert_eq!(
        stdout(&second).trim(),
        "bridge weave 10.2.0.1/16 mtu 65535 (ensure): ok"
    );
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("WARN"),
        "{}",
        text(&second)
    );
    assert_eq!(changes, Vec::<String>::new());
    assert_eq!(case.weave().unwrap(), created);
}

/// One thing broken on a good bridge (`ip` arguments) is repaired in place: same index, same
/// MAC, everything as before; never deleted and recreated.
fn assert_repaired_in_place(tag: &str, breakage: &[&str], report: &str) {
    let case = Case::new(tag, "");
    let good = case.break_and_repair(&[breakage], report);
    assert_eq!(case.weave().unwrap(), good);
}

#[test]
fn a_down_bridge_is_set_up_and_keeps_its_identity() {
    assert_repaired_in_place(
        "down",
        &["link", "set", "weave", "down"],
        "bridge weave is down (IFF_UP unset): set weave up",
    );
}

#[test]
fn a_flushed_bridge_gets_its_address_back() {
    assert_repaired_in_place(
        "flush",
        &["addr", "flush", "dev", "weave"],
        "lacks its address 10.2.0.1/16: add 10.2.0.1/16 to weave",
    );
}

#[test]
fn a_bare_bridge_is_configured_in_place() {
    let case = Case::new("bare", "");
    let bare = case.add_bare_bridge();

    let output = case.weft(&["bridge"]);
    assert_exit(&output, true);
    let now = case.weave().unwrap();
    assert!(now.up);
    assert_eq!(now.addresses, ["10.2.0.1/16"]);
    assert_eq!((now.index, &now.mac), (bare.index, &bare.mac));
}

#[test]
fn stale_addresses_in_the_weave_range_are_removed_and_others_kept() {
    let case = Case::new("stale", "");
    case.add_good_bridge();
    // The kernel keeps a wrong prefix beside the right one; 10.2.0.9 is another host's; the
    // 192.168 address is someone else's business.
    for address in ["10.2.0.1/24", "10.2.0.9/16", "192.168.77.1/24"] {
        case.ns.ip(&["addr", "add", address, "dev", "weave"]);
    }

    assert_reports(
        &case.weft(&["bridge"]),
        true,
        &[
            "carries the stale address 10.2.0.1/24: remove 10.2.0.1/24 from weave",
            "carries the stale address 10.2.0.9/16",
        ],
    );
    assert_eq!(
        case.weave().unwrap().addresses,
        ["10.2.0.1/16", "192.168.77.1/24"]
    );
}

#[test]
fn a_wrong_mtu_is_fixed() {
    let case = Case::new("mtu", "mtu = 65535\n");
    // The kernel's default MTU, not the configured one.
    let good = case.break_and_repair(
        &[],
        "has MTU 1500, not 65535: set the MTU of weave to 65535",
    );
    assert_eq!(good.mtu, 1500);
    let now = case.weave().unwrap();
    assert_eq!(now.mtu, 65535);
    assert_eq!((now.index, now.addresses), (good.index, good.addresses));
}

#[test]
fn host_index_gives_the_address_and_replaces_the_default() {
    let case = Case::new("index", "host_index = 3\n");
    case.add_good_bridge();

    assert_reports(
        &case.weft(&["bridge"]),
        true,
        &[
            "bridge weave 10.2.0.3/16 (ensure): repaired",
            "stale address 10.2.0.1/16",
        ],
    );
    assert_eq!(case.weave().unwrap().addresses, ["10.2.0.3/16"]);
}

#[test]
fn a_weave_link_of_another_kind_is_refused_and_untouched() {
    for (kind, args) in [
        // What fast-datapath weave has (this kernel has no dummy links).
        (
            "vxlan",
            vec![
                "link", "add", "weave", "type", "vxlan", "id", "42", "dstport", "4789",
            ],
        ),
        ("veth", WEAVE_VETH.to_vec()),
    ] {
        let case = Case::new(kind, "");
        case.ns.ip(&args);
        case.ns.ip(&["addr", "add", "10.2.0.9/16", "dev", "weave"]);
        let before = case.weave().unwrap();

        let refusal =
            format!("link weave is a {kind} link, not a bridge: weft leaves it untouched");
        assert_reports(
            &case.weft(&["bridge"]),
            false,
            &["(ensure): problem", &refusal],
        );
        assert_eq!(case.weave().unwrap(), before, "{kind} untouched");
    }
}

#[test]
fn check_mode_reports_without_changing_anything() {
    let case = Case::new("check", "mode = \"check\"\nmtu = 65535\n");
    case.add_good_bridge();
    case.ns.ip(&["link", "set", "weave", "down"]);
    case.ns.ip(&["addr", "flush", "dev", "weave"]);
    case.ns.ip(&["addr", "add", "10.2.0.1/24", "dev", "weave"]);
    let before = case.weave().unwrap();

    let (output, changes) = case.weft_monitored(&["bridge"]);
    assert_exit(&output, false);
    assert_eq!(
        stdout(&output).trim(),
        "bridge weave 10.2.0.1/16 mtu 65535 (check): problem\n  \
         bridge weave has MTU 1500, not 65535\n  \
         bridge weave carries the stale address 10.2.0.1/24\n  \
         bridge weave lacks its address 10.2.0.1/16\n  \
         bridge weave is down (IFF_UP unset)"
    );
    assert_eq!(changes, Vec::<String>::new());
    assert_eq!(case.weave().unwrap(), before);

    // --check overrides an ensure config; a missing bridge is reported, not created.
    let case = Case::new("check2", "");
    let output = case.weft(&["bridge", "--check"]);
    assert_exit(&output, false);
    assert_eq!(
        stdout(&output).trim(),
        "bridge weave 10.2.0.1/16 (check): problem\n  bridge weave is missing"
    );
    assert_eq!(case.weave(), None);

    // `weft check` looks at the bridge too, in check mode, whatever bridge.mode says.
    let output = case.weft(&["check"]);
    assert_reports(
        &output,
        false,
        &["bridge weave 10.2.0.1/16 (check): problem\n  bridge weave is missing"],
    );
    assert_eq!(case.weave(), None);
    case.add_good_bridge();
    let output = case.weft(&["check"]);
    assert!(
        stdout(&output).contains("bridge weave 10.2.0.1/16 (check): ok"),
        "{}",
        text(&output)
    );
}

#[test]
fn mode_off_looks_at_nothing() {
    let case = Case::new("off", "mode = \"off\"\n");
    let output = case.weft(&["bridge"]);
    assert_exit(&output, true);
    assert!(
        stdout(&output).starts_with("bridge weave: off"),
        "{}",
        text(&output)
    );
    assert_eq!(case.weave(), None);
}

/// Without CAP_NET_ADMIN: as the unprivileged user `nobody`, and as root with CAP_NET_ADMIN
/// dropped (a container without it).
#[test]
fn without_cap_net_admin_ensure_says_so_and_check_still_works() {
    let nobody: &[&str] = &[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let capless: &[&str] = &[
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
    ];
    assert!(
        setpriv_exists(),
        "setpriv is missing: this test runs weft without CAP_NET_ADMIN with it \
         (apt-get install util-linux; .ci/run installs it)"
    );
    for (who, wrapper) in [("nobody", nobody), ("root-without-cap", capless)] {
        let mut case = Case::new("eperm", "");
        case.binary = weft_binary_for_nobody(case.dir.path());
        // Missing: creating it is refused.
        let output = case.weft_as(wrapper, &["bridge"]);
        assert_exit(&output, false);
        let out = stdout(&output);
        assert!(out.contains("bridge weave is missing"), "{who}: {out}");
        assert!(
            out.contains(
                "cannot create bridge weave: operation not permitted: weft needs CAP_NET_ADMIN \
                 to repair bridge weave (run it as root or with CAP_NET_ADMIN; in a container, \
                 also in the host's network namespace)"
            ),
            "{who}: {}",
            text(&output)
        );
        assert_eq!(case.weave(), None, "{who}");

        // Down: setting it up is refused, nothing changes.
        case.add_good_bridge();
        case.ns.ip(&["link", "set", "weave", "down"]);
        let before = case.weave().unwrap();
        let output = case.weft_as(wrapper, &["bridge"]);
        assert_exit(&output, false);
        assert!(
            stdout(&output)
                .contains("cannot set weave up: operation not permitted: weft needs CAP_NET_ADMIN"),
            "{who}: {}",
            text(&output)
        );
        assert_eq!(case.weave().unwrap(), before, "{who}");

        // Check mode reads without privilege: the problem, and no permission error.
        let output = case.weft_as(wrapper, &["bridge", "--check"]);
        assert_exit(&output, false);
        assert_eq!(
            stdout(&output).trim(),
            "bridge weave 10.2.0.1/16 (check): problem\n  bridge weave is down (IFF_UP unset)",
            "{who}"
        );
        case.ns.ip(&["link", "set", "weave", "up"]);
        let output = case.weft_as(wrapper, &["bridge", "--check"]);
        assert_exit(&output, true);
        // A good bridge needs no privilege in ensure mode either.
        let output = case.weft_as(wrapper, &["bridge"]);
        assert_exit(&output, true);
        assert_eq!(
            stdout(&output).trim(),
            "bridge weave 10.2.0.1/16 (ensure): ok"
        );
    }
}

/// The loop of `weft run`: a change to the bridge is repaired on the netlink event, long
/// before the periodic check (an hour here) would come.
#[test]
fn watch_repairs_on_netlink_events() {
    let case = Case::new("watch", "interval = \"1h\"\n");
    let good = case.add_good_bridge();
    let mut watch = watch(&case);
    wait_until(Duration::from_secs(5), "the first pass", || {
        let log = watch.log();
        if log.contains("(ensure): ok") {
            Ok(())
        } else {
            Err(log)
        }
    });

    case.ns.ip(&["link", "set", "weave", "down"]);
    case.ns.ip(&["addr", "flush", "dev", "weave"]);
    wait_until(Duration::from_secs(5), "weave repaired", || {
        match case.weave() {
            Some(now) if now == good => Ok(()),
            other => Err(other),
        }
    });
    let log = watch.log();
    assert!(
        log.contains("wrong=bridge weave is down (IFF_UP unset)"),
        "{log}"
    );
    assert!(
        log.contains("wrong=bridge weave lacks its address 10.2.0.1/16"),
        "{log}"
    );

    let status = watch.stop().unwrap();
    assert!(status.success(), "{status}\n{}", watch.log());
}

/// A test that fails inside its namespace leaves nothing behind: while the panic unwinds, the
/// process running in the namespace is stopped, the namespace (with its links) deleted, and
/// the temporary directory removed.
#[test]
fn a_failing_test_leaves_no_namespace_process_or_directory() {
    let mut made = None;
    let failed = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let case = Case::new("fail", "interval = \"1h\"\n");
        case.add_good_bridge();
        let _watch = watch(&case);
        let pids = wait_until(Duration::from_secs(5), "weft runs in the namespace", || {
            Some(case.ns.pids())
                .filter(|pids| !pids.is_empty())
                .ok_or(())
        });
        made = Some((case.ns.name.clone(), pids, case.dir.path().to_path_buf()));
        panic!("deliberate failure inside namespace {}", case.ns.name);
    }));
    let panic = failed.expect_err("the test failed");
    assert!(
        support::panic_message(&*panic).starts_with("deliberate failure"),
        "{}",
        support::panic_message(&*panic)
    );
    let (name, pids, dir) = made.unwrap();
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "namespace {name} is left"
    );
    for pid in pids {
        assert!(!support::process_alive(pid), "process {pid} is left");
    }
    assert!(!dir.exists(), "{} is left", dir.display());
}

/// The loop over a `weave` that is no bridge: reported at ERROR once, and left alone on every
/// event that touches it.
#[test]
fn watch_reports_a_weave_of_another_kind_and_leaves_it_alone() {
    let case = Case::new("watchveth", "interval = \"1h\"\n");
    case.ns.ip(WEAVE_VETH);
    let mut watch = watch(&case);
    let checked = |trigger: &str| {
        let log = watch.log();
        log.matches(&format!(
            "bridge checked bridge=weave trigger=\"{trigger}\""
        ))
        .count()
    };
    wait_until(Duration::from_secs(5), "the refusal", || {
        if checked("subscribed") == 1 {
            Ok(())
        } else {
            Err(watch.log())
        }
    });
    let log = watch.log();
    assert!(
        log.contains("ERROR") && log.contains("link weave is a veth link, not a bridge"),
        "{log}"
    );

    // An event on it: weft looks again, and changes nothing.
    case.ns.ip(&["link", "set", "weave", "mtu", "1400"]);
    wait_until(Duration::from_secs(5), "a pass on the event", || {
        if checked("event") >= 1 {
            Ok(())
        } else {
            Err(watch.log())
        }
    });
    let weave = case.weave().unwrap();
    assert_eq!(weave.kind.as_deref(), Some("veth"));
    assert!(!weave.up);
    assert_eq!(weave.mtu, 1400);
    assert!(weave.addresses.is_empty());
    // The problem is logged once, not on every pass.
    assert_eq!(watch.log().matches("ERROR").count(), 1, "{}", watch.log());
    let status = watch.stop().unwrap();
    assert!(status.success(), "{status}\n{}", watch.log());
}
