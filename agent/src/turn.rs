//! One model turn of a run, in the run's engine session: the conversation is rendered with the
//! turn's tools, only what the session does not hold yet is sent (the tool results and the next
//! assistant header after a turn that called tools), the output is constrained to the tools'
//! schemas (or to the answer schema) and parsed back into content and calls.
//!
//! Owns: the session, what it holds (the messages its history renders), sampling for a turn.
//! Must not: execute tools, record steps or decide what the run does next (`run.rs` does).

use kiln_inference::chat::{self, CallParser, Conversation, Message, Piece, ToolCall, ToolPlan};
use kiln_inference::{Constraint, EngineError, EngineHandle, FinishReason, SamplingParams, Session, SessionInput};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// What one turn asks of the model.
pub struct TurnSpec<'a> {
    pub messages: &'a [Message],
    /// `None`: no tools this turn.
    pub tools: Option<&'a ToolPlan>,
    /// The final answer's JSON schema; applies when the turn may not call tools.
    pub answer_schema: Option<&'a Value>,
    /// Sampling for the turn (temperature, max tokens, ...); the constraint is set here.
    pub params: SamplingParams,
}

/// A finished turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutput {
    /// Text outside tool calls.
    pub content: String,
    pub calls: Vec<ToolCall>,
    pub finish: FinishReason,
    /// The whole conversation's prompt tokens, and how many of them were already computed.
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub elapsed: Duration,
}

impl TurnOutput {
    /// The assistant message this turn adds to the conversation.
    pub fn message(&self) -> Message {
        Message::assistant_calls(self.content.clone(), self.calls.clone())
    }
}

/// Text as it is generated (for `message.delta` events); calls arrive whole in the output.
pub type OnText<'a> = &'a mut (dyn FnMut(&str) + Send);

/// A run's engine session and what its history holds.
pub struct ModelSession {
    engine: EngineHandle,
    session: Session,
    /// The messages the session's history renders (through the last assistant turn), with the
    /// tools that turn saw; `None` before the first turn or when unknown.
    held: Option<(Vec<Message>, Option<ToolPlan>)>,
}

impl ModelSession {
    pub fn new(engine: EngineHandle) -> Self {
        let session = engine.session();
        Self { engine, session, held: None }
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Runs one turn. Errors are the engine's (overload, context length, shutdown).
    pub async fn turn(&mut self, spec: TurnSpec<'_>, on_text: OnText<'_>) -> Result<TurnOutput, EngineError> {
        let started = Instant::now();
        let input = self.input(&spec).await?;
        let mut params = spec.params;
        params.constraint = constraint(spec.tools, spec.answer_schema);
        if spec.tools.is_some_and(|p| !p.calls_allowed()) {
            chat::forbid_call_token(self.engine.tokenizer(), &mut params);
        }
        let calls_possible = spec.tools.is_some_and(ToolPlan::calls_allowed);
        let mut stream = self.session.generate(input, params)?;
        let mut parser = CallParser::new();
        let (mut content, mut finish, mut completion) = (String::new(), FinishReason::Stop, 0);
        while let Some(delta) = stream.next().await {
            let delta = delta?;
            completion += delta.tokens.len();
            let pieces = if calls_possible { parser.push(&delta.text) } else { vec![Piece::Content(delta.text)] };
            emit(pieces, &mut content, on_text);
            if let Some(r) = delta.finish_reason {
                finish = r;
            }
        }
        emit(parser.finish(), &mut content, on_text);
        let calls = parser.calls().to_vec();
        let out = TurnOutput {
            finish: chat::finish_reason(!calls.is_empty(), finish),
            content,
            calls,
            prompt_tokens: stream.prompt_tokens(),
            cached_tokens: stream.cached_tokens(),
            completion_tokens: completion,
            elapsed: started.elapsed(),
        };
        let mut held = spec.messages.to_vec();
        held.push(out.message());
        self.held = Some((held, spec.tools.cloned()));
        Ok(out)
    }

    /// What to send: the continuation of the held conversation when `spec` extends it with the
    /// same tools (only the new tokens are prefilled), else the whole conversation (the engine
    /// still reuses the longest prefix it holds).
    async fn input(&self, spec: &TurnSpec<'_>) -> Result<SessionInput, EngineError> {
        let tok = self.engine.tokenizer().clone();
        let messages = spec.messages.to_vec();
        let tools = spec.tools.cloned();
        let held = self.held.clone();
        let work = move || -> Result<SessionInput, EngineError> {
            let kwargs = Map::new();
            let next = Conversation { messages: &messages, tools: tools.as_ref(), kwargs: &kwargs };
            if let Some((done, done_tools)) = &held {
                let extends = messages.starts_with(done) && same_tools(done_tools.as_ref(), tools.as_ref());
                let prev = Conversation { messages: done, tools: done_tools.as_ref(), kwargs: &kwargs };
                if let Some(tokens) = extends.then(|| chat::continuation(&tok, &prev, &next)).flatten() {
                    return Ok(SessionInput::Append(tokens));
                }
            }
            Ok(SessionInput::Replace(chat::render(&tok, &next, true)?))
        };
        // Rendering and tokenizing are CPU work: off the async workers.
        tokio::task::spawn_blocking(work).await.map_err(|e| EngineError::Template(format!("render task: {e}")))?
    }
}

fn same_tools(a: Option<&ToolPlan>, b: Option<&ToolPlan>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.tools == b.tools,
        _ => false,
    }
}

fn emit(pieces: Vec<Piece>, content: &mut String, on_text: OnText<'_>) {
    for p in pieces {
        if let Piece::Content(text) = p {
            on_text(&text);
            content.push_str(&text);
        }
    }
}

/// The turn's grammar: tool calls when the turn may call tools (with `tool_choice: none`, text
/// that is no call); otherwise the answer schema, if any.
fn constraint(tools: Option<&ToolPlan>, answer_schema: Option<&Value>) -> Option<Constraint> {
    match tools {
        Some(plan) if plan.calls_allowed() => chat::grammar::constraint(plan),
        _ => answer_schema
            .map(|s| Constraint::json_schema(s.clone()))
            .or_else(|| tools.and_then(chat::grammar::constraint)),
    }
}
