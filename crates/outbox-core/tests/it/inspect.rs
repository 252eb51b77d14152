//! The store's inspection queries.

use std::time::Duration;

use outbox_core::store::outbox::{self as store, DueCount};
use outbox_core::{NewEvent, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn due_rows_are_counted_without_leased_or_later_ones_up_to_a_bound() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let events: Vec<NewEvent> = (0..30)
        .map(|n| {
            let event = NewEvent::new("t", json!({ "n": n }));
            if n < 5 {
                event.with_run_at(later)
            } else {
                event
            }
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    let leased = store::claim(&db.pool, "busy", 10, Duration::from_secs(60)).await?;
    assert_eq!(leased.len(), 10);

    // 30 rows: 5 later, 10 leased, 15 due.
    assert_eq!(
        store::count_due(&db.pool, 1000).await?,
        DueCount {
            rows: 15,
            exact: true
        }
    );
    assert_eq!(
        store::count_due(&db.pool, 15).await?,
        DueCount {
            rows: 15,
            exact: false
        },
        "a count that reaches the bound does not claim to be exact"
    );
    assert_eq!(
        store::count_due(&db.pool, 4).await?,
        DueCount {
            rows: 4,
            exact: false
        }
    );
    Ok(())
}
