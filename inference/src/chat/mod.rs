//! Chat as typed values, shared by the server's OpenAI endpoints and the agent layer: messages,
//! tool plans, how a conversation becomes a prompt (the model's template, with kiln's generic
//! tool format where the template has none), the grammar tool calls follow and the parser that
//! reads them back. Must not: know HTTP or OpenAI JSON (the server converts), or the engine's
//! internals (a prompt is token ids, a turn's output is text).

pub mod grammar;
pub mod parse;
mod prompt;
mod tools;

pub use parse::{finish_reason, CallParser, Piece};
pub use prompt::GENERIC_INSTRUCTIONS;
pub use tools::{
    call_id, valid_name, ToolChoice, ToolPlan, ToolSpec, BARE_OPEN, CALL_CLOSE, CALL_OPEN, FENCE_CLOSE, FENCE_OPEN,
};

use crate::error::EngineError;
use crate::params::SamplingParams;
use crate::tokenizer::{ChatInput, Tokenizer};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A call the model made: `arguments` is the JSON text it wrote (an object).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One turn of a conversation. `tool_calls` only on assistant turns, `tool_call_id` only on
/// tool results.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }

    /// An assistant turn that called tools.
    pub fn assistant_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self { tool_calls: calls, ..Self::new(Role::Assistant, content) }
    }

    /// The result of call `call_id`.
    pub fn tool_result(call_id: &str, content: impl Into<String>) -> Self {
        Self { tool_call_id: Some(call_id.to_string()), ..Self::new(Role::Tool, content) }
    }
}

/// A request field a caller got wrong: `param` names it the OpenAI way (`tool_choice`,
/// `messages[2].tool_calls[0].function.arguments`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ChatError {
    pub param: String,
    pub message: String,
}

impl ChatError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: param.into(), message: message.into() }
    }
}

impl From<ChatError> for EngineError {
    fn from(e: ChatError) -> Self {
        EngineError::InvalidField { param: e.param, message: e.message }
    }
}

/// A conversation to render: messages, the turn's tools, template variables.
#[derive(Debug, Clone, Copy)]
pub struct Conversation<'a> {
    pub messages: &'a [Message],
    pub tools: Option<&'a ToolPlan>,
    pub kwargs: &'a Map<String, Value>,
}

/// Renders and tokenizes a conversation as the model's template (or kiln's generic tool format)
/// writes it; control tokens come only from the template, never from message text
/// (`Tokenizer::encode_chat`). CPU work: callers on an async runtime run it off the workers.
pub fn render(tok: &Tokenizer, conv: &Conversation<'_>, add_generation_prompt: bool) -> Result<Vec<u32>, EngineError> {
    let template =
        tok.chat_template.as_ref().ok_or_else(|| EngineError::Template("this model has no chat template".into()))?;
    let (messages, tools) = prompt::prepare(conv.messages, conv.tools, template.renders_tools())?;
    tok.encode_chat(&ChatInput {
        messages: &messages,
        tools: tools.as_deref(),
        add_generation_prompt,
        kwargs: conv.kwargs,
    })
}

/// What a session must append after a turn to continue with `next` (the same conversation plus
/// new messages, e.g. tool results): the closing the template writes after the last assistant
/// message (from its end-of-turn token on, which the model's own stop left out of the history)
/// and the new messages with the next assistant header. `None` when the template does not
/// render `next` as an extension of `done` (then re-send the whole conversation instead).
pub fn continuation(tok: &Tokenizer, done: &Conversation<'_>, next: &Conversation<'_>) -> Option<Vec<u32>> {
    let before = render(tok, done, false).ok()?;
    let after = render(tok, next, true).ok()?;
    if !after.starts_with(&before) {
        return None;
    }
    let end = before.iter().rposition(|t| tok.eos_ids.contains(t))?;
    let mut out = before[end..].to_vec();
    out.extend_from_slice(&after[before.len()..]);
    Some(out)
}

/// `tool_choice: "none"`: when the call tag is one token (Qwen's `<tool_call>`), the model may
/// not write it; otherwise the text is plain content anyway (nothing parses it).
pub fn forbid_call_token(tok: &Tokenizer, params: &mut SamplingParams) {
    if let Some(id) = tok.token_to_id(CALL_OPEN) {
        params.logit_bias.retain(|(t, _)| *t != id);
        params.logit_bias.push((id, -100.0));
    }
}
