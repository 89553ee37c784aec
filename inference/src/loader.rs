//! Turns a model reference (a local `.gguf` file, a local model directory, or a Hugging Face id)
//! into a running engine: weights, tokenizer, KV cache, engine thread. Hub downloads only fill a
//! local directory; loading always goes through the local-path code.

use crate::defaults::SamplingDefaults;
use crate::engine::{spawn, EngineConfig, EngineHandle};
use crate::error::EngineError;
use crate::runner::Runner;
use crate::tokenizer::Tokenizer;
use kiln_models::{Device, LoadOptions, ModelFormat, QuantForm};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// A loaded engine and the thread that runs it.
pub struct LoadedEngine {
    pub handle: EngineHandle,
    pub thread: JoinHandle<()>,
    pub format: ModelFormat,
    /// The model's own default sampling (`generation_config.json` / GGUF `general.sampling.*`).
    pub sampling_defaults: SamplingDefaults,
}

/// Loads `model` and starts its engine thread.
pub fn start_engine(model: &str, cfg: &EngineConfig, device: &Device) -> Result<LoadedEngine, EngineError> {
    let format = resolve(model)?;
    let tokenizer = load_tokenizer(&format)?;
    let quant_form = if cfg.llama_cpp_batch_arithmetic { QuantForm::LlamaCppBatch } else { QuantForm::Invariant };
    let model = kiln_models::load_with(&format, device, LoadOptions { quant_form, ..LoadOptions::default() })?;
    let runner = Runner::new(model, cfg)?;
    let sampling_defaults = SamplingDefaults::from_model(&format)?;
    let (handle, thread) = spawn(runner, tokenizer, cfg)?;
    Ok(LoadedEngine { handle, thread, format, sampling_defaults })
}

/// A local path if it exists, else a Hugging Face id (`org/name` or `org/name/file.gguf`).
pub fn resolve(model: &str) -> Result<ModelFormat, EngineError> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(ModelFormat::detect(path)?);
    }
    let parts: Vec<&str> = model.split('/').collect();
    match parts.as_slice() {
        [org, name] => Ok(ModelFormat::detect(&hub_download(&format!("{org}/{name}"), None)?)?),
        [org, name, file] if file.ends_with(".gguf") => {
            Ok(ModelFormat::Gguf(hub_download(&format!("{org}/{name}"), Some(file))?))
        }
        _ => Err(EngineError::Load(format!(
            "'{model}' is neither a local file or directory nor a Hugging Face id (org/name or org/name/file.gguf)"
        ))),
    }
}

/// Fetches a repository's files (or one GGUF file) into the hub cache; returns the directory
/// (or file). Fails with a clear message offline.
fn hub_download(repo: &str, file: Option<&str>) -> Result<PathBuf, EngineError> {
    let err =
        |e: &dyn std::fmt::Display| EngineError::Load(format!("cannot fetch '{repo}' from the Hugging Face Hub: {e}"));
    let api = hf_hub::api::sync::Api::new().map_err(|e| err(&e))?;
    let repo_api = api.model(repo.to_string());
    if let Some(f) = file {
        return repo_api.get(f).map_err(|e| err(&e));
    }
    let config = repo_api.get("config.json").map_err(|e| err(&e))?;
    // Optional files; the sentence-transformers ones say how an embedding model pools.
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        let _ = repo_api.get(f); // optional files
    }
    let info = repo_api.info().map_err(|e| err(&e))?;
    for s in info.siblings.iter().filter(|s| s.rfilename.ends_with(".safetensors")) {
        repo_api.get(&s.rfilename).map_err(|e| err(&e))?;
    }
    config.parent().map(Path::to_path_buf).ok_or_else(|| err(&"bad cache path"))
}

/// `tokenizer.json` beside the weights wins; a GGUF file otherwise carries its own tokenizer.
pub fn load_tokenizer(format: &ModelFormat) -> Result<Tokenizer, EngineError> {
    match format {
        ModelFormat::Safetensors(dir) => Tokenizer::from_dir(dir),
        ModelFormat::Gguf(file) => Tokenizer::from_model_path(file),
    }
}
