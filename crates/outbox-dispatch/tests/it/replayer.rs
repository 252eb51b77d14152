//! The replayer: automatic replay with a doubling quarantine.

use outbox_core::store::dead_letters;
use outbox_testkit::TestDb;
use serde_json::json;

use crate::TestResult;

#[tokio::test]
async fn automatic_replay_doubles_its_quarantine_then_parks_for_an_operator() -> TestResult {
    use outbox_dispatch::HandlerError;
    use outbox_dispatch::maintenance::Replayer;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    dead_letters::set_replay_policy(&db.pool, app, None, Some("sync"), 10, 2).await?;
    let calls = crate::Calls::default();
    let dispatcher = crate::recording(
        &db,
        "sync",
        &calls,
        |_| Err(HandlerError::permanent("partner down")),
        crate::config(),
    );
    let replayer = Replayer::new(db.pool.clone(), std::time::Duration::from_secs(1));
    let first = crate::enqueue_committed(
        &db.pool,
        app,
        outbox_core::NewEvent::new("sync", json!({"n": 1})),
    )
    .await?;
    dispatcher.run_until_idle().await?;
    let quarantine = || async {
        sqlx::query_as::<_, (i32, Option<f64>)>(
            "SELECT replay_round, extract(epoch FROM replay_due_at - created_at)::float8
             FROM dead_letters WHERE resolved_at IS NULL",
        )
        .fetch_one(&db.pool)
        .await
    };
    let (round, delay) = quarantine().await?;
    assert_eq!(round, 0);
    assert!(
        delay.is_some_and(|d| (9.0..=11.0).contains(&d)),
        "first quarantine {delay:?}"
    );
    assert_eq!(replayer.run_once().await?, 0, "not due yet");
    // "Advance the clock" past the quarantine.
    sqlx::query("UPDATE dead_letters SET replay_due_at = now() WHERE replay_due_at IS NOT NULL")
        .execute(&db.pool)
        .await?;
    assert_eq!(replayer.run_once().await?, 1);
    dispatcher.run_until_idle().await?;
    let (round, delay) = quarantine().await?;
    assert_eq!(round, 1);
    assert!(
        delay.is_some_and(|d| (19.0..=21.0).contains(&d)),
        "doubled quarantine {delay:?}"
    );
    sqlx::query("UPDATE dead_letters SET replay_due_at = now() WHERE replay_due_at IS NOT NULL")
        .execute(&db.pool)
        .await?;
    assert_eq!(replayer.run_once().await?, 1);
    dispatcher.run_until_idle().await?;
    // Rounds spent: the last dead letter waits for an operator.
    let (round, delay) = quarantine().await?;
    assert_eq!((round, delay), (2, None));
    assert_eq!(replayer.run_once().await?, 0);
    let resolutions: Vec<Option<String>> =
        sqlx::query_scalar("SELECT resolution FROM dead_letters ORDER BY replay_round")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        resolutions,
        vec![Some("replayed".into()), Some("replayed".into()), None]
    );
    // Each replay links to the dead letter it came from.
    let linked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters d JOIN dead_letters prev ON prev.original_event_id <> d.original_event_id
         WHERE d.replay_round = prev.replay_round + 1",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(linked, 2);
    assert_eq!(calls.of(first), 1);
    assert_eq!(calls.total(), 3, "the event ran three times in all");
    Ok(())
}
