//! The OpenAPI description against the real routes: every documented
//! operation is served, and every `/api` route in the source is documented.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use serde_json::Value;

use super::{TestResult, World};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// (METHOD, path) of every operation under `/api` in the document.
fn documented() -> Result<BTreeSet<(String, String)>, Box<dyn std::error::Error>> {
    let doc: Value = serde_json::from_str(outbox_admin::api::OPENAPI)?;
    assert_eq!(doc["openapi"], "3.0.3");
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
        include_str!("../../src/api.rs"),
        include_str!("../../src/platform.rs"),
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

    let w = World::new().await?;
    let root = w.login("root@x.io").await?;
    let (status, served) = w.call("GET", "/api/openapi.json", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        served,
        serde_json::from_str::<Value>(outbox_admin::api::OPENAPI)?
    );
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
        let body = (method != "GET" && method != "DELETE")
            .then(|| serde_json::json!({"timeout_ms": 1, "value": 1}));
        let (status, answer) = w.call(method, &uri, Some(&root), body).await?;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_ne!(
            answer["error"]["message"], "route not found",
            "{method} {uri} is documented but not routed"
        );
    }
    Ok(())
}
