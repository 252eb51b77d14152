//! What the OpenAPI document declares each operation takes, enforced before
//! the handler runs: a query parameter it does not declare answers 400
//! naming it, and so does a body sent to an operation that takes none.
//!
//! Handlers that read a query string refuse unknown fields themselves
//! ([`strict::Query`](crate::strict::Query)); the others used to ignore
//! one, so `PUT …/kv/c/k?expected_version=1` wrote without the check its
//! caller asked for, and `POST …/ignore` with `{"reason": …}` dropped the
//! reason. One layer over every `/api` route closes that for all of them,
//! with the document as the one list of what each route takes.
//!
//! A refusal waits for authentication: on a route that needs a principal,
//! a caller without one learns 401 and nothing of what the route takes.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::AdminState;
use crate::error::ApiError;

/// What one operation takes.
#[derive(Debug, Default)]
struct Declared {
    /// Its query parameters, in the document's order.
    query: Vec<String>,
    /// Whether it takes a request body.
    body: bool,
    /// Whether it answers without a principal (`security: []`).
    public: bool,
}

/// The document's operations by method (upper case) and path template.
fn operations() -> &'static HashMap<(String, String), Declared> {
    static OPERATIONS: OnceLock<HashMap<(String, String), Declared>> = OnceLock::new();
    OPERATIONS.get_or_init(|| {
        // The document is compiled in and parsed by the tests; an empty map
        // would only switch the checks off.
        serde_json::from_str(super::OPENAPI)
            .map(|doc| read_operations(&doc))
            .unwrap_or_default()
    })
}

fn read_operations(doc: &Value) -> HashMap<(String, String), Declared> {
    let resolve = |param: &Value| -> Option<(String, String)> {
        let param = match param["$ref"].as_str() {
            Some(reference) => doc.pointer(reference.trim_start_matches('#'))?,
            None => param,
        };
        Some((param["name"].as_str()?.into(), param["in"].as_str()?.into()))
    };
    let query_of = |params: &Value| -> Vec<String> {
        params
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(resolve)
            .filter(|(_, place)| place == "query")
            .map(|(name, _)| name)
            .collect()
    };
    let mut operations = HashMap::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let shared = query_of(&item["parameters"]);
        for (method, op) in item.as_object().into_iter().flatten() {
            if method == "parameters" {
                continue;
            }
            let mut query = shared.clone();
            query.extend(query_of(&op["parameters"]));
            operations.insert(
                (method.to_ascii_uppercase(), path.clone()),
                Declared {
                    query,
                    body: op.get("requestBody").is_some(),
                    public: op["security"].as_array().is_some_and(Vec::is_empty),
                },
            );
        }
    }
    operations
}

/// The layer: refuses what the matched operation does not declare, and
/// passes everything else (and any route the document does not list) on.
/// A body is read up to the state's body limit where none is declared.
pub async fn refuse_undeclared(
    State(state): State<AdminState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(declared) = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|path| operations().get(&(req.method().to_string(), path.as_str().to_owned())))
    else {
        return next.run(req).await;
    };
    if let Some(query) = req.uri().query()
        && let Some(unknown) = form_urlencoded::parse(query.as_bytes())
            .map(|(key, _)| key)
            .find(|key| !declared.query.iter().any(|k| k == key))
    {
        let accepted = if declared.query.is_empty() {
            "this route takes no query parameters".to_owned()
        } else {
            format!("accepted: {}", declared.query.join(", "))
        };
        let refusal = ApiError::Invalid(format!("{unknown}: unknown field ({accepted})"));
        return refuse(&state, declared, req, refusal).await;
    }
    if declared.body {
        return next.run(req).await;
    }
    // A client that sends `{}` or nothing means nothing by it; anything more
    // would be dropped without a word.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, state.body_limit).await {
        Ok(bytes) => bytes,
        Err(err) => {
            let refusal = crate::strict::unread_body(&err, state.body_limit);
            let req = Request::from_parts(parts, axum::body::Body::empty());
            return refuse(&state, declared, req, refusal).await;
        }
    };
    let said_nothing = bytes.iter().all(u8::is_ascii_whitespace)
        || serde_json::from_slice::<Value>(&bytes)
            .is_ok_and(|v| v.is_null() || v == Value::Object(Default::default()));
    if !said_nothing {
        let refusal = ApiError::Invalid("body: this route takes no body".into());
        let req = Request::from_parts(parts, axum::body::Body::empty());
        return refuse(&state, declared, req, refusal).await;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// `refusal`, unless the route needs a principal and the request has none
/// that authenticates: then that refusal (401), as the handler would give.
async fn refuse(
    state: &AdminState,
    declared: &Declared,
    req: Request,
    refusal: ApiError,
) -> Response {
    if !declared.public {
        let (mut parts, _) = req.into_parts();
        if let Err(unauthenticated) = super::Bearer::from_request_parts(&mut parts, state).await {
            return unauthenticated.into_response();
        }
    }
    refusal.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_of_the_document_is_read_with_its_query_parameters() {
        let ops = operations();
        assert!(ops.len() > 40, "{} operations", ops.len());
        let list = &ops[&("GET".to_owned(), "/api/apps/{app}/dead-letters".to_owned())];
        assert!(list.query.iter().any(|q| q == "limit"), "{list:?}");
        let put = &ops[&(
            "PUT".to_owned(),
            "/api/apps/{app}/kv/{collection}/{key}".to_owned(),
        )];
        assert!(put.query.is_empty() && put.body, "{put:?}");
        let ignore = &ops[&(
            "POST".to_owned(),
            "/api/apps/{app}/dead-letters/{id}/ignore".to_owned(),
        )];
        assert!(!ignore.body, "{ignore:?}");
    }
}
