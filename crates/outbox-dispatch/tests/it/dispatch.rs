use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{NewEvent, enqueue_batch};
use outbox_dispatch::{Config, Dispatcher, Event, HandlerError, Registry, RetryPolicy};
use outbox_testkit::{TestDb, wait_until};
use tokio_util::sync::CancellationToken;

use crate::{
    Calls, TestResult, config, dead_letter_count, enqueue_committed, make_all_due, payload,
    recording, spawn_run,
};

#[tokio::test]
async fn committed_event_is_handled_exactly_once() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let ids = [
        enqueue_committed(&db.pool, app, NewEvent::new("t", payload(1))).await?,
        enqueue_committed(&db.pool, app, NewEvent::new("t", payload(2))).await?,
    ];
    let report = dispatcher.run_until_idle().await?;
    assert_eq!(report.claimed, 2);
    assert_eq!(report.completed, 2);
    for id in ids {
        assert_eq!(calls.of(id), 1);
    }
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);
    assert_eq!(dead_letter_count(&db.pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn retries_back_off_within_a_growing_capped_ceiling() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let policy = RetryPolicy {
        max_attempts: 10,
        base: Duration::from_secs(10),
        max: Duration::from_secs(40),
        jitter: true,
    };
    let mut cfg = config();
    cfg.retry = policy;
    let dispatcher = recording(&db, "t", &calls, |_| Err(HandlerError::retry("boom")), cfg);
    let id = enqueue_committed(&db.pool, app, NewEvent::new("t", payload(1))).await?;
    for attempt in 1..=6u32 {
        let report = dispatcher.run_once().await?;
        assert_eq!(report.retried, 1, "attempt {attempt}");
        let (delay, attempts, error): (f64, i32, Option<String>) = sqlx::query_as(
            "SELECT extract(epoch FROM run_at - now())::float8, attempt_count, last_error FROM outbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
        let ceiling = policy.ceiling(attempt).as_secs_f64();
        assert!(
            delay <= ceiling + 0.5,
            "attempt {attempt}: delay {delay} above ceiling {ceiling}"
        );
        assert!(
            delay >= -0.5,
            "attempt {attempt}: delay {delay} in the past"
        );
        assert_eq!(attempts, attempt as i32);
        assert_eq!(error.as_deref(), Some("boom"));
        make_all_due(&db.pool).await?;
    }
    assert_eq!(policy.ceiling(6), Duration::from_secs(40), "capped");
    assert_eq!(calls.of(id), 6);
    Ok(())
}

#[tokio::test]
async fn exhaustion_moves_the_row_to_exactly_one_dead_letter() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(
        &db,
        "t",
        &calls,
        |_| Err(HandlerError::retry("smtp down")),
        config(),
    );
    let id = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("t", payload(1)).with_max_attempts(3),
    )
    .await?;
    for _ in 0..10 {
        dispatcher.run_once().await?;
        make_all_due(&db.pool).await?;
    }
    assert_eq!(calls.of(id), 3, "max_attempts bounds the handler calls");
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempt_count, 3);
    assert_eq!(dead[0].topic, "t");
    assert_eq!(dead[0].payload, payload(1));
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("smtp down"))
    );
    assert!(dead[0].resolution.is_none() && dead[0].resolved_at.is_none());
    // Every attempt is in the dead letter's history, run by this process.
    let attempts = dead[0].attempts.clone().ok_or("no attempt history")?;
    let numbers: Vec<i32> = attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, [1, 2, 3]);
    let worker = dispatcher.config().worker_id.clone();
    for a in &attempts {
        assert_eq!(a.worker.as_deref(), Some(worker.as_str()));
        assert!(a.error.as_deref().is_some_and(|e| e.contains("smtp down")));
        assert!(a.started_at.is_some_and(|s| s <= a.ended_at));
    }
    Ok(())
}

#[tokio::test]
async fn permanent_error_dead_letters_at_once() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(
        &db,
        "t",
        &calls,
        |_| Err(HandlerError::permanent("bad input")),
        config(),
    );
    let id = enqueue_committed(&db.pool, app, NewEvent::new("t", payload(1))).await?;
    let report = dispatcher.run_once().await?;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(calls.of(id), 1);
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("permanent: bad input"))
    );
    Ok(())
}

#[tokio::test]
async fn panicking_handler_is_a_failed_attempt_and_the_dispatcher_survives() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(
        &db,
        "t",
        &calls,
        |e| {
            if e.payload["n"] == 1 {
                panic!("kaboom");
            }
            Ok(())
        },
        config(),
    );
    let bad = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("t", payload(1)).with_max_attempts(2),
    )
    .await?;
    let good = enqueue_committed(&db.pool, app, NewEvent::new("t", payload(2))).await?;
    let report = dispatcher.run_once().await?;
    assert_eq!((report.completed, report.retried), (1, 1));
    let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM outbox WHERE id = $1")
        .bind(bad)
        .fetch_one(&db.pool)
        .await?;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("panicked: kaboom")),
        "{error:?}"
    );
    make_all_due(&db.pool).await?;
    let report = dispatcher.run_once().await?;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(calls.of(good), 1);
    assert_eq!(calls.of(bad), 2);
    Ok(())
}

#[tokio::test]
async fn snooze_runs_later_without_spending_an_attempt() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let snoozed = Arc::new(Mutex::new(false));
    let flag = snoozed.clone();
    let dispatcher = recording(
        &db,
        "t",
        &calls,
        move |_| {
            let mut s = flag.lock().expect("lock");
            if *s {
                Ok(())
            } else {
                *s = true;
                Err(HandlerError::Snooze(Duration::from_secs(60)))
            }
        },
        config(),
    );
    let id = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("t", payload(1)).with_max_attempts(1),
    )
    .await?;
    let report = dispatcher.run_once().await?;
    assert_eq!(report.snoozed, 1);
    let (delay, attempts): (f64, i32) = sqlx::query_as(
        "SELECT extract(epoch FROM run_at - now())::float8, attempt_count FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert!((55.0..=61.0).contains(&delay), "snooze delay {delay}");
    assert_eq!(attempts, 0, "a snooze gives its attempt back");
    assert_eq!(dispatcher.run_once().await?.claimed, 0, "not due yet");
    make_all_due(&db.pool).await?;
    // max_attempts = 1 and the snooze did not spend it: the row still runs.
    assert_eq!(dispatcher.run_once().await?.completed, 1);
    assert_eq!(calls.of(id), 2);
    Ok(())
}

#[tokio::test]
async fn a_topic_without_a_handler_waits_unclaimed_and_a_timeout_retries_with_a_clear_error()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.register("slow", |_e: Event| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<(), HandlerError>(())
    });
    let mut cfg = config();
    cfg.handler_timeout = Duration::from_millis(200);
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, cfg)?;
    let unknown =
        enqueue_committed(&db.pool, app, NewEvent::new("nobody.listens", payload(1))).await?;
    let slow = enqueue_committed(&db.pool, app, NewEvent::new("slow", payload(2))).await?;
    let report = dispatcher.run_once().await?;
    assert_eq!((report.claimed, report.retried), (1, 1));
    let error = |id| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, i32)>(
                "SELECT last_error, attempt_count FROM outbox WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
        }
    };
    // Nobody serves the topic: the row waits for a process that does,
    // without spending an attempt.
    assert_eq!(error(unknown).await?, (None, 0));
    let (e, _) = error(slow).await?;
    let e = e.unwrap_or_default();
    assert!(e.contains("timed out"), "{e}");
    Ok(())
}

#[tokio::test]
async fn one_busy_app_does_not_starve_another() -> TestResult {
    let db = TestDb::new().await?;
    let busy = db.app("busy").await?;
    let quiet = db.app("quiet").await?;
    let mut tx = db.pool.begin().await?;
    let events: Vec<NewEvent> = (0..2000).map(|n| NewEvent::new("t", payload(n))).collect();
    enqueue_batch(&mut tx, busy, &events).await?;
    tx.commit().await?;
    let mut quiet_ids = HashSet::new();
    for n in 0..5 {
        quiet_ids.insert(enqueue_committed(&db.pool, quiet, NewEvent::new("t", payload(n))).await?);
    }
    let calls = Calls::default();
    let mut cfg = config();
    cfg.batch_size = 10;
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), cfg);
    // The quiet app's rows are newer than all 2000 busy rows; FIFO alone would
    // serve them after 200 batches. Fair claiming serves them within a few.
    let mut batches = 0;
    while quiet_ids.iter().any(|id| calls.of(*id) == 0) {
        dispatcher.run_once().await?;
        batches += 1;
        assert!(
            batches <= 40,
            "quiet app still waiting after {batches} batches"
        );
    }
    Ok(())
}

#[tokio::test]
async fn two_dispatchers_handle_10k_rows_once_each_never_concurrently() -> TestResult {
    let db = TestDb::with_pool_size(12).await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let events: Vec<NewEvent> = (0..10_000)
        .map(|n| NewEvent::new("t", payload(n)))
        .collect();
    enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;

    let calls = Calls::default();
    let running: Arc<Mutex<HashSet<uuid::Uuid>>> = Arc::default();
    let overlaps = Arc::new(Mutex::new(0u32));
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    for worker in 0..2 {
        let (calls, running, overlaps) = (calls.clone(), running.clone(), overlaps.clone());
        let mut registry = Registry::new();
        registry.register("t", move |e: Event| {
            let (calls, running, overlaps) = (calls.clone(), running.clone(), overlaps.clone());
            async move {
                if !running.lock().expect("lock").insert(e.id) {
                    *overlaps.lock().expect("lock") += 1;
                }
                calls.record(e.id);
                tokio::task::yield_now().await;
                running.lock().expect("lock").remove(&e.id);
                Ok::<(), HandlerError>(())
            }
        });
        let mut cfg = config();
        cfg.worker_id = format!("worker-{worker}");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await?;
        let dispatcher = Dispatcher::new(pool, registry, cfg)?;
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            dispatcher.run(async move { stop.cancelled().await }).await
        }));
    }
    let drained = wait_until(Duration::from_secs(120), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    stop.cancel();
    let mut per_worker = Vec::new();
    for h in handles {
        per_worker.push(h.await??.totals.completed);
    }
    assert!(drained, "backlog not drained");
    assert_eq!(calls.distinct(), 10_000);
    assert_eq!(calls.total(), 10_000, "no row ran twice");
    assert_eq!(
        *overlaps.lock().expect("lock"),
        0,
        "no row ran on two workers at once"
    );
    assert_eq!(per_worker.iter().sum::<usize>(), 10_000);
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both dispatchers took work: {per_worker:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_delayed_row_runs_once_due_and_not_before() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let due_at = chrono::Utc::now() + chrono::Duration::milliseconds(400);
    let id = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("t", payload(1)).with_run_at(due_at),
    )
    .await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        let dispatcher = dispatcher.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    // No NOTIFY arrives when the row becomes due: the poll interval finds it.
    let handled = wait_until(Duration::from_secs(5), || async { calls.of(id) == 1 }).await;
    let handled_at = chrono::Utc::now();
    stop.cancel();
    run.await??;
    assert!(handled, "the delayed row was never handled");
    assert!(handled_at >= due_at, "handled before its run_at");
    assert_eq!(calls.of(id), 1);
    Ok(())
}

#[tokio::test]
async fn a_suspended_apps_rows_wait_until_it_resumes() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("paused").await?;
    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let id = enqueue_committed(&db.pool, app, NewEvent::new("t", payload(1))).await?;
    outbox_core::store::apps::set_suspended(&db.pool, "paused", true).await?;
    assert_eq!(dispatcher.run_until_idle().await?.claimed, 0);
    assert_eq!(calls.of(id), 0);
    outbox_core::store::apps::set_suspended(&db.pool, "paused", false).await?;
    assert_eq!(dispatcher.run_until_idle().await?.completed, 1);
    assert_eq!(calls.of(id), 1);
    Ok(())
}

#[tokio::test]
async fn claim_loops_claim_on_connections_of_their_own_that_end_with_the_dispatcher() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        let dispatcher = dispatcher.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    let ids: Vec<_> = (0..20)
        .map(|n| NewEvent::new("t", payload(n)))
        .collect::<Vec<_>>();
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(&mut tx, app, &ids).await?;
    tx.commit().await?;
    let handled = wait_until(Duration::from_secs(10), || async {
        ids.iter().all(|id| calls.of(*id) == 1)
    })
    .await;
    assert!(handled, "not every row was handled");
    // Only claim loops run the complete-and-claim statement, on their own
    // connections (see `store::outbox::claim_connect_options`).
    let claim_sessions = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database()
               AND query LIKE 'WITH done AS%' AND query LIKE '%picked AS%'",
        )
        .fetch_one(&db.pool)
        .await
    };
    assert!(claim_sessions().await? >= 1, "no claim connection seen");
    stop.cancel();
    run.await??;
    let closed = wait_until(Duration::from_secs(5), || async {
        claim_sessions().await.is_ok_and(|n| n == 0)
    })
    .await;
    assert!(closed, "a claim loop's connection outlived the dispatcher");
    Ok(())
}

/// Whether some dispatcher holds the wake protocol's `sleep` lock.
async fn a_dispatcher_sleeps(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND classid = 1869968482 AND objid = 1 AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(false)
}

/// Runs a dispatcher recording topic `t` that polls once a minute, until the
/// token is cancelled: whatever it handles sooner, something woke it for.
fn run_polling_once_a_minute(
    db: &TestDb,
    calls: &Calls,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<outbox_dispatch::DrainReport, outbox_dispatch::Error>>,
) {
    let config = Config {
        poll_interval: Duration::from_secs(60),
        ..config()
    };
    let dispatcher = recording(db, "t", calls, |_| Ok(()), config);
    let stop = CancellationToken::new();
    let run = spawn_run(dispatcher, &stop);
    (stop, run)
}

#[tokio::test]
async fn a_sleeping_dispatcher_is_woken_by_an_insert_not_by_its_poll() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let (stop, run) = run_polling_once_a_minute(&db, &calls);
    let asleep = wait_until(Duration::from_secs(10), || a_dispatcher_sleeps(&db.pool)).await;
    assert!(asleep, "an idle dispatcher never went to sleep");
    for n in 0..3 {
        let id = enqueue_committed(&db.pool, app, NewEvent::new("t", payload(n))).await?;
        let handled = wait_until(Duration::from_secs(5), || async { calls.of(id) == 1 }).await;
        assert!(handled, "event {n} waited for the 60 s poll");
        let asleep = wait_until(Duration::from_secs(10), || a_dispatcher_sleeps(&db.pool)).await;
        assert!(asleep, "the dispatcher did not go back to sleep");
    }
    stop.cancel();
    run.await??;
    let gone = wait_until(Duration::from_secs(5), || async {
        !a_dispatcher_sleeps(&db.pool).await
    })
    .await;
    assert!(gone, "the sleep lock outlived the dispatcher");
    Ok(())
}

#[tokio::test]
async fn an_insert_open_while_the_dispatcher_falls_asleep_is_not_left_to_the_poll() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    // Inserted before any dispatcher sleeps, so it sends no NOTIFY, and
    // committed only once the dispatcher has gone to sleep.
    let mut producer = db.pool.begin().await?;
    let id = outbox_core::enqueue(&mut producer, app, &NewEvent::new("t", payload(1))).await?;
    let (stop, run) = run_polling_once_a_minute(&db, &calls);
    let asleep = wait_until(Duration::from_secs(10), || a_dispatcher_sleeps(&db.pool)).await;
    assert!(asleep, "an idle dispatcher never went to sleep");
    producer.commit().await?;
    let handled = wait_until(Duration::from_secs(5), || async { calls.of(id) == 1 }).await;
    stop.cancel();
    run.await??;
    assert!(handled, "the row waited for the 60 s poll");
    Ok(())
}

/// Positions: a busy dispatcher claims from positions that have passed the
/// `run_at` of a row committed late (a long producer transaction), and of
/// a row whose `run_at` an operator moved back by hand; both still run.
#[tokio::test]
async fn rows_that_land_behind_a_busy_dispatchers_positions_still_run() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let (stop, run) = run_polling_once_a_minute(&db, &calls);
    // A steady trickle keeps the dispatcher claiming (and its positions
    // moving on) while the two rows land behind them.
    let trickle = tokio::spawn({
        let (pool, stop) = (db.pool.clone(), stop.clone());
        async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                enqueue_committed(&pool, app, NewEvent::new("t", payload(n))).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
    });
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut long = db.pool.begin().await?;
    let late = outbox_core::enqueue(
        &mut long,
        app,
        &NewEvent::new("t", payload(1_000_001)).with_run_at(an_hour_ago),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    long.commit().await?;
    let handled = wait_until(Duration::from_secs(5), || async { calls.of(late) == 1 }).await;
    assert!(
        handled,
        "a row committed behind the positions was not claimed"
    );

    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let moved = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("t", payload(1_000_002)).with_run_at(in_an_hour),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("UPDATE outbox SET run_at = now() - interval '1 hour' WHERE id = $1")
        .bind(moved)
        .execute(&db.pool)
        .await?;
    let handled = wait_until(Duration::from_secs(10), || async { calls.of(moved) == 1 }).await;
    assert!(handled, "a row moved back by hand was not claimed");
    stop.cancel();
    run.await??;
    trickle.await?.map_err(|e| e.to_string())?;
    Ok(())
}

/// The upgrade to claim positions (migration 0016) with rows in flight:
/// rows the previous version left due, scheduled, and leased by a
/// dispatcher that is gone all run once under the new one, while a
/// dispatcher of the previous version (which claims from every app's first
/// row, as `store::outbox::claim` does) keeps running beside it.
#[tokio::test]
async fn the_upgrade_to_claim_positions_keeps_rows_in_flight() -> TestResult {
    let db = TestDb::migrated_to(15).await?;
    let app = db.app("shop").await?;
    sqlx::query(
        "INSERT INTO outbox (id, app_id, topic, payload, run_at)
         SELECT outbox_uuid_v7(), $1, 't', jsonb_build_object('n', g),
                now() + CASE WHEN g % 3 = 0 THEN interval '1 second' ELSE interval '0' END
         FROM generate_series(1, 300) g",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "UPDATE outbox SET attempt_count = 1, lease_token = lease_token + 1, locked_by = 'gone',
                locked_until = now() + interval '1 second', first_attempt_at = now(), last_attempt_at = now()
         WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 100)",
    )
    .execute(&db.pool)
    .await?;
    outbox_core::migrate(&db.pool).await?;

    let calls = Calls::default();
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), config());
    let stop = CancellationToken::new();
    let run = spawn_run(dispatcher, &stop);
    let previous_version = tokio::spawn({
        let (pool, stop, calls) = (db.pool.clone(), stop.clone(), calls.clone());
        async move {
            while !stop.is_cancelled() {
                let rows =
                    outbox_core::store::outbox::claim(&pool, "old", 5, Duration::from_secs(10))
                        .await?;
                let leases: Vec<_> = rows.iter().map(|r| r.lease()).collect();
                for row in &rows {
                    calls.record(row.id);
                }
                outbox_core::store::outbox::complete(&pool, &leases).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, outbox_core::Error>(())
        }
    });
    let all = wait_until(Duration::from_secs(20), || async {
        calls.distinct() == 300
    })
    .await;
    stop.cancel();
    run.await??;
    previous_version.await??;
    assert!(all, "{} of 300 rows ran", calls.distinct());
    assert_eq!(calls.total(), 300, "a row ran twice");
    Ok(())
}

/// A stop while PostgreSQL cannot be reached ends within the drain's grace
/// and as long again for the writes after it, instead of retrying each
/// write until its tries run out (a process asked to stop then outlived an
/// orchestrator's grace period). The rows whose outcomes were not written
/// run again when their leases expire.
#[tokio::test]
async fn a_stop_while_the_database_is_unreachable_ends_within_the_grace() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let cfg = Config {
        drain_grace: Duration::from_millis(500),
        ..config()
    };
    let started = Arc::new(tokio::sync::Notify::new());
    let mut registry = Registry::new();
    registry.register("t", {
        let started = started.clone();
        move |_event: Event| {
            let started = started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<(), HandlerError>(())
            }
        }
    });
    // A pool of the dispatcher's own, closed under it below.
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let dispatcher = Dispatcher::new(pool.clone(), registry, cfg)?;
    let mut tx = db.pool.begin().await?;
    let events: Vec<NewEvent> = (0..20).map(|n| NewEvent::new("t", payload(n))).collect();
    enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await?;
    // Every write of the dispatcher now fails at once, as with the server
    // gone; the claim loops' own connections stop with the signal.
    tokio::spawn(async move { pool.close().await });
    let asked = std::time::Instant::now();
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(30), run).await???;
    let took = asked.elapsed();
    // The grace, then at least 2 s for the writes after it.
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?} (grace 500 ms): {report:?}"
    );
    Ok(())
}
