//! Request bodies before any handler sees them: a declared `Content-Length` over the limit is a
//! 413 at once (nothing is read), a body that is not JSON by its `Content-Type` is a 415, and the
//! body must arrive whole within `--body-timeout` (else 408), so a slow sender cannot hold a
//! handler. Also counts requests in flight from the moment their body is in until their response
//! body is done (streams included): the drain on shutdown waits for exactly those.
//!
//! The one exception to "JSON only" is `multipart/form-data` on the file upload route
//! (`POST /v1/files`, OpenAI's shape), which `files.rs` parses.
//!
//! Owns: body admission and the in-flight count. Must not: parse JSON (handlers do) or know
//! routes beyond the upload route's path.

use super::error::ApiError;
use super::{Shared, MAX_BODY_BYTES};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the request body is larger than the limit of {MAX_BODY_BYTES} bytes"),
    )
    .with_code("request_too_large")
}

/// `application/json`, `application/<x>+json`, any parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The path that takes `multipart/form-data` uploads.
pub const UPLOAD_PATH: &str = "/v1/files";

fn is_multipart(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "multipart/form-data"
}

/// 415 for a body-carrying method whose declared type is not JSON (a missing type is accepted:
/// browsers always send one, so only non-browser clients omit it), except a multipart upload to
/// [`UPLOAD_PATH`].
fn check_content_type(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        return Ok(());
    }
    let Some(ct) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    match ct.to_str() {
        Ok(t) if is_json(t) => Ok(()),
        Ok(t) if path == UPLOAD_PATH && is_multipart(t) => Ok(()),
        t => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "Content-Type '{}' is not supported: send the body as 'Content-Type: application/json'",
                t.unwrap_or("(not text)")
            ),
        )
        .with_code("unsupported_media_type")),
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The whole body within the deadline, at most `MAX_BODY_BYTES`.
async fn read_body(body: Body, state: &Shared) -> Result<Bytes, ApiError> {
    let timeout = state.body_timeout;
    match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::invalid("", format!("the request body could not be read: {e}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {} s", timeout.as_secs()),
        )
        .with_code("request_timeout")),
    }
}

pub async fn body_guard(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if declared_length(req.headers()).is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large().into_response();
    }
    if let Err(e) = check_content_type(req.method(), req.uri().path(), req.headers()) {
        return e.into_response();
    }
    let (parts, body) = req.into_parts();
    let body = if body.size_hint().exact() == Some(0) {
        body
    } else {
        match read_body(body, &state).await {
            Ok(bytes) => Body::from(bytes),
            Err(e) => return e.into_response(),
        }
    };
    let guard = InFlight::new(state);
    let resp = next.run(Request::from_parts(parts, body)).await;
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(Counted { inner: body, _guard: guard }))
}

/// One request in flight; dropped with its response body.
struct InFlight(Shared);

impl InFlight {
    fn new(state: Shared) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted until it is finished or dropped.
struct Counted {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "Application/JSON; charset=utf-8", "application/merge-patch+json"] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""] {
            assert!(!is_json(bad), "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "multipart/form-data; boundary=x".parse().unwrap());
        assert!(check_content_type(&Method::POST, UPLOAD_PATH, &h).is_ok());
        assert!(check_content_type(&Method::POST, "/v1/chat/completions", &h).is_err());
    }
}
