//! BERT-family sentence encoders (all-MiniLM-L6-v2 and kin): a Hugging Face `BertModel`
//! safetensors directory plus its sentence-transformers config (`modules.json`,
//! `1_Pooling/config.json`, `sentence_bert_config.json`).
//!
//! A pure function of (weights, flattened batch) -> token states -> one pooled (and, when the
//! config has a `Normalize` module, L2-normalized) vector per sequence. The batch is sequences
//! laid end to end with offsets, no padding: attention is bidirectional within a sequence only,
//! pooling reads only the sequence's own rows. Every kernel computes a row from that row's own
//! data (`kiln_kernels::dense`, `encoder_attention`), so a sequence's embedding is the same bits
//! alone or in any batch.
//!
//! Runs on the CPU through kiln's kernels (f32 or bf16 matmuls; attention, norms and pooling in
//! f32). Must not: tokenize, truncate or batch (the embedding queue in `kiln-inference` does).

use crate::error::{ModelError, Result};
use crate::weights::read_safetensors_dir;
use candle_core::{DType, Device, Tensor};
use kiln_kernels::activation::{gelu_inplace, layer_norm_inplace};
pub use kiln_kernels::dense::DensePrecision;
use kiln_kernels::dense::{dense, DenseMatrix};
use kiln_kernels::encoder_attention::{encoder_attention, EncoderAttnShape};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// The `config.json` fields a BERT encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pos() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ModelError::Invalid(format!("config.json: {e}")))?;
        if let Some(t) = cfg.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(ModelError::UnsupportedArchitecture(format!("{t} (embedding models: bert)")));
        }
        // HF's "gelu" is the exact erf form; the tanh approximations would need another kernel.
        if cfg.hidden_act != "gelu" {
            return Err(ModelError::Invalid(format!("hidden_act '{}' (supported: gelu)", cfg.hidden_act)));
        }
        if cfg.position_embedding_type != "absolute" {
            return Err(ModelError::Invalid(format!("position_embedding_type '{}'", cfg.position_embedding_type)));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(ModelError::Invalid("hidden_size must be a multiple of num_attention_heads".into()));
        }
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// How token states become one vector (sentence-transformers' `Pooling` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of all the sequence's token states (special tokens included, as the attention
    /// mask of an unpadded sequence is all ones).
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// The last token's state.
    LastToken,
}

/// The sentence-transformers pipeline after the transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    /// A `Normalize` module follows pooling.
    pub normalize: bool,
    /// `sentence_bert_config.json`'s `max_seq_length` (tokens, specials included): longer inputs
    /// are cut to it. Defaults to the model's position table.
    pub max_seq_length: usize,
    /// `sentence_bert_config.json`'s `do_lower_case`: text is lowercased before tokenizing.
    pub lowercase: bool,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    let v = serde_json::from_str(&text).map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(Some(v))
}

impl SentenceConfig {
    /// Reads the directory's sentence-transformers files. Without `modules.json` this is what
    /// sentence-transformers builds for a plain transformer: mean pooling, no normalization.
    pub fn read(dir: &Path, max_positions: usize) -> Result<Self> {
        let mut cfg = SentenceConfig {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: max_positions,
            lowercase: false,
        };
        if let Some(sb) = read_json(&dir.join("sentence_bert_config.json"))? {
            if let Some(n) = sb["max_seq_length"].as_u64() {
                cfg.max_seq_length = (n as usize).min(max_positions);
            }
            cfg.lowercase = sb["do_lower_case"].as_bool().unwrap_or(false);
        }
        let Some(modules) = read_json(&dir.join("modules.json"))? else { return Ok(cfg) };
        let modules = modules.as_array().cloned().unwrap_or_default();
        let kind = |m: &serde_json::Value| {
            m["type"].as_str().unwrap_or_default().rsplit('.').next().unwrap_or_default().to_string()
        };
        for m in &modules {
            match kind(m).as_str() {
                "Transformer" => {}
                "Pooling" => {
                    let path = dir.join(m["path"].as_str().unwrap_or("1_Pooling")).join("config.json");
                    let p = read_json(&path)?.ok_or_else(|| ModelError::NotFound(path.display().to_string()))?;
                    cfg.pooling = pooling_mode(&p)?;
                }
                "Normalize" => cfg.normalize = true,
                other => return Err(ModelError::Invalid(format!("modules.json: unsupported module '{other}'"))),
            }
        }
        Ok(cfg)
    }
}

/// The one pooling mode a `1_Pooling/config.json` enables (several at once concatenate in
/// sentence-transformers; kiln does not support that, nor max / sqrt-length pooling).
fn pooling_mode(p: &serde_json::Value) -> Result<Pooling> {
    let on = |k: &str| p[k].as_bool().unwrap_or(false);
    let modes: Vec<Pooling> = [
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_lasttoken", Pooling::LastToken),
    ]
    .into_iter()
    .filter(|(k, _)| on(k))
    .map(|(_, m)| m)
    .collect();
    let unsupported =
        ["pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens"];
    match (modes.as_slice(), unsupported.iter().find(|k| on(k))) {
        ([one], None) => Ok(*one),
        (_, Some(k)) => Err(ModelError::Invalid(format!("pooling: {k} is not supported"))),
        _ => Err(ModelError::Invalid("pooling: exactly one of mean / cls / lasttoken must be enabled".into())),
    }
}

/// Sequences laid end to end: sequence `s` is `token_ids[offsets[s]..offsets[s + 1]]`.
#[derive(Debug, Clone)]
pub struct EncoderBatch {
    pub token_ids: Vec<u32>,
    /// `[seqs + 1]`, starting at 0.
    pub offsets: Vec<usize>,
}

impl Default for EncoderBatch {
    fn default() -> Self {
        Self { token_ids: Vec::new(), offsets: vec![0] }
    }
}

impl EncoderBatch {
    pub fn push(&mut self, ids: &[u32]) {
        self.token_ids.extend_from_slice(ids);
        self.offsets.push(self.token_ids.len());
    }

    pub fn num_seqs(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// `[3 * hidden, hidden]`: query rows, then key, then value.
    qkv: DenseMatrix,
    attn_out: DenseMatrix,
    attn_norm: LayerNorm,
    up: DenseMatrix,
    down: DenseMatrix,
    out_norm: LayerNorm,
}

/// Load-time choices.
#[derive(Debug, Clone, Copy)]
pub struct BertOptions {
    /// Matmul precision; `DensePrecision::fastest()` by default (bf16 where the CPU has it).
    pub precision: DensePrecision,
}

impl Default for BertOptions {
    fn default() -> Self {
        Self { precision: DensePrecision::fastest() }
    }
}

pub struct Bert {
    cfg: BertConfig,
    sentence: SentenceConfig,
    /// `[vocab, hidden]`
    word: Vec<f32>,
    /// `[max_positions, hidden]`
    position: Vec<f32>,
    /// `[hidden]`: token type 0 (single-segment inputs).
    token_type: Vec<f32>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    scratch: Mutex<Scratch>,
}

/// Tensors of a safetensors directory by name, as f32 vectors.
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        Ok(Self(read_safetensors_dir(dir, &Device::Cpu)?))
    }

    /// `name` as saved by `BertModel`, or with the `bert.` prefix of task-head checkpoints.
    fn get(&mut self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .0
            .remove(name)
            .or_else(|| self.0.remove(&format!("bert.{name}")))
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if t.dims() != dims {
            return Err(ModelError::Invalid(format!("{name}: shape {:?}, expected {dims:?}", t.dims())));
        }
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn norm(&mut self, prefix: &str, h: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: self.get(&format!("{prefix}.weight"), &[h])?,
            beta: self.get(&format!("{prefix}.bias"), &[h])?,
        })
    }

    /// A `Linear`'s weight `[n, k]` and bias `[n]`, packed.
    fn dense(&mut self, prefix: &str, n: usize, k: usize, p: DensePrecision) -> Result<DenseMatrix> {
        let w = self.get(&format!("{prefix}.weight"), &[n, k])?;
        let b = self.get(&format!("{prefix}.bias"), &[n])?;
        Ok(DenseMatrix::new(&w, Some(&b), n, k, p))
    }
}

impl Bert {
    /// Loads `config.json`, the safetensors weights and the sentence-transformers config of
    /// `dir`.
    pub fn load(dir: &Path, opts: BertOptions) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
        let cfg = BertConfig::from_json(&text)?;
        let sentence = SentenceConfig::read(dir, cfg.max_position_embeddings)?;
        let mut w = Weights::open(dir)?;
        let (h, i, p) = (cfg.hidden_size, cfg.intermediate_size, opts.precision);
        let word = w.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = w.get("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?;
        let types = w.get("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?;
        let emb_norm = w.norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("encoder.layer.{l}");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_w.extend(w.get(&format!("{pre}.attention.self.{part}.weight"), &[h, h])?);
                qkv_b.extend(w.get(&format!("{pre}.attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv: DenseMatrix::new(&qkv_w, Some(&qkv_b), 3 * h, h, p),
                attn_out: w.dense(&format!("{pre}.attention.output.dense"), h, h, p)?,
                attn_norm: w.norm(&format!("{pre}.attention.output.LayerNorm"), h)?,
                up: w.dense(&format!("{pre}.intermediate.dense"), i, h, p)?,
                down: w.dense(&format!("{pre}.output.dense"), h, i, p)?,
                out_norm: w.norm(&format!("{pre}.output.LayerNorm"), h)?,
            });
        }
        let token_type = types[..h].to_vec();
        Ok(Self { cfg, sentence, word, position, token_type, emb_norm, layers, scratch: Mutex::default() })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn sentence_config(&self) -> &SentenceConfig {
        &self.sentence
    }

    /// Length of the vectors `embed` returns.
    pub fn dim(&self) -> usize {
        self.cfg.hidden_size
    }

    fn check(&self, batch: &EncoderBatch) -> Result<()> {
        let o = &batch.offsets;
        if o.first() != Some(&0) || o.last() != Some(&batch.token_ids.len()) || o.windows(2).any(|w| w[0] > w[1]) {
            return Err(ModelError::InvalidBatch("offsets must run from 0 to the token count, non-decreasing".into()));
        }
        if let Some(w) = o.windows(2).find(|w| w[1] - w[0] > self.cfg.max_position_embeddings || w[1] == w[0]) {
            return Err(ModelError::InvalidBatch(format!(
                "a sequence has {} tokens (1 to {} allowed)",
                w[1] - w[0],
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(&id) = batch.token_ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::InvalidBatch(format!(
                "token id {id} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// `[tokens, hidden]` last-layer token states of every sequence in `batch`.
    pub fn token_states(&self, batch: &EncoderBatch) -> Result<Vec<f32>> {
        self.encode(batch, |states| states.to_vec())
    }

    /// One vector per sequence: token states pooled, then L2-normalized when the model's
    /// sentence-transformers config says so.
    pub fn embed(&self, batch: &EncoderBatch) -> Result<Vec<Vec<f32>>> {
        let mut out =
            self.encode(batch, |states| pool(states, self.cfg.hidden_size, &batch.offsets, self.sentence.pooling))?;
        if self.sentence.normalize {
            out.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok(out)
    }

    /// Runs the encoder on `batch` in the scratch buffers and hands `f` the final states.
    fn encode<R>(&self, batch: &EncoderBatch, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        self.check(batch)?;
        let (h, t) = (self.cfg.hidden_size, batch.num_tokens());
        // A poisoned lock only means an earlier call panicked mid-layer: the buffers are
        // overwritten before being read, so they are still fine to use.
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let x = take(&mut scratch.x, t * h);
        for w in batch.offsets.windows(2) {
            for (pos, row) in (w[0]..w[1]).enumerate() {
                let id = batch.token_ids[row] as usize;
                let (we, pe) = (&self.word[id * h..(id + 1) * h], &self.position[pos * h..(pos + 1) * h]);
                for (j, o) in x[row * h..(row + 1) * h].iter_mut().enumerate() {
                    *o = we[j] + self.token_type[j] + pe[j];
                }
            }
        }
        layer_norm_inplace(x, &[], &self.emb_norm.gamma, &self.emb_norm.beta, self.cfg.layer_norm_eps as f32);
        for layer in &self.layers {
            self.layer(layer, &mut scratch, &batch.offsets);
        }
        Ok(f(take(&mut scratch.x, t * h)))
    }

    /// One encoder layer on `s.x` in place: post-norm attention block, then post-norm GELU MLP.
    fn layer(&self, l: &Layer, s: &mut Scratch, offsets: &[usize]) {
        let (h, t, eps) = (self.cfg.hidden_size, offsets.last().copied().unwrap_or(0), self.cfg.layer_norm_eps as f32);
        let shape = EncoderAttnShape {
            heads: self.cfg.num_attention_heads,
            head_dim: self.cfg.head_dim(),
            scale: 1.0 / (self.cfg.head_dim() as f32).sqrt(),
        };
        let Scratch { x, a, qkv, ctx, up } = s;
        let (x, a) = (take(x, t * h), take(a, t * h)); // [t, h]
        let (qkv, ctx) = (take(qkv, t * 3 * h), take(ctx, t * h)); // [t, 3h], [t, h]
        let up = take(up, t * self.cfg.intermediate_size); // [t, intermediate]
        dense(x, t, &l.qkv, qkv);
        encoder_attention(qkv, offsets, &shape, ctx);
        dense(ctx, t, &l.attn_out, a);
        layer_norm_inplace(a, x, &l.attn_norm.gamma, &l.attn_norm.beta, eps);
        dense(a, t, &l.up, up);
        gelu_inplace(up);
        dense(up, t, &l.down, x);
        layer_norm_inplace(x, a, &l.out_norm.gamma, &l.out_norm.beta, eps);
    }
}

/// Activation buffers kept across layers and calls: the embedding worker runs batch after
/// batch, and fresh multi-megabyte vectors would be page-faulted in and zeroed every time.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    a: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    up: Vec<f32>,
}

/// The first `n` elements of `v`, growing it when needed (contents are stale: callers
/// overwrite before reading).
fn take(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Pools `states` (`[tokens, hidden]`) per sequence of `offsets`. Sequences must be non-empty.
pub fn pool(states: &[f32], hidden: usize, offsets: &[usize], pooling: Pooling) -> Vec<Vec<f32>> {
    let row = |r: usize| &states[r * hidden..(r + 1) * hidden];
    offsets
        .windows(2)
        .map(|w| match pooling {
            Pooling::Cls => row(w[0]).to_vec(),
            Pooling::LastToken => row(w[1] - 1).to_vec(),
            Pooling::Mean => {
                let mut sum = vec![0f32; hidden];
                for r in w[0]..w[1] {
                    sum.iter_mut().zip(row(r)).for_each(|(s, v)| *s += v);
                }
                let n = (w[1] - w[0]) as f32;
                sum.iter_mut().for_each(|s| *s /= n);
                sum
            }
        })
        .collect()
}

/// `v / max(|v|, 1e-12)` (PyTorch's `F.normalize`, as sentence-transformers' `Normalize`).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pooling_modes_follow_the_config() {
        assert_eq!(pooling_mode(&json!({"pooling_mode_mean_tokens": true})).ok(), Some(Pooling::Mean));
        assert_eq!(
            pooling_mode(&json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false})).ok(),
            Some(Pooling::Cls)
        );
        assert_eq!(pooling_mode(&json!({"pooling_mode_lasttoken": true})).ok(), Some(Pooling::LastToken));
        assert!(pooling_mode(&json!({"pooling_mode_max_tokens": true})).is_err());
        assert!(pooling_mode(&json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true})).is_err());
        assert!(pooling_mode(&json!({})).is_err());
    }

    #[test]
    fn pool_and_normalize() {
        // two sequences of hidden 2: rows [1,2],[3,4] | [5,6]
        let states = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let offsets = [0, 2, 3];
        assert_eq!(pool(&states, 2, &offsets, Pooling::Mean), vec![vec![2.0, 3.0], vec![5.0, 6.0]]);
        assert_eq!(pool(&states, 2, &offsets, Pooling::Cls), vec![vec![1.0, 2.0], vec![5.0, 6.0]]);
        assert_eq!(pool(&states, 2, &offsets, Pooling::LastToken), vec![vec![3.0, 4.0], vec![5.0, 6.0]]);
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }

    #[test]
    fn sentence_config_reads_the_files() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kiln-bert-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let write = |p: &str, v: serde_json::Value| {
            std::fs::write(dir.join(p), v.to_string()).map_err(|e| ModelError::Invalid(e.to_string()))
        };
        let plain = SentenceConfig { pooling: Pooling::Mean, normalize: false, max_seq_length: 512, lowercase: false };
        assert_eq!(SentenceConfig::read(&dir, 512)?, plain);
        write(
            "modules.json",
            json!([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            ]),
        )?;
        write("1_Pooling/config.json", json!({"pooling_mode_cls_token": true}))?;
        write("sentence_bert_config.json", json!({"max_seq_length": 256, "do_lower_case": true}))?;
        let got = SentenceConfig::read(&dir, 512)?;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            got,
            SentenceConfig { pooling: Pooling::Cls, normalize: true, max_seq_length: 256, lowercase: true }
        );
        Ok(())
    }
}
