//! Responses API JSON <-> `kiln_inference::chat` types: the request body, `input` (a string or
//! items: messages, `function_call`, `function_call_output`) normalized to stored items with
//! ids, items turned into chat messages (a `function_call_output` must answer an open call),
//! flat function `tools` and `tool_choice` into a `ToolPlan`, `text.format` into the answer
//! schema. Every mistake is a 400 naming the field. Must not: render prompts, build grammars or
//! parse model output (`kiln_inference::chat` does; chat's own JSON lives in `chat_json.rs`).

use super::chat_json;
use super::error::{ApiError, ApiResult};
use super::openapi_shapes as shapes;
use super::response_format;
use kiln_inference::chat::{Message, Role, ToolCall, ToolPlan};
use kiln_inference::Grammar;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashSet;

/// `POST /v1/responses`. Unknown fields are ignored (clients send `service_tier`,
/// `prompt_cache_key`, `safety_identifier`, ... that change nothing here).
#[derive(Debug, Deserialize, Default, JsonSchema)]
pub struct ResponsesRequest {
    pub model: String,
    #[serde(default)]
    #[schemars(schema_with = "shapes::responses_input")]
    pub input: Option<Value>,
    pub instructions: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::responses_tools")]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::responses_tool_choice")]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::responses_text")]
    pub text: Option<Value>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub previous_response_id: Option<String>,
    pub store: Option<bool>,
    pub stream: Option<bool>,
    pub metadata: Option<Map<String, Value>>,
    pub user: Option<String>,
    pub background: Option<bool>,
    /// Echoed, otherwise ignored: the served models do not reason.
    #[serde(default)]
    #[schemars(schema_with = "shapes::any_object")]
    pub reasoning: Option<Value>,
    pub truncation: Option<String>,
    /// Extras to include: `file_search_call.results` is honored; the others (logprobs, encrypted
    /// reasoning) do not exist here and are ignored.
    #[serde(default)]
    #[schemars(schema_with = "shapes::include_list")]
    pub include: Option<Value>,
}

/// A fresh id with OpenAI's prefix (`resp`, `msg`, `fc`): clients check prefixes.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// `input` as stored items, each with an id and OpenAI's full item shape.
pub fn input_items(input: Option<&Value>) -> ApiResult<Vec<Value>> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![message_item(&new_id("msg"), "user", s, "input_text")]),
        Some(Value::Array(items)) => {
            items.iter().enumerate().filter_map(|(i, it)| input_item(&format!("input[{i}]"), it).transpose()).collect()
        }
        Some(_) => Err(ApiError::invalid("input", "input must be a string or an array of input items")),
    }
}

/// One input item normalized; `None` for items that carry nothing for this model (reasoning).
fn input_item(p: &str, it: &Value) -> ApiResult<Option<Value>> {
    let obj = it.as_object().ok_or_else(|| ApiError::invalid(p, format!("{p} must be an object")))?;
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or(if obj.contains_key("role") { "message" } else { "" });
    let id = |prefix| obj.get("id").and_then(Value::as_str).map_or_else(|| new_id(prefix), str::to_string);
    let field = |k: &str| -> ApiResult<String> {
        match obj.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ApiError::invalid(&format!("{p}.{k}"), format!("{p}.{k} must be a string"))),
        }
    };
    match kind {
        "message" => {
            let role = obj.get("role").and_then(Value::as_str).unwrap_or_default();
            let part = match role {
                "user" | "system" | "developer" => "input_text",
                "assistant" => "output_text",
                other => {
                    return Err(ApiError::invalid(
                        &format!("{p}.role"),
                        format!("unknown role '{other}'; expected user, system, developer or assistant"),
                    ))
                }
            };
            let text = content_text(p, obj.get("content"))?;
            Ok(Some(message_item(&id("msg"), role, &text, part)))
        }
        "function_call" => {
            let arguments = match obj.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ Value::Object(_)) => v.to_string(),
                _ => return Err(ApiError::invalid(&format!("{p}.arguments"), "arguments must be a JSON string")),
            };
            Ok(Some(json!({
                "type": "function_call", "id": id("fc"), "call_id": field("call_id")?, "name": field("name")?,
                "arguments": arguments, "status": "completed",
            })))
        }
        "function_call_output" => {
            let output = match obj.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts_text(&format!("{p}.output"), parts)?,
                _ => {
                    return Err(ApiError::invalid(
                        &format!("{p}.output"),
                        "output must be a string or an array of text parts",
                    ))
                }
            };
            Ok(Some(json!({
                "type": "function_call_output", "id": id("fco"), "call_id": field("call_id")?, "output": output,
                "status": "completed",
            })))
        }
        "reasoning" | "mcp_list_tools" => Ok(None),
        // Server-side tool calls (see `responses_agent.rs`) come back when a client re-sends the
        // previous output as input; approval items carry decisions.
        "mcp_call" | "mcp_approval_request" | "file_search_call" => Ok(Some(it.clone())),
        "mcp_approval_response" => {
            let approve = obj.get("approve").and_then(Value::as_bool).ok_or_else(|| {
                ApiError::invalid(&format!("{p}.approve"), format!("{p}.approve must be true or false"))
            })?;
            let reason = obj.get("reason").and_then(Value::as_str);
            Ok(Some(json!({
                "type": "mcp_approval_response", "id": id("mcpa"),
                "approval_request_id": field("approval_request_id")?, "approve": approve, "reason": reason,
            })))
        }
        "" => Err(ApiError::invalid(&format!("{p}.type"), "an input item needs a 'type' (or a 'role')")),
        other => Err(ApiError::invalid(
            &format!("{p}.type"),
            format!(
                "input item type '{other}' is not supported; expected message, function_call or function_call_output"
            ),
        )),
    }
}

pub fn message_item(id: &str, role: &str, text: &str, part: &str) -> Value {
    let mut content = json!({"type": part, "text": text});
    if part == "output_text" {
        content["annotations"] = json!([]);
    }
    json!({"type": "message", "id": id, "role": role, "content": [content], "status": "completed"})
}

fn content_text(p: &str, content: Option<&Value>) -> ApiResult<String> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts_text(&format!("{p}.content"), parts),
        _ => Err(ApiError::invalid(&format!("{p}.content"), "content must be a string or an array of text parts")),
    }
}

fn parts_text(p: &str, parts: &[Value]) -> ApiResult<String> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("(missing)");
        let key = if kind == "refusal" { "refusal" } else { "text" };
        match (kind, part.get(key).and_then(Value::as_str)) {
            ("input_text" | "output_text" | "text" | "refusal", Some(t)) => text.push_str(t),
            ("input_text" | "output_text" | "text" | "refusal", None) => {
                return Err(ApiError::invalid(
                    &format!("{p}[{j}].{key}"),
                    format!("a '{kind}' part needs a string '{key}'"),
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    &format!("{p}[{j}]"),
                    format!("content part type '{kind}' is not supported (this model reads text only)"),
                ))
            }
        }
    }
    Ok(text)
}

fn text_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The conversation as chat messages: `instructions` first, then the items in order. Calls
/// next to each other join one assistant turn; a `function_call_output` must answer a call
/// made earlier and not answered yet (else a 400 naming it; `first_new` is the index of the
/// request's own first item, for the error's `input[i]`).
pub fn to_messages(instructions: Option<&str>, items: &[Value], first_new: usize) -> ApiResult<Vec<Message>> {
    let mut out = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        out.push(Message::new(Role::System, i));
    }
    let mut open: HashSet<String> = HashSet::new();
    let mut calls_allowed = false;
    for (i, it) in items.iter().enumerate() {
        let text = |k: &str| it.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        match it.get("type").and_then(Value::as_str) {
            Some("function_call") => {
                let call = ToolCall { id: text("call_id"), name: text("name"), arguments: text("arguments") };
                open.insert(call.id.clone());
                match out.last_mut() {
                    Some(m @ Message { role: Role::Assistant, .. }) if calls_allowed => m.tool_calls.push(call),
                    _ => out.push(Message::assistant_calls("", vec![call])),
                }
                calls_allowed = true;
            }
            // A call kiln ran itself: the call and its result, as one exchange.
            Some("mcp_call") => {
                let call = ToolCall { id: text("id"), name: text("name"), arguments: text("arguments") };
                let result = it.get("output").and_then(Value::as_str).map_or_else(|| text("error"), str::to_string);
                out.push(Message::assistant_calls("", vec![call]));
                out.push(Message::tool_result(&text("id"), result));
                calls_allowed = false;
            }
            // A search kiln ran: the call and the chunks it found (when they were included).
            Some("file_search_call") => {
                let query = it["queries"].get(0).and_then(Value::as_str).unwrap_or_default();
                let args = json!({"query": query}).to_string();
                let call = ToolCall { id: text("id"), name: "file_search".into(), arguments: args };
                let result = match it.get("results").and_then(Value::as_array) {
                    Some(r) => r
                        .iter()
                        .map(|h| {
                            format!(
                                "<result filename=\"{}\">\n{}\n</result>",
                                text_of(&h["filename"]),
                                text_of(&h["text"])
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                    None => "(the results of this search were not kept)".to_string(),
                };
                out.push(Message::assistant_calls("", vec![call]));
                out.push(Message::tool_result(&text("id"), result));
                calls_allowed = false;
            }
            Some("mcp_approval_request" | "mcp_approval_response") => {}
            Some("function_call_output") => {
                let id = text("call_id");
                if !open.remove(&id) {
                    let p = format!("input[{}].call_id", i.saturating_sub(first_new));
                    return Err(ApiError::invalid(
                        &p,
                        format!("no open function_call with call_id '{id}' precedes this function_call_output"),
                    ));
                }
                out.push(Message::tool_result(&id, text("output")));
                calls_allowed = false;
            }
            _ => {
                let role = match it.get("role").and_then(Value::as_str) {
                    Some("assistant") => Role::Assistant,
                    Some("user") => Role::User,
                    _ => Role::System,
                };
                let content: String = it
                    .get("content")
                    .and_then(Value::as_array)
                    .map(|ps| ps.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect())
                    .unwrap_or_default();
                out.push(Message::new(role, content));
                calls_allowed = role == Role::Assistant;
            }
        }
    }
    if out.is_empty() {
        return Err(ApiError::invalid("input", "input must not be empty"));
    }
    Ok(out)
}

/// Flat Responses function tools and `tool_choice` as a plan (through chat's checks, with the
/// errors renamed to the Responses fields). `tool_choice` `auto`/`none` without tools is a no-op.
pub fn tool_plan(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> ApiResult<Option<ToolPlan>> {
    let tools = tools.filter(|t| !t.is_empty());
    let choice = choice.filter(|c| !c.is_null());
    if tools.is_none() && matches!(choice.and_then(Value::as_str), Some("auto" | "none")) {
        return Ok(None);
    }
    let chat_tools: Option<Vec<Value>> = tools.map(|ts| ts.iter().map(chat_tool).collect());
    let chat_choice = match choice {
        Some(Value::Object(o)) => match (o.get("type").and_then(Value::as_str), o.get("name")) {
            (Some("function"), Some(Value::String(n))) => Some(json!({"type": "function", "function": {"name": n}})),
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                ))
            }
        },
        other => other.cloned(),
    };
    chat_json::tool_plan(chat_tools.as_deref(), chat_choice.as_ref(), parallel).map_err(|mut e| {
        e.param = e.param.map(|p| p.replace(".function.", "."));
        e
    })
}

/// A flat Responses function tool in chat's nested shape; anything else as it is, for chat's
/// checks to refuse with the same messages.
fn chat_tool(t: &Value) -> Value {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return t.clone();
    }
    let mut f = Map::new();
    for k in ["name", "description", "parameters"] {
        if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
            f.insert(k.into(), v.clone());
        }
    }
    json!({"type": "function", "function": f})
}

/// `text.format` as the answer's JSON schema (with kiln's JSON options); `None` for plain text.
pub fn answer_schema(text: Option<&Value>) -> ApiResult<Option<Value>> {
    if text.is_some_and(|t| !t.is_object() && !t.is_null()) {
        return Err(ApiError::invalid("text", "text must be an object such as {\"format\": {\"type\": \"text\"}}"));
    }
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else { return Ok(None) };
    let kind = format.get("type").and_then(Value::as_str);
    let rf = match kind {
        Some("json_schema") => {
            let mut spec = Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(k) {
                    spec.insert(k.into(), v.clone());
                }
            }
            json!({"type": "json_schema", "json_schema": spec})
        }
        Some(k) => json!({"type": k}),
        None => return Err(ApiError::invalid("text.format.type", "text.format needs a 'type'")),
    };
    let c = response_format::constraint(Some(&rf)).map_err(|mut e| {
        e.param = e
            .param
            .map(|p| p.replace("response_format.json_schema", "text.format").replace("response_format", "text.format"));
        e.message = e.message.replace("response_format", "text.format").replace("json_schema.", "text.format.");
        e
    })?;
    Ok(c.and_then(|c| match c.grammar {
        Grammar::JsonSchema(s) => Some(s),
        Grammar::Lark(_) => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_shapes_normalize() {
        let items = input_items(Some(&json!("hi"))).unwrap();
        assert_eq!(items[0]["role"], "user");
        assert_eq!(items[0]["content"][0], json!({"type": "input_text", "text": "hi"}));
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"));
        let items = input_items(Some(&json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "42"}]},
            {"type": "reasoning", "summary": []},
        ])))
        .unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[1]["content"][0]["annotations"], json!([]));
        assert!(items[2]["id"].as_str().unwrap().starts_with("fc_"));
        assert_eq!(items[3]["output"], "42");
    }

    #[test]
    fn bad_input_names_the_field() {
        let param = |v: Value| input_items(Some(&v)).unwrap_err().param.unwrap();
        assert_eq!(param(json!(3)), "input");
        assert_eq!(param(json!([{"role": "wizard", "content": "x"}])), "input[0].role");
        assert_eq!(param(json!([{"role": "user", "content": [{"type": "input_image"}]}])), "input[0].content[0]");
        assert_eq!(param(json!(["x", {"type": "web_search_call"}])), "input[0]");
        assert_eq!(param(json!([{"type": "function_call", "name": "f", "arguments": "{}"}])), "input[0].call_id");
        assert_eq!(param(json!([{"type": "function_call_output", "call_id": "c"}])), "input[0].output");
        assert_eq!(param(json!([{"role": "user", "content": [{"type": "input_text"}]}])), "input[0].content[0].text");
    }

    #[test]
    fn calls_join_one_turn_and_outputs_must_answer_them() {
        let items = input_items(Some(&json!([
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "1"},
            {"type": "function_call_output", "call_id": "c2", "output": "2"},
        ])))
        .unwrap();
        let msgs = to_messages(Some("sys"), &items, 0).unwrap();
        assert_eq!(
            msgs.iter().map(|m| m.role).collect::<Vec<_>>(),
            [Role::System, Role::User, Role::Assistant, Role::Tool, Role::Tool]
        );
        assert_eq!(msgs[2].tool_calls.len(), 2);
        let mut twice = items.clone();
        twice.push(items[4].clone());
        let e = to_messages(None, &twice, 2).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[3].call_id"));
        assert!(to_messages(None, &[], 0).is_err());
    }

    #[test]
    fn flat_tools_and_formats() {
        let tools = [json!({"type": "function", "name": "get_weather", "parameters": {"type": "object"}})];
        let plan = tool_plan(Some(&tools), Some(&json!({"type": "function", "name": "get_weather"})), None);
        assert_eq!(plan.unwrap().unwrap().callable().len(), 1);
        let e = tool_plan(Some(&tools), Some(&json!({"type": "function", "name": "nope"})), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = tool_plan(Some(&[json!({"type": "web_search"})]), None, None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
        let e = tool_plan(Some(&[json!({"type": "function", "name": "bad name"})]), None, None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].name"));
        assert!(tool_plan(None, Some(&json!("auto")), None).unwrap().is_none());
        assert!(tool_plan(None, Some(&json!("required")), None).is_err());
        assert!(answer_schema(Some(&json!({"format": {"type": "text"}}))).unwrap().is_none());
        let f = json!({"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": true}});
        assert!(answer_schema(Some(&f)).unwrap().is_some());
        let e = answer_schema(Some(&json!({"format": {"type": "json_schema", "schema": {}}}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("text.format.name"));
        assert_eq!(answer_schema(Some(&json!(3))).unwrap_err().param.as_deref(), Some("text"));
        let e = answer_schema(Some(&json!({"format": {"type": "xml"}}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("text.format"));
    }
}
