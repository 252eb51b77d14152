//! HTML helpers shared by the dashboard pages: escaping, the page frame,
//! the error page and the signed-in banner.

use axum::response::{Html, IntoResponse, Response};

use crate::error::ApiError;

use super::session::Session;

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

pub(super) fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{} · outboxd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<script src="/assets/console.js" defer></script>
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
h1{{overflow-wrap:anywhere}} td{{overflow-wrap:anywhere}}
@media (max-width:600px){{main{{padding:.6rem}} th,td{{padding:.3rem .35rem}} h1{{font-size:1.4rem}}}}
</style></head><body><header><a href="/apps">outboxd</a><span>dead letters</span></header><main>{}</main></body></html>"#,
        esc(title),
        body
    ))
}

pub(super) fn error_page(err: &ApiError) -> Response {
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

pub(super) fn logout_form(session: &Session) -> String {
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
