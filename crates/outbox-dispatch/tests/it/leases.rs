use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::NewEvent;
use outbox_core::store::outbox as store;
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use outbox_testkit::{TestDb, wait_until};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{Calls, TestResult, config, enqueue_committed, payload, recording, spawn_run};

#[tokio::test]
async fn expired_lease_is_reclaimed_and_the_stale_worker_is_fenced() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let id = enqueue_committed(&db.pool, app, NewEvent::new("t", payload(1))).await?;

    let stale = store::claim(&db.pool, "worker-a", 10, Duration::from_millis(300)).await?;
    assert_eq!(stale.len(), 1);
    assert!(
        store::claim(&db.pool, "worker-b", 10, Duration::from_secs(30))
            .await?
            .is_empty(),
        "a leased row is not claimable"
    );

    // Worker A stalls past its lease; B takes the row over.
    let mut taken = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while taken.is_empty() && tokio::time::Instant::now() < deadline {
        taken = store::claim(&db.pool, "worker-b", 10, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!taken.is_empty(), "expired lease was not reclaimed");
    let fresh = &taken[0];
    assert_eq!(fresh.id, id);
    assert_eq!(fresh.attempt_count, 2, "attempts are counted at claim");
    assert!(fresh.lease_token > stale[0].lease_token);

    // A wakes up: completing, retrying, heartbeating or dead-lettering with its
    // old token changes nothing.
    assert!(
        store::complete(&db.pool, &[stale[0].lease()])
            .await?
            .is_empty()
    );
    let retry = store::Reschedule {
        lease: stale[0].lease(),
        delay: Duration::ZERO,
        error: Some("late".into()),
        refund_attempt: false,
    };
    assert!(
        store::reschedule(&db.pool, &[retry], store::AttemptHistory::default())
            .await?
            .is_empty()
    );
    assert!(
        store::heartbeat(&db.pool, &[stale[0].lease()], Duration::from_secs(60))
            .await?
            .is_empty()
    );
    let bury = store::ToDeadLetter {
        lease: stale[0].lease(),
        error: "late".into(),
        handler: None,
    };
    let mut conn = db.pool.acquire().await?;
    assert!(
        store::dead_letter(&mut *conn, &[bury], store::AttemptHistory::default())
            .await?
            .is_empty()
    );
    assert_eq!(crate::dead_letter_count(&db.pool).await?, 0);
    let (locked_by, last_error): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT locked_by, last_error FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(locked_by.as_deref(), Some("worker-b"));
    assert_eq!(last_error, None);

    // B, holding the current token, completes.
    assert_eq!(store::complete(&db.pool, &[fresh.lease()]).await?, vec![id]);
    Ok(())
}

#[tokio::test]
async fn a_row_whose_workers_keep_dying_is_dead_lettered_after_max_attempts() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let id = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("t", payload(1)).with_max_attempts(2),
    )
    .await?;
    // Two workers claim it and die (their leases simply expire).
    for worker in ["dies-1", "dies-2"] {
        let rows = store::claim(&db.pool, worker, 1, Duration::from_millis(1)).await?;
        assert_eq!(rows.len(), 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let report = dispatcher.run_until_idle().await?;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(calls.of(id), 0, "the third claim must not run the handler");
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("did not finish"))
    );
    Ok(())
}

#[tokio::test]
async fn heartbeat_keeps_a_long_handler_leased() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.register("long", |_e: Event| async {
        tokio::time::sleep(Duration::from_millis(900)).await;
        Ok::<(), HandlerError>(())
    });
    let mut cfg = config();
    cfg.lease = Duration::from_secs(1);
    cfg.heartbeat_interval = Duration::from_millis(200);
    // The handler outlives the lease (1 s) but not its timeout; only the
    // heartbeat keeps the row from being taken over meanwhile.
    cfg.handler_timeout = Duration::from_millis(950);
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, cfg)?;
    let id = enqueue_committed(&db.pool, app, NewEvent::new("long", payload(1))).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        let d = dispatcher.clone();
        async move { d.run(async move { stop.cancelled().await }).await }
    });
    let first_until = wait_and_read_lease(&db, id).await?;
    let extended = wait_until(Duration::from_secs(3), || async {
        let until: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT locked_until FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await
                .ok()
                .flatten()
                .flatten();
        until.is_some_and(|u| u > first_until)
    })
    .await;
    stop.cancel();
    run.await??;
    assert!(extended, "the heartbeat did not extend the lease");
    Ok(())
}

async fn wait_and_read_lease(
    db: &TestDb,
    id: uuid::Uuid,
) -> Result<chrono::DateTime<chrono::Utc>, Box<dyn std::error::Error>> {
    for _ in 0..300 {
        let until: Option<Option<chrono::DateTime<chrono::Utc>>> =
            sqlx::query_scalar("SELECT locked_until FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await?;
        if let Some(Some(until)) = until {
            return Ok(until);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("row was never claimed".into())
}

#[tokio::test]
async fn drain_finishes_quick_work_and_releases_the_rest() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let started = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    registry.register("quick", |_e: Event| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<(), HandlerError>(())
    });
    let counter = started.clone();
    registry.register("stuck", move |_e: Event| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<(), HandlerError>(())
        }
    });
    let mut cfg = config();
    cfg.drain_grace = Duration::from_millis(500);
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, cfg)?;
    for n in 0..3 {
        enqueue_committed(&db.pool, app, NewEvent::new("stuck", payload(n))).await?;
    }
    let stop = CancellationToken::new();
    let run = spawn_run(dispatcher, &stop);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            started.load(Ordering::SeqCst) == 3
        })
        .await
    );
    let quick = enqueue_committed(&db.pool, app, NewEvent::new("quick", payload(9))).await?;
    // Give the quick row time to be claimed, then signal.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, bool>("SELECT locked_by IS NOT NULL FROM outbox WHERE id = $1")
                .bind(quick)
                .fetch_optional(&db.pool)
                .await
                .ok()
                .flatten()
                .unwrap_or(true)
        })
        .await
    );
    stop.cancel();
    let report = run.await??;
    assert_eq!(
        report.released, 3,
        "stuck rows are released after the grace period"
    );
    assert_eq!(
        store::count_leased(&db.pool).await?,
        0,
        "no leased row left behind"
    );
    assert_eq!(
        store::count(&db.pool).await?,
        3,
        "the quick row finished, the stuck ones wait"
    );
    let due: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE run_at <= now() AND locked_by IS NULL",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        due, 3,
        "released rows are due at once for another dispatcher"
    );
    Ok(())
}

#[tokio::test]
async fn complete_and_claim_deletes_only_current_leases_and_reports_the_count() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    for n in 0..3 {
        enqueue_committed(&db.pool, app, NewEvent::new("t", payload(n))).await?;
    }
    let first = store::claim(&db.pool, "w", 2, Duration::from_secs(30)).await?;
    assert_eq!(first.len(), 2);
    let mut stale = first[1].lease();
    stale.token -= 1;
    // One current lease, one stale token: only the current one is deleted, and
    // the third row is claimed in the same statement.
    let (completed, claimed) = store::complete_and_claim(
        &db.pool,
        &store::Positions::default(),
        &outbox_core::topics::Served::everything(),
        &[first[0].lease(), stale],
        "w",
        10,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(completed, 1);
    assert_eq!(claimed.len(), 1);
    assert_ne!(
        claimed[0].id, first[1].id,
        "a leased row is not claimed again"
    );
    // Nothing left to claim: the count still arrives.
    let (completed, claimed) = store::complete_and_claim(
        &db.pool,
        &store::Positions::default(),
        &outbox_core::topics::Served::everything(),
        &[first[1].lease(), claimed[0].lease()],
        "w",
        10,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!((completed, claimed.len()), (2, 0));
    assert_eq!(store::count(&db.pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_heartbeat_skips_rows_another_statement_holds_instead_of_waiting() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    for n in 0..2 {
        enqueue_committed(&db.pool, app, NewEvent::new("t", payload(n))).await?;
    }
    let claimed = store::claim(&db.pool, "worker-a", 10, Duration::from_secs(30)).await?;
    assert_eq!(claimed.len(), 2);
    let leases: Vec<_> = claimed.iter().map(|r| r.lease()).collect();

    // A completion of the first row is under way in another transaction. A
    // heartbeat that waited for it could deadlock with a completion locking
    // the same rows in the other order; it must extend the free row and move on.
    let mut completing = db.pool.begin().await?;
    sqlx::query("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE")
        .bind(claimed[0].id)
        .execute(&mut *completing)
        .await?;
    let kept = tokio::time::timeout(
        Duration::from_secs(5),
        store::heartbeat(&db.pool, &leases, Duration::from_secs(60)),
    )
    .await
    .map_err(|_| "the heartbeat waited on a locked row")??;
    assert_eq!(kept, vec![claimed[1].id]);
    completing.rollback().await?;

    // Once the row is free, the next beat extends it again.
    let kept = store::heartbeat(&db.pool, &leases, Duration::from_secs(60)).await?;
    assert_eq!(kept.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_head_of_leased_rows_never_strands_the_due_rows_behind_it() -> TestResult {
    use std::time::Duration;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let events: Vec<outbox_core::NewEvent> = (0..200)
        .map(|n| outbox_core::NewEvent::new("t", json!({ "n": n })))
        .collect();
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    // The oldest 150 rows are leased (a busy or dead worker holds them).
    let held =
        outbox_core::store::outbox::claim(&db.pool, "busy", 150, Duration::from_secs(60)).await?;
    assert_eq!(held.len(), 150);
    // A claim of 10 skips the leased head and gets rows behind it.
    let next =
        outbox_core::store::outbox::claim(&db.pool, "other", 10, Duration::from_secs(60)).await?;
    assert_eq!(next.len(), 10);
    assert!(next.iter().all(|r| held.iter().all(|h| h.id != r.id)));
    Ok(())
}

/// Claims start past the rows the process took since its positions last
/// moved; rows behind that point whose lease runs out (a crashed worker's)
/// are still claimed while new rows keep coming in.
#[tokio::test]
async fn a_dead_workers_rows_are_claimed_while_later_rows_keep_coming() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut early = Vec::new();
    for n in 0..5 {
        early.push(enqueue_committed(&db.pool, app, NewEvent::new("t", payload(n))).await?);
    }
    let dead = store::claim(&db.pool, "dead-worker", 10, Duration::from_millis(800)).await?;
    assert_eq!(dead.len(), 5);
    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let stop = CancellationToken::new();
    let run = spawn_run(dispatcher, &stop);
    let producing = CancellationToken::new();
    let producer = tokio::spawn({
        let (pool, producing) = (db.pool.clone(), producing.clone());
        async move {
            let mut n = 100;
            while !producing.is_cancelled() {
                enqueue_committed(&pool, app, NewEvent::new("t", payload(n))).await?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, outbox_core::Error>(())
        }
    });
    let handled = wait_until(Duration::from_secs(10), || async {
        early.iter().all(|id| calls.of(*id) == 1)
    })
    .await;
    producing.cancel();
    producer.await??;
    stop.cancel();
    run.await??;
    assert!(handled, "a dead worker's rows waited behind the claims");
    Ok(())
}
