//! Client tools: tools the caller runs, not kiln (the Responses API's function tools beside
//! kiln's own). The model's calls to them are constrained like any other; the run then pauses
//! (`requires_action`, entries of type `function`) until the caller submits the results
//! (`AgentRuntime::submit_tool_outputs`). Must not: run anything itself.

use super::{Tool, ToolDef, ToolError};
use futures_util::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A client tool as an agent declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientToolDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// JSON schema of the arguments (an object schema); none: no arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

pub struct ClientTool {
    def: ToolDef,
}

impl ClientTool {
    pub fn new(d: &ClientToolDef) -> Self {
        let parameters = d.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        Self { def: ToolDef { name: d.name.clone(), description: d.description.clone(), parameters } }
    }
}

impl Tool for ClientTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    /// Never called: the loop pauses for the caller's result instead.
    fn call(&self, _args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        let name = self.def.name.clone();
        Box::pin(async move { Err(ToolError::Failed(format!("{name} is run by the client, not by kiln"))) })
    }

    fn runs_in_client(&self) -> bool {
        true
    }
}
