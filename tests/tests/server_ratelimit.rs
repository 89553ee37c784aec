//! Issue 14's rate limits and audit log through the router, in-process, on the real SmolLM2
//! engine: a burst gets exactly the bucket and then 429s with OpenAI's body, `Retry-After` and
//! `x-ratelimit-*` headers, and recovers after the refill; keys are isolated from each other;
//! tokens are charged from real usage; `/health` and `/metrics` are never limited; every denial
//! (401, 403, 429) is an audit-log JSON line without the key.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_inference::engine::EngineHandle;
use kiln_server::api::audit::AuditLog;
use kiln_server::api::ratelimit::{RateLimits, TierLimits};
use kiln_server::api::{router, AppState};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m-instruct-q4_1";

fn engine() -> EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let model = kiln_tests::smollm2().expect("the default model");
            kiln_tests::start(&model, &kiln_tests::test_config()).expect("engine start").handle
        })
        .clone()
}

fn app_with(keys: &[&str], limits: RateLimits, audit: Option<AuditLog>) -> Router {
    let mut s =
        AppState::new(MODEL.into(), keys.iter().map(|k| k.to_string()).collect(), "fp".into()).with_rate_limits(limits);
    if let Some(log) = audit {
        s = s.with_audit_log(log);
    }
    let s = Arc::new(s);
    s.set_engine(engine());
    router(s)
}

fn per(period: Duration, key: TierLimits, anonymous: TierLimits) -> RateLimits {
    RateLimits { key, anonymous, period, ..RateLimits::default() }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).unwrap_or_else(|| panic!("no {name}: {:?}", self.headers)).to_str().unwrap()
    }

    fn num(&self, name: &str) -> u64 {
        self.header(name).parse().unwrap()
    }
}

async fn get(app: &Router, uri: &str, key: Option<&str>) -> Resp {
    let mut b = Request::get(uri).header("host", "localhost");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    send(app, b.body(Body::empty()).unwrap()).await
}

async fn send(app: &Router, req: Request<Body>) -> Resp {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    Resp { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

/// Sends `n` requests back to back; the statuses in order.
async fn burst(app: &Router, n: usize, key: Option<&str>) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(app, "/v1/models", key).await.status);
    }
    out
}

fn assert_rate_limited(r: &Resp) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let e: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error", "{e}");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{e}");
    assert!(r.num("retry-after") >= 1);
}

#[tokio::test]
async fn a_burst_gets_the_bucket_then_429_and_recovers_at_the_rate() {
    // 20 requests per 4 s: a burst of 20, then one more every 200 ms.
    let limits = per(Duration::from_secs(4), TierLimits::default(), TierLimits { requests: 20, tokens: 0 });
    let app = app_with(&[], limits, None);
    let first = get(&app, "/v1/models", None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!((first.num("x-ratelimit-limit-requests"), first.num("x-ratelimit-remaining-requests")), (20, 19));
    assert!(first.header("x-ratelimit-reset-requests").ends_with("ms"), "{:?}", first.headers);
    assert!(!first.headers.contains_key("x-ratelimit-limit-tokens"), "no token limit configured");
    let statuses = burst(&app, 19, None).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    let refused = get(&app, "/v1/models", None).await;
    assert_rate_limited(&refused);
    assert_eq!(refused.num("x-ratelimit-remaining-requests"), 0);
    assert_eq!(refused.num("retry-after"), 1);
    // /health and /metrics are never limited.
    assert_eq!(get(&app, "/health", None).await.status, StatusCode::OK);
    let metrics = get(&app, "/metrics", None).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("kiln:rate_limited_total{tier=\"anonymous\"} 1"));

    // Recovery at the configured rate: over 2 s, 10 more requests (within ±10%) get through.
    let start = Instant::now();
    let mut admitted = 0;
    while start.elapsed() < Duration::from_secs(2) {
        admitted += usize::from(get(&app, "/v1/models", None).await.status == StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!((9..=11).contains(&admitted), "{admitted} admitted in 2 s at 5/s");
    // After a full period the whole burst is back.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    assert_eq!(get(&app, "/v1/models", None).await.num("x-ratelimit-remaining-requests"), 19);
}

#[tokio::test]
async fn keys_are_isolated_and_the_global_tier_covers_all() {
    let limits = RateLimits {
        global: TierLimits { requests: 8, tokens: 0 },
        ..per(Duration::from_secs(60), TierLimits { requests: 3, tokens: 0 }, TierLimits::default())
    };
    let app = app_with(&["alpha", "beta", "gamma"], limits, None);
    let a = burst(&app, 4, Some("alpha")).await;
    assert_eq!(a, [StatusCode::OK, StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    // beta is not limited by alpha's exhaustion.
    let b = burst(&app, 3, Some("beta")).await;
    assert!(b.iter().all(|s| *s == StatusCode::OK), "{b:?}");
    // A wrong key is a 401, not a bucket.
    assert_eq!(get(&app, "/v1/models", Some("wrong")).await.status, StatusCode::UNAUTHORIZED);
    // The global tier (8 per period) has 2 left: gamma gets 2, then the global tier refuses.
    let g = burst(&app, 3, Some("gamma")).await;
    assert_eq!(g, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    let m = String::from_utf8_lossy(&get(&app, "/metrics", Some("alpha")).await.body).to_string();
    assert!(m.contains("kiln:rate_limited_total{tier=\"key\"} 1"), "{m}");
    assert!(m.contains("kiln:rate_limited_total{tier=\"global\"} 1"), "{m}");
}

#[tokio::test]
async fn tokens_are_charged_from_real_usage() {
    // 1,000 tokens per minute for the anonymous tier; no request limit.
    let limits = per(Duration::from_secs(60), TierLimits::default(), TierLimits { requests: 0, tokens: 1000 });
    let app = app_with(&[], limits, None);
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let req = || {
        Request::post("/v1/completions")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let r = send(&app, req()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // Headers describe the state at admission: nothing was charged yet.
    assert_eq!((r.num("x-ratelimit-limit-tokens"), r.num("x-ratelimit-remaining-tokens")), (1000, 1000));
    let usage = serde_json::from_slice::<Value>(&r.body).unwrap()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(usage > 0);
    let next = get(&app, "/v1/models", None).await;
    let remaining = next.num("x-ratelimit-remaining-tokens");
    // The refill over the elapsed milliseconds adds at most a token or two.
    assert!((1000 - usage..=1000 - usage + 2).contains(&remaining), "{remaining} after {usage} used");
}

#[tokio::test]
async fn a_stream_is_charged_its_generated_tokens_when_it_ends() {
    let limits = per(Duration::from_secs(60), TierLimits::default(), TierLimits { requests: 0, tokens: 1000 });
    let app = app_with(&[], limits, None);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to ten"}], "max_tokens": 12,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let req = Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let r = send(&app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.num("x-ratelimit-remaining-tokens"), 1000);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["total_tokens"].as_u64())
        .expect("a usage chunk");
    assert!(usage > 12, "prompt and completion: {usage}");
    let remaining = get(&app, "/v1/models", None).await.num("x-ratelimit-remaining-tokens");
    assert!((1000 - usage..=1000 - usage + 2).contains(&remaining), "{remaining} after {usage} used");
}

async fn read_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the audit log has fewer than {n} lines: {:?}", std::fs::read_to_string(path));
}

#[tokio::test]
async fn the_audit_log_records_each_denial_without_the_key() {
    let path = std::env::temp_dir().join(format!("kiln-audit-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let log = AuditLog::open(path.to_str().unwrap()).unwrap();
    let limits = per(Duration::from_secs(60), TierLimits { requests: 1, tokens: 0 }, TierLimits::default());
    let secret = "sk-very-secret-key";
    let app = app_with(&[secret], limits, Some(log));
    assert_eq!(get(&app, "/v1/models", Some("sk-wrong")).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/v1/models", Some(secret)).await.status, StatusCode::OK);
    let refused = get(&app, "/v1/models", Some(secret)).await;
    assert_rate_limited(&refused);
    let with_origin = Request::get("/v1/models")
        .header("host", "localhost")
        .header("origin", "https://evil.example")
        .header("authorization", format!("Bearer {secret}"))
        .body(Body::empty())
        .unwrap();
    // With a key, an Origin is only checked when an allowlist is set: not a denial here.
    assert_eq!(send(&app, with_origin).await.status, StatusCode::TOO_MANY_REQUESTS);
    let lines = read_lines(&path, 3).await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(secret) && !text.contains("sk-wrong"), "{text}");
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["auth_failure", "rate_limited", "rate_limited"]);
    for l in &lines {
        for k in ["timestamp", "event", "route", "method", "client", "request_id", "status"] {
            assert!(!l[k].is_null(), "{k} missing: {l}");
        }
        assert_eq!((l["route"].as_str(), l["method"].as_str()), (Some("/v1/models"), Some("GET")));
        assert!(l["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(lines[0]["status"], 401);
    assert_eq!((lines[1]["status"].as_u64(), lines[1]["tier"].as_str()), (Some(429), Some("key")));
    assert_eq!(lines[1]["client"], kiln_server::api::audit::fingerprint(secret));
    assert_eq!(lines[1]["client"].as_str().unwrap().len(), 12);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn host_refusals_are_audited() {
    let path = std::env::temp_dir().join(format!("kiln-audit-host-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let app = app_with(&[], RateLimits::default(), Some(AuditLog::open(path.to_str().unwrap()).unwrap()));
    let req = Request::get("/v1/models").header("host", "evil.example").header("x-request-id", "rid-1");
    assert_eq!(send(&app, req.body(Body::empty()).unwrap()).await.status, StatusCode::FORBIDDEN);
    let lines = read_lines(&path, 1).await;
    assert_eq!(lines[0]["event"], "access_refused");
    assert_eq!(lines[0]["status"], 403);
    assert_eq!(lines[0]["request_id"], "rid-1");
    assert_eq!(lines[0]["client"], "anonymous");
    let _ = std::fs::remove_file(&path);
}
