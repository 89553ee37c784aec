//! Elementwise and per-row kernels of encoder layers: `exp`, exact-erf GELU, and LayerNorm
//! (with the residual add), on f32 slices.
//!
//! `exp` and `gelu` run the same operation sequence in every AVX-512 lane as the scalar code does
//! for one value (Cephes' polynomial; Numerical Recipes' Chebyshev erfc), so the two paths agree
//! bit for bit and a value's result never depends on its position in a slice. Accuracy: `exp`
//! within 2 ulp; GELU within 3e-6 relative (1e-10 absolute near 0) of the exact-erf form
//! (PyTorch's `gelu`), below an f32 encoder's own rounding noise. The `*_reference` functions
//! are the plain f64 math the tests compare against. LayerNorm sums in 16 lanes then a fixed
//! tree, the same for any row.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so `n * LN2_HI` is exact for |n| < 2^9 (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Inputs are clamped here so 2^n stays a normal float (n in [-126, 127]).
const EXP_LO: f32 = -87.0;
const EXP_HI: f32 = 88.0;
/// Cephes `expf` polynomial for e^r on [-ln2/2, ln2/2], highest power first.
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
/// Numerical Recipes' `erfcc` (Chebyshev fit, relative error < 1.2e-7 for z >= 0):
/// erfc(z) = t * e^(-z^2 + P(t)), t = 1 / (1 + z / 2). Coefficients highest power first.
const ERFC_P: [f32; 10] = [
    0.170_872_77,
    -0.822_152_23,
    1.488_515_9,
    -1.135_204,
    0.278_868_07,
    -0.186_288_06,
    0.096_784_18,
    0.374_091_96,
    1.000_023_7,
    -1.265_512_2,
];
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[allow(unreachable_code)]
    false
}

/// e^x for one value (the lane operation of `exp_inplace`).
pub fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut y = EXP_P[0];
    for &c in &EXP_P[1..] {
        y = y.mul_add(r, c);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// GELU with the exact erf form, `0.5 x (1 + erf(x / sqrt 2))`, for one value.
pub fn gelu_scalar(x: f32) -> f32 {
    let z = (x * FRAC_1_SQRT_2).abs();
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let mut p = ERFC_P[0];
    for &c in &ERFC_P[1..] {
        p = p.mul_add(t, c);
    }
    // erfc(|x| / sqrt 2): for x < 0 it is 1 + erf directly (no cancellation), else 2 - it.
    let q = t * exp_scalar(p - z * z);
    let one_plus_erf = if x < 0.0 { q } else { 2.0 - q };
    0.5 * x * one_plus_erf
}

/// `x[i] = e^x[i]`.
pub fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: avx512f detected.
        return unsafe { simd::map_inplace::<false>(x) };
    }
    x.iter_mut().for_each(|v| *v = exp_scalar(*v));
}

/// `x[i] = gelu(x[i])`.
pub fn gelu_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: avx512f detected.
        return unsafe { simd::map_inplace::<true>(x) };
    }
    x.iter_mut().for_each(|v| *v = gelu_scalar(*v));
}

pub fn gelu_reference(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2))) as f32
}

/// erf to ~1e-15 (series near 0, continued fraction of erfc beyond): test-grade, not fast.
fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 2.5 {
        // erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    v.copysign(x)
}

/// Row-wise `x = LayerNorm(x + residual) * gamma + beta` over rows of `gamma.len()` (PyTorch's
/// biased variance, `eps` inside the square root). `residual` may be empty (no add).
pub fn layer_norm_inplace(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    assert!(h > 0 && x.len().is_multiple_of(h) && beta.len() == h);
    assert!(residual.is_empty() || residual.len() == x.len());
    for (i, row) in x.chunks_exact_mut(h).enumerate() {
        if !residual.is_empty() {
            row.iter_mut().zip(&residual[i * h..(i + 1) * h]).for_each(|(a, b)| *a += b);
        }
        let mean = lane_sum(row, |v| v) / h as f32;
        let var = lane_sum(row, |v| (v - mean) * (v - mean)) / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Sum of `f(v)` in 16 independent lanes (vectorizable), then a fixed pairwise tree.
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

pub fn layer_norm_reference(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    for (i, row) in x.chunks_exact_mut(h).enumerate() {
        let v: Vec<f64> = (0..h).map(|j| row[j] as f64 + residual.get(i * h + j).map_or(0.0, |&r| r as f64)).collect();
        let mean = v.iter().sum::<f64>() / h as f64;
        let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / h as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for j in 0..h {
            row[j] = ((v[j] - mean) * inv * gamma[j] as f64 + beta[j] as f64) as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use super::*;

    /// `exp_scalar` in 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(LOG2E),
        ));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut y = _mm512_set1_ps(EXP_P[0]);
        for &c in &EXP_P[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_mul_ps(y, _mm512_castsi512_ps(e))
    }

    /// `gelu_scalar` in 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu16(x: __m512) -> __m512 {
        let z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(FRAC_1_SQRT_2)));
        let t = _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_fmadd_ps(z, _mm512_set1_ps(0.5), _mm512_set1_ps(1.0)));
        let mut p = _mm512_set1_ps(ERFC_P[0]);
        for &c in &ERFC_P[1..] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        let q = _mm512_mul_ps(t, exp16(_mm512_sub_ps(p, _mm512_mul_ps(z, z))));
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        let one_plus_erf = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.0), q), q);
        _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5), x), one_plus_erf)
    }

    /// `x[i] = exp(x[i])` or `gelu(x[i])`; the tail runs masked through the same lanes' code.
    #[target_feature(enable = "avx512f")]
    pub(super) fn map_inplace<const GELU: bool>(x: &mut [f32]) {
        let f = |v| if GELU { gelu16(v) } else { exp16(v) };
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: `c` is 16 f32.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), f(_mm512_loadu_ps(c.as_ptr()))) };
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let m = ((1u32 << tail.len()) - 1) as __mmask16;
            // SAFETY: masked load/store touch only the tail's `len` elements.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, tail.as_ptr());
                _mm512_mask_storeu_ps(tail.as_mut_ptr(), m, f(v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestRng;

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut rng = TestRng::new(seed);
        let mut v: Vec<f32> = rng.vec(n).into_iter().map(|x| x * scale).collect();
        v.extend([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.5, -100.0, 200.0]);
        v
    }

    #[test]
    fn exp_is_accurate_and_simd_equals_scalar() {
        let xs = values(1, 1001, 30.0);
        let mut got = xs.clone();
        exp_inplace(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), exp_scalar(x).to_bits(), "exp({x})");
            let want = (x.clamp(EXP_LO, EXP_HI) as f64).exp();
            assert!(((g as f64 - want) / want).abs() < 3e-7, "exp({x}) = {g}, want {want}");
        }
    }

    #[test]
    fn gelu_is_accurate_and_simd_equals_scalar() {
        let xs = values(2, 999, 6.0);
        let mut got = xs.clone();
        gelu_inplace(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), gelu_scalar(x).to_bits(), "gelu({x})");
            let want = gelu_reference(x);
            assert!((g - want).abs() <= 1e-10 + 3e-6 * want.abs(), "gelu({x}) = {g}, want {want}");
        }
        assert!((erf_f64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-15);
        assert!((erf_f64(3.0) - 0.999_977_909_503_001_4).abs() < 1e-15);
    }

    #[test]
    fn layer_norm_matches_reference() {
        let mut rng = TestRng::new(3);
        for h in [384, 37, 16] {
            let rows = 5;
            let x: Vec<f32> = rng.vec(rows * h).into_iter().map(|v| v * 4.0 + 1.0).collect();
            let (res, g, b) = (rng.vec(rows * h), rng.vec(h), rng.vec(h));
            for residual in [&res[..], &[]] {
                let (mut got, mut want) = (x.clone(), x.clone());
                layer_norm_inplace(&mut got, residual, &g, &b, 1e-12);
                layer_norm_reference(&mut want, residual, &g, &b, 1e-12);
                let d = crate::testutil::max_abs_diff(&got, &want);
                assert!(d < 2e-6, "h {h}: {d}");
            }
        }
    }
}
