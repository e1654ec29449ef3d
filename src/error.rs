//! The one error type of the HTTP API and its single table from error to status code.
//!
//! Every 4xx and 5xx body has the shape `{"error": {"code", "message", "field"?, "errors"?}}`.
//! A 5xx never carries the text of a PostgreSQL, Kafka or Redis error: the cause is logged
//! where the error is converted, and the client gets a fixed message.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::event::FieldError;

/// An error returned to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error("{} problem(s) in the events; nothing of this request was published", .0.len())]
    InvalidEvents(Vec<FieldError>),
    /// A missing or invalid Bearer token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A missing, unknown or revoked `API-KEY` header.
    #[error("{0}")]
    InvalidApiKey(&'static str),
    #[error("{field}: {message}")]
    Conflict {
        field: &'static str,
        message: String,
    },
    #[error("not found")]
    NotFound,
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body was not received within {0} ms")]
    RequestTimeout(u64),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("rate limit of {limit} requests per minute for this API key exceeded")]
    RateLimited { limit: u32, retry_after: Duration },
    #[error("too many failed logins for this username or address, retry later")]
    TooManyLogins { retry_after: Duration },
    #[error("{what} is unavailable, retry later")]
    Unavailable {
        what: &'static str,
        retry_after: Duration,
    },
    #[error("internal error")]
    Internal,
}

/// The JSON body of an error response.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
}

impl ApiError {
    /// Builds an `InvalidField` error.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Logs `cause` and returns the fixed 500 error; the cause never reaches the client.
    pub fn internal(context: &'static str, cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "{context}");
        Self::Internal
    }

    /// Returns the stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidField { .. } => "invalid_field",
            Self::InvalidEvents(_) => "invalid_events",
            Self::Unauthorized(_) | Self::InvalidApiKey(_) => "unauthorized",
            Self::Conflict { .. } => "conflict",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RequestTimeout(_) => "request_timeout",
            Self::RateLimited { .. } | Self::TooManyLogins { .. } => "rate_limited",
            Self::Unavailable { .. } => "unavailable",
            Self::Internal => "internal",
        }
    }

    fn field_name(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            Self::Conflict { field, .. } => Some(field),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::TooManyLogins { retry_after }
            | Self::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidField { .. } | Self::InvalidEvents(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized(_) | Self::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited { .. } | Self::TooManyLogins { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let errors = match self {
            Self::InvalidEvents(errors) => Some(errors.as_slice()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                field: self.field_name(),
                errors,
            },
        };
        let mut response = HttpResponse::build(self.status_code());
        if let Some(retry_after) = self.retry_after() {
            response.insert_header((header::RETRY_AFTER, retry_after_secs(retry_after)));
        }
        if let Self::MethodNotAllowed { allow } = self {
            response.insert_header((header::ALLOW, *allow));
        }
        if matches!(self, Self::Unauthorized(_)) {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        response.json(body)
    }
}

/// Whole seconds for a `Retry-After` header, rounded up and at least 1.
pub fn retry_after_secs(delay: Duration) -> u64 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::to_bytes;

    async fn body_of(error: ApiError) -> serde_json::Value {
        let response = error.error_response();
        let bytes = to_bytes(response.into_body()).await.expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[actix_web::test]
    async fn field_error_names_field() {
        let body = body_of(ApiError::field("email", "is not a valid email address")).await;
        assert_eq!(body["error"]["code"], "invalid_field");
        assert_eq!(body["error"]["field"], "email");
    }

    #[actix_web::test]
    async fn internal_hides_cause() {
        let error = ApiError::internal("test failure", "relation \"users\" does not exist");
        let body = body_of(error).await;
        assert_eq!(body["error"]["message"], "internal error");
    }

    #[test]
    fn unavailable_sets_retry_after() {
        let error = ApiError::Unavailable {
            what: "kafka",
            retry_after: Duration::from_millis(1500),
        };
        let response = error.error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let header = response
            .headers()
            .get(header::RETRY_AFTER)
            .expect("retry-after");
        assert_eq!(header, "2");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(3001)), 4);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
