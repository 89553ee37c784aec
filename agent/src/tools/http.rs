//! HTTP tools declared in an agent file: a method, a URL template filled from the call's
//! arguments, an argument schema; the host must be on the server's allowlist; the response body
//! is the result. This module owns the allowlist, template validation and the request; it must
//! never let call arguments choose the host (placeholders are allowed only after the authority,
//! values are percent-encoded, redirects are checked against the allowlist too).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, Url};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{check_tool_name, human_duration, Tool, ToolDef, ToolError};

/// One `[[http_tools]]` entry of an agent definition (TOML and JSON use the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpToolDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// GET, POST, PUT, PATCH or DELETE.
    #[serde(default = "default_method")]
    pub method: String,
    /// `https://api.example.com/items/{id}`: `{arg}` is replaced by that argument, URL-encoded;
    /// arguments not in the template go in the query string (GET/DELETE) or the JSON body.
    pub url: String,
    /// JSON schema of the arguments (an object schema).
    #[serde(default)]
    pub parameters: Option<Value>,
}

fn default_method() -> String {
    "GET".into()
}

/// Everything but RFC 3986 unreserved characters is encoded: a value cannot add a path segment,
/// a query or a fragment.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// The most response bytes read; a larger body is cut here (the tool loop cuts further).
const MAX_BODY: usize = 1 << 20;
/// How much of a non-2xx body the error result quotes.
const ERROR_BODY_HEAD: usize = 512;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Hosts HTTP tools may reach: `api.example.com` (default port of the scheme), `127.0.0.1:8089`
/// (that port), `*.example.org` (any subdomain, not example.org itself). Case-insensitive.
#[derive(Debug, Clone, Default)]
pub struct HostAllowlist {
    entries: Arc<Vec<HostPattern>>,
}

#[derive(Debug, Clone, PartialEq)]
struct HostPattern {
    /// Lowercase host, or for `*.x` the suffix `.x`.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostAllowlist {
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Result<Self, ToolError> {
        let entries = entries.into_iter().map(|e| parse_pattern(e.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Ok(HostAllowlist { entries: Arc::new(entries) })
    }

    /// Whether `url` is http(s) to an allowed host and port.
    pub fn allows(&self, url: &Url) -> bool {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { return false };
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let host = host.to_ascii_lowercase();
        let default_port = if url.scheme() == "https" { 443 } else { 80 };
        self.entries.iter().any(|p| {
            let host_ok =
                if p.wildcard { host.ends_with(&p.host) && host.len() > p.host.len() } else { host == p.host };
            host_ok && p.port.unwrap_or(default_port) == port
        })
    }

    /// A client for HTTP tools: rustls (ring) TLS, and redirects followed only onto allowed hosts
    /// (a redirect must not carry a call to a host the allowlist refuses).
    pub fn http_client(&self) -> Result<reqwest::Client, ToolError> {
        let allow = self.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                attempt.error("too many redirects")
            } else if allow.allows(attempt.url()) {
                attempt.follow()
            } else {
                let msg = format!("redirect to {} refused: host not on the allowlist", attempt.url());
                attempt.error(msg)
            }
        });
        build_client(reqwest::Client::builder().redirect(policy))
    }
}

/// A reqwest client with this crate's TLS setup (rustls over ring, installed as the process
/// default if none is: reqwest is built without a provider of its own).
pub fn build_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, ToolError> {
    // Err means another provider is already installed, which reqwest then uses: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    builder.build().map_err(|e| ToolError::Failed(format!("cannot build the HTTP client: {e}")))
}

fn parse_pattern(entry: &str) -> Result<HostPattern, ToolError> {
    let bad = |why: &str| ToolError::invalid_def("allowlist", format!("{entry:?}: {why}"));
    let entry = entry.trim().to_ascii_lowercase();
    let (wildcard, rest) = match entry.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, entry.as_str()),
    };
    // Split off the port first: `Url` would drop one equal to the scheme default.
    let (host_text, port) = match rest.strip_prefix('[').and_then(|r| r.find(']')) {
        Some(end) => match &rest[end + 2..] {
            "" => (&rest[..end + 2], None),
            after => (&rest[..end + 2], Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?)),
        },
        None => match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    let port = port.map(|p| p.parse::<u16>().map_err(|_| bad("bad port"))).transpose()?;
    // Parse the host as a URL authority so IPv6 literals read the way request URLs do.
    let url = Url::parse(&format!("http://{host_text}/")).map_err(|e| bad(&e.to_string()))?;
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?;
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() || rest.contains('*') {
        return Err(bad("expected host, host:port or *.domain"));
    }
    let host = if wildcard { format!(".{host}") } else { host.to_string() };
    Ok(HostPattern { host, wildcard, port })
}

/// An HTTP tool ready to call.
pub struct HttpTool {
    def: ToolDef,
    method: Method,
    /// The template split at placeholders: literal, name, literal, name, ..., literal.
    parts: Vec<String>,
    allow: HostAllowlist,
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpTool {
    /// Checks `def` against the allowlist and its own schema. `client` should come from
    /// `HostAllowlist::http_client` (redirects checked against the same allowlist).
    pub fn new(def: HttpToolDef, allow: &HostAllowlist, client: reqwest::Client) -> Result<HttpTool, ToolError> {
        check_tool_name(&def.name)?;
        let bad = |why: String| ToolError::invalid_def(&def.name, why);
        let method = match def.method.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => return Err(bad(format!("method {other:?} is not one of GET POST PUT PATCH DELETE"))),
        };
        let parts = split_template(&def.url).map_err(&bad)?;
        let names: Vec<&str> = parts.iter().skip(1).step_by(2).map(String::as_str).collect();
        check_authority_fixed(&def.url, &parts).map_err(&bad)?;
        let probe = fill(&parts, |_| Ok("x".into())).map_err(&bad)?;
        let url = Url::parse(&probe).map_err(|e| bad(format!("url {:?}: {e}", def.url)))?;
        if !allow.allows(&url) {
            return Err(bad(format!("host of {:?} is not on the HTTP tool allowlist", def.url)));
        }
        let parameters = match def.parameters {
            Some(schema) => check_schema(schema, &names).map_err(&bad)?,
            None => default_schema(&names),
        };
        let def = ToolDef { name: def.name, description: def.description, parameters };
        Ok(HttpTool { def, method, parts, allow: allow.clone(), client, timeout: DEFAULT_TIMEOUT })
    }

    /// The per-call request timeout (default 30 s); the tool loop's own limit still applies.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The request a call with `args` makes (URL filled, query or body from the other args).
    fn request(&self, args: Value) -> Result<reqwest::RequestBuilder, ToolError> {
        let mut args = match args {
            Value::Object(args) => args,
            // A model calling a tool without parameters may send null for "no arguments".
            Value::Null => Map::new(),
            other => return Err(ToolError::Failed(format!("arguments must be a JSON object, got {other}"))),
        };
        let url = fill(&self.parts, |name| {
            let value = args.shift_remove(name).ok_or_else(|| format!("missing argument {name:?}"))?;
            let text = scalar_text(name, &value)?;
            // URL parsing resolves "." and ".." segments (encoded or not): they would move the path.
            if text == "." || text == ".." {
                return Err(format!("argument {name:?} may not be {text:?}"));
            }
            Ok(utf8_percent_encode(&text, COMPONENT).to_string())
        })
        .map_err(ToolError::Failed)?;
        let mut url = Url::parse(&url).map_err(|e| ToolError::Failed(format!("bad URL {url:?}: {e}")))?;
        // Values are encoded, so the host cannot have moved; checked again because it is cheap.
        if !self.allow.allows(&url) {
            return Err(ToolError::Failed(format!("host of {url} is not on the allowlist")));
        }
        let has_body = !matches!(self.method, Method::GET | Method::DELETE);
        if !has_body && !args.is_empty() {
            let mut query = url.query_pairs_mut();
            for (k, v) in &args {
                query.append_pair(k, &scalar_text(k, v).unwrap_or_else(|_| v.to_string()));
            }
        }
        let req = self.client.request(self.method.clone(), url).timeout(self.timeout);
        if !has_body {
            return Ok(req);
        }
        let body = serde_json::to_vec(&Value::Object(args)).map_err(|e| ToolError::Failed(e.to_string()))?;
        Ok(req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body))
    }
}

impl Tool for HttpTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        self.send(self.request(args))
    }

    fn call_keyed(&self, args: Value, key: &str) -> BoxFuture<'static, Result<String, ToolError>> {
        let key = key.to_string();
        self.send(self.request(args).map(|r| r.header("Idempotency-Key", key)))
    }
}

impl HttpTool {
    fn send(
        &self,
        request: Result<reqwest::RequestBuilder, ToolError>,
    ) -> BoxFuture<'static, Result<String, ToolError>> {
        let timeout = self.timeout;
        async move {
            let response = request?.send().await.map_err(|e| request_error(e, timeout))?;
            let status = response.status();
            let (body, cut) = read_body(response, MAX_BODY).await.map_err(|e| request_error(e, timeout))?;
            if !status.is_success() {
                let head: String = body.chars().take(ERROR_BODY_HEAD).collect();
                let more = if head.len() < body.len() || cut { " ..." } else { "" };
                return Err(ToolError::Failed(format!("HTTP {status}: {head}{more}")));
            }
            Ok(if cut { format!("{body}\n[response cut at {MAX_BODY} bytes]") } else { body })
        }
        .boxed()
    }
}

fn request_error(e: reqwest::Error, timeout: Duration) -> ToolError {
    if e.is_timeout() {
        return ToolError::Failed(format!("request timed out after {}", human_duration(timeout)));
    }
    // reqwest's Display omits the cause ("error sending request"); the chain says why.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    ToolError::Failed(format!("request failed: {text}"))
}

/// The body as text, at most `max` bytes (cut at a char boundary); true when cut.
async fn read_body(mut response: reqwest::Response, max: usize) -> Result<(String, bool), reqwest::Error> {
    let mut buf = Vec::new();
    let mut cut = false;
    while let Some(chunk) = response.chunk().await? {
        buf.extend_from_slice(&chunk);
        if buf.len() > max {
            buf.truncate(max);
            cut = true;
            break;
        }
    }
    let text = match String::from_utf8(buf) {
        Ok(text) => text,
        // A cut inside a multi-byte char, or a non-UTF-8 body: keep what is valid, mark the rest.
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    Ok((text, cut))
}

/// A placeholder or query value as text: strings as they are, numbers and booleans printed.
fn scalar_text(name: &str, value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("argument {name:?} must be a string, number or boolean, got {other}")),
    }
}

/// `a{x}b{y}` -> ["a", "x", "b", "y", ""]; names are identifiers, braces must pair.
fn split_template(template: &str) -> Result<Vec<String>, String> {
    let mut parts = vec![String::new()];
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("unmatched '}}' in url {template:?}"));
        }
        let close = rest[open..].find('}').map(|c| open + c).ok_or(format!("unclosed '{{' in url {template:?}"))?;
        let name = &rest[open + 1..close];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("placeholder {{{name}}} in url {template:?}: use letters, digits and _"));
        }
        parts.last_mut().expect("parts is never empty").push_str(&rest[..open]);
        parts.push(name.to_string());
        parts.push(String::new());
        rest = &rest[close + 1..];
    }
    parts.last_mut().expect("parts is never empty").push_str(rest);
    Ok(parts)
}

/// Placeholders only after `scheme://authority`: a call must never pick the host or port.
fn check_authority_fixed(template: &str, parts: &[String]) -> Result<(), String> {
    let Some(scheme_end) = parts[0].find("://") else {
        return Err(format!("url {template:?} must start with http:// or https://"));
    };
    let after = &parts[0][scheme_end + 3..];
    if parts.len() > 1 && !after.contains(['/', '?', '#']) {
        return Err(format!("url {template:?}: placeholders may not be in the host or port"));
    }
    Ok(())
}

/// Joins the template parts, each placeholder replaced by `value(name)`.
fn fill(parts: &[String], mut value: impl FnMut(&str) -> Result<String, String>) -> Result<String, String> {
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        } else {
            out.push_str(&value(part)?);
        }
    }
    Ok(out)
}

/// The schema must be an object schema that declares and requires every placeholder.
fn check_schema(schema: Value, placeholders: &[&str]) -> Result<Value, String> {
    let obj = schema.as_object().ok_or("parameters must be a JSON schema object")?;
    if obj.get("type").is_some_and(|t| t != "object") {
        return Err("parameters must have \"type\": \"object\"".into());
    }
    let props = obj.get("properties").and_then(Value::as_object);
    let required: Vec<&str> =
        obj.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    for name in placeholders {
        if !props.is_some_and(|p| p.contains_key(*name)) {
            return Err(format!("url placeholder {{{name}}} is not a property of parameters"));
        }
        if !required.contains(name) {
            return Err(format!("url placeholder {{{name}}} must be listed in parameters.required"));
        }
    }
    Ok(schema)
}

/// Without a declared schema: every placeholder a required string, nothing else.
fn default_schema(placeholders: &[&str]) -> Value {
    let props: Map<String, Value> = placeholders.iter().map(|n| (n.to_string(), json!({"type": "string"}))).collect();
    json!({"type": "object", "properties": props, "required": placeholders, "additionalProperties": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        let allow = HostAllowlist::new(["api.example.com", "127.0.0.1:8089", "*.example.org", "[::1]:9000"]).unwrap();
        let ok = |u: &str| allow.allows(&Url::parse(u).unwrap());
        assert!(ok("https://api.example.com/x") && ok("http://API.example.com/") && ok("http://127.0.0.1:8089/a"));
        assert!(ok("https://a.example.org/") && ok("https://a.b.example.org/") && ok("http://[::1]:9000/"));
        assert!(!ok("https://api.example.com:8443/") && !ok("http://127.0.0.1/") && !ok("http://127.0.0.1:8090/"));
        assert!(!ok("https://example.org/") && !ok("https://evilexample.org/") && !ok("ftp://api.example.com/"));
        assert!(!ok("https://api.example.com.evil.net/") && !ok("file:///etc/passwd"));
        for bad in ["", "http://x/", "a/b", "x:port", "*.*.x", "x:99999"] {
            assert!(HostAllowlist::new([bad]).is_err(), "{bad}");
        }
    }

    fn def(method: &str, url: &str, parameters: Option<Value>) -> HttpToolDef {
        HttpToolDef { name: "t".into(), description: String::new(), method: method.into(), url: url.into(), parameters }
    }

    #[test]
    fn definitions_are_checked() {
        let allow = HostAllowlist::new(["api.example.com", "*.example.org"]).unwrap();
        let client = allow.http_client().unwrap();
        let new = |d: HttpToolDef| HttpTool::new(d, &allow, client.clone()).map(|t| t.def.parameters);
        let schema = json!({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]});
        assert!(new(def("get", "https://api.example.com/items/{id}", Some(schema.clone()))).is_ok());
        let generated = new(def("GET", "https://x.example.org/{a}/{b}?v=1", None)).unwrap();
        assert_eq!(generated["required"], json!(["a", "b"]));
        let fails = [
            def("TRACE", "https://api.example.com/", None),
            def("GET", "https://other.com/", None),
            def("GET", "https://{host}/x", None),
            def("GET", "https://api.example.com:{port}/x", None),
            def("GET", "https://{sub}.example.org/x", None),
            def("GET", "api.example.com/x", None),
            def("GET", "https://api.example.com/{id", None),
            def("GET", "https://api.example.com/id}", None),
            def("GET", "https://api.example.com/{a-b}", None),
            def("GET", "https://api.example.com/{id}", Some(json!({"type": "object", "properties": {}}))),
            def("GET", "https://api.example.com/{id}", Some(json!({"type": "object", "properties": {"id": {}}}))),
            def("GET", "https://api.example.com/", Some(json!({"type": "array"}))),
        ];
        for d in fails {
            let url = d.url.clone();
            let err = new(d).unwrap_err();
            assert!(matches!(err, ToolError::InvalidDef { .. }), "{url}: {err}");
        }
        let bad_name = HttpToolDef { name: "a b".into(), ..def("GET", "https://api.example.com/", None) };
        assert!(matches!(new(bad_name), Err(ToolError::InvalidName(_))));
    }

    #[test]
    fn templates() {
        assert_eq!(split_template("a{x}b{y}").unwrap(), ["a", "x", "b", "y", ""]);
        assert_eq!(split_template("plain").unwrap(), ["plain"]);
        let encoded = utf8_percent_encode("a b/../?#&=é", COMPONENT).to_string();
        assert_eq!(encoded, "a%20b%2F..%2F%3F%23%26%3D%C3%A9");
    }
}
