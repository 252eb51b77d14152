//! The dashboard: server-rendered HTML on the same server. A session cookie
//! (HttpOnly, SameSite=Strict, Secure behind TLS) carries the token; every
//! state-changing form carries a CSRF token that must match its cookie;
//! nothing changes on GET.
//!
//! This module holds the routes and the security headers; the pages live
//! in one file per noun (`apps`, `audit`, `browse`, `dead_letters`, `overview`, `rows`,
//! `topics`, `triggers`, `accounts`),
//! sign-in in `login`, the session and form helpers in `session`, an
//! action's result message in `flash`, and the HTML helpers in `render`.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::AdminState;

mod accounts;
mod apps;
mod audit;
mod browse;
mod dead_letters;
mod flash;
mod login;
mod overview;
mod render;
mod rows;
mod session;
mod topics;
mod triggers;

pub use self::render::esc;

use self::accounts::{account_action, accounts_page, create_account, revoke_key, set_role};
use self::apps::apps_page;
use self::audit::audit_page;
use self::browse::{act_on_row, browse_page, bulk_on_filter};
use self::dead_letters::{bulk, detail_page, ignore, list_page, replay};
use self::login::{login, login_page, logout};
use self::rows::row_page;
use self::topics::{change_topic, topic_rows, topics_page};
use self::triggers::{change_trigger, create_trigger, triggers_page};

/// What a path segment escapes: all but the unreserved characters of
/// RFC 3986 (a slug's `-` and `_` stay as they are).
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The dashboard routes; every answer carries the security headers (CSP,
/// nosniff, no-referrer, no-store), and an action's result reaches the next
/// page in a cookie (`flash`); `secure_cookies` marks cookies `Secure`.
pub fn routes(secure_cookies: bool) -> Router<AdminState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/apps") }))
        .route("/admin/accounts", get(accounts_page).post(create_account))
        .route("/admin/roles", post(set_role))
        .route("/admin/accounts/{user}/{action}", post(account_action))
        .route("/admin/api-keys/{prefix}/revoke", post(revoke_key))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/apps", get(apps_page))
        // An app's own page is its overview.
        .route(
            "/apps/{app}",
            get(
                |axum::extract::Path(app): axum::extract::Path<String>| async move {
                    let app = percent_encoding::utf8_percent_encode(&app, PATH_SEGMENT);
                    Redirect::to(&format!("/apps/{app}/topics"))
                },
            ),
        )
        .route("/apps/{app}/dead-letters", get(list_page))
        .route("/apps/{app}/dead-letters/bulk", post(bulk))
        .route("/apps/{app}/dead-letters/{id}", get(detail_page))
        .route("/apps/{app}/dead-letters/{id}/replay", post(replay))
        .route("/apps/{app}/dead-letters/{id}/ignore", post(ignore))
        .route("/apps/{app}/outbox", get(browse_page))
        .route("/apps/{app}/outbox/bulk", post(bulk_on_filter))
        .route("/apps/{app}/outbox/{id}", get(row_page))
        .route("/apps/{app}/outbox/{id}/{action}", post(act_on_row))
        .route("/apps/{app}/audit", get(audit_page))
        .route("/apps/{app}/topics", get(topics_page))
        .route("/apps/{app}/topics/rows", get(topic_rows))
        .route("/assets/console.js", get(console_js))
        .route("/apps/{app}/topics/{action}", post(change_topic))
        .route(
            "/apps/{app}/triggers",
            get(triggers_page).post(create_trigger),
        )
        .route("/apps/{app}/triggers/{id}/{action}", post(change_trigger))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                flash::carry(secure_cookies, request, next)
            },
        ))
        .layer(axum::middleware::map_response(security_headers))
}

/// The dashboard's one script (`assets/console.js`): refreshes the parts of
/// a page marked `data-refresh` while the tab is visible. Served from here,
/// so the page's policy allows it and nothing is fetched from elsewhere.
async fn console_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../assets/console.js"),
    )
        .into_response()
}

/// What every dashboard answer carries: no script may run but ours (there
/// is none inline), no framing, no MIME sniffing, no referrer leaving the
/// site, and nothing kept in caches (pages show payloads).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
