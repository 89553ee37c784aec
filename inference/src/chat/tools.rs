//! Function tools as typed values: what a turn may call ([`ToolPlan`]: specs, choice, parallel
//! calls) and the wire format calls are written in. The server builds a plan from OpenAI JSON,
//! the agent layer from its tool registry; both then get the same prompt (`prompt.rs`), grammar
//! (`grammar.rs`) and parser (`parse.rs`).
//!
//! Wire format: the Hermes/Qwen2.5 one, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
//! Models whose chat template renders `tools` (Qwen2.5) are prompted by their own template; for
//! any other template kiln adds a system section describing the tools and this same format
//! (`prompt::GENERIC_INSTRUCTIONS`, documented in the README).

use super::ChatError;
use serde_json::{json, Value};
use std::collections::HashSet;

/// Opens a call in the model's output; with `tool_choice: auto` the grammar engages after it.
pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";
/// A call written as a bare JSON object at the start of the output (no tag).
pub const BARE_OPEN: &str = "{\"name\"";
/// A call in a fenced JSON block at the start of the output (Qwen2.5-Coder's habit).
pub const FENCE_OPEN: &str = "```json";
pub const FENCE_CLOSE: &str = "```";

/// One function tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (an empty closed object schema when the tool takes none).
    pub parameters: Value,
}

impl ToolSpec {
    /// A tool; `parameters: None` is a tool without arguments.
    pub fn new(name: &str, description: Option<&str>, parameters: Option<Value>) -> Self {
        let parameters =
            parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}, "additionalProperties": false}));
        Self { name: name.to_string(), description: description.map(str::to_string), parameters }
    }

    /// The OpenAI function-tool object chat templates render.
    pub fn to_template_value(&self) -> Value {
        let mut f = json!({"name": self.name});
        if let Some(d) = &self.description {
            f["description"] = Value::String(d.clone());
        }
        f["parameters"] = self.parameters.clone();
        json!({"type": "function", "function": f})
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// What a turn may do with its tools, validated.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl ToolPlan {
    /// Checks names (valid, unique) and that a named choice is among the tools; errors name the
    /// OpenAI field (`tools[i].function.name`, `tool_choice`).
    pub fn new(tools: Vec<ToolSpec>, choice: ToolChoice, parallel: Option<bool>) -> Result<Self, ChatError> {
        if tools.is_empty() {
            return Err(ChatError::new("tools", "tools must not be empty when given"));
        }
        let mut seen = HashSet::new();
        for (i, t) in tools.iter().enumerate() {
            if !valid_name(&t.name) {
                return Err(ChatError::new(
                    format!("tools[{i}].function.name"),
                    format!(
                        "invalid function name '{}': use a-z, A-Z, 0-9, '_' and '-', at most 64 characters",
                        t.name
                    ),
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(ChatError::new(
                    format!("tools[{i}].function.name"),
                    format!("tool name '{}' is given twice", t.name),
                ));
            }
        }
        if let ToolChoice::Named(n) = &choice {
            if !seen.contains(n.as_str()) {
                return Err(ChatError::new(
                    "tool_choice",
                    format!("tool_choice names '{n}', which is not among the tools"),
                ));
            }
        }
        // A named choice asks for that one call (vLLM does the same); a small model otherwise
        // repeats it until max_tokens.
        let parallel = parallel.unwrap_or(true) && !matches!(choice, ToolChoice::Named(_));
        Ok(Self { tools, choice, parallel })
    }

    /// Whether the model may call a tool at all (`none` forbids it).
    pub fn calls_allowed(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The tools a call may name (only the named one under a named `tool_choice`).
    pub fn callable(&self) -> Vec<&ToolSpec> {
        match &self.choice {
            ToolChoice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        }
    }
}

/// OpenAI's rule for function and schema names.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A fresh OpenAI-style tool call id.
pub fn call_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &u[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> ToolSpec {
        ToolSpec::new(name, None, Some(json!({"type": "object", "properties": {"x": {"type": "integer"}}})))
    }

    #[test]
    fn choices_and_errors() {
        let plan = |c: ToolChoice| ToolPlan::new(vec![spec("a"), spec("b")], c, None);
        let named = plan(ToolChoice::Named("b".into())).unwrap();
        assert_eq!(named.callable().len(), 1);
        assert!(!named.parallel);
        assert_eq!(plan(ToolChoice::Named("zz".into())).unwrap_err().param, "tool_choice");
        assert_eq!(ToolPlan::new(vec![], ToolChoice::Auto, None).unwrap_err().param, "tools");
        let dup = ToolPlan::new(vec![spec("a"), spec("a")], ToolChoice::Auto, None).unwrap_err();
        assert_eq!(dup.param, "tools[1].function.name");
        assert!(ToolPlan::new(vec![spec("bad name")], ToolChoice::Auto, None).is_err());
        assert_eq!(ToolSpec::new("now", None, None).parameters["additionalProperties"], json!(false));
        let v = ToolSpec::new("f", Some("does f"), None).to_template_value();
        assert_eq!(v["function"]["description"], "does f");
        assert!(call_id().starts_with("call_") && call_id().len() == 29);
    }
}
