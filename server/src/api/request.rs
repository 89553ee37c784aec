//! OpenAI request bodies and their translation into engine terms. Field names and accepted
//! shapes follow the OpenAI API; vLLM's sampling extensions (`top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`, `stop_token_ids`) are accepted too. Unknown fields are
//! ignored, as OpenAI-compatible clients send vendor extras. Nothing here talks to the engine.

use super::error::{ApiError, ApiResult};
use super::openapi_shapes as shapes;
use axum::body::Bytes;
use kiln_inference::{SamplingDefaults, SamplingParams};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;

/// Parses a JSON body; a wrong type or a missing field becomes a 400 naming the field.
pub fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b != b'{') {
        let mut e = ApiError::invalid("", "the request body must be a JSON object");
        e.param = None;
        return Err(e);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return not_json(&inner);
        }
        // serde reports a missing field at the enclosing object; name the field itself.
        let missing =
            inner.to_string().strip_prefix("missing field `").and_then(|m| m.split('`').next()).map(str::to_string);
        match (path.as_str(), missing) {
            ("." | "?", Some(field)) => ApiError::invalid(&field, format!("'{field}' is required")),
            ("." | "?", None) => ApiError::invalid("body", format!("invalid request body: {inner}")),
            (p, _) => ApiError::invalid(p, format!("invalid value for '{p}': {inner}")),
        }
    })?;
    // Trailing characters after the JSON value make the body invalid JSON too.
    de.end().map_err(|e| not_json(&e))?;
    Ok(v)
}

fn not_json(e: &serde_json::Error) -> ApiError {
    let mut err = ApiError::invalid("", format!("the request body is not valid JSON: {e}"));
    err.param = None;
    err
}

/// A request with shared sampling fields: both structs parse the same body.
pub trait WithSampling: DeserializeOwned {
    fn set_sampling(&mut self, s: Sampling);
}

impl WithSampling for ChatRequest {
    fn set_sampling(&mut self, s: Sampling) {
        self.sampling = s;
    }
}

impl WithSampling for CompletionRequest {
    fn set_sampling(&mut self, s: Sampling) {
        self.sampling = s;
    }
}

pub fn parse_with_sampling<T: WithSampling>(body: &Bytes) -> ApiResult<T> {
    let mut req: T = parse_body(body)?;
    req.set_sampling(parse_body(body)?);
    Ok(req)
}

/// `stop`: a string or an array of up to 4 (we allow more) strings.
#[derive(Debug, Deserialize, Clone, JsonSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by chat and completions.
#[derive(Debug, Deserialize, Default, JsonSchema)]
pub struct Sampling {
    // The ranges are the engine's (`SamplingParams::validate`), stated for `/openapi.json`.
    #[schemars(range(min = 1, max = 128))]
    pub n: Option<i64>,
    #[schemars(range(min = 0, max = 2))]
    pub temperature: Option<f32>,
    #[schemars(range(min = 0, max = 1))]
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    #[schemars(range(min = 0, max = 1))]
    pub min_p: Option<f32>,
    #[schemars(range(min = -2, max = 2))]
    pub presence_penalty: Option<f32>,
    #[schemars(range(min = -2, max = 2))]
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, JsonSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ChatRequest {
    pub model: String,
    #[schemars(schema_with = "shapes::chat_messages")]
    pub messages: Vec<Value>,
    /// Parsed from the same body by [`parse_with_sampling`] (not `flatten`: that would hide
    /// which field a type error is in).
    #[serde(skip)]
    pub sampling: Sampling,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[schemars(schema_with = "shapes::chat_tools")]
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[schemars(schema_with = "shapes::tool_choice")]
    #[serde(default)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[schemars(schema_with = "shapes::response_format")]
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Extra template variables (vLLM extension).
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub user: Option<String>,
}

/// `prompt`: a string, strings, token ids, or arrays of token ids.
#[derive(Debug, Deserialize, Clone, JsonSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(skip)]
    pub sampling: Sampling,
    pub max_tokens: Option<i64>,
    /// Legacy logprobs: the number of alternatives per position.
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[schemars(schema_with = "shapes::response_format")]
    #[serde(default)]
    pub response_format: Option<Value>,
    pub user: Option<String>,
}

/// OpenAI's default when neither `max_tokens` field is given: up to the context length.
fn max_tokens(v: Option<i64>, param: &str) -> ApiResult<Option<usize>> {
    match v {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid(param, format!("{param} must be at least 1, got {n}"))),
    }
}

fn non_negative(v: Option<i64>, param: &str) -> ApiResult<Option<usize>> {
    match v {
        Some(n) if n < 0 => Err(ApiError::invalid(param, format!("{param} must be non-negative, got {n}"))),
        v => Ok(v.map(|n| n as usize)),
    }
}

impl Sampling {
    /// The engine's parameters; ranges are checked by the engine (one place), shapes here.
    /// `defaults` fill the sampling fields the request leaves out (before OpenAI's defaults).
    pub fn to_params(
        &self,
        max_tokens_field: (Option<i64>, &str),
        logprobs: Option<usize>,
        defaults: &SamplingDefaults,
    ) -> ApiResult<SamplingParams> {
        let d = SamplingParams::default();
        let logit_bias = match &self.logit_bias {
            None => Vec::new(),
            Some(m) => m
                .iter()
                .map(|(k, &b)| {
                    k.parse::<u32>().map(|id| (id, b)).map_err(|_| {
                        ApiError::invalid("logit_bias", format!("logit_bias keys must be token ids, got '{k}'"))
                    })
                })
                .collect::<ApiResult<Vec<_>>>()?,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(SamplingParams {
            n: non_negative(self.n, "n")?.unwrap_or(1),
            temperature: self.temperature.or(defaults.temperature).unwrap_or(d.temperature),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(d.top_p),
            // vLLM uses -1 for "disabled"; so do we.
            top_k: match self.top_k {
                Some(k) if k > 0 => k as usize,
                Some(-1) | Some(0) => 0,
                None => defaults.top_k.unwrap_or(d.top_k),
                Some(k) => return Err(ApiError::invalid("top_k", format!("top_k must be -1, 0 or positive, got {k}"))),
            },
            min_p: self.min_p.or(defaults.min_p).unwrap_or(d.min_p),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.or(defaults.repetition_penalty).unwrap_or(1.0),
            logit_bias,
            seed: self.seed.map(|s| s as u64),
            max_tokens: max_tokens(max_tokens_field.0, max_tokens_field.1)?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            stop,
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
            constraint: None,
            priority: Default::default(),
        })
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> ApiResult<bool> {
        match (self.stream(), self.stream_options) {
            (false, Some(_)) => {
                Err(ApiError::invalid("stream_options", "stream_options is only allowed when stream is true"))
            }
            (_, o) => Ok(o.is_some_and(|o| o.include_usage)),
        }
    }
}

impl ChatRequest {
    pub fn params(&self, defaults: &SamplingDefaults) -> ApiResult<SamplingParams> {
        // `max_completion_tokens` is the newer name and wins when both are given.
        let max = match self.max_completion_tokens {
            Some(v) => (Some(v), "max_completion_tokens"),
            None => (self.max_tokens, "max_tokens"),
        };
        let top = non_negative(self.top_logprobs, "top_logprobs")?;
        let logprobs = match (self.logprobs.unwrap_or(false), top) {
            (true, t) => Some(t.unwrap_or(0)),
            (false, Some(t)) if t > 0 => {
                return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs to be true"))
            }
            (false, _) => None,
        };
        self.sampling.to_params(max, logprobs, defaults)
    }
}

impl CompletionRequest {
    pub fn params(&self, defaults: &SamplingDefaults) -> ApiResult<SamplingParams> {
        let logprobs = non_negative(self.logprobs, "logprobs")?;
        // OpenAI's legacy default is 16 tokens.
        let max = (Some(self.max_tokens.unwrap_or(16)), "max_tokens");
        self.sampling.to_params(max, logprobs, defaults)
    }
}

/// The body bytes, with a too-large body as OpenAI-shaped 413.
pub fn body_bytes(r: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    r.map_err(|e| {
        let status = e.status();
        if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                format!("the request body is larger than {} bytes", super::MAX_BODY_BYTES),
            )
        } else {
            ApiError::new(status, "invalid_request_error", format!("cannot read the request body: {e}"))
        }
    })
}

/// A bad query parameter names itself: serde's message starts with the field
/// ("Failed to deserialize query string: limit: invalid digit ...").
pub fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    let text = e.body_text();
    let detail = text.split_once("query string: ").map_or(text.as_str(), |(_, d)| d);
    let param = detail.split_once(": ").map_or("query", |(p, _)| p);
    ApiError::invalid(param, format!("invalid query parameter: {detail}"))
}
