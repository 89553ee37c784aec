//! Portable tile kernels: the packed layout read with plain Rust, for CPUs without AVX-512 VNNI.
//!
//! Same contract as `avx512.rs`: 16 weight rows x R activation rows, per block an exact integer
//! sum, then per output element `acc += (dw * dx) * sumi + mw * sx` (Q4_1) or
//! `acc += sumi * (dw * dx)` (Q8_0) in block order. The lane loops are element-wise, so when
//! LLVM vectorizes them across lanes each lane still does exactly the scalar arithmetic.

use super::act::ActBlock;
use super::matrix::Tile;
use super::TILE;

/// Q4_1 weights x Q8_1 activations. Returns `[R rows][16 columns]`.
pub(crate) fn q4_1_tile<const R: usize>(w: Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let mut acc = [[0f32; TILE]; R];
    let blocks = w.qs.chunks_exact(4).zip(w.scales.chunks_exact(2 * TILE));
    for (b, (lines, sc)) in blocks.enumerate() {
        let (dw, mw) = (&sc[..TILE], &sc[TILE..]);
        for (acc, x) in acc.iter_mut().zip(&x) {
            let xq = &x[b].qs;
            let mut sumi = [0i32; TILE];
            for (c, line) in lines.iter().enumerate() {
                for (lane, s) in sumi.iter_mut().enumerate() {
                    for j in 0..4 {
                        let byte = line.0[4 * lane + j];
                        *s += (byte & 0x0F) as i32 * xq[4 * c + j] as i32;
                        *s += (byte >> 4) as i32 * xq[16 + 4 * c + j] as i32;
                    }
                }
            }
            let (dx, sx) = (x[b].d, x[b].s);
            for lane in 0..TILE {
                acc[lane] += dw[lane] * dx * sumi[lane] as f32 + mw[lane] * sx;
            }
        }
    }
    acc
}

/// Q8_0 weights x Q8_0 activations. Returns `[R rows][16 columns]`.
pub(crate) fn q8_0_tile<const R: usize>(w: Tile<'_>, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    let mut acc = [[0f32; TILE]; R];
    let blocks = w.qs.chunks_exact(8).zip(w.scales.chunks_exact(TILE));
    for (b, (lines, sc)) in blocks.enumerate() {
        let dw = sc;
        for (acc, x) in acc.iter_mut().zip(&x) {
            let xq = &x[b].qs;
            let mut sumi = [0i32; TILE];
            for (c, line) in lines.iter().enumerate() {
                for (lane, s) in sumi.iter_mut().enumerate() {
                    for j in 0..4 {
                        // Stored as w + 128 (xor 0x80); undo it to get the signed weight.
                        let wq = (line.0[4 * lane + j] ^ 0x80) as i8;
                        *s += wq as i32 * xq[4 * c + j] as i32;
                    }
                }
            }
            let dx = x[b].d;
            for lane in 0..TILE {
                acc[lane] += sumi[lane] as f32 * (dw[lane] * dx);
            }
        }
    }
    acc
}
