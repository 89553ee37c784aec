//! A Responses API turn as its events: [`OutputBuilder`] turns the model's text into output items
//! (`message` with one `output_text` part, `function_call`) and the events that build them, in
//! OpenAI's order, each with a rising `sequence_number`; `stream` sends them as SSE between
//! `response.created`/`response.in_progress` and one terminal `response.completed` |
//! `response.incomplete` | `response.failed` (errors inside the response object, never a
//! top-level `error` key). The non-streaming path runs the same builder, so both answer alike.
//! Must not: parse tool calls itself (`CallParser` does) or store anything (`responses.rs`).

use super::generation::Tracked;
use super::responses::Finisher;
use super::responses_items::new_id;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use kiln_inference::chat::{CallParser, Piece};
use kiln_inference::FinishReason;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

/// How the model's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No callable tools: all text is the message.
    Text,
    /// Tools: text and calls, as `CallParser` reads them.
    Calls,
    /// Tools beside a JSON answer: the grammar allows only tagged calls or the answer, so the
    /// first visible character decides (`<` opens `<tool_call>`); the answer is never parsed as
    /// a call, even one whose first key is `name`.
    CallsOrAnswer,
}

pub struct OutputBuilder {
    mode: Mode,
    /// `CallsOrAnswer` until decided: the text held back.
    undecided: Option<String>,
    parser: CallParser,
    pub output: Vec<Value>,
    /// Index in `output` of the message being written, with its text so far.
    open: Option<(usize, String)>,
    /// `CallParser` call index -> index in `output`.
    calls: Vec<usize>,
    seq: u64,
}

impl OutputBuilder {
    pub fn new(mode: Mode) -> Self {
        let undecided = (mode == Mode::CallsOrAnswer).then(String::new);
        Self { mode, undecided, parser: CallParser::new(), output: Vec::new(), open: None, calls: Vec::new(), seq: 0 }
    }

    /// An event of type `ty` with the next sequence number.
    pub fn event(&mut self, ty: &str, mut body: Value) -> Value {
        body["type"] = json!(ty);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        body
    }

    /// Events for more of the model's text.
    pub fn push(&mut self, text: &str) -> Vec<Value> {
        let mut ev = Vec::new();
        match (self.mode, self.undecided.as_mut()) {
            (Mode::Text, _) => self.text(text, &mut ev),
            (Mode::CallsOrAnswer, Some(held)) => {
                held.push_str(text);
                let Some(first) = held.trim_start().chars().next() else { return ev };
                let held = std::mem::take(held);
                self.undecided = None;
                self.mode = if first == '<' { Mode::Calls } else { Mode::Text };
                return self.push(&held);
            }
            _ => {
                let pieces = self.parser.push(text);
                self.pieces(pieces, &mut ev);
            }
        }
        ev
    }

    /// Events that close what is open at the end of the turn; `cut`: the token budget ended it
    /// (the open message is `incomplete`).
    pub fn finish(&mut self, cut: bool) -> Vec<Value> {
        let mut ev = Vec::new();
        if let Some(held) = self.undecided.take() {
            self.text(&held, &mut ev);
        }
        if self.mode == Mode::Calls {
            let pieces = self.parser.finish();
            self.pieces(pieces, &mut ev);
        }
        if self.output.is_empty() {
            // Clients expect an assistant message even when the model wrote nothing.
            self.text("", &mut ev);
        }
        self.close_message(if cut { "incomplete" } else { "completed" }, &mut ev);
        ev
    }

    fn pieces(&mut self, pieces: Vec<Piece>, ev: &mut Vec<Value>) {
        for p in pieces {
            match p {
                Piece::Content(c) => self.text(&c, ev),
                Piece::Start { index, id, name } => {
                    self.close_message("completed", ev);
                    let item = json!({"type": "function_call", "id": new_id("fc"), "call_id": id, "name": name,
                        "arguments": "", "status": "in_progress"});
                    let at = self.output.len();
                    self.output.push(item.clone());
                    if self.calls.len() <= index {
                        self.calls.resize(index + 1, at);
                    }
                    self.calls[index] = at;
                    let e = self.event("response.output_item.added", json!({"output_index": at, "item": item}));
                    ev.push(e);
                }
                Piece::Args { index, fragment } => self.call_done(self.calls[index], &fragment, ev),
            }
        }
    }

    /// The parser hands a call's arguments over once complete: one delta, then done.
    fn call_done(&mut self, at: usize, args: &str, ev: &mut Vec<Value>) {
        let item_id = self.output[at]["id"].clone();
        let e = self.event(
            "response.function_call_arguments.delta",
            json!({"item_id": item_id, "output_index": at, "delta": args}),
        );
        ev.push(e);
        let e = self.event(
            "response.function_call_arguments.done",
            json!({"item_id": item_id, "output_index": at, "arguments": args}),
        );
        ev.push(e);
        self.output[at]["arguments"] = json!(args);
        self.output[at]["status"] = json!("completed");
        let item = self.output[at].clone();
        let e = self.event("response.output_item.done", json!({"output_index": at, "item": item}));
        ev.push(e);
    }

    fn text(&mut self, text: &str, ev: &mut Vec<Value>) {
        let at = match &self.open {
            Some((at, _)) => *at,
            None => {
                let at = self.output.len();
                let id = new_id("msg");
                let item =
                    json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
                self.output.push(item.clone());
                self.open = Some((at, String::new()));
                let e = self.event("response.output_item.added", json!({"output_index": at, "item": item}));
                ev.push(e);
                let part = json!({"type": "output_text", "text": "", "annotations": []});
                let e = self.event(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": at, "content_index": 0, "part": part}),
                );
                ev.push(e);
                at
            }
        };
        if text.is_empty() {
            return;
        }
        if let Some((_, so_far)) = &mut self.open {
            so_far.push_str(text);
        }
        let item_id = self.output[at]["id"].clone();
        let e = self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": at, "content_index": 0, "delta": text, "logprobs": []}),
        );
        ev.push(e);
    }

    fn close_message(&mut self, status: &str, ev: &mut Vec<Value>) {
        let Some((at, text)) = self.open.take() else { return };
        let item_id = self.output[at]["id"].clone();
        let e = self.event(
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": at, "content_index": 0, "text": text, "logprobs": []}),
        );
        ev.push(e);
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        let e = self.event(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": at, "content_index": 0, "part": part}),
        );
        ev.push(e);
        self.output[at]["content"] = json!([part]);
        self.output[at]["status"] = json!(status);
        let item = self.output[at].clone();
        let e = self.event("response.output_item.done", json!({"output_index": at, "item": item}));
        ev.push(e);
    }
}

/// The Responses `usage` object.
pub fn usage(input: usize, output: usize, cached: usize) -> Value {
    json!({
        "input_tokens": input, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

/// The response object at the end of a turn: `shell` (the echoed request fields) with status,
/// output and usage; a cut turn is `incomplete` with the reason.
pub fn finished(shell: &Value, b: &OutputBuilder, finish: Option<FinishReason>, usage: Value) -> Value {
    let mut r = shell.clone();
    let cut = finish == Some(FinishReason::Length);
    r["status"] = json!(if cut { "incomplete" } else { "completed" });
    r["incomplete_details"] = if cut { json!({"reason": "max_output_tokens"}) } else { Value::Null };
    r["output"] = json!(b.output);
    r["usage"] = usage;
    r
}

struct Streaming {
    tracked: Tracked,
    builder: OutputBuilder,
    shell: Value,
    finisher: Option<Finisher>,
    finish: Option<FinishReason>,
    queue: VecDeque<Value>,
    done: bool,
}

/// The SSE response of one turn. The record is stored (and the session parked) when the turn
/// ends, before the terminal event; a client that leaves early drops the stream and the turn.
pub fn stream(tracked: Tracked, mode: Mode, shell: Value, finisher: Finisher) -> Response {
    let mut builder = OutputBuilder::new(mode);
    let mut queue = VecDeque::new();
    queue.push_back(builder.event("response.created", json!({"response": shell})));
    queue.push_back(builder.event("response.in_progress", json!({"response": shell})));
    let st = Streaming { tracked, builder, shell, finisher: Some(finisher), finish: None, queue, done: false };
    let body = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                return Some((sse_event(&ev), st));
            }
            if st.done {
                return None;
            }
            match st.tracked.next().await {
                Some(Ok(d)) => {
                    let evs = st.builder.push(&d.text);
                    st.queue.extend(evs);
                    st.finish = d.finish_reason.or(st.finish);
                }
                Some(Err(e)) => {
                    st.done = true;
                    let mut r = st.shell.clone();
                    r["status"] = json!("failed");
                    r["error"] = json!({"code": "server_error", "message": e.to_string()});
                    let ev = st.builder.event("response.failed", json!({"response": r}));
                    st.queue.push_back(ev);
                }
                None => {
                    st.done = true;
                    st.end().await;
                }
            }
        }
    });
    let body = body.map(Ok::<_, Infallible>);
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

impl Streaming {
    async fn end(&mut self) {
        let evs = self.builder.finish(self.finish == Some(FinishReason::Length));
        self.queue.extend(evs);
        let u = usage(self.tracked.prompt_tokens(), self.tracked.generated, self.tracked.cached_tokens());
        let mut r = finished(&self.shell, &self.builder, self.finish, u);
        if let Some(f) = self.finisher.take() {
            if let Err(e) = f.finish(&r).await {
                r["status"] = json!("failed");
                r["error"] = json!({"code": "server_error", "message": e.message});
            }
        }
        let ty = match r["status"].as_str() {
            Some("incomplete") => "response.incomplete",
            Some("failed") => "response.failed",
            _ => "response.completed",
        };
        let ev = self.builder.event(ty, json!({"response": r}));
        self.queue.push_back(ev);
    }
}

fn sse_event(ev: &Value) -> Event {
    let ty = ev["type"].as_str().unwrap_or("message").to_string();
    Event::default().event(ty).data(ev.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(evs: &[Value]) -> Vec<&str> {
        evs.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn text_events_in_order() {
        let mut b = OutputBuilder::new(Mode::Text);
        let mut evs = b.push("Hel");
        evs.extend(b.push("lo"));
        evs.extend(b.finish(false));
        assert_eq!(
            types(&evs),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
            ]
        );
        let seqs: Vec<u64> = evs.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (0..7).collect::<Vec<_>>());
        assert_eq!(b.output[0]["content"][0]["text"], "Hello");
        assert_eq!(b.output[0]["status"], "completed");
        assert_eq!(evs[4]["text"], "Hello");
    }

    #[test]
    fn calls_become_function_call_items() {
        let mut b = OutputBuilder::new(Mode::Calls);
        let mut evs = b.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>");
        evs.extend(b.finish(false));
        assert_eq!(
            types(&evs),
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        assert_eq!(b.output.len(), 1);
        let call = &b.output[0];
        assert_eq!((call["type"].as_str(), call["name"].as_str()), (Some("function_call"), Some("f")));
        assert_eq!(call["arguments"], "{\"x\": 1}");
        assert!(call["id"].as_str().unwrap().starts_with("fc_"));
        assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    }

    #[test]
    fn text_then_call_closes_the_message_first() {
        let mut b = OutputBuilder::new(Mode::Calls);
        let mut evs = b.push("Let me check.");
        evs.extend(b.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"));
        evs.extend(b.finish(false));
        assert_eq!(
            types(&evs),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        assert_eq!(evs[6]["output_index"], 1);
        assert_eq!(
            (b.output[0]["type"].as_str(), b.output[1]["type"].as_str()),
            (Some("message"), Some("function_call"))
        );
    }

    #[test]
    fn an_answer_is_never_a_call_and_empty_output_is_a_message() {
        let mut b = OutputBuilder::new(Mode::CallsOrAnswer);
        assert!(b.push("  ").is_empty());
        b.push("{\"name\": \"Bob\", \"arguments\": {}}");
        b.finish(false);
        assert_eq!(b.output[0]["type"], "message");
        assert!(b.calls.is_empty());
        let mut b = OutputBuilder::new(Mode::CallsOrAnswer);
        b.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>");
        b.finish(false);
        assert_eq!(b.output[0]["type"], "function_call");
        let mut b = OutputBuilder::new(Mode::Text);
        b.finish(true);
        assert_eq!(b.output[0]["content"][0]["text"], "");
        assert_eq!(b.output[0]["status"], "incomplete");
    }
}
