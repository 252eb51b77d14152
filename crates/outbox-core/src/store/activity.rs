//! What the console's charts show: attempts completed and failed per app,
//! topic and minute, added by every dispatcher process from its in-memory
//! counts, and the oldest due row's age per minute from the leader's
//! samples (migration 0029). Kept for a day.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// One process's counts of one (app, topic) since its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityDelta {
    /// The app.
    pub app_id: Uuid,
    /// The topic.
    pub topic: String,
    /// Attempts whose handler succeeded.
    pub completed: u64,
    /// Attempts that failed (retried or dead-lettered).
    pub failed: u64,
    /// Of those, the ones dead-lettered.
    pub dead_lettered: u64,
}

/// Adds `deltas` to the current minute's rows, and deletes the rows older
/// than a day.
pub async fn record<'e>(db: impl PgExecutor<'e>, deltas: &[ActivityDelta]) -> Result<(), Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let apps: Vec<Uuid> = deltas.iter().map(|d| d.app_id).collect();
    let topics: Vec<&str> = deltas.iter().map(|d| d.topic.as_str()).collect();
    let completed: Vec<i64> = deltas.iter().map(|d| clamp(d.completed)).collect();
    let failed: Vec<i64> = deltas.iter().map(|d| clamp(d.failed)).collect();
    let dead: Vec<i64> = deltas.iter().map(|d| clamp(d.dead_lettered)).collect();
    sqlx::query(
        "WITH pruned AS (
            DELETE FROM outbox_activity WHERE minute < now() - interval '1 day'
         )
         INSERT INTO outbox_activity AS a (app_id, minute, topic, completed, failed, dead_lettered)
         SELECT d.app_id, date_trunc('minute', now()), d.topic,
                sum(d.completed), sum(d.failed), sum(d.dead)
         FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::int8[])
              AS d(app_id, topic, completed, failed, dead)
         -- An app deleted since the process counted its rows.
         WHERE EXISTS (SELECT 1 FROM apps WHERE apps.id = d.app_id)
         -- One row per key (a topic named like the overflow's `other`
         -- comes twice), taken in the order every writer of the table uses,
         -- so that two writers never wait for each other in a cycle.
         GROUP BY d.app_id, d.topic
         ORDER BY d.app_id, d.topic
         ON CONFLICT (app_id, minute, topic) DO UPDATE
            SET completed = a.completed + excluded.completed,
                failed = a.failed + excluded.failed,
                dead_lettered = a.dead_lettered + excluded.dead_lettered",
    )
    .bind(&apps)
    .bind(&topics)
    .bind(&completed)
    .bind(&failed)
    .bind(&dead)
    .execute(db)
    .await?;
    Ok(())
}

/// One minute of an app's activity, summed over its topics (or one topic).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct MinuteActivity {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Attempts completed in it.
    pub completed: i64,
    /// Attempts failed in it (retried or dead-lettered).
    pub failed: i64,
    /// Of those, the ones dead-lettered.
    pub dead_lettered: i64,
    /// The most rows due at a sample in it (none without a sample).
    pub due: Option<i64>,
    /// The oldest due row's age in seconds at its samples, the largest (none
    /// without a sample).
    pub oldest_due_secs: Option<f64>,
}

/// The last `minutes` minutes of `app`'s activity (of `topic` alone when
/// given), oldest first, one entry per minute, the current one included;
/// minutes without any count are zeros.
pub async fn per_minute<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    topic: Option<&str>,
    minutes: i32,
) -> Result<Vec<MinuteActivity>, Error> {
    Ok(sqlx::query_as(
        "SELECT m.minute,
                coalesce(sum(a.completed), 0)::int8 AS completed,
                coalesce(sum(a.failed), 0)::int8 AS failed,
                coalesce(sum(a.dead_lettered), 0)::int8 AS dead_lettered,
                sum(a.due)::int8 AS due,
                max(a.oldest_due_secs) AS oldest_due_secs
         FROM generate_series(date_trunc('minute', now()) - make_interval(mins => $3 - 1),
                              date_trunc('minute', now()), interval '1 minute') AS m(minute)
         LEFT JOIN outbox_activity a
           ON a.app_id = $1 AND a.minute = m.minute AND ($2::text IS NULL OR a.topic = $2)
         GROUP BY m.minute
         ORDER BY m.minute",
    )
    .bind(app)
    .bind(topic)
    .bind(minutes.clamp(1, 1440))
    .fetch_all(db)
    .await?)
}
