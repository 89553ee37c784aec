//! The listener: accepts TCP connections and serves HTTP/1.1 on each with hyper, under the
//! limits `axum::serve` does not set. A header-read timeout closes a connection that has not
//! sent a complete request head in time, whether it is new or kept alive after a response (hyper
//! starts the clock whenever it waits for a head, so it is also the idle keep-alive limit); a
//! cap on open connections answers the excess with a JSON 503 and closes it; hyper's own
//! parse-error responses get JSON bodies (`parse_error.rs`). On drain every connection finishes
//! its request and closes, while new connections are still accepted (one request each), so
//! `/health` answers 503 instead of refusing connections.
//!
//! Owns: sockets and connection lifetimes. Must not: know routes, auth or request bodies (the
//! app's `api::guard` owns body limits and timeouts).

mod parse_error;

use crate::api::error::ApiError;
use axum::Router;
use clap::Args;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parse_error::ErrorBodies;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Connection-level limits of `kiln serve`.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Seconds a connection gets to send a complete request head; also how long a kept-alive
    /// connection may sit idle between requests.
    #[arg(long, default_value_t = 30, env = "KILN_HEADER_TIMEOUT")]
    pub header_timeout: u64,
    /// Seconds a request gets to send its whole body once its head arrived (then 408).
    #[arg(long, default_value_t = 60, env = "KILN_BODY_TIMEOUT")]
    pub body_timeout: u64,
    /// Most open connections; more are answered 503 and closed.
    #[arg(long, default_value_t = 512, env = "KILN_MAX_CONNECTIONS")]
    pub max_connections: usize,
}

impl HttpArgs {
    /// The limits to serve with. The connection cap is lowered to fit the process's open-file
    /// limit (less room for model files and the like): past that limit `accept` fails and the
    /// server becomes unreachable instead of answering 503.
    pub fn limits(&self) -> HttpLimits {
        let mut max_connections = self.max_connections.max(1);
        let soft = std::fs::read_to_string("/proc/self/limits").ok().and_then(|t| open_files_limit(&t));
        if let Some(fit) = soft.map(|n| n.saturating_sub(FD_RESERVE).max(1)) {
            if fit < max_connections {
                tracing::warn!(
                    max_connections,
                    open_files = soft,
                    "lowering --max-connections to {fit} to fit the open-file limit"
                );
                max_connections = fit;
            }
        }
        HttpLimits { header_timeout: Duration::from_secs(self.header_timeout.max(1)), max_connections }
    }
}

/// File descriptors kept out of the connection cap: model files, the listener, refused sockets.
const FD_RESERVE: usize = 64;

/// The soft "Max open files" of `/proc/self/limits` (None when unlimited or unreadable).
fn open_files_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// What [`serve`] enforces per connection.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpArgs { header_timeout: 30, body_timeout: 60, max_connections: 512 }.limits()
    }
}

/// Serves `app` on `listener` until the task is dropped (which closes every connection at
/// once). When `drain` turns true, connections close after their current request and new ones
/// serve one request each; the caller decides when to stop (`serve.rs` waits for requests in
/// flight, not for connections).
pub async fn serve(listener: TcpListener, app: Router, limits: HttpLimits, drain: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => conns.spawn(serve_connection(stream, app.clone(), limits.clone(), drain.clone(), slot)),
            Err(_) => conns.spawn(refuse(stream, limits.max_connections)),
        };
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: HttpLimits,
    mut drain: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let draining = *drain.borrow();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(!draining);
    // The peer address, for the app's audit log (`ConnectInfo`, as `axum::serve` provides it).
    let peer = stream.peer_addr().ok();
    let app = tower::ServiceExt::map_request(app, move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(p) = peer {
            req.extensions_mut().insert(axum::extract::ConnectInfo(p));
        }
        req
    });
    let conn = builder.serve_connection(TokioIo::new(ErrorBodies::new(stream)), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let result = if draining {
        conn.await
    } else {
        tokio::select! {
            r = conn.as_mut() => r,
            _ = async { drop(drain.wait_for(|d| *d).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Over the connection cap: a JSON 503 (without reading the request) and close.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = ApiError::unavailable(format!("too many open connections (at most {cap}); retry shortly"))
        .with_code("too_many_connections")
        .body()
        .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        let mut left = response.as_bytes();
        while !left.is_empty() {
            stream.writable().await?;
            match stream.try_write(left) {
                Ok(n) => left = &left[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        // Half-close, then read what the client sent: closing with unread input would reset the
        // connection and could discard the 503 before the client reads it.
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_shutdown(cx)).await?;
        let mut sink = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    let _: Result<std::io::Result<()>, _> = tokio::time::timeout(Duration::from_secs(1), write).await;
    tracing::debug!("over the connection cap: answered 503");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_soft_open_files_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63704                63704                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(text), Some(1024));
        assert_eq!(open_files_limit("Max open files            unlimited            unlimited            files"), None);
        let huge = HttpArgs { header_timeout: 30, body_timeout: 60, max_connections: usize::MAX }.limits();
        let own = std::fs::read_to_string("/proc/self/limits").ok().and_then(|t| open_files_limit(&t));
        if let Some(n) = own {
            assert_eq!(huge.max_connections, n.saturating_sub(FD_RESERVE).max(1), "capped by this process's limit");
        }
    }
}
