//! The engine's public face: its configuration and counters, and the cloneable [`EngineHandle`]
//! that is the only way in (requests, sessions). One owner thread (`core.rs`) holds every
//! sequence, the scheduler, the block manager and the runner; the handle talks to it over a
//! bounded command channel. No locks around engine parts, no globals.
//!
//! Must not: compute on the engine's state from the caller's thread (it only validates,
//! tokenizes, compiles grammars and sends commands).

use crate::admission::{Admission, Ticket};
use crate::core::{Core, CoreParts};
use crate::error::EngineError;
use crate::grammar::{CacheUsage, Compiled, GrammarCompiler, GrammarLimits};
use crate::params::SamplingParams;
use crate::runner::Runner;
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId};
use crate::stream::{Event, StreamSetup, TokenStream};
use crate::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use crate::admission::Waiting;

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
    /// Requests accepted but not yet running; one more fails at once with `Overloaded` (HTTP
    /// 429), so queueing delay stays bounded instead of growing with the backlog.
    pub max_waiting_seqs: usize,
    /// Prompt tokens of requests accepted but not yet running: a request that would push them
    /// past this while others wait fails at once with `Overloaded`; one whose prompts alone
    /// exceed it, with `NeverFits`. `None`: [`default_max_waiting_tokens`].
    pub max_waiting_tokens: Option<usize>,
    /// Reuse the K/V of full blocks whose token prefix was computed before (on by default).
    pub enable_prefix_caching: bool,
    /// Most prompt tokens one sequence computes per step while others wait or prefill (so a
    /// short request's first token never waits for someone else's whole prompt); 0: no cap.
    pub long_prefill_token_threshold: usize,
    /// A parked session's K/V is released after this long unused (its history stays).
    pub session_ttl: Duration,
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
            max_waiting_seqs: 256,
            max_waiting_tokens: None,
            enable_prefix_caching: true,
            long_prefill_token_threshold: 128,
            session_ttl: Duration::from_secs(600),
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
    /// Free blocks that still hold cached prefixes (evictable; counted in `free_blocks` too).
    pub free_cached_blocks: AtomicU64,
    /// Prefix cache, cumulative: prompt tokens looked up, of those found cached, and cached
    /// blocks evicted to be reused.
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub prefix_cache_evictions: AtomicU64,
    /// Tokens computed by the model (prefill chunks and decodes), cumulative.
    pub computed_tokens: AtomicU64,
    /// Requests refused at once (`Overloaded`) because too many requests or prompt tokens were
    /// already waiting.
    pub rejected_requests: AtomicU64,
    /// Prompt tokens of requests accepted and not yet running (what admission control bounds).
    pub waiting_tokens: AtomicU64,
    /// Parked sessions (holding KV between turns) and those evicted for room, cumulative.
    pub parked_sessions: AtomicU64,
    pub evicted_sessions: AtomicU64,
    /// Grammar masks computed, and the time they took (on the mask thread).
    pub grammar_masks: AtomicU64,
    pub grammar_mask_ns: AtomicU64,
    /// Tokens appended because a grammar forced them (no sampling, no step of their own).
    pub forced_tokens: AtomicU64,
}

/// Which session a request is a turn of, and how its tokens relate to the session's history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionTurn {
    pub id: SeqId,
    /// The tokens are the whole conversation (else they are appended to the history).
    pub replace: bool,
}

pub(crate) struct AddRequest {
    /// Keeps the request counted as waiting until it first runs (or is dropped, wherever).
    pub ticket: Ticket,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub grammar: Option<Compiled>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub cancel: Arc<[AtomicBool]>,
    pub session: Option<SessionTurn>,
    /// Compute the prompt's K/V and park the session, sampling nothing.
    pub prefill_only: bool,
    /// The caller's span (e.g. the HTTP request's, with its id): the engine's log lines about
    /// this request are its children.
    pub span: tracing::Span,
}

pub(crate) enum Command {
    Add(Box<AddRequest>),
    OpenSession(SeqId),
    CloseSession(SeqId),
    ForkSession { parent: SeqId, children: Vec<SeqId>, reply: tokio::sync::oneshot::Sender<Result<(), EngineError>> },
    Shutdown,
}

/// Cheap to clone; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) tx: SyncSender<Command>,
    tokenizer: Arc<Tokenizer>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    grammars: Arc<GrammarCompiler>,
    /// Ids of sequences and sessions, shared with the engine thread.
    pub(crate) ids: Arc<AtomicU64>,
    /// What waits, and its bounds (tickets travel with the requests to the engine thread).
    admission: Arc<Admission>,
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

    /// Requests that may wait for a running slot at once (`--max-waiting-seqs`).
    pub fn max_waiting_seqs(&self) -> usize {
        self.admission.max_requests()
    }

    /// Prompt tokens that may wait at once (`--max-waiting-tokens`).
    pub fn max_waiting_tokens(&self) -> usize {
        self.admission.max_tokens()
    }

    /// Requests accepted and not yet running, and their prompt tokens.
    pub fn waiting(&self) -> Waiting {
        self.admission.waiting()
    }

    /// What the cache of compiled grammars holds (entries, estimated bytes, bound).
    pub fn grammar_cache_usage(&self) -> CacheUsage {
        self.grammars.cache_usage()
    }

    /// Tokenizes and compiles its grammar (on a compile thread; the caller waits), validates and
    /// submits a request. Fails fast with `Overloaded` when too many requests or prompt tokens
    /// are already waiting (or the command queue is full), and with `NeverFits` when the request
    /// could never be served, however long it waited.
    pub fn generate(&self, prompt: Prompt, params: SamplingParams) -> Result<TokenStream, EngineError> {
        Ok(self.generate_many(vec![prompt], params)?.remove(0))
    }

    /// [`generate`](Self::generate) for several prompts with the same parameters (one
    /// `/v1/completions` request): admitted all together or not at all, each its own request.
    pub fn generate_many(&self, prompts: Vec<Prompt>, params: SamplingParams) -> Result<Vec<TokenStream>, EngineError> {
        let mut all = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let ids = match prompt {
                Prompt::Text(t) => self.tokenizer.encode_prompt(&t, true)?,
                Prompt::Tokens(ids) => ids,
            };
            self.check_context(&ids, &params)?;
            all.push(ids);
        }
        self.submit_many(all, params, None, false)
    }

    /// [`generate`](Self::generate) for async callers: tokenization and grammar compilation run
    /// on the blocking pool (in the caller's span), never on the async workers.
    pub async fn generate_async(&self, prompt: Prompt, params: SamplingParams) -> Result<TokenStream, EngineError> {
        let (h, span) = (self.clone(), tracing::Span::current());
        tokio::task::spawn_blocking(move || span.in_scope(|| h.generate(prompt, params)))
            .await
            .map_err(|e| EngineError::Internal(format!("request preparation failed: {e}")))?
    }

    /// [`generate_many`](Self::generate_many) off the async workers.
    pub async fn generate_many_async(
        &self,
        prompts: Vec<Prompt>,
        params: SamplingParams,
    ) -> Result<Vec<TokenStream>, EngineError> {
        let (h, span) = (self.clone(), tracing::Span::current());
        tokio::task::spawn_blocking(move || span.in_scope(|| h.generate_many(prompts, params)))
            .await
            .map_err(|e| EngineError::Internal(format!("request preparation failed: {e}")))?
    }

    /// Opens a session: a conversation whose K/V the engine keeps between turns.
    pub fn session(&self) -> crate::session::Session {
        crate::session::Session::open(self.clone())
    }

    /// Validates, compiles the grammar and sends one request (or session turn) to the engine.
    pub(crate) fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        session: Option<SessionTurn>,
        prefill_only: bool,
    ) -> Result<TokenStream, EngineError> {
        Ok(self.submit_many(vec![prompt], params, session, prefill_only)?.remove(0))
    }

    /// Validates and admits all `prompts` together (see [`Admission`]), then sends each as its
    /// own request. A failure part way drops the streams already made, which cancels them.
    fn submit_many(
        &self,
        prompts: Vec<Vec<u32>>,
        params: SamplingParams,
        session: Option<SessionTurn>,
        prefill_only: bool,
    ) -> Result<Vec<TokenStream>, EngineError> {
        for p in &prompts {
            self.check(p, &params)?;
        }
        // One parser per request (a cached grammar is cloned, not recompiled).
        let grammars = (0..prompts.len())
            .map(|_| params.constraint.as_ref().map(|c| self.grammars.compile(c)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let tickets = self.admission.admit(&prompts.iter().map(Vec::len).collect::<Vec<_>>())?;
        let mut streams = Vec::with_capacity(prompts.len());
        for ((prompt, ticket), grammar) in prompts.into_iter().zip(tickets).zip(grammars) {
            let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
            let cancel: Arc<[AtomicBool]> = (0..params.n).map(|_| AtomicBool::new(false)).collect();
            let setup = StreamSetup {
                n: params.n,
                stop: params.stop.clone(),
                prompt_tail: prompt[prompt.len().saturating_sub(4)..].to_vec(),
                prompt_tokens: prompt.len(),
                cancel: cancel.clone(),
            };
            let (params, span) = (params.clone(), tracing::Span::current());
            let add = AddRequest { ticket, prompt, params, grammar, events: etx, cancel, session, prefill_only, span };
            // A refused send hands the command back and drops it: its ticket goes with it.
            self.send(Command::Add(Box::new(add)))?;
            streams.push(TokenStream::new(erx, self.tokenizer.clone(), setup));
        }
        Ok(streams)
    }

    pub(crate) fn send(&self, cmd: Command) -> Result<(), EngineError> {
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(EngineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Shutdown),
        }
    }

    /// Checks what does not depend on a session's history (that is checked on the engine
    /// thread, which knows it).
    fn check(&self, ids: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        params.validate(self.info.vocab_size)?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(EngineError::InvalidParam {
                param: "prompt",
                message: format!("token id {bad} is outside the vocabulary"),
            });
        }
        Ok(())
    }

    /// A whole prompt must leave room in the context for what it asks to generate, and one
    /// choice of it must fit the KV cache (the choices of `n` need not run at once).
    fn check_context(&self, ids: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Err(EngineError::InvalidParam { param: "prompt", message: "the prompt is empty".into() });
        }
        let max = self.info.max_model_len;
        let requested = ids.len().saturating_add(params.max_tokens.unwrap_or(1));
        if ids.len() >= max || requested > max {
            return Err(EngineError::ContextLengthExceeded { max, prompt: ids.len(), requested });
        }
        let total = ids.len().saturating_add(params.max_tokens.unwrap_or(usize::MAX)).min(max);
        let capacity = self.info.num_blocks * self.info.block_size;
        match cache_misfit(ids.len(), total, capacity) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Asks the engine thread to stop; in-flight streams end with `Shutdown`.
    pub fn shutdown(&self) {
        let _ = self.tx.try_send(Command::Shutdown);
    }
}

/// `NeverFits` when a sequence of `prompt` tokens that may grow to `total` cannot fit a cache
/// of `capacity` token slots even alone (it would preempt itself forever): naming `prompt` when
/// the prompt alone is too long, else `max_tokens`.
pub(crate) fn cache_misfit(prompt: usize, total: usize, capacity: usize) -> Option<EngineError> {
    if total <= capacity {
        return None;
    }
    let (param, message) = if prompt >= capacity {
        ("prompt", format!("the prompt has {prompt} tokens; the KV cache holds {capacity} in all"))
    } else {
        (
            "max_tokens",
            format!(
                "prompt plus max_tokens may reach {total} tokens, more than the {capacity} the KV cache holds; \
                 set max_tokens to at most {}",
                capacity - prompt
            ),
        )
    };
    Some(EngineError::NeverFits { param, message })
}

/// The default bound on waiting prompt tokens: 8 full steps of prefill, so a request that gets
/// in waits for at most about that much of other requests' prompts before its own starts (its
/// share of the running batch aside); and never below the context length, or a legal prompt
/// could never be admitted at all.
pub fn default_max_waiting_tokens(max_num_batched_tokens: usize, max_model_len: usize) -> usize {
    max_num_batched_tokens.saturating_mul(8).max(max_model_len)
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
        enable_prefix_caching: cfg.enable_prefix_caching,
        long_prefill_token_threshold: cfg.long_prefill_token_threshold,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_capacity);
    let grammars = Arc::new(GrammarCompiler::new(tokenizer.clone(), info.vocab_size, cfg.grammar.clone()));
    let tokenizer = Arc::new(tokenizer);
    let stats = Arc::new(EngineStats::default());
    let ids = Arc::new(AtomicU64::new(0));
    let mut core = Core::new(CoreParts {
        runner,
        sched: Scheduler::new(sched_cfg),
        eos: tokenizer.eos_ids.clone(),
        max_model_len,
        stats: stats.clone(),
        ids: ids.clone(),
        caching: cfg.enable_prefix_caching,
        session_ttl: cfg.session_ttl,
    });
    let thread = std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || core.run(rx))
        .map_err(|e| EngineError::Internal(format!("cannot start engine thread: {e}")))?;
    let max_tokens =
        cfg.max_waiting_tokens.unwrap_or_else(|| default_max_waiting_tokens(cfg.max_num_batched_tokens, max_model_len));
    let admission = Admission::new(cfg.max_waiting_seqs, max_tokens, stats.clone());
    let handle = EngineHandle { tx, tokenizer, info: Arc::new(info), stats, grammars, ids, admission };
    Ok((handle, thread))
}
