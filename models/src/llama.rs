//! The llama decoder: pre-norm blocks of GQA self-attention and SwiGLU, RMSNorm, rotary
//! positions, optional tied output. Reads weights by GGUF names, so one definition serves GGUF
//! (quantized) and safetensors (float) checkpoints; qwen2 reuses it (see `qwen2.rs`).

use crate::batch::ForwardBatch;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use crate::layers::{Attention, Embedding, Linear, Mlp, RmsNorm};
use crate::weights::{Weight, WeightStore};
use crate::CausalLM;
use candle_core::{Device, Tensor};
use kiln_kernels::{AttnShape, RopeTable};

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

pub struct Llama {
    cfg: ModelConfig,
    device: Device,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RopeTable,
}

impl Llama {
    pub fn load(cfg: ModelConfig, store: &mut WeightStore) -> Result<Self> {
        let device = store.device().clone();
        let embed_w = store.get("token_embd.weight")?;
        let lm_head = match store.try_get("output.weight")? {
            Some(w) => Linear::new(w, None)?,
            None => Linear::new(embed_w.clone(), None)?, // tied output
        };
        let blocks = (0..cfg.num_layers).map(|i| load_block(&cfg, store, i)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(store.get("output_norm.weight")?.to_f32(&device)?, cfg.rms_norm_eps);
        let rope = RopeTable::new(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta);
        Ok(Self { embed: Embedding::new(embed_w), blocks, norm, lm_head, rope, device, cfg })
    }

    fn check_batch(&self, batch: &ForwardBatch, cache: &PagedKvCache) -> Result<()> {
        let slots = cache.num_blocks() * cache.block_size();
        let bad = batch.positions.iter().any(|&p| p as usize >= self.cfg.max_position_embeddings)
            || batch.slots.iter().any(|&s| s as usize >= slots)
            || batch.token_ids.iter().any(|&t| t as usize >= self.cfg.vocab_size)
            || batch.logits_rows.iter().any(|&r| r as usize >= batch.num_rows())
            || batch.block_tables.iter().flatten().any(|&b| b as usize >= cache.num_blocks());
        if batch.is_empty() || bad {
            return Err(ModelError::InvalidBatch("empty batch, or a position, slot, block or token id out of range".into()));
        }
        Ok(())
    }
}

fn load_block(cfg: &ModelConfig, store: &mut WeightStore, i: usize) -> Result<Block> {
    let device = store.device().clone();
    let mut w = |name: &str| store.get(&format!("blk.{i}.{name}"));
    let norm = |w: Weight| -> Result<RmsNorm> { Ok(RmsNorm::new(w.to_f32(&device)?, cfg.rms_norm_eps)) };
    let attn_norm = norm(w("attn_norm.weight")?)?;
    let ffn_norm = norm(w("ffn_norm.weight")?)?;
    let qkv_w = vec![w("attn_q.weight")?, w("attn_k.weight")?, w("attn_v.weight")?];
    let qkv_b = if cfg.attention_bias {
        let b = [w("attn_q.bias")?, w("attn_k.bias")?, w("attn_v.bias")?];
        Some(b.iter().map(|b| b.to_f32(&device)).collect::<Result<Vec<_>>>()?)
    } else {
        None
    };
    let o = Linear::new(w("attn_output.weight")?, None)?;
    let shape = AttnShape {
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: 0, // set per forward from the cache
        scale: 1.0 / (cfg.head_dim as f32).sqrt(),
    };
    let attn = Attention::new(Linear::fused(qkv_w, qkv_b)?, o, shape, cfg.rope_style);
    let gate_up = Linear::fused(vec![w("ffn_gate.weight")?, w("ffn_up.weight")?], None)?;
    let mlp = Mlp::new(gate_up, Linear::new(w("ffn_down.weight")?, None)?, cfg.intermediate_size);
    Ok(Block { attn_norm, attn, ffn_norm, mlp })
}

impl CausalLM for Llama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut PagedKvCache) -> Result<Tensor> {
        self.check_batch(batch, cache)?;
        let ids = Tensor::new(batch.token_ids.as_slice(), &self.device)?;
        let mut x = self.embed.forward(&ids)?; // [rows, hidden]
        let block_size = cache.block_size();
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.attn_norm.forward(&x)?;
            let a = b.attn.forward(&h, batch, block_size, &self.rope, cache.layer_mut(i))?;
            x = (x + a)?;
            let h = b.ffn_norm.forward(&x)?;
            x = (&x + b.mlp.forward(&h)?)?;
        }
        if batch.logits_rows.is_empty() {
            // Every sequence is mid-prefill: the step only filled the cache.
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), candle_core::DType::F32, &self.device)?);
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        self.lm_head.forward(&x) // [logits_rows, vocab]
    }
}
