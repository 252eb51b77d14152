//! The dashboard: server-rendered HTML on the same server. A session cookie
//! (HttpOnly, SameSite=Strict, Secure behind TLS) carries the token; every
//! state-changing form carries a CSRF token that must match its cookie;
//! nothing changes on GET.

use axum::Router;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use outbox_core::store::dead_letters;
use uuid::Uuid;

use crate::AdminState;
use crate::accounts;
use crate::api::{self, BulkBody, ListQuery};
use crate::auth::{self, Capability, Principal};
use crate::error::ApiError;

const SESSION_COOKIE: &str = "outboxd_session";
const CSRF_COOKIE: &str = "outboxd_csrf";

/// The dashboard routes; every answer carries the security headers (CSP,
/// nosniff, no-referrer, no-store).
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/apps") }))
        .route("/admin/accounts", get(accounts_page))
        .route("/admin/accounts/{user}/{action}", post(account_action))
        .route("/admin/api-keys/{prefix}/revoke", post(revoke_key))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/apps", get(apps_page))
        .route("/apps/{app}/dead-letters", get(list_page))
        .route("/apps/{app}/dead-letters/bulk", post(bulk))
        .route("/apps/{app}/dead-letters/{id}", get(detail_page))
        .route("/apps/{app}/dead-letters/{id}/replay", post(replay))
        .route("/apps/{app}/dead-letters/{id}/ignore", post(ignore))
        .route(
            "/apps/{app}/triggers",
            get(triggers_page).post(create_trigger),
        )
        .route("/apps/{app}/triggers/{id}/{action}", post(change_trigger))
        .layer(axum::middleware::map_response(security_headers))
}

/// What every dashboard answer carries: no script may run but ours (there
/// is none inline), no framing, no MIME sniffing, no referrer leaving the
/// site, and nothing kept in caches (pages show payloads).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
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

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A signed-in operator and the CSRF token of the session.
struct Session {
    principal: Principal,
    csrf: String,
}

/// A fresh random token (CSRF).
fn random_token() -> String {
    auth::new_api_key().2
}

impl FromRequestParts<AdminState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Response> {
        let to_login = || Redirect::to("/login").into_response();
        let token = cookie(&parts.headers, SESSION_COOKIE).ok_or_else(to_login)?;
        let csrf = cookie(&parts.headers, CSRF_COOKIE).ok_or_else(to_login)?;
        let principal = auth::authenticate(&state.pool, &state.auth, &token)
            .await
            .map_err(|_| to_login())?;
        Ok(Self { principal, csrf })
    }
}

/// Reads a urlencoded form (all values of every key), within the body limit.
async fn form(req: Request, limit: usize) -> Result<Vec<(String, String)>, ApiError> {
    let bytes = crate::strict::body(req, limit).await?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The form's CSRF token must equal the session's (double submit).
fn check_csrf(session: &Session, form: &[(String, String)]) -> Result<(), ApiError> {
    match field(form, "csrf") {
        Some(token) if !token.is_empty() && token == session.csrf => Ok(()),
        _ => Err(ApiError::Forbidden),
    }
}

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{} · outboxd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}}
header{{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;justify-content:space-between;align-items:center}}
header a{{color:#fff;text-decoration:none;font-weight:600}}
main{{padding:1.2rem;max-width:1200px;margin:auto}}
table{{border-collapse:collapse;width:100%;background:#fff}}
th,td{{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #e3e6ea;font-size:.9rem;vertical-align:top}}
.badge{{display:inline-block;min-width:1.4rem;padding:.1rem .45rem;border-radius:1rem;background:#c62828;color:#fff;text-align:center;font-size:.8rem}}
.badge.zero{{background:#9aa3ad}}
pre{{background:#fff;border:1px solid #e3e6ea;padding:.8rem;overflow:auto}}
button{{padding:.35rem .8rem;margin-right:.4rem;cursor:pointer}}
.err{{color:#c62828}} .muted{{color:#6b7480}} form.inline{{display:inline}}
input,select{{padding:.3rem}}
</style></head><body><header><a href="/apps">outboxd</a><span>dead letters</span></header><main>{}</main></body></html>"#,
        esc(title),
        body
    ))
}

fn error_page(err: &ApiError) -> Response {
    let (status, _) = err.status_and_code();
    (
        status,
        page(
            "Error",
            &format!(
                "<p class=err>{}</p><p><a href=\"/apps\">Back</a></p>",
                esc(&err.to_string())
            ),
        ),
    )
        .into_response()
}

/// The sign-in page. Its form carries a CSRF token bound to a cookie set
/// here, so another site cannot sign a browser in to an account of its own.
async fn login_page(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let csrf = cookie(&headers, CSRF_COOKIE)
        .filter(|c| c.len() >= 32)
        .unwrap_or_else(random_token);
    with_csrf_cookie(login_form(None, "", &csrf).into_response(), &csrf, &state)
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

fn login_form(message: Option<&str>, email: &str, csrf: &str) -> Html<String> {
    page(
        "Sign in",
        &format!(
            r#"<h1>Sign in</h1>{}<form method="post" action="/login"><input type=hidden name=csrf value="{}">
<p><label>E-mail<br><input name="email" type="email" autocomplete="username" required value="{}"></label></p>
<p><label>Password<br><input name="password" type="password" autocomplete="current-password" required{}></label></p>
<p><button type="submit">Sign in</button></p></form>"#,
            message
                .map(|m| format!("<p class=err role=alert>{}</p>", esc(m)))
                .unwrap_or_default(),
            esc(csrf),
            esc(email),
            if email.is_empty() { "" } else { " autofocus" },
        ),
    )
}

fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    ))
    .ok()
}

async fn login(State(state): State<AdminState>, req: Request) -> Response {
    let addr = api::client_addr(req.extensions());
    let csrf_cookie = cookie(req.headers(), CSRF_COOKIE);
    let form = match form(req, state.body_limit).await {
        Ok(f) => f,
        Err(err) => return error_page(&err),
    };
    let email = field(&form, "email").unwrap_or_default().to_owned();
    let password = field(&form, "password").unwrap_or_default().to_owned();
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
            let mut response =
                (status, login_form(Some(&err.to_string()), &email, &fresh)).into_response();
            if let ApiError::RateLimited(wait) = &err {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    crate::error::retry_after_secs(wait).into(),
                );
            }
            return with_csrf_cookie(response, &fresh, &state);
        }
    };
    let token = match auth::open_session(&state.pool, &state.auth, user_id).await {
        Ok(issued) => issued.token,
        Err(err) => return error_page(&err),
    };
    // A new CSRF token for the signed-in session.
    let csrf = random_token();
    let ttl = state.auth.token_ttl.as_secs();
    let mut response = Redirect::to("/apps").into_response();
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

async fn logout(State(state): State<AdminState>, session: Session, req: Request) -> Response {
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

fn logout_form(session: &Session) -> String {
    let user = &session.principal.user;
    format!(
        r#"<div class=muted>Signed in as {}{} · <form class=inline method=post action="/logout"><input type=hidden name=csrf value="{}"><button type=submit>Sign out</button></form></div>"#,
        esc(&user.email),
        if user.is_admin {
            r#" · <a href="/admin/accounts">Accounts</a>"#
        } else {
            ""
        },
        esc(&session.csrf)
    )
}

async fn apps_page(State(state): State<AdminState>, session: Session) -> Response {
    let rows = match outbox_core::store::principals::visible_apps(
        &state.pool,
        session.principal.user.id,
        session.principal.user.is_admin,
    )
    .await
    {
        Ok(rows) => rows,
        Err(err) => return error_page(&err.into()),
    };
    let mut body = logout_form(&session);
    body.push_str(
        "<h1>Apps</h1><table><tr><th>App</th><th>Name</th><th>Unresolved dead letters</th></tr>",
    );
    for (slug, name, unresolved) in rows {
        body.push_str(&format!(
            r#"<tr><td><a href="/apps/{s}/dead-letters?unresolved=true">{s}</a> · <a href="/apps/{s}/triggers">triggers</a></td><td>{n}</td><td><span class="badge{z}" data-app="{s}">{u}</span></td></tr>"#,
            s = esc(&slug),
            n = esc(&name),
            z = if unresolved == 0 { " zero" } else { "" },
            u = unresolved
        ));
    }
    body.push_str("</table>");
    page("Apps", &body).into_response()
}

fn age(created: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - created).num_seconds().max(0);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

async fn list_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<ListQuery>, ApiError>,
) -> Response {
    let q = match q {
        Ok(crate::strict::Query(q)) => q,
        Err(err) => return error_page(&err),
    };
    let result = async {
        let app = auth::authorize(
            &state.pool,
            &session.principal,
            &app,
            Capability::DeadLetterRead,
        )
        .await?;
        let limit = q.limit()?;
        let rows =
            dead_letters::list(&state.pool, app.id, &q.filter()?, q.cursor()?, limit).await?;
        let unresolved = dead_letters::count_unresolved(&state.pool, app.id).await?;
        Ok::<_, ApiError>((app, rows, unresolved, limit))
    }
    .await;
    let (app, rows, unresolved, limit) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<h1>{slug} · dead letters <span class="badge{z}" id="unresolved">{unresolved}</span></h1>
<form method=get><input name=topic placeholder=topic value="{t}"> <input name=source placeholder=source value="{src}">
<label><input type=checkbox name=unresolved value=true {chk}> unresolved only</label> <button type=submit>Filter</button></form>
<form method=post action="/apps/{slug}/dead-letters/bulk"><input type=hidden name=csrf value="{csrf}">
<p><button type=submit name=action value=replay>Replay selected</button><button type=submit name=action value=ignore>Ignore selected</button></p>
<table><tr><th></th><th>Source</th><th>Topic</th><th>Attempts</th><th>Last error</th><th>Age</th><th>State</th></tr>"#,
        z = if unresolved == 0 { " zero" } else { "" },
        t = esc(q.topic.as_deref().unwrap_or("")),
        src = esc(q.source.as_deref().unwrap_or("")),
        chk = if q.unresolved { "checked" } else { "" },
        csrf = esc(&session.csrf),
    ));
    for row in &rows {
        let error: String = row
            .last_error
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(120)
            .collect();
        body.push_str(&format!(
            r#"<tr data-id="{id}"><td>{cb}</td><td>{src}</td><td><a href="/apps/{slug}/dead-letters/{id}">{topic}</a></td><td>{att}</td><td>{err}</td><td>{age}</td><td>{state}</td></tr>"#,
            id = row.id,
            cb = if row.resolved_at.is_none() { format!(r#"<input type=checkbox name=ids value="{}">"#, row.id) } else { String::new() },
            src = esc(&row.source),
            topic = esc(&row.topic),
            att = row.attempt_count,
            err = esc(&error),
            age = age(row.created_at),
            state = esc(row.resolution.as_deref().unwrap_or("unresolved")),
        ));
    }
    body.push_str("</table></form>");
    if rows.len() == limit as usize
        && let Some(last) = rows.last()
    {
        body.push_str(&format!(
            r#"<p><a href="?unresolved={}&topic={}&source={}&after={}">Older →</a></p>"#,
            q.unresolved,
            esc(q.topic.as_deref().unwrap_or("")),
            esc(q.source.as_deref().unwrap_or("")),
            api::encode_cursor(last)
        ));
    }
    page(&format!("{} dead letters", app.slug), &body).into_response()
}

async fn detail_page(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
) -> Response {
    let result = async {
        let app = auth::authorize(
            &state.pool,
            &session.principal,
            &app,
            Capability::DeadLetterRead,
        )
        .await?;
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("dead letter"))?;
        Ok::<_, ApiError>((dead_letters::get(&state.pool, app.id, id).await?, app))
    }
    .await;
    let (row, app) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let pretty = serde_json::to_string_pretty(&row.payload).unwrap_or_default();
    let actions = if row.resolved_at.is_none() {
        format!(
            r#"<form class=inline method=post action="/apps/{slug}/dead-letters/{id}/replay"><input type=hidden name=csrf value="{c}"><label>Attempts <input name=max_attempts type=number min=1 placeholder="{budget}" size=6></label> <button type=submit id=replay>Replay</button></form>
<form class=inline method=post action="/apps/{slug}/dead-letters/{id}/ignore"><input type=hidden name=csrf value="{c}"><button type=submit id=ignore>Ignore</button></form>"#,
            id = row.id,
            c = esc(&session.csrf),
            budget = row
                .max_attempts
                .map_or_else(|| "default".to_owned(), |n| n.to_string()),
        )
    } else {
        format!(
            "<p>Resolved: <b id=resolution>{}</b></p>",
            esc(row.resolution.as_deref().unwrap_or(""))
        )
    };
    let body = format!(
        r#"{logout}<p><a href="/apps/{slug}/dead-letters?unresolved=true">← {slug}</a></p><h1>{topic}</h1>
<table><tr><th>Id</th><td>{id}</td></tr><tr><th>Original event</th><td>{orig}</td></tr><tr><th>Source</th><td>{src}</td></tr>
<tr><th>Attempts</th><td>{att}</td></tr><tr><th>First attempt</th><td>{first}</td></tr><tr><th>Last attempt</th><td>{last}</td></tr>
<tr><th>Dead-lettered</th><td>{created}</td></tr><tr><th>Last error</th><td class=err>{err}</td></tr></table>
<h2>Payload</h2><pre id=payload>{payload}</pre>{actions}"#,
        logout = logout_form(&session),
        topic = esc(&row.topic),
        id = row.id,
        orig = row.original_event_id,
        src = esc(&row.source),
        att = row.attempt_count,
        first = row
            .first_attempt_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        last = row
            .last_attempt_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        created = row.created_at.to_rfc3339(),
        err = esc(row.last_error.as_deref().unwrap_or("")),
        payload = esc(&pretty),
    );
    page(&row.topic, &body).into_response()
}

/// A state-changing form: read it, check its CSRF token, and authorize the
/// session for `capability` on the app.
async fn checked_form(
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

/// Redirects to the page a form action leads to, or shows its error.
fn after_form(result: Result<String, ApiError>) -> Response {
    match result {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(err) => error_page(&err),
    }
}

async fn act(
    state: AdminState,
    session: Session,
    app: String,
    id: String,
    req: Request,
    replay: bool,
) -> Response {
    let result = async {
        let (form, app) =
            checked_form(&state, &session, &app, Capability::DeadLetterManage, req).await?;
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("dead letter"))?;
        if replay {
            let max_attempts = match field(&form, "max_attempts").map(str::trim) {
                None | Some("") => None,
                Some(n) => Some(n.parse::<i64>().map_err(|_| {
                    ApiError::Invalid(format!("max_attempts: {n:?} is not a whole number"))
                })?),
            };
            let max_attempts = api::replay_attempts(max_attempts)?;
            api::replay_one(&state.pool, app.id, id, max_attempts).await?;
        } else {
            api::ignore_one(&state.pool, app.id, id).await?;
        }
        Ok::<_, ApiError>(format!("/apps/{}/dead-letters/{id}", app.slug))
    }
    .await;
    after_form(result)
}

async fn replay(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    act(state, session, app, id, req, true).await
}

async fn ignore(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    act(state, session, app, id, req, false).await
}

async fn bulk(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        let (form, app) =
            checked_form(&state, &session, &app, Capability::DeadLetterManage, req).await?;
        let ids = form
            .iter()
            .filter(|(k, _)| k == "ids")
            .map(|(_, v)| {
                Uuid::parse_str(v).map_err(|_| ApiError::Invalid(format!("{v:?} is not an id")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let body = BulkBody {
            action: field(&form, "action").unwrap_or_default().to_owned(),
            ids: Some(ids),
            filter: None,
            max_attempts: None,
        };
        api::run_bulk(&state, app.id, &body).await?;
        Ok::<_, ApiError>(format!("/apps/{}/dead-letters?unresolved=true", app.slug))
    }
    .await;
    after_form(result)
}

async fn triggers_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
) -> Response {
    let result = async {
        let app = auth::authorize(
            &state.pool,
            &session.principal,
            &app,
            Capability::DeadLetterRead,
        )
        .await?;
        let rows = outbox_core::store::triggers::list(&state.pool, app.id).await?;
        Ok::<_, ApiError>((app, rows))
    }
    .await;
    let (app, rows) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let csrf = esc(&session.csrf);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/dead-letters?unresolved=true">← {slug} dead letters</a></p><h1>{slug} · triggers</h1>
<table><tr><th>Name</th><th>Kind</th><th>Listens to</th><th>Target</th><th>State</th><th></th></tr>"#
    ));
    for t in &rows {
        let detail = match t.kind.as_str() {
            "kv" => format!(
                "{} ({})",
                t.collection_glob.as_deref().unwrap_or(""),
                t.ops.clone().unwrap_or_default().join(", ")
            ),
            "cron" => format!(
                "{} {} · next {}",
                t.schedule.as_deref().unwrap_or(""),
                t.timezone.as_deref().unwrap_or("UTC"),
                t.next_fire_at.map(|n| n.to_rfc3339()).unwrap_or_default()
            ),
            _ => "dead letters".to_owned(),
        };
        let toggle = if t.enabled { "disable" } else { "enable" };
        body.push_str(&format!(
            r#"<tr data-trigger="{name}"><td>{name}</td><td>{kind}</td><td>{detail}</td><td>{target}</td><td>{state}</td><td>
<form class=inline method=post action="/apps/{slug}/triggers/{id}/{toggle}"><input type=hidden name=csrf value="{csrf}"><button type=submit>{toggle}</button></form>
<form class=inline method=post action="/apps/{slug}/triggers/{id}/delete"><input type=hidden name=csrf value="{csrf}"><button type=submit>delete</button></form></td></tr>"#,
            name = esc(&t.name),
            kind = esc(&t.kind),
            detail = esc(&detail),
            target = esc(&t.target),
            state = if t.enabled { "enabled" } else { "disabled" },
            id = t.id,
        ));
    }
    body.push_str(&format!(
        r#"</table><h2>New trigger</h2><form method=post action="/apps/{slug}/triggers"><input type=hidden name=csrf value="{csrf}">
<p><select name=kind><option value=kv>KV writes</option><option value=cron>cron</option><option value=dead_letter>dead letters</option></select>
<input name=name placeholder=name required> <input name=target placeholder="handler or webhook:https://…" required></p>
<p><input name=collection placeholder="collection glob (kv)"> <input name=ops placeholder="put,delete (kv)"></p>
<p><input name=schedule placeholder="cron schedule"> <input name=timezone placeholder="UTC"></p>
<p><input name=topics placeholder="topics, comma-separated (dead letters)"></p>
<p><button type=submit>Create</button></p></form>"#
    ));
    page(&format!("{} triggers", app.slug), &body).into_response()
}

fn list_field(form: &[(String, String)], name: &str) -> Vec<String> {
    field(form, name)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn create_trigger(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    req: Request,
) -> Response {
    use outbox_core::store::triggers::{self, TriggerSpec};
    let result = async {
        let (form, app) =
            checked_form(&state, &session, &app, Capability::ManageTriggers, req).await?;
        let text = |name: &str| field(&form, name).unwrap_or_default().trim().to_owned();
        let spec = match text("kind").as_str() {
            "kv" => TriggerSpec::Kv {
                collection: text("collection"),
                ops: Some(list_field(&form, "ops"))
                    .filter(|o| !o.is_empty())
                    .unwrap_or_else(|| vec!["put".into(), "delete".into()]),
            },
            "cron" => TriggerSpec::Cron {
                schedule: text("schedule"),
                timezone: Some(text("timezone"))
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "UTC".into()),
            },
            "dead_letter" => TriggerSpec::DeadLetter {
                sources: Vec::new(),
                topics: list_field(&form, "topics"),
                trigger_ids: Vec::new(),
            },
            other => {
                return Err(ApiError::Invalid(format!(
                    "kind {other:?} is not kv, cron or dead_letter"
                )));
            }
        };
        let principal = format!("user:{}", session.principal.user.id);
        let mut tx = state
            .pool
            .begin()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        triggers::create(
            &mut tx,
            app.id,
            &text("name"),
            &text("target"),
            Some(&principal),
            &spec,
        )
        .await?;
        tx.commit()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok::<_, ApiError>(format!("/apps/{}/triggers", app.slug))
    }
    .await;
    after_form(result)
}

async fn change_trigger(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id, action)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    use outbox_core::store::triggers;
    let result = async {
        let (_, app) =
            checked_form(&state, &session, &app, Capability::ManageTriggers, req).await?;
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("trigger"))?;
        match action.as_str() {
            "enable" => triggers::set_enabled(&state.pool, app.id, id, true).await?,
            "disable" => triggers::set_enabled(&state.pool, app.id, id, false).await?,
            "delete" => triggers::delete(&state.pool, app.id, id).await?,
            _ => return Err(ApiError::not_found("action")),
        }
        Ok::<_, ApiError>(format!("/apps/{}/triggers", app.slug))
    }
    .await;
    after_form(result)
}

/// The instance admin's accounts page: users (roles, sessions, throttle)
/// and API keys, with the same actions as `outboxd user …` and
/// `outboxd api-key …`.
async fn accounts_page(State(state): State<AdminState>, session: Session) -> Response {
    if !session.principal.user.is_admin {
        return error_page(&ApiError::Forbidden);
    }
    let result = async {
        Ok::<_, ApiError>((
            accounts::list_users(&state.pool).await?,
            accounts::list_api_keys(&state.pool, None).await?,
        ))
    }
    .await;
    let (users, keys) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let csrf = esc(&session.csrf);
    let mut body = logout_form(&session);
    body.push_str(
        r#"<p><a href="/apps">← apps</a></p><h1>Accounts</h1><table id=users><tr><th>E-mail</th><th>Instance admin</th><th>Roles</th><th>Sessions</th><th>API keys</th><th>Created</th><th>Actions</th></tr>"#,
    );
    for u in &users {
        let button = |action: &str, label: &str, confirm: bool| {
            format!(
                r#"<form class=inline method=post action="/admin/accounts/{id}/{action}"><input type=hidden name=csrf value="{csrf}">{c}<button type=submit>{label}</button></form>"#,
                id = u.id,
                c = if confirm {
                    r#"<label><input type=checkbox name=confirm value=yes required> sure</label> "#
                } else {
                    ""
                },
            )
        };
        body.push_str(&format!(
            r#"<tr data-user="{email}"><td>{email}</td><td>{admin}</td><td>{roles}</td><td>{sessions}</td><td>{keys}</td><td>{created}</td><td>{revoke} {unlock} {delete}
<form class=inline method=post action="/admin/accounts/{id}/password"><input type=hidden name=csrf value="{csrf}"><input name=password type=password minlength=12 autocomplete=new-password placeholder="new password" required> <button type=submit>Set password</button></form></td></tr>"#,
            email = esc(&u.email),
            admin = if u.is_admin { "yes" } else { "" },
            roles = esc(&u.roles.join(", ")),
            sessions = u.sessions,
            keys = u.api_keys,
            created = u.created_at.format("%Y-%m-%d"),
            revoke = button("revoke-sessions", "Sign out everywhere", false),
            unlock = button("unlock", "Unlock", false),
            delete = button("delete", "Delete", true),
            id = u.id,
        ));
    }
    body.push_str(
        r#"</table><h2>API keys</h2><table id=api-keys><tr><th>Prefix</th><th>Name</th><th>Owner</th><th>Created</th><th>Last used</th><th>State</th><th></th></tr>"#,
    );
    if keys.is_empty() {
        body.push_str(r#"<tr><td colspan=7 class=muted>No API keys yet: create one with <code>outboxd api-key create EMAIL</code>.</td></tr>"#);
    }
    for k in &keys {
        let state_cell = k.revoked_at.map_or_else(
            || "active".to_owned(),
            |at| format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
        );
        let action = if k.revoked_at.is_none() {
            format!(
                r#"<form class=inline method=post action="/admin/api-keys/{p}/revoke"><input type=hidden name=csrf value="{csrf}"><button type=submit>Revoke</button></form>"#,
                p = esc(&k.prefix)
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            r#"<tr data-key="{p}"><td><code>obx_{p}_…</code></td><td>{name}</td><td>{owner}</td><td>{created}</td><td>{used}</td><td>{state_cell}</td><td>{action}</td></tr>"#,
            p = esc(&k.prefix),
            name = esc(&k.name),
            owner = esc(&k.owner),
            created = k.created_at.format("%Y-%m-%d %H:%M"),
            used = k
                .last_used_at
                .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "never".into()),
        ));
    }
    body.push_str("</table>");
    page("Accounts", &body).into_response()
}

/// An instance admin's form: read, CSRF-checked, and refused to anyone else.
async fn admin_form(
    state: &AdminState,
    session: &Session,
    req: Request,
) -> Result<Vec<(String, String)>, ApiError> {
    let form = form(req, state.body_limit).await?;
    check_csrf(session, &form)?;
    if !session.principal.user.is_admin {
        return Err(ApiError::Forbidden);
    }
    Ok(form)
}

/// An instance admin's action on a user, from the accounts page.
async fn account_action(
    State(state): State<AdminState>,
    session: Session,
    Path((user, action)): Path<(String, String)>,
    req: Request,
) -> Response {
    let result = async {
        let form = admin_form(&state, &session, req).await?;
        match action.as_str() {
            "revoke-sessions" => {
                accounts::revoke_sessions(&state.pool, &user).await?;
            }
            "unlock" => {
                accounts::unlock(&state.pool, &user).await?;
            }
            "delete" => {
                if field(&form, "confirm") != Some("yes") {
                    return Err(ApiError::Invalid(
                        "confirm: tick the box to delete the user".into(),
                    ));
                }
                accounts::delete_user(&state.pool, &user).await?;
            }
            "password" => {
                let password = field(&form, "password").unwrap_or_default();
                accounts::set_password(&state.pool, &state.hasher, &user, password).await?;
            }
            _ => return Err(ApiError::not_found("action")),
        }
        Ok("/admin/accounts".to_owned())
    }
    .await;
    after_form(result)
}

/// Revokes an API key from the accounts page.
async fn revoke_key(
    State(state): State<AdminState>,
    session: Session,
    Path(prefix): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        admin_form(&state, &session, req).await?;
        accounts::revoke_api_key(&state.pool, &prefix).await?;
        Ok("/admin/accounts".to_owned())
    }
    .await;
    after_form(result)
}
