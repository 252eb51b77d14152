//! Replaying dead letters of the consumer runtime (source `nats`).

use outbox_core::store::dead_letters::{self, External};
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn each_replay_of_a_message_gets_a_message_id_of_its_own_even_in_one_call() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let original = Uuid::now_v7();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            dead_letters::insert_external(
                &db.pool,
                &External {
                    app_id: shop,
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
    let replayed = dead_letters::replay(&db.pool, shop, &ids).await?;
    assert_eq!(replayed.len(), 2);
    let mut message_ids: Vec<String> = sqlx::query_scalar(
        "SELECT headers->>'outbox-msg-id' FROM outbox WHERE topic = 'order.created' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    message_ids.dedup();
    assert_eq!(
        message_ids,
        [
            format!("{original}:replay:1"),
            format!("{original}:replay:2")
        ],
        "routed by their own topic, each under its own id"
    );
    Ok(())
}
