//! AVX-512 VNNI tile kernels (x86_64 only); activation quantization is in `avx512_act.rs`.
//!
//! A tile kernel produces 16 output columns (one zmm of f32 lanes) for R <= 2 activation rows.
//! ggml's x86 dot product keeps, per output, 8 float partial sums — one per 4-byte group of the
//! 32-wide block, the int32 lanes of its ymm `vpdpbusd` — fused-multiply-adds `d_w * d_x` times
//! each group's integer sum into them block after block, and only at the end adds the 8 lanes
//! (`hsum_float_8`). To give the same bits we keep those 8 partial sums too, each as a zmm
//! across our 16 columns: per block and row, 8 `vpdpbusd` from zero (one per group, 4 k-values
//! for all 16 weight rows), 8 `vcvtdq2ps`, 8 `vfmadd`. 8 float accumulators per row (plus Q4_1's
//! `summs`) is what limits R to 2: 18 accumulators + the weight registers fill the 32 zmm.
//!
//! - Q4_1: nibbles 0..15 are unsigned, so they feed `vpdpbusd`'s u8 side directly; ggml's group
//!   g < 4 is the low nibbles of bytes 4g..4g+4 (k = 4g..), group 4 + g their high nibbles
//!   (k = 16 + 4g..), which is exactly packed line g masked or shifted.
//! - Q8_0: signed weights are stored as `w + 128` (u8), so a group's dot product is
//!   `sum((w + 128) * x) - 128 * sum(x)`; the activation block carries `-128 * sum(x)` per group
//!   (`ActBlock::corr`) and the `vpdpbusd` starts from it, which makes every group sum exact
//!   (no i32 overflow: |sum| <= 4 * 255 * 127 + 4 * 128 * 127).
//!
//! Floats: every lane does exactly `ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0` as GCC
//! compiled them for x86 (see `super::ref_dot_q4_1`): the same fmas, the same `hsum`
//! tree, `summs` by fma. Nothing is reduced across lanes, so results equal `qmatmul_reference`
//! bit for bit.

use std::arch::x86_64::*;

use super::act::ActBlock;
use super::matrix::{Line, Tile};
use super::{QK, TILE};

/// ggml's lanes per output: the 8 int32 groups of one 32-wide block.
const GROUPS: usize = 8;

#[inline]
#[target_feature(enable = "avx512f")]
fn load_line(line: &Line) -> __m512i {
    // SAFETY: a `Line` is 64 readable bytes aligned to 64: exactly one aligned zmm load.
    unsafe { _mm512_load_si512(line.0.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn load_f32x16(x: &[f32]) -> __m512 {
    assert!(x.len() >= 16);
    // SAFETY: 16 f32 readable (asserted); the load is unaligned.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn store_f32x16(dst: &mut [f32; TILE], v: __m512) {
    // SAFETY: `dst` is 16 writable f32; the store is unaligned.
    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
}

/// Activation values `4g..4g+4` of a block broadcast to all 16 lanes (the i8 side of vpdpbusd).
#[inline]
#[target_feature(enable = "avx512f")]
fn bcast4(xq: &[i8; QK], g: usize) -> __m512i {
    let b = &xq[4 * g..4 * g + 4];
    _mm512_set1_epi32(i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
}

/// `acc + dd * float(isum)`, one fused rounding: ggml's `_mm256_fmadd_ps(d, q, acc)`.
#[inline]
#[target_feature(enable = "avx512f")]
fn fma_group(acc: __m512, dd: __m512, isum: __m512i) -> __m512 {
    _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc)
}

/// ggml's `hsum_float_8` on each column: `((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))`.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum8(a: &[__m512; GROUPS]) -> __m512 {
    let (s0, s1) = (_mm512_add_ps(a[4], a[0]), _mm512_add_ps(a[6], a[2]));
    let (s2, s3) = (_mm512_add_ps(a[5], a[1]), _mm512_add_ps(a[7], a[3]));
    _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))
}

/// Block count of a tile call (`lines` weight lines and `scales` scales per block of `B`), with
/// every slice checked once here so the loops run unchecked.
#[inline]
pub(super) fn check_call<B, const R: usize>(w: &Tile<'_>, x: &[&[B]; R], lines: usize, scales: usize) -> usize {
    assert!(R <= 2, "at most 2 rows of accumulators fit the registers");
    let nb = w.qs.len() / lines;
    assert!(w.qs.len() == nb * lines && w.scales.len() == nb * scales);
    for xr in x {
        assert_eq!(xr.len(), nb);
    }
    nb
}

/// Q4_1 weights x Q8_1 activations: `[R rows][16 columns]` of one tile (`x`: R rows of blocks).
// Block index `b` walks the tile and R activation rows in lockstep; an iterator cannot.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q4_1_tile<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let nb = check_call(w, &x, 4, 2 * TILE);
    let nib = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); GROUPS]; R];
    let mut summs = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[4 * b..4 * b + 4], &w.scales[2 * TILE * b..2 * TILE * (b + 1)]);
        let (dw, mw) = (load_f32x16(&sc[..TILE]), load_f32x16(&sc[TILE..]));
        let mut dd = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let xb = &x[r][b];
            dd[r] = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            // ggml: summs += m * s, contracted to an fma by GCC.
            summs[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), summs[r]);
        }
        for c in 0..4 {
            let v = load_line(&lines[c]);
            let (lo, hi) = (_mm512_and_si512(v, nib), _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib));
            for r in 0..R {
                let xq = &x[r][b].qs;
                acc[r][c] = fma_group(acc[r][c], dd[r], _mm512_dpbusd_epi32(zero, lo, bcast4(xq, c)));
                acc[r][c + 4] = fma_group(acc[r][c + 4], dd[r], _mm512_dpbusd_epi32(zero, hi, bcast4(xq, c + 4)));
            }
        }
    }
    let mut out = [[0f32; TILE]; R];
    for r in 0..R {
        store_f32x16(&mut out[r], _mm512_add_ps(hsum8(&acc[r]), summs[r]));
    }
    out
}

/// Q8_0 weights x Q8_0 activations: `[R rows][16 columns]` of one tile.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q8_0_tile<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let nb = check_call(w, &x, 8, TILE);
    let mut acc = [[_mm512_setzero_ps(); GROUPS]; R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[8 * b..8 * b + 8], &w.scales[TILE * b..TILE * (b + 1)]);
        let dw = load_f32x16(sc);
        let mut dd = [_mm512_setzero_ps(); R];
        for r in 0..R {
            dd[r] = _mm512_mul_ps(dw, _mm512_set1_ps(x[r][b].d));
        }
        for c in 0..GROUPS {
            let v = load_line(&lines[c]);
            for r in 0..R {
                let xb = &x[r][b];
                // Starts from -128 * sum(x of the group): removes the +128 weight offset exactly.
                let isum = _mm512_dpbusd_epi32(_mm512_set1_epi32(xb.corr[c]), v, bcast4(&xb.qs, c));
                acc[r][c] = fma_group(acc[r][c], dd[r], isum);
            }
        }
    }
    let mut out = [[0f32; TILE]; R];
    for r in 0..R {
        store_f32x16(&mut out[r], hsum8(&acc[r]));
    }
    out
}

/// f16 bits -> f32 (exact), 16 at a time; `bits.len()` is a multiple of 16 (whole tiles).
#[target_feature(enable = "avx512f")]
pub(crate) fn widen_f16(bits: &[u16], out: &mut [f32]) {
    assert_eq!(bits.len(), out.len());
    for (b, o) in bits.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        // SAFETY: 16 u16 = 32 readable bytes and 16 writable f32 (chunks_exact); unaligned ops.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().cast()))) };
    }
}
