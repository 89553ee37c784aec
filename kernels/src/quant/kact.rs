//! Q8_K activation quantization: f32 rows -> 256-wide int8 blocks, the form k-quant weights
//! (Q4_K, Q6_K) meet in ggml (`vec_dot_type = GGML_TYPE_Q8_K`).
//!
//! ggml's x86 build has no SIMD `quantize_row_q8_K`: it calls `quantize_row_q8_K_ref`, compiled
//! into ggml-base without FMA. Per block: `max` = the first value of largest |x| (strictly
//! greater replaces), `iscale = -127 / max`, `q = min(127, nearest_int(iscale * x))` where
//! `nearest_int` is the `+ 1.5 * 2^23` trick, i.e. round half to even of the f32 product (no
//! fused multiply-add: the object code does `mulps` then `addps`), `d = 1 / iscale` in f32 (not
//! `max / -127`: the two differ in the last bit), and `bsums` the exact sums of each 16 quants.
//! An all-zero block gets d = 0 and zero quants. The sign of `iscale` follows `max`, so the
//! quants are negated relative to Q8_0's convention; `d` carries the sign back.
//!
//! Each row is quantized on its own (batch invariance). Must not know about weights or tiles.

use rayon::prelude::*;

use super::QK_K;

/// One quantized activation block of 256 values.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KActBlock {
    pub qs: [i8; QK_K],
    /// `1 / iscale`, f32 (ggml stores it as f32 too).
    pub d: f32,
    /// Sum of quants 16s..16s + 16, exact.
    pub bsums: [i32; 16],
}

impl Default for KActBlock {
    fn default() -> Self {
        Self { qs: [0; QK_K], d: 0.0, bsums: [0; 16] }
    }
}

/// Quantized activations of a batch: `[m, k / 256]` blocks.
#[derive(Default)]
pub(crate) struct KActs {
    pub nb: usize,
    pub blocks: Vec<KActBlock>,
}

/// ggml's `quantize_row_q8_K_ref` on one block.
pub(crate) fn quantize_block_k(x: &[f32]) -> KActBlock {
    assert_eq!(x.len(), QK_K);
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    let mut b = KActBlock::default();
    if amax == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        // `as i32` saturates where ggml's bit trick would wrap; only non-finite inputs get there.
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    for (s, chunk) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = chunk.iter().map(|&q| q as i32).sum();
    }
    b.d = 1.0 / iscale;
    b
}

impl KActs {
    /// Quantizes `x: [m, k]` (k % 256 == 0) row by row, reusing this buffer's allocations.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        let nb = k / QK_K;
        self.nb = nb;
        self.blocks.resize(m * nb, KActBlock::default());
        if nb == 0 {
            return;
        }
        let rows = self.blocks.par_chunks_mut(nb).zip(x.par_chunks(k));
        rows.with_min_len(4).for_each(|(dst, xr)| {
            for (o, xb) in dst.iter_mut().zip(xr.chunks_exact(QK_K)) {
                *o = quantize_block_k(xb);
            }
        });
    }

    /// The blocks of row `r`: `[k / 256]`.
    pub fn row(&self, r: usize) -> &[KActBlock] {
        &self.blocks[r * self.nb..(r + 1) * self.nb]
    }
}
