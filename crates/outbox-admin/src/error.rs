//! The API error: a stable code per variant, mapped to an HTTP status, and
//! no database detail for clients.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered to an API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or bad credentials (401, `unauthorized`).
    #[error("authentication required")]
    Unauthorized,
    /// Wrong e-mail or password (401, `unauthorized`), the same for unknown users.
    #[error("wrong e-mail or password")]
    BadLogin,
    /// Authenticated but not allowed (403, `forbidden`).
    #[error("not allowed")]
    Forbidden,
    /// Nothing here for this principal (404, `not_found`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The row is in a state that refuses the action (409, `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed (400, `invalid`).
    #[error("{0}")]
    Invalid(String),
    /// Too many failed logins (429, `rate_limited`).
    #[error("too many failed logins; try again later")]
    RateLimited,
    /// A synchronously invoked handler failed (502, `handler_failed`).
    #[error("handler failed: {0}")]
    HandlerFailed(String),
    /// No answer within the caller's timeout (504, `timeout`).
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Anything else (500, `internal`); the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// 401.
    pub fn unauthorized() -> Self {
        Self::Unauthorized
    }
    /// 403.
    pub fn forbidden() -> Self {
        Self::Forbidden
    }
    /// 404 for `what`.
    pub fn not_found(what: &'static str) -> Self {
        Self::NotFound(what)
    }
    /// 500 with a detail for the log.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::Internal(detail.into())
    }

    /// Status and stable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized | Self::BadLogin => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Self::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::HandlerFailed(_) => (StatusCode::BAD_GATEWAY, "handler_failed"),
            Self::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<outbox_core::Error> for ApiError {
    fn from(err: outbox_core::Error) -> Self {
        match err {
            outbox_core::Error::UnknownApp(_) => Self::NotFound("app"),
            outbox_core::Error::NotFound(_) => Self::NotFound("row"),
            outbox_core::Error::Conflict(message) => Self::Conflict(message),
            outbox_core::Error::Invalid { field, reason } => {
                Self::Invalid(format!("{field}: {reason}"))
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "admin request failed");
        }
        (
            status,
            Json(serde_json::json!({ "error": { "code": code, "message": self.to_string() } })),
        )
            .into_response()
    }
}
