//! Where weights come from: a GGUF file (quantized blocks kept as they are) or a Hugging Face
//! safetensors directory (float tensors). Both are addressed by GGUF tensor names
//! (`blk.3.attn_q.weight`), so model files are written once for both formats.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One weight as stored: quantized blocks, or a float tensor (converted to f32).
#[derive(Debug, Clone)]
pub enum Weight {
    Quant(Arc<QTensor>),
    Float(Tensor),
}

impl Weight {
    /// Dequantized f32 view (norm weights and biases are always used this way).
    pub fn to_f32(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Quant(q) => q.dequantize(device)?,
            Weight::Float(t) => t.to_dtype(DType::F32)?,
        })
    }
}

enum Source {
    Gguf { content: gguf_file::Content, file: File, path: PathBuf },
    Safetensors { tensors: HashMap<String, Tensor> },
}

pub struct WeightStore {
    source: Source,
    device: Device,
    dequantize: bool,
}

impl WeightStore {
    pub fn open_gguf(path: &Path, device: &Device) -> Result<(Self, ModelConfig)> {
        let io = |source| ModelError::Io { path: path.display().to_string(), source };
        let mut file = File::open(path).map_err(io)?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::Invalid(format!("{}: not a readable GGUF file: {e}", path.display())))?;
        let cfg = ModelConfig::from_gguf(&content)?;
        let source = Source::Gguf { content, file, path: path.to_path_buf() };
        Ok((Self { source, device: device.clone(), dequantize: false }, cfg))
    }

    /// A directory with `config.json` and one or more `*.safetensors` files.
    pub fn open_safetensors(dir: &Path, device: &Device) -> Result<(Self, ModelConfig)> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| ModelError::Io { path: config_path.display().to_string(), source })?;
        let cfg = ModelConfig::from_hf_json(&text)?;
        let tensors = read_safetensors_dir(dir, device)?;
        Ok((Self { source: Source::Safetensors { tensors }, device: device.clone(), dequantize: false }, cfg))
    }

    /// Hand out quantized GGUF tensors as f32 from now on.
    pub fn set_dequantize(&mut self, on: bool) {
        self.dequantize = on;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weight stored under a GGUF-style name, or `None` when absent.
    pub fn try_get(&mut self, name: &str) -> Result<Option<Weight>> {
        match &mut self.source {
            Source::Gguf { content, file, path } => {
                let Some(info) = content.tensor_infos.get(name) else { return Ok(None) };
                let dtype = info.ggml_dtype;
                let q = content.tensor(file, name, &self.device).map_err(|e| ModelError::UnsupportedDType {
                    tensor: format!("{name} in {}", path.display()),
                    dtype: format!("{dtype:?} ({e})"),
                })?;
                let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                Ok(Some(if float || self.dequantize {
                    Weight::Float(q.dequantize(&self.device)?)
                } else {
                    Weight::Quant(Arc::new(q))
                }))
            }
            Source::Safetensors { tensors } => {
                let hf = hf_name(name);
                Ok(tensors.remove(&hf).map(|t| t.to_dtype(DType::F32)).transpose()?.map(Weight::Float))
            }
        }
    }

    pub fn get(&mut self, name: &str) -> Result<Weight> {
        self.try_get(name)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }
}

/// Every tensor of the `*.safetensors` files in `dir` (read in file-name order), by name.
pub fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::NotFound(format!("no *.safetensors in {}", dir.display())));
    }
    let mut tensors = HashMap::new();
    for f in files {
        tensors.extend(candle_core::safetensors::load(&f, device)?);
    }
    Ok(tensors)
}

/// Maps a GGUF tensor name to its Hugging Face (llama/qwen2 family) name.
pub fn hf_name(gguf: &str) -> String {
    let (stem, suffix) = gguf.rsplit_once('.').unwrap_or((gguf, "weight"));
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => match stem.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((layer, part)) => {
                let part = match part {
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "attn_q" => "self_attn.q_proj",
                    "attn_k" => "self_attn.k_proj",
                    "attn_v" => "self_attn.v_proj",
                    "attn_output" => "self_attn.o_proj",
                    "ffn_gate" => "mlp.gate_proj",
                    "ffn_up" => "mlp.up_proj",
                    "ffn_down" => "mlp.down_proj",
                    other => other,
                };
                format!("model.layers.{layer}.{part}")
            }
            None => stem.to_string(),
        },
    };
    format!("{mapped}.{suffix}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn maps_gguf_names_to_hf() {
        assert_eq!(super::hf_name("blk.12.attn_q.bias"), "model.layers.12.self_attn.q_proj.bias");
        assert_eq!(super::hf_name("blk.0.ffn_down.weight"), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(super::hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(super::hf_name("output.weight"), "lm_head.weight");
    }
}
