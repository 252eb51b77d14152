//! The JSON API under `/api`. Every endpoint checks the capability for the
//! app in its path; another app's rows answer 404.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
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
use crate::accounts;
use crate::auth::{self, Capability, Principal};
use crate::error::ApiError;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
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
    if let Some(wait) = state.throttle.hold_back(email, addr).await? {
        return Err(ApiError::RateLimited(wait));
    }
    let user = outbox_core::store::principals::user_by_email(&state.pool, email).await?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    if state.hasher.verify(password.to_owned(), hash).await
        && let Some(user) = user
    {
        state.throttle.record_success(email, addr).await?;
        return Ok(user.id);
    }
    state.throttle.record_failure(email, addr).await?;
    Err(ApiError::BadLogin)
}

async fn login(
    State(state): State<AdminState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let addr = client_addr(req.extensions());
    let bytes = crate::strict::body(req, state.body_limit).await?;
    let body: LoginBody = crate::strict::json(&bytes)?;
    let user_id = check_login(&state, &body.email, &body.password, addr).await?;
    let issued = auth::open_session(&state.pool, &state.auth, user_id).await?;
    Ok(Json(LoginAnswer {
        token: issued.token,
        expires_at: issued.expires_at,
    })
    .into_response())
}

/// Ends the session of the token presented (an API key has none: revoke it).
async fn logout(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(session) = p.session_id else {
        return Err(ApiError::Invalid(
            "an API key has no session to end: revoke the key instead".into(),
        ));
    };
    outbox_core::store::sessions::close(&state.pool, session).await?;
    Ok(Json(serde_json::json!({ "signed_out": true })))
}

/// Only instance admins manage accounts.
fn instance_admin(p: &Principal) -> Result<(), ApiError> {
    if p.user.is_admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

async fn users(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let users = accounts::list_users(&state.pool).await?;
    Ok(Json(serde_json::json!({ "items": users })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    email: String,
    password: String,
    #[serde(default)]
    admin: bool,
}

async fn create_user(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    instance_admin(&p)?;
    let body: NewUserBody = crate::strict::json(&body)?;
    let user = crate::create_user(&state.pool, &body.email, &body.password, body.admin).await?;
    let mut response = (
        axum::http::StatusCode::CREATED,
        Json(serde_json::json!({ "id": user.id, "email": user.email, "is_admin": user.is_admin })),
    )
        .into_response();
    if let Ok(location) = header::HeaderValue::from_str(&format!("/api/users/{}", user.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn delete_user(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let user = accounts::delete_user(&state.pool, &user).await?;
    Ok(Json(serde_json::json!({ "deleted": user.email })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

async fn set_password(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(user): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let body: PasswordBody = crate::strict::json(&body)?;
    let ended = accounts::set_password(&state.pool, &state.hasher, &user, &body.password).await?;
    Ok(Json(serde_json::json!({ "sessions_ended": ended })))
}

async fn unlock_user(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let cleared = accounts::unlock(&state.pool, &user).await?;
    Ok(Json(serde_json::json!({ "cleared": cleared })))
}

async fn revoke_sessions(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let ended = accounts::revoke_sessions(&state.pool, &user).await?;
    Ok(Json(serde_json::json!({ "sessions_ended": ended })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApiKeyQuery {
    owner: Option<String>,
}

async fn api_keys(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    crate::strict::Query(q): crate::strict::Query<ApiKeyQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let keys = accounts::list_api_keys(&state.pool, q.owner.as_deref()).await?;
    Ok(Json(serde_json::json!({ "items": keys })))
}

async fn revoke_api_key(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(prefix): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let prefix = accounts::revoke_api_key(&state.pool, &prefix).await?;
    Ok(Json(serde_json::json!({ "revoked": prefix })))
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
#[serde(deny_unknown_fields)]
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
    pub limit: Option<i64>,
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
                "resolution: {r:?} is not one of replayed, ignored, handled_by_script, handler_failed"
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
            n @ 1..=200 => Ok(n as u32),
            n => Err(ApiError::Invalid(format!("limit: {n} is outside 1..=200"))),
        }
    }
}

/// `<micros since epoch>_<uuid>`.
pub fn encode_cursor(row: &DeadLetter) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id)
}

/// Reads a cursor from [`encode_cursor`].
pub fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::Invalid(format!("after: {s:?} is not a cursor from a previous page"));
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
    crate::strict::Query(q): crate::strict::Query<ListQuery>,
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

/// Replays one dead letter, with its own attempt budget unless
/// `max_attempts` overrides it; returns the new outbox id; 409 when resolved
/// already.
pub async fn replay_one(
    pool: &sqlx::PgPool,
    app_id: Uuid,
    id: Uuid,
    max_attempts: Option<i32>,
) -> Result<Uuid, ApiError> {
    let replayed = dead_letters::replay_with(pool, app_id, &[id], max_attempts).await?;
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

async fn ignore(
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

/// The optional body of a replay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Attempts the replayed row gets (default: the dead letter's own).
    pub max_attempts: Option<i64>,
}

/// Checks a replay's `max_attempts` override.
pub fn replay_attempts(max_attempts: Option<i64>) -> Result<Option<i32>, ApiError> {
    max_attempts
        .map(|n| {
            i32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::Invalid(format!("max_attempts: {n} is outside 1..={}", i32::MAX))
            })
        })
        .transpose()
}

async fn replay(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let body: ReplayBody = crate::strict::json_or_default(&body)?;
    let max_attempts = replay_attempts(body.max_attempts)?;
    let id = parse_id(&id)?;
    let outbox_id = replay_one(&state.pool, app.id, id, max_attempts).await?;
    Ok(Json(
        serde_json::json!({ "id": id, "resolution": "replayed", "outbox_id": outbox_id }),
    ))
}

/// A bulk action: by id list, or by filter (unresolved rows only).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// `replay` or `ignore` (`resolve` is accepted for `ignore`).
    pub action: String,
    /// These dead letters.
    pub ids: Option<Vec<Uuid>>,
    /// Or every unresolved dead letter matching this.
    pub filter: Option<BulkFilter>,
    /// For `replay`: attempts the replayed rows get (default: each dead
    /// letter's own).
    #[serde(default)]
    pub max_attempts: Option<i64>,
}

/// The filter of a bulk action.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
                "ids, filter: give exactly one of them".into(),
            ));
        }
    };
    if ids.len() > 10_000 {
        return Err(ApiError::Invalid("ids: at most 10000 per request".into()));
    }
    let max_attempts = replay_attempts(body.max_attempts)?;
    Ok(match body.action.as_str() {
        "replay" => dead_letters::replay_with(&state.pool, app_id, &ids, max_attempts)
            .await?
            .len(),
        "ignore" | "resolve" => dead_letters::ignore(&state.pool, app_id, &ids).await?.len(),
        other => {
            return Err(ApiError::Invalid(format!(
                "action: {other:?} is not replay or ignore"
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
    let body: BulkBody = crate::strict::json(&body)?;
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
