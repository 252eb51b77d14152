//! The dead-letter API: roles and tenants bound every endpoint; paging,
//! filters, bulk actions and injection attempts.

use axum::http::StatusCode;
use outbox_core::store::dead_letters;
use serde_json::json;
use uuid::Uuid;

use super::{TestResult, World, urlencode};

#[tokio::test]
async fn roles_and_tenants_bound_every_endpoint() -> TestResult {
    let w = World::new().await?;
    let a1 = w.dead_letter(w.app_a, "a.one").await?;
    let a2 = w.dead_letter(w.app_a, "a.two").await?;
    let b1 = w.dead_letter(w.app_b, "b.one").await?;
    let viewer = w.login("viewer@x.io").await?;
    let operator = w.login("operator@x.io").await?;
    let a_admin = w.login("a-admin@x.io").await?;
    let root = w.login("root@x.io").await?;

    // Viewer: reads, cannot change.
    assert_eq!(
        w.call("GET", "/api/apps/app-a/dead-letters", Some(&viewer), None)
            .await?
            .0,
        StatusCode::OK
    );
    assert_eq!(
        w.call(
            "GET",
            &format!("/api/apps/app-a/dead-letters/{a1}"),
            Some(&viewer),
            None
        )
        .await?
        .0,
        StatusCode::OK
    );
    let (count_status, count) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters/count",
            Some(&viewer),
            None,
        )
        .await?;
    assert_eq!(
        (count_status, count["unresolved"].as_i64()),
        (StatusCode::OK, Some(2))
    );
    for action in ["replay", "resolve"] {
        let (s, body) = w
            .call(
                "POST",
                &format!("/api/apps/app-a/dead-letters/{a1}/{action}"),
                Some(&viewer),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    }
    let (s, _) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&viewer),
            Some(json!({"action": "ignore", "ids": [a1]})),
        )
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // App A's people see nothing of app B: 404 by either path, B unchanged.
    for (token, can_manage_a) in [(&viewer, false), (&operator, true), (&a_admin, true)] {
        for (method, uri) in [
            ("GET", "/api/apps/app-b/dead-letters".to_owned()),
            ("GET", "/api/apps/app-b/dead-letters/count".to_owned()),
            ("GET", format!("/api/apps/app-b/dead-letters/{b1}")),
            ("POST", format!("/api/apps/app-b/dead-letters/{b1}/replay")),
            ("POST", format!("/api/apps/app-b/dead-letters/{b1}/resolve")),
            ("GET", format!("/api/apps/app-a/dead-letters/{b1}")),
            ("POST", format!("/api/apps/app-a/dead-letters/{b1}/replay")),
            ("POST", format!("/api/apps/app-a/dead-letters/{b1}/resolve")),
        ] {
            let (s, body) = w.call(method, &uri, Some(token), None).await?;
            // A viewer may not change app A at all: 403 whatever the id, which
            // tells nothing about app B's rows either.
            let expected =
                if method == "POST" && uri.starts_with("/api/apps/app-a") && !can_manage_a {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::NOT_FOUND
                };
            assert_eq!(s, expected, "{method} {uri}: {body}");
        }
        let (s, body) = w
            .call(
                "POST",
                "/api/apps/app-a/dead-letters/bulk",
                Some(token),
                Some(json!({"action": "ignore", "ids": [b1]})),
            )
            .await?;
        assert!(
            s == StatusCode::FORBIDDEN || body["changed"] == 0,
            "{s} {body}"
        );
    }
    let b_row = dead_letters::get(&w.db.pool, w.app_b, b1).await?;
    assert!(b_row.resolved_at.is_none(), "app B's row must be unchanged");
    let (_, apps) = w.call("GET", "/api/apps", Some(&a_admin), None).await?;
    assert_eq!(apps.as_array().map(Vec::len), Some(1), "{apps}");

    // Operator replays (atomically: new outbox row linked, dead letter replayed); a second replay is 409.
    let (s, body) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{a1}/replay"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    let outbox_id: Uuid = body["outbox_id"].as_str().ok_or("outbox id")?.parse()?;
    let (replayed_from, topic): (Option<Uuid>, String) =
        sqlx::query_as("SELECT replayed_from, topic FROM outbox WHERE id = $1")
            .bind(outbox_id)
            .fetch_one(&w.db.pool)
            .await?;
    assert_eq!((replayed_from, topic.as_str()), (Some(a1), "a.one"));
    assert_eq!(
        dead_letters::get(&w.db.pool, w.app_a, a1)
            .await?
            .resolution
            .as_deref(),
        Some("replayed")
    );
    let (s, body) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{a1}/replay"),
            Some(&operator),
            None,
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    assert_eq!(
        outbox_core::store::outbox::count(&w.db.pool).await?,
        1,
        "no second row"
    );

    // Resolve, then the instance admin sees every app.
    let (s, _) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{a2}/resolve"),
            Some(&a_admin),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        dead_letters::get(&w.db.pool, w.app_a, a2)
            .await?
            .resolution
            .as_deref(),
        Some("ignored")
    );
    // An instance admin sees every app, the reserved one of unroutable
    // messages too.
    let (_, apps) = w.call("GET", "/api/apps", Some(&root), None).await?;
    assert_eq!(apps.as_array().map(Vec::len), Some(3), "{apps}");
    assert!(apps.to_string().contains("_unrouted"), "{apps}");
    assert_eq!(
        w.call(
            "GET",
            &format!("/api/apps/app-b/dead-letters/{b1}"),
            Some(&root),
            None
        )
        .await?
        .0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn list_pages_filters_bulk_and_resists_injection() -> TestResult {
    let w = World::new().await?;
    let mut ids = Vec::new();
    for n in 0..7 {
        ids.push(
            w.dead_letter(w.app_a, if n % 2 == 0 { "even" } else { "odd" })
                .await?,
        );
    }
    let root = w.login("root@x.io").await?;
    // Keyset pages of 3, newest first, no overlap.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (s, page) = w
            .call(
                "GET",
                &format!("/api/apps/app-a/dead-letters?limit=3&after={after}"),
                Some(&root),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::OK, "{page}");
        for item in page["items"].as_array().ok_or("items")? {
            seen.push(item["id"].as_str().ok_or("id")?.parse::<Uuid>()?);
        }
        match page["next_cursor"].as_str() {
            Some(c) => after = c.to_owned(),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every row once, newest first");
    let (_, even) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters?topic=even",
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(even["items"].as_array().map(Vec::len), Some(4));
    for hostile in [
        "' OR 1=1 --",
        "even'; DROP TABLE dead_letters; --",
        "%27%20OR%20%271%27%3D%271",
    ] {
        let uri = format!(
            "/api/apps/app-a/dead-letters?topic={}&source={}",
            urlencode(hostile),
            urlencode(hostile)
        );
        let (s, body) = w.call("GET", &uri, Some(&root), None).await?;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["items"].as_array().map(Vec::len), Some(0), "{hostile}");
    }
    let (s, _) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters?after=not-a-cursor",
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters?resolution=bogus",
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A bulk filter that names nothing is refused, not taken for "all".
    for body in [
        json!({"action": "ignore", "filter": {}}),
        json!({"action": "ignore", "filter": {"topic": " ", "source": ""}}),
        json!({"action": "ignore", "filter": {"topic": "odd"}, "all": true}),
    ] {
        let (s, answer) = w
            .call(
                "POST",
                "/api/apps/app-a/dead-letters/bulk",
                Some(&root),
                Some(body.clone()),
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    // Bulk by filter, then by ids.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&root),
            Some(json!({"action": "ignore", "filter": {"topic": "odd"}})),
        )
        .await?;
    assert_eq!((s, body["changed"].as_u64()), (StatusCode::OK, Some(3)));
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&root),
            Some(json!({"action": "replay", "ids": [ids[0], ids[2]]})),
        )
        .await?;
    assert_eq!(
        (s, body["changed"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{body}"
    );
    let (s, _) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&root),
            Some(json!({"action": "explode", "ids": [uuid::Uuid::now_v7()]})),
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // An empty list is refused as a cancel's is, not answered "changed": 0.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            Some(&root),
            Some(json!({"action": "ignore", "ids": []})),
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ids: give at least one")),
        "{body}"
    );
    let (_, count) = w
        .call(
            "GET",
            "/api/apps/app-a/dead-letters/count",
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(count["unresolved"].as_i64(), Some(7 - 3 - 2), "{count}");
    Ok(())
}
