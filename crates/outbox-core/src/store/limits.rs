//! Concurrency limits per topic (`outbox_topic_limits`, migration 0020): at
//! most `max_running` rows of the topic run at once across every process.
//! Dispatchers read the limits on their beat ([`super::processes::beat`]),
//! claim limited topics apart from the others
//! ([`super::outbox::claim_limited`]), and a dead process's slots come back
//! when its leases expire.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// The highest concurrency limit accepted.
pub const MAX_RUNNING: i32 = 10_000;

/// A topic of one app that has a concurrency limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitedTopic {
    /// The app.
    pub app_id: Uuid,
    /// The topic.
    pub topic: String,
}

/// A topic's concurrency limit, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct TopicLimit {
    /// The topic.
    pub topic: String,
    /// At most this many of its rows run at once, across every process.
    pub max_running: i32,
    /// How many run now.
    pub running: i64,
    /// When the limit was last set.
    pub set_at: DateTime<Utc>,
    /// Who set it (a user's email or an API key's name), when known.
    pub set_by: Option<String>,
}

/// Refuses a limit outside `1..=MAX_RUNNING`, naming the field.
pub fn validate_max_running(max_running: i64) -> Result<i32, Error> {
    i32::try_from(max_running)
        .ok()
        .filter(|n| (1..=MAX_RUNNING).contains(n))
        .ok_or_else(|| {
            Error::invalid(
                "max_running",
                format!("is {max_running}; it must be between 1 and {MAX_RUNNING}"),
            )
        })
}

/// Sets at most `max_running` rows of `topic` of `app` to run at once. A new
/// limit counts the rows of the topic that are running already; processes
/// honour it from their next beat, within about a second.
pub async fn set<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    topic: &str,
    max_running: i64,
    by: Option<&str>,
) -> Result<(), Error> {
    crate::model::validate_topic(topic)?;
    let max_running = validate_max_running(max_running)?;
    sqlx::query(
        "INSERT INTO outbox_topic_limits (app_id, topic, max_running, set_by, running)
         VALUES ($1, $2, $3, $4, ARRAY(
             SELECT id FROM outbox
             WHERE app_id = $1 AND topic = $2 AND locked_until > now()))
         ON CONFLICT (app_id, topic) DO UPDATE
             SET max_running = excluded.max_running, set_by = excluded.set_by, set_at = now()",
    )
    .bind(app)
    .bind(topic)
    .bind(max_running)
    .bind(by)
    .execute(db)
    .await?;
    Ok(())
}

/// Removes the limit of `topic` of `app`; returns false when it had none.
pub async fn remove<'e>(db: impl PgExecutor<'e>, app: Uuid, topic: &str) -> Result<bool, Error> {
    let deleted = sqlx::query("DELETE FROM outbox_topic_limits WHERE app_id = $1 AND topic = $2")
        .bind(app)
        .bind(topic)
        .execute(db)
        .await?
        .rows_affected();
    Ok(deleted == 1)
}

/// The limited topics of `app`, by topic, each with how many of its rows run.
pub async fn list<'e>(db: impl PgExecutor<'e>, app: Uuid) -> Result<Vec<TopicLimit>, Error> {
    Ok(sqlx::query_as(
        "SELECT l.topic, l.max_running, l.set_at, l.set_by,
                (SELECT count(*) FROM unnest(l.running) AS r(id)
                 WHERE EXISTS (SELECT 1 FROM outbox o
                               WHERE o.id = r.id AND o.locked_until > now())) AS running
         FROM outbox_topic_limits l
         WHERE l.app_id = $1 ORDER BY l.topic",
    )
    .bind(app)
    .fetch_all(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_outside_its_range_is_refused_with_the_field_and_the_range() {
        for bad in [0, -1, i64::from(MAX_RUNNING) + 1, i64::MAX] {
            let message = validate_max_running(bad).err().map(|e| e.to_string());
            assert!(
                message
                    .as_deref()
                    .is_some_and(|m| m.contains("max_running") && m.contains("10000")),
                "{bad}: {message:?}"
            );
        }
        assert_eq!(validate_max_running(1).ok(), Some(1));
        assert_eq!(validate_max_running(10_000).ok(), Some(10_000));
    }
}
