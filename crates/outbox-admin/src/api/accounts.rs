//! Accounts over the API, for instance admins only: users and API keys.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::AdminState;
use crate::accounts;
use crate::auth::Principal;
use crate::error::ApiError;

use super::Bearer;

/// Only instance admins manage accounts.
fn instance_admin(p: &Principal) -> Result<(), ApiError> {
    if p.user.is_admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

pub(super) async fn users(
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

pub(super) async fn create_user(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    instance_admin(&p)?;
    let body: NewUserBody = crate::strict::json(&body)?;
    let user = accounts::create_user(
        &state.pool,
        &state.hasher,
        &crate::audit::actor(&p),
        &body.email,
        &body.password,
        body.admin,
    )
    .await?;
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

pub(super) async fn delete_user(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let user = accounts::delete_user(&state.pool, &crate::audit::actor(&p), &user).await?;
    Ok(Json(serde_json::json!({ "deleted": user.email })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

pub(super) async fn set_password(
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

pub(super) async fn unlock_user(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let cleared = accounts::unlock(&state.pool, &user).await?;
    Ok(Json(serde_json::json!({ "cleared": cleared })))
}

pub(super) async fn revoke_sessions(
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
pub(super) struct ApiKeyQuery {
    owner: Option<String>,
}

pub(super) async fn api_keys(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    crate::strict::Query(q): crate::strict::Query<ApiKeyQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let keys = accounts::list_api_keys(&state.pool, q.owner.as_deref()).await?;
    Ok(Json(serde_json::json!({ "items": keys })))
}

pub(super) async fn revoke_api_key(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(prefix): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    instance_admin(&p)?;
    let revoked = accounts::revoke_api_key(&state.pool, &prefix).await?;
    if revoked.already {
        // As documented: a key revoked before is no longer there to revoke.
        return Err(ApiError::NotFound("api key"));
    }
    Ok(Json(serde_json::json!({ "revoked": revoked.prefix })))
}
