//! Every SQL statement outboxd runs lives in this module. The dispatcher, the
//! admin API and the CLI call these typed functions.
//!
//! The rule for arguments: a function that runs **one** statement takes
//! `impl PgExecutor` (a pool, a connection or the caller's transaction, so
//! it composes into the caller's atomic unit); a function that runs
//! **several** statements, or needs session state (a lock, a setting, a
//! savepoint), takes `&mut PgConnection` and says whether it opens a
//! transaction of its own.

/// Connection options for a transaction-pooling PgBouncer in front of the
/// server: no statement cache (a prepared statement lives on one server
/// connection, and the pooler hands out another at the next transaction)
/// and no `extra_float_digits` startup parameter (PgBouncer refuses
/// parameters it does not track). Only producer statements are safe on such
/// connections: [`crate::enqueue()`], [`crate::enqueue_batch`],
/// [`apps::by_slug`] and the SQL function `outbox_enqueue`, inside a
/// transaction. sqlx still names every other statement (and never closes
/// it), and a named statement left on a shared server connection breaks the
/// next client. Dispatchers may not use them at all: LISTEN, session
/// advisory locks and session settings need a connection of their own.
pub fn pooled_connect_options(
    base: &sqlx::postgres::PgConnectOptions,
) -> sqlx::postgres::PgConnectOptions {
    base.clone()
        .statement_cache_capacity(0)
        .extra_float_digits(None)
}

/// The versions of the migrations this build knows.
fn known_migrations() -> Vec<i64> {
    crate::MIGRATOR.iter().map(|m| m.version).collect()
}

/// Whether the database has sqlx's table of applied migrations.
async fn migrations_tracked<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<bool, crate::Error> {
    Ok(
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(db)
            .await?,
    )
}

/// Whether the database holds every migration this build knows (or later
/// ones a newer build applied) and the tables they made, for readiness: a
/// process on an unmigrated database answers, but can claim and enqueue
/// nothing. An error when the database does not answer.
pub async fn schema_is_current(pool: &sqlx::PgPool) -> Result<bool, crate::Error> {
    let mut conn = pool.acquire().await?;
    if missing_migrations(&mut conn).await? > 0 {
        return Ok(false);
    }
    // A restore of a dump taken with `--exclude-table='outbox*'` records
    // every migration but has no outbox.
    Ok(sqlx::query_scalar(
        "SELECT to_regclass('outbox') IS NOT NULL AND to_regclass('outbox_segments') IS NOT NULL
            AND to_regclass('dead_letters') IS NOT NULL AND to_regclass('apps') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// How many of the migrations this build knows the database has not
/// applied. Every version this build knows is checked, not the highest
/// applied: a service's own migrations may share the table with higher
/// numbers (README).
pub(crate) async fn missing_migrations(
    conn: &mut sqlx::PgConnection,
) -> Result<usize, crate::Error> {
    let known = known_migrations();
    if !migrations_tracked(&mut *conn).await? {
        return Ok(known.len());
    }
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM _sqlx_migrations WHERE success AND version = ANY($1)",
    )
    .bind(&known)
    .fetch_one(&mut *conn)
    .await?;
    Ok(known
        .len()
        .saturating_sub(usize::try_from(applied).unwrap_or(0)))
}

/// The first migration below [`OWN_MIGRATIONS_FROM`](crate::OWN_MIGRATIONS_FROM)
/// the database records and this build does not know, if any: a newer
/// outboxd migrated it.
pub async fn unknown_outboxd_migration(
    conn: &mut sqlx::PgConnection,
) -> Result<Option<i64>, crate::Error> {
    let known = known_migrations();
    if !migrations_tracked(&mut *conn).await? {
        return Ok(None);
    }
    Ok(sqlx::query_scalar(
        "SELECT min(version) FROM _sqlx_migrations
         WHERE version < $1 AND version <> ALL ($2)",
    )
    .bind(crate::OWN_MIGRATIONS_FROM)
    .bind(&known)
    .fetch_one(&mut *conn)
    .await?)
}

/// Opens a transaction on `pool` in which a lock wait gives up after
/// `lock_timeout` (for the statements that take a table's `ACCESS
/// EXCLUSIVE` lock: statements on the table queue behind the waiting lock,
/// so the timeout bounds their stall too).
pub(crate) async fn begin_with_lock_timeout(
    pool: &sqlx::PgPool,
    lock_timeout: std::time::Duration,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, crate::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = {}",
        lock_timeout.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}

/// `VACUUM (SKIP_LOCKED)` of `table`, unless a vacuum is on it already
/// (`pg_stat_progress_vacuum`): an autovacuum is not waited for. The
/// warning the server sends when it skips the table all the same (another
/// lock came first) is kept from outboxd's log (`client_min_messages`; the
/// server's own log still has it): it says nothing an operator can act on.
/// A connection whose setting could not be put back is closed.
pub(crate) async fn vacuum_skip_locked(
    pool: &sqlx::PgPool,
    table: &'static str,
) -> Result<(), crate::Error> {
    let mut conn = pool.acquire().await?;
    let running: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_vacuum
                        WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())
                          AND relid = to_regclass($1))",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await?;
    if running {
        return Ok(());
    }
    sqlx::query("SET client_min_messages = error")
        .execute(&mut *conn)
        .await?;
    let done = sqlx::query(&format!("VACUUM (SKIP_LOCKED) {table}"))
        .persistent(false)
        .execute(&mut *conn)
        .await;
    if sqlx::query("RESET client_min_messages")
        .execute(&mut *conn)
        .await
        .is_err()
    {
        conn.detach();
    }
    done?;
    Ok(())
}

/// Whether `err` is a lock wait that gave up: `lock_timeout` ran out, or
/// the server broke a deadlock by ending this statement.
pub(crate) fn is_lock_conflict(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03" || code == "40P01")
}

/// The ids of `s.running` (a limit's state `s`, its row of
/// `outbox_topic_limit_states`, which may be missing) whose row still holds
/// a live lease: the slots taken.
macro_rules! live_running {
    () => {
        "ARRAY(SELECT r.id FROM unnest(s.running) AS r(id)
               WHERE EXISTS (SELECT 1 FROM outbox o
                             WHERE o.id = r.id AND o.locked_until > now()))"
    };
}

pub mod activity;
pub mod apps;
pub mod audit;
pub mod compaction;
pub mod dead_letters;
pub mod dedupe;
pub mod invocations;
pub mod kv;
pub mod leader;
pub mod limits;
pub mod listen;
pub mod login_throttle;
pub mod outbox;
pub mod pauses;
pub mod principals;
pub mod processes;
pub mod retention;
pub mod segments;
pub mod sessions;
pub mod stats;
pub mod triggers;
pub mod tx_batch;
pub mod wake;
pub mod webhooks;
