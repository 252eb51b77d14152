//! The dispatcher's statements: claim, heartbeat, complete, retry, dead-letter,
//! release. Every statement that ends a claim names the row's fencing token, so
//! a worker whose lease was taken over changes nothing.
//!
//! Claimable means `run_at <= now()` and no live lease (`locked_until` unset or
//! past): a row whose worker crashed is claimable again once its lease runs
//! out. A claim only writes unindexed columns, so PostgreSQL can update the
//! row in place (a HOT update) instead of adding index entries for every claim.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Error;
use crate::model::{ClaimedEvent, Lease};

/// What a `done` CTE returns: the id, and for a dead-letter-trigger row the
/// dead letter it handled (the payload itself is not copied for every row).
macro_rules! done_returning {
    () => {
        "RETURNING o.id,
        CASE WHEN o.source = 'dead_letter' THEN o.payload->>'dead_letter_id' END AS dead_letter_id"
    };
}

/// Marks the dead letters behind successful dead-letter-trigger rows
/// `handled_by_script`; expects a `done` CTE ending in [`done_returning`].
macro_rules! handled_by_script_cte {
    () => {
        "handled AS (
    UPDATE dead_letters d SET resolution = 'handled_by_script', resolved_at = now()
    FROM done
    WHERE done.dead_letter_id ~ '^[0-9a-fA-F-]{36}$'
      AND d.id = done.dead_letter_id::uuid
      AND d.resolved_at IS NULL
    RETURNING d.id
)"
    };
}

/// Picks up to `$1` claimable rows, apps in random order (fairness) and
/// suspended apps skipped, and locks them. Shared by [`claim`] and [`complete_and_claim`].
macro_rules! picked_cte {
    () => {
        picked_cte!("")
    };
    ($extra:literal) => {
        concat!(
            "picked AS (
    SELECT c.ctid
    FROM (SELECT id FROM apps WHERE suspended_at IS NULL ORDER BY random()) AS a
    CROSS JOIN LATERAL (
        SELECT o.ctid
        FROM outbox o
        WHERE o.app_id = a.id
          AND o.run_at <= now()
          AND (o.locked_until IS NULL OR o.locked_until < now())
          AND (o.ordering_key IS NULL OR (
                o.enqueue_xid < pg_snapshot_xmin(pg_current_snapshot())
                AND NOT EXISTS (
                    SELECT 1 FROM outbox e
                    WHERE e.app_id = o.app_id
                      AND e.ordering_key = o.ordering_key
                      AND (e.enqueue_xid, e.id) < (o.enqueue_xid, o.id))))
        ",
            $extra,
            "
        ORDER BY o.run_at, o.id
        LIMIT $1
        FOR UPDATE OF o SKIP LOCKED
    ) AS c
    LIMIT $1
)"
        )
    };
}

/// The columns of a [`ClaimedEvent`].
macro_rules! claimed_columns {
    () => {
        "o.id, o.app_id, o.source, o.op, o.topic, o.trigger_id, o.target, o.payload, o.headers,
          o.idempotency_key, o.ordering_key, o.depth, o.attempt_count, o.max_attempts,
          o.lease_token, o.locked_until, o.first_attempt_at, o.reply_to,
          o.registered_by_principal, o.created_at"
    };
}

/// Reads the columns of `claimed_columns!` by position: looking twenty
/// column names up for every claimed row was a measurable share of the
/// dispatcher's CPU. Further columns may follow them.
impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ClaimedEvent {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            id: row.try_get(0)?,
            app_id: row.try_get(1)?,
            source: row.try_get(2)?,
            op: row.try_get(3)?,
            topic: row.try_get(4)?,
            trigger_id: row.try_get(5)?,
            target: row.try_get(6)?,
            payload: row.try_get(7)?,
            headers: row.try_get(8)?,
            idempotency_key: row.try_get(9)?,
            ordering_key: row.try_get(10)?,
            depth: row.try_get(11)?,
            attempt_count: row.try_get(12)?,
            max_attempts: row.try_get(13)?,
            lease_token: row.try_get(14)?,
            locked_until: row.try_get(15)?,
            first_attempt_at: row.try_get(16)?,
            reply_to: row.try_get(17)?,
            registered_by_principal: row.try_get(18)?,
            created_at: row.try_get(19)?,
        })
    }
}

/// How many columns `claimed_columns!` lists.
const CLAIMED_COLUMNS: usize = 20;

/// Leases the picked rows: bumps the attempt and the fencing token.
macro_rules! lease_picked {
    () => {
        concat!(
            "UPDATE outbox o
SET attempt_count    = o.attempt_count + 1,
    lease_token      = o.lease_token + 1,
    locked_by        = $2,
    locked_until     = now() + make_interval(secs => $3),
    first_attempt_at = coalesce(o.first_attempt_at, now()),
    last_attempt_at  = now()
WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM picked))
RETURNING ",
            claimed_columns!()
        )
    };
}

const CLAIM: &str = concat!("WITH ", picked_cte!(), "\n", lease_picked!());

/// The claim statement (`$1` limit, `$2` worker, `$3` lease seconds), for
/// `EXPLAIN` in the benchmark.
pub const CLAIM_SQL: &str = CLAIM;

/// One round trip, one commit: delete the finished rows `$4`/`$5` (ids and
/// fencing tokens) and claim the next batch. The single row of `done` is
/// joined to the claimed rows so the deleted count arrives even when nothing
/// was claimed.
const COMPLETE_AND_CLAIM: &str = concat!(
    "WITH done AS (
    DELETE FROM outbox o
    USING unnest($4::uuid[], $5::int8[]) AS t(id, token)
    WHERE o.id = t.id AND o.lease_token = t.token
    ",
    done_returning!(),
    "
), ",
    handled_by_script_cte!(),
    ", ",
    picked_cte!(),
    ", claimed AS (\n",
    lease_picked!(),
    "\n)
SELECT c.*, d.completed
FROM (SELECT count(*) AS completed FROM done) AS d
LEFT JOIN claimed AS c ON true"
);

/// The complete-and-claim statement (`$4` ids and `$5` tokens done, then as
/// [`CLAIM_SQL`]), for `EXPLAIN` in the benchmark.
pub const COMPLETE_AND_CLAIM_SQL: &str = COMPLETE_AND_CLAIM;

/// Transactional handling: the picked rows are deleted by the caller's
/// transaction, which the handlers then write in. Rows a synchronous caller
/// waits on and dead-letter-trigger rows keep the lease path.
const TAKE: &str = concat!(
    "WITH ",
    picked_cte!(" AND o.reply_to IS NULL AND o.source <> 'dead_letter'"),
    "\nDELETE FROM outbox o WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM picked)) RETURNING ",
    claimed_columns!()
);

/// The transactional take (`$1` limit), for `EXPLAIN` in the benchmark.
pub const TAKE_SQL: &str = TAKE;

/// Deletes up to `limit` claimable rows in the caller's transaction and
/// returns them (transactional handling: the handlers' writes and the
/// deletion commit together, or neither does). Same choice of rows as
/// [`claim`], minus rows with a synchronous caller and dead-letter-trigger rows.
pub async fn take(conn: &mut PgConnection, limit: u32) -> Result<Vec<ClaimedEvent>, Error> {
    Ok(sqlx::query_as(TAKE)
        .bind(i64::from(limit.max(1)))
        .fetch_all(conn)
        .await?)
}

/// Locks, in the caller's transaction, those of `ids` that are still
/// claimable and not held by anyone else, and returns them in `ids` order
/// (a transactional batch that failed takes its rows back this way).
pub async fn lock_ids(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<ClaimedEvent>, Error> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        claimed_columns!(),
        " FROM outbox o JOIN unnest($1::uuid[]) WITH ORDINALITY AS t(id, ord) ON o.id = t.id
          WHERE o.run_at <= now() AND (o.locked_until IS NULL OR o.locked_until < now())
          ORDER BY t.ord
          FOR UPDATE OF o SKIP LOCKED"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?)
}

/// Deletes rows locked by [`lock_ids`] in the same transaction.
pub async fn delete_locked(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), Error> {
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
pub async fn close_tx_batch(conn: &mut PgConnection, lock_key: i64) -> Result<(), Error> {
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
    Ok(sqlx::query(
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
             first_attempt_at = coalesce(o.first_attempt_at, now()),
             last_attempt_at  = now()
         FROM (
            SELECT e.ctid, a.deaths FROM outbox e
            JOIN (SELECT id, count(*) AS deaths
                  FROM abandoned, unnest(abandoned.event_ids) AS id
                  GROUP BY id) AS a ON e.id = a.id
            FOR UPDATE OF e SKIP LOCKED
         ) AS held
         WHERE o.ctid = held.ctid",
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Records a failed transactional attempt (after its writes were rolled back):
/// counts the attempt (unless `count` is false, for a snooze) and makes the
/// row due after `delay`. Returns the row's fencing token, for
/// [`dead_letter`], or `None` when the row is gone or leased meanwhile.
pub async fn record_failed_attempt<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    delay: Duration,
    count: bool,
    error: Option<&str>,
) -> Result<Option<i64>, Error> {
    Ok(sqlx::query_scalar(
        "UPDATE outbox o
         SET attempt_count    = o.attempt_count + CASE WHEN $3 THEN 1 ELSE 0 END,
             run_at           = now() + make_interval(secs => $2),
             last_error       = coalesce($4, o.last_error),
             first_attempt_at = coalesce(o.first_attempt_at, now()),
             last_attempt_at  = now()
         WHERE o.id = $1 AND (o.locked_until IS NULL OR o.locked_until < now())
         RETURNING o.lease_token",
    )
    .bind(id)
    .bind(delay.as_secs_f64())
    .bind(count)
    .bind(error)
    .fetch_optional(db)
    .await?)
}

/// Claims up to `limit` due rows for `worker`, leasing them for `lease`.
///
/// The picked rows are locked by the same statement, so their `ctid` cannot
/// change before the `UPDATE` reaches them; joining on it skips a primary-key
/// lookup per row.
/// Apps are visited in random order each call, so one busy app cannot starve
/// the others. A row with an ordering key is claimable only when it is the
/// oldest row of its key and no transaction that could still commit an earlier
/// row of that key is open.
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<Vec<ClaimedEvent>, Error> {
    let limit = i64::from(limit.max(1));
    Ok(sqlx::query_as(CLAIM)
        .bind(limit)
        .bind(worker)
        .bind(lease.as_secs_f64())
        .fetch_all(db)
        .await?)
}

/// Options for a connection that runs [`complete_and_claim`] over and over:
/// it plans the statement once (a generic plan) instead of for every batch,
/// where planning took about a sixth of the statement's time and grew with
/// the backlog. The statement is written so that its generic plan is the one
/// a custom plan would be (index scan for the pick, TID scan for the lease).
///
/// Without a known batch size the generic plan's cost grows with the backlog
/// and, past `jit_above_cost`, PostgreSQL would compile it to machine code
/// on every execution (tens of ms for a claim of a millisecond); JIT is off.
///
/// Sequential scans are off too: planned while the statistics describe a
/// short queue in a few pages, the statement would find the completed rows
/// and the picked `ctid`s by scanning the whole table, and keep doing so
/// after the table has grown.
pub fn claim_connect_options(base: &PgConnectOptions) -> PgConnectOptions {
    base.clone().options([
        ("plan_cache_mode", "force_generic_plan"),
        ("jit", "off"),
        ("enable_seqscan", "off"),
    ])
}

/// Deletes the successfully handled rows of `done` and claims up to `limit`
/// more, in one statement (one commit). Returns how many of `done` were
/// deleted (the rest were fenced) and the claimed rows.
///
/// A row of `done` whose lease expired before this call could also be picked
/// by the claim half; PostgreSQL then applies only one of the two changes, so
/// such a row may run again (at-least-once), never get lost.
pub async fn complete_and_claim<'e>(
    db: impl PgExecutor<'e>,
    done: &[Lease],
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<(usize, Vec<ClaimedEvent>), Error> {
    use sqlx::{FromRow, Row};
    let (ids, tokens) = split(done);
    let rows = sqlx::query(COMPLETE_AND_CLAIM)
        .bind(i64::from(limit.max(1)))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(&ids)
        .bind(&tokens)
        .fetch_all(db)
        .await?;
    let mut completed = 0;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        completed = row.try_get::<i64, _>(CLAIMED_COLUMNS)? as usize;
        if row.try_get::<Option<Uuid>, _>(0)?.is_some() {
            claimed.push(ClaimedEvent::from_row(row)?);
        }
    }
    Ok((completed, claimed))
}

fn split(leases: &[Lease]) -> (Vec<Uuid>, Vec<i64>) {
    leases.iter().map(|l| (l.id, l.token)).unzip()
}

/// Extends the leases still held; returns the ids whose lease was kept. An id
/// missing from the answer was taken over, finished, or is being written by
/// another statement right now (it is skipped, not waited for: a heartbeat
/// that waited on a row lock could deadlock with a completion that locks the
/// same rows in another order; the next beat extends it if it still runs).
pub async fn heartbeat<'e>(
    db: impl PgExecutor<'e>,
    leases: &[Lease],
    lease: Duration,
) -> Result<Vec<Uuid>, Error> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, tokens) = split(leases);
    Ok(sqlx::query_scalar(
        "WITH held AS (
            SELECT o.ctid
            FROM outbox o
            JOIN unnest($1::uuid[], $2::int8[]) AS t(id, token) ON o.id = t.id
            WHERE o.lease_token = t.token AND o.locked_by IS NOT NULL
            FOR UPDATE OF o SKIP LOCKED
         )
         UPDATE outbox o
         SET locked_until = now() + make_interval(secs => $3)
         FROM held
         WHERE o.ctid = held.ctid
         RETURNING o.id",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(lease.as_secs_f64())
    .fetch_all(db)
    .await?)
}

/// Deletes successfully handled rows; returns the ids deleted. Rows whose
/// token no longer matches (lease taken over) are left alone.
pub async fn complete<'e>(db: impl PgExecutor<'e>, leases: &[Lease]) -> Result<Vec<Uuid>, Error> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, tokens) = split(leases);
    Ok(sqlx::query_scalar(concat!(
        "WITH done AS (
            DELETE FROM outbox o
            USING unnest($1::uuid[], $2::int8[]) AS t(id, token)
            WHERE o.id = t.id AND o.lease_token = t.token
            ",
        done_returning!(),
        "
         ), ",
        handled_by_script_cte!(),
        " SELECT id FROM done"
    ))
    .bind(&ids)
    .bind(&tokens)
    .fetch_all(db)
    .await?)
}

/// A row to run again later.
#[derive(Debug, Clone)]
pub struct Reschedule {
    /// The claim being ended.
    pub lease: Lease,
    /// How long from now (database clock) until the row is due again.
    pub delay: Duration,
    /// Recorded as `last_error`; `None` keeps the previous one.
    pub error: Option<String>,
    /// A snooze gives the attempt back: it does not count as a failure.
    pub refund_attempt: bool,
}

/// Reschedules rows (retry with backoff, snooze, or release); returns the ids changed.
pub async fn reschedule<'e>(
    db: impl PgExecutor<'e>,
    rows: &[Reschedule],
) -> Result<Vec<Uuid>, Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.lease.id).collect();
    let tokens: Vec<i64> = rows.iter().map(|r| r.lease.token).collect();
    let delays: Vec<f64> = rows.iter().map(|r| r.delay.as_secs_f64()).collect();
    let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
    let refunds: Vec<bool> = rows.iter().map(|r| r.refund_attempt).collect();
    Ok(sqlx::query_scalar(
        "UPDATE outbox o
         SET run_at        = now() + make_interval(secs => t.delay),
             locked_by     = NULL,
             locked_until  = NULL,
             last_error    = coalesce(t.error, o.last_error),
             attempt_count = o.attempt_count - CASE WHEN t.refund THEN 1 ELSE 0 END
         FROM unnest($1::uuid[], $2::int8[], $3::float8[], $4::text[], $5::bool[])
              AS t(id, token, delay, error, refund)
         WHERE o.id = t.id AND o.lease_token = t.token
         RETURNING o.id",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(&delays)
    .bind(&errors)
    .bind(&refunds)
    .fetch_all(db)
    .await?)
}

/// A row to move to `dead_letters`.
#[derive(Debug, Clone)]
pub struct ToDeadLetter {
    /// The claim being ended.
    pub lease: Lease,
    /// Why: the last error, or the reason the row was refused.
    pub error: String,
    /// The handler or target that failed, for operators.
    pub handler: Option<String>,
}

/// Moves rows to `dead_letters` and deletes them from `outbox` in one
/// statement (so in one transaction), enqueueing the rows of matching
/// dead-letter triggers in the same statement; returns the original ids moved.
///
/// A dead-letter trigger's own exhausted row is not dead-lettered again: its
/// dead letter is resolved `handler_failed` instead (no recursion).
pub async fn dead_letter(
    conn: &mut PgConnection,
    rows: &[ToDeadLetter],
) -> Result<Vec<Uuid>, Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.lease.id).collect();
    let tokens: Vec<i64> = rows.iter().map(|r| r.lease.token).collect();
    let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
    let handlers: Vec<Option<&str>> = rows.iter().map(|r| r.handler.as_deref()).collect();
    Ok(sqlx::query_scalar(
        "WITH moved AS (
            DELETE FROM outbox o
            USING unnest($1::uuid[], $2::int8[], $3::text[], $4::text[]) AS t(id, token, error, handler)
            WHERE o.id = t.id AND o.lease_token = t.token
            RETURNING o.*, t.error AS final_error, t.handler AS failed_handler
         ),
         -- A dead-letter trigger's own work failed for good: its dead letter
         -- becomes handler_failed; no new dead letter, no further trigger.
         failed_scripts AS (
            UPDATE dead_letters d
            SET resolution = 'handler_failed', resolved_at = now(),
                last_error = coalesce(d.last_error, '') || E'\n[dead-letter trigger] ' || m.final_error
            FROM moved m
            WHERE m.source = 'dead_letter'
              AND m.payload->>'dead_letter_id' ~ '^[0-9a-fA-F-]{36}$'
              AND d.id = (m.payload->>'dead_letter_id')::uuid
              AND d.resolved_at IS NULL
            RETURNING m.id
         ),
         buried AS (
            INSERT INTO dead_letters (app_id, original_event_id, source, op, topic, trigger_id, handler,
                                      payload, headers, ordering_key, depth, attempt_count,
                                      first_attempt_at, last_attempt_at, last_error,
                                      registered_by_principal, replay_round, replay_due_at,
                                      max_attempts)
            SELECT m.app_id, m.id, m.source, m.op, m.topic, m.trigger_id,
                   coalesce(m.failed_handler, m.target, m.topic),
                   m.payload, m.headers, m.ordering_key, m.depth, m.attempt_count,
                   m.first_attempt_at, m.last_attempt_at, m.final_error, m.registered_by_principal,
                   r.round,
                   -- Quarantine: the policy's delay, doubled each round, while rounds remain.
                   CASE WHEN pol.id IS NOT NULL AND r.round < pol.max_rounds
                        THEN now() + make_interval(secs => pol.initial_delay_secs * power(2, r.round))
                   END,
                   m.max_attempts
            FROM moved m
            LEFT JOIN dead_letters prev ON prev.id = m.replayed_from
            CROSS JOIN LATERAL (SELECT coalesce(prev.replay_round + 1, 0) AS round) r
            LEFT JOIN LATERAL (
                SELECT p.id, p.initial_delay_secs, p.max_rounds FROM replay_policies p
                WHERE p.app_id = m.app_id
                  AND (p.source IS NULL OR p.source = m.source)
                  AND (p.topic IS NULL OR p.topic = m.topic)
                ORDER BY (p.topic IS NULL), (p.source IS NULL)
                LIMIT 1
            ) pol ON true
            WHERE m.source <> 'dead_letter'
            RETURNING id, app_id, original_event_id, source, topic, trigger_id, payload, last_error, depth
         ),
         -- Matching dead-letter triggers get their rows in the same statement.
         fired AS (
            INSERT INTO outbox (id, app_id, source, op, topic, trigger_id, target, payload, depth,
                                registered_by_principal)
            SELECT outbox_uuid_v7(), b.app_id, 'dead_letter', 'dead_lettered', t.target, t.id, t.target,
                   jsonb_build_object('dead_letter_id', b.id, 'original_event_id', b.original_event_id,
                                      'source', b.source, 'topic', b.topic, 'trigger_id', b.trigger_id,
                                      'payload', b.payload, 'last_error', b.last_error),
                   b.depth + 1, t.registered_by_principal
            FROM buried b
            JOIN triggers t ON t.app_id = b.app_id AND t.kind = 'dead_letter' AND t.enabled
            JOIN dead_letter_trigger_details x ON x.trigger_id = t.id
            WHERE (cardinality(x.sources) = 0 OR b.source = ANY(x.sources))
              AND (cardinality(x.topics) = 0 OR b.topic = ANY(x.topics))
              AND (cardinality(x.trigger_ids) = 0 OR b.trigger_id = ANY(x.trigger_ids))
            RETURNING 1
         )
         SELECT original_event_id FROM buried
         UNION ALL
         SELECT id FROM failed_scripts",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(&errors)
    .bind(&handlers)
    .fetch_all(conn)
    .await?)
}

/// Releases leases without running the rows (drain): they are due at once for
/// another dispatcher. `started` rows keep the attempt they used; unstarted
/// rows get it back.
pub async fn release<'e>(
    db: impl PgExecutor<'e>,
    leases: &[Lease],
    started: bool,
) -> Result<Vec<Uuid>, Error> {
    let rows: Vec<Reschedule> = leases
        .iter()
        .map(|&lease| Reschedule {
            lease,
            delay: Duration::ZERO,
            error: started.then(|| "released by a draining dispatcher".to_owned()),
            refund_attempt: !started,
        })
        .collect();
    reschedule(db, &rows).await
}

/// Counts rows, for tests and the CLI.
pub async fn count<'e>(db: impl PgExecutor<'e>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(db)
        .await?)
}

/// Counts rows that are leased right now.
pub async fn count_leased<'e>(db: impl PgExecutor<'e>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE locked_by IS NOT NULL AND locked_until > now()",
    )
    .fetch_one(db)
    .await?)
}

/// Age in seconds of the oldest due row, expired leases included (0 when none is due).
pub async fn oldest_due_age<'e>(db: impl PgExecutor<'e>) -> Result<f64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(run_at))::float8, 0)
         FROM outbox WHERE run_at <= now()",
    )
    .fetch_one(db)
    .await?)
}

/// How many rows of one app and topic are in each state.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StateCounts {
    /// The app's slug.
    pub app: String,
    /// The topic.
    pub topic: String,
    /// Due now and not leased.
    pub due: i64,
    /// Due later (delayed, or waiting for a retry's backoff), not leased.
    pub scheduled: i64,
    /// Leased: a handler is running it.
    pub running: i64,
}

/// Rows per app, topic and state. It counts every row (a sequential scan),
/// so one elected process samples it now and then, not every scrape.
pub async fn state_counts<'e>(db: impl PgExecutor<'e>) -> Result<Vec<StateCounts>, Error> {
    Ok(sqlx::query_as(
        "SELECT a.slug AS app, o.topic,
                count(*) FILTER (WHERE o.run_at <= now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())) AS due,
                count(*) FILTER (WHERE o.run_at > now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())) AS scheduled,
                count(*) FILTER (WHERE o.locked_until > now()) AS running
         FROM outbox o JOIN apps a ON a.id = o.app_id
         GROUP BY a.slug, o.topic
         ORDER BY count(*) DESC",
    )
    .fetch_all(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::CLAIMED_COLUMNS;

    /// `ClaimedEvent`'s `FromRow` reads by position: the column list must
    /// name the fields in the order it reads them.
    #[test]
    fn the_claimed_columns_are_in_the_order_the_row_is_decoded() {
        let columns: Vec<&str> = claimed_columns!()
            .split(',')
            .map(|c| c.trim().trim_start_matches("o."))
            .collect();
        assert_eq!(
            columns,
            [
                "id",
                "app_id",
                "source",
                "op",
                "topic",
                "trigger_id",
                "target",
                "payload",
                "headers",
                "idempotency_key",
                "ordering_key",
                "depth",
                "attempt_count",
                "max_attempts",
                "lease_token",
                "locked_until",
                "first_attempt_at",
                "reply_to",
                "registered_by_principal",
                "created_at",
            ]
        );
        assert_eq!(columns.len(), CLAIMED_COLUMNS);
    }
}
