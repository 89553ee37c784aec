//! HTTP tools against a real HTTP server (axum on 127.0.0.1:0), through `invoke` as the tool loop
//! calls them: placeholders, query and body, errors, timeouts, big bodies, redirects.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{any, get};
use axum::Router;
use kiln_agent::tools::http::{HostAllowlist, HttpTool, HttpToolDef};
use kiln_agent::tools::{invoke, CallLimits, Tool};
use serde_json::{json, Value};

/// Answers with what it saw: method, raw path (still percent-encoded), query, content type, body.
async fn echo(method: Method, uri: Uri, RawQuery(q): RawQuery, headers: HeaderMap, body: Bytes) -> String {
    let rest = uri.path().trim_start_matches("/echo/");
    let ct = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("").to_string());
    let body = String::from_utf8_lossy(&body).into_owned();
    json!({"method": method.as_str(), "path": rest, "query": q, "content_type": ct, "body": body}).to_string()
}

async fn start_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = addr.port();
    let app =
        Router::new()
            .route("/echo/{*rest}", any(echo))
            .route(
                "/status/{code}",
                get(|Path(code): Path<u16>| async move { (StatusCode::from_u16(code).unwrap(), "x".repeat(2000)) }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    "late"
                }),
            )
            .route("/big", get(|| async { "a".repeat(3 << 20) }))
            .route(
                "/to-self",
                get(move || async move { Redirect::temporary(&format!("http://127.0.0.1:{port}/echo/redirected")) }),
            )
            .route(
                "/to-other",
                get(move || async move {
                    Redirect::temporary(&format!("http://localhost:{port}/echo/leak")).into_response()
                }),
            );
    let handle = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("127.0.0.1:{port}"), handle)
}

fn tool(authority: &str, method: &str, path: &str, parameters: Option<Value>) -> Arc<dyn Tool> {
    let allow = HostAllowlist::new([authority]).unwrap();
    let def = HttpToolDef {
        name: "web".into(),
        description: "test".into(),
        method: method.into(),
        url: format!("http://{authority}{path}"),
        parameters,
    };
    Arc::new(HttpTool::new(def, &allow, allow.http_client().unwrap()).unwrap().with_timeout(Duration::from_secs(1)))
}

fn limits() -> CallLimits {
    CallLimits { timeout: Duration::from_secs(5), max_result_bytes: 100_000 }
}

async fn call(tool: &Arc<dyn Tool>, args: Value) -> (Value, bool) {
    let out = invoke(tool, args, &limits()).await;
    (serde_json::from_str(&out.content).unwrap_or(Value::String(out.content)), out.is_error)
}

#[tokio::test]
async fn get_fills_placeholders_and_query() {
    let (host, _server) = start_server().await;
    let schema = json!({"type": "object", "properties": {"id": {"type": "string"}, "q": {"type": "string"}, "n": {"type": "integer"}}, "required": ["id"]});
    let t = tool(&host, "GET", "/echo/items/{id}", Some(schema));
    let (seen, is_error) = call(&t, json!({"id": "a b/../c?#", "q": "x&y=z", "n": 3})).await;
    assert!(!is_error, "{seen}");
    assert_eq!(seen["method"], "GET");
    // The value stayed one path segment: no traversal, no injected query.
    assert_eq!(seen["path"], "items/a%20b%2F..%2Fc%3F%23");
    assert_eq!(seen["query"], "q=x%26y%3Dz&n=3");
    assert_eq!(seen["body"], "");

    // A dot segment would be resolved away by URL parsing: refused, not sent to another path.
    let (text, is_error) = call(&t, json!({"id": ".."})).await;
    assert!(is_error && text.as_str().unwrap().contains("may not be \"..\""), "{text}");

    let del = tool(&host, "DELETE", "/echo/items/{id}", None);
    let (seen, _) = call(&del, json!({"id": 7})).await;
    assert_eq!(
        (seen["method"].as_str(), seen["path"].as_str(), seen["query"].as_str()),
        (Some("DELETE"), Some("items/7"), None)
    );
}

#[tokio::test]
async fn post_sends_the_other_args_as_json() {
    let (host, _server) = start_server().await;
    let schema = json!({"type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array"}}, "required": ["id"]});
    let t = tool(&host, "POST", "/echo/items/{id}", Some(schema));
    let (seen, is_error) = call(&t, json!({"id": 12, "tags": ["a", "b"], "note": {"k": 1}})).await;
    assert!(!is_error, "{seen}");
    assert_eq!((seen["method"].as_str(), seen["path"].as_str()), (Some("POST"), Some("items/12")));
    assert_eq!(seen["content_type"], "application/json");
    let body: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"tags": ["a", "b"], "note": {"k": 1}}));
}

#[tokio::test]
async fn failures_are_results() {
    let (host, _server) = start_server().await;
    let status = tool(&host, "GET", "/status/{code}", None);
    let (text, is_error) = call(&status, json!({"code": "503"})).await;
    let text = text.as_str().unwrap().to_string();
    assert!(is_error);
    assert!(text.starts_with("tool web failed: HTTP 503 Service Unavailable: xxxx"), "{text}");
    assert!(text.ends_with("x ...") && text.len() < 700, "{text}");

    let slow = tool(&host, "GET", "/slow", None);
    let (text, is_error) = call(&slow, json!({})).await;
    assert!(is_error);
    assert_eq!(text, "tool web failed: request timed out after 1 s");

    // Nothing listens on port 9 of 127.0.0.2 in the test machine: a connection error, as text.
    let down = tool("127.0.0.2:9", "GET", "/", None);
    let (text, is_error) = call(&down, json!({})).await;
    assert!(is_error && text.as_str().unwrap().starts_with("tool web failed: request failed: "), "{text}");
}

#[tokio::test]
async fn big_bodies_and_redirects() {
    let (host, _server) = start_server().await;
    let big = tool(&host, "GET", "/big", None);
    let out = invoke(&big, json!({}), &CallLimits { timeout: Duration::from_secs(5), max_result_bytes: 1000 }).await;
    assert!(!out.is_error && out.truncated);
    // The tool reads at most 1 MiB (and says so); invoke then cuts to the call's limit.
    let full = (1 << 20) + "\n[response cut at 1048576 bytes]".len();
    let (head, note) = out.content.split_once('\n').unwrap();
    assert_eq!(head, "a".repeat(1000));
    assert_eq!(note, format!("[result truncated: {} of {full} bytes cut]", full - 1000));

    let ok = tool(&host, "GET", "/to-self", None);
    let (seen, is_error) = call(&ok, json!({})).await;
    assert!(!is_error);
    assert_eq!(seen["path"], "redirected");

    // localhost is the same server, but not on the allowlist: the redirect is refused.
    let leak = tool(&host, "GET", "/to-other", None);
    let (text, is_error) = call(&leak, json!({})).await;
    assert!(is_error);
    assert!(text.as_str().unwrap().contains("not on the allowlist"), "{text}");
}
