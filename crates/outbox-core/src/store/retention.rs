//! Retention: bounded deletes of old dead letters, abandoned executions,
//! audit-log entries (when a retention is set) and expired de-duplication
//! records. Each statement deletes at most `limit` rows it could lock
//! (`FOR UPDATE SKIP LOCKED`), so concurrent sweepers never block each
//! other or delete a row twice, and a row locked by a
//! replay in progress is skipped, not lost.

use sqlx::{PgExecutor, PgPool};

use crate::Error;

/// Runs `statement`, a bounded delete whose `$1` is `limit`; returns how
/// many rows went.
async fn delete_batch<'e>(
    db: impl PgExecutor<'e>,
    statement: &'static str,
    limit: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(statement)
        .bind(limit)
        .execute(db)
        .await?
        .rows_affected())
}

/// An app's `dead_letter_retention_days` that keeps its dead letters for
/// good (`set_app_retention(…, Some(0))`): a hundred years, so that a process
/// of an earlier version, which reads the column as days, keeps them too
/// (migration 0043). The sweep never deletes them.
pub const KEEP_FOR_GOOD_DAYS: i32 = 36_500;

/// Deletes up to `limit` dead letters older than their app's retention (the
/// app's `dead_letter_retention_days`, else `days`; 0 keeps them for good);
/// returns how many. Each app's oldest are read from its own index, so dead
/// letters kept for good, by one app or by the global setting, are never
/// walked to find the others.
pub async fn sweep_dead_letters(pool: &PgPool, days: u32, limit: i64) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM dead_letters WHERE id IN (
            SELECT d.id FROM apps a
            CROSS JOIN LATERAL (
                SELECT d.id FROM dead_letters d
                WHERE d.app_id = a.id
                  AND d.created_at < now() - make_interval(days => coalesce(a.dead_letter_retention_days, $1))
                ORDER BY d.created_at
                LIMIT $2
                FOR UPDATE OF d SKIP LOCKED) d
            WHERE coalesce(a.dead_letter_retention_days, $1) NOT IN (0, $3)
            LIMIT $2)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(limit)
    .bind(KEEP_FOR_GOOD_DAYS)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes up to `limit` abandoned-execution records older than `days`.
pub async fn sweep_abandoned_executions<'e>(
    db: impl PgExecutor<'e>,
    days: u32,
    limit: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM abandoned_executions WHERE id IN (
            SELECT id FROM abandoned_executions
            WHERE created_at < now() - make_interval(days => $1)
            ORDER BY created_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED)",
    )
    .bind(days as i32)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}

/// Deletes up to `limit` of the oldest audit-log entries, those older than
/// `days`; returns how many went. It looks only at the `limit` entries with
/// the lowest ids (ids grow with time), so a log with nothing to delete
/// costs one short index scan, not a read of every entry; an entry left
/// behind because an older transaction committed it late goes next time.
pub async fn sweep_audit_log<'e>(
    db: impl PgExecutor<'e>,
    days: u32,
    limit: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM audit_log WHERE id IN (
            SELECT id FROM (
                SELECT id, at FROM audit_log ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
            ) oldest
            WHERE at < now() - make_interval(days => $1))",
    )
    .bind(days as i32)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}

/// Deletes up to `limit` de-duplication records past their TTL.
pub async fn sweep_processed_messages<'e>(
    db: impl PgExecutor<'e>,
    limit: i64,
) -> Result<u64, Error> {
    delete_batch(
        db,
        "DELETE FROM processed_messages WHERE ctid IN (
            SELECT ctid FROM processed_messages
            WHERE state = 'done' AND expires_at < now()
            LIMIT $1
            FOR UPDATE SKIP LOCKED)",
        limit,
    )
    .await
}

/// Deletes up to `limit` login-throttle counts whose last failure is more
/// than a week old (the longest `admin.login_window_secs` allows) and that
/// hold nothing back; returns how many went.
pub async fn sweep_login_throttle<'e>(db: impl PgExecutor<'e>, limit: i64) -> Result<u64, Error> {
    delete_batch(
        db,
        "DELETE FROM login_throttle WHERE key IN (
            SELECT key FROM login_throttle
            WHERE last_failure_at < now() - interval '7 days'
              AND (blocked_until IS NULL OR blocked_until < now())
            LIMIT $1
            FOR UPDATE SKIP LOCKED)",
        limit,
    )
    .await
}

/// Deletes up to `limit` expired sessions. Signing in removes the expired
/// sessions of the same user only; a user who stopped signing in, or a
/// script signing in for every call, would leave them for ever.
pub async fn sweep_sessions<'e>(db: impl PgExecutor<'e>, limit: i64) -> Result<u64, Error> {
    delete_batch(
        db,
        "DELETE FROM sessions WHERE id IN (
            SELECT id FROM sessions WHERE expires_at < now()
            LIMIT $1
            FOR UPDATE SKIP LOCKED)",
        limit,
    )
    .await
}

/// Deletes up to `limit` reply inboxes of synchronous invocations older
/// than an hour: their caller waited a minute at most, and the inbox of a
/// caller whose process died was left behind.
pub async fn sweep_invocation_inboxes<'e>(
    db: impl PgExecutor<'e>,
    limit: i64,
) -> Result<u64, Error> {
    delete_batch(
        db,
        "DELETE FROM invocation_inboxes WHERE inbox IN (
            SELECT inbox FROM invocation_inboxes WHERE created_at < now() - interval '1 hour'
            LIMIT $1
            FOR UPDATE SKIP LOCKED)",
        limit,
    )
    .await
}

/// An app's own dead-letter retention in days ([`KEEP_FOR_GOOD_DAYS`]: for
/// good), or `None` when it follows the global setting.
pub async fn app_retention<'e>(db: impl PgExecutor<'e>, slug: &str) -> Result<Option<i32>, Error> {
    let found: Option<Option<i32>> =
        sqlx::query_scalar("SELECT dead_letter_retention_days FROM apps WHERE slug = $1")
            .bind(slug)
            .fetch_optional(db)
            .await?;
    found.ok_or_else(|| Error::UnknownApp(slug.to_owned()))
}

/// Sets (or with `None` clears) an app's own dead-letter retention, in days;
/// 0 keeps them for good (stored as [`KEEP_FOR_GOOD_DAYS`]).
pub async fn set_app_retention<'e>(
    db: impl PgExecutor<'e>,
    slug: &str,
    days: Option<u32>,
) -> Result<(), Error> {
    let refused = || Error::invalid("days", "must be within 0..=3650 (0 keeps them for good)");
    let stored = match days {
        None => None,
        Some(0) => Some(KEEP_FOR_GOOD_DAYS),
        // Not the stored "for good" either: 0 says it.
        Some(d @ 1..=3650) => Some(i32::try_from(d).map_err(|_| refused())?),
        Some(_) => return Err(refused()),
    };
    let changed = sqlx::query("UPDATE apps SET dead_letter_retention_days = $2 WHERE slug = $1")
        .bind(slug)
        .bind(stored)
        .execute(db)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.constraint().is_some() => refused(),
            _ => Error::Database(e),
        })?
        .rows_affected();
    if changed == 0 {
        return Err(Error::UnknownApp(slug.to_owned()));
    }
    Ok(())
}

/// Dead tuples of the hot tables (`outbox`, its segments, `dead_letters`),
/// for bloat metrics.
pub async fn dead_tuples<'e>(db: impl PgExecutor<'e>) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables
         WHERE relname IN ('outbox', 'outbox_s0', 'outbox_s1', 'outbox_s2', 'dead_letters')
         ORDER BY relname",
    )
    .fetch_all(db)
    .await?)
}
