//! Who may talk to kiln, before any route runs: the `Host` and `Origin` allowlists that stop DNS
//! rebinding and cross-site requests from a browser, CORS (off unless `--allowed-origins` lists
//! the origin), then the credential (`auth.rs`) and the route's scope (`scopes.rs`).
//!
//! The rule: with no credential configured, a request is accepted only with a loopback `Host`
//! (`localhost`, `127.0.0.1`, `[::1]`, any port) and, when a browser sends `Origin`, a loopback
//! origin, plus whatever `--allowed-hosts` / `--allowed-origins` add (`*` = any). With keys or
//! JWTs configured, the credential is the protection and only configured allowlists are
//! enforced. A missing `Host` is accepted (browsers always send one). `/health` (and `/metrics`
//! with `--metrics-public`) is exempt from all of this (probes and scrapers).
//!
//! No or a bad credential is 401; a valid one without the route's scope is 403
//! `permission_error` naming the scope. The caller's [`Principal`] goes to the handler as a
//! request extension, and to the audit log on the response.
//!
//! Owns: those checks, their order and CORS headers. Must not: read bodies, know which scope a
//! route needs (the table in `scopes.rs` does) or how credentials are checked (`auth.rs`).

use super::audit::Denial;
use super::auth::Principal;
use super::error::ApiError;
use super::scopes::{self, Need};
use super::Shared;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The allowlists (`kiln serve --allowed-hosts / --allowed-origins`).
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Host names (no port) accepted besides loopback ones; `*` accepts any.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) accepted and given CORS headers; `*` = any origin.
    pub allowed_origins: Vec<String>,
}

/// The middleware in front of every route: access checks, the credential, the route's scope,
/// then CORS headers.
pub async fn gate(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let rule = scopes::rule_for(req.method(), req.uri().path());
    let public_metrics = rule.template == "/metrics" && state.auth.metrics_public;
    if rule.need == Need::Public || public_metrics {
        return next.run(req).await;
    }
    let open = !state.auth.enabled();
    if let Err(e) =
        check_host(&state.access, req.headers(), open).and_then(|_| check_origin(&state.access, req.headers(), open))
    {
        return e.into_response();
    }
    let cors_origin = cors_origin(&state.access, req.headers());
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return preflight(cors_origin);
    }
    let principal = match state.auth.authenticate(req.headers(), super::generation::unix_now()) {
        Ok(p) => p,
        Err(e) => {
            let mut resp = e.to_api_error().into_response();
            let challenge = match e {
                super::auth::AuthError::Token(_) => "Bearer realm=\"kiln\", error=\"invalid_token\"",
                _ => "Bearer realm=\"kiln\"",
            };
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            resp.extensions_mut().insert(Denial { reason: e.reason(), missing_scope: None });
            return resp;
        }
    };
    if let Need::Scope(scope) = rule.need {
        if !principal.scopes.contains(scope) {
            return insufficient_scope(req.method(), rule.template, scope, principal);
        }
    }
    req.extensions_mut().insert(principal.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(principal);
    if let Some(origin) = cors_origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

/// 403 naming the scope the credential lacks.
fn insufficient_scope(method: &Method, route: &str, scope: scopes::Scope, principal: Principal) -> Response {
    let name = scope.as_str();
    let message = format!("This credential lacks the '{name}' scope, which {method} {route} requires");
    let mut resp = forbidden("insufficient_scope", message).into_response();
    if let Ok(v) =
        HeaderValue::from_str(&format!("Bearer realm=\"kiln\", error=\"insufficient_scope\", scope=\"{name}\""))
    {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp.extensions_mut().insert(Denial { reason: "insufficient_scope", missing_scope: Some(name) });
    resp.extensions_mut().insert(principal);
    resp
}

pub(super) fn forbidden(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "permission_error", message).with_code(code)
}

/// `localhost`, `*.localhost`, `127.x.y.z`, `::1` (brackets already removed).
fn is_loopback_host(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host == "::1"
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `::1`.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(authority, |p| p.0)
}

fn check_host(policy: &AccessPolicy, headers: &HeaderMap, open: bool) -> Result<(), ApiError> {
    if !open && policy.allowed_hosts.is_empty() {
        return Ok(());
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(value) = hosts.next() else { return Ok(()) };
    let name = value.to_str().ok().map(host_name).filter(|_| hosts.next().is_none());
    let ok = name.is_some_and(|n| {
        is_loopback_host(n) || policy.allowed_hosts.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(n))
    });
    if ok {
        return Ok(());
    }
    Err(forbidden(
        "host_not_allowed",
        format!(
            "Host '{}' is not allowed: without an API key kiln answers only loopback hosts; \
             start it with --allowed-hosts (or --api-key) to serve others",
            value.to_str().unwrap_or("(not text)")
        ),
    ))
}

fn origin_allowed(policy: &AccessPolicy, origin: &str) -> bool {
    policy.allowed_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin.trim_end_matches('/')))
}

fn check_origin(policy: &AccessPolicy, headers: &HeaderMap, open: bool) -> Result<(), ApiError> {
    if !open && policy.allowed_origins.is_empty() {
        return Ok(());
    }
    let Some(value) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = value.to_str().unwrap_or_default();
    let loopback = origin
        .split_once("://")
        .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
        .is_some_and(|(_, authority)| is_loopback_host(host_name(authority.trim_end_matches('/'))));
    if (open && loopback) || origin_allowed(policy, origin) {
        return Ok(());
    }
    Err(forbidden(
        "origin_not_allowed",
        format!("Origin '{origin}' is not allowed; list it in --allowed-origins to let browser pages on it call kiln"),
    ))
}

/// The `Access-Control-Allow-Origin` value for this request, if its origin is on the allowlist.
fn cors_origin(policy: &AccessPolicy, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    origin_allowed(policy, origin.to_str().ok()?).then(|| origin.clone())
}

fn preflight(origin: Option<HeaderValue>) -> Response {
    let Some(origin) = origin else {
        return forbidden("origin_not_allowed", "CORS is off for this origin (see --allowed-origins)".into())
            .into_response();
    };
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, x-request-id"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_loopback() {
        assert_eq!(host_name("example.com:8080"), "example.com");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        for h in ["localhost", "LOCALHOST", "a.localhost", "127.0.0.1", "127.1.2.3", "::1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["example.com", "localhost.example.com", "10.0.0.1", "0.0.0.0", "127.0.0.1.nip.io"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
