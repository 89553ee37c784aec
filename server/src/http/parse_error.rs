//! OpenAI-shaped bodies for the errors hyper answers itself. A request hyper cannot parse (a bad
//! request line, control bytes in a header, more than 100 headers, a URI over 64 KiB, conflicting
//! `Content-Length` headers) never reaches the app: hyper writes a bare `400` / `414` / `431` head
//! with `content-length: 0` and closes, and offers no hook to add a body. This socket wrapper
//! recognises exactly that head on its way out and writes it again with a JSON error body.
//!
//! Why recognition is safe: hyper's automatic response is the only response kiln sends with a 4xx
//! status and an empty body (every app error carries a JSON body), and a response head can only
//! start a write when no body is being written, so body bytes are never mistaken for it.
//! Owns: that rewrite. Must not: touch any other bytes, or buffer reads.

use crate::api::error::ApiError;
use axum::http::StatusCode;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's socket with hyper's bodiless error responses given JSON bodies.
pub struct ErrorBodies<T> {
    inner: T,
    /// Rewritten response bytes not yet written, and how many were.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ErrorBodies<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, pending: None }
    }
}

/// The error hyper meant by an automatic response with this status.
fn error_for(status: u16) -> Option<ApiError> {
    let (status, code, message) = match status {
        400 => (
            StatusCode::BAD_REQUEST,
            "malformed_request",
            "The request is not valid HTTP/1.1: a malformed request line, a header with a bad name or \
             control characters in its value, or conflicting Content-Length headers.",
        ),
        414 => (StatusCode::URI_TOO_LONG, "uri_too_long", "The request URI is too long (at most 65534 bytes)."),
        431 => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_header_fields_too_large",
            "The request head is too large: at most 100 header fields, and the request line and headers \
             together must fit in 400 KiB.",
        ),
        _ => return None,
    };
    Some(ApiError::new(status, "invalid_request_error", message).with_code(code))
}

/// When `buf` starts with a complete automatic error head from hyper: its length and the full
/// response (head + JSON body) to send instead.
fn rewrite(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    if !buf.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_len]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.get(9..12)?.parse().ok()?;
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    if !headers.iter().any(|h| h.eq_ignore_ascii_case("content-length: 0")) {
        return None;
    }
    let body = error_for(status)?.body().to_string();
    let mut out = format!("{status_line}\r\n");
    for h in headers.iter().filter(|h| h.to_ascii_lowercase().starts_with("date:")) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ));
    Some((head_len, out.into_bytes()))
}

impl<T: AsyncWrite + Unpin> ErrorBodies<T> {
    /// Writes what is left of a rewritten response; `Ready(Ok)` once nothing is pending.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done == bytes.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ErrorBodies<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some((consumed, response)) = rewrite(buf) {
            self.pending = Some((response, 0));
            // Hyper's head counts as written; the replacement goes out on this and later polls.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(consumed));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(first) if rewrite(first).is_some() => self.poll_write(cx, first),
            _ => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_style_bodiless_4xx_heads_are_rewritten() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sun, 07 Dec 2025 05:00:00 GMT\r\n\r\n";
        let (n, out) = rewrite(head).expect("rewritten");
        assert_eq!(n, head.len());
        let out = String::from_utf8(out).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(h.starts_with("HTTP/1.1 431 ") && h.contains("\r\ndate: Sun") && h.contains("application/json"), "{h}");
        assert!(h.contains(&format!("content-length: {}", body.len())), "{h}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "request_header_fields_too_large");
        for keep in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 57\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"{\"error\": 1}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        ] {
            assert!(rewrite(keep).is_none(), "{}", String::from_utf8_lossy(keep));
        }
    }
}
