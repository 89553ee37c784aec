//! The real all-MiniLM-L6-v2 embedder for the memory tests: where `scripts/fetch-models.sh embed`
//! puts it, loaded once per test binary, and `embedder_or_skip!` that prints SKIP without it.
//! Include as `#[macro_use] #[path = "support/embedder.rs"] mod embedder;` (the macro names it).

use kiln_inference::embed::{start_embedder, EmbedConfig, EmbedHandle};
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn model_dir() -> PathBuf {
    let base = std::env::var_os("KILN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models"));
    base.join("all-minilm-l6-v2")
}

/// One embedder per test binary (loading it is the slow part); `None` when the model is missing.
pub fn embedder() -> Option<EmbedHandle> {
    static E: OnceLock<Option<EmbedHandle>> = OnceLock::new();
    E.get_or_init(|| {
        let dir = model_dir();
        if !dir.join("model.safetensors").is_file() {
            return None;
        }
        Some(start_embedder(dir.to_str()?, &EmbedConfig::default()).expect("load all-MiniLM-L6-v2"))
    })
    .clone()
}

/// The embedder, or print SKIP and return `Ok(())` from the calling test.
macro_rules! embedder_or_skip {
    () => {
        match $crate::embedder::embedder() {
            Some(e) => e,
            None => {
                println!("SKIP: {} missing (scripts/fetch-models.sh embed)", $crate::embedder::model_dir().display());
                return Ok(());
            }
        }
    };
}
