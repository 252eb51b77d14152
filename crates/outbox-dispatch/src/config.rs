//! Dispatcher settings and the rules that relate them.

use std::time::Duration;

use outbox_core::store::outbox::AttemptHistory;

use crate::{Error, RetryPolicy};

/// Dispatcher settings. [`Config::default`] is a sane start; [`Config::validate`]
/// checks the relations between them.
#[derive(Debug, Clone)]
pub struct Config {
    /// Written to `locked_by`, so operators can tell which process holds a row.
    pub worker_id: String,
    /// Most rows claimed by one statement.
    pub batch_size: u32,
    /// Most rows claimed and not yet completed at once (bounds handler concurrency).
    pub concurrency: usize,
    /// Claim loops running side by side, so one claim's commit overlaps the
    /// next; 0 (the default) chooses by mode ([`Config::claim_loops`]).
    pub claimers: usize,
    /// How often to look for due rows when no notification arrives (delayed
    /// rows, retries, missed notifications).
    pub poll_interval: Duration,
    /// How long a claim holds a row; a crashed worker's rows are due again after it.
    pub lease: Duration,
    /// A handler running longer than this fails the attempt. Shorter than
    /// `lease` when the heartbeat is off; with it on, the heartbeat keeps a
    /// long handler's lease alive.
    pub handler_timeout: Duration,
    /// How often running rows' leases are extended; shorter than `lease`.
    /// Zero turns the heartbeat off.
    pub heartbeat_interval: Duration,
    /// On shutdown, how long running handlers may take before their rows are
    /// released. A released row whose handler had started keeps the attempt
    /// it used, so the default outlasts `handler_timeout`: a stop then never
    /// cuts a handler short.
    pub drain_grace: Duration,
    /// Backoff and attempt limit.
    pub retry: RetryPolicy,
    /// Rows deeper in a trigger chain than this are dead-lettered, not run.
    pub max_trigger_depth: u32,
    /// Transactional mode: each claim loop deletes a batch of rows in a
    /// transaction, runs their handlers one after another inside it (see
    /// [`crate::Event::claim_tx`]) and commits; a failure rolls the batch back
    /// and its rows are run again one per transaction. One write per row
    /// instead of a lease and a delete. A process that dies mid-batch still
    /// counts an attempt for the batch's rows (see
    /// [`outbox_core::store::outbox::open_tx_batch`]).
    /// Rows with a synchronous caller and dead-letter-trigger rows are left to
    /// lease-mode dispatchers.
    pub in_transaction: bool,
    /// How many failed attempts a row keeps in its history (carried into its
    /// dead letter), and how long each error may be.
    pub attempt_history: AttemptHistory,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            batch_size: 500,
            concurrency: 2048,
            claimers: 0,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(10),
            drain_grace: Duration::from_secs(25),
            retry: RetryPolicy::default(),
            max_trigger_depth: 8,
            in_transaction: false,
            attempt_history: AttemptHistory::default(),
        }
    }
}

/// `<hostname>-<pid>-<random>`: unique per process, readable in `locked_by`.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "outboxd".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Claim loops in lease mode when `claimers` is 0. A third loop's claims
/// overlapped the other two's on two cores and skipped the rows those were
/// leasing: more server time per row, a slower p99 under load, no faster
/// drain (docs/performance.md).
const LEASE_CLAIM_LOOPS: usize = 2;

/// Claim loops in transactional mode when `claimers` is 0: a loop runs its
/// batch's handlers one after another, so more loops run more at once.
const TRANSACTIONAL_CLAIM_LOOPS: usize = 3;

impl Config {
    /// The claim loops a dispatcher runs: `claimers`, or when it is 0, 2 in
    /// lease mode and 3 in transactional mode.
    pub fn claim_loops(&self) -> usize {
        match (self.claimers, self.in_transaction) {
            (0, false) => LEASE_CLAIM_LOOPS,
            (0, true) => TRANSACTIONAL_CLAIM_LOOPS,
            (n, _) => n,
        }
    }

    /// The connections a running dispatcher opens outside its pool (see
    /// [`crate::Dispatcher::new`]).
    pub fn own_connections(&self) -> usize {
        let loops = self.claim_loops();
        let keepers = if self.in_transaction { loops } else { 0 };
        loops + keepers + 2
    }

    /// Checks the relations the dispatcher relies on; a refusal names the
    /// setting and its range.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return fail(format!(
                "batch_size {} is outside 1..=10000",
                self.batch_size
            ));
        }
        if self.concurrency == 0 {
            return fail("concurrency must be at least 1".into());
        }
        if self.in_transaction && self.concurrency != Config::default().concurrency {
            return fail(format!(
                "concurrency {} applies to lease mode only: in transactional mode each claim loop runs its batch's rows one after another; set claimers (and batch_size) instead",
                self.concurrency
            ));
        }
        if self.claimers > 16 {
            return fail(format!(
                "claimers {} is outside 0..=16 (0: by mode)",
                self.claimers
            ));
        }
        if self.heartbeat_interval.is_zero() && self.handler_timeout >= self.lease {
            return fail(format!(
                "handler_timeout ({:?}) must be shorter than lease ({:?}) when the heartbeat is off",
                self.handler_timeout, self.lease
            ));
        }
        if self.heartbeat_interval >= self.lease {
            return fail(format!(
                "heartbeat_interval ({:?}) must be shorter than lease ({:?})",
                self.heartbeat_interval, self.lease
            ));
        }
        if self.retry.max_attempts == 0 {
            return fail("retry.max_attempts must be at least 1".into());
        }
        if self.attempt_history.keep > 100 {
            return fail(format!(
                "attempt_history {} is outside 0..=100",
                self.attempt_history.keep
            ));
        }
        if self.attempt_history.keep > 0
            && !(16..=100_000).contains(&self.attempt_history.error_chars)
        {
            return fail(format!(
                "attempt_error_chars {} is outside 16..=100000",
                self.attempt_history.error_chars
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod connection_budget_tests {
    use super::Config;

    #[test]
    fn the_budget_counts_claim_loops_listen_pacer_and_keepers() {
        let lease = Config {
            claimers: 3,
            ..Config::default()
        };
        assert_eq!(lease.own_connections(), 5);
        let transactional = Config {
            claimers: 3,
            in_transaction: true,
            ..Config::default()
        };
        assert_eq!(transactional.own_connections(), 8);
    }

    #[test]
    fn claimers_zero_chooses_the_loops_by_mode_and_more_than_sixteen_is_refused() {
        let lease = Config::default();
        assert_eq!((lease.claim_loops(), lease.own_connections()), (2, 4));
        let transactional = Config {
            in_transaction: true,
            ..Config::default()
        };
        assert_eq!(
            (transactional.claim_loops(), transactional.own_connections()),
            (3, 8)
        );
        let chosen = Config {
            claimers: 5,
            in_transaction: true,
            ..Config::default()
        };
        assert_eq!(chosen.claim_loops(), 5);
        let too_many = Config {
            claimers: 17,
            ..Config::default()
        };
        let err = too_many.validate().err().map(|e| e.to_string());
        assert!(err.is_some_and(|m| m.contains("claimers 17") && m.contains("0..=16")));
    }

    #[test]
    fn concurrency_is_refused_where_it_does_not_apply() {
        let transactional = Config {
            in_transaction: true,
            concurrency: 64,
            ..Config::default()
        };
        let err = transactional.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|m| m.contains("lease mode only") && m.contains("claimers")),
            "{err:?}"
        );
        let lease = Config {
            concurrency: 64,
            ..Config::default()
        };
        assert!(lease.validate().is_ok());
    }
}
