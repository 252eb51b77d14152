//! Lease mode: a claim loop takes due rows with a lease (`locked_until`),
//! hands them to handler tasks, and the [`completer`] writes their outcomes;
//! the [`heartbeat`] keeps long handlers' leases fresh.

pub(crate) mod completer;
pub(crate) mod heartbeat;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use outbox_core::ClaimedEvent;
use outbox_core::model::Lease;
use outbox_core::store::listen::reconnect_pause;
use outbox_core::store::outbox as store;
use sqlx::{Connection, PgConnection};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::dispatcher::Shared;
use crate::outcome::{Finished, Outcome};
use crate::positions::ClaimFrom;

/// How long a claim loop leaves a limited topic alone after finding all its
/// slots taken.
const LIMITED_LOOK_AGAIN: Duration = Duration::from_millis(25);

/// The limited topics a claim loop found at their limit or without due
/// rows, and until when it leaves them alone: a limited claim costs a
/// transaction of its own, which a claim loop draining other topics should
/// not pay on every round.
#[derive(Debug, Default)]
struct LimitedLooks {
    full: HashMap<(Uuid, String), Instant>,
    idle: HashMap<(Uuid, String), Instant>,
    start: usize,
}

impl LimitedLooks {
    /// How long until a limited topic found at its limit is looked at
    /// again, when one was: its rows may be waiting.
    fn next_look(&self) -> Option<Duration> {
        self.full
            .values()
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

/// Claimed rows run together in one task: spawning a task per row cost more
/// than a no-op handler, while a batch still spreads over the runtime's
/// threads in chunks of this size.
const ROWS_PER_TASK: usize = 32;

impl Shared {
    /// Claims rows while permits are free and hands each to a task; on stop,
    /// waits up to `drain_grace` for its tasks and aborts the rest (their
    /// rows stay in `running` and are released by the caller).
    pub(crate) async fn claim_loop(
        self: Arc<Self>,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
        done_tx: mpsc::UnboundedSender<Finished>,
    ) {
        let config = &self.config;
        let mut tasks = JoinSet::new();
        let mut claim_errors = 0u32;
        let mut claim_conn: Option<PgConnection> = None;
        let mut from = ClaimFrom::default();
        let mut looks = LimitedLooks::default();
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut held = vec![first];
            while held.len() < config.batch_size as usize {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let wanted = held.len();
            let succeeded = self.take_succeeded();
            let leases: Vec<Lease> = succeeded.iter().map(|f| f.lease).collect();
            let claimed = match self.claim_connection(&mut claim_conn).await {
                Ok(conn) => {
                    self.claim_round(conn, &mut from, &mut looks, &leases, wanted)
                        .await
                }
                Err(err) => Err(err.into()),
            };
            if claimed.is_err() {
                // The next round connects afresh rather than reuse a
                // connection in an unknown state.
                claim_conn = None;
            }
            let rows = match claimed {
                Ok((completed, rows)) => {
                    claim_errors = 0;
                    self.record_completed(leases.len(), completed);
                    rows
                }
                Err(err) => {
                    self.return_succeeded(succeeded);
                    claim_errors = claim_errors.saturating_add(1);
                    let pause = reconnect_pause(claim_errors);
                    warn!(error = %err, ?pause, "claim failed; backing off");
                    drop(held);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            let got = rows.len();
            self.claimed_rows.fetch_add(got as u64, Ordering::Relaxed);
            self.running_insert_all(&rows);
            let mut rows = rows.into_iter();
            loop {
                let chunk: Vec<_> = rows
                    .by_ref()
                    .take(ROWS_PER_TASK)
                    .map(|row| (row, held.pop()))
                    .collect();
                if chunk.is_empty() {
                    break;
                }
                let inner = self.clone();
                let done_tx = done_tx.clone();
                // Each row's outcome is handed on as soon as it is known, not
                // when the rest of its chunk is.
                tasks.spawn(async move {
                    let mut running: FuturesUnordered<_> = chunk
                        .into_iter()
                        .map(|(row, permit)| inner.run_row(row, permit))
                        .collect();
                    while let Some(finished) = running.next().await {
                        inner.running_remove(finished.lease.id);
                        if matches!(finished.outcome, Outcome::Done) && !finished.ordered {
                            inner.push_succeeded(finished);
                        } else {
                            // The completer only stops after every sender is gone.
                            let _ = done_tx.send(finished);
                        }
                    }
                });
            }
            drop(held);
            while tasks.try_join_next().is_some() {}
            if got < wanted {
                // A limited topic found at its limit is looked at again when
                // a slot may have freed or its next token is due.
                let pause = looks
                    .next_look()
                    .map_or(config.poll_interval, |next| next.min(config.poll_interval));
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = self.wake.notified() => looks.idle.clear(),
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        if let Some(conn) = claim_conn.take() {
            let _ = conn.close().await;
        }
        debug!(running = tasks.len(), grace = ?config.drain_grace, "claim loop draining");
        let deadline = tokio::time::Instant::now() + config.drain_grace;
        while !tasks.is_empty() {
            if tokio::time::timeout_at(deadline, tasks.join_next())
                .await
                .is_err()
            {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
            }
        }
    }

    /// One claim: the limited topics whose slots may be free first, then
    /// the others for the rest of `wanted`, completing `done` on the way.
    /// Limited rows are bounded by their slots, so they cannot starve the
    /// others; the others, claimed second, cannot starve them.
    async fn claim_round(
        &self,
        conn: &mut PgConnection,
        from: &mut ClaimFrom,
        looks: &mut LimitedLooks,
        done: &[Lease],
        wanted: usize,
    ) -> Result<(usize, Vec<ClaimedEvent>), outbox_core::Error> {
        let config = &self.config;
        let mut rows = self.claim_limited(conn, looks, wanted).await?;
        let rest = wanted - rows.len();
        if rest == 0 {
            let completed = store::complete(&mut *conn, done).await?.len();
            return Ok((completed, rows));
        }
        let positions = from.current(self, &mut *conn).await?;
        let (completed, more) = store::complete_and_claim(
            conn,
            positions,
            &self.served.get(),
            done,
            &config.worker_id,
            rest as u32,
            config.lease,
        )
        .await?;
        rows.extend(more);
        Ok((completed, rows))
    }

    /// Claims up to `wanted` rows of the limited topics, each within its
    /// limits; a topic found at its concurrency limit is left alone for
    /// [`LIMITED_LOOK_AGAIN`], one at its rate limit until its next token.
    async fn claim_limited(
        &self,
        conn: &mut PgConnection,
        looks: &mut LimitedLooks,
        wanted: usize,
    ) -> Result<Vec<ClaimedEvent>, outbox_core::Error> {
        let limits = self.served.limits();
        let now = Instant::now();
        looks.full.retain(|_, until| *until > now);
        looks.idle.retain(|_, until| *until > now);
        let mut rows = Vec::new();
        let count = limits.topics.len();
        // Each round starts at the next topic, so none is always last.
        looks.start = looks.start.wrapping_add(1);
        for i in 0..count {
            let topic = &limits.topics[(looks.start + i) % count];
            let asked = wanted - rows.len();
            if asked == 0 {
                break;
            }
            let key = (topic.app_id, topic.topic.clone());
            if looks.full.contains_key(&key) || looks.idle.contains_key(&key) {
                continue;
            }
            let claim = store::claim_limited(
                &mut *conn,
                topic,
                &limits.served,
                &self.config.worker_id,
                asked as u32,
                self.config.lease,
            )
            .await?;
            let free = claim.free as usize;
            if free <= asked && claim.rows.len() == free {
                // At its limit: a slot frees when another row ends, a token
                // comes when its time comes.
                let again = claim
                    .ready_in
                    .filter(|wait| !wait.is_zero())
                    .unwrap_or(LIMITED_LOOK_AGAIN);
                looks.full.insert(key, now + again);
            } else if claim.rows.len() < asked {
                // Nothing more is due: looked at again after a poll interval,
                // or when a notification says rows came.
                looks.idle.insert(key, now + self.config.poll_interval);
            }
            rows.extend(claim.rows);
        }
        Ok(rows)
    }

    /// The claim loop's own connection (see [`store::claim_connect_options`]),
    /// connected first if needed.
    async fn claim_connection<'c>(
        &self,
        conn: &'c mut Option<PgConnection>,
    ) -> Result<&'c mut PgConnection, sqlx::Error> {
        let connected = match conn.take() {
            Some(connected) => connected,
            None => {
                let options = store::claim_connect_options(&self.pool.connect_options());
                PgConnection::connect_with(&options).await?
            }
        };
        Ok(conn.insert(connected))
    }
}
