//! One model turn of a run, in the run's engine session: the conversation is rendered with the
//! turn's tools, only what the session does not hold yet is sent (the tool results and the next
//! assistant header after a turn that called tools), the output is constrained to the tools'
//! schemas (or to the answer schema) and parsed back into content and calls.
//!
//! Owns: the session, what it holds (the messages its history renders), sampling for a turn.
//! Must not: execute tools, record steps or decide what the run does next (`run.rs` does).

use kiln_inference::chat::{self, CallParser, Conversation, Message, Piece, ToolCall, ToolChoice, ToolPlan};
use kiln_inference::{Constraint, EngineError, EngineHandle, FinishReason, SamplingParams, Session, SessionInput};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// What one turn asks of the model.
pub struct TurnSpec<'a> {
    pub messages: &'a [Message],
    /// `None`: no tools this turn. All of them are in the prompt.
    pub tools: Option<&'a ToolPlan>,
    /// The tools the grammar lets this turn call (a subset of `tools`); empty means all.
    pub callable: &'a [String],
    /// The final answer's JSON schema; applies when the turn may not call tools.
    pub answer_schema: Option<&'a Value>,
    /// The turn must answer: no calls, though the tools stay in the prompt (so the session's
    /// history still matches and only new tokens are prefilled).
    pub answer_only: bool,
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
    /// What the session's history holds; `None` before the first turn.
    held: Option<Held>,
}

/// The last turn: its messages and tools, the prompt it sent (whole) and the tokens the model
/// generated. The generated ids need not be the tokenizer's own encoding of their text (under a
/// grammar they often are not), so a re-rendered conversation shares the history only up to the
/// first model output: the ids themselves are kept.
#[derive(Clone)]
struct Held {
    prompt_messages: Vec<Message>,
    /// `prompt_messages` plus the turn's assistant message.
    messages: Vec<Message>,
    tools: Option<ToolPlan>,
    prompt: Vec<u32>,
    output: Vec<u32>,
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
        let calls_possible = spec.tools.is_some_and(ToolPlan::calls_allowed) && !spec.answer_only;
        let grammar_plan = spec.tools.map(|p| restrict(p, spec.callable));
        params.constraint = constraint(grammar_plan.as_ref(), spec.answer_schema, calls_possible);
        if spec.tools.is_some() && !calls_possible {
            chat::forbid_call_token(self.engine.tokenizer(), &mut params);
        }
        let mut stream = self.session.generate(SessionInput::Replace(input.clone()), params)?;
        let mut parser = CallParser::new();
        let (mut content, mut finish, mut output) = (String::new(), FinishReason::Stop, Vec::new());
        while let Some(delta) = stream.next().await {
            let delta = delta?;
            output.extend_from_slice(&delta.tokens);
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
            completion_tokens: output.len(),
            elapsed: started.elapsed(),
        };
        let mut messages = spec.messages.to_vec();
        messages.push(out.message());
        let prompt_messages = spec.messages.to_vec();
        self.held = Some(Held { prompt_messages, messages, tools: spec.tools.cloned(), prompt: input, output });
        Ok(out)
    }

    /// The whole prompt of the turn, as the session's history plus new tokens where it can be:
    /// after a turn, the held history and the continuation (only the new tokens are prefilled);
    /// the same messages again (a turn the loop discarded), the held prompt; otherwise a fresh
    /// render (the engine still reuses the longest prefix it holds). Sent as `Replace`, which
    /// prefills exactly what the history lacks.
    async fn input(&self, spec: &TurnSpec<'_>) -> Result<Vec<u32>, EngineError> {
        let tok = self.engine.tokenizer().clone();
        let messages = spec.messages.to_vec();
        let tools = spec.tools.cloned();
        let held = self.held.clone();
        let work = move || -> Result<Vec<u32>, EngineError> {
            let kwargs = Map::new();
            let next = Conversation { messages: &messages, tools: tools.as_ref(), kwargs: &kwargs };
            if let Some(h) = held.filter(|h| same_tools(h.tools.as_ref(), tools.as_ref())) {
                if messages == h.prompt_messages {
                    return Ok(h.prompt);
                }
                let prev = Conversation { messages: &h.messages, tools: h.tools.as_ref(), kwargs: &kwargs };
                if messages.starts_with(&h.messages) {
                    if let Some(cont) = chat::continuation(&tok, &prev, &next) {
                        return Ok([h.prompt, h.output, cont].concat());
                    }
                }
            }
            chat::render(&tok, &next, true)
        };
        // Rendering and tokenizing are CPU work: off the async workers.
        tokio::task::spawn_blocking(work).await.map_err(|e| EngineError::Template(format!("render task: {e}")))?
    }
}

/// The plan whose grammar allows only `callable` (all tools when empty).
fn restrict(plan: &ToolPlan, callable: &[String]) -> ToolPlan {
    let mut p = plan.clone();
    if !callable.is_empty() {
        p.tools.retain(|t| callable.contains(&t.name));
    }
    p
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

/// The turn's grammar: tool calls when the turn may call tools; otherwise the answer schema, or
/// text that is no call.
fn constraint(tools: Option<&ToolPlan>, answer_schema: Option<&Value>, calls: bool) -> Option<Constraint> {
    match tools {
        Some(plan) if calls => chat::grammar::constraint(plan),
        Some(plan) => answer_schema.map(|s| Constraint::json_schema(s.clone())).or_else(|| {
            let none = ToolPlan { choice: ToolChoice::None, ..plan.clone() };
            chat::grammar::constraint(&none)
        }),
        None => answer_schema.map(|s| Constraint::json_schema(s.clone())),
    }
}
