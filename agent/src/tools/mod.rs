//! Tools an agent may call: one trait, a registry, builtins (`builtin.rs`), HTTP tools (`http.rs`)
//! and MCP servers (`mcp.rs`). A tool never sees the engine; the tool loop (`run.rs`) constrains
//! the model's calls to each tool's `parameters` schema and turns every failure into a result the
//! model reads.

pub mod http;

use futures_util::future::BoxFuture;
use serde_json::Value;

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
}

/// One callable tool. `call` gets arguments already valid under `def().parameters` (the grammar
/// guarantees it) and returns the result text the model reads.
pub trait Tool: Send + Sync + 'static {
    fn def(&self) -> &ToolDef;
    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>>;
}
