//! The tool loop of one run: model turns in the run's session, calls constrained to the agent's
//! tools, calls of a turn executed concurrently, rules (terminal tools, max calls per turn,
//! approvals), the loop guard, and every step appended to the store before it takes effect, so
//! that a run picked up by another process (or after a restart) goes on from its last step.
//!
//! Owns: the order of a run's steps and its status changes while this process holds its lease.
//! Must not: hold the engine thread (tools and the store run on tokio tasks), or keep state that
//! the steps do not record.

use crate::events::RunEvent;
use crate::history::{call_key, ApprovalStep, CallRecord, History, ModelStep, PriorMessage, ResultStep};
use crate::runtime::{Inner, RunError};
use crate::spec::AgentSpec;
use crate::store::{RunRecord, RunStatus, StepKind};
use crate::tools::{invoke_keyed, Tool};
use crate::turn::{ModelSession, TurnSpec};
use futures_util::future::join_all;
use kiln_inference::chat::{ToolChoice, ToolPlan, ToolSpec};
use kiln_inference::{FinishReason, SamplingParams};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::Instrument;

/// How a run's drive ended in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveEnd {
    /// The run reached this status (terminal or `requires_action`).
    Status(RunStatus),
    /// The lease was lost or the run was cancelled elsewhere: another party owns what follows.
    Released,
}

/// One run being driven: its agent, tools, session and recorded state.
pub(crate) struct Driver {
    rt: Arc<Inner>,
    run: RunRecord,
    spec: AgentSpec,
    tools: HashMap<String, Arc<dyn Tool>>,
    plan: Option<ToolPlan>,
    session: ModelSession,
    history: History,
    cancel: Arc<AtomicBool>,
}

impl Driver {
    pub(crate) async fn new(rt: Arc<Inner>, run: RunRecord, cancel: Arc<AtomicBool>) -> Result<Self, RunError> {
        let spec = rt.agent_of(&run).await?;
        let tools = rt.tools_for(&spec)?;
        let plan = plan(&spec, &tools)?;
        let vars = run.input.get("variables").and_then(Value::as_object).cloned().unwrap_or_default();
        let instructions = spec.render_instructions(&vars)?;
        let input = run.input.get("input").and_then(Value::as_str).unwrap_or_default().to_string();
        let prior = run.input.get("history").cloned().unwrap_or(Value::Array(Vec::new()));
        let prior: Vec<PriorMessage> = serde_json::from_value(prior)?;
        let mut history =
            History::new(&instructions, prior.iter().filter_map(PriorMessage::to_message).collect(), &input);
        history.replay(&rt.store.steps(&run.id).await?);
        let session = ModelSession::new(rt.engine.clone());
        Ok(Self { rt, run, spec, tools, plan, session, history, cancel })
    }

    /// Drives the run until it ends, pauses for approval, or is taken away.
    pub(crate) async fn drive(mut self) -> Result<DriveEnd, RunError> {
        self.set_status(RunStatus::InProgress, None, None).await?;
        loop {
            if self.cancel.load(Ordering::Relaxed) || self.stopped_elsewhere().await? {
                return Ok(DriveEnd::Released);
            }
            // Spans: run (the drive) -> step -> tool_call (in `invoke`).
            let span = tracing::info_span!("step", step = self.history.turns);
            if !self.history.pending.is_empty() {
                if let Some(end) = self.run_pending().instrument(span).await? {
                    return Ok(end);
                }
                continue;
            }
            if self.history.turns >= self.spec.max_steps {
                let out = json!({"reason": "max_steps", "max_steps": self.spec.max_steps});
                return self.finish(RunStatus::Incomplete, Some(out)).await;
            }
            let span = tracing::info_span!("step", step = self.history.turns + 1);
            if let Some(end) = self.model_turn().instrument(span).await? {
                return Ok(end);
            }
        }
    }

    /// One model turn; `Some` when it ends the run.
    async fn model_turn(&mut self) -> Result<Option<DriveEnd>, RunError> {
        let step = self.history.turns + 1;
        self.rt.events.send(&self.run.id, RunEvent::StepStarted { run_id: self.run.id.clone(), step });
        // Tools the loop guard excluded stay in the prompt (the session's history still
        // matches) but not in the grammar; with none left the turn must answer.
        let callable: Vec<String> =
            self.spec.tool_names().into_iter().filter(|n| !self.history.excluded.contains(n)).collect();
        let forced = self.history.force_answer || (self.plan.is_some() && callable.is_empty());
        let mut plan = self.plan.clone();
        // `call_first`: the first turn's grammar allows only calls (the prompt's tools are the
        // same, so the session's history still matches on the next turn).
        if let Some(p) = plan.as_mut().filter(|_| self.spec.tool_rules.call_first && self.history.turns == 0 && !forced)
        {
            p.choice = ToolChoice::Required;
        }
        let params = self.params();
        let run_id = self.run.id.clone();
        let events = self.rt.events.clone();
        let mut on_text =
            |t: &str| events.send(&run_id, RunEvent::MessageDelta { run_id: run_id.clone(), delta: t.into() });
        let answer_schema = self.spec.output_schema.as_ref();
        let messages = &self.history.messages;
        let spec = TurnSpec {
            messages,
            tools: plan.as_ref(),
            callable: &callable,
            answer_schema,
            answer_only: forced,
            params,
        };
        let out = self.session.turn(spec, &mut on_text).await?;
        let mut calls: Vec<CallRecord> = out.calls.iter().map(CallRecord::from).collect();
        // Loop guard: a turn that only repeats answered calls is discarded (recorded, not run);
        // the next may call other tools or must answer. Repeats beside new calls are answered
        // from the earlier results, with a note.
        let repeats_only = !calls.is_empty()
            && !forced
            && calls.iter().all(|c| self.history.answered.contains_key(&call_key(&c.name, &c.arguments)));
        if let Some(max) = self.spec.tool_rules.max_calls_per_step {
            calls.truncate(max.max(1));
        }
        let record = ModelStep {
            content: out.content.clone(),
            calls,
            finish: out.finish.as_str().to_string(),
            discarded: repeats_only,
            prompt_tokens: out.prompt_tokens,
            cached_tokens: out.cached_tokens,
            completion_tokens: out.completion_tokens,
            latency_ms: out.elapsed.as_millis() as u64,
        };
        if repeats_only {
            tracing::info!(run = %self.run.id, "loop guard: the turn only repeated answered calls; asking for the answer");
        }
        self.append(StepKind::ModelOutput, &serde_json::to_value(&record)?, None).await?;
        let st = &self.rt.stats;
        st.steps.fetch_add(1, Ordering::Relaxed);
        st.prefilled_tokens.fetch_add((record.prompt_tokens - record.cached_tokens) as u64, Ordering::Relaxed);
        st.reused_tokens.fetch_add(record.cached_tokens as u64, Ordering::Relaxed);
        st.completion_tokens.fetch_add(record.completion_tokens as u64, Ordering::Relaxed);
        st.model_ms.fetch_add(record.latency_ms, Ordering::Relaxed);
        tracing::info!(
            step,
            prompt_tokens = record.prompt_tokens,
            reused_tokens = record.cached_tokens,
            completion_tokens = record.completion_tokens,
            calls = record.calls.len(),
            latency_ms = record.latency_ms,
            "model step"
        );
        self.history.apply_model(record);
        if repeats_only || !self.history.pending.is_empty() {
            return Ok(None);
        }
        self.final_answer(out.content, out.finish, forced).await
    }

    /// The turn answered without calls: the run's output, or `None` when the answer must be
    /// asked for once more under the output schema.
    async fn final_answer(
        &mut self,
        content: String,
        finish: FinishReason,
        forced: bool,
    ) -> Result<Option<DriveEnd>, RunError> {
        if finish == FinishReason::Length {
            let out = json!({"reason": "max_tokens", "text": content});
            return self.finish(RunStatus::Incomplete, Some(out)).await.map(Some);
        }
        let output = match &self.spec.output_schema {
            None => Value::String(content),
            Some(_) => match serde_json::from_str::<Value>(&content) {
                Ok(v) => v,
                // Free text beside its tools: the next turn may not call tools, so it answers
                // under the schema alone (the free text stays in the conversation).
                Err(_) if self.plan.as_ref().is_some_and(ToolPlan::calls_allowed) && !forced => {
                    self.history.force_answer = true;
                    return Ok(None);
                }
                Err(e) => return self.fail(format!("the final answer is not JSON: {e}")).await.map(Some),
            },
        };
        self.finish(RunStatus::Completed, Some(output)).await.map(Some)
    }

    /// Executes the pending calls (concurrently), unless one needs approval first or is the
    /// client's to run: then the run pauses, listing them (`type` `approval` | `function`).
    async fn run_pending(&mut self) -> Result<Option<DriveEnd>, RunError> {
        let waiting: Vec<Value> = self
            .history
            .pending
            .iter()
            .filter_map(|c| {
                let kind = if self.tools.get(&c.name).is_some_and(|t| t.runs_in_client()) {
                    "function"
                } else if self.spec.tool_rules.requires_approval.contains(&c.name)
                    && !self.history.approvals.contains_key(&c.id)
                {
                    "approval"
                } else {
                    return None;
                };
                Some(json!({"type": kind, "id": c.id, "name": c.name, "arguments": c.arguments}))
            })
            .collect();
        if !waiting.is_empty() {
            let output = json!({"required_action": waiting});
            if let Some(end) = self.set_status(RunStatus::RequiresAction, Some(output), None).await? {
                return Ok(Some(end));
            }
            self.rt.stats.ended(RunStatus::RequiresAction);
            self.rt.events.send(&self.run.id, RunEvent::RequiresAction { run: self.run_json() });
            return Ok(Some(DriveEnd::Status(RunStatus::RequiresAction)));
        }
        let pending = self.history.pending.clone();
        let results = join_all(pending.iter().map(|c| self.execute(c))).await;
        let mut terminal = None;
        for (call, result) in pending.iter().zip(results) {
            let result = result?;
            if self.spec.tool_rules.terminal.contains(&call.name) && !result.is_error {
                terminal = Some(result.content.clone());
            }
            self.history.apply_result(result);
        }
        match terminal {
            Some(content) => {
                let output = serde_json::from_str::<Value>(&content).unwrap_or(Value::String(content));
                self.finish(RunStatus::Completed, Some(output)).await.map(Some)
            }
            None => Ok(None),
        }
    }

    /// One call: recorded, executed (or answered from an earlier identical call, or refused),
    /// its result recorded. A result already recorded (a resumed run) is returned as is.
    async fn execute(&self, call: &CallRecord) -> Result<ResultStep, RunError> {
        let key = format!("result:{}", call.id);
        if let Some(done) = self.rt.store.step_by_key(&self.run.id, &key).await? {
            return Ok(serde_json::from_value(done.data)?);
        }
        let call_json = json!({"call_id": call.id, "name": call.name, "arguments": call.arguments});
        self.append(StepKind::ToolCall, &call_json, Some(&format!("call:{}", call.id))).await?;
        let ev = RunEvent::ToolCall {
            run_id: self.run.id.clone(),
            call_id: call.id.clone(),
            name: call.name.clone(),
            arguments: call.arguments.clone(),
        };
        self.rt.events.send(&self.run.id, ev);
        let result = self.outcome(call).await;
        let ev = RunEvent::ToolResult {
            run_id: self.run.id.clone(),
            call_id: call.id.clone(),
            name: call.name.clone(),
            content: result.content.clone(),
            is_error: result.is_error,
        };
        self.append(StepKind::ToolResult, &serde_json::to_value(&result)?, Some(&key)).await?;
        self.rt.events.send(&self.run.id, ev);
        Ok(result)
    }

    async fn outcome(&self, call: &CallRecord) -> ResultStep {
        let base = |content: String, is_error: bool| ResultStep {
            call_id: call.id.clone(),
            name: call.name.clone(),
            content,
            is_error,
            truncated: false,
            repeated: false,
            latency_ms: 0,
        };
        if let Some(ApprovalStep { approved: false, reason, .. }) = self.history.approvals.get(&call.id) {
            let why = reason.as_deref().unwrap_or("no reason given");
            return base(format!("The user rejected this call ({why}). Do not retry it."), true);
        }
        if let Some(previous) = self.history.answered.get(&call_key(&call.name, &call.arguments)) {
            let note = format!(
                "{previous}\n(You already called {} with these arguments; this is its earlier result. Do not call it \
                 again: go on with the next step, or give the answer.)",
                call.name
            );
            return ResultStep { repeated: true, ..base(note, false) };
        }
        let Some(tool) = self.tools.get(&call.name) else {
            return base(format!("unknown tool {}", call.name), true);
        };
        let args = serde_json::from_str(&call.arguments).unwrap_or(Value::Object(Default::default()));
        let key = format!("{}:{}", self.run.id, call.id);
        let o = invoke_keyed(tool, args, Some(&key), &self.rt.config.call_limits).await;
        let st = &self.rt.stats;
        st.tool_calls.fetch_add(1, Ordering::Relaxed);
        st.tool_errors.fetch_add(u64::from(o.is_error), Ordering::Relaxed);
        st.tool_ms.fetch_add(o.elapsed.as_millis() as u64, Ordering::Relaxed);
        ResultStep { truncated: o.truncated, latency_ms: o.elapsed.as_millis() as u64, ..base(o.content, o.is_error) }
    }

    fn params(&self) -> SamplingParams {
        let mut p = self.rt.config.sampling.clone();
        p.max_tokens = Some(self.spec.max_tokens_per_step as usize);
        if let Some(t) = self.spec.temperature {
            p.temperature = t;
        }
        p
    }

    async fn append(&self, kind: StepKind, data: &Value, key: Option<&str>) -> Result<i64, RunError> {
        Ok(self.rt.store.append_step(&self.run.id, kind, data, key).await?)
    }

    /// Whether the run was cancelled (or finished) by someone else since this drive began.
    async fn stopped_elsewhere(&self) -> Result<bool, RunError> {
        let run = self.rt.store.get_run(&self.run.id).await?;
        Ok(run
            .is_none_or(|r| r.status.is_terminal() || r.lease_owner.as_deref() != Some(self.rt.config.owner.as_str())))
    }

    fn run_json(&self) -> Value {
        serde_json::to_value(&self.run).unwrap_or(Value::Null)
    }

    /// Records a status (with the run's error, for `Failed`); `Some(Released)` when the store
    /// says the run already ended elsewhere.
    async fn set_status(
        &mut self,
        status: RunStatus,
        output: Option<Value>,
        error: Option<String>,
    ) -> Result<Option<DriveEnd>, RunError> {
        let usage = serde_json::to_value(&self.history.usage)?;
        let stored = self.rt.store.set_status(&self.run.id, status, output.clone(), Some(usage.clone()), error.clone());
        match stored.await {
            Ok(()) => {
                self.run.status = status;
                self.run.usage = usage;
                if output.is_some() {
                    self.run.output = output;
                }
                if error.is_some() {
                    self.run.error = error;
                }
                self.append(StepKind::Status, &json!({"status": status.as_str()}), None).await?;
                Ok(None)
            }
            Err(crate::store::StoreError::Conflict(_)) => Ok(Some(DriveEnd::Released)),
            Err(e) => Err(e.into()),
        }
    }

    async fn finish(&mut self, status: RunStatus, output: Option<Value>) -> Result<DriveEnd, RunError> {
        self.end(status, output, None).await
    }

    async fn fail(&mut self, error: String) -> Result<DriveEnd, RunError> {
        self.end(RunStatus::Failed, None, Some(error)).await
    }

    /// Records a terminal status, counts it and tells the run's subscribers.
    async fn end(
        &mut self,
        status: RunStatus,
        output: Option<Value>,
        error: Option<String>,
    ) -> Result<DriveEnd, RunError> {
        if let Some(end) = self.set_status(status, output, error).await? {
            return Ok(end);
        }
        self.rt.stats.ended(status);
        let event = format!("run.{}", status.as_str());
        self.rt.events.send(&self.run.id, RunEvent::Ended { event, run: self.run_json() });
        Ok(DriveEnd::Status(status))
    }
}

/// The agent's tools as a plan the grammar constrains calls to; `None` for an agent without
/// tools. One call per turn when the rules allow only one.
fn plan(spec: &AgentSpec, tools: &HashMap<String, Arc<dyn Tool>>) -> Result<Option<ToolPlan>, RunError> {
    let names = spec.tool_names();
    if names.is_empty() {
        return Ok(None);
    }
    let specs = names
        .iter()
        .filter_map(|n| tools.get(n))
        .map(|t| {
            let d = t.def();
            ToolSpec::new(&d.name, Some(d.description.as_str()).filter(|s| !s.is_empty()), Some(d.parameters.clone()))
        })
        .collect();
    let parallel = spec.tool_rules.max_calls_per_step.is_none_or(|m| m > 1);
    ToolPlan::new(specs, ToolChoice::Auto, Some(parallel)).map(Some).map_err(|e| RunError::Invalid(e.param, e.message))
}
