//! The audit log: operator actions through the API and the dashboard are
//! recorded with who made them, what and how many rows; refused actions are
//! not; the app's viewers read it, escaped on the dashboard.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_core::store::principals;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{TestResult, World};

async fn entries(w: &World, token: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let (s, body) = w
        .call("GET", "/api/apps/app-a/audit", Some(token), None)
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    Ok(body.as_array().cloned().ok_or("not a list")?)
}

#[tokio::test]
async fn operator_actions_are_recorded_with_who_what_and_how_many() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let viewer = w.login("viewer@x.io").await?;
    let d1 = w.dead_letter(w.app_a, "mail").await?;
    w.dead_letter(w.app_a, "mail").await?;
    w.dead_letter(w.app_a, "sms").await?;

    // A pause with a hostile reason, a second pause (a no-op), a resume of
    // a topic that is not paused (refused): one entry.
    let reason = "<script>alert(1)</script> SMTP down";
    let (s, _) = w
        .call(
            "PUT",
            "/api/apps/app-a/pauses/mail",
            Some(&operator),
            Some(json!({"reason": reason})),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = w
        .call("PUT", "/api/apps/app-a/pauses/mail", Some(&operator), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = w
        .call(
            "DELETE",
            "/api/apps/app-a/pauses/sms",
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A viewer may not act, and is told which role would: nothing recorded.
    let (s, body) = w
        .call("PUT", "/api/apps/app-a/pauses/sms", Some(&viewer), None)
        .await?;
    assert_eq!(
        (s, body["error"]["message"].as_str()),
        (
            StatusCode::FORBIDDEN,
            Some("your role on app-a is viewer; this needs operator or admin")
        ),
        "{body}"
    );

    // A replay and a bulk ignore by filter, through an API key.
    let (s, _) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{d1}/replay"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    let user = principals::user_by_email(&w.db.pool, "operator@x.io")
        .await?
        .ok_or("operator")?;
    let key = outbox_admin::create_api_key(&w.db.pool, user.id, "ops").await?;
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&key),
            Some(json!({"action": "ignore", "filter": {"topic": "mail"}})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], 1);

    let log = entries(&w, &viewer).await?;
    let seen: Vec<(&str, &str, Option<&str>, i64)> = log
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default(),
                e["action"].as_str().unwrap_or_default(),
                e["target"].as_str(),
                e["rows"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let d1 = d1.to_string();
    assert_eq!(
        seen,
        [
            (
                "operator@x.io (API key)",
                "dead_letter.bulk_ignore",
                None,
                1
            ),
            ("operator@x.io", "dead_letter.replay", Some(d1.as_str()), 1),
            ("operator@x.io", "topic.pause", Some("mail"), 0),
        ]
    );
    assert_eq!(log[0]["detail"]["filter"]["topic"], "mail");
    assert_eq!(log[2]["detail"]["reason"], reason);

    // Paging, bad queries, another app.
    let before = log[1]["id"].as_i64().ok_or("id")?;
    let (s, body) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/audit?before={before}&limit=5"),
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
    for uri in [
        "/api/apps/app-a/audit?limit=0",
        "/api/apps/app-a/audit?colour=red",
    ] {
        let (s, _) = w.call("GET", uri, Some(&viewer), None).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}");
    }
    let (s, _) = w
        .call("GET", "/api/apps/app-b/audit", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The dashboard's forms are recorded as their signed-in user, and the
    // page shows the log escaped.
    let (jar, csrf) = w.dashboard_session("operator@x.io").await?;
    let app = || outbox_admin::router(w.state.clone());
    let res = app()
        .oneshot(
            Request::post("/apps/app-a/topics/resume")
                .header(header::COOKIE, &jar)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("csrf={csrf}&topic=mail")))?,
        )
        .await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let log = entries(&w, &viewer).await?;
    assert_eq!(
        (log[0]["actor"].as_str(), log[0]["action"].as_str()),
        (Some("operator@x.io"), Some("topic.resume"))
    );
    let res = app()
        .oneshot(
            Request::get("/apps/app-a/audit")
                .header(header::COOKIE, &jar)
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(res.status(), StatusCode::OK);
    let html = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(
        html.contains("topic.resume")
            && html.contains("&lt;script&gt;")
            && !html.contains("<script>alert"),
        "{html}"
    );

    // A bulk action on every dead letter is recorded as "all", not as a
    // list of ids nobody gave.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&operator),
            Some(json!({"action": "ignore", "all": true})),
        )
        .await?;
    assert_eq!(
        (s, body["changed"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
    let log = entries(&w, &viewer).await?;
    assert_eq!(
        (log[0]["action"].as_str(), log[0]["rows"].as_i64()),
        (Some("dead_letter.bulk_ignore"), Some(1))
    );
    assert_eq!(log[0]["detail"], json!({ "all": true }), "{}", log[0]);
    Ok(())
}

/// An action and its entry commit together: when the entry cannot be
/// written, the action is undone too.
#[tokio::test]
async fn an_action_whose_entry_fails_is_undone() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let dl = w.dead_letter(w.app_a, "mail").await?;
    sqlx::query(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'audit log unavailable'; END $$",
    )
    .execute(&w.db.pool)
    .await?;
    sqlx::query(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log
         FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
    )
    .execute(&w.db.pool)
    .await?;
    let (s, _) = w
        .call("PUT", "/api/apps/app-a/pauses/mail", Some(&operator), None)
        .await?;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let (s, _) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{dl}/replay"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let (pauses, replays): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_topic_pauses),
                (SELECT count(*) FROM outbox WHERE replayed_from IS NOT NULL)",
    )
    .fetch_one(&w.db.pool)
    .await?;
    assert_eq!(
        (pauses, replays),
        (0, 0),
        "an action committed without its entry"
    );
    Ok(())
}

#[tokio::test]
async fn role_grants_and_revocations_are_recorded_on_the_app() -> TestResult {
    let w = World::new().await?;
    let user = principals::user_by_email(&w.db.pool, "viewer@x.io")
        .await?
        .ok_or("no user")?;
    outbox_admin::accounts::grant_role(
        &w.db.pool,
        "cli (root)",
        w.app_a,
        &user,
        principals::Role::Operator,
    )
    .await?;
    assert!(outbox_admin::accounts::revoke_role(&w.db.pool, "cli (root)", w.app_a, &user).await?);
    // Nobody gets a role on the reserved app of unroutable messages.
    let unrouted =
        outbox_core::store::apps::by_slug(&w.db.pool, outbox_core::store::apps::UNROUTED_SLUG)
            .await?;
    let refused = outbox_admin::accounts::grant_role(
        &w.db.pool,
        "cli (root)",
        unrouted.id,
        &user,
        principals::Role::Viewer,
    )
    .await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("reserved")),
        "a role on _unrouted"
    );
    assert!(
        !outbox_admin::accounts::revoke_role(&w.db.pool, "cli (root)", w.app_a, &user).await?,
        "no role left to revoke"
    );
    let root = w.login("root@x.io").await?;
    let log = entries(&w, &root).await?;
    let recorded: Vec<(String, String, String)> = log
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["target"].as_str().unwrap_or_default().to_owned(),
                e["detail"]["role"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        recorded,
        [
            (
                "role.revoke".to_owned(),
                "viewer@x.io".to_owned(),
                String::new()
            ),
            (
                "role.grant".to_owned(),
                "viewer@x.io".to_owned(),
                "operator".to_owned()
            ),
        ],
        "one entry each, the revocation that changed nothing not at all"
    );
    Ok(())
}
