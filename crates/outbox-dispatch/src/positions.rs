//! Where claim loops start their scans: each loop keeps its own
//! [`Positions`] and moves them on every [`ADVANCE_EVERY`]; a rewind task
//! looks from every app's first row now and then, at a bounded cost.
//!
//! Without positions, a claim scans each app from its first row, and while a
//! session holds an old snapshot that scan visits every row deleted since
//! (their index entries cannot be removed), so claims slow down for as long
//! as the snapshot is held. See `outbox_core::store::outbox::advance_positions`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use outbox_core::model::ClaimedEvent;
use outbox_core::store::outbox::{self as store, Positions};
use outbox_core::topics::Served;
use sqlx::PgExecutor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::dispatcher::Shared;
use crate::subscription::Limits;

/// How often a claim loop moves its positions on while it keeps claiming:
/// a claim walks over at most the rows finished in about this long.
pub const ADVANCE_EVERY: Duration = Duration::from_millis(100);

/// Positions stay this far behind the moment they are taken. A producer's
/// rows carry the start of its transaction as `run_at`; rows of a
/// transaction shorter than this are claimed without waiting for the next
/// advance.
pub use outbox_core::store::outbox::LATE_MARGIN;

/// A claim from past the process's claims that comes back short looks again
/// from the positions only if they were last walked longer ago than this:
/// under a steady load nearly every claim comes back short, and walking the
/// rows the process holds after each one doubled the claims.
pub const WALK_AGAIN_AFTER: Duration = Duration::from_millis(20);

/// How often the rewind task looks from every app's first row while that is
/// cheap, and the time a look may take to count as cheap.
const REWIND_EVERY: Duration = Duration::from_secs(1);
const REWIND_BUDGET: Duration = Duration::from_millis(100);
/// Looks that run over the budget space out, doubling, up to this interval;
/// a look at this interval runs to the end however long it takes. While an
/// old snapshot is held such a look reads the whole table and its index,
/// pushing the claims' pages out of shared buffers; it only matters for rows
/// moved earlier by hand, so it is rare.
const REWIND_AT_MOST: Duration = Duration::from_secs(600);

/// One claim loop's positions and when it last moved them.
///
/// Between two moves, a claim from the positions walks over every row the
/// process claimed since and still holds (its lease keeps it from being
/// claimed, and keeps the positions behind it): in a drain, several times
/// as many rows as the claim takes. So only the first claim after each
/// move starts from the positions; the next ones start past the last row
/// any of the process's claims took ([`Shared::note_claimed`]). A row that
/// becomes claimable behind that point (a lease that ran out, a claim
/// rolled back) is found by the first claim after the next move, within
/// [`ADVANCE_EVERY`], or by the claim that follows a short claim from past
/// the process's claims, at most every [`WALK_AGAIN_AFTER`]
/// ([`ClaimFrom::came_short`]). The next row of an
/// ordering key, which becomes claimable when its predecessor completes,
/// makes the next claims start from the positions
/// ([`Shared::claim_from_positions`]); so do a change of what the process
/// serves and a rewind, which also forget where the process's claims were.
#[derive(Debug, Default)]
pub(crate) struct ClaimFrom {
    positions: Positions,
    /// Where the next claim starts: the positions, or past the process's
    /// claims since.
    claim_from: Positions,
    /// Whether a claim started from the positions themselves since they
    /// were moved.
    walked: bool,
    /// Whether `claim_from` lies past the process's claims.
    from_past: bool,
    seen_walk: u64,
    /// When a claim last started from the positions themselves.
    walked_at: Option<Instant>,
    taken_at: Option<Instant>,
    seen_epoch: u64,
    seen_rewind: u64,
    seen_served: u64,
}

impl ClaimFrom {
    /// The positions to claim from, moved on first when they are older than
    /// [`ADVANCE_EVERY`], when the pacer asked for a fresh look (before a
    /// dispatcher sleeps, its last claim must see every committed row), or
    /// when the rewind task found an earlier row.
    pub(crate) async fn current<'e>(
        &mut self,
        shared: &Shared,
        db: impl PgExecutor<'e>,
    ) -> Result<&Positions, outbox_core::Error> {
        let epoch = shared.fresh_look.load(Ordering::Acquire);
        let rewind = shared.rewound_generation.load(Ordering::Acquire);
        let walk = shared.walk_generation.load(Ordering::Acquire);
        if walk != self.seen_walk {
            self.seen_walk = walk;
            self.walked = false;
        }
        let served_generation = shared.served.generation();
        let due = self.taken_at.is_none_or(|at| at.elapsed() >= ADVANCE_EVERY)
            || epoch != self.seen_epoch
            || rewind != self.seen_rewind
            || served_generation != self.seen_served;
        if due {
            // The positions passed the rows that were not served; when more
            // is served now, they start again from every app's first row.
            if served_generation != self.seen_served || rewind != self.seen_rewind {
                shared.forget_claimed();
            }
            if served_generation != self.seen_served {
                self.positions = Positions::default();
                self.seen_served = served_generation;
            }
            let from = if rewind == self.seen_rewind {
                None
            } else {
                let floor = shared
                    .rewound
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                Some(self.positions.lowered_to(&floor))
            };
            let from = from.as_ref().unwrap_or(&self.positions);
            let served = shared.served.get();
            self.positions = store::advance_positions(db, from, &served, LATE_MARGIN).await?;
            self.taken_at = Some(Instant::now());
            self.seen_epoch = epoch;
            self.seen_rewind = rewind;
            self.walked = false;
        }
        self.from_past = self.walked;
        self.claim_from = if self.walked {
            let claimed = shared
                .claimed_past
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.positions.at_least(&claimed)
        } else {
            self.walked = true;
            self.walked_at = Some(Instant::now());
            self.positions.clone()
        };
        Ok(&self.claim_from)
    }

    /// Called when a claim took fewer rows than it asked for: whether it
    /// started past the process's claims, with the positions last walked
    /// more than [`WALK_AGAIN_AFTER`] ago, so that rows behind that point
    /// may be claimable unseen. The next claim then starts from the
    /// positions, and the caller claims again before it sleeps.
    pub(crate) fn came_short(&mut self) -> bool {
        let from_past = std::mem::take(&mut self.from_past);
        let walk_again = from_past
            && self
                .walked_at
                .is_none_or(|at| at.elapsed() >= WALK_AGAIN_AFTER);
        if walk_again {
            self.walked = false;
        }
        walk_again
    }
}

/// Where one claim loop's limited claims start: positions taken over the
/// rows of the limited topics the process serves
/// ([`Shared::limited_served`]), moved on as [`ClaimFrom`]'s are (every
/// [`ADVANCE_EVERY`], on a fresh look, after a rewind). The ordinary
/// positions pass the limited topics' rows, which ordinary claims leave, so
/// limited claims cannot start from those; from their app's first row
/// instead, they would walk over every row finished since, which a held
/// snapshot keeps in the index (up to three segments' worth).
///
/// A position never passes a row that is still there, so a row whose lease
/// ran out is found again by the next claim; limited claims are few, so
/// each starts from the positions themselves.
#[derive(Debug, Default)]
pub(crate) struct LimitedFrom {
    positions: Positions,
    /// The limits the positions were taken for, and what they take.
    taken_for: Option<(Arc<Limits>, Served)>,
    taken_at: Option<Instant>,
    seen_epoch: u64,
    seen_rewind: u64,
}

impl LimitedFrom {
    /// The positions limited claims of `limits` start from, moved on first
    /// when they are due; taken afresh when the limits changed.
    pub(crate) async fn current<'e>(
        &mut self,
        shared: &Shared,
        limits: &Arc<Limits>,
        db: impl PgExecutor<'e>,
    ) -> Result<&Positions, outbox_core::Error> {
        let epoch = shared.fresh_look.load(Ordering::Acquire);
        let rewind = shared.limited_rewound_generation.load(Ordering::Acquire);
        let served = match &self.taken_for {
            Some((taken, served)) if Arc::ptr_eq(taken, limits) => served.clone(),
            _ => {
                let served = shared.limited_served(limits);
                self.taken_for = Some((limits.clone(), served.clone()));
                self.positions = Positions::default();
                self.taken_at = None;
                served
            }
        };
        let due = self.taken_at.is_none_or(|at| at.elapsed() >= ADVANCE_EVERY)
            || epoch != self.seen_epoch
            || rewind != self.seen_rewind;
        if due {
            if rewind != self.seen_rewind {
                let floor = shared
                    .limited_rewound
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                self.positions = self.positions.lowered_to(&floor);
            }
            self.positions =
                store::advance_positions(db, &self.positions, &served, LATE_MARGIN).await?;
            self.taken_at = Some(Instant::now());
            self.seen_epoch = epoch;
            self.seen_rewind = rewind;
        }
        Ok(&self.positions)
    }
}

impl Shared {
    /// Records rows a claim took, so that the next claims of the process
    /// start past them (see [`ClaimFrom`]).
    pub(crate) fn note_claimed(&self, rows: &[ClaimedEvent]) {
        if rows.is_empty() {
            return;
        }
        self.claimed_past
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .move_past(rows);
    }

    /// Makes every claim loop start its next claim from its positions (the
    /// next row of an ordering key may lie behind the process's claims).
    pub(crate) fn claim_from_positions(&self) {
        self.walk_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets where the process's claims were: what lies behind them may
    /// be claimable now (a resumed topic, a row a rewind found).
    fn forget_claimed(&self) {
        *self
            .claimed_past
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Positions::default();
    }

    /// Makes every claim loop move its positions on before its next claim:
    /// before the pacer's last look, and on a notification (whose row may
    /// lie behind the positions when its transaction began long ago).
    pub(crate) fn ask_fresh_look(&self) {
        self.fresh_look.fetch_add(1, Ordering::AcqRel);
    }

    /// The rewind of the limited topics' positions ([`LimitedFrom`]), within
    /// the same budget: their rows are not among the ordinary positions'.
    async fn rewind_limited(&self, budget: Option<Duration>) {
        let limits = self.served.limits();
        if limits.topics.is_empty() {
            return;
        }
        let served = self.limited_served(&limits);
        match store::rewind_positions(&self.pool, &served, LATE_MARGIN, budget).await {
            Ok(Some(floor)) => {
                *self
                    .limited_rewound
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = floor;
                self.limited_rewound_generation
                    .fetch_add(1, Ordering::AcqRel);
            }
            Ok(None) => {}
            Err(err) => debug!(error = %err, "could not rewind the limited claims' positions"),
        }
    }

    /// The rewind task: every [`REWIND_EVERY`] while a look from the first
    /// rows stays within [`REWIND_BUDGET`], less often while it does not
    /// (an old snapshot is held); claim loops lower their positions to what
    /// it found.
    pub(crate) async fn rewind(self: Arc<Self>, stop: CancellationToken) {
        let mut every = REWIND_EVERY;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let budget = (every < REWIND_AT_MOST).then_some(REWIND_BUDGET);
            let started = Instant::now();
            let served = self.served.get();
            match store::rewind_positions(&self.pool, &served, LATE_MARGIN, budget).await {
                Ok(Some(floor)) => {
                    *self.rewound.lock().unwrap_or_else(PoisonError::into_inner) = floor;
                    self.rewound_generation.fetch_add(1, Ordering::AcqRel);
                    self.rewind_limited(budget).await;
                    // A slow look keeps the longest interval (whatever made
                    // it slow has probably not ended); a quick one, the
                    // shortest.
                    if started.elapsed() < REWIND_BUDGET {
                        every = REWIND_EVERY;
                    }
                }
                Ok(None) => every = (every * 2).min(REWIND_AT_MOST),
                Err(err) => {
                    debug!(error = %err, "could not rewind the claim positions");
                    every = (every * 2).min(REWIND_AT_MOST);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{ClaimFrom, WALK_AGAIN_AFTER};

    #[test]
    fn a_short_claim_from_past_the_claims_walks_again_only_after_a_while() {
        let mut never_walked = ClaimFrom {
            from_past: true,
            ..ClaimFrom::default()
        };
        assert!(never_walked.came_short());
        assert!(
            !never_walked.walked,
            "the next claim starts from the positions"
        );
        assert!(!never_walked.came_short(), "that claim was not from past");

        let mut walked_just_now = ClaimFrom {
            from_past: true,
            walked: true,
            walked_at: Some(Instant::now()),
            ..ClaimFrom::default()
        };
        assert!(!walked_just_now.came_short());
        assert!(walked_just_now.walked);

        let long_ago = Instant::now().checked_sub(WALK_AGAIN_AFTER + Duration::from_millis(1));
        let mut walked_long_ago = ClaimFrom {
            from_past: true,
            walked: true,
            walked_at: long_ago,
            ..ClaimFrom::default()
        };
        assert_eq!(walked_long_ago.came_short(), long_ago.is_some());

        let mut from_the_positions = ClaimFrom::default();
        assert!(!from_the_positions.came_short());
    }
}
