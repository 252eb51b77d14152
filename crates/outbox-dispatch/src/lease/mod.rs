//! Lease mode: a claim loop takes due rows with a lease (`locked_until`),
//! hands them to handler tasks, and the [`completer`] writes their outcomes;
//! the [`heartbeat`] keeps long handlers' leases fresh.

pub(crate) mod completer;
pub(crate) mod heartbeat;
mod limited;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::stream::{FuturesUnordered, StreamExt};
use outbox_core::model::Lease;
use outbox_core::store::listen::reconnect_pause;
use outbox_core::store::outbox as store;
use sqlx::{Connection, PgConnection};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::dispatcher::Shared;
use crate::outcome::{Finished, Outcome};
use crate::positions::ClaimFrom;

use self::limited::LimitedLooks;

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
            // A claim that started past the process's claims and came back
            // short looks once more from the positions before sleeping,
            // unless they were walked within the last few milliseconds.
            if got < wanted && !from.came_short() && !looks.more_waiting() {
                // A limited topic found at its limit is looked at again when
                // a slot may have freed or its next token is due.
                let pause = looks
                    .next_look()
                    .map_or(config.poll_interval, |next| next.min(config.poll_interval));
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = self.wake.notified() => looks.rows_came(),
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
