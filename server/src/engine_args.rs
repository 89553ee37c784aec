//! Engine flags shared by every subcommand, and turning them into a running engine.

use anyhow::{Context, Result};
use clap::Args;
use kiln_inference::defaults::LLAMA_CPP_DEFAULTS;
use kiln_inference::engine::EngineConfig;
use kiln_inference::grammar::GrammarLimits;
use kiln_inference::loader::{start_engine, LoadedEngine};
use kiln_inference::SamplingDefaults;
use kiln_models::{Device, KvDType};

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// A .gguf file, a model directory (config.json + *.safetensors + tokenizer.json), or a
    /// Hugging Face id.
    #[arg(long, env = "KILN_MODEL")]
    pub model: String,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64, env = "KILN_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (chunked prefill + decodes).
    #[arg(long, default_value_t = 512, env = "KILN_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    /// KV cache size in bytes (suffixes K, M, G accepted); default: 10% of RAM.
    #[arg(long, env = "KILN_KV_CACHE_MEMORY", value_parser = parse_bytes)]
    pub kv_cache_memory: Option<usize>,
    /// Element type of the KV cache.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"], env = "KILN_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: String,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, env = "KILN_BLOCK_SIZE")]
    pub block_size: usize,
    /// Cap on prompt + generated tokens (default: the model's context length).
    #[arg(long, env = "KILN_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Round k-quant matmuls as llama.cpp does for each step's batch size, to reproduce its
    /// outputs bit for bit; gives up batch invariance (results depend on what shares a step).
    #[arg(long, env = "KILN_LLAMA_CPP_BATCH_ARITHMETIC")]
    pub llama_cpp_batch_arithmetic: bool,
    /// Turn off automatic prefix caching (reuse of the K/V of prompt prefixes computed before).
    #[arg(long, env = "KILN_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Requests accepted but not yet running; one more is refused at once with 429 and
    /// Retry-After, so queueing delay stays bounded (default: 4 x --max-num-seqs).
    #[arg(long, env = "KILN_MAX_WAITING_SEQS")]
    pub max_waiting_seqs: Option<usize>,
    /// Prompt tokens of requests accepted but not yet running; a request that would go past it
    /// while others wait is refused with 429 and Retry-After, and one whose prompts alone exceed
    /// it with 400 (default: 8 x --max-num-batched-tokens, at least the context length).
    #[arg(long, env = "KILN_MAX_WAITING_TOKENS")]
    pub max_waiting_tokens: Option<usize>,
    /// Most prompt tokens one request computes per step, so a request arriving during a long
    /// prompt's prefill waits at most about one short step (default: a sixteenth of
    /// --max-num-batched-tokens, 128 by default; 0: no cap).
    #[arg(long, env = "KILN_LONG_PREFILL_TOKEN_THRESHOLD")]
    pub long_prefill_token_threshold: Option<usize>,
    /// Sampling defaults for fields a request leaves out, over the model's own
    /// (`generation_config.json` / GGUF `general.sampling.*`), e.g. `top_k=40,top_p=0.95,min_p=0.05`
    /// (keys: temperature, top_p, top_k, min_p, repetition_penalty). Fields neither this nor the
    /// model sets fall back to llama.cpp's top_k=40, top_p=0.95, min_p=0.05; `none` turns that
    /// fallback off (OpenAI's neutral defaults). In TOML also a `[default_sampling]` table.
    #[arg(long, env = "KILN_DEFAULT_SAMPLING", value_parser = parse_default_sampling)]
    pub default_sampling: Option<DefaultSampling>,
    /// Largest response_format schema or tool grammar, in bytes (suffixes K, M, G accepted).
    #[arg(long, default_value = "1M", env = "KILN_MAX_GRAMMAR_BYTES", value_parser = parse_bytes)]
    pub max_grammar_bytes: usize,
    /// Most JSON values in one response_format schema.
    #[arg(long, default_value_t = 100_000, env = "KILN_MAX_GRAMMAR_NODES")]
    pub max_grammar_nodes: usize,
    /// Deepest JSON nesting of one response_format schema.
    #[arg(long, default_value_t = 64, env = "KILN_MAX_GRAMMAR_DEPTH")]
    pub max_grammar_depth: usize,
    /// Seconds one grammar may take to compile before the request is refused (400).
    #[arg(long, default_value_t = 10.0, env = "KILN_GRAMMAR_COMPILE_TIMEOUT")]
    pub grammar_compile_timeout: f64,
    /// Memory the cache of compiled grammars may hold (estimated; suffixes K, M, G accepted).
    #[arg(long, default_value = "256M", env = "KILN_GRAMMAR_CACHE_MEMORY", value_parser = parse_bytes)]
    pub grammar_cache_memory: usize,
}

/// `--default-sampling`: fields to set, and whether llama.cpp's fallback stays under them.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultSampling {
    pub fields: SamplingDefaults,
    pub fallback: bool,
}

fn parse_default_sampling(s: &str) -> Result<DefaultSampling, String> {
    match s.trim() {
        "none" => Ok(DefaultSampling { fields: SamplingDefaults::default(), fallback: false }),
        s => Ok(DefaultSampling { fields: SamplingDefaults::parse(s)?, fallback: true }),
    }
}

impl EngineArgs {
    pub fn config(&self) -> Result<EngineConfig> {
        anyhow::ensure!(
            self.block_size > 0
                && self.max_num_seqs > 0
                && self.max_num_batched_tokens > 0
                && self.max_waiting_tokens != Some(0),
            "engine limits must be positive"
        );
        Ok(EngineConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            kv_cache_memory: match self.kv_cache_memory {
                Some(b) => b,
                None => total_ram_bytes()? / 10,
            },
            kv_dtype: if self.kv_cache_dtype == "f32" { KvDType::F32 } else { KvDType::F16 },
            max_model_len: self.max_model_len,
            llama_cpp_batch_arithmetic: self.llama_cpp_batch_arithmetic,
            enable_prefix_caching: !self.no_prefix_caching,
            max_waiting_seqs: self.max_waiting_seqs.unwrap_or(4 * self.max_num_seqs).max(1),
            // The default needs the model's context length: the engine fills it in.
            max_waiting_tokens: self.max_waiting_tokens,
            long_prefill_token_threshold: self
                .long_prefill_token_threshold
                .unwrap_or((self.max_num_batched_tokens / 16).max(16)),
            grammar: self.grammar_limits()?,
            ..EngineConfig::default()
        })
    }

    fn grammar_limits(&self) -> Result<GrammarLimits> {
        let timeout = self.grammar_compile_timeout;
        anyhow::ensure!(timeout > 0.0 && timeout.is_finite(), "--grammar-compile-timeout must be positive");
        Ok(GrammarLimits {
            max_bytes: self.max_grammar_bytes,
            max_nodes: self.max_grammar_nodes,
            max_depth: self.max_grammar_depth,
            compile_timeout: std::time::Duration::from_secs_f64(timeout),
            cache_bytes: self.grammar_cache_memory,
            ..GrammarLimits::default()
        })
    }

    /// What requests get for the sampling fields they leave out: this flag, then the model's
    /// own recommendation, then (unless `none`) llama.cpp's defaults.
    pub fn sampling_defaults(&self, model: SamplingDefaults) -> SamplingDefaults {
        let flag =
            self.default_sampling.clone().unwrap_or(DefaultSampling { fields: Default::default(), fallback: true });
        let under = if flag.fallback { model.over(LLAMA_CPP_DEFAULTS) } else { model };
        flag.fields.over(under)
    }

    pub fn start(&self) -> Result<LoadedEngine> {
        let t = std::time::Instant::now();
        let engine = start_engine(&self.model, &self.config()?, &Device::Cpu)
            .with_context(|| format!("loading model '{}'", self.model))?;
        tracing::info!(model = %self.model, secs = t.elapsed().as_secs_f32(), "model loaded");
        Ok(engine)
    }
}

/// "512M", "2G", "1048576" -> bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1usize << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a byte size like 512M or 2G"))?;
    if n <= 0.0 {
        return Err(format!("'{s}' must be positive"));
    }
    Ok((n * mult as f64) as usize)
}

fn total_ram_bytes() -> Result<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo; pass --kv-cache-memory")?;
    let kb: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemTotal in /proc/meminfo; pass --kv-cache-memory")?;
    Ok(kb * 1024)
}
