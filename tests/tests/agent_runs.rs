//! Server-side agents through the HTTP API (the axum router in-process, the real Qwen2.5-Coder
//! engine, the real SQLite run store in a temp dir, the real `mcp-server-time` from PyPI over
//! stdio): an agent from a TOML file uses the calculator and the MCP time tool and completes;
//! its SSE events come in order and `GET /v1/runs/{id}/steps` returns every step; approval
//! pauses and resumes, a rejection reaches the model as the call's error; bad input is 404/400
//! naming the field. Skipped (SKIP printed) when Qwen or the MCP server is not installed; CI
//! installs both.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_server::agents::AgentArgs;
use kiln_server::api::{router, AppState};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tower::ServiceExt;

const MODEL: &str = "qwen";

#[path = "../../agent/tests/support/mcp_servers.rs"]
mod mcp_servers;

/// The MCP config naming the installed time server, or None (SKIP printed).
fn time_server_config(dir: &Path) -> Option<PathBuf> {
    let toml = mcp_servers::time_server("time", 60)?;
    let path = dir.join("mcp.toml");
    std::fs::write(&path, toml).expect("write mcp.toml");
    Some(path)
}

const AGENT: &str = r#"
name = "clerk"
description = "Does arithmetic and tells the time"
instructions = "You are a precise assistant for {{ user }}. Use the calculator tool for any arithmetic and the convert_time tool to convert times between time zones. After the tools answer, reply in one short sentence."
model = "qwen"
tools = ["calculator", "convert_time"]
max_steps = 10
max_tokens_per_step = 160
temperature = 0
"#;

struct App {
    router: Router,
    _dir: tempfile::TempDir,
}

async fn app() -> Option<App> {
    let model = kiln_tests::qwen25()?;
    let dir = tempfile::tempdir().expect("temp dir");
    let mcp = time_server_config(dir.path())?;
    let agents = dir.path().join("agents");
    std::fs::create_dir_all(&agents).expect("agents dir");
    std::fs::write(agents.join("clerk.toml"), AGENT).expect("agent file");
    let engine = kiln_tests::start(&model, &kiln_tests::test_config()).expect("engine start").handle;
    let args = AgentArgs {
        data_dir: Some(dir.path().join("data")),
        agents: Some(agents),
        mcp_config: Some(mcp),
        tool_timeout: 60,
        price_input: Some(1.0),
        price_cached_input: Some(0.5),
        price_output: Some(2.0),
        ..Default::default()
    };
    let started = kiln_server::agents::start(&args, engine.clone(), MODEL.into(), Default::default(), None).await;
    let agents = started.expect("agent runtime");
    let state = Arc::new(AppState::new(MODEL.into(), Vec::new(), "fp_test".into()));
    state.set_agents(agents.runtime.clone());
    state.set_engine(engine);
    std::mem::forget(agents.mcp); // the MCP child lives as long as the test process
    Some(App { router: router(state), _dir: dir })
}

async fn call(app: &App, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, String) {
    let req = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).expect("request");
    let resp = app.router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn json_call(app: &App, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, text) = call(app, method, uri, body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{uri}: {e}: {text}")))
}

/// `(event name, data)` of an SSE body.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = String::new();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((name, serde_json::from_str(&data).expect("event JSON")));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_calculator_and_mcp_time_completes_with_ordered_events_and_every_step() {
    let Some(app) = app().await else { return };
    let input = json!({"input": "First convert 09:30 from Europe/Oslo to Asia/Tokyo with convert_time. Then call the calculator with the expression 1234 * 5678. Then tell me both results.", "variables": {"user": "Ada"}, "stream": true});
    let (status, text) = call(&app, Method::POST, "/v1/agents/clerk/runs", Some(input)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"run.created"), "{names:?}");
    assert_eq!(names.last(), Some(&"run.completed"), "{names:?}\n{text}");
    // Each call is announced before its result, and a step starts before its calls.
    for (i, (name, data)) in events.iter().enumerate() {
        if name == "tool_result" {
            let id = &data["call_id"];
            assert!(events[..i].iter().any(|(n, d)| n == "tool_call" && &d["call_id"] == id), "{names:?}");
        }
        if name == "tool_call" {
            assert!(events[..i].iter().any(|(n, _)| n == "step.started"), "{names:?}");
        }
    }
    for (n, d) in events.iter().filter(|(n, _)| n != "message.delta") {
        eprintln!("{n}: {d}");
    }
    let results: Vec<&Value> = events.iter().filter(|(n, _)| n == "tool_result").map(|(_, d)| d).collect();
    let calc = results.iter().find(|d| d["name"] == "calculator").expect("the calculator was called");
    assert_eq!(calc["content"], "7006652", "{calc}");
    assert!(results.iter().any(|d| d["name"] == "convert_time" && d["is_error"] == false), "{results:?}");
    let run = &events.last().unwrap().1["run"];
    let id = run["id"].as_str().unwrap();
    assert_eq!(run["status"], "completed");
    assert!(run["usage"]["steps"].as_u64().unwrap() >= 3, "{run}");
    // Cost from the configured prices (USD per million tokens: 1 input, 0.5 cached, 2 output).
    let u = &run["usage"];
    let n = |k: &str| u[k].as_f64().unwrap();
    let want =
        ((n("prompt_tokens") - n("cached_tokens")) + 0.5 * n("cached_tokens") + 2.0 * n("completion_tokens")) / 1e6;
    assert!((run["cost"]["total"].as_f64().unwrap() - want).abs() < 1e-12, "{run}");
    let (_, steps) = json_call(&app, Method::GET, &format!("/v1/runs/{id}/steps"), None).await;
    let steps = steps["data"].as_array().unwrap().clone();
    let kinds = |k: &str| steps.iter().filter(|s| s["kind"] == k).count();
    assert_eq!(kinds("tool_result"), results.len(), "every result is a step");
    assert_eq!(kinds("tool_call"), events.iter().filter(|(n, _)| n == "tool_call").count());
    assert_eq!(kinds("model_output") as u64, run["usage"]["steps"].as_u64().unwrap());
    assert!(steps.iter().enumerate().all(|(i, s)| s["seq"] == i as u64), "seqs 0.. without gaps");
    // Later turns reuse the session: only the tool results are prefilled.
    let outputs: Vec<&Value> = steps.iter().filter(|s| s["kind"] == "model_output").map(|s| &s["data"]).collect();
    // Each step reuses at least the previous step's whole prompt: what it prefills is only what
    // was added since (the previous output, the tool results, the next header).
    for w in outputs.windows(2) {
        let (prev, next) = (w[0]["prompt_tokens"].as_u64().unwrap(), w[1]["cached_tokens"].as_u64().unwrap());
        assert!(next + 1 >= prev, "a step reused {next} tokens of the previous prompt's {prev}: {}", w[1]);
    }
    let (_, got) = json_call(&app, Method::GET, &format!("/v1/runs/{id}"), None).await;
    assert_eq!(got["status"], "completed");
    let (_, metrics) = call(&app, Method::GET, "/metrics", None).await;
    let metric = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(metric("kiln:agent_tool_calls_total") >= results.len() as f64);
    assert!(metric("kiln:agent_reused_tokens_total") > 0.0);
    assert_eq!(metric("kiln:agent_runs_total{status=\"completed\"}"), 1.0);
    assert!(got["output"].as_str().is_some_and(|s| !s.is_empty()), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_pauses_and_resumes_and_a_rejection_reaches_the_model() {
    let Some(app) = app().await else { return };
    let agent = json!({"name": "careful", "instructions": "Use the calculator tool for arithmetic, then answer in one sentence.",
        "model": MODEL, "tools": ["calculator"], "max_steps": 4, "max_tokens_per_step": 120, "temperature": 0,
        "tool_rules": {"requires_approval": ["calculator"]}});
    let (status, body) = json_call(&app, Method::POST, "/v1/agents", Some(agent)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for approve in [true, false] {
        let (status, run) =
            json_call(&app, Method::POST, "/v1/agents/careful/runs", Some(json!({"input": "What is 17 * 23?"}))).await;
        assert_eq!((status, run["status"].as_str()), (StatusCode::OK, Some("requires_action")), "{run}");
        let id = run["id"].as_str().unwrap();
        let call_id = run["output"]["required_action"][0]["id"].as_str().unwrap().to_string();
        let action = if approve { "approve" } else { "reject" };
        let body = json!({"call_id": call_id, "reason": "not today"});
        let (status, _) = json_call(&app, Method::POST, &format!("/v1/runs/{id}/{action}"), Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        let run = wait_ended(&app, id).await;
        let (_, steps) = json_call(&app, Method::GET, &format!("/v1/runs/{id}/steps"), None).await;
        let result = steps["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == "tool_result" && s["data"]["call_id"] == call_id.as_str())
            .unwrap_or_else(|| panic!("no result for {call_id}: {steps}"))
            .clone();
        if approve {
            assert_eq!(result["data"]["content"], "391", "{result}");
        } else {
            assert_eq!(result["data"]["is_error"], true, "{result}");
            assert!(result["data"]["content"].as_str().unwrap().contains("rejected"), "{result}");
        }
        assert!(["completed", "incomplete", "requires_action"].contains(&run["status"].as_str().unwrap()), "{run}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_run_kiln_tools_server_side_and_pause_for_approval() {
    let Some(app) = app().await else { return };
    let instructions = "Use the calculator tool for arithmetic, then answer in one short sentence.";
    let tool = |approval: &str| json!({"type": "mcp", "server_label": "kiln", "allowed_tools": ["calculator"], "require_approval": approval});
    let ask = |approval: &str| {
        json!({"model": MODEL, "instructions": instructions, "input": "What is 1234 * 5678?",
        "tools": [tool(approval)], "temperature": 0, "max_output_tokens": 120})
    };
    // Executed in kiln: the call and its exact result come back as an mcp_call item.
    let (status, r) = json_call(&app, Method::POST, "/v1/responses", Some(ask("never"))).await;
    assert_eq!((status, r["status"].as_str()), (StatusCode::OK, Some("completed")), "{r}");
    let output = r["output"].as_array().unwrap();
    let mcp = output.iter().find(|i| i["type"] == "mcp_call").unwrap_or_else(|| panic!("no mcp_call: {r}"));
    assert_eq!((mcp["name"].as_str(), mcp["server_label"].as_str()), (Some("calculator"), Some("kiln")), "{r}");
    assert_eq!(mcp["output"], "7006652", "{r}");
    assert_eq!(output.last().unwrap()["type"], "message", "{r}");
    assert!(r["usage"]["input_tokens"].as_u64().unwrap() > 0, "{r}");
    streamed_items_match_the_terminal_response(&app, ask("never")).await;
    background_completes_the_stored_record(&app, ask("never")).await;
    // OpenAI's default: every call needs approval; the response ends with the request.
    let (status, r) = json_call(&app, Method::POST, "/v1/responses", Some(ask("always"))).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let request = r["output"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (request["type"].as_str(), request["name"].as_str()),
        (Some("mcp_approval_request"), Some("calculator")),
        "{r}"
    );
    let answer = json!({"model": MODEL, "previous_response_id": r["id"], "tools": [tool("always")],
        "input": [{"type": "mcp_approval_response", "approval_request_id": request["id"], "approve": true}]});
    let (status, r2) = json_call(&app, Method::POST, "/v1/responses", Some(answer)).await;
    assert_eq!((status, r2["status"].as_str()), (StatusCode::OK, Some("completed")), "{r2}");
    let call = r2["output"].as_array().unwrap().iter().find(|i| i["type"] == "mcp_call").cloned();
    assert_eq!(call.map(|c| c["output"].clone()), Some(json!("7006652")), "{r2}");
    client_function_tools_pause_and_resume(&app, tool("never")).await;
    // The stored response reads back; bad requests name their field.
    let (status, got) =
        json_call(&app, Method::GET, &format!("/v1/responses/{}", r2["id"].as_str().unwrap()), None).await;
    assert_eq!((status, &got["output"]), (StatusCode::OK, &r2["output"]));
    bad_requests_name_their_field(&app, ask("never"), tool("never")).await;
}

/// Streamed: items as the run completes them, the terminal response holding exactly those.
async fn streamed_items_match_the_terminal_response(app: &App, mut streamed: Value) {
    streamed["stream"] = json!(true);
    let (status, text) = call(app, Method::POST, "/v1/responses", Some(streamed)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["response.created", "response.in_progress"], "{names:?}");
    assert_eq!(names.last(), Some(&"response.completed"), "{names:?}");
    let seqs: Vec<u64> = events.iter().map(|(_, d)| d["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let done: Vec<&Value> =
        events.iter().filter(|(n, _)| n == "response.output_item.done").map(|(_, d)| &d["item"]).collect();
    let last = &events.last().unwrap().1["response"];
    assert_eq!(last["output"].as_array().unwrap().iter().collect::<Vec<_>>(), done, "{text}");
    assert!(done.iter().any(|i| i["type"] == "mcp_call" && i["output"] == "7006652"), "{text}");
}

/// Background: queued at once, the stored record completed when the run ends.
async fn background_completes_the_stored_record(app: &App, mut bg: Value) {
    bg["background"] = json!(true);
    let (status, queued) = json_call(app, Method::POST, "/v1/responses", Some(bg)).await;
    assert_eq!((status, queued["status"].as_str()), (StatusCode::OK, Some("queued")), "{queued}");
    let uri = format!("/v1/responses/{}", queued["id"].as_str().unwrap());
    let mut polled = Value::Null;
    for _ in 0..600 {
        polled = json_call(app, Method::GET, &uri, None).await.1;
        if polled["status"] != "queued" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(polled["status"], "completed", "{polled}");
    assert!(polled["output"].as_array().unwrap().iter().any(|i| i["output"] == "7006652"), "{polled}");
}

/// A client function tool beside kiln's: the run pauses at its call, returned as a
/// function_call item; the client's function_call_output resumes the same run.
async fn client_function_tools_pause_and_resume(app: &App, kiln_tool: Value) {
    let weather = json!({"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}});
    let body = json!({"model": MODEL, "input": "What is the weather in Paris? Call get_weather.", "temperature": 0,
        "instructions": "Use the tools to answer.", "tools": [kiln_tool.clone(), weather.clone()], "max_output_tokens": 120});
    let (status, r3) = json_call(app, Method::POST, "/v1/responses", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{r3}");
    let fc = r3["output"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((fc["type"].as_str(), fc["name"].as_str()), (Some("function_call"), Some("get_weather")), "{r3}");
    let result = json!({"type": "function_call_output", "call_id": fc["call_id"], "output": "{\"sky\": \"sunny\", \"celsius\": 21}"});
    let body = json!({"model": MODEL, "previous_response_id": r3["id"], "tools": [kiln_tool.clone(), weather], "input": [result]});
    let (status, r4) = json_call(app, Method::POST, "/v1/responses", Some(body)).await;
    assert_eq!((status, r4["status"].as_str()), (StatusCode::OK, Some("completed")), "{r4}");
    assert_eq!(r4["output"].as_array().unwrap().last().unwrap()["type"], "message", "{r4}");
}

/// Bad requests are 400s naming their field; an unknown agent is a 404.
async fn bad_requests_name_their_field(app: &App, ask: Value, tool: Value) {
    let bad = [
        (json!({"tools": [{"type": "mcp", "server_label": "nowhere"}]}), "tools[0].server_label"),
        (
            json!({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://example.com/mcp"}]}),
            "tools[0].server_url",
        ),
        (json!({"tools": [tool.clone(), {"type": "web_search"}]}), "tools[1].type"),
        (json!({"tools": [tool.clone(), {"type": "function", "name": "bad name"}]}), "tools[1].name"),
        (
            json!({"tools": [{"type": "mcp", "server_label": "kiln", "allowed_tools": ["rm"]}]}),
            "tools[0].allowed_tools",
        ),
    ];
    for (patch, param) in bad {
        let mut body = ask.clone();
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let (status, e) = json_call(app, Method::POST, "/v1/responses", Some(body)).await;
        assert_eq!((status, e["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{e}");
    }
    let (status, e) =
        json_call(app, Method::POST, "/v1/responses", Some(json!({"model": "agent:nobody", "input": "hi"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
}

/// Polls until the run is no longer queued or in progress.
async fn wait_ended(app: &App, id: &str) -> Value {
    for _ in 0..600 {
        let (_, run) = json_call(app, Method::GET, &format!("/v1/runs/{id}"), None).await;
        if !["queued", "in_progress"].contains(&run["status"].as_str().unwrap_or_default()) {
            return run;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("run {id} did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_404_or_400_naming_the_field() {
    let Some(app) = app().await else { return };
    let (s, b) = json_call(&app, Method::POST, "/v1/agents/nobody/runs", Some(json!({"input": "hi"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    for uri in ["/v1/runs/run_missing", "/v1/runs/run_missing/steps", "/v1/agents/nobody"] {
        let (s, b) = json_call(&app, Method::GET, uri, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}: {b}");
        assert!(b["error"]["message"].is_string(), "{b}");
    }
    let base = json!({"name": "x", "model": MODEL, "instructions": "hi"});
    let cases = [
        (json!({"max_steps": 0}), "max_steps"),
        (json!({"tools": ["no_such_tool"]}), "tools[0]"),
        (json!({"model": "gpt-9"}), "model"),
        (json!({"tool_rules": {"terminal": ["calculator"]}}), "tool_rules.terminal[0]"),
        (json!({"bogus": 1}), "bogus"),
    ];
    for (patch, field) in cases {
        let mut def = base.clone();
        def.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let (s, b) = json_call(&app, Method::POST, "/v1/agents", Some(def)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{field}: {b}");
        assert_eq!(b["error"]["param"], field, "{b}");
    }
    let (s, b) = json_call(&app, Method::POST, "/v1/agents/clerk/runs", Some(json!({"input": "hi"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a missing template variable: {b}");
    assert_eq!(b["error"]["param"], "variables");
    let (s, _) = json_call(&app, Method::POST, "/v1/agents", Some(json!({"name": "clerk", "model": MODEL}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, b) = json_call(&app, Method::POST, "/v1/runs/run_missing/approve", Some(json!({}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    // A turn the engine refuses (here: more tokens per step than the context holds; found by the
    // fuzz suite) fails the run, and a client waiting on it gets the failed run, not a hang.
    let huge = json!({"name": "huge", "model": MODEL, "max_tokens_per_step": 10_000_000});
    let (s, b) = json_call(&app, Method::POST, "/v1/agents", Some(huge)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let run = json_call(&app, Method::POST, "/v1/agents/huge/runs", Some(json!({"input": "hi"})));
    let (s, run) = tokio::time::timeout(std::time::Duration::from_secs(60), run).await.expect("the run never answered");
    assert_eq!((s, run["status"].as_str()), (StatusCode::OK, Some("failed")), "{run}");
    assert!(run["error"].as_str().unwrap_or_default().contains("context length"), "{run}");
}
