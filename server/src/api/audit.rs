//! The audit log (`--audit-log PATH`, `-` for stdout): one JSON line per refused request, for
//! auth failures (401, `event: auth_failure` with a `reason`), missing scopes (403,
//! `permission_denied` with `missing_scope`), Host / Origin refusals (403, `access_refused`) and
//! rate-limit hits (429, `rate_limited` with the `tier`), and one per successful admin action
//! (`admin_action`: agent create/update/delete, memory delete/delete-all, run
//! cancel/approve/reject, with the `action` and its `target` id, as the handler reports it in an
//! [`AdminAction`] response extension). Every line has the time (RFC 3339, UTC), event, route
//! (its template), method, client (a short SHA-256 fingerprint of the bearer credential, or
//! `anonymous`), subject (the authenticated caller, when there is one), remote address when
//! known, request id and status.
//!
//! Lines go through a bounded channel to one writer thread, so a slow disk never blocks the
//! async workers; when the channel is full the line is dropped and counted
//! (`kiln:audit_log_dropped_total`).
//!
//! Owns: the events, their JSON and the writer. Must not: record prompts, outputs, bodies, keys
//! or tokens (only their fingerprints), or decide who is refused (`access.rs`, `ratelimit.rs`
//! do) or what counts as an admin action (the handlers do).

use super::auth::{Principal, Via};
use super::ratelimit::Tier;
use super::Shared;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::SystemTime;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 4096;

/// Marks a response refused by a rate limit (the engine's own 429 "overloaded" is not audited).
#[derive(Debug, Clone, Copy)]
pub enum Denied {
    RateLimited(Tier),
}

/// Why the gate refused a request (401 / 403), for the log line.
#[derive(Debug, Clone, Copy)]
pub struct Denial {
    /// A short reason: `missing_credential`, `invalid_api_key`, `token_expired`, ...
    pub reason: &'static str,
    /// For a 403: the scope the credential lacks.
    pub missing_scope: Option<&'static str>,
}

/// A state-changing admin action a handler performed: logged when its response is a success.
#[derive(Debug, Clone)]
pub struct AdminAction {
    /// `agent.create`, `agent.update`, `agent.delete`, `memory.delete`, `memory.delete_scope`,
    /// `file.delete`, `vector_store.delete`, `vector_store.file.delete`, `run.cancel`,
    /// `run.approve`, `run.reject`.
    pub action: &'static str,
    /// What it acted on: an agent name, a run id, a memory scope or `scope/id`.
    pub target: String,
}

/// The response extension a handler returns beside its body to have the action logged.
pub fn action(action: &'static str, target: impl Into<String>) -> axum::Extension<AdminAction> {
    axum::Extension(AdminAction { action, target: target.into() })
}

/// The request id `request_id_and_count` chose, for the log line.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The sending end of the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<String>,
}

impl AuditLog {
    /// Opens `path` for appending (`-`: stdout) and starts the writer thread.
    pub fn open(path: &str) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new().name("kiln-audit".into()).spawn(move || write_lines(rx, out))?;
        Ok(Self { tx })
    }

    /// Queues one line; false if the queue was full (the line is dropped).
    fn send(&self, line: String) -> bool {
        !matches!(self.tx.try_send(line), Err(TrySendError::Full(_)))
    }
}

/// Writes each line, flushing whenever the queue is empty; ends when every sender is gone.
fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        let mut ok = writeln!(out, "{line}").is_ok();
        while let Ok(more) = rx.try_recv() {
            ok &= writeln!(out, "{more}").is_ok();
        }
        if !(ok && out.flush().is_ok()) {
            tracing::warn!("the audit log could not be written");
        }
    }
}

/// A short, stable fingerprint of a key: the first 12 hex digits of its SHA-256.
pub fn fingerprint(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The bearer key of the request's (first) `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// `2026-12-07T06:47:19.123Z` for `t`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (days, secs) = ((d.as_secs() / 86_400) as i64, d.as_secs() % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z", d.subsec_millis())
}

/// The middleware (inside the request-id layer, outside the gate): logs refusals and admin
/// actions.
pub async fn record(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let Some(log) = state.audit.clone() else { return next.run(req).await };
    let client = bearer(req.headers()).map_or_else(|| "anonymous".to_string(), fingerprint);
    let remote = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string());
    let id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
    let method = req.method().to_string();
    let route = super::scopes::rule_for(req.method(), req.uri().path()).template;
    let resp = next.run(req).await;
    let x = resp.extensions();
    let (denial, action) = (x.get::<Denial>().copied(), x.get::<AdminAction>());
    let subject = x.get::<Principal>().filter(|p| p.via != Via::Open).map(|p| p.subject.clone());
    let mut line = serde_json::json!({
        "timestamp": rfc3339(SystemTime::now()),
        "event": "",
        "route": route,
        "method": method,
        "client": client,
        "subject": subject,
        "remote_addr": remote,
        "request_id": id,
        "status": resp.status().as_u16(),
    });
    let Some(extra) = event(resp.status(), x.get::<Denied>().copied(), denial, action) else { return resp };
    if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    if !log.send(line.to_string()) {
        state.metrics.audit_dropped.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

/// The event of a response and its own fields, or None when it is not audited.
fn event(
    status: StatusCode,
    denied: Option<Denied>,
    denial: Option<Denial>,
    action: Option<&AdminAction>,
) -> Option<serde_json::Value> {
    use serde_json::json;
    Some(match (status, denied, action) {
        (StatusCode::UNAUTHORIZED, _, _) => json!({"event": "auth_failure", "reason": denial.map(|d| d.reason)}),
        (StatusCode::FORBIDDEN, _, _) => match denial.and_then(|d| d.missing_scope) {
            Some(scope) => json!({"event": "permission_denied", "missing_scope": scope}),
            None => json!({"event": "access_refused"}),
        },
        (StatusCode::TOO_MANY_REQUESTS, Some(Denied::RateLimited(t)), _) => {
            json!({"event": "rate_limited", "tier": t.as_str()})
        }
        (s, _, Some(a)) if s.is_success() => {
            json!({"event": "admin_action", "action": a.action, "target": a.target})
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_and_fingerprints() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_629_639_123);
        assert_eq!(rfc3339(t), "2026-12-07T07:47:19.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        // sha256("abc") = ba7816bf8f01...
        assert_eq!(fingerprint("abc"), "ba7816bf8f01");
    }
}
