//! AVX-512 VNNI tile kernels for the k-quants (x86_64 only): Q4_K and Q6_K weights x Q8_K
//! activations, 16 output columns (one i32/f32 lane each) for R <= 2 activation rows.
//!
//! Each lane does exactly `reference.rs`'s arithmetic, only 16 columns at a time:
//! - Q4_K (`ggml_gemv_q4_K_8x8_q8_K`): per 32-value sub-block, 8 `vpdpbusd` (4 values each,
//!   nibbles on the unsigned side) give the exact dot product; it is multiplied by the
//!   sub-block's 6-bit scale and summed over the super-block in int32, the mins times the
//!   activation sums likewise; then one fma each into `acc` and `accm` per super-block.
//! - Q6_K (`ggml_vec_dot_q6_K_q8_K`): ggml's 8 int32 lanes per super-block become 8 zmm (lane j:
//!   values `32v + 4j..+4` of every run v), each a sum of 4-value dot products (`vpmaddubsw`,
//!   the 6-bit values unsigned, then `vpdpwssd` by their 16-group scale), minus the -32
//!   offset's correction; then one fma per lane and super-block, and `hsum_float_8`'s order at
//!   the end.
//!
//! With `batched` (llama.cpp's prompt-batch arithmetic, `super::Form::LlamaCppBatch`), Q4_K
//! does its two fmas after every pair of sub-blocks, and Q6_K adds its 8 lanes into one integer
//! per super-block and accumulates `fma(S * dw, dx, acc)` in a single float.
//!
//! Integer sums are exact in any order (no i32 overflow: |sum| < 2^31 for any valid block), so
//! only the float steps need care, and they are one IEEE operation each, as in ggml.

use std::arch::x86_64::*;

use super::avx512::{check_call, load_f32x16, store_f32x16 as store};
use super::kact::KActBlock;
use super::matrix::{Line, Tile};
use super::TILE;

#[inline]
#[target_feature(enable = "avx512f")]
fn load_line(line: &Line) -> __m512i {
    // SAFETY: a `Line` is 64 readable bytes aligned to 64: exactly one aligned zmm load.
    unsafe { _mm512_load_si512(line.0.as_ptr().cast()) }
}

/// 16 bytes at `at` of the table that starts at `lines[0]`, widened to i32 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn table16(lines: &[Line], at: usize, signed: bool) -> __m512i {
    let bytes = &lines[at / 64].0[at % 64..at % 64 + 16];
    // SAFETY: `bytes` is 16 readable bytes (sliced above); the load is unaligned.
    let v = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
    if signed {
        _mm512_cvtepi8_epi32(v)
    } else {
        _mm512_cvtepu8_epi32(v)
    }
}

/// Activation values `at..at + 4` broadcast to all 16 lanes (the i8 side of vpdpbusd).
#[inline]
#[target_feature(enable = "avx512f")]
fn bcast4(q: &[i8], at: usize) -> __m512i {
    let b = &q[at..at + 4];
    _mm512_set1_epi32(i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
}

/// Q4_K weights x Q8_K activations: `[R rows][16 columns]` of one tile (`batched`: the two
/// fmas after every pair of sub-blocks, llama.cpp's gemm form).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q4_k_tile<const R: usize>(w: &Tile<'_>, x: [&[KActBlock]; R], batched: bool) -> [[f32; TILE]; R] {
    let nb = check_call(w, &x, 36, 2 * TILE);
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[36 * b..36 * (b + 1)], &w.scales[2 * TILE * b..2 * TILE * (b + 1)]);
        let (dw, dminw) = (load_f32x16(&sc[..TILE]), load_f32x16(&sc[TILE..]));
        let dd: [__m512; R] = std::array::from_fn(|r| _mm512_mul_ps(dw, _mm512_set1_ps(x[r][b].d)));
        let ddmin: [__m512; R] = std::array::from_fn(|r| _mm512_mul_ps(dminw, _mm512_set1_ps(x[r][b].d)));
        let mut s = [_mm512_setzero_si512(); R];
        let mut m = [_mm512_setzero_si512(); R];
        for sub in 0..8 {
            let (pair, high) = (sub / 2, sub % 2 == 1);
            let mut dot = [_mm512_setzero_si512(); R];
            for c in 0..8 {
                let v = load_line(&lines[8 * pair + c]);
                let q = if high { _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib) } else { _mm512_and_si512(v, nib) };
                for r in 0..R {
                    dot[r] = _mm512_dpbusd_epi32(dot[r], q, bcast4(&x[r][b].qs, 32 * sub + 4 * c));
                }
            }
            let (scale, min) = (table16(&lines[32..], 16 * sub, false), table16(&lines[32..], 128 + 16 * sub, false));
            for r in 0..R {
                let xb = &x[r][b];
                s[r] = _mm512_add_epi32(s[r], _mm512_mullo_epi32(dot[r], scale));
                let xsum = _mm512_set1_epi32(xb.bsums[2 * sub] + xb.bsums[2 * sub + 1]);
                m[r] = _mm512_add_epi32(m[r], _mm512_mullo_epi32(min, xsum));
            }
            if (batched && high) || sub == 7 {
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), dd[r], acc[r]);
                    accm[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m[r]), ddmin[r], accm[r]);
                    (s[r], m[r]) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                }
            }
        }
    }
    let mut out = [[0f32; TILE]; R];
    for r in 0..R {
        store(&mut out[r], _mm512_sub_ps(acc[r], accm[r]));
    }
    out
}

/// Q6_K weights x Q8_K activations: `[R rows][16 columns]` of one tile (`batched`: llama.cpp's
/// tiled form, one integer per super-block and `acc = fma(S * dw, dx, acc)`).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q6_k_tile<const R: usize>(w: &Tile<'_>, x: [&[KActBlock]; R], batched: bool) -> [[f32; TILE]; R] {
    let nb = check_call(w, &x, 68, TILE);
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); 8]; R];
    let mut tiled = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, table) = (&w.qs[68 * b..68 * b + 64], &w.qs[68 * b + 64..68 * (b + 1)]);
        let dw = load_f32x16(&w.scales[TILE * b..TILE * (b + 1)]);
        let dd: [__m512; R] = std::array::from_fn(|r| _mm512_mul_ps(_mm512_set1_ps(x[r][b].d), dw));
        let mut total = [zero; R];
        // Each 16-group's scale as an i16 pair per column (both halves of an i32 lane), so one
        // `vpdpwssd` multiplies a column's two i16 pair sums by it and accumulates: cheaper than
        // `vpdpbusd` + `vpmulld` + add. (u8 6-bit x i8 pairs are at most 2 * 63 * 127, so
        // `vpmaddubsw` never saturates; `vpdpwssd` is exact.)
        let pairs: [__m512i; 16] = std::array::from_fn(|g| {
            let s = table16(table, 16 * g, true);
            _mm512_or_si512(_mm512_and_si512(s, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32::<16>(s))
        });
        // One ggml lane j at a time: only R integer sums live, beside the 8R float lanes.
        for j in 0..8 {
            let mut lane = [_mm512_setzero_si512(); R];
            for v in 0..8 {
                let q = load_line(&lines[8 * v + j]);
                for r in 0..R {
                    let dot2 = _mm512_maddubs_epi16(q, bcast4(&x[r][b].qs, 32 * v + 4 * j));
                    lane[r] = _mm512_dpwssd_epi32(lane[r], dot2, pairs[2 * v + j / 4]);
                }
            }
            let (s0, s1) = (table16(table, 16 * (2 * j), true), table16(table, 16 * (2 * j + 1), true));
            for r in 0..R {
                let xb = &x[r][b];
                let corr = _mm512_add_epi32(
                    _mm512_mullo_epi32(s0, _mm512_set1_epi32(xb.bsums[2 * j])),
                    _mm512_mullo_epi32(s1, _mm512_set1_epi32(xb.bsums[2 * j + 1])),
                );
                let sum = _mm512_sub_epi32(lane[r], _mm512_slli_epi32::<5>(corr));
                if batched {
                    total[r] = _mm512_add_epi32(total[r], sum);
                } else {
                    acc[r][j] = _mm512_fmadd_ps(dd[r], _mm512_cvtepi32_ps(sum), acc[r][j]);
                }
            }
        }
        if batched {
            for r in 0..R {
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(total[r]), dw);
                tiled[r] = _mm512_fmadd_ps(v, _mm512_set1_ps(x[r][b].d), tiled[r]);
            }
        }
    }
    let mut out = [[0f32; TILE]; R];
    if batched {
        for r in 0..R {
            store(&mut out[r], tiled[r]);
        }
        return out;
    }
    for r in 0..R {
        let a = &acc[r];
        let (s0, s1) = (_mm512_add_ps(a[4], a[0]), _mm512_add_ps(a[6], a[2]));
        let (s2, s3) = (_mm512_add_ps(a[5], a[1]), _mm512_add_ps(a[7], a[3]));
        store(&mut out[r], _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    out
}
