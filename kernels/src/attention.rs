//! Paged attention on CPU over a flattened batch: every query row attends causally to its own
//! sequence's keys, which live in fixed-size blocks of a shared KV cache (vLLM's layout idea).
//! Prefill, chunked prefill and decode rows are handled alike: row t sees `ctx_len[t]` positions.
//!
//! Cache layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` f32, K and V apart.
//! Query heads map to KV heads in groups (GQA): head h reads KV head `h / (heads / kv_heads)`.
//! This module owns the math only; who gets which block is the block manager's business.

use half::f16;
use rayon::prelude::*;

/// Element type of the KV cache. f16 halves memory and bandwidth and is what llama.cpp stores,
/// which matters for matching its outputs: the model amplifies rounding differences.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// Rounds a query value the way the cache rounds keys, so q.k is computed at the cache's
    /// precision on both sides (llama.cpp converts q to the K type before the dot product).
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
    /// One (row, kv head) task of [`paged_attention`]: the group's query heads over `ctx`
    /// cached positions. f32 caches use exact f32 math (`attend_group`); f16 caches follow
    /// llama.cpp's flash-attention arithmetic (see `attention_f16`).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        q: &[f32],
        table: &[u32],
        ctx: usize,
        kv: usize,
        shape: &AttnShape,
        caches: (&[Self], &[Self]),
        out: &mut [f32],
    );
}

impl KvElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn attend(
        q: &[f32],
        table: &[u32],
        ctx: usize,
        kv: usize,
        shape: &AttnShape,
        caches: (&[Self], &[Self]),
        out: &mut [f32],
    ) {
        attend_group(q, table, ctx, kv, shape, caches, out)
    }
}

impl KvElem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn attend(
        q: &[f32],
        table: &[u32],
        ctx: usize,
        kv: usize,
        shape: &AttnShape,
        caches: (&[Self], &[Self]),
        out: &mut [f32],
    ) {
        crate::attention_f16::attend_group(q, table, ctx, kv, shape, caches, out)
    }
}

/// Dimensions shared by every row of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
    fn kv_row(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Per query row: which sequence's block table it reads and how many positions it sees
/// (its own position + 1, so causality is built in).
#[derive(Debug, Clone, Copy)]
pub struct TokenCtx {
    pub table: u32,
    pub ctx_len: u32,
}

/// Copies the K and V heads of each row of `qkv` (row stride `stride`, K at `k_off`, V at
/// `v_off`) into cache slot `slots[r]`.
pub fn write_kv<T: KvElem>(
    qkv: &[f32],
    stride: usize,
    (k_off, v_off): (usize, usize),
    slots: &[u32],
    shape: &AttnShape,
    (k_cache, v_cache): (&mut [T], &mut [T]),
) {
    let n = shape.kv_row();
    for (r, &slot) in slots.iter().enumerate() {
        let dst = slot as usize * n;
        let (k, v) = (&qkv[r * stride + k_off..][..n], &qkv[r * stride + v_off..][..n]);
        k_cache[dst..dst + n].iter_mut().zip(k).for_each(|(c, x)| *c = T::from_f32(*x));
        v_cache[dst..dst + n].iter_mut().zip(v).for_each(|(c, x)| *c = T::from_f32(*x));
    }
}

/// Fast kernel. `q` rows have stride `q_stride` with heads at offset 0; `out` is
/// `[rows, num_heads * head_dim]`. Parallel over (row, kv head); each task loads every key once
/// for all query heads of its group.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[TokenCtx],
    tables: &[&[u32]],
    shape: &AttnShape,
    (k_cache, v_cache): (&[T], &[T]),
    out: &mut [f32],
) {
    let (g, d, kvh) = (shape.group(), shape.head_dim, shape.num_kv_heads);
    out.par_chunks_mut(g * d).enumerate().for_each(|(task, out)| {
        let (r, kv) = (task / kvh, task % kvh);
        let ctx = rows[r];
        let table = tables[ctx.table as usize];
        let q = &q[r * q_stride + kv * g * d..r * q_stride + (kv + 1) * g * d];
        T::attend(q, table, ctx.ctx_len as usize, kv, shape, (k_cache, v_cache), out);
    });
}

/// One (row, kv head) task: scores for the `g` query heads against all `ctx` keys, softmax,
/// then the weighted sum of values. Scores are kept (`g * ctx` floats) rather than using an
/// online softmax: contexts here are short enough and it keeps each pass a simple stream.
fn attend_group(
    q: &[f32],
    table: &[u32],
    ctx: usize,
    kv: usize,
    shape: &AttnShape,
    (k_cache, v_cache): (&[f32], &[f32]),
    out: &mut [f32],
) {
    let (g, d, bs, row) = (shape.group(), shape.head_dim, shape.block_size, shape.kv_row());
    let mut scores = vec![0f32; g * ctx];
    let mut k = vec![0f32; d];
    for j in 0..ctx {
        let slot = table[j / bs] as usize * bs + j % bs;
        k.copy_from_slice(&k_cache[slot * row + kv * d..][..d]);
        for h in 0..g {
            scores[h * ctx + j] = dot(&q[h * d..(h + 1) * d], &k) * shape.scale;
        }
    }
    for s in scores.chunks_exact_mut(ctx) {
        softmax_inplace(s);
    }
    out.fill(0.0);
    let mut v = vec![0f32; d];
    for j in 0..ctx {
        let slot = table[j / bs] as usize * bs + j % bs;
        v.copy_from_slice(&v_cache[slot * row + kv * d..][..d]);
        for h in 0..g {
            axpy(scores[h * ctx + j], &v, &mut out[h * d..(h + 1) * d]);
        }
    }
}

/// Dot product with 16 independent accumulators so the compiler emits wide FMAs without
/// reassociating floats on its own.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = alpha.mul_add(*xi, *yi);
    }
}

fn softmax_inplace(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

/// Plain reference: per row and head, textbook softmax(q k^T * scale) v in f64, gathering keys
/// through the block table one position at a time.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_reference<T: KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[TokenCtx],
    tables: &[&[u32]],
    shape: &AttnShape,
    (k_cache, v_cache): (&[T], &[T]),
    out: &mut [f32],
) {
    let (h_n, d, bs) = (shape.num_heads, shape.head_dim, shape.block_size);
    for (r, ctx) in rows.iter().enumerate() {
        let table = tables[ctx.table as usize];
        for h in 0..h_n {
            let kv = h / shape.group();
            let qh = &q[r * q_stride + h * d..r * q_stride + (h + 1) * d];
            let at = |cache: &[T], j: usize, i: usize| {
                let slot = table[j / bs] as usize * bs + j % bs;
                cache[slot * shape.kv_row() + kv * d + i].to_f32() as f64
            };
            let logits: Vec<f64> = (0..ctx.ctx_len as usize)
                .map(|j| (0..d).map(|i| T::round(qh[i]) as f64 * at(k_cache, j, i)).sum::<f64>() * shape.scale as f64)
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            for i in 0..d {
                let v: f64 = w.iter().enumerate().map(|(j, wj)| wj * at(v_cache, j, i)).sum();
                out[r * h_n * d + h * d + i] = (v / sum) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs_diff, TestRng};

    /// Builds a cache with shuffled block tables for `lens` sequences, then checks the fast
    /// kernel against the reference for query rows at assorted positions of each sequence.
    fn check<T: KvElem>(shape: AttnShape, lens: &[usize], seed: u64, tol: f32) {
        let mut rng = TestRng::new(seed);
        let bs = shape.block_size;
        let blocks_needed: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
        let num_blocks = blocks_needed + 3;
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.below(i + 1));
        }
        let tables: Vec<Vec<u32>> = lens.iter().map(|l| free.drain(..l.div_ceil(bs)).collect()).collect();
        let cache_len = num_blocks * bs * shape.kv_row();
        let (k, v): (Vec<T>, Vec<T>) = (
            rng.vec(cache_len).into_iter().map(T::from_f32).collect(),
            rng.vec(cache_len).into_iter().map(T::from_f32).collect(),
        );
        let mut rows = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            for pos in [0, len / 3, len / 2, len - 1] {
                rows.push(TokenCtx { table: s as u32, ctx_len: pos as u32 + 1 });
            }
        }
        let stride = shape.num_heads * shape.head_dim + 7;
        let q = rng.vec(rows.len() * stride);
        let refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let n = rows.len() * shape.num_heads * shape.head_dim;
        let (mut fast, mut slow) = (vec![0f32; n], vec![0f32; n]);
        paged_attention(&q, stride, &rows, &refs, &shape, (&k, &v), &mut fast);
        paged_attention_reference(&q, stride, &rows, &refs, &shape, (&k, &v), &mut slow);
        let diff = max_abs_diff(&fast, &slow);
        assert!(diff < tol, "{shape:?} lens {lens:?}: max diff {diff}");
    }

    #[test]
    fn matches_reference_across_shapes() {
        let shapes = [(9, 3, 64, 16), (14, 2, 64, 16), (4, 4, 32, 8), (8, 1, 128, 32), (2, 1, 20, 4)];
        for (i, &(h, kvh, d, bs)) in shapes.iter().enumerate() {
            let shape = AttnShape {
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: d,
                block_size: bs,
                scale: 1.0 / (d as f32).sqrt(),
            };
            check::<f32>(shape, &[1, 5, bs, bs + 1, 3 * bs + 2, 100], i as u64, 1e-5);
            // f16 accumulation (llama.cpp's numerics): ~2^-11 relative per step.
            check::<f16>(shape, &[1, 5, bs, bs + 1, 3 * bs + 2, 100], i as u64, 2e-3);
        }
    }

    #[test]
    fn write_kv_places_rows_at_slots() {
        let shape = AttnShape { num_heads: 2, num_kv_heads: 1, head_dim: 4, block_size: 2, scale: 1.0 };
        let stride = 16;
        let mut rng = TestRng::new(3);
        let qkv = rng.vec(2 * stride);
        let (mut k, mut v) = (vec![0f32; 4 * 2 * 4], vec![0f32; 4 * 2 * 4]);
        let (mut kh, mut vh) = (vec![f16::ZERO; 4 * 2 * 4], vec![f16::ZERO; 4 * 2 * 4]);
        write_kv(&qkv, stride, (8, 12), &[5, 2], &shape, (&mut kh, &mut vh));
        assert_eq!(kh[20].to_f32(), f16::from_f32(qkv[8]).to_f32());
        write_kv(&qkv, stride, (8, 12), &[5, 2], &shape, (&mut k, &mut v));
        assert_eq!(&k[20..24], &qkv[8..12]);
        assert_eq!(&v[20..24], &qkv[12..16]);
        assert_eq!(&k[8..12], &qkv[stride + 8..stride + 12]);
        assert_eq!(k.iter().filter(|x| **x != 0.0).count(), 8);
    }
}
