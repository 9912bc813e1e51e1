//! The one place errors become HTTP responses, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrite_engine::{RequestError, SubmitError};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// A 429's `Retry-After`, seconds (1 when not given).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after_secs: None,
        }
    }

    /// `served`: the names this server answers for.
    pub fn model_not_found<S: AsRef<str>>(model: &str, served: &[S]) -> Self {
        let served: Vec<String> = served.iter().map(|s| format!("`{}`", s.as_ref())).collect();
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server serves {}", served.join(", ")),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after_secs: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let (status, kind) = match &e {
            SubmitError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            SubmitError::QueueFull(_) | SubmitError::Infeasible { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            SubmitError::ShuttingDown | SubmitError::EngineDead(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error")
            }
        };
        let param = match &e {
            SubmitError::Invalid(why) => Some(why.param().to_string()),
            SubmitError::Infeasible { param, .. } => Some(param.to_string()),
            _ => None,
        };
        let (code, retry_after_secs) = match &e {
            // OpenAI's code for a 429.
            SubmitError::QueueFull(_) => (Some("rate_limit_exceeded"), None),
            SubmitError::Infeasible { retry_after_secs, .. } => {
                (Some("deadline_infeasible"), Some(*retry_after_secs))
            }
            _ => (None, None),
        };
        Self { status, message: e.to_string(), kind, param, code, retry_after_secs }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError::invalid(Some(e.param()), e.to_string())
    }
}

impl ApiError {
    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        Self { status, message: message.into(), kind, param: None, code: None, retry_after_secs: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue drains as requests finish; a second is a sensible first backoff, and a
            // refused deadline says how long the work ahead of it needs.
            let secs = self.retry_after_secs.unwrap_or(1).max(1);
            response.headers_mut().insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        response
    }
}
