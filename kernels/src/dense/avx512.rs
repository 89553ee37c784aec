//! AVX-512 tile kernels of `dense`: `MR` activation rows x one `NR`-column panel per call, the
//! accumulators in registers for the whole k loop (a panel of <= 1536 x 32 stays in L2, so no
//! k blocking is needed, and none could change a bit anyway: partial sums would be stored exact).
//!
//! Per k (f32) or k pair (bf16): two panel loads, then per row one broadcast and two FMAs /
//! `vdpbf16ps`. Every lane runs the reference's operation sequence for its own column.

// Index loops over register arrays read clearer than iterator chains in these kernels.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{TileOut, MR, NR};

/// Vectors of 16 columns per panel.
const NV: usize = NR / 16;

/// `acc + bias` into the tile's live rows, masked to its columns.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store(acc: [[__m512; NV]; MR], out: TileOut) {
    for v in 0..NV {
        let n = out.cols.saturating_sub(16 * v).min(16);
        let mask = ((1u32 << n) - 1) as __mmask16;
        // SAFETY: the bias slice holds NR f32.
        let b = unsafe { _mm512_loadu_ps(out.bias.as_ptr().add(16 * v)) };
        for r in 0..out.live {
            // SAFETY: each live `dst` row has `cols` writable elements exclusive to this tile (the
            // caller's contract); the masked store touches only those.
            unsafe { _mm512_mask_storeu_ps(out.dst[r].add(16 * v), mask, _mm512_add_ps(acc[r][v], b)) };
        }
    }
}

/// f32 panel `[k][NR]` x `MR` rows of `k` f32.
/// # Safety
/// `out` must be exclusive to this call.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_f32(panel: &[f32], x: [&[f32]; MR], out: TileOut) {
    let k = panel.len() / NR;
    assert!(panel.len() == k * NR && x.iter().all(|r| r.len() == k));
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (wp, xp) = (panel.as_ptr(), x.map(|r| r.as_ptr()));
    for kk in 0..k {
        // SAFETY: kk < k; the panel holds k x NR f32 and each row k f32 (asserted above).
        unsafe {
            let w: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(wp.add(kk * NR + 16 * v)));
            for r in 0..MR {
                let xb = _mm512_set1_ps(*xp[r].add(kk));
                for v in 0..NV {
                    acc[r][v] = _mm512_fmadd_ps(xb, w[v], acc[r][v]);
                }
            }
        }
    }
    // SAFETY: `out` is exclusive (the caller's contract).
    unsafe { store(acc, out) }
}

/// bf16 panel `[k / 2][NR]` of pairs x `MR` rows of `k / 2` pairs.
/// # Safety
/// `out` must be exclusive to this call.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile_bf16(panel: &[u32], x: [&[u32]; MR], out: TileOut) {
    let kp = panel.len() / NR;
    assert!(panel.len() == kp * NR && x.iter().all(|r| r.len() == kp));
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (wp, xp) = (panel.as_ptr(), x.map(|r| r.as_ptr()));
    for i in 0..kp {
        // SAFETY: i < kp; the panel holds kp x NR pairs and each row kp pairs (asserted above).
        // The transmutes reinterpret 64 bytes of bf16 pairs as the bf16 vector type.
        unsafe {
            let w: [__m512bh; NV] =
                std::array::from_fn(|v| std::mem::transmute(_mm512_loadu_si512(wp.add(i * NR + 16 * v).cast())));
            for r in 0..MR {
                let xb: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xp[r].add(i) as i32));
                for v in 0..NV {
                    acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, w[v]);
                }
            }
        }
    }
    // SAFETY: `out` is exclusive (the caller's contract).
    unsafe { store(acc, out) }
}

/// f32 rows (even length) -> bf16 pairs, nearest-even, 32 values per instruction.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) fn to_bf16_pairs(x: &[f32], out: &mut [u32]) {
    assert!(x.len() == 2 * out.len());
    let full = x.len() / 32;
    for c in 0..full {
        // SAFETY: c * 32 + 32 <= x.len() and c * 16 + 16 <= out.len().
        unsafe {
            let lo = _mm512_loadu_ps(x.as_ptr().add(c * 32));
            let hi = _mm512_loadu_ps(x.as_ptr().add(c * 32 + 16));
            let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(c * 16).cast(), b);
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(full * 16) {
        *o = super::bf16_pair(x[2 * i], x[2 * i + 1]);
    }
}
