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

#[tokio::test]
async fn a_sample_counts_retrying_rows_and_charts_the_backlog_and_its_age() -> TestResult {
    use outbox_core::store::activity;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(
        &mut tx,
        app,
        &[
            NewEvent::new("t", json!({}))
                .with_run_at(chrono::Utc::now() - chrono::Duration::seconds(30)),
            NewEvent::new("t", json!({})),
            NewEvent::new("t", json!({})),
        ],
    )
    .await?;
    tx.commit().await?;
    // One row fails and waits for its backoff.
    let served = outbox_core::topics::Served::everything();
    let claimed = store::claim_served(&db.pool, &served, "w", 1, Duration::from_secs(60)).await?;
    let lease = claimed.first().ok_or("nothing claimed")?.lease();
    assert_eq!(lease.id, ids[0], "the oldest first");
    let retry = store::Reschedule {
        lease,
        delay: Duration::from_secs(600),
        error: Some("later".into()),
        refund_attempt: false,
    };
    store::reschedule(&db.pool, &[retry], store::AttemptHistory::OFF).await?;

    store::record_state_counts(&db.pool).await?;
    let states = store::recorded_state_counts(&db.pool, app).await?;
    let t = states.first().ok_or("no topic")?;
    assert_eq!((t.due, t.scheduled, t.retrying, t.running), (2, 1, 1, 0));
    let minutes = activity::per_minute(&db.pool, app, None, 1).await?;
    let now = minutes.last().ok_or("no minute")?;
    assert_eq!(now.due, Some(2));
    assert!(now.oldest_due_secs.is_some_and(|s| s >= 0.0), "{now:?}");
    assert_eq!(
        (now.completed, now.failed),
        (0, 0),
        "a sample counts no attempts"
    );
    Ok(())
}

#[tokio::test]
async fn attempt_counts_of_one_key_given_twice_are_summed_not_refused() -> TestResult {
    use outbox_core::store::activity::{self, ActivityDelta};
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // A real topic named like the overflow's `other`, and the overflow.
    let delta = |completed| ActivityDelta {
        app_id: app,
        topic: "other".into(),
        completed,
        failed: 1,
        dead_lettered: 0,
    };
    activity::record(&db.pool, &[delta(2), delta(3)]).await?;
    activity::record(&db.pool, &[delta(5)]).await?;
    let minutes = activity::per_minute(&db.pool, app, Some("other"), 1).await?;
    let now = minutes.last().ok_or("no minute")?;
    assert_eq!((now.completed, now.failed), (10, 3));
    Ok(())
}

/// A row that runs (its lease is live) is not a row falling behind: a
/// handler that runs for minutes must not raise the oldest due age, which
/// the falling-behind alert reads.
#[tokio::test]
async fn the_oldest_due_age_leaves_running_rows_out() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    enqueue_batch(&mut tx, app, &[NewEvent::new("t", json!({}))]).await?;
    tx.commit().await?;
    sqlx::query("UPDATE outbox SET run_at = now() - interval '10 minutes'")
        .execute(&db.pool)
        .await?;
    let waiting = store::oldest_due_age(&db.pool).await?;
    assert!(waiting >= 599.0, "{waiting}");
    let leased = store::claim(&db.pool, "slow", 10, Duration::from_secs(600)).await?;
    assert_eq!(leased.len(), 1);
    assert_eq!(store::oldest_due_age(&db.pool).await?, 0.0);
    Ok(())
}

/// Ordered rows that an open transaction holds back are counted as such
/// (before, nothing said why they waited: they were simply due), and
/// stop being counted once it ends; rows without an ordering key are
/// never held by it.
#[tokio::test]
async fn ordered_rows_behind_an_open_transaction_are_counted() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // A session that took a transaction id (it wrote, or asked for one)
    // and went idle in its transaction, as a forgotten `BEGIN` does.
    let mut holder = db.pool.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await?;
    let mut tx = db.pool.begin().await?;
    enqueue_batch(
        &mut tx,
        app,
        &[
            NewEvent::new("t", json!({})).with_ordering_key("order-1"),
            NewEvent::new("t", json!({})).with_ordering_key("order-2"),
            NewEvent::new("t", json!({})),
        ],
    )
    .await?;
    tx.commit().await?;
    let held = |counts: Vec<store::StateCounts>| {
        counts
            .iter()
            .find(|c| c.topic == "t")
            .map(|c| (c.due, c.behind_open_transaction))
    };
    assert_eq!(held(store::state_counts(&db.pool).await?), Some((3, 2)));
    holder.commit().await?;
    // The horizon is the server's: another test's transaction, in another
    // database, may hold the rows a moment longer.
    let released = outbox_testkit::wait_until(Duration::from_secs(30), || async {
        store::state_counts(&db.pool)
            .await
            .is_ok_and(|counts| held(counts) == Some((3, 0)))
    })
    .await;
    assert!(released, "still held after the transaction ended");
    Ok(())
}
