//! Signing in and out over the API: `/api/login` and `/api/logout`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AdminState;
use crate::auth;
use crate::error::ApiError;

use super::{Bearer, client_addr};

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
    // What no account can have is refused as the API documents it (400,
    // naming the field), before it is counted: it tells a guesser nothing.
    // No stored e-mail contains NUL (PostgreSQL text cannot hold it).
    if email.len() > crate::accounts::MAX_EMAIL_BYTES {
        return Err(ApiError::Invalid(format!(
            "email: at most {} bytes",
            crate::accounts::MAX_EMAIL_BYTES
        )));
    }
    if password.len() > 1024 {
        return Err(ApiError::Invalid("password: at most 1024 bytes".into()));
    }
    if email.contains('\0') {
        return Err(ApiError::BadLogin);
    }
    // Counted as a failure from here on; a success gives the count back.
    let admitted = state.throttle.admit(email, addr).await?;
    let user = outbox_core::store::principals::user_by_email(&state.pool, email).await?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let lane = admitted.lane();
    if state.hasher.verify(password.to_owned(), hash, lane).await
        && let Some(user) = user
    {
        state.throttle.record_success(addr, admitted).await?;
        return Ok(user.id);
    }
    Err(ApiError::BadLogin)
}

pub(super) async fn login(
    State(state): State<AdminState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let addr = client_addr(&state, &req);
    // A page elsewhere can post a form or text/plain here without asking the
    // browser first (it cannot send JSON so): it must not be able to spend
    // a visitor's failed logins and have them held back.
    if !crate::strict::declares_json(req.headers()) {
        return Err(ApiError::NotJson);
    }
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
pub(super) async fn logout(
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
