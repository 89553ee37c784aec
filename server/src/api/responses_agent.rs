//! The Responses API over the agent layer, so that an unchanged OpenAI client can use kiln's
//! server-side tools and agents: `model: "agent:NAME"` runs the stored agent NAME, and tools
//! `{"type": "mcp", "server_label": L}` (L a server of `--mcp-config`, or `kiln` for the
//! builtins; `allowed_tools` and `require_approval` as on OpenAI) run a tool loop with those
//! tools in a run of an agent the request defines. Either way the turn is a durable agent run
//! (`run_id` in the stored record): its calls come back as `mcp_call` items (arguments, output or
//! error), calls that need approval as `mcp_approval_request` items, answered by a next request
//! with `previous_response_id` and `mcp_approval_response` items. `stream: true` sends items as
//! the run completes them (`responses_agent_sse.rs`).
//!
//! Owns: mapping a request to a run and a run's steps to output items. Must not: run tools or
//! the loop (kiln-agent does), or parse plain turns (`responses.rs`).

use super::agents::wait;
use super::audit::AdminAction;
use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::generation::unix_now;
use super::responses::{load, shell};
use super::responses_file_search::{self as file_search, FILE_SEARCH};
use super::responses_items::{self as items, new_id, ResponsesRequest};
use super::responses_sse as sse;
use super::scopes::Scope;
use super::Shared;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_agent::conversation::Prepared;
use kiln_agent::history::{ModelStep, ResultStep};
use kiln_agent::spec::{AgentSpec, ToolRules};
use kiln_agent::store::{RunRecord, RunStatus, StepKind, StepRecord};
use kiln_agent::{AgentRuntime, RunEvent, RunInput};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// `model: "agent:NAME"` names a stored agent.
pub const AGENT_MODEL_PREFIX: &str = "agent:";
/// The `server_label` of kiln's own builtin tools.
pub const KILN_LABEL: &str = "kiln";

/// Whether the agent layer answers this request: an agent model, an `mcp` tool, or approval
/// decisions for a paused run.
pub fn wants_agent(req: &ResponsesRequest) -> bool {
    let typed = |v: &Value, t: &str| v.get("type").and_then(Value::as_str) == Some(t);
    searches_files(req)
        || req.model.starts_with(AGENT_MODEL_PREFIX)
        || req.tools.iter().flatten().any(|t| typed(t, "mcp"))
        || req
            .input
            .as_ref()
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|i| typed(i, "mcp_approval_response")))
}

/// Whether the request has a `file_search` tool.
fn searches_files(req: &ResponsesRequest) -> bool {
    req.tools.iter().flatten().any(|t| t.get("type").and_then(Value::as_str) == Some(FILE_SEARCH))
}

/// Server-side tools and agents act beyond inference (`/v1/responses` itself needs only
/// `inference`): agents and mcp tools need the `agents` scope, `file_search` (which reads vector
/// stores) the `memory` scope, like the vector stores API.
fn check_scopes(principal: &Principal, req: &ResponsesRequest) -> ApiResult<()> {
    let search = searches_files(req);
    let only_search = search
        && !req.model.starts_with(AGENT_MODEL_PREFIX)
        && !req.tools.iter().flatten().any(|t| t.get("type").and_then(Value::as_str) == Some("mcp"));
    let missing = if !only_search && !principal.scopes.contains(Scope::Agents) {
        Some("This credential lacks the 'agents' scope, which agents and mcp tools in /v1/responses require")
    } else if search && !principal.scopes.contains(Scope::Memory) {
        Some("This credential lacks the 'memory' scope, which the file_search tool in /v1/responses requires")
    } else {
        None
    };
    match missing {
        Some(m) => Err(ApiError::new(StatusCode::FORBIDDEN, "permission_error", m).with_code("insufficient_scope")),
        None => Ok(()),
    }
}

/// Runs the turn.
pub async fn create(state: Shared, principal: Principal, req: ResponsesRequest) -> ApiResult<Response> {
    check_scopes(&principal, &req)?;
    state.engine()?;
    let rt = state.agents().ok_or_else(|| ApiError::unavailable("the agent runtime is not started"))?.clone();
    let background = req.background.unwrap_or(false);
    if background && (req.stream.unwrap_or(false) || req.store == Some(false)) {
        let (p, m) = if req.stream.unwrap_or(false) {
            ("stream", "streaming a background response is not supported yet")
        } else {
            ("store", "a background response must be stored (store: true)")
        };
        return Err(ApiError::invalid(p, m));
    }
    let prev = match &req.previous_response_id {
        Some(p) => Some(load(&state, p).await?.ok_or_else(|| {
            let mut e = ApiError::not_found(format!("Previous response with id '{p}' not found."));
            e.param = Some("previous_response_id".into());
            e
        })?),
        None => None,
    };
    let input = items::input_items(req.input.as_ref())?;
    let decisions: Vec<&Value> =
        input.iter().filter(|i| i["type"] == "mcp_approval_response" || i["type"] == "function_call_output").collect();
    let id = new_id("resp");
    let conversation = conversation_id(prev.as_ref(), req.previous_response_id.as_deref(), &id);
    let mut history = prev.as_ref().map(chain_items).unwrap_or_default();
    let (run_id, rx, seen) = if decisions.is_empty() {
        let started = start(&state, &rt, &req, prev.as_ref(), &input, &conversation).await?;
        if let Some(kept) = started.history {
            history = kept;
        }
        (started.run_id, started.events, 0)
    } else {
        resume(&rt, prev.as_ref(), &decisions).await?
    };
    // Approvals are admin actions, audited as on /v1/runs/{id}/approve.
    let approved = decisions.iter().find(|d| d["type"] == "mcp_approval_response").map(|d| {
        if d["approve"] == true {
            "run.approve"
        } else {
            "run.reject"
        }
    });
    let shell = shell(&state, &id, &req);
    let store = req.store.unwrap_or(true);
    let search_results = includes(&req, "file_search_call.results");
    let turn = Turn {
        state,
        rt,
        shell,
        id,
        store,
        input,
        history,
        conversation,
        run_id: run_id.clone(),
        seen,
        search_results,
    };
    let mut resp = if background {
        turn.background(rx).await?
    } else if req.stream.unwrap_or(false) {
        super::responses_agent_sse::stream(turn, rx)
    } else {
        wait(&turn.rt, &turn.run_id, rx).await?;
        Json(turn.finish().await?).into_response()
    };
    if let Some(action) = approved {
        resp.extensions_mut().insert(AdminAction { action, target: run_id });
    }
    Ok(resp)
}

/// One response's turn of a run: what finishing it needs.
pub struct Turn {
    pub state: Shared,
    pub rt: AgentRuntime,
    /// The response object as created (echoed request fields, no output).
    pub shell: Value,
    pub id: String,
    store: bool,
    input: Vec<Value>,
    /// The conversation before `input`, compacted when the agent's policy asked for it.
    history: Vec<Value>,
    /// The chain's first response id: names its memory scope (`run:{conversation}`).
    conversation: String,
    pub run_id: String,
    /// Steps of the run an earlier response already showed.
    pub seen: usize,
    /// `include: ["file_search_call.results"]`: `file_search_call` items carry their results.
    search_results: bool,
}

impl Turn {
    /// The output items the run's steps have completed so far (what a stream may send now).
    pub async fn items_so_far(&self) -> ApiResult<Vec<Value>> {
        let steps = self.rt.steps(&self.run_id).await?;
        Ok(output_items(&self.rt, &self.run_id, &steps, (self.seen, self.search_results)))
    }

    /// `background: true`: the record is stored `queued` (with the run id, so `cancel` can cancel
    /// the run) and returned at once; a task stores the finished response when the run ends or
    /// pauses. A restart loses the task, not the run: the run resumes, the record stays `queued`.
    async fn background(self, rx: broadcast::Receiver<RunEvent>) -> ApiResult<Response> {
        let mut shell = self.shell.clone();
        shell["status"] = json!("queued");
        let record = json!({"response": shell, "input": self.input, "history": self.history, "run_id": self.run_id,
            "steps_seen": self.seen, "conversation": self.conversation});
        let store = self.state.responses.store().clone();
        store.put(&self.id, record).await.map_err(|e| ApiError::internal(e.to_string()))?;
        let state = self.state.clone();
        let mut running = state.responses.running.lock().await;
        let id = self.id.clone();
        let task = tokio::spawn(async move {
            let ended = wait(&self.rt, &self.run_id, rx).await;
            // Whoever removes the entry decides the final record (`cancel` may have done so).
            if self.state.responses.running.lock().await.remove(&self.id).is_none() {
                return;
            }
            if let Err(e) = ended.and(self.finish().await.map(|_| ())) {
                tracing::error!(response = %self.id, error = %e.message, "cannot finish a background agent response");
            }
        });
        running.insert(id, task.abort_handle());
        Ok(Json(shell).into_response())
    }

    /// The finished response object, stored (when `store`) with the run id and the steps shown.
    pub async fn finish(&self) -> ApiResult<Value> {
        let run = self.rt.get_run(&self.run_id).await?;
        let steps = self.rt.steps(&self.run_id).await?;
        let response = response_object(&self.rt, &self.shell, &run, &steps, (self.seen, self.search_results));
        if self.store {
            let record = json!({"response": response, "input": self.input, "history": self.history,
                "run_id": run.id, "steps_seen": steps.len(), "conversation": self.conversation});
            self.state.responses.store().put(&self.id, record).await.map_err(|e| ApiError::internal(e.to_string()))?;
        }
        Ok(response)
    }
}
/// The earlier conversation of a stored record: its history, input and output.
fn chain_items(rec: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for list in [&rec["history"], &rec["input"], &rec["response"]["output"]] {
        out.extend(list.as_array().cloned().unwrap_or_default());
    }
    out
}

/// A chain's conversation id: its first response's id, carried by every later record.
fn conversation_id(prev: Option<&Value>, prev_id: Option<&str>, own: &str) -> String {
    let carried = prev.and_then(|p| p["conversation"].as_str());
    carried.or(prev_id).unwrap_or(own).to_string()
}

/// A started run, and the conversation to keep when the agent's policy compacted it.
struct Started {
    run_id: String,
    events: broadcast::Receiver<RunEvent>,
    history: Option<Vec<Value>>,
}

/// A new run: the request's conversation (the chain before it and its own items but the last)
/// as history, its last item (a user message) as the run's input.
async fn start(
    state: &Shared,
    rt: &AgentRuntime,
    req: &ResponsesRequest,
    prev: Option<&Value>,
    input: &[Value],
    conversation: &str,
) -> ApiResult<Started> {
    let spec = match req.model.strip_prefix(AGENT_MODEL_PREFIX) {
        Some(name) => {
            for (field, set) in [("tools", req.tools.is_some()), ("instructions", req.instructions.is_some())] {
                if set {
                    let m = format!("{field} cannot be given with an agent model: the agent brings its own");
                    return Err(ApiError::invalid(field, m));
                }
            }
            rt.get_agent(name).await?
        }
        None => {
            state.check_model(&req.model)?;
            inline_spec(state, rt, req).await?
        }
    };
    let Some((last, earlier)) = input.split_last().filter(|(l, _)| l["type"] == "message" && l["role"] == "user")
    else {
        return Err(ApiError::invalid("input", "the input must end with a user message"));
    };
    let mut all = prev.map(chain_items).unwrap_or_default();
    let first_new = all.len();
    all.extend(earlier.iter().cloned());
    let history = match all.is_empty() {
        true => Vec::new(),
        false => items::to_messages(None, &all, first_new)?,
    };
    let text = items::to_messages(None, std::slice::from_ref(last), 0)?.remove(0).content;
    let prepared = rt.prepare_conversation(&spec, conversation, history, &text).await?;
    let kept = (prepared.compacted_turns > 0).then(|| compacted_items(&prepared, &all, first_new));
    let mut variables = Map::new();
    if let Some(i) = &req.instructions {
        variables.insert("instructions".into(), json!(i));
    }
    let inline = (!req.model.starts_with(AGENT_MODEL_PREFIX)).then(|| spec.clone());
    let run_input = RunInput { input: text, variables, history: prepared.prompt_history, spec: inline };
    let (run, events) = rt.start_run(&spec.name, run_input).await?;
    Ok(Started { run_id: run.id, events, history: kept })
}

/// The record's history after a compaction: the summary as a system message, then the chain's
/// items from the first user message the summary did not fold in. Only the chain (`all[..chain]`)
/// is history; this request's own items stay its `input` (a compaction reaching into them
/// leaves them there verbatim too: repeated, never lost).
fn compacted_items(prepared: &Prepared, all: &[Value], chain: usize) -> Vec<Value> {
    let is_user = |v: &Value| v["type"] == "message" && v["role"] == "user";
    let user_items: Vec<usize> = (0..all.len()).filter(|&i| is_user(&all[i])).collect();
    let cut = user_items.get(prepared.compacted_turns).copied().unwrap_or(all.len()).min(chain);
    let summary = prepared.history.first().map(|m| m.content.clone()).unwrap_or_default();
    let mut out = vec![json!({"type": "message", "role": "system", "content": summary})];
    out.extend(all[cut..chain].iter().cloned());
    out
}

/// Applies approval decisions to the run the previous response paused (which resumes it);
/// returns its id, its events, and how many of its steps the previous response already showed.
async fn resume(
    rt: &AgentRuntime,
    prev: Option<&Value>,
    decisions: &[&Value],
) -> ApiResult<(String, broadcast::Receiver<RunEvent>, usize)> {
    let bad = |m: &str| ApiError::invalid("previous_response_id", m.to_string());
    let prev = prev.ok_or_else(|| bad("mcp_approval_response items need the previous_response_id they answer"))?;
    let run_id = prev["run_id"].as_str().ok_or_else(|| bad("the previous response did not run server-side tools"))?;
    let seen = prev["steps_seen"].as_u64().unwrap_or(0) as usize;
    let rx = rt.subscribe(run_id);
    let (outputs, decisions): (Vec<&Value>, Vec<&Value>) =
        decisions.iter().partition(|d| d["type"] == "function_call_output");
    if !outputs.is_empty() {
        let results = outputs.iter().map(|o| (text(o, "call_id"), text(o, "output"))).collect();
        rt.submit_tool_outputs(run_id, results).await.map_err(input_error)?;
    }
    for d in decisions {
        let request = d["approval_request_id"].as_str().unwrap_or_default();
        let call = request.strip_prefix("mcpr_").unwrap_or(request);
        let reason = d["reason"].as_str().map(str::to_string);
        let approve = d["approve"].as_bool().unwrap_or(false);
        rt.approve(run_id, Some(call), approve, reason).await.map_err(input_error)?;
    }
    Ok((run_id.to_string(), rx, seen))
}

/// A decision the run refuses names the request's `input` (the runtime names its own fields).
fn input_error(e: kiln_agent::RunError) -> ApiError {
    match e {
        kiln_agent::RunError::Invalid(_, m) => ApiError::invalid("input", m),
        other => other.into(),
    }
}

fn text(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// The agent a request with `mcp` tools defines: its instructions (taken literally), the
/// tools of the named servers, approval as asked (OpenAI's default: every call needs it).
async fn inline_spec(state: &Shared, rt: &AgentRuntime, req: &ResponsesRequest) -> ApiResult<AgentSpec> {
    let mut tools = Vec::new();
    let mut approval = Vec::new();
    let mut client = Vec::new();
    let mut search = None;
    for (i, t) in req.tools.iter().flatten().enumerate() {
        let p = format!("tools[{i}]");
        match t.get("type").and_then(Value::as_str) {
            Some("function") => client.push(client_tool(&p, t)?),
            Some(FILE_SEARCH) if search.is_some() => {
                return Err(ApiError::invalid(&p, "give one file_search tool (it may list several vector stores)"));
            }
            Some(FILE_SEARCH) => {
                search = Some(file_search::settings(state, &p, t).await?);
                tools.push(FILE_SEARCH.to_string());
            }
            _ => {
                let (names, ask) = mcp_tool(rt, &p, t)?;
                approval.extend(names.iter().filter(|n| ask(n)).cloned());
                tools.extend(names);
            }
        }
    }
    let call_first = call_first(req.tool_choice.as_ref(), search.is_some())?;
    let output_schema = items::answer_schema(req.text.as_ref())?;
    let max_tokens = match req.max_output_tokens {
        None => 512,
        Some(n @ 1..=1_000_000) => n as u32,
        Some(_) => return Err(ApiError::invalid("max_output_tokens", "max_output_tokens must be at least 1")),
    };
    let def = json!({
        "name": "response", "model": state.served_model_name, "tools": tools, "client_tools": client,
        "instructions": if req.instructions.is_some() { "{{ instructions }}" } else { "" },
        "max_tokens_per_step": max_tokens, "output_schema": output_schema, "temperature": req.temperature,
    });
    let mut spec = AgentSpec::from_json(def).map_err(|e| ApiError::invalid(&e.field, e.message))?;
    spec.tool_rules = ToolRules { requires_approval: approval, call_first, ..ToolRules::default() };
    spec.file_search = search;
    Ok(spec)
}

/// `tool_choice` with server-side tools: `auto`, or `required` (and `{"type": "file_search"}`
/// with a file_search tool), which makes the first turn call a tool.
fn call_first(choice: Option<&Value>, search: bool) -> ApiResult<bool> {
    match choice {
        None | Some(Value::Null) => Ok(false),
        Some(c) if c == "auto" => Ok(false),
        Some(c) if c == "required" => Ok(true),
        Some(c) if search && c.get("type").and_then(Value::as_str) == Some(FILE_SEARCH) => Ok(true),
        Some(_) => Err(ApiError::invalid(
            "tool_choice",
            "with server-side tools, tool_choice may be 'auto', 'required' or {\"type\": \"file_search\"}",
        )),
    }
}

/// A flat function tool, run by the client: the run pauses at its calls and the response
/// returns them as `function_call` items.
fn client_tool(p: &str, t: &Value) -> ApiResult<Value> {
    let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
    if !kiln_inference::chat::valid_name(name) {
        let m = "a function tool needs a 'name' of a-z, A-Z, 0-9, '_' and '-' (at most 64)";
        return Err(ApiError::invalid(&format!("{p}.name"), m));
    }
    Ok(json!({"name": name, "description": t.get("description").and_then(Value::as_str).unwrap_or_default(),
        "parameters": t.get("parameters").filter(|v| !v.is_null())}))
}

type AskFn = Box<dyn Fn(&String) -> bool>;

/// One `mcp` tool entry: the tool names it brings and which of them need approval.
fn mcp_tool(rt: &AgentRuntime, p: &str, t: &Value) -> ApiResult<(Vec<String>, AskFn)> {
    if t.get("type").and_then(Value::as_str) != Some("mcp") {
        let m = "beside mcp tools, only function and file_search tools are supported";
        return Err(ApiError::invalid(&format!("{p}.type"), m));
    }
    if t.get("server_url").is_some_and(|u| !u.is_null()) {
        let m = "kiln calls only the MCP servers of its --mcp-config (and 'kiln' for its builtins): give server_label";
        return Err(ApiError::invalid(&format!("{p}.server_url"), m));
    }
    let label = t.get("server_label").and_then(Value::as_str).unwrap_or_default();
    let mut names = rt.tools_served_by((label != KILN_LABEL).then_some(label));
    if names.is_empty() {
        let m = format!("no MCP server '{label}' is configured (kiln's builtins are '{KILN_LABEL}')");
        return Err(ApiError::invalid(&format!("{p}.server_label"), m));
    }
    if let Some(allowed) = t.get("allowed_tools").filter(|a| !a.is_null()) {
        let list = allowed.get("tool_names").unwrap_or(allowed);
        let wanted = name_list(&format!("{p}.allowed_tools"), list)?;
        if let Some(bad) = wanted.iter().find(|w| !names.contains(w)) {
            return Err(ApiError::invalid(&format!("{p}.allowed_tools"), format!("'{label}' has no tool '{bad}'")));
        }
        names.retain(|n| wanted.contains(n));
    }
    Ok((names, approval_rule(&format!("{p}.require_approval"), t.get("require_approval"))?))
}

/// `require_approval`: `always` (OpenAI's default), `never`, or `{"always"|"never": {"tool_names"}}`.
fn approval_rule(p: &str, rule: Option<&Value>) -> ApiResult<AskFn> {
    match rule {
        None | Some(Value::Null) => Ok(Box::new(|_| true)),
        Some(Value::String(s)) if s == "always" => Ok(Box::new(|_| true)),
        Some(Value::String(s)) if s == "never" => Ok(Box::new(|_| false)),
        Some(Value::Object(o)) => {
            let listed = |k: &str| -> ApiResult<Vec<String>> {
                match o.get(k).and_then(|v| v.get("tool_names")) {
                    Some(l) => name_list(&format!("{p}.{k}.tool_names"), l),
                    None => Ok(Vec::new()),
                }
            };
            let (always, never) = (listed("always")?, listed("never")?);
            Ok(Box::new(move |n| always.contains(n) || !never.contains(n)))
        }
        Some(_) => Err(ApiError::invalid(p, "require_approval must be 'always', 'never' or an object of tool_names")),
    }
}

fn name_list(p: &str, v: &Value) -> ApiResult<Vec<String>> {
    let list = v.as_array().ok_or_else(|| ApiError::invalid(p, "expected an array of tool names"))?;
    list.iter()
        .map(|n| n.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid(p, "tool names are strings")))
        .collect()
}

/// The finished response object for a run whose first `seen` steps an earlier response showed.
fn response_object(rt: &AgentRuntime, shell: &Value, run: &RunRecord, steps: &[StepRecord], shown: Shown) -> Value {
    let mut output = output_items(rt, &run.id, steps, shown);
    let mut r = shell.clone();
    if run.status == RunStatus::RequiresAction {
        let waiting = run.output.as_ref().and_then(|o| o["required_action"].as_array().cloned()).unwrap_or_default();
        for c in waiting {
            let name = c["name"].as_str().unwrap_or_default();
            if c["type"] == "function" {
                output
                    .push(json!({"type": "function_call", "id": format!("fc_{}", text(&c, "id")), "call_id": c["id"],
                    "name": name, "arguments": c["arguments"], "status": "completed"}));
                continue;
            }
            output.push(
                json!({"type": "mcp_approval_request", "id": format!("mcpr_{}", c["id"].as_str().unwrap_or_default()),
                "server_label": label(rt, name), "name": name, "arguments": c["arguments"]}),
            );
        }
    }
    let (status, details, error) = match run.status {
        RunStatus::Completed | RunStatus::RequiresAction => ("completed", Value::Null, Value::Null),
        RunStatus::Incomplete => ("incomplete", json!({"reason": "max_output_tokens"}), Value::Null),
        RunStatus::Cancelled => ("cancelled", Value::Null, Value::Null),
        _ => ("failed", Value::Null, json!({"code": "server_error", "message": run.error})),
    };
    let u = &run.usage;
    let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
    r["status"] = json!(status);
    r["incomplete_details"] = details;
    r["error"] = error;
    r["output"] = Value::Array(output);
    r["usage"] = sse::usage(n("prompt_tokens"), n("completion_tokens"), n("cached_tokens"));
    r["completed_at"] = json!(unix_now());
    r
}

/// What a response shows of a run: the steps an earlier response showed (left out), and whether
/// `file_search_call` items carry their results.
type Shown = (usize, bool);

/// Whether `include` asks for `what`.
fn includes(req: &ResponsesRequest, what: &str) -> bool {
    req.include.as_ref().and_then(Value::as_array).is_some_and(|l| l.iter().any(|i| i == what))
}

fn label(rt: &AgentRuntime, tool: &str) -> String {
    rt.tool_server(tool).unwrap_or_else(|| KILN_LABEL.to_string())
}

/// Output items: the text of each model turn as a `message`, each executed call as an
/// `mcp_call` with its output (or error), in the order they were completed, leaving out what the
/// first `seen` steps completed (an earlier response showed it; a call approved since then was
/// made before but completes now). Turns the loop guard discarded are left out.
fn output_items(rt: &AgentRuntime, run_id: &str, steps: &[StepRecord], (seen, results): Shown) -> Vec<Value> {
    // (index of the step that completed the item, item)
    let mut out: Vec<(usize, Value)> = Vec::new();
    for (at, s) in steps.iter().enumerate() {
        match s.kind {
            StepKind::ModelOutput => {
                let Ok(m) = serde_json::from_value::<ModelStep>(s.data.clone()) else { continue };
                if m.discarded {
                    continue;
                }
                if !m.content.trim().is_empty() {
                    // The same id every time the steps are read (a stream sends it before the end).
                    let id = format!("msg_{}_{}", run_id.trim_start_matches("run_"), s.seq);
                    out.push((at, items::message_item(&id, "assistant", &m.content, "output_text")));
                }
                for c in &m.calls {
                    let call = if c.name == FILE_SEARCH {
                        file_search::call_item(c)
                    } else {
                        json!({"type": "mcp_call", "id": c.id, "server_label": label(rt, &c.name),
                        "name": c.name, "arguments": c.arguments, "output": null, "error": null})
                    };
                    out.push((usize::MAX, call));
                }
            }
            StepKind::ToolResult => {
                let Ok(r) = serde_json::from_value::<ResultStep>(s.data.clone()) else { continue };
                if let Some((done, item)) = out.iter_mut().find(|(_, it)| it["id"] == r.call_id.as_str()) {
                    if item["type"] == "file_search_call" {
                        file_search::complete(item, &r, results);
                    } else {
                        item[if r.is_error { "error" } else { "output" }] = json!(r.content);
                    }
                    *done = at;
                }
            }
            _ => {}
        }
    }
    // Calls that never ran (the run ended or paused before them) stay at usize::MAX: not shown.
    out.retain(|(done, _)| (seen..usize::MAX).contains(done));
    out.sort_by_key(|(done, _)| *done);
    out.into_iter().map(|(_, item)| item).collect()
}
