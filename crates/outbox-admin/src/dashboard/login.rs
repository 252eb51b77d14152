//! Signing in and out of the dashboard: the sign-in page and form, the
//! session and CSRF cookies, and sign-out.

use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

use crate::AdminState;
use crate::api;
use crate::auth;
use crate::error::ApiError;

use super::flash::without_flash;
use super::render::{error_page, esc, page};
use super::session::{
    CSRF_COOKIE, SESSION_COOKIE, Session, check_csrf, cookie, field, form, query_pairs,
    random_token, safe_next, session_csrf, set_cookie,
};

/// The sign-in page. Its form carries a CSRF token bound to a cookie set
/// here, so another site cannot sign a browser in to an account of its own.
pub(super) async fn login_page(
    State(state): State<AdminState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let csrf = cookie(&headers, CSRF_COOKIE)
        .filter(|c| c.len() >= 32)
        .unwrap_or_else(random_token);
    let pairs = query_pairs(raw.as_deref());
    let next = field(&pairs, "next")
        .and_then(safe_next)
        .unwrap_or_default();
    let ended = field(&pairs, "ended").is_some().then_some(
        "Your session had ended, so that action was not taken: sign in and take it again.",
    );
    with_csrf_cookie(
        login_form(ended, "", &csrf, next).into_response(),
        &csrf,
        &state,
    )
}

fn with_csrf_cookie(mut response: Response, csrf: &str, state: &AdminState) -> Response {
    if let Some(c) = set_cookie(
        CSRF_COOKIE,
        csrf,
        state.auth.token_ttl.as_secs(),
        state.auth.secure_cookies,
    ) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}

/// `next` without the result fields an action's redirect carries: a link
/// someone else made must not have a page report an action that did not
/// happen ([`super::flash`]).
fn without_results(next: &str) -> String {
    match next.split_once('?') {
        Some((path, query)) => {
            let rest = without_flash(Some(query));
            if rest.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{rest}")
            }
        }
        None => next.to_owned(),
    }
}

/// The sign-in form; `next` is the page it leads to (blank: the apps).
fn login_form(message: Option<&str>, email: &str, csrf: &str, next: &str) -> Html<String> {
    page(
        "Sign in",
        &format!(
            r#"<h1>Sign in</h1>{}<form method="post" action="/login"><input type=hidden name=csrf value="{}"><input type=hidden name=next value="{}">
<p><label>E-mail<br><input name="email" type="email" autocomplete="username" required value="{}"></label></p>
<p><label>Password<br><input name="password" type="password" autocomplete="current-password" required{}></label></p>
<p><button type="submit">Sign in</button></p></form>"#,
            message
                .map(|m| format!("<p class=err role=alert>{}</p>", esc(m)))
                .unwrap_or_default(),
            esc(csrf),
            esc(next),
            esc(email),
            if email.is_empty() { "" } else { " autofocus" },
        ),
    )
}

/// Whether the browser says a post comes from another site. Only by
/// `Sec-Fetch-Site`: a browser too old to send it posts outboxd's own form
/// with `Origin: null` (its pages send no referrer), and a proxy may
/// rewrite `Host`, so comparing `Origin` with `Host` would refuse the very
/// users it is meant for.
fn from_another_site(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| site != "same-origin" && site != "none")
}

pub(super) async fn login(State(state): State<AdminState>, req: Request) -> Response {
    let addr = api::client_addr(&state, &req);
    let csrf_cookie = cookie(req.headers(), CSRF_COOKIE);
    // The form's token is compared with a cookie, and a page on a sibling
    // subdomain can plant that cookie and post a matching form, signing the
    // browser in to an account of its own. Browsers say where a post comes
    // from: only outboxd's own page (or a browser too old to say) signs in.
    if from_another_site(req.headers()) {
        // A cookie already set stays: the owner's open form keeps working.
        let token = csrf_cookie.clone().unwrap_or_else(random_token);
        let form = login_form(
            Some("Sign in from outboxd's own sign-in page."),
            "",
            &token,
            "",
        );
        let refused = (axum::http::StatusCode::FORBIDDEN, form).into_response();
        return if csrf_cookie.is_some() {
            refused
        } else {
            with_csrf_cookie(refused, &token, &state)
        };
    }
    let form = match form(req, state.body_limit).await {
        Ok(f) => f,
        Err(err) => return error_page(&err),
    };
    let email = field(&form, "email").unwrap_or_default().to_owned();
    let password = field(&form, "password").unwrap_or_default().to_owned();
    let next = field(&form, "next")
        .and_then(safe_next)
        .map(without_results)
        .unwrap_or_default();
    // The form's token must match the cookie the sign-in page set. A page
    // shown again keeps the cookie's token (another site's forged post must
    // not invalidate the form open in the owner's tab); only a successful
    // sign-in rotates it.
    let fresh = csrf_cookie
        .clone()
        .filter(|c| c.len() >= 32)
        .unwrap_or_else(random_token);
    if csrf_cookie.is_none() || field(&form, "csrf") != csrf_cookie.as_deref() {
        let form = login_form(
            Some("The sign-in form expired: please sign in again."),
            &email,
            &fresh,
            &next,
        );
        return with_csrf_cookie(
            (axum::http::StatusCode::FORBIDDEN, form).into_response(),
            &fresh,
            &state,
        );
    }
    let user_id = match api::check_login(&state, &email, &password, addr).await {
        Ok(id) => id,
        Err(err) => {
            let (status, _) = err.status_and_code();
            let mut response = (
                status,
                login_form(Some(&err.to_string()), &email, &fresh, &next),
            )
                .into_response();
            if let ApiError::RateLimited(wait) = &err {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    crate::error::retry_after_secs(wait).into(),
                );
            }
            return with_csrf_cookie(response, &fresh, &state);
        }
    };
    let (token, session_id) = match auth::open_session(&state.pool, &state.auth, user_id).await {
        Ok(issued) => (issued.token, issued.session_id),
        Err(err) => return error_page(&err),
    };
    // The signed-in session's CSRF token, derived from it (the pages' forms
    // carry it; the cookie only rotates the sign-in form's token away).
    let csrf = session_csrf(&state.auth.jwt_secret, session_id);
    let ttl = state.auth.token_ttl.as_secs();
    let to = if next.is_empty() { "/apps" } else { &next };
    let mut response = Redirect::to(to).into_response();
    for c in [
        set_cookie(SESSION_COOKIE, &token, ttl, state.auth.secure_cookies),
        set_cookie(CSRF_COOKIE, &csrf, ttl, state.auth.secure_cookies),
    ]
    .into_iter()
    .flatten()
    {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}

pub(super) async fn logout(
    State(state): State<AdminState>,
    session: Session,
    req: Request,
) -> Response {
    let Ok(form) = form(req, state.body_limit).await else {
        return Redirect::to("/login").into_response();
    };
    if let Err(err) = check_csrf(&session, &form) {
        return error_page(&err);
    }
    if let Some(id) = session.principal.session_id
        && let Err(err) = outbox_core::store::sessions::close(&state.pool, id).await
    {
        return error_page(&err.into());
    }
    let mut response = Redirect::to("/login").into_response();
    for name in [SESSION_COOKIE, CSRF_COOKIE] {
        if let Some(c) = set_cookie(name, "", 0, state.auth.secure_cookies) {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
    }
    response
}
