//! JWT bearer tokens (RFC 7519, compact JWS): HS256 against `--jwt-secret`, RS256 and ES256
//! (P-256) against the public keys of a JWKS file (`--jwt-jwks`), chosen by the token's `kid`.
//! Signatures are checked by `ring`; this module only parses and decides.
//!
//! The rules, in order: exactly three base64url parts; a header with a known `alg` and no `crit`
//! (`none` and every other algorithm are refused); the key is picked by the algorithm's family
//! first, so an HS256 token is only ever checked against the shared secret and never against a
//! JWKS key (no algorithm confusion), and an RS256/ES256 token only against a JWKS key of that
//! type (symmetric `oct` keys in a JWKS file are ignored); the signature; then the claims: `exp`
//! is required, `exp`/`nbf` must be numbers (a string is refused, never skipped), both checked
//! with `--jwt-leeway`; `iss` and `aud` when configured; `sub` is required (it is the caller's
//! identity). Scopes come from `scope` (space-separated, OAuth) and/or `scopes` (an array);
//! names kiln does not know are ignored.
//!
//! Owns: token parsing, key selection, claim validation and the JWKS file. Must not: do
//! signature math itself, know HTTP, or log tokens.

use super::scopes::Scopes;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Longest token looked at (headers are capped below this anyway).
const MAX_TOKEN: usize = 16 << 10;

/// Why a token was refused; the message is safe to return to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm '{0}' is not accepted")]
    Algorithm(String),
    #[error("no configured key matches the token's kid")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's '{0}' claim is missing or of the wrong type")]
    Claim(&'static str),
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
}

impl JwtError {
    /// A short reason for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "token_malformed",
            JwtError::Algorithm(_) => "token_algorithm",
            JwtError::UnknownKey => "token_unknown_key",
            JwtError::Signature => "token_signature",
            JwtError::Expired => "token_expired",
            JwtError::NotYetValid => "token_not_yet_valid",
            JwtError::Claim(_) => "token_claims",
            JwtError::Issuer => "token_issuer",
            JwtError::Audience => "token_audience",
        }
    }
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    pub scopes: Scopes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        match s {
            "HS256" => Some(Alg::Hs256),
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }
}

/// A public key from the JWKS file.
#[derive(Debug, Clone)]
enum PublicKey {
    /// Big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed P-256 point `04 || x || y`.
    P256(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one: the token must then use exactly that.
    alg: Option<String>,
    key: PublicKey,
}

impl Jwk {
    fn fits(&self, alg: Alg) -> bool {
        let family = matches!((alg, &self.key), (Alg::Rs256, PublicKey::Rsa { .. }) | (Alg::Es256, PublicKey::P256(_)));
        let name = match alg {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        };
        family && self.alg.as_deref().is_none_or(|a| a == name)
    }
}

/// The verifier `kiln serve` builds from its JWT flags.
#[derive(Clone, Default)]
pub struct JwtConfig {
    /// The HS256 shared secret (at least 32 bytes).
    pub secret: Option<Vec<u8>>,
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// A value the token's `aud` must be or contain, when set.
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway: u64,
}

// By hand, so a debug print of the config (or of `Auth`) never shows the secret.
impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Checks tokens against the configured secret and keys.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    config: JwtConfig,
    keys: Vec<Jwk>,
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError::Malformed)
}

fn object(bytes: &[u8]) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed),
    }
}

/// True when `token` has the shape of a compact JWS (three dot-separated parts), so a bearer
/// that is not one is only ever an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

impl JwtVerifier {
    /// A verifier with `config`'s secret and the keys of `jwks` (a JWKS document), if given.
    pub fn new(config: JwtConfig, jwks: Option<&str>) -> Result<Self, String> {
        if let Some(s) = &config.secret {
            if s.len() < 32 {
                return Err(format!("the JWT secret has {} bytes; HS256 needs at least 32 (RFC 7518 3.2)", s.len()));
            }
        }
        let keys = match jwks {
            Some(text) => parse_jwks(text)?,
            None => Vec::new(),
        };
        Ok(Self { config, keys })
    }

    /// How many JWKS keys were loaded.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Verifies `token` at `now` (Unix seconds) and returns its subject and scopes.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, JwtError> {
        if token.len() > MAX_TOKEN {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        let header = object(&b64(h)?)?;
        if header.contains_key("crit") {
            return Err(JwtError::Malformed);
        }
        let alg_name = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed)?;
        let alg = Alg::parse(alg_name).ok_or_else(|| JwtError::Algorithm(alg_name.chars().take(16).collect()))?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::Malformed),
        };
        let signed = &token[..h.len() + 1 + p.len()];
        self.check_signature(alg, kid, signed.as_bytes(), &b64(s)?)?;
        self.check_claims(&object(&b64(p)?)?, now)
    }

    fn check_signature(&self, alg: Alg, kid: Option<&str>, signed: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        if alg == Alg::Hs256 {
            let secret = self.config.secret.as_ref().ok_or_else(|| JwtError::Algorithm("HS256".into()))?;
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            // ring compares the tags in constant time.
            return ring::hmac::verify(&key, signed, sig).map_err(|_| JwtError::Signature);
        }
        let fitting: Vec<&Jwk> = self.keys.iter().filter(|k| k.fits(alg)).collect();
        if self.keys.is_empty() {
            return Err(JwtError::Algorithm(if alg == Alg::Rs256 { "RS256" } else { "ES256" }.into()));
        }
        let key = match kid {
            Some(kid) => fitting.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // Without a kid, only an unambiguous key will do.
            None if fitting.len() == 1 => fitting.first(),
            None => None,
        }
        .ok_or(JwtError::UnknownKey)?;
        let ok = match &key.key {
            PublicKey::Rsa { n, e } => {
                RsaPublicKeyComponents { n, e }.verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig).is_ok()
            }
            PublicKey::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(signed, sig).is_ok()
            }
        };
        ok.then_some(()).ok_or(JwtError::Signature)
    }

    fn check_claims(&self, c: &Map<String, Value>, now: u64) -> Result<Claims, JwtError> {
        let (now, leeway) = (now as f64, self.config.leeway as f64);
        let number = |name: &'static str| match c.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or(JwtError::Claim(name)),
        };
        let exp = number("exp")?.ok_or(JwtError::Claim("exp"))?;
        if now > exp + leeway {
            return Err(JwtError::Expired);
        }
        if number("nbf")?.is_some_and(|nbf| now + leeway < nbf) {
            return Err(JwtError::NotYetValid);
        }
        if let Some(iss) = &self.config.issuer {
            if c.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(JwtError::Issuer);
            }
        }
        if let Some(aud) = &self.config.audience {
            let ok = match c.get("aud") {
                Some(Value::String(a)) => a == aud,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(aud.as_str())),
                _ => false,
            };
            if !ok {
                return Err(JwtError::Audience);
            }
        }
        let subject = c.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or(JwtError::Claim("sub"))?;
        let mut names: Vec<&str> = Vec::new();
        match c.get("scope") {
            None => {}
            Some(Value::String(s)) => names.extend(s.split_whitespace()),
            Some(_) => return Err(JwtError::Claim("scope")),
        }
        match c.get("scopes") {
            None => {}
            Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
                names.extend(list.iter().filter_map(Value::as_str))
            }
            Some(_) => return Err(JwtError::Claim("scopes")),
        }
        Ok(Claims { subject: subject.to_string(), scopes: Scopes::from_claims(names) })
    }
}

/// The usable signing keys of a JWKS document: RSA (at least 2048 bits) and EC P-256 keys whose
/// `use` is absent or `sig`. Other keys (encryption keys, `oct`, other curves) are skipped, as an
/// identity provider's JWKS often lists some; a document with no usable key is an error.
fn parse_jwks(text: &str) -> Result<Vec<Jwk>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = doc.get("keys").and_then(Value::as_array).ok_or("no \"keys\" array")?;
    let mut keys = Vec::new();
    for (i, k) in list.iter().enumerate() {
        let field = |name: &str| k.get(name).and_then(Value::as_str);
        if field("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let bytes = |name: &str| -> Result<Vec<u8>, String> {
            let v = field(name).ok_or_else(|| format!("key {i}: no '{name}'"))?;
            URL_SAFE_NO_PAD.decode(v.trim_end_matches('=')).map_err(|_| format!("key {i}: '{name}' is not base64url"))
        };
        let key = match (field("kty"), field("crv")) {
            (Some("RSA"), _) => {
                let n: Vec<u8> = bytes("n")?.into_iter().skip_while(|b| *b == 0).collect();
                if n.len() < 256 {
                    return Err(format!("key {i}: RSA keys must have at least 2048 bits"));
                }
                let e = bytes("e")?.into_iter().skip_while(|b| *b == 0).collect();
                PublicKey::Rsa { n, e }
            }
            (Some("EC"), Some("P-256")) => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("key {i}: a P-256 key needs 32-byte x and y"));
                }
                PublicKey::P256([&[4u8][..], &x, &y].concat())
            }
            (kty, crv) => {
                tracing::warn!(index = i, ?kty, ?crv, "JWKS key skipped: only RSA and EC P-256 signing keys are used");
                continue;
            }
        };
        keys.push(Jwk { kid: field("kid").map(str::to_string), alg: field("alg").map(str::to_string), key });
    }
    if keys.is_empty() {
        return Err("no usable RSA or EC P-256 signing key".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn enc(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn hs256(header: Value, claims: Value, secret: &[u8]) -> String {
        let signed = format!("{}.{}", enc(&header), enc(&claims));
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn verifier() -> JwtVerifier {
        let cfg = JwtConfig { secret: Some(SECRET.to_vec()), leeway: 5, ..Default::default() };
        JwtVerifier::new(cfg, None).unwrap()
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn hs256_claims_and_their_types() {
        let v = verifier();
        let h = json!({"alg": "HS256", "typ": "JWT"});
        let ok = hs256(h.clone(), json!({"sub": "ada", "exp": NOW + 60, "scope": "inference x"}), SECRET);
        assert!(looks_like_jwt(&ok));
        let c = v.verify(&ok, NOW).unwrap();
        assert_eq!((c.subject.as_str(), c.scopes.names()), ("ada", vec!["inference"]));
        let cases = [
            (json!({"sub": "a", "exp": NOW - 6}), JwtError::Expired),
            (json!({"sub": "a", "exp": NOW + 60, "nbf": NOW + 6}), JwtError::NotYetValid),
            (json!({"sub": "a", "exp": NOW + 60, "nbf": "99999999999"}), JwtError::Claim("nbf")),
            (json!({"sub": "a", "exp": "never"}), JwtError::Claim("exp")),
            (json!({"sub": "a"}), JwtError::Claim("exp")),
            (json!({"exp": NOW + 60}), JwtError::Claim("sub")),
            (json!({"sub": "a", "exp": NOW + 60, "scopes": "inference"}), JwtError::Claim("scopes")),
        ];
        for (claims, want) in cases {
            assert_eq!(v.verify(&hs256(h.clone(), claims.clone(), SECRET), NOW), Err(want), "{claims}");
        }
        // Within the leeway.
        assert!(v.verify(&hs256(h.clone(), json!({"sub": "a", "exp": NOW - 4}), SECRET), NOW).is_ok());
        let forged = hs256(h, json!({"sub": "a", "exp": NOW + 60}), b"another secret of thirty-two bytes!");
        assert_eq!(v.verify(&forged, NOW), Err(JwtError::Signature));
    }

    #[test]
    fn none_and_unknown_algorithms_and_bad_shapes_are_refused() {
        let v = verifier();
        let claims = enc(&json!({"sub": "a", "exp": NOW + 60}));
        for alg in ["none", "None", "HS512", "RS256", "PS256"] {
            let t = format!("{}.{claims}.", enc(&json!({"alg": alg})));
            assert!(matches!(v.verify(&t, NOW), Err(JwtError::Algorithm(_))), "{alg}");
        }
        let crit = hs256(json!({"alg": "HS256", "crit": ["exp"]}), json!({"sub": "a", "exp": NOW + 60}), SECRET);
        for bad in ["", "a.b", "a.b.c.d", "eyJ.eyJ.x", &crit] {
            assert_eq!(v.verify(bad, NOW), Err(JwtError::Malformed), "{bad}");
        }
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let cfg = JwtConfig {
            secret: Some(SECRET.to_vec()),
            issuer: Some("https://idp".into()),
            audience: Some("kiln".into()),
            leeway: 0,
        };
        let v = JwtVerifier::new(cfg, None).unwrap();
        let t = |c: Value| hs256(json!({"alg": "HS256"}), c, SECRET);
        let base = json!({"sub": "a", "exp": NOW + 9, "iss": "https://idp", "aud": ["x", "kiln"]});
        assert!(v.verify(&t(base.clone()), NOW).is_ok());
        let mut wrong = base.clone();
        wrong["aud"] = json!("x");
        assert_eq!(v.verify(&t(wrong), NOW), Err(JwtError::Audience));
        let mut wrong = base;
        wrong["iss"] = json!("https://evil");
        assert_eq!(v.verify(&t(wrong), NOW), Err(JwtError::Issuer));
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let shown = format!("{:?}", verifier());
        assert!(shown.contains("<redacted>") && !shown.contains("0123456789abcdef"), "{shown}");
    }

    #[test]
    fn short_secrets_and_empty_jwks_are_config_errors() {
        let cfg = JwtConfig { secret: Some(b"short".to_vec()), ..Default::default() };
        assert!(JwtVerifier::new(cfg, None).unwrap_err().contains("at least 32"));
        let oct = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#;
        assert!(JwtVerifier::new(JwtConfig::default(), Some(oct)).unwrap_err().contains("no usable"));
    }
}
