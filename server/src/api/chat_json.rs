//! OpenAI chat JSON <-> `kiln_inference::chat` types: `messages`, `tools`, `tool_choice` and
//! `parallel_tool_calls` checked and converted (every mistake a 400 naming the field), and an
//! assistant turn's text parsed back into `message.tool_calls`. Must not: render prompts, build
//! grammars or parse calls itself (`kiln_inference::chat` does, for the agent layer too).

use super::error::{ApiError, ApiResult};
use kiln_inference::chat::{CallParser, ChatError, Message, Piece, Role, ToolCall, ToolChoice, ToolPlan, ToolSpec};
use kiln_inference::FinishReason;
use serde_json::{json, Value};

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        ApiError::invalid(&e.param, e.message)
    }
}

/// The request's tools as a plan; `None` when it has none.
pub fn tool_plan(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> ApiResult<Option<ToolPlan>> {
    let choice = choice.filter(|c| !c.is_null());
    let Some(list) = tools else {
        return match choice {
            Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice is only allowed when tools are given")),
            None => Ok(None),
        };
    };
    let specs = list.iter().enumerate().map(|(i, t)| tool_spec(i, t)).collect::<ApiResult<Vec<_>>>()?;
    Ok(Some(ToolPlan::new(specs, tool_choice(choice)?, parallel)?))
}

fn tool_spec(i: usize, t: &Value) -> ApiResult<ToolSpec> {
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
    let description = f.get("description").and_then(Value::as_str);
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => None,
        Some(s @ Value::Object(_)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{p}.function.parameters"),
                "function parameters must be a JSON schema object",
            ))
        }
    };
    Ok(ToolSpec::new(name, description, parameters))
}

fn tool_choice(c: Option<&Value>) -> ApiResult<ToolChoice> {
    let bad = |m: String| Err(ApiError::invalid("tool_choice", m));
    match c {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => bad(format!("tool_choice must be none, auto, required or a function object, got '{other}'")),
        },
        Some(obj @ Value::Object(_)) => {
            match (obj.get("type").and_then(Value::as_str), obj.pointer("/function/name")) {
                (Some("function"), Some(Value::String(n))) => Ok(ToolChoice::Named(n.clone())),
                _ => bad("tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}".into()),
            }
        }
        Some(_) => bad("tool_choice must be a string or an object".into()),
    }
}

/// Checks roles and flattens content parts to text (templates expect plain strings).
/// `developer` (OpenAI's newer name for system) is passed as `system`.
pub fn messages(messages: &[Value]) -> ApiResult<Vec<Message>> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    messages.iter().enumerate().map(|(i, m)| message(i, m)).collect()
}

fn message(i: usize, m: &Value) -> ApiResult<Message> {
    let param = format!("messages[{i}]");
    let obj = m.as_object().ok_or_else(|| ApiError::invalid(&param, format!("{param} must be an object")))?;
    let role = match obj.get("role").and_then(Value::as_str).unwrap_or_default() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("unknown role '{other}'; expected system, developer, user, assistant or tool"),
            ))
        }
    };
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(&param, parts)?,
        None | Some(Value::Null) if role == Role::Assistant => String::new(),
        _ => {
            return Err(ApiError::invalid(
                &format!("{param}.content"),
                format!("{param}.content must be a string or an array of text parts"),
            ))
        }
    };
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let tool_calls = match obj.get("tool_calls") {
        Some(Value::Array(calls)) => {
            calls.iter().enumerate().map(|(j, c)| tool_call(&format!("{param}.tool_calls[{j}]"), c)).collect()
        }
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(ApiError::invalid(&format!("{param}.tool_calls"), "tool_calls must be an array")),
    }?;
    Ok(Message { role, content, tool_calls, tool_call_id: text("tool_call_id"), name: text("name") })
}

fn tool_call(param: &str, c: &Value) -> ApiResult<ToolCall> {
    let name = c.pointer("/function/name").and_then(Value::as_str);
    let name = name.ok_or_else(|| ApiError::invalid(&format!("{param}.function.name"), "a tool call needs a name"))?;
    let arguments = match c.pointer("/function/arguments") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        // Some clients send the object itself; templates get the same object either way.
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{param}.function.arguments"),
                "arguments must be a JSON string of an object",
            ))
        }
    };
    let id = c.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    Ok(ToolCall { id, name: name.to_string(), arguments })
}

fn text_parts(param: &str, parts: &[Value]) -> ApiResult<String> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => text.push_str(t),
            (t, _) => {
                return Err(ApiError::invalid(
                    &format!("{param}.content[{j}]"),
                    format!(
                        "content part type '{}' is not supported (this model reads text only)",
                        t.unwrap_or("(missing)")
                    ),
                ))
            }
        }
    }
    Ok(text)
}

/// The assistant message of a turn that may call tools, and its finish reason.
pub fn with_tool_calls(text: &str, finish: Option<FinishReason>) -> (Value, Option<&'static str>) {
    let mut parser = CallParser::new();
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish());
    let content: String =
        pieces.iter().filter_map(|p| if let Piece::Content(c) = p { Some(c.as_str()) } else { None }).collect();
    let calls = parser.calls();
    if calls.is_empty() {
        return (json!({"role": "assistant", "content": content}), finish.map(FinishReason::as_str));
    }
    let tool_calls: Vec<Value> = calls
        .iter()
        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect();
    let content = if content.is_empty() { Value::Null } else { Value::String(content) };
    let finish = finish.map(|r| kiln_inference::chat::finish_reason(true, r).as_str());
    (json!({"role": "assistant", "content": content, "tool_calls": tool_calls}), finish)
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
        let plan = |c: Value| tool_plan(Some(&tools), Some(&c), None);
        assert_eq!(plan(json!("auto")).unwrap().unwrap().choice, ToolChoice::Auto);
        assert_eq!(plan(json!("none")).unwrap().unwrap().choice, ToolChoice::None);
        assert_eq!(plan(json!("required")).unwrap().unwrap().choice, ToolChoice::Required);
        let named = plan(json!({"type": "function", "function": {"name": "b"}})).unwrap().unwrap();
        assert_eq!(named.callable().len(), 1);
        assert!(plan(json!({"type": "function", "function": {"name": "zz"}})).is_err());
        assert!(plan(json!("sometimes")).is_err());
        assert!(tool_plan(None, Some(&json!("auto")), None).is_err());
        assert!(tool_plan(Some(&[]), None, None).is_err());
        let dup = tool_plan(Some(&[tool("a"), tool("a")]), None, None).unwrap_err();
        assert_eq!(dup.param.as_deref(), Some("tools[1].function.name"));
        assert!(tool_plan(Some(&[tool("bad name")]), None, None).is_err());
        assert!(tool_plan(Some(&[json!({"type": "retrieval"})]), None, None).is_err());
    }

    #[test]
    fn messages_convert_and_name_bad_fields() {
        let msgs = messages(&[
            json!({"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "42"}),
        ])
        .unwrap();
        assert_eq!((msgs[0].role, msgs[0].content.as_str()), (Role::System, "be brief"));
        assert_eq!(msgs[1].tool_calls[0].name, "f");
        assert_eq!(msgs[2].tool_call_id.as_deref(), Some("c1"));
        let e = messages(&[json!({"role": "wizard", "content": "x"})]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = messages(&[json!({"role": "user", "content": [{"type": "image_url"}]})]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        assert!(messages(&[]).is_err());
    }
}
