//! What an action just did, shown once on the page it leads to.
//!
//! An action's handler names its result in the address it redirects to
//! (`done`, `rows`, `more`); [`carry`] moves those fields out of the address
//! into a short-lived cookie for that page's path before the answer leaves,
//! the page reads them from the cookie ([`Flash`]), and [`carry`] clears it
//! once the page has been answered. (The path keeps requests for other
//! pages, such as another tab's, from taking the message first.) Fields in
//! an address are never read: a link someone else made cannot have a page
//! report an action that did not happen.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use super::render::esc;
use super::session::{cookie, query_pairs, set_cookie_at};

const FLASH_COOKIE: &str = "outboxd_flash";

/// The result fields an action puts in its redirect (`named`: what it was
/// done to, e.g. a topic; not `topic`, which pages take as a filter;
/// `unseen`: nothing in the app names that topic).
const FIELDS: [&str; 5] = ["done", "rows", "more", "named", "unseen"];

/// Whether `name` is one of the result fields an older link may carry.
pub(super) fn is_result_field(name: &str) -> bool {
    FIELDS.contains(&name)
}

/// Long enough for the browser to follow the redirect, short enough that
/// a result not shown (an error page came between) does not turn up later.
const MAX_AGE_SECS: u64 = 30;

/// The result of the action that led to this page, from the flash cookie.
#[derive(Debug, Default)]
pub(super) struct Flash(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Flash {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let pairs = cookie(&parts.headers, FLASH_COOKIE)
            .map(|value| {
                form_urlencoded::parse(value.as_bytes())
                    .into_owned()
                    .filter(|(k, _)| FIELDS.contains(&k.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self(pairs))
    }
}

impl Flash {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The action that was done (`retry`, `cancel`, `replay`, …), if any.
    pub(super) fn done(&self) -> Option<&str> {
        self.get("done")
    }

    /// The result fields again, as a query to pass on when the page they
    /// were meant for leads elsewhere (a row that became a dead letter).
    pub(super) fn passed_on(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.0 {
            query.append_pair(k, v);
        }
        query.finish()
    }

    /// The message for the page: a fixed text per action with its row count,
    /// or nothing.
    pub(super) fn html(&self) -> String {
        let rows: usize = self.get("rows").and_then(|n| n.parse().ok()).unwrap_or(0);
        let (noun, letters) = if rows == 1 {
            ("row", "dead letter")
        } else {
            ("rows", "dead letters")
        };
        let more = if self.get("more") == Some("true") {
            " More may match: run it again for the next 10,000."
        } else {
            ""
        };
        let named = self.get("named").unwrap_or("the topic");
        let unseen = if self.get("unseen") == Some("true") {
            format!(
                " Nothing names {named} in this app yet (no rows, no process serving it by name, no dead letters): check the spelling."
            )
        } else {
            String::new()
        };
        let text = match self.done() {
            Some("retry") if rows == 0 => "No row changed: none was waiting for a delay or a retry (a due row runs as soon as a process is free).".to_owned(),
            Some("retry") => format!("Made {rows} {noun} due now.{more}"),
            Some("cancel") if rows == 0 => "No row cancelled: none was waiting (each had finished, was running, or was a dead letter already).".to_owned(),
            Some("cancel") => {
                format!("Cancelled {rows} {noun}: each is now an ignored dead letter.{more}")
            }
            Some("replay") => "Replayed: a new row is in the outbox.".to_owned(),
            Some("ignore") => "Marked ignored.".to_owned(),
            Some("bulk-replay" | "bulk-ignore") if rows == 0 => {
                "No dead letter changed: none was selected, or each was resolved already."
                    .to_owned()
            }
            Some("bulk-replay") => {
                format!("Replayed {rows} {letters}: each is a new row in the outbox.{more}")
            }
            Some("bulk-ignore") => format!("Marked {rows} {letters} ignored.{more}"),
            Some("pause") if rows == 0 => {
                format!("{named} was paused already; nothing changed.{unseen}")
            }
            Some("pause") => format!(
                "Paused {named}: processes stop claiming its rows within about a second.{unseen}"
            ),
            Some("resume") if rows == 0 => format!("{named} was not paused; nothing changed."),
            Some("resume") => format!("Resumed {named}."),
            Some("limit") => format!("Limit set on {named}.{unseen}"),
            Some("unlimit") if rows == 0 => format!("{named} had no limit; nothing changed."),
            Some("unlimit") => format!("Limit removed from {named}."),
            Some("trigger-create") => format!("Created trigger {named}."),
            Some("trigger-enable") if rows == 0 => {
                format!("Trigger {named} was enabled already; nothing changed.")
            }
            Some("trigger-enable") => format!("Enabled trigger {named}: it fires again."),
            Some("trigger-disable") if rows == 0 => {
                format!("Trigger {named} was disabled already; nothing changed.")
            }
            Some("trigger-disable") => format!("Disabled trigger {named}: it fires nothing until enabled."),
            Some("trigger-delete") => format!("Deleted trigger {named}."),
            Some("account-revoke-sessions") => format!(
                "Signed {named} out everywhere: {rows} {} ended (API keys stay).",
                if rows == 1 { "session" } else { "sessions" }
            ),
            Some("account-unlock") if rows == 0 => {
                format!("{named} was not held back; nothing changed.")
            }
            Some("account-unlock") => {
                format!("Unlocked {named}: failed sign-ins forgotten, sign-in open again.")
            }
            Some("account-password") => format!(
                "Set a new password for {named}: {rows} {} ended.",
                if rows == 1 { "session" } else { "sessions" }
            ),
            Some("account-delete") => format!("Deleted {named}."),
            Some("account-create") => format!("Created the account {named}."),
            Some("role-grant") if rows == 0 => format!("{named} already; nothing changed."),
            Some("role-grant") => format!("Role set: {named}."),
            Some("role-revoke") if rows == 0 => format!("No role to take away: {named}."),
            Some("role-revoke") => format!("Role taken away: {named}."),
            Some("key-revoke") if rows == 0 => {
                format!("API key obx_{named}_… was revoked already; nothing changed.")
            }
            Some("key-revoke") => format!("Revoked API key obx_{named}_…."),
            _ => return String::new(),
        };
        format!(r#"<p class=flash role=status id=flash>{}</p>"#, esc(&text))
    }
}

/// A query split in two, each re-encoded: its result fields, and the rest.
fn split(raw: Option<&str>) -> (String, String) {
    let mut fields = form_urlencoded::Serializer::new(String::new());
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query_pairs(raw) {
        let to = if FIELDS.contains(&k.as_str()) {
            &mut fields
        } else {
            &mut rest
        };
        to.append_pair(&k, &v);
    }
    (fields.finish(), rest.finish())
}

/// A page's query without the result fields, re-encoded for the page's
/// parser (an older link may still carry them; they mean nothing here).
pub(super) fn without_flash(raw: Option<&str>) -> String {
    split(raw).1
}

/// The dashboard's layer for results: a redirect whose address carries
/// result fields goes out without them and sets the flash cookie instead;
/// any other answer to a request that brought the cookie clears it.
pub(super) async fn carry(secure: bool, request: Request, next: Next) -> Response {
    let brought = cookie(request.headers(), FLASH_COOKIE).is_some();
    let requested = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    if response.status().is_redirection() {
        let to = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('?'))
            .map(|(path, query)| (path.to_owned(), query.to_owned()));
        if let Some((path, query)) = to {
            let (result, rest) = split(Some(&query));
            if !result.is_empty() {
                let location = if rest.is_empty() {
                    path.clone()
                } else {
                    format!("{path}?{rest}")
                };
                let headers = response.headers_mut();
                if let Ok(location) = HeaderValue::from_str(&location) {
                    headers.insert(header::LOCATION, location);
                }
                if let Some(c) = set_cookie_at(FLASH_COOKIE, &result, &path, MAX_AGE_SECS, secure) {
                    headers.append(header::SET_COOKIE, c);
                }
            }
        }
    } else if brought && let Some(c) = set_cookie_at(FLASH_COOKIE, "", &requested, 0, secure) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}
