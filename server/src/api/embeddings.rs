//! `POST /v1/embeddings` as the OpenAI SDK uses it: `input` as a string, strings, token ids or
//! lists of token ids (used as given: no `[CLS]`/`[SEP]` added); `encoding_format` `float` or
//! `base64` (little-endian f32, the Python SDK's default); `dimensions` (truncate, then
//! L2-renormalize; refused unless the model's config declares Matryoshka training). The work happens on the
//! embedding queue's worker (`inference::embed`); this file only validates and formats.

use super::error::{ApiError, ApiResult};
use super::request::{body_bytes, parse_body};
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use kiln_inference::embed::{EmbedInput, EmbedOptions};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct EmbeddingRequest {
    model: String,
    input: Input,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    /// vLLM/TEI extension: error instead of cutting inputs longer than the model's limit.
    truncate: Option<bool>,
    #[allow(dead_code)]
    user: Option<String>,
}

pub async fn handle(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let req: EmbeddingRequest = parse_body(&body_bytes(body)?)?;
    let embedder = state.embedder(&req.model)?.clone();
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
            ))
        }
    };
    let dimensions = match req.dimensions {
        None => None,
        Some(d) if d >= 1 => Some(d as usize),
        Some(d) => return Err(ApiError::invalid("dimensions", format!("dimensions must be at least 1, got {d}"))),
    };
    let inputs = match req.input {
        Input::Text(t) => vec![EmbedInput::Text(t)],
        Input::Texts(v) => v.into_iter().map(EmbedInput::Text).collect(),
        Input::Tokens(ids) => vec![EmbedInput::Tokens(ids)],
        Input::TokenLists(v) => v.into_iter().map(EmbedInput::Tokens).collect(),
    };
    let opts = EmbedOptions { dimensions, truncate: req.truncate.unwrap_or(true) };
    let start = Instant::now();
    let n = inputs.len();
    // Tokenizing thousands of inputs takes milliseconds to seconds: off the async workers.
    let pending =
        state.cpu(move || embedder.submit(inputs, &opts)).await?.map_err(|e| ApiError::from_engine(e, "input"))?;
    let embeddings = pending.recv().await.map_err(|e| ApiError::from_engine(e, "input"))?;
    let tokens: usize = embeddings.iter().map(|e| e.tokens).sum();
    state.metrics.observe_embeddings(n, tokens, start.elapsed().as_secs_f64());
    if let Some(c) = super::ratelimit::current_charge() {
        c.tokens(tokens);
    }
    let data: Vec<Value> = embeddings
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let vector = if base64 { Value::String(encode_f32(&e.vector)) } else { json!(e.vector) };
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "data": data, "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// Little-endian f32 bytes, standard base64 (what the OpenAI SDKs decode).
fn encode_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
