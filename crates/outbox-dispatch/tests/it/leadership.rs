//! Maintenance leadership and the supervisor: one leader at a time, a
//! hand-over when it goes, and services that run on the leader only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use outbox_dispatch::Error;
use outbox_dispatch::maintenance::{Cadence, Report, Service, Supervisor, leader};
use outbox_testkit::{TestDb, wait_until};
use tokio_util::sync::CancellationToken;

use crate::TestResult;

const RETRY: Duration = Duration::from_millis(100);

#[tokio::test]
async fn one_candidate_leads_and_another_takes_over_when_it_goes() -> TestResult {
    let db = TestDb::new().await?;
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let (a, task_a) = leader::campaign(db.pool.clone(), RETRY, stop_a.clone());
    let (b, task_b) = leader::campaign(db.pool.clone(), RETRY, stop_b.clone());
    assert!(
        wait_until(Duration::from_secs(5), || async {
            *a.borrow() || *b.borrow()
        })
        .await,
        "nobody was elected"
    );
    // Several rounds of campaigning later, still exactly one leader.
    tokio::time::sleep(RETRY * 5).await;
    assert!(*a.borrow() ^ *b.borrow(), "exactly one candidate leads");

    let (leader_stop, leader_task, follower) = if *a.borrow() {
        (stop_a, task_a, b)
    } else {
        (stop_b, task_b, a)
    };
    leader_stop.cancel();
    leader_task.await?;
    assert!(
        wait_until(Duration::from_secs(5), || async { *follower.borrow() }).await,
        "the other candidate did not take over"
    );
    Ok(())
}

/// Counts its passes.
struct Counter(Arc<AtomicU64>);

impl Service for Counter {
    fn name(&self) -> &'static str {
        "counter"
    }

    fn cadence(&self) -> Cadence {
        Cadence::Every(Duration::from_millis(20))
    }

    fn pass(&self) -> BoxFuture<'_, Result<Report, Error>> {
        Box::pin(async move {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(Report { items: 1 })
        })
    }
}

#[tokio::test]
async fn supervised_services_run_on_the_leader_only() -> TestResult {
    let db = TestDb::new().await?;
    // Another process leads: it holds the lock and keeps it.
    let outsider_stop = CancellationToken::new();
    let (outsider, outsider_task) = leader::campaign(db.pool.clone(), RETRY, outsider_stop.clone());
    assert!(wait_until(Duration::from_secs(5), || async { *outsider.borrow() }).await);

    let passes = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let supervisor = tokio::spawn(
        Supervisor::new(db.pool.clone())
            .with(Counter(passes.clone()))
            .run(stop.clone().cancelled_owned()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(passes.load(Ordering::Relaxed), 0, "a follower ran a pass");

    // The leader goes; the supervisor's process is elected and runs passes.
    outsider_stop.cancel();
    outsider_task.await?;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            passes.load(Ordering::Relaxed) >= 3
        })
        .await,
        "the new leader ran no passes"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), supervisor).await??;

    // Without leadership a service runs whoever leads.
    let other_stop = CancellationToken::new();
    let (other, other_task) = leader::campaign(db.pool.clone(), RETRY, other_stop.clone());
    assert!(wait_until(Duration::from_secs(5), || async { *other.borrow() }).await);
    let passes = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let alone = tokio::spawn(
        Supervisor::new(db.pool.clone())
            .without_leadership()
            .with(Counter(passes.clone()))
            .run(stop.clone().cancelled_owned()),
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            passes.load(Ordering::Relaxed) >= 3
        })
        .await
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), alone).await??;
    other_stop.cancel();
    other_task.await?;
    Ok(())
}
