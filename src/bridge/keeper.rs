//! The bridge's own loop: a pass on every link or address event that concerns the bridge, and
//! one every `bridge.interval` as the safety net for missed events.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::netlink::{Event, Events};
use super::{reconcile, unix_now, BridgeHealth, BridgeState};
use crate::config::{BridgeConfig, BridgeMode};

/// Quiet time after an event before the pass: a burst (a link set down and flushed, our own
/// repairs echoing back) makes one pass.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Runs passes and publishes their outcome.
pub struct Keeper {
    config: BridgeConfig,
    state: watch::Sender<BridgeState>,
    /// The bridge's link index as last seen: address events carry only an index.
    index: Option<u32>,
}

impl Keeper {
    pub fn new(config: BridgeConfig, state: watch::Sender<BridgeState>) -> Keeper {
        state.send_replace(BridgeState::new(&config));
        Keeper {
            config,
            state,
            index: None,
        }
    }

    /// One pass now (at start-up); its outcome is published and logged when it changes.
    pub async fn check_now(&mut self) -> BridgeHealth {
        self.check("start").await
    }

    /// One pass, for `trigger` (start, subscribed, event, interval).
    async fn check(&mut self, trigger: &'static str) -> BridgeHealth {
        let pass = reconcile(&self.config).await;
        debug!(bridge = %self.config.name, trigger, health = ?pass.health, "bridge checked");
        if pass.index.is_some() {
            self.index = pass.index;
        }
        let before = self.state.borrow().health.clone();
        self.log_change(&before, &pass.health);
        let health = pass.health.clone();
        self.state
            .send_modify(|state| state.record(pass.health, unix_now()));
        health
    }

    /// Problems are logged when they appear or change, not on every periodic pass.
    fn log_change(&self, before: &BridgeHealth, now: &BridgeHealth) {
        let name = &self.config.name;
        match now {
            BridgeHealth::Problem { reasons } if before != now => {
                let reasons = reasons.join("; ");
                match self.config.mode {
                    BridgeMode::Ensure => {
                        error!(bridge = %name, %reasons, "bridge is wrong and weft could not repair it")
                    }
                    BridgeMode::Check | BridgeMode::Off => {
                        warn!(bridge = %name, %reasons, "bridge is wrong (bridge.mode = check: not repaired)")
                    }
                }
            }
            BridgeHealth::Ok | BridgeHealth::Repaired { .. }
                if !matches!(before, BridgeHealth::Ok | BridgeHealth::Repaired { .. }) =>
            {
                info!(bridge = %name, address = %self.config.address, mode = %self.config.mode, "bridge ok")
            }
            _ => {}
        }
    }

    /// Whether an event may have changed the bridge.
    fn concerns(&self, event: &Event) -> bool {
        match event {
            Event::Link { index, name } => {
                name.as_deref() == Some(self.config.name.as_str()) || Some(*index) == self.index
            }
            Event::Address { index } => Some(*index) == self.index,
            Event::Other => false,
        }
    }

    /// Passes on events and every interval until `shutdown`. The first pass is the caller's
    /// (`check_now`, before HAProxy starts).
    pub async fn run(mut self, shutdown: CancellationToken) {
        if self.config.mode == BridgeMode::Off {
            return;
        }
        let mut events = self.subscribe();
        // What changed between the caller's first pass and the subscription was missed.
        self.check("subscribed").await;
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.config.interval, self.config.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let next_event = async {
                match events.as_mut() {
                    Some(events) => events.next().await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => Trigger::Interval,
                event = next_event => match event {
                    Some(event) => Trigger::Event(event),
                    None => Trigger::Unsubscribed,
                },
            };
            let reason = match trigger {
                Trigger::Interval => {
                    if !events.as_ref().is_some_and(Events::is_open) {
                        events = self.subscribe();
                    }
                    "interval"
                }
                Trigger::Event(event) => {
                    if !self.concerns(&event) {
                        continue;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = tokio::time::sleep(DEBOUNCE) => {}
                    }
                    if let Some(events) = events.as_mut() {
                        events.drain().for_each(drop);
                    }
                    "event"
                }
                Trigger::Unsubscribed => {
                    warn!(bridge = %self.config.name, "netlink event subscription ended; periodic checks go on, resubscribing at the next");
                    events = None;
                    continue;
                }
            };
            self.check(reason).await;
        }
    }

    fn subscribe(&self) -> Option<Events> {
        match Events::subscribe() {
            Ok(events) => Some(events),
            Err(err) => {
                warn!(bridge = %self.config.name, error = %err, interval = ?self.config.interval, "no netlink events; checking the bridge every interval only");
                None
            }
        }
    }
}

enum Trigger {
    Interval,
    Event(Event),
    Unsubscribed,
}
