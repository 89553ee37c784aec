//! Streaming responses: engine deltas become OpenAI SSE chunks (`data: {json}\n\n`), ending with
//! `data: [DONE]`. Per choice: the first chat chunk carries only the role, content chunks carry
//! `finish_reason: null`, a last chunk carries the finish reason; with
//! `stream_options.include_usage` every chunk has `usage: null` and one final `choices: []`
//! chunk has the totals. An error after the stream started is sent as `data: {"error": ...}`.
//! Keep-alives are `:` comments. When the client goes away the body stream is dropped, which
//! drops the engine streams and aborts their sequences.

use super::error::ApiError;
use super::generation::{usage, Tracked};
use super::logprobs;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, StreamExt};
use kiln_inference::chat::{finish_reason, CallParser, Piece};
use kiln_inference::tokenizer::Tokenizer;
use kiln_inference::Delta;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What every chunk of one response shares.
pub struct StreamCtx {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    pub kind: Kind,
    pub include_usage: bool,
    pub tokenizer: Arc<Tokenizer>,
    /// Chat with tools: choices' text is parsed into `tool_calls` deltas.
    pub tool_calls: bool,
}

impl StreamCtx {
    /// A response's shared chunk fields, stamped now.
    pub fn new(
        state: &super::AppState,
        kind: Kind,
        id: String,
        include_usage: bool,
        tokenizer: Arc<Tokenizer>,
    ) -> Self {
        Self {
            id,
            created: super::generation::unix_now(),
            model: state.served_model_name.clone(),
            fingerprint: state.system_fingerprint.clone(),
            kind,
            include_usage,
            tokenizer,
            tool_calls: false,
        }
    }
}

/// One engine request of the response (completions may have several prompts).
pub struct Part {
    pub tracked: Tracked,
    /// `choices[].index` of this request's choice 0.
    pub offset: usize,
    /// Completions `echo`: the prompt text, sent first in each choice.
    pub echo: Option<String>,
}

#[derive(Default)]
struct Totals {
    prompt: AtomicUsize,
    completion: AtomicUsize,
    cached: AtomicUsize,
}

pub fn response(ctx: StreamCtx, parts: Vec<Part>) -> Response {
    let ctx = Arc::new(ctx);
    let totals = Arc::new(Totals::default());
    let subs: Vec<BoxStream<'static, Event>> =
        parts.into_iter().map(|p| part_stream(ctx.clone(), p, totals.clone())).collect();
    let tail_ctx = ctx.clone();
    let tail = stream::once(async move {
        let mut events = Vec::new();
        if tail_ctx.include_usage {
            let (p, c, k) = (
                totals.prompt.load(Ordering::Relaxed),
                totals.completion.load(Ordering::Relaxed),
                totals.cached.load(Ordering::Relaxed),
            );
            let mut chunk = envelope(&tail_ctx, vec![]);
            chunk["usage"] = usage(p, c, k);
            events.push(data(&chunk));
        }
        events.push(Event::default().data("[DONE]"));
        stream::iter(events)
    })
    .flatten();
    let body = stream::select_all(subs).chain(tail).map(Ok::<_, Infallible>);
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

struct PartState {
    part: Part,
    ctx: Arc<StreamCtx>,
    totals: Arc<Totals>,
    queue: VecDeque<Event>,
    started: Vec<bool>,
    /// Characters already sent per choice (completions' `text_offset`).
    sent: Vec<usize>,
    /// Per choice, when the response may carry tool calls.
    parsers: Vec<CallParser>,
    done: bool,
}

fn part_stream(ctx: Arc<StreamCtx>, part: Part, totals: Arc<Totals>) -> BoxStream<'static, Event> {
    let n = part.tracked.num_choices();
    totals.prompt.fetch_add(part.tracked.prompt_tokens(), Ordering::Relaxed);
    let parsers = if ctx.tool_calls { (0..n).map(|_| CallParser::new()).collect() } else { Vec::new() };
    let st = PartState {
        part,
        ctx,
        totals,
        queue: VecDeque::new(),
        started: vec![false; n],
        sent: vec![0; n],
        parsers,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                return Some((ev, st));
            }
            if st.done {
                return None;
            }
            match st.part.tracked.next().await {
                None => {
                    st.done = true;
                    st.totals.completion.fetch_add(st.part.tracked.generated, Ordering::Relaxed);
                    // Known once the request was admitted, i.e. by the end of its stream.
                    st.totals.cached.fetch_add(st.part.tracked.cached_tokens(), Ordering::Relaxed);
                }
                Some(Err(e)) => {
                    st.done = true;
                    st.queue.push_back(data(&ApiError::from_engine(e, "prompt").body()));
                }
                Some(Ok(d)) => st.on_delta(d),
            }
        }
    })
    .boxed()
}

impl PartState {
    fn on_delta(&mut self, d: Delta) {
        let (i, index) = (d.index, self.part.offset + d.index);
        let ctx = self.ctx.clone();
        if !self.started[i] {
            self.started[i] = true;
            match ctx.kind {
                Kind::Chat => self.push(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})),
                Kind::Completion => {
                    if let Some(echo) = self.part.echo.clone() {
                        self.sent[i] += echo.chars().count();
                        self.push(json!({"index": index, "text": echo, "logprobs": null, "finish_reason": null}));
                    }
                }
            }
        }
        if !self.parsers.is_empty() {
            return self.on_tool_delta(d);
        }
        if !d.text.is_empty() || !d.logprobs.is_empty() {
            let choice = match ctx.kind {
                Kind::Chat => {
                    let lp =
                        if d.logprobs.is_empty() { Value::Null } else { logprobs::chat(&ctx.tokenizer, &d.logprobs) };
                    json!({"index": index, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": null})
                }
                Kind::Completion => {
                    let lp = if d.logprobs.is_empty() {
                        Value::Null
                    } else {
                        logprobs::completion(&d.logprobs, &vec![self.sent[i]; d.logprobs.len()])
                    };
                    json!({"index": index, "text": d.text, "logprobs": lp, "finish_reason": null})
                }
            };
            self.sent[i] += d.text.chars().count();
            self.push(choice);
        }
        if let Some(r) = d.finish_reason {
            let choice = match ctx.kind {
                Kind::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": r.as_str()}),
                Kind::Completion => json!({"index": index, "text": "", "logprobs": null, "finish_reason": r.as_str()}),
            };
            self.push(choice);
        }
    }

    /// A chat delta of a response with tools: content, call starts and argument fragments.
    fn on_tool_delta(&mut self, d: Delta) {
        let (i, index) = (d.index, self.part.offset + d.index);
        let parser = &mut self.parsers[i];
        let mut pieces = parser.push(&d.text);
        if d.finish_reason.is_some() {
            pieces.extend(parser.finish());
        }
        let has_calls = !parser.calls().is_empty();
        if !d.logprobs.is_empty() {
            let lp = logprobs::chat(&self.ctx.tokenizer, &d.logprobs);
            self.push(json!({"index": index, "delta": {}, "logprobs": lp, "finish_reason": null}));
        }
        for p in pieces {
            let delta = match p {
                Piece::Content(c) => json!({"content": c}),
                Piece::Start { index: k, id, name } => {
                    json!({"tool_calls": [{"index": k, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]})
                }
                Piece::Args { index: k, fragment } => {
                    json!({"tool_calls": [{"index": k, "function": {"arguments": fragment}}]})
                }
            };
            self.push(json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null}));
        }
        if let Some(r) = d.finish_reason {
            self.push(
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason(has_calls, r).as_str()}),
            );
        }
    }

    fn push(&mut self, choice: Value) {
        let chunk = envelope(&self.ctx, vec![choice]);
        self.queue.push_back(data(&chunk));
    }
}

fn envelope(ctx: &StreamCtx, choices: Vec<Value>) -> Value {
    let object = match ctx.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    let mut v = json!({
        "id": ctx.id, "object": object, "created": ctx.created, "model": ctx.model,
        "system_fingerprint": ctx.fingerprint, "choices": choices,
    });
    if ctx.include_usage {
        v["usage"] = Value::Null;
    }
    v
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}
