//! kiln-kernels' `qmatmul` against candle's `QMatMul::forward` on the same ggml blocks.
//!
//! Where the two differ, the difference is pinned down instead of hidden behind a tolerance:
//! - Q4_1 (candle: scalar `vec_dot_unopt` on Q8_1 activations): candle computes Q8_1's
//!   `s = f16(f16(sum) * f16(d))` in f16 arithmetic where ggml computes `s = f16(sum * d)`, and
//!   sums `(sumi * dw) * dx + mw * s` block by block where ggml's x86 build keeps 8 partial sums
//!   (one per 4-byte group) updated by `fma(dw * dx, group_sum, acc)`, adds them in
//!   `hsum_float_8` order and adds `summs = fma(mw, s, summs)`. A scalar emulation with candle's
//!   formulas must match candle bit for bit, and one with ggml's must match us bit for bit.
//! - Q8_0 with k % 256 != 0 (candle: AVX2 `vec_dot_q8_0_q8_0` on Q8_0 activations): identical
//!   activations and integer sums; only the f32 accumulation order differs (candle sums 8 lanes
//!   with FMA and reduces at the end), so the gap is a few ulps of the sum of |block terms|.
//! - Q8_0 with k % 256 == 0 and n % 16 == 0 on AVX-512 VNNI: candle quantizes activations to
//!   Q8K (one scale per 256 values, not per 32). That is a different, coarser activation
//!   quantization, so both are compared to the exact f64 product instead, and ours is checked
//!   to be at least as close.

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use kiln_kernels::quant::{qmatmul, QuantMatrix, QuantType};

mod common;

/// splitmix64 uniform in [-1, 1), never exactly zero.
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 40) as f32 + 0.5) / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// (candle's QMatMul output, our qmatmul output, the ggml bytes) for W [n, k] and x [m, k].
fn both(dtype: GgmlDType, w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<u8>)> {
    let qt = QTensor::quantize(&Tensor::from_slice(w, (n, k), &Device::Cpu)?, dtype)?;
    let bytes = qt.data()?.to_vec();
    let qtype = if dtype == GgmlDType::Q4_1 { QuantType::Q4_1 } else { QuantType::Q8_0 };
    let ours_w = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes)?;
    let theirs = QMatMul::from_qtensor(qt)?.forward(&Tensor::from_slice(x, (m, k), &Device::Cpu)?)?;
    let mut ours = vec![0f32; m * n];
    qmatmul(&ours_w, x, m, &mut ours);
    Ok((theirs.flatten_all()?.to_vec1::<f32>()?, ours, bytes))
}

/// One activation block quantized the ggml way: (qs, f16 d as f32, f32 d, sum(qs)).
fn quantize_block(x: &[f32]) -> (Vec<i32>, f32, f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<i32> = x.iter().map(|v| (v * id).round() as i32).collect();
    let sum = q.iter().sum();
    (q, f16::from_f32(d).to_f32(), d, sum)
}

/// Scalar Q4_1 x Q8_1 row dot, with either ggml's (x86 build) or candle's formulas.
fn emulate_q4_1(wrow: &[u8], x: &[f32], candle: bool) -> f32 {
    let (mut acc, mut lanes, mut summs) = (0f32, [0f32; 8], 0f32);
    for (blk, xb) in wrow.chunks_exact(20).zip(x.chunks_exact(32)) {
        let (dw, mw) = (f16::from_le_bytes([blk[0], blk[1]]).to_f32(), f16::from_le_bytes([blk[2], blk[3]]).to_f32());
        let nib = |j: usize| if j < 16 { (blk[4 + j] & 0xF) as i32 } else { (blk[4 + j - 16] >> 4) as i32 };
        if candle {
            let (q, dx, _, sum) = quantize_block(xb);
            let sumi: i32 = (0..32).map(|j| nib(j) * q[j]).sum();
            let s = (f16::from_f32(sum as f32) * f16::from_f32(dx)).to_f32();
            acc += sumi as f32 * dw * dx + mw * s;
        } else {
            // ggml x86 quantize_row_q8_1: id = 127 / amax, ties to even.
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (d32, id) = (amax / 127.0, if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q: Vec<i32> = xb.iter().map(|v| (v * id).round_ties_even() as i32).collect();
            let dx = f16::from_f32(d32).to_f32();
            let s = f16::from_f32(q.iter().sum::<i32>() as f32 * d32).to_f32();
            summs = mw.mul_add(s, summs);
            for (g, lane) in lanes.iter_mut().enumerate() {
                // Group g < 4: low nibbles k = 4g..4g+4; group 4 + g: high nibbles k = 16 + 4g...
                let k0 = if g < 4 { 4 * g } else { 16 + 4 * (g - 4) };
                let sumi: i32 = (k0..k0 + 4).map(|j| nib(j) * q[j]).sum();
                *lane = (dw * dx).mul_add(sumi as f32, *lane);
            }
        }
    }
    if candle {
        return acc;
    }
    let l = lanes;
    ((l[4] + l[0]) + (l[6] + l[2])) + ((l[5] + l[1]) + (l[7] + l[3])) + summs
}

fn emulate_all(bytes: &[u8], n: usize, k: usize, x: &[f32], m: usize, candle: bool) -> Vec<f32> {
    let row_bytes = k / 32 * 20;
    let mut out = Vec::with_capacity(m * n);
    for xr in x.chunks_exact(k) {
        out.extend((0..n).map(|j| emulate_q4_1(&bytes[j * row_bytes..][..row_bytes], xr, candle)));
    }
    out
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn q4_1_matches_candle_up_to_its_q8_1_s_rounding() -> Result<()> {
    let mut rng = Rng(11);
    for (n, k, m) in [(96, 576, 3), (37, 1536, 5), (16, 64, 1)] {
        let w = rng.vec(n * k);
        let x: Vec<f32> = rng.vec(m * k).iter().map(|v| 3.0 * v).collect();
        let (theirs, ours, bytes) = both(GgmlDType::Q4_1, &w, n, k, &x, m)?;
        let candle_emul = emulate_all(&bytes, n, k, &x, m, true);
        let ggml_emul = emulate_all(&bytes, n, k, &x, m, false);
        assert!(bits_eq(&theirs, &candle_emul), "candle != its emulation: {}", max_abs(&theirs, &candle_emul));
        assert!(bits_eq(&ours, &ggml_emul), "ours != ggml emulation: {}", max_abs(&ours, &ggml_emul));
        // The remaining gap is the f16 rounding of s: a ~1e-3 relative error of the m * s terms.
        let scale = ours.iter().fold(0f32, |a, v| a.max(v.abs()));
        let gap = max_abs(&ours, &theirs);
        eprintln!("q4_1 {n}x{k} m={m}: max |ours - candle| = {gap:e} (max |out| {scale})");
        assert!(gap <= 2e-3 * scale, "gap {gap} vs scale {scale}");
    }
    Ok(())
}

#[test]
fn q8_0_matches_candle_where_both_use_q8_0_activations() -> Result<()> {
    let mut rng = Rng(12);
    // k = 576 is not a multiple of 256, so candle keeps Q8_0 activations.
    for (n, k, m) in [(100, 576, 4), (49, 96, 2)] {
        let w = rng.vec(n * k);
        let x: Vec<f32> = rng.vec(m * k).iter().map(|v| 3.0 * v).collect();
        let (theirs, ours, _) = both(GgmlDType::Q8_0, &w, n, k, &x, m)?;
        // Same integers and scales; only the f32 summation order differs: a few ulps of the sum
        // of |block terms|, which is below sum |w| |x| over the row.
        for i in 0..m {
            for j in 0..n {
                let l1: f32 = (0..k).map(|t| (w[j * k + t] * x[i * k + t]).abs()).sum();
                let d = (ours[i * n + j] - theirs[i * n + j]).abs();
                assert!(d <= 4e-6 * l1.max(1e-3), "({i}, {j}): {} vs {}", ours[i * n + j], theirs[i * n + j]);
            }
        }
        eprintln!("q8_0 {n}x{k} m={m}: max |ours - candle| = {:e}", max_abs(&ours, &theirs));
    }
    Ok(())
}

#[test]
fn q8_0_where_candle_uses_q8k_activations() -> Result<()> {
    let mut rng = Rng(13);
    let (n, k, m) = (64, 1536, 3);
    let w = rng.vec(n * k);
    // Hidden states have a few large channels; with one scale per 256 values they crush the rest.
    let x: Vec<f32> = rng.vec(m * k).iter().enumerate().map(|(i, v)| if i % 97 == 0 { 30.0 * v } else { *v }).collect();
    let (theirs, ours, _) = both(GgmlDType::Q8_0, &w, n, k, &x, m)?;
    // Exact product of the dequantized weights with the f32 activations.
    let wq = QTensor::quantize(&Tensor::from_slice(&w, (n, k), &Device::Cpu)?, GgmlDType::Q8_0)?;
    let wd = wq.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let exact: Vec<f32> = (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            (0..k).map(|t| wd[j * k + t] as f64 * x[i * k + t] as f64).sum::<f64>() as f32
        })
        .collect();
    let (err_ours, err_theirs) = (max_abs(&ours, &exact), max_abs(&theirs, &exact));
    let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
    eprintln!("q8_0 {n}x{k}: max err vs exact: ours (Q8_0 acts) {err_ours:e}, candle (Q8K acts) {err_theirs:e}; max |out| {scale}");
    // Per-32 activation scales are never coarser than per-256 ones, and with outliers much finer.
    // (Measured with this seed: ours 1.3, candle 4.4, max |out| 116.)
    assert!(2.0 * err_ours < err_theirs, "ours {err_ours} candle {err_theirs}");
    assert!(err_ours <= 2e-2 * scale && err_theirs <= 1e-1 * scale);
    Ok(())
}

/// The default model's real Q4_1 tensors, not just random ones.
#[test]
fn smollm2_q4_1_weights_match_candle_emulation() -> Result<()> {
    let path = common::smollm2()?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut rng = Rng(14);
    for name in ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"] {
        let qt = content.tensor(&mut file, name, &Device::Cpu)?;
        assert_eq!(qt.dtype(), GgmlDType::Q4_1, "{name}");
        let (n, k) = qt.shape().dims2()?;
        let m = 2;
        let x = rng.vec(m * k);
        let bytes = qt.data()?.to_vec();
        let ours_w = QuantMatrix::from_ggml_bytes(QuantType::Q4_1, n, k, &bytes)?;
        let mut ours = vec![0f32; m * n];
        qmatmul(&ours_w, &x, m, &mut ours);
        let theirs = QMatMul::from_qtensor(qt)?.forward(&Tensor::from_slice(&x, (m, k), &Device::Cpu)?)?;
        let theirs = theirs.flatten_all()?.to_vec1::<f32>()?;
        assert!(bits_eq(&ours, &emulate_all(&bytes, n, k, &x, m, false)), "{name}: ours vs ggml emulation");
        assert!(bits_eq(&theirs, &emulate_all(&bytes, n, k, &x, m, true)), "{name}: candle vs its emulation");
        let scale = ours.iter().fold(0f32, |a, v| a.max(v.abs()));
        eprintln!("{name} {n}x{k}: max |ours - candle| = {:e} (max |out| {scale})", max_abs(&ours, &theirs));
    }
    Ok(())
}
