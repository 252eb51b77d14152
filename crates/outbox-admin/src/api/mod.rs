//! The JSON API under `/api`. Every endpoint checks the capability for the
//! app in its path; another app's rows answer 404.
//!
//! This module holds the router, the bearer extractor and the OpenAPI
//! document; the handlers live in one file per noun (`login`, `accounts`,
//! `apps`, `dead_letters`, `rows`, `topics`).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::AdminState;
use crate::auth::{self, Principal};
use crate::error::ApiError;

mod accounts;
mod apps;
mod dead_letters;
pub(crate) mod declared;
mod login;
mod rows;
mod searches;
mod topics;

pub use self::dead_letters::{
    BulkBody, BulkFilter, Bulked, ListQuery, MAX_BULK, Page, ReplayBody, count_unresolved_matching,
    decode_cursor, encode_cursor, ignore_one, list_page, replay_attempts, replay_one, run_bulk,
};
pub use self::login::check_login;
pub use self::rows::{
    Acted, COUNT_BOUND, RowList, RowQuery, Selection, cancel_rows, count_touched, list_rows,
    retry_rows,
};
pub use self::searches::RowSearches;
pub(crate) use self::topics::AuditQuery;
pub use self::topics::{
    Limited, Paused, TopicSummary, limit_topic, pause_topic, resume_topic, topic_summaries,
    unlimit_topic,
};

use self::accounts::{
    api_keys, create_user, delete_user, revoke_api_key, revoke_sessions, set_password, unlock_user,
    users,
};
use self::apps::apps;
use self::dead_letters::{bulk, count, ignore, list, replay, show};
use self::login::{login, logout};
use self::topics::{
    list_activity, list_audit, list_limits, list_pauses, list_processes, list_topics, pause,
    read_stream, remove_limit, resume, set_limit,
};

/// The `/api` routes.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/users", get(users).post(create_user))
        .route("/api/users/{user}", axum::routing::delete(delete_user))
        .route(
            "/api/users/{user}/password",
            axum::routing::put(set_password),
        )
        .route("/api/users/{user}/unlock", post(unlock_user))
        .route("/api/users/{user}/revoke-sessions", post(revoke_sessions))
        .route("/api/api-keys", get(api_keys))
        .route(
            "/api/api-keys/{prefix}",
            axum::routing::delete(revoke_api_key),
        )
        .route("/api/apps", get(apps))
        .route("/api/apps/{app}/dead-letters", get(list))
        .route("/api/apps/{app}/dead-letters/count", get(count))
        .route("/api/apps/{app}/dead-letters/bulk", post(bulk))
        .route("/api/apps/{app}/dead-letters/{id}", get(show))
        .route("/api/apps/{app}/dead-letters/{id}/ignore", post(ignore))
        // `resolve` is the earlier name of `ignore`, kept as an alias.
        .route("/api/apps/{app}/dead-letters/{id}/resolve", post(ignore))
        .route("/api/apps/{app}/dead-letters/{id}/replay", post(replay))
        .route("/api/apps/{app}/processes", get(list_processes))
        .route("/api/apps/{app}/topics", get(list_topics))
        .route("/api/apps/{app}/activity", get(list_activity))
        .route("/api/apps/{app}/stream", get(read_stream))
        .route("/api/apps/{app}/pauses", get(list_pauses))
        .route(
            "/api/apps/{app}/pauses/{topic}",
            axum::routing::put(pause).delete(resume),
        )
        .route("/api/apps/{app}/limits", get(list_limits))
        .route(
            "/api/apps/{app}/limits/{topic}",
            axum::routing::put(set_limit).delete(remove_limit),
        )
        .route("/api/apps/{app}/outbox", get(rows::list))
        .route("/api/apps/{app}/outbox/count", get(rows::count))
        .route("/api/apps/{app}/outbox/cancel", post(rows::cancel))
        .route("/api/apps/{app}/outbox/retry", post(rows::retry))
        .route("/api/apps/{app}/outbox/{id}", get(rows::show))
        .route("/api/apps/{app}/audit", get(list_audit))
}

/// A principal from `Authorization: Bearer <jwt | api key>`.
pub struct Bearer(pub Principal);

impl FromRequestParts<AdminState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let credential = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme's name is case-insensitive (RFC 9110, 11.1).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, credential)| credential)
            .ok_or_else(ApiError::unauthorized)?;
        Ok(Self(
            auth::authenticate(&state.pool, &state.auth, credential.trim()).await?,
        ))
    }
}

/// The client's address, when the server records it: the TCP peer's, or
/// the one a trusted proxy forwarded ([`auth::client_address`]).
pub fn client_addr(state: &AdminState, req: &axum::extract::Request) -> Option<std::net::IpAddr> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    auth::client_address(peer, req.headers(), &state.auth.trusted_proxies)
}

/// The OpenAPI description of the HTTP API (checked against the routes in
/// the tests).
pub const OPENAPI: &str = include_str!("../../api/openapi.json");

/// The document, with `servers` set to where this server is reached.
async fn openapi(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let mut doc: serde_json::Value = serde_json::from_str(OPENAPI)
        .map_err(|e| ApiError::internal(format!("the OpenAPI document does not parse: {e}")))?;
    if !state.api_servers.is_empty() {
        doc["servers"] = state
            .api_servers
            .iter()
            .map(|url| serde_json::json!({ "url": url }))
            .collect();
    }
    Ok(Json(doc).into_response())
}
