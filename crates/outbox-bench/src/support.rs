//! What the scenarios share: the raw baseline's statement, filling and
//! emptying the outbox between measurements, a scratch database, medians.
//!
//! Apart from the baseline, every statement here goes through
//! `outbox_core::store::stats`; only the scratch database's `CREATE` and
//! `DROP` are written here (harness, not product).

use anyhow::Context;
use outbox_core::store::stats;
use sqlx::PgPool;
use uuid::Uuid;

/// Rows per transaction of the batch scenarios, and per claim.
pub const BATCH: usize = 100;

/// The raw baseline's unit of work: claim and delete 100 due rows of app `$1`.
// Baseline: the raw-SQL ceiling outboxd is compared with, plain SQL on
// purpose (the raw drain, the raw steady consumer and its EXPLAIN).
// `ONLY`: the ceiling of a plain table. The backlog is written to `outbox`
// itself, and its segments (children, migration 0032) would add their scans
// to every statement of the baseline, which a plain queue table does not have.
pub const RAW_DELETE: &str = "DELETE FROM ONLY outbox WHERE id IN (
    SELECT id FROM ONLY outbox WHERE app_id = $1 AND run_at <= now()
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)";

/// The raw lease baseline's unit of work: delete the rows `$2` the consumer
/// finished and lease the next 100 due rows of app `$1`, returning their ids.
/// The two writes per row a lease costs (an update, then the delete), as a
/// plain consumer with leases would write them, in one statement per batch
/// as outboxd's claim loops do.
// Baseline: plain SQL on purpose; `ONLY` as in `RAW_DELETE`.
pub const RAW_LEASE: &str = "WITH done AS (
    DELETE FROM ONLY outbox WHERE id = ANY ($2)),
picked AS (
    SELECT id FROM ONLY outbox WHERE app_id = $1 AND run_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
UPDATE ONLY outbox o
SET attempt_count = o.attempt_count + 1, lease_token = o.lease_token + 1,
    locked_by = 'raw', locked_until = now() + interval '30 seconds',
    last_attempt_at = now()
FROM picked WHERE o.id = picked.id
RETURNING o.id";

/// [`RAW_DELETE`] over `outbox` and its segments, for a plain consumer of
/// rows that `enqueue` wrote (into the segments).
// Baseline: plain SQL on purpose.
pub const RAW_DELETE_ALL: &str = "DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE app_id = $1 AND run_at <= now()
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)";

/// Empties the outbox and vacuums it, so the next measurement starts clean.
pub async fn truncate(pool: &PgPool) -> anyhow::Result<()> {
    stats::truncate_outbox(pool).await?;
    stats::vacuum_analyze_outbox(pool).await?;
    Ok(())
}

/// Fills the backlog with due rows, in chunks, and settles statistics.
pub async fn prefill(pool: &PgPool, app: Uuid, rows: u32, topic: &str) -> anyhow::Result<()> {
    prefill_topics(pool, app, rows, &[topic]).await
}

/// As [`prefill`], the topics interleaving in claim order (see
/// `stats::fill_backlog_topics`).
pub async fn prefill_topics(
    pool: &PgPool,
    app: Uuid,
    rows: u32,
    topics: &[&str],
) -> anyhow::Result<()> {
    let mut left = rows;
    while left > 0 {
        let n = left.min(20_000);
        stats::fill_backlog_topics(pool, app, n, topics)
            .await
            .context("prefilling the backlog")?;
        left -= n;
    }
    stats::vacuum_analyze_outbox(pool).await?;
    // The fill's WAL would otherwise be checkpointed in the middle of the
    // measurement that follows (a 1M-row fill is about a gigabyte of it).
    checkpoint(pool).await;
    Ok(())
}

/// Writes out what earlier scenarios left dirty, so that it is not written
/// during the measurement that follows. Needs superuser or pg_checkpoint;
/// without it the run is only noisier.
pub async fn checkpoint(pool: &PgPool) {
    if let Err(err) = stats::checkpoint(pool).await {
        tracing::debug!(error = %err, "no CHECKPOINT");
    }
}

/// The lowest and the highest of `rates`, in thousands: "41k–47k".
pub fn spread(rates: &[f64]) -> String {
    let (lo, hi) = rates.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
        (lo.min(*r), hi.max(*r))
    });
    format!("{:.0}k–{:.0}k", lo / 1000.0, hi / 1000.0)
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A migrated database beside the benchmark's own, dropped when done with
/// (and dropped first if a failed run left it behind).
pub struct ScratchDatabase {
    /// Its name.
    name: &'static str,
    /// A pool of connections to it.
    pub pool: PgPool,
}

impl ScratchDatabase {
    /// Creates (after dropping any leftover) and migrates the database
    /// `name` on the server of `pool`.
    pub async fn create(pool: &PgPool, name: &'static str) -> anyhow::Result<Self> {
        // Harness, not product: the scratch database's DROP and CREATE (an
        // identifier, which cannot be bound) stay in the benchmark.
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(pool)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(pool)
            .await
            .with_context(|| format!("creating database {name} (needs CREATEDB)"))?;
        let scratch = sqlx::postgres::PgPoolOptions::new()
            .max_connections(pool.options().get_max_connections())
            .connect_with(pool.connect_options().as_ref().clone().database(name))
            .await?;
        outbox_core::migrate(&scratch).await?;
        Ok(Self {
            name,
            pool: scratch,
        })
    }

    /// Closes the pool and drops the database (through `pool`, another
    /// database's connections).
    pub async fn drop_it(self, pool: &PgPool) -> anyhow::Result<()> {
        self.pool.close().await;
        // Harness, not product (see `create`).
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(pool)
            .await?;
        Ok(())
    }
}
