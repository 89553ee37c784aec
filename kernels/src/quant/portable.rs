//! Portable tile kernels: the packed layout read with plain Rust, for CPUs without AVX-512 VNNI.
//!
//! Same contract as `avx512.rs`: 16 weight rows x R activation rows; per block and 4-byte group
//! an exact integer sum, fused-multiply-added with `dw * dx` into that group's own f32 partial
//! sum, the 8 partial sums added in ggml's `hsum_float_8` order at the end, plus Q4_1's `summs`
//! (itself an fma chain). `f32::mul_add` is one rounding everywhere (hardware or libm), so the
//! lanes give `qmatmul_reference`'s bits; on x86 CPUs with FMA (but no AVX-512 VNNI) the kernels
//! are compiled a second time with it enabled, so `mul_add` is an instruction, not a libm call.

use super::act::ActBlock;
use super::matrix::Tile;
use super::{hsum8, TILE};

/// `[R rows][8 groups][16 columns]` partial sums.
type Partials<const R: usize> = [[[f32; TILE]; 8]; R];

/// Per column `hsum8` of its 8 partial sums, plus Q4_1's `summs` (Q8_0 adds nothing, not even
/// +0.0, which would turn a -0.0 into +0.0).
#[inline(always)]
fn finish<const R: usize>(acc: &Partials<R>, summs: Option<&[[f32; TILE]; R]>) -> [[f32; TILE]; R] {
    std::array::from_fn(|r| {
        std::array::from_fn(|lane| {
            let h = hsum8(std::array::from_fn(|g| acc[r][g][lane]));
            summs.map_or(h, |s| h + s[r][lane])
        })
    })
}

/// Q4_1 weights x Q8_1 activations. Returns `[R rows][16 columns]`.
pub(crate) fn q4_1_tile<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        // SAFETY: fma was detected just above.
        return unsafe { fma::q4_1_tile(w, x) };
    }
    q4_1_body(w, x)
}

/// Q8_0 weights x Q8_0 activations. Returns `[R rows][16 columns]`.
pub(crate) fn q8_0_tile<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        // SAFETY: fma was detected just above.
        return unsafe { fma::q8_0_tile(w, x) };
    }
    q8_0_body(w, x)
}

/// The same bodies with hardware FMA enabled (same bits, see the module docs).
#[cfg(target_arch = "x86_64")]
mod fma {
    use super::*;

    #[target_feature(enable = "fma")]
    pub(super) fn q4_1_tile<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        q4_1_body(w, x)
    }

    #[target_feature(enable = "fma")]
    pub(super) fn q8_0_tile<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        q8_0_body(w, x)
    }
}

#[inline(always)]
fn q4_1_body<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let mut acc: Partials<R> = [[[0f32; TILE]; 8]; R];
    let mut summs = [[0f32; TILE]; R];
    let blocks = w.qs.chunks_exact(4).zip(w.scales.chunks_exact(2 * TILE));
    for (b, (lines, sc)) in blocks.enumerate() {
        let (dw, mw) = (&sc[..TILE], &sc[TILE..]);
        for r in 0..R {
            let xb = &x[r][b];
            for lane in 0..TILE {
                let dd = dw[lane] * xb.d;
                summs[r][lane] = mw[lane].mul_add(xb.s, summs[r][lane]);
                for (c, line) in lines.iter().enumerate() {
                    let (mut lo, mut hi) = (0i32, 0i32);
                    for j in 0..4 {
                        let byte = line.0[4 * lane + j];
                        lo += (byte & 0x0F) as i32 * xb.qs[4 * c + j] as i32;
                        hi += (byte >> 4) as i32 * xb.qs[16 + 4 * c + j] as i32;
                    }
                    acc[r][c][lane] = dd.mul_add(lo as f32, acc[r][c][lane]);
                    acc[r][c + 4][lane] = dd.mul_add(hi as f32, acc[r][c + 4][lane]);
                }
            }
        }
    }
    finish(&acc, Some(&summs))
}

#[inline(always)]
fn q8_0_body<const R: usize>(w: &Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let mut acc: Partials<R> = [[[0f32; TILE]; 8]; R];
    let blocks = w.qs.chunks_exact(8).zip(w.scales.chunks_exact(TILE));
    for (b, (lines, dw)) in blocks.enumerate() {
        for r in 0..R {
            let xb = &x[r][b];
            for lane in 0..TILE {
                let dd = dw[lane] * xb.d;
                for (c, line) in lines.iter().enumerate() {
                    let mut sumi = 0i32;
                    for j in 0..4 {
                        // Stored as w + 128 (xor 0x80); undo it to get the signed weight.
                        let wq = (line.0[4 * lane + j] ^ 0x80) as i8;
                        sumi += wq as i32 * xb.qs[4 * c + j] as i32;
                    }
                    acc[r][c][lane] = dd.mul_add(sumi as f32, acc[r][c][lane]);
                }
            }
        }
    }
    finish(&acc, None)
}
