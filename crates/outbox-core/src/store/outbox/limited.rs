//! Claiming a topic with a concurrency or rate limit (`outbox_topic_limits`,
//! migrations 0020, 0021 and 0024, its running rows and tokens in
//! `outbox_topic_limit_states`, 0033): one claim at a time per topic, at
//! most its free slots, its whole tokens, and the free slots of each
//! partition key.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

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

/// `adopt_window_secs!` as a number.
pub const ADOPT_WINDOW_SECS: u64 = 5;

/// The start of a limited claim of topic `$4`/`$5`: `lim`, the limit's row
/// with its live running rows and its refilled tokens, and `allowed`, how
/// many rows its concurrency and rate limits let start now (claims take at
/// most `$1` of them).
///
/// A missing state (a restore from a dump taken while the leader compacted
/// the states) reads as no rows recorded and a full burst.
///
/// For [`ADOPT_WINDOW_SECS`] after a limit is set, rows of the topic leased
/// by ordinary claims (processes that had not beaten since) count too, and
/// are recorded: they hold their slots until they end.
macro_rules! limited_head {
    () => {
        concat!(
            "WITH lim AS (
    SELECT l.max_running, l.max_running_per_key, l.rate_per_sec, c.at,
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
           least(l.burst::float8, coalesce(s.tokens, l.burst) + l.rate_per_sec
                 * greatest(extract(epoch FROM c.at - s.refilled_at)::float8, 0)) AS tokens
    FROM outbox_topic_limits l
    LEFT JOIN outbox_topic_limit_states s ON s.app_id = l.app_id AND s.topic = l.topic
    JOIN apps a ON a.id = l.app_id AND a.suspended_at IS NULL
    CROSS JOIN (SELECT clock_timestamp() AS at) AS c
    WHERE l.app_id = $4 AND l.topic = $5
), allowed AS (
    -- Without a limit of a kind, that kind allows any number (2^31 - 1):
    -- the caller can tell that the rows due, not a limit, ended the claim.
    SELECT least(CASE WHEN max_running IS NULL THEN 2147483647
                      ELSE greatest(max_running - cardinality(live), 0) END,
                 coalesce(floor(tokens)::int8, 2147483647)) AS free
    FROM lim
)"
        )
    };
}

/// Where a limited claim's scan starts: at the position `($12, $13)` in
/// claim order (`run_at`, `id`), or the app's first row when it is `NULL`.
/// From a position, the scan does not walk over the rows finished before
/// it, which a held snapshot keeps in the index.
macro_rules! from_position {
    () => {
        "(o.run_at, o.id) >= (coalesce($12::timestamptz, '-infinity'),
                              coalesce($13::uuid, '00000000-0000-0000-0000-000000000000'))"
    };
}

/// The end of a limited claim: leases the `picked` rows, records them in
/// the limit's state's `running` (with a concurrency limit of either kind)
/// and takes their tokens, writing the state anew if it is missing;
/// answers the rows with `free`, `ready_in`, `$held` (rows of keys at their
/// limit may be waiting) and `$cut` (rows were left because their key's
/// slots ran out in this statement).
macro_rules! limited_tail {
    ($held:expr, $cut:expr) => {
        concat!(
            ", claimed AS (
",
            lease_picked!(),
            "
), recorded AS (
    INSERT INTO outbox_topic_limit_states AS s (app_id, topic, running, tokens, refilled_at)
    SELECT $4, $5,
           CASE WHEN lim.max_running IS NULL AND lim.max_running_per_key IS NULL
                THEN '{}'
                ELSE lim.live || ARRAY(SELECT id FROM claimed) END,
           coalesce(lim.tokens - (SELECT count(*) FROM claimed), 0),
           lim.at
    FROM lim
    ON CONFLICT (app_id, topic) DO UPDATE
        SET running = excluded.running, tokens = excluded.tokens,
            refilled_at = greatest(s.refilled_at, excluded.refilled_at)
)
SELECT c.*, f.free, f.ready_in, f.held, f.cut
FROM (SELECT coalesce((SELECT free FROM allowed), 0) AS free,
             (SELECT greatest(1 - (tokens - (SELECT count(*) FROM claimed)), 0) / rate_per_sec
              FROM lim) AS ready_in,
             ",
            $held,
            " AS held,
             ",
            $cut,
            " AS cut) AS f
LEFT JOIN claimed AS c ON true"
        )
    };
}

/// Claims rows of the limited topic `$4`/`$5` (at most `$1`) for worker `$2`
/// and a lease of `$3` seconds, among the rows the [`Served`] topics
/// `$6`–`$10` take at or after `($12, $13)` in claim order (a position:
/// `NULL` starts from the app's first row): no more than its free slots (concurrency limit) nor its
/// whole tokens (rate limit). A recorded row holds its slot while its lease
/// is live: done, retried, or left by a dead process, it frees it. The
/// bucket gains `rate_per_sec` tokens a second up to `burst`, by the clock
/// of the claim that holds the limit's lock.
const CLAIM_LIMITED: &str = concat!(
    limited_head!(),
    ", picked AS (
    SELECT o.tableoid, o.ctid
    FROM outbox o
    WHERE o.app_id = $4 AND o.topic = $5
      AND ",
    from_position!(),
    "
      AND ",
    claimable!(),
    "
      ",
    served_filter!("$6", "$7", "$8", "$9", "$10"),
    "
    ORDER BY o.run_at, o.id
    LIMIT coalesce((SELECT least($1, free) FROM allowed), 0)
    FOR UPDATE OF o SKIP LOCKED
)",
    limited_tail!("false", "false")
);

/// [`CLAIM_LIMITED`] for a topic with a limit per partition key: counts the
/// live running rows by key (`busy`), reads up to `$11` due rows in order
/// without the keys at their limit (`candidates`), ranks each key's rows
/// (`ranked`: `fits` while the key has a slot free for it), and keeps the
/// rows that fit (`chosen`), in due order. Answers `cut` when rows were
/// left because their key's slots ran out in this claim: the next claim of
/// the same transaction leaves that key out of its scan
/// ([`PER_KEY_PASSES`]).
const CLAIM_LIMITED_PER_KEY: &str = concat!(
    limited_head!(),
    ", busy AS (
    SELECT r.partition_key AS key, count(*) AS running
    FROM lim, outbox r
    WHERE r.id = ANY (lim.live) AND r.partition_key IS NOT NULL
    GROUP BY r.partition_key
), candidates AS (
    SELECT o.id, o.run_at, o.partition_key
    FROM outbox o
    WHERE o.app_id = $4 AND o.topic = $5
      AND ",
    from_position!(),
    "
      AND ",
    claimable!(),
    "
      ",
    served_filter!("$6", "$7", "$8", "$9", "$10"),
    "
      AND (o.partition_key IS NULL OR o.partition_key <> ALL (ARRAY(
            SELECT b.key FROM busy b, lim WHERE b.running >= lim.max_running_per_key)))
    ORDER BY o.run_at, o.id
    LIMIT CASE WHEN coalesce((SELECT free FROM allowed), 0) > 0 THEN $11 ELSE 0 END
), ranked AS (
    SELECT c.id, c.run_at,
           c.partition_key IS NULL
           OR c.nth + coalesce(b.running, 0) <= lim.max_running_per_key AS fits
    FROM (SELECT c.*, row_number() OVER (PARTITION BY c.partition_key
                                         ORDER BY c.run_at, c.id) AS nth
          FROM candidates c) AS c
    CROSS JOIN lim
    LEFT JOIN busy b ON b.key = c.partition_key
), chosen AS (
    SELECT id FROM ranked
    WHERE fits
    ORDER BY run_at, id
    LIMIT coalesce((SELECT least($1, free) FROM allowed), 0)
), picked AS (
    SELECT o.tableoid, o.ctid
    FROM outbox o
    WHERE o.id = ANY (ARRAY(SELECT id FROM chosen))
      AND ",
    claimable!(),
    "
    FOR UPDATE OF o SKIP LOCKED
)",
    limited_tail!(
        "(EXISTS (SELECT 1 FROM ranked WHERE NOT fits)
              OR EXISTS (SELECT 1 FROM busy b, lim WHERE b.running >= lim.max_running_per_key))",
        "EXISTS (SELECT 1 FROM ranked WHERE NOT fits)"
    )
);

/// How many claim statements a claim with a limit per key makes at most,
/// in its transaction, while rows were left for a key whose slots the
/// statement filled: each next one leaves that key out of its scan, so a
/// key with many rows due does not take the whole window from the others.
const PER_KEY_PASSES: usize = 4;

/// How many due rows a claim with a limit per key reads for each row it
/// may claim, at least [`MIN_CANDIDATES`]: room for keys that have more
/// rows waiting than slots free.
const CANDIDATES_PER_ROW: i64 = 16;

/// The fewest due rows a claim with a limit per key reads.
const MIN_CANDIDATES: i64 = 256;

/// What [`claim_limited`] did.
#[derive(Debug, Default)]
pub struct LimitedClaim {
    /// The rows claimed.
    pub rows: Vec<ClaimedEvent>,
    /// How many rows the limits allowed before the claim (free slots,
    /// whole tokens; `i32::MAX` without a concurrency or rate limit): when
    /// it is not more than were asked for, the limit, not the rows due,
    /// decided how many came.
    pub free: u32,
    /// With a rate limit: how long until the bucket holds a whole token
    /// again after this claim.
    pub ready_in: Option<Duration>,
    /// With a limit per key: keys were at their limit, so rows of theirs
    /// may be waiting; they may be claimed as soon as a row of that key ends.
    pub held: bool,
}

/// Claims rows of the limited topic `limited` for `worker`: at most `limit`,
/// its free slots, its whole tokens and the free slots of each partition
/// key, so that across every process no more of its rows run at once (in
/// all or per key), nor start per second, than its limits allow. The scan
/// starts at `from`, a position of the topic's app (see
/// [`super::advance_positions`], taken for the limited topics), or at the
/// app's first row when it is `None`. Only one
/// process claims a limited topic at a time; while another does, this returns nothing at
/// once rather than wait. Rows of a paused topic, or of a topic `served`
/// does not take, are not claimed.
///
/// Runs its own transaction: the limit's row is locked first (`FOR NO KEY
/// UPDATE`, which leaves no dead version behind while a snapshot is held),
/// so the claim statement's snapshot sees the leases and the state of every
/// claim before it.
pub async fn claim_limited(
    conn: &mut PgConnection,
    limited: &LimitedTopic,
    served: &Served,
    from: Option<(Option<DateTime<Utc>>, Uuid)>,
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<LimitedClaim, Error> {
    use sqlx::{FromRow, Row};
    let mut tx = conn.begin().await?;
    // Whether the topic has a limit per key; None while another claim holds it.
    let per_key: Option<bool> = sqlx::query_scalar(
        "SELECT max_running_per_key IS NOT NULL FROM outbox_topic_limits
         WHERE app_id = $1 AND topic = $2
         FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(limited.app_id)
    .bind(&limited.topic)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(per_key) = per_key else {
        tx.commit().await?;
        return Ok(LimitedClaim::default());
    };
    let limit = i64::from(limit.max(1));
    let (statement, passes) = if per_key {
        (CLAIM_LIMITED_PER_KEY, PER_KEY_PASSES)
    } else {
        (CLAIM_LIMITED, 1)
    };
    let mut claim = LimitedClaim::default();
    for pass in 0..passes {
        let wanted = limit - claim.rows.len() as i64;
        if wanted <= 0 {
            break;
        }
        let rows = sqlx::query(statement)
            .bind(wanted)
            .bind(worker)
            .bind(lease.as_secs_f64())
            .bind(limited.app_id)
            .bind(&limited.topic)
            .bind(served.all)
            .bind(&served.exact)
            .bind(&served.regexes)
            .bind(&served.excluded)
            .bind(&served.paused)
            .bind((wanted * CANDIDATES_PER_ROW).max(MIN_CANDIDATES))
            .bind(from.and_then(|(run_at, _)| run_at))
            .bind(from.map(|(_, id)| id))
            .fetch_all(&mut *tx)
            .await?;
        let before = claim.rows.len();
        let mut cut = false;
        for row in &rows {
            if pass == 0 {
                claim.free = u32::try_from(row.try_get::<i64, _>(CLAIMED_COLUMNS)?).unwrap_or(0);
            }
            claim.ready_in = row
                .try_get::<Option<f64>, _>(CLAIMED_COLUMNS + 1)?
                .and_then(|secs| Duration::try_from_secs_f64(secs).ok());
            claim.held = row.try_get::<bool, _>(CLAIMED_COLUMNS + 2)?;
            cut = row.try_get::<bool, _>(CLAIMED_COLUMNS + 3)?;
            if row.try_get::<Option<uuid::Uuid>, _>(0)?.is_some() {
                claim.rows.push(ClaimedEvent::from_row(row)?);
            }
        }
        if !cut || claim.rows.len() == before {
            break;
        }
    }
    tx.commit().await?;
    Ok(claim)
}
