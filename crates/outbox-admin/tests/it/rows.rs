//! One outbox row through the API and the dashboard: its state and attempt
//! history, escaping, roles, and the way to its dead letter once it has one.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_core::NewEvent;
use outbox_core::store::dead_letters;
use outbox_core::store::outbox::{self as store, AttemptHistory, Reschedule, ToDeadLetter};
use serde_json::json;
use tower::ServiceExt;
use uuid::Uuid;

use super::{TestResult, World};

const HOSTILE_ERROR: &str = "<script>alert(1)</script> upstream said no";

/// Enqueues one row of app A and fails its first attempt (worker `w-1`);
/// returns its id and its lease's fencing token.
async fn failed_once(w: &World) -> Result<(Uuid, i64), Box<dyn std::error::Error>> {
    let mut tx = w.db.pool.begin().await?;
    let id = outbox_core::enqueue(
        &mut tx,
        w.app_a,
        &NewEvent::new("mail.send", json!({"to": "a@x.io"})).with_partition_key("customer-7"),
    )
    .await?;
    tx.commit().await?;
    let claimed = store::claim(&w.db.pool, "w-1", 1, Duration::from_secs(30)).await?;
    let lease = claimed.first().ok_or("nothing claimed")?.lease();
    let retry = Reschedule {
        lease,
        delay: Duration::from_secs(600),
        error: Some(HOSTILE_ERROR.into()),
        refund_attempt: false,
    };
    store::reschedule(&w.db.pool, &[retry], AttemptHistory::default()).await?;
    Ok((id, lease.token))
}

async fn page(
    w: &World,
    jar: &str,
    uri: &str,
) -> Result<(StatusCode, Option<String>, String), Box<dyn std::error::Error>> {
    let res = outbox_admin::router(w.state.clone())
        .oneshot(
            Request::get(uri)
                .header(header::COOKIE, jar)
                .body(Body::empty())?,
        )
        .await?;
    let status = res.status();
    let location = res
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let html = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    Ok((status, location, html))
}

#[tokio::test]
async fn a_row_shows_its_state_and_attempt_history_to_its_apps_viewers_only() -> TestResult {
    let w = World::new().await?;
    let (id, _) = failed_once(&w).await?;
    let viewer = w.login("viewer@x.io").await?;
    let root = w.login("root@x.io").await?;

    let (s, body) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/outbox/{id}"),
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "retrying");
    assert_eq!(body["attempt_count"], 1);
    assert_eq!(body["partition_key"], "customer-7");
    assert_eq!(body["attempts"][0]["attempt"], 1);
    assert_eq!(body["attempts"][0]["worker"], "w-1");
    assert_eq!(body["attempts"][0]["error"], HOSTILE_ERROR);

    // Another app's rows (even for an instance admin, who sees every app),
    // unknown ids and anonymous callers see nothing.
    for (uri, token, status) in [
        (
            format!("/api/apps/app-b/outbox/{id}"),
            Some(root.as_str()),
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/api/apps/app-b/outbox/{id}"),
            Some(viewer.as_str()),
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/api/apps/app-a/outbox/{}", Uuid::now_v7()),
            Some(viewer.as_str()),
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/apps/app-a/outbox/not-a-uuid".to_owned(),
            Some(viewer.as_str()),
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/api/apps/app-a/outbox/{id}"),
            None,
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let (s, body) = w.call("GET", &uri, token, None).await?;
        assert_eq!(s, status, "{uri}: {body}");
        assert!(
            body.get("attempts").is_none(),
            "{uri} leaked the row: {body}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_dashboard_shows_a_row_escaped_and_leads_to_its_dead_letter() -> TestResult {
    let w = World::new().await?;
    let (id, token) = failed_once(&w).await?;
    let (jar, _) = w.dashboard_session("viewer@x.io").await?;

    // The look-up form leads to the row's page.
    let (s, to, _) = page(&w, &jar, &format!("/apps/app-a/outbox?id={id}")).await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(
        to.as_deref(),
        Some(format!("/apps/app-a/outbox/{id}").as_str())
    );
    let (s, _, html) = page(&w, &jar, &format!("/apps/app-a/outbox/{id}")).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("id=attempts") && html.contains("w-1"),
        "{html}"
    );
    assert!(html.contains("<td id=state>retrying</td>"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !html.contains("<script>alert"),
        "the error is not escaped: {html}"
    );
    let (s, _, _) = page(&w, &jar, "/apps/app-a/outbox?id=nonsense").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, html) = page(&w, &jar, &format!("/apps/app-a/outbox/{}", Uuid::now_v7())).await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(html.contains("id=gone"), "{html}");
    let (s, _, _) = page(&w, &jar, &format!("/apps/app-b/outbox/{id}")).await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "another app's row");
    let (root_jar, _) = w.dashboard_session("root@x.io").await?;
    let (s, _, html) = page(&w, &root_jar, &format!("/apps/app-b/outbox/{id}")).await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "another app's row, for an admin");
    assert!(html.contains("id=gone"), "{html}");

    // Once dead-lettered, the row's address leads to its dead letter, whose
    // page shows both attempts.
    sqlx::query("UPDATE outbox SET run_at = now(), not_before = NULL WHERE id = $1")
        .bind(id)
        .execute(&w.db.pool)
        .await?;
    let claimed = store::claim(&w.db.pool, "w-2", 1, Duration::from_secs(30)).await?;
    let lease = claimed.first().ok_or("nothing claimed")?.lease();
    assert_eq!(lease.token, token + 1);
    let bury = ToDeadLetter {
        lease,
        error: "permanent: mailbox gone".into(),
        handler: None,
    };
    store::dead_letter(&w.db.pool, &[bury], AttemptHistory::default()).await?;
    let dead = dead_letters::by_original(&w.db.pool, id).await?;
    let dl = dead.first().ok_or("no dead letter")?.id;
    let (s, to, _) = page(&w, &jar, &format!("/apps/app-a/outbox/{id}")).await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(
        to.as_deref(),
        Some(format!("/apps/app-a/dead-letters/{dl}").as_str())
    );
    // Not from another app's address, even for an admin.
    let (s, to, _) = page(&w, &root_jar, &format!("/apps/app-b/outbox/{id}")).await?;
    assert_eq!((s, to), (StatusCode::NOT_FOUND, None));
    let (s, _, html) = page(&w, &jar, &format!("/apps/app-a/dead-letters/{dl}")).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(
        html.contains(r#"data-attempt="1""#)
            && html.contains(r#"data-attempt="2""#)
            && html.contains("w-2")
            && html.contains("permanent: mailbox gone"),
        "{html}"
    );

    // A replay links the dead letter to the row it made, and back.
    let replayed = dead_letters::replay(&w.db.pool, w.app_a, &[dl]).await?;
    let (_, new_row) = *replayed.first().ok_or("not replayed")?;
    let (_, _, html) = page(&w, &jar, &format!("/apps/app-a/dead-letters/{dl}")).await?;
    assert!(
        html.contains(&format!(
            r#"id=replayed-as href="/apps/app-a/outbox/{new_row}""#
        )),
        "{html}"
    );
    let (s, _, html) = page(&w, &jar, &format!("/apps/app-a/outbox/{new_row}")).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(
        html.contains(&format!(
            r#"id=replayed-from href="/apps/app-a/dead-letters/{dl}""#
        )),
        "{html}"
    );
    Ok(())
}
