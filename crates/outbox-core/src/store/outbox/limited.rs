//! Claiming a topic with a concurrency limit (`outbox_topic_limits`,
//! migration 0020): one claim at a time per topic, at most its free slots.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::CLAIMED_COLUMNS;
use crate::Error;
use crate::model::ClaimedEvent;
use crate::store::limits::LimitedTopic;
use crate::topics::Served;

/// Claims up to the free slots of the limited topic `$4`/`$5` (at most `$1`
/// rows) for worker `$2` and a lease of `$3` seconds, among the rows the
/// [`Served`] topics `$6`–`$10` take, and records them in the limit's
/// `running`. A recorded row holds its slot while its lease is live: done,
/// retried, or left by a dead process, it frees it.
const CLAIM_LIMITED: &str = concat!(
    "WITH lim AS (
    SELECT l.max_running,
           ARRAY(SELECT r.id FROM unnest(l.running) AS r(id)
                 WHERE EXISTS (SELECT 1 FROM outbox o
                               WHERE o.id = r.id AND o.locked_until > now())) AS live
    FROM outbox_topic_limits l
    JOIN apps a ON a.id = l.app_id AND a.suspended_at IS NULL
    WHERE l.app_id = $4 AND l.topic = $5
), picked AS (
    SELECT o.ctid
    FROM outbox o
    WHERE o.app_id = $4 AND o.topic = $5
      AND ",
    claimable!(),
    "
      ",
    served_filter!("$6", "$7", "$8", "$9", "$10"),
    "
    ORDER BY o.run_at, o.id
    LIMIT coalesce((SELECT least($1, greatest(max_running - cardinality(live), 0)) FROM lim), 0)
    FOR UPDATE OF o SKIP LOCKED
), claimed AS (
",
    lease_picked!(),
    "
), recorded AS (
    UPDATE outbox_topic_limits l
    SET running = (SELECT live FROM lim) || ARRAY(SELECT id FROM claimed)
    WHERE l.app_id = $4 AND l.topic = $5 AND EXISTS (SELECT 1 FROM lim)
)
SELECT c.*, f.free
FROM (SELECT coalesce((SELECT greatest(max_running - cardinality(live), 0) FROM lim), 0) AS free) AS f
LEFT JOIN claimed AS c ON true"
);

/// What [`claim_limited`] did.
#[derive(Debug, Default)]
pub struct LimitedClaim {
    /// The rows claimed.
    pub rows: Vec<ClaimedEvent>,
    /// How many slots were free before the claim: when it is not more than
    /// were asked for, the limit, not the rows due, decided how many came.
    pub free: u32,
}

/// Claims rows of the limited topic `limited` for `worker`: at most `limit`
/// and at most its free slots, so that across every process no more of its
/// rows run at once than its limit allows. Only one process claims a
/// limited topic at a time; while another does, this returns nothing at
/// once rather than wait. Rows of a paused topic, or of a topic `served`
/// does not take, are not claimed.
///
/// Runs its own transaction: the limit's row is locked first, so the claim
/// statement's snapshot sees the leases of every claim before it.
pub async fn claim_limited(
    conn: &mut PgConnection,
    limited: &LimitedTopic,
    served: &Served,
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<LimitedClaim, Error> {
    use sqlx::{FromRow, Row};
    let mut tx = conn.begin().await?;
    let locked: Option<i32> = sqlx::query_scalar(
        "SELECT max_running FROM outbox_topic_limits
         WHERE app_id = $1 AND topic = $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(limited.app_id)
    .bind(&limited.topic)
    .fetch_optional(&mut *tx)
    .await?;
    if locked.is_none() {
        tx.commit().await?;
        return Ok(LimitedClaim::default());
    }
    let rows = sqlx::query(CLAIM_LIMITED)
        .bind(i64::from(limit.max(1)))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(limited.app_id)
        .bind(&limited.topic)
        .bind(served.all)
        .bind(&served.exact)
        .bind(&served.regexes)
        .bind(&served.excluded)
        .bind(&served.paused)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut claim = LimitedClaim {
        rows: Vec::with_capacity(rows.len()),
        free: 0,
    };
    for row in &rows {
        claim.free = u32::try_from(row.try_get::<i32, _>(CLAIMED_COLUMNS)?).unwrap_or(0);
        if row.try_get::<Option<uuid::Uuid>, _>(0)?.is_some() {
            claim.rows.push(ClaimedEvent::from_row(row)?);
        }
    }
    Ok(claim)
}
