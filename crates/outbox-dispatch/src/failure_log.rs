//! What an operator reads about failures: every dead-lettered row at WARN
//! with its id, app, topic, attempts and error, and scheduled retries at
//! INFO with the error and the next run — one line per topic per window,
//! with a count of the retries it stands for, so a failing downstream under
//! load does not flood the log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outbox_core::ClaimedEvent;
use uuid::Uuid;

/// What a log line says about the row.
#[derive(Debug, Clone)]
pub(crate) struct RowFacts {
    pub id: Uuid,
    pub app_id: Uuid,
    pub topic: String,
    pub attempt: i32,
    pub max_attempts: i32,
}

impl RowFacts {
    pub fn of(row: &ClaimedEvent, default_max_attempts: u32) -> Self {
        Self {
            id: row.id,
            app_id: row.app_id,
            topic: row.topic.clone(),
            attempt: row.attempt_count,
            max_attempts: row
                .max_attempts
                .unwrap_or(i32::try_from(default_max_attempts).unwrap_or(i32::MAX)),
        }
    }
}

/// Retries logged per topic: the first of a window in full, the rest counted.
pub(crate) struct FailureLog {
    window: Duration,
    // topic → (when its window started, retries not logged in it)
    retries: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Topics tracked at most; past it the oldest windows are forgotten.
const MAX_TOPICS: usize = 1024;

impl FailureLog {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            retries: Mutex::new(HashMap::new()),
        }
    }

    /// A row moved to `dead_letters`.
    pub fn dead_lettered(&self, row: &RowFacts, error: &str) {
        tracing::warn!(
            id = %row.id,
            app_id = %row.app_id,
            topic = %outbox_core::topics::shown(&row.topic),
            attempts = row.attempt,
            max_attempts = row.max_attempts,
            error,
            "dead-lettered"
        );
    }

    /// A failed attempt that runs again after `delay`; returns whether a
    /// line was written (tests).
    pub fn retry_scheduled(&self, row: &RowFacts, error: &str, delay: Duration) -> bool {
        let now = Instant::now();
        let earlier = {
            let Ok(mut retries) = self.retries.lock() else {
                return false;
            };
            match retries.get_mut(&row.topic) {
                Some((started, suppressed)) if now.duration_since(*started) < self.window => {
                    *suppressed += 1;
                    return false;
                }
                Some((started, suppressed)) => {
                    *started = now;
                    std::mem::take(suppressed)
                }
                None => {
                    if retries.len() >= MAX_TOPICS {
                        let window = self.window;
                        retries.retain(|_, (started, _)| now.duration_since(*started) < window);
                    }
                    retries.insert(row.topic.clone(), (now, 0));
                    0
                }
            }
        };
        let next_run_at = chrono::Utc::now()
            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
        tracing::info!(
            id = %row.id,
            app_id = %row.app_id,
            topic = %outbox_core::topics::shown(&row.topic),
            attempt = row.attempt,
            max_attempts = row.max_attempts,
            error,
            next_run_at = %next_run_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            earlier_retries_of_topic = earlier,
            "retry scheduled{}",
            if earlier > 0 {
                format!(
                    " ({earlier} more retries of this topic in the last {} s not shown)",
                    self.window.as_secs()
                )
            } else {
                String::new()
            }
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(topic: &str) -> RowFacts {
        RowFacts {
            id: Uuid::now_v7(),
            app_id: Uuid::now_v7(),
            topic: topic.into(),
            attempt: 1,
            max_attempts: 5,
        }
    }

    #[test]
    fn retries_are_one_line_per_topic_per_window() {
        let log = FailureLog::new(Duration::from_millis(200));
        assert!(log.retry_scheduled(&facts("a"), "boom", Duration::from_secs(1)));
        for _ in 0..50 {
            assert!(!log.retry_scheduled(&facts("a"), "boom", Duration::from_secs(1)));
        }
        assert!(
            log.retry_scheduled(&facts("b"), "boom", Duration::from_secs(1)),
            "another topic has its own window"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert!(log.retry_scheduled(&facts("a"), "boom", Duration::from_secs(1)));
        let suppressed = log
            .retries
            .lock()
            .map(|r| r.get("a").map(|(_, n)| *n))
            .ok()
            .flatten();
        assert_eq!(suppressed, Some(0), "the count was reported and reset");
    }
}
