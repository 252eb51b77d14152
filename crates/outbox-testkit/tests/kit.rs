//! The test kit, used the way a service's tests would use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use outbox_core::{NewEvent, enqueue};
use outbox_dispatch::{Event, HandlerError, Registry};
use outbox_testkit::{TestDb, run_until_idle};
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn enqueued_run_advance_and_dead_lettered() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.placed", json!({"order": 7})),
    )
    .await?;
    enqueue(
        &mut tx,
        app,
        &NewEvent::new("invoice.render", json!({"amount": -1})).with_max_attempts(2),
    )
    .await?;
    tx.commit().await?;
    assert_eq!(
        db.enqueued("order.placed").await?,
        vec![json!({"order": 7})]
    );

    let calls = Arc::new(AtomicU32::new(0));
    let handlers = || {
        let calls = calls.clone();
        let mut registry = Registry::new();
        registry
            .register("order.placed", move |_e: Event| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(HandlerError::retry("mail server busy"))
                    } else {
                        Ok(())
                    }
                }
            })
            .register("invoice.render", |_e: Event| async {
                Err(HandlerError::retry("template missing"))
            });
        registry
    };
    // First pass: both fail once and wait for their backoff.
    let first = run_until_idle(&db.pool, handlers()).await?;
    assert_eq!((first.completed, first.retried), (0, 2));
    assert_eq!(
        run_until_idle(&db.pool, handlers()).await?.claimed,
        0,
        "nothing is due yet"
    );
    // An hour later the backoff is over: one succeeds, one is exhausted.
    db.advance(Duration::from_secs(3600)).await?;
    let second = run_until_idle(&db.pool, handlers()).await?;
    assert_eq!((second.completed, second.dead_lettered), (1, 1));
    assert!(db.enqueued("order.placed").await?.is_empty());
    let dead = db.dead_lettered("invoice.render").await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, json!({"amount": -1}));
    assert!(
        dead[0]
            .1
            .as_deref()
            .is_some_and(|e| e.contains("template missing")),
        "{dead:?}"
    );
    Ok(())
}
