//! The admin API and dashboard against a real PostgreSQL, through the router.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_admin::{AdminState, AuthConfig};
use outbox_core::store::dead_letters::{self, External};
use outbox_core::store::principals::{self, Role};
use outbox_testkit::TestDb;
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

mod accounts;
mod hostile;
mod openapi;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PASSWORD: &str = "correct horse battery";

/// The CSRF token the sign-in page would have set (double submit: any value
/// works as long as the cookie and the form field agree).
const PRE_LOGIN_CSRF: &str = "pre-login-token-0123456789abcdef0123";

struct World {
    db: TestDb,
    state: AdminState,
    app_a: Uuid,
    app_b: Uuid,
}

impl World {
    async fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let db = TestDb::new().await?;
        let app_a = db.app("app-a").await?;
        let app_b = db.app("app-b").await?;
        let mut auth = AuthConfig::new(b"0123456789abcdef0123456789abcdef".to_vec())?;
        auth.throttle.free_per_account = 1000;
        auth.throttle.free_per_address = 1000;
        auth.throttle.free_per_pair = 1000;
        // Long enough that a slow machine cannot see a hold-back lapse.
        auth.throttle.base_delay = std::time::Duration::from_secs(60);
        let state = AdminState::new(db.pool.clone(), auth)?;
        for (email, admin) in [
            ("root@x.io", true),
            ("viewer@x.io", false),
            ("operator@x.io", false),
            ("a-admin@x.io", false),
        ] {
            outbox_admin::create_user(&db.pool, email, PASSWORD, admin).await?;
        }
        for (email, role) in [
            ("viewer@x.io", Role::Viewer),
            ("operator@x.io", Role::Operator),
            ("a-admin@x.io", Role::Admin),
        ] {
            let user = principals::user_by_email(&db.pool, email)
                .await?
                .ok_or("user")?;
            principals::set_role(&db.pool, app_a, user.id, role).await?;
        }
        Ok(Self {
            db,
            state,
            app_a,
            app_b,
        })
    }

    fn with_limits(mut self, per_account: u32) -> Self {
        self.state.auth.throttle.free_per_account = per_account;
        self.state.throttle = outbox_admin::auth::Throttle::new(
            self.db.pool.clone(),
            self.state.auth.throttle.clone(),
        );
        self
    }

    async fn dead_letter(
        &self,
        app: Uuid,
        topic: &str,
    ) -> Result<Uuid, Box<dyn std::error::Error>> {
        let payload = json!({"order": topic});
        Ok(dead_letters::insert_external(
            &self.db.pool,
            &External {
                app_id: app,
                original_event_id: Uuid::now_v7(),
                source: "queue",
                topic,
                handler: None,
                payload: &payload,
                headers: &json!({}),
                attempt_count: 3,
                last_error: "boom",
            },
        )
        .await?)
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.call_raw(method, uri, token, bytes).await
    }

    /// Signs in through the dashboard's form; returns the cookie jar and the
    /// session's CSRF token.
    async fn dashboard_session(
        &self,
        email: &str,
    ) -> Result<(String, String), Box<dyn std::error::Error>> {
        let login = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("outboxd_csrf={PRE_LOGIN_CSRF}"))
            .body(Body::from(format!(
                "csrf={PRE_LOGIN_CSRF}&email={}&password={}",
                urlencode(email),
                urlencode(PASSWORD)
            )))?;
        let res = outbox_admin::router(self.state.clone())
            .oneshot(login)
            .await?;
        let cookies: Vec<String> = res
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|c| c.split(';').next())
            .map(str::to_owned)
            .collect();
        let csrf = cookies
            .iter()
            .find_map(|c| c.strip_prefix("outboxd_csrf="))
            .unwrap_or_default()
            .to_owned();
        Ok((cookies.join("; "), csrf))
    }

    async fn login(&self, email: &str) -> Result<String, Box<dyn std::error::Error>> {
        self.login_with(email, PASSWORD).await
    }

    async fn login_with(
        &self,
        email: &str,
        password: &str,
    ) -> Result<String, Box<dyn std::error::Error>> {
        let (status, body) = self
            .call(
                "POST",
                "/api/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        Ok(body["token"].as_str().ok_or("no token")?.to_owned())
    }
}

#[tokio::test]
async fn login_answers_alike_for_unknown_and_wrong() -> TestResult {
    let w = World::new().await?;
    let wrong = w
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"email": "root@x.io", "password": "nope nope nope"})),
        )
        .await?;
    let unknown = w
        .call(
            "POST",
            "/api/login",
            None,
            Some(json!({"email": "ghost@x.io", "password": "nope nope nope"})),
        )
        .await?;
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong, unknown, "identical status and body");
    Ok(())
}

#[tokio::test]
async fn failed_logins_are_rate_limited_alike_for_known_and_unknown_accounts() -> TestResult {
    let w = World::new().await?.with_limits(3);
    for email in ["root@x.io", "ghost@x.io"] {
        for _ in 0..3 {
            let (s, _) = w
                .call(
                    "POST",
                    "/api/login",
                    None,
                    Some(json!({"email": email, "password": "bad password"})),
                )
                .await?;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
        }
        let limited = w
            .call(
                "POST",
                "/api/login",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await?;
        assert_eq!(limited.0, StatusCode::TOO_MANY_REQUESTS, "{email}");
        assert_eq!(limited.1["error"]["code"], "rate_limited");
    }
    Ok(())
}

#[tokio::test]
async fn bad_tokens_are_refused() -> TestResult {
    let w = World::new().await?;
    let good = w.login("root@x.io").await?;
    assert_eq!(
        w.call("GET", "/api/apps", Some(&good), None).await?.0,
        StatusCode::OK
    );
    let other_secret = {
        let auth = AuthConfig::new(vec![b'z'; 32])?;
        outbox_admin::auth::issue_token(&auth, Uuid::new_v4(), Uuid::new_v4())?.0
    };
    // Signed with the right secret for a real user, but no such session.
    let no_session = {
        let root = principals::user_by_email(&w.db.pool, "root@x.io")
            .await?
            .ok_or("root")?;
        outbox_admin::auth::issue_token(&w.state.auth, root.id, Uuid::new_v4())?.0
    };
    let mut tampered: Vec<String> = good.split('.').map(str::to_owned).collect();
    tampered[2] = tampered[2].chars().rev().collect();
    for bad in [
        String::new(),
        "garbage".into(),
        other_secret,
        no_session,
        tampered.join("."),
        "obx_deadbeef_nope".into(),
    ] {
        let (status, body) = w.call("GET", "/api/apps", Some(&bad), None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    assert_eq!(
        w.call("GET", "/api/apps", None, None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    // An API key works like a token.
    let root = principals::user_by_email(&w.db.pool, "root@x.io")
        .await?
        .ok_or("root")?;
    let key = outbox_admin::create_api_key(&w.db.pool, root.id, "ci").await?;
    assert_eq!(
        w.call("GET", "/api/apps", Some(&key), None).await?.0,
        StatusCode::OK
    );
    Ok(())
}

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
    let (_, apps) = w.call("GET", "/api/apps", Some(&root), None).await?;
    assert_eq!(apps.as_array().map(Vec::len), Some(2));
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
            Some(json!({"action": "explode", "ids": []})),
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
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

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn dashboard_needs_a_session_and_a_csrf_token() -> TestResult {
    let w = World::new().await?;
    let a1 = w.dead_letter(w.app_a, "a.one").await?;
    let app = || outbox_admin::router(w.state.clone());
    let res = app()
        .oneshot(Request::get("/apps").body(Body::empty())?)
        .await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        res.headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some("/login")
    );
    let login = Request::post("/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::COOKIE, format!("outboxd_csrf={PRE_LOGIN_CSRF}"))
        .body(Body::from(format!(
            "csrf={PRE_LOGIN_CSRF}&email=operator%40x.io&password={}",
            urlencode(PASSWORD)
        )))?;
    let res = app().oneshot(login).await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let cookies: Vec<String> = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert!(
        cookies
            .iter()
            .all(|c| c.contains("HttpOnly") && c.contains("SameSite=Strict")),
        "{cookies:?}"
    );
    let jar: String = cookies
        .iter()
        .filter_map(|c| c.split(';').next())
        .collect::<Vec<_>>()
        .join("; ");
    let csrf = cookies
        .iter()
        .find_map(|c| c.strip_prefix("outboxd_csrf="))
        .and_then(|c| c.split(';').next())
        .ok_or("no csrf cookie")?
        .to_owned();
    let page = app()
        .oneshot(
            Request::get("/apps")
                .header(header::COOKIE, &jar)
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(page.status(), StatusCode::OK);
    let html = String::from_utf8(
        axum::body::to_bytes(page.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(html.contains("app-a") && !html.contains("app-b"), "{html}");
    // A form post without the token changes nothing.
    let forged = Request::post(format!("/apps/app-a/dead-letters/{a1}/ignore"))
        .header(header::COOKIE, &jar)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("csrf=wrong"))?;
    assert_eq!(app().oneshot(forged).await?.status(), StatusCode::FORBIDDEN);
    assert!(
        dead_letters::get(&w.db.pool, w.app_a, a1)
            .await?
            .resolved_at
            .is_none()
    );
    let real = Request::post(format!("/apps/app-a/dead-letters/{a1}/ignore"))
        .header(header::COOKIE, &jar)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("csrf={csrf}")))?;
    assert_eq!(app().oneshot(real).await?.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        dead_letters::get(&w.db.pool, w.app_a, a1)
            .await?
            .resolution
            .as_deref(),
        Some("ignored")
    );
    // GET never changes state.
    let res = app()
        .oneshot(
            Request::get(format!("/apps/app-a/dead-letters/{a1}/replay"))
                .header(header::COOKIE, &jar)
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    Ok(())
}

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
    let (s, body) = w.call("POST", "/api/apps/app-a/triggers", Some(&a_admin), Some(json!({"kind": "kv", "name": "orders", "target": "orders.changed", "collection": "orders:*", "ops": ["put"]}))).await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (_, list) = w
        .call("GET", "/api/apps/app-a/triggers", Some(&viewer), None)
        .await?;
    assert_eq!(list[0]["collection_glob"], "orders:*");

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

/// A dispatcher on its own pool (as another process would have) running these handlers.
async fn dispatcher_for(
    w: &World,
) -> Result<
    (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<Result<outbox_dispatch::DrainReport, outbox_dispatch::Error>>,
    ),
    Box<dyn std::error::Error>,
> {
    use outbox_dispatch::{Config, Dispatcher, Event, HandlerError, Registry};
    let mut registry = Registry::new();
    registry.register("echo", |e: Event| async move {
        e.set_reply(json!({ "echo": e.payload }));
        Ok::<(), HandlerError>(())
    });
    registry.register("fail", |_e: Event| async {
        Err::<(), _>(HandlerError::retry("upstream said no"))
    });
    registry.register("slow", |e: Event| async move {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        e.set_reply(json!("late"));
        Ok::<(), HandlerError>(())
    });
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&w.db.url)
        .await?;
    let config = Config {
        poll_interval: std::time::Duration::from_millis(50),
        ..Config::default()
    };
    let dispatcher = Dispatcher::new(pool, registry, config)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let waiter = stop.clone();
    Ok((
        stop,
        tokio::spawn(async move { dispatcher.run(waiter.cancelled_owned()).await }),
    ))
}

#[tokio::test]
async fn invoke_returns_the_answer_the_error_or_times_out_and_records_abandonment() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let (stop, run) = dispatcher_for(&w).await?;

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/echo",
            Some(&operator),
            Some(json!({"payload": {"n": 7}})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["result"], json!({"echo": {"n": 7}}));

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/fail",
            Some(&operator),
            Some(json!({})),
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("handler_failed"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("upstream said no"),
        "{body}"
    );

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/nobody",
            Some(&operator),
            Some(json!({})),
        )
        .await?;
    // Nobody serves the topic: its own code, not a handler failure.
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "no retries, the error comes back: {body}"
    );
    assert_eq!(body["error"]["code"], "no_handler", "{body}");

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/slow",
            Some(&operator),
            Some(json!({"timeout_ms": 300})),
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::GATEWAY_TIMEOUT, Some("timeout"))
    );
    // The caller is gone when the handler finishes: one abandoned execution.
    let recorded = outbox_testkit::wait_until(std::time::Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM abandoned_executions WHERE topic = 'slow' AND outcome = 'succeeded'")
            .fetch_one(&w.db.pool)
            .await
            .is_ok_and(|n| n == 1)
    })
    .await;
    stop.cancel();
    run.await??;
    assert!(recorded, "no abandoned_executions row");
    let (rows, dead, inboxes): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM invocation_inboxes)",
    )
    .fetch_one(&w.db.pool)
    .await?;
    assert_eq!(
        (rows, dead, inboxes),
        (0, 0, 0),
        "no retries, no dead letters, no leftover inboxes"
    );
    Ok(())
}

#[tokio::test]
async fn the_triggers_page_creates_lists_and_disables_with_csrf_and_roles() -> TestResult {
    let w = World::new().await?;
    let app = || outbox_admin::router(w.state.clone());
    let session = |email: &'static str| w.dashboard_session(email);
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
    let (admin_jar, admin_csrf) = session("a-admin@x.io").await?;
    let (viewer_jar, viewer_csrf) = session("viewer@x.io").await?;
    let create = format!(
        "csrf={admin_csrf}&kind=cron&name=nightly&target=report.build&schedule=0+3+*+*+*&timezone=Europe%2FParis"
    );
    assert_eq!(
        post(admin_jar.clone(), "/apps/app-a/triggers".into(), create).await?,
        StatusCode::SEE_OTHER
    );
    let forged = "csrf=nope&kind=kv&name=x&target=y&collection=*".to_owned();
    assert_eq!(
        post(admin_jar.clone(), "/apps/app-a/triggers".into(), forged).await?,
        StatusCode::FORBIDDEN
    );
    let viewer_try = format!("csrf={viewer_csrf}&kind=kv&name=x&target=y&collection=*");
    assert_eq!(
        post(
            viewer_jar.clone(),
            "/apps/app-a/triggers".into(),
            viewer_try
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    let listed = principals_triggers(&w).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].timezone.as_deref(), Some("Europe/Paris"));
    let page = app()
        .oneshot(
            Request::get("/apps/app-a/triggers")
                .header(header::COOKIE, &viewer_jar)
                .body(Body::empty())?,
        )
        .await?;
    let html = String::from_utf8(
        axum::body::to_bytes(page.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(
        html.contains("nightly") && html.contains("0 3 * * * Europe/Paris"),
        "{html}"
    );
    let disable = format!("/apps/app-a/triggers/{}/disable", listed[0].id);
    assert_eq!(
        post(admin_jar.clone(), disable, format!("csrf={admin_csrf}")).await?,
        StatusCode::SEE_OTHER
    );
    assert!(!principals_triggers(&w).await?[0].enabled);
    Ok(())
}

async fn principals_triggers(
    w: &World,
) -> Result<Vec<outbox_core::store::triggers::Trigger>, Box<dyn std::error::Error>> {
    Ok(outbox_core::store::triggers::list(&w.db.pool, w.app_a).await?)
}
