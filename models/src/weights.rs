//! Where weights come from: a GGUF file (quantized blocks kept as they are) or a Hugging Face
//! safetensors directory (float tensors). Both are addressed by GGUF tensor names
//! (`blk.3.attn_q.weight`), so model files are written once for both formats.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use kiln_kernels::quant::Form as QuantForm;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One weight as stored: quantized blocks, or a float tensor (converted to f32).
#[derive(Debug, Clone)]
pub enum Weight {
    Quant(Arc<QTensor>),
    Float(Tensor),
}

impl Weight {
    /// Logical shape, `[out, in]` for matrices (GGUF's reversed dimension order undone).
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Quant(q) => q.shape().dims(),
            Weight::Float(t) => t.dims(),
        }
    }

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
    /// Which of llama.cpp's code paths the quantized matmuls follow (see `LoadOptions`).
    quant_form: QuantForm,
}

impl WeightStore {
    pub fn open_gguf(path: &Path, device: &Device) -> Result<(Self, ModelConfig)> {
        let mut file = File::open(path).map_err(|e| io_error(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| match first_unrepresentable_tensor(path) {
            Some((tensor, id)) => ModelError::UnsupportedDType {
                tensor: format!("{tensor} in {}", path.display()),
                dtype: format!(
                    "{} (ggml type {id}; candle has no kernels for it: use a K-quant, Q8_0 or float file)",
                    ggml_type_name(id)
                ),
            },
            None => {
                ModelError::Invalid(format!("{}: not a readable GGUF file: {}", path.display(), ModelError::from(e)))
            }
        })?;
        let cfg = ModelConfig::from_gguf(&content).map_err(|e| match e {
            ModelError::Invalid(msg) => ModelError::Invalid(format!("{}: {msg}", path.display())),
            other => other,
        })?;
        let source = Source::Gguf { content, file, path: path.to_path_buf() };
        Ok((Self { source, device: device.clone(), dequantize: false, quant_form: QuantForm::default() }, cfg))
    }

    /// A directory with `config.json` and one or more `*.safetensors` files.
    pub fn open_safetensors(dir: &Path, device: &Device) -> Result<(Self, ModelConfig)> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| io_error(&config_path, e))?;
        let cfg = ModelConfig::from_hf_json(&text).map_err(|e| match e {
            ModelError::Invalid(msg) => ModelError::Invalid(format!("{}: {msg}", dir.display())),
            other => other,
        })?;
        let tensors = read_safetensors_dir(dir, device)?;
        let store = Self {
            source: Source::Safetensors { tensors },
            device: device.clone(),
            dequantize: false,
            quant_form: QuantForm::default(),
        };
        Ok((store, cfg))
    }

    /// Hand out quantized GGUF tensors as f32 from now on.
    pub fn set_dequantize(&mut self, on: bool) {
        self.dequantize = on;
    }

    pub fn set_quant_form(&mut self, form: QuantForm) {
        self.quant_form = form;
    }

    pub fn quant_form(&self) -> QuantForm {
        self.quant_form
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
                // The type was accepted with the header, so a failure here is the file itself
                // (truncated, or an offset past its end), not an unsupported type.
                let q = content.tensor(file, name, &self.device).map_err(|e| {
                    ModelError::Invalid(format!(
                        "{}: cannot read tensor '{name}' ({dtype:?}): {}",
                        path.display(),
                        ModelError::from(e)
                    ))
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
        self.try_get(name)?.ok_or_else(|| ModelError::MissingTensor(self.file_name(name)))
    }

    /// [`Self::get`], checked to have `shape` (`[out, in]` for matrices): a tensor that does
    /// not fit the config would otherwise surface as an out-of-bounds index inside a kernel.
    pub fn get_shaped(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.try_get_shaped(name, shape)?.ok_or_else(|| ModelError::MissingTensor(self.file_name(name)))
    }

    /// [`Self::try_get`] with the shape check of [`Self::get_shaped`].
    pub fn try_get_shaped(&mut self, name: &str, shape: &[usize]) -> Result<Option<Weight>> {
        match self.try_get(name)? {
            Some(w) if w.dims() != shape => Err(ModelError::Invalid(format!(
                "tensor '{}' has shape {:?}, the config implies {shape:?}",
                self.file_name(name),
                w.dims()
            ))),
            w => Ok(w),
        }
    }

    /// The name a tensor has in the files being read, for messages.
    fn file_name(&self, name: &str) -> String {
        match &self.source {
            Source::Gguf { .. } => name.to_string(),
            Source::Safetensors { .. } => hf_name(name),
        }
    }
}

/// `NotFound` for a path that does not exist, an `Io` error (naming the path) otherwise.
fn io_error(path: &Path, e: std::io::Error) -> ModelError {
    match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::NotFound(path.display().to_string()),
        _ => ModelError::Io { path: path.display().to_string(), source: e },
    }
}

/// Every tensor of the `*.safetensors` files in `dir` (read in file-name order), by name.
pub fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::NotFound(format!("no *.safetensors in {}", dir.display())));
    }
    let mut tensors = HashMap::new();
    for f in files {
        let file = candle_core::safetensors::load(&f, device).map_err(|e| {
            ModelError::Invalid(format!("{}: not a readable safetensors file: {}", f.display(), ModelError::from(e)))
        })?;
        tensors.extend(file);
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

/// ggml type ids (ggml.h `enum ggml_type`) that candle's `GgmlDType` has no variant for.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "an unknown ggml type",
    }
}

/// The ggml type ids candle reads (`GgmlDType::from_u32`, which is private to candle).
const CANDLE_GGML_TYPES: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// After candle refused a GGUF header: the first tensor whose ggml type candle cannot hold, as
/// (name, type id), so the error names it (candle's says only "unknown dtype for tensor 20").
/// Walks the header per the GGUF spec (key/values, then tensor infos) without keeping values;
/// `None` when the file fails for another reason.
fn first_unrepresentable_tensor(path: &Path) -> Option<(String, u32)> {
    let mut h = Header { r: std::io::BufReader::new(File::open(path).ok()?), wide: true };
    if h.u32()? != 0x4655_4747 {
        return None; // not "GGUF"
    }
    h.wide = h.u32()? >= 2; // version 1 has 32-bit lengths and dimensions
    let (n_tensors, n_kv) = (h.len()?, h.len()?);
    for _ in 0..n_kv {
        h.skip_string()?;
        let ty = h.u32()?;
        h.skip_value(ty, 0)?;
    }
    for _ in 0..n_tensors {
        let n = h.len()?;
        let mut name = vec![0u8; usize::try_from(n).ok().filter(|&n| n <= 1 << 16)?];
        h.r.read_exact(&mut name).ok()?;
        let dims = u64::from(h.u32()?).min(8);
        h.skip(dims * if h.wide { 8 } else { 4 })?;
        let ty = h.u32()?;
        h.skip(8)?; // data offset
        if !CANDLE_GGML_TYPES.contains(&ty) {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}

struct Header {
    r: std::io::BufReader<File>,
    /// GGUF v2+: lengths are u64.
    wide: bool,
}

impl Header {
    fn u32(&mut self) -> Option<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn len(&mut self) -> Option<u64> {
        if !self.wide {
            return self.u32().map(u64::from);
        }
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        self.r.seek_relative(i64::try_from(n).ok()?).ok()
    }

    fn skip_string(&mut self) -> Option<()> {
        let n = self.len()?;
        self.skip(n)
    }

    /// Skips one metadata value of GGUF value type `ty`; arrays may nest (not deeply).
    fn skip_value(&mut self, ty: u32, depth: u32) -> Option<()> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            8 => self.skip_string(),
            9 if depth < 4 => {
                let (elem, n) = (self.u32()?, self.len()?);
                match fixed(elem) {
                    Some(size) => self.skip(n.checked_mul(size)?),
                    None => (0..n).try_for_each(|_| self.skip_value(elem, depth + 1)),
                }
            }
            _ => self.skip(fixed(ty)?),
        }
    }
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
