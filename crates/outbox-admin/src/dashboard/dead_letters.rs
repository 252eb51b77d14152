//! The dead-letter pages: the list (filters, paging, bulk actions), one
//! dead letter, and its replay and ignore forms.

use axum::extract::{Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Redirect, Response};
use outbox_core::store::dead_letters;
use uuid::Uuid;

use crate::AdminState;
use crate::api::{self, BulkBody, BulkFilter, ListQuery};
use crate::audit;
use crate::auth::Capability;
use crate::error::ApiError;

use super::flash::{Flash, without_flash};
use super::render::{error_page, esc, esc_shown, keys_cell, logout_form, page, when};
use super::rows::attempts_table;
use super::session::{Session, after_form, checked_form, field, may, viewed_app};

fn age(created: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - created).num_seconds().max(0);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

pub(super) async fn list_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    RawQuery(raw): RawQuery,
    flash: Flash,
) -> Response {
    let rest = without_flash(raw.as_deref());
    let q: ListQuery = match crate::strict::query(Some(&rest)) {
        Ok(q) => q,
        Err(err) => return error_page(&err),
    };

    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        let listed = api::list_page(&state.pool, app.id, &q).await?;
        let unresolved = dead_letters::count_unresolved(&state.pool, app.id).await?;
        let manager = may(&state, &session, &app.slug, Capability::DeadLetterManage).await?;
        Ok::<_, ApiError>((app, listed, unresolved, manager))
    }
    .await;
    let (app, listed, unresolved, manager) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let api::Page {
        items: rows,
        next_cursor,
        prev_cursor,
    } = listed;
    let slug = esc(&app.slug);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/outbox">{slug} · rows</a> · <a href="/apps/{slug}/topics">topics</a> · <a href="/apps/{slug}/audit">audit log</a></p><h1>{slug} · dead letters <span class="badge{z}" id="unresolved">{unresolved}</span></h1>{flash}
<form method=get><input name=topic placeholder=topic value="{t}"> <input name=source placeholder=source value="{src}">
<label><input type=checkbox name=unresolved value=true {chk}> unresolved only</label> <button type=submit>Filter</button></form>
{bulk}
<div class=scroll><table><tr><th></th><th>Source</th><th>Topic</th><th>Attempts</th><th>Last error</th><th>Dead-lettered</th><th>State</th></tr>"#,
        z = if unresolved == 0 { " zero" } else { "" },
        flash = flash.html(),
        t = esc(q.topic.as_deref().unwrap_or("")),
        src = esc(q.source.as_deref().unwrap_or("")),
        chk = if q.unresolved { "checked" } else { "" },
        bulk = if manager && !rows.is_empty() {
            let filter = BulkFilter {
                source: q.source.clone(),
                topic: q.topic.clone(),
                trigger_id: q.trigger_id,
            };
            // A list of resolved dead letters has no unresolved ones to act on.
            let by_filter = if q.resolution.as_deref().is_some_and(|r| !r.is_empty()) {
                String::new()
            } else {
                format!(
                    r#"<form method=post action="/apps/{slug}/dead-letters/bulk" id=bulk-filter><input type=hidden name=csrf value="{csrf}"><input type=hidden name=scope value=filter>{hidden}
<p>Every unresolved dead letter {scope}: <label>Attempts <input name=max_attempts type=number min=1 size=6 placeholder="own"></label> <button type=submit name=action value=replay>Replay all…</button> <button type=submit name=action value=ignore>Ignore all…</button> <span class=muted>the count comes first</span></p></form>"#,
                    csrf = esc(&session.csrf),
                    hidden = filter_fields(&filter),
                    scope = scope_words(&filter),
                )
            };
            format!(
                r#"{by_filter}
<form method=post action="/apps/{slug}/dead-letters/bulk" id=bulk-selected data-confirm="{{action}} the selected dead letters ({{n}})?" data-needs-ticked="ids"><input type=hidden name=csrf value="{csrf}">{back_to}
<p><label>Attempts <input name=max_attempts type=number min=1 size=6 placeholder="own"></label> <button type=submit name=action value=replay>Replay selected</button><button type=submit name=action value=ignore>Ignore selected</button></p>"#,
                csrf = esc(&session.csrf),
                // Only the way back: the selection acts on its ids.
                back_to = filter_fields(&filter),
            )
        } else {
            String::new()
        },
    ));
    for row in &rows {
        let error = row.error_summary(120);
        body.push_str(&format!(
            r#"<tr data-id="{id}"><td>{cb}</td><td>{src}</td><td><a href="/apps/{slug}/dead-letters/{id}">{topic}</a></td><td>{att}</td><td class=long>{err}</td><td class=nowrap>{at}<br><span class=muted>{age} ago</span></td><td>{state}</td></tr>"#,
            id = row.id,
            cb = if manager && row.resolved_at.is_none() { format!(r#"<input type=checkbox name=ids value="{}">"#, row.id) } else { String::new() },
            src = esc_shown(&row.source),
            topic = esc_shown(&row.topic),
            att = row.attempt_count,
            err = esc_shown(&error),
            at = when(row.created_at),
            age = age(row.created_at),
            state = esc(row.state()),
        ));
    }
    body.push_str(if manager && !rows.is_empty() {
        "</table></div></form>"
    } else {
        "</table></div>"
    });
    // A page reached by a cursor that came out empty (the last rows went
    // meanwhile) is not an empty list.
    let paged = [&q.after, &q.before]
        .iter()
        .any(|c| c.as_deref().is_some_and(|c| !c.is_empty()));
    if rows.is_empty() && paged {
        body.push_str(&format!(
            r#"<p class=muted id=dead-letters-empty>No more dead letters past this page. <a href="/apps/{slug}/dead-letters?unresolved=true">The newest</a>.</p>"#
        ));
    } else if rows.is_empty() {
        let filtered = [&q.topic, &q.source, &q.resolution]
            .iter()
            .any(|v| v.as_deref().is_some_and(|v| !v.is_empty()))
            || q.trigger_id.is_some();
        body.push_str(&if filtered {
            format!(r#"<p class=muted id=dead-letters-empty>No dead letter matches this filter. <a href="/apps/{slug}/dead-letters?unresolved=true">Clear it</a> to see every unresolved one.</p>"#)
        } else if q.unresolved {
            r#"<p class=muted id=dead-letters-empty>No unresolved dead letter: every row that ran out of attempts has been replayed or ignored, or none has yet.</p>"#.to_owned()
        } else {
            r#"<p class=muted id=dead-letters-empty>No dead letter: no row has run out of attempts or been cancelled yet.</p>"#.to_owned()
        });
    }
    // Encoded as a query, then escaped for the attribute: a topic may hold
    // '&', '?' or '+' (a webhook's URL).
    let link = |cursor: &str, value: &str, id: &str, text: &str| {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("unresolved", if q.unresolved { "true" } else { "false" })
            .append_pair("topic", q.topic.as_deref().unwrap_or(""))
            .append_pair("source", q.source.as_deref().unwrap_or(""))
            .extend_pairs(q.resolution.as_deref().map(|r| ("resolution", r)))
            .extend_pairs(q.trigger_id.map(|t| ("trigger_id", t.to_string())))
            .extend_pairs(q.limit.map(|l| ("limit", l.to_string())))
            .append_pair(cursor, value)
            .finish();
        format!(r#"<a id={id} href="?{}">{text}</a>"#, esc(&query))
    };
    let pages: Vec<String> = [
        prev_cursor.map(|c| link("before", &c, "page-newer", "← Newer")),
        next_cursor.map(|c| link("after", &c, "page-older", "Older →")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !pages.is_empty() {
        body.push_str(&format!("<p class=pages>{}</p>", pages.join(" · ")));
    }
    page(&format!("{} dead letters", app.slug), &body).into_response()
}

pub(super) async fn detail_page(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    flash: Flash,
) -> Response {
    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        let asked = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("dead letter"))?;
        let id = dead_letters::resolve_id(&state.pool, app.id, asked).await?;
        let row = dead_letters::get(&state.pool, app.id, id).await?;
        let manager = may(&state, &session, &app.slug, Capability::DeadLetterManage).await?;
        Ok::<_, ApiError>((row, app, asked, manager))
    }
    .await;
    let (row, app, asked, manager) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    if row.id != asked {
        // The id of the row it was, from a log line: the dead letter's own address.
        return Redirect::to(&format!("/apps/{slug}/dead-letters/{}", row.id)).into_response();
    }
    let pretty = serde_json::to_string_pretty(&row.payload).unwrap_or_default();
    let actions = if row.resolved_at.is_none() && !manager {
        String::new()
    } else if row.resolved_at.is_none() {
        format!(
            r#"<form class=inline method=post action="/apps/{slug}/dead-letters/{id}/replay" data-confirm="Replay this dead letter? A new row goes into the outbox."><input type=hidden name=csrf value="{c}"><label>Attempts <input name=max_attempts type=number min=1 placeholder="{budget}" size=6></label> <button type=submit id=replay>Replay</button></form>
<form class=inline method=post action="/apps/{slug}/dead-letters/{id}/ignore" data-confirm="Ignore this dead letter? It will not run again."><input type=hidden name=csrf value="{c}"><button type=submit id=ignore>Ignore</button></form>"#,
            id = row.id,
            c = esc(&session.csrf),
            budget = row
                .max_attempts
                .map_or_else(|| "default".to_owned(), |n| n.to_string()),
        )
    } else {
        let replayed_as = row.replayed_as.map_or_else(String::new, |new_row| {
            format!(
                r#" · replayed as <a id=replayed-as href="/apps/{slug}/outbox/{new_row}">row {new_row}</a>"#
            )
        });
        format!(
            "<p>Resolved: <b id=resolution>{}</b>{replayed_as}</p>",
            esc(row.resolution.as_deref().unwrap_or(""))
        )
    };
    let body = format!(
        r#"{logout}<p><a href="/apps/{slug}/dead-letters?unresolved=true">← {slug}</a></p><h1>{topic}</h1>{flash}
<div class=scroll><table><tr><th>Id</th><td>{id}</td></tr><tr><th>Original event</th><td>{orig}</td></tr>{replay_of}<tr><th>Source</th><td>{src}</td></tr>
<tr><th>Keys</th><td id=keys>{keys}</td></tr>
<tr><th>Attempts</th><td>{att}</td></tr><tr><th>First attempt</th><td>{first}</td></tr><tr><th>Last attempt</th><td>{last}</td></tr>
<tr><th>Dead-lettered</th><td>{created}</td></tr><tr><th>Last error</th><td class=err>{err}</td></tr></table></div>
{attempts}<h2>Payload</h2><pre id=payload>{payload}</pre><h2>Headers</h2><pre id=headers>{headers}</pre>{actions}"#,
        logout = logout_form(&session),
        flash = flash.html(),
        topic = esc_shown(&row.topic),
        id = row.id,
        orig = row.original_event_id,
        replay_of = row.replay_of.map_or_else(String::new, |earlier| format!(
            r#"<tr><th>Replay of</th><td><a id=replay-of href="/apps/{slug}/dead-letters/{earlier}">dead letter {earlier}</a> (its replay became this dead letter)</td></tr>"#
        )),
        src = esc_shown(&row.source),
        keys = keys_cell(&[
            ("ordering", row.ordering_key.as_deref()),
            ("partition", row.partition_key.as_deref()),
        ]),
        headers = esc(&serde_json::to_string_pretty(&row.headers).unwrap_or_default()),
        att = row.attempt_count,
        first = row.first_attempt_at.map(when).unwrap_or_default(),
        last = row.last_attempt_at.map(when).unwrap_or_default(),
        created = when(row.created_at),
        err = esc_shown(row.last_error.as_deref().unwrap_or("")),
        payload = esc(&pretty),
        attempts = attempts_table(row.attempts.as_deref()),
    );
    page(&row.topic, &body).into_response()
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
        let id = if replay {
            let max_attempts = form_attempts(&form)?;
            let actor = audit::actor(&session.principal);
            api::replay_one(&state.pool, &actor, app.id, id, max_attempts)
                .await?
                .0
        } else {
            let actor = audit::actor(&session.principal);
            api::ignore_one(&state.pool, &actor, app.id, id).await?
        };
        let done = if replay { "replay" } else { "ignore" };
        Ok::<_, ApiError>(format!("/apps/{}/dead-letters/{id}?done={done}", app.slug))
    }
    .await;
    after_form(result)
}

pub(super) async fn replay(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    act(state, session, app, id, req, true).await
}

pub(super) async fn ignore(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    act(state, session, app, id, req, false).await
}

/// `POST /apps/{app}/dead-letters/bulk`: replay or ignore the ticked dead
/// letters, or (`scope=filter`) every unresolved one the list's filter
/// names, after a page that shows how many that is.
pub(super) async fn bulk(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        let (form, app) =
            checked_form(&state, &session, &app, Capability::DeadLetterManage, req).await?;
        let action = field(&form, "action").unwrap_or_default().to_owned();
        if !matches!(action.as_str(), "replay" | "ignore") {
            return Err(ApiError::Invalid("action: must be replay or ignore".into()));
        }
        // Attempts belong to a replay; an ignore leaves the field unread.
        let max_attempts = if action == "replay" {
            form_attempts(&form)?.map(i64::from)
        } else {
            None
        };
        // As the list's filter: an empty field names nothing, and nothing
        // is trimmed (a stored topic may end with a space).
        let given = |name: &str| {
            field(&form, name)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let by_filter = field(&form, "scope") == Some("filter");
        let trigger_id = given("trigger_id")
            .map(|id| {
                Uuid::parse_str(&id)
                    .map_err(|_| ApiError::Invalid(format!("trigger_id: {id:?} is not an id")))
            })
            .transpose()?;
        let filter = BulkFilter {
            source: given("source"),
            topic: given("topic"),
            trigger_id,
        };
        let unfiltered = filter.names_nothing();
        // The list page to come back to, with the filter acted on.
        let list = {
            let mut list = form_urlencoded::Serializer::new(String::new());
            list.append_pair("unresolved", "true");
            if let Some(topic) = &filter.topic {
                list.append_pair("topic", topic);
            }
            if let Some(source) = &filter.source {
                list.append_pair("source", source);
            }
            if let Some(id) = filter.trigger_id {
                list.append_pair("trigger_id", &id.to_string());
            }
            list.finish()
        };
        if by_filter && field(&form, "confirm") != Some("yes") {
            let count = api::count_unresolved_matching(&state.pool, app.id, &filter).await?;
            return Ok(Err(confirm_page(
                &session,
                &app.slug,
                &action,
                max_attempts,
                &filter,
                count,
                &list,
            )));
        }
        let body = if by_filter {
            BulkBody {
                action: action.clone(),
                ids: None,
                all: unfiltered,
                filter: (!unfiltered).then_some(filter),
                max_attempts,
            }
        } else {
            let ids = form
                .iter()
                .filter(|(k, _)| k == "ids")
                .map(|(_, v)| {
                    Uuid::parse_str(v).map_err(|_| ApiError::Invalid(format!("{v:?} is not an id")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            BulkBody {
                action: action.clone(),
                ids: Some(ids),
                filter: None,
                all: false,
                max_attempts,
            }
        };
        let done = api::run_bulk(
            &state.pool,
            &audit::actor(&session.principal),
            app.id,
            &body,
        )
        .await?;
        let what = if action == "replay" {
            "bulk-replay"
        } else {
            "bulk-ignore"
        };
        Ok::<_, ApiError>(Ok(format!(
            "/apps/{}/dead-letters?{list}&done={what}&rows={rows}&more={more}",
            app.slug,
            rows = done.changed,
            more = done.more,
        )))
    }
    .await;
    match result {
        Ok(Err(confirm)) => confirm,
        Ok(Ok(to)) => after_form(Ok(to)),
        Err(err) => after_form(Err(err)),
    }
}

/// The page between "Replay all…" or "Ignore all…" and the action: how
/// many unresolved dead letters the filter names, and the button that acts.
fn confirm_page(
    session: &Session,
    slug: &str,
    action: &str,
    max_attempts: Option<i64>,
    filter: &BulkFilter,
    count: i64,
    list: &str,
) -> Response {
    let slug = esc(slug);
    let scope = scope_words(filter);
    let back = format!(
        r#"<a href="/apps/{slug}/dead-letters?{}">Back without changing anything</a>"#,
        esc(list)
    );
    let counted = match count {
        0 => {
            let body = format!(
                r#"{logout}<h1>{slug} · confirm</h1><p id=confirm-count><strong>No unresolved dead letter</strong> {scope}: nothing to do.</p><p>{back}</p>"#,
                logout = logout_form(session),
            );
            return page("Confirm", &body).into_response();
        }
        1 => "1 unresolved dead letter".to_owned(),
        n => format!("{n} unresolved dead letters"),
    };
    let capped = if count > i64::from(api::MAX_BULK) {
        format!(
            " One action takes the newest {}; run it again for the rest.",
            api::MAX_BULK
        )
    } else {
        String::new()
    };
    let what = match (action, max_attempts) {
        ("replay", Some(n)) => {
            format!("Replay: each becomes a new row in the outbox, with {n} attempts.")
        }
        ("replay", None) => {
            "Replay: each becomes a new row in the outbox, with its own attempt budget.".to_owned()
        }
        _ => "Ignore: each is marked resolved and runs no more.".to_owned(),
    };
    let hidden = |name: &str, value: &str| {
        format!(r#"<input type=hidden name={name} value="{}">"#, esc(value))
    };
    let body = format!(
        r#"{logout}<h1>{slug} · confirm</h1><p id=confirm-count><strong>{counted}</strong> {scope}.{capped}</p><p>{what}</p><p class=muted id=confirm-when>Counted now: Confirm takes the dead letters that match when it runs, with any that arrived since.</p>
<form method=post action="/apps/{slug}/dead-letters/bulk">{csrf}{scope_field}{action_field}{fields}{attempts}<input type=hidden name=confirm value=yes>
<button type=submit id=confirm>{button}</button> {back}</form>"#,
        logout = logout_form(session),
        csrf = hidden("csrf", &session.csrf),
        scope_field = hidden("scope", "filter"),
        action_field = hidden("action", action),
        fields = filter_fields(filter),
        attempts = hidden(
            "max_attempts",
            &max_attempts.map(|n| n.to_string()).unwrap_or_default()
        ),
        button = if action == "replay" {
            "Replay these dead letters"
        } else {
            "Ignore these dead letters"
        },
    );
    page("Confirm", &body).into_response()
}

/// A replay's Attempts field: blank is the dead letter's own budget.
fn form_attempts(form: &[(String, String)]) -> Result<Option<i32>, ApiError> {
    let given = match field(form, "max_attempts").map(str::trim) {
        None | Some("") => None,
        Some(n) => Some(n.parse::<i64>().map_err(|_| {
            ApiError::Invalid(format!("max_attempts: {n:?} is not a whole number"))
        })?),
    };
    api::replay_attempts(given)
}

/// What a filter names, in words, escaped: "of topic t from source s".
fn scope_words(filter: &BulkFilter) -> String {
    if filter.names_nothing() {
        return "of the app (no filter: every one)".to_owned();
    }
    let mut words = Vec::new();
    if let Some(topic) = filter.topic.as_deref().filter(|t| !t.is_empty()) {
        words.push(format!("of topic {}", esc(topic)));
    }
    if let Some(source) = filter.source.as_deref().filter(|s| !s.is_empty()) {
        words.push(format!("from source {}", esc(source)));
    }
    if let Some(id) = filter.trigger_id {
        words.push(format!("of trigger {id}"));
    }
    words.join(" ")
}

/// A filter as the hidden fields of a form, escaped.
fn filter_fields(filter: &BulkFilter) -> String {
    let hidden = |name: &str, value: &str| {
        format!(r#"<input type=hidden name={name} value="{}">"#, esc(value))
    };
    [
        hidden("topic", filter.topic.as_deref().unwrap_or("")),
        hidden("source", filter.source.as_deref().unwrap_or("")),
        hidden(
            "trigger_id",
            &filter
                .trigger_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        ),
    ]
    .concat()
}
