//! Activation quantization: f32 rows -> 32-wide int8 blocks, exactly as ggml's x86 build
//! quantizes them (`quantize_row_q8_0` / `quantize_row_q8_1` in `arch/x86/quants.c`; the
//! generic `_ref` versions differ in two bits-changing details, and llama.cpp on x86 runs these).
//!
//! Per block: `amax = max |x|`, `d = amax / 127`, `id = 127 / amax` (0 if amax == 0),
//! `q = round(x * id)` to nearest with ties to even (`_mm256_round_ps`). It quantizes with the
//! f32 `id` while storing `f16(d)`; such details move activations across rounding boundaries,
//! and the model amplifies that into visible logit differences, so we copy them. Q8_1's `s = f16(d * sum(q))`, again with
//! the f32 `d`. We also keep the exact integer `sum(q)`, which the Q8_0 VNNI kernel needs.
//!
//! Each row is quantized on its own, so a row's blocks never depend on the batch it came in.
//! This module must not know about weights or tiles.

use half::f16;
use rayon::prelude::*;

use super::{Isa, QK};

/// One quantized activation block, with everything a kernel needs for it side by side (one
/// pointer per activation row in the kernels; 80 bytes).
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct ActBlock {
    pub qs: [i8; QK],
    /// `f16(amax / 127)` widened back to f32.
    pub d: f32,
    /// `f16(d * sum(qs))` widened back to f32 (ggml Q8_1's `s`).
    pub s: f32,
    /// `sum(qs)`, exact.
    pub sum: i32,
    /// `-128 * sum(qs[4g..4g + 4])` per 4-byte group g: where the Q8_0 VNNI kernel starts each
    /// group's integer sum to cancel its `+128` weight offset.
    pub corr: [i32; 8],
}

/// Quantized activations of a batch: `[m, k / 32]` blocks.
#[derive(Default)]
pub(crate) struct QActs {
    pub nb: usize,
    pub blocks: Vec<ActBlock>,
}

/// The ggml reference quantization of one block, scalar.
pub(crate) fn quantize_block_ref(x: &[f32; QK]) -> ActBlock {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let qs = x.map(|v| (v * id).round_ties_even() as i8);
    let sum = qs.iter().map(|&q| q as i32).sum::<i32>();
    finish_block(qs, d, sum)
}

/// Stores the scales as ggml does: f16 round-to-nearest-even of the f32 values.
pub(crate) fn finish_block(qs: [i8; QK], d: f32, sum: i32) -> ActBlock {
    let s = sum as f32 * d;
    ActBlock { qs, d: f16::from_f32(d).to_f32(), s: f16::from_f32(s).to_f32(), sum, corr: group_corr(&qs) }
}

/// `ActBlock::corr` of these quants.
pub(crate) fn group_corr(qs: &[i8; QK]) -> [i32; 8] {
    std::array::from_fn(|g| -128 * qs[4 * g..4 * g + 4].iter().map(|&q| q as i32).sum::<i32>())
}

impl QActs {
    /// Quantizes `x: [m, k]` (k % 32 == 0) row by row, reusing this buffer's allocations.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize, isa: Isa) {
        let nb = k / QK;
        self.nb = nb;
        self.blocks.resize(m * nb, ActBlock::default());
        if nb == 0 {
            return;
        }
        // Rows are independent; only big batches are worth a fork (a row takes ~0.1 us per 576).
        let rows = self.blocks.par_chunks_mut(nb).zip(x.par_chunks(k));
        rows.with_min_len(16).for_each(|(dst, xr)| quantize_row(xr, dst, isa));
    }

    /// Quantizes with the scalar reference only (for `qmatmul_reference`).
    pub fn quantize_ref(x: &[f32], m: usize, k: usize) -> Self {
        let mut a = Self::default();
        a.quantize(x, m, k, Isa::Portable);
        a
    }

    /// The blocks of row `r`: `[k / 32]`.
    pub fn row(&self, r: usize) -> &[ActBlock] {
        &self.blocks[r * self.nb..(r + 1) * self.nb]
    }
}

fn quantize_row(x: &[f32], out: &mut [ActBlock], isa: Isa) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512Vnni` is only constructed after detecting avx512f/bw/vnni.
        Isa::Avx512Vnni => unsafe { super::avx512_act::quantize_row(x, out) },
        Isa::Portable => {
            for (blk, xb) in out.iter_mut().zip(x.chunks_exact(QK)) {
                *blk = quantize_block_ref(xb.try_into().expect("32 values"));
            }
        }
    }
}
