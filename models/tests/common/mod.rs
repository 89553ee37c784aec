//! Helpers shared by the model test binaries.
#![allow(dead_code)]

use anyhow::Result;
use candle_core::Tensor;
use std::path::PathBuf;

pub const BS: usize = 16;
/// "The capital of France is" in SmolLM2's tokenizer (reference prompt_ids).
pub const PROMPT: &[u32] = &[504, 3575, 282, 4649, 314];

/// `$KILN_MODELS_DIR` or `~/.cache/kiln/models`, where scripts/fetch-models.sh puts them.
pub fn models_dir() -> PathBuf {
    std::env::var_os("KILN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models"))
}

pub fn smollm2() -> Result<PathBuf> {
    let p = models_dir().join("smollm2-135m-instruct-q4_1.gguf");
    anyhow::ensure!(p.is_file(), "{} missing: run scripts/fetch-models.sh", p.display());
    Ok(p)
}

/// Qwen2.5-Coder 0.5B (optional tier): `None`, with a printed notice, when it is not fetched.
pub fn qwen25() -> Option<PathBuf> {
    let p = models_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not fetched (scripts/fetch-models.sh qwen)", p.display());
        None
    }
}

/// A fresh directory under the system temp dir, removed on drop (also when a test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("kiln-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

pub fn argmax(t: &Tensor) -> Result<u32> {
    Ok(t.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
}
