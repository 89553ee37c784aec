//! The small routes: `/health`, `/metrics`, `/v1/models`, and vLLM-style `/tokenize` and
//! `/detokenize`. Tokenizing runs on the blocking pool (`AppState::cpu`): a 5 MB prompt takes
//! seconds of CPU and must not hold an async worker.
//!
//! `/tokenize` gives the ids kiln would feed the model: `prompt` with `add_special_tokens`
//! (default) as `/v1/completions` tokenizes it (BOS added, special-token text such as
//! `<|im_end|>` parsed, because a raw prompt is the client's own whole prompt); with
//! `add_special_tokens: false` as plain text (no BOS, special-token text stays text);
//! `messages` as `/v1/chat/completions` does (control tokens only from the template).

use super::chat::render_prompt;
use super::chat_json;
use super::error::{ApiError, ApiResult};
use super::openapi_shapes as shapes;
use super::request::{body_bytes, parse_body};
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// 200 once the model is loaded and warmed, 503 before and while shutting down.
pub async fn health(State(state): State<Shared>) -> Response {
    match state.engine() {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /openapi.json`: the API's OpenAPI document (see `openapi.rs`).
pub async fn openapi(State(state): State<Shared>) -> Json<Value> {
    let embed = state.embedder_if_loaded().map(|(name, _)| name.as_str());
    Json(super::openapi::document(&state.served_model_name, embed))
}

pub async fn metrics(State(state): State<Shared>) -> Response {
    let mut text = state.metrics.render(state.engine_if_loaded(), state.embedder_if_loaded().map(|(_, h)| h));
    if let Some(rt) = state.agents() {
        crate::metrics::agent_metrics(&mut text, rt.stats());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

fn model_card(state: &Shared) -> Value {
    let max_len = state.engine_if_loaded().map(|e| e.info().max_model_len);
    let d = state.sampling_defaults();
    // f32 -> the decimal it was written as (0.95, not 0.949999988079071).
    let num = |x: f32| Value::from(x.to_string().parse::<f64>().unwrap_or(f64::from(x)));
    // Only the fields that are set: what a request leaving them out gets instead of OpenAI's.
    let mut defaults = serde_json::Map::new();
    let fields = [
        ("temperature", d.temperature.map(num)),
        ("top_p", d.top_p.map(num)),
        ("top_k", d.top_k.map(Value::from)),
        ("min_p", d.min_p.map(num)),
        ("repetition_penalty", d.repetition_penalty.map(num)),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            defaults.insert(k.into(), v);
        }
    }
    json!({"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "kiln",
           "max_model_len": max_len, "default_sampling_params": defaults})
}

fn embedding_card(state: &Shared) -> Option<Value> {
    state.embedder_if_loaded().map(|(name, h)| {
        json!({"id": name, "object": "model", "created": state.created, "owned_by": "kiln",
               "max_model_len": h.info().sentence.max_seq_length, "dimensions": h.info().dim})
    })
}

pub async fn list_models(State(state): State<Shared>) -> Json<Value> {
    let data: Vec<Value> = std::iter::once(model_card(&state)).chain(embedding_card(&state)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_model(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if id == state.served_model_name {
        return Ok(Json(model_card(&state)));
    }
    match embedding_card(&state) {
        Some(card) if card["id"] == id.as_str() => Ok(Json(card)),
        _ => Err(ApiError::model_not_found(&id)),
    }
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::optional_chat_messages")]
    messages: Option<Vec<Value>>,
    /// With `messages`: rendered into the prompt exactly as a chat request renders them.
    #[serde(default)]
    #[schemars(schema_with = "shapes::chat_tools")]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::tool_choice")]
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

pub async fn tokenize(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let req: TokenizeRequest = parse_body(&body_bytes(body)?)?;
    if let Some(m) = &req.model {
        state.check_model(m)?;
    }
    let engine = state.engine()?;
    let tok = engine.tokenizer().clone();
    let ids = match (req.prompt, req.messages) {
        (Some(p), None) => {
            let special = req.add_special_tokens;
            let ids = state.cpu(move || if special { tok.encode_prompt(&p, true) } else { tok.encode(&p, false) });
            ids.await?.map_err(|e| ApiError::from_engine(e, "prompt"))?
        }
        (None, Some(msgs)) => {
            let plan = chat_json::tool_plan(req.tools.as_deref(), req.tool_choice.as_ref(), req.parallel_tool_calls)?;
            let kwargs = req.chat_template_kwargs.unwrap_or_default();
            render_prompt(&state, &tok, &msgs, plan.as_ref(), kwargs, req.add_generation_prompt).await?
        }
        _ => return Err(ApiError::invalid("prompt", "give exactly one of 'prompt' or 'messages'")),
    };
    Ok(Json(json!({"count": ids.len(), "max_model_len": engine.info().max_model_len, "tokens": ids})))
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let req: DetokenizeRequest = parse_body(&body_bytes(body)?)?;
    if let Some(m) = &req.model {
        state.check_model(m)?;
    }
    let engine = state.engine()?;
    let vocab = engine.info().vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid("tokens", format!("token id {bad} is outside the vocabulary (size {vocab})")));
    }
    let tok = engine.tokenizer().clone();
    let text =
        state.cpu(move || tok.decode(&req.tokens, false)).await?.map_err(|e| ApiError::from_engine(e, "tokens"))?;
    Ok(Json(json!({"prompt": text})))
}
