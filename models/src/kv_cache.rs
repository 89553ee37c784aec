//! The paged KV cache memory: per layer, K and V arrays of `[num_blocks, block_size, kv_heads,
//! head_dim]` in f16 (default, as llama.cpp stores it) or f32. It owns bytes only; which sequence
//! owns which block is the engine's block manager's business, and the model writes/reads slots
//! through the batch's slot mapping.

use crate::config::ModelConfig;
use half::f16;

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDType {
    #[default]
    F16,
    F32,
}

impl KvDType {
    pub fn size(self) -> usize {
        match self {
            KvDType::F16 => 2,
            KvDType::F32 => 4,
        }
    }
}

enum Store {
    F32(Vec<(Vec<f32>, Vec<f32>)>),
    F16(Vec<(Vec<f16>, Vec<f16>)>),
}

/// One layer's K and V, typed.
pub enum LayerKv<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
}

/// `n` zero halves from zeroed pages (`vec![0u16; n]` is a calloc): the OS maps memory only as
/// blocks are first written, so a large budget costs neither startup time nor resident memory
/// until it is used. (`vec![f16::ZERO; n]` would write every element.)
fn zeroed_f16(n: usize) -> Vec<f16> {
    use half::vec::HalfBitsVecExt;
    vec![0u16; n].reinterpret_into()
}

pub struct PagedKvCache {
    store: Store,
    num_blocks: usize,
    block_size: usize,
    /// Elements per token per layer for K (same for V): kv_heads * head_dim.
    row: usize,
}

impl PagedKvCache {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize, dtype: KvDType) -> Self {
        let row = cfg.num_kv_heads * cfg.head_dim;
        let n = num_blocks * block_size * row;
        let store = match dtype {
            KvDType::F32 => Store::F32((0..cfg.num_layers).map(|_| (vec![0.0; n], vec![0.0; n])).collect()),
            KvDType::F16 => Store::F16((0..cfg.num_layers).map(|_| (zeroed_f16(n), zeroed_f16(n))).collect()),
        };
        Self { store, num_blocks, block_size, row }
    }

    /// Bytes of K+V one token occupies across all layers.
    pub fn bytes_per_token(cfg: &ModelConfig, dtype: KvDType) -> usize {
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.size()
    }

    /// How many blocks fit in `bytes` for this model.
    pub fn blocks_for_budget(cfg: &ModelConfig, block_size: usize, dtype: KvDType, bytes: usize) -> usize {
        bytes / (Self::bytes_per_token(cfg, dtype) * block_size)
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_layers(&self) -> usize {
        match &self.store {
            Store::F32(l) => l.len(),
            Store::F16(l) => l.len(),
        }
    }

    /// Values per token per layer for K (same for V): kv_heads * head_dim.
    pub fn kv_row(&self) -> usize {
        self.row
    }

    pub fn layer_mut(&mut self, layer: usize) -> LayerKv<'_> {
        match &mut self.store {
            Store::F32(l) => {
                let (k, v) = &mut l[layer];
                LayerKv::F32(k, v)
            }
            Store::F16(l) => {
                let (k, v) = &mut l[layer];
                LayerKv::F16(k, v)
            }
        }
    }

    /// Copies every layer's K/V of block `src` into block `dst` (copy-on-write after a fork).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let n = self.block_size * self.row;
        let (s, d) = (src as usize * n, dst as usize * n);
        match &mut self.store {
            Store::F32(l) => l.iter_mut().for_each(|(k, v)| {
                k.copy_within(s..s + n, d);
                v.copy_within(s..s + n, d);
            }),
            Store::F16(l) => l.iter_mut().for_each(|(k, v)| {
                k.copy_within(s..s + n, d);
                v.copy_within(s..s + n, d);
            }),
        }
    }
}
