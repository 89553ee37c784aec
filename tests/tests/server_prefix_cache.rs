//! Prefix caching and admission control through the HTTP API (the axum router in-process, on
//! the real SmolLM2 engine): a 5-turn chat over a ~2,000-token system prompt reports in
//! `usage.prompt_tokens_details.cached_tokens` (plain and streamed) that each turn reused at
//! least 95% of the previous turn's prompt, with the same answers as with caching off; a burst
//! over `max_waiting_seqs` gets 429 + `Retry-After` in OpenAI's error shape while the rest
//! complete; `/metrics` exposes the prefix-cache counters and the `vllm:` gauges. Requests that
//! could never be admitted (too many prompts or prompt tokens for what may wait, more than the
//! KV cache holds) are 400s naming the field, never 429s.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_inference::engine::{EngineConfig, EngineHandle};
use kiln_server::api::{router, AppState};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m-instruct-q4_1";

fn app(cfg: EngineConfig) -> (Router, EngineHandle) {
    let model = kiln_tests::smollm2().expect("the default model");
    let engine = kiln_tests::start(&model, &cfg).expect("engine start").handle;
    let state = Arc::new(AppState::new(MODEL.into(), Vec::new(), "fp_test".into()));
    state.set_engine(engine.clone());
    (router(state), engine)
}

/// POSTs `body`; returns status, the Retry-After header and the body (JSON, or SSE text).
async fn post(app: &Router, uri: &str, body: &Value) -> (StatusCode, Option<String>, String) {
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let retry = resp.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap_or_default().to_string());
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, retry, String::from_utf8_lossy(&bytes).into_owned())
}

/// ~2,000 tokens of instructions.
fn long_system() -> String {
    (0..95)
        .map(|i| format!("Rule {i}: answer politely, cite rule {i} when asked, and keep it short."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `usage` of a plain response, or of the last chunk of a streamed one.
fn usage(body: &str, stream: bool) -> Value {
    if !stream {
        return serde_json::from_str::<Value>(body).expect("JSON")["usage"].clone();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .next_back()
        .expect("a usage chunk")
}

fn answer(body: &str, stream: bool) -> String {
    if !stream {
        let v: Value = serde_json::from_str(body).expect("JSON");
        return v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

/// Runs the 5-turn conversation; returns each turn's (prompt_tokens, cached_tokens, answer).
async fn conversation(app: &Router, stream: bool) -> Vec<(u64, u64, String)> {
    let mut messages = vec![json!({"role": "system", "content": long_system()})];
    let mut turns = Vec::new();
    for q in ["Hello!", "What is rule 3?", "And rule 40?", "Summarize rule 7.", "Thanks, bye."] {
        messages.push(json!({"role": "user", "content": q}));
        let mut body = json!({"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let (status, _, text) = post(app, "/v1/chat/completions", &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let u = usage(&text, stream);
        let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens");
        let content = answer(&text, stream);
        turns.push((u["prompt_tokens"].as_u64().expect("prompt_tokens"), cached, content.clone()));
        messages.push(json!({"role": "assistant", "content": content}));
    }
    turns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_chat_reuses_the_previous_prompt_and_answers_the_same() {
    let (on, _) = app(kiln_tests::test_config());
    let (off, _) = app(EngineConfig { enable_prefix_caching: false, ..kiln_tests::test_config() });
    let want = conversation(&off, false).await;
    assert!(want[0].0 > 1500, "the system prompt is {} tokens", want[0].0);
    assert!(want.iter().all(|t| t.1 == 0), "caching off reported cached tokens: {want:?}");
    for stream in [false, true] {
        let got = conversation(&on, stream).await;
        for (i, ((p, cached, text), (_, _, want_text))) in got.iter().zip(&want).enumerate() {
            assert_eq!(text, want_text, "turn {i} (stream {stream}): caching changed the answer");
            if i > 0 {
                let prev = got[i - 1].0;
                assert!(*cached as f64 >= 0.95 * prev as f64, "turn {i}: cached {cached} of previous {prev} (now {p})");
            }
        }
        eprintln!(
            "stream={stream}: (prompt, cached) per turn = {:?}",
            got.iter().map(|t| (t.0, t.1)).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_max_waiting_gets_429_with_retry_after() {
    let cfg = EngineConfig { max_waiting_seqs: 4, max_num_seqs: 1, ..kiln_tests::test_config() };
    let (app, _) = app(cfg);
    // Each request runs 96 steps alone, far longer than the burst takes to arrive.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}],
                      "max_tokens": 96, "ignore_eos": true});
    // Collected first: all 32 are in flight before any answer is awaited.
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let (app, body) = (app.clone(), body.clone());
            tokio::spawn(async move { post(&app, "/v1/chat/completions", &body).await })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for c in calls {
        let (status, retry, text) = c.await.expect("task");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()), "429 without Retry-After");
                let e: Value = serde_json::from_str(&text).expect("JSON error");
                assert_eq!(e["error"]["type"], "rate_limit_error", "{e}");
                assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert!(ok >= 5 && limited >= 16, "ok {ok}, limited {limited}");
    let (status, metrics) = get_metrics(&app).await;
    assert_eq!(status, StatusCode::OK);
    let rejected = metric(&metrics, "kiln:num_requests_rejected_total");
    assert_eq!(rejected, limited as f64, "{metrics}");
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ] {
        let v = metric(&metrics, name);
        assert!((0.0..=32.0).contains(&v), "{name} = {v}");
    }
    for name in ["kiln:prefix_cache_queries_total", "kiln:prefix_cache_hits_total", "kiln:prefix_cache_evictions_total"]
    {
        assert!(metric(&metrics, name) >= 0.0);
    }
    assert!(metric(&metrics, "kiln:prefix_cache_hits_total") > 0.0, "identical prompts never hit the cache");
}

async fn get_metrics(app: &Router) -> (StatusCode, String) {
    let resp = app.clone().oneshot(Request::get("/metrics").body(Body::empty()).expect("request")).await.expect("ok");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The value of the first sample of `name` (any labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// A completions request with more prompts than may ever wait at once can never be admitted
/// whole: a 400 naming `prompt`, not a 429 that no retry could satisfy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_prompts_than_can_ever_wait_is_a_400() {
    let cfg = EngineConfig { max_waiting_seqs: 4, ..kiln_tests::test_config() };
    let (app, _) = app(cfg);
    let body = json!({"model": MODEL, "prompt": vec!["Hi"; 5], "max_tokens": 1});
    let (status, _, text) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let e: Value = serde_json::from_str(&text).expect("JSON error");
    assert_eq!(e["error"]["param"], "prompt", "{e}");
    let body = json!({"model": MODEL, "prompt": vec!["Hi"; 4], "max_tokens": 1});
    let (status, _, text) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

/// What no wait can cure is a 400 naming the field, whatever else runs: prompts whose tokens
/// together exceed `max_waiting_tokens`, and `max_tokens` past what the KV cache holds. The
/// same prompts one at a time are served, and the waiting-tokens gauge is back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_can_never_be_admitted_is_a_400_not_a_429() {
    let cfg =
        EngineConfig { max_waiting_tokens: Some(256), num_blocks_override: Some(32), ..kiln_tests::test_config() };
    let (app, _) = app(cfg);
    let prompt: Vec<u32> = (0..100).map(|i| 1000 + i).collect();
    let three = json!({"model": MODEL, "prompt": vec![prompt.clone(); 3], "max_tokens": 1});
    let (status, retry, text) = post(&app, "/v1/completions", &three).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(retry.is_none());
    let e: Value = serde_json::from_str(&text).expect("JSON error");
    assert_eq!(
        (e["error"]["param"].as_str(), e["error"]["code"].as_str()),
        (Some("prompt"), Some("request_too_large"))
    );
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 600});
    let (status, _, text) = post(&app, "/v1/chat/completions", &long).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let e: Value = serde_json::from_str(&text).expect("JSON error");
    assert_eq!(e["error"]["param"], "max_tokens", "{e}");
    let two = json!({"model": MODEL, "prompt": vec![prompt; 2], "max_tokens": 1});
    let (status, _, text) = post(&app, "/v1/completions", &two).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (_, metrics) = get_metrics(&app).await;
    assert_eq!(metric(&metrics, "kiln:num_waiting_tokens"), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "kiln:num_requests_rejected_total"), 0.0, "a 400 was counted as a 429");
}
