//! Operator actions recorded in the audit log (`store::audit`): each action
//! and its entry share one transaction, so an action without its entry
//! cannot commit.

use outbox_core::store::audit::{self, Entry};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::ApiError;

/// How the audit log names who acted: the account's e-mail, marked when the
/// request came with an API key rather than a signed-in session.
pub fn actor(p: &Principal) -> String {
    if p.session_id.is_some() {
        p.user.email.clone()
    } else {
        format!("{} (API key)", p.user.email)
    }
}

/// Begins the transaction an action and its entry share.
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, ApiError> {
    pool.begin()
        .await
        .map_err(|e| ApiError::from(outbox_core::Error::from(e)))
}

/// Commits an action with its entry.
pub async fn commit(tx: Transaction<'static, Postgres>) -> Result<(), ApiError> {
    tx.commit()
        .await
        .map_err(|e| ApiError::from(outbox_core::Error::from(e)))
}

/// What an action did, for [`record`].
pub struct Action<'a> {
    /// `noun.verb`, e.g. `topic.pause`.
    pub action: &'a str,
    /// A topic, or a dead letter's or trigger's id.
    pub target: Option<&'a str>,
    /// Rows changed.
    pub rows: usize,
    /// A reason, a filter, a limit.
    pub detail: Value,
}

impl<'a> Action<'a> {
    /// An action on `target` that changes no rows and has no details (a
    /// resume, a removed limit, a trigger switched on or off).
    pub fn on(action: &'a str, target: &'a str) -> Self {
        Self {
            action,
            target: Some(target),
            rows: 0,
            detail: Value::Object(serde_json::Map::new()),
        }
    }
}

/// Records `action` on `app_id` by `actor` in the action's transaction.
pub async fn record(
    tx: &mut PgConnection,
    actor: &str,
    app_id: Uuid,
    action: Action<'_>,
) -> Result<(), ApiError> {
    audit::record(
        tx,
        &Entry {
            actor,
            app_id,
            action: action.action,
            target: action.target,
            rows: i64::try_from(action.rows).unwrap_or(i64::MAX),
            detail: action.detail,
        },
    )
    .await?;
    Ok(())
}
