//! AVX-512 activation quantization, bit-identical to `act::quantize_block_ref`.
//!
//! Per-block horizontal reductions (max |x| for the scale, sum q for Q8_1's `s`) dominate a naive
//! vector version (~70 cycles a block, 15% of a prefill matmul). So 16 blocks go at once: their
//! 16 partial vectors are reduced together by a transposing tree (4 levels of two permutes and
//! one max/add), and `d`, `1/d`, the f16 roundings and `s` are computed 16 lanes at a time.
//! Every lane still does exactly the scalar operations: max and integer adds are exact in any
//! order, and each division, multiply, rounding and f16 conversion is one IEEE operation.

use std::arch::x86_64::*;

use super::act::{finish_block, quantize_block_ref, ActBlock};
use super::avx512::load_f32x16;
use super::QK;

/// Blocks handled together: one lane of a zmm per block.
const GROUP: usize = 16;

/// Permutation indices of one reduction level (`g` = lanes per block after the level): output
/// lane j takes input lane P[j] and Q[j] of the concatenation (a, b), so that each level halves
/// the number of vectors and the lanes per block, keeping blocks in order.
const fn level_idx(g: usize, second: bool) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut j = 0;
    while j < 16 {
        idx[j] = ((j / g) * 2 * g + if second { g } else { 0 } + j % g) as i32;
        j += 1;
    }
    idx
}

const LEVELS: [[[i32; 16]; 2]; 4] = [
    [level_idx(8, false), level_idx(8, true)],
    [level_idx(4, false), level_idx(4, true)],
    [level_idx(2, false), level_idx(2, true)],
    [level_idx(1, false), level_idx(1, true)],
];

#[inline]
#[target_feature(enable = "avx512f")]
fn idx(level: usize, second: bool) -> __m512i {
    let v = &LEVELS[level][second as usize];
    // SAFETY: 16 i32 = 64 readable bytes; unaligned load.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

/// Lane b of the result = max over the lanes of `v[b]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16_max(mut v: [__m512; GROUP]) -> __m512 {
    let mut n = GROUP;
    for level in 0..4 {
        let (p, q) = (idx(level, false), idx(level, true));
        for i in 0..n / 2 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            v[i] = _mm512_max_ps(_mm512_permutex2var_ps(a, p, b), _mm512_permutex2var_ps(a, q, b));
        }
        n /= 2;
    }
    v[0]
}

/// Lane b of the result = sum of the lanes of `v[b]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16_add(mut v: [__m512i; GROUP]) -> __m512i {
    let mut n = GROUP;
    for level in 0..4 {
        let (p, q) = (idx(level, false), idx(level, true));
        for i in 0..n / 2 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            v[i] = _mm512_add_epi32(_mm512_permutex2var_epi32(a, p, b), _mm512_permutex2var_epi32(a, q, b));
        }
        n /= 2;
    }
    v[0]
}

/// f32 -> f16 (round to nearest even, like `half::f16::from_f32`) -> f32, 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_f16(v: __m512) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v))
}

/// `round(v)` to nearest, ties to even, as i32: what ggml's x86 build does
/// (`_mm256_round_ps(v, _MM_ROUND_NEAREST)` then `_mm256_cvtps_epi32`).
#[inline]
#[target_feature(enable = "avx512f")]
fn round_even(v: __m512) -> __m512i {
    _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store_i8x16(dst: &mut [i8], v: __m128i) {
    assert!(dst.len() >= 16);
    // SAFETY: 16 writable bytes (asserted); the store is unaligned.
    unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), v) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn lanes(v: __m512) -> [f32; GROUP] {
    let mut a = [0f32; GROUP];
    // SAFETY: 16 writable f32; unaligned store.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// Quantizes one activation row `x: [k]` into `out: [k / 32]` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    assert_eq!(x.len(), out.len() * QK);
    for (xg, og) in x.chunks(GROUP * QK).zip(out.chunks_mut(GROUP)) {
        if og.len() < GROUP || !quantize_group(xg, og) {
            for (xb, o) in xg.chunks_exact(QK).zip(og.iter_mut()) {
                *o = quantize_block(xb);
            }
        }
    }
}

/// 16 blocks at once. Returns false (writing nothing) if some `1/d` is not finite (subnormal d,
/// amax < ~1e-36), where the vector float->int conversion would differ from Rust's cast.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn quantize_group(x: &[f32], out: &mut [ActBlock]) -> bool {
    assert!(x.len() == GROUP * QK && out.len() == GROUP);
    let mut amax = [_mm512_setzero_ps(); GROUP];
    for b in 0..GROUP {
        let (lo, hi) = (load_f32x16(&x[b * QK..]), load_f32x16(&x[b * QK + 16..]));
        amax[b] = _mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi));
    }
    let amax = reduce16_max(amax);
    let d = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
    let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(amax, _mm512_setzero_ps());
    let id = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(127.0), amax);
    // inf - inf is NaN: a lane is finite iff id - id == 0.
    if _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(id, id), _mm512_setzero_ps()) != 0xFFFF {
        return false;
    }
    let ids = lanes(id);
    let mut sums = [_mm512_setzero_si512(); GROUP];
    for b in 0..GROUP {
        let idb = _mm512_set1_ps(ids[b]);
        let q0 = round_even(_mm512_mul_ps(load_f32x16(&x[b * QK..]), idb));
        let q1 = round_even(_mm512_mul_ps(load_f32x16(&x[b * QK + 16..]), idb));
        // |q| <= 127, so vpmovdb's truncation to i8 is exact.
        store_i8x16(&mut out[b].qs[..16], _mm512_cvtepi32_epi8(q0));
        store_i8x16(&mut out[b].qs[16..], _mm512_cvtepi32_epi8(q1));
        sums[b] = _mm512_add_epi32(q0, q1);
    }
    let sum = reduce16_add(sums);
    // s = f16(sum * d) with the f32 d, then d itself rounded to f16 (ggml's order of use).
    let s = lanes(round_f16(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), d)));
    let d16 = lanes(round_f16(d));
    let mut sum_l = [0i32; GROUP];
    // SAFETY: 16 writable i32; unaligned store.
    unsafe { _mm512_storeu_si512(sum_l.as_mut_ptr().cast(), sum) };
    for b in 0..GROUP {
        (out[b].d, out[b].s, out[b].sum) = (d16[b], s[b], sum_l[b]);
        store_corr(&mut out[b]);
    }
    true
}

/// Sets `blk.corr` from `blk.qs` (equal to `act::group_corr`): one `vpdpbusd` of all-ones bytes
/// against the 32 quants gives the 8 group sums (exact), times -128.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn store_corr(blk: &mut ActBlock) {
    // SAFETY: `qs` is 32 readable bytes; unaligned load.
    let q = unsafe { _mm256_loadu_si256(blk.qs.as_ptr().cast()) };
    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_zextsi256_si512(q));
    let corr = _mm512_mullo_epi32(sums, _mm512_set1_epi32(-128));
    // SAFETY: `corr` is 8 writable i32: the masked store writes lanes 0..8 only.
    unsafe { _mm512_mask_storeu_epi32(blk.corr.as_mut_ptr(), 0xFF, corr) };
}

/// One block (row tails shorter than 16 blocks).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn quantize_block(x: &[f32]) -> ActBlock {
    let (x0, x1) = (load_f32x16(&x[..16]), load_f32x16(&x[16..32]));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    if !id.is_finite() {
        return quantize_block_ref(x.try_into().expect("32 values"));
    }
    let q0 = round_even(_mm512_mul_ps(x0, _mm512_set1_ps(id)));
    let q1 = round_even(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    let mut qs = [0i8; QK];
    store_i8x16(&mut qs[..16], _mm512_cvtepi32_epi8(q0));
    store_i8x16(&mut qs[16..], _mm512_cvtepi32_epi8(q1));
    finish_block(qs, d, sum)
}
