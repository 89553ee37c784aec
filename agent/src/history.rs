//! A run's state, rebuilt from its recorded steps: the conversation so far, the calls still
//! waiting for results, the answers already given (the loop guard's memory), approvals and usage.
//! The store's steps are the only truth: a run resumed in another process rebuilds exactly this.
//!
//! Owns: the step payloads' shapes (`ModelStep`, `ResultStep`, ...) and the replay. Must not:
//! touch the engine, tools or store.

use crate::store::{StepKind, StepRecord};
use kiln_inference::chat::{Message, Role, ToolCall};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

/// A model turn as recorded. `discarded`: the loop guard dropped it (it only repeated answered
/// calls), so it is not part of the conversation and the next turn must answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStep {
    pub content: String,
    pub calls: Vec<CallRecord>,
    pub finish: String,
    #[serde(default)]
    pub discarded: bool,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl From<&ToolCall> for CallRecord {
    fn from(c: &ToolCall) -> Self {
        Self { id: c.id.clone(), name: c.name.clone(), arguments: c.arguments.clone() }
    }
}

impl CallRecord {
    pub fn to_call(&self) -> ToolCall {
        ToolCall { id: self.id.clone(), name: self.name.clone(), arguments: self.arguments.clone() }
    }
}

/// A message of the conversation a run continues, as stored in the run's input (`history`):
/// a run started from a Responses API chain carries the turns before its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<CallRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl From<&Message> for PriorMessage {
    fn from(m: &Message) -> Self {
        Self {
            role: m.role.as_str().to_string(),
            content: m.content.clone(),
            tool_calls: m.tool_calls.iter().map(CallRecord::from).collect(),
            tool_call_id: m.tool_call_id.clone(),
        }
    }
}

impl PriorMessage {
    /// The message; `None` for a role this kiln does not know (a newer kiln's record).
    pub fn to_message(&self) -> Option<Message> {
        let role = match self.role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        };
        Some(Message {
            role,
            content: self.content.clone(),
            tool_calls: self.tool_calls.iter().map(CallRecord::to_call).collect(),
            tool_call_id: self.tool_call_id.clone(),
            name: None,
        })
    }
}

/// A tool call's result as recorded (idempotency key `result:{call_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultStep {
    pub call_id: String,
    pub name: String,
    pub content: String,
    pub is_error: bool,
    #[serde(default)]
    pub truncated: bool,
    /// Not executed: the same call was answered before in this run (loop guard).
    #[serde(default)]
    pub repeated: bool,
    pub latency_ms: u64,
}

/// A decision on a call that needs approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalStep {
    pub call_id: String,
    pub approved: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Per-run totals, stored as the run's `usage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub steps: u32,
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V was reused (session or prefix cache) rather than prefilled.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub tool_calls: u32,
    pub model_ms: u64,
    pub tool_ms: u64,
}

/// The state a run's steps describe.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub messages: Vec<Message>,
    /// Model turns taken (discarded ones count: they cost a turn).
    pub turns: u32,
    /// Calls of the last model turn without a result yet, in order.
    pub pending: Vec<CallRecord>,
    /// `name + canonical arguments` -> result, for calls answered in this run.
    pub answered: HashMap<String, String>,
    pub approvals: HashMap<String, ApprovalStep>,
    /// The next turn must answer without calls (after a free-text answer the output schema
    /// rejected).
    pub force_answer: bool,
    /// Tools the next turn may not call: the loop guard discarded a turn that only repeated
    /// answered calls of these.
    pub excluded: Vec<String>,
    /// The last non-discarded model turn, if the run has one.
    pub last_model: Option<ModelStep>,
    pub usage: Usage,
}

impl History {
    /// Starts from the instructions, the conversation before the run (if it continues one) and
    /// the user's input.
    pub fn new(instructions: &str, prior: Vec<Message>, input: &str) -> Self {
        let mut messages = Vec::new();
        if !instructions.trim().is_empty() {
            messages.push(Message::new(Role::System, instructions));
        }
        messages.extend(prior);
        messages.push(Message::new(Role::User, input));
        Self { messages, ..Self::default() }
    }

    /// Replays recorded steps. Steps whose payload does not parse are skipped with a warning
    /// (a newer kiln's step kinds must not stop an older one from resuming what it understands).
    pub fn replay(&mut self, steps: &[StepRecord]) {
        for s in steps {
            match s.kind {
                StepKind::ModelOutput => match serde_json::from_value::<ModelStep>(s.data.clone()) {
                    Ok(m) => self.apply_model(m),
                    Err(e) => tracing::warn!(run = %s.run_id, seq = s.seq, error = %e, "unreadable model step"),
                },
                StepKind::ToolResult => match serde_json::from_value::<ResultStep>(s.data.clone()) {
                    Ok(r) => self.apply_result(r),
                    Err(e) => tracing::warn!(run = %s.run_id, seq = s.seq, error = %e, "unreadable result step"),
                },
                StepKind::Approval => {
                    if let Ok(a) = serde_json::from_value::<ApprovalStep>(s.data.clone()) {
                        self.approvals.insert(a.call_id.clone(), a);
                    }
                }
                StepKind::ToolCall | StepKind::Status => {}
            }
        }
    }

    pub fn apply_model(&mut self, m: ModelStep) {
        self.turns += 1;
        let u = &mut self.usage;
        u.steps += 1;
        u.prompt_tokens += m.prompt_tokens;
        u.cached_tokens += m.cached_tokens;
        u.completion_tokens += m.completion_tokens;
        u.total_tokens = u.prompt_tokens + u.completion_tokens;
        u.model_ms += m.latency_ms;
        if m.discarded {
            self.excluded.extend(m.calls.iter().map(|c| c.name.clone()));
            return;
        }
        self.force_answer = false;
        self.excluded.clear();
        let calls = m.calls.iter().map(CallRecord::to_call).collect();
        self.messages.push(Message::assistant_calls(m.content.clone(), calls));
        self.pending = m.calls.clone();
        self.last_model = Some(m);
    }

    pub fn apply_result(&mut self, r: ResultStep) {
        let Some(at) = self.pending.iter().position(|c| c.id == r.call_id) else { return };
        let call = self.pending.remove(at);
        self.usage.tool_calls += u32::from(!r.repeated);
        self.usage.tool_ms += r.latency_ms;
        // A failed call is answered too: the same call would fail the same way.
        if !r.repeated {
            self.answered.insert(call_key(&call.name, &call.arguments), r.content.clone());
        }
        self.messages.push(Message::tool_result(&r.call_id, r.content));
    }
}

/// What makes two calls "the same": the name and the arguments with object keys sorted (the
/// model may write them in another order).
pub fn call_key(name: &str, arguments: &str) -> String {
    let canon = serde_json::from_str::<Value>(arguments).map(canonical).map(|v| v.to_string());
    format!("{name}\u{0}{}", canon.unwrap_or_else(|_| arguments.trim().to_string()))
}

fn canonical(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(seq: i64, kind: StepKind, data: Value) -> StepRecord {
        StepRecord { run_id: "r".into(), seq, kind, data, idempotency_key: None, created_at: 0 }
    }

    #[test]
    fn replay_rebuilds_the_conversation_and_the_guard() {
        let call = json!({"id": "c1", "name": "calc", "arguments": "{\"b\": 1, \"a\": 2}"});
        let model = json!({"content": "", "calls": [call], "finish": "tool_calls", "prompt_tokens": 10,
            "cached_tokens": 0, "completion_tokens": 5, "latency_ms": 7});
        let result = json!({"call_id": "c1", "name": "calc", "content": "3", "is_error": false, "latency_ms": 2});
        let mut h = History::new("Be exact.", Vec::new(), "1+2?");
        h.replay(&[step(0, StepKind::ModelOutput, model.clone())]);
        assert_eq!(h.pending.len(), 1);
        h.replay(&[step(1, StepKind::ToolResult, result)]);
        assert!(h.pending.is_empty());
        assert_eq!(h.messages.len(), 4);
        assert_eq!(h.messages[3].role, Role::Tool);
        assert!(h.answered.contains_key(&call_key("calc", "{\"a\":2,\"b\":1}")));
        let mut discarded = model;
        discarded["discarded"] = json!(true);
        h.replay(&[step(2, StepKind::ModelOutput, discarded)]);
        assert_eq!(h.excluded, vec!["calc".to_string()]);
        assert_eq!((h.turns, h.messages.len(), h.usage.prompt_tokens), (2, 4, 20));
    }
}
