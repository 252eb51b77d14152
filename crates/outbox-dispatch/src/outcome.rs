//! Running a claimed row's handler, and the one mapping from its outcome to
//! what is written to the row.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use outbox_core::ClaimedEvent;
use outbox_core::model::Lease;
use outbox_core::store::outbox::{self as store, Reschedule, ToDeadLetter};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, warn};
use uuid::Uuid;

use crate::dispatcher::{BatchReport, Shared};
use crate::failure_log::RowFacts;
use crate::telemetry::TopicHandles;
use crate::{ClaimTx, Error, Event, HandlerError};

pub use outbox_core::store::invocations::{NO_HANDLER, UNAVAILABLE};

/// The result of running one claimed row.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done,
    Retry {
        delay: Duration,
        error: String,
    },
    Snooze(Duration),
    ToDeadLetter {
        error: String,
    },
    /// A synchronous invocation's answer: delivered to its caller, never retried.
    Reply {
        app_id: Uuid,
        reply_to: String,
        topic: String,
        ok: bool,
        result: serde_json::Value,
        started_at: chrono::DateTime<chrono::Utc>,
    },
}

/// A row whose handler has returned, on its way to the completer.
pub(crate) struct Finished {
    pub(crate) lease: Lease,
    pub(crate) outcome: Outcome,
    pub(crate) ordered: bool,
    // Only for failures (what their log lines say); successes stay cheap.
    pub(crate) facts: Option<Box<RowFacts>>,
    // Bounds the rows a dispatcher holds. A failure keeps its permit until the
    // outcome is written; a success gives it back as soon as the handler
    // returns, since the next claim statement deletes it anyway.
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// What an outcome writes to its row: the one mapping both modes use (lease
/// mode batches the writes of many rows, transactional mode writes one row's
/// in its batch's transaction).
#[derive(Debug)]
pub(crate) enum RowWrite {
    /// Delete the row: its work is done.
    Delete,
    /// Make the row due again after `delay`, recording `error`; a snooze
    /// does not count the attempt.
    Reschedule {
        delay: Duration,
        error: Option<String>,
        counts_attempt: bool,
    },
    /// Move the row to `dead_letters`.
    DeadLetter { error: String },
    /// Delete the row and answer its synchronous caller.
    Reply,
}

impl Outcome {
    /// See [`RowWrite`].
    pub(crate) fn write(&self) -> RowWrite {
        match self {
            Outcome::Done => RowWrite::Delete,
            Outcome::Retry { delay, error } => RowWrite::Reschedule {
                delay: *delay,
                error: Some(error.clone()),
                counts_attempt: true,
            },
            Outcome::Snooze(delay) => RowWrite::Reschedule {
                delay: *delay,
                error: None,
                counts_attempt: false,
            },
            Outcome::ToDeadLetter { error } => RowWrite::DeadLetter {
                error: error.clone(),
            },
            Outcome::Reply { .. } => RowWrite::Reply,
        }
    }
}

impl Shared {
    /// Runs one claimed row and decides its outcome. Never fails: every
    /// problem, panics included, becomes an outcome.
    pub(crate) async fn run_row(
        &self,
        row: ClaimedEvent,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Finished {
        let lease = row.lease();
        let ordered = row.ordering_key.is_some();
        let span = tracing::info_span!("outbox.dispatch", id = %row.id, topic = %outbox_core::topics::shown(&row.topic),
            attempt = row.attempt_count, correlation_id = tracing::field::Empty);
        // Only rows that carry a correlation id (under either name) get the
        // field (no empty ones).
        let correlation = ["correlation-id", "x-correlation-id"]
            .iter()
            .find_map(|name| row.headers.get(*name).and_then(|v| v.as_str()));
        if let Some(correlation) = correlation {
            span.record("correlation_id", correlation);
        }
        let facts = RowFacts::of(&row, self.config.retry.max_attempts);
        let outcome = self.run_handler(row, None).instrument(span).await;
        let facts = matches!(
            outcome,
            Outcome::Retry { .. } | Outcome::ToDeadLetter { .. }
        )
        .then(|| Box::new(facts));
        Finished {
            lease,
            outcome,
            ordered,
            facts,
            permit,
        }
    }

    /// Runs a row (`run_handler_unmetered`) and counts the attempt and
    /// its outcome under the row's app and topic.
    pub(crate) async fn run_handler(
        &self,
        row: ClaimedEvent,
        claim_tx: Option<ClaimTx>,
    ) -> Outcome {
        let meter = self
            .topic_metrics
            .of(&self.pool, row.app_id, &row.topic)
            .await;
        meter.claimed.increment(1);
        if let Some(due) = row.due_at {
            // This host's clock against the database's: a skew shows as a
            // wait of its size, never as a negative one.
            let waited = (chrono::Utc::now() - due).to_std().unwrap_or_default();
            meter.queue_wait.record(waited.as_secs_f64());
        }
        let outcome = self.run_handler_unmetered(row, claim_tx, &meter).await;
        match &outcome {
            Outcome::Done | Outcome::Reply { ok: true, .. } => meter.count_completed(),
            Outcome::Retry { .. } => meter.count_retried(),
            Outcome::ToDeadLetter { .. } => meter.count_dead_lettered(),
            Outcome::Snooze(_) | Outcome::Reply { ok: false, .. } => {}
        }
        outcome
    }

    async fn run_handler_unmetered(
        &self,
        row: ClaimedEvent,
        claim_tx: Option<ClaimTx>,
        meter: &TopicHandles,
    ) -> Outcome {
        let retry = &self.config.retry;
        let max = row.max_attempts.unwrap_or(retry.max_attempts as i32);
        if row.attempt_count > max {
            return Outcome::ToDeadLetter {
                error: format!(
                    "attempts exhausted: attempt {} of {max} did not finish (its worker died, its lease expired, or a stopping dispatcher released it unfinished; see the attempt history)",
                    row.attempt_count - 1
                ),
            };
        }
        if row.depth > self.config.max_trigger_depth as i32 {
            return Outcome::ToDeadLetter {
                error: format!(
                    "trigger chain depth {} exceeds max_trigger_depth {}; not run (a trigger loop?)",
                    row.depth, self.config.max_trigger_depth
                ),
            };
        }
        // Trigger work runs with the rights of the principal that registered
        // the trigger; a principal that lost them gets a dead letter, not a run.
        if row.trigger_id.is_some()
            && let Some(principal) = row.registered_by_principal.as_deref()
        {
            match outbox_core::store::principals::may_run_triggers(
                &self.pool, row.app_id, principal,
            )
            .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return Outcome::ToDeadLetter {
                        error: format!(
                            "principal {principal} may no longer run this app's triggers (needs the app's admin role); not run"
                        ),
                    };
                }
                Err(err) => {
                    return Outcome::Retry {
                        delay: self.config.retry.backoff(row.attempt_count.max(1) as u32),
                        error: format!("checking the principal's rights failed: {err}"),
                    };
                }
            }
        }
        let failed = |error: String| {
            if let Some(reply_to) = row.reply_to.clone() {
                // A synchronous caller gets the error at once; no retries.
                return Outcome::Reply {
                    app_id: row.app_id,
                    reply_to,
                    topic: row.topic.clone(),
                    ok: false,
                    result: serde_json::json!({ "error": error }),
                    started_at: chrono::Utc::now(),
                };
            }
            if retry.has_attempts_left(row.attempt_count, row.max_attempts) {
                Outcome::Retry {
                    delay: retry.backoff(row.attempt_count.max(1) as u32),
                    error,
                }
            } else {
                Outcome::ToDeadLetter {
                    error: format!("{error} (attempt {} of {max})", row.attempt_count),
                }
            }
        };
        let Some(handler) = self.registry.get(&row.topic) else {
            let error = format!("no handler registered for topic {:?}", row.topic);
            if let Some(reply_to) = row.reply_to.clone() {
                // The caller learns that nobody serves the topic, not that a handler failed.
                return Outcome::Reply {
                    app_id: row.app_id,
                    reply_to,
                    topic: row.topic.clone(),
                    ok: false,
                    result: serde_json::json!({ "error": error, "code": NO_HANDLER }),
                    started_at: chrono::Utc::now(),
                };
            }
            return failed(error);
        };
        let mut event = Event::from_claimed(&row, max);
        event.claim_tx = claim_tx;
        let reply = event.reply.clone();
        let started = Instant::now();
        let started_at = chrono::Utc::now();
        let run = AssertUnwindSafe(handler.handle(event)).catch_unwind();
        let result = tokio::time::timeout(self.config.handler_timeout, run).await;
        meter
            .handler_duration
            .record(started.elapsed().as_secs_f64());
        if let Some(reply_to) = row.reply_to.clone() {
            // A synchronous caller waits: answer it, success or not; no retries.
            let (ok, result) = match result {
                Ok(Ok(Ok(()))) => (true, reply.get().unwrap_or(serde_json::Value::Null)),
                // Nothing ran (the relay while NATS is down): with no
                // retries for such rows, the caller is told to try again
                // rather than that a handler failed.
                Ok(Ok(Err(HandlerError::Snooze(delay)))) => (
                    false,
                    serde_json::json!({
                        "error": format!("the topic's target cannot take it now (NATS down?); nothing was run or published: try again in {}s", delay.as_secs().max(1)),
                        "code": UNAVAILABLE,
                        "retry_after_secs": delay.as_secs().max(1),
                    }),
                ),
                Ok(Ok(Err(err))) => (false, serde_json::json!({ "error": err.to_string() })),
                Ok(Err(_)) => (false, serde_json::json!({ "error": "handler panicked" })),
                Err(_) => (
                    false,
                    serde_json::json!({ "error": format!("handler timed out after {:?}", self.config.handler_timeout) }),
                ),
            };
            return Outcome::Reply {
                app_id: row.app_id,
                reply_to,
                topic: row.topic.clone(),
                ok,
                result,
                started_at,
            };
        }
        match result {
            Ok(Ok(Ok(()))) => Outcome::Done,
            Ok(Ok(Err(HandlerError::Retry(error)))) => failed(error),
            Ok(Ok(Err(HandlerError::Permanent(error)))) => Outcome::ToDeadLetter {
                error: format!("permanent: {error}"),
            },
            Ok(Ok(Err(HandlerError::Snooze(delay)))) => Outcome::Snooze(delay),
            Ok(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                failed(format!("handler panicked: {message}"))
            }
            Err(_) => failed(format!(
                "handler timed out after {:?}",
                self.config.handler_timeout
            )),
        }
    }

    /// Writes a set of outcomes: one statement per kind.
    pub(crate) async fn flush(&self, finished: &[Finished]) -> Result<BatchReport, Error> {
        let mut done = Vec::new();
        let mut later = Vec::new();
        let mut dead_letters = Vec::new();
        let mut replies = Vec::new();
        let mut snoozed = 0;
        for f in finished {
            match f.outcome.write() {
                RowWrite::Delete => done.push(f.lease),
                RowWrite::Reschedule {
                    delay,
                    error,
                    counts_attempt,
                } => {
                    if !counts_attempt {
                        snoozed += 1;
                    }
                    later.push(Reschedule {
                        lease: f.lease,
                        delay,
                        error,
                        refund_attempt: !counts_attempt,
                    });
                }
                RowWrite::DeadLetter { error } => dead_letters.push(ToDeadLetter {
                    lease: f.lease,
                    error,
                    handler: None,
                }),
                RowWrite::Reply => replies.push(f),
            }
        }
        let mut answered = 0;
        for f in replies {
            if let Outcome::Reply {
                app_id,
                reply_to,
                topic,
                ok,
                result,
                started_at,
            } = &f.outcome
            {
                let mut tx = self.pool.begin().await?;
                if !store::complete(&mut *tx, &[f.lease]).await?.is_empty() {
                    let resolution = outbox_core::store::invocations::Resolution {
                        outbox_id: f.lease.id,
                        app_id: *app_id,
                        reply_to: reply_to.clone(),
                        topic: topic.clone(),
                        ok: *ok,
                        result: result.clone(),
                        started_at: *started_at,
                    };
                    if !outbox_core::store::invocations::resolve(&mut tx, &resolution).await? {
                        metrics::counter!("outboxd_abandoned_executions_total").increment(1);
                    }
                    answered += 1;
                }
                tx.commit().await?;
            }
        }
        let completed = store::complete(&self.pool, &done).await?.len() + answered;
        let pool = &self.pool;
        let history = self.config.attempt_history;
        let rescheduled_ids = again_for_missed(
            &later,
            |r| r.lease.id,
            |rows| async move { store::reschedule(pool, &rows, history).await },
        )
        .await?;
        let rescheduled = rescheduled_ids.len();
        let dead_lettered_ids = again_for_missed(
            &dead_letters,
            |r| r.lease.id,
            |rows| async move { store::dead_letter(pool, &rows, history).await },
        )
        .await?;
        let dead_lettered = dead_lettered_ids.len();
        self.log_failures(finished, &rescheduled_ids, &dead_lettered_ids);
        let expected = finished.len();
        let fenced = expected - completed - rescheduled - dead_lettered;
        if fenced > 0 {
            warn!(
                fenced,
                "outcomes refused: the lease was taken over (row ran too long or lost its connection)"
            );
        }
        metrics::counter!("outboxd_fenced_total").increment(fenced as u64);
        if finished.iter().any(|f| f.ordered) {
            // The next row of the key is claimable now, and may lie behind
            // the process's claims; do not wait for the poll.
            self.claim_from_positions();
            self.wake.notify_one();
        }
        Ok(BatchReport {
            claimed: 0,
            completed,
            retried: rescheduled.saturating_sub(snoozed),
            snoozed: snoozed.min(rescheduled),
            dead_lettered,
            fenced,
        })
    }

    /// Logs the failures that were written (a fenced outcome changed nothing,
    /// so it is not logged as a retry or a dead letter).
    fn log_failures(&self, finished: &[Finished], rescheduled: &[Uuid], dead_lettered: &[Uuid]) {
        for f in finished {
            let Some(facts) = &f.facts else { continue };
            match &f.outcome {
                Outcome::Retry { delay, error } if rescheduled.contains(&f.lease.id) => {
                    self.failures.retry_scheduled(facts, error, *delay);
                }
                Outcome::ToDeadLetter { error } if dead_lettered.contains(&f.lease.id) => {
                    self.failures.dead_lettered(facts, error);
                }
                _ => {}
            }
        }
    }
}

/// Ends the leases of `rows` with `end`, then once more for the rows it left
/// unchanged: a row a heartbeat changed at the same moment is found in its
/// newer version only by a fresh statement (see `store::outbox`'s lease
/// lookups). A row that is missed twice was taken over.
pub(crate) async fn again_for_missed<T, F, Fut>(
    rows: &[T],
    id: impl Fn(&T) -> Uuid,
    end: F,
) -> Result<Vec<Uuid>, outbox_core::Error>
where
    T: Clone,
    F: Fn(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Uuid>, outbox_core::Error>>,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut changed = end(rows.to_vec()).await?;
    let seen: std::collections::HashSet<Uuid> = changed.iter().copied().collect();
    let missed: Vec<T> = rows
        .iter()
        .filter(|r| !seen.contains(&id(r)))
        .cloned()
        .collect();
    if !missed.is_empty() {
        changed.extend(end(missed).await?);
    }
    Ok(changed)
}
