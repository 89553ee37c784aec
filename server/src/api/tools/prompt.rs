//! What the chat template sees of tools and of earlier tool turns.
//!
//! - Native templates (they render `tools`, like Qwen2.5's) get the tool list (not under
//!   `tool_choice: none`: a model shown tools writes calls, which `none` forbids; vLLM's
//!   `--exclude-tools-when-tool-choice-none` does the same) and the conversation as is, except that `tool_calls[].function.arguments` (a JSON string in the
//!   OpenAI API) becomes the object templates expect to `tojson`.
//! - Any other template cannot render tools, assistant `tool_calls` or `role: "tool"`: kiln adds
//!   [`GENERIC_INSTRUCTIONS`] with the tool list to the system message and writes earlier calls
//!   and results as text in the same wire format (`<tool_call>` / `<tool_response>`).

use super::{ToolPlan, CALL_CLOSE, CALL_OPEN};
use crate::api::error::{ApiError, ApiResult};
use serde_json::{json, Value};

/// The generic tool format kiln teaches a model whose template has none (README, "Tools").
pub const GENERIC_INSTRUCTIONS: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n\
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// The messages (and `tools` argument) to render. `native`: the template renders tools itself.
pub fn prepare(
    messages: Vec<Value>,
    plan: Option<&ToolPlan>,
    native: bool,
) -> ApiResult<(Vec<Value>, Option<Vec<Value>>)> {
    let messages =
        messages.into_iter().enumerate().map(|(i, m)| decode_arguments(i, m)).collect::<ApiResult<Vec<_>>>()?;
    if native {
        let shown = plan.filter(|p| p.calls_allowed());
        return Ok((messages, shown.map(|p| p.tools.iter().map(|t| t.raw.clone()).collect())));
    }
    let mut out = as_text_turns(messages);
    if let Some(p) = plan.filter(|p| p.calls_allowed()) {
        let listed: Vec<String> = p.tools.iter().map(|t| t.raw.to_string()).collect();
        let section = GENERIC_INSTRUCTIONS.replace("{tools}", &listed.join("\n"));
        match out.first_mut() {
            Some(first) if first["role"] == "system" => {
                let content = first["content"].as_str().unwrap_or_default();
                first["content"] = Value::String(format!("{content}\n\n{section}"));
            }
            _ => out.insert(0, json!({"role": "system", "content": section})),
        }
    }
    Ok((out, None))
}

/// Parses each `tool_calls[].function.arguments` string into JSON (an invalid one is a 400).
fn decode_arguments(i: usize, mut m: Value) -> ApiResult<Value> {
    let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) else { return Ok(m) };
    for (j, call) in calls.iter_mut().enumerate() {
        let Some(args) = call.pointer_mut("/function/arguments") else { continue };
        if let Value::String(s) = args {
            let parsed = if s.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(s).map_err(|e| {
                    ApiError::invalid(
                        &format!("messages[{i}].tool_calls[{j}].function.arguments"),
                        format!("arguments must be a JSON string of an object: {e}"),
                    )
                })?
            };
            *args = parsed;
        }
    }
    Ok(m)
}

/// Rewrites assistant tool calls and tool results as plain turns; consecutive results become
/// one user turn (templates without tools insist on alternating roles).
fn as_text_turns(messages: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    for m in messages {
        match m["role"].as_str() {
            Some("assistant") if m.get("tool_calls").is_some_and(|c| c.is_array()) => {
                let mut text = m["content"].as_str().unwrap_or_default().to_string();
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    let f = &call["function"];
                    let body = json!({"name": f["name"], "arguments": f["arguments"]});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("{CALL_OPEN}\n{body}\n{CALL_CLOSE}"));
                }
                out.push(json!({"role": "assistant", "content": text}));
            }
            Some("tool") => {
                let result =
                    format!("<tool_response>\n{}\n</tool_response>", m["content"].as_str().unwrap_or_default());
                match out.last_mut() {
                    Some(prev) if prev["role"] == "user" && prev.get("kiln_tool_results").is_some() => {
                        let joined = format!("{}\n{result}", prev["content"].as_str().unwrap_or_default());
                        prev["content"] = Value::String(joined);
                    }
                    _ => out.push(json!({"role": "user", "content": result, "kiln_tool_results": true})),
                }
            }
            _ => out.push(m),
        }
    }
    out.iter_mut().for_each(|m| {
        if let Some(o) = m.as_object_mut() {
            o.remove("kiln_tool_results");
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_rewrites_tool_turns() {
        let tools = [json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})];
        let plan = ToolPlan::from_request(Some(&tools), None, None).unwrap().unwrap();
        let msgs = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "one"}),
            json!({"role": "tool", "tool_call_id": "c2", "content": "two"}),
        ];
        let (out, tools_arg) = prepare(msgs.clone(), Some(&plan), false).unwrap();
        assert!(tools_arg.is_none());
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"].as_str().unwrap().contains("\"name\":\"f\""));
        assert_eq!(out[2]["content"], "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"a\":1}}\n</tool_call>");
        assert_eq!(out[3]["content"], "<tool_response>\none\n</tool_response>\n<tool_response>\ntwo\n</tool_response>");
        assert_eq!(out.len(), 4);
        let (native, tools_arg) = prepare(msgs, Some(&plan), true).unwrap();
        assert_eq!(tools_arg.unwrap().len(), 1);
        assert_eq!(native[1]["tool_calls"][0]["function"]["arguments"], json!({"a": 1}));
        let bad = vec![json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]})];
        assert!(prepare(bad, None, true).is_err());
    }
}
