//! The limited claim against the store: the rows an ordinary claim leased
//! in the seconds after a limit was set (a process that had not yet beaten)
//! hold slots too, rate tokens are issued at the rate, and a limit per
//! partition key takes each key's free slots.

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

/// Enqueues `events` in one transaction.
async fn enqueue_all(db: &TestDb, app: uuid::Uuid, events: &[NewEvent]) -> TestResult {
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, events).await?;
    tx.commit().await?;
    Ok(())
}

/// `topic` of `app`, as the beat names a limited topic.
fn limited(app: uuid::Uuid, topic: &str) -> LimitedTopic {
    LimitedTopic {
        app_id: app,
        topic: topic.into(),
    }
}

/// A limited claim of up to `n` rows of `topic` by a process serving everything.
async fn claim(
    conn: &mut sqlx::PgConnection,
    topic: &LimitedTopic,
    n: u32,
) -> Result<store::LimitedClaim, outbox_core::Error> {
    store::claim_limited(conn, topic, &Served::everything(), "w", n, LEASE).await
}

/// The `i` of the claimed rows' payloads, sorted.
fn claimed_i(claim: &store::LimitedClaim) -> Vec<String> {
    let mut got: Vec<String> = claim
        .rows
        .iter()
        .map(|r| r.payload["i"].to_string())
        .collect();
    got.sort_unstable();
    got
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
    let topic = limited(app, "report");
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let taken = claim(&mut conn, &topic, 5).await?;
    assert_eq!(
        (taken.rows.len(), taken.free),
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
    let topic = limited(app, "partner");
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first = claim(&mut conn, &topic, 10).await?;
    assert_eq!(first.rows.len(), 3, "a full burst to start with");
    let wait = first.ready_in.ok_or("no wait for the next token")?;
    assert!(
        wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
        "{wait:?} until the next token at 2/s"
    );
    let none = claim(&mut conn, &topic, 10).await?;
    assert_eq!(none.rows.len(), 0, "no token left");
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let next = claim(&mut conn, &topic, 10).await?;
    assert_eq!(next.rows.len(), 1, "one token came");
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_limit_per_key_takes_one_row_of_each_key_until_its_row_ends() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // Three rows of key a first (they fill the front of the queue), two of
    // b, and two without a key.
    let keys = [
        Some("a"),
        Some("a"),
        Some("a"),
        Some("b"),
        None,
        Some("b"),
        None,
    ];
    let events: Vec<NewEvent> = keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| {
            let event = NewEvent::new("sync", json!({ "i": i }));
            match key {
                Some(k) => event.with_partition_key(k),
                None => event,
            }
        })
        .collect();
    enqueue_all(&db, app, &events).await?;
    let per_key = Limits {
        max_running_per_key: Some(1),
        max_running: Some(10),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &per_key, None).await?;
    let topic = limited(app, "sync");
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first = claim(&mut conn, &topic, 10).await?;
    assert_eq!(
        claimed_i(&first),
        ["0", "3", "4", "6"],
        "the first of a, the first of b, both keyless"
    );
    assert!(first.held, "rows of a and b were left");
    let second = claim(&mut conn, &topic, 10).await?;
    assert!(second.rows.is_empty(), "a and b are at their limit");
    assert!(second.held);
    assert_eq!(limits::list(&db.pool, app).await?[0].running, 4);

    // The row of a ends: the next row of a may run, b still waits.
    let done: Vec<_> = first
        .rows
        .iter()
        .filter(|r| r.payload["i"] == 0)
        .map(|r| r.lease())
        .collect();
    store::complete(&mut conn, &done).await?;
    assert_eq!(claimed_i(&claim(&mut conn, &topic, 10).await?), ["1"]);
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_partition_key_out_of_range_is_refused_and_nothing_is_written() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    for bad in [String::new(), "k".repeat(256)] {
        let event = NewEvent::new("sync", json!({})).with_partition_key(bad);
        let message = outbox_core::enqueue(&mut tx, app, &event)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("partition_key"), "{message}");
    }
    tx.commit().await?;
    assert_eq!(store::count(&db.pool).await?, 0);
    let refused = sqlx::query("SELECT outbox_enqueue('shop', 'sync', p_partition_key => '')")
        .execute(&db.pool)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(refused.contains("partition_key"), "{refused}");
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT outbox_enqueue('shop', 'sync', p_partition_key => 'acme')")
            .fetch_one(&db.pool)
            .await?;
    let key: Option<String> = sqlx::query_scalar("SELECT partition_key FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(key.as_deref(), Some("acme"));
    Ok(())
}

#[tokio::test]
async fn a_key_with_more_rows_than_the_window_does_not_take_the_other_keys_turns() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // 300 rows of one busy customer ahead of one row each of two others:
    // more than one claim's window of due rows.
    let mut events: Vec<NewEvent> = (0..300)
        .map(|i| NewEvent::new("sync", json!({ "i": i })).with_partition_key("busy"))
        .collect();
    events.push(NewEvent::new("sync", json!({ "i": "b" })).with_partition_key("b"));
    events.push(NewEvent::new("sync", json!({ "i": "c" })).with_partition_key("c"));
    enqueue_all(&db, app, &events).await?;
    let per_key = Limits {
        max_running_per_key: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &per_key, None).await?;
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first = claim(&mut conn, &limited(app, "sync"), 10).await?;
    assert_eq!(
        claimed_i(&first),
        ["\"b\"", "\"c\"", "0"],
        "one row of each customer"
    );
    assert!(
        first.free > 10,
        "without a concurrency or rate limit the topic's limits allow any number: {}",
        first.free
    );
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_limit_per_key_added_to_a_rate_limit_counts_the_rows_running_already() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    enqueue_all(
        &db,
        app,
        &[NewEvent::new("sync", json!({})).with_partition_key("acme")],
    )
    .await?;
    let rate = Limits {
        rate_per_sec: Some(5.0),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &rate, None).await?;
    // Long after the rate limit was set (past the window in which claims
    // adopt rows leased elsewhere), a row of the topic runs unrecorded.
    sqlx::query("UPDATE outbox_topic_limits SET set_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await?;
    assert_eq!(store::claim(&db.pool, "w", 1, LEASE).await?.len(), 1);
    let both = Limits {
        rate_per_sec: Some(5.0),
        max_running_per_key: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &both, None).await?;
    assert_eq!(limits::list(&db.pool, app).await?[0].running, 1);
    Ok(())
}
