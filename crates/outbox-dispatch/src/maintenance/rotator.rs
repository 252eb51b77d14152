//! The rotator: empties the outbox's oldest segment with `TRUNCATE` and
//! makes it the current one, once per period, so the space of finished rows
//! comes back whether or not vacuum can run (see
//! [`outbox_core::store::segments`]).
//!
//! Autovacuum leaves the segments alone (migration 0034), so the rotator
//! also vacuums them while rotations stay blocked.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::store::segments::{self, Rotation, RotationPolicy};
use sqlx::PgPool;
use tracing::{debug, info, warn};

use crate::Error;

/// Blocked for this many periods, the rotator vacuums the segments.
const VACUUM_AFTER_PERIODS: u32 = 3;

/// A vacuum that leaves more dead tuples than this in the segments did not
/// help (an open snapshot keeps them): the next one waits twice as long.
const VACUUM_KEPT_DEAD: i64 = 10_000;

/// The longest wait between vacuums while rotations stay blocked: a session
/// that holds a segment often holds a snapshot too, and then a vacuum
/// scans the segments for nothing.
const VACUUM_AT_MOST_EVERY: Duration = Duration::from_secs(600);

/// Blocked passes further apart than this belong to different runs of
/// blocked rotations (the process lost leadership in between).
const SAME_RUN_WITHIN: Duration = Duration::from_secs(5);

/// A run of blocked rotations: when it was last seen, when the segments
/// are vacuumed next, and the wait after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockedRun {
    last_seen: Instant,
    vacuum_at: Instant,
    wait: Duration,
}

/// When the rotator vacuums the segments: the run of blocked rotations it is in, if any.
#[derive(Debug, Default)]
struct VacuumSchedule {
    run: Option<BlockedRun>,
}

impl VacuumSchedule {
    /// Records a pass whose rotation was `blocked` (or not) at `now`;
    /// returns whether the segments are to be vacuumed: the first time
    /// `first` into a run of blocked rotations, then after each wait.
    fn vacuum_due(&mut self, blocked: bool, now: Instant, first: Duration) -> bool {
        if !blocked {
            self.run = None;
            return false;
        }
        match self.run {
            Some(run) if now.saturating_duration_since(run.last_seen) <= SAME_RUN_WITHIN => {
                self.run = Some(BlockedRun {
                    last_seen: now,
                    ..run
                });
                now >= run.vacuum_at
            }
            _ => {
                self.run = Some(BlockedRun {
                    last_seen: now,
                    vacuum_at: now + first,
                    wait: first,
                });
                false
            }
        }
    }

    /// Records a vacuum that ended at `now` leaving `dead_left` dead
    /// tuples: the next waits as long as the last when the vacuum helped,
    /// twice as long (up to [`VACUUM_AT_MOST_EVERY`]) when it did not.
    fn vacuumed(&mut self, dead_left: i64, now: Instant) {
        if let Some(run) = &mut self.run {
            if dead_left > VACUUM_KEPT_DEAD {
                run.wait = (run.wait * 2).min(VACUUM_AT_MOST_EVERY);
            }
            run.vacuum_at = now + run.wait;
        }
    }
}

/// Rotates the outbox's segments.
#[derive(Debug, Clone)]
pub struct Rotator {
    pool: PgPool,
    policy: RotationPolicy,
    schedule: Arc<Mutex<VacuumSchedule>>,
    retry: Arc<Mutex<super::Retry>>,
}

impl Rotator {
    /// A rotator that checks every second whether a rotation is due under
    /// `policy`.
    pub fn new(pool: PgPool, policy: RotationPolicy) -> Self {
        Self {
            pool,
            policy,
            schedule: Arc::default(),
            retry: Arc::default(),
        }
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, VacuumSchedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retry(&self) -> std::sync::MutexGuard<'_, super::Retry> {
        self.retry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pass: rotates when the current segment is older than the period;
    /// a blocked rotation is tried again after a second, then less and less
    /// often, up to once a period (until then a pass answers `Blocked`
    /// without trying). While rotations stay blocked, vacuums the segments
    /// now and then; a failed vacuum is logged and does not end the pass.
    pub async fn run_once(&self) -> Result<Rotation, Error> {
        let now = Instant::now();
        if !self.retry().due(now) {
            self.vacuum_while_blocked(true).await;
            return Ok(Rotation::Blocked { moved: 0 });
        }
        let rotation = segments::rotate(&self.pool, self.policy).await?;
        let blocked = matches!(rotation, Rotation::Blocked { .. });
        let retry_in = if blocked {
            let longest = self.policy.period.max(Duration::from_secs(1));
            self.retry().blocked(now, longest)
        } else {
            self.retry().cleared();
            Duration::ZERO
        };
        self.vacuum_while_blocked(blocked).await;
        match rotation {
            Rotation::NotDue => {}
            Rotation::Rotated { segment, moved } => {
                metrics::counter!("outboxd_segment_rotations_total").increment(1);
                metrics::counter!("outboxd_segment_rows_moved_total").increment(moved);
                debug!(
                    segment = segments::TABLES[segment],
                    moved, "outbox segment rotated"
                );
            }
            Rotation::Blocked { moved } => {
                metrics::counter!("outboxd_segment_rotations_blocked_total").increment(1);
                metrics::counter!("outboxd_segment_rows_moved_total").increment(moved);
                info!(
                    moved,
                    ?retry_in,
                    "outbox segment rotation waits: a session holds the segment (a pg_dump, a \
                     reader's open transaction) or outbox_segments; trying again later"
                );
            }
        }
        Ok(rotation)
    }

    /// Records a pass whose rotation was `blocked` (or not) and vacuums the
    /// segments when a run of blocked rotations has lasted long enough.
    async fn vacuum_while_blocked(&self, blocked: bool) {
        let first = self.policy.period * VACUUM_AFTER_PERIODS;
        if self.schedule().vacuum_due(blocked, Instant::now(), first) {
            match segments::vacuum(&self.pool).await {
                Ok(dead_left) => {
                    self.schedule().vacuumed(dead_left, Instant::now());
                    metrics::counter!("outboxd_segment_vacuums_total").increment(1);
                    info!(
                        dead_left,
                        "outbox segments vacuumed: their rotation has been blocked for a while \
                         (a session holds a segment), so vacuum gives back what it can until \
                         they rotate again"
                    );
                }
                Err(err) => {
                    self.schedule().vacuumed(i64::MAX, Instant::now());
                    warn!(error = %err, "vacuum of the outbox segments failed");
                }
            }
        }
    }
}

impl super::Service for Rotator {
    fn name(&self) -> &'static str {
        "segment_rotation"
    }

    fn cadence(&self) -> super::Cadence {
        super::Cadence::Every(Duration::from_secs(1))
    }

    fn pass(&self) -> futures::future::BoxFuture<'_, Result<super::Report, Error>> {
        Box::pin(async move {
            let items = match self.run_once().await? {
                Rotation::NotDue => 0,
                Rotation::Blocked { moved } => moved,
                Rotation::Rotated { moved, .. } => moved + 1,
            };
            Ok(super::Report { items })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(30);

    /// Blocked passes once a second from `from` on: the second of the
    /// first that is due to vacuum.
    fn next_vacuum(schedule: &mut VacuumSchedule, start: Instant, from: u64) -> u64 {
        (from..from + 3600)
            .find(|s| schedule.vacuum_due(true, start + Duration::from_secs(*s), FIRST))
            .unwrap_or(u64::MAX)
    }

    #[test]
    fn a_run_of_blocked_rotations_vacuums_after_three_periods_then_backs_off_while_it_does_not_help()
     {
        let mut schedule = VacuumSchedule::default();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(next_vacuum(&mut schedule, start, 0), 30);
        // It helped: the next comes as soon.
        schedule.vacuumed(0, at(30));
        assert_eq!(next_vacuum(&mut schedule, start, 31), 60);
        // A snapshot kept what it found: twice as long, then four times.
        schedule.vacuumed(VACUUM_KEPT_DEAD + 1, at(60));
        assert_eq!(next_vacuum(&mut schedule, start, 61), 120);
        schedule.vacuumed(VACUUM_KEPT_DEAD + 1, at(120));
        assert_eq!(next_vacuum(&mut schedule, start, 121), 240);
        // Helping again keeps the longer wait.
        schedule.vacuumed(0, at(240));
        assert_eq!(next_vacuum(&mut schedule, start, 241), 360);
    }

    #[test]
    fn the_wait_stops_growing_at_ten_minutes() {
        let mut schedule = VacuumSchedule::default();
        let start = Instant::now();
        let mut second = 0;
        for _ in 0..10 {
            second = next_vacuum(&mut schedule, start, second);
            schedule.vacuumed(i64::MAX, start + Duration::from_secs(second));
            second += 1;
        }
        assert_eq!(schedule.run.map(|run| run.wait), Some(VACUUM_AT_MOST_EVERY));
    }

    #[test]
    fn a_rotation_or_a_gap_between_blocked_passes_starts_a_new_run() {
        let mut schedule = VacuumSchedule::default();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        for s in 0..20 {
            assert!(!schedule.vacuum_due(true, at(s), FIRST));
        }
        assert!(!schedule.vacuum_due(false, at(20), FIRST), "rotated");
        assert_eq!(next_vacuum(&mut schedule, start, 21), 51);
        schedule.vacuumed(i64::MAX, at(51));
        // Leadership lost for a minute: the old run's schedule is not kept.
        assert_eq!(next_vacuum(&mut schedule, start, 200), 230);
    }
}
