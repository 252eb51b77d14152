use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_testkit::TestDb;

use crate::{Calls, TestResult, config, enqueue_committed, payload, recording};

#[tokio::test]
async fn rollback_leaves_no_row_and_uncommitted_rows_are_invisible() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(&db, "order.created", &calls, |_| Ok(()), config());

    let mut tx = db.pool.begin().await?;
    enqueue(&mut tx, app, &NewEvent::new("order.created", payload(1))).await?;
    tx.rollback().await?;
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);

    let mut tx = db.pool.begin().await?;
    let id = enqueue(&mut tx, app, &NewEvent::new("order.created", payload(2))).await?;
    let before_commit = dispatcher.run_once().await?;
    assert_eq!(
        before_commit.claimed, 0,
        "a dispatcher must not see an uncommitted row"
    );
    tx.commit().await?;
    let after = dispatcher.run_until_idle().await?;
    assert_eq!(after.completed, 1);
    assert_eq!(calls.of(id), 1);
    assert_eq!(calls.total(), 1);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn idempotency_key_returns_existing_row_while_it_exists() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let other = db.app("other").await?;
    let event = NewEvent::new("order.created", payload(1)).with_idempotency_key("order-1");
    let first = enqueue_committed(&db.pool, app, event.clone()).await?;
    let second = enqueue_committed(&db.pool, app, event.clone()).await?;
    assert_eq!(first, second);
    // Keys are per app.
    let elsewhere = enqueue_committed(&db.pool, other, event.clone()).await?;
    assert_ne!(first, elsewhere);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 2);

    // Batch: a key already held, and a key repeated inside the batch.
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(
        &mut tx,
        app,
        &[
            event.clone(),
            NewEvent::new("order.created", payload(2)).with_idempotency_key("order-2"),
            NewEvent::new("order.created", payload(3)).with_idempotency_key("order-2"),
            NewEvent::new("order.created", payload(4)),
        ],
    )
    .await?;
    tx.commit().await?;
    assert_eq!(ids[0], first);
    assert_eq!(ids[1], ids[2]);
    assert_ne!(ids[3], ids[1]);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 4);

    // Once the row is handled (deleted) the key is free again.
    let calls = Calls::default();
    recording(&db, "order.created", &calls, |_| Ok(()), config())
        .run_until_idle()
        .await?;
    let third = enqueue_committed(&db.pool, app, event).await?;
    assert_ne!(third, first);
    Ok(())
}

#[tokio::test]
async fn sql_function_enqueues_with_the_same_semantics() -> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let calls = Calls::default();
    let dispatcher = recording(&db, "from.sql", &calls, |_| Ok(()), config());
    let first: uuid::Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue('shop', 'from.sql', '{\"x\":1}', p_idempotency_key => 'k')",
    )
    .fetch_one(&db.pool)
    .await?;
    let again: uuid::Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue('shop', 'from.sql', '{\"x\":2}', p_idempotency_key => 'k')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(first, again);
    assert_eq!(first.get_version_num(), 7, "SQL-side ids are UUIDv7 too");
    let mut tx = db.pool.begin().await?;
    sqlx::query("SELECT outbox_enqueue('shop', 'from.sql')")
        .execute(&mut *tx)
        .await?;
    tx.rollback().await?;
    let err = sqlx::query("SELECT outbox_enqueue('nope', 'from.sql')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown app"), "{err}");
    let report = dispatcher.run_until_idle().await?;
    assert_eq!(report.completed, 1);
    assert_eq!(calls.of(first), 1);
    Ok(())
}
