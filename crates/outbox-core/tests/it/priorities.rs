//! Priorities with aging: within an app a higher priority runs first, a
//! row of priority p is claimed as if it had been due p × 10 s earlier (so
//! a lower one is overtaken for a bounded time only), a scheduled row does
//! not run early, and a priority out of range is refused by name.

use std::time::Duration;

use chrono::Utc;
use outbox_core::NewEvent;
use outbox_core::store::outbox as store;
use outbox_testkit::TestDb;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: Duration = Duration::from_secs(30);

async fn enqueue(db: &TestDb, app: uuid::Uuid, events: &[NewEvent]) -> TestResult {
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, events).await?;
    tx.commit().await?;
    Ok(())
}

/// The topics of the next `n` rows claimed, one claim each: the rows of
/// one claim come back in no particular order.
async fn next(db: &TestDb, n: u32) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut topics = Vec::new();
    for _ in 0..n {
        let rows = store::claim(&db.pool, "w", 1, LEASE).await?;
        topics.extend(rows.into_iter().map(|r| r.topic));
    }
    Ok(topics)
}

#[tokio::test]
async fn a_higher_priority_runs_first_within_an_app() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let low: Vec<NewEvent> = (0..3)
        .map(|i| NewEvent::new("report", json!({ "i": i })))
        .collect();
    enqueue(&db, app, &low).await?;
    // Enqueued after the reports, one at a time and as a batch.
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue(
        &mut tx,
        app,
        &NewEvent::new("alert", json!({})).with_priority(9),
    )
    .await?;
    tx.commit().await?;
    enqueue(
        &db,
        app,
        &[NewEvent::new("receipt", json!({})).with_priority(5)],
    )
    .await?;
    let by_sql: uuid::Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue('shop', 'invoice', '{}'::jsonb, p_priority => 3::smallint)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(!by_sql.is_nil());
    assert_eq!(
        next(&db, 6).await?,
        ["alert", "receipt", "invoice", "report", "report", "report"]
    );
    Ok(())
}

#[tokio::test]
async fn a_low_priority_row_is_overtaken_for_a_bounded_time_only() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // A row of priority 0 that has waited 100 s is ahead of a row of the
    // highest priority enqueued now (seen as due 90 s ago); one that has
    // waited 80 s is behind it.
    let now = Utc::now();
    enqueue(
        &db,
        app,
        &[
            NewEvent::new("waited-100s", json!({}))
                .with_run_at(now - chrono::Duration::seconds(100)),
            NewEvent::new("waited-80s", json!({})).with_run_at(now - chrono::Duration::seconds(80)),
            NewEvent::new("urgent", json!({})).with_priority(9),
        ],
    )
    .await?;
    assert_eq!(next(&db, 3).await?, ["waited-100s", "urgent", "waited-80s"]);
    Ok(())
}

#[tokio::test]
async fn a_scheduled_row_with_a_priority_does_not_run_early() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let later = Utc::now() + chrono::Duration::seconds(30);
    enqueue(
        &db,
        app,
        &[NewEvent::new("later", json!({}))
            .with_run_at(later)
            .with_priority(9)],
    )
    .await?;
    assert!(
        next(&db, 10).await?.is_empty(),
        "claimed before its due time"
    );
    let counts = store::state_counts(&db.pool).await?;
    assert_eq!((counts[0].due, counts[0].scheduled), (0, 1));
    // Due now: it runs.
    sqlx::query("UPDATE outbox SET not_before = now()")
        .execute(&db.pool)
        .await?;
    assert_eq!(next(&db, 10).await?, ["later"]);
    Ok(())
}

#[tokio::test]
async fn a_priority_out_of_range_is_refused_by_name_and_nothing_is_written() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    for bad in [-1, 10, i16::MAX] {
        let mut tx = db.pool.begin().await?;
        let err = outbox_core::enqueue(
            &mut tx,
            app,
            &NewEvent::new("t", json!({})).with_priority(bad),
        )
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("priority") && err.contains("between 0 and 9"),
            "{bad}: {err}"
        );
    }
    let err =
        sqlx::query("SELECT outbox_enqueue('shop', 't', '{}'::jsonb, p_priority => 12::smallint)")
            .execute(&db.pool)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    assert!(err.contains("priority 12"), "{err}");
    assert_eq!(store::count(&db.pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_retried_row_keeps_its_priority() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    enqueue(
        &db,
        app,
        &[NewEvent::new("urgent", json!({})).with_priority(9)],
    )
    .await?;
    let claimed = store::claim(&db.pool, "w", 1, LEASE).await?;
    let lease = outbox_core::model::Lease {
        id: claimed[0].id,
        token: claimed[0].lease_token,
    };
    // Waiting 60 s: behind the retry (seen as due 90 s before its retry time).
    enqueue(
        &db,
        app,
        &[NewEvent::new("waiting", json!({}))
            .with_run_at(Utc::now() - chrono::Duration::seconds(60))],
    )
    .await?;
    let retried = store::reschedule(
        &db.pool,
        &[store::Reschedule {
            lease,
            delay: Duration::ZERO,
            error: Some("try again".into()),
            refund_attempt: false,
        }],
        store::AttemptHistory::default(),
    )
    .await?;
    assert_eq!(retried.len(), 1);
    assert_eq!(next(&db, 2).await?, ["urgent", "waiting"]);
    Ok(())
}

/// A claimed row says when it was due, its priority's move undone: what the
/// queue-wait metric measures from.
#[tokio::test]
async fn a_claimed_row_says_when_it_was_due_whatever_its_priority() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let before = Utc::now();
    enqueue(
        &db,
        app,
        &[NewEvent::new("urgent", json!({})).with_priority(9)],
    )
    .await?;
    let rows = store::claim(&db.pool, "w", 10, LEASE).await?;
    let row = rows.first().ok_or("nothing claimed")?;
    let (run_at, due_at) = (row.run_at.ok_or("run_at")?, row.due_at.ok_or("due_at")?);
    assert_eq!(due_at - run_at, chrono::Duration::seconds(90), "{row:?}");
    assert!(
        (due_at - before).num_seconds().abs() < 5,
        "due when enqueued, not 90 s before: {due_at} against {before}"
    );
    Ok(())
}
