//! The runner: owns the model and its paged KV cache, turns the scheduler's output into one
//! flattened batch per step, runs the forward pass and hands back logits rows. It knows nothing
//! of sampling, requests or streams.

use crate::engine::EngineConfig;
use crate::error::EngineError;
use crate::scheduler::{SchedulerOutput, SeqId};
use crate::sequence::Seq;
use kiln_models::{CausalLM, ForwardBatch, ModelConfig, PagedKvCache};
use std::collections::HashMap;

pub struct Runner {
    model: Box<dyn CausalLM>,
    cache: PagedKvCache,
}

impl Runner {
    /// Sizes the cache from the byte budget (or the block-count override); fails when it would
    /// hold fewer than two blocks.
    pub fn new(model: Box<dyn CausalLM>, ecfg: &EngineConfig) -> Result<Self, EngineError> {
        let (cfg, block_size, dtype) = (model.config(), ecfg.block_size, ecfg.kv_dtype);
        let num_blocks = ecfg
            .num_blocks_override
            .unwrap_or_else(|| PagedKvCache::blocks_for_budget(cfg, block_size, dtype, ecfg.kv_cache_memory));
        if num_blocks < 2 {
            return Err(EngineError::Load(format!(
                "a KV cache budget of {} bytes holds {num_blocks} blocks of {block_size} tokens; raise it",
                ecfg.kv_cache_memory
            )));
        }
        let cache = PagedKvCache::new(cfg, num_blocks, block_size, dtype);
        tracing::info!(num_blocks, block_size, tokens = num_blocks * block_size, ?dtype, "KV cache allocated");
        Ok(Self { model, cache })
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks()
    }

    pub fn block_size(&self) -> usize {
        self.cache.block_size()
    }

    /// Runs one step; returns one logits row per scheduled sequence with `needs_logits`, in
    /// schedule order.
    pub(crate) fn step(
        &mut self,
        out: &SchedulerOutput,
        seqs: &HashMap<SeqId, Seq>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        for &(src, dst) in &out.copies {
            self.cache.copy_block(src, dst);
        }
        let mut batch = ForwardBatch::default();
        for s in &out.seqs {
            let seq =
                seqs.get(&s.id).ok_or_else(|| EngineError::Internal(format!("scheduled unknown sequence {}", s.id)))?;
            let tokens = seq
                .tokens()
                .get(s.start..s.start + s.num_tokens)
                .ok_or_else(|| EngineError::Internal(format!("sequence {} scheduled past its tokens", s.id)))?;
            batch.push_seq(tokens, s.start, &s.block_table, self.cache.block_size(), s.needs_logits)?;
        }
        // Inside the pool, every kernel's parallel section starts from a worker thread: waking
        // the pool from outside costs ~10 us per call, hundreds of calls per decode step.
        let (model, cache) = (&self.model, &mut self.cache);
        let logits = rayon::scope(|_| model.forward(&batch, cache))?;
        Ok(logits.to_vec2::<f32>().map_err(kiln_models::ModelError::from)?)
    }
}
