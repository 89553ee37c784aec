//! The engine: one owner thread that holds every sequence, the scheduler, the block manager and
//! the runner, and a cloneable [`EngineHandle`] that is the only way in. Each step: drain
//! commands -> drop sequences whose caller is gone -> schedule -> run the model -> sample ->
//! send events. No locks around engine parts, no globals.

use crate::error::EngineError;
use crate::grammar::{CacheUsage, Compiled, GrammarCompiler, GrammarLimits, SeqGrammar};
use crate::params::SamplingParams;
use crate::runner::Runner;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput, SeqId};
use crate::sequence::{Group, Seq};
use crate::stream::{Event, StreamSetup, TokenStream};
use crate::tokenizer::Tokenizer;
use llguidance::toktrie::SimpleVob;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Engine limits; `server` builds it from flags / env / TOML and passes it down.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoding at once.
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks + decodes).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV cache size in bytes.
    pub kv_cache_memory: usize,
    pub kv_dtype: kiln_models::KvDType,
    /// Pending commands before `generate` fails fast with `Overloaded`.
    pub queue_capacity: usize,
    /// Cap on prompt + generated tokens (defaults to the model's context length).
    pub max_model_len: Option<usize>,
    /// Exact number of KV blocks, ignoring `kv_cache_memory` (tests, experiments).
    pub num_blocks_override: Option<usize>,
    /// Round k-quant matmuls as llama.cpp's CPU backend does for each step's batch size
    /// (reproduces its outputs bit for bit, e.g. against reference files), at the price of
    /// batch invariance: a sequence's numbers then depend on what shares its steps.
    pub llama_cpp_batch_arithmetic: bool,
    /// Bounds on constrained-decoding grammars (size, compile time, cache bytes).
    pub grammar: GrammarLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            block_size: 16,
            kv_cache_memory: 1 << 30,
            kv_dtype: kiln_models::KvDType::F16,
            queue_capacity: 1024,
            max_model_len: None,
            num_blocks_override: None,
            llama_cpp_batch_arithmetic: false,
            grammar: GrammarLimits::default(),
        }
    }
}

/// What a caller sees of the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// Counters the engine publishes for metrics; read without locks.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub free_blocks: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Grammar masks computed, and the time they took (on the mask thread).
    pub grammar_masks: AtomicU64,
    pub grammar_mask_ns: AtomicU64,
    /// Tokens appended because a grammar forced them (no sampling, no step of their own).
    pub forced_tokens: AtomicU64,
}

pub(crate) struct AddRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub grammar: Option<Compiled>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub cancel: Arc<[AtomicBool]>,
}

pub(crate) enum Command {
    Add(Box<AddRequest>),
    Shutdown,
}

/// Cheap to clone; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    tokenizer: Arc<Tokenizer>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    grammars: Arc<GrammarCompiler>,
}

/// Which text a prompt is.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text; special-token text is parsed (chat templates render them).
    Text(String),
    /// Already tokenized.
    Tokens(Vec<u32>),
}

impl EngineHandle {
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// What the cache of compiled grammars holds (entries, estimated bytes, bound).
    pub fn grammar_cache_usage(&self) -> CacheUsage {
        self.grammars.cache_usage()
    }

    /// Tokenizes and compiles its grammar (on a compile thread; the caller waits), validates and submits a
    /// request. Fails fast with `Overloaded` when the command queue is full.
    pub fn generate(&self, prompt: Prompt, params: SamplingParams) -> Result<TokenStream, EngineError> {
        let ids = match prompt {
            Prompt::Text(t) => self.tokenizer.encode_prompt(&t, true)?,
            Prompt::Tokens(ids) => ids,
        };
        self.check(&ids, &params)?;
        let grammar = params.constraint.as_ref().map(|c| self.grammars.compile(c)).transpose()?;
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        let cancel: Arc<[AtomicBool]> = (0..params.n).map(|_| AtomicBool::new(false)).collect();
        let tail_start = ids.len().saturating_sub(4);
        let setup = StreamSetup {
            n: params.n,
            stop: params.stop.clone(),
            prompt_tail: ids[tail_start..].to_vec(),
            prompt_tokens: ids.len(),
            cancel: cancel.clone(),
        };
        let add = AddRequest { prompt: ids, params, grammar, events: etx, cancel };
        match self.tx.try_send(Command::Add(Box::new(add))) {
            Ok(()) => Ok(TokenStream::new(erx, self.tokenizer.clone(), setup)),
            Err(TrySendError::Full(_)) => Err(EngineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Shutdown),
        }
    }

    fn check(&self, ids: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        params.validate(self.info.vocab_size)?;
        if ids.is_empty() {
            return Err(EngineError::InvalidParam { param: "prompt", message: "the prompt is empty".into() });
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(EngineError::InvalidParam {
                param: "prompt",
                message: format!("token id {bad} is outside the vocabulary"),
            });
        }
        let max = self.info.max_model_len;
        let requested = ids.len() + params.max_tokens.unwrap_or(1);
        if ids.len() >= max || requested > max {
            return Err(EngineError::ContextLengthExceeded { max, prompt: ids.len(), requested });
        }
        Ok(())
    }

    /// Asks the engine thread to stop; in-flight streams end with `Shutdown`.
    pub fn shutdown(&self) {
        let _ = self.tx.try_send(Command::Shutdown);
    }
}

/// Starts the engine thread. The model and cache move into it and never come back out.
pub fn spawn(
    runner: Runner,
    tokenizer: Tokenizer,
    cfg: &EngineConfig,
) -> Result<(EngineHandle, JoinHandle<()>), EngineError> {
    let model_len = runner.config().max_position_embeddings;
    let max_model_len = cfg.max_model_len.map_or(model_len, |m| m.min(model_len));
    let info = ModelInfo {
        max_model_len,
        vocab_size: runner.config().vocab_size,
        num_blocks: runner.num_blocks(),
        block_size: cfg.block_size,
    };
    let sched_cfg = SchedulerConfig {
        max_num_seqs: cfg.max_num_seqs,
        max_num_batched_tokens: cfg.max_num_batched_tokens,
        num_blocks: runner.num_blocks(),
        block_size: cfg.block_size,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_capacity);
    let grammars = Arc::new(GrammarCompiler::new(tokenizer.clone(), info.vocab_size, cfg.grammar.clone()));
    let tokenizer = Arc::new(tokenizer);
    let stats = Arc::new(EngineStats::default());
    let mut core = Core {
        runner,
        sched: Scheduler::new(sched_cfg),
        seqs: HashMap::new(),
        next_id: 0,
        eos: tokenizer.eos_ids.clone(),
        max_model_len,
        stats: stats.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || core.run(rx))
        .map_err(|e| EngineError::Internal(format!("cannot start engine thread: {e}")))?;
    Ok((EngineHandle { tx, tokenizer, info: Arc::new(info), stats, grammars }, thread))
}

/// A grammar's mask for the next token: `None` while it waits for its trigger.
type MaskResult = Result<Option<SimpleVob>, EngineError>;

/// One step's logits rows plus the masks of its constrained sequences.
type StepOutput = (Vec<Vec<f32>>, HashMap<SeqId, MaskResult>);

/// Everything the engine thread owns.
struct Core {
    runner: Runner,
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    next_id: SeqId,
    eos: Vec<u32>,
    max_model_len: usize,
    stats: Arc<EngineStats>,
}

impl Core {
    fn run(&mut self, rx: Receiver<Command>) {
        loop {
            if !self.drain(&rx) {
                break;
            }
            self.drop_cancelled();
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
                self.fail_all(|| EngineError::Internal(msg.clone()));
            }
        }
        self.fail_all(|| EngineError::Shutdown);
    }

    /// Takes queued commands; blocks only when there is nothing to compute. Returns false on
    /// shutdown or when every handle is gone.
    fn drain(&mut self, rx: &Receiver<Command>) -> bool {
        if self.seqs.is_empty() {
            match rx.recv() {
                Ok(cmd) => {
                    if !self.command(cmd) {
                        return false;
                    }
                }
                Err(_) => return false,
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
            Command::Shutdown => false,
            Command::Add(req) => {
                self.add(*req);
                true
            }
        }
    }

    fn add(&mut self, req: AddRequest) {
        let total =
            (req.prompt.len() + req.params.max_tokens.unwrap_or(usize::MAX - req.prompt.len())).min(self.max_model_len);
        if !self.sched.fits(total) {
            let _ = req.events.send(Event::Error(EngineError::ContextLengthExceeded {
                max: self.sched.num_total_blocks() * self.runner.block_size(),
                prompt: req.prompt.len(),
                requested: total,
            }));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let group = Arc::new(Group { params: req.params, events: req.events, cancel: req.cancel, max_len: total });
        let mut seq = Seq::new(req.prompt, group, 0, req.grammar.map(SeqGrammar::new));
        let (forced, finish) = seq.start();
        self.stats.forced_tokens.fetch_add(forced as u64, Ordering::Relaxed);
        if let Some(reason) = finish {
            // The grammar forced the whole output: no model step at all, for any choice.
            for index in 1..=seq.take_pending_forks() {
                seq.fork(index).finish(reason);
            }
            seq.finish(reason);
            return;
        }
        self.sched.add(id, seq.tokens().len(), seq.choices());
        self.seqs.insert(id, seq);
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.is_cancelled()).map(|(&id, _)| id).collect();
        for id in gone {
            self.sched.finish(id);
            self.seqs.remove(&id);
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let out = self.sched.schedule();
        // A preempted sequence keeps its tokens; the scheduler alone tracks that its KV is gone.
        self.stats.preemptions.fetch_add(out.preempted.len() as u64, Ordering::Relaxed);
        let _span = tracing::debug_span!("step", seqs = out.seqs.len(), tokens = out.num_batched_tokens).entered();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if !out.seqs.is_empty() {
            let (logits, mut masks) = self.forward_and_masks(&out)?;
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
            return Ok((self.runner.step(out, &self.seqs)?, HashMap::new()));
        }
        let (runner, seqs, stats) = (&mut self.runner, &self.seqs, &self.stats);
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
    fn on_logits(&mut self, id: SeqId, row: Vec<f32>, mask: Option<SimpleVob>) {
        let forks = self.seqs.get_mut(&id).map_or(0, |s| s.take_pending_forks());
        for index in 1..=forks {
            let child = self.next_id;
            self.next_id += 1;
            self.sched.fork(id, child);
            let forked = self.seqs[&id].fork(index);
            self.seqs.insert(child, forked);
            self.sample_and_emit(child, row.clone(), mask.as_ref());
        }
        self.sample_and_emit(id, row, mask.as_ref());
    }

    fn sample_and_emit(&mut self, id: SeqId, mut row: Vec<f32>, mask: Option<&SimpleVob>) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        match seq.sample(&mut row, &self.eos, mask) {
            Ok(s) => {
                self.sched.append_tokens(id, s.appended);
                self.stats.forced_tokens.fetch_add(s.forced as u64, Ordering::Relaxed);
                if let Some(reason) = s.finish {
                    seq.finish(reason);
                    self.sched.finish(id);
                    self.seqs.remove(&id);
                }
            }
            Err(e) => self.fail(id, e),
        }
    }

    /// Ends one sequence with an error (its caller sees it; everyone else goes on).
    fn fail(&mut self, id: SeqId, e: EngineError) {
        tracing::warn!(seq = id, error = %e, "sequence failed");
        if let Some(seq) = self.seqs.remove(&id) {
            seq.fail(e);
        }
        self.sched.finish(id);
    }

    fn publish(&self) {
        let s = &self.stats;
        s.running.store(self.sched.num_running() as u64, Ordering::Relaxed);
        s.waiting.store(self.sched.num_waiting() as u64, Ordering::Relaxed);
        s.free_blocks.store(self.sched.num_free_blocks() as u64, Ordering::Relaxed);
    }

    fn fail_all(&mut self, error: impl Fn() -> EngineError) {
        for (id, seq) in self.seqs.drain() {
            self.sched.finish(id);
            seq.fail(error());
        }
        self.publish();
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let text = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    format!("engine step panicked: {}", text.unwrap_or_else(|| "unknown cause".into()))
}
