//! Failed-login counters, shared by every outboxd process and kept across
//! restarts. The policy (how many failures are free, how long a key is held
//! back) belongs to the caller; this module counts and remembers.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::Error;

/// What is known of one key.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyState {
    /// The key (`account:<email>` or `address:<ip>`).
    pub key: String,
    /// Failures counted in the current window.
    pub failures: i32,
    /// Until when attempts under this key are refused, if they are.
    pub blocked_until: Option<DateTime<Utc>>,
}

/// The state of `keys` that have failed within the last `window_secs`
/// (older counts have lapsed and are not returned).
pub async fn recent<'e>(
    db: impl PgExecutor<'e>,
    keys: &[String],
    window_secs: i64,
) -> Result<Vec<KeyState>, Error> {
    Ok(sqlx::query_as(
        "SELECT key, failures, blocked_until FROM login_throttle
         WHERE key = ANY($1) AND last_failure_at > now() - make_interval(secs => $2)",
    )
    .bind(keys)
    .bind(window_secs as f64)
    .fetch_all(db)
    .await?)
}

/// Counts a failure against each key and, once it has used its free ones
/// (`free_failures`, matched to `keys` by position), holds it back for a time
/// that doubles with each further failure: `base · 2^(failures − free)` seconds,
/// at most `max_delay_secs`. A count older than `window_secs` starts again
/// from one. Returns the new states.
pub async fn record_failure(
    conn: &mut PgConnection,
    keys: &[String],
    free_failures: &[i32],
    window_secs: i64,
    base_delay_secs: f64,
    max_delay_secs: f64,
) -> Result<Vec<KeyState>, Error> {
    sqlx::query(
        "INSERT INTO login_throttle AS t (key, failures, last_failure_at)
         SELECT key, 1, now() FROM unnest($1::text[]) AS key
         ON CONFLICT (key) DO UPDATE SET
             failures = CASE WHEN t.last_failure_at > now() - make_interval(secs => $2)
                             THEN t.failures + 1 ELSE 1 END,
             last_failure_at = now()",
    )
    .bind(keys)
    .bind(window_secs as f64)
    .execute(&mut *conn)
    .await?;
    Ok(sqlx::query_as(
        "UPDATE login_throttle t SET blocked_until = CASE
                WHEN t.failures >= k.free
                THEN now() + make_interval(secs => least($4, $3 * power(2, least(t.failures - k.free, 40))))
            END
         FROM unnest($1::text[], $2::int4[]) AS k(key, free)
         WHERE t.key = k.key
         RETURNING t.key, t.failures, t.blocked_until",
    )
    .bind(keys)
    .bind(free_failures)
    .bind(base_delay_secs)
    .bind(max_delay_secs)
    .fetch_all(&mut *conn)
    .await?)
}

/// Forgets the counts of `keys` (a successful login, an operator's unlock);
/// returns how many keys had one.
pub async fn clear<'e>(db: impl PgExecutor<'e>, keys: &[String]) -> Result<u64, Error> {
    Ok(
        sqlx::query("DELETE FROM login_throttle WHERE key = ANY($1)")
            .bind(keys)
            .execute(db)
            .await?
            .rows_affected(),
    )
}

/// Forgets the counts of every key that starts with one of `prefixes` (an
/// operator's unlock of an account and of each address that failed on it);
/// returns how many keys had one.
pub async fn clear_prefixed<'e>(
    db: impl PgExecutor<'e>,
    prefixes: &[String],
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM login_throttle
         WHERE key LIKE ANY (SELECT replace(replace(replace(p, '\\', '\\\\'), '%', '\\%'), '_', '\\_') || '%'
                             FROM unnest($1::text[]) AS p)",
    )
    .bind(prefixes)
    .execute(db)
    .await?
    .rows_affected())
}
