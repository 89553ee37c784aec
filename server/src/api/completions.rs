//! `POST /v1/completions`: raw prompts (a string, strings, token ids or lists of token ids), no
//! chat template. Several prompts run as separate engine requests whose choices are numbered
//! `prompt_index * n + choice`, as OpenAI does. `echo` prepends the prompt text; `suffix`
//! (insertion) is refused: no model we serve was trained for it.

use super::error::{ApiError, ApiResult};
use super::generation::{collect, track, unix_now, usage, Tracked};
use super::request::{body_bytes, parse_with_sampling, CompletionRequest, PromptInput};
use super::response_format::{self, grammar_error};
use super::sse::{self, Kind, Part, StreamCtx};
use super::{logprobs, Shared};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_inference::engine::{EngineHandle, Prompt};
use serde_json::{json, Value};

/// OpenAI's cap on prompts in one request.
const MAX_PROMPTS: usize = 2048;

pub async fn handle(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req: CompletionRequest = parse_with_sampling(&body_bytes(body)?)?;
    state.check_model(&req.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "suffix is not supported: the served model has no fill-in-the-middle training",
        ));
    }
    let mut params = req.params(&state.sampling_defaults())?;
    params.constraint = response_format::constraint(req.response_format.as_ref())?;
    if req.best_of.is_some_and(|b| b != params.n as i64) {
        return Err(ApiError::invalid("best_of", "best_of is only supported equal to n"));
    }
    let echo = req.echo.unwrap_or(false);
    if echo && params.logprobs {
        return Err(ApiError::invalid("echo", "echo with logprobs (prompt logprobs) is not supported"));
    }
    let include_usage = req.sampling.include_usage()?;
    let engine = state.engine()?.clone();
    let prompts = prompts(&req.prompt)?;
    let echoes =
        prompts.iter().map(|p| echo.then(|| prompt_text(&engine, p)).transpose()).collect::<ApiResult<Vec<_>>>()?;
    // All prompts are admitted together or not at all (each runs as its own engine request):
    // one that could never be admitted is a 400, not a 429 that retrying cannot cure.
    let streams = engine.generate_many_async(prompts, params.clone()).await.map_err(engine_error)?;
    let parts: Vec<Part> = streams
        .into_iter()
        .zip(echoes)
        .enumerate()
        .map(|(i, (s, echo))| Part { tracked: track(&state, s), offset: i * params.n, echo })
        .collect();
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    if req.sampling.stream() {
        let ctx = StreamCtx::new(&state, Kind::Completion, id, include_usage, engine.tokenizer().clone());
        return Ok(sse::response(ctx, parts));
    }
    let (mut choices, mut prompt_tokens, mut completion_tokens, mut cached) = (Vec::new(), 0, 0, 0);
    for mut part in parts {
        choices.extend(collect_part(&mut part.tracked, part.offset, part.echo.as_deref(), params.logprobs).await?);
        prompt_tokens += part.tracked.prompt_tokens();
        cached += part.tracked.cached_tokens();
        completion_tokens += part.tracked.generated;
    }
    let body = json!({
        "id": id, "object": "text_completion", "created": unix_now(), "model": state.served_model_name,
        "system_fingerprint": state.system_fingerprint, "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    });
    Ok(Json(body).into_response())
}

async fn collect_part(
    t: &mut Tracked,
    offset: usize,
    echo: Option<&str>,
    want_logprobs: bool,
) -> ApiResult<Vec<Value>> {
    let outs = collect(t).await.map_err(engine_error)?;
    Ok(outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let prefix = echo.unwrap_or_default();
            let base = prefix.chars().count();
            let offsets: Vec<usize> = o.offsets.iter().map(|x| x + base).collect();
            let lp = if want_logprobs { logprobs::completion(&o.logprobs, &offsets) } else { Value::Null };
            json!({
                "index": offset + i,
                "text": format!("{prefix}{}", o.text),
                "logprobs": lp,
                "finish_reason": o.finish.map(|r| r.as_str()),
            })
        })
        .collect())
}

/// Engine errors in this route's terms: the engine's `top_logprobs` is the legacy `logprobs` field.
fn engine_error(e: kiln_inference::EngineError) -> ApiError {
    let mut err = grammar_error(e, "response_format", "prompt");
    if err.param.as_deref() == Some("top_logprobs") {
        err.param = Some("logprobs".into());
    }
    err
}

fn prompts(input: &PromptInput) -> ApiResult<Vec<Prompt>> {
    let v: Vec<Prompt> = match input {
        PromptInput::Text(s) => vec![Prompt::Text(s.clone())],
        PromptInput::Texts(v) => v.iter().cloned().map(Prompt::Text).collect(),
        PromptInput::Tokens(ids) => vec![Prompt::Tokens(ids.clone())],
        PromptInput::TokenLists(v) => v.iter().cloned().map(Prompt::Tokens).collect(),
    };
    if v.is_empty() || v.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("prompt must hold between 1 and {MAX_PROMPTS} prompts, got {}", v.len()),
        ));
    }
    Ok(v)
}

fn prompt_text(engine: &EngineHandle, p: &Prompt) -> ApiResult<String> {
    match p {
        Prompt::Text(s) => Ok(s.clone()),
        Prompt::Tokens(ids) => engine.tokenizer().decode(ids, false).map_err(|e| ApiError::from_engine(e, "prompt")),
    }
}
