//! Tools an agent may call: one trait, a registry, builtins (`builtin.rs`), HTTP tools (`http.rs`),
//! MCP servers (`mcp.rs`), client tools (`client.rs`) and the memory tools (`memory.rs`). A tool never sees the engine; the tool loop (`run.rs`) constrains
//! the model's calls to each tool's `parameters` schema and turns every failure into a result the
//! model reads. `invoke` is that boundary: whatever a tool does (fail, panic, hang, flood), the
//! caller gets a bounded `ToolOutcome`, never an error or an unwind. This module must not know
//! about runs, sessions or the store.

pub mod builtin;
pub mod calc;
pub mod client;
pub mod file_search;
pub mod http;
pub mod mcp;
pub mod memory;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tracing::Instrument;

/// What the model is told about a tool; `parameters` (a JSON schema of an object) also
/// constrains its calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool ran and failed; the message goes back to the model as the call's result.
    #[error("{0}")]
    Failed(String),
    /// A tool name the chat template or the grammar could not carry safely.
    #[error("invalid tool name {0:?}: use 1 to 64 characters from a-z A-Z 0-9 _ -")]
    InvalidName(String),
    /// Two tools under one name: the model could not tell which one it calls.
    #[error("duplicate tool name {0:?}")]
    Duplicate(String),
    /// A tool definition (HTTP tool, MCP config) that cannot work; found at load time, not at call time.
    #[error("invalid tool definition {name:?}: {reason}")]
    InvalidDef { name: String, reason: String },
    /// An MCP server could not be started, listed or configured.
    #[error("MCP server {server:?}: {reason}")]
    Mcp { server: String, reason: String },
}

impl ToolError {
    pub(crate) fn invalid_def(name: &str, reason: impl Into<String>) -> Self {
        ToolError::InvalidDef { name: name.to_string(), reason: reason.into() }
    }
}

/// One callable tool. `call` gets arguments already valid under `def().parameters` (the grammar
/// guarantees it) and returns the result text the model reads.
pub trait Tool: Send + Sync + 'static {
    fn def(&self) -> &ToolDef;
    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>>;

    /// [`Tool::call`] with the call's idempotency key, the same every time the call is run (a run
    /// resumed after a crash re-runs a call whose result was never recorded). Tools that can pass
    /// it on override this (HTTP tools send `Idempotency-Key`); the rest ignore it.
    fn call_keyed(&self, args: Value, key: &str) -> BoxFuture<'static, Result<String, ToolError>> {
        let _ = key;
        self.call(args)
    }

    /// The MCP server that serves this tool (its name in `--mcp-config`); `None` for kiln's own
    /// tools (builtins, HTTP tools).
    fn server(&self) -> Option<&str> {
        None
    }

    /// Whether the caller runs this tool and submits its result (see `client.rs`).
    fn runs_in_client(&self) -> bool {
        false
    }
}

/// Whether `name` is a valid tool name: 1..=64 of `a-zA-Z0-9_-` (what every chat template and
/// OpenAI's function-name rule accept).
pub fn is_valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks a tool name, for constructors and the registry.
pub fn check_tool_name(name: &str) -> Result<(), ToolError> {
    if is_valid_tool_name(name) {
        Ok(())
    } else {
        Err(ToolError::InvalidName(name.to_string()))
    }
}

/// The tools one agent may call, by name, in insertion order (the order the model sees them).
#[derive(Default, Clone)]
pub struct ToolRegistry {
    tools: Vec<Arc<dyn Tool>>,
    by_name: HashMap<String, usize>,
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the builtins (`current_time`, `calculator`).
    pub fn with_builtins() -> Self {
        let mut reg = Self::new();
        for tool in builtin::builtins() {
            // Builtin names are constants, valid and distinct: a failure here is a bug in this crate.
            reg.insert(tool).expect("builtin tool names are valid and distinct");
        }
        reg
    }

    /// Adds a tool; refuses an invalid name or one already taken.
    pub fn insert(&mut self, tool: Arc<dyn Tool>) -> Result<(), ToolError> {
        let name = tool.def().name.clone();
        check_tool_name(&name)?;
        if self.by_name.contains_key(&name) {
            return Err(ToolError::Duplicate(name));
        }
        self.by_name.insert(name, self.tools.len());
        self.tools.push(tool);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.by_name.get(name).map(|&i| &self.tools[i])
    }

    pub fn defs(&self) -> Vec<&ToolDef> {
        self.tools.iter().map(|t| t.def()).collect()
    }

    /// The registry's tools served by MCP server `server` (`None`: kiln's own tools).
    pub fn served_by(&self, server: Option<&str>) -> Vec<&str> {
        self.tools.iter().filter(|t| t.server() == server).map(|t| t.def().name.as_str()).collect()
    }

    pub fn names(&self) -> Vec<&str> {
        self.tools.iter().map(|t| t.def().name.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry").field("tools", &self.names()).finish()
    }
}

/// Bounds on one tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    pub timeout: Duration,
    /// The most result bytes the model reads; the rest is cut (at a char boundary) with a note.
    pub max_result_bytes: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits { timeout: Duration::from_secs(30), max_result_bytes: 64 * 1024 }
    }
}

/// What one call produced, always: failures are results with `is_error`, for the model to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    pub content: String,
    pub is_error: bool,
    pub truncated: bool,
    pub elapsed: Duration,
}

/// Runs one call within `limits`. The tool's future runs on its own task so that a panic in it
/// is caught (a `JoinError`, not an unwind through the tool loop) and a timeout can abort it.
pub async fn invoke(tool: &Arc<dyn Tool>, args: Value, limits: &CallLimits) -> ToolOutcome {
    invoke_keyed(tool, args, None, limits).await
}

/// [`invoke`] passing the call's idempotency key to the tool (see [`Tool::call_keyed`]).
pub async fn invoke_keyed(tool: &Arc<dyn Tool>, args: Value, key: Option<&str>, limits: &CallLimits) -> ToolOutcome {
    let name = tool.def().name.clone();
    let start = Instant::now();
    let (content, is_error) = run(tool, &name, args, key, limits.timeout).await;
    let (content, truncated) = truncate_result(content, limits.max_result_bytes);
    let elapsed = start.elapsed();
    tracing::debug!(tool = %name, is_error, truncated, elapsed_ms = elapsed.as_millis() as u64, "tool call done");
    ToolOutcome { content, is_error, truncated, elapsed }
}

/// Aborts the call's task when `invoke` itself is dropped (the run was cancelled): a tool call
/// nobody waits for must not keep running.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(tool: &Arc<dyn Tool>, name: &str, args: Value, key: Option<&str>, timeout: Duration) -> (String, bool) {
    // `call` itself may panic before it returns a future: caught like a panic inside the future.
    let start = || match key {
        Some(k) => tool.call_keyed(args, k),
        None => tool.call(args),
    };
    let future = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)) {
        Ok(future) => future,
        Err(payload) => return (format!("tool {name} crashed: {}", panic_text(payload)), true),
    };
    let task = tokio::spawn(future.instrument(tracing::info_span!("tool_call", tool = %name)));
    let _abort = AbortOnDrop(task.abort_handle());
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(text))) => (text, false),
        Ok(Ok(Err(e))) => (format!("tool {name} failed: {e}"), true),
        Ok(Err(join)) if join.is_panic() => (format!("tool {name} crashed: {}", panic_text(join.into_panic())), true),
        Ok(Err(_)) => (format!("tool {name} was cancelled"), true),
        Err(_) => {
            tracing::warn!(tool = %name, timeout_ms = timeout.as_millis() as u64, "tool call timed out");
            (format!("tool {name} timed out after {}", human_duration(timeout)), true)
        }
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// "30 s", "1.5 s", "250 ms": what a person (and a model) reads at a glance.
pub fn human_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Cuts `text` to at most `max` bytes at a char boundary and appends a note of what was cut (the
/// note itself is not counted: it is short, and a model must know the result is partial).
pub fn truncate_result(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let total = text.len();
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&format!("\n[result truncated: {} of {total} bytes cut]", total - cut));
    (text, true)
}

#[cfg(test)]
mod tests;
