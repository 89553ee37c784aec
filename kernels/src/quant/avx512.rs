//! AVX-512 VNNI tile kernels (x86_64 only); activation quantization is in `avx512_act.rs`.
//!
//! A tile kernel produces 16 output columns (one zmm of f32) for R activation rows. Per 32-wide
//! block it loads the tile's packed lines once and, for each activation row, runs 8 `vpdpbusd`
//! (u8 x i8 -> i32, 4 k-values for all 16 weight rows per instruction) with the activation's
//! 4 bytes broadcast, so the weight registers are reused R times. Two shapes:
//! - `*_tile_few` (R <= 3, decode): two dpbusd chains per row, all 8 weight registers live.
//! - `*_tile_wide` (R = 4..8, batches): one chain per row and 4 weight registers live at a time,
//!   so 8 rows fit in the 32 zmm and share each weight load / nibble unpack. On Zen 4 vpdpbusd
//!   and vmulps share two pipes; every other vector op competes with them less when amortized.
//!
//! - Q4_1: nibbles 0..15 are unsigned, so they feed `vpdpbusd`'s u8 side directly.
//! - Q8_0: signed weights are stored as `w + 128` (u8). Then
//!   `sum((w + 128) * x) = sum(w * x) + 128 * sum(x)`, and we subtract the exact integer
//!   `128 * sum(x)` of the activation block (offset + correction, one `vpsubd` per row-block;
//!   cheaper than the sign trick and exact, including w = -128). No i32 overflow:
//!   |sum| <= 32 * 255 * 127.
//!
//! Floats: every lane does exactly the scalar reference's operations in the same order
//! (`(dw * dx) * sumi + mw * sx`, then `acc + that`), with separate multiplies and adds (no FMA),
//! so results equal `qmatmul_reference` bit for bit. Nothing is reduced across lanes.

use std::arch::x86_64::*;

use super::act::ActBlock;
use super::matrix::{Line, Tile};
use super::{QK, TILE};

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
fn store_f32x16(dst: &mut [f32; TILE], v: __m512) {
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

#[inline]
#[target_feature(enable = "avx512f")]
fn unpack<const R: usize>(acc: [__m512; R]) -> [[f32; TILE]; R] {
    let mut out = [[0f32; TILE]; R];
    for r in 0..R {
        store_f32x16(&mut out[r], acc[r]);
    }
    out
}

/// Block count of a tile call, with every slice checked once here so the loops run unchecked.
#[inline]
fn check_call<const R: usize>(w: &Tile<'_>, x: &[&[ActBlock]; R], lines: usize, scales: usize) -> usize {
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
pub(crate) fn q4_1_tile_few<const R: usize>(w: Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let nb = check_call(&w, &x, 4, 2 * TILE);
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[4 * b..4 * b + 4], &w.scales[2 * TILE * b..2 * TILE * (b + 1)]);
        let (dw, mw) = (load_f32x16(&sc[..TILE]), load_f32x16(&sc[TILE..]));
        // lo[c]: k = 4c..4c+4, hi[c]: k = 16+4c..16+4c+4, each [16 rows][4] u8.
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            let v = load_line(&lines[c]);
            lo[c] = _mm512_and_si512(v, nib);
            hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
        }
        for r in 0..R {
            let xb = &x[r][b];
            // Two independent chains to halve the vpdpbusd latency chain; integer adds are exact.
            let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, lo[c], bcast4(&xb.qs, c));
                s1 = _mm512_dpbusd_epi32(s1, hi[c], bcast4(&xb.qs, c + 4));
            }
            let sumi = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            let ms = _mm512_mul_ps(mw, _mm512_set1_ps(xb.s));
            acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(_mm512_mul_ps(dd, sumi), ms));
        }
    }
    unpack(acc)
}

/// Q8_0 weights x Q8_0 activations: `[R rows][16 columns]` of one tile (`x`: R rows of blocks).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q8_0_tile_few<const R: usize>(w: Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let nb = check_call(&w, &x, 8, TILE);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[8 * b..8 * b + 8], &w.scales[TILE * b..TILE * (b + 1)]);
        let dw = load_f32x16(sc);
        // [16 rows][4] u8 = w + 128 for k = 4c..4c+4.
        let mut wq = [_mm512_setzero_si512(); 8];
        for c in 0..8 {
            wq[c] = load_line(&lines[c]);
        }
        for r in 0..R {
            let xb = &x[r][b];
            let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, wq[2 * c], bcast4(&xb.qs, 2 * c));
                s1 = _mm512_dpbusd_epi32(s1, wq[2 * c + 1], bcast4(&xb.qs, 2 * c + 1));
            }
            // Remove the +128 offset: sum(w * x) = sum((w + 128) * x) - 128 * sum(x).
            let sumi = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * xb.sum));
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dd));
        }
    }
    unpack(acc)
}

/// Q4_1 for many rows (R = 4..8): one dpbusd chain per row, fed first by the 4 low-nibble
/// registers, then by the 4 high-nibble ones, so only 4 weight registers are live and 8 rows
/// share each unpack (the unpack is what competes with vpdpbusd for vector ports).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q4_1_tile_wide<const R: usize>(w: Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let nb = check_call(&w, &x, 4, 2 * TILE);
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[4 * b..4 * b + 4], &w.scales[2 * TILE * b..2 * TILE * (b + 1)]);
        let mut s = [_mm512_setzero_si512(); R];
        let mut v = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            v[c] = _mm512_and_si512(load_line(&lines[c]), nib);
        }
        for r in 0..R {
            for c in 0..4 {
                s[r] = _mm512_dpbusd_epi32(s[r], v[c], bcast4(&x[r][b].qs, c));
            }
        }
        for c in 0..4 {
            v[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(load_line(&lines[c])), nib);
        }
        for r in 0..R {
            for c in 0..4 {
                s[r] = _mm512_dpbusd_epi32(s[r], v[c], bcast4(&x[r][b].qs, c + 4));
            }
        }
        let (dw, mw) = (load_f32x16(&sc[..TILE]), load_f32x16(&sc[TILE..]));
        for r in 0..R {
            let xb = &x[r][b];
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            let ms = _mm512_mul_ps(mw, _mm512_set1_ps(xb.s));
            acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(_mm512_mul_ps(dd, _mm512_cvtepi32_ps(s[r])), ms));
        }
    }
    unpack(acc)
}

/// Q8_0 for many rows (R = 4..8): one chain per row over two passes of 4 weight lines.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) fn q8_0_tile_wide<const R: usize>(w: Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let nb = check_call(&w, &x, 8, TILE);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lines, sc) = (&w.qs[8 * b..8 * b + 8], &w.scales[TILE * b..TILE * (b + 1)]);
        let mut s = [_mm512_setzero_si512(); R];
        for half in 0..2 {
            let mut v = [_mm512_setzero_si512(); 4];
            for c in 0..4 {
                v[c] = load_line(&lines[4 * half + c]);
            }
            for r in 0..R {
                for c in 0..4 {
                    s[r] = _mm512_dpbusd_epi32(s[r], v[c], bcast4(&x[r][b].qs, 4 * half + c));
                }
            }
        }
        let dw = load_f32x16(sc);
        for r in 0..R {
            let xb = &x[r][b];
            let sumi = _mm512_sub_epi32(s[r], _mm512_set1_epi32(128 * xb.sum));
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dd));
        }
    }
    unpack(acc)
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
