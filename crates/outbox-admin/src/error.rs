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
    /// Authenticated but not allowed, and told why (403, `forbidden`).
    #[error("{0}")]
    NotAllowed(String),
    /// The principal's role on the app does not grant the action (403,
    /// `forbidden`), with the role that would.
    #[error("your role on {app} is {role}; this needs {needed}")]
    RoleTooLow {
        /// The app's slug.
        app: String,
        /// The principal's role there.
        role: &'static str,
        /// The least role that grants the action, in words.
        needed: &'static str,
    },
    /// Nothing here for this principal (404, `not_found`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Nothing here, in a sentence of its own (404, `not_found`) that says
    /// why or where to look instead.
    #[error("{0}")]
    Absent(String),
    /// Nobody serves this topic (404, `no_handler`).
    #[error("no running outboxd process serves topic {0:?}")]
    NoHandler(String),
    /// The body is over the size limit (413, `too_large`).
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// The body is not declared as JSON where only JSON is taken (415,
    /// `unsupported_media_type`).
    #[error("send the body as JSON, with Content-Type: application/json")]
    NotJson,
    /// The row is in a state that refuses the action (409, `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed (400, `invalid`).
    #[error("{0}")]
    Invalid(String),
    /// Too many failed logins from here (429, `rate_limited`, with
    /// `Retry-After`).
    #[error("too many failed logins; try again in {} s", retry_after_secs(.0))]
    RateLimited(std::time::Duration),
    /// A synchronously invoked handler failed (502, `handler_failed`).
    #[error("handler failed: {0}")]
    HandlerFailed(String),
    /// No answer within the caller's timeout (504, `timeout`), and what
    /// became of the work.
    #[error("no answer within {after:?}; {fate}")]
    Timeout {
        /// The caller's timeout.
        after: std::time::Duration,
        /// Withdrawn, or left to run, with the row's id.
        fate: String,
    },
    /// The topic's target cannot take the row now and nothing ran (503,
    /// `unavailable`, with `Retry-After`).
    #[error("{0}")]
    Unavailable(String, std::time::Duration),
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
            Self::Forbidden | Self::NotAllowed(_) | Self::RoleTooLow { .. } => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            Self::NotFound(_) | Self::Absent(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::NoHandler(_) => (StatusCode::NOT_FOUND, "no_handler"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::NotJson => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::HandlerFailed(_) => (StatusCode::BAD_GATEWAY, "handler_failed"),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Self::Unavailable(..) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// The one name per resource that "not found" messages use.
fn resource(what: &str) -> &'static str {
    [
        "dead letter",
        "trigger",
        "user",
        "api key",
        "app",
        "entry",
        "session",
        "webhook target",
    ]
    .into_iter()
    .find(|r| what.starts_with(r))
    .unwrap_or("row")
}

/// Whole seconds to wait, at least 1 (what `Retry-After` carries).
pub(crate) fn retry_after_secs(wait: &std::time::Duration) -> u64 {
    u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
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
            outbox_core::Error::NotFound(what) => Self::NotFound(resource(&what)),
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
        let mut response = (
            status,
            Json(serde_json::json!({ "error": { "code": code, "message": self.to_string() } })),
        )
            .into_response();
        let headers = response.headers_mut();
        match &self {
            Self::RateLimited(wait) | Self::Unavailable(_, wait) => {
                headers.insert(header::RETRY_AFTER, retry_after_secs(wait).into());
            }
            Self::Unauthorized | Self::BadLogin => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"outboxd\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// Every API answer: the framework's refusals in the API's shape
/// ([`json_rejections`]), and never stored by a cache (a sign-in's token,
/// rows and payloads are answers for one caller).
pub(crate) async fn api_response(res: Response, body_limit: usize) -> Response {
    let mut res = json_rejections(res, body_limit).await;
    let headers = res.headers_mut();
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
    // A browser must not take an answer for anything but what it says it
    // is (a payload echoed in JSON rendered as HTML).
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    res
}

/// Gives the framework's own refusals (a path or query that does not parse,
/// a body over the size limit, a wrong method) the API's JSON error shape
/// with a stable code; the API's own errors pass unchanged.
async fn json_rejections(res: Response, body_limit: usize) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::TooLarge(body_limit).into_response();
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
        // The framework's words for a path it cannot read ("Invalid URL:
        // Invalid UTF-8 in `app`"), in the API's.
        Ok(bytes) if bytes.starts_with(b"Invalid URL: ") => format!(
            "the URL's path does not parse: {} (percent-encode UTF-8)",
            String::from_utf8_lossy(&bytes["Invalid URL: ".len()..])
                .replace('`', "")
                .to_lowercase()
        ),
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
        // As every API answer is (the fallback is outside the API's layer).
        let mut res = ApiError::NotFound("route").into_response();
        res.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        res
    } else {
        (StatusCode::NOT_FOUND, "not found").into_response()
    }
}
