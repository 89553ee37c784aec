//! The one place that turns failures into HTTP: every error leaves as OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` with the status a client can act on.
//! Client mistakes are 4xx, never 5xx; 5xx means a bug or a dead engine.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_inference::EngineError;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI error type: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400 for a bad field value.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model '{model}' does not exist"))
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { code: Some("invalid_api_key"), ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message) }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_server_error", message)
    }

    /// An error with only a status (and a message) to go on: OpenAI's type for that status.
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            500..=599 => "internal_server_error",
            _ => "invalid_request_error",
        };
        Self::new(status, kind, message)
    }

    /// The JSON body, also sent as an SSE event when a stream fails after it started.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// Maps an engine error; `prompt_param` names the request field holding the prompt
    /// (`messages` for chat, `prompt` for completions).
    pub fn from_engine(e: EngineError, prompt_param: &str) -> Self {
        match e {
            EngineError::InvalidParam { param, message } => {
                let param = if param == "prompt" { prompt_param } else { param };
                Self::invalid(param, message)
            }
            EngineError::InvalidField { param, message } => Self::invalid(&param, message),
            EngineError::ContextLengthExceeded { .. } => {
                Self::invalid(prompt_param, e.to_string()).with_code("context_length_exceeded")
            }
            // Retrying cannot help: a 400 naming what to change, never a 429.
            EngineError::NeverFits { param, message } => {
                let param = if param == "prompt" { prompt_param } else { param };
                Self::invalid(param, message).with_code("request_too_large")
            }
            EngineError::Overloaded => Self {
                code: Some("rate_limit_exceeded"),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", e.to_string())
            },
            EngineError::Shutdown => Self::unavailable(e.to_string()),
            EngineError::Template(m) => Self::invalid(prompt_param, format!("cannot render the chat template: {m}")),
            EngineError::Tokenizer(m) => Self::invalid(prompt_param, format!("cannot tokenize the input: {m}")),
            // Callers that know the grammar's field map these first (`grammar_error`).
            EngineError::Grammar(m) => Self::invalid(prompt_param, format!("unsupported or invalid grammar: {m}")),
            EngineError::GrammarLimit(m) => Self::invalid(prompt_param, m).with_code("grammar_too_large"),
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // 503 is expected while loading or shutting down; other 5xx are bugs worth an alert.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::debug!(message = %self.message, "unavailable");
        } else if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        }
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The most of a non-JSON error body kept as the message.
const MAX_PLAIN_ERROR: usize = 4096;

/// Gives every error response OpenAI's body: an error some layer or extractor answered in plain
/// text (axum's rejections of a path segment that is not UTF-8, a WebSocket route asked without
/// an upgrade, ...) is rewritten with its text as the message. Headers (`Allow`,
/// `Retry-After`, `WWW-Authenticate`) are kept; JSON bodies pass untouched.
pub async fn openai_error_bodies(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_PLAIN_ERROR).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let body = ApiError::from_status(status, text).body().to_string();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
