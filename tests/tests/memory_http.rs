//! The memory API through the axum router in-process, on the real SmolLM2 engine, the real
//! all-MiniLM-L6-v2 and a real qdrant-edge shard: add/search/list/get/patch/delete, the stored
//! vectors are `/v1/embeddings`' vectors (search scores equal cosines of `/v1/embeddings`
//! outputs), unknown scope 404, empty text 400 naming `text`, no embedding model 503. The same
//! routes on the remote backend (a Qdrant collection over gRPC, served by the test gRPC server over
//! qdrant-edge), and once that server is gone: every memory route a quick 503 with OpenAI's error
//! body naming Qdrant, while the rest of the API keeps serving.

use anyhow::{ensure, Result};
use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_agent::memory::{MemoryStore, RemoteConfig};
use kiln_inference::embed::{start_embedder, EmbedConfig};
use kiln_server::api::{router, AppState};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m-instruct-q4_1";
const EMBED: &str = "all-minilm-l6-v2";

fn state() -> Result<Arc<AppState>> {
    let s = Arc::new(AppState::new(MODEL.into(), vec![], "fp_test".into()));
    let model = kiln_tests::smollm2()?;
    s.set_engine(kiln_tests::start(&model, &kiln_tests::test_config())?.handle);
    Ok(s)
}

async fn send(app: &Router, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes: Bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn embed_dir_or_skip() -> Option<std::path::PathBuf> {
    let dir = kiln_tests::models_dir().join(EMBED);
    if !dir.join("model.safetensors").is_file() {
        println!("SKIP: {} missing (scripts/fetch-models.sh embed)", dir.display());
        return None;
    }
    Some(dir)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

async fn embedding(app: &Router, text: &str) -> Vec<f64> {
    let (st, body) = send(app, Method::POST, "/v1/embeddings", Some(json!({"model": EMBED, "input": text}))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    body["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_routes_end_to_end() -> Result<()> {
    let Some(dir) = embed_dir_or_skip() else { return Ok(()) };
    // Created before the state so it outlives the shard (its Drop flushes into this directory).
    let tmp = tempfile::tempdir()?;
    let s = state()?;
    // Without an embedding model the routes say what is missing.
    let bare = router(s.clone());
    let (st, body) = send(&bare, Method::POST, "/v1/memory/agent:a", Some(json!({"text": "x"}))).await;
    ensure!(
        st == StatusCode::SERVICE_UNAVAILABLE
            && body["error"]["message"].as_str().unwrap().contains("--embedding-model")
    );

    let e = start_embedder(dir.to_str().unwrap(), &EmbedConfig::default())?;
    s.set_embedder(EMBED.into(), e.clone());
    s.set_memory(MemoryStore::open_embedded(tmp.path(), e).await?);
    let app = router(s);
    routes_end_to_end(&app).await
}

/// Add, search (scores are cosines of `/v1/embeddings`), filter, page, patch, get, delete; then
/// keyed facts, bad input and scope deletes.
async fn routes_end_to_end(app: &Router) -> Result<()> {
    let app = app.clone();
    let texts = ["Alice prefers window seats", "The build server is in Oslo", "Bob is allergic to peanuts"];
    let mut ids = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let (st, m) =
            send(&app, Method::POST, "/v1/memory/agent:a", Some(json!({"text": t, "metadata": {"i": i}}))).await;
        ensure!(st == StatusCode::OK && m["text"] == *t && m["scope"] == "agent:a", "{st} {m}");
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    let q = "where does Alice like to sit?";
    let (st, r) = send(&app, Method::POST, "/v1/memory/agent:a/search", Some(json!({"query": q, "top_k": 3}))).await;
    ensure!(st == StatusCode::OK && r["object"] == "list" && r["data"].as_array().unwrap().len() == 3, "{r}");
    ensure!(r["data"][0]["id"] == ids[0].as_str(), "{r}");
    // Stored vectors are /v1/embeddings' vectors: every score is their cosine.
    let qv = embedding(&app, q).await;
    for hit in r["data"].as_array().unwrap() {
        let expect = cosine(&qv, &embedding(&app, hit["text"].as_str().unwrap()).await);
        let got = hit["score"].as_f64().unwrap();
        ensure!((got - expect).abs() < 1e-4, "score {got} vs cosine of /v1/embeddings {expect}");
        for k in ["id", "text", "score", "metadata", "key", "created_at"] {
            ensure!(hit.get(k).is_some(), "search hit without `{k}`: {hit}");
        }
    }
    let body = json!({"query": "anything", "filter": {"i": 1}});
    let (_, r) = send(&app, Method::POST, "/v1/memory/agent:a/search", Some(body)).await;
    ensure!(r["data"].as_array().unwrap().len() == 1 && r["data"][0]["id"] == ids[1].as_str(), "{r}");

    let (st, page) = send(&app, Method::GET, "/v1/memory/agent:a?limit=2", None).await;
    ensure!(st == StatusCode::OK && page["data"].as_array().unwrap().len() == 2 && page["has_more"] == true);
    let uri = format!("/v1/memory/agent:a?limit=2&after={}", page["last_id"].as_str().unwrap());
    let (_, page) = send(&app, Method::GET, &uri, None).await;
    ensure!(page["data"][0]["id"] == ids[2].as_str() && page["has_more"] == false, "{page}");

    let item = format!("/v1/memory/agent:a/{}", ids[1]);
    let (st, m) = send(&app, Method::PATCH, &item, Some(json!({"text": "The build server moved to Bergen"}))).await;
    ensure!(st == StatusCode::OK && m["history"][0]["text"] == texts[1], "{m}");
    let (_, m) = send(&app, Method::GET, &item, None).await;
    ensure!(m["text"] == "The build server moved to Bergen");
    let (st, _) = send(&app, Method::DELETE, &item, None).await;
    ensure!(st == StatusCode::OK);
    let (st, _) = send(&app, Method::GET, &item, None).await;
    ensure!(st == StatusCode::NOT_FOUND);

    facts_bad_input_and_scope_delete(&app).await
}

/// Keyed facts, 400/404 answers and deleting one scope, on a router with memory.
async fn facts_bad_input_and_scope_delete(app: &Router) -> Result<()> {
    let app = app.clone();
    // Keyed facts: the higher priority wins, the loser is in history.
    let fact = |t: &str, p: i64| json!({"text": t, "key": "office.city", "priority": p});
    send(&app, Method::POST, "/v1/memory/global", Some(fact("Office is in Lyon", 5))).await;
    let (_, m) = send(&app, Method::POST, "/v1/memory/global", Some(fact("Office is in Nice", 1))).await;
    ensure!(m["text"] == "Office is in Lyon" && m["history"][0]["outcome"] == "rejected", "{m}");

    // Bad input.
    let (st, body) = send(&app, Method::POST, "/v1/memory/agent:a", Some(json!({"text": ""}))).await;
    ensure!(st == StatusCode::BAD_REQUEST && body["error"]["param"] == "text", "{body}");
    let (st, _) = send(&app, Method::GET, "/v1/memory/agent:ghost", None).await;
    ensure!(st == StatusCode::NOT_FOUND);
    let (st, _) = send(&app, Method::POST, "/v1/memory/agent:ghost/search", Some(json!({"query": "x"}))).await;
    ensure!(st == StatusCode::NOT_FOUND);
    let (st, body) = send(&app, Method::GET, "/v1/memory/team:x", None).await;
    ensure!(st == StatusCode::BAD_REQUEST && body["error"]["param"] == "scope", "{body}");

    let (st, _) = send(&app, Method::DELETE, "/v1/memory/agent:a", None).await;
    ensure!(st == StatusCode::OK);
    let (st, _) = send(&app, Method::GET, "/v1/memory/agent:a", None).await;
    ensure!(st == StatusCode::NOT_FOUND);
    let (st, _) = send(&app, Method::GET, "/v1/memory/global", None).await;
    ensure!(st == StatusCode::OK, "deleting one scope left global alone");
    Ok(())
}

/// The memory routes on a Qdrant collection (the test gRPC server over qdrant-edge), end to end;
/// then the server goes away: every memory route answers 503 quickly with OpenAI's error body
/// naming Qdrant and its URL (never another 5xx, never a hang), and embeddings still serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_routes_on_remote_qdrant_then_503_when_it_is_down() -> Result<()> {
    let Some(dir) = embed_dir_or_skip() else { return Ok(()) };
    let server = kiln_qdrant_testserver::TestServer::start()?;
    let s = state()?;
    let e = start_embedder(dir.to_str().unwrap(), &EmbedConfig::default())?;
    s.set_embedder(EMBED.into(), e.clone());
    let mut config = RemoteConfig::new(server.url());
    config.collection = "kiln_http_test".into();
    s.set_memory(MemoryStore::open_remote(config, e).await?);
    let app = router(s);
    routes_end_to_end(&app).await?;
    let (st, _) = send(&app, Method::POST, "/v1/memory/agent:b", Some(json!({"text": "kept"}))).await;
    ensure!(st == StatusCode::OK);

    let url = server.url();
    drop(server);
    let id = "0190f3c2-7d1e-7000-8000-000000000000";
    let calls = [
        (Method::POST, "/v1/memory/agent:b".to_string(), Some(json!({"text": "x"}))),
        (Method::POST, "/v1/memory/agent:b/search".to_string(), Some(json!({"query": "x"}))),
        (Method::GET, "/v1/memory/agent:b".to_string(), None),
        (Method::GET, format!("/v1/memory/agent:b/{id}"), None),
        (Method::PATCH, format!("/v1/memory/agent:b/{id}"), Some(json!({"text": "y"}))),
        (Method::DELETE, format!("/v1/memory/agent:b/{id}"), None),
        (Method::DELETE, "/v1/memory/agent:b".to_string(), None),
    ];
    for (method, uri, body) in calls {
        let t = std::time::Instant::now();
        let (st, b) = send(&app, method.clone(), &uri, body).await;
        let took = t.elapsed();
        let message = b["error"]["message"].as_str().unwrap_or_default();
        ensure!(st == StatusCode::SERVICE_UNAVAILABLE, "{method} {uri}: {st} {b}");
        ensure!(b["error"]["type"] == "service_unavailable_error" && message.contains(&url), "{method} {uri}: {b}");
        ensure!(took < std::time::Duration::from_secs(5), "{method} {uri} took {took:?}");
    }
    let (st, _) = send(&app, Method::POST, "/v1/embeddings", Some(json!({"model": EMBED, "input": "still up"}))).await;
    ensure!(st == StatusCode::OK, "embeddings stopped with Qdrant");
    Ok(())
}

/// `kiln serve --qdrant-url` with nothing listening there starts (the store opens; the choice:
/// report, not refuse) and its memory is `Unavailable`. (A mis-shaped collection stops the start:
/// `remote_refuses_a_collection_of_another_shape` in the agent's memory tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_an_unreachable_qdrant_url() -> Result<()> {
    use kiln_agent::memory::{MemoryError, NewMemory, Scope};
    let Some(dir) = embed_dir_or_skip() else { return Ok(()) };
    let e = start_embedder(dir.to_str().unwrap(), &EmbedConfig::default())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let args =
        kiln_server::agents::AgentArgs { qdrant_url: Some(format!("http://127.0.0.1:{port}")), ..Default::default() };
    let store = kiln_server::agents::start_memory(&args, e).await?;
    let note = NewMemory { text: "x".into(), ..Default::default() };
    let err = store.add(&"global".parse::<Scope>()?, vec![note]).await.unwrap_err();
    ensure!(matches!(err, MemoryError::Unavailable(_)), "{err:?}");
    Ok(())
}
