//! The HTTP API through the axum router in-process (`tower::ServiceExt::oneshot`, no sockets) on
//! a real engine: request ids, 503 while loading, the OpenAI error shape for every client mistake
//! (405, 413, malformed JSON, wrong types, bad logit_bias keys, n=0), auth, tokenize/detokenize,
//! the Prometheus text and the SSE framing. The official-SDK suite (`openai_sdk.rs`) covers the
//! rest over real HTTP.

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_inference::engine::EngineHandle;
use kiln_server::api::{router, AppState, MAX_BODY_BYTES};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m-instruct-q4_1";

/// One engine for the whole binary (tests run in parallel and share it; each gets its own state).
fn engine() -> EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let model = kiln_tests::smollm2().expect("the default model");
            kiln_tests::start(&model, &kiln_tests::test_config()).expect("engine start").handle
        })
        .clone()
}

fn state(keys: &[&str]) -> Arc<AppState> {
    Arc::new(AppState::new(MODEL.into(), keys.iter().map(|k| k.to_string()).collect(), "fp_test".into()))
}

/// A router with the engine loaded and no API keys.
fn app() -> Router {
    let s = state(&[]);
    s.set_engine(engine());
    router(s)
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// OpenAI's error shape with this status; returns the inner object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert!(self.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
        let e = self.json()["error"].clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error without '{k}': {e}");
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "{e}");
        e
    }
}

async fn send(app: &Router, req: Request<Body>) -> Resp {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    Resp { status: parts.status, headers: parts.headers, body: body.collect().await.expect("body").to_bytes() }
}

fn req(method: Method, uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

async fn get(app: &Router, uri: &str) -> Resp {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post(app: &Router, uri: &str, body: Value) -> Resp {
    send(app, req(Method::POST, uri, body.to_string())).await
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 4, "temperature": 0});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test]
async fn request_id_echoed_or_generated_on_every_response() {
    let app = app();
    let with = |uri: &str, id: &str| Request::get(uri).header("x-request-id", id).body(Body::empty()).unwrap();
    for uri in ["/health", "/v1/models", "/no/such/route", "/metrics"] {
        let r = send(&app, with(uri, "req-abc-123")).await;
        assert_eq!(r.headers["x-request-id"], "req-abc-123", "{uri}");
        let r = get(&app, uri).await;
        let id = r.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(id.len() >= 16, "{uri}: generated id '{id}'");
        assert_ne!(id, get(&app, uri).await.headers["x-request-id"].to_str().unwrap(), "ids are unique");
    }
    // A POST that fails validation still carries it.
    let r = send(
        &app,
        Request::post("/v1/chat/completions").header("x-request-id", "bad-req").body(Body::from("{")).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.headers["x-request-id"], "bad-req");
    // An unusable id (too long) is replaced, not echoed.
    let long = "x".repeat(300);
    let r = send(&app, with("/health", &long)).await;
    assert_ne!(r.headers["x-request-id"].to_str().unwrap(), long);
}

#[tokio::test]
async fn unavailable_until_the_engine_is_set() {
    let s = state(&[]);
    let app = router(s.clone());
    let e = get(&app, "/health").await.error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(e["type"], "service_unavailable_error");
    post(&app, "/v1/chat/completions", chat_body(json!({}))).await.error(StatusCode::SERVICE_UNAVAILABLE);
    post(&app, "/v1/completions", json!({"model": MODEL, "prompt": "Hi"})).await.error(StatusCode::SERVICE_UNAVAILABLE);
    post(&app, "/tokenize", json!({"prompt": "Hi"})).await.error(StatusCode::SERVICE_UNAVAILABLE);
    // Validation still answers 4xx while loading: a client mistake is never a 5xx.
    post(&app, "/v1/chat/completions", json!({"model": MODEL})).await.error(StatusCode::BAD_REQUEST);
    let m = get(&app, "/metrics").await;
    assert_eq!(m.status, StatusCode::OK, "metrics are scrapeable while loading");
    assert!(m.text().contains("kiln:http_requests_total"));

    s.set_engine(engine());
    let r = get(&app, "/health").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = post(&app, "/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    s.begin_shutdown();
    get(&app, "/health").await.error(StatusCode::SERVICE_UNAVAILABLE);
    post(&app, "/v1/chat/completions", chat_body(json!({}))).await.error(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn wrong_method_is_json_405() {
    let app = app();
    for (method, uri) in [
        (Method::GET, "/v1/chat/completions"),
        (Method::GET, "/v1/completions"),
        (Method::DELETE, "/v1/models"),
        (Method::POST, "/v1/models/x"),
        (Method::PUT, "/tokenize"),
        (Method::POST, "/metrics"),
        (Method::POST, "/health"),
    ] {
        let r = send(&app, req(method.clone(), uri, "")).await;
        let e = r.error(StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e["type"], "invalid_request_error", "{method} {uri}");
    }
}

#[tokio::test]
async fn unknown_route_is_json_404() {
    let app = app();
    for uri in ["/", "/v1", "/v1/chat", "/v2/models"] {
        let e = get(&app, uri).await.error(StatusCode::NOT_FOUND);
        assert!(e["message"].as_str().unwrap().contains(uri), "{e}");
    }
    let e = get(&app, "/v1/models/other-model").await.error(StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "model_not_found");
}

#[tokio::test]
async fn tokenize_detokenize_roundtrip() {
    let app = app();
    let text = "Hello, world! Grüße, 你好 🎉 \n\tdone.";
    let r = post(&app, "/tokenize", json!({"model": MODEL, "prompt": text, "add_special_tokens": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let t = r.json();
    let ids = t["tokens"].as_array().unwrap().clone();
    assert_eq!(t["count"], ids.len());
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    let r = post(&app, "/detokenize", json!({"model": MODEL, "tokens": ids})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["prompt"], text);

    // Chat messages through the template are longer than the bare text.
    let r = post(&app, "/tokenize", json!({"messages": [{"role": "user", "content": text}]})).await;
    assert!(r.json()["count"].as_u64().unwrap() > ids.len() as u64);

    post(&app, "/tokenize", json!({"model": "other", "prompt": "x"})).await.error(StatusCode::NOT_FOUND);
    let e = post(&app, "/detokenize", json!({"tokens": [u32::MAX]})).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "tokens");
    let e = post(&app, "/tokenize", json!({})).await.error(StatusCode::BAD_REQUEST);
    assert!(e["param"].is_string());
}

/// `name{labels} value` -> (name, labels, value).
fn sample(line: &str) -> (&str, &str, f64) {
    let (head, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line '{line}'"));
    let value: f64 =
        if value == "+Inf" { f64::INFINITY } else { value.parse().unwrap_or_else(|_| panic!("bad value in '{line}'")) };
    match head.split_once('{') {
        Some((name, labels)) => {
            assert!(labels.ends_with('}'), "{line}");
            (name, labels, value)
        }
        None => (head, "", value),
    }
}

#[tokio::test]
async fn metrics_use_vllm_names_with_kiln_prefix() {
    let app = app();
    let r = post(&app, "/v1/chat/completions", chat_body(json!({"max_tokens": 3, "ignore_eos": true}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = get(&app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
    let text = r.text();
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
        } else if !line.starts_with("# HELP ") {
            let (name, labels, v) = sample(line);
            // kiln's names, plus the few vLLM gauges the Kubernetes endpoint pickers read.
            assert!(name.starts_with("kiln:") || name.starts_with("vllm:"), "{line}");
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(typed.contains(name) || typed.contains(family), "sample before its # TYPE: {line}");
            samples.push((name.to_string(), labels.to_string(), v));
        }
    }
    let has = |name: &str| samples.iter().any(|(n, _, _)| n == name);
    for name in [
        "kiln:num_requests_running",
        "kiln:num_requests_waiting",
        "kiln:kv_cache_usage_perc",
        "kiln:kv_blocks_used",
        "kiln:kv_blocks_total",
        "kiln:num_preemptions_total",
        "kiln:prompt_tokens_total",
        "kiln:generation_tokens_total",
        "kiln:request_success_total",
        "kiln:http_requests_total",
        "kiln:time_to_first_token_seconds_bucket",
        "kiln:inter_token_latency_seconds_bucket",
        "kiln:e2e_request_latency_seconds_bucket",
        "kiln:e2e_request_latency_seconds_sum",
        "kiln:e2e_request_latency_seconds_count",
    ] {
        assert!(has(name), "{name} missing from:\n{text}");
    }
    let value = |name: &str, label: &str| samples.iter().find(|(n, l, _)| n == name && l.contains(label)).map(|s| s.2);
    assert_eq!(value("kiln:generation_tokens_total", ""), Some(3.0));
    assert!(value("kiln:prompt_tokens_total", "").unwrap() > 0.0);
    assert_eq!(value("kiln:http_requests_total", "route=\"/v1/chat/completions\",status=\"200\""), Some(1.0));
    assert_eq!(value("kiln:request_success_total", "finished_reason=\"length\""), Some(1.0));
    assert!(value("kiln:kv_blocks_total", "").unwrap() > 0.0);
    // Histograms: cumulative buckets, +Inf == count.
    for family in
        ["kiln:time_to_first_token_seconds", "kiln:inter_token_latency_seconds", "kiln:e2e_request_latency_seconds"]
    {
        let buckets: Vec<f64> =
            samples.iter().filter(|(n, _, _)| *n == format!("{family}_bucket")).map(|s| s.2).collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{family}: {buckets:?}");
        let inf =
            samples.iter().find(|(n, l, _)| *n == format!("{family}_bucket") && l.contains("le=\"+Inf\"")).unwrap().2;
        assert_eq!(Some(inf), value(&format!("{family}_count"), ""), "{family}");
    }
    assert_eq!(value("kiln:time_to_first_token_seconds_count", ""), Some(1.0));
    assert_eq!(value("kiln:inter_token_latency_seconds_count", ""), Some(2.0), "3 tokens, 2 gaps");
}

#[tokio::test]
async fn body_too_large_is_json_413() {
    let app = app();
    let big = format!(r#"{{"model": "{MODEL}", "prompt": "{}"}}"#, "a".repeat(MAX_BODY_BYTES + 1));
    for uri in ["/v1/completions", "/v1/chat/completions", "/tokenize"] {
        let e = send(&app, req(Method::POST, uri, big.clone())).await.error(StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e["type"], "invalid_request_error", "{uri}");
    }
}

#[tokio::test]
async fn malformed_json_is_400_with_null_param() {
    let app = app();
    // The last one is a complete request followed by garbage.
    let trailing = r#"{"model": "x", "messages": [], "prompt": "a", "tokens": []} {"#;
    for body in ["{", "", "not json", r#"{"model": "m",}"#, trailing] {
        for uri in ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"] {
            let e = send(&app, req(Method::POST, uri, body)).await.error(StatusCode::BAD_REQUEST);
            assert!(e["param"].is_null(), "{uri} {body:?}: {e}");
        }
    }
}

#[tokio::test]
async fn wrong_types_name_the_field() {
    let app = app();
    for (extra, param) in [
        (json!({"max_tokens": "ten"}), "max_tokens"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"n": 1.5}), "n"),
        (json!({"stop": 7}), "stop"),
        (json!({"seed": "x"}), "seed"),
        (json!({"logprobs": "yes"}), "logprobs"),
        (json!({"stream": "no"}), "stream"),
        (json!({"stream": true, "stream_options": {"include_usage": 1}}), "stream_options.include_usage"),
        (json!({"messages": "Hi"}), "messages"),
        (json!({"model": 5}), "model"),
        (json!({"logit_bias": {"5": "up"}}), "logit_bias.5"),
    ] {
        let e = post(&app, "/v1/chat/completions", chat_body(extra.clone())).await.error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{extra}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    let e = post(&app, "/v1/completions", json!({"model": MODEL, "prompt": {"text": "Hi"}}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "prompt");
    // A missing required field is named too.
    let e = post(&app, "/v1/chat/completions", json!({"model": MODEL})).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "messages");
    let e = post(&app, "/v1/completions", json!({"prompt": "Hi"})).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "model");
}

#[tokio::test]
async fn bad_values_are_400_naming_the_field() {
    let app = app();
    for (extra, param) in [
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {"-1": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"n": 0}), "n"),
        (json!({"n": -1}), "n"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_completion_tokens": -2}), "max_completion_tokens"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"stop": [""]}), "stop"),
        (json!({"stream_options": {"include_usage": true}}), "stream_options"),
        (json!({"messages": []}), "messages"),
        (json!({"tools": []}), "tools"),
        (json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}), "tools[0].function.name"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (json!({"tool_choice": "auto"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"response_format": {"type": "xml"}}), "response_format"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ] {
        let e = post(&app, "/v1/chat/completions", chat_body(extra.clone())).await.error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{extra}: {e}");
    }
    for (body, param) in [
        (json!({"model": MODEL, "prompt": "Hi", "n": 0}), "n"),
        (json!({"model": MODEL, "prompt": "Hi", "logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"model": MODEL, "prompt": [], "max_tokens": 1}), "prompt"),
        (json!({"model": MODEL, "prompt": [4_000_000], "max_tokens": 1}), "prompt"),
        (json!({"model": MODEL, "prompt": "Hi", "suffix": "!"}), "suffix"),
        (
            json!({"model": MODEL, "prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 3, "if": {}}}}}),
            "response_format",
        ),
    ] {
        let e = post(&app, "/v1/completions", body.clone()).await.error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    let e = post(&app, "/v1/chat/completions", chat_body(json!({"max_tokens": 1_000_000})))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "context_length_exceeded");
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let s = state(&["k1", "k2"]);
    s.set_engine(engine());
    let app = router(s);
    let with_key = |method: Method, uri: &str, auth: Option<&str>| {
        let mut b = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::from(json!({"prompt": "hi", "tokens": [1]}).to_string())).unwrap()
    };
    for (method, uri) in [
        (Method::GET, "/metrics"),
        (Method::POST, "/tokenize"),
        (Method::POST, "/detokenize"),
        (Method::GET, "/v1/models"),
        (Method::POST, "/v1/chat/completions"),
        (Method::POST, "/v1/completions"),
        (Method::GET, "/no/such/route"),
    ] {
        for auth in [None, Some("Bearer nope"), Some("k1"), Some("Basic k1")] {
            let r = send(&app, with_key(method.clone(), uri, auth)).await;
            let e = r.error(StatusCode::UNAUTHORIZED);
            assert_eq!(
                (e["type"].as_str(), e["code"].as_str()),
                (Some("authentication_error"), Some("invalid_api_key")),
                "{uri} {auth:?}"
            );
            assert!(r.headers.contains_key("x-request-id"));
        }
    }
    assert_eq!(send(&app, with_key(Method::GET, "/health", None)).await.status, StatusCode::OK);
    assert_eq!(send(&app, with_key(Method::GET, "/metrics", Some("Bearer k2"))).await.status, StatusCode::OK);
    let r = send(&app, with_key(Method::POST, "/tokenize", Some("Bearer k1"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn chat_json_and_sse_framing() {
    let app = app();
    let r = post(&app, "/v1/chat/completions", chat_body(json!({"max_tokens": 6}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["system_fingerprint"], "fp_test");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let u = &v["usage"];
    assert_eq!(u["total_tokens"], u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap());
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ") || e.starts_with(':')), "{text}");
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, body) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    // Same counts; the second request may find its prompt in the prefix cache.
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], v["usage"][k], "streamed usage == non-streamed usage (greedy)");
    }
    assert!(last["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert!(body
        .iter()
        .all(|c| c["usage"].is_null() && c["object"] == "chat.completion.chunk" && c["id"] == last["id"]));
    let content: String = body.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, v["choices"][0]["message"]["content"].as_str().unwrap());

    // An error before the stream starts is a plain JSON error, not SSE.
    let r = post(&app, "/v1/chat/completions", chat_body(json!({"stream": true, "temperature": 9}))).await;
    r.error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn completions_choices_are_numbered_per_prompt() -> Result<()> {
    let app = app();
    let r = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": ["One", "Two", "Three"], "n": 2, "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let idx: Vec<u64> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
    let texts: Vec<&str> = v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts[0], texts[1], "greedy choices of one prompt agree");
    Ok(())
}

/// A `response_format` with `n` string properties: issue 14's reproducer at 6,500 (~300 KB), which
/// overflowed a 2 MiB worker stack inside llguidance's JSON compiler and aborted the process.
fn wide_format(n: usize, required: bool) -> Value {
    let names: Vec<String> = (0..n).map(|i| format!("property_number_{i:05}_name")).collect();
    let props: serde_json::Map<String, Value> = names.iter().map(|k| (k.clone(), json!({"type": "string"}))).collect();
    let mut schema = json!({"type": "object", "properties": props});
    if required {
        schema["required"] = json!(names);
    }
    json!({"type": "json_schema", "json_schema": {"name": "wide", "schema": schema}})
}

/// A schema nested `levels` objects deep.
fn deep_format(levels: usize) -> Value {
    let mut s = json!({"type": "string"});
    for _ in 0..levels {
        s = json!({"type": "object", "properties": {"a": s}});
    }
    json!({"type": "json_schema", "json_schema": {"name": "deep", "schema": s}})
}

#[tokio::test]
async fn a_huge_schema_compiles_off_the_runtime_without_crashing() {
    let app = app();
    let completion =
        |format: &Value| json!({"model": MODEL, "prompt": "JSON:", "max_tokens": 2, "response_format": format});
    // All required: compiles (on the large compile stack) and decodes.
    let wide = wide_format(6_500, true);
    assert!(wide.to_string().len() > 300_000);
    let chat = post(&app, "/v1/chat/completions", chat_body(json!({"response_format": wide, "max_tokens": 2}))).await;
    assert_eq!(chat.status, StatusCode::OK, "{}", chat.text());
    let r = post(&app, "/v1/completions", completion(&wide)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // All optional (the reproducer as sent): compiles too, but once the model opens the object
    // any of 6,500 keys may come next, past the grammar engine's per-step limit: a 400 naming it
    // (greedy chat does this) or, if the model closes the object at once, `{}` (completions).
    let wide = wide_format(6_500, false);
    let chat = post(&app, "/v1/chat/completions", chat_body(json!({"response_format": wide, "max_tokens": 2}))).await;
    let completions = post(&app, "/v1/completions", completion(&wide)).await;
    for r in [chat, completions] {
        if r.status != StatusCode::OK {
            let e = r.error(StatusCode::BAD_REQUEST);
            assert_eq!((e["param"].as_str(), e["code"].as_str()), (Some("response_format"), Some("grammar_too_large")));
        }
    }
    assert_eq!(post(&app, "/v1/chat/completions", chat_body(json!({}))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn grammars_over_the_limits_are_400_naming_the_limit() {
    let app = app();
    let enum_values: Vec<u32> = (0..100_001).collect();
    let too_many = json!({"type": "json_schema", "json_schema": {"name": "many", "schema": {"enum": enum_values}}});
    for (format, limit) in [
        (wide_format(25_000, false), "max_grammar_bytes"),
        (deep_format(40), "max_grammar_depth"),
        (too_many, "max_grammar_nodes"),
    ] {
        let e = post(&app, "/v1/chat/completions", chat_body(json!({"response_format": format})))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!((e["param"].as_str(), e["code"].as_str()), (Some("response_format"), Some("grammar_too_large")));
        assert!(e["message"].as_str().unwrap().contains(limit), "{e}");
        let body = json!({"model": MODEL, "prompt": "JSON:", "max_tokens": 2, "response_format": format});
        let e = post(&app, "/v1/completions", body).await.error(StatusCode::BAD_REQUEST);
        assert!(e["message"].as_str().unwrap().contains(limit), "{e}");
    }
}

#[tokio::test]
async fn a_self_referencing_schema_is_a_short_400() {
    let app = app();
    let format = json!({"type": "json_schema", "json_schema": {"name": "loop", "schema": {"$ref": "#"}}});
    for (uri, body) in [
        ("/v1/chat/completions", chat_body(json!({"response_format": format}))),
        ("/v1/completions", json!({"model": MODEL, "prompt": "JSON:", "max_tokens": 2, "response_format": format})),
    ] {
        let e = post(&app, uri, body).await.error(StatusCode::BAD_REQUEST);
        let m = e["message"].as_str().unwrap();
        assert_eq!(e["param"], "response_format", "{e}");
        // One short sentence: no parser state, no grammar dump, no internal positions.
        assert!(m.len() < 300 && !m.contains('\n') && !m.to_lowercase().contains("state"), "{m}");
    }
}

#[tokio::test]
async fn a_named_parameterless_tool_gets_empty_arguments_on_every_seed() {
    let app = app();
    // As issue 10 measured it: neither schema says `additionalProperties`.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]);
    for seed in 0..20 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "What time is it in Oslo?"}],
            "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "temperature": 1.0, "seed": seed, "max_tokens": 64});
        let r = post(&app, "/v1/chat/completions", body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let calls = r.json()["choices"][0]["message"]["tool_calls"].clone();
        assert_eq!(calls[0]["function"]["arguments"], "{}", "seed {seed}: {calls}");
        assert_eq!(calls.as_array().map(Vec::len), Some(1), "seed {seed}: {calls}");
    }
}

/// `/tokenize` with `messages` and `tools` renders exactly what a chat request with those tools
/// prefills (the tools are part of the prompt), not the bare messages.
#[tokio::test]
async fn tokenize_with_tools_counts_what_chat_prefills() {
    let app = app();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let messages = json!([{"role": "user", "content": "Weather in Oslo?"}]);
    let with_tools = post(&app, "/tokenize", json!({"model": MODEL, "messages": messages, "tools": tools})).await;
    assert_eq!(with_tools.status, StatusCode::OK, "{}", with_tools.text());
    let bare = post(&app, "/tokenize", json!({"model": MODEL, "messages": messages})).await;
    let chat = json!({"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 1});
    let c = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text());
    let count = with_tools.json()["count"].as_u64().unwrap();
    assert_eq!(count, c.json()["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(count > bare.json()["count"].as_u64().unwrap() + 20, "the tools were not rendered");
}
