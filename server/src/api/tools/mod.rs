//! Function tools: the request's `tools` / `tool_choice` / `parallel_tool_calls`, checked and
//! turned into (1) what the prompt tells the model (`prompt.rs`), (2) the grammar its calls must
//! follow (`grammar.rs`) and (3) the parser that turns its output back into OpenAI
//! `tool_calls` (`parse.rs`).
//!
//! Wire format: the Hermes/Qwen2.5 one, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
//! Models whose chat template renders `tools` (Qwen2.5) are prompted by their own template; for
//! any other template kiln adds a system section describing the tools and this same format
//! (`prompt::GENERIC_INSTRUCTIONS`, documented in the README).

pub mod grammar;
pub mod parse;
pub mod prompt;

use super::error::{ApiError, ApiResult};
use super::response_format::valid_name;
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
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    /// The request's tool object as given (templates render it).
    pub raw: Value,
    /// JSON schema of the arguments (an empty object schema when the tool takes none).
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// What a request asked of its tools, validated.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

impl ToolPlan {
    /// `None` when the request has no tools. Every mistake is a 400 naming the field.
    pub fn from_request(
        tools: Option<&[Value]>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> ApiResult<Option<Self>> {
        let tool_choice = tool_choice.filter(|c| !c.is_null());
        let Some(list) = tools else {
            return match tool_choice {
                Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice is only allowed when tools are given")),
                None => Ok(None),
            };
        };
        if list.is_empty() {
            return Err(ApiError::invalid("tools", "tools must not be empty when given"));
        }
        let mut seen = HashSet::new();
        let tools = list.iter().enumerate().map(|(i, t)| parse_tool(i, t)).collect::<ApiResult<Vec<_>>>()?;
        for (i, t) in tools.iter().enumerate() {
            if !seen.insert(t.name.clone()) {
                return Err(ApiError::invalid(
                    &format!("tools[{i}].function.name"),
                    format!("tool name '{}' is given twice", t.name),
                ));
            }
        }
        let choice = parse_choice(tool_choice, &tools)?;
        // A named choice asks for that one call (vLLM does the same); a small model otherwise
        // repeats it until max_tokens.
        let parallel = parallel.unwrap_or(true) && !matches!(choice, Choice::Named(_));
        Ok(Some(Self { tools, choice, parallel }))
    }

    /// Whether the model may call a tool at all (`none` forbids it).
    pub fn calls_allowed(&self) -> bool {
        self.choice != Choice::None
    }

    /// The tools a call may name (only the named one under a named `tool_choice`).
    pub fn callable(&self) -> Vec<&Tool> {
        match &self.choice {
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        }
    }
}

fn parse_tool(i: usize, t: &Value) -> ApiResult<Tool> {
    let p = format!("tools[{i}]");
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        other => {
            return Err(ApiError::invalid(
                &format!("{p}.type"),
                format!("tool type must be 'function', got {}", other.unwrap_or("(missing)")),
            ))
        }
    }
    let f = t
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::invalid(&format!("{p}.function"), "a function tool needs a 'function' object"))?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        return Err(ApiError::invalid(
            &format!("{p}.function.name"),
            format!("invalid function name '{name}': use a-z, A-Z, 0-9, '_' and '-', at most 64 characters"),
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        Some(s @ Value::Object(_)) => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{p}.function.parameters"),
                "function parameters must be a JSON schema object",
            ))
        }
    };
    Ok(Tool { name: name.to_string(), raw: t.clone(), parameters })
}

fn parse_choice(c: Option<&Value>, tools: &[Tool]) -> ApiResult<Choice> {
    let bad = |m: String| Err(ApiError::invalid("tool_choice", m));
    match c {
        None => Ok(Choice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(Choice::None),
            "auto" => Ok(Choice::Auto),
            "required" => Ok(Choice::Required),
            other => bad(format!("tool_choice must be none, auto, required or a function object, got '{other}'")),
        },
        Some(obj @ Value::Object(_)) => {
            let name = obj.pointer("/function/name").and_then(Value::as_str);
            match (obj.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) if tools.iter().any(|t| t.name == n) => Ok(Choice::Named(n.to_string())),
                (Some("function"), Some(n)) => bad(format!("tool_choice names '{n}', which is not among the tools")),
                _ => bad("tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}".into()),
            }
        }
        Some(_) => bad("tool_choice must be a string or an object".into()),
    }
}

/// A fresh OpenAI-style tool call id.
pub fn call_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &u[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}})
    }

    #[test]
    fn choices_and_errors() {
        let tools = vec![tool("a"), tool("b")];
        let plan = |c: Value| ToolPlan::from_request(Some(&tools), Some(&c), None);
        assert_eq!(plan(json!("auto")).unwrap().unwrap().choice, Choice::Auto);
        assert_eq!(plan(json!("none")).unwrap().unwrap().choice, Choice::None);
        assert_eq!(plan(json!("required")).unwrap().unwrap().choice, Choice::Required);
        let named = plan(json!({"type": "function", "function": {"name": "b"}})).unwrap().unwrap();
        assert_eq!(named.callable().len(), 1);
        assert!(plan(json!({"type": "function", "function": {"name": "zz"}})).is_err());
        assert!(plan(json!("sometimes")).is_err());
        assert!(ToolPlan::from_request(None, Some(&json!("auto")), None).is_err());
        assert!(ToolPlan::from_request(Some(&[]), None, None).is_err());
        assert!(ToolPlan::from_request(Some(&[tool("a"), tool("a")]), None, None).is_err());
        assert!(ToolPlan::from_request(Some(&[tool("bad name")]), None, None).is_err());
        assert!(ToolPlan::from_request(Some(&[json!({"type": "retrieval"})]), None, None).is_err());
        let bare =
            ToolPlan::from_request(Some(&[json!({"type": "function", "function": {"name": "now"}})]), None, None)
                .unwrap()
                .unwrap();
        assert_eq!(bare.tools[0].parameters["additionalProperties"], json!(false));
        assert!(call_id().starts_with("call_") && call_id().len() == 29);
    }
}
