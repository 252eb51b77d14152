//! Cancelling rows that have not run: they become `ignored` dead letters
//! with the reason; running rows are left to finish.

use std::time::Duration;

use outbox_core::store::outbox::{self as store, CancelFilter};
use outbox_core::{NewEvent, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn cancelled_rows_become_ignored_dead_letters_and_running_ones_finish() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let other = db.app("other").await?;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let events = vec![
        NewEvent::new("a", json!({"n": 1})),
        NewEvent::new("a", json!({"n": 2})).with_run_at(later),
        NewEvent::new("b", json!({"n": 3})),
        NewEvent::new("b", json!({"n": 4})),
    ];
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(&mut tx, shop, &events).await?;
    enqueue_batch(&mut tx, other, &[NewEvent::new("a", json!({}))]).await?;
    tx.commit().await?;
    // One row of topic b is running.
    let b = outbox_core::topics::Served {
        exact: vec!["b".into()],
        ..Default::default()
    };
    let running = store::claim_served(&db.pool, &b, "w", 1, Duration::from_secs(60)).await?;
    assert_eq!(running.len(), 1);
    let running_id = running[0].id;

    // By topic: the due and the scheduled row of shop, not other's.
    let mut cancelled = store::cancel(
        &db.pool,
        shop,
        &CancelFilter::Topic("a".into()),
        Some("ops@x.io"),
        "downstream retired",
    )
    .await?;
    cancelled.sort();
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(cancelled, expected);
    // By id: the running row is left to finish.
    let b_ids: Vec<Uuid> = ids[2..].to_vec();
    let cancelled = store::cancel(
        &db.pool,
        shop,
        &CancelFilter::Ids(b_ids.clone()),
        None,
        "dup",
    )
    .await?;
    let waiting: Vec<Uuid> = b_ids.into_iter().filter(|id| *id != running_id).collect();
    assert_eq!(cancelled, waiting);
    let (left, ignored): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox),
                (SELECT count(*) FROM dead_letters WHERE resolution = 'ignored')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(left + ignored, 5, "every row is in one place");
    let error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM dead_letters WHERE original_event_id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        error.as_deref(),
        Some("cancelled by ops@x.io: downstream retired")
    );
    // Another app's id is not this app's to cancel.
    let foreign: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox WHERE app_id = $1")
        .bind(other)
        .fetch_all(&db.pool)
        .await?;
    assert!(
        store::cancel(&db.pool, shop, &CancelFilter::Ids(foreign), None, "x")
            .await?
            .is_empty()
    );

    // Bad input is refused by name.
    for (filter, reason, field) in [
        (CancelFilter::Topic("a".into()), "  ", "reason"),
        (CancelFilter::Ids(Vec::new()), "r", "ids"),
        (CancelFilter::Topic(String::new()), "r", "topic"),
    ] {
        let err = store::cancel(&db.pool, shop, &filter, None, reason)
            .await
            .err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(field), "{err}");
    }
    Ok(())
}
