//! kiln-models: model architectures as pure functions of (weights, flattened batch, paged KV
//! cache) -> logits. Knows weights and math; knows nothing of requests, scheduling or HTTP.

pub mod batch;
pub mod bert;
pub mod config;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod qwen2;
pub mod weights;

pub use batch::ForwardBatch;
pub use candle_core::{Device, Tensor};
pub use config::{Arch, ModelConfig};
pub use error::{ModelError, Result};
pub use kiln_kernels::quant::Form as QuantForm;
pub use kv_cache::{KvDType, PagedKvCache};

use std::path::Path;
use weights::WeightStore;

/// A decoder that turns a flattened batch into logits, reading and writing the paged cache.
pub trait CausalLM: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Returns `[batch.logits_rows.len(), vocab]` f32 logits.
    fn forward(&self, batch: &ForwardBatch, cache: &mut PagedKvCache) -> Result<Tensor>;
}

/// On-disk formats kiln loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single `.gguf` file (weights, tokenizer and chat template in its metadata).
    Gguf(std::path::PathBuf),
    /// A directory with `config.json`, `*.safetensors`, `tokenizer.json`.
    Safetensors(std::path::PathBuf),
}

impl ModelFormat {
    /// Classifies a local path; a directory holding exactly one `.gguf` file counts as that file.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("gguf") => Ok(Self::Gguf(path.to_path_buf())),
                _ => {
                    Err(ModelError::Invalid(format!("{}: expected a .gguf file or a model directory", path.display())))
                }
            };
        }
        if !path.is_dir() {
            return Err(ModelError::NotFound(path.display().to_string()));
        }
        if path.join("config.json").is_file() {
            return Ok(Self::Safetensors(path.to_path_buf()));
        }
        let ggufs: Vec<_> = std::fs::read_dir(path)
            .map_err(|source| ModelError::Io { path: path.display().to_string(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Ok(Self::Gguf(one.clone())),
            [] => Err(ModelError::NotFound(format!("{}: no config.json or .gguf file", path.display()))),
            _ => Err(ModelError::Invalid(format!("{}: several .gguf files; name one", path.display()))),
        }
    }
}

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Dequantize GGUF blocks to f32 at load (exact float math; 4-8x the memory).
    pub dequantize: bool,
    /// `Invariant` (default): every matmul row gets the same arithmetic whatever the batch.
    /// `LlamaCppBatch`: k-quant matmuls round like llama.cpp's CPU backend for the step's batch
    /// size, to reproduce its prompt processing bit for bit; not batch invariant.
    pub quant_form: kiln_kernels::quant::Form,
}

/// Loads the model at `format` onto `device`, choosing the architecture from its metadata.
pub fn load(format: &ModelFormat, device: &Device) -> Result<Box<dyn CausalLM>> {
    load_with(format, device, LoadOptions::default())
}

pub fn load_with(format: &ModelFormat, device: &Device, opts: LoadOptions) -> Result<Box<dyn CausalLM>> {
    let (mut store, cfg) = match format {
        ModelFormat::Gguf(p) => WeightStore::open_gguf(p, device)?,
        ModelFormat::Safetensors(d) => WeightStore::open_safetensors(d, device)?,
    };
    store.set_dequantize(opts.dequantize);
    store.set_quant_form(opts.quant_form);
    Ok(match cfg.arch {
        Arch::Llama => Box::new(llama::Llama::load(cfg, &mut store)?),
        Arch::Qwen2 => Box::new(qwen2::load(cfg, &mut store)?),
    })
}
