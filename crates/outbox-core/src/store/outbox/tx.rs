//! Transactional handling: taking rows in the caller's transaction, taking a
//! failed batch's rows back, the batch records that tell a dead batch from a
//! running one, and a failed attempt's bookkeeping.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{AttemptHistory, Positions};
use crate::Error;
use crate::model::ClaimedEvent;
use crate::topics::Served;

/// Transactional handling: the picked rows are deleted by the caller's
/// transaction, which the handlers then write in. Rows a synchronous caller
/// waits on and dead-letter-trigger rows keep the lease path.
const TAKE: &str = concat!(
    "WITH ",
    picked_cte!(
        apps_from_positions!("$2", "$3", "$4"),
        served_filter!("$5", "$6", "$7", "$8", "$9"),
        " AND o.reply_to IS NULL AND o.source <> 'dead_letter'"
    ),
    "\nDELETE FROM outbox o WHERE ",
    in_picked!(),
    " RETURNING ",
    claimed_columns!()
);

/// The transactional take (`$1` limit, positions `$2`–`$4`, the [`Served`]
/// topics `$5`–`$9`), for `EXPLAIN`
/// in the benchmark.
pub const TAKE_SQL: &str = TAKE;

/// Deletes up to `limit` claimable rows from `positions` in the caller's transaction and
/// returns them (transactional handling: the handlers' writes and the
/// deletion commit together, or neither does). Same choice of rows as
/// [`claim_served`](super::claim_served), minus rows with a synchronous caller and dead-letter-trigger rows.
pub async fn take<'e>(
    conn: impl PgExecutor<'e>,
    positions: &Positions,
    served: &Served,
    limit: u32,
) -> Result<Vec<ClaimedEvent>, Error> {
    Ok(sqlx::query_as(TAKE)
        .bind(i64::from(limit.max(1)))
        .bind(&positions.apps)
        .bind(&positions.run_at)
        .bind(&positions.ids)
        .bind(served.all)
        .bind(&served.exact)
        .bind(&served.regexes)
        .bind(&served.excluded)
        .bind(&served.paused)
        .fetch_all(conn)
        .await?)
}

/// The statement of [`lock_ids`] (`$1` ids), for `EXPLAIN`: one probe of
/// the primary key per id, whatever the statistics say (see the module docs
/// of `store::outbox`).
pub const LOCK_IDS_SQL: &str = concat!(
    "SELECT c.* FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, ord)
     CROSS JOIN LATERAL (
        SELECT ",
    claimed_columns!(),
    " FROM outbox o
        WHERE o.id = t.id
          AND o.run_at <= now() AND (o.not_before IS NULL OR o.not_before <= now())
          AND (o.locked_until IS NULL OR o.locked_until < now())
        LIMIT 1
        FOR UPDATE OF o SKIP LOCKED
     ) AS c
     ORDER BY t.ord"
);

/// Locks, in the caller's transaction, those of `ids` that are still
/// claimable and not held by anyone else, and returns them in `ids` order
/// (a transactional batch that failed takes its rows back this way).
pub async fn lock_ids<'e>(
    conn: impl PgExecutor<'e>,
    ids: &[Uuid],
) -> Result<Vec<ClaimedEvent>, Error> {
    Ok(sqlx::query_as(LOCK_IDS_SQL)
        .bind(ids)
        .fetch_all(conn)
        .await?)
}

/// Deletes rows locked by [`lock_ids`] in the same transaction.
pub async fn delete_locked<'e>(conn: impl PgExecutor<'e>, ids: &[Uuid]) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records which events a transactional batch holds, on `keeper`: a
/// connection of the batch's worker outside the batch's transaction, so the
/// record commits before any handler runs. The same statement makes `keeper`
/// hold the session-level advisory lock `lock_key` (and drops the lock of
/// its previous batch): while the lock is held the batch counts as alive; the
/// keeper's death frees it, which is how [`count_abandoned_tx_batches`]
/// tells a dead batch from a running one.
pub async fn open_tx_batch(
    keeper: &mut PgConnection,
    lock_key: i64,
    worker: &str,
    ids: &[Uuid],
) -> Result<(), Error> {
    sqlx::query(
        "WITH released AS (SELECT pg_advisory_unlock_all()),
              locked AS (SELECT pg_advisory_lock($1) FROM released)
         INSERT INTO outbox_tx_batches (lock_key, worker, event_ids)
         SELECT $1, $2, $3 FROM locked",
    )
    .bind(lock_key)
    .bind(worker)
    .bind(ids)
    .execute(keeper)
    .await?;
    Ok(())
}

/// Deletes the record of [`open_tx_batch`] in the batch's transaction, so it
/// disappears exactly when the batch commits (a rollback brings it back; the
/// keeper's lock still marks it alive).
pub async fn close_tx_batch<'e>(conn: impl PgExecutor<'e>, lock_key: i64) -> Result<(), Error> {
    sqlx::query("DELETE FROM outbox_tx_batches WHERE lock_key = $1")
        .bind(lock_key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Counts one attempt for every event of a transactional batch whose worker
/// died (its advisory lock is free; one per batch it died in), in the caller's transaction, and forgets
/// those batches. Returns how many events were counted. An event that another
/// batch is running right now is skipped, not waited for: should that batch
/// die too, its own record counts it.
pub async fn count_abandoned_tx_batches(conn: &mut PgConnection) -> Result<u64, Error> {
    // last_error held the error of the row's newest failed attempt: that
    // attempt goes into `attempts` before its error is overwritten (its
    // error cut as the default history cuts it).
    Ok(sqlx::query(concat!(
        "WITH abandoned AS (
            DELETE FROM outbox_tx_batches b
            WHERE b.lock_key IN (
                SELECT lock_key FROM outbox_tx_batches
                WHERE pg_try_advisory_xact_lock(lock_key)
                LIMIT 64
                FOR UPDATE SKIP LOCKED)
            RETURNING b.event_ids
         )
         UPDATE outbox o
         SET attempt_count    = o.attempt_count + held.deaths,
             last_error       = 'the worker died while the event ran in a transactional batch',
             attempts         = ",
        attempts_with_newest!("o", default_error_chars!()),
        ",
             failed_attempt   = NULL,
             failed_attempt_started_at = NULL,
             failed_attempt_ended_at = NULL,
             failed_attempt_worker = NULL,
             first_attempt_at = coalesce(o.first_attempt_at, now()),
             last_attempt_at  = now()
         FROM (
            SELECT e.tableoid, e.ctid, a.deaths FROM outbox e
            JOIN (SELECT id, count(*) AS deaths
                  FROM abandoned, unnest(abandoned.event_ids) AS id
                  GROUP BY id) AS a ON e.id = a.id
            FOR UPDATE OF e SKIP LOCKED
         ) AS held
         WHERE o.ctid = held.ctid AND o.tableoid = held.tableoid"
    ))
    .execute(conn)
    .await?
    .rows_affected())
}

/// A failed transactional attempt, for [`record_failed_attempt`].
#[derive(Debug, Clone, Copy)]
pub struct FailedAttempt<'a> {
    /// The row.
    pub id: Uuid,
    /// How long from now until the row is due again.
    pub delay: Duration,
    /// Whether the attempt counts (false for a snooze).
    pub counts: bool,
    /// Why it failed; `None` keeps the previous `last_error` and records no
    /// history entry.
    pub error: Option<&'a str>,
    /// The process that ran it.
    pub worker: &'a str,
    /// When its handler started.
    pub started_at: DateTime<Utc>,
}

/// Records a failed transactional attempt (after its writes were rolled back):
/// counts the attempt (unless it does not count, for a snooze), makes the
/// row due after its delay and adds it to the row's attempt history. Returns
/// the row's fencing token, for [`dead_letter`](super::dead_letter), or
/// `None` when the row is gone or leased meanwhile.
pub async fn record_failed_attempt<'e>(
    db: impl PgExecutor<'e>,
    attempt: &FailedAttempt<'_>,
    history: AttemptHistory,
) -> Result<Option<i64>, Error> {
    Ok(sqlx::query_scalar(concat!(
        "UPDATE outbox o
         SET attempt_count    = o.attempt_count + CASE WHEN $3 THEN 1 ELSE 0 END,
             run_at           = ",
        priority_run_at!("(now() + make_interval(secs => $2))", "o.priority"),
        ",
             not_before       = ",
        priority_not_before!("(now() + make_interval(secs => $2))", "o.priority"),
        ",
             last_error       = coalesce($4, o.last_error),
             ",
        attempt_recorded!(
            "$4",
            "o.attempt_count + CASE WHEN $3 THEN 1 ELSE 0 END",
            "$6::timestamptz",
            "$5::text",
            "$7",
            "$8"
        ),
        ",
             first_attempt_at = coalesce(o.first_attempt_at, now()),
             last_attempt_at  = now()
         WHERE o.id = $1 AND (o.locked_until IS NULL OR o.locked_until < now())
         RETURNING o.lease_token"
    ))
    .bind(attempt.id)
    .bind(attempt.delay.as_secs_f64())
    .bind(attempt.counts)
    .bind(attempt.error)
    .bind(attempt.worker)
    .bind(attempt.started_at)
    .bind(i32::from(history.keep))
    .bind(super::history::history_chars(history))
    .fetch_optional(db)
    .await?)
}
