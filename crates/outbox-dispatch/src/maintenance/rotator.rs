//! The rotator: empties the outbox's oldest segment with `TRUNCATE` and
//! makes it the current one, once per period, so the space of finished rows
//! comes back whether or not vacuum can run (see
//! [`outbox_core::store::segments`]).

use std::time::Duration;

use outbox_core::store::segments::{self, Rotation, RotationPolicy};
use sqlx::PgPool;
use tracing::{debug, info};

use crate::Error;

/// Rotates the outbox's segments.
#[derive(Debug, Clone)]
pub struct Rotator {
    pool: PgPool,
    policy: RotationPolicy,
}

impl Rotator {
    /// A rotator that checks every second whether a rotation is due under
    /// `policy`.
    pub fn new(pool: PgPool, policy: RotationPolicy) -> Self {
        Self { pool, policy }
    }

    /// One pass: rotates when the current segment is older than the period.
    pub async fn run_once(&self) -> Result<Rotation, Error> {
        let rotation = segments::rotate(&self.pool, self.policy).await?;
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
