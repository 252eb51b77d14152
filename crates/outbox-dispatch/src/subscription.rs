//! What this process serves, and its row in `outbox_processes`: written at
//! start and every [`row_write_every`], deleted at the end of the drain.
//! Every [`BEAT_EVERY`] a beat learns the topics other live processes serve by name; a
//! fallback (the relay) leaves those to them, so a relay process started
//! beside a service with handlers does not take that service's rows.
//!
//! Each beat also reads the paused topics and the limits (concurrency and rate), so
//! every process honours a pause, a resume or a limit within about a second.
//! Ordinary claims leave limited topics out; the claim loops take those one
//! topic at a time ([`outbox_core::store::outbox::claim_limited`]).
//!
//! Until the first beat has answered, the fallback takes nothing: it cannot
//! know yet what other processes serve.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use outbox_core::store::limits::LimitedTopic;
use outbox_core::store::pauses;
use outbox_core::store::processes::{self, Beat, ProcessInfo};
use outbox_core::topics::Served;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::dispatcher::Shared;
use crate::handler::Subscription;

/// How often a process learns what the others serve, what is paused and
/// what is limited: a process started elsewhere is left its topics, and a
/// pause is honoured, within about this long.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// How often a process with lease `lease` writes its row: three times a
/// lease (its row expires one lease after a write), at most every
/// [`BEAT_EVERY`], at least every ten seconds. Each write leaves a dead
/// version of the row, which vacuum cannot remove while an old snapshot is
/// held; writing every second was most of the dead tuples outboxd's own
/// tables gathered in an hour of a held snapshot.
pub fn row_write_every(lease: Duration) -> Duration {
    (lease / 3).clamp(BEAT_EVERY, Duration::from_secs(10))
}

/// Beats between two writes of the attempt counts to `outbox_activity`.
pub const ACTIVITY_EVERY_BEATS: u32 = 5;

/// The limited topics and what their claims serve, as of the last beat.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    /// The topics with a concurrency or rate limit, of every app.
    pub(crate) topics: Vec<LimitedTopic>,
    /// The served topics of their claims: the pauses apply, not the limits.
    pub(crate) served: Served,
}

/// The served topics a claim binds, as of the last beat.
#[derive(Debug)]
pub(crate) struct ServedNow {
    subscription: Subscription,
    // What the ordinary claims take: neither paused nor limited topics.
    current: RwLock<Arc<Served>>,
    limits: RwLock<Arc<Limits>>,
    // Bumped whenever the served topics change: claim positions may have
    // passed rows that are claimable now, and are taken afresh.
    generation: AtomicU64,
}

impl ServedNow {
    /// Before the first beat: names and prefixes only.
    pub(crate) fn new(subscription: Subscription) -> Self {
        let current = RwLock::new(Arc::new(served(&subscription, None)));
        Self {
            subscription,
            current,
            limits: RwLock::default(),
            generation: AtomicU64::new(0),
        }
    }

    /// How many times the served topics have changed.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The served topics for the next claim.
    pub(crate) fn get(&self) -> Arc<Served> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The limited topics, claimed one by one with their own statement.
    pub(crate) fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes what a beat learnt; true when the limited topics changed.
    fn update(&self, beat: Beat) -> bool {
        let mut for_limited = served(&self.subscription, Some(beat.others));
        for_limited.paused = beat.paused;
        let mut next = for_limited.clone();
        next.paused.extend(
            beat.limited
                .iter()
                .map(|l| pauses::pause_key(l.app_id, &l.topic)),
        );
        next.paused.sort();
        next.paused.dedup();
        let limits_changed = {
            let mut limits = self.limits.write().unwrap_or_else(PoisonError::into_inner);
            let changed = limits.topics != beat.limited;
            if changed || limits.served != for_limited {
                *limits = Arc::new(Limits {
                    topics: beat.limited,
                    served: for_limited,
                });
            }
            changed
        };
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if **current != next {
            *current = Arc::new(next);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        limits_changed
    }

    /// The row this process writes.
    pub(crate) fn process_info(&self, id: Uuid, worker: &str) -> ProcessInfo {
        let s = &self.subscription;
        ProcessInfo {
            id,
            worker: worker.to_owned(),
            host: host_name(),
            pid: i32::try_from(std::process::id()).unwrap_or(-1),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            topics: s.topics.clone(),
            patterns: s.patterns.clone(),
            regexes: s
                .prefix_regexes
                .iter()
                .chain(&s.fallback_regexes)
                .cloned()
                .collect(),
        }
    }
}

/// The served topics of `subscription` while `others` (when known) serve
/// these topics by name.
fn served(subscription: &Subscription, others: Option<Vec<String>>) -> Served {
    let mut regexes = subscription.prefix_regexes.clone();
    let Some(mut excluded) = others else {
        return Served {
            all: false,
            exact: subscription.topics.clone(),
            regexes,
            excluded: Vec::new(),
            paused: Vec::new(),
        };
    };
    // A topic this process handles by name is its own, whoever else does.
    excluded.retain(|t| !subscription.topics.contains(t));
    if subscription.fallback_everything && excluded.is_empty() {
        return Served::everything();
    }
    regexes.extend(subscription.fallback_regexes.iter().cloned());
    Served {
        all: false,
        exact: subscription.topics.clone(),
        regexes,
        excluded,
        paused: Vec::new(),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Shared {
    /// Whether this process serves the limited topic `topic`: it has a
    /// handler for it that another live process does not take by name. The
    /// others' limited topics are not this process's to lock.
    pub(crate) fn serves(&self, limits: &Limits, topic: &LimitedTopic) -> bool {
        self.registry.get(&topic.topic).is_some() && !limits.served.excluded.contains(&topic.topic)
    }

    /// What the positions of limited claims take: the limited topics this
    /// process serves, by name, the pauses applying. A position so taken
    /// passes the rows of every other topic, and no row of those.
    pub(crate) fn limited_served(&self, limits: &Limits) -> Served {
        let mut exact: Vec<String> = limits
            .topics
            .iter()
            .filter(|topic| self.serves(limits, topic))
            .map(|topic| topic.topic.clone())
            .collect();
        exact.sort_unstable();
        exact.dedup();
        Served {
            exact,
            paused: limits.served.paused.clone(),
            ..Served::default()
        }
    }

    /// Learns what the others serve, what is paused and what is limited,
    /// and writes this process's row when [`row_write_every`] has passed
    /// since the last write; the row expires one lease after it is written.
    pub(crate) async fn beat(&self) -> Result<(), outbox_core::Error> {
        let write_due = self
            .row_written_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() >= row_write_every(self.config.lease));
        let beat = if write_due {
            let started = Instant::now();
            let beat = processes::beat(&self.pool, &self.process, self.config.lease).await?;
            *self
                .row_written_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(started);
            beat
        } else {
            processes::look(&self.pool, self.process.id).await?
        };
        if self.served.update(beat) && self.config.in_transaction {
            let limits = self.served.limits();
            if !limits.topics.is_empty() {
                let topics: Vec<&str> = limits.topics.iter().map(|t| t.topic.as_str()).collect();
                warn!(
                    ?topics,
                    "limited topics are claimed by lease-mode dispatchers only; this transactional dispatcher leaves them to those"
                );
            }
        }
        Ok(())
    }

    /// Adds this process's attempt counts to `outbox_activity`.
    async fn write_activity(&self) {
        if let Err(err) = self.topic_metrics.write_activity(&self.pool).await {
            debug!(error = %err, "could not write the attempt counts to outbox_activity");
        }
    }

    /// Beats every [`BEAT_EVERY`] until `stop`, then deletes the row; every
    /// [`ACTIVITY_EVERY_BEATS`] beats (and at the end) it writes the attempt
    /// counts for the console's charts.
    pub(crate) async fn announce(self: Arc<Self>, stop: CancellationToken) {
        // `run` beat once already, before the first claim.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BEAT_EVERY, BEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats: u32 = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(err) = self.beat().await {
                debug!(error = %err, "could not record this process in outbox_processes");
            }
            beats += 1;
            if beats.is_multiple_of(ACTIVITY_EVERY_BEATS) {
                self.write_activity().await;
            }
        }
        self.write_activity().await;
        if let Err(err) = processes::leave(&self.pool, self.process.id).await {
            warn!(error = %err, "could not remove this process from outbox_processes; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Subscription {
        Subscription {
            topics: vec!["own".into()],
            patterns: vec![">".into()],
            prefix_regexes: vec!["^webhook:".into()],
            fallback_regexes: vec!["^[^.].*$".into()],
            fallback_everything: true,
        }
    }

    #[test]
    fn the_row_is_written_three_times_a_lease_between_one_and_ten_seconds() {
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(row_write_every(secs(30)), secs(10));
        assert_eq!(row_write_every(secs(9)), secs(3));
        assert_eq!(row_write_every(secs(2)), BEAT_EVERY);
        assert_eq!(row_write_every(secs(3600)), secs(10));
    }

    #[test]
    fn a_fallback_takes_nothing_until_it_knows_what_others_serve() {
        let before = served(&relay(), None);
        assert!(!before.all);
        assert_eq!(before.exact, ["own"]);
        assert_eq!(before.regexes, ["^webhook:"]);
    }

    #[test]
    fn a_fallback_for_everything_leaves_the_topics_of_others_to_them() {
        assert_eq!(served(&relay(), Some(Vec::new())), Served::everything());
        let sharing = served(&relay(), Some(vec!["own".into(), "theirs".into()]));
        assert!(!sharing.all);
        assert_eq!(sharing.exact, ["own"]);
        assert_eq!(sharing.excluded, ["theirs"], "its own topic stays its own");
        assert_eq!(sharing.regexes, ["^webhook:", "^[^.].*$"]);
    }
}
