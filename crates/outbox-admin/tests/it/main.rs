//! The admin API and dashboard against a real PostgreSQL, through the router.
//!
//! This file holds what the test files share (`World`, the fixtures'
//! password, `urlencode`); the tests live in one file per route or concern.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_admin::{AdminState, AuthConfig};
use outbox_core::store::dead_letters::External;
use outbox_core::store::principals::{self, Role};
use outbox_testkit::TestDb;
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

mod accounts;
mod audit;
mod auth;
mod dashboard;
mod dead_letters;
mod events;
mod hostile;
mod invoke;
mod openapi;
mod rows;
mod topics;

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
        Ok(outbox_core::store::dead_letters::insert_external(
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
