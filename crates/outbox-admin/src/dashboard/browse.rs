//! The row browser: an app's rows that have not finished, filtered and
//! paged in claim order; the look-up by id; and the bulk actions on the
//! whole filter (retry now, cancel), each shown with the number of rows it
//! will touch before it runs, and reported after.

use axum::extract::{Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Redirect, Response};
use outbox_core::store::outbox::{MAX_CANCEL_BATCH, RowCount, RowFilter, RowState};
use uuid::Uuid;

use crate::AdminState;
use crate::api::{self, RowQuery, Selection};
use crate::audit;
use crate::auth::Capability;
use crate::error::ApiError;

use super::flash::Flash;
use super::render::{error_page, esc, esc_key, esc_shown, logout_form, page, when};
use super::session::{Session, checked_form, field, may_operate, query_pairs, viewed_app};

/// The filter fields of the browser's form, in the order it shows them.
const FILTER_FIELDS: [&str; 9] = [
    "topic",
    "state",
    "ordering_key",
    "partition_key",
    "idempotency_key",
    "created_from",
    "created_to",
    "payload",
    "field",
];

/// The filter of a form or query string as `RowQuery`, with the pairs it
/// did not take (`id`, `done`, `rows`, `csrf`, …) left for the caller.
fn row_query(pairs: &[(String, String)], paging: bool) -> Result<RowQuery, ApiError> {
    let mut taken = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        let pages = paging && matches!(k.as_str(), "after" | "before" | "limit");
        if (FILTER_FIELDS.contains(&k.as_str()) || pages) && !v.trim().is_empty() {
            taken.append_pair(k, v);
        }
    }
    let taken = taken.finish();
    crate::strict::query(Some(&taken))
}

/// The filter as a query string (blank fields left out), for links.
fn filter_query(q: &RowQuery) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in filter_pairs(q) {
        out.append_pair(name, &value);
    }
    out.finish()
}

/// The filter's fields that are set, as text.
fn filter_pairs(q: &RowQuery) -> Vec<(&'static str, String)> {
    let payload = q.payload.as_ref().map(|p| match p {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    [
        ("topic", q.topic.clone()),
        ("state", q.state.clone()),
        ("ordering_key", q.ordering_key.clone()),
        ("partition_key", q.partition_key.clone()),
        ("idempotency_key", q.idempotency_key.clone()),
        ("created_from", q.created_from.clone()),
        ("created_to", q.created_to.clone()),
        ("payload", payload),
        ("field", q.field.clone()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.filter(|v| !v.trim().is_empty()).map(|v| (k, v)))
    .collect()
}

/// The filter as the confirm pages name it, one `<li>` a field, each value
/// as it is (control characters written out); empty without a filter.
fn filter_words(q: &RowQuery) -> String {
    let fields: String = filter_pairs(q)
        .into_iter()
        .map(|(name, value)| format!("<li>{name}: <code>{}</code></li>", esc_key(&value)))
        .collect();
    if fields.is_empty() {
        return fields;
    }
    format!("<p>The filter:</p><ul id=confirm-filter>{fields}</ul>")
}

/// The filter as one hidden input holding its query string, for the forms
/// that act on it. Not a field per part: browsers send every line break of a
/// form's value as CRLF, so a key holding a bare `\n` came back as another
/// key; percent-encoded, it travels as it is.
fn hidden_filter(q: &RowQuery) -> String {
    format!(
        r#"<input type=hidden name=filter value="{}">"#,
        esc(&filter_query(q))
    )
}

/// A form with its `filter` field (see [`hidden_filter`]) unpacked into the
/// fields it holds. A form that names a filter both ways is refused: which
/// one it meant cannot be told.
fn unpack_filter(form: Vec<(String, String)>) -> Result<Vec<(String, String)>, ApiError> {
    // Blank is no filter, as a blank field is.
    let Some(packed) = field(&form, "filter")
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
    else {
        return Ok(form.into_iter().filter(|(k, _)| k != "filter").collect());
    };
    if let Some((named, _)) = form
        .iter()
        .find(|(k, v)| FILTER_FIELDS.contains(&k.as_str()) && !v.trim().is_empty())
    {
        return Err(ApiError::Invalid(format!(
            "{named}: the filter is given in the field filter already; give it one way"
        )));
    }
    let mut unpacked: Vec<(String, String)> =
        form.into_iter().filter(|(k, _)| k != "filter").collect();
    // Not UTF-8 or a field given twice is refused, as in any form; and only
    // filter fields: an action or a confirmation cannot ride in it.
    for (k, v) in crate::strict::checked_pairs(packed.as_bytes(), "filter: a field", &[])? {
        if !FILTER_FIELDS.contains(&k.as_str()) {
            return Err(ApiError::Invalid(format!(
                "filter: {k} is not a filter field (accepted: {})",
                FILTER_FIELDS.join(", ")
            )));
        }
        unpacked.push((k, v));
    }
    Ok(unpacked)
}

/// A time as a `datetime-local` input's value, in UTC (the page's script
/// shows it in the browser's zone and sends it back in UTC).
fn utc_input(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string())
        .unwrap_or_default()
}

/// The end of an id: the start of a v7 id is its creation time, which rows
/// enqueued together share.
fn short_id(id: Uuid) -> String {
    let text = id.simple().to_string();
    format!("…{}", &text[text.len() - 12..])
}

fn count_text(count: RowCount) -> String {
    match (count.rows, count.exact, count.at_least) {
        (1, true, _) => "1 row".to_owned(),
        (n, true, _) => format!("{n} rows"),
        (n, false, true) => format!("more than {} rows", n - 1),
        (n, false, false) => format!("about {n} rows (an estimate)"),
    }
}

/// `GET /apps/{app}/outbox`: the row browser; with `id`, the row's page.
pub(super) async fn browse_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    RawQuery(raw): RawQuery,
    flash: Flash,
) -> Response {
    let pairs = query_pairs(raw.as_deref());
    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        if let Some((_, id)) = pairs.iter().find(|(k, _)| k == "id") {
            // As a log line writes it: `id=01a…`, maybe in quotes.
            let pasted = id.trim();
            let pasted = pasted
                .strip_prefix("id=")
                .unwrap_or(pasted)
                .trim_matches(['"', '\'']);
            let id = Uuid::parse_str(pasted)
                .map_err(|_| ApiError::Invalid(format!("{id:?} is not a row id")))?;
            return Ok(Err(format!("/apps/{}/outbox/{id}", app.slug)));
        }
        // A misspelt filter would show every row as if it were applied.
        const PAGE_FIELDS: [&str; 4] = ["after", "before", "limit", "id"];
        if let Some((unknown, _)) = pairs.iter().find(|(k, _)| {
            !(FILTER_FIELDS.contains(&k.as_str())
                || PAGE_FIELDS.contains(&k.as_str())
                || super::flash::is_result_field(k))
        }) {
            return Err(ApiError::Invalid(format!(
                "{unknown}: unknown field (accepted: {}, {})",
                FILTER_FIELDS.join(", "),
                PAGE_FIELDS.join(", ")
            )));
        }
        let q = row_query(&pairs, true)?;
        let list = api::list_rows(&state, session.principal.user.id, app.id, &q).await?;
        let topics = outbox_core::store::outbox::recorded_state_counts(&state.pool, app.id).await?;
        let operator = may_operate(&state, &session, &app.slug).await?;
        Ok::<_, ApiError>(Ok((app, q, list, topics, operator)))
    }
    .await;
    let (app, q, list, topics, operator) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(to)) => return Redirect::to(&to).into_response(),
        Err(err) => return error_page(&err),
    };
    // Parsed already by the list: it cannot fail here.
    let filter = q.filter().unwrap_or_default();
    // As the action decides it: `payload={}` is no filter either.
    let takes_all = filter == RowFilter::default();
    let slug = esc(&app.slug);
    let value = |name: &str| {
        filter_pairs(&q)
            .into_iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| esc(&v))
            .unwrap_or_default()
    };
    let states: String = RowState::ALL
        .iter()
        .map(|s| {
            let selected = if q.state.as_deref() == Some(s.as_str()) {
                " selected"
            } else {
                ""
            };
            format!(r#"<option{selected}>{}</option>"#, s.as_str())
        })
        .collect();
    let topic_options: String = topics
        .iter()
        .map(|t| format!(r#"<option value="{}">"#, esc(&t.topic)))
        .collect();
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/topics">← {slug} · topics</a> · <a href="/apps/{slug}/dead-letters?unresolved=true">dead letters</a> · <a href="/apps/{slug}/audit">audit log</a></p>
<h1>{slug} · rows</h1>{flash}
<form method=get id=row-filter class=filters>
<label>Topic <input name=topic list=topic-list value="{topic}" maxlength=255></label><datalist id=topic-list>{topic_options}</datalist>
<label>State <select name=state><option value="">any</option>{states}</select></label>
<label>Ordering key <input name=ordering_key value="{ordering_key}"></label>
<label>Partition key <input name=partition_key value="{partition_key}"></label>
<label>Idempotency key <input name=idempotency_key value="{idempotency_key}"></label>
<label>Enqueued from <span data-zone>(UTC)</span> <input name=created_from type=datetime-local step=1 data-utc value="{created_from}"></label>
<label>to <input name=created_to type=datetime-local step=1 data-utc value="{created_to}"></label>
<label>Payload contains <input name=payload value="{payload}" placeholder='{{"customer":{{"id":"c-1"}}}}'></label>
<label>Payload field <input name=field value="{field}" placeholder="customer.id=c-1"></label>
<button type=submit>Filter</button> <a href="/apps/{slug}/outbox">clear</a></form>
<form method=get class=filters><label>Row id <input name=id size=38 placeholder="an outbox row id, e.g. from a log line" required></label> <button type=submit>Show the row</button></form>
<p id=row-count>{count}</p>"#,
        flash = flash.html(),
        topic = value("topic"),
        ordering_key = value("ordering_key"),
        partition_key = value("partition_key"),
        idempotency_key = value("idempotency_key"),
        created_from = utc_input(filter.created_from),
        created_to = utc_input(filter.created_to),
        payload = value("payload"),
        field = value("field"),
        count = count_text(list.count),
    ));
    if list.rows.is_empty() {
        let filtered = !filter_pairs(&q).is_empty();
        body.push_str(&if filtered {
            format!(r#"<p class=muted id=rows-empty>No row matches this filter. <a href="/apps/{slug}/outbox">Clear it</a> to see every row.</p>"#)
        } else {
            r#"<p class=muted id=rows-empty>The outbox of this app is empty: every row enqueued so far has finished or been dead-lettered. Rows appear here from the moment their transaction commits (<code>outbox_enqueue()</code>, <code>POST /api/apps/{app}/events</code>).</p>"#.to_owned()
        });
    } else {
        body.push_str(r#"<div class=scroll><table id=rows><tr><th>Row</th><th>State</th><th>Topic</th><th>Due</th><th class=wide>Attempts</th><th class=wide>Keys</th><th class=wide>Worker</th><th>Last error</th></tr>"#);
        for r in &list.rows {
            let keys = [&r.ordering_key, &r.partition_key, &r.idempotency_key]
                .iter()
                .filter_map(|k| k.as_deref())
                .map(esc_key)
                .collect::<Vec<_>>()
                .join(" · ");
            body.push_str(&format!(
                r#"<tr data-row="{id}"><td><a href="/apps/{slug}/outbox/{id}"><code>{short}</code></a></td><td class="state {state}">{state}</td><td>{topic}{prio}</td><td class=nowrap>{due}</td><td class=wide>{attempts}</td><td class=wide>{keys}</td><td class=wide>{worker}</td><td class=err>{error}</td></tr>"#,
                id = r.id,
                short = short_id(r.id),
                state = esc(&r.state),
                topic = esc_shown(&r.topic),
                prio = if r.priority > 0 { format!(" <span class=muted>p{}</span>", r.priority) } else { String::new() },
                due = when(r.due_at),
                attempts = r.attempt_count,
                worker = esc_shown(r.locked_by.as_deref().filter(|_| r.state == "running").unwrap_or("")),
                error = esc_shown(r.last_error.as_deref().unwrap_or("")),
            ));
        }
        body.push_str("</table></div>");
    }
    let mut filter = filter_query(&q);
    if let Some(limit) = q.limit {
        let sep = if filter.is_empty() { "" } else { "&" };
        filter.push_str(&format!("{sep}limit={limit}"));
    }
    let link = |cursor: &str, value: &str, text: &str, id: &str| {
        let sep = if filter.is_empty() { "" } else { "&" };
        format!(
            r#"<a id={id} href="/apps/{slug}/outbox?{filter}{sep}{cursor}={}">{text}</a>"#,
            esc(value)
        )
    };
    let pages: Vec<String> = [
        list.before
            .as_deref()
            .map(|c| link("before", c, "← previous", "page-before")),
        list.after
            .as_deref()
            .map(|c| link("after", c, "next →", "page-after")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !pages.is_empty() {
        body.push_str(&format!("<p class=pages>{}</p>", pages.join(" · ")));
    }
    if operator && !list.rows.is_empty() {
        body.push_str(&format!(
            r#"<h2>Act on every row of {scope}</h2><form method=post action="/apps/{slug}/outbox/bulk" id=bulk-filter><input type=hidden name=csrf value="{csrf}">{hidden}
<p><label>Action <select name=action><option value=retry>Retry now (scheduled and retrying rows become due)</option><option value=cancel>Cancel (each becomes an ignored dead letter)</option></select></label> <label>Reason (for cancel) <input name=reason maxlength=1000></label> <button type=submit>Review…</button></p>
<p class=muted>The next page shows how many rows it will touch before anything changes. Running rows are left to finish.</p></form>"#,
            scope = if takes_all { "the app" } else { "this filter" },
            csrf = esc(&session.csrf),
            hidden = hidden_filter(&q),
        ));
    }
    page(&format!("{} rows", app.slug), &body).into_response()
}

/// `POST /apps/{app}/outbox/bulk`: without `confirm=yes`, the page that
/// says how many rows the action will touch; with it, the action, then back
/// to the browser with what it did.
pub(super) async fn bulk_on_filter(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        let (form, app) = checked_form(&state, &session, &app, Capability::Operate, req).await?;
        let form = unpack_filter(form)?;
        let q = row_query(&form, false)?;
        let filter = q.filter()?;
        let action = field(&form, "action").unwrap_or_default();
        let reason = field(&form, "reason").unwrap_or_default().trim().to_owned();
        if !matches!(action, "retry" | "cancel") {
            return Err(ApiError::Invalid("action: must be retry or cancel".into()));
        }
        if action == "cancel" && reason.is_empty() {
            return Err(ApiError::Invalid(
                "reason: a cancel needs a reason; it is kept with every cancelled row".into(),
            ));
        }
        let slug = esc(&app.slug);
        let back = filter_query(&q);
        if field(&form, "confirm") != Some("yes") {
            let (idle, waiting) = api::count_touched(&state, session.principal.user.id, app.id, &filter).await?;
            let (touched, which, what) = if action == "retry" {
                (waiting, "scheduled or retrying", "Retry now: they become due at once, keeping their attempt count")
            } else {
                (idle, "not running", "Cancel: each becomes an ignored dead letter carrying the reason")
            };
            let capped = if touched.rows > MAX_CANCEL_BATCH {
                format!(" At most {MAX_CANCEL_BATCH} are taken per action; run it again for the rest.")
            } else {
                String::new()
            };
            // "No row … matches", "1 row … matches", "2 rows … match".
            let one = touched.rows <= 1 && touched.exact;
            let scope = match (filter == RowFilter::default(), one) {
                (true, _) => "in the app (no filter: every row)",
                (false, true) => "matches this filter",
                (false, false) => "match this filter",
            };
            if touched.rows == 0 && touched.exact {
                // Nothing to confirm: say so, and offer only the way back.
                let body = format!(
                    r#"{logout}<h1>{slug} · confirm</h1><p id=confirm-count><strong>No row</strong> {which} {scope}: nothing to do.</p><p><a href="/apps/{slug}/outbox?{back}">Back to the rows</a></p>"#,
                    logout = logout_form(&session),
                    back = esc(&back),
                );
                return Ok(Err(page("Confirm", &body).into_response()));
            }
            let body = format!(
                r#"{logout}<h1>{slug} · confirm</h1><p id=confirm-count><strong>{count}</strong> {which} {scope}.{capped}</p>{filter_line}<p>{what}.</p>{reason_line}<p class=muted id=confirm-when>Counted now: Confirm takes the rows that match when it runs, with any that arrived since.</p>
<form method=post action="/apps/{slug}/outbox/bulk"><input type=hidden name=csrf value="{csrf}">{hidden}<input type=hidden name=action value="{action}"><input type=hidden name=reason value="{reason}"><input type=hidden name=confirm value=yes>
<button type=submit id=confirm>{button}</button> <a href="/apps/{slug}/outbox?{back}">Back without changing anything</a></form>"#,
                logout = logout_form(&session),
                count = count_text(touched),
                filter_line = filter_words(&q),
                reason_line = if action == "cancel" { format!("<p>Reason: {}</p>", esc_shown(&reason)) } else { String::new() },
                csrf = esc(&session.csrf),
                hidden = hidden_filter(&q),
                reason = esc(&reason),
                button = if action == "retry" { "Retry these rows now" } else { "Cancel these rows" },
                back = esc(&back),
            );
            return Ok(Err(page("Confirm", &body).into_response()));
        }
        let actor = audit::actor(&session.principal);
        let selection = Selection::Matching(filter);
        let done = if action == "retry" {
            api::retry_rows(&state.pool, &actor, app.id, &selection).await?
        } else {
            api::cancel_rows(&state.pool, &actor, app.id, &selection, &reason).await?
        };
        let sep = if back.is_empty() { "" } else { "&" };
        Ok::<_, ApiError>(Ok(format!(
            "/apps/{}/outbox?{back}{sep}done={action}&rows={}&more={}",
            app.slug, done.rows, done.more
        )))
    }
    .await;
    match result {
        Ok(Ok(to)) => Redirect::to(&to).into_response(),
        Ok(Err(confirm)) => confirm,
        Err(err) => error_page(&err),
    }
}

/// `POST /apps/{app}/outbox/{id}/{retry|cancel}`: one row's action, back to
/// its page (a cancelled row's page leads to its dead letter).
pub(super) async fn act_on_row(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id, action)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let result = async {
        let (form, app) = checked_form(&state, &session, &app, Capability::Operate, req).await?;
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("outbox row"))?;
        let actor = audit::actor(&session.principal);
        let selection = Selection::Ids(vec![id]);
        let done = match action.as_str() {
            "retry" => api::retry_rows(&state.pool, &actor, app.id, &selection).await?,
            "cancel" => {
                if field(&form, "confirm") != Some("yes") {
                    return Err(ApiError::Invalid(
                        "confirm: tick the box to cancel the row".into(),
                    ));
                }
                let reason = field(&form, "reason").unwrap_or_default();
                api::cancel_rows(&state.pool, &actor, app.id, &selection, reason).await?
            }
            _ => return Err(ApiError::not_found("action")),
        };
        Ok::<_, ApiError>(format!(
            "/apps/{}/outbox/{id}?done={action}&rows={}",
            app.slug, done.rows
        ))
    }
    .await;
    super::session::after_form(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_says_whether_it_is_exact_an_estimate_or_a_lower_bound() {
        let count = |rows, exact, at_least| {
            count_text(RowCount {
                rows,
                exact,
                at_least,
            })
        };
        assert_eq!(count(1, true, false), "1 row");
        assert_eq!(count(5000, true, false), "5000 rows");
        assert_eq!(count(1001, false, true), "more than 1000 rows");
        assert_eq!(count(4200, false, false), "about 4200 rows (an estimate)");
    }
}
