//! Background services besides the dispatcher, all of one shape: a
//! [`Service`] has a name, a [`Cadence`] and a `pass` that does the work
//! once and says what it did (tests step it instead of sleeping); the
//! [`Supervisor`] owns the timing, leadership and shutdown of all of them.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, stop: tokio_util::sync::CancellationToken) {
//! use outbox_dispatch::maintenance::{Replayer, Scheduler, Supervisor};
//! use std::time::Duration;
//!
//! Supervisor::new(pool.clone())
//!     .with(Scheduler::new(pool.clone(), Default::default()))
//!     .with(Replayer::new(pool, Duration::from_secs(1)))
//!     .run(stop.cancelled_owned())
//!     .await;
//! # }
//! ```

pub mod compactor;
pub mod leader;
pub mod replayer;
pub mod rotator;
pub mod sampler;
pub mod scheduler;
pub mod sweeper;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use compactor::Compactor;
pub use replayer::Replayer;
pub use rotator::Rotator;
pub use sampler::Sampler;
pub use scheduler::Scheduler;
pub use sweeper::Sweeper;

use crate::Error;

/// When work a session's lock turned away (a segment's rotation, a
/// bookkeeping table's compaction) is tried again: after a second, then
/// twice as long each time, up to a limit. Each try the lock turns away
/// stalls claims and producers for up to the lock timeout and leaves an
/// ERROR line in the server's log: a `pg_dump` of an hour made 3,600 of
/// each for the rotation alone.
#[derive(Debug, Default)]
pub(crate) struct Retry {
    next_try: Option<Instant>,
    wait: Duration,
}

impl Retry {
    /// Whether the work may be tried again at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.next_try.is_none_or(|at| now >= at)
    }

    /// Records a try that was blocked at `now`; returns the wait before the
    /// next, at most `longest`.
    pub(crate) fn blocked(&mut self, now: Instant, longest: Duration) -> Duration {
        self.wait = if self.wait.is_zero() {
            Duration::from_secs(1)
        } else {
            self.wait * 2
        }
        .min(longest);
        self.next_try = Some(now + self.wait);
        self.wait
    }

    /// Records a try that was not blocked.
    pub(crate) fn cleared(&mut self) {
        *self = Self::default();
    }
}

/// When a service's passes run.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// A pass at once, then one every interval (at a fixed rate; a pass that
    /// overruns its interval delays the next ones instead of bunching them).
    Every(Duration),
    /// A pass at each tick of a cron expression (6 fields with seconds, or 5).
    Cron(String),
}

/// What one pass did: how many things it acted on (rows enqueued, dead
/// letters replayed, rows deleted, gauges set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Things acted on.
    pub items: u64,
}

/// A background service the [`Supervisor`] runs.
pub trait Service: Send + Sync + 'static {
    /// Names the service in logs and metrics (`outboxd_maintenance_errors_total`).
    fn name(&self) -> &'static str;
    /// When its passes run.
    fn cadence(&self) -> Cadence;
    /// One pass.
    fn pass(&self) -> BoxFuture<'_, Result<Report, Error>>;
}

/// Runs services on their cadences. With leadership (the default), one
/// process at a time runs them: the elected leader (see [`leader`]); the
/// others wait and take over when it goes. The services stay correct
/// without it (`SKIP LOCKED`, idempotency keys); leadership keeps them from
/// doing the work twice.
pub struct Supervisor {
    pool: PgPool,
    services: Vec<Arc<dyn Service>>,
    leadership: bool,
    leader_retry: Duration,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.services.iter().map(|s| s.name()).collect();
        f.debug_struct("Supervisor")
            .field("services", &names)
            .field("leadership", &self.leadership)
            .finish()
    }
}

impl Supervisor {
    /// A supervisor that campaigns for leadership on `pool` every second.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            services: Vec::new(),
            leadership: true,
            leader_retry: Duration::from_secs(1),
        }
    }

    /// Adds a service.
    pub fn with(mut self, service: impl Service) -> Self {
        self.services.push(Arc::new(service));
        self
    }

    /// Runs every service in this process whatever other processes do (for
    /// `outboxd gc` on its schedule, driven by an operator).
    pub fn without_leadership(mut self) -> Self {
        self.leadership = false;
        self
    }

    /// Runs the services until `shutdown`, then waits for passes in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let stop = crate::cancelled_by(shutdown);
        let (leader, campaign) = if self.leadership {
            let (leader, task) = leader::campaign(self.pool, self.leader_retry, stop.clone());
            (Some(leader), Some(task))
        } else {
            (None, None)
        };
        let loops: Vec<_> = self
            .services
            .into_iter()
            .map(|service| tokio::spawn(run_service(service, leader.clone(), stop.clone())))
            .collect();
        for service in loops {
            let _ = service.await;
        }
        stop.cancel();
        if let Some(campaign) = campaign {
            let _ = campaign.await;
        }
    }
}

/// The one loop every service runs in: wait for the next tick of its
/// cadence, skip it while another process leads, run a pass, log a failure.
async fn run_service(
    service: Arc<dyn Service>,
    leader: Option<watch::Receiver<bool>>,
    stop: CancellationToken,
) {
    let name = service.name();
    let mut next_every = tokio::time::Instant::now();
    loop {
        let wait = match service.cadence() {
            Cadence::Every(interval) => {
                let now = tokio::time::Instant::now();
                let wait = next_every.saturating_duration_since(now);
                // The tick after this one; from now when this one is late.
                next_every = next_every.max(now) + interval;
                wait
            }
            Cadence::Cron(schedule) => {
                let now = chrono::Utc::now();
                match outbox_core::cron::next_tick(&schedule, now) {
                    Ok(tick) => (tick - now).to_std().unwrap_or(Duration::from_secs(1)),
                    Err(err) => {
                        warn!(service = name, error = %err, "schedule invalid; running hourly");
                        Duration::from_secs(3600)
                    }
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if leader.as_ref().is_some_and(|l| !*l.borrow()) {
            continue;
        }
        if let Err(err) = service.pass().await {
            metrics::counter!("outboxd_maintenance_errors_total", "service" => name).increment(1);
            warn!(service = name, error = %err, "{name} pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Retry;

    #[test]
    fn work_a_lock_turned_away_is_tried_less_and_less_often_up_to_a_limit() {
        let (mut retry, start, longest) =
            (Retry::default(), Instant::now(), Duration::from_secs(10));
        assert!(retry.due(start));
        let waits: Vec<u64> = (0..6)
            .map(|_| retry.blocked(start, longest).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert!(!retry.due(start + Duration::from_secs(9)));
        assert!(retry.due(start + Duration::from_secs(10)));
        retry.cleared();
        assert!(retry.due(start));
        assert_eq!(retry.blocked(start, longest), Duration::from_secs(1));
    }
}
