//! The engine thread: everything it owns ([`Core`]) and its loop. Each step: drain commands ->
//! drop sequences whose caller is gone -> schedule -> run the model (grammar masks beside it) ->
//! register the computed blocks in the prefix cache -> sample -> send events.
//!
//! Owns the sequences (by id), the open sessions' records, the scheduler and the runner. It must
//! not block on anything but the command channel, and never runs caller code (tools, I/O).

use crate::block_hash::{block_hashes, BlockHash};
use crate::engine::{cache_misfit, AddRequest, Command, EngineStats};
use crate::error::EngineError;
use crate::grammar::SeqGrammar;
use crate::params::Priority;
use crate::runner::Runner;
use crate::scheduler::{Scheduler, SchedulerOutput, SeqId};
use crate::sequence::{Group, Seq};
use crate::stream::{Event, FinishReason};
use llguidance::toktrie::SimpleVob;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A grammar's mask for the next token: `None` while it waits for its trigger.
type MaskResult = Result<Option<SimpleVob>, EngineError>;

/// One step's logits rows plus the masks of its constrained sequences.
type StepOutput = (Vec<Vec<f32>>, HashMap<SeqId, MaskResult>);

/// An open session as the engine thread keeps it between turns.
pub(crate) struct SessionRecord {
    /// Every token of the conversation so far (prompts and outputs of its turns).
    pub tokens: Vec<u32>,
    /// A turn is running (its sequence is in `seqs` under the session's id).
    pub busy: bool,
    /// The handle was dropped during a turn: release everything when it ends.
    pub closing: bool,
    pub last_used: Instant,
}

/// What the engine thread is handed at spawn.
pub(crate) struct CoreParts {
    pub runner: Runner,
    pub sched: Scheduler,
    pub eos: Vec<u32>,
    pub max_model_len: usize,
    pub stats: Arc<EngineStats>,
    /// Shared with the handles: the id of the next sequence or session.
    pub ids: Arc<AtomicU64>,
    pub caching: bool,
    pub session_ttl: Duration,
}

/// Everything the engine thread owns.
pub(crate) struct Core {
    pub(crate) p: CoreParts,
    pub(crate) seqs: HashMap<SeqId, Seq>,
    pub(crate) sessions: HashMap<SeqId, SessionRecord>,
    last_expiry: Instant,
}

impl Core {
    pub fn new(p: CoreParts) -> Self {
        Self { p, seqs: HashMap::new(), sessions: HashMap::new(), last_expiry: Instant::now() }
    }

    pub fn run(&mut self, rx: Receiver<Command>) {
        loop {
            if !self.drain(&rx) {
                break;
            }
            self.drop_cancelled();
            self.expire_sessions();
            if self.seqs.is_empty() {
                self.publish(); // idle: make freed blocks visible before blocking on commands
                continue;
            }
            // A bug in one step (an error or a panic) fails the sequences in flight, frees their
            // blocks and keeps the engine serving; it must not take the whole server down.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(panic_message(&panic)),
            };
            if let Some(msg) = failure {
                tracing::error!(error = %msg, "engine step failed; failing its sequences");
                // The failed step's blocks may hold garbage: nothing cached is trusted.
                self.p.sched.step_failed();
                self.fail_all(|| EngineError::Internal(msg.clone()));
            }
        }
        self.fail_all(|| EngineError::Shutdown);
    }

    /// Takes queued commands; blocks only when there is nothing to compute (waking once a
    /// second while sessions are parked, so their TTL can expire). Returns false on shutdown or
    /// when every handle is gone.
    fn drain(&mut self, rx: &Receiver<Command>) -> bool {
        if self.seqs.is_empty() {
            let first = if self.sessions.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(Duration::from_secs(1))
            };
            match first {
                Ok(cmd) => {
                    if !self.command(cmd) {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !self.command(cmd) {
                        return false;
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return !self.seqs.is_empty(),
            }
        }
    }

    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => return false,
            Command::Add(req) => self.add(*req),
            Command::OpenSession(id) => self.open_session(id),
            Command::CloseSession(id) => self.close_session(id),
            Command::ForkSession { parent, children, reply } => {
                let _ = reply.send(self.fork_session(parent, &children));
            }
        }
        true
    }

    /// Admits a request (or a session's turn) as a waiting sequence, or answers it at once with
    /// an error or with an output the grammar forced entirely. Its admission ticket goes with
    /// it: into the sequence, or dropped with the request.
    fn add(&mut self, req: AddRequest) {
        let events = req.events.clone();
        if let Err(e) = self.try_add(req) {
            let _ = events.send(Event::Error(e));
        }
    }

    fn try_add(&mut self, req: AddRequest) -> Result<(), EngineError> {
        let (id, prompt, keep) = match req.session {
            Some(turn) => self.begin_turn(turn, req.prompt)?,
            None => (self.p.ids.fetch_add(1, Ordering::Relaxed), req.prompt, 0),
        };
        let total = match self.turn_length(&prompt, req.params.max_tokens) {
            Ok(total) => total,
            Err(e) => {
                self.end_turn_early(req.session.map(|t| t.id));
                return Err(e);
            }
        };
        let session = req.session.is_some();
        let background = req.params.priority == Priority::Background;
        if session {
            // The stream learns the real prompt (the session's history plus what was appended).
            let tail = prompt[prompt.len().saturating_sub(4)..].to_vec();
            let _ = req.events.send(Event::Prompt { tokens: prompt.len(), tail });
        }
        let group = Group {
            params: req.params,
            events: req.events,
            cancel: req.cancel,
            max_len: total,
            session,
            prefill_only: req.prefill_only,
            span: req.span,
        };
        let mut seq = Seq::new(prompt, Arc::new(group), 0, req.grammar.map(SeqGrammar::new));
        seq.ticket = Some(req.ticket);
        let (forced, finish) = seq.start();
        self.p.stats.forced_tokens.fetch_add(forced as u64, Ordering::Relaxed);
        if let Some(reason) = finish.filter(|_| !req.prefill_only) {
            // The grammar forced the whole output: no model step at all, for any choice.
            for index in 1..=seq.take_pending_forks() {
                seq.fork(index).finish(reason);
            }
            self.seqs.insert(id, seq);
            self.retire(id, Some(reason));
            return Ok(());
        }
        let hashes = self.hashes_of(seq.tokens());
        seq.block_hashes = hashes.clone();
        let len = seq.tokens().len();
        if !(session && self.p.sched.resume(id, len, keep, hashes.clone())) {
            // Whatever stayed parked could not be resumed: it must not shadow the new sequence.
            self.p.sched.release_parked(id);
            match background {
                true => self.p.sched.add_background(id, len, hashes),
                false => self.p.sched.add(id, len, hashes),
            }
        }
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Prompt plus the tokens it may generate, checked against the context and the cache.
    fn turn_length(&self, prompt: &[u32], max_tokens: Option<usize>) -> Result<usize, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidParam { param: "prompt", message: "the prompt is empty".into() });
        }
        let max = self.p.max_model_len;
        let requested = prompt.len().saturating_add(max_tokens.unwrap_or(1));
        if prompt.len() >= max || requested > max {
            return Err(EngineError::ContextLengthExceeded { max, prompt: prompt.len(), requested });
        }
        let total = prompt.len().saturating_add(max_tokens.unwrap_or(usize::MAX)).min(max);
        let capacity = self.p.sched.num_total_blocks() * self.p.sched.block_size();
        match cache_misfit(prompt.len(), total, capacity) {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Chained hashes of `tokens`' full blocks, or none when prefix caching is off.
    fn hashes_of(&self, tokens: &[u32]) -> Vec<BlockHash> {
        if self.p.caching {
            block_hashes(tokens, self.p.sched.block_size())
        } else {
            Vec::new()
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.is_cancelled()).map(|(&id, _)| id).collect();
        for id in gone {
            self.retire(id, None);
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let out = self.p.sched.schedule();
        // A preempted sequence keeps its tokens; the scheduler alone tracks that its KV is gone.
        self.p.stats.preemptions.fetch_add(out.preempted.len() as u64, Ordering::Relaxed);
        let _span = tracing::debug_span!(
            "step",
            seqs = out.seqs.len(),
            tokens = out.num_batched_tokens,
            free_blocks = self.p.sched.num_free_blocks(),
            cached_free_blocks = self.p.sched.num_free_cached_blocks()
        )
        .entered();
        self.p.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.on_admitted(&out.admitted);
        if !out.seqs.is_empty() {
            let (logits, mut masks) = self.forward_and_masks(&out)?;
            self.p.sched.step_done();
            self.p.stats.computed_tokens.fetch_add(out.num_batched_tokens as u64, Ordering::Relaxed);
            let mut rows = logits.into_iter();
            for s in out.seqs.iter().filter(|s| s.needs_logits) {
                let row = rows.next().ok_or_else(|| EngineError::Internal("missing logits row".into()))?;
                match masks.remove(&s.id) {
                    Some(Err(e)) => self.fail(s.id, e),
                    mask => self.on_logits(s.id, row, mask.and_then(Result::ok).flatten()),
                }
            }
        }
        self.publish();
        Ok(())
    }

    /// Newly running requests leave the admission count and learn their cached prompt tokens
    /// (the first admission only: a preempted sequence's recompute is not the request's).
    fn on_admitted(&mut self, admitted: &[(SeqId, usize)]) {
        for &(id, cached) in admitted {
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            if seq.ticket.take().is_some() {
                seq.report_cached(cached);
                tracing::debug!(parent: seq.span(), seq = id, prompt = seq.tokens().len(), cached, "admitted");
            }
        }
    }

    /// Runs the model while a second thread computes the grammar masks of the constrained
    /// sequences that get logits this step: on a GPU the mask is then free; on a CPU it shares
    /// the cores, but only constrained sequences pay anything.
    fn forward_and_masks(&mut self, out: &SchedulerOutput) -> Result<StepOutput, EngineError> {
        let mut lent: Vec<(SeqId, Box<SeqGrammar>)> = out
            .seqs
            .iter()
            .filter(|s| s.needs_logits)
            .filter_map(|s| {
                let seq = self.seqs.get_mut(&s.id)?;
                seq.needs_mask().then(|| seq.take_grammar()).flatten().map(|g| (s.id, g))
            })
            .collect();
        if lent.is_empty() {
            return Ok((self.p.runner.step(out, &self.seqs)?, HashMap::new()));
        }
        let (runner, seqs, stats) = (&mut self.p.runner, &self.seqs, &self.p.stats);
        let (logits, masks) = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let t = std::time::Instant::now();
                let masks = lent.iter_mut().map(|(id, g)| (*id, g.mask())).collect::<HashMap<_, _>>();
                stats.grammar_mask_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                stats.grammar_masks.fetch_add(masks.len() as u64, Ordering::Relaxed);
                masks
            });
            let logits = runner.step(out, seqs);
            (logits, worker.join())
        });
        for (id, g) in lent {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.put_grammar(g);
            }
        }
        let masks = masks.map_err(|p| EngineError::Internal(panic_message(&p)))?;
        Ok((logits?, masks))
    }

    /// Samples the next token of `id` (and of its forks, for `n > 1` right after the prompt).
    /// A prefill-only session turn ends here, its K/V computed, without sampling.
    fn on_logits(&mut self, id: SeqId, row: Vec<f32>, mask: Option<SimpleVob>) {
        if self.seqs.get(&id).is_some_and(|s| s.prefill_only()) {
            self.retire(id, Some(FinishReason::Length));
            return;
        }
        let forks = self.seqs.get_mut(&id).map_or(0, |s| s.take_pending_forks());
        for index in 1..=forks {
            let child = self.p.ids.fetch_add(1, Ordering::Relaxed);
            self.p.sched.fork(id, child);
            let forked = self.seqs[&id].fork(index);
            self.seqs.insert(child, forked);
            self.sample_and_emit(child, row.clone(), mask.as_ref());
        }
        self.sample_and_emit(id, row, mask.as_ref());
    }

    fn sample_and_emit(&mut self, id: SeqId, mut row: Vec<f32>, mask: Option<&SimpleVob>) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        match seq.sample(&mut row, &self.p.eos, mask) {
            Ok(s) => {
                self.p.sched.append_tokens(id, s.appended);
                if self.p.caching {
                    let fresh = seq.extend_hashes(self.p.sched.block_size());
                    self.p.sched.add_hashes(id, fresh);
                }
                self.p.stats.forced_tokens.fetch_add(s.forced as u64, Ordering::Relaxed);
                if let Some(reason) = s.finish {
                    self.retire(id, Some(reason));
                }
            }
            Err(e) => self.fail(id, e),
        }
    }

    /// Takes `id` out of the engine: finished (`reason`) or cancelled (`None`). A session's
    /// turn parks the sequence with its KV; anything else frees its blocks.
    pub(crate) fn retire(&mut self, id: SeqId, reason: Option<FinishReason>) {
        let Some(seq) = self.seqs.remove(&id) else { return };
        if let Some(reason) = reason {
            seq.finish(reason);
        }
        let generated = seq.tokens().len() - seq.prompt_len();
        tracing::debug!(parent: seq.span(), seq = id, generated, reason = ?reason, "sequence ended");
        if seq.is_session() {
            self.end_turn(id, seq.tokens().to_vec());
        } else {
            self.p.sched.finish(id);
        }
    }

    /// Ends one sequence with an error (its caller sees it; everyone else goes on). A session
    /// keeps its previous history; its KV is released (it may be what failed).
    fn fail(&mut self, id: SeqId, e: EngineError) {
        tracing::warn!(seq = id, error = %e, "sequence failed");
        if let Some(seq) = self.seqs.remove(&id) {
            seq.fail(e);
        }
        self.p.sched.finish(id);
        self.end_turn_early(Some(id));
    }

    pub(crate) fn publish(&self) {
        let (s, sched) = (&self.p.stats, &self.p.sched);
        s.running.store(sched.num_running() as u64, Ordering::Relaxed);
        s.waiting.store(sched.num_waiting() as u64, Ordering::Relaxed);
        s.free_blocks.store(sched.num_free_blocks() as u64, Ordering::Relaxed);
        s.free_cached_blocks.store(sched.num_free_cached_blocks() as u64, Ordering::Relaxed);
        let c = sched.cache_counters();
        s.prefix_cache_queries.store(c.queried_tokens, Ordering::Relaxed);
        s.prefix_cache_hits.store(c.hit_tokens, Ordering::Relaxed);
        s.prefix_cache_evictions.store(c.evictions, Ordering::Relaxed);
        s.parked_sessions.store(sched.num_parked() as u64, Ordering::Relaxed);
        s.evicted_sessions.store(sched.evicted_sessions(), Ordering::Relaxed);
    }

    fn fail_all(&mut self, error: impl Fn() -> EngineError) {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.fail(id, error());
        }
        self.publish();
    }

    /// Releases the KV of sessions parked longer than the TTL (checked at most once a second).
    /// Their history stays: the next turn recomputes what the prefix cache no longer holds.
    fn expire_sessions(&mut self) {
        if self.sessions.is_empty() || self.last_expiry.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_expiry = Instant::now();
        let ttl = self.p.session_ttl;
        for (&id, rec) in &self.sessions {
            if !rec.busy && rec.last_used.elapsed() >= ttl && self.p.sched.release_parked(id) {
                tracing::debug!(session = id, "session KV released after its TTL");
            }
        }
    }
}

#[path = "core_sessions.rs"]
mod sessions;

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let text = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    format!("engine step panicked: {}", text.unwrap_or_else(|| "unknown cause".into()))
}
