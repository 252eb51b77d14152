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

pub(super) async fn page(
    w: &World,
    jar: &str,
    uri: &str,
) -> Result<(StatusCode, Option<String>, String), Box<dyn std::error::Error>> {
    answer(
        w,
        Request::get(uri)
            .header(header::COOKIE, jar)
            .body(Body::empty())?,
    )
    .await
}

/// The router's answer to `request`: its status, redirect and page.
async fn answer(
    w: &World,
    request: Request<Body>,
) -> Result<(StatusCode, Option<String>, String), Box<dyn std::error::Error>> {
    let (status, location, _, html) = answer_with_flash(w, request).await?;
    Ok((status, location, html))
}

/// [`answer`], with the flash cookie the answer set (`name=value`), if any.
async fn answer_with_flash(
    w: &World,
    request: Request<Body>,
) -> Result<(StatusCode, Option<String>, Option<String>, String), Box<dyn std::error::Error>> {
    let res = outbox_admin::router(w.state.clone())
        .oneshot(request)
        .await?;
    let status = res.status();
    let location = res
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let flash = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|c| c.starts_with("outboxd_flash="))
        .map(str::to_owned);
    let html = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    Ok((status, location, flash, html))
}

/// Follows a redirect as a browser does: to `to`, with the flash cookie
/// the redirect set.
async fn follow(
    w: &World,
    jar: &str,
    to: Option<String>,
    flash: Option<String>,
) -> Result<(StatusCode, Option<String>, Option<String>, String), Box<dyn std::error::Error>> {
    let to = to.ok_or("no redirect")?;
    let jar = match flash {
        Some(flash) => format!("{jar}; {flash}"),
        None => jar.to_owned(),
    };
    answer_with_flash(
        w,
        Request::get(to)
            .header(header::COOKIE, jar)
            .body(Body::empty())?,
    )
    .await
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
    let replayed = dead_letters::replay(&mut *w.db.pool.acquire().await?, w.app_a, &[dl]).await?;
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

/// Enqueues rows of app A: `n` of topic `mail.send` (payload `{"n": i}`,
/// every other one delayed an hour) and one of `sms.send`; and one of app B.
async fn browsable(w: &World, n: usize) -> Result<Vec<Uuid>, Box<dyn std::error::Error>> {
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut events: Vec<NewEvent> = (0..n)
        .map(|i| {
            let e = NewEvent::new("mail.send", json!({"n": i, "to": {"domain": "x.io"}}));
            if i % 2 == 1 { e.with_run_at(later) } else { e }
        })
        .collect();
    events.push(NewEvent::new("sms.send", json!({"n": 0})));
    let mut tx = w.db.pool.begin().await?;
    let ids = outbox_core::enqueue_batch(&mut tx, w.app_a, &events).await?;
    outbox_core::enqueue_batch(&mut tx, w.app_b, &[NewEvent::new("mail.send", json!({}))]).await?;
    tx.commit().await?;
    Ok(ids)
}

#[tokio::test]
async fn the_api_browses_rows_by_filter_page_by_page_with_bounded_counts() -> TestResult {
    let w = World::new().await?;
    browsable(&w, 30).await?;
    let viewer = w.login("viewer@x.io").await?;

    let (s, body) = w
        .call(
            "GET",
            "/api/apps/app-a/outbox?topic=mail.send&limit=12",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["rows"].as_array().ok_or("rows")?.len(), 12);
    assert_eq!(
        body["count"],
        json!({"rows": 30, "exact": true, "at_least": false})
    );
    assert!(body["before"].is_null());
    assert!(
        body["rows"][0].get("payload").is_none(),
        "lists leave payloads out"
    );
    let mut seen = 12;
    let mut after = body["after"].as_str().ok_or("no next page")?.to_owned();
    loop {
        let (s, body) = w
            .call(
                "GET",
                &format!("/api/apps/app-a/outbox?topic=mail.send&limit=12&after={after}"),
                Some(&viewer),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::OK, "{body}");
        seen += body["rows"].as_array().ok_or("rows")?.len();
        assert!(
            body["before"].is_string(),
            "a later page has a previous one"
        );
        match body["after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, 30);

    for (query, expected) in [
        ("state=scheduled", 15),
        ("state=due&topic=mail.send", 15),
        ("topic=sms.send", 1),
        ("field=n%3D7", 1),
        (
            "payload=%7B%22to%22%3A%7B%22domain%22%3A%22x.io%22%7D%7D",
            30,
        ),
        ("topic=&state=&field=", 31),
        ("created_from=2000-01-01T00%3A00", 31),
    ] {
        let (s, body) = w
            .call(
                "GET",
                &format!("/api/apps/app-a/outbox?{query}&limit=500"),
                Some(&viewer),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::OK, "{query}: {body}");
        assert_eq!(
            body["rows"].as_array().ok_or("rows")?.len(),
            expected,
            "{query}"
        );
        assert_eq!(body["count"]["rows"], expected, "{query}");
    }
    let (s, body) = w
        .call(
            "GET",
            "/api/apps/app-a/outbox/count?topic=mail.send",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body["rows"],
        json!({"rows": 30, "exact": true, "at_least": false})
    );
    assert_eq!(
        body["idle"],
        json!({"rows": 30, "exact": true, "at_least": false})
    );

    // Bad input says what is wrong and what is accepted.
    for (query, says) in [
        ("state=stuck", "state"),
        ("field=novalue", "field"),
        ("payload=%7Bnot-json", "payload"),
        ("payload=5", "payload: must be a JSON object"),
        ("created_from=yesterday", "created_from"),
        ("limit=0", "limit"),
        ("after=garbage", "cursor"),
        (
            "after=1_00000000-0000-0000-0000-000000000000&before=1_00000000-0000-0000-0000-000000000000",
            "not both",
        ),
        ("colour=red", "colour"),
    ] {
        let (s, body) = w
            .call(
                "GET",
                &format!("/api/apps/app-a/outbox?{query}"),
                Some(&viewer),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body.to_string().contains(says), "{query}: {body}");
    }
    // Another app's rows are not listed, even to an instance admin.
    let root = w.login("root@x.io").await?;
    let (s, body) = w
        .call("GET", "/api/apps/app-b/outbox", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let (s, body) = w
        .call("GET", "/api/apps/app-b/outbox", Some(&root), None)
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["count"]["rows"], 1);
    Ok(())
}

#[tokio::test]
async fn operators_retry_and_cancel_a_whole_filter_and_the_audit_log_says_so() -> TestResult {
    let w = World::new().await?;
    let ids = browsable(&w, 10).await?;
    let viewer = w.login("viewer@x.io").await?;
    let operator = w.login("operator@x.io").await?;
    let scheduled = json!({"filter": {"topic": "mail.send", "state": "scheduled"}});

    let (s, _) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/retry",
            Some(&viewer),
            Some(scheduled.clone()),
        )
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "viewers do not act");
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/retry",
            Some(&operator),
            Some(scheduled.clone()),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["retried"], 5);
    assert_eq!(body["more"], false);
    let (_, body) = w
        .call(
            "GET",
            "/api/apps/app-a/outbox/count?state=scheduled",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(body["rows"]["rows"], 0, "{body}");
    // Again: nothing waits any more, nothing is recorded.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/retry",
            Some(&operator),
            Some(scheduled),
        )
        .await?;
    assert_eq!((s, body["retried"].clone()), (StatusCode::OK, json!(0)));

    let cancel = json!({"filter": {"field": "n=3"}, "reason": "customer left"});
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/cancel",
            Some(&operator),
            Some(cancel),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["cancelled"], 1);
    assert_eq!(body["ids"], json!([ids[3]]));
    let dead = dead_letters::by_original(&w.db.pool, ids[3]).await?;
    assert_eq!(
        dead.first().map(|d| d.resolution.clone()),
        Some(Some("ignored".into()))
    );

    // Page fields in an action's filter, two selections, or none are refused.
    for body in [
        json!({"filter": {"topic": "mail.send", "limit": 5}, "reason": "r"}),
        json!({"filter": {"topic": "mail.send"}, "topic": "mail.send", "reason": "r"}),
        json!({"reason": "r"}),
        json!({"filter": {"topic": "nothing.here"}, "reason": " "}),
        // A filter that names nothing (a script's empty variable) is not
        // every row: that takes "all".
        json!({"filter": {"topic": ""}, "reason": "r"}),
        json!({"filter": {}, "reason": "r"}),
        json!({"filter": {"topic": " ", "state": "", "payload": ""}, "reason": "r"}),
        json!({"filter": {"payload": "{}"}, "reason": "r"}),
        json!({"filter": {"payload": []}, "reason": "r"}),
        json!({"filter": {"topic": "mail.send"}, "all": true, "reason": "r"}),
    ] {
        let (s, res) = w
            .call(
                "POST",
                "/api/apps/app-a/outbox/cancel",
                Some(&operator),
                Some(body.clone()),
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {res}");
    }

    let (s, log) = w
        .call("GET", "/api/apps/app-a/audit", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    let actions: Vec<(String, i64)> = log
        .as_array()
        .ok_or("entries")?
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["rows"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("outbox.cancel".to_owned(), 1),
            ("outbox.retry".to_owned(), 5)
        ]
    );
    assert_eq!(
        log[0]["detail"]["filter"]["payload_field"], "n=3",
        "as the operator wrote it"
    );
    assert_eq!(log[0]["detail"]["reason"], "customer left");
    assert_eq!(log[1]["detail"]["filter"]["state"], "scheduled");

    // Every row of the app, when asked for by name; the other app keeps its own.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/cancel",
            Some(&operator),
            Some(json!({"all": true, "reason": "app retired"})),
        )
        .await?;
    assert_eq!(
        (s, body["cancelled"].clone()),
        (StatusCode::OK, json!(10)),
        "{body}"
    );
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT app_id FROM outbox")
        .fetch_all(&w.db.pool)
        .await?;
    assert_eq!(left, [w.app_b]);
    Ok(())
}

/// Posts a dashboard form; returns the status, the redirect and the page.
pub(super) async fn post_form(
    w: &World,
    jar: &str,
    uri: &str,
    form: &str,
) -> Result<(StatusCode, Option<String>, String), Box<dyn std::error::Error>> {
    let request = Request::post(uri)
        .header(header::COOKIE, jar)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))?;
    answer(w, request).await
}

/// [`post_form`], with the flash cookie the answer set.
async fn post_form_with_flash(
    w: &World,
    jar: &str,
    uri: &str,
    form: &str,
) -> Result<(StatusCode, Option<String>, Option<String>, String), Box<dyn std::error::Error>> {
    let request = Request::post(uri)
        .header(header::COOKIE, jar)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))?;
    answer_with_flash(w, request).await
}

#[tokio::test]
async fn the_row_browser_filters_pages_and_acts_on_a_filter_after_showing_the_count() -> TestResult
{
    let w = World::new().await?;
    let ids = browsable(&w, 30).await?;
    let (viewer, _) = w.dashboard_session("viewer@x.io").await?;
    let (operator, csrf) = w.dashboard_session("operator@x.io").await?;

    // A viewer browses: 50 rows a page by default, here 31 on one page.
    let (s, _, html) = page(&w, &viewer, "/apps/app-a/outbox").await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("<p id=row-count>31 rows</p>"), "{html}");
    assert_eq!(html.matches("<tr data-row=").count(), 31);
    assert!(
        !html.contains("id=bulk-filter"),
        "viewers get no action form"
    );
    assert!(
        html.contains("<time datetime="),
        "times are marked for the browser's zone"
    );

    // Filtered, paged by 10, with the filter kept in the page links.
    let (s, _, html) = page(
        &w,
        &viewer,
        "/apps/app-a/outbox?topic=mail.send&state=scheduled&limit=10",
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("<p id=row-count>15 rows</p>"), "{html}");
    assert_eq!(html.matches("<tr data-row=").count(), 10);
    let next = html
        .split("id=page-after href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no next link")?
        .replace("&amp;", "&");
    assert!(
        next.contains("topic=mail.send") && next.contains("state=scheduled"),
        "{next}"
    );
    assert!(
        !html.contains("id=page-before"),
        "the first page has no previous one"
    );
    let (s, _, html) = page(&w, &viewer, &next).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert_eq!(html.matches("<tr data-row=").count(), 5);
    assert!(
        html.contains("id=page-before") && !html.contains("id=page-after"),
        "{html}"
    );
    let (s, _, html) = page(&w, &viewer, "/apps/app-a/outbox?topic=nothing.here").await?;
    assert_eq!(s, StatusCode::OK);
    assert!(
        html.contains("id=rows-empty") && html.contains("Clear it"),
        "{html}"
    );
    let (s, _, html) = page(&w, &viewer, "/apps/app-a/outbox?state=stuck").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(html.contains("state"), "{html}");
    // A misspelt filter is refused, not dropped to show every row.
    let (s, _, html) = page(&w, &viewer, "/apps/app-a/outbox?topc=mail.send").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        html.contains("topc: unknown field (accepted: topic"),
        "{html}"
    );

    // An operator reviews a cancel of the filter: the count first, nothing changed.
    let (s, _, html) = page(
        &w,
        &operator,
        "/apps/app-a/outbox?topic=mail.send&state=scheduled",
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("id=bulk-filter"), "{html}");
    let filter = "topic=mail.send&state=scheduled";
    let review = format!("csrf={csrf}&{filter}&action=cancel&reason=wrong+customer");
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &review).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("<strong>15 rows</strong> not running match")
            && html.contains("Confirm takes the rows that match when it runs"),
        "{html}"
    );
    assert!(
        html.contains(
            "<ul id=confirm-filter><li>topic: <code>mail.send</code></li><li>state: <code>scheduled</code></li></ul>"
        ),
        "the page names the filter it acts on: {html}"
    );
    let (_, _, listed) = page(&w, &viewer, "/apps/app-a/outbox?state=scheduled").await?;
    assert!(
        listed.contains("<p id=row-count>15 rows</p>"),
        "nothing changed yet"
    );
    // Without a filter the action takes every row of the app, and the
    // review says so in so many words.
    let (_, _, html) = page(&w, &operator, "/apps/app-a/outbox").await?;
    assert!(html.contains("Act on every row of the app"), "{html}");
    let everything = format!("csrf={csrf}&action=cancel&reason=all+of+it");
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &everything).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("not running in the app (no filter: every row)"),
        "{html}"
    );
    // Confirmed: done, and the browser says so.
    let (s, to, flash, _) = post_form_with_flash(
        &w,
        &operator,
        "/apps/app-a/outbox/bulk",
        &format!("{review}&confirm=yes"),
    )
    .await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    // The result travels in a cookie, not in the address.
    assert!(
        to.as_deref().is_some_and(|to| !to.contains("done=")),
        "{to:?}"
    );
    assert!(
        flash
            .as_deref()
            .is_some_and(|f| f.contains("done=cancel&rows=15")),
        "{flash:?}"
    );
    let (_, _, cleared, html) = follow(&w, &operator, to.clone(), flash).await?;
    assert!(html.contains("id=flash>Cancelled 15 rows"), "{html}");
    // Reviewed again: nothing is left, and nothing is offered but the way back.
    let (s, _, again) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &review).await?;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert!(
        again.contains("<strong>No row</strong> not running matches this filter: nothing to do.")
            && !again.contains("id=confirm>"),
        "{again}"
    );
    assert_eq!(
        cleared.as_deref(),
        Some("outboxd_flash="),
        "shown once, then cleared"
    );
    assert!(
        html.contains("<p id=row-count>0 rows</p>") || html.contains("id=rows-empty"),
        "{html}"
    );
    // A link that names a result shows none: only an action sets one.
    let (_, _, html) = page(
        &w,
        &operator,
        &format!("{}&done=cancel&rows=10000", to.ok_or("no redirect")?),
    )
    .await?;
    assert!(
        html.contains("<h1>app-a · rows</h1>") && !html.contains("id=flash"),
        "{html}"
    );
    // A cancel without a reason, a viewer, a forged form: refused.
    let (s, _, _) = post_form(
        &w,
        &operator,
        "/apps/app-a/outbox/bulk",
        &format!("csrf={csrf}&action=cancel"),
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, viewer_csrf) = w.dashboard_session("viewer@x.io").await?;
    let (s, _, _) = post_form(
        &w,
        &viewer,
        "/apps/app-a/outbox/bulk",
        &format!("csrf={viewer_csrf}&action=retry&confirm=yes"),
    )
    .await?;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = post_form(
        &w,
        &operator,
        "/apps/app-a/outbox/bulk",
        "csrf=forged&action=retry&confirm=yes",
    )
    .await?;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // One row: retry now from its page, then cancel it (the box must be ticked).
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut tx = w.db.pool.begin().await?;
    let id = outbox_core::enqueue(
        &mut tx,
        w.app_a,
        &NewEvent::new("mail.send", json!({})).with_run_at(later),
    )
    .await?;
    tx.commit().await?;
    let (_, _, html) = page(&w, &operator, &format!("/apps/app-a/outbox/{id}")).await?;
    assert!(
        html.contains("id=retry-now") && html.contains("id=cancel-row"),
        "{html}"
    );
    let (_, _, html) = page(&w, &viewer, &format!("/apps/app-a/outbox/{id}")).await?;
    assert!(!html.contains("id=retry-now"), "viewers get no actions");
    let (s, to, flash, _) = post_form_with_flash(
        &w,
        &operator,
        &format!("/apps/app-a/outbox/{id}/retry"),
        &format!("csrf={csrf}"),
    )
    .await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, _, _, html) = follow(&w, &operator, to, flash).await?;
    assert!(
        html.contains("id=flash>Made 1 row due now.") && html.contains("<td id=state>due</td>"),
        "{html}"
    );
    // Again, on the row now due: nothing changed, and the message says why.
    let (_, to, flash, _) = post_form_with_flash(
        &w,
        &operator,
        &format!("/apps/app-a/outbox/{id}/retry"),
        &format!("csrf={csrf}"),
    )
    .await?;
    let (_, _, _, html) = follow(&w, &operator, to, flash).await?;
    assert!(
        html.contains("id=flash>No row changed: none was waiting"),
        "{html}"
    );
    let (s, _, _) = post_form(
        &w,
        &operator,
        &format!("/apps/app-a/outbox/{id}/cancel"),
        &format!("csrf={csrf}&reason=dup"),
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unconfirmed");
    let (s, to, flash, _) = post_form_with_flash(
        &w,
        &operator,
        &format!("/apps/app-a/outbox/{id}/cancel"),
        &format!("csrf={csrf}&reason=dup&confirm=yes"),
    )
    .await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, to, flash, _) = follow(&w, &operator, to, flash).await?;
    assert_eq!(
        s,
        StatusCode::SEE_OTHER,
        "a cancelled row leads to its dead letter"
    );
    let (_, _, _, html) = follow(&w, &operator, to, flash).await?;
    assert!(
        html.contains("id=flash>Cancelled 1 row") && html.contains("<b id=resolution>ignored</b>"),
        "{html}"
    );
    // The same form again (a second click, a stale tab): nothing is
    // cancelled, and the message says so rather than "Cancelled 1 row".
    let (_, to, flash, _) = post_form_with_flash(
        &w,
        &operator,
        &format!("/apps/app-a/outbox/{id}/cancel"),
        &format!("csrf={csrf}&reason=dup&confirm=yes"),
    )
    .await?;
    let (_, to, flash, _) = follow(&w, &operator, to, flash).await?;
    let (_, _, _, html) = follow(&w, &operator, to, flash).await?;
    assert!(html.contains("id=flash>No row cancelled"), "{html}");
    assert_eq!(ids.len(), 31);
    Ok(())
}

#[tokio::test]
async fn a_pause_or_resume_that_changes_nothing_says_so() -> TestResult {
    let w = World::new().await?;
    let (operator, csrf) = w.dashboard_session("operator@x.io").await?;
    let form = format!("csrf={csrf}&topic=mail.send&reason=smtp");
    let mut said = Vec::new();
    for (step, action) in ["pause", "pause", "resume", "resume"]
        .into_iter()
        .enumerate()
    {
        if step == 1 {
            // Now something names the topic.
            w.dead_letter(w.app_a, "mail.send").await?;
        }
        let (s, to, flash, _) = post_form_with_flash(
            &w,
            &operator,
            &format!("/apps/app-a/topics/{action}"),
            &form,
        )
        .await?;
        assert_eq!(s, StatusCode::SEE_OTHER);
        let (_, _, _, html) = follow(&w, &operator, to, flash).await?;
        let start = html.find("id=flash>").ok_or("no flash")? + "id=flash>".len();
        let end = start + html[start..].find('<').ok_or("unclosed flash")?;
        said.push(html[start..end].to_owned());
    }
    assert_eq!(
        said,
        [
            "Paused mail.send: processes stop claiming its rows within about a second. \
             Nothing names mail.send in this app yet (no rows, no process serving it by name, \
             no dead letters): check the spelling.",
            "mail.send was paused already; nothing changed.",
            "Resumed mail.send.",
            "mail.send was not paused; nothing changed.",
        ]
    );
    // A limit on a topic nothing names says so too; removing it twice
    // changes nothing the second time, and says so.
    let said = said_after(
        &w,
        &operator,
        "/apps/app-a/topics/limit",
        &format!("csrf={csrf}&topic=mail.snd&max_running=2"),
    )
    .await?;
    assert!(
        said.starts_with("Limit set on mail.snd. Nothing names mail.snd"),
        "{said}"
    );
    let mut said = Vec::new();
    for _ in 0..2 {
        said.push(
            said_after(
                &w,
                &operator,
                "/apps/app-a/topics/unlimit",
                &format!("csrf={csrf}&topic=mail.snd"),
            )
            .await?,
        );
    }
    assert_eq!(
        said,
        [
            "Limit removed from mail.snd.",
            "mail.snd had no limit; nothing changed."
        ]
    );
    // A pause whose topic ends with a space (made through the API) is
    // resumed by the page's button, which names it as stored.
    outbox_core::store::pauses::pause(&w.db.pool, w.app_a, "mail.send ", None, None).await?;
    let said = said_after(
        &w,
        &operator,
        "/apps/app-a/topics/resume",
        &format!("csrf={csrf}&topic=mail.send+"),
    )
    .await?;
    assert_eq!(said, "Resumed mail.send .");
    // A field given twice is refused, not read as its first value.
    let (s, _, _, html) = post_form_with_flash(
        &w,
        &operator,
        "/apps/app-a/topics/pause",
        &format!("{form}&topic=other"),
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{html}");
    assert!(html.contains("topic: given more than once"), "{html}");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'topic.pause'")
            .fetch_one(&w.db.pool)
            .await?;
    assert_eq!(audited, 1);
    Ok(())
}

#[tokio::test]
async fn the_dead_letters_older_link_keeps_a_topic_with_query_characters() -> TestResult {
    let w = World::new().await?;
    let (viewer, _) = w.dashboard_session("viewer@x.io").await?;
    // A webhook's URL with a query: '?', '&' and '=' in the topic.
    let topic = "webhook:http://127.0.0.1:9/h?a=1&b=2+c";
    for _ in 0..3 {
        w.dead_letter(w.app_a, topic).await?;
    }
    w.dead_letter(w.app_a, "other").await?;
    let encoded: String = form_urlencoded::byte_serialize(topic.as_bytes()).collect();
    let (s, _, html) = page(
        &w,
        &viewer,
        &format!("/apps/app-a/dead-letters?topic={encoded}&limit=2"),
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert_eq!(html.matches("<tr data-id=").count(), 2, "{html}");
    let start =
        html.find("id=page-older href=\"?").ok_or("no Older link")? + "id=page-older href=\"".len();
    let end = start + html[start..].find('"').ok_or("unclosed link")?;
    let older = html[start..end].replace("&amp;", "&");
    let (s, _, html) = page(&w, &viewer, &format!("/apps/app-a/dead-letters{older}")).await?;
    assert_eq!(s, StatusCode::OK, "{older}: {html}");
    assert_eq!(html.matches("<tr data-id=").count(), 1, "{older}: {html}");
    assert!(!html.contains(">other<"), "{html}");
    Ok(())
}

#[tokio::test]
async fn a_row_id_finds_the_dead_letter_it_became_everywhere() -> TestResult {
    let w = World::new().await?;
    let dead = w.dead_letter(w.app_a, "mail.send").await?;
    let row_id = dead_letters::get(&w.db.pool, w.app_a, dead)
        .await?
        .original_event_id;
    let viewer = w.login("viewer@x.io").await?;
    // The id a dispatcher's "dead-lettered" log line names is the row's.
    let (s, body) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/dead-letters/{row_id}"),
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["id"], dead.to_string());
    let (s, body) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/outbox/{row_id}"),
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("see dead letter {dead}")),
        "{body}"
    );
    // Another app's row id names nothing there.
    let root = w.login("root@x.io").await?;
    let (s, _) = w
        .call(
            "GET",
            &format!("/api/apps/app-b/dead-letters/{row_id}"),
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // So does a bulk action by ids, with ids of either kind.
    let other = w.dead_letter(w.app_a, "mail.send").await?;
    let other_row = dead_letters::get(&w.db.pool, w.app_a, other)
        .await?
        .original_event_id;
    let operator = w.login("operator@x.io").await?;
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&operator),
            Some(json!({"action": "ignore", "ids": [other_row, uuid::Uuid::now_v7()]})),
        )
        .await?;
    assert_eq!(
        (s, body["changed"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
    // Acting by the row's id acts on the dead letter, and answers its id.
    let (s, body) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{row_id}/ignore"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["id"], dead.to_string());
    // A row still waiting is said to be one, not just "not found".
    let mut tx = w.db.pool.begin().await?;
    let waiting =
        outbox_core::enqueue(&mut tx, w.app_a, &NewEvent::new("mail.send", json!({}))).await?;
    tx.commit().await?;
    let err = dead_letters::resolve_id(&w.db.pool, w.app_a, waiting)
        .await
        .err()
        .ok_or("a waiting row named a dead letter")?;
    assert!(err.to_string().contains("still waiting"), "{err}");
    // The dashboard leads either id to the dead letter's own page.
    let (jar, _) = w.dashboard_session("viewer@x.io").await?;
    for asked in [
        format!("/apps/app-a/dead-letters/{row_id}"),
        format!("/apps/app-a/outbox/{dead}"),
        format!("/apps/app-a/outbox/{row_id}"),
    ] {
        let (s, to, html) = page(&w, &jar, &asked).await?;
        assert_eq!(s, StatusCode::SEE_OTHER, "{asked}: {html}");
        assert_eq!(
            to.as_deref(),
            Some(format!("/apps/app-a/dead-letters/{dead}").as_str()),
            "{asked}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn pages_show_an_action_only_to_roles_that_may_take_it() -> TestResult {
    let w = World::new().await?;
    let dead = w.dead_letter(w.app_a, "mail.send").await?;
    outbox_core::store::pauses::pause(&w.db.pool, w.app_a, "mail.send", None, None).await?;
    let pages = [
        "/apps/app-a/topics".to_owned(),
        "/apps/app-a/dead-letters?unresolved=true".to_owned(),
        format!("/apps/app-a/dead-letters/{dead}"),
        "/apps/app-a/triggers".to_owned(),
    ];
    // Forms that change the app, per page, for each role.
    let mut seen = Vec::new();
    for email in ["viewer@x.io", "operator@x.io", "a-admin@x.io"] {
        let (jar, _) = w.dashboard_session(email).await?;
        let mut forms = Vec::new();
        for uri in &pages {
            let (s, _, html) = page(&w, &jar, uri).await?;
            assert_eq!(s, StatusCode::OK, "{email} {uri}: {html}");
            forms.push(html.matches(r#"method=post action="/apps/"#).count());
        }
        seen.push((email, forms));
    }
    assert_eq!(
        seen,
        [
            ("viewer@x.io", vec![0, 0, 0, 0]),
            // resume, pause, limit; bulk by filter and by selection; replay
            // and ignore.
            ("operator@x.io", vec![3, 2, 2, 0]),
            ("a-admin@x.io", vec![3, 2, 2, 1]),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn operators_replay_or_ignore_every_dead_letter_of_a_filter_after_its_count() -> TestResult {
    let w = World::new().await?;
    for _ in 0..3 {
        w.dead_letter(w.app_a, "a.one").await?;
    }
    for _ in 0..2 {
        w.dead_letter(w.app_a, "a.two").await?;
    }
    let (operator, csrf) = w.dashboard_session("operator@x.io").await?;
    let (_, _, html) = page(
        &w,
        &operator,
        "/apps/app-a/dead-letters?unresolved=true&topic=a.one",
    )
    .await?;
    assert!(
        html.contains("id=bulk-filter")
            && html.contains("Every unresolved dead letter of topic a.one"),
        "{html}"
    );
    // The count first; nothing changes yet.
    let review =
        format!("csrf={csrf}&scope=filter&topic=a.one&source=&action=replay&max_attempts=4");
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/dead-letters/bulk", &review).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("<strong>3 unresolved dead letters</strong> of topic a.one.")
            && html.contains("with 4 attempts")
            && html.contains("id=confirm>")
            && html.contains("Confirm takes the dead letters that match when it runs"),
        "{html}"
    );
    assert_eq!(
        dead_letters::count_unresolved(&w.db.pool, w.app_a).await?,
        5
    );
    // The API counts the same filter the same.
    let token = w.login("viewer@x.io").await?;
    let (s, body) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters/count?topic=a.one",
            Some(&token),
            None,
        )
        .await?;
    assert_eq!((s, body["unresolved"].as_i64()), (StatusCode::OK, Some(3)));
    // Confirmed: the filter's three, and no other.
    let (s, to, flash, _) = post_form_with_flash(
        &w,
        &operator,
        "/apps/app-a/dead-letters/bulk",
        &format!("{review}&confirm=yes"),
    )
    .await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, _, _, html) = follow(&w, &operator, to, flash).await?;
    assert!(
        html.contains("id=flash>Replayed 3 dead letters: each is a new row in the outbox."),
        "{html}"
    );
    assert_eq!(
        dead_letters::count_unresolved(&w.db.pool, w.app_a).await?,
        2
    );
    let budgets: Vec<i32> =
        sqlx::query_scalar("SELECT max_attempts FROM outbox WHERE topic = 'a.one'")
            .fetch_all(&w.db.pool)
            .await?;
    assert_eq!(budgets, [4, 4, 4]);
    // Again: nothing is left, and only the way back is offered.
    let (_, _, html) = post_form(&w, &operator, "/apps/app-a/dead-letters/bulk", &review).await?;
    assert!(
        html.contains("<strong>No unresolved dead letter</strong> of topic a.one: nothing to do.")
            && !html.contains("id=confirm>"),
        "{html}"
    );
    // A stored topic that ends with a space is acted on as the list shows
    // it, not trimmed into another topic.
    w.dead_letter(w.app_a, "a.two ").await?;
    let (_, _, html) = page(
        &w,
        &operator,
        "/apps/app-a/dead-letters?unresolved=true&topic=a.two+",
    )
    .await?;
    assert!(
        html.contains(r#"<input type=hidden name=topic value="a.two ">"#),
        "{html}"
    );
    let (_, _, html) = post_form(
        &w,
        &operator,
        "/apps/app-a/dead-letters/bulk",
        &format!("csrf={csrf}&scope=filter&topic=a.two+&source=&trigger_id=&action=ignore"),
    )
    .await?;
    assert!(
        html.contains("<strong>1 unresolved dead letter</strong> of topic a.two ."),
        "{html}"
    );
    // A viewer gets neither the form nor the action.
    let (viewer, viewer_csrf) = w.dashboard_session("viewer@x.io").await?;
    let (s, _, _) = post_form(
        &w,
        &viewer,
        "/apps/app-a/dead-letters/bulk",
        &format!("csrf={viewer_csrf}&scope=filter&topic=a.two&action=ignore&confirm=yes"),
    )
    .await?;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Recorded as asked: the filter's given fields and the attempts, nothing null.
    let audited: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE action = 'dead_letter.bulk_replay' AND rows = 3",
    )
    .fetch_all(&w.db.pool)
    .await?;
    assert_eq!(
        audited,
        [json!({"filter": {"topic": "a.one"}, "max_attempts": 4})]
    );
    Ok(())
}

/// The flash message an action leads to, as the page shows it.
async fn said_after(
    w: &World,
    jar: &str,
    uri: &str,
    form: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let (s, to, flash, html) = post_form_with_flash(w, jar, uri, form).await?;
    assert_eq!(s, StatusCode::SEE_OTHER, "{uri}: {html}");
    let (_, _, _, html) = follow(w, jar, to, flash).await?;
    let start = html.find("id=flash>").ok_or("no flash")? + "id=flash>".len();
    let end = start + html[start..].find('<').ok_or("unclosed flash")?;
    Ok(html[start..end].to_owned())
}

#[tokio::test]
async fn trigger_and_account_actions_say_what_they_did() -> TestResult {
    let w = World::new().await?;
    let (admin, csrf) = w.dashboard_session("a-admin@x.io").await?;
    let said = said_after(
        &w,
        &admin,
        "/apps/app-a/triggers",
        &format!("csrf={csrf}&kind=cron&name=nightly&target=report.build&schedule=0+3+*+*+*"),
    )
    .await?;
    assert_eq!(said, "Created trigger nightly.");
    let id = outbox_core::store::triggers::list(&w.db.pool, w.app_a).await?[0].id;
    let mut said = Vec::new();
    for action in ["disable", "enable", "enable", "delete"] {
        said.push(
            said_after(
                &w,
                &admin,
                &format!("/apps/app-a/triggers/{id}/{action}"),
                &format!("csrf={csrf}"),
            )
            .await?,
        );
    }
    assert_eq!(
        said,
        [
            "Disabled trigger nightly: it fires nothing until enabled.",
            "Enabled trigger nightly: it fires again.",
            "Trigger nightly was enabled already; nothing changed.",
            "Deleted trigger nightly.",
        ]
    );
    // A dead-letter trigger's page says what it takes.
    said_after(
        &w,
        &admin,
        "/apps/app-a/triggers",
        &format!("csrf={csrf}&kind=dead_letter&name=void&target=invoice.void&topics=a.b,+c.d"),
    )
    .await?;
    let (_, _, html) = page(&w, &admin, "/apps/app-a/triggers").await?;
    assert!(
        html.contains("<td>dead letters of topics a.b, c.d</td>"),
        "{html}"
    );
    // An instance admin's actions on an account.
    let (root, root_csrf) = w.dashboard_session("root@x.io").await?;
    w.login("viewer@x.io").await?;
    let viewer = outbox_core::store::principals::user_by_email(&w.db.pool, "viewer@x.io")
        .await?
        .ok_or("viewer")?
        .id;
    let said = said_after(
        &w,
        &root,
        &format!("/admin/accounts/{viewer}/revoke-sessions"),
        &format!("csrf={root_csrf}"),
    )
    .await?;
    assert_eq!(
        said,
        "Signed viewer@x.io out everywhere: 1 session ended (API keys stay)."
    );
    let said = said_after(
        &w,
        &root,
        &format!("/admin/accounts/{viewer}/unlock"),
        &format!("csrf={root_csrf}"),
    )
    .await?;
    assert_eq!(said, "viewer@x.io was not held back; nothing changed.");
    Ok(())
}

#[tokio::test]
async fn a_replay_that_failed_again_links_back_to_the_dead_letter_it_came_from() -> TestResult {
    let w = World::new().await?;
    let first = w.dead_letter(w.app_a, "mail.send").await?;
    let operator = w.login("operator@x.io").await?;
    let (s, body) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{first}/replay"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    let claimed = store::claim(&w.db.pool, "w-1", 1, Duration::from_secs(30)).await?;
    let lease = claimed.first().ok_or("nothing claimed")?.lease();
    let bury = ToDeadLetter {
        lease,
        error: "permanent: mailbox gone".into(),
        handler: None,
    };
    store::dead_letter(&w.db.pool, &[bury], AttemptHistory::default()).await?;
    let second = dead_letters::by_original(&w.db.pool, lease.id)
        .await?
        .first()
        .ok_or("no second dead letter")?
        .id;
    let (s, body) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/dead-letters/{second}"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["replay_of"], first.to_string(), "{body}");
    let (_, listed) = w
        .call("GET", "/api/apps/app-a/dead-letters", Some(&operator), None)
        .await?;
    assert!(
        listed["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|d| d["replay_of"] == first.to_string())),
        "{listed}"
    );
    let (jar, _) = w.dashboard_session("viewer@x.io").await?;
    let (_, _, html) = page(&w, &jar, &format!("/apps/app-a/dead-letters/{second}")).await?;
    assert!(
        html.contains(&format!(
            r#"<a id=replay-of href="/apps/app-a/dead-letters/{first}">"#
        )),
        "{html}"
    );
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_shows_the_keys_of_its_row_with_control_characters_written_out() -> TestResult
{
    let w = World::new().await?;
    let mut tx = w.db.pool.begin().await?;
    let id = outbox_core::enqueue(
        &mut tx,
        w.app_a,
        &NewEvent::new("mail.send", json!({}))
            .with_ordering_key("order-9")
            .with_partition_key("customer\n7")
            .with_run_at(chrono::Utc::now() + chrono::Duration::hours(1)),
    )
    .await?;
    tx.commit().await?;
    let (jar, _) = w.dashboard_session("operator@x.io").await?;
    // A line break shown as a space would make "customer\n7" read "customer 7".
    let (s, _, html) = page(&w, &jar, &format!("/apps/app-a/outbox/{id}")).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains(r"partition: customer\n7"), "{html}");
    let (_, _, html) = page(&w, &jar, "/apps/app-a/outbox").await?;
    assert!(html.contains(r"customer\n7"), "{html}");

    let operator = w.login("operator@x.io").await?;
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/outbox/cancel",
            Some(&operator),
            Some(json!({"ids": [id], "reason": "customer left"})),
        )
        .await?;
    assert_eq!(
        (s, body["cancelled"].clone()),
        (StatusCode::OK, json!(1)),
        "{body}"
    );
    // The dead letter says which customer and which order it was.
    let (s, body) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/dead-letters/{id}"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["ordering_key"], &body["partition_key"]),
        (&json!("order-9"), &json!("customer\n7")),
        "{body}"
    );
    let dead = body["id"].as_str().ok_or("no id")?.to_owned();
    let (_, _, html) = page(&w, &jar, &format!("/apps/app-a/dead-letters/{dead}")).await?;
    assert!(
        html.contains(r"ordering: order-9 · partition: customer\n7"),
        "{html}"
    );
    assert!(html.contains("<h2>Headers</h2>"), "{html}");
    Ok(())
}

#[tokio::test]
async fn row_searches_beyond_their_room_are_refused_and_leave_the_pool_to_the_rest() -> TestResult {
    let mut w = World::new().await?;
    // No room: as if as many searches as the pool can spare were running.
    w.state.row_searches = outbox_admin::api::RowSearches::new(0);
    let viewer = w.login("viewer@x.io").await?;
    for uri in [
        "/api/apps/app-a/outbox?field=customer=c-1",
        "/api/apps/app-a/outbox/count?topic=mail.send",
    ] {
        let res = outbox_admin::router(w.state.clone())
            .oneshot(
                Request::get(uri)
                    .header(header::AUTHORIZATION, format!("Bearer {viewer}"))
                    .body(Body::empty())?,
            )
            .await?;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(
            res.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "{uri}"
        );
    }
    let (s, body) = w
        .call("GET", "/api/apps/app-a/outbox", Some(&viewer), None)
        .await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("too many row searches are running at once"),
        "{s} {body}"
    );
    // Everything else still answers.
    let (s, _) = w
        .call("GET", "/api/apps/app-a/dead-letters", Some(&viewer), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn a_bad_page_cursor_is_named_by_its_parameter_and_not_echoed() -> TestResult {
    let w = World::new().await?;
    let viewer = w.login("viewer@x.io").await?;
    let id = Uuid::now_v7();
    // Junk; a time before 4713 BC, which PostgreSQL cannot hold (it was a
    // 500 and an ERROR line per request); a time past the years rows are
    // stored in.
    let cursors = [
        "x".repeat(3000),
        format!("-210866803200000001_{id}"),
        format!("253402300800000000_{id}"),
    ];
    for cursor in &cursors {
        for field in ["after", "before"] {
            let (s, body) = w
                .call(
                    "GET",
                    &format!("/api/apps/app-a/outbox?{field}={cursor}"),
                    Some(&viewer),
                    None,
                )
                .await?;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{cursor:.40}: {body}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.starts_with(&format!("{field}: not a page cursor")),
                "{message}"
            );
            assert!(message.len() < 200, "{message}");
        }
        let (s, body) = w
            .call(
                "GET",
                &format!("/api/apps/app-a/dead-letters?after={cursor}"),
                Some(&viewer),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{cursor:.40}: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn a_count_that_runs_out_of_time_is_set_right_by_the_first_page() -> TestResult {
    let w = World::new().await?;
    let viewer = w.login("viewer@x.io").await?;
    // The outbox locked for a moment: the count's 50 ms run out (it said
    // "about 24" for a topic without rows), the page's 2 s do not.
    let mut locker = w.db.pool.begin().await?;
    sqlx::query("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await?;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        locker.rollback().await
    });
    let (s, body) = w
        .call(
            "GET",
            "/api/apps/app-a/outbox?topic=nothing.here",
            Some(&viewer),
            None,
        )
        .await?;
    release.await??;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body["count"],
        json!({"rows": 0, "exact": true, "at_least": false}),
        "{body}"
    );
    Ok(())
}

/// The value of the hidden `filter` field of a dashboard form, as the
/// browser reads it from the page.
fn hidden_filter_value(html: &str) -> Result<String, Box<dyn std::error::Error>> {
    let escaped = html
        .split(r#"<input type=hidden name=filter value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no hidden filter")?;
    Ok(escaped
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&"))
}

/// A form body as a browser sends it: every line break of a value as CRLF.
fn as_a_browser_posts(fields: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        let value = value.replace("\r\n", "\n").replace('\n', "\r\n");
        form.append_pair(name, &value);
    }
    form.finish()
}

#[tokio::test]
async fn a_key_with_a_line_break_goes_through_the_confirm_forms_unchanged() -> TestResult {
    let w = World::new().await?;
    let (operator, csrf) = w.dashboard_session("operator@x.io").await?;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut tx = w.db.pool.begin().await?;
    let mut ids = Vec::new();
    for key in ["line\nbreak", "line\r\nbreak"] {
        let event = NewEvent::new("mail.send", json!({}))
            .with_partition_key(key)
            .with_run_at(later);
        ids.push(outbox_core::enqueue(&mut tx, w.app_a, &event).await?);
    }
    tx.commit().await?;

    let (s, _, html) = page(
        &w,
        &operator,
        "/apps/app-a/outbox?partition_key=line%0Abreak",
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("<p id=row-count>1 row</p>"), "{html}");
    let filter = hidden_filter_value(&html)?;
    let review = as_a_browser_posts(&[
        ("csrf", &csrf),
        ("filter", &filter),
        ("action", "cancel"),
        ("reason", "one key only"),
    ]);
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &review).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("<strong>1 row</strong> not running matches this filter"),
        "{html}"
    );
    let confirm = as_a_browser_posts(&[
        ("csrf", &csrf),
        ("filter", &hidden_filter_value(&html)?),
        ("action", "cancel"),
        ("reason", "one key only"),
        ("confirm", "yes"),
    ]);
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &confirm).await?;
    assert_eq!(s, StatusCode::SEE_OTHER, "{html}");
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox WHERE app_id = $1")
        .bind(w.app_a)
        .fetch_all(&w.db.pool)
        .await?;
    assert_eq!(left, [ids[1]], "the row keyed with CRLF stays");

    // A filter given both ways is refused, not guessed at.
    let both = as_a_browser_posts(&[
        ("csrf", &csrf),
        ("filter", "topic=mail.send"),
        ("topic", "other.topic"),
        ("action", "retry"),
    ]);
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &both).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{html}");
    assert!(html.contains("give it one way"), "{html}");
    // Only filter fields ride in it: not a confirmation.
    let smuggled = as_a_browser_posts(&[
        ("csrf", &csrf),
        ("filter", "confirm=yes&topic=mail.send"),
        ("action", "retry"),
    ]);
    let (s, _, html) = post_form(&w, &operator, "/apps/app-a/outbox/bulk", &smuggled).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{html}");
    assert!(
        html.contains("filter: confirm is not a filter field"),
        "{html}"
    );
    Ok(())
}

#[tokio::test]
async fn an_empty_dead_letter_list_says_so_and_offers_no_action() -> TestResult {
    let w = World::new().await?;
    let (operator, csrf) = w.dashboard_session("operator@x.io").await?;
    let id = w.dead_letter(w.app_a, "mail.send").await?;
    let (s, _, html) = page(
        &w,
        &operator,
        "/apps/app-a/dead-letters?unresolved=true&topic=nope",
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("id=dead-letters-empty>No dead letter matches this filter.")
            && !html.contains("id=bulk-filter")
            && !html.contains("id=bulk-selected"),
        "{html}"
    );
    // An action on selected ones leads back to the list it was taken from.
    let (s, _, html) = page(
        &w,
        &operator,
        "/apps/app-a/dead-letters?unresolved=true&topic=mail.send",
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(html.contains("id=bulk-selected"), "{html}");
    let (s, to, _) = post_form(
        &w,
        &operator,
        "/apps/app-a/dead-letters/bulk",
        &format!("csrf={csrf}&topic=mail.send&source=&trigger_id=&action=ignore&ids={id}"),
    )
    .await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(
        to.as_deref()
            .is_some_and(|to| to.contains("topic=mail.send")),
        "{to:?}"
    );
    let (_, _, html) = page(&w, &operator, "/apps/app-a/dead-letters?unresolved=true").await?;
    assert!(
        html.contains("id=dead-letters-empty>No unresolved dead letter"),
        "{html}"
    );
    Ok(())
}

#[tokio::test]
async fn a_waiting_row_says_what_holds_it_and_a_pasted_log_id_finds_it() -> TestResult {
    let w = World::new().await?;
    let (viewer, _) = w.dashboard_session("viewer@x.io").await?;
    let mut tx = w.db.pool.begin().await?;
    let id = outbox_core::enqueue(&mut tx, w.app_a, &NewEvent::new("mail.send", json!({}))).await?;
    tx.commit().await?;
    // As a log line writes it.
    let (s, to, _) = page(&w, &viewer, &format!("/apps/app-a/outbox?id=id%3D{id}")).await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(to, Some(format!("/apps/app-a/outbox/{id}")));
    // No process runs in this test: nobody serves the topic.
    let (s, _, html) = page(&w, &viewer, &format!("/apps/app-a/outbox/{id}")).await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("id=row-waits>No running process serves this topic"),
        "{html}"
    );
    outbox_core::store::pauses::pause(
        &w.db.pool,
        w.app_a,
        "mail.send",
        Some("ops@x.io"),
        Some("SMTP down"),
    )
    .await?;
    let (_, _, html) = page(&w, &viewer, &format!("/apps/app-a/outbox/{id}")).await?;
    assert!(
        html.contains("id=row-waits>Its topic is paused, since")
            && html.contains(" by ops@x.io (SMTP down): no process claims its rows"),
        "{html}"
    );
    Ok(())
}

#[tokio::test]
async fn a_refused_limit_names_the_forms_labels() -> TestResult {
    let w = World::new().await?;
    let (operator, csrf) = w.dashboard_session("operator@x.io").await?;
    for (form, says) in [
        (
            "",
            "At most running, Per partition key or Starts per second",
        ),
        ("&max_running=0", "At most running"),
        ("&rate_per_sec=x", "Starts per second"),
    ] {
        let (s, _, html) = post_form(
            &w,
            &operator,
            "/apps/app-a/topics/limit",
            &format!("csrf={csrf}&topic=report{form}"),
        )
        .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{form}: {html}");
        assert!(
            html.contains(says) && !html.contains("max_running") && !html.contains("rate_per_sec"),
            "{form}: {html}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn dead_letters_page_both_ways_in_the_api_and_the_console() -> TestResult {
    let w = World::new().await?;
    let (viewer_jar, _) = w.dashboard_session("viewer@x.io").await?;
    let viewer = w.login("viewer@x.io").await?;
    for _ in 0..5 {
        w.dead_letter(w.app_a, "mail.send").await?;
    }
    let made: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM dead_letters ORDER BY created_at DESC, id DESC")
            .fetch_all(&w.db.pool)
            .await?;
    let ids = |body: &serde_json::Value| -> Vec<String> {
        body["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| i["id"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let want = |range: std::ops::Range<usize>| -> Vec<String> {
        made[range].iter().map(Uuid::to_string).collect()
    };
    let get = |query: String| {
        let uri = format!("/api/apps/app-a/dead-letters?limit=2{query}");
        let (w, viewer) = (&w, &viewer);
        async move { w.call("GET", &uri, Some(viewer), None).await }
    };
    let (s, first) = get(String::new()).await?;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(ids(&first), want(0..2));
    assert!(first["prev_cursor"].is_null(), "{first}");
    let next = first["next_cursor"].as_str().ok_or("no next_cursor")?;
    let (_, second) = get(format!("&after={next}")).await?;
    assert_eq!(ids(&second), want(2..4));
    let next = second["next_cursor"].as_str().ok_or("no next_cursor")?;
    let (_, third) = get(format!("&after={next}")).await?;
    assert_eq!(ids(&third), want(4..5));
    assert!(third["next_cursor"].is_null(), "{third}");
    // Back: the page before the third is the second, then the first.
    let prev = third["prev_cursor"].as_str().ok_or("no prev_cursor")?;
    let (s, back) = get(format!("&before={prev}")).await?;
    assert_eq!(s, StatusCode::OK, "{back}");
    assert_eq!(ids(&back), want(2..4), "{back}");
    let prev = back["prev_cursor"].as_str().ok_or("no prev_cursor")?;
    let (_, back) = get(format!("&before={prev}")).await?;
    assert_eq!(ids(&back), want(0..2));
    assert!(
        back["prev_cursor"].is_null(),
        "the newest page has none before it: {back}"
    );
    // A full last page has no page after it.
    let (_, all) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters?limit=5",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(ids(&all), want(0..5));
    assert!(all["next_cursor"].is_null(), "{all}");
    let (s, both) = get(format!("&after={next}&before={prev}")).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{both}");

    // The console links both ways.
    let (s, _, html) = page(
        &w,
        &viewer_jar,
        &format!("/apps/app-a/dead-letters?limit=2&after={next}"),
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{html}");
    assert!(
        html.contains("id=page-newer") && !html.contains("id=page-older"),
        "{html}"
    );
    let newer = html
        .split("id=page-newer href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no newer link")?
        .replace("&amp;", "&");
    let (_, _, html) = page(&w, &viewer_jar, &format!("/apps/app-a/dead-letters{newer}")).await?;
    assert!(
        html.contains(&made[2].to_string()) && html.contains(&made[3].to_string()),
        "{newer}: {html}"
    );
    assert!(
        html.contains("id=page-newer") && html.contains("id=page-older"),
        "{html}"
    );
    Ok(())
}
