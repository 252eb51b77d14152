//! The dispatcher processes that are up and what each serves
//! (`outbox_processes`, migration 0018). Each process writes its row when it
//! starts and on every beat; a row past its `expires_at` belongs to a
//! process that is gone, and the next beat of any process deletes it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::limits::LimitedTopic;
use crate::Error;

impl Process {
    /// What it serves, in words: its topics by name, then its patterns
    /// (prefix handlers, relayed patterns), which take a topic only where no
    /// other live process names it. Listing the two together read as if a
    /// relay's `email.send` took rows that a process handling `email.send`
    /// keeps.
    pub fn serves(&self) -> String {
        let named = self.topics.join(", ");
        let patterns = self.patterns.join(", ");
        match (named.is_empty(), patterns.is_empty()) {
            (_, true) => named,
            (true, false) => format!("{patterns} (where no other process names the topic)"),
            (false, false) => {
                format!("{named}; {patterns} (where no other process names the topic)")
            }
        }
    }
}

/// What one process is and serves, as it writes it on every beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Chosen at start; a restarted process is a new one.
    pub id: Uuid,
    /// The dispatcher's worker id (also the lease holder of its rows).
    pub worker: String,
    /// The host name.
    pub host: String,
    /// The operating-system process id.
    pub pid: i32,
    /// The version of outboxd (or of the library) it runs.
    pub version: String,
    /// Topics it serves by name.
    pub topics: Vec<String>,
    /// Patterns it serves, as declared (NATS-style, or `prefix*`).
    pub patterns: Vec<String>,
    /// The same patterns as PostgreSQL regular expressions.
    pub regexes: Vec<String>,
}

/// A live process, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Process {
    /// Chosen at start.
    pub id: Uuid,
    /// The dispatcher's worker id.
    pub worker: String,
    /// The host name.
    pub host: String,
    /// The operating-system process id.
    pub pid: i32,
    /// The version it runs.
    pub version: String,
    /// Topics served by name.
    pub topics: Vec<String>,
    /// Patterns served, as declared.
    pub patterns: Vec<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last beat.
    pub last_seen: DateTime<Utc>,
    /// When it counts as gone unless it beats again.
    pub expires_at: DateTime<Utc>,
}

/// What a beat learns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Beat {
    /// The topics the other live processes serve by name.
    pub others: Vec<String>,
    /// The paused topics of every app, as [`super::pauses::pause_key`] names them.
    pub paused: Vec<String>,
    /// The topics with a concurrency or rate limit, of every app.
    pub limited: Vec<LimitedTopic>,
}

/// What a beat reads (`$1` the process's id): the topics the other live
/// processes serve by name, the paused topics and the limited ones.
macro_rules! beat_answer {
    () => {
        "SELECT
    (SELECT coalesce(array_agg(DISTINCT t.topic ORDER BY t.topic), '{}')
     FROM outbox_processes p CROSS JOIN LATERAL unnest(p.topics) AS t(topic)
     WHERE p.id <> $1 AND p.expires_at > now()),
    (SELECT coalesce(array_agg(app_id::text || '/' || topic ORDER BY app_id, topic), '{}')
     FROM outbox_topic_pauses),
    (SELECT coalesce(array_agg(app_id ORDER BY app_id, topic), '{}')
     FROM outbox_topic_limits),
    (SELECT coalesce(array_agg(topic ORDER BY app_id, topic), '{}')
     FROM outbox_topic_limits)"
    };
}

/// The statement of [`beat`]: writes the process's row, deletes the rows of
/// processes that are gone, and reads as [`look`] (`$1`–`$8` the row, `$9`
/// seconds until it expires).
const BEAT: &str = concat!(
    "WITH me AS (
    INSERT INTO outbox_processes AS p
        (id, worker, host, pid, version, topics, patterns, regexes, expires_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))
    ON CONFLICT (id) DO UPDATE
        SET topics = excluded.topics, patterns = excluded.patterns,
            regexes = excluded.regexes, last_seen = now(), expires_at = excluded.expires_at
    RETURNING p.id
 ), gone AS (
    DELETE FROM outbox_processes WHERE expires_at < now() AND id <> $1 RETURNING id
 )
 ",
    beat_answer!()
);

/// The columns of [`beat_answer`], as a [`Beat`].
type BeatRow = (Vec<String>, Vec<String>, Vec<Uuid>, Vec<String>);

impl From<BeatRow> for Beat {
    fn from((others, paused, limited_apps, limited_topics): BeatRow) -> Self {
        let limited = limited_apps
            .into_iter()
            .zip(limited_topics)
            .map(|(app_id, topic)| LimitedTopic { app_id, topic })
            .collect();
        Beat {
            others,
            paused,
            limited,
        }
    }
}

/// Records that `info`'s process is up until `expires_in` from now, deletes
/// the rows of processes that are gone, and returns what the process must
/// know to claim: the topics the other live processes serve by name (a
/// fallback leaves those to them) and the paused topics.
pub async fn beat<'e>(
    db: impl PgExecutor<'e>,
    info: &ProcessInfo,
    expires_in: Duration,
) -> Result<Beat, Error> {
    let row: BeatRow = sqlx::query_as(BEAT)
        .bind(info.id)
        .bind(&info.worker)
        .bind(&info.host)
        .bind(info.pid)
        .bind(&info.version)
        .bind(&info.topics)
        .bind(&info.patterns)
        .bind(&info.regexes)
        .bind(expires_in.as_secs_f64())
        .fetch_one(db)
        .await?;
    Ok(row.into())
}

/// What [`beat`] returns, without writing the process's row. Each write
/// leaves a dead version of the row, which vacuum cannot remove while an
/// old snapshot is held; a process writes its row a few times per lease
/// and reads pauses and limits every second.
pub async fn look<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Beat, Error> {
    let row: BeatRow = sqlx::query_as(beat_answer!())
        .bind(id)
        .fetch_one(db)
        .await?;
    Ok(row.into())
}

/// Removes a process's row (it stops).
pub async fn leave<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<(), Error> {
    sqlx::query("DELETE FROM outbox_processes WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// The live processes, oldest first.
pub async fn live<'e>(db: impl PgExecutor<'e>) -> Result<Vec<Process>, Error> {
    Ok(sqlx::query_as(
        "SELECT id, worker, host, pid, version, topics, patterns, started_at, last_seen, expires_at
         FROM outbox_processes WHERE expires_at > now()
         ORDER BY started_at, id",
    )
    .fetch_all(db)
    .await?)
}

/// Whether some live process serves `topic`.
pub async fn served_by_any<'e>(db: impl PgExecutor<'e>, topic: &str) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM outbox_processes p
            WHERE p.expires_at > now()
              AND ($1 = ANY (p.topics) OR $1 ~ ANY (p.regexes)))",
    )
    .bind(topic)
    .fetch_one(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_process_serves_puts_its_patterns_after_its_named_topics() {
        let process = |topics: &[&str], patterns: &[&str]| Process {
            id: Uuid::nil(),
            worker: "w".into(),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            patterns: patterns.iter().map(|t| t.to_string()).collect(),
            started_at: Utc::now(),
            last_seen: Utc::now(),
            expires_at: Utc::now(),
        };
        assert_eq!(process(&["a", "b"], &[]).serves(), "a, b");
        assert_eq!(
            process(&[], &["orders.>", "email.send"]).serves(),
            "orders.>, email.send (where no other process names the topic)"
        );
        assert_eq!(
            process(&["a"], &["mail*"]).serves(),
            "a; mail* (where no other process names the topic)"
        );
    }
}
