//! qwen2: the llama decoder with biases on the Q/K/V projections and neox-style rotary pairs
//! (both read from the config), and its own tokenizer/chat template (handled by the engine).
//! Nothing else differs, so the decoder itself is `llama::Llama`.

use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use crate::weights::WeightStore;

pub fn load(cfg: ModelConfig, store: &mut WeightStore) -> Result<Llama> {
    if cfg.arch != Arch::Qwen2 || !cfg.attention_bias {
        return Err(ModelError::Invalid("qwen2 checkpoints carry q/k/v biases; none found".into()));
    }
    Llama::load(cfg, store)
}
