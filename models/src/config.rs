//! Hyper-parameters of a decoder model, read from GGUF metadata or a Hugging Face `config.json`.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use kiln_kernels::RopeStyle;
use serde::Deserialize;

/// Architectures kiln runs. Each has one model file; see `llama.rs`, `qwen2.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Self::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Context length the model was trained for; requests beyond it are rejected.
    pub max_position_embeddings: usize,
    /// Q/K/V projections carry biases (qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| ModelError::MissingMetadata("general.architecture".into()))?;
        let arch = Arch::parse(arch_name)?;
        let get = |key: &str| -> Result<&gguf_file::Value> {
            let full = format!("{arch_name}.{key}");
            md.get(&full).ok_or(ModelError::MissingMetadata(full))
        };
        let get_usize = |key: &str| -> Result<usize> { Ok(get(key)?.to_u32()? as usize) };
        let hidden_size = get_usize("embedding_length")?;
        let num_heads = get_usize("attention.head_count")?;
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(ModelError::MissingTensor("token_embd.weight".into())),
        };
        let head_dim = get_usize("attention.key_length").unwrap_or(hidden_size / num_heads);
        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_usize("feed_forward_length")?,
            num_layers: get_usize("block_count")?,
            num_heads,
            num_kv_heads: get_usize("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: get("rope.freq_base").and_then(|v| Ok(v.to_f32()?)).unwrap_or(10_000.0),
            // llama.cpp's converter permutes llama Q/K rows for interleaved pairs; qwen2 is neox.
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            max_position_embeddings: get_usize("context_length")?,
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        cfg.validate()
    }

    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::Invalid(format!("config.json: {e}")))?;
        let arch_name = c.architectures.first().cloned().or(c.model_type.clone()).unwrap_or_default();
        let arch = Arch::parse(&arch_name)?;
        if let Some(scaling) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(ModelError::Invalid(format!("unsupported rope_scaling {scaling}")));
        }
        let num_heads = c.num_attention_heads;
        let cfg = Self {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(num_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / num_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::Neox,
            max_position_embeddings: c.max_position_embeddings,
            attention_bias: c.attention_bias.unwrap_or(arch == Arch::Qwen2),
        };
        cfg.validate()
    }

    fn validate(self) -> Result<Self> {
        let ok = self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads % self.num_kv_heads == 0
            && self.head_dim % 2 == 0
            && self.num_layers > 0
            && self.vocab_size > 0;
        if ok {
            Ok(self)
        } else {
            Err(ModelError::Invalid(format!("inconsistent hyper-parameters: {self:?}")))
        }
    }
}

/// The fields of a Hugging Face `config.json` kiln reads (llama / qwen2 families).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}
