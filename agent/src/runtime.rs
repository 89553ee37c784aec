//! [`AgentRuntime`]: the handle the server holds. Agents (validated, persisted in the store),
//! runs (created, driven on tokio tasks under a lease, resumed after approval), cancellation,
//! events, and the orphan claimer that takes over runs whose owner died (this process after a
//! restart, or another replica sharing the Postgres store).
//!
//! Owns: which runs this process drives. Must not: know HTTP (the server maps [`RunError`]).

use crate::cost::{Cost, Prices};
use crate::events::{EventHub, RunEvent};
use crate::history::{ApprovalStep, PriorMessage, ResultStep, Usage};
use crate::memory::{MemoryStore, Scope as MemoryScope};
use crate::run::{DriveEnd, Driver};
use crate::spec::{AgentSpec, SpecContext, SpecError};
use crate::store::{RunRecord, RunStatus, RunStore, StepKind, StepRecord, StoreError};
use crate::tools::client::ClientTool;
use crate::tools::file_search as file_search_tool;
use crate::tools::http::{HostAllowlist, HttpTool};
use crate::tools::memory as memory_tools;
use crate::tools::{CallLimits, Tool, ToolError, ToolRegistry};
use crate::vector_stores::VectorStores;
use kiln_inference::chat::Message;
use kiln_inference::{EngineError, EngineHandle, SamplingParams};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    NotFound(String),
    /// A field of a request or definition; `.0` names it.
    #[error("{1}")]
    Invalid(String, String),
    #[error("{0}")]
    Conflict(String),
    /// A service the run needs (the memory store) cannot serve now.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("step payload: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => RunError::NotFound(m),
            StoreError::Conflict(m) => RunError::Conflict(m),
            other => RunError::Store(other),
        }
    }
}

impl From<SpecError> for RunError {
    fn from(e: SpecError) -> Self {
        RunError::Invalid(e.field, e.message)
    }
}

/// The runtime's settings (from the server's config).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This process's name in leases (unique per process: a restarted process is a new owner).
    pub owner: String,
    pub lease_ttl: Duration,
    /// How often to look for runs whose owner's lease expired.
    pub claim_interval: Duration,
    pub call_limits: CallLimits,
    /// Sampling defaults of the served model; agents override temperature and max tokens.
    pub sampling: SamplingParams,
    /// Served model names (an agent's `model` must be one).
    pub models: Vec<String>,
    /// Hosts HTTP tools may call.
    pub http_hosts: Vec<String>,
    /// What tokens cost; `None`: costs are unknown.
    pub prices: Option<Prices>,
    /// The memory store behind the `memory_store` / `memory_search` tools; `None`: agents that
    /// list them are refused (they need the embedding model).
    pub memory: Option<MemoryStore>,
}

impl RuntimeConfig {
    pub fn new(models: Vec<String>) -> Self {
        Self {
            owner: format!("kiln-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: Duration::from_secs(30),
            claim_interval: Duration::from_secs(10),
            call_limits: CallLimits::default(),
            sampling: SamplingParams::default(),
            models,
            http_hosts: Vec::new(),
            prices: None,
            memory: None,
        }
    }
}

/// Counters of the agent layer (for `/metrics`); totals since start, this process only.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub runs_started: AtomicU64,
    pub runs_completed: AtomicU64,
    pub runs_incomplete: AtomicU64,
    pub runs_failed: AtomicU64,
    pub runs_cancelled: AtomicU64,
    pub runs_paused: AtomicU64,
    /// Model turns, and their prompt tokens split into prefilled and reused (session/cache).
    pub steps: AtomicU64,
    pub prefilled_tokens: AtomicU64,
    pub reused_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub model_ms: AtomicU64,
    pub tool_calls: AtomicU64,
    pub tool_errors: AtomicU64,
    pub tool_ms: AtomicU64,
}

impl AgentStats {
    pub(crate) fn ended(&self, status: RunStatus) {
        let c = match status {
            RunStatus::Completed => &self.runs_completed,
            RunStatus::Incomplete => &self.runs_incomplete,
            RunStatus::Failed => &self.runs_failed,
            RunStatus::Cancelled => &self.runs_cancelled,
            RunStatus::RequiresAction => &self.runs_paused,
            RunStatus::Queued | RunStatus::InProgress => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Inner {
    pub(crate) stats: AgentStats,
    pub(crate) engine: EngineHandle,
    pub(crate) store: RunStore,
    pub(crate) events: Arc<EventHub>,
    pub(crate) config: RuntimeConfig,
    registry: ToolRegistry,
    allow: HostAllowlist,
    http: reqwest::Client,
    /// Runs this process is driving, with their cancel flags.
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

/// What a new run gets.
#[derive(Debug, Clone, Default)]
pub struct RunInput {
    pub input: String,
    pub variables: serde_json::Map<String, Value>,
    /// The conversation before `input`, when the run continues one (a Responses API chain).
    pub history: Vec<Message>,
    /// An agent defined by the caller for this run only (the Responses API's server-side tools),
    /// instead of a stored one; kept in the run's record so that whoever resumes it has it.
    pub spec: Option<AgentSpec>,
}

/// The agent layer's handle. Cheap to clone.
#[derive(Clone)]
pub struct AgentRuntime {
    inner: Arc<Inner>,
}

impl AgentRuntime {
    /// Starts the runtime and its orphan claimer (which also resumes, after a restart, the runs
    /// the previous process left once their leases expire).
    pub fn start(
        engine: EngineHandle,
        store: RunStore,
        registry: ToolRegistry,
        config: RuntimeConfig,
    ) -> Result<Self, RunError> {
        let allow = HostAllowlist::new(&config.http_hosts)?;
        let http = allow.http_client()?;
        let events = Arc::new(EventHub::default());
        let running = Mutex::new(HashMap::new());
        let stats = AgentStats::default();
        let inner = Arc::new(Inner { stats, engine, store, events, config, registry, allow, http, running });
        let rt = Self { inner };
        tokio::spawn(claim_loop(Arc::downgrade(&rt.inner)));
        Ok(rt)
    }

    pub fn stats(&self) -> &AgentStats {
        &self.inner.stats
    }

    pub(crate) fn engine(&self) -> &EngineHandle {
        &self.inner.engine
    }

    pub(crate) fn memory(&self) -> Option<&MemoryStore> {
        self.inner.config.memory.as_ref()
    }

    pub fn store(&self) -> &RunStore {
        &self.inner.store
    }

    /// What a run's usage (as stored in its record) cost, when prices are configured.
    pub fn cost(&self, usage: &Value) -> Option<Cost> {
        let prices = self.inner.config.prices?;
        let usage: Usage = serde_json::from_value(usage.clone()).unwrap_or_default();
        Some(prices.cost(&usage))
    }

    /// Tools served by MCP server `server` (`None`: kiln's own builtins), by name.
    pub fn tools_served_by(&self, server: Option<&str>) -> Vec<String> {
        self.inner.registry.served_by(server).into_iter().map(str::to_string).collect()
    }

    /// The MCP server serving tool `name` (`None`: kiln's own tool, or no such tool).
    pub fn tool_server(&self, name: &str) -> Option<String> {
        self.inner.registry.get(name).and_then(|t| t.server().map(str::to_string))
    }

    fn context(&self) -> SpecContext {
        let mut tools: HashSet<String> = self.inner.registry.names().into_iter().map(str::to_string).collect();
        // Known names whether or not memory is configured: `tools_for` says what is missing.
        tools.extend(memory_tools::NAMES.map(str::to_string));
        tools.insert(file_search_tool::NAME.to_string());
        SpecContext { models: self.inner.config.models.clone(), tools }
    }

    /// Validates and stores an agent (replacing one of the same name).
    pub async fn put_agent(&self, spec: AgentSpec) -> Result<AgentSpec, RunError> {
        spec.validate(&self.context())?;
        self.inner.tools_for(&spec)?;
        self.inner.store.put_agent(&spec.name, &spec.to_json()).await?;
        Ok(spec)
    }

    /// Creates an agent from its JSON definition; an existing name is a conflict.
    pub async fn create_agent(&self, def: Value) -> Result<AgentSpec, RunError> {
        let spec = AgentSpec::from_json(def)?;
        if self.inner.store.get_agent(&spec.name).await?.is_some() {
            return Err(RunError::Conflict(format!("agent '{}' already exists", spec.name)));
        }
        self.put_agent(spec).await
    }

    pub async fn get_agent(&self, name: &str) -> Result<AgentSpec, RunError> {
        self.inner.agent(name).await
    }

    pub async fn list_agents(&self) -> Result<Vec<Value>, RunError> {
        Ok(self.inner.store.list_agents().await?)
    }

    pub async fn patch_agent(&self, name: &str, patch: Value) -> Result<AgentSpec, RunError> {
        let spec = self.inner.agent(name).await?.apply_patch(patch)?;
        self.put_agent(spec).await
    }

    pub async fn delete_agent(&self, name: &str) -> Result<(), RunError> {
        match self.inner.store.delete_agent(name).await? {
            true => Ok(()),
            false => Err(RunError::NotFound(format!("agent '{name}' does not exist"))),
        }
    }

    /// Creates a run and starts driving it. Subscribe with [`AgentRuntime::subscribe`] on the
    /// returned id before anything else happens by passing `events: true`.
    pub async fn start_run(
        &self,
        agent: &str,
        input: RunInput,
    ) -> Result<(RunRecord, broadcast::Receiver<RunEvent>), RunError> {
        let spec = match &input.spec {
            Some(spec) => {
                spec.validate(&self.context())?;
                self.inner.tools_for(spec)?;
                spec.clone()
            }
            None => self.inner.agent(agent).await?,
        };
        // Fail now, not in the background: a missing variable is the caller's 400.
        spec.render_instructions(&input.variables)?;
        let history: Vec<PriorMessage> = input.history.iter().map(PriorMessage::from).collect();
        let mut record = json!({"input": input.input, "variables": input.variables});
        if !history.is_empty() {
            record["history"] = serde_json::to_value(history)?;
        }
        if input.spec.is_some() {
            record["spec"] = spec.to_json();
        }
        let run = RunRecord::new(&spec.name, record);
        let rx = self.inner.events.subscribe(&run.id);
        self.inner.store.create_run(&run).await?;
        self.inner.events.send(&run.id, RunEvent::Created { run: serde_json::to_value(&run)? });
        self.inner.stats.runs_started.fetch_add(1, Ordering::Relaxed);
        spawn_drive(self.inner.clone(), run.id.clone());
        Ok((run, rx))
    }

    pub async fn get_run(&self, id: &str) -> Result<RunRecord, RunError> {
        self.inner.store.get_run(id).await?.ok_or_else(|| RunError::NotFound(format!("run '{id}' does not exist")))
    }

    pub async fn steps(&self, id: &str) -> Result<Vec<StepRecord>, RunError> {
        self.get_run(id).await?;
        Ok(self.inner.store.steps(id).await?)
    }

    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<RunEvent> {
        self.inner.events.subscribe(id)
    }

    /// Cancels a run that has not ended; its driver stops at the next step boundary (and the
    /// turn in progress is dropped, which aborts its generation).
    pub async fn cancel(&self, id: &str) -> Result<RunRecord, RunError> {
        let run = self.get_run(id).await?;
        self.inner.store.set_status(id, RunStatus::Cancelled, None, None, None).await?;
        if let Some(flag) = self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            flag.store(true, Ordering::Relaxed);
        }
        self.inner.store.append_step(id, StepKind::Status, &json!({"status": "cancelled"}), None).await?;
        self.inner.stats.ended(RunStatus::Cancelled);
        let run = RunRecord { status: RunStatus::Cancelled, ..run };
        let ended = RunEvent::Ended { event: "run.cancelled".into(), run: serde_json::to_value(&run)? };
        self.inner.events.send(id, ended);
        Ok(run)
    }

    /// Approves or rejects the calls a paused run waits on (`call_id: None`: all of them), and
    /// resumes it. A rejection reaches the model as the call's error result.
    pub async fn approve(
        &self,
        id: &str,
        call_id: Option<&str>,
        approved: bool,
        reason: Option<String>,
    ) -> Result<RunRecord, RunError> {
        let waiting = self.waiting(id, "approval").await?;
        let chosen: Vec<&String> =
            waiting.iter().map(|(id, _)| id).filter(|c| call_id.is_none_or(|w| w == c.as_str())).collect();
        if chosen.is_empty() {
            let call = call_id.unwrap_or_default();
            return Err(RunError::Invalid("call_id".into(), format!("run '{id}' does not wait on call '{call}'")));
        }
        for call in chosen {
            let step = ApprovalStep { call_id: call.clone(), approved, reason: reason.clone() };
            let key = format!("approval:{call}");
            self.inner.store.append_step(id, StepKind::Approval, &serde_json::to_value(&step)?, Some(&key)).await?;
        }
        self.resume(id).await
    }

    /// Records the caller's results of client-tool calls the paused run waits on (`(call_id,
    /// output)`), and resumes it. An unknown or already answered call is a 400 naming it.
    pub async fn submit_tool_outputs(&self, id: &str, outputs: Vec<(String, String)>) -> Result<RunRecord, RunError> {
        let waiting = self.waiting(id, "function").await?;
        let max_bytes = self.inner.config.call_limits.max_result_bytes;
        for (i, (call, output)) in outputs.into_iter().enumerate() {
            let Some((_, name)) = waiting.iter().find(|(w, _)| *w == call) else {
                let m = format!("run '{id}' does not wait on a result for call '{call}'");
                return Err(RunError::Invalid(format!("tool_outputs[{i}].call_id"), m));
            };
            let (content, truncated) = crate::tools::truncate_result(output, max_bytes);
            let step = ResultStep {
                call_id: call.clone(),
                name: name.clone(),
                content,
                is_error: false,
                truncated,
                repeated: false,
                latency_ms: 0,
            };
            let key = format!("result:{call}");
            self.inner.store.append_step(id, StepKind::ToolResult, &serde_json::to_value(&step)?, Some(&key)).await?;
        }
        self.resume(id).await
    }

    /// The calls of `kind` a paused run waits on; a run that is not paused is a conflict.
    async fn waiting(&self, id: &str, kind: &str) -> Result<Vec<(String, String)>, RunError> {
        let run = self.get_run(id).await?;
        if run.status != RunStatus::RequiresAction {
            return Err(RunError::Conflict(format!("run '{id}' is {}, not requires_action", run.status.as_str())));
        }
        Ok(waiting_calls(&run, kind))
    }

    /// Queues a paused run again (its answers are recorded) and drives it.
    async fn resume(&self, id: &str) -> Result<RunRecord, RunError> {
        self.inner.store.set_status(id, RunStatus::Queued, None, None, None).await?;
        spawn_drive(self.inner.clone(), id.to_string());
        self.get_run(id).await
    }
}

/// The calls a paused run waits on for `kind` (`approval` | `function`), as the loop recorded
/// them in its output: `(id, name)`. Entries without a type (older records) are approvals.
fn waiting_calls(run: &RunRecord, kind: &str) -> Vec<(String, String)> {
    let list = run.output.as_ref().and_then(|o| o.get("required_action")).and_then(Value::as_array);
    let of_kind = |c: &&Value| c.get("type").and_then(Value::as_str).unwrap_or("approval") == kind;
    let text = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
    list.into_iter().flatten().filter(of_kind).filter_map(|c| Some((text(c, "id")?, text(c, "name")?))).collect()
}

impl Inner {
    /// The agent a run runs: the one defined in its input (see [`RunInput::spec`]) or the
    /// stored agent it names.
    pub(crate) async fn agent_of(&self, run: &RunRecord) -> Result<AgentSpec, RunError> {
        match run.input.get("spec") {
            Some(def) => Ok(AgentSpec::from_json(def.clone())?),
            None => self.agent(&run.agent).await,
        }
    }

    pub(crate) async fn agent(&self, name: &str) -> Result<AgentSpec, RunError> {
        let def = self.store.get_agent(name).await?;
        let def = def.ok_or_else(|| RunError::NotFound(format!("agent '{name}' does not exist")))?;
        Ok(AgentSpec::from_json(def)?)
    }

    /// The agent's callable tools by name: registry tools, its own HTTP and client tools, and the
    /// memory tools bound to its scope.
    pub(crate) fn tools_for(&self, spec: &AgentSpec) -> Result<HashMap<String, Arc<dyn Tool>>, RunError> {
        if spec.conversation.as_ref().is_some_and(|c| c.recall_top_k > 0) && self.config.memory.is_none() {
            let why = "recall needs the memory store: start kiln with --embedding-model PATH";
            return Err(RunError::Invalid("conversation.recall_top_k".into(), why.into()));
        }
        let mut out: HashMap<String, Arc<dyn Tool>> = HashMap::new();
        for (i, def) in spec.http_tools.iter().enumerate() {
            let tool = HttpTool::new(def.clone(), &self.allow, self.http.clone())
                .map_err(|e| RunError::Invalid(format!("http_tools[{i}]"), e.to_string()))?;
            out.insert(def.name.clone(), Arc::new(tool.with_timeout(self.config.call_limits.timeout)));
        }
        for def in &spec.client_tools {
            out.insert(def.name.clone(), Arc::new(ClientTool::new(def)));
        }
        for (i, name) in spec.tools.iter().enumerate() {
            if out.contains_key(name) {
                continue;
            }
            if name == file_search_tool::NAME {
                out.insert(name.clone(), self.file_search_tool(spec, i)?);
                continue;
            }
            if memory_tools::NAMES.contains(&name.as_str()) {
                let store = self.config.memory.clone().ok_or_else(|| {
                    let why = format!("'{name}' needs the memory store: start kiln with --embedding-model PATH");
                    RunError::Invalid(format!("tools[{i}]"), why)
                })?;
                let scope = MemoryScope::Agent(spec.name.clone());
                out.extend(memory_tools::bound(name, store, scope).map(|t| (name.clone(), t)));
                continue;
            }
            let tool = self.registry.get(name).ok_or_else(|| {
                RunError::Invalid(format!("tools[{i}]"), format!("unknown tool '{name}' (not served by this kiln)"))
            })?;
            out.insert(name.clone(), tool.clone());
        }
        Ok(out)
    }
}

impl Inner {
    /// The `file_search` tool bound to the agent's `file_search` settings (`tools[i]` lists it).
    fn file_search_tool(&self, spec: &AgentSpec, i: usize) -> Result<Arc<dyn Tool>, RunError> {
        let settings = spec.file_search.clone().ok_or_else(|| {
            RunError::Invalid("file_search".into(), "`file_search` in tools needs its vector_store_ids".into())
        })?;
        let memory = self.config.memory.clone().ok_or_else(|| {
            let why = "'file_search' needs the memory store: start kiln with --embedding-model PATH";
            RunError::Invalid(format!("tools[{i}]"), why.into())
        })?;
        Ok(file_search_tool::bound(VectorStores::new(self.store.clone(), Some(memory)), settings))
    }
}

/// Drives a run on its own task, under its lease (renewed while it runs).
fn spawn_drive(rt: Arc<Inner>, run_id: String) {
    tokio::spawn(async move {
        if let Err(e) = drive(rt, &run_id).await {
            tracing::error!(run = %run_id, error = %e, "run drive failed");
        }
    });
}

async fn drive(rt: Arc<Inner>, run_id: &str) -> Result<(), RunError> {
    let owner = rt.config.owner.clone();
    // One driver per run in this process: the orphan claimer and a start or an approval may race
    // for the same run, and the lease (same owner) cannot tell them apart.
    let Some(cancel) = take_slot(&rt, run_id).await else { return Ok(()) };
    if !rt.store.try_acquire(run_id, &owner, rt.config.lease_ttl).await? {
        rt.running.lock().unwrap_or_else(|p| p.into_inner()).remove(run_id);
        return Ok(()); // another process drives it
    }
    let renew = tokio::spawn(renew_loop(rt.clone(), run_id.to_string(), cancel.clone()));
    let span = tracing::info_span!("run", run = %run_id);
    let result = async {
        let run = rt.store.get_run(run_id).await?.ok_or_else(|| RunError::NotFound(run_id.to_string()))?;
        match Driver::new(rt.clone(), run, cancel.clone()).await {
            Ok(d) => d.drive().await,
            Err(e) => {
                fail_run(&rt, run_id, &e).await;
                Err(e)
            }
        }
    };
    let result: Result<DriveEnd, RunError> = tracing::Instrument::instrument(result, span).await;
    renew.abort();
    rt.running.lock().unwrap_or_else(|p| p.into_inner()).remove(run_id);
    let _ = rt.store.release(run_id, &owner).await;
    if let Err(e @ RunError::Engine(_)) = &result {
        // The engine refusing a turn (context exceeded, overload, shutdown) fails the run.
        fail_run(&rt, run_id, e).await;
    }
    result.map(|_| ())
}

/// Ends a run that its driver could not carry on: the record says why, and its subscribers (a
/// client waiting on the run, a stream) get the terminal event, so nobody waits for a run that
/// will never move again. A run that already ended keeps its status.
async fn fail_run(rt: &Inner, run_id: &str, e: &RunError) {
    let Ok(Some(run)) = rt.store.get_run(run_id).await else { return };
    if run.status.is_terminal() {
        return;
    }
    let msg = e.to_string();
    if let Err(err) = rt.store.set_status(run_id, RunStatus::Failed, None, None, Some(msg.clone())).await {
        tracing::error!(run = %run_id, error = %err, "could not record the run's failure");
        return;
    }
    rt.stats.ended(RunStatus::Failed);
    let run = RunRecord { status: RunStatus::Failed, error: Some(msg), ..run };
    let event = RunEvent::Ended { event: "run.failed".into(), run: serde_json::to_value(&run).unwrap_or_default() };
    rt.events.send(run_id, event);
}

/// Registers this process as the run's driver; waits a little for a driver that is finishing
/// (an approval right after the pause), and gives up if it stays: the run is being driven.
async fn take_slot(rt: &Inner, run_id: &str) -> Option<Arc<AtomicBool>> {
    for _ in 0..40 {
        {
            let mut running = rt.running.lock().unwrap_or_else(|p| p.into_inner());
            if !running.contains_key(run_id) {
                let cancel = Arc::new(AtomicBool::new(false));
                running.insert(run_id.to_string(), cancel.clone());
                return Some(cancel);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

async fn renew_loop(rt: Arc<Inner>, run_id: String, cancel: Arc<AtomicBool>) {
    let every = rt.config.lease_ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        match rt.store.renew(&run_id, &rt.config.owner, rt.config.lease_ttl).await {
            Ok(true) => {}
            // Lost: someone else owns the run now; stop at the next step boundary.
            _ => {
                cancel.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Periodically takes over runs whose lease expired (their owner died) and drives them.
async fn claim_loop(rt: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = rt.upgrade() else { return };
        let interval = inner.config.claim_interval;
        match inner.store.claim_orphans(&inner.config.owner, inner.config.lease_ttl, 16).await {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(run = %id, "resuming a run whose owner's lease expired");
                    spawn_drive(inner.clone(), id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "claiming orphaned runs failed"),
        }
        drop(inner);
        tokio::time::sleep(interval).await;
    }
}
