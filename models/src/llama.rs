//! The llama decoder: pre-norm blocks of GQA self-attention and SwiGLU, RMSNorm, rotary
//! positions, optional tied output. Reads weights by GGUF names, so one definition serves GGUF
//! (quantized) and safetensors (float) checkpoints; qwen2 reuses it (see `qwen2.rs`).

use crate::batch::ForwardBatch;
use crate::config::ModelConfig;
use crate::error::Result;
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
        let embed_w = store.get_shaped("token_embd.weight", &[cfg.vocab_size, cfg.hidden_size])?;
        let lm_head = match store.try_get_shaped("output.weight", &[cfg.vocab_size, cfg.hidden_size])? {
            Some(w) => Linear::new(w, None)?,
            None => Linear::new(embed_w.clone(), None)?, // tied output
        }
        .with_form(store.quant_form());
        let blocks = (0..cfg.num_layers).map(|i| load_block(&cfg, store, i)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            store.get_shaped("output_norm.weight", &[cfg.hidden_size])?.to_f32(&device)?,
            cfg.rms_norm_eps,
        );
        let rope = RopeTable::new(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta);
        Ok(Self { embed: Embedding::new(embed_w), blocks, norm, lm_head, rope, device, cfg })
    }
}

fn load_block(cfg: &ModelConfig, store: &mut WeightStore, i: usize) -> Result<Block> {
    let (device, form) = (store.device().clone(), store.quant_form());
    let (hidden, q_n, kv_n, ffn) =
        (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    let mut w = |name: &str, shape: &[usize]| store.get_shaped(&format!("blk.{i}.{name}"), shape);
    let norm = |w: Weight| -> Result<RmsNorm> { Ok(RmsNorm::new(w.to_f32(&device)?, cfg.rms_norm_eps)) };
    let attn_norm = norm(w("attn_norm.weight", &[hidden])?)?;
    let ffn_norm = norm(w("ffn_norm.weight", &[hidden])?)?;
    let qkv_w = vec![
        w("attn_q.weight", &[q_n, hidden])?,
        w("attn_k.weight", &[kv_n, hidden])?,
        w("attn_v.weight", &[kv_n, hidden])?,
    ];
    let qkv_b = if cfg.attention_bias {
        let b = [w("attn_q.bias", &[q_n])?, w("attn_k.bias", &[kv_n])?, w("attn_v.bias", &[kv_n])?];
        Some(b.iter().map(|b| b.to_f32(&device)).collect::<Result<Vec<_>>>()?)
    } else {
        None
    };
    let o = Linear::new(w("attn_output.weight", &[hidden, q_n])?, None)?.with_form(form);
    let shape = AttnShape {
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: 0, // set per forward from the cache
        scale: 1.0 / (cfg.head_dim as f32).sqrt(),
    };
    let attn = Attention::new(Linear::fused(qkv_w, qkv_b)?.with_form(form), o, shape, cfg.rope_style);
    let gate_up =
        Linear::fused(vec![w("ffn_gate.weight", &[ffn, hidden])?, w("ffn_up.weight", &[ffn, hidden])?], None)?;
    let down = Linear::new(w("ffn_down.weight", &[hidden, ffn])?, None)?;
    let mlp = Mlp::new(gate_up.with_form(form), down.with_form(form), cfg.intermediate_size);
    Ok(Block { attn_norm, attn, ffn_norm, mlp })
}

impl CausalLM for Llama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut PagedKvCache) -> Result<Tensor> {
        batch.validate(&self.cfg, cache)?;
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
