//! Claiming a topic with a concurrency or rate limit (`outbox_topic_limits`,
//! migrations 0020 and 0021): one claim at a time per topic, at most its
//! free slots and its whole tokens.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::CLAIMED_COLUMNS;
use crate::Error;
use crate::model::ClaimedEvent;
use crate::store::limits::LimitedTopic;
use crate::topics::Served;

/// How long after a limit is set its claims also count the topic's rows
/// that ordinary claims leased: a few beats
/// (`outbox_dispatch::subscription::BEAT_EVERY`, a second), time for every
/// process to learn of the limit.
macro_rules! adopt_window_secs {
    () => {
        "5"
    };
}

/// [`adopt_window_secs`] as a number.
pub const ADOPT_WINDOW_SECS: u64 = 5;

/// Claims rows of the limited topic `$4`/`$5` (at most `$1`) for worker `$2`
/// and a lease of `$3` seconds, among the rows the [`Served`] topics
/// `$6`–`$10` take: no more than its free slots (concurrency limit) nor its
/// whole tokens (rate limit). Records them in the limit's `running` and
/// takes their tokens. A recorded row holds its slot while its lease is
/// live: done, retried, or left by a dead process, it frees it. The bucket
/// gains `rate_per_sec` tokens a second up to `burst`, by the clock of the
/// claim that holds the limit's lock.
///
/// For [`ADOPT_WINDOW_SECS`] after a limit is set, rows of the topic leased
/// by ordinary claims (processes that had not beaten since) count too, and
/// are recorded: they hold their slots until they end.
const CLAIM_LIMITED: &str = concat!(
    "WITH lim AS (
    SELECT l.max_running, l.rate_per_sec, c.at,
           ARRAY(SELECT unnest(",
    live_running!(),
    ")
                 UNION
                 SELECT o.id FROM outbox o
                 WHERE l.set_at > c.at - make_interval(secs => ",
    adopt_window_secs!(),
    ")
                   AND o.app_id = l.app_id AND o.topic = l.topic
                   AND o.locked_until > now()) AS live,
           least(l.burst::float8, l.tokens + l.rate_per_sec
                 * greatest(extract(epoch FROM c.at - l.refilled_at)::float8, 0)) AS tokens
    FROM outbox_topic_limits l
    JOIN apps a ON a.id = l.app_id AND a.suspended_at IS NULL
    CROSS JOIN (SELECT clock_timestamp() AS at) AS c
    WHERE l.app_id = $4 AND l.topic = $5
), allowed AS (
    SELECT least(CASE WHEN max_running IS NULL THEN $1
                      ELSE greatest(max_running - cardinality(live), 0) END,
                 coalesce(floor(tokens)::int8, $1)) AS free
    FROM lim
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
    LIMIT coalesce((SELECT least($1, free) FROM allowed), 0)
    FOR UPDATE OF o SKIP LOCKED
), claimed AS (
",
    lease_picked!(),
    "
), recorded AS (
    UPDATE outbox_topic_limits l
    SET running = CASE WHEN lim.max_running IS NULL THEN '{}'
                       ELSE lim.live || ARRAY(SELECT id FROM claimed) END,
        tokens = coalesce(lim.tokens - (SELECT count(*) FROM claimed), 0),
        refilled_at = greatest(l.refilled_at, lim.at)
    FROM lim
    WHERE l.app_id = $4 AND l.topic = $5
)
SELECT c.*, f.free, f.ready_in
FROM (SELECT coalesce((SELECT free FROM allowed), 0) AS free,
             (SELECT greatest(1 - (tokens - (SELECT count(*) FROM claimed)), 0) / rate_per_sec
              FROM lim) AS ready_in) AS f
LEFT JOIN claimed AS c ON true"
);

/// What [`claim_limited`] did.
#[derive(Debug, Default)]
pub struct LimitedClaim {
    /// The rows claimed.
    pub rows: Vec<ClaimedEvent>,
    /// How many rows the limits allowed before the claim (free slots,
    /// whole tokens): when it is not more than were asked for, the limit,
    /// not the rows due, decided how many came.
    pub free: u32,
    /// With a rate limit: how long until the bucket holds a whole token
    /// again after this claim.
    pub ready_in: Option<Duration>,
}

/// Claims rows of the limited topic `limited` for `worker`: at most `limit`,
/// its free slots and its whole tokens, so that across every process no
/// more of its rows run at once, nor start per second, than its limits
/// allow. Only one process claims a
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
    let locked: Option<bool> = sqlx::query_scalar(
        "SELECT true FROM outbox_topic_limits
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
        ..LimitedClaim::default()
    };
    for row in &rows {
        claim.free = u32::try_from(row.try_get::<i64, _>(CLAIMED_COLUMNS)?).unwrap_or(0);
        claim.ready_in = row
            .try_get::<Option<f64>, _>(CLAIMED_COLUMNS + 1)?
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok());
        if row.try_get::<Option<uuid::Uuid>, _>(0)?.is_some() {
            claim.rows.push(ClaimedEvent::from_row(row)?);
        }
    }
    Ok(claim)
}
