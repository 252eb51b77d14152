//! The API error: a stable code per variant, mapped to an HTTP status, and
//! no database detail for clients.

use axum::Json;
use axum::http::{StatusCode, Uri, header};
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

/// SQLSTATE 22P05: e.g. `\u0000` in a jsonb string.
const UNSTORABLE_TEXT: &str = "22P05";
/// SQLSTATE 22021: a byte sequence invalid in the database encoding (e.g. NUL in text).
const BAD_TEXT: &str = "22021";
/// SQLSTATE 54000: a value over a PostgreSQL limit (e.g. an index row too large).
const TOO_LARGE: &str = "54000";

impl From<outbox_core::Error> for ApiError {
    fn from(err: outbox_core::Error) -> Self {
        match err {
            outbox_core::Error::UnknownApp(_) => Self::NotFound("app"),
            outbox_core::Error::NotFound(_) => Self::NotFound("row"),
            outbox_core::Error::Conflict(message) => Self::Conflict(message),
            outbox_core::Error::Invalid { field, reason } => {
                Self::Invalid(format!("{field}: {reason}"))
            }
            // A value PostgreSQL cannot store is the client's input, not our failure.
            outbox_core::Error::Database(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some(UNSTORABLE_TEXT | BAD_TEXT | TOO_LARGE)) =>
            {
                Self::Invalid(
                    "a value cannot be stored: text must not contain \\u0000, and values must fit PostgreSQL's limits"
                        .into(),
                )
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

/// Gives the framework's own refusals (a path or query that does not parse,
/// a body over the size limit, a wrong method) the API's JSON error shape
/// with a stable code; the API's own errors pass unchanged.
pub(crate) async fn json_rejections(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNAUTHORIZED => "unauthorized",
        s if s.is_server_error() => "internal",
        _ => "invalid",
    };
    // 422 is what the framework says for a body of the wrong shape; the API says 400.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let message = match axum::body::to_bytes(res.into_body(), 4096).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned(),
    };
    (
        status,
        Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// No route: JSON under `/api`, plain text elsewhere.
pub(crate) async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        ApiError::NotFound("route").into_response()
    } else {
        (StatusCode::NOT_FOUND, "not found").into_response()
    }
}
