//! Statistics and housekeeping statements for operators, benchmarks and
//! tests: server facts, table health, and explicit VACUUM/CHECKPOINT.
//!
//! Beside those, what a benchmark or a test needs around the product's own
//! statements: a synthetic backlog, one app's queue depth, a snapshot held
//! open, a wake-up of every sleeping dispatcher, and `EXPLAIN (ANALYZE,
//! BUFFERS)` of the hot statements. None of them is on the dispatcher's path.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Error;
use crate::model::Lease;

/// Server settings that decide what a measurement means.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ServerFacts {
    /// The `fsync` setting (`on` or `off`).
    pub fsync: String,
    /// The `synchronous_commit` setting.
    pub synchronous_commit: String,
    /// `version()`: the server's full version string.
    pub version: String,
}

/// The server's durability settings and version.
pub async fn server_facts<'e>(db: impl PgExecutor<'e>) -> Result<ServerFacts, Error> {
    Ok(sqlx::query_as(
        "SELECT current_setting('fsync') AS fsync,
                current_setting('synchronous_commit') AS synchronous_commit,
                version() AS version",
    )
    .fetch_one(db)
    .await?)
}

/// The value of a server setting as `pg_settings` shows it (without units),
/// as the current session sees it.
pub async fn setting<'e>(db: impl PgExecutor<'e>, name: &str) -> Result<String, Error> {
    Ok(
        sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
            .bind(name)
            .fetch_one(db)
            .await?,
    )
}

/// What PostgreSQL's statistics say about vacuuming one user table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableVacuum {
    /// Dead row versions waiting for vacuum.
    pub dead_tuples: i64,
    /// Autovacuum passes finished since the statistics were reset.
    pub autovacuum_count: i64,
}

/// [`TableVacuum`] of the user table `table` with the tables that inherit
/// from it (`outbox` and its segments), summed (zeros when the statistics
/// do not know the table yet).
pub async fn table_vacuum<'e>(db: impl PgExecutor<'e>, table: &str) -> Result<TableVacuum, Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT coalesce(sum(n_dead_tup), 0)::int8, coalesce(sum(autovacuum_count), 0)::int8
         FROM pg_stat_user_tables
         WHERE relid = to_regclass($1)
            OR relid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass($1))",
    )
    .bind(table)
    .fetch_optional(db)
    .await?;
    Ok(row
        .map(|(dead_tuples, autovacuum_count)| TableVacuum {
            dead_tuples,
            autovacuum_count,
        })
        .unwrap_or_default())
}

/// Rows of `app` in the outbox, whatever their state. Counts every row of
/// the app: a sample now and then, not a tight loop (see [`queue_empty`]).
pub async fn queue_depth<'e>(db: impl PgExecutor<'e>, app: Uuid) -> Result<i64, Error> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE app_id = $1")
            .bind(app)
            .fetch_one(db)
            .await?,
    )
}

/// Whether `app` has no rows left in the outbox. Stops at the first row
/// instead of counting a backlog, so it may be polled in tight loops.
pub async fn queue_empty<'e>(db: impl PgExecutor<'e>, app: Uuid) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE app_id = $1)")
            .bind(app)
            .fetch_one(db)
            .await?,
    )
}

/// Inserts `rows` rows of `topic` for `app`, due a second ago, with payloads
/// `{"n": 1}` … `{"n": rows}`, in one statement: a synthetic backlog for
/// benchmarks and tests (no validation, no de-duplication). Returns how many
/// rows were inserted.
pub async fn fill_backlog<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    rows: u32,
    topic: &str,
) -> Result<u64, Error> {
    fill_backlog_topics(db, app, rows, &[topic]).await
}

/// As [`fill_backlog`], the `g`th row's topic being `topics[g % topics.len()]`:
/// the topics interleave in claim order.
pub async fn fill_backlog_topics<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    rows: u32,
    topics: &[&str],
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "INSERT INTO outbox (id, app_id, topic, payload, run_at)
         SELECT outbox_uuid_v7(), $1, ($3::text[])[1 + g % cardinality($3::text[])],
                jsonb_build_object('n', g), now() - interval '1 second'
         FROM generate_series(1, $2) g",
    )
    .bind(app)
    .bind(i64::from(rows))
    .bind(topics)
    .execute(db)
    .await?
    .rows_affected())
}

/// Adds rows `from + 1 ..= from + rows` of a busy app's outbox to `app`, for
/// the console benchmark: ten topics (`console.t0`…), a customer id among
/// 1,000 in every payload, a partition key among 100; one row in ten
/// scheduled an hour ahead, one in twenty waiting for a retry with an
/// error, the rest due since they were enqueued, one per 10 ms up to now.
pub async fn fill_console_rows<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    from: u32,
    rows: u32,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "INSERT INTO outbox (id, app_id, topic, payload, run_at, partition_key, attempt_count,
                             first_attempt_at, last_attempt_at, last_error, created_at)
         SELECT outbox_uuid_v7(), $1, 'console.t' || (g % 10),
                jsonb_build_object('n', g, 'customer', jsonb_build_object('id', 'c-' || (g % 1000))),
                CASE WHEN g % 10 = 0 THEN now() + interval '1 hour'
                     WHEN g % 20 = 1 THEN now() + interval '10 minutes'
                     ELSE now() - make_interval(secs => (($2 + $3) - g) / 100.0) END,
                'p-' || (g % 100),
                CASE WHEN g % 20 = 1 THEN 1 ELSE 0 END,
                CASE WHEN g % 20 = 1 THEN now() - interval '1 minute' END,
                CASE WHEN g % 20 = 1 THEN now() - interval '1 minute' END,
                CASE WHEN g % 20 = 1 THEN 'upstream answered 503: service unavailable' END,
                now() - make_interval(secs => (($2 + $3) - g) / 100.0)
         FROM generate_series($2 + 1, $2 + $3) g",
    )
    .bind(app)
    .bind(i64::from(from))
    .bind(i64::from(rows))
    .execute(db)
    .await?
    .rows_affected())
}

/// Adds `rows` dead letters to `app`, for the console benchmark: the same
/// topics and payloads as [`fill_console_rows`], one every 6 s back from
/// now, a third of them resolved (`ignored`).
pub async fn fill_console_dead_letters<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    rows: u32,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "INSERT INTO dead_letters (app_id, original_event_id, source, topic, handler, payload,
                                   attempt_count, first_attempt_at, last_attempt_at, last_error,
                                   created_at, resolved_at, resolution)
         SELECT $1, outbox_uuid_v7(), 'queue', 'console.t' || (g % 10), 'console.t' || (g % 10),
                jsonb_build_object('n', g, 'customer', jsonb_build_object('id', 'c-' || (g % 1000))),
                5, now() - interval '1 hour', now() - interval '1 minute',
                'upstream answered 503: service unavailable',
                now() - make_interval(secs => g * 6.0),
                CASE WHEN g % 3 = 0 THEN now() END, CASE WHEN g % 3 = 0 THEN 'ignored' END
         FROM generate_series(1, $2) g",
    )
    .bind(app)
    .bind(i64::from(rows))
    .execute(db)
    .await?
    .rows_affected())
}

/// Creates the optional GIN index on `payload` that serves payload
/// containment searches, on `outbox` and on each segment (docs/operations.md;
/// in production build them with `CREATE INDEX CONCURRENTLY`), and analyzes
/// the tables.
pub async fn create_payload_index<'e>(db: impl PgExecutor<'e> + Copy) -> Result<(), Error> {
    for table in std::iter::once("outbox").chain(super::segments::TABLES) {
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_payload_idx ON {table} \
             USING gin (payload jsonb_path_ops)"
        ))
        .execute(db)
        .await?;
    }
    sqlx::query("ANALYZE outbox, outbox_s0, outbox_s1, outbox_s2")
        .execute(db)
        .await?;
    Ok(())
}

/// `VACUUM ANALYZE dead_letters`, as [`vacuum_analyze_outbox`].
pub async fn vacuum_analyze_dead_letters<'e>(db: impl PgExecutor<'e>) -> Result<(), Error> {
    sqlx::query("VACUUM ANALYZE dead_letters")
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes every row of the outbox, of every app, at once (`TRUNCATE`).
/// For benchmarks and tests between runs: it takes an exclusive lock and
/// leaves no dead tuples behind.
pub async fn truncate_outbox<'e>(db: impl PgExecutor<'e>) -> Result<(), Error> {
    sqlx::query("TRUNCATE outbox").execute(db).await?;
    Ok(())
}

/// `VACUUM ANALYZE` of `outbox` and its segments: removes the dead row
/// versions no snapshot can see any more and refreshes the planner's
/// statistics of the tables. Cannot run inside a transaction block.
pub async fn vacuum_analyze_outbox<'e>(db: impl PgExecutor<'e>) -> Result<(), Error> {
    sqlx::query("VACUUM ANALYZE outbox, outbox_s0, outbox_s1, outbox_s2")
        .execute(db)
        .await?;
    Ok(())
}

/// An explicit `CHECKPOINT`: writes out every dirty buffer now, so that it is
/// not written during what follows. Needs superuser or the `pg_checkpoint`
/// role.
pub async fn checkpoint<'e>(db: impl PgExecutor<'e>) -> Result<(), Error> {
    sqlx::query("CHECKPOINT").execute(db).await?;
    Ok(())
}

/// Opens a `REPEATABLE READ` transaction on `conn` and takes its snapshot,
/// then leaves the transaction open: until it ends, VACUUM cannot remove any
/// row version deleted after the snapshot (what a long report or a
/// forgotten session does to the outbox). Runs `BEGIN` itself; the caller
/// ends the transaction with `ROLLBACK` or by closing the connection.
pub async fn hold_snapshot(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT count(*) FROM apps")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Opens a transaction and takes a transaction id, then leaves it idle: the
/// `idle in transaction` session that holds the xmin horizon back (a
/// forgotten session, an application bug). Commit or close to end it.
pub async fn hold_transaction_id(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    sqlx::query("SELECT txid_current()")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One pass of a reporting reader: counts the rows of outboxd's busiest
/// tables (inside the caller's transaction, when it holds one open).
pub async fn scan_outboxd_tables(conn: &mut PgConnection) -> Result<(), Error> {
    for table in ["outbox", "dead_letters", "outbox_tx_batches"] {
        sqlx::query(&format!("SELECT count(*) FROM {table}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Dead row versions of `pg_class`, the catalog of tables and indexes:
/// every `TRUNCATE` (a segment's rotation, a compaction) writes new
/// versions of the rows of the table, its indexes and its TOAST table,
/// which a held snapshot keeps like any other.
pub async fn catalog_dead_tuples<'e>(db: impl PgExecutor<'e>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(n_dead_tup), 0)::int8 FROM pg_stat_sys_tables
         WHERE schemaname = 'pg_catalog' AND relname = 'pg_class'",
    )
    .fetch_one(db)
    .await?)
}

/// Dead row versions of every table in the `public` schema that has any, by
/// table, largest first (PostgreSQL's statistics, updated with a delay of
/// up to a second or so).
pub async fn dead_tuples<'e>(db: impl PgExecutor<'e>) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables
         WHERE schemaname = 'public' AND n_dead_tup > 0
         ORDER BY n_dead_tup DESC, relname",
    )
    .fetch_all(db)
    .await?)
}

/// Terminates every other session whose `application_name` is `application`;
/// returns how many. (A fault to inject, as an operator's script or a
/// failover would.)
pub async fn terminate_sessions<'e>(
    db: impl PgExecutor<'e>,
    application: &str,
) -> Result<u64, Error> {
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(application)
    .fetch_one(db)
    .await?;
    Ok(u64::try_from(ended).unwrap_or_default())
}

/// How many more client connections the server accepts now
/// (`max_connections` less those open and the superuser reserve).
pub async fn connection_headroom<'e>(db: impl PgExecutor<'e>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT current_setting('max_connections')::int
              - current_setting('superuser_reserved_connections')::int
              - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(db)
    .await?)
}

/// Notifies the wake-up channel (`outbox_due`, see the `wake` module) once:
/// every sleeping dispatcher claims at once instead of at its next poll,
/// e.g. right after an app was resumed.
pub async fn wake_dispatchers<'e>(db: impl PgExecutor<'e>) -> Result<(), Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(super::wake::CHANNEL)
        .execute(db)
        .await?;
    Ok(())
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the claim statement
/// (`store::outbox::CLAIM_SQL`) for `worker`, `limit` rows and a `lease`,
/// serving every topic, one plan line per element. ANALYZE runs the statement: the rows are
/// claimed, so run it in a transaction and roll that back.
pub async fn explain_claim<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<Vec<String>, Error> {
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", super::outbox::CLAIM_SQL);
    Ok(sqlx::query_scalar::<_, String>(&sql)
        .bind(i64::from(limit.max(1)))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(true)
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .fetch_all(db)
        .await?)
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the combined complete-and-claim statement
/// (`store::outbox::COMPLETE_AND_CLAIM_SQL`): `done` completed, then as
/// [`explain_claim`] from `positions`. ANALYZE runs the statement: the rows of `done` are
/// deleted and others claimed, so run it in a transaction and roll that back.
pub async fn explain_complete_and_claim<'e>(
    db: impl PgExecutor<'e>,
    positions: &super::outbox::Positions,
    done: &[Lease],
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<Vec<String>, Error> {
    let (ids, tokens): (Vec<Uuid>, Vec<i64>) = done.iter().map(|l| (l.id, l.token)).unzip();
    let sql = format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        super::outbox::COMPLETE_AND_CLAIM_SQL
    );
    Ok(sqlx::query_scalar::<_, String>(&sql)
        .bind(i64::from(limit.max(1)))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(&ids)
        .bind(&tokens)
        .bind(&positions.apps)
        .bind(&positions.run_at)
        .bind(&positions.ids)
        .bind(true)
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .fetch_all(db)
        .await?)
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the transactional take
/// (`store::outbox::TAKE_SQL`) of `limit` rows, every app from its first
/// row. ANALYZE runs the statement: the rows are deleted, so run it in a
/// transaction and roll that back.
pub async fn explain_take<'e>(db: impl PgExecutor<'e>, limit: u32) -> Result<Vec<String>, Error> {
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", super::outbox::TAKE_SQL);
    let from = super::outbox::Positions::default();
    Ok(sqlx::query_scalar::<_, String>(&sql)
        .bind(i64::from(limit.max(1)))
        .bind(&from.apps)
        .bind(&from.run_at)
        .bind(&from.ids)
        .bind(true)
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .fetch_all(db)
        .await?)
}
