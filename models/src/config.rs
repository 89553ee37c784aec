//! Hyper-parameters of a decoder model, read from GGUF metadata or a Hugging Face `config.json`.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use kiln_kernels::RopeStyle;

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
        let get = |key: &str| md.get(&format!("{arch_name}.{key}"));
        let wrong = |key: &str, e: candle_core::Error| {
            ModelError::Invalid(format!("metadata '{arch_name}.{key}': {}", ModelError::from(e)))
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            get(key).map(|v| v.to_u32().map(|n| n as usize).map_err(|e| wrong(key, e))).transpose()
        };
        let opt_f32 =
            |key: &str| -> Result<Option<f32>> { get(key).map(|v| v.to_f32().map_err(|e| wrong(key, e))).transpose() };
        let missing = |key: &str| ModelError::MissingMetadata(format!("{arch_name}.{key}"));
        let usize_of = |key: &str| opt_usize(key)?.ok_or_else(|| missing(key));
        let hidden_size = usize_of("embedding_length")?;
        let num_heads = usize_of("attention.head_count")?;
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims().first().copied().unwrap_or(0),
            None => return Err(ModelError::MissingTensor("token_embd.weight".into())),
        };
        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_layers: usize_of("block_count")?,
            num_heads,
            num_kv_heads: opt_usize("attention.head_count_kv")?.unwrap_or(num_heads),
            // checked_div: a zero head count is reported by validate(), not a panic here.
            head_dim: opt_usize("attention.key_length")?.or(hidden_size.checked_div(num_heads)).unwrap_or(0),
            rms_norm_eps: opt_f32("attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| missing("attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: opt_f32("rope.freq_base")?.unwrap_or(10_000.0),
            // llama.cpp's converter permutes llama Q/K rows for interleaved pairs; qwen2 is neox.
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            max_position_embeddings: usize_of("context_length")?,
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        cfg.validate(&format!("GGUF metadata '{arch_name}.*'"))
    }

    /// Reads a Hugging Face `config.json`. Fields are read one by one (not with a serde struct)
    /// so that a wrong value is reported by its key, which serde's type errors do not name.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let invalid = |msg: String| ModelError::Invalid(format!("config.json: {msg}"));
        let c: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let field = |k: &str| c.get(k).filter(|v| !v.is_null());
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            field(k)
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| invalid(format!("'{k}' must be a non-negative integer, not {v}")))
                })
                .transpose()
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            field(k).map(|v| v.as_f64().ok_or_else(|| invalid(format!("'{k}' must be a number, not {v}")))).transpose()
        };
        let usize_of = |k: &str| opt_usize(k)?.ok_or_else(|| invalid(format!("missing '{k}'")));
        let arch_name = match (field("architectures").and_then(|a| a.get(0)), field("model_type")) {
            (Some(a), _) | (None, Some(a)) => a.as_str().unwrap_or_default().to_string(),
            (None, None) => return Err(invalid("neither 'architectures' nor 'model_type' is set".into())),
        };
        let arch = Arch::parse(&arch_name)?;
        // Kiln runs float checkpoints; GPTQ/AWQ/bitsandbytes weights are packed integers under
        // other tensor names, which would otherwise surface as a confusing missing tensor.
        if let Some(q) = field("quantization_config") {
            return Err(invalid(format!("unsupported quantization_config {q} (use a float checkpoint or a GGUF)")));
        }
        if let Some(scaling) = field("rope_scaling") {
            let kind = scaling.get("rope_type").or(scaling.get("type")).and_then(|t| t.as_str());
            // HF's "default" rope type is plain rope; anything else changes the frequencies.
            if kind != Some("default") {
                return Err(invalid(format!("unsupported rope_scaling {scaling} (only plain rope is implemented)")));
            }
        }
        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let cfg = Self {
            arch,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers: usize_of("num_hidden_layers")?,
            num_heads,
            num_kv_heads: opt_usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim: opt_usize("head_dim")?.or(hidden_size.checked_div(num_heads)).unwrap_or(0),
            rms_norm_eps: opt_f64("rms_norm_eps")?.ok_or_else(|| invalid("missing 'rms_norm_eps'".into()))?,
            rope_theta: opt_f64("rope_theta")?.unwrap_or(10_000.0) as f32,
            rope_style: RopeStyle::Neox,
            max_position_embeddings: usize_of("max_position_embeddings")?,
            attention_bias: match field("attention_bias") {
                Some(v) => {
                    v.as_bool().ok_or_else(|| invalid(format!("'attention_bias' must be true or false, not {v}")))?
                }
                None => arch == Arch::Qwen2,
            },
        };
        cfg.validate("config.json")
    }

    /// Rejects hyper-parameters the kernels cannot run (a zero would divide by zero or make
    /// empty chunks deep in attention), naming the first offending field of `source`.
    fn validate(self, source: &str) -> Result<Self> {
        let problem = if self.num_heads == 0 {
            Some("the attention head count (num_attention_heads / attention.head_count) is 0".to_string())
        } else if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            Some(format!(
                "num_key_value_heads {} does not divide num_attention_heads {}",
                self.num_kv_heads, self.num_heads
            ))
        } else if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            Some(format!("head_dim {} is not a positive even number", self.head_dim))
        } else {
            [
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_layers),
                ("vocab_size", self.vocab_size),
                ("max_position_embeddings", self.max_position_embeddings),
            ]
            .iter()
            .find(|(_, v)| *v == 0)
            .map(|(k, _)| format!("{k} is 0"))
        };
        match problem {
            None => Ok(self),
            Some(p) => Err(ModelError::Invalid(format!("{source}: {p}"))),
        }
    }
}
