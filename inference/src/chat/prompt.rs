//! What the chat template sees of a conversation and its tools.
//!
//! - Native templates (they render `tools`, like Qwen2.5's) get the tool list (not under
//!   `tool_choice: none`: a model shown tools writes calls, which `none` forbids; vLLM's
//!   `--exclude-tools-when-tool-choice-none` does the same) and the conversation as is, with each
//!   call's `arguments` as the object templates expect to `tojson`.
//! - Any other template cannot render tools, assistant `tool_calls` or `role: "tool"`: kiln adds
//!   [`GENERIC_INSTRUCTIONS`] with the tool list to the system message and writes earlier calls
//!   and results as text in the same wire format (`<tool_call>` / `<tool_response>`).

use super::{ChatError, Message, Role, ToolPlan, CALL_CLOSE, CALL_OPEN};
use serde_json::{json, Value};

/// The generic tool format kiln teaches a model whose template has none (README, "Tools").
pub const GENERIC_INSTRUCTIONS: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n\
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// The template's `messages` (and `tools` argument). `native`: the template renders tools itself.
pub fn prepare(
    messages: &[Message],
    plan: Option<&ToolPlan>,
    native: bool,
) -> Result<(Vec<Value>, Option<Vec<Value>>), ChatError> {
    let shown = plan.filter(|p| p.calls_allowed());
    if native {
        let values = messages.iter().enumerate().map(|(i, m)| native_message(i, m)).collect::<Result<_, _>>()?;
        return Ok((values, shown.map(|p| p.tools.iter().map(|t| t.to_template_value()).collect())));
    }
    let mut out = as_text_turns(messages)?;
    if let Some(p) = shown {
        let listed: Vec<String> = p.tools.iter().map(|t| t.to_template_value().to_string()).collect();
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

/// A message as templates expect it: OpenAI's shape, `arguments` as an object.
fn native_message(i: usize, m: &Message) -> Result<Value, ChatError> {
    let mut v = json!({"role": m.role.as_str(), "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls = m
            .tool_calls
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let args = arguments(i, j, &c.arguments)?;
                Ok(json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}}))
            })
            .collect::<Result<Vec<_>, ChatError>>()?;
        v["tool_calls"] = Value::Array(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = Value::String(id.clone());
    }
    if let Some(n) = &m.name {
        v["name"] = Value::String(n.clone());
    }
    Ok(v)
}

/// A call's `arguments` text as JSON (an empty text is `{}`); invalid JSON names the field.
fn arguments(i: usize, j: usize, text: &str) -> Result<Value, ChatError> {
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(text).map_err(|e| {
        ChatError::new(
            format!("messages[{i}].tool_calls[{j}].function.arguments"),
            format!("arguments must be a JSON string of an object: {e}"),
        )
    })
}

/// Rewrites assistant tool calls and tool results as plain turns; consecutive results become
/// one user turn (templates without tools insist on alternating roles).
fn as_text_turns(messages: &[Message]) -> Result<Vec<Value>, ChatError> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    let mut last_was_result = false;
    for (i, m) in messages.iter().enumerate() {
        let is_result = m.role == Role::Tool;
        match m.role {
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for (j, call) in m.tool_calls.iter().enumerate() {
                    let body = json!({"name": call.name, "arguments": arguments(i, j, &call.arguments)?});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("{CALL_OPEN}\n{body}\n{CALL_CLOSE}"));
                }
                out.push(json!({"role": "assistant", "content": text}));
            }
            Role::Tool => {
                let result = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(prev) if last_was_result => {
                        let joined = format!("{}\n{result}", prev["content"].as_str().unwrap_or_default());
                        prev["content"] = Value::String(joined);
                    }
                    _ => out.push(json!({"role": "user", "content": result})),
                }
            }
            _ => out.push(native_message(i, m)?),
        }
        last_was_result = is_result;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{ToolCall, ToolChoice, ToolSpec};
    use super::*;

    #[test]
    fn generic_rewrites_tool_turns() {
        let plan =
            ToolPlan::new(vec![ToolSpec::new("f", None, Some(json!({"type": "object"})))], ToolChoice::Auto, None)
                .unwrap();
        let call = ToolCall { id: "c1".into(), name: "f".into(), arguments: "{\"a\": 1}".into() };
        let msgs = vec![
            Message::new(Role::User, "hi"),
            Message::assistant_calls("", vec![call]),
            Message::tool_result("c1", "one"),
            Message::tool_result("c2", "two"),
        ];
        let (out, tools_arg) = prepare(&msgs, Some(&plan), false).unwrap();
        assert!(tools_arg.is_none());
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"].as_str().unwrap().contains("\"name\":\"f\""));
        assert_eq!(out[2]["content"], "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"a\":1}}\n</tool_call>");
        assert_eq!(out[3]["content"], "<tool_response>\none\n</tool_response>\n<tool_response>\ntwo\n</tool_response>");
        assert_eq!(out.len(), 4);
        let (native, tools_arg) = prepare(&msgs, Some(&plan), true).unwrap();
        assert_eq!(tools_arg.unwrap().len(), 1);
        assert_eq!(native[1]["tool_calls"][0]["function"]["arguments"], json!({"a": 1}));
        assert_eq!(native[2]["tool_call_id"], "c1");
        let bad = ToolCall { id: "c".into(), name: "f".into(), arguments: "{oops".into() };
        let e = prepare(&[Message::assistant_calls("", vec![bad])], None, true).unwrap_err();
        assert_eq!(e.param, "messages[0].tool_calls[0].function.arguments");
    }
}
