//! Replaying dead letters of the consumer runtime (source `nats`).

use outbox_core::store::dead_letters::{self, External};
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two dead letters of the consumer runtime for one message of `app`
/// (a message given up twice): its id and theirs.
async fn two_dead_letters_of_one_message(
    db: &TestDb,
    app: Uuid,
) -> Result<(Uuid, Vec<Uuid>), Box<dyn std::error::Error>> {
    let original = Uuid::now_v7();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            dead_letters::insert_external(
                &db.pool,
                &External {
                    app_id: app,
                    original_event_id: original,
                    source: "nats",
                    topic: "tenant.shop.order.created",
                    handler: Some("consume-x"),
                    payload: &json!({"order": 1}),
                    headers: &json!({"outbox-topic": "order.created"}),
                    attempt_count: 3,
                    last_error: "invalid order",
                },
            )
            .await?,
        );
    }
    Ok((original, ids))
}

/// The message ids of the first two replays of the message `original`.
fn first_two_replays(original: impl std::fmt::Display) -> [String; 2] {
    [
        format!("{original}:replay:1"),
        format!("{original}:replay:2"),
    ]
}

/// The message ids of the rows the replays enqueued, in order.
async fn replayed_message_ids(db: &TestDb) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT headers->>'outbox-msg-id' FROM outbox WHERE topic = 'order.created' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
}

#[tokio::test]
async fn each_replay_of_a_message_gets_a_message_id_of_its_own_even_in_one_call() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let (original, ids) = two_dead_letters_of_one_message(&db, shop).await?;
    let replayed = dead_letters::replay(&mut *db.pool.acquire().await?, shop, &ids).await?;
    assert_eq!(replayed.len(), 2);
    let mut message_ids = replayed_message_ids(&db).await?;
    message_ids.dedup();
    assert_eq!(
        message_ids,
        first_two_replays(original),
        "routed by their own topic, each under its own id"
    );
    Ok(())
}

#[tokio::test]
async fn replays_of_one_message_at_once_take_turns_and_get_ids_of_their_own() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let (original, ids) = two_dead_letters_of_one_message(&db, shop).await?;

    // The first replay's transaction is still open when the second starts.
    let mut first = db.pool.begin().await?;
    dead_letters::replay(&mut first, shop, &ids[..1]).await?;
    let pool = db.pool.clone();
    let second_id = ids[1];
    let second = tokio::spawn(async move {
        let mut conn = pool.acquire().await?;
        dead_letters::replay(&mut conn, shop, &[second_id]).await
    });
    // The second waits for the first's lock rather than counting without it.
    let waited = outbox_testkit::wait_until(std::time::Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&db.pool)
        .await
        .is_ok_and(|n| n > 0)
    })
    .await;
    assert!(waited, "the second replay did not wait for the first");
    first.commit().await?;
    assert_eq!(second.await??.len(), 1);

    let message_ids = replayed_message_ids(&db).await?;
    assert_eq!(message_ids, first_two_replays(original));
    Ok(())
}

#[tokio::test]
async fn the_automatic_replay_skips_a_message_an_operator_is_replaying_instead_of_waiting()
-> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let (original, ids) = two_dead_letters_of_one_message(&db, shop).await?;
    sqlx::query(
        "UPDATE dead_letters SET replay_due_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(ids[1])
    .execute(&db.pool)
    .await?;

    // An operator's replay of the first holds the message's turn...
    let mut operator = db.pool.begin().await?;
    dead_letters::replay(&mut operator, shop, &ids[..1]).await?;
    // ...so the automatic replay passes the second by, at once.
    let mut replayer = db.pool.begin().await?;
    let replayed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        dead_letters::replay_due(&mut replayer, 100),
    )
    .await??;
    assert!(replayed.is_empty(), "{replayed:?}");
    replayer.commit().await?;
    operator.commit().await?;

    // Its next pass replays it, under the next number.
    let mut replayer = db.pool.begin().await?;
    let replayed = dead_letters::replay_due(&mut replayer, 100).await?;
    replayer.commit().await?;
    assert_eq!(replayed.len(), 1);
    let message_ids = replayed_message_ids(&db).await?;
    assert_eq!(message_ids, first_two_replays(original));
    Ok(())
}
