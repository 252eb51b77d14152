//! Transactional mode: handlers write through the claim transaction, so a
//! handler's effect and the row's deletion commit together or not at all.

use outbox_core::NewEvent;
use outbox_core::topics::Served;
use outbox_dispatch::{Config, Dispatcher, Event, HandlerError, Registry};

use outbox_testkit::TestDb;
use serde_json::json;

use super::{
    Calls, TestResult, config, dead_letter_count, enqueue_committed, make_all_due, recording,
};

fn transactional() -> Config {
    Config {
        in_transaction: true,
        // Lease mode's handler concurrency does not apply here (refused if set).
        concurrency: Config::default().concurrency,
        ..config()
    }
}

/// A handler that records `n` in `effects` through the claim transaction,
/// then fails as the payload says (after writing, to prove the rollback).
fn effect_writer() -> Registry {
    let mut registry = Registry::new();
    registry.register("tx.work", |event: Event| async move {
        let tx = event
            .claim_tx()
            .ok_or_else(|| HandlerError::permanent("not in transactional mode"))?;
        sqlx::query("INSERT INTO effects (n, attempt) VALUES ($1, $2)")
            .bind(event.payload["n"].as_i64().unwrap_or_default())
            .bind(event.attempt)
            .execute(&mut *tx.lock().await?)
            .await
            .map_err(HandlerError::retry)?;
        match event.payload["fail"].as_str() {
            Some("retry") if event.attempt < 2 => Err(HandlerError::retry("first attempt fails")),
            Some("permanent") => Err(HandlerError::permanent("never works")),
            Some("panic") => panic!("handler panics after writing"),
            _ => Ok(()),
        }
    });
    registry
}

async fn effects(db: &TestDb) -> Result<Vec<(i64, i32)>, sqlx::Error> {
    sqlx::query_as("SELECT n, attempt FROM effects ORDER BY n, attempt")
        .fetch_all(&db.pool)
        .await
}

#[tokio::test]
async fn effects_commit_with_the_deletion_and_failures_roll_back_their_writes() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    sqlx::query("CREATE TABLE effects (n bigint, attempt int)")
        .execute(&db.pool)
        .await?;
    for (n, fail) in [
        (1, ""),
        (2, "retry"),
        (3, ""),
        (4, "permanent"),
        (5, "panic"),
        (6, ""),
    ] {
        enqueue_committed(
            &db.pool,
            app,
            NewEvent::new("tx.work", json!({"n": n, "fail": fail})).with_max_attempts(3),
        )
        .await?;
    }
    let dispatcher = Dispatcher::new(db.pool.clone(), effect_writer(), transactional())?;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (dispatcher, stop) = (dispatcher.clone(), stop.clone());
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    let settled = outbox_testkit::wait_until(std::time::Duration::from_secs(20), || async {
        let _ = make_all_due(&db.pool).await;
        outbox_core::store::outbox::count(&db.pool)
            .await
            .is_ok_and(|n| n == 0)
    })
    .await;
    stop.cancel();
    let report = run.await??;
    assert!(settled, "the outbox did not empty");
    // Successes once; the flaky one's first write rolled back with its
    // failure, its second committed; the permanent and the panicking one
    // left no write at all.
    assert_eq!(effects(&db).await?, vec![(1, 1), (2, 2), (3, 1), (6, 1)]);
    assert_eq!(dead_letter_count(&db.pool).await?, 2);
    let attempts: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT (payload->>'n')::bigint, attempt_count FROM dead_letters ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        attempts,
        vec![(4, 1), (5, 3)],
        "permanent at once; panics use every attempt"
    );
    // Each dead letter's history holds each of its attempts once, run by
    // this process, each ending after it started.
    let histories: Vec<(i64, Vec<i32>, Vec<String>, bool)> = sqlx::query_as(
        "SELECT (payload->>'n')::bigint,
                array(SELECT (a->>0)::int FROM jsonb_array_elements(attempts) a),
                array(SELECT DISTINCT a->>3 FROM jsonb_array_elements(attempts) a),
                (SELECT bool_and((a->>1)::timestamptz <= (a->>2)::timestamptz)
                 FROM jsonb_array_elements(attempts) a)
         FROM dead_letters ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    let worker = dispatcher.config().worker_id.clone();
    assert_eq!(
        histories,
        vec![
            (4, vec![1], vec![worker.clone()], true),
            (5, vec![1, 2, 3], vec![worker], true)
        ]
    );
    assert_eq!(report.totals.completed, 4);
    Ok(())
}

#[tokio::test]
async fn a_rolled_back_batch_leaves_rows_for_lease_mode_and_rows_with_callers_alone() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // A synchronous invocation's row is not taken in transactional mode.
    let mut tx = db.pool.begin().await?;
    outbox_core::store::invocations::start(&mut tx, app, NewEvent::new("tx.invoke", json!({})))
        .await?;
    tx.commit().await?;
    let mut registry = Registry::new();
    registry.register("tx.invoke", |_e: Event| async {
        Ok::<(), HandlerError>(())
    });
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, transactional())?;
    let report = dispatcher.run_until_idle().await?;
    assert_eq!(report.completed, 0);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 1);
    Ok(())
}

/// What a worker that dies mid-batch leaves behind: its batch record
/// committed, its transaction rolled back, its keeper connection gone.
async fn die_mid_batch(db: &TestDb) -> Result<usize, Box<dyn std::error::Error>> {
    use outbox_core::store::outbox as store;
    use sqlx::Connection;
    let mut keeper = sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?;
    let mut tx = db.pool.begin().await?;
    let rows = store::take(
        &mut *tx,
        &store::Positions::default(),
        &Served::everything(),
        10,
    )
    .await?;
    let ids: Vec<_> = rows.iter().map(|r| r.id).collect();
    store::open_tx_batch(&mut keeper, fastrand::i64(..), "dies", &ids).await?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut keeper)
        .await?;
    keeper.close().await?;
    tx.rollback().await?;
    assert!(
        db.a_session_ended(backend).await,
        "the dead worker's session never ended"
    );
    Ok(rows.len())
}

#[tokio::test]
async fn a_row_that_kills_its_worker_mid_batch_still_exhausts_its_attempts() -> TestResult {
    use outbox_core::store::outbox as store;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let id = enqueue_committed(
        &db.pool,
        app,
        NewEvent::new("tx.work", json!({"n": 1})).with_max_attempts(2),
    )
    .await?;

    // A batch whose worker is alive is not counted.
    let mut keeper = {
        use sqlx::Connection;
        sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?
    };
    let mut tx = db.pool.begin().await?;
    let rows = store::take(
        &mut *tx,
        &store::Positions::default(),
        &Served::everything(),
        10,
    )
    .await?;
    store::open_tx_batch(&mut keeper, 7, "alive", &[rows[0].id]).await?;
    let mut other = db.pool.begin().await?;
    assert_eq!(store::count_abandoned_tx_batches(&mut other).await?, 0);
    other.commit().await?;
    store::close_tx_batch(&mut *tx, 7).await?;
    tx.rollback().await?;

    // Two workers die while running it, one after the other.
    assert_eq!(die_mid_batch(&db).await?, 1);
    assert_eq!(die_mid_batch(&db).await?, 1);

    let calls = Calls::default();
    let report = recording(&db, "tx.work", &calls, |_| Ok(()), transactional())
        .run_until_idle()
        .await?;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(calls.of(id), 0, "a third run would exceed max_attempts");
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("did not finish")),
        "{:?}",
        dead[0].last_error
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_tx_batches")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 1, "only the live batch's record is left");
    drop(keeper);
    Ok(())
}
