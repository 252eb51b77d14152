//! The audit page: an app's recorded operator actions, newest first.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use outbox_core::store::audit;

use crate::AdminState;
use crate::api::AuditQuery;
use crate::error::ApiError;

use super::render::{error_page, esc, logout_form, page, when};
use super::session::{Session, viewed_app};

/// `GET /apps/{app}/audit[?before=ID]`: who did what, when, to how many rows.
pub(super) async fn audit_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<AuditQuery>, ApiError>,
) -> Response {
    let result = async {
        let crate::strict::Query(q) = q?;
        let app = viewed_app(&state, &session, &app).await?;
        let limit = q.limit()?;
        let entries = audit::list(&state.pool, app.id, q.before, limit).await?;
        Ok::<_, ApiError>((app, entries, limit))
    }
    .await;
    let (app, entries, limit) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/topics">← {slug} · topics</a></p><h1>{slug} · audit log</h1>"#
    ));
    if entries.is_empty() {
        body.push_str(r#"<p class=muted data-audit=none>No action recorded yet. Replays, ignores, bulk actions, pauses, limits, cancels and trigger changes made here or through the API appear here, with who made them.</p>"#);
    } else {
        body.push_str(
            "<div class=scroll><table id=audit><tr><th>When</th><th>Who</th><th>Action</th><th>On</th><th>Rows</th><th>Details</th></tr>",
        );
        for e in &entries {
            body.push_str(&format!(
                r#"<tr data-audit="{id}"><td>{at}</td><td>{actor}</td><td>{action}</td><td>{target}</td><td>{rows}</td><td class=long><code>{detail}</code></td></tr>"#,
                id = e.id,
                at = when(e.at),
                actor = esc(&e.actor),
                action = esc(&e.action),
                target = esc(e.target.as_deref().unwrap_or("")),
                rows = e.rows,
                detail = esc(&e.detail.to_string()),
            ));
        }
        body.push_str("</table></div>");
        if entries.len() == limit as usize
            && let Some(last) = entries.last()
        {
            body.push_str(&format!(
                r#"<p><a href="/apps/{slug}/audit?before={}&limit={limit}">Older →</a></p>"#,
                last.id
            ));
        }
    }
    page(&format!("{} audit log", app.slug), &body).into_response()
}
