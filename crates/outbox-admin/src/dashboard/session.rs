//! The dashboard session (the cookie's token and its CSRF token) and the
//! form helpers every state-changing page shares.

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::AdminState;
use crate::auth::{self, Capability, Principal};
use crate::error::ApiError;

use super::render::error_page;

pub(super) const SESSION_COOKIE: &str = "outboxd_session";
pub(super) const CSRF_COOKIE: &str = "outboxd_csrf";

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A `Set-Cookie` value for one of the dashboard's cookies: the whole
/// site, never readable by scripts, never sent from another site's page.
pub(super) fn set_cookie(
    name: &str,
    value: &str,
    max_age: u64,
    secure: bool,
) -> Option<HeaderValue> {
    set_cookie_at(name, value, "/", max_age, secure)
}

/// [`set_cookie`] for the pages under `path` only (a path of other
/// characters than letters, digits and `/-_.~%` is taken as `/`).
pub(super) fn set_cookie_at(
    name: &str,
    value: &str,
    path: &str,
    max_age: u64,
    secure: bool,
) -> Option<HeaderValue> {
    let plain = path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~%".contains(&b));
    let path = if plain { path } else { "/" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    ))
    .ok()
}

/// A signed-in operator and the CSRF token of the session.
pub(super) struct Session {
    pub(super) principal: Principal,
    pub(super) csrf: String,
    // The token under the key before a rotation, while it is taken: a form
    // opened before the restart still goes through.
    csrf_before_rotation: Option<String>,
}

/// `to` when it is a page of this server that sign-in may lead to: a path
/// (not `//host`, which a browser reads as another site), printable, not
/// the sign-in page itself, of a sane length.
pub(super) fn safe_next(to: &str) -> Option<&str> {
    let path = to.split(['?', '#']).next().unwrap_or_default();
    let ok = to.starts_with('/')
        && !to.starts_with("//")
        && !to.starts_with("/\\")
        && to.len() <= 2000
        && !to.chars().any(char::is_control)
        && path != "/login"
        && path != "/logout";
    ok.then_some(to)
}

/// A fresh random token (CSRF).
pub(super) fn random_token() -> String {
    auth::new_api_key().2
}

impl FromRequestParts<AdminState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Response> {
        // A page asked for while signed out is where sign-in leads back to
        // (a link from an alert at 3 a.m.); a form's post is not repeated.
        let next = (parts.method == axum::http::Method::GET)
            .then(|| parts.uri.path_and_query().map(|p| p.as_str().to_owned()))
            .flatten()
            .filter(|to| safe_next(to).is_some());
        // Signing out of an ended session did what it was asked.
        let posted = parts.method != axum::http::Method::GET && parts.uri.path() != "/logout";
        let to_login = || {
            let to = match &next {
                Some(next) => format!(
                    "/login?next={}",
                    form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
                ),
                // An action whose session ended meanwhile (signed out in
                // another tab, expired): the sign-in page says it was not taken.
                None if posted => "/login?ended=1".to_owned(),
                None => "/login".to_owned(),
            };
            Redirect::to(&to).into_response()
        };
        let token = cookie(&parts.headers, SESSION_COOKIE).ok_or_else(to_login)?;
        let principal = auth::authenticate(&state.pool, &state.auth, &token)
            .await
            .map_err(|_| to_login())?;
        let session_id = principal.session_id.ok_or_else(to_login)?;
        let csrf = session_csrf(&state.auth.jwt_secret, session_id);
        let csrf_before_rotation = state
            .auth
            .previous_key_now()
            .map(|key| session_csrf(key, session_id));
        Ok(Self {
            principal,
            csrf,
            csrf_before_rotation,
        })
    }
}

/// A signed-in session's CSRF token: derived from the session with the
/// server's key, so a token planted in a cookie (by a sibling subdomain, or
/// a man in the middle of plain HTTP) matches no session, and the token
/// dies with its session.
pub(super) fn session_csrf(key: &[u8], session_id: uuid::Uuid) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
        // Any key length is accepted by HMAC; this cannot happen.
        return random_token();
    };
    mac.update(b"outboxd dashboard csrf\0");
    mac.update(session_id.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A page's query string as pairs (all values of every key).
pub(super) fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Reads a urlencoded form within the body limit, refusing what the API
/// refuses in a query string ([`crate::strict::checked_pairs`]).
pub(super) async fn form(req: Request, limit: usize) -> Result<Vec<(String, String)>, ApiError> {
    let bytes = crate::strict::body(req, limit).await?;
    // Only the ticked rows of a list come as many.
    crate::strict::checked_pairs(&bytes, "form: a field", &["ids"])
}

pub(super) fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The form's CSRF token must be the session's ([`session_csrf`]).
pub(super) fn check_csrf(session: &Session, form: &[(String, String)]) -> Result<(), ApiError> {
    let matches = |expected: &str| {
        field(form, "csrf").is_some_and(|token| {
            !token.is_empty() && auth::constant_time_eq(token.as_bytes(), expected.as_bytes())
        })
    };
    if matches(&session.csrf) || session.csrf_before_rotation.as_deref().is_some_and(matches) {
        Ok(())
    } else {
        // Most often a form opened before signing in again elsewhere: not a
        // matter of role, so not said as one.
        Err(ApiError::NotAllowed(
            "this form has expired (you signed in again since it was opened): reload the page and try again".into(),
        ))
    }
}

/// A state-changing form: read it, check its CSRF token, and authorize the
/// session for `capability` on the app.
pub(super) async fn checked_form(
    state: &AdminState,
    session: &Session,
    app: &str,
    capability: Capability,
    req: Request,
) -> Result<(Vec<(String, String)>, outbox_core::App), ApiError> {
    let form = form(req, state.body_limit).await?;
    check_csrf(session, &form)?;
    let app = auth::authorize(&state.pool, &session.principal, app, capability).await?;
    Ok((form, app))
}

/// The app a page shows, if the session's principal may read it (another
/// app answers "not found").
pub(super) async fn viewed_app(
    state: &AdminState,
    session: &Session,
    app: &str,
) -> Result<outbox_core::App, ApiError> {
    auth::authorize(
        &state.pool,
        &session.principal,
        app,
        Capability::DeadLetterRead,
    )
    .await
}

/// Whether the session's principal may act on the app (operator or more):
/// the pages show their action forms only then. Other failures (the
/// database) are errors, not a quiet "no".
pub(super) async fn may_operate(
    state: &AdminState,
    session: &Session,
    app: &str,
) -> Result<bool, ApiError> {
    may(state, session, app, Capability::Operate).await
}

/// Whether the session's principal holds `capability` on `app`: the pages
/// show the forms of an action only to those it would not refuse.
pub(super) async fn may(
    state: &AdminState,
    session: &Session,
    app: &str,
    capability: Capability,
) -> Result<bool, ApiError> {
    match auth::authorize(&state.pool, &session.principal, app, capability).await {
        Ok(_) => Ok(true),
        Err(ApiError::RoleTooLow { .. } | ApiError::NotFound(_)) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Redirects to the page a form action leads to, or shows its error.
pub(super) fn after_form(result: Result<String, ApiError>) -> Response {
    match result {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(err) => error_page(&err),
    }
}
