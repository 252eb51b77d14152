//! The JSON API under `/api`. Every endpoint checks the capability for the
//! app in its path; another app's rows answer 404.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::DeadLetter;
use outbox_core::store::dead_letters::{self, Cursor, Filter};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AdminState;
use crate::auth::{self, Capability, Principal};
use crate::error::ApiError;

/// The `/api` routes.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/login", post(login))
        .route("/api/apps", get(apps))
        .route("/api/apps/{app}/dead-letters", get(list))
        .route("/api/apps/{app}/dead-letters/count", get(count))
        .route("/api/apps/{app}/dead-letters/bulk", post(bulk))
        .route("/api/apps/{app}/dead-letters/{id}", get(show))
        .route("/api/apps/{app}/dead-letters/{id}/resolve", post(resolve))
        .route("/api/apps/{app}/dead-letters/{id}/replay", post(replay))
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
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(ApiError::unauthorized)?;
        Ok(Self(
            auth::authenticate(&state.pool, &state.auth, credential.trim()).await?,
        ))
    }
}

/// The client address, when the server records it.
pub fn client_addr(parts_extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    parts_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The OpenAPI description of the HTTP API (checked against the routes in
/// the tests).
pub const OPENAPI: &str = include_str!("../api/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

#[derive(Serialize)]
struct LoginAnswer {
    token: String,
    expires_at: i64,
}

/// Checks a login, rate limits included. The same error and the same cost
/// for an unknown e-mail and a wrong password.
pub async fn check_login(
    state: &AdminState,
    email: &str,
    password: &str,
    addr: Option<std::net::IpAddr>,
) -> Result<Uuid, ApiError> {
    // No stored e-mail contains NUL (PostgreSQL text cannot hold it).
    if email.len() > 254 || password.len() > 1024 || email.contains('\0') {
        return Err(ApiError::BadLogin);
    }
    if state.limiter.is_limited(&state.auth, email, addr) {
        return Err(ApiError::RateLimited);
    }
    let user = outbox_core::store::principals::user_by_email(&state.pool, email).await?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    if state.hasher.verify(password.to_owned(), hash).await
        && let Some(user) = user
    {
        state.limiter.record_success(email);
        return Ok(user.id);
    }
    state.limiter.record_failure(email, addr);
    Err(ApiError::BadLogin)
}

async fn login(
    State(state): State<AdminState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let addr = client_addr(req.extensions());
    let bytes = axum::body::to_bytes(req.into_body(), 16 * 1024)
        .await
        .map_err(|_| ApiError::Invalid("body too large".into()))?;
    let body: LoginBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Invalid(format!("expected {{\"email\", \"password\"}}: {e}")))?;
    let user_id = check_login(&state, &body.email, &body.password, addr).await?;
    let (token, expires_at) = auth::issue_token(&state.auth, user_id)?;
    Ok(Json(LoginAnswer { token, expires_at }).into_response())
}

#[derive(Serialize)]
struct AppSummary {
    slug: String,
    name: String,
    unresolved_dead_letters: i64,
}

async fn apps(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
) -> Result<Json<Vec<AppSummary>>, ApiError> {
    let rows =
        outbox_core::store::principals::visible_apps(&state.pool, p.user.id, p.user.is_admin)
            .await?;
    Ok(Json(
        rows.into_iter()
            .map(|(slug, name, unresolved_dead_letters)| AppSummary {
                slug,
                name,
                unresolved_dead_letters,
            })
            .collect(),
    ))
}

/// List filters and paging, as query parameters.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Only this source.
    pub source: Option<String>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this trigger.
    pub trigger_id: Option<Uuid>,
    /// Only this resolution.
    pub resolution: Option<String>,
    /// Only unresolved rows.
    #[serde(default)]
    pub unresolved: bool,
    /// Page size (1..=200, default 50).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub after: Option<String>,
}

impl ListQuery {
    /// The store filter; empty strings mean "no filter" (HTML forms send them).
    pub fn filter(&self) -> Result<Filter, ApiError> {
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        let resolution = nonempty(&self.resolution);
        if let Some(r) = &resolution
            && !matches!(
                r.as_str(),
                "replayed" | "ignored" | "handled_by_script" | "handler_failed"
            )
        {
            return Err(ApiError::Invalid(format!(
                "resolution {r:?} is not one of replayed, ignored, handled_by_script, handler_failed"
            )));
        }
        Ok(Filter {
            source: nonempty(&self.source),
            topic: nonempty(&self.topic),
            trigger_id: self.trigger_id,
            resolution,
            unresolved_only: self.unresolved,
        })
    }

    /// The cursor, if any.
    pub fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.after
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(decode_cursor)
            .transpose()
    }

    /// The page size.
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.limit.unwrap_or(50) {
            n @ 1..=200 => Ok(n),
            n => Err(ApiError::Invalid(format!("limit {n} is outside 1..=200"))),
        }
    }
}

/// `<micros since epoch>_<uuid>`.
pub fn encode_cursor(row: &DeadLetter) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id)
}

fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::Invalid(format!("after {s:?} is not a cursor from a previous page"));
    let (micros, id) = s.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    Ok(Cursor {
        created_at: DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?,
        id: Uuid::parse_str(id).map_err(|_| bad())?,
    })
}

#[derive(Serialize)]
struct Page {
    items: Vec<DeadLetter>,
    next_cursor: Option<String>,
}

async fn list(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let limit = q.limit()?;
    let items = dead_letters::list(&state.pool, app.id, &q.filter()?, q.cursor()?, limit).await?;
    let next_cursor = (items.len() == limit as usize)
        .then(|| items.last().map(encode_cursor))
        .flatten();
    Ok(Json(Page { items, next_cursor }))
}

async fn count(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let unresolved = dead_letters::count_unresolved(&state.pool, app.id).await?;
    Ok(Json(serde_json::json!({ "unresolved": unresolved })))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("dead letter"))
}

async fn show(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<DeadLetter>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(
        dead_letters::get(&state.pool, app.id, parse_id(&id)?).await?,
    ))
}

/// Resolves one dead letter as `ignored`; 409 when it is resolved already.
pub async fn ignore_one(pool: &sqlx::PgPool, app_id: Uuid, id: Uuid) -> Result<(), ApiError> {
    let changed = dead_letters::ignore(pool, app_id, &[id]).await?;
    if changed.is_empty() {
        let row = dead_letters::get(pool, app_id, id).await?;
        return Err(ApiError::Conflict(format!(
            "dead letter {id} is already resolved ({})",
            row.resolution.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Replays one dead letter; returns the new outbox id; 409 when resolved already.
pub async fn replay_one(pool: &sqlx::PgPool, app_id: Uuid, id: Uuid) -> Result<Uuid, ApiError> {
    let replayed = dead_letters::replay(pool, app_id, &[id]).await?;
    match replayed.first() {
        Some((_, outbox_id)) => Ok(*outbox_id),
        None => {
            let row = dead_letters::get(pool, app_id, id).await?;
            Err(ApiError::Conflict(format!(
                "dead letter {id} is already resolved ({})",
                row.resolution.unwrap_or_default()
            )))
        }
    }
}

async fn resolve(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let id = parse_id(&id)?;
    ignore_one(&state.pool, app.id, id).await?;
    Ok(Json(
        serde_json::json!({ "id": id, "resolution": "ignored" }),
    ))
}

async fn replay(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let id = parse_id(&id)?;
    let outbox_id = replay_one(&state.pool, app.id, id).await?;
    Ok(Json(
        serde_json::json!({ "id": id, "resolution": "replayed", "outbox_id": outbox_id }),
    ))
}

/// A bulk action: by id list, or by filter (unresolved rows only).
#[derive(Debug, Deserialize)]
pub struct BulkBody {
    /// `replay` or `ignore`.
    pub action: String,
    /// These dead letters.
    pub ids: Option<Vec<Uuid>>,
    /// Or every unresolved dead letter matching this.
    pub filter: Option<BulkFilter>,
}

/// The filter of a bulk action.
#[derive(Debug, Default, Deserialize)]
pub struct BulkFilter {
    /// Only this source.
    pub source: Option<String>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this trigger.
    pub trigger_id: Option<Uuid>,
}

/// Runs a bulk action; returns how many rows changed.
pub async fn run_bulk(
    state: &AdminState,
    app_id: Uuid,
    body: &BulkBody,
) -> Result<usize, ApiError> {
    let ids = match (&body.ids, &body.filter) {
        (Some(ids), None) => ids.clone(),
        (None, Some(f)) => {
            let filter = Filter {
                source: f.source.clone(),
                topic: f.topic.clone(),
                trigger_id: f.trigger_id,
                ..Filter::default()
            };
            dead_letters::ids_matching(&state.pool, app_id, &filter, 10_000).await?
        }
        _ => {
            return Err(ApiError::Invalid(
                "give exactly one of ids and filter".into(),
            ));
        }
    };
    if ids.len() > 10_000 {
        return Err(ApiError::Invalid("at most 10000 ids per request".into()));
    }
    Ok(match body.action.as_str() {
        "replay" => dead_letters::replay(&state.pool, app_id, &ids).await?.len(),
        "ignore" => dead_letters::ignore(&state.pool, app_id, &ids).await?.len(),
        other => {
            return Err(ApiError::Invalid(format!(
                "action {other:?} is not replay or ignore"
            )));
        }
    })
}

async fn bulk(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let body: BulkBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Invalid(format!("bad bulk body: {e}")))?;
    let changed = run_bulk(&state, app.id, &body).await?;
    Ok(Json(serde_json::json!({ "changed": changed })))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A cursor is a cursor or a 400 with a message; never a panic.
        #[test]
        fn arbitrary_cursors_are_refused_not_panicked(s in ".{0,60}|-?[0-9]{1,25}_.{0,40}") {
            if let Err(err) = decode_cursor(&s) {
                proptest::prop_assert_eq!(err.status_and_code().1, "invalid");
            }
        }
    }

    #[test]
    fn a_cursor_round_trips() {
        let id = Uuid::now_v7();
        let at = DateTime::<Utc>::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default();
        let cursor = decode_cursor(&format!("{}_{id}", at.timestamp_micros()));
        assert!(matches!(cursor, Ok(c) if c.id == id && c.created_at == at));
    }
}
