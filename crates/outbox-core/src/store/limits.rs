//! Limits per topic (`outbox_topic_limits`, migrations 0020, 0021 and
//! 0024): at most `max_running` rows of the topic run at once, at most
//! `max_running_per_key` of them per partition key, and at most
//! `rate_per_sec` start per second (bursts of up to `burst`), across every
//! process. What the claims keep (the running rows, the tokens) lives in
//! `outbox_topic_limit_states` (migration 0033), which the leader may
//! compact; the settings change only when an operator changes them.
//! Dispatchers read the limits on their beat
//! ([`super::processes::beat`]), claim limited topics apart from the others
//! ([`super::outbox::claim_limited`]), and a dead process's slots come back
//! when its leases expire.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// The highest concurrency limit accepted.
pub const MAX_RUNNING: i32 = 10_000;

/// The highest rate limit accepted, in rows per second.
pub const MAX_RATE_PER_SEC: f64 = 100_000.0;

/// The lowest rate limit accepted, in rows per second: one row in about 17
/// minutes. A slower topic is better paused.
pub const MIN_RATE_PER_SEC: f64 = 0.001;

/// The largest burst accepted.
pub const MAX_BURST: i32 = 100_000;

/// A topic of one app that has a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitedTopic {
    /// The app.
    pub app_id: Uuid,
    /// The topic.
    pub topic: String,
}

/// A topic's limits, as operators see them.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct TopicLimit {
    /// The topic.
    pub topic: String,
    /// At most this many of its rows run at once, across every process.
    pub max_running: Option<i32>,
    /// At most this many of its rows with one partition key run at once.
    pub max_running_per_key: Option<i32>,
    /// At most this many of its rows start per second, across every process.
    pub rate_per_sec: Option<f64>,
    /// With a rate: how many may start at once after a quiet spell.
    pub burst: Option<i32>,
    /// How many hold a slot of its concurrency limit now (0 without one).
    pub running: i64,
    /// When the limits were last set.
    pub set_at: DateTime<Utc>,
    /// Who set them (a user's email or an API key's name), when known.
    pub set_by: Option<String>,
}

/// The limits to set on a topic: a concurrency limit (in all, per
/// partition key, or both), a rate limit, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// At most this many rows at once (1 to [`MAX_RUNNING`]).
    pub max_running: Option<i64>,
    /// At most this many rows of one partition key at once (1 to
    /// [`MAX_RUNNING`]); 1 runs each key's rows one at a time.
    pub max_running_per_key: Option<i64>,
    /// At most this many starts per second ([`MIN_RATE_PER_SEC`] to [`MAX_RATE_PER_SEC`]).
    pub rate_per_sec: Option<f64>,
    /// With a rate: how many may start at once after a quiet spell (1 to
    /// [`MAX_BURST`]; by default one second's worth, at least 1).
    pub burst: Option<i64>,
}

/// [`Limits`] checked: what [`set`] writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidLimits {
    max_running: Option<i32>,
    max_running_per_key: Option<i32>,
    rate: Option<(f64, i32)>,
}

impl Limits {
    /// Refuses limits out of range, or none at all, naming the field and the range.
    pub fn validate(&self) -> Result<ValidLimits, Error> {
        let max_running = self.max_running.map(validate_max_running).transpose()?;
        let max_running_per_key = self
            .max_running_per_key
            .map(|n| in_range("max_running_per_key", n, 1..=MAX_RUNNING))
            .transpose()?;
        let rate = match (self.rate_per_sec, self.burst) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "burst",
                    "applies to a rate limit; give rate_per_sec too",
                ));
            }
            (Some(rate), burst) => {
                if !(MIN_RATE_PER_SEC..=MAX_RATE_PER_SEC).contains(&rate) {
                    return Err(Error::invalid(
                        "rate_per_sec",
                        format!(
                            "is {rate}; it must be between {MIN_RATE_PER_SEC} and {MAX_RATE_PER_SEC}"
                        ),
                    ));
                }
                let burst = match burst {
                    Some(b) => in_range("burst", b, 1..=MAX_BURST)?,
                    // One second's worth; `rate` is at most MAX_BURST.
                    None => (rate.ceil() as i32).clamp(1, MAX_BURST),
                };
                Some((rate, burst))
            }
        };
        if max_running.is_none() && max_running_per_key.is_none() && rate.is_none() {
            return Err(Error::invalid(
                "limits",
                "none given: give max_running, max_running_per_key or rate_per_sec (a concurrency limit, a rate limit, or both)",
            ));
        }
        Ok(ValidLimits {
            max_running,
            max_running_per_key,
            rate,
        })
    }
}

/// Refuses a concurrency limit outside `1..=MAX_RUNNING`, naming the field.
pub fn validate_max_running(max_running: i64) -> Result<i32, Error> {
    in_range("max_running", max_running, 1..=MAX_RUNNING)
}

/// `value` as an `i32` when `range` holds it; else an error naming `field`
/// and the range.
fn in_range(
    field: &'static str,
    value: i64,
    range: std::ops::RangeInclusive<i32>,
) -> Result<i32, Error> {
    i32::try_from(value)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            Error::invalid(
                field,
                format!(
                    "is {value}; it must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// Sets the limits of `topic` of `app`, replacing any it had. A new
/// concurrency limit counts the rows of the topic that are running already;
/// a new rate limit starts with a full burst. Processes honour them from
/// their next beat, within about a second.
pub async fn set<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    topic: &str,
    limits: &Limits,
    by: Option<&str>,
) -> Result<ValidLimits, Error> {
    crate::topics::validate_shown_topic(topic)?;
    let valid = limits.validate()?;
    sqlx::query(
        "WITH before AS (
             -- Locked, so that a concurrent change is waited for and read.
             SELECT rate_per_sec FROM outbox_topic_limits WHERE app_id = $1 AND topic = $2
             FOR NO KEY UPDATE
         ), limit_row AS (
             INSERT INTO outbox_topic_limits
                 (app_id, topic, max_running, rate_per_sec, burst, set_by, max_running_per_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (app_id, topic) DO UPDATE
                 SET max_running = excluded.max_running, rate_per_sec = excluded.rate_per_sec,
                     burst = excluded.burst, max_running_per_key = excluded.max_running_per_key,
                     set_by = excluded.set_by, set_at = now()
             RETURNING app_id, topic
         )
         INSERT INTO outbox_topic_limit_states AS s (app_id, topic, running, tokens)
         SELECT app_id, topic,
                ARRAY(SELECT id FROM outbox
                      WHERE app_id = $1 AND topic = $2 AND locked_until > now()),
                coalesce($5, 0)
         FROM limit_row
         ON CONFLICT (app_id, topic) DO UPDATE
             -- A topic that had only a rate limit recorded nothing: count
             -- its running rows too (and keep any a concurrent claim added).
             SET running = ARRAY(SELECT DISTINCT unnest(s.running || excluded.running)),
                 tokens = CASE WHEN (SELECT rate_per_sec FROM before) IS NULL
                               THEN excluded.tokens
                               ELSE least(s.tokens, excluded.tokens) END",
    )
    .bind(app)
    .bind(topic)
    .bind(valid.max_running)
    .bind(valid.rate.map(|(r, _)| r))
    .bind(valid.rate.map(|(_, b)| b))
    .bind(by)
    .bind(valid.max_running_per_key)
    .execute(db)
    .await?;
    Ok(valid)
}

impl ValidLimits {
    /// The concurrency limit.
    pub fn max_running(&self) -> Option<i32> {
        self.max_running
    }

    /// The concurrency limit per partition key.
    pub fn max_running_per_key(&self) -> Option<i32> {
        self.max_running_per_key
    }

    /// The rate limit and its burst.
    pub fn rate(&self) -> Option<(f64, i32)> {
        self.rate
    }
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
    Ok(sqlx::query_as(concat!(
        "SELECT l.topic, l.max_running, l.max_running_per_key, l.rate_per_sec, l.burst, l.set_at, l.set_by,
                    cardinality(",
        live_running!(),
        ")::int8 AS running
             FROM outbox_topic_limits l
             LEFT JOIN outbox_topic_limit_states s ON s.app_id = l.app_id AND s.topic = l.topic
             WHERE l.app_id = $1 ORDER BY l.topic"
    ))
    .bind(app)
    .fetch_all(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(limits: Limits) -> String {
        limits
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

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
        for bad in [0, -3, 10_001] {
            let m = refused(Limits {
                max_running_per_key: Some(bad),
                ..Limits::default()
            });
            assert!(
                m.contains("max_running_per_key") && m.contains("10000"),
                "{bad}: {m}"
            );
        }
        for rate in [
            0.0,
            1e-300,
            0.0009,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            100_000.5,
        ] {
            let m = refused(Limits {
                rate_per_sec: Some(rate),
                ..Limits::default()
            });
            assert!(
                m.contains("rate_per_sec") && m.contains("100000"),
                "{rate}: {m}"
            );
        }
        for burst in [0, -5, 100_001] {
            let m = refused(Limits {
                rate_per_sec: Some(5.0),
                burst: Some(burst),
                ..Limits::default()
            });
            assert!(m.contains("burst") && m.contains("100000"), "{burst}: {m}");
        }
        assert!(refused(Limits::default()).contains("rate_per_sec"));
        assert!(
            refused(Limits {
                burst: Some(3),
                max_running: Some(1),
                ..Limits::default()
            })
            .contains("burst")
        );
    }

    #[test]
    fn a_rate_without_a_burst_bursts_one_seconds_worth() -> Result<(), Error> {
        let rate = |r: f64| {
            Limits {
                rate_per_sec: Some(r),
                ..Limits::default()
            }
            .validate()
            .map(|v| v.rate())
        };
        assert_eq!(rate(20.0)?, Some((20.0, 20)));
        assert_eq!(rate(0.5)?, Some((0.5, 1)));
        assert_eq!(rate(2.5)?, Some((2.5, 3)));
        Ok(())
    }
}
