//! Files, vector stores and `file_search` through the axum router in-process, on real parts: the
//! SmolLM2 engine (Qwen2.5-Coder for the `file_search` turn), the real all-MiniLM-L6-v2 embedder,
//! a real qdrant-edge shard and the real SQLite run store in a temp dir. Covers: multipart upload
//! and download byte for byte, attach -> `completed` with file counts, search finds the one file
//! holding a made-up fact (and attribute filters narrow it), chunks respect the static size and
//! overlap in the embedder's own tokens and the auto strategy is capped to what the model reads,
//! a binary file is a 400, unknown ids are 404, deletes remove chunks from search, the memory
//! routes cannot reach a store's scope, and `/v1/responses` with a `file_search` tool runs the
//! search server-side and returns a `file_search_call` with the right file. SKIP is printed when a
//! model is missing.

use anyhow::{ensure, Result};
use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_agent::memory::MemoryStore;
use kiln_agent::vector_stores::chunk;
use kiln_inference::embed::{start_embedder, EmbedConfig, EmbedHandle};
use kiln_server::agents::AgentArgs;
use kiln_server::api::auth::Auth;
use kiln_server::api::scopes::{Scope, Scopes};
use kiln_server::api::{router, AppState};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const EMBED: &str = "all-minilm-l6-v2";
const BOUNDARY: &str = "kiln-test-boundary-7f3a";

/// The made-up fact only `heron.md` holds.
const HERON: &str = "# Project Heron\n\nThe launch code for Project Heron is 7749-QX. It was chosen by the \
                     quartermaster in the spring and is kept in the blue binder.";
const GARDEN: &str = "# Garden notes\n\nTomatoes need full sun and deep watering twice a week. Basil grows \
                      well beside them and keeps some pests away.";
const TRAINS: &str = "# Rail timetable\n\nThe night train to Vienna leaves platform 4 at 22:15 and arrives at \
                      07:40. A dining car is attached after Salzburg.";

struct App {
    router: Router,
    embedder: EmbedHandle,
    _dir: tempfile::TempDir,
}

impl App {
    /// Drops the server and waits for the agent layer's last tasks (which hold the memory store),
    /// so the shard flushes into its directory before the directory goes.
    async fn close(self) {
        let App { router, embedder, _dir } = self;
        drop((router, embedder));
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn app(model: &std::path::Path, name: &str) -> Result<App> {
    app_with(model, name, Auth::open()).await
}

async fn app_with(model: &std::path::Path, name: &str, auth: Auth) -> Result<App> {
    let dir = tempfile::tempdir()?;
    let engine = kiln_tests::start(model, &kiln_tests::test_config())?.handle;
    let embedder = start_embedder(kiln_tests::models_dir().join(EMBED).to_str().unwrap(), &EmbedConfig::default())?;
    let args = AgentArgs { data_dir: Some(dir.path().join("data")), ..Default::default() };
    // Opened directly, not with `start_memory`: its TTL purge task would hold the shard past the
    // temp dir's life.
    let memory = MemoryStore::open_embedded(&dir.path().join("memory"), embedder.clone()).await?;
    let agents =
        kiln_server::agents::start(&args, engine.clone(), name.into(), Default::default(), Some(memory.clone()))
            .await?;
    let state = Arc::new(AppState::new(name.into(), Vec::new(), "fp_test".into()).with_auth(auth));
    state.set_embedder(EMBED.into(), embedder.clone());
    state.set_memory(memory);
    state.set_agents(agents.runtime.clone());
    state.set_engine(engine);
    Ok(App { router: router(state), embedder, _dir: dir })
}

fn embed_model_present() -> bool {
    let ok = kiln_tests::models_dir().join(EMBED).join("model.safetensors").is_file();
    if !ok {
        println!("SKIP: {EMBED} missing (scripts/fetch-models.sh embed)");
    }
    ok
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Bytes) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    (status, resp.into_body().collect().await.expect("body").to_bytes())
}

async fn call(app: &Router, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).unwrap();
    let (status, bytes) = send(app, req).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// `POST /v1/files` as the OpenAI SDK sends it (multipart: `purpose`, then `file`).
async fn upload(app: &Router, filename: &str, content: &[u8]) -> (StatusCode, Value) {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n--{BOUNDARY}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/files")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(Body::from(body))
        .unwrap();
    let (status, bytes) = send(app, req).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn upload_ok(app: &Router, filename: &str, content: &str) -> Result<String> {
    let (st, f) = upload(app, filename, content.as_bytes()).await;
    ensure!(st == StatusCode::OK && f["object"] == "file" && f["bytes"] == content.len(), "{st} {f}");
    Ok(f["id"].as_str().unwrap().to_string())
}

async fn search(app: &Router, vs: &str, body: Value) -> Result<Vec<Value>> {
    let (st, page) = call(app, Method::POST, &format!("/v1/vector_stores/{vs}/search"), Some(body)).await;
    ensure!(st == StatusCode::OK && page["object"] == "vector_store.search_results.page", "{st} {page}");
    Ok(page["data"].as_array().unwrap().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_vector_stores_and_search() -> Result<()> {
    if !embed_model_present() {
        return Ok(());
    }
    let a = app(&kiln_tests::smollm2()?, "smollm2").await?;
    let app = &a.router;
    let heron = upload_ok(app, "heron.md", HERON).await?;
    let garden = upload_ok(app, "garden.md", GARDEN).await?;
    let trains = upload_ok(app, "trains.txt", TRAINS).await?;
    let binary: Vec<u8> = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0xff, 0xfe];
    let (st, png) = upload(app, "logo.png", &binary).await;
    ensure!(st == StatusCode::OK, "any file uploads: {png}");
    let png = png["id"].as_str().unwrap().to_string();
    let req = Request::get(format!("/v1/files/{png}/content")).body(Body::empty())?;
    let (st, bytes) = send(app, req).await;
    ensure!(st == StatusCode::OK && bytes.as_ref() == binary.as_slice(), "content comes back byte for byte");
    let (st, list) = call(app, Method::GET, "/v1/files?limit=2", None).await;
    ensure!(st == StatusCode::OK && list["data"].as_array().unwrap().len() == 2 && list["has_more"] == true, "{list}");
    ensure!(list["data"][0]["id"] == png.as_str(), "newest first: {list}");

    let (st, vs) = call(app, Method::POST, "/v1/vector_stores", Some(json!({"name": "notes"}))).await;
    ensure!(st == StatusCode::OK && vs["object"] == "vector_store", "{st} {vs}");
    let vs = vs["id"].as_str().unwrap().to_string();
    let files = format!("/v1/vector_stores/{vs}/files");
    for (id, team) in [(&heron, "ops"), (&garden, "home"), (&trains, "ops")] {
        let body = json!({"file_id": id, "attributes": {"team": team, "year": 2024}});
        let (st, f) = call(app, Method::POST, &files, Some(body)).await;
        ensure!(st == StatusCode::OK && f["status"] == "completed" && f["object"] == "vector_store.file", "{f}");
        ensure!(f["chunking_strategy"]["static"]["max_chunk_size_tokens"] == 254, "auto is capped: {f}");
        ensure!(f["chunking_note"].as_str().is_some_and(|n| n.contains("254")), "and says so: {f}");
    }
    // Not text: a 400 that says what vector stores take; nothing is recorded.
    let (st, err) = call(app, Method::POST, &files, Some(json!({"file_id": png}))).await;
    ensure!(st == StatusCode::BAD_REQUEST && err["error"]["param"] == "file_id", "{st} {err}");
    ensure!(err["error"]["message"].as_str().unwrap().contains("UTF-8 text"), "{err}");
    let (_, store) = call(app, Method::GET, &format!("/v1/vector_stores/{vs}"), None).await;
    ensure!(store["file_counts"] == json!({"in_progress": 0, "completed": 3, "failed": 0, "cancelled": 0, "total": 3}));
    ensure!(store["usage_bytes"] == HERON.len() + GARDEN.len() + TRAINS.len(), "{store}");

    let hits = search(app, &vs, json!({"query": "What is the launch code for Project Heron?"})).await?;
    ensure!(hits[0]["file_id"] == heron.as_str() && hits[0]["filename"] == "heron.md", "{hits:?}");
    ensure!(hits[0]["content"][0]["text"].as_str().unwrap().contains("7749-QX"), "{hits:?}");
    ensure!(hits[0]["attributes"] == json!({"team": "ops", "year": 2024}), "{hits:?}");
    filters_narrow(app, &vs, &garden).await?;
    unknown_ids_are_404(app, &vs, &heron).await?;
    batches(app, &vs, &trains, &png).await?;
    // The memory routes cannot name a vector store's scope.
    let (st, _) = call(app, Method::GET, &format!("/v1/memory/vs:{vs}"), None).await;
    ensure!(st == StatusCode::BAD_REQUEST, "{st}");

    // Detaching removes the file's chunks from search; deleting the file removes it everywhere.
    let (st, _) = call(app, Method::DELETE, &format!("{files}/{heron}"), None).await;
    ensure!(st == StatusCode::OK);
    let hits =
        search(app, &vs, json!({"query": "launch code for Project Heron 7749-QX", "max_num_results": 50})).await?;
    ensure!(hits.iter().all(|h| h["file_id"] != heron.as_str()), "{hits:?}");
    let (st, _) = call(app, Method::DELETE, &format!("/v1/files/{garden}"), None).await;
    ensure!(st == StatusCode::OK);
    let hits = search(app, &vs, json!({"query": "tomatoes basil", "max_num_results": 50})).await?;
    ensure!(hits.iter().all(|h| h["file_id"] == trains.as_str()), "{hits:?}");
    let (_, store) = call(app, Method::GET, &format!("/v1/vector_stores/{vs}"), None).await;
    ensure!(store["file_counts"]["total"] == 1, "{store}");
    let (st, _) = call(app, Method::DELETE, &format!("/v1/vector_stores/{vs}"), None).await;
    ensure!(st == StatusCode::OK);
    let (st, _) = call(app, Method::GET, &format!("/v1/vector_stores/{vs}"), None).await;
    ensure!(st == StatusCode::NOT_FOUND);
    chunks_respect_size_and_overlap(&a).await?;
    a.close().await;
    Ok(())
}

/// Attribute filters: exact (store-side) and compared after the search; a bad one is a 400.
async fn filters_narrow(app: &Router, vs: &str, garden: &str) -> Result<()> {
    let home = json!({"query": "launch code", "filters": {"type": "eq", "key": "team", "value": "home"}});
    let hits = search(app, vs, home).await?;
    ensure!(!hits.is_empty() && hits.iter().all(|h| h["file_id"] == garden), "{hits:?}");
    let ne = json!({"query": "launch code", "filters": {"type": "ne", "key": "team", "value": "ops"}});
    ensure!(search(app, vs, ne).await?.iter().all(|h| h["file_id"] == garden));
    let gt = json!({"query": "x", "filters": {"type": "gt", "key": "year", "value": 2024}});
    ensure!(search(app, vs, gt).await?.is_empty());
    let (st, err) = call(
        app,
        Method::POST,
        &format!("/v1/vector_stores/{vs}/search"),
        Some(json!({"query": "x",
            "filters": {"type": "like", "key": "team", "value": "o"}})),
    )
    .await;
    ensure!(st == StatusCode::BAD_REQUEST && err["error"]["param"] == "filters", "{err}");
    Ok(())
}

/// A batch: a text file completes, a binary one fails, the batch itself completes.
async fn batches(app: &Router, vs: &str, trains: &str, png: &str) -> Result<()> {
    let batches = format!("/v1/vector_stores/{vs}/file_batches");
    let (_, other) = call(app, Method::POST, "/v1/vector_stores", Some(json!({}))).await;
    let other_batches = format!("/v1/vector_stores/{}/file_batches", other["id"].as_str().unwrap());
    let (st, b) = call(app, Method::POST, &other_batches, Some(json!({"file_ids": [trains, png]}))).await;
    ensure!(st == StatusCode::OK && b["status"] == "completed", "{st} {b}");
    ensure!(b["file_counts"]["completed"] == 1 && b["file_counts"]["failed"] == 1, "{b}");
    let (st, again) = call(app, Method::GET, &format!("{other_batches}/{}", b["id"].as_str().unwrap()), None).await;
    ensure!(st == StatusCode::OK && again == b, "{again}");
    let (st, _) = call(app, Method::POST, &batches, Some(json!({"file_ids": ["file-nope"]}))).await;
    ensure!(st == StatusCode::NOT_FOUND);
    let (st, _) = call(app, Method::GET, &format!("{batches}/vsfb_nope"), None).await;
    ensure!(st == StatusCode::NOT_FOUND);
    Ok(())
}

async fn unknown_ids_are_404(app: &Router, vs: &str, file: &str) -> Result<()> {
    for (method, uri, body) in [
        (Method::GET, "/v1/vector_stores/vs_nope".to_string(), None),
        (Method::GET, "/v1/files/file-nope".to_string(), None),
        (Method::GET, "/v1/files/file-nope/content".to_string(), None),
        (Method::GET, "/v1/files/file%00nope".to_string(), None),
        (Method::DELETE, "/v1/files/file-nope".to_string(), None),
        (Method::POST, format!("/v1/vector_stores/{vs}/files"), Some(json!({"file_id": "file-nope"}))),
        (Method::POST, "/v1/vector_stores/vs_nope/files".to_string(), Some(json!({"file_id": file}))),
        (Method::GET, format!("/v1/vector_stores/{vs}/files/file-nope"), None),
        (Method::POST, "/v1/vector_stores/vs_nope/search".to_string(), Some(json!({"query": "x"}))),
    ] {
        let (st, err) = call(app, method.clone(), &uri, body).await;
        ensure!(st == StatusCode::NOT_FOUND && err["error"]["message"].is_string(), "{method} {uri}: {st} {err}");
    }
    Ok(())
}

/// A file of single-token words, chunked with a static 100 / 50 strategy: every chunk is at most
/// 100 of the embedder's tokens and begins with the last 50 tokens of the one before.
async fn chunks_respect_size_and_overlap(a: &App) -> Result<()> {
    let words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "and", "big", "red", "sun"];
    let text: Vec<&str> = (0..730).map(|i| words[(i * 7 + i / 13) % words.len()]).collect();
    let text = text.join(" ");
    let strategy = json!({"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}});
    let c = chunk::strategy(Some(&strategy), chunk::model_max_tokens(&a.embedder))?;
    let pieces = chunk::split(&a.embedder, &text, &c)?;
    let tokens = |t: &str| a.embedder.tokenizer().encode(t, false).unwrap();
    ensure!(pieces.len() == (730usize - 100).div_ceil(50) + 1, "{} chunks", pieces.len());
    for pair in pieces.windows(2) {
        let (prev, next) = (tokens(&pair[0]), tokens(&pair[1]));
        ensure!(prev.len() <= 100 && next.len() <= 100, "{} / {} tokens", prev.len(), next.len());
        ensure!(prev[prev.len() - 50..] == next[..50], "the overlap is the previous chunk's last 50 tokens");
    }
    // Through the API: the file object reports the strategy used and the chunk count.
    let app = &a.router;
    let id = upload_ok(app, "words.txt", &text).await?;
    let (_, vs) = call(app, Method::POST, "/v1/vector_stores", Some(json!({}))).await;
    let vs = vs["id"].as_str().unwrap();
    let body = json!({"file_id": id, "chunking_strategy": strategy});
    let (st, f) = call(app, Method::POST, &format!("/v1/vector_stores/{vs}/files"), Some(body)).await;
    ensure!(st == StatusCode::OK && f["chunks"] == pieces.len() && f["chunking_note"].is_null(), "{f}");
    ensure!(f["chunking_strategy"]["static"] == json!({"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}));
    let hits = search(app, vs, json!({"query": "cat sat on the mat", "max_num_results": 50})).await?;
    ensure!(hits.len() == pieces.len(), "every chunk is searchable");
    ensure!(hits.iter().all(|h| tokens(h["content"][0]["text"].as_str().unwrap()).len() <= 100));
    Ok(())
}

/// `/v1/responses` with a `file_search` tool on Qwen: the server runs the search and the output
/// holds a `file_search_call` (its results, included, come from the one file with the fact) and
/// then the model's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_file_search_runs_server_side() -> Result<()> {
    if !embed_model_present() {
        return Ok(());
    }
    let Some(qwen) = kiln_tests::qwen25() else { return Ok(()) };
    let a = app(&qwen, "qwen").await?;
    let app = &a.router;
    let (_, vs) = call(app, Method::POST, "/v1/vector_stores", Some(json!({"name": "kb"}))).await;
    let vs = vs["id"].as_str().unwrap().to_string();
    let mut heron = String::new();
    for (name, text) in [("heron.md", HERON), ("garden.md", GARDEN), ("trains.txt", TRAINS)] {
        let id = upload_ok(app, name, text).await?;
        let (st, f) =
            call(app, Method::POST, &format!("/v1/vector_stores/{vs}/files"), Some(json!({"file_id": id}))).await;
        ensure!(st == StatusCode::OK, "{f}");
        if name == "heron.md" {
            heron = id;
        }
    }
    let body = json!({"model": "qwen", "input": "What is the launch code for Project Heron?", "temperature": 0,
        "instructions": "Answer in one short sentence, using the files.",
        "tools": [{"type": "file_search", "vector_store_ids": [vs], "max_num_results": 2}],
        "tool_choice": "required", "include": ["file_search_call.results"], "max_output_tokens": 200});
    let (st, r) = call(app, Method::POST, "/v1/responses", Some(body)).await;
    ensure!(st == StatusCode::OK && r["status"] != "failed", "{st} {r}");
    let out = r["output"].as_array().unwrap();
    let fs = out.iter().find(|i| i["type"] == "file_search_call").ok_or_else(|| anyhow::anyhow!("no call: {r}"))?;
    ensure!(fs["status"] == "completed" && fs["queries"][0].as_str().is_some_and(|q| !q.is_empty()), "{fs}");
    ensure!(fs["results"][0]["file_id"] == heron.as_str(), "{fs}");
    ensure!(out.last().unwrap()["type"] == "message", "the model answers after the search: {r}");
    // Streamed: the hosted search's events, then the terminal response.
    let body = json!({"model": "qwen", "input": "What is the launch code for Project Heron?", "temperature": 0,
        "tools": [{"type": "file_search", "vector_store_ids": [vs]}], "tool_choice": "required",
        "max_output_tokens": 60, "stream": true});
    let req = Request::post("/v1/responses").header(header::CONTENT_TYPE, "application/json");
    let (st, sse) = send(app, req.body(Body::from(body.to_string()))?).await;
    let sse = String::from_utf8_lossy(&sse);
    let at = |ev: &str| sse.find(&format!("event: {ev}\n"));
    ensure!(st == StatusCode::OK && at("response.file_search_call.completed").is_some(), "{sse}");
    ensure!(at("response.file_search_call.in_progress") < at("response.file_search_call.completed"));
    ensure!(sse.contains("\"results\":null"), "no results without include: {sse}");
    ensure!(at("response.completed").or(at("response.incomplete")) > at("response.file_search_call.completed"));
    // Bad settings are 400/404.
    let bad =
        json!({"model": "qwen", "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_nope"]}]});
    let (st, err) = call(app, Method::POST, "/v1/responses", Some(bad)).await;
    ensure!(st == StatusCode::NOT_FOUND && err["error"]["param"] == "tools[0].vector_store_ids[0]", "{st} {err}");
    let bad = json!({"model": "qwen", "input": "x", "tools": [{"type": "file_search", "vector_store_ids": []}]});
    let (st, _) = call(app, Method::POST, "/v1/responses", Some(bad)).await;
    ensure!(st == StatusCode::BAD_REQUEST);
    println!("file_search answer: {}", out.last().unwrap()["content"][0]["text"]);
    a.close().await;
    Ok(())
}

/// With auth on, the retrieval routes need `memory`, and so does a `file_search` tool in
/// `/v1/responses` (which otherwise needs only `inference`, not `agents`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_needs_the_memory_scope() -> Result<()> {
    if !embed_model_present() {
        return Ok(());
    }
    let inference = Scopes::NONE.with(Scope::Inference);
    let auth = Auth::open().with_key("sk-infer", inference, Some("infer")).with_key(
        "sk-mem",
        inference.with(Scope::Memory),
        Some("mem"),
    );
    let a = app_with(&kiln_tests::smollm2()?, "smollm2", auth).await?;
    let ask = |method: Method, uri: &str, key: &str, body: Value| {
        let req = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        let req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        req.body(Body::from(body.to_string())).unwrap()
    };
    let search =
        json!({"model": "smollm2", "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_x"]}]});
    for (uri, body) in [("/v1/vector_stores", json!({})), ("/v1/responses", search.clone())] {
        let (st, bytes) = send(&a.router, ask(Method::POST, uri, "sk-infer", body.clone())).await;
        ensure!(st == StatusCode::FORBIDDEN, "{uri}: {st}");
        ensure!(String::from_utf8_lossy(&bytes).contains("memory"), "{uri}: names the scope");
        let (st, _) = send(&a.router, ask(Method::POST, uri, "sk-mem", body)).await;
        // Allowed: a new store, and a search of a store that does not exist (404, not 403).
        ensure!(st == StatusCode::OK || (uri == "/v1/responses" && st == StatusCode::NOT_FOUND), "{uri}: {st}");
    }
    a.close().await;
    Ok(())
}
