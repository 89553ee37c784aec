//! Self-attention over the paged KV cache: fused QKV projection, rotary embeddings at each row's
//! own position, K/V written to the row's cache slot, then every row attends to its sequence's
//! cached keys through the block table (`kiln_kernels::paged_attention`). No per-sequence caches.
//!
//! The attention math runs on host memory; on a CUDA device activations cross to the host and
//! back around it until a device paged-attention kernel exists.

use crate::batch::ForwardBatch;
use crate::error::Result;
use crate::kv_cache::LayerKv;
use crate::layers::Linear;
use candle_core::{Device, Tensor};
use kiln_kernels::{paged_attention, rope_inplace, write_kv, AttnShape, HeadsSpan, KvElem, RopeStyle, RopeTable};

pub struct Attention {
    /// `[(heads + 2 * kv_heads) * head_dim, hidden]`: Q rows, then K, then V.
    qkv: Linear,
    o: Linear,
    shape: AttnShape,
    rope_style: RopeStyle,
}

impl Attention {
    pub fn new(qkv: Linear, o: Linear, shape: AttnShape, rope_style: RopeStyle) -> Self {
        Self { qkv, o, shape, rope_style }
    }

    /// `x`: `[rows, hidden]` -> `[rows, hidden]`; writes this layer's K/V for every row.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        block_size: usize,
        rope: &RopeTable,
        cache: LayerKv<'_>,
    ) -> Result<Tensor> {
        let s = &AttnShape { block_size, ..self.shape };
        let (q_n, kv_n) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        let stride = q_n + 2 * kv_n;
        let rows = batch.num_rows();
        // [rows, stride] on the host
        let mut qkv = self.qkv.forward(x)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let q_span = HeadsSpan { offset: 0, heads: s.num_heads, head_dim: s.head_dim };
        let k_span = HeadsSpan { offset: q_n, heads: s.num_kv_heads, head_dim: s.head_dim };
        rope_inplace(&mut qkv, stride, q_span, &batch.positions, rope, self.rope_style);
        rope_inplace(&mut qkv, stride, k_span, &batch.positions, rope, self.rope_style);
        let mut out = vec![0f32; rows * q_n];
        match cache {
            LayerKv::F32(k, v) => attend(&qkv, batch, s, (k, v), &mut out),
            LayerKv::F16(k, v) => attend(&qkv, batch, s, (k, v), &mut out),
        }
        let out = Tensor::from_vec(out, (rows, q_n), &Device::Cpu)?.to_device(x.device())?;
        self.o.forward(&out)
    }
}

/// Writes this step's K/V into their slots, then attends every row over its cached keys.
/// `qkv`: `[rows, (heads + 2 * kv_heads) * head_dim]` after rotary embedding.
fn attend<T: KvElem>(qkv: &[f32], batch: &ForwardBatch, s: &AttnShape, (k, v): (&mut [T], &mut [T]), out: &mut [f32]) {
    let (q_n, kv_n) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
    let stride = q_n + 2 * kv_n;
    write_kv(qkv, stride, (q_n, q_n + kv_n), &batch.slots, s, (&mut *k, &mut *v));
    let tables: Vec<&[u32]> = batch.block_tables.iter().map(|t| t.as_slice()).collect();
    paged_attention(qkv, stride, &batch.rows, &tables, s, (&*k, &*v), out);
}
