//! Signing in over the API and bearer credentials: the same answer for an
//! unknown e-mail and a wrong password, the login rate limit, and refused
//! tokens.

use axum::http::StatusCode;
use outbox_admin::AuthConfig;
use outbox_core::store::principals;
use serde_json::json;
use uuid::Uuid;

use super::{PASSWORD, TestResult, World};

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

/// Two accounts the database tells apart (its `lower()` folds ASCII only
/// under the C collation) are two counts: a guesser who owns one cannot
/// clear the other's count by signing in to its own.
#[tokio::test]
async fn accounts_the_database_tells_apart_are_counted_apart() -> TestResult {
    let w = World::new().await?.with_limits(3);
    for email in ["\u{c4}DMIN@x.io", "\u{e4}dmin@x.io"] {
        outbox_admin::create_user(&w.db.pool, email, PASSWORD, false).await?;
    }
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT email FROM users WHERE email LIKE '_dmin@x.io' ORDER BY email")
            .fetch_all(&w.db.pool)
            .await?;
    assert_eq!(stored.len(), 2, "{stored:?}");
    let login = |email: &'static str, password: &'static str| {
        w.call(
            "POST",
            "/api/login",
            None,
            Some(json!({"email": email, "password": password})),
        )
    };
    for _ in 0..3 {
        assert_eq!(
            login("\u{c4}dmin@x.io", "bad password").await?.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(login("\u{e4}dmin@x.io", PASSWORD).await?.0, StatusCode::OK);
    }
    let (status, body) = login("\u{c4}dmin@x.io", PASSWORD).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
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
