//! Conversation memory through the Responses API (the axum router in-process, the real
//! Qwen2.5-Coder engine, the real all-MiniLM-L6-v2 and a qdrant-edge shard, the real SQLite run
//! store): a 200-turn `previous_response_id` chain with an agent whose `conversation` policy
//! compacts at 768 tokens. Every turn's prompt stays under the threshold, compaction happens and
//! archives the folded messages into the chain's memory scope, and at turn 200 the model answers a
//! fact from turn 3 that it cannot guess (a locker code) through the summary or recalled memory.
//! Skipped (SKIP printed) when Qwen or MiniLM is not fetched; CI fetches both.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_agent::memory::{MemoryStore, Scope};
use kiln_inference::embed::{start_embedder, EmbedConfig};
use kiln_server::agents::AgentArgs;
use kiln_server::api::{router, AppState};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const MODEL: &str = "qwen";
const THRESHOLD: u64 = 768;
const AGENT: &str = r#"
name = "companion"
instructions = "You are a helpful assistant. Answer every message in one short sentence."
model = "qwen"
max_tokens_per_step = 24
temperature = 0

[conversation]
compact_at_tokens = 768
summary_max_tokens = 128
recall_top_k = 3
"#;

const TOPICS: &[&str] = &[
    "the moon",
    "volcanoes",
    "honey bees",
    "the Roman empire",
    "rainbows",
    "glaciers",
    "owls",
    "tea",
    "the Nile",
    "jazz",
    "chess",
    "bicycles",
    "lighthouses",
    "penguins",
    "deserts",
    "comets",
    "bread",
    "coral reefs",
];

struct App {
    router: Router,
    memory: MemoryStore,
    _dir: tempfile::TempDir,
}

async fn app() -> Option<App> {
    let model = kiln_tests::qwen25()?;
    let embed_dir = kiln_tests::models_dir().join("all-minilm-l6-v2");
    if !embed_dir.join("model.safetensors").is_file() {
        println!("SKIP: {} missing (scripts/fetch-models.sh embed)", embed_dir.display());
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let agents = dir.path().join("agents");
    std::fs::create_dir_all(&agents).expect("agents dir");
    std::fs::write(agents.join("companion.toml"), AGENT).expect("agent file");
    let engine = kiln_tests::start(&model, &kiln_tests::test_config()).expect("engine start").handle;
    let embedder = start_embedder(embed_dir.to_str()?, &EmbedConfig::default()).expect("load MiniLM");
    let memory = MemoryStore::open_embedded(&dir.path().join("memory"), embedder).await.expect("memory store");
    let args = AgentArgs { data_dir: Some(dir.path().join("data")), agents: Some(agents), ..Default::default() };
    let started =
        kiln_server::agents::start(&args, engine.clone(), MODEL.into(), Default::default(), Some(memory.clone()));
    let state = Arc::new(AppState::new(MODEL.into(), Vec::new(), "fp_test".into()));
    state.set_agents(started.await.expect("agent runtime").runtime.clone());
    state.set_engine(engine);
    Some(App { router: router(state), memory, _dir: dir })
}

async fn respond(app: &App, input: &str, previous: Option<&str>) -> Value {
    let body = json!({"model": "agent:companion", "input": input, "previous_response_id": previous});
    let req =
        Request::builder().method(Method::POST).uri("/v1/responses").header(header::CONTENT_TYPE, "application/json");
    let resp =
        app.router.clone().oneshot(req.body(Body::from(body.to_string())).expect("request")).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::OK, "{input}: {}", String::from_utf8_lossy(&bytes));
    v
}

fn message_for(turn: usize) -> String {
    match turn {
        1 => "Hi! I am planning my week.".into(),
        2 => "I go to the gym on Mondays and Thursdays.".into(),
        3 => "Please remember this: my gym locker code is 7351-QX.".into(),
        t => format!("Tell me one interesting fact about {}.", TOPICS[t % TOPICS.len()]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_turn_conversation_stays_under_its_threshold_and_remembers_turn_3() {
    let Some(app) = app().await else { return };
    let (mut previous, mut first, mut max_prompt, mut drops) = (None::<String>, None::<String>, 0u64, 0usize);
    let mut last_prompt = 0u64;
    for turn in 1..200 {
        let r = respond(&app, &message_for(turn), previous.as_deref()).await;
        // A reply cut at the agent's 24 tokens is `incomplete`; anything else is a failure.
        let cut = r["incomplete_details"]["reason"] == "max_output_tokens";
        assert!(r["status"] == "completed" || cut, "turn {turn}: {r}");
        let prompt = r["usage"]["input_tokens"].as_u64().expect("usage.input_tokens");
        assert!(prompt <= THRESHOLD, "turn {turn}: prompt of {prompt} tokens passes {THRESHOLD}");
        drops += usize::from(prompt < last_prompt);
        (last_prompt, max_prompt) = (prompt, max_prompt.max(prompt));
        previous = r["id"].as_str().map(str::to_string);
        first.get_or_insert_with(|| previous.clone().unwrap_or_default());
        if turn % 50 == 0 {
            println!("turn {turn}: prompt {prompt} tokens, {drops} compactions so far");
        }
    }
    assert!(drops >= 3, "the prompt shrank only {drops} times in 199 turns: no compaction");
    let conversation: Scope = format!("run:{}", first.unwrap_or_default()).parse().expect("scope");
    let archived = app.memory.list(&conversation, None, 1000).await.expect("archived messages");
    assert!(archived.data.iter().any(|m| m.text.contains("7351-QX")), "turn 3 was not archived");
    let r = respond(&app, "What is my gym locker code?", previous.as_deref()).await;
    let answer = r["output"].as_array().into_iter().flatten().filter(|i| i["type"] == "message");
    let text: String = answer
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .map(|c| c["text"].as_str().unwrap_or_default().to_string())
        .collect();
    println!("200 turns: largest prompt {max_prompt} tokens (threshold {THRESHOLD}), {drops} compactions, {} archived messages; turn 200 answer: {text:?}", archived.data.len());
    assert!(text.contains("7351"), "turn 200 did not recall the locker code: {text:?}");
    assert!(r["usage"]["input_tokens"].as_u64().unwrap_or(u64::MAX) <= THRESHOLD);
}
