//! The embedding engine (text-embeddings-inference's design): a cloneable [`EmbedHandle`] that
//! tokenizes on the caller's thread and enqueues, and one worker thread that owns the encoder
//! model, packs queued sequences into flattened batches under a token budget (no padding), runs
//! them, and answers each request through its own oneshot channel.
//!
//! Owns: input validation (options, lengths, token ids; token-id input is used as given),
//! tokenization the way sentence-transformers does it (text stripped, `[CLS] .. [SEP]` added, cut at
//! `max_seq_length`, the tokenizer file's padding off), the bounded request count
//! (`Overloaded` at once when full), skipping requests whose caller went away, and the
//! `dimensions` option (truncate, then L2-renormalize; only for models whose config says they
//! were trained for it). Must not: know HTTP or OpenAI JSON, or
//! let batching change results (the model computes each sequence from its own rows only).

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;
use kiln_models::bert::{Bert, BertOptions, EncoderBatch};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

pub use kiln_models::bert::{DensePrecision, Pooling, SentenceConfig};

/// Queue limits; `server` builds it from its config and passes it down.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// Token budget of one forward pass (sum of the batch's sequence lengths). A single
    /// sequence longer than this still runs, alone.
    pub max_batch_tokens: usize,
    /// Most sequences in one forward pass.
    pub max_batch_seqs: usize,
    /// Requests accepted but not yet answered; one more fails at once with `Overloaded`.
    pub max_queued_requests: usize,
    /// Most inputs in one request (OpenAI allows 2048).
    pub max_inputs: usize,
    /// Matmul precision; `None` picks the fastest this CPU runs natively (bf16 with AVX-512
    /// BF16: cosine to f32 > 0.9999 on all-MiniLM-L6-v2).
    pub precision: Option<DensePrecision>,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            max_batch_seqs: 256,
            max_queued_requests: 256,
            max_inputs: 2048,
            precision: None,
        }
    }
}

/// One thing to embed.
#[derive(Debug, Clone)]
pub enum EmbedInput {
    Text(String),
    /// Token ids exactly as the model reads them (special tokens included: none are added).
    Tokens(Vec<u32>),
}

/// Per-request options.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// Keep the first `dimensions` components, then L2-renormalize. `1..=dim`.
    pub dimensions: Option<usize>,
    /// Cut inputs longer than the model's `max_seq_length` (sentence-transformers' behavior);
    /// when false such an input is an error.
    pub truncate: bool,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self { dimensions: None, truncate: true }
    }
}

/// One input's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens the model read for this input (special tokens included).
    pub tokens: usize,
}

/// What a caller sees of the loaded embedding model.
#[derive(Debug, Clone)]
pub struct EmbedInfo {
    /// The directory's name (`all-minilm-l6-v2`).
    pub name: String,
    pub path: PathBuf,
    /// Vector length without `dimensions`.
    pub dim: usize,
    pub vocab_size: usize,
    pub sentence: SentenceConfig,
    pub precision: DensePrecision,
    /// Output sizes the model was trained to be cut to (Matryoshka representation learning),
    /// from `config.json`: `matryoshka_dimensions: [..]`, or every size for `is_matryoshka:
    /// true`. Empty: only `dim` (vLLM's rule: cutting an ordinary model's vector loses quality
    /// silently, so `dimensions` is refused).
    pub matryoshka_dimensions: Vec<usize>,
}

/// `config.json`'s Matryoshka fields (see [`EmbedInfo::matryoshka_dimensions`]).
fn matryoshka_dimensions(dir: &std::path::Path, dim: usize) -> Vec<usize> {
    let cfg: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(list) = cfg["matryoshka_dimensions"].as_array() {
        return list.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).filter(|&d| d >= 1 && d <= dim).collect();
    }
    if cfg["is_matryoshka"].as_bool() == Some(true) {
        return (1..=dim).collect();
    }
    Vec::new()
}

/// Counters the worker publishes for metrics; read without locks.
#[derive(Debug, Default)]
pub struct EmbedStats {
    /// Forward passes run.
    pub batches: AtomicU64,
    /// Sequences embedded (sum of batch sizes).
    pub sequences: AtomicU64,
    /// Tokens embedded (sum of batch token counts).
    pub tokens: AtomicU64,
    /// Size of the latest batch, in sequences and tokens.
    pub last_batch_seqs: AtomicU64,
    pub last_batch_tokens: AtomicU64,
    /// Time spent in forward passes, microseconds.
    pub busy_us: AtomicU64,
}

type Reply = Result<Vec<Vec<f32>>, EngineError>;

/// A validated, tokenized request on its way to the worker.
struct Job {
    seqs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Reply>,
    /// Held until the request is answered or dropped: the bounded queue.
    _permit: OwnedSemaphorePermit,
}

/// Cheap to clone; every clone feeds the same worker.
#[derive(Clone)]
pub struct EmbedHandle {
    tx: Sender<Job>,
    tokenizer: Arc<Tokenizer>,
    info: Arc<EmbedInfo>,
    permits: Arc<Semaphore>,
    max_queued: usize,
    max_inputs: usize,
    stats: Arc<EmbedStats>,
}

/// A request in the queue; await it or block on it.
#[must_use = "the embeddings arrive through this"]
pub struct PendingEmbeddings {
    rx: oneshot::Receiver<Reply>,
    tokens: Vec<usize>,
    dimensions: Option<usize>,
}

impl PendingEmbeddings {
    /// Waits for the worker's answer (async).
    pub async fn recv(self) -> Result<Vec<Embedding>, EngineError> {
        let (tokens, dims) = (self.tokens, self.dimensions);
        finish(self.rx.await, tokens, dims)
    }

    /// Waits for the worker's answer, blocking this thread (not for async contexts).
    pub fn wait(self) -> Result<Vec<Embedding>, EngineError> {
        let (tokens, dims) = (self.tokens, self.dimensions);
        finish(self.rx.blocking_recv(), tokens, dims)
    }
}

fn finish(
    reply: Result<Reply, oneshot::error::RecvError>,
    tokens: Vec<usize>,
    dims: Option<usize>,
) -> Result<Vec<Embedding>, EngineError> {
    let vectors = reply.map_err(|_| EngineError::Shutdown)??;
    Ok(vectors
        .into_iter()
        .zip(tokens)
        .map(|(v, tokens)| Embedding {
            vector: match dims {
                Some(d) => truncate_renormalize(v, d),
                None => v,
            },
            tokens,
        })
        .collect())
}

/// The first `d` components, L2-normalized (OpenAI's `dimensions`).
pub fn truncate_renormalize(mut v: Vec<f32>, d: usize) -> Vec<f32> {
    v.truncate(d);
    kiln_models::bert::l2_normalize(&mut v);
    v
}

impl EmbedHandle {
    pub fn info(&self) -> &EmbedInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn stats(&self) -> &EmbedStats {
        &self.stats
    }

    /// Requests accepted and not yet answered.
    pub fn queued_requests(&self) -> usize {
        self.max_queued - self.permits.available_permits()
    }

    /// Embeds `inputs` (blocking until the answer). See [`EmbedHandle::submit`].
    pub fn embed(&self, inputs: Vec<EmbedInput>, opts: &EmbedOptions) -> Result<Vec<Embedding>, EngineError> {
        self.submit(inputs, opts)?.wait()
    }

    /// Validates and tokenizes `inputs` on this thread (it can take milliseconds for thousands
    /// of inputs: async callers may want `spawn_blocking`), then enqueues them. Fails at once with
    /// `Overloaded` when `max_queued_requests` requests are pending.
    pub fn submit(&self, inputs: Vec<EmbedInput>, opts: &EmbedOptions) -> Result<PendingEmbeddings, EngineError> {
        self.check_options(inputs.len(), opts)?;
        let seqs = inputs.iter().map(|i| self.tokenize(i, opts.truncate)).collect::<Result<Vec<_>, _>>()?;
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| EngineError::Overloaded)?;
        let (reply, rx) = oneshot::channel();
        let tokens = seqs.iter().map(Vec::len).collect();
        self.tx.send(Job { seqs, reply, _permit: permit }).map_err(|_| EngineError::Shutdown)?;
        Ok(PendingEmbeddings { rx, tokens, dimensions: opts.dimensions })
    }

    fn check_options(&self, n: usize, opts: &EmbedOptions) -> Result<(), EngineError> {
        let invalid = |param, message: String| Err(EngineError::InvalidParam { param, message });
        if n == 0 {
            return invalid("input", "input must not be empty".into());
        }
        if n > self.max_inputs {
            return invalid("input", format!("at most {} inputs per request, got {n}", self.max_inputs));
        }
        let dim = self.info.dim;
        match opts.dimensions {
            Some(d) if d == 0 || d > dim => {
                invalid("dimensions", format!("dimensions must be between 1 and {dim} for this model, got {d}"))
            }
            Some(d) if d != dim && !self.info.matryoshka_dimensions.contains(&d) => {
                let message = if self.info.matryoshka_dimensions.is_empty() {
                    format!(
                        "this model was not trained for shortened embeddings (no Matryoshka support in its \
                         config.json): dimensions must be {dim} or omitted, got {d}"
                    )
                } else {
                    format!("dimensions must be one of {:?} or {dim}, got {d}", self.info.matryoshka_dimensions)
                };
                invalid("dimensions", message)
            }
            _ => Ok(()),
        }
    }

    /// Token ids the model reads for one input: text gets `[CLS] .. [SEP]`, ids are used as
    /// given; cut at `max_seq_length` unless `truncate` is off (then too long is an error).
    pub fn tokenize(&self, input: &EmbedInput, truncate: bool) -> Result<Vec<u32>, EngineError> {
        let max = self.info.sentence.max_seq_length;
        let limit = truncate.then_some(max);
        let ids = match input {
            // sentence-transformers strips (and, when configured, lowercases) text first.
            EmbedInput::Text(t) if self.info.sentence.lowercase => {
                self.tokenizer.encode_with_special_tokens(&t.trim().to_lowercase(), limit)?
            }
            EmbedInput::Text(t) => self.tokenizer.encode_with_special_tokens(t.trim(), limit)?,
            // Ids are what the model reads, as given (vLLM's rule): the client's `[CLS] .. [SEP]`
            // are not added a second time. Cut on the right like text when too long.
            EmbedInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                    let message = format!("token id {bad} is outside the vocabulary ({})", self.info.vocab_size);
                    return Err(EngineError::InvalidParam { param: "input", message });
                }
                if ids.is_empty() {
                    let message = "a token-id input must not be empty".to_string();
                    return Err(EngineError::InvalidParam { param: "input", message });
                }
                ids[..ids.len().min(limit.unwrap_or(usize::MAX))].to_vec()
            }
        };
        if ids.len() > max {
            return Err(EngineError::ContextLengthExceeded { max, prompt: ids.len(), requested: ids.len() });
        }
        Ok(ids)
    }
}

/// A running embedding engine and its worker thread (which exits when every handle is dropped).
pub struct LoadedEmbedder {
    pub handle: EmbedHandle,
    pub thread: JoinHandle<()>,
}

/// Loads the encoder at `path` (a local sentence-transformers directory, or a Hugging Face id
/// fetched into the local cache) and starts its worker thread.
pub fn start_embedder(path: &str, cfg: &EmbedConfig) -> Result<EmbedHandle, EngineError> {
    Ok(load_embedder(path, cfg)?.handle)
}

/// [`start_embedder`], keeping the worker's join handle.
pub fn load_embedder(path: &str, cfg: &EmbedConfig) -> Result<LoadedEmbedder, EngineError> {
    let dir = match crate::loader::resolve(path)? {
        kiln_models::ModelFormat::Safetensors(dir) => dir,
        kiln_models::ModelFormat::Gguf(f) => {
            return Err(EngineError::Load(format!(
                "{}: embedding models load from a safetensors directory",
                f.display()
            )))
        }
    };
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let precision = cfg.precision.unwrap_or_else(DensePrecision::fastest);
    let model = Bert::load(&dir, BertOptions { precision })?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.to_string());
    let info = EmbedInfo {
        name,
        path: dir.clone(),
        dim: model.dim(),
        vocab_size: model.config().vocab_size,
        sentence: model.sentence_config().clone(),
        precision,
        matryoshka_dimensions: matryoshka_dimensions(&dir, model.dim()),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let stats = Arc::new(EmbedStats::default());
    let worker = Worker { model, cfg: cfg.clone(), queue: VecDeque::new(), stats: stats.clone() };
    let thread = std::thread::Builder::new()
        .name("kiln-embed".into())
        .spawn(move || worker.run(rx))
        .map_err(|e| EngineError::Internal(format!("cannot start the embedding thread: {e}")))?;
    tracing::info!(model = %info.name, dim = info.dim, pooling = ?info.sentence.pooling, normalize = info.sentence.normalize,
        max_seq_length = info.sentence.max_seq_length, precision = ?precision, "embedding model loaded");
    let handle = EmbedHandle {
        tx,
        tokenizer: Arc::new(tokenizer),
        info: Arc::new(info),
        permits: Arc::new(Semaphore::new(cfg.max_queued_requests.max(1))),
        max_queued: cfg.max_queued_requests.max(1),
        max_inputs: cfg.max_inputs,
        stats,
    };
    Ok(LoadedEmbedder { handle, thread })
}

/// A queued request: its sequences are scheduled in order, results arrive in order.
struct Queued {
    job: Job,
    /// Sequences handed to a batch so far.
    scheduled: usize,
    results: Vec<Vec<f32>>,
}

/// The worker thread's state: the model and the queue, owned, no locks.
struct Worker {
    model: Bert,
    cfg: EmbedConfig,
    queue: VecDeque<Queued>,
    stats: Arc<EmbedStats>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            if self.queue.is_empty() {
                match rx.recv() {
                    Ok(job) => self.push(job),
                    Err(_) => return, // every handle dropped
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.push(job);
            }
            self.step();
        }
    }

    fn push(&mut self, job: Job) {
        let n = job.seqs.len();
        self.queue.push_back(Queued { job, scheduled: 0, results: Vec::with_capacity(n) });
    }

    /// One batch: pack, run, hand out results, answer finished requests.
    fn step(&mut self) {
        // Callers that went away are skipped, whether or not part of their request already ran.
        self.queue.retain(|q| !q.job.reply.is_closed());
        let (batch, parts) = self.pack();
        if batch.num_seqs() == 0 {
            return;
        }
        let t = Instant::now();
        let model = &self.model;
        let out = rayon::scope(|_| model.embed(&batch));
        let (seqs, tokens) = (batch.num_seqs() as u64, batch.num_tokens() as u64);
        tracing::debug!(seqs, tokens, ms = t.elapsed().as_secs_f64() * 1e3, "embed batch");
        let s = &self.stats;
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.sequences.fetch_add(seqs, Ordering::Relaxed);
        s.tokens.fetch_add(tokens, Ordering::Relaxed);
        s.last_batch_seqs.store(seqs, Ordering::Relaxed);
        s.last_batch_tokens.store(tokens, Ordering::Relaxed);
        s.busy_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        match out {
            Ok(vectors) => {
                let mut it = vectors.into_iter();
                for (q, n) in parts {
                    self.queue[q].results.extend(it.by_ref().take(n));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (q, _) in parts.into_iter().rev() {
                    if let Some(failed) = self.queue.remove(q) {
                        let _ = failed.job.reply.send(Err(EngineError::Internal(msg.clone())));
                    }
                }
            }
        }
        while self.queue.front().is_some_and(|q| q.results.len() == q.job.seqs.len()) {
            if let Some(done) = self.queue.pop_front() {
                let _ = done.job.reply.send(Ok(done.results));
            }
        }
    }

    /// The next batch in FIFO order under the budgets (at least one sequence), and how many of
    /// its sequences belong to which queue entry.
    fn pack(&mut self) -> (EncoderBatch, Vec<(usize, usize)>) {
        let mut batch = EncoderBatch::default();
        let mut parts = Vec::new();
        'queue: for (qi, q) in self.queue.iter_mut().enumerate() {
            let start = q.scheduled;
            while q.scheduled < q.job.seqs.len() {
                let seq = &q.job.seqs[q.scheduled];
                let fits = batch.num_tokens() + seq.len() <= self.cfg.max_batch_tokens
                    && batch.num_seqs() < self.cfg.max_batch_seqs;
                if !fits && batch.num_seqs() > 0 {
                    if q.scheduled > start {
                        parts.push((qi, q.scheduled - start));
                    }
                    break 'queue;
                }
                batch.push(seq);
                q.scheduled += 1;
            }
            if q.scheduled > start {
                parts.push((qi, q.scheduled - start));
            }
        }
        (batch, parts)
    }
}
