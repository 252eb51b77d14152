//! The rotator: empties the outbox's oldest segment with `TRUNCATE` and
//! makes it the current one, once per period, so the space of finished rows
//! comes back whether or not vacuum can run (see
//! [`outbox_core::store::segments`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::store::segments::{self, Rotation, RotationPolicy};
use sqlx::PgPool;
use tracing::{debug, info};

use crate::Error;

/// Blocked for this many periods, the rotator vacuums the segments.
const VACUUM_AFTER_PERIODS: u32 = 3;

/// While rotations stay blocked, vacuums of the segments come at doubling
/// intervals up to this: a session that holds a segment usually holds a
/// snapshot too, and then a vacuum scans the segments for nothing.
const VACUUM_AT_MOST_EVERY: Duration = Duration::from_secs(600);

/// Rotates the outbox's segments.
#[derive(Debug, Clone)]
pub struct Rotator {
    pool: PgPool,
    policy: RotationPolicy,
    /// `Some` while rotations are blocked: when the segments are vacuumed
    /// next, and the wait after that.
    blocked: Arc<Mutex<Option<(Instant, Duration)>>>,
}

impl Rotator {
    /// A rotator that checks every second whether a rotation is due under
    /// `policy`.
    pub fn new(pool: PgPool, policy: RotationPolicy) -> Self {
        Self {
            pool,
            policy,
            blocked: Arc::default(),
        }
    }

    /// One pass: rotates when the current segment is older than the period.
    /// While rotations stay blocked, vacuums the segments now and then
    /// (autovacuum leaves them to the rotation; see
    /// [`segments::vacuum`]).
    pub async fn run_once(&self) -> Result<Rotation, Error> {
        let rotation = segments::rotate(&self.pool, self.policy).await?;
        if self.vacuum_due(&rotation) {
            segments::vacuum(&self.pool).await?;
            metrics::counter!("outboxd_segment_vacuums_total").increment(1);
            info!(
                "outbox segments vacuumed: their rotation has been blocked for a while (a session \
                 holds a segment), so their space comes back by vacuum until it rotates again"
            );
        }
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
                    "outbox segment rotation waits: a session holds the segment (a pg_dump, a \
                     reader's open transaction) or outbox_segments; trying again in a second"
                );
            }
        }
        Ok(rotation)
    }

    /// Whether the segments are to be vacuumed after `rotation`: the first
    /// time [`VACUUM_AFTER_PERIODS`] periods into a run of blocked
    /// rotations, then at doubling intervals.
    fn vacuum_due(&self, rotation: &Rotation) -> bool {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(rotation, Rotation::Blocked { .. }) {
            *blocked = None;
            return false;
        }
        let now = Instant::now();
        let first = self.policy.period * VACUUM_AFTER_PERIODS;
        match *blocked {
            None => {
                *blocked = Some((now + first, first));
                false
            }
            Some((at, wait)) if now >= at => {
                let wait = (wait * 2).min(VACUUM_AT_MOST_EVERY);
                *blocked = Some((now + wait, wait));
                true
            }
            Some(_) => false,
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
