//! A lease-mode claim round with limited topics: their claims come first
//! (each its own short transaction, see
//! [`outbox_core::store::outbox::claim_limited`]), the ordinary claim takes
//! the rest. A claim loop remembers which limited topics were at their
//! limit or had nothing due, and leaves them alone for a while: a limited
//! claim costs a transaction, which a loop draining other topics should not
//! pay on every round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::ClaimedEvent;
use outbox_core::model::Lease;
use outbox_core::store::outbox as store;
use sqlx::PgConnection;
use tracing::debug;
use uuid::Uuid;

use crate::dispatcher::Shared;
use crate::positions::{ClaimFrom, LimitedFrom};
use crate::subscription::Limits;

/// How long a claim loop first leaves a limited topic alone after finding
/// all its slots taken; doubled at each further look that finds the same,
/// up to the poll interval.
const LIMITED_LOOK_AGAIN: Duration = Duration::from_millis(25);

/// One claim loop's memory of the limited topics.
#[derive(Debug, Default)]
pub(super) struct LimitedLooks {
    // Topics at their limit: until when they are left alone.
    full: HashMap<(Uuid, String), Instant>,
    // How many looks in a row found a topic at its limit with no slot free.
    strikes: HashMap<(Uuid, String), u32>,
    // Topics without due rows: until the next poll or notification.
    idle: HashMap<(Uuid, String), Instant>,
    // Topics with keys at their limit and nothing else due: until a row
    // ends or comes, or their wait is over.
    held: HashMap<(Uuid, String), Instant>,
    // The rows this loop claimed from limited topics, by id, with their
    // topic and when they were claimed: when one ends here, its topic has
    // a slot free, so it is looked at again at once. Entries older than a
    // lease (rows that failed, or ended elsewhere) are dropped.
    inflight: HashMap<Uuid, ((Uuid, String), Instant)>,
    // The limits these looks are about: new limits, a fresh start.
    seen: Option<Arc<Limits>>,
    start: usize,
    // The last ordinary claim filled its share: limited topics get half.
    ordinary_busy: bool,
    // The last limited claims filled their share: more may be due.
    more: bool,
    // Where this loop's limited claims start.
    from: LimitedFrom,
}

impl LimitedLooks {
    /// How long until a limited topic found at its limit is looked at
    /// again, when one was: its rows may be waiting.
    pub(super) fn next_look(&self) -> Option<Duration> {
        self.full
            .values()
            .chain(self.held.values())
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// The last round's limited claims took all they were offered.
    pub(super) fn more_waiting(&self) -> bool {
        self.more
    }

    /// A notification: rows came, perhaps of a topic that had none, or of
    /// a key with a slot free.
    pub(super) fn rows_came(&mut self) {
        self.idle.clear();
        self.held.clear();
    }

    /// Rows ended here: the topics they were claimed from have slots free.
    fn rows_ended(&mut self, done: &[Lease]) {
        for lease in done {
            if let Some((key, _)) = self.inflight.remove(&lease.id) {
                self.full.remove(&key);
                self.held.remove(&key);
                self.strikes.remove(&key);
            }
        }
    }

    /// How many of `wanted` the limited topics are offered: all, unless the
    /// ordinary claim also has work, then half (turn about with one).
    fn share(&mut self, wanted: usize) -> usize {
        if !self.ordinary_busy {
            wanted
        } else if wanted > 1 {
            wanted - wanted / 2
        } else {
            self.start = self.start.wrapping_add(1);
            self.start % 2
        }
    }
}

impl Shared {
    /// One claim: completes `done`, claims the limited topics' share of
    /// `wanted`, then ordinary rows for the rest. Neither side starves the
    /// other: limited rows are bounded by their limits, and while ordinary
    /// rows are waiting the limited ones get half of each round.
    pub(super) async fn claim_round(
        &self,
        conn: &mut PgConnection,
        from: &mut ClaimFrom,
        looks: &mut LimitedLooks,
        done: &[Lease],
        wanted: usize,
    ) -> Result<(usize, Vec<ClaimedEvent>), outbox_core::Error> {
        let config = &self.config;
        let limits = self.served.limits();
        let mut done = done;
        let mut completed = 0;
        let mut rows = Vec::new();
        looks.more = false;
        if !limits.topics.is_empty() {
            // Finished rows give their slots back before the limits are counted.
            looks.rows_ended(done);
            completed += store::complete(&mut *conn, done).await?.len();
            done = &[];
            let share = looks.share(wanted);
            if share > 0 {
                rows = self.claim_limited(conn, &limits, looks, share).await?;
                looks.more = rows.len() == share;
            }
        }
        let rest = wanted - rows.len();
        if rest == 0 {
            completed += store::complete(&mut *conn, done).await?.len();
            looks.ordinary_busy = true;
            return Ok((completed, rows));
        }
        let positions = from.current(self, &mut *conn).await?;
        let (done_now, more) = store::complete_and_claim(
            conn,
            positions,
            &self.served.get(),
            done,
            &config.worker_id,
            rest as u32,
            config.lease,
        )
        .await?;
        looks.ordinary_busy = more.len() == rest;
        self.note_claimed(&more);
        rows.extend(more);
        Ok((completed + done_now, rows))
    }

    /// Claims up to `wanted` rows of the limited topics this process
    /// serves, each within its limits. A topic found at its concurrency
    /// limit (or with keys at theirs) is left alone for [`LIMITED_LOOK_AGAIN`] (doubling up to the
    /// poll interval), one at its rate limit until its next token, one
    /// without due rows until the next poll or notification.
    async fn claim_limited(
        &self,
        conn: &mut PgConnection,
        limits: &Arc<Limits>,
        looks: &mut LimitedLooks,
        wanted: usize,
    ) -> Result<Vec<ClaimedEvent>, outbox_core::Error> {
        let poll = self.config.poll_interval;
        if !looks.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, limits)) {
            looks.full.clear();
            looks.idle.clear();
            looks.held.clear();
            looks.strikes.clear();
            looks.seen = Some(limits.clone());
        }
        let now = Instant::now();
        looks.full.retain(|_, until| *until > now);
        looks.idle.retain(|_, until| *until > now);
        looks.held.retain(|_, until| *until > now);
        let lease = self.config.lease;
        looks
            .inflight
            .retain(|_, (_, claimed)| now.saturating_duration_since(*claimed) < lease);
        let mut rows = Vec::new();
        let count = limits.topics.len();
        // Each round starts at the next topic, so none is always last.
        looks.start = looks.start.wrapping_add(1);
        for i in 0..count {
            let topic = &limits.topics[(looks.start + i) % count];
            let asked = wanted - rows.len();
            if asked == 0 {
                break;
            }
            if !self.serves(limits, topic) {
                continue;
            }
            let key = (topic.app_id, topic.topic.clone());
            if looks.full.contains_key(&key)
                || looks.idle.contains_key(&key)
                || looks.held.contains_key(&key)
            {
                continue;
            }
            // Taken only when a topic is claimed: a loop whose limited
            // topics are all full or idle pays nothing for them. Positions
            // only save work: when they cannot be moved on, the claim
            // starts from the app's first row rather than fail the round
            // (and drop the rows its earlier claims leased).
            let position = match looks.from.current(self, limits, &mut *conn).await {
                Ok(positions) => positions.of(topic.app_id),
                Err(err) => {
                    debug!(error = %err, "could not move the limited claims' positions on");
                    None
                }
            };
            let claim = store::claim_limited(
                &mut *conn,
                topic,
                &limits.served,
                position,
                &self.config.worker_id,
                asked as u32,
                self.config.lease,
            )
            .await?;
            let (free, got) = (claim.free as usize, claim.rows.len());
            for row in &claim.rows {
                looks.inflight.insert(row.id, (key.clone(), now));
            }
            let at_limit = free <= asked && got == free;
            if at_limit || (claim.held && got < asked) {
                // At its limit, or with keys at theirs: a slot frees when
                // another row ends (at once when it ends here; looked for
                // more rarely while none does), a token comes when its
                // time comes.
                let strikes = looks.strikes.entry(key.clone()).or_default();
                *strikes = if got == 0 { *strikes + 1 } else { 0 };
                let wait = match claim.ready_in.filter(|w| !w.is_zero()) {
                    Some(token) => token,
                    None => LIMITED_LOOK_AGAIN.saturating_mul(1 << (*strikes).min(10)),
                };
                if at_limit {
                    looks.full.insert(key, now + wait.min(poll));
                } else {
                    looks.held.insert(key, now + wait.min(poll));
                }
            } else {
                looks.strikes.remove(&key);
                if got < asked {
                    looks.idle.insert(key, now + poll);
                }
            }
            rows.extend(claim.rows);
        }
        Ok(rows)
    }
}
