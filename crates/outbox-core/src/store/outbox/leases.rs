//! The statements on held leases: the heartbeat that extends them, and the
//! ends of a claim (complete, reschedule, dead-letter, release), each fenced
//! by the row's token.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{AttemptHistory, split};
use crate::Error;
use crate::model::Lease;

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
    Ok(sqlx::query_scalar(HEARTBEAT_SQL)
        .bind(&ids)
        .bind(&tokens)
        .bind(lease.as_secs_f64())
        .fetch_all(db)
        .await?)
}

/// The heartbeat (`$1` ids, `$2` fencing tokens, `$3` lease seconds), for
/// `EXPLAIN` in tests and the benchmark.
pub const HEARTBEAT_SQL: &str = concat!(
    "WITH held AS MATERIALIZED (
        SELECT i.tableoid, i.ctid
        FROM unnest($1::uuid[], $2::int8[]) AS t(id, token)
        ",
    lease_lookup!("FOR UPDATE SKIP LOCKED"),
    "
     )
     UPDATE outbox o
     SET locked_until = now() + make_interval(secs => $3)
     FROM held
     WHERE o.ctid = held.ctid AND o.tableoid = held.tableoid AND o.locked_by IS NOT NULL
     RETURNING o.id"
);

/// The retry of failed rows (`$1` ids, `$2` tokens, `$3` delays in seconds,
/// `$4` errors, `$5` whether the attempt is given back, `$6` and `$7` the
/// [`AttemptHistory`]), for `EXPLAIN`. A row with an error gets an entry in
/// its attempt history.
pub const RESCHEDULE_SQL: &str = concat!(
    "WITH found AS MATERIALIZED (
        SELECT i.tableoid, i.ctid, t.*
        FROM unnest($1::uuid[], $2::int8[], $3::float8[], $4::text[], $5::bool[])
             AS t(id, token, delay, error, refund)
        ",
    lease_lookup!("FOR UPDATE"),
    "
     )
     UPDATE outbox o
     SET run_at        = ",
    priority_run_at!("(now() + make_interval(secs => t.delay))", "o.priority"),
    ",
         not_before    = ",
    priority_not_before!("(now() + make_interval(secs => t.delay))", "o.priority"),
    ",
         locked_by     = NULL,
         locked_until  = NULL,
         last_error    = coalesce(t.error, o.last_error),
         attempt_count = o.attempt_count - CASE WHEN t.refund THEN 1 ELSE 0 END,
         ",
    attempt_recorded!(
        "t.error",
        "o.attempt_count",
        "o.last_attempt_at",
        "o.locked_by",
        "$6",
        "$7"
    ),
    "
     FROM found t
     WHERE o.ctid = t.ctid AND o.tableoid = t.tableoid AND o.lease_token = t.token
     RETURNING o.id"
);

/// The move of rows to `dead_letters` (`$1` ids, `$2` tokens, `$3` errors,
/// `$4` handlers, `$5` and `$6` the [`AttemptHistory`]), for `EXPLAIN`. The
/// dead letter gets the row's whole attempt history (`attempts` and the
/// newest failed attempt) with the last attempt added (unless a
/// transactional failure recorded it already).
pub const DEAD_LETTER_SQL: &str = concat!(
        "WITH found AS MATERIALIZED (
        SELECT i.tableoid, i.ctid, t.*
        FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[]) AS t(id, token, error, handler)
        ",
        lease_lookup!("FOR UPDATE"),
        "
     ),
     moved AS (
        DELETE FROM outbox o
        USING found t
        WHERE o.ctid = t.ctid AND o.tableoid = t.tableoid AND o.lease_token = t.token
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
                                  max_attempts, partition_key, attempts)
        SELECT m.app_id, m.id, m.source, m.op, m.topic, m.trigger_id,
               coalesce(m.failed_handler, m.target, m.topic),
               m.payload, m.headers, m.ordering_key, m.depth, m.attempt_count,
               m.first_attempt_at, m.last_attempt_at, m.final_error, m.registered_by_principal,
               r.round,
               -- Quarantine: the policy's delay, doubled each round, while rounds remain.
               CASE WHEN pol.id IS NOT NULL AND r.round < pol.max_rounds
                    THEN now() + make_interval(secs => pol.initial_delay_secs * power(2, r.round))
               END,
               m.max_attempts, m.partition_key,
               CASE WHEN coalesce(h.attempts -> -1 ->> 0, h.attempts -> -1 ->> 'attempt')::int
                        IS NOT DISTINCT FROM m.attempt_count
                    THEN h.attempts
                    ELSE ",
        attempts_pushed!(
            "h.attempts",
            attempt_entry!(
                "m.attempt_count",
                "m.last_attempt_at",
                "clock_timestamp()",
                "m.locked_by",
                "m.final_error",
                "$6"
            ),
            "$5"
        ),
        "
               END
        FROM moved m
        CROSS JOIN LATERAL (SELECT ",
        // With the history off here ($5 0, $6 0) an attempt another
        // process recorded keeps its error, cut as the default cuts it.
        attempts_with_newest!(
            "m",
            concat!("(CASE WHEN $5 <= 0 THEN ", default_error_chars!(), " ELSE $6 END)")
        ),
        " AS attempts) h
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
     SELECT id FROM failed_scripts"
    );

/// The statement of [`complete`] (`$1` ids, `$2` fencing tokens), for `EXPLAIN`.
pub const COMPLETE_SQL: &str = concat!(
    "WITH ",
    done_cte!("$1", "$2"),
    ", ",
    handled_by_script_cte!(),
    " SELECT id FROM done"
);

/// Deletes successfully handled rows; returns the ids deleted. Rows whose
/// token no longer matches (lease taken over) are left alone.
pub async fn complete<'e>(db: impl PgExecutor<'e>, leases: &[Lease]) -> Result<Vec<Uuid>, Error> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, tokens) = split(leases);
    Ok(sqlx::query_scalar(COMPLETE_SQL)
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

/// Reschedules rows (retry with backoff, snooze, or release); returns the ids
/// changed. A row a concurrent heartbeat changed at the same moment may be
/// missing from the answer although its lease still holds: call again for
/// the rows missing (see `lease_lookup!` in this module's source).
pub async fn reschedule<'e>(
    db: impl PgExecutor<'e>,
    rows: &[Reschedule],
    history: AttemptHistory,
) -> Result<Vec<Uuid>, Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.lease.id).collect();
    let tokens: Vec<i64> = rows.iter().map(|r| r.lease.token).collect();
    let delays: Vec<f64> = rows.iter().map(|r| r.delay.as_secs_f64()).collect();
    let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
    let refunds: Vec<bool> = rows.iter().map(|r| r.refund_attempt).collect();
    Ok(sqlx::query_scalar(RESCHEDULE_SQL)
        .bind(&ids)
        .bind(&tokens)
        .bind(&delays)
        .bind(&errors)
        .bind(&refunds)
        .bind(i32::from(history.keep))
        .bind(super::history::history_chars(history))
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
/// dead letter is resolved `handler_failed` instead (no recursion). As with
/// [`reschedule`], a row a concurrent heartbeat changed may be missing from
/// the answer: call again for it.
pub async fn dead_letter<'e>(
    conn: impl PgExecutor<'e>,
    rows: &[ToDeadLetter],
    history: AttemptHistory,
) -> Result<Vec<Uuid>, Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.lease.id).collect();
    let tokens: Vec<i64> = rows.iter().map(|r| r.lease.token).collect();
    let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
    let handlers: Vec<Option<&str>> = rows.iter().map(|r| r.handler.as_deref()).collect();
    Ok(sqlx::query_scalar(DEAD_LETTER_SQL)
        .bind(&ids)
        .bind(&tokens)
        .bind(&errors)
        .bind(&handlers)
        .bind(i32::from(history.keep))
        .bind(super::history::history_chars(history))
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
    history: AttemptHistory,
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
    reschedule(db, &rows, history).await
}
