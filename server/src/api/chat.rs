//! `POST /v1/chat/completions`: validates the request, renders the conversation with the
//! model's chat template, runs it through the engine and answers as one JSON object or as SSE.

use super::error::{ApiError, ApiResult};
use super::generation::{collect, submit, unix_now, usage};
use super::request::{body_bytes, parse_with_sampling, ChatRequest};
use super::sse::{self, Kind, Part, StreamCtx};
use super::{logprobs, Shared};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_inference::engine::Prompt;
use serde_json::{json, Value};

pub async fn handle(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req: ChatRequest = parse_with_sampling(&body_bytes(body)?)?;
    state.check_model(&req.model)?;
    req.reject_unsupported()?;
    let params = req.params()?;
    let include_usage = req.sampling.include_usage()?;
    let engine = state.engine()?.clone();
    let messages = normalize_messages(&req.messages)?;
    let template = engine
        .tokenizer()
        .chat_template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("messages", "this model has no chat template; use /v1/completions"))?;
    let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    let text = template.render_with_kwargs(&messages, None, true, &kwargs).map_err(|e| ApiError::from_engine(e, "messages"))?;
    let mut tracked = submit(&state, &engine, Prompt::Text(text), params).await.map_err(|e| ApiError::from_engine(e, "messages"))?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if req.sampling.stream() {
        let ctx = StreamCtx::new(&state, Kind::Chat, id, include_usage, engine.tokenizer().clone());
        return Ok(sse::response(ctx, vec![Part { tracked, offset: 0, echo: None }]));
    }
    let outs = collect(&mut tracked).await.map_err(|e| ApiError::from_engine(e, "messages"))?;
    let completion: usize = outs.iter().map(|o| o.tokens).sum();
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let lp = if req.logprobs.unwrap_or(false) { logprobs::chat(engine.tokenizer(), &o.logprobs) } else { Value::Null };
            json!({
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
                "finish_reason": o.finish.map(|r| r.as_str()),
            })
        })
        .collect();
    let body = json!({
        "id": id, "object": "chat.completion", "created": unix_now(), "model": state.served_model_name,
        "system_fingerprint": state.system_fingerprint, "choices": choices,
        "usage": usage(tracked.prompt_tokens(), completion, tracked.cached_tokens()),
    });
    Ok(Json(body).into_response())
}

/// Checks roles and flattens content parts to text, as templates expect plain strings.
/// `developer` (OpenAI's newer name for system) is passed as `system`.
fn normalize_messages(messages: &[Value]) -> ApiResult<Vec<Value>> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    messages.iter().enumerate().map(|(i, m)| normalize_message(i, m)).collect()
}

fn normalize_message(i: usize, m: &Value) -> ApiResult<Value> {
    let param = format!("messages[{i}]");
    let mut obj = m.as_object().cloned().ok_or_else(|| ApiError::invalid(&param, format!("{param} must be an object")))?;
    let role = obj.get("role").and_then(Value::as_str).unwrap_or_default().to_string();
    let role = match role.as_str() {
        "system" | "user" | "assistant" | "tool" => role,
        "developer" => "system".to_string(),
        other => return Err(ApiError::invalid(&format!("{param}.role"), format!("unknown role '{other}'; expected system, developer, user, assistant or tool"))),
    };
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(&param, parts)?,
        None | Some(Value::Null) if role == "assistant" => String::new(),
        _ => return Err(ApiError::invalid(&format!("{param}.content"), format!("{param}.content must be a string or an array of text parts"))),
    };
    obj.insert("role".into(), Value::String(role));
    obj.insert("content".into(), Value::String(content));
    Ok(Value::Object(obj))
}

fn text_parts(param: &str, parts: &[Value]) -> ApiResult<String> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => text.push_str(t),
            (t, _) => {
                return Err(ApiError::invalid(
                    &format!("{param}.content[{j}]"),
                    format!("content part type '{}' is not supported (this model reads text only)", t.unwrap_or("(missing)")),
                ))
            }
        }
    }
    Ok(text)
}
