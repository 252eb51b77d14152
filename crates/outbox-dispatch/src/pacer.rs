//! The pacer: decides when claim loops look for rows.
//!
//! Its vocabulary, defined here once:
//! - **busy**: rows keep coming. The pacer wakes a claim loop every
//!   [`BUSY_POLL`], and inserts send no `NOTIFY` (see
//!   [`outbox_core::store::wake`]).
//! - **asleep**: claims came back empty for [`BUSY_IDLE`]. The pacer holds
//!   the `sleep` advisory lock on a connection of its own (the *sleeper*
//!   connection); while any dispatcher holds it, inserts notify, and each
//!   notification wakes a claim loop.
//! - **settled**: every insert that was open when the sleep began has
//!   ended, so none can commit without a notification; until then an asleep
//!   pacer rechecks at growing intervals.
//! - **burst**: [`BUSY_NOTIFICATIONS`] notifications within [`BUSY_WINDOW`]
//!   turn an asleep pacer busy again (polling then costs the database less
//!   than the notifications).
//!
//! The listener (`Shared::listen`) keeps one reconnecting `LISTEN`
//! connection and wakes a claim loop on every notification and reconnection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outbox_core::store::listen::{Heard, Listener, reconnect_pause};
use outbox_core::store::wake;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::dispatcher::Shared;

/// The channel dispatchers LISTEN on; the outbox insert trigger notifies it
/// while some dispatcher sleeps.
pub const NOTIFY_CHANNEL: &str = outbox_core::store::wake::CHANNEL;

/// How often a busy dispatcher looks for new rows: at most this long passes
/// between a commit and the claim that sees it, at a cost of one claim per
/// tick (an empty claim costs about 0.1 ms of server time).
pub const BUSY_POLL: Duration = Duration::from_millis(1);

/// A busy dispatcher sleeps once its claims have found nothing for this long
/// (a gap that a steady 250 commits a second practically never leaves, so
/// the two thresholds do not flap against each other).
pub const BUSY_IDLE: Duration = Duration::from_millis(32);

/// A sleeping dispatcher turns busy when this many notifications arrive
/// within [`BUSY_WINDOW`] (about 250 inserting commits a second): polling
/// then costs the database less than the notifications, which make those
/// commits wait for one another.
pub const BUSY_NOTIFICATIONS: u32 = 8;
/// The window [`BUSY_NOTIFICATIONS`] are counted in.
pub const BUSY_WINDOW: Duration = Duration::from_millis(32);

impl Shared {
    /// Wakes a claim loop on every `NOTIFY outbox_due` and tells the pacer;
    /// reconnects with backoff.
    pub(crate) async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let attempt = async {
                let mut listener = Listener::connect(&self.pool, &[NOTIFY_CHANNEL]).await?;
                self.listening.store(true, Ordering::Relaxed);
                // Anything inserted while we were not listening is due now.
                self.ask_fresh_look();
                self.wake.notify_one();
                loop {
                    // After a reconnection, notifications sent meanwhile are
                    // gone: look for rows either way.
                    if let Heard::Notification(_) = listener.next().await? {
                        self.notifications.fetch_add(1, Ordering::Relaxed);
                        self.notified.notify_one();
                    }
                    self.ask_fresh_look();
                    self.wake.notify_one();
                }
                #[allow(unreachable_code)]
                Ok::<(), outbox_core::Error>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = attempt => {
                    self.listening.store(false, Ordering::Relaxed);
                    if let Err(err) = result {
                        failures = failures.saturating_add(1);
                        warn!(error = %err, "LISTEN connection lost; polling until it is back");
                    }
                }
            }
            let pause = reconnect_pause(failures);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Paces the claim loops (see the module docs): ticks while busy, sleeps
    /// on notifications while idle. The `sleep` lock lives on a connection of
    /// its own, closed when the dispatcher stops.
    pub(crate) async fn pace(self: Arc<Self>, stop: CancellationToken) {
        let mut sleeper: Option<PgConnection> = None;
        let mut state = Pace::busy();
        let mut last_claimed = self.claimed_rows.load(Ordering::Relaxed);
        loop {
            state = match state {
                Pace::Busy { quiet_since } => {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(BUSY_POLL) => {}
                    }
                    let claimed = self.claimed_rows.load(Ordering::Relaxed);
                    let quiet_since = if claimed == last_claimed {
                        quiet_since
                    } else {
                        Instant::now()
                    };
                    last_claimed = claimed;
                    self.wake.notify_one();
                    if quiet_since.elapsed() < BUSY_IDLE || !self.listening.load(Ordering::Relaxed)
                    {
                        Pace::Busy { quiet_since }
                    } else {
                        self.fall_asleep(&mut sleeper).await
                    }
                }
                Pace::Asleep { recheck } => {
                    match self
                        .wait_asleep(&stop, tokio::time::Instant::now() + recheck)
                        .await
                    {
                        WakeReason::Stopped => break,
                        WakeReason::Recheck => {
                            // Until every insert open at the start of the
                            // sleep has ended, poll at growing intervals;
                            // then once per poll interval, which also finds
                            // out when the pacer's connection (and with it
                            // the lock) is gone. The claim this wakes starts
                            // after the check, so it sees the rows of every
                            // insert the check found ended.
                            let settled = self.settled(&mut sleeper).await;
                            self.ask_fresh_look();
                            self.wake.notify_one();
                            match settled {
                                Some(true) => Pace::Asleep {
                                    recheck: self.config.poll_interval,
                                },
                                Some(false) => Pace::Asleep {
                                    recheck: (recheck * 2).min(self.config.poll_interval),
                                },
                                None => Pace::busy(),
                            }
                        }
                        WakeReason::Busy => {
                            self.wake_up(&mut sleeper).await;
                            last_claimed = self.claimed_rows.load(Ordering::Relaxed);
                            Pace::busy()
                        }
                    }
                }
            };
        }
        if let Some(conn) = sleeper.take() {
            let _ = conn.close().await;
        }
    }

    /// Waits, asleep, until notifications come fast enough to poll instead
    /// (or the LISTEN connection is lost), until `recheck_at`, or until stopped.
    async fn wait_asleep(
        &self,
        stop: &CancellationToken,
        recheck_at: tokio::time::Instant,
    ) -> WakeReason {
        let mut burst = Burst::new(Instant::now());
        let mut seen = self.notifications.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                () = stop.cancelled() => return WakeReason::Stopped,
                () = tokio::time::sleep_until(recheck_at) => return WakeReason::Recheck,
                () = self.notified.notified() => {}
            }
            let received = self.notifications.load(Ordering::Relaxed);
            let arrived = received.saturating_sub(seen);
            seen = received;
            if !self.listening.load(Ordering::Relaxed) || burst.record(Instant::now(), arrived) {
                return WakeReason::Busy;
            }
        }
    }

    /// Takes the `sleep` lock on the pacer's connection (connecting it first
    /// if needed) and wakes a claim loop for one last look; stays busy when
    /// that fails.
    async fn fall_asleep(&self, sleeper: &mut Option<PgConnection>) -> Pace {
        let began = async {
            let conn = match sleeper {
                Some(conn) => conn,
                None => {
                    sleeper.insert(PgConnection::connect_with(&self.pool.connect_options()).await?)
                }
            };
            wake::begin_sleep(conn).await
        }
        .await;
        match began {
            Ok(Some(settled)) => {
                // The claim this wakes starts after the lock was taken, from
                // positions taken after it too.
                self.ask_fresh_look();
                self.wake.notify_one();
                Pace::Asleep {
                    recheck: if settled {
                        self.config.poll_interval
                    } else {
                        BUSY_POLL
                    },
                }
            }
            Ok(None) => Pace::busy(),
            Err(err) => {
                debug!(error = %err, "could not start sleeping; polling");
                *sleeper = None;
                Pace::busy()
            }
        }
    }

    /// Asks whether inserts open when the sleep began have ended; `None`
    /// (and the connection dropped, which frees its lock) when the pacer's
    /// connection failed.
    async fn settled(&self, sleeper: &mut Option<PgConnection>) -> Option<bool> {
        let conn = sleeper.as_mut()?;
        match wake::settled(conn).await {
            Ok(settled) => Some(settled),
            Err(err) => {
                debug!(error = %err, "lost the pacer's connection; polling");
                *sleeper = None;
                None
            }
        }
    }

    /// Releases the `sleep` lock: this dispatcher polls from now on.
    async fn wake_up(&self, sleeper: &mut Option<PgConnection>) {
        if let Some(conn) = sleeper.as_mut()
            && let Err(err) = wake::end_sleep(conn).await
        {
            debug!(error = %err, "lost the pacer's connection");
            *sleeper = None;
        }
    }
}

/// What the pacer is doing.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Waking a claim loop every [`BUSY_POLL`]; no row claimed since `quiet_since`.
    Busy { quiet_since: Instant },
    /// Holding the `sleep` lock and waking claim loops on notifications,
    /// and after `recheck`: short while an insert open since before the
    /// sleep may still commit unannounced, the poll interval once none is.
    Asleep { recheck: Duration },
}

/// Notifications counted in windows of [`BUSY_WINDOW`].
#[derive(Debug)]
struct Burst {
    window_start: Instant,
    count: u32,
}

impl Burst {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            count: 0,
        }
    }

    /// Counts `arrived` notifications at `now`; true once
    /// [`BUSY_NOTIFICATIONS`] of them arrived within one window.
    fn record(&mut self, now: Instant, arrived: u64) -> bool {
        if now.saturating_duration_since(self.window_start) > BUSY_WINDOW {
            *self = Self::new(now);
        }
        self.count = self
            .count
            .saturating_add(u32::try_from(arrived).unwrap_or(u32::MAX));
        self.count >= BUSY_NOTIFICATIONS
    }
}

impl Pace {
    fn busy() -> Self {
        Self::Busy {
            quiet_since: Instant::now(),
        }
    }
}

/// Why a sleeping pacer woke up.
enum WakeReason {
    Stopped,
    /// Time to ask again whether the sleep has settled.
    Recheck,
    /// Rows come fast: poll instead.
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_notifications_turns_the_pacer_busy_a_trickle_does_not() {
        let start = Instant::now();
        let mut burst = Burst::new(start);
        let fast: Vec<bool> = (0..BUSY_NOTIFICATIONS)
            .map(|i| burst.record(start + Duration::from_millis(u64::from(i)), 1))
            .collect();
        assert!(fast[..fast.len() - 1].iter().all(|busy| !busy));
        assert_eq!(fast.last(), Some(&true));

        // Notifications that arrived while the pacer was not looking count.
        let mut burst = Burst::new(start);
        assert!(burst.record(start, u64::from(BUSY_NOTIFICATIONS)));

        // One notification per window never adds up, however long it goes on.
        let mut burst = Burst::new(start);
        let spaced = BUSY_WINDOW + Duration::from_millis(1);
        assert!((1..1000u32).all(|i| !burst.record(start + spaced * i, 1)));
    }
}
