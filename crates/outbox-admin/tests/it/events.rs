//! The producer API: KV writes that fire triggers, events, jobs and
//! trigger management over HTTP.

use axum::http::StatusCode;
use serde_json::json;
use uuid::Uuid;

use super::{TestResult, World};

#[tokio::test]
async fn kv_events_jobs_and_triggers_over_http() -> TestResult {
    let w = World::new().await?;
    let a_admin = w.login("a-admin@x.io").await?;
    let operator = w.login("operator@x.io").await?;
    let viewer = w.login("viewer@x.io").await?;
    // Triggers need AppManageTriggers (admin role); validation errors are 400 with the field named.
    let (s, _) = w
        .call(
            "POST",
            "/api/apps/app-a/triggers",
            Some(&operator),
            Some(json!({"kind": "kv", "name": "t", "target": "h", "collection": "*"})),
        )
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN);
    for (bad, field) in [
        (
            json!({"kind": "kv", "name": "t", "target": "h", "collection": "a*b"}),
            "collection",
        ),
        (
            json!({"kind": "cron", "name": "t", "target": "h", "schedule": "soon"}),
            "schedule",
        ),
        (
            json!({"kind": "webhook", "name": "t", "target": "h"}),
            "kind",
        ),
        // Shown in the console and the CLI: no escape sequence reaches an
        // operator's terminal through them.
        (
            json!({"kind": "kv", "name": "w\u{1b}[2J", "target": "h", "collection": "*"}),
            "name: must not contain control characters (found U+001B)",
        ),
        // Paths take an id or a name, the id first: a name spelt as an id
        // would find another trigger; one with spaces around it would look
        // like another.
        (
            json!({"kind": "cron", "name": "{11BC08EC-1BEA-4BCB-8A22-3597A285370B}", "target": "h", "schedule": "0 3 * * *"}),
            "name: must not be a UUID",
        ),
        (
            json!({"kind": "cron", "name": " nightly ", "target": "h", "schedule": "0 3 * * *"}),
            "name: must not start or end with whitespace",
        ),
        (
            json!({"kind": "dead_letter", "name": "t", "target": "h", "topics": ["x\u{1b}y"]}),
            "must not contain control characters (found U+001B)",
        ),
        (
            json!({"kind": "kv", "name": "t", "target": "h", "collection": "a\u{0}"}),
            "collection",
        ),
        (
            json!({"kind": "cron", "name": "t", "target": "h", "schedule": "* ".repeat(20_000)}),
            "schedule: is 40000 bytes; at most 255",
        ),
        // A filter, not a data set; and another app's trigger matches nothing here.
        (
            json!({"kind": "dead_letter", "name": "t", "target": "h",
                   "topics": (0..101).map(|n| format!("t{n}")).collect::<Vec<_>>()}),
            "topics: 101 entries; at most 100",
        ),
        (
            json!({"kind": "dead_letter", "name": "t", "target": "h",
                   "trigger_ids": [uuid::Uuid::now_v7()]}),
            "trigger_ids: each must be a trigger of this app",
        ),
        (
            json!({"kind": "dead_letter", "name": "t", "target": "h", "sources": [""]}),
            "sources: \"\": must be 1 to 255 bytes",
        ),
        (
            json!({"kind": "kv", "name": "t", "target": "h", "collection": "*", "ops": ["put", "frobnicate"]}),
            "ops: \"frobnicate\" is not an operation: give put, delete or both",
        ),
        // A field of another kind would have been dropped without a word.
        (
            json!({"kind": "kv", "name": "t", "target": "h", "collection": "inv:*", "schedule": "0 3 * * *"}),
            "schedule: belongs to cron triggers, not to a kv trigger",
        ),
        (
            json!({"kind": "cron", "name": "t", "target": "h", "schedule": "0 3 * * *", "collection": "inv:*"}),
            "collection: belongs to kv triggers, not to a cron trigger",
        ),
    ] {
        let (s, body) = w
            .call(
                "POST",
                "/api/apps/app-a/triggers",
                Some(&a_admin),
                Some(bad),
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{body}"
        );
    }
    let (s, body) = w.call("POST", "/api/apps/app-a/triggers", Some(&a_admin), Some(json!({"kind": "kv", "name": "orders", "target": "orders.changed", "collection": "orders:*", "ops": ["put", "put"]}))).await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (_, list) = w
        .call("GET", "/api/apps/app-a/triggers", Some(&viewer), None)
        .await?;
    assert_eq!(list[0]["collection_glob"], "orders:*");
    assert_eq!(list[0]["ops"], json!(["put"]), "each operation once");
    // What a dead-letter trigger takes is listed too.
    let orders_trigger = list[0]["id"].clone();
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/triggers",
            Some(&a_admin),
            Some(
                json!({"kind": "dead_letter", "name": "void-failed", "target": "invoice.void",
                        "topics": ["invoice.render"], "trigger_ids": [orders_trigger]}),
            ),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (_, listed) = w
        .call("GET", "/api/apps/app-a/triggers", Some(&viewer), None)
        .await?;
    let void = listed
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == "void-failed"))
        .ok_or("the dead-letter trigger is listed")?;
    assert_eq!(
        (&void["topics"], &void["sources"], &void["trigger_ids"]),
        (
            &json!(["invoice.render"]),
            &json!([]),
            &json!([orders_trigger])
        ),
        "{void}"
    );
    assert_eq!(list[0]["topics"], serde_json::Value::Null, "not for kv");
    // A trigger is named by its id or its name, as in the CLI.
    let (s, one) = w
        .call(
            "GET",
            "/api/apps/app-a/triggers/orders",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!((s, &one["id"]), (StatusCode::OK, &orders_trigger), "{one}");
    for (action, changed) in [("disable", true), ("disable", false), ("enable", true)] {
        let (s, body) = w
            .call(
                "POST",
                &format!("/api/apps/app-a/triggers/orders/{action}"),
                Some(&a_admin),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["changed"], changed, "{action}: {body}");
    }

    // A KV write fires the trigger in the same transaction; versions are optimistic.
    let (s, _) = w
        .call(
            "PUT",
            "/api/apps/app-a/kv/orders:eu/o1",
            Some(&viewer),
            Some(json!({"value": 1})),
        )
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "viewers cannot write");
    let (s, body) = w
        .call(
            "PUT",
            "/api/apps/app-a/kv/orders:eu/o1",
            Some(&operator),
            Some(json!({"value": {"total": 9}, "expected_version": 0})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], 1);
    let fired: Uuid = body["fired"][0].as_str().ok_or("fired")?.parse()?;
    let (topic, trigger): (String, Option<Uuid>) =
        sqlx::query_as("SELECT topic, trigger_id FROM outbox WHERE id = $1")
            .bind(fired)
            .fetch_one(&w.db.pool)
            .await?;
    assert_eq!(topic, "orders.changed");
    assert!(trigger.is_some());
    let (s, body) = w
        .call(
            "PUT",
            "/api/apps/app-a/kv/orders:eu/o1",
            Some(&operator),
            Some(json!({"value": 2, "expected_version": 0})),
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    let (s, entry) = w
        .call(
            "GET",
            "/api/apps/app-a/kv/orders:eu/o1",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(
        (s, entry["value"]["total"].as_i64()),
        (StatusCode::OK, Some(9))
    );
    let (s, body) = w
        .call(
            "DELETE",
            "/api/apps/app-a/kv/users/u1",
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // Events and jobs: one transaction each, the outbox id back.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/events/user.signed_up",
            Some(&operator),
            Some(json!({"payload": {"id": 1}})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/jobs/reports",
            Some(&operator),
            Some(json!({"payload": {}, "ordering_key": "r", "idempotency_key": "r-1"})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (_, again) = w
        .call(
            "POST",
            "/api/apps/app-a/jobs/reports",
            Some(&operator),
            Some(json!({"payload": {}, "idempotency_key": "r-1"})),
        )
        .await?;
    assert_eq!(again["id"], body["id"], "idempotent");
    let sources: Vec<String> =
        sqlx::query_scalar("SELECT source FROM outbox WHERE trigger_id IS NULL ORDER BY id")
            .fetch_all(&w.db.pool)
            .await?;
    assert_eq!(sources, vec!["pubsub", "queue"]);
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/jobs/urgent",
            Some(&operator),
            Some(json!({"payload": {}, "priority": 7, "partition_key": "acme"})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (priority, key): (i16, Option<String>) =
        sqlx::query_as("SELECT priority, partition_key FROM outbox WHERE topic = 'urgent'")
            .fetch_one(&w.db.pool)
            .await?;
    assert_eq!((priority, key.as_deref()), (7, Some("acme")));
    // Another app's KV is out of reach.
    let (s, _) = w
        .call(
            "PUT",
            "/api/apps/app-b/kv/x/y",
            Some(&a_admin),
            Some(json!({"value": 1})),
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn only_an_apps_admins_write_to_a_webhook_topic() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let a_admin = w.login("a-admin@x.io").await?;
    let topic = "webhook%3Ahttp%3A%2F%2F127.0.0.1%3A9%2Finternal";
    for path in ["events", "jobs", "invoke"] {
        let (s, body) = w
            .call(
                "POST",
                &format!("/api/apps/app-a/{path}/{topic}"),
                Some(&operator),
                Some(json!({"payload": {"x": 1}})),
            )
            .await?;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("webhook:") && message.contains("admins"),
            "{message}"
        );
    }
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&w.db.pool)
        .await?;
    assert_eq!(written, 0, "nothing was written");
    // The app's admin (who may point a trigger at the URL anyway) may.
    let (s, body) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/events/{topic}"),
            Some(&a_admin),
            Some(json!({"payload": {"x": 1}})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // Other topics stay the operator's to write.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/events/orders.created",
            Some(&operator),
            Some(json!({"payload": {"x": 1}})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    Ok(())
}
