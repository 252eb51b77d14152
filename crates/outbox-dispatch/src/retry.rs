//! Retry policy: exponential backoff with full jitter, capped.

use std::time::Duration;

/// How often and how soon a failed row runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a row is dead-lettered, for rows that do not set their own.
    pub max_attempts: u32,
    /// Backoff ceiling after the first failed attempt; doubles per attempt.
    pub base: Duration,
    /// The ceiling never grows past this.
    pub max: Duration,
    /// Draw each delay uniformly from `[0, ceiling]` ("full jitter"). Off,
    /// the delay is the ceiling itself: deterministic, for tests (the test
    /// kit), not for production, where rows that failed together would
    /// retry together.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 20,
            base: Duration::from_millis(500),
            max: Duration::from_secs(600),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the delay after failed attempt number `attempt` (1-based):
    /// `min(max, base * 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << exp.min(31))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]` ("full jitter"), so
    /// rows that failed together do not retry together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        if !self.jitter {
            return self.ceiling(attempt);
        }
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(fastrand::u64(0..=ceiling))
    }

    /// Whether a row that just failed attempt `attempt` has attempts left.
    pub fn has_attempts_left(&self, attempt: i32, row_max: Option<i32>) -> bool {
        let max = row_max.map_or(self.max_attempts as i64, i64::from);
        i64::from(attempt) < max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: true,
        };
        let ceilings: Vec<u128> = (1..=7).map(|a| p.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn backoff_stays_within_ceiling_and_spreads() {
        let p = RetryPolicy::default();
        for attempt in 1..40 {
            let d = p.backoff(attempt);
            assert!(d <= p.ceiling(attempt), "attempt {attempt}: {d:?}");
        }
        let samples: std::collections::HashSet<Duration> = (0..50).map(|_| p.backoff(8)).collect();
        assert!(samples.len() > 10, "full jitter should spread delays");
    }

    #[test]
    fn attempts_left_uses_row_limit_first() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        assert!(p.has_attempts_left(2, None));
        assert!(!p.has_attempts_left(3, None));
        assert!(p.has_attempts_left(3, Some(5)));
        assert!(!p.has_attempts_left(1, Some(1)));
    }

    #[test]
    fn without_jitter_the_delay_is_the_ceiling() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        for attempt in 1..12 {
            assert_eq!(p.backoff(attempt), p.ceiling(attempt));
        }
    }
}
