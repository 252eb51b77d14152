//! Hostile requests: the bad-input catalogue of the HTTP API and the tenant
//! isolation matrix. Every refusal has a stable JSON error code, and nothing
//! stored changes.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_core::store::principals;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

use super::{TestResult, World};

/// Everything an API call could change (of one app, or of all), for
/// before/after comparisons.
async fn snapshot_of(w: &World, app: Option<Uuid>) -> Result<Value, Box<dyn std::error::Error>> {
    let row: (Value,) = sqlx::query_as(
        "SELECT jsonb_build_object(
            'outbox', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'topic', topic, 'payload', payload) ORDER BY id), '[]')
                       FROM outbox WHERE $1::uuid IS NULL OR app_id = $1),
            'kv', (SELECT coalesce(jsonb_agg(to_jsonb(k) ORDER BY k.app_id, k.collection, k.key), '[]')
                   FROM kv_entries k WHERE $1::uuid IS NULL OR app_id = $1),
            'triggers', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'enabled', enabled) ORDER BY id), '[]')
                         FROM triggers WHERE $1::uuid IS NULL OR app_id = $1),
            'dead_letters', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'resolution', resolution) ORDER BY id), '[]')
                             FROM dead_letters WHERE $1::uuid IS NULL OR app_id = $1))",
    )
    .bind(app)
    .fetch_one(&w.db.pool)
    .await?;
    Ok(row.0)
}

async fn snapshot(w: &World) -> Result<Value, Box<dyn std::error::Error>> {
    snapshot_of(w, None).await
}

impl World {
    /// Sends raw bytes (which need not be JSON, or UTF-8).
    pub(crate) async fn call_raw(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let res = outbox_admin::router(self.state.clone())
            .oneshot(req.body(Body::from(body))?)
            .await?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    }

    async fn trigger(&self, token: &str, app: &str) -> Result<Uuid, Box<dyn std::error::Error>> {
        let (s, body) = self
            .call(
                "POST",
                &format!("/api/apps/{app}/triggers"),
                Some(token),
                Some(
                    json!({"kind": "cron", "name": format!("t-{}", Uuid::new_v4().simple()),
                            "target": "report.build", "schedule": "0 3 * * *"}),
                ),
            )
            .await?;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        Ok(body["id"].as_str().ok_or("trigger id")?.parse()?)
    }
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_changes_nothing() -> TestResult {
    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    let dl = w.dead_letter(w.app_a, "a.one").await?;
    let trigger = w.trigger(&root, "app-a").await?;
    let long = "k".repeat(600);
    let huge = {
        let mut v = b"{\"value\": \"".to_vec();
        v.extend(std::iter::repeat_n(b'x', 3 << 20));
        v.extend(b"\"}");
        v
    };
    let kv = "/api/apps/app-a/kv/orders/o-1".to_owned();
    let cases: Vec<(&str, String, Vec<u8>, StatusCode, &str)> = vec![
        // Bodies: malformed, wrong type, empty, oversized, NUL, bad UTF-8.
        ("POST", "/api/login".into(), b"not json".to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/login".into(), br#"{"email": 5, "password": []}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/login".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/login".into(), br#"{"email": "r\u0000oot@x.io", "password": "correct horse battery"}"#.to_vec(), StatusCode::UNAUTHORIZED, "unauthorized"),
        ("PUT", kv.clone(), br#"{"value": "a\u0000b"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", kv.clone(), br#"{"value": {"k\u0000": 1}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", kv.clone(), br#"{"value": 1, "expected_version": "one"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", kv.clone(), br#"{"value": 1, "expected_version": 99999999999999999999}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", kv.clone(), br#"{"expected_version": 1}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", kv.clone(), b"{\"value\": \"\xff\xfe\"}".to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", kv.clone(), huge, StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        ("PUT", "/api/apps/app-a/kv/or%00ders/o-1".into(), br#"{"value": 1}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("PUT", format!("/api/apps/app-a/kv/orders/{long}"), br#"{"value": 1}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("GET", "/api/apps/app-a/kv/orders/%FF%FE".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("DELETE", format!("{kv}?expected_version=abc"), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/events/t".into(), br#"{"payload": {"a": "\u0000"}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/events/t".into(), br#"{"payload": 1, "run_at": "yesterday"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/events/t".into(), br"[1, 2]".to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/events/t".into(), br#"{"headers": "x"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", format!("/api/apps/app-a/events/{}", "t".repeat(300)), b"{}".to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/events/a%00b".into(), b"{}".to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/jobs/q".into(), br#"{"idempotency_key": ""}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/jobs/q".into(), br#"{"max_attempts": 0}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/jobs/q".into(), br#"{"ordering_key": "o\u0000"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/triggers".into(), br#"{"kind": "cron", "name": "n", "target": "t", "schedule": "61 * * * *"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/triggers".into(), br#"{"kind": "bogus", "name": "n", "target": "t"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/triggers".into(), b"{}".to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/triggers".into(), br#"{"kind": "cron", "name": "n", "target": "t", "schedule": "0 3 * * *", "timezone": "Mars/Olympus"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/invoke/t".into(), br#"{"timeout_ms": 0}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/invoke/t".into(), br#"{"timeout_ms": 99999999}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/invoke/t".into(), br#"{"timeout_ms": -1}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/dead-letters/bulk".into(), br#"{"action": "explode", "ids": []}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/dead-letters/bulk".into(), br#"{"action": "ignore", "ids": ["nope"]}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        // Query strings and path parameters. A malformed id names no row: 404.
        ("GET", "/api/apps/app-a/dead-letters?limit=abc".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("GET", "/api/apps/app-a/dead-letters?limit=-5".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("GET", "/api/apps/app-a/dead-letters?trigger_id=x".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("GET", "/api/apps/app-a/dead-letters?after=%00".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("GET", "/api/apps/app-a/dead-letters/not-a-uuid".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("POST", "/api/apps/app-a/dead-letters/not-a-uuid/replay".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("DELETE", "/api/apps/app-a/triggers/not-a-uuid".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("POST", "/api/apps/app-a/triggers/%27%3B%20DROP%20TABLE%20triggers/enable".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/api/apps/%27%20OR%201%3D1%20--/dead-letters".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/api/apps/app-%F0%9F%92%A5/dead-letters".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/api/apps/%FF/outbox".into(), Vec::new(), StatusCode::BAD_REQUEST, "invalid"),
        ("POST", "/api/apps/app-a/outbox/cancel".into(), br#"{"ids": ["nope"], "reason": "r"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid"),
        ("GET", "/api/nowhere".into(), Vec::new(), StatusCode::NOT_FOUND, "not_found"),
        ("PATCH", kv.clone(), b"{}".to_vec(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
    ];
    let before = snapshot(&w).await?;
    let mut wrong = Vec::new();
    for (method, uri, body, status, code) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let (s, answer) = w.call_raw(method, &uri, Some(&root), body).await?;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        let has_message = !message.is_empty();
        // In the API's words, never the framework's or a library's.
        let leaks = [
            "Invalid URL",
            "UUID parsing",
            "serde",
            "sqlx",
            "axum",
            "expected u",
            "expected i",
        ]
        .iter()
        .any(|leak| message.contains(leak));
        if s != status || answer["error"]["code"] != code || !has_message || leaks {
            wrong.push(format!(
                "{method} {uri} {shown}: want {status} {code}, got {s} {answer}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        snapshot(&w).await?,
        before,
        "a refused request changed data"
    );
    // The rows the cases aimed at are still there.
    assert!(
        principals::user_by_email(&w.db.pool, "root@x.io")
            .await?
            .is_some()
    );
    let _ = (dl, trigger);
    Ok(())
}

/// Which principal calls, and what it may do on app A.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Anonymous,
    NoRole,
    Viewer,
    Operator,
    AppAdmin,
    InstanceAdmin,
}

/// The capability each endpoint needs (None: any authenticated principal).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    Read,
    Manage,
    Write,
    Triggers,
}

fn may(who: Who, needs: Needs) -> bool {
    match who {
        Who::Anonymous | Who::NoRole => false,
        Who::InstanceAdmin | Who::AppAdmin => true,
        Who::Operator => needs != Needs::Triggers,
        Who::Viewer => needs == Needs::Read,
    }
}

#[tokio::test]
async fn tenant_isolation_matrix_every_endpoint_every_role_foreign_app() -> TestResult {
    let w = World::new().await?;
    outbox_admin::create_user(&w.db.pool, "nobody@x.io", super::PASSWORD, false).await?;
    let root = w.login("root@x.io").await?;
    let operator_user = principals::user_by_email(&w.db.pool, "operator@x.io")
        .await?
        .ok_or("operator")?;
    let tokens = [
        (Who::NoRole, Some(w.login("nobody@x.io").await?)),
        (Who::Viewer, Some(w.login("viewer@x.io").await?)),
        (Who::Operator, Some(w.login("operator@x.io").await?)),
        // An API key carries its user's roles.
        (
            Who::Operator,
            Some(outbox_admin::create_api_key(&w.db.pool, operator_user.id, "matrix").await?),
        ),
        (Who::AppAdmin, Some(w.login("a-admin@x.io").await?)),
        (Who::InstanceAdmin, Some(root.clone())),
        (Who::Anonymous, None),
    ];
    type Endpoint = (&'static str, &'static str, Option<Value>, Needs);
    let endpoints: Vec<Endpoint> = vec![
        ("GET", "/api/apps/{app}/dead-letters", None, Needs::Read),
        (
            "GET",
            "/api/apps/{app}/dead-letters/count",
            None,
            Needs::Read,
        ),
        (
            "GET",
            "/api/apps/{app}/dead-letters/{dl}",
            None,
            Needs::Read,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/{dl}/replay",
            None,
            Needs::Manage,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/{dl}/resolve",
            None,
            Needs::Manage,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/bulk",
            Some(json!({"action": "ignore", "ids": ["{dl}"]})),
            Needs::Manage,
        ),
        ("GET", "/api/apps/{app}/processes", None, Needs::Read),
        ("GET", "/api/apps/{app}/pauses", None, Needs::Read),
        (
            "PUT",
            "/api/apps/{app}/pauses/{fresh}",
            Some(json!({"reason": "r"})),
            Needs::Manage,
        ),
        ("GET", "/api/apps/{app}/limits", None, Needs::Read),
        (
            "PUT",
            "/api/apps/{app}/limits/{fresh}",
            Some(json!({"max_running": 2})),
            Needs::Manage,
        ),
        (
            "POST",
            "/api/apps/{app}/outbox/cancel",
            Some(json!({"topic": "{fresh}", "reason": "r"})),
            Needs::Manage,
        ),
        ("GET", "/api/apps/{app}/kv/c/k", None, Needs::Read),
        (
            "PUT",
            "/api/apps/{app}/kv/c/{fresh}",
            Some(json!({"value": 1})),
            Needs::Write,
        ),
        ("DELETE", "/api/apps/{app}/kv/c/k", None, Needs::Write),
        (
            "POST",
            "/api/apps/{app}/events/t",
            Some(json!({"payload": {}})),
            Needs::Write,
        ),
        (
            "POST",
            "/api/apps/{app}/jobs/q",
            Some(json!({"payload": {}})),
            Needs::Write,
        ),
        (
            "POST",
            "/api/apps/{app}/invoke/t",
            Some(json!({"timeout_ms": 1})),
            Needs::Write,
        ),
        ("GET", "/api/apps/{app}/triggers", None, Needs::Read),
        (
            "POST",
            "/api/apps/{app}/triggers",
            Some(
                json!({"kind": "cron", "name": "cron-{fresh}", "target": "t", "schedule": "0 3 * * *"}),
            ),
            Needs::Triggers,
        ),
        (
            "POST",
            "/api/apps/{app}/triggers/{trigger}/disable",
            None,
            Needs::Triggers,
        ),
        (
            "POST",
            "/api/apps/{app}/triggers/{trigger}/enable",
            None,
            Needs::Triggers,
        ),
        (
            "GET",
            "/api/apps/{app}/triggers/{trigger}",
            None,
            Needs::Read,
        ),
        (
            "DELETE",
            "/api/apps/{app}/triggers/{trigger}",
            None,
            Needs::Triggers,
        ),
    ];
    let mut checked = 0;
    for (method, template, body, needs) in &endpoints {
        for (who, token) in &tokens {
            for app in ["app-a", "app-b"] {
                // Fresh targets per call, so an earlier allowed call (a
                // replay, a delete) cannot change the answer of this one.
                let app_id = if app == "app-a" { w.app_a } else { w.app_b };
                let dl = w.dead_letter(app_id, "m").await?;
                let trigger = w.trigger(&root, app).await?;
                let kv_put = w
                    .call(
                        "PUT",
                        &format!("/api/apps/{app}/kv/c/k"),
                        Some(&root),
                        Some(json!({"value": 0})),
                    )
                    .await?;
                // 201 when the entry is new, 200 when it is an update.
                assert!(
                    matches!(kv_put.0, StatusCode::OK | StatusCode::CREATED),
                    "{}",
                    kv_put.1
                );
                let fresh = Uuid::new_v4().simple().to_string();
                let fill = |s: &str| {
                    s.replace("{app}", app)
                        .replace("{dl}", &dl.to_string())
                        .replace("{trigger}", &trigger.to_string())
                        .replace("{fresh}", &fresh)
                };
                let uri = fill(template);
                let body = body.as_ref().map(|b| {
                    serde_json::from_str::<Value>(&fill(&b.to_string())).unwrap_or(Value::Null)
                });
                let foreign_before = snapshot_of(&w, Some(w.app_b)).await?;
                let (status, answer) = w.call(method, &uri, token.as_deref(), body).await?;
                let expected = match (who, app) {
                    (Who::Anonymous, _) => StatusCode::UNAUTHORIZED,
                    (Who::InstanceAdmin, _) => StatusCode::OK,
                    (_, "app-b") | (Who::NoRole, _) => StatusCode::NOT_FOUND,
                    (_, _) if may(*who, *needs) => StatusCode::OK,
                    _ => StatusCode::FORBIDDEN,
                };
                // invoke of a topic no process serves answers no_handler,
                // and a creation answers 201: both allowed, not refused.
                let no_handler =
                    status == StatusCode::NOT_FOUND && answer["error"]["code"] == "no_handler";
                let status = if no_handler
                    || status == StatusCode::CREATED
                    || status == StatusCode::NO_CONTENT
                {
                    StatusCode::OK
                } else {
                    status
                };
                assert_eq!(status, expected, "{who:?} {method} {uri}: {answer}");
                if expected != StatusCode::OK {
                    assert!(answer["error"]["code"].is_string(), "{answer}");
                    if app == "app-b" {
                        assert_eq!(
                            snapshot_of(&w, Some(w.app_b)).await?,
                            foreign_before,
                            "{who:?} {method} {uri} changed app B"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, endpoints.len() * tokens.len() * 2);
    Ok(())
}

/// Whatever bytes arrive as a body, the answer is never a 5xx, a refusal
/// carries a stable code, and a refused request changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bodies_never_fail_the_server() -> TestResult {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    let bodies = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "[ -~]{0,64}".prop_map(String::into_bytes),
        r#"\{"(value|payload|kind|action|timeout_ms|ids|email|run_at|headers)": ("[^"]{0,8}"|-?[0-9]{1,25}|null|true|\[\]|\{\})\}"#
            .prop_map(String::into_bytes),
    ];
    let endpoints = [
        ("POST", "/api/login"),
        ("PUT", "/api/apps/app-a/kv/fuzz/k"),
        ("POST", "/api/apps/app-a/events/fuzz"),
        ("POST", "/api/apps/app-a/jobs/fuzz"),
        ("POST", "/api/apps/app-a/triggers"),
        ("POST", "/api/apps/app-a/dead-letters/bulk"),
    ];
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let fail = |e: Box<dyn std::error::Error>| TestCaseError::fail(e.to_string());
    let result = tokio::task::block_in_place(|| {
        runner.run(&(0..endpoints.len(), bodies), |(endpoint, body)| {
            handle.block_on(async {
                let (method, uri) = endpoints[endpoint];
                let before = snapshot(&w).await.map_err(fail)?;
                let (status, answer) = w
                    .call_raw(method, uri, Some(&root), body)
                    .await
                    .map_err(fail)?;
                prop_assert!(
                    !status.is_server_error() || status == StatusCode::GATEWAY_TIMEOUT,
                    "{} {}: {} {}",
                    method,
                    uri,
                    status,
                    answer
                );
                if status.is_client_error() {
                    prop_assert!(answer["error"]["code"].is_string(), "{}", answer);
                    prop_assert_eq!(snapshot(&w).await.map_err(fail)?, before);
                }
                Ok(())
            })
        })
    });
    result.map_err(|e| e.to_string())?;
    Ok(())
}
