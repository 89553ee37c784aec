//! `POST /v1/chat/completions`: validates the request, renders the conversation with the
//! model's chat template (special-token text in client strings stays text), runs it through the
//! engine and answers as one JSON object or as SSE.
//! `response_format` and `tools` become a grammar constraint (see `response_format.rs`,
//! `tools/`); a turn with tools is parsed back into `message.tool_calls`.

use super::chat_json::{self, with_tool_calls};
use super::error::{ApiError, ApiResult};
use super::generation::{collect, submit, unix_now, usage};
use super::request::{body_bytes, parse_with_sampling, ChatRequest};
use super::response_format::{self, grammar_error};
use super::sse::{self, Kind, Part, StreamCtx};
use super::{logprobs, Shared};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_inference::chat::{self, Conversation, ToolPlan};
use kiln_inference::engine::Prompt;
use kiln_inference::tokenizer::Tokenizer;
use serde_json::{json, Value};

pub async fn handle(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req: ChatRequest = parse_with_sampling(&body_bytes(body)?)?;
    state.check_model(&req.model)?;
    let plan = chat_json::tool_plan(req.tools.as_deref(), req.tool_choice.as_ref(), req.parallel_tool_calls)?;
    let calls = plan.as_ref().is_some_and(ToolPlan::calls_allowed);
    let format = response_format::constraint(req.response_format.as_ref())?;
    if format.is_some() && calls {
        return Err(ApiError::invalid(
            "response_format",
            "response_format cannot be combined with tool calls; use tool_choice \"none\" or drop one",
        ));
    }
    let mut params = req.params(&state.sampling_defaults())?;
    let include_usage = req.sampling.include_usage()?;
    let engine = state.engine()?.clone();
    params.constraint = format.or_else(|| plan.as_ref().and_then(chat::grammar::constraint));
    if plan.is_some() && !calls {
        chat::forbid_call_token(engine.tokenizer(), &mut params);
    }
    let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    let ids = render_prompt(&state, engine.tokenizer(), &req.messages, plan.as_ref(), kwargs, true).await?;
    let grammar_param = if calls { "tools" } else { "response_format" };
    let mut tracked = submit(&state, &engine, Prompt::Tokens(ids), params)
        .await
        .map_err(|e| grammar_error(e, grammar_param, "messages"))?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if req.sampling.stream() {
        let mut ctx = StreamCtx::new(&state, Kind::Chat, id, include_usage, engine.tokenizer().clone());
        ctx.tool_calls = calls;
        return Ok(sse::response(ctx, vec![Part { tracked, offset: 0, echo: None }]));
    }
    // A grammar can pass compilation and still hit the grammar engine's limits while decoding.
    let outs = collect(&mut tracked).await.map_err(|e| grammar_error(e, grammar_param, "messages"))?;
    let completion: usize = outs.iter().map(|o| o.tokens).sum();
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let lp = if req.logprobs.unwrap_or(false) {
                logprobs::chat(engine.tokenizer(), &o.logprobs)
            } else {
                Value::Null
            };
            let (message, finish) = if calls {
                with_tool_calls(&o.text, o.finish)
            } else {
                (json!({"role": "assistant", "content": o.text}), o.finish.map(|r| r.as_str()))
            };
            json!({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        })
        .collect();
    let body = json!({
        "id": id, "object": "chat.completion", "created": unix_now(), "model": state.served_model_name,
        "system_fingerprint": state.system_fingerprint, "choices": choices,
        "usage": usage(tracked.prompt_tokens(), completion, tracked.cached_tokens()),
    });
    Ok(Json(body).into_response())
}

/// Renders and tokenizes a conversation the way a chat request does (tools in the prompt as the
/// template or kiln's generic format puts them): what `/v1/chat/completions` runs and what
/// `/tokenize` with `messages` counts. CPU work, so off the async workers; control tokens come
/// only from the template, never from message text (`Tokenizer::encode_chat`).
pub(super) async fn render_prompt(
    state: &Shared,
    tok: &std::sync::Arc<Tokenizer>,
    messages: &[Value],
    plan: Option<&ToolPlan>,
    kwargs: serde_json::Map<String, Value>,
    add_generation_prompt: bool,
) -> ApiResult<Vec<u32>> {
    let messages = chat_json::messages(messages)?;
    render_messages(state, tok, messages, RenderOpts { plan, kwargs, add_generation_prompt, param: "messages" }).await
}

/// How [`render_messages`] renders: the turn's tools, template variables, whether to open the
/// assistant's turn, and the request field errors name (`messages`, `input`).
pub(super) struct RenderOpts<'a> {
    pub plan: Option<&'a ToolPlan>,
    pub kwargs: serde_json::Map<String, Value>,
    pub add_generation_prompt: bool,
    pub param: &'static str,
}

/// Renders typed messages on the blocking pool (shared by chat and the Responses API).
pub(super) async fn render_messages(
    state: &Shared,
    tok: &std::sync::Arc<Tokenizer>,
    messages: Vec<chat::Message>,
    opts: RenderOpts<'_>,
) -> ApiResult<Vec<u32>> {
    if tok.chat_template.is_none() {
        return Err(ApiError::invalid(opts.param, "this model has no chat template; use /v1/completions"));
    }
    let (tok, plan, kwargs, add) = (tok.clone(), opts.plan.cloned(), opts.kwargs, opts.add_generation_prompt);
    state
        .cpu(move || {
            let conv = Conversation { messages: &messages, tools: plan.as_ref(), kwargs: &kwargs };
            chat::render(&tok, &conv, add)
        })
        .await?
        .map_err(|e| ApiError::from_engine(e, opts.param))
}
