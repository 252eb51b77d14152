//! Accounts and sessions: sign-out, password changes, deleted users and
//! removed roles end access on the next request; the login throttle slows
//! guessing without locking the owner out; the API is strict and says so in
//! its own words; the dashboard's security headers and sign-in CSRF.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode, header};
use outbox_admin::AdminState;
use outbox_core::store::principals;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{PASSWORD, PRE_LOGIN_CSRF, TestResult, World};

type Answer = (StatusCode, HeaderMap, Value);

/// One request to `state`'s router from client address `from`.
async fn send(
    state: &AdminState,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
    from: &str,
) -> Result<Answer, Box<dyn std::error::Error>> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let mut req = req.body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()))?;
    let addr = SocketAddr::new(from.parse()?, 40000);
    req.extensions_mut().insert(ConnectInfo(addr));
    let res = outbox_admin::router(state.clone()).oneshot(req).await?;
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, headers, value))
}

async fn login_from(
    state: &AdminState,
    email: &str,
    password: &str,
    from: &str,
) -> Result<Answer, Box<dyn std::error::Error>> {
    send(
        state,
        "POST",
        "/api/login",
        None,
        Some(json!({"email": email, "password": password})),
        from,
    )
    .await
}

#[tokio::test]
async fn sign_out_password_change_deletion_and_role_removal_end_access_at_once() -> TestResult {
    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    // Sign-out ends exactly that session.
    let first = w.login("operator@x.io").await?;
    let second = w.login("operator@x.io").await?;
    assert_eq!(
        w.call("POST", "/api/logout", Some(&first), None).await?.0,
        StatusCode::OK
    );
    let (s, body) = w.call("GET", "/api/apps", Some(&first), None).await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    assert_eq!(
        w.call("GET", "/api/apps", Some(&second), None).await?.0,
        StatusCode::OK
    );

    // Removing a role: the next request no longer sees the app.
    let list = "/api/apps/app-a/dead-letters";
    assert_eq!(
        w.call("GET", list, Some(&second), None).await?.0,
        StatusCode::OK
    );
    let operator = principals::user_by_email(&w.db.pool, "operator@x.io")
        .await?
        .ok_or("op")?;
    principals::remove_role(&w.db.pool, w.app_a, operator.id).await?;
    assert_eq!(
        w.call("GET", list, Some(&second), None).await?.0,
        StatusCode::NOT_FOUND
    );

    // A password change ends every session of the user.
    let (s, body) = w
        .call(
            "PUT",
            "/api/users/operator@x.io/password",
            Some(&root),
            Some(json!({"password": "a brand new passphrase"})),
        )
        .await?;
    assert_eq!(
        (s, body["sessions_ended"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
    assert_eq!(
        w.call("GET", "/api/apps", Some(&second), None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, _) = w
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"email": "operator@x.io", "password": "a brand new passphrase"})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK);

    // revoke-sessions signs a user out everywhere.
    let viewer = w.login("viewer@x.io").await?;
    let (s, body) = w
        .call(
            "POST",
            "/api/users/viewer@x.io/revoke-sessions",
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(
        (s, body["sessions_ended"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
    assert_eq!(
        w.call("GET", "/api/apps", Some(&viewer), None).await?.0,
        StatusCode::UNAUTHORIZED
    );

    // Deleting a user ends their session and their API keys.
    let a_admin = w.login("a-admin@x.io").await?;
    let a_admin_user = principals::user_by_email(&w.db.pool, "a-admin@x.io")
        .await?
        .ok_or("a")?;
    let key = outbox_admin::create_api_key(&w.db.pool, a_admin_user.id, "ci").await?;
    assert_eq!(
        w.call("GET", "/api/apps", Some(&key), None).await?.0,
        StatusCode::OK
    );
    let (s, _) = w
        .call("DELETE", "/api/users/a-admin@x.io", Some(&root), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    for gone in [&a_admin, &key] {
        assert_eq!(
            w.call("GET", "/api/apps", Some(gone), None).await?.0,
            StatusCode::UNAUTHORIZED
        );
    }

    // Only instance admins manage accounts, and the last one stays.
    assert_eq!(
        w.call("GET", "/api/users", Some(&second), None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    let operator_token = w
        .login_with("operator@x.io", "a brand new passphrase")
        .await?;
    assert_eq!(
        w.call("GET", "/api/users", Some(&operator_token), None)
            .await?
            .0,
        StatusCode::FORBIDDEN
    );
    let (s, body) = w
        .call("DELETE", "/api/users/root@x.io", Some(&root), None)
        .await?;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("last instance admin"),
        "{body}"
    );
    let (_, users) = w.call("GET", "/api/users", Some(&root), None).await?;
    assert_eq!(users["items"].as_array().map(Vec::len), Some(3), "{users}");
    Ok(())
}

#[tokio::test]
async fn api_keys_are_listed_with_owner_and_last_use_and_can_be_revoked() -> TestResult {
    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    let viewer = principals::user_by_email(&w.db.pool, "viewer@x.io")
        .await?
        .ok_or("v")?;
    let key = outbox_admin::create_api_key(&w.db.pool, viewer.id, "reporting").await?;
    assert_eq!(
        w.call("GET", "/api/apps", Some(&key), None).await?.0,
        StatusCode::OK
    );
    let (s, list) = w
        .call("GET", "/api/api-keys?owner=viewer@x.io", Some(&root), None)
        .await?;
    assert_eq!(s, StatusCode::OK, "{list}");
    let item = &list["items"][0];
    assert_eq!(
        (item["name"].as_str(), item["owner"].as_str()),
        (Some("reporting"), Some("viewer@x.io"))
    );
    assert!(item["last_used_at"].is_string(), "{item}");
    assert!(
        item.get("secret_hash").is_none() && !list.to_string().contains(&key[13..]),
        "{list}"
    );
    let prefix = item["prefix"].as_str().ok_or("prefix")?.to_owned();
    let (s, _) = w
        .call(
            "DELETE",
            &format!("/api/api-keys/{prefix}"),
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        w.call("GET", "/api/apps", Some(&key), None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, body) = w
        .call(
            "DELETE",
            &format!("/api/api-keys/{prefix}"),
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(
        (s, body["error"]["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("api key not found"))
    );
    Ok(())
}

#[tokio::test]
async fn the_login_throttle_slows_guessing_but_never_locks_the_owner_out() -> TestResult {
    let mut w = World::new().await?;
    w.state.auth.throttle.free_per_account = 3;
    w.state.auth.throttle.free_per_pair = 3;
    w.state.auth.throttle.free_per_address = 6;
    w.state.throttle =
        outbox_admin::auth::Throttle::new(w.db.pool.clone(), w.state.auth.throttle.clone());
    let attacker = "203.0.113.9";
    let owner = "198.51.100.7";
    for _ in 0..3 {
        let (s, _, _) = login_from(&w.state, "root@x.io", "guess guess guess", attacker).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // The guesser is held back, even with the right password, and told how long.
    let (s, headers, body) = login_from(&w.state, "root@x.io", PASSWORD, attacker).await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    let wait: u64 = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .ok_or("Retry-After")?
        .parse()?;
    assert!((1..=60).contains(&wait), "{wait}");
    // The owner, from an address that has not been failing, signs in.
    let (s, _, body) = login_from(&w.state, "root@x.io", PASSWORD, owner).await?;
    assert_eq!(s, StatusCode::OK, "{body}");

    // The counts live in PostgreSQL: another process (and a restarted one)
    // holds the guesser back too.
    let mut auth = w.state.auth.clone();
    auth.throttle = w.state.auth.throttle.clone();
    let other_process = AdminState::new(w.db.pool.clone(), auth)?;
    let (s, _, _) = login_from(&other_process, "root@x.io", PASSWORD, attacker).await?;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);

    // Guessing many accounts from one address holds the address back.
    for n in 0..6 {
        login_from(
            &w.state,
            &format!("ghost{n}@x.io"),
            "guess guess guess",
            "192.0.2.1",
        )
        .await?;
    }
    let (s, _, _) = login_from(&w.state, "viewer@x.io", PASSWORD, "192.0.2.1").await?;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);

    // `outboxd user unlock` clears the account (and its failing addresses).
    // (the owner's sign-in already cleared the account; the guesser's pair is left)
    assert!(outbox_admin::auth::unlock(&w.db.pool, "ROOT@x.io").await? >= 1);
    let (s, _, body) = login_from(&other_process, "root@x.io", PASSWORD, attacker).await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    Ok(())
}

#[tokio::test]
async fn the_api_is_strict_and_speaks_in_its_own_words() -> TestResult {
    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"payload": {}, "colour": "red"}),
            "colour: unknown field",
        ),
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"delay_ms": -5}),
            "delay_ms: -5 is not between 0 and ",
        ),
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"run_at": "tomorrow"}),
            "run_at:",
        ),
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"run_at": "-262143-01-01T00:00:00Z"}),
            "run_at: is -262143-01-01 00:00:00 UTC; it must fall in the years 1970 to 9999",
        ),
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"max_attempts": 0}),
            "max_attempts",
        ),
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"priority": 10}),
            "priority: 10 is not between 0 and 9",
        ),
        (
            "POST",
            "/api/apps/app-a/events/e",
            json!({"priority": -1}),
            "priority: -1 is not between 0 and 9",
        ),
        (
            "POST",
            "/api/apps/app-a/jobs/reports",
            json!({"partition_key": ""}),
            "partition_key",
        ),
        (
            "POST",
            "/api/apps/app-a/events/e",
            json!({"run_at": "2030-01-01T00:00:00Z"}),
            "run_at: unknown field",
        ),
        (
            "POST",
            "/api/apps/app-a/events/e",
            json!([1, 2]),
            "body: got an array, expected an object",
        ),
        (
            "POST",
            "/api/login",
            json!({"email": "a@x.io"}),
            "password: required",
        ),
        (
            "POST",
            "/api/login",
            json!({"email": format!("{}@x.io", "a".repeat(300)), "password": "p"}),
            "email: at most 254 bytes",
        ),
        (
            "POST",
            "/api/login",
            json!({"email": "a@x.io", "password": "p".repeat(2000)}),
            "password: at most 1024 bytes",
        ),
        (
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            json!({"action": "ignore", "ids": [], "force": true}),
            "force: unknown field",
        ),
        (
            "POST",
            "/api/apps/app-a/dead-letters/bulk",
            json!({"action": "ignore", "filter": {"topic": "t"}, "max_attempts": 3}),
            "max_attempts: only a replay takes it",
        ),
        (
            "POST",
            "/api/apps/app-a/invoke/t",
            json!({"timeout_ms": -1}),
            "timeout_ms: -1 is not between 1 and 60000",
        ),
        (
            "POST",
            "/api/apps/app-a/events/t",
            json!({"priority": "high"}),
            "priority: got the string \"high\", expected a whole number",
        ),
        (
            "POST",
            "/api/apps/app-a/outbox/cancel",
            json!({"filter": {"colour": "red"}, "reason": "r"}),
            "filter.colour: unknown field",
        ),
        (
            "POST",
            "/api/users",
            json!({"email": format!("{}@x.io", "a".repeat(5000)), "password": "longenoughpassword"}),
            "email: at most 254 bytes (got 5005)",
        ),
        (
            "POST",
            "/api/users",
            json!({"email": "evil\n@x.io", "password": "longenoughpassword"}),
            "email: must not contain spaces or control characters (found U+000A)",
        ),
        (
            "POST",
            "/api/users",
            json!({"email": "red\u{1b}[31m@x.io", "password": "longenoughpassword"}),
            "email: must not contain spaces or control characters (found U+001B)",
        ),
        (
            "PUT",
            "/api/apps/app-a/pauses/a%1Bb",
            json!({}),
            "topic: must not contain control characters (found U+001B)",
        ),
        (
            "PUT",
            "/api/apps/app-a/limits/mail",
            json!({}),
            "limits: none given",
        ),
        (
            "POST",
            "/api/apps/app-a/outbox/cancel",
            json!({"topic": "mail", "reason": "evil\u{1b}[2Jtext"}),
            "reason: must not contain control characters (found U+001B)",
        ),
        (
            "PUT",
            "/api/apps/app-a/pauses/mail",
            json!({"reason": "line\nforged"}),
            "reason: must not contain control characters (found U+000A)",
        ),
        (
            "PUT",
            "/api/apps/app-a/limits/a%E2%80%AEb",
            json!({"max_running": 1}),
            "topic: must not contain control characters (found U+202E)",
        ),
    ];
    for (method, uri, body, want) in cases {
        let (s, answer) = w.call(method, uri, Some(&root), Some(body.clone())).await?;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri} {body}: {answer}");
        assert!(message.starts_with(want), "{uri} {body}: {message}");
        for leak in [
            "struct",
            "serde",
            "Failed to",
            "expected u",
            "expected i",
            "Body",
        ] {
            assert!(
                !message.contains(leak),
                "{uri} {body}: {message} mentions {leak}"
            );
        }
    }
    for (uri, want) in [
        (
            "/api/apps/app-a/dead-letters?limit=-1",
            "limit: -1 is not between 1 and 200",
        ),
        (
            "/api/apps/app-a/dead-letters?limit=abc",
            "limit: expected a whole number",
        ),
        (
            "/api/apps/app-a/dead-letters?colour=red",
            "colour: unknown field",
        ),
        (
            "/api/apps/app-a/outbox?topic=a&topic=b",
            "topic: given more than once",
        ),
        (
            "/api/apps/app-a/outbox?field=noequals",
            "field: \"noequals\" is not key=value",
        ),
        (
            "/api/apps/app-a/outbox?payload=123",
            "payload: must be a JSON object",
        ),
        (
            "/api/apps/app-a/audit?limit=-1",
            "limit: -1 is not between 1 and 500",
        ),
        (
            "/api/apps/app-a/outbox?limit=5&limit=6",
            "limit: given more than once",
        ),
        (
            "/api/apps/app-a/activity?topic=%00",
            "topic: must not contain NUL",
        ),
    ] {
        let (s, answer) = w.call("GET", uri, Some(&root), None).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(want),
            "{uri}: {answer}"
        );
    }
    // Without NATS the stream route says why there is nothing, in a sentence.
    let (s, answer) = w
        .call("GET", "/api/apps/app-a/stream", Some(&root), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(
        answer["error"]["message"],
        "no message stream: this outboxd does not relay to NATS (set nats.url)"
    );
    // Every route refuses what the OpenAPI document does not declare for it:
    // a query parameter (a misplaced expected_version made a KV write
    // unconditional), or a body where it takes none (a reason was dropped).
    for (method, uri, body, want) in [
        (
            "PUT",
            "/api/apps/app-a/kv/notes/n2?expected_version=1",
            Some(json!({"value": 1})),
            "expected_version: unknown field (this route takes no query parameters)",
        ),
        (
            "GET",
            "/api/apps/app-a/processes?app=app-b",
            None,
            "app: unknown field (this route takes no query parameters)",
        ),
        (
            "GET",
            "/api/apps/app-a/outbox?colour=red&topic=t",
            None,
            "colour: unknown field (accepted: topic, state, ",
        ),
        (
            "POST",
            "/api/apps/app-a/dead-letters/00000000-0000-0000-0000-000000000000/ignore",
            Some(json!({"reason": "duplicate"})),
            "body: this route takes no body",
        ),
    ] {
        let (s, answer) = w.call(method, uri, Some(&root), body).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(want), "{method} {uri}: {message}");
    }
    let (s, answer) = w
        .call("GET", "/api/apps/app-a/kv/notes/n2", Some(&root), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing was written: {answer}");
    // A caller without a principal learns 401, not what a route takes; the
    // public login still says what it does not take.
    for (method, uri, body) in [
        ("GET", "/api/apps/app-a/processes?app=app-b", None),
        (
            "POST",
            "/api/apps/app-a/dead-letters/00000000-0000-0000-0000-000000000000/ignore",
            Some(json!({"reason": "duplicate"})),
        ),
    ] {
        let (s, answer) = w.call(method, uri, None, body).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri}: {answer}");
    }
    let (s, answer) = w
        .call(
            "POST",
            "/api/login?next=x",
            None,
            Some(json!({"email": "a@b.c", "password": "p"})),
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    // `{}` or no body at all says nothing, and is taken where none is declared.
    let (s, answer) = w
        .call(
            "POST",
            "/api/apps/app-a/dead-letters/00000000-0000-0000-0000-000000000000/ignore",
            Some(&root),
            Some(json!({})),
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{answer}");
    // One body limit, answered 413 too_large on every route, login included.
    let huge = json!({"email": "x".repeat(2 << 20), "password": "p"});
    for uri in ["/api/login", "/api/apps/app-a/events/e"] {
        let (s, answer) = w.call("POST", uri, Some(&root), Some(huge.clone())).await?;
        assert_eq!(
            (s, answer["error"]["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")),
            "{uri}"
        );
    }
    // 401 says how to authenticate.
    let (s, headers, _) = send(&w.state, "GET", "/api/apps", None, None, "127.0.0.1").await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    // The scheme's name is case-insensitive, as HTTP has it.
    for scheme in ["bearer", "BEARER"] {
        let req = Request::builder()
            .uri("/api/apps")
            .header(header::AUTHORIZATION, format!("{scheme} {root}"))
            .body(Body::empty())?;
        let res = outbox_admin::router(w.state.clone()).oneshot(req).await?;
        assert_eq!(res.status(), StatusCode::OK, "{scheme}");
    }
    // Creations answer 201, with Location where the resource has a URL.
    let (s, headers, _) = send(
        &w.state,
        "PUT",
        "/api/apps/app-a/kv/notes/n1",
        Some(&root),
        Some(json!({"value": 1})),
        "127.0.0.1",
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some("/api/apps/app-a/kv/notes/n1")
    );
    let (s, _, _) = send(
        &w.state,
        "PUT",
        "/api/apps/app-a/kv/notes/n1",
        Some(&root),
        Some(json!({"value": 2})),
        "127.0.0.1",
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "an update is not a creation");
    Ok(())
}

#[tokio::test]
async fn replay_keeps_the_attempt_budget_unless_told_otherwise() -> TestResult {
    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let row =
            outbox_core::NewEvent::new("billing.charge", json!({"n": 1})).with_max_attempts(2);
        let mut tx = w.db.pool.begin().await?;
        let id = outbox_core::enqueue(&mut tx, w.app_a, &row).await?;
        tx.commit().await?;
        // Exhausted: moved to dead_letters with its budget.
        sqlx::query("INSERT INTO dead_letters (app_id, original_event_id, source, topic, payload, headers, attempt_count, max_attempts, last_error)
                     SELECT app_id, id, source, topic, payload, headers, 2, max_attempts, 'boom' FROM outbox WHERE id = $1")
            .bind(id).execute(&w.db.pool).await?;
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(id)
            .execute(&w.db.pool)
            .await?;
        let dl: uuid::Uuid =
            sqlx::query_scalar("SELECT id FROM dead_letters WHERE original_event_id = $1")
                .bind(id)
                .fetch_one(&w.db.pool)
                .await?;
        ids.push(dl);
    }
    let (s, same) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{}/replay", ids[0]),
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{same}");
    let (s, more) = w
        .call(
            "POST",
            &format!("/api/apps/app-a/dead-letters/{}/replay", ids[1]),
            Some(&root),
            Some(json!({"max_attempts": 7})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{more}");
    for (answer, want) in [(same, 2), (more, 7)] {
        let budget: Option<i32> =
            sqlx::query_scalar("SELECT max_attempts FROM outbox WHERE id = $1::text::uuid")
                .bind(answer["outbox_id"].as_str().ok_or("outbox_id")?)
                .fetch_one(&w.db.pool)
                .await?;
        assert_eq!(budget, Some(want));
    }
    let (_, shown) = w
        .call(
            "GET",
            &format!("/api/apps/app-a/dead-letters/{}", ids[0]),
            Some(&root),
            None,
        )
        .await?;
    assert_eq!(shown["max_attempts"], 2);
    Ok(())
}

#[tokio::test]
async fn dashboard_pages_send_security_headers_and_sign_in_needs_its_csrf_token() -> TestResult {
    let w = World::new().await?;
    let app = || outbox_admin::router(w.state.clone());
    let res = app()
        .oneshot(Request::get("/login").body(Body::empty())?)
        .await?;
    let headers = res.headers().clone();
    let csp = headers
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        csp.contains("frame-ancestors 'none'") && !csp.contains("script-src 'unsafe-inline'"),
        "{csp}"
    );
    for (name, want) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        assert_eq!(
            headers.get(&name).and_then(|v| v.to_str().ok()),
            Some(want),
            "{name}"
        );
    }
    let cookie = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("outboxd_csrf="))
        .and_then(|c| c.split(';').next())
        .ok_or("a CSRF cookie on the sign-in page")?
        .to_owned();
    let page = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(
        page.contains(&cookie),
        "the form carries the cookie's token"
    );
    let post = |body: String, cookie: Option<String>| {
        let mut req = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, format!("outboxd_csrf={c}"));
        }
        let app = app();
        async move {
            Ok::<_, Box<dyn std::error::Error>>(app.oneshot(req.body(Body::from(body))?).await?)
        }
    };
    // Without the token (a cross-site form), nobody is signed in.
    let res = post(
        format!("email=root%40x.io&password={}", PASSWORD.replace(' ', "+")),
        None,
    )
    .await?;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().get_all(header::SET_COOKIE).iter().all(|c| {
        !c.to_str()
            .unwrap_or_default()
            .starts_with("outboxd_session=")
    }));
    // A wrong password keeps the typed e-mail.
    let res = post(
        format!("csrf={PRE_LOGIN_CSRF}&email=root%40x.io&password=wrong+wrong+wrong"),
        Some(PRE_LOGIN_CSRF.into()),
    )
    .await?;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let page = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(page.contains(r#"value="root@x.io""#), "{page}");
    // Signed in, then signed out: the cookie opens nothing any more.
    let res = post(
        format!(
            "csrf={PRE_LOGIN_CSRF}&email=root%40x.io&password={}",
            PASSWORD.replace(' ', "+")
        ),
        Some(PRE_LOGIN_CSRF.into()),
    )
    .await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let cookies: Vec<String> = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|c| c.split(';').next())
        .map(str::to_owned)
        .collect();
    let jar = cookies.join("; ");
    let csrf = cookies
        .iter()
        .find_map(|c| c.strip_prefix("outboxd_csrf="))
        .ok_or("csrf")?
        .to_owned();
    let session = cookies
        .iter()
        .find_map(|c| c.strip_prefix("outboxd_session="))
        .ok_or("session")?
        .to_owned();
    let get_apps = |jar: String| {
        let app = app();
        async move {
            Ok::<_, Box<dyn std::error::Error>>(
                app.oneshot(
                    Request::get("/apps")
                        .header(header::COOKIE, jar)
                        .body(Body::empty())?,
                )
                .await?
                .status(),
            )
        }
    };
    assert_eq!(get_apps(jar.clone()).await?, StatusCode::OK);
    let res = app()
        .oneshot(
            Request::post("/logout")
                .header(header::COOKIE, jar.clone())
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("csrf={csrf}")))?,
        )
        .await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        get_apps(jar).await?,
        StatusCode::SEE_OTHER,
        "the old cookie is sent to /login"
    );
    assert_eq!(
        w.call("GET", "/api/apps", Some(&session), None).await?.0,
        StatusCode::UNAUTHORIZED,
        "nor is it a bearer token"
    );
    Ok(())
}

#[tokio::test]
async fn the_accounts_page_lists_and_acts_for_instance_admins_only() -> TestResult {
    let w = World::new().await?;
    let app = || outbox_admin::router(w.state.clone());
    let session = |email: &'static str| w.dashboard_session(email);
    let get = |jar: String| {
        let app = app();
        async move {
            let res = app
                .oneshot(
                    Request::get("/admin/accounts")
                        .header(header::COOKIE, jar)
                        .body(Body::empty())?,
                )
                .await?;
            let status = res.status();
            let body = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
            Ok::<_, Box<dyn std::error::Error>>((
                status,
                String::from_utf8_lossy(&body).into_owned(),
            ))
        }
    };
    let post = |jar: String, uri: String, body: String| {
        let app = app();
        async move {
            let req = Request::post(uri)
                .header(header::COOKIE, jar)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))?;
            Ok::<_, Box<dyn std::error::Error>>(app.oneshot(req).await?.status())
        }
    };
    let (root_jar, root_csrf) = session("root@x.io").await?;
    let (status, page) = get(root_jar.clone()).await?;
    assert_eq!(status, StatusCode::OK);
    for email in ["root@x.io", "viewer@x.io", "operator@x.io"] {
        assert!(page.contains(&format!(r#"data-user="{email}""#)), "{page}");
    }
    let (viewer_jar, viewer_csrf) = session("viewer@x.io").await?;
    assert_eq!(get(viewer_jar.clone()).await?.0, StatusCode::FORBIDDEN);
    let viewer = principals::user_by_email(&w.db.pool, "viewer@x.io")
        .await?
        .ok_or("viewer")?;
    // A viewer cannot act, even with its own valid CSRF token.
    let uri = format!("/admin/accounts/{}/revoke-sessions", viewer.id);
    assert_eq!(
        post(
            viewer_jar.clone(),
            uri.clone(),
            format!("csrf={viewer_csrf}")
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    // The admin signs the viewer out everywhere.
    assert_eq!(
        post(root_jar.clone(), uri, format!("csrf={root_csrf}")).await?,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        get(viewer_jar).await?.0,
        StatusCode::SEE_OTHER,
        "the viewer's cookie now leads to /login"
    );
    // Deleting asks for confirmation; the last instance admin stays.
    let delete = format!("/admin/accounts/{}/delete", viewer.id);
    assert_eq!(
        post(
            root_jar.clone(),
            delete.clone(),
            format!("csrf={root_csrf}")
        )
        .await?,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(
            root_jar.clone(),
            delete,
            format!("csrf={root_csrf}&confirm=yes")
        )
        .await?,
        StatusCode::SEE_OTHER
    );
    assert!(
        principals::user_by_email(&w.db.pool, "viewer@x.io")
            .await?
            .is_none()
    );
    let root = principals::user_by_email(&w.db.pool, "root@x.io")
        .await?
        .ok_or("root")?;
    let delete_root = format!("/admin/accounts/{}/delete", root.id);
    assert_eq!(
        post(
            root_jar,
            delete_root,
            format!("csrf={root_csrf}&confirm=yes")
        )
        .await?,
        StatusCode::CONFLICT
    );
    Ok(())
}

#[tokio::test]
async fn logins_sent_at_once_get_no_more_tries_than_logins_sent_in_turn() -> TestResult {
    let mut w = World::new().await?;
    w.state.auth.throttle.free_per_pair = 3;
    w.state.throttle =
        outbox_admin::auth::Throttle::new(w.db.pool.clone(), w.state.auth.throttle.clone());
    let mut burst = tokio::task::JoinSet::new();
    for n in 0..24 {
        let state = w.state.clone();
        let password = format!("guess {n} guess");
        burst.spawn(async move {
            login_from(&state, "operator@x.io", &password, "203.0.113.50")
                .await
                .map(|(status, _, _)| status)
                .map_err(|e| e.to_string())
        });
    }
    let mut checked = 0;
    let mut held_back = 0;
    while let Some(answer) = burst.join_next().await {
        match answer?? {
            StatusCode::TOO_MANY_REQUESTS => held_back += 1,
            StatusCode::UNAUTHORIZED | StatusCode::OK => checked += 1,
            other => return Err(format!("unexpected {other}").into()),
        }
    }
    assert_eq!(
        (checked, held_back),
        (3, 21),
        "only the free tries reach the password check"
    );
    let (s, _, _) = login_from(&w.state, "operator@x.io", PASSWORD, "203.0.113.50").await?;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "the right password comes too late"
    );
    Ok(())
}

#[tokio::test]
async fn a_successful_login_gives_its_count_back_and_an_ipv6_client_counts_by_its_64() -> TestResult
{
    let mut w = World::new().await?;
    w.state.auth.throttle.free_per_address = 2;
    w.state.throttle =
        outbox_admin::auth::Throttle::new(w.db.pool.clone(), w.state.auth.throttle.clone());
    let from = "2001:db8:1:2::10";
    let (s, _, _) = login_from(&w.state, "ghost@x.io", "guess guess guess", from).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Counted before its password was checked, then given back: one failure
    // stays, below the two free ones, however often the owner signs in.
    for _ in 0..3 {
        let (s, _, body) = login_from(&w.state, "root@x.io", PASSWORD, from).await?;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    // Another address of the same /64 is the same client: its failure is the
    // second, and the third attempt from the /64 is held back.
    let (s, _, _) = login_from(
        &w.state,
        "ghost@x.io",
        "guess guess guess",
        "2001:db8:1:2::99",
    )
    .await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = login_from(&w.state, "root@x.io", PASSWORD, "2001:db8:1:2:ffff::1").await?;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Another /64 is another client.
    let (s, _, body) = login_from(&w.state, "root@x.io", PASSWORD, "2001:db8:1:3::10").await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    Ok(())
}

#[tokio::test]
async fn a_login_not_sent_as_json_is_refused_before_it_counts() -> TestResult {
    let w = World::new().await?;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut req = Request::post("/api/login");
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(Body::from(
            json!({"email": "root@x.io", "password": "nope nope"}).to_string(),
        ))?;
        let res = outbox_admin::router(w.state.clone()).oneshot(req).await?;
        assert_eq!(
            res.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
        let body: Value = serde_json::from_slice(&bytes)?;
        assert_eq!(body["error"]["code"], "unsupported_media_type");
    }
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM login_throttle WHERE failures > 0")
        .fetch_one(&w.db.pool)
        .await?;
    assert_eq!(counted, 0, "a refused request spends no failed login");
    // A charset parameter is fine.
    let req = Request::post("/api/login")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(
            json!({"email": "root@x.io", "password": PASSWORD}).to_string(),
        ))?;
    let res = outbox_admin::router(w.state.clone()).oneshot(req).await?;
    assert_eq!(res.status(), StatusCode::OK);
    // The token is for this caller only: no cache keeps it, and no browser
    // takes the answer for anything but JSON.
    assert_eq!(
        res.headers()
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    assert_eq!(
        res.headers()
            .get(header::X_CONTENT_TYPE_OPTIONS)
            .and_then(|v| v.to_str().ok()),
        Some("nosniff")
    );
    // No more than any other API answer does a route that does not exist.
    let req = Request::get("/api/nonexistent").body(Body::empty())?;
    let res = outbox_admin::router(w.state.clone()).oneshot(req).await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        res.headers()
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    Ok(())
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_login_limit() -> TestResult {
    let mut w = World::new().await?;
    w.state.auth.throttle.free_per_address = 2;
    w.state.auth.trusted_proxies = vec!["127.0.0.0/8".parse()?];
    w.state.throttle =
        outbox_admin::auth::Throttle::new(w.db.pool.clone(), w.state.auth.throttle.clone());
    let login = |peer: &'static str,
                 forwarded: &'static str,
                 email: &'static str,
                 password: &'static str| {
        let state = w.state.clone();
        async move {
            let mut req = Request::post("/api/login")
                .header(header::CONTENT_TYPE, "application/json")
                .header("x-forwarded-for", forwarded)
                .body(Body::from(
                    json!({"email": email, "password": password}).to_string(),
                ))?;
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(peer.parse()?, 40000)));
            let res = outbox_admin::router(state).oneshot(req).await?;
            Ok::<_, Box<dyn std::error::Error>>(res.status())
        }
    };
    // Through the proxy: the forwarded client guesses and is held back...
    for _ in 0..2 {
        let s = login("127.0.0.1", "203.0.113.1", "ghost@x.io", "guess guess").await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let s = login("127.0.0.1", "203.0.113.1", "root@x.io", PASSWORD).await?;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // ...and another client behind the same proxy is not.
    let s = login(
        "127.0.0.1",
        "198.51.100.1, 203.0.113.2",
        "root@x.io",
        PASSWORD,
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    // A client that connects directly cannot pick its address with the header.
    for forwarded in ["192.0.2.10", "192.0.2.11"] {
        let s = login("192.0.2.99", forwarded, "ghost@x.io", "guess guess").await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let s = login("192.0.2.99", "192.0.2.12", "root@x.io", PASSWORD).await?;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    Ok(())
}

#[tokio::test]
async fn an_owner_who_mistypes_once_while_the_account_is_under_attack_still_signs_in() -> TestResult
{
    let mut w = World::new().await?;
    w.state.auth.throttle.free_per_account = 3;
    w.state.throttle =
        outbox_admin::auth::Throttle::new(w.db.pool.clone(), w.state.auth.throttle.clone());
    let (home, cafe) = ("198.51.100.7", "198.51.100.8");
    let (s, _, _) = login_from(&w.state, "operator@x.io", PASSWORD, home).await?;
    assert_eq!(s, StatusCode::OK);
    // Guessers elsewhere push the account past its limit.
    for attacker in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        let (s, _, _) = login_from(&w.state, "operator@x.io", "guess guess", attacker).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // A typo from the client the owner signs in from does not lock them out...
    let (s, _, _) = login_from(&w.state, "operator@x.io", "typo typo typo", home).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, body) = login_from(&w.state, "operator@x.io", PASSWORD, home).await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    // ...nor does one from a network the owner never signed in from (a
    // wrong password there too locked the owner out for up to 15 minutes)...
    for _ in 0..3 {
        let _ = login_from(&w.state, "operator@x.io", "guess guess", "203.0.113.4").await?;
    }
    let (s, _, _) = login_from(&w.state, "operator@x.io", "typo typo typo", cafe).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, body) = login_from(&w.state, "operator@x.io", PASSWORD, cafe).await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    // ...while a client that has failed on the account twice and never
    // signed in to it waits, as a guesser does.
    for _ in 0..3 {
        let _ = login_from(&w.state, "operator@x.io", "guess guess", "203.0.113.5").await?;
    }
    let airport = "198.51.100.9";
    for _ in 0..2 {
        let (s, _, _) = login_from(&w.state, "operator@x.io", "typo typo typo", airport).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, _, _) = login_from(&w.state, "operator@x.io", PASSWORD, airport).await?;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // After an unlock (and a password change, revoked sessions), no client
    // is spared for having signed in with the old credentials.
    outbox_admin::auth::unlock(&w.db.pool, "operator@x.io").await?;
    let known: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM login_throttle WHERE key LIKE 'known:operator@x.io|%'",
    )
    .fetch_one(&w.db.pool)
    .await?;
    assert_eq!(known, 0);
    Ok(())
}

#[tokio::test]
async fn an_owner_signing_in_from_a_known_client_does_not_queue_behind_a_flood_of_guesses()
-> TestResult {
    let w = World::new().await?;
    let home = "198.51.100.7";
    let (s, _, _) = login_from(&w.state, "root@x.io", PASSWORD, home).await?;
    assert_eq!(s, StatusCode::OK);
    // Sixteen guesses from sixteen addresses at once: each waits for the one
    // before it, one hash at a time.
    let guessed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let guesses: Vec<_> = (0..16)
        .map(|i| {
            let (state, guessed) = (w.state.clone(), guessed.clone());
            tokio::spawn(async move {
                let from = format!("203.0.113.{i}");
                let answer = login_from(&state, "root@x.io", "guess guess", &from).await;
                guessed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                answer.map(|(s, _, _)| s).map_err(|e| e.to_string())
            })
        })
        .collect();
    // Every guess is counted (admitted) before its password is checked.
    let counted = outbox_testkit::wait_until(std::time::Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM login_throttle WHERE key LIKE 'address:203.0.113.%'",
        )
        .fetch_one(&w.db.pool)
        .await
        .is_ok_and(|n| n == 16)
    })
    .await;
    assert!(counted, "the guesses were not admitted");
    let (s, _, body) = login_from(&w.state, "root@x.io", PASSWORD, home).await?;
    let done_before_owner = guessed.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s, StatusCode::OK, "{body}");
    // The owner's check ran beside the guesses, not after them (in one
    // queue it finished after fifteen or sixteen of them).
    assert!(
        done_before_owner <= 10,
        "{done_before_owner} of 16 guesses finished before the owner signed in"
    );
    for guess in guesses {
        assert_eq!(guess.await??, StatusCode::UNAUTHORIZED);
    }
    Ok(())
}

#[tokio::test]
async fn a_success_from_an_address_at_its_limit_leaves_its_count_and_hold_back_as_they_were()
-> TestResult {
    let mut w = World::new().await?;
    w.state.auth.throttle.free_per_address = 2;
    w.state.throttle =
        outbox_admin::auth::Throttle::new(w.db.pool.clone(), w.state.auth.throttle.clone());
    let office = "192.0.2.40";
    for n in 0..2 {
        let (s, _, _) =
            login_from(&w.state, &format!("ghost{n}@x.io"), "guess guess", office).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // The hold-back has run out; the count (2, at the limit) has not.
    sqlx::query(
        "UPDATE login_throttle SET blocked_until = now() - interval '1 second' WHERE key = $1",
    )
    .bind(format!("address:{office}"))
    .execute(&w.db.pool)
    .await?;
    let before: (i32, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT failures, last_failure_at FROM login_throttle WHERE key = $1")
            .bind(format!("address:{office}"))
            .fetch_one(&w.db.pool)
            .await?;
    // Colleagues sign in one after another: none of them is held back by
    // the others' successes, and the count neither grows nor stays fresh.
    for email in ["root@x.io", "viewer@x.io", "operator@x.io"] {
        let (s, _, body) = login_from(&w.state, email, PASSWORD, office).await?;
        assert_eq!(s, StatusCode::OK, "{email}: {body}");
    }
    let after: (i32, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT failures, last_failure_at FROM login_throttle WHERE key = $1")
            .bind(format!("address:{office}"))
            .fetch_one(&w.db.pool)
            .await?;
    assert_eq!(after, before);
    Ok(())
}

/// The last instance admin survives removals made at once: of two demotions,
/// or a demotion and a deletion, of the last two admins exactly one goes
/// through (each takes the admins' rows in one order before it counts).
#[tokio::test]
async fn the_last_instance_admin_survives_removals_made_at_once() -> TestResult {
    use outbox_admin::accounts;
    let w = World::new().await?;
    let pool = &w.db.pool;
    let admins = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users WHERE is_admin")
            .fetch_one(pool)
            .await
    };
    for round in 0..5 {
        let first = format!("first{round}@x.io");
        let second = format!("second{round}@x.io");
        outbox_admin::create_user(pool, &first, PASSWORD, false).await?;
        outbox_admin::create_user(pool, &second, PASSWORD, false).await?;
        // Only these two are admins now.
        sqlx::query("UPDATE users SET is_admin = email IN ($1, $2)")
            .bind(&first)
            .bind(&second)
            .execute(pool)
            .await?;
        let (a, b) = tokio::join!(
            accounts::set_instance_admin(pool, "test", &first, false),
            accounts::set_instance_admin(pool, "test", &second, false),
        );
        assert_eq!(
            u8::from(a.is_ok()) + u8::from(b.is_ok()),
            1,
            "round {round}: {a:?} {b:?}"
        );
        assert_eq!(admins().await?, 1, "round {round}");
        // The one left, and another made admin: demote one, delete the other.
        let left = if a.is_ok() { &second } else { &first };
        let other = format!("third{round}@x.io");
        outbox_admin::create_user(pool, &other, PASSWORD, true).await?;
        let (a, b) = tokio::join!(
            accounts::set_instance_admin(pool, "test", left, false),
            accounts::delete_user(pool, "test", &other),
        );
        assert_eq!(
            u8::from(a.is_ok()) + u8::from(b.is_ok()),
            1,
            "round {round}: {a:?} {b:?}"
        );
        assert_eq!(admins().await?, 1, "round {round}");
    }
    Ok(())
}

#[tokio::test]
async fn an_instance_admin_creates_an_account_and_gives_it_a_role_from_the_console() -> TestResult {
    use super::rows::{page, post_form};
    let w = World::new().await?;
    let (root, csrf) = w.dashboard_session("root@x.io").await?;
    let (s, to, _) = post_form(
        &w,
        &root,
        "/admin/accounts",
        &format!("csrf={csrf}&email=new%40x.io&password=correct+horse+battery"),
    )
    .await?;
    assert_eq!(s, StatusCode::SEE_OTHER, "{to:?}");
    assert!(
        to.as_deref().is_some_and(|to| !to.contains("error")),
        "{to:?}"
    );
    let user = outbox_core::store::principals::user_by_email(&w.db.pool, "new@x.io")
        .await?
        .ok_or("not created")?;
    assert!(!user.is_admin);
    // A short password is refused, naming the rule; nothing is made.
    let (s, _, said) = post_form(
        &w,
        &root,
        "/admin/accounts",
        &format!("csrf={csrf}&email=short%40x.io&password=short"),
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(said.contains("at least 12 characters"), "{said}");
    assert!(
        outbox_core::store::principals::user_by_email(&w.db.pool, "short@x.io")
            .await?
            .is_none()
    );
    let set_role = |role: &str| format!("csrf={csrf}&user={}&app=app-a&role={role}", user.id);
    // A role on app A: the account now sees it.
    let (s, _, _) = post_form(&w, &root, "/admin/roles", &set_role("operator")).await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    // The same role again changes nothing and records nothing.
    let granted = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM audit_log WHERE action = 'role.grant' AND target = 'new@x.io'",
        )
        .fetch_one(&w.db.pool)
        .await
    };
    assert_eq!(granted().await?, 1);
    let (s, _, _) = post_form(&w, &root, "/admin/roles", &set_role("operator")).await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(granted().await?, 1, "recorded once");
    let token = w.login("new@x.io").await?;
    let (s, body) = w
        .call("GET", "/api/apps/app-a/dead-letters", Some(&token), None)
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Taken away: it does not (an app without a role is not found, as one
    // that does not exist).
    let (s, _, _) = post_form(&w, &root, "/admin/roles", &set_role("none")).await?;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, _) = w
        .call("GET", "/api/apps/app-a/dead-letters", Some(&token), None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Only instance admins, with their own form's token: an app admin or a
    // viewer is refused, so is a forged token, and nothing is made.
    let (app_admin, app_csrf) = w.dashboard_session("a-admin@x.io").await?;
    let (viewer, viewer_csrf) = w.dashboard_session("viewer@x.io").await?;
    for (jar, token) in [
        (&app_admin, app_csrf.as_str()),
        (&viewer, viewer_csrf.as_str()),
        (&root, "forged"),
    ] {
        for (uri, form) in [
            (
                "/admin/roles",
                format!("csrf={token}&user={}&app=app-a&role=admin", user.id),
            ),
            (
                "/admin/accounts",
                format!("csrf={token}&email=evil%40x.io&password=correct+horse+battery&admin=yes"),
            ),
        ] {
            let (s, _, _) = post_form(&w, jar, uri, &form).await?;
            assert_eq!(s, StatusCode::FORBIDDEN, "{uri} with {token}");
        }
    }
    assert!(
        outbox_core::store::principals::user_by_email(&w.db.pool, "evil@x.io")
            .await?
            .is_none()
    );
    assert_eq!(
        outbox_core::store::principals::role_on(&w.db.pool, w.app_a, user.id).await?,
        None
    );
    // The page offers roles on apps that take them, to accounts that are no
    // instance admins.
    let (_, _, html) = page(&w, &root, "/admin/accounts").await?;
    assert!(
        html.contains("id=set-role")
            && html.contains("<option>app-a</option>")
            && !html.contains("<option>_unrouted</option>")
            && html.contains(">new@x.io</option>")
            && !html.contains(">root@x.io</option>"),
        "{html}"
    );
    Ok(())
}
