//! Cancelling rows that have not run yet: they move to `dead_letters`,
//! resolved `ignored` with the reason and who cancelled them, so nothing
//! disappears without a trace. A row a handler is running (a live lease)
//! is not cancelled; it finishes.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// Which rows of an app to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelFilter {
    /// These rows.
    Ids(Vec<Uuid>),
    /// Every row of this topic, oldest first.
    Topic(String),
}

/// The most rows one call cancels; a bulk cancel repeats until fewer come back.
pub const MAX_CANCEL_BATCH: i64 = 10_000;

/// The longest reason kept, in characters.
pub const MAX_CANCEL_REASON_CHARS: usize = 1000;

/// Refuses a batch of ids an action cannot take at once: none, or more than
/// [`MAX_CANCEL_BATCH`].
pub fn check_id_batch(ids: &[Uuid]) -> Result<(), Error> {
    if ids.is_empty() || ids.len() as i64 > MAX_CANCEL_BATCH {
        return Err(Error::invalid(
            "ids",
            format!("must list 1 to {MAX_CANCEL_BATCH} row ids"),
        ));
    }
    Ok(())
}

/// Checks a cancel's reason (1 to [`MAX_CANCEL_REASON_CHARS`] characters,
/// spaces around it dropped) and returns it trimmed.
pub fn check_cancel_reason(reason: &str) -> Result<&str, Error> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_CANCEL_REASON_CHARS {
        return Err(Error::invalid(
            "reason",
            format!("must be 1 to {MAX_CANCEL_REASON_CHARS} characters"),
        ));
    }
    // It goes into the dead letters' last error, which the console and the
    // CLI show: an escape sequence would reach an operator's terminal.
    crate::topics::check_printable("reason", reason)?;
    Ok(reason)
}

/// Moves the picked rows (`picked`, locked) to `dead_letters` as `ignored`
/// (`$2` who, `$3` why) and returns their ids.
macro_rules! cancel_picked {
    ($picked:literal) => {
        concat!(
            "WITH picked AS (",
            $picked,
            "
 ), moved AS (
    DELETE FROM outbox o WHERE ",
            in_picked!(),
            " RETURNING o.*
 ), buried AS (
    INSERT INTO dead_letters (app_id, original_event_id, source, op, topic, trigger_id, handler,
                              payload, headers, ordering_key, depth, attempt_count,
                              first_attempt_at, last_attempt_at, last_error,
                              registered_by_principal, max_attempts, resolved_at, resolution,
                              partition_key, attempts)
    SELECT m.app_id, m.id, m.source, m.op, m.topic, m.trigger_id, coalesce(m.target, m.topic),
           m.payload, m.headers, m.ordering_key, m.depth, m.attempt_count,
           m.first_attempt_at, m.last_attempt_at,
           concat_ws(E'\\n', m.last_error,
                     'cancelled by ' || coalesce($2, 'an operator') || ': ' || $3),
           m.registered_by_principal, m.max_attempts, now(), 'ignored', m.partition_key,
           ",
            attempts_with_newest!("m", default_error_chars!()),
            "
    FROM moved m
    RETURNING original_event_id
 )
 SELECT original_event_id FROM buried"
        )
    };
}

/// Cancels these rows of app `$1` (`$4` ids) that are not running.
const CANCEL_IDS: &str = cancel_picked!(
    "
    SELECT o.tableoid, o.ctid FROM outbox o
    WHERE o.id = ANY ($4::uuid[]) AND o.app_id = $1
      AND (o.locked_until IS NULL OR o.locked_until < now())
    FOR UPDATE SKIP LOCKED"
);

/// Cancels up to `$5` rows of topic `$4` of app `$1` that are not running, oldest first.
const CANCEL_TOPIC: &str = cancel_picked!(
    "
    SELECT o.tableoid, o.ctid FROM outbox o
    WHERE o.app_id = $1 AND o.topic = $4
      AND (o.locked_until IS NULL OR o.locked_until < now())
    ORDER BY o.run_at, o.id
    LIMIT $5
    FOR UPDATE SKIP LOCKED"
);

/// Cancels the rows of `app` that `filter` names and that are pending,
/// scheduled or waiting for a retry (not running, not being claimed right
/// now): each moves to `dead_letters`, resolved `ignored`, its last error
/// followed by `cancelled by <by>: <reason>`. At most [`MAX_CANCEL_BATCH`]
/// rows per call; returns the ids cancelled.
pub async fn cancel<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    filter: &CancelFilter,
    by: Option<&str>,
    reason: &str,
) -> Result<Vec<Uuid>, Error> {
    let reason = check_cancel_reason(reason)?;
    let query = match filter {
        CancelFilter::Ids(ids) => {
            check_id_batch(ids)?;
            sqlx::query_scalar(CANCEL_IDS)
                .bind(app)
                .bind(by)
                .bind(reason)
                .bind(ids)
        }
        CancelFilter::Topic(topic) => {
            crate::topics::validate_named_topic(topic)?;
            sqlx::query_scalar(CANCEL_TOPIC)
                .bind(app)
                .bind(by)
                .bind(reason)
                .bind(topic)
                .bind(MAX_CANCEL_BATCH)
        }
    };
    Ok(query.fetch_all(db).await?)
}
