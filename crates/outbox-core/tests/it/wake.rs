//! The insert trigger's wake protocol (migration 0013, `store::wake`):
//! inserts notify only while a dispatcher sleeps, and a dispatcher going to
//! sleep learns whether an insert that may have missed the moment is open.

use std::time::Duration;

use outbox_core::store::wake;
use outbox_core::{NewEvent, enqueue};
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn insert(conn: &mut PgConnection, app: Uuid) -> Result<(), outbox_core::Error> {
    enqueue(conn, app, &NewEvent::new("t", json!({}))).await?;
    Ok(())
}

/// Whether a notification arrives within `wait` (a silent channel is only
/// ever proven for a while; the wait is long next to a local NOTIFY).
async fn notified(listener: &mut PgListener, wait: Duration) -> Result<bool, sqlx::Error> {
    match tokio::time::timeout(wait, listener.try_recv()).await {
        Ok(got) => Ok(got?.is_some()),
        Err(_) => Ok(false),
    }
}

#[tokio::test]
async fn inserts_notify_only_while_a_dispatcher_sleeps() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut listener = PgListener::connect_with(&db.pool).await?;
    listener.listen(wake::CHANNEL).await?;
    let mut producer = db.pool.acquire().await?;
    let mut sleeper = PgConnection::connect_with(&db.pool.connect_options()).await?;
    let quiet = Duration::from_millis(300);

    insert(&mut producer, app).await?;
    assert!(
        !notified(&mut listener, quiet).await?,
        "notified with nobody asleep"
    );

    assert_eq!(wake::begin_sleep(&mut sleeper).await?, Some(true));
    insert(&mut producer, app).await?;
    assert!(
        notified(&mut listener, Duration::from_secs(5)).await?,
        "a sleeper was not notified"
    );
    // A large plain batch goes in with COPY, which fires the trigger too.
    let batch: Vec<NewEvent> = (0..100).map(|_| NewEvent::new("t", json!({}))).collect();
    outbox_core::enqueue_batch(&mut producer, app, &batch).await?;
    assert!(
        notified(&mut listener, Duration::from_secs(5)).await?,
        "a sleeper was not notified of a copied batch"
    );

    wake::end_sleep(&mut sleeper).await?;
    insert(&mut producer, app).await?;
    assert!(
        !notified(&mut listener, quiet).await?,
        "notified after the sleep ended"
    );

    // A sleeper whose session ends no longer counts.
    assert_eq!(wake::begin_sleep(&mut sleeper).await?, Some(true));
    sleeper.close().await?;
    let freed = outbox_testkit::wait_until(Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_locks
             WHERE locktype = 'advisory' AND classid = 1869968482 AND objid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(false)
    })
    .await;
    assert!(freed, "the closed sleeper's lock was not freed");
    insert(&mut producer, app).await?;
    assert!(
        !notified(&mut listener, quiet).await?,
        "notified for a sleeper that is gone"
    );
    Ok(())
}

#[tokio::test]
async fn a_sleep_is_settled_only_once_inserts_open_before_it_have_ended() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut sleeper = PgConnection::connect_with(&db.pool.connect_options()).await?;

    // Inserted while nobody slept, so it will not notify; still open.
    let mut early = db.pool.begin().await?;
    insert(&mut early, app).await?;
    assert_eq!(wake::begin_sleep(&mut sleeper).await?, Some(false));
    assert!(!wake::settled(&mut sleeper).await?);
    early.commit().await?;
    assert!(wake::settled(&mut sleeper).await?);

    // Two sleepers at once (two dispatchers) share the lock.
    let mut other = PgConnection::connect_with(&db.pool.connect_options()).await?;
    assert_eq!(wake::begin_sleep(&mut other).await?, Some(true));
    // A rolled-back insert holds the gate no longer than its transaction.
    let mut rolled_back = db.pool.begin().await?;
    insert(&mut rolled_back, app).await?;
    assert!(!wake::settled(&mut other).await?);
    rolled_back.rollback().await?;
    assert!(wake::settled(&mut other).await?);
    Ok(())
}
