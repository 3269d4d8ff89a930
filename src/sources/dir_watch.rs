//! A watched directory: `notify` events for the names that matter, read once per burst, plus a
//! periodic re-read in case an event was missed. The services file and the certificates'
//! directory are both watched this way.

use std::path::Path;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Safety net for missed file events.
pub const REREAD_INTERVAL: Duration = Duration::from_secs(30);

/// Watches one directory, not recursively.
pub struct DirWatch {
    watcher: RecommendedWatcher,
    /// One signal at most waits: more events before it is taken change nothing.
    events: mpsc::Receiver<()>,
    debounce: Duration,
    reread: tokio::time::Interval,
}

impl DirWatch {
    /// Watches `dir`; an event counts when one of its paths passes `relevant` (an error from
    /// the watcher always counts: re-read to be safe). Access events never count: weft's own
    /// reads (open, close) must not trigger more reads.
    pub fn new(
        dir: &Path,
        debounce: Duration,
        relevant: impl Fn(&Path) -> bool + Send + 'static,
    ) -> Result<DirWatch, notify::Error> {
        let (events_tx, events) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
                let counts = match result {
                    Ok(event) if event.kind.is_access() => false,
                    Ok(event) => event.paths.iter().any(|p| relevant(p)),
                    Err(_) => true,
                };
                if counts {
                    // Full: a signal already waits, and says the same.
                    let _ = events_tx.try_send(());
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(DirWatch {
            watcher,
            events,
            debounce,
            reread: tokio::time::interval(REREAD_INTERVAL),
        })
    }

    /// The watcher, to watch or unwatch more directories (a symlink's target's).
    pub fn watcher(&mut self) -> &mut RecommendedWatcher {
        &mut self.watcher
    }

    /// Resolves when it is time to read again: `debounce` after the first event of a burst
    /// (throttle, not debounce: a directory that changes all the time is still read that
    /// often), or at the periodic re-read.
    pub async fn changed(&mut self) {
        tokio::select! {
            Some(()) = self.events.recv() => {
                tokio::time::sleep(self.debounce).await;
                while self.events.try_recv().is_ok() {}
            }
            _ = self.reread.tick() => {}
        }
    }
}
