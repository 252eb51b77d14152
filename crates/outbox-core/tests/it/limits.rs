//! The limited claim against the store: the rows an ordinary claim leased
//! in the seconds after a limit was set (a process that had not yet beaten)
//! hold slots too, and rate tokens are issued at the rate.

use std::time::Duration;

use outbox_core::NewEvent;
use outbox_core::store::limits::{self, LimitedTopic, Limits};
use outbox_core::store::outbox as store;
use outbox_core::topics::Served;
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::Connection;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: Duration = Duration::from_secs(30);

/// `n` due rows of `topic`.
async fn fill(db: &TestDb, app: uuid::Uuid, topic: &str, n: usize) -> TestResult {
    let events: Vec<NewEvent> = (0..n)
        .map(|i| NewEvent::new(topic, json!({ "i": i })))
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn rows_an_ordinary_claim_took_after_the_limit_was_set_hold_slots() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "report", 5).await?;
    let one = Limits {
        max_running: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "report", &one, None).await?;
    // A process that has not beaten since claims as before the limit.
    let early = store::claim(&db.pool, "not-yet-told", 1, LEASE).await?;
    assert_eq!(early.len(), 1);
    let topic = LimitedTopic {
        app_id: app,
        topic: "report".into(),
    };
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let claim =
        store::claim_limited(&mut conn, &topic, &Served::everything(), "told", 5, LEASE).await?;
    assert_eq!(
        (claim.rows.len(), claim.free),
        (0, 0),
        "the row the early claim leased holds the only slot"
    );
    let shown = limits::list(&db.pool, app).await?;
    assert_eq!(shown[0].running, 1, "and is recorded");
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_rate_limit_issues_its_burst_then_waits_for_the_next_token() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "partner", 10).await?;
    let rate = Limits {
        rate_per_sec: Some(2.0),
        burst: Some(3),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "partner", &rate, None).await?;
    let topic = LimitedTopic {
        app_id: app,
        topic: "partner".into(),
    };
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first =
        store::claim_limited(&mut conn, &topic, &Served::everything(), "w", 10, LEASE).await?;
    assert_eq!(first.rows.len(), 3, "a full burst to start with");
    let wait = first.ready_in.ok_or("no wait for the next token")?;
    assert!(
        wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
        "{wait:?} until the next token at 2/s"
    );
    let none =
        store::claim_limited(&mut conn, &topic, &Served::everything(), "w", 10, LEASE).await?;
    assert_eq!(none.rows.len(), 0, "no token left");
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let next =
        store::claim_limited(&mut conn, &topic, &Served::everything(), "w", 10, LEASE).await?;
    assert_eq!(next.rows.len(), 1, "one token came");
    conn.close().await?;
    Ok(())
}
