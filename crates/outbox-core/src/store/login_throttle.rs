//! Failed-login counters, shared by every outboxd process and kept across
//! restarts. The policy (how many failures are free, how long a key is held
//! back) belongs to the caller; this module counts and remembers.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};

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
    /// The last failure (or, for a remembered sign-in, that sign-in).
    pub last_failure_at: DateTime<Utc>,
}

/// Counts one login attempt as a failure under every key before its
/// password is checked, unless `held_back` refuses it from the keys' states
/// (failures in the current window, a hold-back in force) as they were
/// before it. The keys' rows are locked in one order for the decision and
/// the count, so attempts sent at once queue on them and each sees the ones
/// before it: a burst gets no more tries than attempts sent one by one. A
/// successful attempt gives its count back ([`refund`]). Returns the
/// keys' states before the attempt when it was counted (what [`refund`]
/// puts back), or what `held_back` said.
#[allow(clippy::too_many_arguments)]
pub async fn begin_attempt<T>(
    pool: &PgPool,
    keys: &[String],
    free_failures: &[i32],
    window_secs: i64,
    base_delay_secs: f64,
    max_delay_secs: f64,
    held_back: impl FnOnce(&[KeyState]) -> Option<T>,
) -> Result<Result<Vec<KeyState>, T>, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO login_throttle (key, failures, last_failure_at)
         SELECT key, 0, now() FROM unnest($1::text[]) AS key
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(keys)
    .execute(&mut *tx)
    .await?;
    let states: Vec<KeyState> = sqlx::query_as(
        "SELECT key,
                CASE WHEN last_failure_at > now() - make_interval(secs => $2)
                     THEN failures ELSE 0 END AS failures,
                blocked_until, last_failure_at
         FROM login_throttle WHERE key = ANY($1)
         ORDER BY key
         FOR UPDATE",
    )
    .bind(keys)
    .bind(window_secs as f64)
    .fetch_all(&mut *tx)
    .await?;
    if let Some(refusal) = held_back(&states) {
        tx.rollback().await?;
        return Ok(Err(refusal));
    }
    record_failure(
        &mut tx,
        keys,
        free_failures,
        window_secs,
        base_delay_secs,
        max_delay_secs,
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(states))
}

/// Whether `key` was remembered ([`refund`]'s `remembered`) within the
/// last `window_secs`.
pub async fn remembered<'e>(
    db: impl PgExecutor<'e>,
    key: &str,
    window_secs: i64,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM login_throttle
                        WHERE key = $1 AND last_failure_at > now() - make_interval(secs => $2))",
    )
    .bind(key)
    .bind(window_secs as f64)
    .fetch_one(db)
    .await?)
}

/// Gives back the count a successful attempt took ([`begin_attempt`]):
/// forgets `cleared` (the account and the pair); puts each key of
/// `refunded` (the address, whose count over all accounts stays) back as it
/// was before the attempt — count, last failure and hold-back — or, when
/// other attempts have counted since, takes one failure off, lifting the
/// hold-back below its free failures (`free_failures`, matched by
/// position); and notes `remembered` (the client that signed in) as of
/// now: a row without failures, whose `last_failure_at` is that sign-in.
pub async fn refund(
    pool: &PgPool,
    cleared: &[String],
    refunded: &[KeyState],
    free_failures: &[i32],
    remembered: &str,
) -> Result<(), Error> {
    let keys: Vec<&str> = refunded.iter().map(|k| k.key.as_str()).collect();
    let before: Vec<i32> = refunded.iter().map(|k| k.failures).collect();
    let before_at: Vec<DateTime<Utc>> = refunded.iter().map(|k| k.last_failure_at).collect();
    let before_until: Vec<Option<DateTime<Utc>>> =
        refunded.iter().map(|k| k.blocked_until).collect();
    let mut tx = pool.begin().await?;
    // Rows locked in key order, as `begin_attempt` locks them.
    sqlx::query(
        "WITH locked AS (
             SELECT key FROM login_throttle
             WHERE key = ANY($1) OR key = ANY($2) ORDER BY key FOR UPDATE)
         DELETE FROM login_throttle t USING locked
         WHERE t.key = locked.key AND t.key = ANY($1)",
    )
    .bind(cleared)
    .bind(&keys)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE login_throttle t SET
             failures = CASE WHEN t.failures = k.before + 1 THEN k.before
                             ELSE greatest(t.failures - 1, 0) END,
             last_failure_at = CASE WHEN t.failures = k.before + 1 THEN k.before_at
                                    ELSE t.last_failure_at END,
             blocked_until = CASE WHEN t.failures = k.before + 1 THEN k.before_until
                                  WHEN t.failures - 1 >= k.free THEN t.blocked_until END
         FROM unnest($1::text[], $2::int4[], $3::timestamptz[], $4::timestamptz[], $5::int4[])
              AS k(key, before, before_at, before_until, free)
         WHERE t.key = k.key",
    )
    .bind(&keys)
    .bind(&before)
    .bind(&before_at)
    .bind(&before_until)
    .bind(free_failures)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO login_throttle (key, failures, last_failure_at) VALUES ($1, 0, now())
         ON CONFLICT (key) DO UPDATE SET failures = 0, last_failure_at = now(), blocked_until = NULL",
    )
    .bind(remembered)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
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
         RETURNING t.key, t.failures, t.blocked_until, t.last_failure_at",
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
