//! Who the caller is: API keys (`--api-key`, all scopes; `--api-keys-file`, each key with its own
//! scopes and subject) and JWT bearer tokens (`jwt.rs`), turned into a [`Principal`] (subject +
//! scopes) that the gate checks against the route's scope (`scopes.rs`), the rate limiter counts
//! against and handlers can read as a request extension. With no key, secret or JWKS configured,
//! auth is off and every request is the anonymous principal with every scope.
//!
//! Keys are kept only as SHA-256 digests, compared in constant time against the digest of the
//! presented key (the keys file may hold `key_sha256` instead of the key, so the secret never
//! sits in a file or on a command line). A key without a `subject` is `key:<fingerprint>`.
//! Exactly one `Authorization: Bearer` header; a second one is refused, not "first wins".
//!
//! Owns: the auth flags, the keys file, credential checks and their error bodies. Must not:
//! know routes (the gate asks `scopes.rs`), keep or log keys and tokens, or read bodies.

use super::error::ApiError;
use super::jwt::{JwtConfig, JwtError, JwtVerifier};
use super::scopes::Scopes;
use anyhow::{bail, Context, Result};
use axum::http::{header, HeaderMap, StatusCode};
use clap::Args;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// `kiln serve`'s credential flags.
#[derive(Args, Clone, Default)]
pub struct AuthArgs {
    /// Accepted bearer keys with every scope (repeatable, or comma-separated in KILN_API_KEY).
    /// With no key, keys file, JWT secret or JWKS: no auth.
    #[arg(long = "api-key", env = "KILN_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A TOML file of keys with scopes: `[[key]]` with `key = "..."` or `key_sha256 = "<hex>"`,
    /// `scopes = ["inference", ...]` (`"*"`: all) and an optional `subject`.
    #[arg(long, env = "KILN_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// HS256 secret for JWT bearer tokens (at least 32 bytes; prefer the env var to the flag).
    #[arg(long, env = "KILN_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A JWKS file (`{"keys": [...]}`) whose RSA and EC P-256 keys verify RS256 / ES256 tokens,
    /// chosen by the token's `kid`. Read at start.
    #[arg(long, env = "KILN_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// The `iss` every JWT must carry (unset: not checked).
    #[arg(long, env = "KILN_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// A value every JWT's `aud` must be or contain (unset: not checked).
    #[arg(long, env = "KILN_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Seconds of clock skew allowed on a JWT's `exp` and `nbf`.
    #[arg(long, default_value_t = 60, env = "KILN_JWT_LEEWAY")]
    pub jwt_leeway: u64,
    /// Serve `/metrics` without a credential (and without Host/Origin checks), for scrapers
    /// such as Prometheus or the Kubernetes inference endpoint pickers.
    #[arg(long, env = "KILN_METRICS_PUBLIC")]
    pub metrics_public: bool,
}

// By hand, so a debug print of the flags never shows a key or the JWT secret.
impl std::fmt::Debug for AuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthArgs")
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("api_keys_file", &self.api_keys_file)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<redacted>"))
            .field("jwt_jwks", &self.jwt_jwks)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway", &self.jwt_leeway)
            .field("metrics_public", &self.metrics_public)
            .finish()
    }
}

impl AuthArgs {
    /// Reads the keys file and the JWKS file and checks every setting.
    pub fn build(&self) -> Result<Auth> {
        let mut auth = Auth::from_keys(self.api_keys.iter().cloned());
        if let Some(path) = &self.api_keys_file {
            warn_if_readable_by_others(path);
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            auth = auth.with_keys_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let jwks = match &self.jwt_jwks {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading JWKS {}", p.display()))?),
            None => None,
        };
        if self.jwt_secret.is_some() || jwks.is_some() {
            let config = JwtConfig {
                secret: self.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
                leeway: self.jwt_leeway,
            };
            let v = JwtVerifier::new(config, jwks.as_deref()).map_err(|e| anyhow::anyhow!("JWT settings: {e}"))?;
            tracing::info!(jwks_keys = v.key_count(), hs256 = self.jwt_secret.is_some(), "JWT bearer tokens accepted");
            auth = auth.with_jwt(v);
        } else if self.jwt_issuer.is_some() || self.jwt_audience.is_some() {
            bail!("--jwt-issuer / --jwt-audience need --jwt-secret or --jwt-jwks");
        }
        auth.metrics_public = self.metrics_public;
        Ok(auth)
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        tracing::warn!(path = %path.display(), "the API keys file is readable by other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// How the caller was identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Auth is off: everyone is the anonymous principal.
    Open,
    ApiKey,
    Jwt,
}

/// The caller of a request, as a request extension for handlers (`Extension<Principal>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's `subject` (else `key:<fingerprint>`), the token's `sub`, or `anonymous`.
    pub subject: String,
    pub scopes: Scopes,
    pub via: Via,
}

impl Principal {
    pub fn anonymous() -> Self {
        Self { subject: "anonymous".into(), scopes: Scopes::ALL, via: Via::Open }
    }
}

/// Why a request has no principal (each is a 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Duplicate,
    /// An `Authorization` header that is not `Bearer <credential>`.
    Scheme,
    /// Not a configured key (nor a token, when tokens are accepted).
    UnknownKey,
    Token(JwtError),
}

impl AuthError {
    /// A short reason for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credential",
            AuthError::Duplicate => "duplicate_authorization",
            AuthError::Scheme => "not_bearer",
            AuthError::UnknownKey => "invalid_api_key",
            AuthError::Token(e) => e.reason(),
        }
    }

    pub fn to_api_error(&self) -> ApiError {
        let missing = "Missing API key: send 'Authorization: Bearer <key>'";
        match self {
            AuthError::Missing | AuthError::Scheme => ApiError::unauthorized(missing),
            AuthError::Duplicate => ApiError::unauthorized("Send exactly one Authorization header"),
            AuthError::UnknownKey => ApiError::unauthorized("Incorrect API key provided"),
            AuthError::Token(e) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", format!("Invalid bearer token: {e}"))
                    .with_code("invalid_token")
            }
        }
    }
}

/// One configured key: its digest, never the key.
#[derive(Debug, Clone)]
struct ApiKey {
    digest: [u8; 32],
    scopes: Scopes,
    subject: String,
}

/// The configured credentials.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    keys: Vec<ApiKey>,
    jwt: Option<JwtVerifier>,
    /// `/metrics` needs no credential.
    pub metrics_public: bool,
}

/// A fingerprint from a digest: its first 12 hex digits (as `audit::fingerprint` of the key).
fn fingerprint_of(digest: &[u8; 32]) -> String {
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: Option<String>,
    key_sha256: Option<String>,
    scopes: Vec<String>,
    subject: Option<String>,
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Auth {
    /// No credentials: auth off.
    pub fn open() -> Self {
        Self::default()
    }

    /// These keys, each with every scope.
    pub fn from_keys(keys: impl IntoIterator<Item = String>) -> Self {
        keys.into_iter().fold(Self::default(), |a, k| a.with_key(&k, Scopes::ALL, None))
    }

    /// Adds a key with `scopes`, known as `subject` (default `key:<fingerprint>`).
    pub fn with_key(self, key: &str, scopes: Scopes, subject: Option<&str>) -> Self {
        self.with_digest(Sha256::digest(key.as_bytes()).into(), scopes, subject)
    }

    fn with_digest(mut self, digest: [u8; 32], scopes: Scopes, subject: Option<&str>) -> Self {
        let subject = subject.map_or_else(|| format!("key:{}", fingerprint_of(&digest)), str::to_string);
        self.keys.push(ApiKey { digest, scopes, subject });
        self
    }

    /// Adds the keys of a keys file (TOML); an error names the entry, never its key.
    pub fn with_keys_file(mut self, text: &str) -> Result<Self, String> {
        // toml's own message quotes the offending lines, which may hold a key: only its message
        // and line number are kept.
        let file: KeysFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            format!("line {line}: {}", e.message())
        })?;
        for (i, e) in file.key.iter().enumerate() {
            let at = |m: &str| format!("[[key]] number {}: {m}", i + 1);
            let digest = match (&e.key, &e.key_sha256) {
                (Some(k), None) if !k.is_empty() && !k.contains(char::is_whitespace) => Sha256::digest(k).into(),
                (Some(_), None) => return Err(at("the key is empty or contains whitespace")),
                (None, Some(h)) => parse_hex32(h).ok_or_else(|| at("key_sha256 must be 64 hex digits"))?,
                _ => return Err(at("give exactly one of key and key_sha256")),
            };
            let scopes = Scopes::parse_strict(e.scopes.iter().map(String::as_str)).map_err(|m| at(&m))?;
            if e.subject.as_ref().is_some_and(|s| s.trim().is_empty()) {
                return Err(at("subject is empty"));
            }
            if self.keys.iter().any(|k| bool::from(k.digest.ct_eq(&digest))) {
                return Err(at("this key is configured twice"));
            }
            self = self.with_digest(digest, scopes, e.subject.as_deref());
        }
        Ok(self)
    }

    pub fn with_jwt(mut self, v: JwtVerifier) -> Self {
        self.jwt = Some(v);
        self
    }

    /// True when any credential is configured (else every request is anonymous).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.jwt.is_some()
    }

    /// The principal of a request with these headers at `now` (Unix seconds).
    pub fn authenticate(&self, headers: &HeaderMap, now: u64) -> Result<Principal, AuthError> {
        if !self.enabled() {
            return Ok(Principal::anonymous());
        }
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (None, _) => return Err(AuthError::Missing),
            (Some(_), Some(_)) => return Err(AuthError::Duplicate),
            (Some(v), None) => v,
        };
        let given = value
            .to_str()
            .ok()
            // The auth scheme is case-insensitive (RFC 9110).
            .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
            .map(|(_, k)| k.trim())
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Scheme)?;
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Every key is compared, each in constant time: the time taken does not say which key
        // matched or how much of one (and digests hide even the key's length).
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(k);
            }
        }
        if let Some(k) = found {
            return Ok(Principal { subject: k.subject.clone(), scopes: k.scopes, via: Via::ApiKey });
        }
        match &self.jwt {
            Some(v) if super::jwt::looks_like_jwt(given) => {
                let c = v.verify(given, now).map_err(AuthError::Token)?;
                Ok(Principal { subject: c.subject, scopes: c.scopes, via: Via::Jwt })
            }
            _ => Err(AuthError::UnknownKey),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::scopes::Scope;
    use axum::http::HeaderValue;

    fn headers(vals: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in vals {
            m.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn one_bearer_key_exactly() {
        let auth = Auth::from_keys(["k1".to_string(), "k22".to_string()]);
        let p = auth.authenticate(&headers(&["Bearer k1"]), 0).unwrap();
        assert_eq!((p.scopes, p.via), (Scopes::ALL, Via::ApiKey));
        assert_eq!(p.subject, format!("key:{}", crate::api::audit::fingerprint("k1")));
        assert!(auth.authenticate(&headers(&["bearer k22"]), 0).is_ok());
        let cases: [(&[&str], AuthError); 5] = [
            (&[], AuthError::Missing),
            (&["Bearer k2"], AuthError::UnknownKey),
            (&["Bearer k1", "Bearer k1"], AuthError::Duplicate),
            (&["Bearer k1", "Bearer x"], AuthError::Duplicate),
            (&["k1"], AuthError::Scheme),
        ];
        for (h, want) in cases {
            let e = auth.authenticate(&headers(h), 0).unwrap_err();
            assert_eq!(e, want, "{h:?}");
            assert_eq!(e.to_api_error().status, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(Auth::open().authenticate(&headers(&[]), 0).unwrap(), Principal::anonymous());
    }

    #[test]
    fn keys_file_scopes_subjects_and_hashes() {
        let hash: String = Sha256::digest(b"hashed-key").iter().map(|b| format!("{b:02x}")).collect();
        let text = format!(
            "[[key]]\nkey = \"plain\"\nscopes = [\"inference\", \"embeddings\"]\nsubject = \"team-a\"\n\
             [[key]]\nkey_sha256 = \"{hash}\"\nscopes = [\"*\"]\n"
        );
        let auth = Auth::open().with_keys_file(&text).unwrap();
        let p = auth.authenticate(&headers(&["Bearer plain"]), 0).unwrap();
        assert_eq!(p.subject, "team-a");
        assert!(p.scopes.contains(Scope::Embeddings) && !p.scopes.contains(Scope::Admin));
        let p = auth.authenticate(&headers(&["Bearer hashed-key"]), 0).unwrap();
        assert_eq!((p.scopes, p.subject), (Scopes::ALL, format!("key:{}", &hash[..12])));
        let bad = [
            ("[[key]]\nscopes = []\n", "exactly one of key"),
            ("[[key]]\nkey = \"a\"\nkey_sha256 = \"00\"\nscopes = []\n", "exactly one of key"),
            ("[[key]]\nkey_sha256 = \"zz\"\nscopes = []\n", "64 hex digits"),
            ("[[key]]\nkey = \"a\"\nscopes = [\"inference\", \"root\"]\n", "unknown scope 'root'"),
            ("[[key]]\nkey = \"a\"\nscopes = []\n[[key]]\nkey = \"a\"\nscopes = []\n", "configured twice"),
            ("[[key]]\nkey = \"a\"\n", "missing field `scopes`"),
            ("[[key]]\nkey = \"a\"\nscopes = []\nscope = \"x\"\n", "unknown field `scope`"),
        ];
        for (text, want) in bad {
            let e = Auth::open().with_keys_file(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains("\"a\""), "the error shows the key: {e}");
        }
    }
}
