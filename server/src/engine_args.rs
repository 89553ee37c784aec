//! Engine flags shared by every subcommand, and turning them into a running engine.

use anyhow::{Context, Result};
use clap::Args;
use kiln_inference::engine::EngineConfig;
use kiln_inference::loader::{start_engine, LoadedEngine};
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
}

impl EngineArgs {
    pub fn config(&self) -> Result<EngineConfig> {
        anyhow::ensure!(
            self.block_size > 0 && self.max_num_seqs > 0 && self.max_num_batched_tokens > 0,
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
            ..EngineConfig::default()
        })
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
