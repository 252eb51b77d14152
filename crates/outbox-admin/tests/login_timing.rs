//! Login timing equalization, in a test binary of its own so that no other
//! test's work (password hashing, dispatchers) skews the measurement.

use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, header};
use outbox_admin::{AdminState, AuthConfig};
use outbox_testkit::TestDb;
use tower::ServiceExt;

#[tokio::test]
async fn an_unknown_email_costs_what_a_wrong_password_costs()
-> Result<(), Box<dyn std::error::Error>> {
    let db = TestDb::new().await?;
    let mut auth = AuthConfig::new(b"0123456789abcdef0123456789abcdef".to_vec())?;
    auth.throttle.free_per_account = 1000;
    auth.throttle.free_per_address = 1000;
    auth.throttle.free_per_pair = 1000;
    let state = AdminState::new(db.pool.clone(), auth)?;
    outbox_admin::create_user(&db.pool, "root@x.io", "correct horse battery", true).await?;
    let attempt = |email: &'static str| {
        let state = state.clone();
        async move {
            let req = Request::post("/api/login")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(
                    r#"{{"email":"{email}","password":"wrong password!"}}"#
                )))?;
            let started = Instant::now();
            let res = outbox_admin::router(state).oneshot(req).await?;
            let elapsed = started.elapsed();
            assert_eq!(res.status(), 401);
            Ok::<_, Box<dyn std::error::Error>>(elapsed)
        }
    };
    // Medians over 30 tries each, interleaved so drifting load hits both alike.
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        known.push(attempt("root@x.io").await?);
        unknown.push(attempt("ghost@x.io").await?);
    }
    known.sort();
    unknown.sort();
    let (known, unknown) = (known[15], unknown[15]);
    let ratio = known.as_secs_f64() / unknown.as_secs_f64();
    assert!(
        (0.8..=1.25).contains(&ratio),
        "known {known:?} vs unknown {unknown:?}"
    );
    Ok(())
}
