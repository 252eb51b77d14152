//! Browsing rows: every filter, keyset pages in both directions, counts
//! bounded and estimated, the time budget, and "retry now".

use std::time::Duration;

use chrono::Utc;
use outbox_core::model::Lease;
use outbox_core::store::outbox::{
    self as store, AttemptHistory, PageAt, PayloadField, Reschedule, RowFilter, RowState,
};
use outbox_core::{NewEvent, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BUDGET: Duration = Duration::from_secs(5);

async fn ids_of(
    db: &TestDb,
    app: Uuid,
    filter: &RowFilter,
) -> Result<Vec<Uuid>, outbox_core::Error> {
    let page = store::browse(&db.pool, app, filter, PageAt::First, 500, BUDGET).await?;
    Ok(page.rows.into_iter().map(|r| r.id).collect())
}

#[tokio::test]
async fn every_filter_narrows_to_the_rows_it_names_and_never_another_apps() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let other = db.app("other").await?;
    let later = Utc::now() + chrono::Duration::hours(1);
    let events = vec![
        NewEvent::new(
            "orders.created",
            json!({"customer": {"id": "c-1"}, "total": 42}),
        )
        .with_ordering_key("order-1"),
        NewEvent::new(
            "orders.created",
            json!({"customer": {"id": "c-2"}, "total": 7}),
        )
        .with_idempotency_key("idem-2"),
        NewEvent::new("orders.shipped", json!({"customer": {"id": "c-1"}})).with_run_at(later),
        NewEvent::new("orders.failed", json!({"customer": {"id": "c-3"}})),
        NewEvent::new("mail.sent", json!({"to": "a@x.io"})).with_partition_key("tenant-9"),
    ];
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(&mut tx, shop, &events).await?;
    enqueue_batch(
        &mut tx,
        other,
        &[NewEvent::new(
            "orders.created",
            json!({"customer": {"id": "c-1"}}),
        )],
    )
    .await?;
    tx.commit().await?;

    // orders.failed fails once and waits for its backoff; mail.sent runs.
    let failed = Lease {
        id: ids[3],
        token: claim_token(&db, ids[3]).await?,
    };
    let retry = Reschedule {
        lease: failed,
        delay: Duration::from_secs(3600),
        error: Some("downstream said no".into()),
        refund_attempt: false,
    };
    store::reschedule(&db.pool, &[retry], AttemptHistory::OFF).await?;
    claim_token(&db, ids[4]).await?;

    let all = ids_of(&db, shop, &RowFilter::default()).await?;
    assert_eq!(all.len(), 5, "another app's row is not listed");
    let db = &db;
    let by = |f: RowFilter| async move { ids_of(db, shop, &f).await };
    let topic = RowFilter {
        topic: Some("orders.created".into()),
        ..Default::default()
    };
    assert_eq!(by(topic).await?, [ids[0], ids[1]]);
    for (state, expected) in [
        (RowState::Due, vec![ids[0], ids[1]]),
        (RowState::Scheduled, vec![ids[2]]),
        (RowState::Retrying, vec![ids[3]]),
        (RowState::Running, vec![ids[4]]),
    ] {
        let f = RowFilter {
            state: Some(state),
            ..Default::default()
        };
        let mut got = by(f).await?;
        got.sort();
        let mut expected = expected;
        expected.sort();
        assert_eq!(got, expected, "state {state:?}");
    }
    let page = store::browse(
        &db.pool,
        shop,
        &RowFilter::default(),
        PageAt::First,
        10,
        BUDGET,
    )
    .await?;
    let states: Vec<_> = page.rows.iter().map(|r| (r.id, r.state.as_str())).collect();
    assert!(states.contains(&(ids[3], "retrying")) && states.contains(&(ids[4], "running")));
    let ordering = RowFilter {
        ordering_key: Some("order-1".into()),
        ..Default::default()
    };
    assert_eq!(by(ordering).await?, [ids[0]]);
    let idem = RowFilter {
        idempotency_key: Some("idem-2".into()),
        ..Default::default()
    };
    assert_eq!(by(idem).await?, [ids[1]]);
    let partition = RowFilter {
        partition_key: Some("tenant-9".into()),
        ..Default::default()
    };
    assert_eq!(by(partition).await?, [ids[4]]);
    let contains = RowFilter {
        payload_contains: Some(json!({"customer": {"id": "c-1"}})),
        ..Default::default()
    };
    let mut got = by(contains).await?;
    got.sort();
    let mut expected = vec![ids[0], ids[2]];
    expected.sort();
    assert_eq!(got, expected);
    let field = RowFilter {
        payload_field: Some(PayloadField::parse("total=42")?),
        ..Default::default()
    };
    assert_eq!(by(field).await?, [ids[0]], "a number matches as text");
    let nested = RowFilter {
        payload_field: Some(PayloadField::parse("customer.id=c-3")?),
        ..Default::default()
    };
    assert_eq!(by(nested).await?, [ids[3]]);
    let future = RowFilter {
        created_from: Some(Utc::now() + chrono::Duration::minutes(1)),
        ..Default::default()
    };
    assert!(by(future).await?.is_empty());
    let past = RowFilter {
        created_to: Some(Utc::now() + chrono::Duration::minutes(1)),
        ..Default::default()
    };
    assert_eq!(by(past).await?.len(), 5);

    // Bad input is refused with what is accepted.
    assert!(PayloadField::parse("no-equals").is_err());
    assert!(PayloadField::parse("a..b=1").is_err());
    assert!("stuck".parse::<RowState>().is_err());
    let scalar = RowFilter {
        payload_contains: Some(json!(5)),
        ..Default::default()
    };
    assert!(matches!(
        by(scalar).await,
        Err(outbox_core::Error::Invalid { .. })
    ));
    Ok(())
}

/// Claims the row `id` (only rows of its topic) and returns its lease token.
async fn claim_token(db: &TestDb, id: Uuid) -> Result<i64, Box<dyn std::error::Error>> {
    let topic: String = sqlx::query_scalar("SELECT topic FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    let served = outbox_core::topics::Served {
        exact: vec![topic],
        ..Default::default()
    };
    let claimed =
        store::claim_served(&db.pool, &served, "w-1", 10, Duration::from_secs(600)).await?;
    let lease = claimed
        .iter()
        .find(|c| c.id == id)
        .ok_or("row not claimed")?
        .lease();
    Ok(lease.token)
}

#[tokio::test]
async fn pages_walk_the_claim_order_forwards_and_back_without_gaps_or_repeats() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    crate::enqueue_committed(&db, shop, 25).await?;
    let all = ids_of(&db, shop, &RowFilter::default()).await?;
    assert_eq!(all.len(), 25);
    let f = RowFilter::default();

    let first = store::browse(&db.pool, shop, &f, PageAt::First, 10, BUDGET).await?;
    assert!(first.before.is_none(), "nothing before the first page");
    let second = store::browse(
        &db.pool,
        shop,
        &f,
        PageAt::After(first.after.ok_or("no next")?),
        10,
        BUDGET,
    )
    .await?;
    let third = store::browse(
        &db.pool,
        shop,
        &f,
        PageAt::After(second.after.ok_or("no next")?),
        10,
        BUDGET,
    )
    .await?;
    assert!(third.after.is_none(), "nothing after the last page");
    let walked: Vec<Uuid> = [&first, &second, &third]
        .iter()
        .flat_map(|p| p.rows.iter().map(|r| r.id))
        .collect();
    assert_eq!(walked, all);

    // Back from the last page: the same pages, in the same order.
    let back = store::browse(
        &db.pool,
        shop,
        &f,
        PageAt::Before(third.before.ok_or("no previous")?),
        10,
        BUDGET,
    )
    .await?;
    assert_eq!(back.rows, second.rows);
    let front = store::browse(
        &db.pool,
        shop,
        &f,
        PageAt::Before(back.before.ok_or("no previous")?),
        10,
        BUDGET,
    )
    .await?;
    assert_eq!(front.rows, first.rows);
    assert!(
        front.before.is_none(),
        "the first page again: nothing before it"
    );
    assert!(front.after.is_some());

    // Cursors survive a round trip through text, and garbage is refused.
    let cursor = first.after.ok_or("no next")?;
    assert_eq!(store::RowCursor::decode(&cursor.encode())?, cursor);
    assert!(store::RowCursor::decode("12_not-a-uuid").is_err());
    Ok(())
}

#[tokio::test]
async fn counts_are_exact_up_to_the_bound_and_estimates_beyond_it_or_when_slow() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    crate::enqueue_committed(&db, shop, 30).await?;
    sqlx::query("ANALYZE outbox").execute(&db.pool).await?;
    let f = RowFilter::default();
    let exact = store::count_matching(&db.pool, shop, &f, 100, BUDGET).await?;
    assert_eq!(
        exact,
        store::RowCount {
            rows: 30,
            exact: true,
            at_least: false,
        }
    );
    let bounded = store::count_matching(&db.pool, shop, &f, 10, BUDGET).await?;
    assert!(!bounded.exact);
    assert!(bounded.rows > 10, "at least past the bound: {bounded:?}");

    // Rows of a topic the statistics do not know yet: the planner expects
    // fewer than were counted, so the answer is a lower bound, and says so
    // (it said "about 11" for thousands of rows).
    let events: Vec<outbox_core::NewEvent> = (0..40)
        .map(|n| outbox_core::NewEvent::new("fresh", serde_json::json!({ "n": n })))
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, shop, &events).await?;
    tx.commit().await?;
    let fresh = RowFilter {
        topic: Some("fresh".into()),
        ..RowFilter::default()
    };
    let lower = store::count_matching(&db.pool, shop, &fresh, 10, BUDGET).await?;
    assert_eq!(
        lower,
        store::RowCount {
            rows: 11,
            exact: false,
            at_least: true,
        }
    );

    // An estimate set right by the first page read beside it: a page that
    // holds every match (here none) is their number; a page with more after
    // it is a lower bound the estimate fell under.
    let about = |rows| store::RowCount {
        rows,
        exact: false,
        at_least: false,
    };
    let nothing = RowFilter {
        topic: Some("nothing".into()),
        ..RowFilter::default()
    };
    let empty = store::browse(&db.pool, shop, &nothing, PageAt::First, 10, BUDGET).await?;
    assert_eq!(
        about(24).with_first_page(&empty),
        store::RowCount {
            rows: 0,
            exact: true,
            at_least: false,
        }
    );
    let page = store::browse(&db.pool, shop, &f, PageAt::First, 10, BUDGET).await?;
    assert_eq!(
        about(3).with_first_page(&page),
        store::RowCount {
            rows: 11,
            exact: false,
            at_least: true,
        }
    );
    assert_eq!(about(24).with_first_page(&page), about(24));

    // A count (and a page) that cannot finish within the budget — here the
    // table is locked — comes back in time: an estimate, or a refusal.
    let mut locker = db.pool.begin().await?;
    sqlx::query("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await?;
    let budget = Duration::from_millis(200);
    let started = std::time::Instant::now();
    let slow = store::count_matching(&db.pool, shop, &f, 100, budget).await?;
    assert!(!slow.exact);
    let refused = store::browse(&db.pool, shop, &f, PageAt::First, 10, budget).await;
    match refused {
        Err(outbox_core::Error::Invalid {
            field: "filter",
            reason,
        }) => {
            assert!(reason.contains("narrow it"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    locker.rollback().await?;
    Ok(())
}

#[tokio::test]
async fn retry_now_makes_waiting_rows_due_and_leaves_running_and_due_rows() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let other = db.app("other").await?;
    let later = Utc::now() + chrono::Duration::hours(1);
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(
        &mut tx,
        shop,
        &[
            NewEvent::new("a", json!({})).with_run_at(later),
            NewEvent::new("a", json!({}))
                .with_run_at(later)
                .with_priority(5),
            NewEvent::new("a", json!({})),
            NewEvent::new("b", json!({})).with_run_at(later),
        ],
    )
    .await?;
    let foreign = enqueue_batch(
        &mut tx,
        other,
        &[NewEvent::new("a", json!({})).with_run_at(later)],
    )
    .await?;
    tx.commit().await?;
    // ids[3] runs (its lease is taken by hand: it is not due).
    sqlx::query(
        "UPDATE outbox SET locked_by = 'w', locked_until = now() + interval '1 hour' WHERE id = $1",
    )
    .bind(ids[3])
    .execute(&db.pool)
    .await?;

    let asked = [ids[0], ids[1], ids[2], ids[3], foreign[0]];
    let mut moved = store::retry_now(&db.pool, shop, &asked).await?;
    moved.sort();
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(moved, expected, "only waiting, idle rows of this app");
    let due = RowFilter {
        state: Some(RowState::Due),
        ..Default::default()
    };
    let mut now_due = ids_of(&db, shop, &due).await?;
    now_due.sort();
    let mut expected = vec![ids[0], ids[1], ids[2]];
    expected.sort();
    assert_eq!(now_due, expected);
    let foreign_row = store::row(&db.pool, other, foreign[0])
        .await?
        .ok_or("gone")?;
    assert_eq!(foreign_row.state, "scheduled");

    // A claim takes them now.
    let claimed = store::claim(&db.pool, "w-2", 10, Duration::from_secs(30)).await?;
    let mut claimed: Vec<Uuid> = claimed
        .iter()
        .map(|c| c.id)
        .filter(|id| ids.contains(id))
        .collect();
    claimed.sort();
    assert_eq!(claimed, now_due);

    // The bulk form of the action picks only idle rows of the filter.
    let idle = RowFilter {
        idle_only: true,
        ..Default::default()
    };
    let idle = store::matching_ids(&db.pool, shop, &idle, 100).await?;
    assert!(
        idle.is_empty(),
        "every row of shop is running now: {idle:?}"
    );
    assert!(store::retry_now(&db.pool, shop, &[]).await.is_err());
    // Only waiting rows, for "retry now": none of shop's rows waits any more.
    let waiting = RowFilter {
        waiting_only: true,
        ..Default::default()
    };
    assert!(
        store::matching_ids(&db.pool, shop, &waiting, 100)
            .await?
            .is_empty()
    );
    let foreign_waiting = store::matching_ids(&db.pool, other, &waiting, 100).await?;
    assert_eq!(foreign_waiting, foreign);
    Ok(())
}
