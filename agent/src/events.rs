//! Live events of runs, for SSE and WebSocket subscribers: one broadcast channel per run that a
//! process is driving. Events are a view; the store's steps are the record (a subscriber that
//! falls behind or connects late reads `steps`).
//!
//! Owns: the per-run channels. Must not: be needed for correctness (nothing waits on a listener).

use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// One event of a run. Serialised with `type` (the SSE event name) beside its fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum RunEvent {
    #[serde(rename = "run.created")]
    Created { run: Value },
    #[serde(rename = "step.started")]
    StepStarted { run_id: String, step: u32 },
    #[serde(rename = "message.delta")]
    MessageDelta { run_id: String, delta: String },
    #[serde(rename = "tool_call")]
    ToolCall { run_id: String, call_id: String, name: String, arguments: String },
    #[serde(rename = "tool_result")]
    ToolResult { run_id: String, call_id: String, name: String, content: String, is_error: bool },
    #[serde(rename = "run.requires_action")]
    RequiresAction { run: Value },
    /// The run ended: `run.completed`, `run.incomplete`, `run.failed` or `run.cancelled`.
    #[serde(rename = "run.ended")]
    Ended { event: String, run: Value },
}

impl RunEvent {
    /// The SSE event name.
    pub fn name(&self) -> &str {
        match self {
            RunEvent::Created { .. } => "run.created",
            RunEvent::StepStarted { .. } => "step.started",
            RunEvent::MessageDelta { .. } => "message.delta",
            RunEvent::ToolCall { .. } => "tool_call",
            RunEvent::ToolResult { .. } => "tool_result",
            RunEvent::RequiresAction { .. } => "run.requires_action",
            RunEvent::Ended { event, .. } => event,
        }
    }

    /// Whether no event of the run follows this one (until it is resumed, for `requires_action`).
    pub fn is_last(&self) -> bool {
        matches!(self, RunEvent::Ended { .. } | RunEvent::RequiresAction { .. })
    }

    /// The event as the JSON object sent to clients (`type` is the event name).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let (RunEvent::Ended { event, .. }, Some(o)) = (self, v.as_object_mut()) {
            o.insert("type".into(), Value::String(event.clone()));
            o.remove("event");
        }
        v
    }
}

/// The channels of the runs this process drives.
#[derive(Default)]
pub struct EventHub {
    channels: Mutex<HashMap<String, broadcast::Sender<RunEvent>>>,
}

impl EventHub {
    /// Subscribes to a run's events (creating its channel, so a subscriber can attach before the
    /// run starts and miss nothing).
    pub fn subscribe(&self, run_id: &str) -> broadcast::Receiver<RunEvent> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(run_id.to_string()).or_insert_with(|| broadcast::channel(1024).0).subscribe()
    }

    pub fn send(&self, run_id: &str, event: RunEvent) {
        let last = event.is_last();
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(run_id) {
            // No receiver is fine: events are a view of the recorded steps.
            let _ = tx.send(event);
        }
        if last {
            map.remove(run_id);
        }
    }
}
