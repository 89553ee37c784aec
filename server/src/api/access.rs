//! Who may talk to kiln, before any route runs: API keys (compared in constant time; two
//! `Authorization` headers are refused, not "first wins"), the `Host` and `Origin` allowlists that
//! stop DNS rebinding and cross-site requests from a browser, and CORS (off unless
//! `--allowed-origins` lists the origin).
//!
//! The rule: with no API key set, a request is accepted only with a loopback `Host`
//! (`localhost`, `127.0.0.1`, `[::1]`, any port) and, when a browser sends `Origin`, a loopback
//! origin, plus whatever `--allowed-hosts` / `--allowed-origins` add (`*` = any). With keys set,
//! the key is the protection and only configured allowlists are enforced. A missing `Host` is
//! accepted (browsers always send one). `/health` is exempt from all of this (probes).
//!
//! Owns: those checks and CORS headers. Must not: read bodies or know routes beyond `/health`.

use super::error::ApiError;
use super::Shared;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// The allowlists (`kiln serve --allowed-hosts / --allowed-origins`).
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Host names (no port) accepted besides loopback ones; `*` accepts any.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) accepted and given CORS headers; `*` = any origin.
    pub allowed_origins: Vec<String>,
}

/// The middleware in front of every route: access checks, then the key, then CORS headers.
pub async fn gate(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let open = state.api_keys.is_empty();
    if let Err(e) =
        check_host(&state.access, req.headers(), open).and_then(|_| check_origin(&state.access, req.headers(), open))
    {
        return e.into_response();
    }
    let cors_origin = cors_origin(&state.access, req.headers());
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return preflight(cors_origin);
    }
    if let Err(e) = check_key(&state.api_keys, req.headers()) {
        return e.into_response();
    }
    let mut resp = next.run(req).await;
    if let Some(origin) = cors_origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

fn forbidden(code: &'static str, message: String) -> ApiError {
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

/// Exactly one `Authorization: Bearer <key>` naming a configured key.
fn check_key(keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(match headers.contains_key(header::AUTHORIZATION) {
            true => ApiError::unauthorized("Send exactly one Authorization header"),
            false => ApiError::unauthorized("Missing API key: send 'Authorization: Bearer <key>'"),
        });
    };
    let given = value
        .to_str()
        .ok()
        // The auth scheme is case-insensitive (RFC 9110).
        .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, k)| k))
        .map(str::trim);
    let Some(given) = given else {
        return Err(ApiError::unauthorized("Missing API key: send 'Authorization: Bearer <key>'"));
    };
    // Every key is compared, each in constant time, so the time taken does not say which key or
    // how much of one matched (only, as always, the length of the given key).
    let matched = keys.iter().fold(0u8, |acc, k| acc | k.as_bytes().ct_eq(given.as_bytes()).unwrap_u8());
    if matched == 1 {
        Ok(())
    } else {
        Err(ApiError::unauthorized("Incorrect API key provided"))
    }
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

    #[test]
    fn one_bearer_key_exactly() {
        let keys = vec!["k1".to_string(), "k22".to_string()];
        let h = |vals: &[&str]| {
            let mut m = HeaderMap::new();
            for v in vals {
                m.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert!(check_key(&keys, &h(&["Bearer k1"])).is_ok());
        assert!(check_key(&keys, &h(&["bearer k22"])).is_ok());
        for bad in [&[][..], &["Bearer k2"], &["Bearer k1", "Bearer k1"], &["Bearer k1", "Bearer x"], &["k1"]] {
            assert_eq!(check_key(&keys, &h(bad)).unwrap_err().status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }
}
