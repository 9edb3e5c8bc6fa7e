//! Errors as the APIs spell them: OpenAI's `{"error":{"message","type","param","code"}}` on
//! `/v1` and everywhere else, Ollama's `{"error":"message"}` on `/api` (its client reads the
//! string), and a JSON body extractor whose failures use them instead of axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_runtime::engine::SubmitError;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::Shared;

/// An error answer: an HTTP status and the fields of OpenAI's error object. It renders as
/// OpenAI's `{"error":{"message","type","param","code"}}` ([`IntoResponse`]), or as Ollama's
/// `{"error":"message"}` through [`ollama`](Self::ollama) or [`for_path`](Self::for_path).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people (the only field Ollama's shape keeps).
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The request field at fault (OpenAI's `param`), e.g. `"max_tokens"`.
    pub param: Option<&'static str>,
    /// A machine-readable code (OpenAI's `code`), e.g. `"context_length_exceeded"`.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, OpenAI's `type` (`invalid_request_error`, `server_error`, ...)
    /// and a message; no `param`, `code` or `Retry-After`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A 400 about one request field.
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        Self::bad_request(message).param(param)
    }

    /// A 404 `invalid_request_error` with code `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    /// A 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The 401 for a missing or wrong API key (code `invalid_api_key`).
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid or missing API key: send `Authorization: Bearer KEY`",
        )
        .code("invalid_api_key")
    }

    /// The 404 for a request naming a model this server does not serve (param `model`, code
    /// `model_not_found`).
    pub fn model_not_found(requested: &str, served: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{requested}` does not exist; this server serves `{served}`"),
        )
        .param("model")
        .code("model_not_found")
    }

    /// Sets the request field at fault.
    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Sets the machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The OpenAI body, also used inside a stream that fails after it started.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    fn respond(&self, body: serde_json::Value) -> Response {
        let mut resp = (self.status, axum::Json(body)).into_response();
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        ) {
            // The rest of the body was never read, so the connection cannot carry another
            // request: say so, or clients reuse it and fail.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }

    /// The response in the shape of the API that `path` belongs to (Ollama's under `/api/`).
    pub fn for_path(self, path: &str) -> Response {
        if path.starts_with("/api/") {
            self.ollama().into_response()
        } else {
            self.into_response()
        }
    }

    /// Ollama's flavour of this error.
    pub fn ollama(self) -> OllamaError {
        OllamaError(self)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(self.body())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::PromptTooLong { .. } => Self::bad_request(message)
                .param("messages")
                .code("context_length_exceeded"),
            SubmitError::EmptyPrompt => Self::bad_request(message).param("prompt"),
            SubmitError::TokenOutOfRange { .. } => Self::bad_request(message).param("prompt"),
            // 503 as Ollama's full queue, with a hint when to come back; the openai client
            // retries 503s by itself and honours Retry-After.
            SubmitError::QueueFull { .. } => {
                let mut err = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("queue_full");
                err.retry_after = Some(1);
                err
            }
            SubmitError::Stopped => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            }
            // A request's `ember` override the server cannot honour.
            SubmitError::Spec(e) => crate::spec::submit_error(&e),
        }
    }
}

/// An [`ApiError`] rendered the way Ollama does.
#[derive(Debug)]
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        self.0.respond(json!({ "error": self.0.message }))
    }
}

/// A JSON request body. Unlike axum's `Json` it does not insist on a content type (curl's
/// `-d` sends a form type) and reports every failure as an [`ApiError`]: 413 over the body
/// limit, 400 for malformed JSON or a field of the wrong type.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, Self::Rejection> {
        let limit = state.config.body_limit_bytes;
        let timeout = state.config.body_timeout;
        // A client that sends headers and then trickles (or never sends) its body would hold
        // a connection and a task for as long as it likes.
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!("the request body did not arrive within {timeout:?}"),
                )
                .code("request_timeout")
            })?;
        let bytes = read.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("the request body is larger than the server's limit of {limit} bytes"),
                )
                .code("request_too_large")
            } else {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Turns every error response that is not JSON yet (axum's rejections, 405s, a malformed
/// path) into the API's JSON error with the same status and headers.
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let ollama = req.uri().path().starts_with("/api/");
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // These bodies are axum's short messages; anything longer is cut, not buffered whole.
    let bytes = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text.to_string()
    };
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let mut out = ApiError::new(status, kind, message).for_path(if ollama { "/api/" } else { "/" });
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}
