//! Portable k-quant tile kernels: the packed Q4_K / Q6_K layout (`matrix.rs`) read with plain
//! Rust, for CPUs without AVX-512 VNNI. Same contract as `avx512_k.rs`: 16 weight rows x R
//! activation rows, each lane doing exactly `reference.rs`'s integer sums and float operations
//! (`f32::mul_add` is one rounding everywhere), so the results are the reference's bits.

use super::kact::KActBlock;
use super::matrix::{Line, Tile};
use super::reference::hsum8;
use super::TILE;

/// Byte `at` of a table spread over consecutive lines.
#[inline(always)]
fn meta(lines: &[Line], at: usize) -> u8 {
    lines[at / 64].0[at % 64]
}

/// Q4_K weights x Q8_K activations: `[R rows][16 columns]` (`batched`: llama.cpp's gemm form).
pub(crate) fn q4_k_tile<const R: usize>(w: &Tile<'_>, x: [&[KActBlock]; R], batched: bool) -> [[f32; TILE]; R] {
    let mut out = [[0f32; TILE]; R];
    for (r, xr) in x.iter().enumerate() {
        for (lane, o) in out[r].iter_mut().enumerate() {
            let (mut acc, mut accm) = (0f32, 0f32);
            let blocks = w.qs.chunks_exact(36).zip(w.scales.chunks_exact(2 * TILE));
            for ((lines, sc), xb) in blocks.zip(xr.iter()) {
                let (mut s, mut m) = (0i32, 0i32);
                for sub in 0..8 {
                    let (pair, shift) = (sub / 2, 4 * (sub % 2));
                    let mut dot = 0i32;
                    for c in 0..8 {
                        let bytes = &lines[8 * pair + c].0[4 * lane..4 * lane + 4];
                        for (i, &b) in bytes.iter().enumerate() {
                            dot += ((b >> shift) & 0xF) as i32 * xb.qs[32 * sub + 4 * c + i] as i32;
                        }
                    }
                    s += meta(&lines[32..], 16 * sub + lane) as i32 * dot;
                    m += meta(&lines[32..], 128 + 16 * sub + lane) as i32 * (xb.bsums[2 * sub] + xb.bsums[2 * sub + 1]);
                    if (batched && sub % 2 == 1) || sub == 7 {
                        acc = (s as f32).mul_add(sc[lane] * xb.d, acc);
                        accm = (m as f32).mul_add(sc[TILE + lane] * xb.d, accm);
                        (s, m) = (0, 0);
                    }
                }
            }
            *o = acc - accm;
        }
    }
    out
}

/// Q6_K weights x Q8_K activations: `[R rows][16 columns]` (`batched`: llama.cpp's tiled form).
pub(crate) fn q6_k_tile<const R: usize>(w: &Tile<'_>, x: [&[KActBlock]; R], batched: bool) -> [[f32; TILE]; R] {
    let mut out = [[0f32; TILE]; R];
    for (r, xr) in x.iter().enumerate() {
        for (lane, o) in out[r].iter_mut().enumerate() {
            let (mut acc, mut tiled) = ([0f32; 8], 0f32);
            let blocks = w.qs.chunks_exact(68).zip(w.scales.chunks_exact(TILE));
            for ((lines, d), xb) in blocks.zip(xr.iter()) {
                let sc = |s: usize| meta(&lines[64..], 16 * s + lane) as i8 as i32;
                let dd = xb.d * d[lane];
                let mut total = 0i32;
                for (j, a) in acc.iter_mut().enumerate() {
                    let mut sum = 0i32;
                    for v in 0..8 {
                        let bytes = &lines[8 * v + j].0[4 * lane..4 * lane + 4];
                        let dot: i32 =
                            bytes.iter().enumerate().map(|(i, &q)| q as i32 * xb.qs[32 * v + 4 * j + i] as i32).sum();
                        sum += sc(2 * v + j / 4) * dot;
                    }
                    sum -= 32 * (xb.bsums[2 * j] * sc(2 * j) + xb.bsums[2 * j + 1] * sc(2 * j + 1));
                    *a = dd.mul_add(sum as f32, *a);
                    total += sum;
                }
                tiled = (total as f32 * d[lane]).mul_add(xb.d, tiled);
            }
            *o = if batched { tiled } else { hsum8(acc) };
        }
    }
    out
}
