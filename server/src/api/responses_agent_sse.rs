//! Streaming a Responses API turn that the agent layer runs (`responses_agent.rs`):
//! `response.created`, `response.in_progress`, then each output item as soon as the run's steps
//! complete it (`response.output_item.added` ... `response.output_item.done`; a message's text
//! arrives as one `response.output_text.delta` when its model step is recorded, an `mcp_call` with
//! `response.mcp_call.completed` | `.failed`, a `file_search_call` with
//! `response.file_search_call.in_progress`, `.searching`, `.completed`), and one terminal event carrying the stored response
//! (`response.completed` | `response.incomplete` | `response.failed`), every event with a rising
//! `sequence_number`. The terminal response's `output` is exactly the items sent, in order.
//! Must not: decide what the items are (`responses_agent.rs` does) or drive the run.

use super::responses_agent::Turn;
use super::responses_sse::{Mode, OutputBuilder};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use kiln_agent::RunEvent;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast;

struct Streaming {
    turn: Turn,
    rx: broadcast::Receiver<RunEvent>,
    /// Used for its sequence numbers only.
    seq: OutputBuilder,
    /// How many output items were sent.
    sent: usize,
    queue: VecDeque<Value>,
    done: bool,
}

pub fn stream(turn: Turn, rx: broadcast::Receiver<RunEvent>) -> Response {
    let mut seq = OutputBuilder::new(Mode::Text);
    let mut queue = VecDeque::new();
    queue.push_back(seq.event("response.created", json!({"response": turn.shell})));
    queue.push_back(seq.event("response.in_progress", json!({"response": turn.shell})));
    let st = Streaming { turn, rx, seq, sent: 0, queue, done: false };
    let body = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                let ty = ev["type"].as_str().unwrap_or("message").to_string();
                return Some((Event::default().event(ty).data(ev.to_string()), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Ok(RunEvent::MessageDelta { .. }) => {}
                Ok(ev) if ev.is_last() => st.end().await,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => st.refresh().await,
                // The run was taken over by another process, or ended: its record says how.
                Err(broadcast::error::RecvError::Closed) => st.end().await,
            }
        }
    });
    let body = body.map(Ok::<_, Infallible>);
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

impl Streaming {
    /// Sends the items the steps recorded since the last look completed.
    async fn refresh(&mut self) {
        // A store error here is not the stream's end: the terminal event reports the run.
        if let Ok(items) = self.turn.items_so_far().await {
            self.send(&items);
        }
    }

    fn send(&mut self, items: &[Value]) {
        for (at, item) in items.iter().enumerate().skip(self.sent) {
            let evs = item_events(&mut self.seq, at, item);
            self.queue.extend(evs);
        }
        self.sent = self.sent.max(items.len());
    }

    async fn end(&mut self) {
        self.done = true;
        let ev = match self.turn.finish().await {
            Ok(r) => {
                self.send(r["output"].as_array().map_or(&[][..], Vec::as_slice));
                let ty = match r["status"].as_str() {
                    Some("completed") => "response.completed",
                    Some("incomplete") => "response.incomplete",
                    _ => "response.failed",
                };
                self.seq.event(ty, json!({"response": r}))
            }
            Err(e) => {
                let mut r = self.turn.shell.clone();
                r["status"] = json!("failed");
                r["error"] = json!({"code": "server_error", "message": e.message});
                self.seq.event("response.failed", json!({"response": r}))
            }
        };
        self.queue.push_back(ev);
    }
}

/// The events that add one complete item at `output_index` `at`.
fn item_events(b: &mut OutputBuilder, at: usize, item: &Value) -> Vec<Value> {
    let id = item["id"].clone();
    let mut start = item.clone();
    start["status"] = json!("in_progress");
    let mut ev = Vec::new();
    if item["type"] == "message" {
        start["content"] = json!([]);
        ev.push(b.event("response.output_item.added", json!({"output_index": at, "item": start})));
        let part = item["content"][0].clone();
        let text = part["text"].clone();
        let empty = json!({"type": "output_text", "text": "", "annotations": []});
        let at_part = json!({"item_id": id, "output_index": at, "content_index": 0});
        let with = |k: &str, v: &Value| {
            let mut o = at_part.clone();
            o[k] = v.clone();
            o
        };
        ev.push(b.event("response.content_part.added", with("part", &empty)));
        let mut delta = with("delta", &text);
        delta["logprobs"] = json!([]);
        ev.push(b.event("response.output_text.delta", delta));
        let mut done = with("text", &text);
        done["logprobs"] = json!([]);
        ev.push(b.event("response.output_text.done", done));
        ev.push(b.event("response.content_part.done", with("part", &part)));
    } else {
        ev.push(b.event("response.output_item.added", json!({"output_index": at, "item": start})));
        if item["type"] == "mcp_call" {
            let ty = if item["error"].is_null() { "response.mcp_call.completed" } else { "response.mcp_call.failed" };
            ev.push(b.event(ty, json!({"item_id": id, "output_index": at})));
        }
        if item["type"] == "file_search_call" {
            // OpenAI's sequence for a hosted search; the item is sent once its search is done.
            for ty in ["in_progress", "searching", "completed"] {
                let ev_type = format!("response.file_search_call.{ty}");
                ev.push(b.event(&ev_type, json!({"item_id": id, "output_index": at})));
            }
        }
    }
    ev.push(b.event("response.output_item.done", json!({"output_index": at, "item": item})));
    ev
}
