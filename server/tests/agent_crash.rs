//! Durable runs across a crash: real `kiln serve` processes on Qwen2.5-Coder, an agent whose one
//! tool is a slow HTTP tool served by this test (it counts executions per `Idempotency-Key`, and
//! a repeated key gets the first execution's answer). The kiln process is killed with SIGKILL
//! while the tool runs; a restarted process (or, on Postgres, a second process sharing the
//! database) takes the run over once its lease expires and completes it: no call ran twice, no
//! step was lost. Once with SQLite, once with Postgres (skipped without `KILN_TEST_DATABASE_URL`,
//! which the test command sets), and with two processes on one Postgres. It lives in the server's
//! tests so that cargo builds the `kiln` binary it runs with the suite (no nested build).

use anyhow::{bail, ensure, Context, Result};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Executions per idempotency key, and the answers given.
#[derive(Default)]
struct Ledger {
    started: Mutex<HashMap<String, u32>>,
    answers: Mutex<HashMap<String, Value>>,
}

async fn slow_double(State(l): State<Arc<Ledger>>, headers: HeaderMap, Json(args): Json<Value>) -> Json<Value> {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("(none)").to_string();
    let first = {
        let mut started = l.started.lock().unwrap();
        let n = started.entry(key.clone()).or_default();
        *n += 1;
        *n == 1
    };
    if !first {
        // A retry of a call already executing or done: wait for its answer, never run it again.
        for _ in 0..200 {
            if let Some(a) = l.answers.lock().unwrap().get(&key) {
                return Json(a.clone());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let answer = json!({"value": args["n"].as_i64().unwrap_or(0) * 2});
    l.answers.lock().unwrap().insert(key, answer.clone());
    Json(answer)
}

/// The tool server on its own runtime thread; returns its port.
fn tool_server(ledger: Arc<Ledger>) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            let app = Router::new().route("/double", post(slow_double)).with_state(ledger);
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

fn agent_file(dir: &Path, port: u16) -> Result<PathBuf> {
    let agents = dir.join("agents");
    std::fs::create_dir_all(&agents)?;
    let toml = format!(
        r#"name = "doubler"
instructions = "Call the slow_double tool with the number the user gives."
model = "qwen"
tools = ["slow_double"]
max_steps = 3
max_tokens_per_step = 80
temperature = 0
tool_rules = {{ terminal = ["slow_double"] }}

[[http_tools]]
name = "slow_double"
description = "Doubles a number, slowly"
method = "POST"
url = "http://127.0.0.1:{port}/double"
parameters = {{ type = "object", properties = {{ n = {{ type = "integer" }} }}, required = ["n"] }}
"#
    );
    std::fs::write(agents.join("doubler.toml"), toml)?;
    Ok(agents)
}

#[path = "support/models.rs"]
mod models;

/// The optional-tier model (`scripts/fetch-models.sh qwen`), or `None` with SKIP printed.
fn qwen25() -> Option<PathBuf> {
    let p = models::models_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not fetched (scripts/fetch-models.sh qwen)", p.display());
        None
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Kiln {
    child: Child,
    base: String,
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kiln serve` and waits for /health.
fn serve(model: &Path, agents: &Path, store: &[&str], tool_port: u16) -> Result<Kiln> {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["serve", "--model", model.to_str().context("utf-8")?, "--served-model-name", "qwen"])
        .args(["--port", &port.to_string(), "--agents", agents.to_str().context("utf-8")?])
        .args(["--http-tool-hosts", &format!("127.0.0.1:{tool_port}"), "--run-lease-secs", "3"])
        .args(["--max-num-seqs", "4", "--kv-cache-memory", "64M"])
        .args(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn()?;
    let k = Kiln { child, base: format!("http://127.0.0.1:{port}") };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(180) {
        if get(&format!("{}/health", k.base)).is_ok_and(|(s, _)| s == 200) {
            return Ok(k);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("kiln did not become healthy")
}

fn get(url: &str) -> Result<(u16, Value)> {
    let resp = ureq_like("GET", url, None)?;
    Ok(resp)
}

/// A tiny blocking HTTP/1.1 client (the test has no HTTP client crate of its own).
fn ureq_like(method: &str, url: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http url")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status: u16 = text.split_whitespace().nth(1).context("status")?.parse()?;
    let payload = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok((status, serde_json::from_str(payload).unwrap_or(Value::Null)))
}

/// Starts a run in the background on `k`; returns its id.
fn start_run(k: &Kiln) -> Result<String> {
    let body = json!({"input": "Double 21.", "background": true});
    let (status, run) = ureq_like("POST", &format!("{}/v1/agents/doubler/runs", k.base), Some(&body))?;
    ensure!(status == 200, "start run: {status} {run}");
    Ok(run["id"].as_str().context("run id")?.to_string())
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

/// Kills the owner while its tool call runs; `survivor` (a restarted process, or another one on
/// the same database) must finish the run with every call executed exactly once.
fn crash_and_resume(model: &Path, store: Vec<String>, two_processes: bool) -> Result<()> {
    let ledger = Arc::new(Ledger::default());
    let port = tool_server(ledger.clone());
    let dir = tempfile::tempdir()?;
    let agents = agent_file(dir.path(), port)?;
    let store_args: Vec<&str> = store.iter().map(String::as_str).collect();
    let mut first = serve(model, &agents, &store_args, port)?;
    let other = if two_processes { Some(serve(model, &agents, &store_args, port)?) } else { None };
    let id = start_run(&first)?;
    wait_for("the tool call to start", Duration::from_secs(120), || !ledger.started.lock().unwrap().is_empty())?;
    first.child.kill()?; // SIGKILL: no shutdown code runs
    first.child.wait()?;
    let survivor = match other {
        Some(k) => k,
        None => serve(model, &agents, &store_args, port)?,
    };
    let url = format!("{}/v1/runs/{id}", survivor.base);
    let mut run = Value::Null;
    wait_for("the run to complete elsewhere", Duration::from_secs(120), || {
        run = get(&url).map(|(_, r)| r).unwrap_or(Value::Null);
        run["status"] == "completed" || run["status"] == "failed"
    })?;
    ensure!(run["status"] == "completed", "{run}");
    ensure!(run["output"]["value"] == 42, "{run}");
    let started = ledger.started.lock().unwrap().clone();
    let answered = ledger.answers.lock().unwrap().len();
    // One call (one key); the dead process's attempt and the survivor's retry both carried it,
    // and the retry got the first execution's answer: the tool ran once.
    ensure!(started.len() == 1 && answered == 1, "one call, executed once: {started:?}");
    ensure!(started.values().all(|&n| n == 2), "the survivor retried the same key: {started:?}");
    let (_, steps) = get(&format!("{url}/steps"))?;
    let steps = steps["data"].as_array().context("steps")?.clone();
    let calls = steps.iter().filter(|s| s["kind"] == "tool_call").count();
    let results = steps.iter().filter(|s| s["kind"] == "tool_result").count();
    ensure!(calls == started.len() && results == calls, "steps: {calls} calls, {results} results, {started:?}");
    ensure!(steps.iter().enumerate().all(|(i, s)| s["seq"] == i as u64), "no step lost");
    Ok(())
}

#[test]
fn kill_9_during_a_tool_call_then_restart_completes_without_rerunning_sqlite() -> Result<()> {
    let Some(model) = qwen25() else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data").display().to_string();
    crash_and_resume(&model, vec!["--data-dir".into(), data], false)
}

/// A fresh database on the test server named by `KILN_TEST_DATABASE_URL` (each test its own, so
/// their processes never claim each other's runs).
fn fresh_postgres(tag: &str) -> Option<String> {
    let Ok(url) = std::env::var("KILN_TEST_DATABASE_URL") else {
        eprintln!("SKIP: KILN_TEST_DATABASE_URL not set (scripts/test.sh starts a Postgres)");
        return None;
    };
    let name = format!("kiln_crash_{tag}_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&url).await.expect("connect to the test Postgres");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.expect("create database");
    });
    let (base, _) = url.rsplit_once('/')?;
    Some(format!("{base}/{name}"))
}

#[test]
fn kill_9_during_a_tool_call_then_restart_completes_without_rerunning_postgres() -> Result<()> {
    let Some(model) = qwen25() else { return Ok(()) };
    let Some(url) = fresh_postgres("one") else { return Ok(()) };
    crash_and_resume(&model, vec!["--database-url".into(), url], false)
}

#[test]
fn two_processes_on_one_postgres_the_survivor_takes_over() -> Result<()> {
    let Some(model) = qwen25() else { return Ok(()) };
    let Some(url) = fresh_postgres("two") else { return Ok(()) };
    crash_and_resume(&model, vec!["--database-url".into(), url], true)
}
