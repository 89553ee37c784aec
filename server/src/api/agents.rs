//! The agent API: `/v1/agents` (create, list, get, patch, delete), runs of an agent
//! (`POST /v1/agents/{name}/runs`: wait for the result, `background: true` to return at once,
//! or `stream: true` for SSE), and `/v1/runs/{id}` (get, steps, cancel, approve, reject).
//! Maps HTTP to [`kiln_agent::AgentRuntime`] and its errors to OpenAI-shaped bodies; the loop,
//! the store and the tools live in `kiln-agent`. State changes (agent create/patch/delete, run
//! cancel/approve/reject) return an [`audit::AdminAction`] beside their body for the audit log.

use super::audit::{self, AdminAction};
use super::error::{ApiError, ApiResult};
use super::request::{body_bytes, parse_body};
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{self, StreamExt};
use kiln_agent::store::{RunRecord, StepRecord};
use kiln_agent::{AgentRuntime, RunError, RunEvent, RunInput};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast;

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::NotFound(m) => ApiError::not_found(m),
            RunError::Invalid(field, m) => ApiError::invalid(&field, m),
            RunError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m),
            RunError::Engine(e) => ApiError::from_engine(e, "input"),
            RunError::Unavailable(m) => ApiError::unavailable(m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

fn runtime(state: &Shared) -> ApiResult<&AgentRuntime> {
    state.engine()?;
    state.agents().ok_or_else(|| ApiError::unavailable("the agent runtime is not started (see --data-dir)"))
}

/// A run as clients see it. `cost` is null unless prices are configured (`--price-*`).
pub fn run_json(rt: &AgentRuntime, r: &RunRecord) -> Value {
    json!({
        "id": r.id, "object": "agent.run", "agent": r.agent, "status": r.status.as_str(),
        "input": r.input, "output": r.output, "usage": r.usage, "error": r.error,
        "cost": rt.cost(&r.usage),
        "created_at": r.created_at / 1000, "updated_at": r.updated_at / 1000,
    })
}

fn step_json(s: &StepRecord) -> Value {
    json!({"object": "agent.run.step", "run_id": s.run_id, "seq": s.seq, "kind": s.kind.as_str(),
        "data": s.data, "created_at": s.created_at})
}

/// A handler's body with the admin action it performed.
type Audited = ApiResult<(Extension<AdminAction>, Json<Value>)>;

pub async fn create(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> Audited {
    let def: Value = parse_body(&body_bytes(body)?)?;
    let spec = runtime(&state)?.create_agent(def).await?;
    Ok((audit::action("agent.create", &spec.name), Json(spec.to_json())))
}

pub async fn list(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let data = runtime(&state)?.list_agents().await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get(State(state): State<Shared>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(runtime(&state)?.get_agent(&name).await?.to_json()))
}

pub async fn patch(
    State(state): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Audited {
    let patch: Value = parse_body(&body_bytes(body)?)?;
    let spec = runtime(&state)?.patch_agent(&name, patch).await?;
    Ok((audit::action("agent.update", &name), Json(spec.to_json())))
}

pub async fn delete(State(state): State<Shared>, Path(name): Path<String>) -> Audited {
    runtime(&state)?.delete_agent(&name).await?;
    Ok((audit::action("agent.delete", &name), Json(json!({"id": name, "object": "agent.deleted", "deleted": true}))))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RunRequest {
    input: String,
    #[serde(default)]
    variables: serde_json::Map<String, Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    background: bool,
}

pub async fn start_run(
    State(state): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: RunRequest = parse_body(&body_bytes(body)?)?;
    let rt = runtime(&state)?;
    let (run, rx) =
        rt.start_run(&name, RunInput { input: req.input, variables: req.variables, ..RunInput::default() }).await?;
    if req.stream {
        return Ok(sse(rt.clone(), run, rx));
    }
    if req.background {
        return Ok(Json(run_json(rt, &run)).into_response());
    }
    wait(rt, &run.id, rx).await?;
    Ok(Json(run_json(rt, &rt.get_run(&run.id).await?)).into_response())
}

/// Waits until the run ends or pauses (its last event), then the caller reads its record.
pub(super) async fn wait(rt: &AgentRuntime, id: &str, mut rx: broadcast::Receiver<RunEvent>) -> ApiResult<()> {
    loop {
        match rx.recv().await {
            Ok(ev) if ev.is_last() => return Ok(()),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            // The channel closed without a last event (the run was taken over or failed hard):
            // the record says where it is.
            Err(broadcast::error::RecvError::Closed) => return rt.get_run(id).await.map(|_| ()).map_err(Into::into),
        }
    }
}

/// The run's events as SSE (`event: <type>`, `data: <json>`), ending after its last event.
fn sse(rt: AgentRuntime, run: RunRecord, rx: broadcast::Receiver<RunEvent>) -> Response {
    let first = RunEvent::Created { run: run_json(&rt, &run) };
    let events = stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(RunEvent::Created { .. }) => {}
                Ok(ev) => {
                    let last = ev.is_last();
                    return Some((ev, (rx, last)));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(skipped = n, "slow SSE reader"),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = stream::once(async move { first })
        .chain(events)
        .map(move |ev| Ok::<_, Infallible>(Event::default().event(ev.name()).data(event_data(&rt, &ev).to_string())));
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// An event's JSON with runs in their client shape.
fn event_data(rt: &AgentRuntime, ev: &RunEvent) -> Value {
    let mut v = ev.to_json();
    if let Some(run) = v.get_mut("run") {
        if let Ok(r) = serde_json::from_value::<RunRecord>(run.clone()) {
            *run = run_json(rt, &r);
        }
    }
    v
}

pub async fn get_run(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rt = runtime(&state)?;
    Ok(Json(run_json(rt, &rt.get_run(&id).await?)))
}

pub async fn steps(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let steps = runtime(&state)?.steps(&id).await?;
    Ok(Json(json!({"object": "list", "data": steps.iter().map(step_json).collect::<Vec<_>>()})))
}

pub async fn cancel(State(state): State<Shared>, Path(id): Path<String>) -> Audited {
    let rt = runtime(&state)?;
    let run = rt.cancel(&id).await?;
    Ok((audit::action("run.cancel", id), Json(run_json(rt, &run))))
}

#[derive(Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Decision {
    call_id: Option<String>,
    reason: Option<String>,
}

pub async fn approve(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Audited {
    decide(state, id, body, true).await
}

pub async fn reject(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Audited {
    decide(state, id, body, false).await
}

async fn decide(state: Shared, id: String, body: Result<Bytes, BytesRejection>, ok: bool) -> Audited {
    let bytes = body_bytes(body)?;
    let d: Decision = if bytes.is_empty() { Decision::default() } else { parse_body(&bytes)? };
    let rt = runtime(&state)?;
    let run = rt.approve(&id, d.call_id.as_deref(), ok, d.reason).await?;
    Ok((audit::action(if ok { "run.approve" } else { "run.reject" }, id), Json(run_json(rt, &run))))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ToolOutputs {
    tool_outputs: Vec<ToolOutput>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ToolOutput {
    call_id: String,
    output: String,
}

/// `POST /v1/runs/{id}/tool_outputs` with `{"tool_outputs": [{"call_id", "output"}]}`: the results
/// of the agent's client tools (`client_tools`) the paused run waits on; the run resumes.
pub async fn tool_outputs(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let req: ToolOutputs = parse_body(&body_bytes(body)?)?;
    let rt = runtime(&state)?;
    let outputs = req.tool_outputs.into_iter().map(|o| (o.call_id, o.output)).collect();
    Ok(Json(run_json(rt, &rt.submit_tool_outputs(&id, outputs).await?)))
}

/// `GET /v1/runs/{id}/events` as a WebSocket: the run as it is now (`run.snapshot`), then its
/// live events as JSON text messages (the same objects as the SSE `data`), closed after its last
/// event. A run that already ended gets the snapshot and a close.
pub async fn events_ws(
    State(state): State<Shared>,
    Path(id): Path<String>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> ApiResult<Response> {
    let rt = runtime(&state)?.clone();
    // Subscribe before reading the record, so nothing falls between the two.
    let rx = rt.subscribe(&id);
    let run = rt.get_run(&id).await?;
    Ok(ws.on_upgrade(move |socket| relay(socket, rt, run, rx)))
}

async fn relay(
    mut socket: axum::extract::ws::WebSocket,
    rt: AgentRuntime,
    run: RunRecord,
    mut rx: broadcast::Receiver<RunEvent>,
) {
    use axum::extract::ws::Message;
    let snapshot = json!({"type": "run.snapshot", "run": run_json(&rt, &run)});
    if socket.send(Message::Text(snapshot.to_string().into())).await.is_err() {
        return;
    }
    let live = matches!(run.status.as_str(), "queued" | "in_progress");
    if !live {
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "slow WebSocket reader");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        if socket.send(Message::Text(event_data(&rt, &ev).to_string().into())).await.is_err() || ev.is_last() {
            break;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
