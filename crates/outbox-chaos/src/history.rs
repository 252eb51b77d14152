//! The history of a scenario — what producers committed, what handlers ran,
//! which effects, dead letters and stream messages exist — and the check of
//! the invariants on it, by set arithmetic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use outbox_core::NewEvent;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// What the event should end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Its handler writes one row in `chaos_effects`.
    Effect,
    /// It ends in `dead_letters`, exactly once.
    DeadLetter,
    /// It is relayed to the JetStream stream.
    Stream,
}

/// One event a scenario enqueues.
#[derive(Debug, Clone)]
pub struct Planned {
    /// What the event must end as.
    pub expect: Expect,
    /// The handler runs it this many times when nothing goes wrong.
    pub planned_invocations: u32,
    /// Its attempt limit.
    pub max_attempts: i32,
    topic: &'static str,
    payload: Value,
}

impl Planned {
    /// A `chaos.work` event in `mode` (see `outboxd`'s chaos handlers).
    pub fn work(n: i64, mode: &str, max_attempts: i32) -> Self {
        let (expect, planned) = match mode {
            "flaky" => (Expect::Effect, 2),
            "permanent" => (Expect::DeadLetter, 1),
            "panic" | "abort" => (Expect::DeadLetter, max_attempts as u32),
            _ => (Expect::Effect, 1),
        };
        Self {
            expect,
            planned_invocations: planned,
            max_attempts,
            topic: "chaos.work",
            payload: json!({ "n": n, "mode": mode }),
        }
    }

    /// A `chaos.work` event that sleeps `ms` in its handler.
    pub fn slow(n: i64, ms: u64, max_attempts: i32) -> Self {
        let mut p = Self::work(n, "slow", max_attempts);
        p.payload["sleep_ms"] = json!(ms);
        p
    }

    /// A payload the handler cannot decode: dead-lettered at the first attempt.
    pub fn undecodable(n: i64, max_attempts: i32) -> Self {
        let mut p = Self::work(n, "ok", max_attempts);
        p.payload["sleep_ms"] = json!("soon");
        p.expect = Expect::DeadLetter;
        p
    }

    /// An event no handler takes: the relay publishes it to JetStream.
    pub fn relay(n: i64, max_attempts: i32) -> Self {
        Self {
            expect: Expect::Stream,
            planned_invocations: 0,
            max_attempts,
            topic: "chaos.relay",
            payload: json!({ "n": n }),
        }
    }

    /// Changes what the event must end as (e.g. a slow handler without heartbeat).
    pub fn expecting(mut self, expect: Expect, planned_invocations: u32) -> Self {
        self.expect = expect;
        self.planned_invocations = planned_invocations;
        self
    }
}

/// How an enqueue ended, from the producer's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// COMMIT returned success: the event must not be lost.
    Committed,
    /// COMMIT failed: it may or may not have committed.
    Ambiguous,
    /// The producer rolled it back on purpose: it must never be seen.
    RolledBack,
    /// Failed before COMMIT: it must never be seen.
    Failed,
}

/// Enqueues `plan` in order, each event in its own transaction, at about
/// `rate` events per second; every tenth transaction is rolled back on purpose.
pub async fn produce(
    pool: PgPool,
    app: Uuid,
    plan: Vec<Planned>,
    rate: u32,
) -> BTreeMap<i64, (Planned, Commit)> {
    let mut out = BTreeMap::new();
    let pause = Duration::from_secs(1) / rate.max(1);
    let mut tick = tokio::time::interval(pause);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for planned in plan {
        tick.tick().await;
        let n = planned.payload["n"].as_i64().unwrap_or_default();
        let rollback = n % 10 == 9;
        let commit = enqueue_one(&pool, app, &planned, rollback).await;
        out.insert(n, (planned, commit));
    }
    out
}

async fn enqueue_one(pool: &PgPool, app: Uuid, planned: &Planned, rollback: bool) -> Commit {
    let Ok(mut tx) = pool.begin().await else {
        return Commit::Failed;
    };
    let event = NewEvent::new(planned.topic, planned.payload.clone())
        .with_max_attempts(planned.max_attempts);
    if outbox_core::enqueue(&mut tx, app, &event).await.is_err() {
        return Commit::Failed;
    }
    if rollback {
        return match tx.rollback().await {
            Ok(()) => Commit::RolledBack,
            // A rollback that fails still cannot commit.
            Err(_) => Commit::RolledBack,
        };
    }
    match tx.commit().await {
        Ok(()) => Commit::Committed,
        Err(_) => Commit::Ambiguous,
    }
}

/// The table the chaos handlers write their effects to.
pub async fn create_effects_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS chaos_effects (
            n        bigint PRIMARY KEY,
            event_id uuid NOT NULL,
            attempt  integer NOT NULL,
            worker   text NOT NULL,
            -- The worker's wall clock, to show a skew was in effect.
            worker_clock timestamptz NOT NULL,
            at       timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// What exists once the scenario is quiet.
#[derive(Debug, Default)]
pub struct Observed {
    /// Effects by n.
    pub effects: BTreeSet<i64>,
    /// Dead letters by n (count).
    pub dead_letters: BTreeMap<i64, u32>,
    /// Handler invocations by n (count).
    pub invocations: BTreeMap<i64, u32>,
    /// Stream messages by n (count).
    pub stream: BTreeMap<i64, u32>,
    /// Rows still in the outbox.
    pub outbox_left: i64,
    /// Largest difference between a worker's wall clock and the database's
    /// when it wrote an effect, in seconds.
    pub max_clock_skew_secs: f64,
}

impl Observed {
    /// Reads effects, dead letters, outbox rows and the invocation histories.
    pub async fn collect(pool: &PgPool, histories: &[PathBuf]) -> anyhow::Result<Self> {
        let effects: Vec<i64> = sqlx::query_scalar("SELECT n FROM chaos_effects")
            .fetch_all(pool)
            .await?;
        let dead: Vec<(Option<i64>, i64)> =
            sqlx::query_as("SELECT (payload->>'n')::bigint, count(*) FROM dead_letters GROUP BY 1")
                .fetch_all(pool)
                .await?;
        let outbox_left = outbox_core::store::outbox::count(pool).await?;
        let skew: Option<f64> = sqlx::query_scalar(
            "SELECT max(abs(extract(epoch FROM worker_clock - at)))::float8 FROM chaos_effects",
        )
        .fetch_one(pool)
        .await?;
        let mut observed = Self {
            effects: effects.into_iter().collect(),
            dead_letters: dead
                .into_iter()
                .map(|(n, c)| (n.unwrap_or(-1), c as u32))
                .collect(),
            outbox_left,
            max_clock_skew_secs: skew.unwrap_or_default(),
            ..Self::default()
        };
        for path in histories {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            // <n> <event id> <attempt> <worker>
            for line in text.lines() {
                let n = line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<i64>().ok());
                if let Some(n) = n {
                    *observed.invocations.entry(n).or_default() += 1;
                }
            }
        }
        Ok(observed)
    }

    /// Counts the stream's messages by the `n` of their payload.
    pub async fn read_stream(&mut self, nats_url: &str, stream: &str) -> anyhow::Result<()> {
        let client = async_nats::connect(nats_url).await?;
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(stream).await?;
        let total = stream.clone().info().await?.state.messages as usize;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        let mut seen = 0;
        while seen < total {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_secs(1))
                .messages()
                .await?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                let n = serde_json::from_slice::<Value>(&message.payload)
                    .ok()
                    .and_then(|v| v["n"].as_i64())
                    .unwrap_or(-1);
                *self.stream.entry(n).or_default() += 1;
                got += 1;
            }
            if got == 0 {
                break;
            }
            seen += got;
        }
        Ok(())
    }
}

/// The check's counts.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Events whose COMMIT succeeded.
    pub committed: usize,
    /// Events whose COMMIT failed (outcome unknown to the producer).
    pub ambiguous: usize,
    /// Events rolled back or failed before COMMIT.
    pub not_committed: usize,
    /// Committed events with no effect, dead letter or stream message (or
    /// that ended differently than their handler decides).
    pub lost: usize,
    /// Rolled-back or unknown events seen anywhere.
    pub unexpected: usize,
    /// An effect and a dead letter for one event, or two dead letters, or a
    /// stream copy the duplicate window should have dropped.
    pub double_effects: usize,
    /// Handler invocations beyond the planned ones (faults cause re-runs).
    pub extra_invocations: usize,
    /// Events run more often than their `max_attempts`.
    pub over_attempts: usize,
    /// Stream copies beyond the first (allowed only past the duplicate window).
    pub stream_copies: usize,
    /// Rows left in the outbox after quiescence.
    pub stuck: i64,
}

impl Verdict {
    /// Checks the invariants; `stream_dups_allowed` is true when a fault
    /// outlasted the duplicate window.
    pub fn check(
        produced: &BTreeMap<i64, (Planned, Commit)>,
        observed: &Observed,
        stream_dups_allowed: bool,
    ) -> Self {
        let mut v = Self {
            stuck: observed.outbox_left,
            ..Self::default()
        };
        for (n, (planned, commit)) in produced {
            let effect = observed.effects.contains(n);
            let dead = observed.dead_letters.get(n).copied().unwrap_or(0);
            let copies = observed.stream.get(n).copied().unwrap_or(0);
            let runs = observed.invocations.get(n).copied().unwrap_or(0);
            match commit {
                Commit::Committed | Commit::Ambiguous => {
                    if *commit == Commit::Committed {
                        v.committed += 1;
                    } else {
                        v.ambiguous += 1;
                    }
                    let seen = effect || dead > 0 || copies > 0;
                    let lost = match planned.expect {
                        Expect::Effect => !effect,
                        Expect::DeadLetter => dead == 0,
                        Expect::Stream => copies == 0,
                    };
                    // An ambiguous commit that did not happen is not a loss.
                    if lost && (*commit == Commit::Committed || seen) {
                        v.lost += 1;
                    }
                    if (effect && dead > 0) || dead > 1 {
                        v.double_effects += 1;
                    }
                    if copies > 1 {
                        v.stream_copies += copies as usize - 1;
                        if !stream_dups_allowed {
                            v.double_effects += 1;
                        }
                    }
                    v.extra_invocations +=
                        runs.saturating_sub(planned.planned_invocations) as usize;
                    if runs > planned.max_attempts as u32 {
                        v.over_attempts += 1;
                    }
                }
                Commit::RolledBack | Commit::Failed => {
                    v.not_committed += 1;
                    if effect || dead > 0 || copies > 0 || runs > 0 {
                        v.unexpected += 1;
                    }
                }
            }
        }
        let known = |n: &i64| produced.contains_key(n);
        v.unexpected += observed.effects.iter().filter(|n| !known(n)).count();
        v.unexpected += observed.dead_letters.keys().filter(|n| !known(n)).count();
        v.unexpected += observed.stream.keys().filter(|n| !known(n)).count();
        v
    }

    /// Whether every invariant holds.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.unexpected == 0
            && self.double_effects == 0
            && self.over_attempts == 0
            && self.stuck == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produced(items: &[(i64, Planned, Commit)]) -> BTreeMap<i64, (Planned, Commit)> {
        items
            .iter()
            .map(|(n, p, c)| (*n, (p.clone(), *c)))
            .collect()
    }

    #[test]
    fn a_committed_event_without_effect_is_lost_and_a_rolled_back_one_seen_is_unexpected() {
        let produced = produced(&[
            (1, Planned::work(1, "ok", 3), Commit::Committed),
            (2, Planned::work(2, "ok", 3), Commit::Committed),
            (9, Planned::work(9, "ok", 3), Commit::RolledBack),
            (4, Planned::work(4, "ok", 3), Commit::Ambiguous),
        ]);
        let observed = Observed {
            effects: [1, 9].into_iter().collect(),
            invocations: [(1, 1), (9, 1)].into_iter().collect(),
            ..Observed::default()
        };
        let v = Verdict::check(&produced, &observed, false);
        assert_eq!(v.lost, 1, "event 2 is lost; ambiguous 4 never committed");
        assert_eq!(v.unexpected, 1, "event 9 was rolled back");
        assert!(!v.passed());
    }

    #[test]
    fn doubles_and_overruns_are_counted() {
        let produced = produced(&[
            (1, Planned::work(1, "ok", 2), Commit::Committed),
            (2, Planned::work(2, "permanent", 2), Commit::Committed),
            (3, Planned::relay(3, 2), Commit::Committed),
        ]);
        let observed = Observed {
            effects: [1].into_iter().collect(),
            dead_letters: [(1, 1), (2, 2)].into_iter().collect(),
            invocations: [(1, 3), (2, 1)].into_iter().collect(),
            stream: [(3, 2)].into_iter().collect(),
            ..Observed::default()
        };
        let v = Verdict::check(&produced, &observed, false);
        assert_eq!(v.double_effects, 3);
        assert_eq!(v.over_attempts, 1);
        assert_eq!(v.extra_invocations, 2);
        assert_eq!(v.stream_copies, 1);
        let allowed = Verdict::check(&produced, &observed, true);
        assert_eq!(allowed.double_effects, 2);
    }

    #[test]
    fn a_clean_history_passes() {
        let produced = produced(&[
            (1, Planned::work(1, "flaky", 3), Commit::Committed),
            (2, Planned::undecodable(2, 3), Commit::Committed),
        ]);
        let observed = Observed {
            effects: [1].into_iter().collect(),
            dead_letters: [(2, 1)].into_iter().collect(),
            invocations: [(1, 2), (2, 1)].into_iter().collect(),
            ..Observed::default()
        };
        let v = Verdict::check(&produced, &observed, false);
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.extra_invocations, 0);
    }
}
