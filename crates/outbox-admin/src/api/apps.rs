//! The apps a principal can see, with their unresolved dead letters.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use crate::AdminState;
use crate::error::ApiError;

use super::Bearer;

#[derive(Serialize)]
pub(super) struct AppSummary {
    slug: String,
    name: String,
    unresolved_dead_letters: i64,
}

pub(super) async fn apps(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
) -> Result<Json<Vec<AppSummary>>, ApiError> {
    let rows =
        outbox_core::store::principals::visible_apps(&state.pool, p.user.id, p.user.is_admin)
            .await?;
    Ok(Json(
        rows.into_iter()
            .map(|(slug, name, unresolved_dead_letters)| AppSummary {
                slug,
                name,
                unresolved_dead_letters,
            })
            .collect(),
    ))
}
