//! The size of weft's own memory pages: small for the daemon, the host's choice for HAProxy.
//!
//! weft's allocator (mimalloc, see main.rs) reserves its heap as one large region and asks
//! the kernel for transparent huge pages on it (`madvise(MADV_HUGEPAGE)`). For a one-shot
//! command that is faster: `weft render` at 10,000 Marathon apps faults in fewer, larger
//! pages. For the daemon it costs memory: a 2 MiB page stays resident while any of its small
//! objects lives, and weft's heap at 10,000 services is tens of thousands of small strings and
//! nodes spread over such pages. Measured with `cargo bench --bench scale` (BENCHMARKS.md):
//! weft's RSS 81.4 MiB steady with huge pages, 53.0 MiB without, on the same run of the
//! same heap.
//!
//! So `weft run` turns them off for itself ([`keep_small`]: `prctl(PR_SET_THP_DISABLE)`, the
//! kernel's per-process switch, which overrides the allocator's `madvise`). That switch is
//! inherited by child processes, and HAProxy is not weft's to tune: [`spawn_with_host_pages`]
//! lifts it while HAProxy's master is spawned, so HAProxy runs under the host's own setting
//! (`/sys/kernel/mm/transparent_hugepage/enabled`), as it would without weft. The `haproxy -c`
//! checks weft runs inherit it: they exit at once, and the choice changes nothing they say.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::prctl;

/// Whether [`keep_small`] turned huge pages off (and so may lift that for a child).
static TURNED_OFF: AtomicBool = AtomicBool::new(false);

/// Turns transparent huge pages off for this process from now on. Leaves a process whose
/// parent already turned them off as it is; on a kernel without the switch (before Linux
/// 3.15) it says so and changes nothing.
pub fn keep_small() {
    match prctl::get_thp_disable() {
        Ok(true) => tracing::debug!("transparent huge pages already off for this process"),
        Ok(false) => match prctl::set_thp_disable(true) {
            Ok(()) => {
                TURNED_OFF.store(true, Ordering::SeqCst);
                tracing::debug!("transparent huge pages turned off for weft's own memory");
            }
            Err(err) => tracing::warn!(error = %err, "cannot turn transparent huge pages off"),
        },
        Err(err) => tracing::warn!(error = %err, "cannot read the transparent huge page switch"),
    }
}

/// Runs `spawn` with the host's huge page setting, so that the process it starts (or the
/// image weft executes on SIGHUP: the switch survives an exec) inherits that rather than
/// weft's own. The switch is the whole process's: while it is lifted (the few hundred
/// microseconds of a spawn), weft's other threads may get a huge page too.
pub fn spawn_with_host_pages<T>(spawn: impl FnOnce() -> T) -> T {
    let lifted = TURNED_OFF.load(Ordering::SeqCst)
        && match prctl::set_thp_disable(false) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(error = %err, "cannot lift the transparent huge page switch for a child");
                false
            }
        };
    let spawned = spawn();
    if lifted {
        if let Err(err) = prctl::set_thp_disable(true) {
            tracing::warn!(error = %err, "cannot turn transparent huge pages off again");
        }
    }
    spawned
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The switch is per process: the test runs in a child of its own (`/bin/sh` reading its
    /// own `/proc/self/status`), so the test process keeps its setting whatever happens.
    #[test]
    fn a_spawned_child_gets_the_setting_from_before_keep_small() {
        let child_sees = || {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg("grep '^THP_enabled:' /proc/self/status || echo 'THP_enabled: unknown'")
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        let before = prctl::get_thp_disable().unwrap();
        let inherited_before = child_sees();
        keep_small();
        assert!(
            prctl::get_thp_disable().unwrap(),
            "weft's own pages are small"
        );
        let plain = child_sees();
        assert!(
            plain.contains("THP_enabled:\t0") || plain.contains("unknown"),
            "a plain child inherits the switch: {plain}"
        );
        let lifted = spawn_with_host_pages(child_sees);
        assert_eq!(lifted, inherited_before, "HAProxy keeps the host's setting");
        assert!(prctl::get_thp_disable().unwrap(), "and weft's stay small");
        prctl::set_thp_disable(before).unwrap();
        TURNED_OFF.store(false, Ordering::SeqCst);
    }
}
