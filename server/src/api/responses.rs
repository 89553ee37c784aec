//! The OpenAI Responses API: `POST /v1/responses` (one model turn, JSON or SSE), `GET` and
//! `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, `POST
//! /v1/responses/{id}/cancel`. A turn's conversation is the previous response's (its input
//! chain and output, when `previous_response_id` is given) plus the new input; stored turns
//! park their engine session so the next turn of the chain reuses its K/V.
//! Owns: the stored record's shape (`{"response", "input", "history"}`, JSON so that a durable
//! store can keep it as is) and the response object's echoed fields. Must not: parse items or
//! model output (`responses_items.rs`, `responses_sse.rs`) or keep state outside `Responses`.

use super::chat::{render_messages, RenderOpts};
use super::error::{ApiError, ApiResult};
use super::generation::{collect, submit, track, unix_now, Tracked};
use super::request::{body_bytes, parse_body, query_error, Sampling};
use super::response_format::grammar_error;
use super::responses_items::{self as items, new_id, ResponsesRequest};
use super::responses_sse::{self as sse, Mode, OutputBuilder};
use super::responses_store::Parked;
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_inference::chat::{self, Conversation, Message, ToolPlan};
use kiln_inference::engine::{EngineHandle, Prompt};
use kiln_inference::tokenizer::Tokenizer;
use kiln_inference::{Constraint, EngineError, SamplingParams, Session, SessionInput};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// What happens when a turn ends: store its record and park its session (when `store`).
pub struct Finisher {
    state: Shared,
    id: String,
    store: bool,
    input: Vec<Value>,
    history: Vec<Value>,
    session: Option<Session>,
    /// What the prompt was rendered with (see `Parked::rendered_with`).
    rendered_with: String,
}

impl Finisher {
    pub async fn finish(self, response: &Value) -> ApiResult<()> {
        if !self.store {
            return Ok(());
        }
        let record = json!({"response": response, "input": self.input, "history": self.history});
        let r = &self.state.responses;
        r.store().put(&self.id, record).await.map_err(|e| ApiError::internal(e.to_string()))?;
        if let Some(session) = self.session {
            r.sessions.park(self.id, Parked { session, rendered_with: self.rendered_with });
        }
        Ok(())
    }
}

pub async fn create(
    State(state): State<Shared>,
    // The gate puts it on every request of a route that needs a scope (this one does).
    axum::Extension(principal): axum::Extension<super::auth::Principal>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: ResponsesRequest = parse_body(&body_bytes(body)?)?;
    if super::responses_agent::wants_agent(&req) {
        return super::responses_agent::create(state, principal, req).await;
    }
    state.check_model(&req.model)?;
    let background = req.background.unwrap_or(false);
    if background && req.stream.unwrap_or(false) {
        return Err(ApiError::invalid("stream", "streaming a background response is not supported yet"));
    }
    if background && req.store == Some(false) {
        return Err(ApiError::invalid("store", "a background response must be stored (store: true)"));
    }
    let plan = items::tool_plan(req.tools.as_deref(), req.tool_choice.as_ref(), req.parallel_tool_calls)?;
    let calls = plan.as_ref().is_some_and(ToolPlan::calls_allowed);
    let answer = items::answer_schema(req.text.as_ref())?;
    let sampling = Sampling { temperature: req.temperature, top_p: req.top_p, ..Sampling::default() };
    let mut params =
        sampling.to_params((req.max_output_tokens, "max_output_tokens"), None, &state.sampling_defaults())?;
    let engine = state.engine()?.clone();
    let mode = match (calls, &answer) {
        (false, _) => Mode::Text,
        (true, None) => Mode::Calls,
        (true, Some(_)) => Mode::CallsOrAnswer,
    };
    params.constraint = match (&plan, answer) {
        (Some(p), Some(a)) => Some(chat::grammar::constraint_with_answer(p, a)),
        (None, Some(a)) => Some(Constraint::json_schema(a)),
        (Some(p), None) => chat::grammar::constraint(p),
        (None, None) => None,
    };
    if plan.is_some() && !calls {
        kiln_inference::chat::forbid_call_token(engine.tokenizer(), &mut params);
    }
    let store = req.store.unwrap_or(true);
    let history = match &req.previous_response_id {
        Some(prev) => chain(&state, prev).await?,
        None => Vec::new(),
    };
    let input = items::input_items(req.input.as_ref())?;
    let mut all = history.clone();
    all.extend(input.iter().cloned());
    let messages = items::to_messages(req.instructions.as_deref(), &all, history.len())?;
    // A continued chain takes the previous turn's parked session, once. Its history holds the
    // earlier turns as rendered then: new tokens may be appended only if this turn renders them
    // the same way (same instructions and tools); otherwise the whole conversation is re-sent.
    let rendered_with = format!("{:?}", (&req.instructions, &plan));
    let parked = match (&req.previous_response_id, store) {
        (Some(p), true) => state.responses.sessions.take(p),
        _ => None,
    };
    let done = match &parked {
        Some(p) if p.rendered_with == rendered_with => {
            Some(items::to_messages(req.instructions.as_deref(), &history, history.len())?)
        }
        _ => None,
    };
    let prompt = render_turn(&state, engine.tokenizer(), plan.as_ref(), messages, done).await?;
    let grammar_param = if calls { "tools" } else { "text.format" };
    let session = store.then(|| parked.map_or_else(|| engine.session(), |p| p.session));
    let (tracked, session) = run_turn(&state, &engine, session, prompt, params)
        .await
        .map_err(|e| grammar_error(e, grammar_param, "input"))?;
    let id = new_id("resp");
    let shell = shell(&state, &id, &req);
    let finisher = Finisher { state: state.clone(), id, store, input, history, session, rendered_with };
    if background {
        return start_background(tracked, mode, shell, finisher).await;
    }
    if req.stream.unwrap_or(false) {
        return Ok(sse::stream(tracked, mode, shell, finisher));
    }
    let response = complete(tracked, mode, &shell).await.map_err(|e| grammar_error(e, grammar_param, "input"))?;
    finisher.finish(&response).await?;
    Ok(Json(response).into_response())
}

/// A turn's prompt: the whole conversation, and, when it continues a parked session whose
/// template renders the new messages as an extension of `done` (the previous turn's
/// conversation), just what to append to the session (the end of the model's last turn and the
/// new messages): then the previous turn's own tokens, exactly as generated, stay in the K/V.
struct TurnPrompt {
    ids: Vec<u32>,
    append: Option<Vec<u32>>,
}

async fn render_turn(
    state: &Shared,
    tok: &Arc<Tokenizer>,
    plan: Option<&ToolPlan>,
    messages: Vec<Message>,
    done: Option<Vec<Message>>,
) -> ApiResult<TurnPrompt> {
    let append = match &done {
        Some(done) => {
            let (tok, plan, next) = (tok.clone(), plan.cloned(), messages.clone());
            let done = done.clone();
            state
                .cpu(move || {
                    let kwargs = Map::new();
                    let conv = |m| Conversation { messages: m, tools: plan.as_ref(), kwargs: &kwargs };
                    chat::continuation(&tok, &conv(&done), &conv(&next))
                })
                .await?
        }
        None => None,
    };
    let opts = RenderOpts { plan, kwargs: Map::new(), add_generation_prompt: true, param: "input" };
    let ids = render_messages(state, tok, messages, opts).await?;
    Ok(TurnPrompt { ids, append })
}

/// Starts the turn: in `session` when given (stored responses), else as a plain request.
async fn run_turn(
    state: &Shared,
    engine: &EngineHandle,
    session: Option<Session>,
    prompt: TurnPrompt,
    params: SamplingParams,
) -> Result<(Tracked, Option<Session>), EngineError> {
    let Some(session) = session else {
        return Ok((submit(state, engine, Prompt::Tokens(prompt.ids), params).await?, None));
    };
    // A plain request checks this at submit; a session turn only on its stream, too late for a 400.
    let max = engine.info().max_model_len;
    let requested = prompt.ids.len().saturating_add(params.max_tokens.unwrap_or(1));
    if prompt.ids.len() >= max || requested > max {
        return Err(EngineError::ContextLengthExceeded { max, prompt: prompt.ids.len(), requested });
    }
    let input = match prompt.append {
        Some(tail) => SessionInput::Append(tail),
        None => SessionInput::Replace(prompt.ids),
    };
    // Session turns tokenize nothing, but compile their grammar: off the async workers.
    let (session, stream) = tokio::task::spawn_blocking(move || {
        let s = session.generate(input, params);
        (session, s)
    })
    .await
    .map_err(|e| EngineError::Internal(format!("a session task failed: {e}")))?;
    Ok((track(state, stream?), Some(session)))
}

/// Runs the turn to its end: the finished response object.
async fn complete(mut tracked: Tracked, mode: Mode, shell: &Value) -> Result<Value, EngineError> {
    let outs = collect(&mut tracked).await?;
    let out = outs.into_iter().next().unwrap_or_default();
    let mut b = OutputBuilder::new(mode);
    b.push(&out.text);
    b.finish(out.finish == Some(kiln_inference::FinishReason::Length));
    let usage = sse::usage(tracked.prompt_tokens(), out.tokens, tracked.cached_tokens());
    Ok(sse::finished(shell, &b, out.finish, usage))
}

/// `background: true`: the record is stored `queued` and returned at once; a task runs the turn
/// and stores the result unless `cancel` removed it from `running` first (whoever removes the
/// entry decides the final status, so a cancel never overwrites a finished result or the
/// reverse). Cancelling drops the task, which aborts the generation.
async fn start_background(tracked: Tracked, mode: Mode, mut shell: Value, finisher: Finisher) -> ApiResult<Response> {
    shell["status"] = json!("queued");
    let (state, id) = (finisher.state.clone(), finisher.id.clone());
    let record = json!({"response": shell, "input": finisher.input, "history": finisher.history});
    state.responses.store().put(&id, record).await.map_err(|e| ApiError::internal(e.to_string()))?;
    // Held until the task is registered, so it cannot finish (and find no entry) before that.
    let mut running = state.responses.running.lock().await;
    let task_shell = shell.clone();
    let task = tokio::spawn(async move {
        let response = match complete(tracked, mode, &task_shell).await {
            Ok(r) => r,
            Err(e) => {
                let mut r = task_shell;
                r["status"] = json!("failed");
                r["error"] = json!({"code": "server_error", "message": e.to_string()});
                r
            }
        };
        let state = finisher.state.clone();
        if state.responses.running.lock().await.remove(&finisher.id).is_none() {
            return; // cancelled meanwhile
        }
        let id = finisher.id.clone();
        if let Err(e) = finisher.finish(&response).await {
            tracing::error!(response = %id, error = %e.message, "cannot store a background response");
        }
    });
    running.insert(id, task.abort_handle());
    Ok(Json(shell).into_response())
}

/// The conversation a continuation starts from: the previous turn's history, input and output.
async fn chain(state: &Shared, prev: &str) -> ApiResult<Vec<Value>> {
    let rec = load(state, prev).await?.ok_or_else(|| {
        let mut e = ApiError::not_found(format!("Previous response with id '{prev}' not found."));
        e.param = Some("previous_response_id".into());
        e
    })?;
    let mut items = Vec::new();
    for k in ["history", "input"] {
        items.extend(rec[k].as_array().cloned().unwrap_or_default());
    }
    items.extend(rec["response"]["output"].as_array().cloned().unwrap_or_default());
    Ok(items)
}

pub(super) async fn load(state: &Shared, id: &str) -> ApiResult<Option<Value>> {
    state.responses.store().get(id).await.map_err(|e| ApiError::internal(e.to_string()))
}

async fn record(state: &Shared, id: &str) -> ApiResult<Value> {
    load(state, id).await?.ok_or_else(|| ApiError::not_found(format!("Response with id '{id}' not found.")))
}

/// The response object as created (`in_progress`, no output yet), echoing the request.
pub(super) fn shell(state: &Shared, id: &str, req: &ResponsesRequest) -> Value {
    let text = req.text.clone().filter(|t| !t.is_null()).unwrap_or_else(|| json!({"format": {"type": "text"}}));
    json!({
        "id": id, "object": "response", "created_at": unix_now(), "status": "in_progress",
        "background": req.background.unwrap_or(false), "error": null, "incomplete_details": null,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": state.served_model_name, "output": [], "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": req.previous_response_id, "reasoning": req.reasoning.clone().filter(|r| r.is_object()).unwrap_or_else(|| json!({"effort": null, "summary": null})),
        "store": req.store.unwrap_or(true), "temperature": req.temperature.unwrap_or(1.0), "text": text,
        "tool_choice": req.tool_choice.clone().filter(|c| !c.is_null()).unwrap_or_else(|| json!("auto")),
        "tools": req.tools.clone().unwrap_or_default(), "top_p": req.top_p.unwrap_or(1.0),
        "truncation": req.truncation.clone().unwrap_or_else(|| "disabled".into()), "usage": null,
        "user": req.user, "metadata": req.metadata.clone().unwrap_or_default(),
    })
}

pub async fn get(State(state): State<Shared>, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let id = response_id(id)?;
    Ok(Json(record(&state, &id).await?["response"].take()))
}

pub async fn delete(State(state): State<Shared>, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let id = response_id(id)?;
    let r = &state.responses;
    if !r.store().delete(&id).await.map_err(|e| ApiError::internal(e.to_string()))? {
        return Err(ApiError::not_found(format!("Response with id '{id}' not found.")));
    }
    drop(r.sessions.take(&id));
    if let Some(task) = r.running.lock().await.remove(&id) {
        task.abort();
    }
    Ok(Json(json!({"id": id, "object": "response", "deleted": true})))
}

/// Cancels a background response still running (its generation is aborted, its record
/// becomes `cancelled`); a finished background response is returned as it is; any other one is a
/// 400, as on OpenAI.
pub async fn cancel(State(state): State<Shared>, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<Value>> {
    let id = response_id(id)?;
    let mut rec = record(&state, &id).await?;
    if rec["response"]["background"] != json!(true) {
        return Err(ApiError::invalid("response_id", "Only responses created with background=true can be cancelled."));
    }
    let Some(task) = state.responses.running.lock().await.remove(&id) else {
        return Ok(Json(rec["response"].take()));
    };
    task.abort();
    // A response of the agent layer also stops its run (the run's own record says cancelled).
    if let (Some(run), Some(rt)) = (rec["run_id"].as_str(), state.agents()) {
        if let Err(e) = rt.cancel(run).await {
            tracing::warn!(run, error = %e, "cancelling the run of a background response");
        }
    }
    rec["response"]["status"] = json!("cancelled");
    state.responses.store().put(&id, rec.clone()).await.map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(rec["response"].take()))
}

/// The `{id}` of the path, with a malformed one in OpenAI's error shape like any other mistake.
fn response_id(p: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::invalid("response_id", format!("invalid response id: {}", e.body_text())))
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListQuery {
    limit: Option<i64>,
    order: Option<String>,
    after: Option<String>,
}

/// The request's own input items, newest first unless `order=asc` (OpenAI's default), paged
/// by `limit` (1..=100, default 20) and `after` (an item id).
pub async fn input_items(
    State(state): State<Shared>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let id = response_id(id)?;
    let Query(q) = q.map_err(query_error)?;
    let mut data = record(&state, &id).await?["input"].as_array().cloned().unwrap_or_default();
    match q.order.as_deref() {
        None | Some("desc") => data.reverse(),
        Some("asc") => {}
        Some(_) => return Err(ApiError::invalid("order", "order must be 'asc' or 'desc'")),
    }
    let limit = match q.limit {
        None => 20,
        Some(n @ 1..=100) => n as usize,
        Some(_) => return Err(ApiError::invalid("limit", "limit must be between 1 and 100")),
    };
    if let Some(after) = &q.after {
        let at = data
            .iter()
            .position(|it| it["id"].as_str() == Some(after))
            .ok_or_else(|| ApiError::invalid("after", format!("no input item with id '{after}'")))?;
        data.drain(..=at);
    }
    let has_more = data.len() > limit;
    data.truncate(limit);
    let first = data.first().map(|it| it["id"].clone());
    let last = data.last().map(|it| it["id"].clone());
    Ok(Json(json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})))
}
