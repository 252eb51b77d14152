//! The OpenAPI description against the real routes: every documented
//! operation is served, and every `/api` route in the source is documented.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use serde_json::{Value, json};

use outbox_core::store::principals;

use super::{TestResult, World};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// (METHOD, path) of every operation under `/api` in the document.
fn documented() -> Result<BTreeSet<(String, String)>, Box<dyn std::error::Error>> {
    let doc: Value = serde_json::from_str(outbox_admin::api::OPENAPI)?;
    assert_eq!(doc["openapi"], "3.1.0");
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().ok_or("paths")? {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    Ok(ops)
}

/// (METHOD, path) of every `.route(…)` under `/api` in the admin sources.
fn routed() -> BTreeSet<(String, String)> {
    let sources = [
        include_str!("../../src/api/mod.rs"),
        include_str!("../../src/events_api.rs"),
        include_str!("../../src/invoke.rs"),
    ];
    let mut routes = BTreeSet::new();
    for source in sources {
        for chunk in source.split(".route(").skip(1) {
            let Some(path) = chunk.split('"').nth(1) else {
                continue;
            };
            // This route's handlers end at the next chained call or at the
            // end of the function.
            let call = chunk.split("\n        .").next().unwrap_or(chunk);
            let call = call.split("\n}").next().unwrap_or(call);
            for method in METHODS {
                if call.contains(&format!("{method}(")) {
                    routes.insert((method.to_uppercase(), path.to_owned()));
                }
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes_and_is_served() -> TestResult {
    let documented = documented()?;
    let api: BTreeSet<(String, String)> = documented
        .iter()
        .filter(|(_, p)| p.starts_with("/api/"))
        .cloned()
        .collect();
    let routed = routed();
    assert!(
        routed.len() >= 19,
        "the route scan found too little: {routed:?}"
    );
    assert_eq!(
        api, routed,
        "documented (left) and routed (right) operations differ"
    );

    let mut w = World::new().await?;
    w.state.api_servers = vec!["https://outboxd.example.com".into()];
    let root = w.login("root@x.io").await?;
    let (status, mut served) = w.call("GET", "/api/openapi.json", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    // `servers` comes from the configuration; the rest is the file.
    assert_eq!(served["servers"][0]["url"], "https://outboxd.example.com");
    let mut file = serde_json::from_str::<Value>(outbox_admin::api::OPENAPI)?;
    served["servers"] = Value::Null;
    file["servers"] = Value::Null;
    assert_eq!(served, file);
    // Every documented operation reaches a handler: no "route not found",
    // no 405.
    let id = uuid::Uuid::new_v4().to_string();
    for (method, path) in &api {
        let uri = path
            .replace("{app}", "app-a")
            .replace("{id}", &id)
            .replace("{collection}", "c")
            .replace("{key}", "k")
            .replace("{topic}", "t")
            .replace("{queue}", "q");
        // A body only where one is declared: elsewhere one is refused.
        let body = file["paths"][path.as_str()][method.to_lowercase()]
            .get("requestBody")
            .map(|_| serde_json::json!({"timeout_ms": 1, "value": 1}));
        let (status, answer) = w.call(method, &uri, Some(&root), body).await?;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_ne!(
            answer["error"]["message"], "route not found",
            "{method} {uri} is documented but not routed"
        );
    }
    Ok(())
}

/// Checks an answer against the schema the document gives for that
/// operation and status (or its `default`).
struct Contract {
    doc: Value,
}

impl Contract {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        Ok(Self {
            doc: serde_json::from_str(outbox_admin::api::OPENAPI)?,
        })
    }

    fn resolve<'a>(&'a self, mut node: &'a Value) -> &'a Value {
        while let Some(r) = node.get("$ref").and_then(Value::as_str) {
            let pointer = r.trim_start_matches('#');
            match self.doc.pointer(pointer) {
                Some(target) => node = target,
                None => break,
            }
        }
        node
    }

    /// Validates `body` as the documented answer of `method path` with `status`.
    fn check(
        &self,
        method: &str,
        path: &str,
        status: StatusCode,
        body: &Value,
    ) -> Result<(), String> {
        let op = &self.doc["paths"][path][method.to_lowercase()];
        if op.is_null() {
            return Err(format!("{method} {path} is not documented"));
        }
        let responses = &op["responses"];
        let response = responses
            .get(status.as_str())
            .or_else(|| responses.get("default"))
            .ok_or_else(|| format!("{method} {path}: status {status} is not documented"))?;
        let response = self.resolve(response);
        // An answer documented without content (204) must have none.
        if response.get("content").is_none() && status == StatusCode::NO_CONTENT {
            return if body.is_null() {
                Ok(())
            } else {
                Err(format!(
                    "{method} {path} {status}: a body where none is documented"
                ))
            };
        }
        let Some(schema) = response.pointer("/content/application~1json/schema") else {
            return Err(format!("{method} {path} {status}: no JSON schema"));
        };
        // The schema's $refs point into the document's components.
        let mut root = serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.doc["components"].clone(),
        });
        if let (Some(root), Some(schema)) = (root.as_object_mut(), schema.as_object()) {
            for (k, v) in schema {
                root.insert(k.clone(), v.clone());
            }
        }
        let validator = jsonschema::validator_for(&root)
            .map_err(|e| format!("{method} {path} {status}: bad schema: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{method} {path} {status}: {body} does not match: {errors:?}"
            ))
        }
    }
}

/// (method, documented path, concrete URI, token, body).
type Call = (
    &'static str,
    &'static str,
    String,
    Option<String>,
    Option<Value>,
);

#[tokio::test]
async fn real_answers_match_the_documented_schemas() -> TestResult {
    let w = World::new().await?;
    let contract = Contract::new()?;
    let root = w.login("root@x.io").await?;
    let dl = w.dead_letter(w.app_a, "a.one").await?;
    let dl2 = w.dead_letter(w.app_a, "a.two").await?;
    let dl3 = w.dead_letter(w.app_a, "a.three").await?;
    let viewer = principals::user_by_email(&w.db.pool, "viewer@x.io")
        .await?
        .ok_or("viewer")?;
    let key = outbox_admin::create_api_key(&w.db.pool, viewer.id, "ci").await?;
    let prefix = key
        .trim_start_matches("obx_")
        .split('_')
        .next()
        .unwrap_or_default()
        .to_owned();
    // A row with an attempt history, and its dead letter's twin.
    let mut tx = w.db.pool.begin().await?;
    let row = outbox_core::enqueue(
        &mut tx,
        w.app_a,
        &outbox_core::NewEvent::new("a.row", json!({"n": 1})),
    )
    .await?;
    tx.commit().await?;
    let claimed =
        outbox_core::store::outbox::claim(&w.db.pool, "w-1", 1, std::time::Duration::from_secs(30))
            .await?;
    let retry = outbox_core::store::outbox::Reschedule {
        lease: claimed.first().ok_or("nothing claimed")?.lease(),
        delay: std::time::Duration::from_secs(600),
        error: Some("boom".into()),
        refund_attempt: false,
    };
    outbox_core::store::outbox::reschedule(
        &w.db.pool,
        &[retry],
        outbox_core::store::outbox::AttemptHistory::default(),
    )
    .await?;
    // (method, documented path, concrete URI, token, body)
    let mut calls: Vec<Call> = vec![
        (
            "GET",
            "/api/apps/{app}/outbox/{id}",
            format!("/api/apps/app-a/outbox/{row}"),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/outbox/{id}",
            format!("/api/apps/app-a/outbox/{dl}"),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/login",
            "/api/login".into(),
            None,
            Some(json!({"email": "root@x.io", "password": super::PASSWORD})),
        ),
        (
            "POST",
            "/api/login",
            "/api/login".into(),
            None,
            Some(json!({"email": "root@x.io", "password": "wrong wrong wrong"})),
        ),
        (
            "POST",
            "/api/login",
            "/api/login".into(),
            None,
            Some(json!({"email": "root@x.io"})),
        ),
        (
            "GET",
            "/api/apps",
            "/api/apps".into(),
            Some(root.clone()),
            None,
        ),
        ("GET", "/api/apps", "/api/apps".into(), None, None),
        (
            "GET",
            "/api/apps/{app}/dead-letters",
            "/api/apps/app-a/dead-letters?limit=2".into(),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/dead-letters",
            "/api/apps/app-a/dead-letters?limit=0".into(),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/dead-letters/count",
            "/api/apps/app-a/dead-letters/count".into(),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/dead-letters/{id}",
            format!("/api/apps/app-a/dead-letters/{dl}"),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/dead-letters/{id}",
            format!("/api/apps/app-b/dead-letters/{dl}"),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/{id}/replay",
            format!("/api/apps/app-a/dead-letters/{dl}/replay"),
            Some(root.clone()),
            Some(json!({"max_attempts": 4})),
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/{id}/replay",
            format!("/api/apps/app-a/dead-letters/{dl}/replay"),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/{id}/ignore",
            format!("/api/apps/app-a/dead-letters/{dl2}/ignore"),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/{id}/resolve",
            format!("/api/apps/app-a/dead-letters/{dl2}/resolve"),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/apps/{app}/dead-letters/bulk",
            "/api/apps/app-a/dead-letters/bulk".into(),
            Some(root.clone()),
            Some(json!({"action": "ignore", "ids": [dl3]})),
        ),
        (
            "PUT",
            "/api/apps/{app}/kv/{collection}/{key}",
            "/api/apps/app-a/kv/notes/n1".into(),
            Some(root.clone()),
            Some(json!({"value": {"a": 1}})),
        ),
        (
            "PUT",
            "/api/apps/{app}/kv/{collection}/{key}",
            "/api/apps/app-a/kv/notes/n1".into(),
            Some(root.clone()),
            Some(json!({"value": 2})),
        ),
        (
            "GET",
            "/api/apps/{app}/kv/{collection}/{key}",
            "/api/apps/app-a/kv/notes/n1".into(),
            Some(root.clone()),
            None,
        ),
        (
            "DELETE",
            "/api/apps/{app}/kv/{collection}/{key}",
            "/api/apps/app-a/kv/notes/n1".into(),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/apps/{app}/events/{topic}",
            "/api/apps/app-a/events/user.signed_up".into(),
            Some(root.clone()),
            Some(json!({"payload": {"id": 1}})),
        ),
        (
            "POST",
            "/api/apps/{app}/events/{topic}",
            "/api/apps/app-a/events/user.signed_up".into(),
            Some(root.clone()),
            Some(json!({"delay_ms": 5})),
        ),
        (
            "POST",
            "/api/apps/{app}/jobs/{queue}",
            "/api/apps/app-a/jobs/reports".into(),
            Some(root.clone()),
            Some(json!({"payload": {}, "delay_ms": 1000, "max_attempts": 3})),
        ),
        (
            "POST",
            "/api/apps/{app}/triggers",
            "/api/apps/app-a/triggers".into(),
            Some(root.clone()),
            Some(
                json!({"kind": "cron", "name": "nightly", "target": "report.build", "schedule": "0 3 * * *"}),
            ),
        ),
        (
            "GET",
            "/api/apps/{app}/triggers",
            "/api/apps/app-a/triggers".into(),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/apps/{app}/invoke/{topic}",
            "/api/apps/app-a/invoke/t".into(),
            Some(root.clone()),
            Some(json!({"timeout_ms": 1})),
        ),
        (
            "GET",
            "/api/users",
            "/api/users".into(),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/users",
            "/api/users".into(),
            Some(root.clone()),
            Some(json!({"email": "new@x.io", "password": "long enough password"})),
        ),
        (
            "PUT",
            "/api/users/{user}/password",
            "/api/users/new@x.io/password".into(),
            Some(root.clone()),
            Some(json!({"password": "another long password"})),
        ),
        (
            "POST",
            "/api/users/{user}/unlock",
            "/api/users/new@x.io/unlock".into(),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/users/{user}/revoke-sessions",
            "/api/users/new@x.io/revoke-sessions".into(),
            Some(root.clone()),
            None,
        ),
        (
            "DELETE",
            "/api/users/{user}",
            "/api/users/new@x.io".into(),
            Some(root.clone()),
            None,
        ),
        (
            "DELETE",
            "/api/users/{user}",
            "/api/users/root@x.io".into(),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/api-keys",
            "/api/api-keys".into(),
            Some(root.clone()),
            None,
        ),
        (
            "DELETE",
            "/api/api-keys/{prefix}",
            format!("/api/api-keys/{prefix}"),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/audit",
            "/api/apps/app-a/audit?limit=50".into(),
            Some(root.clone()),
            None,
        ),
        (
            "GET",
            "/api/apps/{app}/audit",
            "/api/apps/app-a/audit?limit=501".into(),
            Some(root.clone()),
            None,
        ),
        (
            "POST",
            "/api/logout",
            "/api/logout".into(),
            Some(root.clone()),
            None,
        ),
    ];
    // Trigger changes need the id the creation returned; run in order.
    let mut checked = 0;
    let mut statuses = Vec::new();
    for (method, path, uri, token, body) in calls.drain(..) {
        let (status, answer) = w.call(method, &uri, token.as_deref(), body).await?;
        contract
            .check(method, path, status, &answer)
            .map_err(|e| e.to_string())?;
        if path == "/api/apps/{app}/triggers" && method == "POST" {
            let id = answer["id"].as_str().ok_or("trigger id")?.to_owned();
            for (m, p, suffix) in [
                ("GET", "/api/apps/{app}/triggers/{id}", ""),
                ("POST", "/api/apps/{app}/triggers/{id}/disable", "/disable"),
                ("POST", "/api/apps/{app}/triggers/{id}/enable", "/enable"),
                ("DELETE", "/api/apps/{app}/triggers/{id}", ""),
            ] {
                let uri = format!("/api/apps/app-a/triggers/{id}{suffix}");
                let (status, answer) = w.call(m, &uri, Some(&root), None).await?;
                contract
                    .check(m, p, status, &answer)
                    .map_err(|e| e.to_string())?;
                checked += 1;
            }
        }
        statuses.push(status.as_u16());
        checked += 1;
    }
    // Both successes and refusals were among the answers checked.
    for want in [200, 201, 400, 401, 404, 409] {
        assert!(statuses.contains(&want), "no {want} among {statuses:?}");
    }
    assert!(checked >= 38, "{checked}");
    Ok(())
}
