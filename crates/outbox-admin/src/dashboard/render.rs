//! HTML helpers shared by the dashboard pages: escaping, the page frame,
//! the error page and the signed-in banner.

use axum::response::{Html, IntoResponse, Response};

use crate::error::ApiError;

use super::session::Session;

/// HTML-escapes text (a form's values too: what is posted back is the text
/// as it was).
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// HTML-escapes text only shown (an error, a topic, a source), with its
/// control, invisible and direction-changing characters but line breaks
/// and tabs written out (`\u{1b}`, `\u{202e}`): an ESC or a BEL in an error
/// reached the page as it was. Not for form values, which must post back
/// the text as it was.
pub(super) fn esc_shown(s: &str) -> String {
    let shown: String = s
        .chars()
        .map(|c| {
            if outbox_core::topics::is_unprintable(c) && !matches!(c, '\n' | '\r' | '\t') {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    esc(&shown)
}

/// HTML-escapes a key a producer chose, with its control and invisible
/// characters written out (`\n`, `\u{200b}`): keys may hold them, and a
/// line break shown as a space would make `a\nb` look like `a b`.
pub(super) fn esc_key(key: &str) -> String {
    let mut shown = String::with_capacity(key.len());
    for c in key.chars() {
        if outbox_core::topics::is_unprintable(c) {
            shown.extend(c.escape_debug());
        } else {
            shown.push(c);
        }
    }
    esc(&shown)
}

/// A row's keys as one table cell: `ordering: … · partition: …`, or "none".
pub(super) fn keys_cell(keys: &[(&str, Option<&str>)]) -> String {
    let shown = keys
        .iter()
        .filter_map(|(name, key)| key.map(|k| format!("{name}: {}", esc_key(k))))
        .collect::<Vec<_>>();
    if shown.is_empty() {
        "none".to_owned()
    } else {
        shown.join(" · ")
    }
}

pub(super) fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{} · outboxd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel=icon href="data:,">
<script src="/assets/console.js" defer></script>
<style>
body{{font-family:system-ui,sans-serif;margin:0;color:var(--fg);background:var(--bg)}}
:root{{color-scheme:light dark;--fg:#1d2330;--bg:#f6f7f9;--panel:#fff;--line:#e3e6ea;--muted:#6b7480;--err:#c62828;--link:#1a5fb4;--head:#1d2330;--ok:#e6f4ea;--ok-line:#2e7d32}}
@media (prefers-color-scheme:dark){{:root{{--fg:#e4e7ec;--bg:#14171c;--panel:#1d2128;--line:#323844;--muted:#9aa3ad;--err:#ff7b72;--link:#8ab4f8;--head:#0b0d10;--ok:#163322;--ok-line:#56c271}}}}
a{{color:var(--link)}}
header{{background:var(--head);color:#fff;padding:.6rem 1.2rem;display:flex;justify-content:space-between;align-items:center}}
header a{{color:#fff;text-decoration:none;font-weight:600}}
main{{padding:1.2rem;max-width:1200px;margin:auto}}
table{{border-collapse:collapse;width:100%;background:var(--panel)}}
th,td{{text-align:left;padding:.4rem .6rem;border-bottom:1px solid var(--line);font-size:.9rem;vertical-align:top}}
.badge{{display:inline-block;min-width:1.4rem;padding:.1rem .45rem;border-radius:1rem;background:#c62828;color:#fff;text-align:center;font-size:.8rem}}
.badge.zero{{background:#9aa3ad}}
pre{{background:var(--panel);border:1px solid var(--line);padding:.8rem;overflow:auto}}
button{{padding:.35rem .8rem;margin-right:.4rem;cursor:pointer;white-space:nowrap}}
.err{{color:var(--err)}} .muted{{color:var(--muted)}} form.inline{{display:inline}}
input,select{{padding:.3rem;max-width:100%}}
:focus-visible{{outline:2px solid var(--link);outline-offset:2px}}
.flash{{background:var(--ok);border-left:4px solid var(--ok-line);padding:.6rem .8rem}}
form.filters{{display:flex;flex-wrap:wrap;gap:.4rem .8rem;align-items:end;margin:.6rem 0}}
form.filters label{{display:flex;flex-direction:column;font-size:.85rem}}
td.state.running{{font-weight:600}} td.state.retrying{{color:var(--err)}}
h1{{overflow-wrap:anywhere}} td{{overflow-wrap:break-word}} td.err,td.long{{overflow-wrap:anywhere;min-width:12rem}} td.wrap{{min-width:12rem}}
.scroll{{overflow-x:auto}} .charts{{display:flex;flex-wrap:wrap;gap:.8rem;margin:.6rem 0}} figure.chart{{margin:0;background:var(--panel);border:1px solid var(--line);padding:.5rem .6rem;flex:1 1 220px}} figure.chart svg{{width:100%;height:48px;color:var(--link);display:block}} figure.chart figcaption{{font-size:.85rem}} td.nowrap{{white-space:nowrap;overflow-wrap:normal}}
@media (max-width:600px){{main{{padding:.6rem}} th,td{{padding:.3rem .35rem}} h1{{font-size:1.4rem}} form.filters label{{width:100%}} .wide{{display:none}}}}
</style></head><body><header><a href="/apps">outboxd</a><span>console</span></header><main>{}</main></body></html>"#,
        esc_shown(title),
        body
    ))
}

/// A time as the page shows it: UTC in the text, which the page's script
/// turns into the browser's time zone, keeping UTC in the tooltip.
pub(super) fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    let utc = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    format!(
        r#"<time datetime="{utc}" title="{utc}">{}</time>"#,
        t.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

pub(super) fn error_page(err: &ApiError) -> Response {
    let (status, _) = err.status_and_code();
    (
        status,
        page(
            "Error",
            &format!(
                "<p class=err>{}</p><p><a href=\"/apps\" id=back data-back>Back</a> · <a href=\"/apps\">all apps</a></p>",
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

#[cfg(test)]
mod tests {
    use super::{esc, esc_shown};

    #[test]
    fn shown_text_is_escaped_with_its_control_characters_written_out() {
        assert_eq!(esc("<b>&'\""), "&lt;b&gt;&amp;&#39;&quot;");
        assert_eq!(
            esc("a\u{1b}b"),
            "a\u{1b}b",
            "a form value posts back as it was"
        );
        assert_eq!(
            esc_shown("<failed>\u{1b}[31m\u{7}\nline two\tend"),
            "&lt;failed&gt;\\u{1b}[31m\\u{7}\nline two\tend"
        );
        assert_eq!(esc_shown("abc\u{202e}fed"), "abc\\u{202e}fed");
    }
}
