//! Pausing and resuming topics, cancelling rows, and who serves what,
//! through the API with each role.

use axum::http::StatusCode;
use serde_json::json;

use super::{TestResult, World};

#[tokio::test]
async fn operators_pause_resume_and_cancel_and_viewers_only_look() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let viewer = w.login("viewer@x.io").await?;

    // The viewer may look but not act.
    let (s, body) = w
        .call(
            "PUT",
            "/api/apps/app-a/pauses/mail",
            Some(&viewer),
            Some(json!({})),
        )
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, body) = w
        .call(
            "PUT",
            "/api/apps/app-a/pauses/mail",
            Some(&operator),
            Some(json!({"reason": "SMTP down"})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // Nothing names the topic yet: most often a typo, which the answer says.
    assert_eq!(body["seen"], false, "{body}");
    w.dead_letter(w.app_a, "mail").await?;
    let (s, body) = w
        .call("PUT", "/api/apps/app-a/pauses/mail", Some(&operator), None)
        .await?;
    assert_eq!(s, StatusCode::OK, "pausing twice is not an error");
    assert_eq!(body["seen"], true, "{body}");
    let (s, body) = w
        .call("GET", "/api/apps/app-a/pauses", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body[0]["topic"], "mail");
    assert_eq!(body[0]["reason"], "SMTP down");
    assert_eq!(body[0]["paused_by"], "operator@x.io");
    // Another app's pauses are its own.
    let (s, _) = w
        .call("GET", "/api/apps/app-b/pauses", Some(&operator), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = w
        .call(
            "DELETE",
            "/api/apps/app-a/pauses/mail",
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = w
        .call(
            "DELETE",
            "/api/apps/app-a/pauses/mail",
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // Cancel: by topic, then by id; each row becomes an ignored dead letter.
    let mut tx = w.db.pool.begin().await?;
    let events: Vec<outbox_core::NewEvent> = ["old", "old", "dup"]
        .iter()
        .map(|t| outbox_core::NewEvent::new(*t, json!({})))
        .collect();
    let ids = outbox_core::enqueue_batch(&mut tx, w.app_a, &events).await?;
    tx.commit().await?;
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/cancel",
            Some(&operator),
            Some(json!({"topic": "old", "reason": "retired"})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (body["cancelled"].as_u64(), body["more"].as_bool()),
        (Some(2), Some(false))
    );
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/cancel",
            Some(&operator),
            Some(json!({"ids": [ids[2]], "reason": "duplicate"})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["ids"], json!([ids[2]]));
    let (s, body) = w
        .call("GET", "/api/apps/app-a/dead-letters", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    let ignored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters WHERE resolution = 'ignored' AND last_error LIKE 'cancelled by operator@x.io: %'",
    )
    .fetch_one(&w.db.pool)
    .await?;
    assert_eq!(ignored, 3);

    // Bad input names the field; nothing is cancelled.
    for (body, field) in [
        (
            json!({"topic": "t", "ids": [ids[0]], "reason": "r"}),
            "exactly one of ids",
        ),
        (json!({"topic": "t", "reason": ""}), "reason"),
        (json!({"topic": "t"}), "reason"),
        (json!({"ids": [], "reason": "r"}), "ids"),
        (json!({"topic": "t", "reason": "r", "limit": 3}), "limit"),
    ] {
        let (s, answer) = w
            .call(
                "POST",
                "/api/apps/app-a/outbox/cancel",
                Some(&operator),
                Some(body),
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{message}");
    }

    // Who serves what: nobody yet.
    let (s, body) = w
        .call("GET", "/api/apps/app-a/processes", Some(&viewer), None)
        .await?;
    assert_eq!((s, body), (StatusCode::OK, json!([])));

    // Rows by state, as the leader's sampler last counted them: none before
    // it has (only the topic with a dead letter shows); then the rows nobody
    // serves, with their age.
    let states = "/api/apps/app-a/topics";
    let (s, body) = w.call("GET", states, Some(&viewer), None).await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body.as_array().map(|topics| topics
            .iter()
            .map(|t| (
                t["topic"].clone(),
                t["dead_letters"].clone(),
                t["sampled_at"].clone()
            ))
            .collect::<Vec<_>>()),
        Some(vec![(json!("mail"), json!(1), json!(null))]),
        "{body}"
    );
    let mut tx = w.db.pool.begin().await?;
    outbox_core::enqueue(
        &mut tx,
        w.app_a,
        &outbox_core::NewEvent::new("report.render", json!({})),
    )
    .await?;
    tx.commit().await?;
    outbox_core::store::outbox::record_state_counts(&w.db.pool).await?;
    let (s, body) = w.call("GET", states, Some(&viewer), None).await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    let waiting = body
        .as_array()
        .and_then(|topics| topics.iter().find(|t| t["topic"] == "report.render"))
        .ok_or(format!("no report.render in {body}"))?;
    assert_eq!(
        (&waiting["due"], &waiting["unserved"]),
        (&json!(1), &json!(1))
    );
    assert!(waiting["oldest_unserved_at"].is_string(), "{body}");
    assert_eq!(
        (&waiting["paused"], &waiting["dead_letters"]),
        (&json!(false), &json!(0))
    );
    // A paused topic and one with dead letters show without rows of their
    // own, as on the dashboard's overview.
    let (s, body) = w
        .call(
            "PUT",
            "/api/apps/app-a/pauses/mail.digest",
            Some(&operator),
            Some(json!({"reason": "smtp down"})),
        )
        .await?;
    assert!(s.is_success(), "{body}");
    w.dead_letter(w.app_a, "invoice.compensate").await?;
    let (_, body) = w.call("GET", states, Some(&viewer), None).await?;
    let topic = |name: &str| {
        body.as_array()
            .and_then(|topics| topics.iter().find(|t| t["topic"] == name))
            .cloned()
            .unwrap_or_default()
    };
    let paused = topic("mail.digest");
    assert_eq!(
        (&paused["paused"], &paused["due"], &paused["sampled_at"]),
        (&json!(true), &json!(0), &json!(null)),
        "{body}"
    );
    assert_eq!(topic("invoice.compensate")["dead_letters"], 1, "{body}");
    let (s, _) = w
        .call("GET", "/api/apps/app-b/topics", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "another app's topics are its own");
    Ok(())
}

#[tokio::test]
async fn operators_limit_topics_and_bad_limits_are_refused_by_name() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let viewer = w.login("viewer@x.io").await?;
    let path = "/api/apps/app-a/limits/report.render";

    let (s, body) = w
        .call("PUT", path, Some(&viewer), Some(json!({"max_running": 2})))
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    for (bad, field) in [
        (json!({"max_running": 0}), "max_running"),
        (json!({"max_running": -1}), "max_running"),
        (json!({"max_running": 10_001}), "max_running"),
        (json!({"max_running": "2"}), "max_running"),
        (json!({}), "max_running"),
        (json!({"rate_per_sec": 0}), "rate_per_sec"),
        (json!({"rate_per_sec": -2.5}), "rate_per_sec"),
        (json!({"rate_per_sec": 1e9}), "rate_per_sec"),
        (json!({"rate_per_sec": 1e-300}), "rate_per_sec"),
        (json!({"rate_per_sec": 5, "burst": 0}), "burst"),
        (json!({"max_running": 2, "burst": 3}), "burst"),
        (json!({"max_running_per_key": 0}), "max_running_per_key"),
        (
            json!({"max_running_per_key": 20_000}),
            "max_running_per_key",
        ),
    ] {
        let (s, body) = w
            .call("PUT", path, Some(&operator), Some(bad.clone()))
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "{bad}: {body}"
        );
    }
    let (s, body) = w
        .call(
            "PUT",
            path,
            Some(&operator),
            Some(json!({"max_running": 2})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Nothing names report.render in the app yet: the answer says so.
    assert_eq!(
        body,
        json!({"topic": "report.render", "seen": false, "max_running": 2,
               "max_running_per_key": null, "rate_per_sec": null, "burst": null})
    );
    let (s, body) = w
        .call(
            "PUT",
            path,
            Some(&operator),
            Some(json!({"max_running": 3, "max_running_per_key": 1})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "setting again changes the limit: {body}");
    let (s, body) = w
        .call(
            "PUT",
            "/api/apps/app-a/limits/partner.call",
            Some(&operator),
            Some(json!({"rate_per_sec": 2.5})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["burst"], 3, "one second's worth, rounded up: {body}");
    let (s, body) = w
        .call("GET", "/api/apps/app-a/limits", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body[0]["topic"], "partner.call");
    assert_eq!(body[0]["rate_per_sec"], 2.5);
    assert_eq!(body[0]["max_running"], json!(null));
    assert_eq!(body[1]["topic"], "report.render");
    assert_eq!(body[1]["max_running"], 3);
    assert_eq!(body[1]["max_running_per_key"], 1);
    assert_eq!(body[1]["running"], 0);
    assert_eq!(body[1]["set_by"], "operator@x.io");
    let (s, _) = w
        .call("GET", "/api/apps/app-b/limits", Some(&operator), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "another app's limits are its own");
    let (s, _) = w.call("DELETE", path, Some(&viewer), None).await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "a viewer cannot remove a limit");
    let (s, _) = w.call("DELETE", path, Some(&operator), None).await?;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = w.call("DELETE", path, Some(&operator), None).await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    Ok(())
}

#[tokio::test]
async fn the_activity_api_answers_one_entry_per_minute_for_the_apps_viewers() -> TestResult {
    let w = World::new().await?;
    outbox_core::store::activity::record(
        &w.db.pool,
        &[outbox_core::store::activity::ActivityDelta {
            app_id: w.app_a,
            topic: "mail".into(),
            completed: 7,
            failed: 2,
            dead_lettered: 1,
        }],
    )
    .await?;
    let viewer = w.login("viewer@x.io").await?;
    let (s, body) = w
        .call(
            "GET",
            "/api/apps/app-a/activity?minutes=3",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    let minutes = body.as_array().ok_or("not a list")?;
    assert_eq!(minutes.len(), 3);
    assert_eq!(minutes[2]["completed"], 7);
    assert_eq!(minutes[2]["failed"], 2);
    assert_eq!(minutes[0]["completed"], 0);
    let (s, body) = w
        .call(
            "GET",
            "/api/apps/app-a/activity?topic=other",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(60), "the default hour");
    assert!(
        body.as_array()
            .ok_or("list")?
            .iter()
            .all(|m| m["completed"] == 0)
    );
    for (uri, status) in [
        (
            "/api/apps/app-a/activity?minutes=0",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/apps/app-a/activity?minutes=1441",
            StatusCode::BAD_REQUEST,
        ),
        ("/api/apps/app-b/activity", StatusCode::NOT_FOUND),
    ] {
        let (s, body) = w.call("GET", uri, Some(&viewer), None).await?;
        assert_eq!(s, status, "{uri}: {body}");
    }
    Ok(())
}
