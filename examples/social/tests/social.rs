//! The example service end to end: HTTP → use case (data + event in one
//! transaction) → dispatcher → notification, with the outboxd test kit.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use example_social::{APP, State, handlers, http};
use outbox_admin::auth::{AuthConfig, Hasher};
use outbox_testkit::{TestDb, run_until_idle};
use serde_json::{Value, json};
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Service {
    db: TestDb,
    state: State,
}

impl Service {
    async fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let db = TestDb::new().await?;
        example_social::migrate(&db.pool).await?;
        let app = db.app(APP).await?;
        let mut auth = AuthConfig::new(b"example-secret-0123456789abcdef!".to_vec())?;
        auth.audience = "social-example".into();
        let state = State {
            pool: db.pool.clone(),
            app,
            auth,
            hasher: Hasher::new()?,
        };
        Ok(Self { db, state })
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Value,
    ) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let res = http::router(self.state.clone())
            .oneshot(req.body(Body::from(body.to_string()))?)
            .await?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Registers and logs in; returns (user id, token).
    async fn user(&self, email: &str) -> Result<(String, String), Box<dyn std::error::Error>> {
        let creds = json!({"email": email, "password": "correct horse battery"});
        let (s, body) = self.call("POST", "/register", None, creds.clone()).await?;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let id = body["id"].as_str().ok_or("id")?.to_owned();
        let (s, body) = self.call("POST", "/login", None, creds).await?;
        assert_eq!(s, StatusCode::OK, "{body}");
        Ok((id, body["token"].as_str().ok_or("token")?.to_owned()))
    }

    async fn notifications(&self) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT u.email, n.kind FROM social.notifications n JOIN social.users u ON u.id = n.user_id
             ORDER BY u.email, n.kind",
        )
        .fetch_all(&self.db.pool)
        .await
    }
}

#[tokio::test]
async fn likes_and_follows_notify_others_never_yourself_and_skip_deleted_notes() -> TestResult {
    let svc = Service::new().await?;
    let (ann, ann_token) = svc.user("ann@example.com").await?;
    let (_bob, bob_token) = svc.user("bob@example.com").await?;
    assert_eq!(svc.db.enqueued("user.registered").await?.len(), 2);

    let (s, note) = svc
        .call("POST", "/notes", Some(&ann_token), json!({"body": "hello"}))
        .await?;
    assert_eq!(s, StatusCode::CREATED);
    let note = note["id"].as_str().ok_or("note id")?.to_owned();
    let (s, gone) = svc
        .call(
            "POST",
            "/notes",
            Some(&ann_token),
            json!({"body": "soon deleted"}),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED);
    let gone = gone["id"].as_str().ok_or("note id")?.to_owned();

    // Bob likes both (twice for one: one event), Ann likes her own note, Bob
    // follows Ann; then Ann deletes the second note before the handler runs.
    for (token, uri) in [
        (&bob_token, format!("/notes/{note}/like")),
        (&bob_token, format!("/notes/{note}/like")),
        (&bob_token, format!("/notes/{gone}/like")),
        (&ann_token, format!("/notes/{note}/like")),
        (&bob_token, format!("/users/{ann}/follow")),
    ] {
        let (s, body) = svc.call("POST", &uri, Some(token), json!({})).await?;
        assert_eq!(s, StatusCode::NO_CONTENT, "{uri}: {body}");
    }
    assert_eq!(svc.db.enqueued("note.liked").await?.len(), 3);
    let (s, _) = svc
        .call(
            "DELETE",
            &format!("/notes/{gone}"),
            Some(&ann_token),
            json!({}),
        )
        .await?;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let report = run_until_idle(&svc.db.pool, handlers::notifications(svc.db.pool.clone())).await?;
    assert_eq!(report.completed, 4, "3 likes and 1 follow handled");
    assert_eq!(
        svc.notifications().await?,
        vec![
            ("ann@example.com".to_owned(), "follow".to_owned()),
            ("ann@example.com".to_owned(), "like".to_owned()),
        ],
        "one like (not her own, not the deleted note) and one follow"
    );
    Ok(())
}

#[tokio::test]
async fn refused_use_cases_enqueue_nothing() -> TestResult {
    let svc = Service::new().await?;
    let (ann, ann_token) = svc.user("ann@example.com").await?;
    let cases = [
        (
            "POST",
            "/register".to_owned(),
            None,
            json!({"email": "ann@example.com", "password": "correct horse battery"}),
            StatusCode::CONFLICT,
        ),
        (
            "POST",
            "/register".to_owned(),
            None,
            json!({"email": "x@example.com", "password": "short"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/login".to_owned(),
            None,
            json!({"email": "ann@example.com", "password": "wrong password!"}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "POST",
            "/notes".to_owned(),
            None,
            json!({"body": "hi"}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "POST",
            "/notes".to_owned(),
            Some("not-a-token"),
            json!({"body": "hi"}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "POST",
            "/notes".to_owned(),
            Some(ann_token.as_str()),
            json!({"body": ""}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            format!("/notes/{}/like", uuid::Uuid::new_v4()),
            Some(ann_token.as_str()),
            json!({}),
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            format!("/users/{ann}/follow"),
            Some(ann_token.as_str()),
            json!({}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            format!("/users/{}/follow", uuid::Uuid::new_v4()),
            Some(ann_token.as_str()),
            json!({}),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, uri, token, body, want) in cases {
        let (s, answer) = svc.call(method, &uri, token, body).await?;
        assert_eq!(s, want, "{method} {uri}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&svc.db.pool)
        .await?;
    assert_eq!(events, 1, "only Ann's registration");
    Ok(())
}

#[tokio::test]
async fn in_transactional_mode_the_notification_commits_with_the_event() -> TestResult {
    let svc = Service::new().await?;
    let (ann, _) = svc.user("ann@example.com").await?;
    let (_, bob_token) = svc.user("bob@example.com").await?;
    let (s, _) = svc
        .call(
            "POST",
            &format!("/users/{ann}/follow"),
            Some(&bob_token),
            json!({}),
        )
        .await?;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let dispatcher = outbox_dispatch::Dispatcher::new(
        svc.db.pool.clone(),
        handlers::notifications(svc.db.pool.clone()),
        outbox_dispatch::Config {
            in_transaction: true,
            ..outbox_dispatch::Config::default()
        },
    )?;
    let report = dispatcher.run_until_idle().await?;
    assert!(report.completed >= 1, "{report:?}");
    assert_eq!(
        svc.notifications().await?,
        vec![("ann@example.com".to_owned(), "follow".to_owned())]
    );
    assert!(svc.db.enqueued("user.followed").await?.is_empty());
    Ok(())
}
