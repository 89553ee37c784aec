//! Shared helpers of the end-to-end tests: where the real models are, how to start an engine on
//! them, how to read the independent references in `tests/reference/`.

use anyhow::{Context, Result};
use kiln_inference::engine::{EngineConfig, EngineHandle, Prompt};
use kiln_inference::loader::{start_engine, LoadedEngine};
use kiln_inference::{SamplingParams, TokenStream};
use kiln_models::Device;
use std::path::PathBuf;

/// `$KILN_MODELS_DIR` or `~/.cache/kiln/models` (filled by `scripts/fetch-models.sh`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("KILN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models"))
}

/// The default chat model; its absence is a test failure (the test command fetches it).
pub fn smollm2() -> Result<PathBuf> {
    let p = models_dir().join("smollm2-135m-instruct-q4_1.gguf");
    anyhow::ensure!(p.is_file(), "{} missing: run scripts/fetch-models.sh", p.display());
    Ok(p)
}

/// The optional-tier model, or `None` (with a notice) when it was not fetched.
pub fn qwen25() -> Option<PathBuf> {
    let p = models_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not fetched (scripts/fetch-models.sh qwen)", p.display());
        None
    }
}

/// `tests/reference/` in the repository (the data ships with the code, so the test command works
/// on a fresh clone), or `$KILN_REFERENCE_DIR` to test against another set.
pub fn reference_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_REFERENCE_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference")
}

pub fn reference(name: &str) -> Result<serde_json::Value> {
    let p = reference_dir().join(name);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
}

/// Engine limits small enough for tests, large enough for every reference prompt.
pub fn test_config() -> EngineConfig {
    EngineConfig { kv_cache_memory: 64 << 20, max_num_seqs: 16, ..EngineConfig::default() }
}

pub fn start(model: &std::path::Path, cfg: &EngineConfig) -> Result<LoadedEngine> {
    Ok(start_engine(model.to_str().context("utf-8 path")?, cfg, &Device::Cpu)?)
}

/// One finished choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<kiln_inference::TokenLogprob>,
    pub finish_reason: Option<&'static str>,
}

/// Drains a stream into one output per choice.
pub fn collect(mut stream: TokenStream) -> Result<Vec<Output>> {
    Ok(collect_cached(&mut stream)?.0)
}

/// [`collect`], plus how many prompt tokens the engine found cached.
pub fn collect_cached(stream: &mut TokenStream) -> Result<(Vec<Output>, usize)> {
    let mut outs = vec![
        Output { text: String::new(), tokens: vec![], logprobs: vec![], finish_reason: None };
        stream.num_choices()
    ];
    while let Some(d) = stream.blocking_next() {
        let d = d?;
        let o = &mut outs[d.index];
        o.text.push_str(&d.text);
        o.tokens.extend(&d.tokens);
        o.logprobs.extend(d.logprobs);
        if let Some(r) = d.finish_reason {
            o.finish_reason = Some(r.as_str());
        }
    }
    Ok((outs, stream.cached_tokens()))
}

pub fn run(h: &EngineHandle, prompt: Prompt, params: SamplingParams) -> Result<Vec<Output>> {
    collect(h.generate(prompt, params)?)
}

/// Waits (bounded) until the engine reports every KV block free.
pub fn wait_all_blocks_free(h: &EngineHandle) -> Result<()> {
    let total = h.info().num_blocks as u64;
    for _ in 0..200 {
        if h.stats().free_blocks.load(std::sync::atomic::Ordering::Relaxed) == total {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    anyhow::bail!(
        "blocks not freed: {} of {total} free",
        h.stats().free_blocks.load(std::sync::atomic::Ordering::Relaxed)
    )
}
