//! Webhook targets' secrets, for operators: create (the secret is shown
//! once), rotate (the previous one signs too for an overlap) and delete,
//! each recorded in the app's audit log. The CLI calls these; the store
//! keeps the secrets (`outbox_core::store::webhooks`).

use std::time::Duration;

use outbox_core::store::webhooks;
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::{self, Action};
use crate::error::ApiError;

/// Creates the target `url` of the app with a secret of its own, for
/// `actor`; returns the secret.
pub async fn create_target(
    pool: &PgPool,
    actor: &str,
    app_id: Uuid,
    url: &str,
) -> Result<String, ApiError> {
    let mut tx = audit::begin(pool).await?;
    let secret = webhooks::create(&mut *tx, app_id, url).await?;
    audit::record(&mut tx, actor, app_id, Action::on("webhook.create", url)).await?;
    audit::commit(tx).await?;
    Ok(secret)
}

/// Gives the target a new secret for `actor`; the previous one keeps
/// signing for `overlap`. Returns the new secret.
pub async fn rotate_secret(
    pool: &PgPool,
    actor: &str,
    app_id: Uuid,
    url: &str,
    overlap: Duration,
) -> Result<String, ApiError> {
    let mut tx = audit::begin(pool).await?;
    let secret = webhooks::rotate(&mut *tx, app_id, url, overlap).await?;
    let action = Action {
        action: "webhook.rotate",
        target: Some(url),
        rows: 0,
        detail: serde_json::json!({ "overlap_secs": overlap.as_secs() }),
    };
    audit::record(&mut tx, actor, app_id, action).await?;
    audit::commit(tx).await?;
    Ok(secret)
}

/// Deletes the target for `actor` (its requests then use the global
/// secret); false when it did not exist.
pub async fn delete_target(
    pool: &PgPool,
    actor: &str,
    app_id: Uuid,
    url: &str,
) -> Result<bool, ApiError> {
    let mut tx = audit::begin(pool).await?;
    if !webhooks::delete(&mut *tx, app_id, url).await? {
        return Ok(false);
    }
    audit::record(&mut tx, actor, app_id, Action::on("webhook.delete", url)).await?;
    audit::commit(tx).await?;
    Ok(true)
}
