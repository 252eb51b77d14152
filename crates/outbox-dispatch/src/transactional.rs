//! Transactional mode: each claim loop deletes a batch of rows in a
//! transaction, runs their handlers one after another inside it and commits
//! — one write per row. See [`crate::Config::in_transaction`].
//!
//! The **batch keeper** is a second connection per claim loop. Before any
//! handler of a batch runs, it records the batch's events and holds an
//! advisory lock that marks the batch alive, committing at once (the batch's
//! own transaction commits only at the end). If the worker dies mid-batch,
//! the lock goes with its connection, and the next claim loop to look
//! (`count_abandoned`) counts an attempt for those events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outbox_core::ClaimedEvent;
use outbox_core::model::Lease;
use outbox_core::store::listen::reconnect_pause;
use outbox_core::store::outbox::{self as store, FailedAttempt, Positions, ToDeadLetter};
use outbox_core::store::tx_batch;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::dispatcher::{BatchReport, Shared};
use crate::failure_log::RowFacts;
use crate::outcome::{Outcome, RowWrite};
use crate::positions::ClaimFrom;
use crate::{ClaimTx, Error};

/// How often each transactional claim loop looks for batches whose worker died.
const ABANDONED_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A taken row as its handler sees it: a take does not count the attempt in
/// the table (a failure does, after the rollback), so the attempt running
/// now is one more than those recorded.
fn taken_attempt(row: &ClaimedEvent) -> ClaimedEvent {
    let mut row = row.clone();
    row.attempt_count += 1;
    row
}

impl Shared {
    /// Transactional mode: take a batch, run it in its transaction, commit;
    /// repeat until stopped. A stop lets the batch in hand finish.
    pub(crate) async fn tx_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut errors = 0u32;
        let mut keeper = None;
        let mut abandoned_checked: Option<Instant> = None;
        let mut from = ClaimFrom::default();
        while !stop.is_cancelled() {
            if abandoned_checked.is_none_or(|at| at.elapsed() >= ABANDONED_CHECK_INTERVAL) {
                abandoned_checked = Some(Instant::now());
                self.count_abandoned().await;
            }
            // Positions move on over the keeper, a connection planned like
            // a claim loop's.
            let advanced = match keeper.as_mut() {
                Some(conn) => from.current(&self, conn).await.map_err(Error::from),
                None => match self.connect_keeper().await {
                    Ok(conn) => from
                        .current(&self, keeper.insert(conn))
                        .await
                        .map_err(Error::from),
                    Err(err) => Err(err),
                },
            };
            let batch = match advanced {
                Ok(positions) => self.tx_batch(&mut keeper, positions).await,
                Err(err) => {
                    keeper = None;
                    Err(err)
                }
            };
            match batch {
                Ok(report) => {
                    errors = 0;
                    if report.claimed < self.config.batch_size as usize && !from.came_short() {
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => break,
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(self.config.poll_interval) => {}
                        }
                    }
                }
                Err(err) => {
                    errors = errors.saturating_add(1);
                    let pause = reconnect_pause(errors);
                    warn!(error = %err, ?pause, "transactional batch failed; backing off");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        if let Some(keeper) = keeper {
            let _ = keeper.close().await;
        }
    }

    /// One transactional batch: delete the rows, run their handlers in the
    /// same transaction, commit — one write per row.
    ///
    /// When a handler fails, the batch rolls back (nothing of it happened)
    /// and its rows are locked again at once in a new transaction, where each
    /// handler runs inside a savepoint: a failure then undoes only its own
    /// writes and records its attempt in that transaction, and the rows that
    /// succeed are deleted when it commits. The failed row's outcome is kept
    /// from the first run; the rows before it run a second time (their first
    /// writes were rolled back). A row another claim takes in the moment
    /// between the two transactions is simply run there.
    ///
    /// Before any handler runs, the batch's events are recorded through
    /// `keeper` (see [`store::open_tx_batch`]), so a worker that dies
    /// mid-batch still counts an attempt for each of them.
    pub(crate) async fn tx_batch(
        &self,
        keeper: &mut Option<PgConnection>,
        positions: &Positions,
    ) -> Result<BatchReport, Error> {
        let mut tx = self.pool.begin().await?;
        let rows = store::take(
            &mut *tx,
            positions,
            &self.served.get(),
            self.config.batch_size,
        )
        .await?;
        let taken = rows.len();
        if taken == 0 {
            tx.commit().await?;
            return Ok(BatchReport::default());
        }
        self.claimed_rows.fetch_add(taken as u64, Ordering::Relaxed);
        self.note_claimed(&rows);
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let lock_key = fastrand::i64(..);
        self.open_tx_batch(keeper, lock_key, &ids).await?;
        let (mut tx, first_failure) = self.run_batch(tx, &rows).await?;
        let Some((failed_at, failed_outcome, failed_started_at)) = first_failure else {
            store::close_tx_batch(&mut *tx, lock_key).await?;
            tx.commit().await?;
            self.record_completed(taken, taken);
            return Ok(BatchReport {
                claimed: taken,
                completed: taken,
                ..BatchReport::default()
            });
        };
        tx.rollback().await?;
        let failed_id = rows[failed_at].id;
        let mut tx = self.pool.begin().await?;
        store::close_tx_batch(&mut *tx, lock_key).await?;
        let locked = store::lock_ids(&mut *tx, &ids).await?;
        let mut report = BatchReport {
            claimed: taken,
            ..BatchReport::default()
        };
        let mut done = Vec::new();
        let mut failed_outcome = Some(failed_outcome);
        for row in &locked {
            let mut started_at = failed_started_at;
            let outcome = if row.id == failed_id {
                failed_outcome.take().unwrap_or(Outcome::Done)
            } else {
                started_at = chrono::Utc::now();
                tx_batch::savepoint(&mut tx).await?;
                let shared = ClaimTx::new(tx);
                let outcome = self
                    .run_handler(taken_attempt(row), Some(shared.clone()))
                    .await;
                tx = shared
                    .finish()
                    .await
                    .ok_or(Error::Internal("the claim transaction vanished"))?;
                if !matches!(outcome, Outcome::Done) {
                    tx_batch::rollback_to_savepoint(&mut tx).await?;
                }
                tx_batch::release_savepoint(&mut tx).await?;
                outcome
            };
            if matches!(outcome, Outcome::Done) {
                done.push(row.id);
                report.completed += 1;
            } else {
                let facts = RowFacts::of(row, self.config.retry.max_attempts);
                let (retried, dead_lettered) = self
                    .record_tx_failure(&mut tx, &facts, outcome, started_at)
                    .await?;
                report.retried += retried;
                report.dead_lettered += dead_lettered;
            }
        }
        store::delete_locked(&mut *tx, &done).await?;
        tx.commit().await?;
        self.record_completed(report.completed, report.completed);
        self.add_totals(BatchReport {
            retried: report.retried,
            dead_lettered: report.dead_lettered,
            ..BatchReport::default()
        });
        Ok(report)
    }

    /// A batch keeper: commits asynchronously (see
    /// [`tx_batch::commit_asynchronously`]) and plans like a claim loop's
    /// connection, since the loop's positions move on over it too.
    async fn connect_keeper(&self) -> Result<PgConnection, Error> {
        let options = store::claim_connect_options(&self.pool.connect_options());
        let mut conn = PgConnection::connect_with(&options).await?;
        tx_batch::commit_asynchronously(&mut conn).await?;
        Ok(conn)
    }

    /// Records a transactional batch's events through the loop's keeper
    /// connection, connecting it first if needed (a broken one is replaced).
    async fn open_tx_batch(
        &self,
        keeper: &mut Option<PgConnection>,
        lock_key: i64,
        ids: &[Uuid],
    ) -> Result<(), Error> {
        let mut conn = match keeper.take() {
            Some(conn) => conn,
            None => self.connect_keeper().await?,
        };
        store::open_tx_batch(&mut conn, lock_key, &self.config.worker_id, ids).await?;
        // Kept only after a success: a connection that failed is dropped,
        // which also frees any lock it held.
        *keeper = Some(conn);
        Ok(())
    }

    /// Counts an attempt for the events of transactional batches whose
    /// worker died, in a transaction of its own.
    pub(crate) async fn count_abandoned(&self) {
        let counted = async {
            let mut tx = self.pool.begin().await?;
            let counted = store::count_abandoned_tx_batches(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, Error>(counted)
        }
        .await;
        match counted {
            Ok(0) => {}
            Ok(events) => warn!(
                events,
                "a worker died during a transactional batch; its events' attempt was counted"
            ),
            Err(err) => warn!(error = %err, "counting abandoned transactional batches failed"),
        }
    }

    /// Runs the handlers of `rows` one after another in `tx` until one does
    /// not succeed; returns the transaction and that row's index, outcome
    /// and start.
    async fn run_batch(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        rows: &[ClaimedEvent],
    ) -> Result<
        (
            sqlx::Transaction<'static, sqlx::Postgres>,
            Option<(usize, Outcome, chrono::DateTime<chrono::Utc>)>,
        ),
        Error,
    > {
        let shared = ClaimTx::new(tx);
        let mut failure = None;
        for (i, row) in rows.iter().enumerate() {
            let started_at = chrono::Utc::now();
            let outcome = self
                .run_handler(taken_attempt(row), Some(shared.clone()))
                .await;
            if !matches!(outcome, Outcome::Done) {
                failure = Some((i, outcome, started_at));
                break;
            }
        }
        let tx = shared
            .finish()
            .await
            .ok_or(Error::Internal("the claim transaction vanished"))?;
        Ok((tx, failure))
    }

    /// Records a failed transactional attempt in the batch's transaction:
    /// counts it (a snooze does not) and reschedules the row, or moves it to
    /// `dead_letters`. Returns (retried, dead-lettered).
    async fn record_tx_failure(
        &self,
        tx: &mut sqlx::PgConnection,
        facts: &RowFacts,
        outcome: Outcome,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(usize, usize), Error> {
        let id = facts.id;
        let (delay, count, error, dead_letter) = match outcome.write() {
            RowWrite::Reschedule {
                delay,
                error,
                counts_attempt,
            } => (delay, counts_attempt, error, None),
            RowWrite::DeadLetter { error } => {
                (Duration::ZERO, true, Some(error.clone()), Some(error))
            }
            RowWrite::Delete | RowWrite::Reply => (Duration::ZERO, false, None, None),
        };
        let attempt = FailedAttempt {
            id,
            delay,
            counts: count,
            error: error.as_deref(),
            worker: &self.config.worker_id,
            started_at,
        };
        let history = self.config.attempt_history;
        let token = store::record_failed_attempt(&mut *tx, &attempt, history).await?;
        Ok(match (dead_letter, token) {
            (Some(error), Some(token)) => {
                let moved = store::dead_letter(
                    tx,
                    &[ToDeadLetter {
                        lease: Lease { id, token },
                        error: error.clone(),
                        handler: None,
                    }],
                    history,
                )
                .await?;
                if !moved.is_empty() {
                    self.failures.dead_lettered(facts, &error);
                }
                (0, moved.len())
            }
            (None, Some(_)) if count => {
                self.failures
                    .retry_scheduled(facts, error.as_deref().unwrap_or_default(), delay);
                (1, 0)
            }
            _ => (0, 0),
        })
    }
}
