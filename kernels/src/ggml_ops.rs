//! Per-row ops of decoder layers with ggml's x86 arithmetic, bit for bit: RMSNorm
//! (`ggml_compute_forward_rms_norm_f32` then `ggml_mul`) and SwiGLU (`ggml_vec_swiglu_f32` with
//! the AVX-512 `ggml_v_silu` / `ggml_v_expf` polynomial). llama.cpp's greedy tokens on a Q8
//! activation path flip on single-ulp differences, so these copy its rounding sequence rather
//! than computing the textbook value as accurately as possible.
//!
//! `swiglu` runs in AVX-512 where available and otherwise in scalar code doing the same
//! operations per value (`swiglu_reference`, with `f32::mul_add` for each fused op), so both
//! give the same bits. Rows are independent: a value's result depends only on its row.
//! Must not know about tensors, layers or models.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `out[r] = (x[r] * scale_r) * w` per row of `n`, `scale_r = 1 / sqrtf(mean_r + eps)`, where
/// `mean_r` is the f64 sum of the f32 squares divided by n, rounded to f32: ggml's rms_norm
/// (the weight multiply is a separate `ggml_mul`, or fused with the same two roundings).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && out.len() == x.len(), "rms_norm: x, out must be [rows, {n}]");
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        // Sequential f64 sum of f32 products (`sum += (ggml_float)(x * x)`), as compiled.
        let sum = xr.iter().fold(0f64, |s, &v| s + (v * v) as f64);
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *y = (v * scale) * wv;
        }
    }
}

/// Plain reference: the textbook formula in f64 (within a few f32 ulps of `rms_norm`).
pub fn rms_norm_reference(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let scale = 1.0 / (mean + eps as f64).sqrt();
        for ((y, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *y = (v as f64 * scale * wv as f64) as f32;
        }
    }
}

/// Values per AVX-512 step of ggml's `ggml_vec_swiglu_f32`; a row's last `n % 16` values take
/// its scalar tail (`ggml_silu_f32` with libm's `expf`).
const LANES: usize = 16;

/// `out = silu(gate) * up` per row of `n` (`gate`, `up`, `out`: `[rows, n]`), ggml's
/// `ggml_vec_swiglu_f32` on each row.
pub fn swiglu(gate: &[f32], up: &[f32], n: usize, out: &mut [f32]) {
    assert!(n > 0 && gate.len().is_multiple_of(n) && up.len() == gate.len() && out.len() == gate.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        for ((g, u), o) in gate.chunks_exact(n).zip(up.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
            // SAFETY: avx512f was detected just above.
            unsafe { swiglu_row_avx512(g, u, o) };
        }
        return;
    }
    swiglu_reference(gate, up, n, out)
}

/// Plain reference: ggml's polynomial `expf` written as scalar code, one value at a time.
pub fn swiglu_reference(gate: &[f32], up: &[f32], n: usize, out: &mut [f32]) {
    for ((g, u), o) in gate.chunks_exact(n).zip(up.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
        let full = n - n % LANES;
        for i in 0..n {
            let x = g[i];
            let silu = if i < full { x / (1.0 + ggml_expf(0.0 - x)) } else { x / (1.0 + (-x).exp()) };
            o[i] = silu * u[i];
        }
    }
}

// ggml_v_expf's constants (ARM optimized-routines' expf: max error 1.45 ulp + 0.5).
const SHIFT: f32 = 12_582_912.0; // 0x1.8p23: adding it rounds to an integer
const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B); // 0x1.715476p+0
const LN2_HI: f32 = f32::from_bits(0x3F31_7200); // 0x1.62e4p-1
const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E); // 0x1.7f7d1cp-20
const C4: f32 = f32::from_bits(0x3C07_2010); // 0x1.0e4020p-7
const C3: f32 = f32::from_bits(0x3D2B_9F17); // 0x1.573e2ep-5
const C2: f32 = f32::from_bits(0x3E2A_AF33); // 0x1.555e66p-3
const C1: f32 = f32::from_bits(0x3EFF_FEDB); // 0x1.fffdb6p-2
const C0: f32 = f32::from_bits(0x3F7F_FFF6); // 0x1.ffffecp-1

/// One lane of `ggml_v_expf` (AVX-512): `e^x = 2^n * e^b`, b = x - n ln2 in two fnmadds, e^b by
/// a degree-5 polynomial, 2^n applied with `vscalefps` (exact, rounded once).
fn ggml_expf(x: f32) -> f32 {
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = C4.mul_add(b, C3).mul_add(u, C2.mul_add(b, C1)).mul_add(u, C0.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // scalef(j, n) = j * 2^n with one rounding; exact in f64 first (|n| <= 192), then rounded.
    (j as f64 * 2f64.powi(n as i32)) as f32
}

/// `ggml_vec_swiglu_f32` on one row, as compiled for AVX-512 (F + DQ; DQ is not needed here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_row_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    let n = g.len();
    assert!(u.len() == n && o.len() == n);
    let full = n - n % LANES;
    for i in (0..full).step_by(LANES) {
        // SAFETY: i + 16 <= full <= n for all three slices (asserted lengths); unaligned ops.
        unsafe {
            let x = _mm512_loadu_ps(g.as_ptr().add(i));
            let e = expf_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_storeu_ps(o.as_mut_ptr().add(i), _mm512_mul_ps(silu, _mm512_loadu_ps(u.as_ptr().add(i))));
        }
    }
    for i in full..n {
        o[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn expf_avx512(x: __m512) -> __m512 {
    let r = _mm512_set1_ps(SHIFT);
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), r);
    let n = _mm512_sub_ps(z, r);
    let b = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x));
    let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    let u = _mm512_mul_ps(b, b);
    let p_hi = _mm512_fmadd_ps(_mm512_set1_ps(C4), b, _mm512_set1_ps(C3));
    let p_mid = _mm512_fmadd_ps(_mm512_set1_ps(C2), b, _mm512_set1_ps(C1));
    let p_lo = _mm512_fmadd_ps(_mm512_set1_ps(C0), b, _mm512_set1_ps(1.0));
    let j = _mm512_fmadd_ps(_mm512_fmadd_ps(p_hi, u, p_mid), u, p_lo);
    let res = _mm512_scalef_ps(j, n);
    if d == 0 {
        return res;
    }
    let le0 = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
    let alt = _mm512_mask_blend_ps(le0, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
    _mm512_mask_blend_ps(d, res, alt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs_diff, TestRng};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn rms_norm_is_close_to_the_f64_formula() {
        let mut rng = TestRng::new(11);
        for (rows, n) in [(1, 576), (5, 64), (3, 7)] {
            let x: Vec<f32> = rng.vec(rows * n).iter().map(|v| v * 3.0).collect();
            let w = rng.vec(n);
            let (mut got, mut want) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            rms_norm(&x, &w, 1e-5, &mut got);
            rms_norm_reference(&x, &w, 1e-5, &mut want);
            assert!(max_abs_diff(&got, &want) < 1e-5, "{rows}x{n}");
        }
    }

    #[test]
    fn expf_polynomial_is_accurate_and_saturates_like_ggml() {
        let mut rng = TestRng::new(12);
        for _ in 0..10_000 {
            let x = rng.f32() * 80.0;
            let (got, want) = (ggml_expf(x), (x as f64).exp());
            assert!(((got as f64 - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
        }
        assert_eq!(ggml_expf(0.0), 1.0);
        assert_eq!(ggml_expf(-200.0), 0.0);
        assert_eq!(ggml_expf(200.0), f32::INFINITY);
        assert!(ggml_expf(-100.0) > 0.0, "subnormal results are kept, not flushed");
    }

    #[test]
    fn swiglu_matches_reference_bit_for_bit() {
        let mut rng = TestRng::new(13);
        for (rows, n) in [(1, 1536), (3, 64), (2, 37), (4, 5)] {
            // Wide range: saturation (|x| > ~88), subnormal exp, ordinary values.
            let gate: Vec<f32> = (0..rows * n).map(|i| rng.f32() * if i % 7 == 0 { 150.0 } else { 8.0 }).collect();
            let up = rng.vec(rows * n);
            let (mut got, mut want) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            swiglu(&gate, &up, n, &mut got);
            swiglu_reference(&gate, &up, n, &mut want);
            assert_eq!(bits(&got), bits(&want), "{rows}x{n}");
            // And it is SwiGLU: close to the f64 formula.
            for i in 0..rows * n {
                let (g, u) = (gate[i] as f64, up[i] as f64);
                let exact = g / (1.0 + (-g).exp()) * u;
                assert!((got[i] as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()), "{i}: {} vs {exact}", got[i]);
            }
        }
    }
}
