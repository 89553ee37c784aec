//! The plain reference of `qmatmul`: ggml's activation quantization and the x86 dot products
//! of llama.cpp's CPU backend written as scalar code on the original ggml blocks, one output
//! element at a time. The fast kernels must equal it bit for bit.
//!
//! Which ggml function each type follows (what llama.cpp runs for one token at a time on an
//! AVX-512 machine; see `super` for why prefill is not followed):
//! - Q4_1: `ggml_vec_dot_q4_1_q8_1`; Q8_0 and Q5_0: `ggml_vec_dot_q8_0_q8_0` /
//!   `ggml_vec_dot_q5_0_q8_0` (llamafile's tinyBLAS, which takes these for batches of 2+ rows,
//!   does the same per-element arithmetic: 8 group lanes, fma, the same horizontal sum).
//! - Q6_K: `ggml_vec_dot_q6_K_q8_K`.
//! - Q4_K: `ggml_gemv_q4_K_8x8_q8_K`: llama.cpp repacks Q4_K weights with 8 | rows on AVX2
//!   machines, and the repacked gemv rounds differently from `ggml_vec_dot_q4_K_q8_K` (one
//!   float accumulator per output and one for the mins, not 8 lanes plus 4). A Q4_K matrix
//!   whose row count is not a multiple of 8 stays unrepacked in llama.cpp and goes through
//!   `ggml_vec_dot_q4_K_q8_K` (and, for 8+ rows, its tiled kernel); we do not follow those, so
//!   such a matrix would differ in the last bits (none in the models kiln ships tests for).
//!
//! `Form::LlamaCppBatch` rows follow llama.cpp's batched k-quant kernels instead (see `super`):
//! `ggml_gemm_q4_K_8x8_q8_K` (its AVX-512 part, i.e. 16 | rows) and `tiled_run_micro_vnni_8x16`
//! for Q6_K. Checked against libggml-cpu's own output on random matrices, bit for bit.

use super::act::{ActBlock, QActs};
use super::kact::{KActBlock, KActs};
use super::matrix::{k4_scales, q5_0_values, q6_k_values};
use super::{check_shapes, k_batched, Form, QuantMatrix, QuantType};

/// `out[m, n] = x[m, k] * W^T`, scalar, on `w.to_ggml_bytes()`, in `Form::Invariant`.
pub fn qmatmul_reference(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    qmatmul_reference_form(w, x, m, out, Form::Invariant)
}

/// `qmatmul_reference` in either form.
pub fn qmatmul_reference_form(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32], form: Form) {
    let (n, k) = (w.rows(), w.cols());
    check_shapes(w, x, m, out);
    let row_bytes = (k / w.qtype().block_values()) * w.qtype().block_bytes();
    let bytes = w.to_ggml_bytes();
    let wrow = |j: usize| &bytes[j * row_bytes..][..row_bytes];
    if w.qtype().is_k() {
        let mut acts = KActs::default();
        acts.quantize(x, m, k);
        for i in 0..m {
            for j in 0..n {
                let batched = k_batched(w.qtype(), form, i, m);
                out[i * n + j] = match w.qtype() {
                    QuantType::Q4_K => ref_dot_q4_k(wrow(j), acts.row(i), batched),
                    _ => ref_dot_q6_k(wrow(j), acts.row(i), batched),
                };
            }
        }
        return;
    }
    let acts = QActs::quantize_ref(x, m, k);
    for i in 0..m {
        let xr = acts.row(i);
        for j in 0..n {
            out[i * n + j] = match w.qtype() {
                QuantType::Q4_1 => ref_dot_q4_1(wrow(j), xr),
                QuantType::Q8_0 => ref_dot_q8_0(wrow(j), xr),
                QuantType::Q5_0 => ref_dot_q5_0(wrow(j), xr),
                QuantType::Q4_K | QuantType::Q6_K => unreachable!("k-quants handled above"),
            };
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `hsum_float_8`: `((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))`.
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
}

/// `ggml_vec_dot_q4_1_q8_1` (x86, AVX2 + VNNI) on one ggml Q4_1 row. Group g < 4 holds the low
/// nibbles of bytes 4g..4g+4 times x[4g..], group 4 + g their high nibbles times x[16 + 4g..]
/// (`bytes_from_nibbles_32` puts low nibbles in bytes 0..16, high ones in 16..32).
fn ref_dot_q4_1(wrow: &[u8], x: &[ActBlock]) -> f32 {
    let (mut acc, mut summs) = ([0f32; 8], 0f32);
    for (blk, xb) in wrow.chunks_exact(20).zip(x) {
        let (dw, mw, qs) = (f16_at(blk, 0), f16_at(blk, 2), &blk[4..20]);
        summs = mw.mul_add(xb.s, summs);
        let dd = dw * xb.d;
        for (g, a) in acc.iter_mut().enumerate() {
            let (c, high) = (g % 4, g >= 4);
            let xs = if high { &xb.qs[16 + 4 * c..20 + 4 * c] } else { &xb.qs[4 * c..4 * c + 4] };
            let sumi: i32 = qs[4 * c..4 * c + 4]
                .iter()
                .zip(xs)
                .map(|(&q, &xq)| if high { q >> 4 } else { q & 0x0F } as i32 * xq as i32)
                .sum();
            *a = dd.mul_add(sumi as f32, *a);
        }
    }
    hsum8(acc) + summs
}

/// The Q8_0 / Q5_0 dot: per block `dd = dw * dx`, each 4-byte group's exact integer sum
/// fma'd into its own lane, lanes added by `hsum8`.
fn dot_signed_blocks<'a>(blocks: impl Iterator<Item = (f32, [i8; 32])>, x: impl Iterator<Item = &'a ActBlock>) -> f32 {
    let mut acc = [0f32; 8];
    for ((dw, qs), xb) in blocks.zip(x) {
        let dd = dw * xb.d;
        for (g, a) in acc.iter_mut().enumerate() {
            let sumi: i32 = (4 * g..4 * g + 4).map(|j| qs[j] as i32 * xb.qs[j] as i32).sum();
            *a = dd.mul_add(sumi as f32, *a);
        }
    }
    hsum8(acc)
}

/// `ggml_vec_dot_q8_0_q8_0` (x86, AVX2) on one ggml Q8_0 row: group g = bytes 4g..4g+4.
fn ref_dot_q8_0(wrow: &[u8], x: &[ActBlock]) -> f32 {
    let blocks = wrow.chunks_exact(34).map(|b| (f16_at(b, 0), std::array::from_fn(|j| b[2 + j] as i8)));
    dot_signed_blocks(blocks, x.iter())
}

/// `ggml_vec_dot_q5_0_q8_0` (x86, AVX2): the weights `q - 16` as signed bytes (ggml ors
/// `0xF0` into the nibble where the high bit is clear), then exactly the Q8_0 arithmetic.
fn ref_dot_q5_0(wrow: &[u8], x: &[ActBlock]) -> f32 {
    let blocks = wrow.chunks_exact(22).map(|b| (f16_at(b, 0), q5_0_values(b)));
    dot_signed_blocks(blocks, x.iter())
}

/// `ggml_gemv_q4_K_8x8_q8_K` (x86 AVX2) for one output: per super-block the exact integers
/// `S = sum_s scale_s * dot(q_s, x_s)` and `M = sum_s min_s * (sum of x_s)` (32-value
/// sub-blocks s), then `acc = fma(S, dw * dx, acc)`, `accm = fma(M, dminw * dx, accm)`, and
/// the result `acc - accm`. `batched`: `ggml_gemm_q4_K_8x8_q8_K` (AVX-512), the same but with
/// the two fmas once per pair of sub-blocks (64 values) instead of once per super-block.
fn ref_dot_q4_k(wrow: &[u8], x: &[KActBlock], batched: bool) -> f32 {
    let (mut acc, mut accm) = (0f32, 0f32);
    for (blk, xb) in wrow.chunks_exact(144).zip(x) {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let (sc, mn) = k4_scales(blk[4..16].try_into().expect("12 bytes"));
        let (mut s, mut m) = (0i32, 0i32);
        for sub in 0..8 {
            let (pair, shift) = (sub / 2, 4 * (sub % 2));
            let dot: i32 =
                (0..32).map(|e| ((blk[16 + 32 * pair + e] >> shift) & 0xF) as i32 * xb.qs[32 * sub + e] as i32).sum();
            s += sc[sub] as i32 * dot;
            m += mn[sub] as i32 * (xb.bsums[2 * sub] + xb.bsums[2 * sub + 1]);
            if batched && sub % 2 == 1 {
                acc = (s as f32).mul_add(d * xb.d, acc);
                accm = (m as f32).mul_add(dmin * xb.d, accm);
                (s, m) = (0, 0);
            }
        }
        if !batched {
            acc = (s as f32).mul_add(d * xb.d, acc);
            accm = (m as f32).mul_add(dmin * xb.d, accm);
        }
    }
    acc - accm
}

/// `ggml_vec_dot_q6_K_q8_K` (x86 AVX2) for one output. 8 int32 lanes per super-block: lane j
/// sums, over the 8 runs v of 32 values, `scale * q * x` of values `32v + 4j..+4` (q the
/// unsigned 6-bit value, scale that of its 16-group), minus `32 * (bsum[2j] * scale[2j] +
/// bsum[2j + 1] * scale[2j + 1])` (the -32 offset, by `_mm256_madd_epi16` of the bsums and
/// scales, so lane j's correction is for the values of run j); then
/// `acc_j = fma(dx * dw, lane_j, acc_j)` and `hsum8` at the end. `batched`: llama.cpp's tiled
/// kernel (`tiled_run_micro_vnni_8x16`), one integer per super-block (the sum of the 8 lanes,
/// exact) and `acc = fma(S * dw, dx, acc)` with one accumulator.
// Value index `e` picks the weight, the activation and (e / 16) the scale: clearer than zips.
#[allow(clippy::needless_range_loop)]
fn ref_dot_q6_k(wrow: &[u8], x: &[KActBlock], batched: bool) -> f32 {
    let (mut acc, mut tiled) = ([0f32; 8], 0f32);
    for (blk, xb) in wrow.chunks_exact(210).zip(x) {
        let (q, d) = (q6_k_values(blk), f16_at(blk, 208));
        let sc = |s: usize| blk[192 + s] as i8 as i32;
        let dd = xb.d * d;
        let mut total = 0i32;
        for (j, a) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for v in 0..8 {
                for e in 32 * v + 4 * j..32 * v + 4 * j + 4 {
                    lane += sc(e / 16) * q[e] as i32 * xb.qs[e] as i32;
                }
            }
            lane -= 32 * (xb.bsums[2 * j] * sc(2 * j) + xb.bsums[2 * j + 1] * sc(2 * j + 1));
            *a = dd.mul_add(lane as f32, *a);
            total += lane;
        }
        tiled = (total as f32 * d).mul_add(xb.d, tiled);
    }
    if batched {
        tiled
    } else {
        hsum8(acc)
    }
}
