//! Paused topics (`outbox_topic_pauses`, migration 0019): their due rows
//! wait in every process until resumed. Dispatchers read them on their
//! beat ([`super::processes::beat`]), so a pause takes effect within about a
//! second; a whole app is paused by suspending it ([`super::apps`]).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// A paused topic of one app.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct TopicPause {
    /// The topic.
    pub topic: String,
    /// Since when.
    pub paused_at: DateTime<Utc>,
    /// Who paused it (an account's e-mail, marked `(API key)` for a key, or
    /// `cli (<user>)`), when known.
    pub paused_by: Option<String>,
    /// Why, as the operator wrote it.
    pub reason: Option<String>,
}

/// The longest reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// Pauses `topic` of `app`; returns false when it already was (the first
/// pause's time, author and reason are kept).
pub async fn pause<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    topic: &str,
    by: Option<&str>,
    reason: Option<&str>,
) -> Result<bool, Error> {
    crate::topics::validate_shown_topic(topic)?;
    if reason.is_some_and(|r| r.chars().count() > MAX_REASON_CHARS) {
        return Err(Error::invalid(
            "reason",
            format!("is longer than {MAX_REASON_CHARS} characters"),
        ));
    }
    if let Some(reason) = reason {
        crate::topics::check_printable("reason", reason)?;
    }
    let inserted = sqlx::query(
        "INSERT INTO outbox_topic_pauses (app_id, topic, paused_by, reason)
         VALUES ($1, $2, $3, $4) ON CONFLICT (app_id, topic) DO NOTHING",
    )
    .bind(app)
    .bind(topic)
    .bind(by)
    .bind(reason)
    .execute(db)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Whether `topic` of `app` is paused now.
pub async fn is_paused<'e>(db: impl PgExecutor<'e>, app: Uuid, topic: &str) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox_topic_pauses WHERE app_id = $1 AND topic = $2)",
    )
    .bind(app)
    .bind(topic)
    .fetch_one(db)
    .await?)
}

/// Resumes `topic` of `app`; returns false when it was not paused.
pub async fn resume<'e>(db: impl PgExecutor<'e>, app: Uuid, topic: &str) -> Result<bool, Error> {
    let deleted = sqlx::query("DELETE FROM outbox_topic_pauses WHERE app_id = $1 AND topic = $2")
        .bind(app)
        .bind(topic)
        .execute(db)
        .await?
        .rows_affected();
    Ok(deleted == 1)
}

/// The paused topics of `app`, by topic.
pub async fn list<'e>(db: impl PgExecutor<'e>, app: Uuid) -> Result<Vec<TopicPause>, Error> {
    Ok(sqlx::query_as(
        "SELECT topic, paused_at, paused_by, reason FROM outbox_topic_pauses
         WHERE app_id = $1 ORDER BY topic",
    )
    .bind(app)
    .fetch_all(db)
    .await?)
}

/// How a paused (app, topic) is named in [`crate::topics::Served::paused`].
pub fn pause_key(app: Uuid, topic: &str) -> String {
    format!("{app}/{topic}")
}

/// Whether anything names `topic` of `app`: rows of it in the leader's
/// latest sample, a live process serving it by name, or dead letters of it.
/// A pause of a topic nothing names is most likely a typo, which the CLI
/// points out.
pub async fn topic_seen<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    topic: &str,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox_topic_states WHERE app_id = $1 AND topic = $2)
             OR EXISTS (SELECT 1 FROM outbox_processes
                        WHERE expires_at > now() AND $2 = ANY (topics))
             OR EXISTS (SELECT 1 FROM dead_letters WHERE app_id = $1 AND topic = $2)",
    )
    .bind(app)
    .bind(topic)
    .fetch_one(db)
    .await?)
}
