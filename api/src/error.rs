//! The API's one error type: stable codes for clients, the full chain in
//! the log (by the logging middleware), never a database message on the wire.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::EngineError;
use store::db::error_chain;

use crate::views::{ErrorBody, ErrorDetail};

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message (never a database message).
    pub message: String,
    /// The internal cause, logged, never sent.
    pub cause: Option<String>,
}

/// The internal cause of an error response, for the logging middleware.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub String);

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            cause: None,
        }
    }

    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 503: the database is unreachable.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        Self {
            cause: Some(cause.to_string()),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the store's database is unavailable; try again shortly",
            )
        }
    }

    /// 500, for our own bugs only.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self {
            cause: Some(cause.to_string()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if engine::is_unavailable(&error) {
            ApiError::unavailable(error_chain(&error))
        } else {
            ApiError::internal(error_chain(&error))
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match &error {
            EngineError::Unavailable(_) => ApiError::unavailable(error_chain(&error)),
            EngineError::UnknownWorkflow(_) => {
                ApiError::not_found("unknown_id", "no such checkout")
            }
            EngineError::KindConflict { .. } => ApiError::conflict(
                "key_conflict",
                "this key is already used by another kind of workflow",
            ),
            EngineError::InvalidId => ApiError::bad_request("invalid_key", "invalid key"),
            _ => ApiError::internal(error_chain(&error)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(ErrorCause(cause));
        }
        response
    }
}

/// Rewrites error responses that are not ours (axum's 404 for an unknown
/// path, 405, 413 from the body limit, 408 from the timeout) into the same
/// JSON shape.
pub async fn json_error_shape(mut response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::BAD_REQUEST => "bad_request",
        _ if status.is_client_error() => "client_error",
        _ => "internal",
    };
    let message = status.canonical_reason().unwrap_or("error").to_lowercase();
    let allow = response.headers().get(header::ALLOW).cloned();
    let cause = response.extensions_mut().remove::<ErrorCause>();
    let mut rewritten = ApiError::new(status, code, message).into_response();
    if let Some(allow) = allow {
        rewritten.headers_mut().insert(header::ALLOW, allow);
    }
    if let Some(cause) = cause {
        rewritten.extensions_mut().insert(cause);
    }
    rewritten
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rewritten
}
