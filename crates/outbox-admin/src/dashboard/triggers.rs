//! The triggers page: list, create, enable, disable and delete an app's triggers.

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::AdminState;
use crate::audit;
use crate::auth::Capability;
use crate::error::ApiError;

use super::flash::Flash;
use super::render::{error_page, esc, logout_form, page, when};
use super::session::{Session, after_form, checked_form, field, may, viewed_app};

pub(super) async fn triggers_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    flash: Flash,
) -> Response {
    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        let rows = outbox_core::store::triggers::list(&state.pool, app.id).await?;
        let manager = may(&state, &session, &app.slug, Capability::ManageTriggers).await?;
        Ok::<_, ApiError>((app, rows, manager))
    }
    .await;
    let (app, rows, manager) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let csrf = esc(&session.csrf);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/dead-letters?unresolved=true">← {slug} dead letters</a></p><h1>{slug} · triggers</h1>{flash}
<div class=scroll><table><tr><th>Name</th><th>Kind</th><th>Listens to</th><th>Target</th><th>State</th><th></th></tr>"#,
        flash = flash.html()
    ));
    for t in &rows {
        // HTML: each stored value escaped, the time element as it is.
        let detail = match t.kind.as_str() {
            "kv" => format!(
                "{} ({})",
                esc(t.collection_glob.as_deref().unwrap_or("")),
                esc(&t.ops.clone().unwrap_or_default().join(", "))
            ),
            "cron" => format!(
                "{} {} · next {}",
                esc(t.schedule.as_deref().unwrap_or("")),
                esc(t.timezone.as_deref().unwrap_or("UTC")),
                t.next_fire_at.map(when).unwrap_or_default()
            ),
            _ => esc(&t.dead_letter_matches().unwrap_or_default()),
        };
        let toggle = if t.enabled { "disable" } else { "enable" };
        let ask = if t.enabled {
            "Disable this trigger? It fires nothing until it is enabled again."
        } else {
            "Enable this trigger? It fires from now on."
        };
        let id = t.id;
        let actions = if manager {
            format!(
                r#"<form class=inline method=post action="/apps/{slug}/triggers/{id}/{toggle}" data-confirm="{ask}"><input type=hidden name=csrf value="{csrf}"><button type=submit>{toggle}</button></form>
<form class=inline method=post action="/apps/{slug}/triggers/{id}/delete" data-confirm="Delete this trigger? It fires nothing from now on, and cannot be restored."><input type=hidden name=csrf value="{csrf}"><button type=submit>delete</button></form>"#
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            r#"<tr data-trigger="{name}"><td>{name}</td><td>{kind}</td><td>{detail}</td><td>{target}</td><td>{state}</td><td>{actions}</td></tr>"#,
            name = esc(&t.name),
            kind = esc(&t.kind),
            detail = detail,
            target = esc(&t.target),
            state = if t.enabled { "enabled" } else { "disabled" },
        ));
    }
    body.push_str("</table></div>");
    if !manager {
        return page(&format!("{} triggers", app.slug), &body).into_response();
    }
    body.push_str(&format!(
        r#"<h2>New trigger</h2><form method=post action="/apps/{slug}/triggers"><input type=hidden name=csrf value="{csrf}">
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

pub(super) async fn create_trigger(
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
        let id = triggers::create(
            &mut tx,
            app.id,
            &text("name"),
            &text("target"),
            Some(&principal),
            &spec,
        )
        .await?;
        let target = id.to_string();
        let action = audit::Action {
            action: "trigger.create",
            target: Some(&target),
            rows: 0,
            detail: serde_json::json!({ "name": text("name"), "target": text("target") }),
        };
        audit::record(&mut tx, &audit::actor(&session.principal), app.id, action).await?;
        tx.commit()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let named: String = form_urlencoded::byte_serialize(text("name").as_bytes()).collect();
        Ok::<_, ApiError>(format!(
            "/apps/{}/triggers?done=trigger-create&rows=1&named={named}",
            app.slug
        ))
    }
    .await;
    after_form(result)
}

pub(super) async fn change_trigger(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id, action)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let result = async {
        let (_, app) =
            checked_form(&state, &session, &app, Capability::ManageTriggers, req).await?;
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("trigger"))?;
        let enabled = match action.as_str() {
            "enable" => Some(true),
            "disable" => Some(false),
            "delete" => None,
            _ => return Err(ApiError::not_found("action")),
        };
        let name = outbox_core::store::triggers::name(&state.pool, app.id, id).await?;
        let actor = audit::actor(&session.principal);
        let changed =
            crate::events_api::change_trigger(&state.pool, &actor, app.id, id, enabled).await?;
        let named: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        Ok::<_, ApiError>(format!(
            "/apps/{}/triggers?done=trigger-{action}&rows={}&named={named}",
            app.slug,
            u8::from(changed)
        ))
    }
    .await;
    after_form(result)
}
