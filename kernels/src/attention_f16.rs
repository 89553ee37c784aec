//! Attention over an f16 KV cache with llama.cpp's CPU flash-attention numerics.
//!
//! Why a second kernel: with quantized weights the model is chaotic at the last bit. An
//! activation that lands on the other side of a Q8 rounding boundary moves logits by tenths, so
//! "f32 math over f16 keys" and llama.cpp's f16 flash attention disagree on log-probabilities by
//! up to ~0.1 (llama.cpp disagrees with itself by as much between `-fa on` and `-fa off`). Users
//! compare us with llama.cpp on the same GGUF, so the f16 cache follows its arithmetic exactly
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, x86 AVX-512 build):
//!
//! - the query is rounded to f16; `s = q.k` sums 64-wide chunks in four 16-lane f32 FMA
//!   accumulators, folds them (0+2, 1+3, then 0+1) and reduces the 16 lanes as
//!   `_mm512_reduce_add_ps` does; then `s *= scale`;
//! - online softmax per position in cache order: on a new maximum the accumulator is rescaled by
//!   `exp(M_old - M)` (rounded to f16), and `acc = f16(fma(v, w, acc))` with `w = 1` for the new
//!   maximum, else `exp(s - M)`; the running sum is `S = fma(S, ms, w)`;
//! - the result is `f32(acc) * (1 / S)`.
//!
//! The accumulator lives in f32 buffers but always holds f16-representable values. Everything
//! here depends only on the row's own query and cached keys, so it stays batch invariant.

use crate::attention::AttnShape;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Lanes of one AVX-512 f32 register.
const LANES: usize = 16;
/// Elements per `ggml_vec_dot_f16` step (4 registers).
const STEP: usize = 4 * LANES;

/// One (row, kv head) task: the `g` query heads of this KV head over `ctx` cached positions.
/// Same contract as the f32 kernel's `attend_group`.
pub(crate) fn attend_group(
    q: &[f32],
    table: &[u32],
    ctx: usize,
    kv: usize,
    shape: &AttnShape,
    caches: (&[f16], &[f16]),
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if shape.head_dim == STEP
        && shape.num_heads / shape.num_kv_heads <= avx512::MAX_GROUP
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: the CPU has AVX-512F (checked above); slices are bounds-checked inside.
        unsafe { avx512::attend_group_d64(q, table, ctx, kv, shape, caches, out) };
        return;
    }
    attend_group_scalar(q, table, ctx, kv, shape, caches, out)
}

/// The portable version: plain loops over f32 buffers, f16 rounding through `half`.
fn attend_group_scalar(
    q: &[f32],
    table: &[u32],
    ctx: usize,
    kv: usize,
    shape: &AttnShape,
    (k_cache, v_cache): (&[f16], &[f16]),
    out: &mut [f32],
) {
    let (d, bs, row) = (shape.head_dim, shape.block_size, shape.num_kv_heads * shape.head_dim);
    let g = shape.num_heads / shape.num_kv_heads;
    let qh: Vec<f32> = q.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    let (mut k, mut v) = (vec![0f32; d], vec![0f32; d]);
    let mut state: Vec<Online> = (0..g).map(|_| Online::new(d)).collect();
    let mut tmp = vec![f16::ZERO; d];
    for j in 0..ctx {
        let slot = table[j / bs] as usize * bs + j % bs;
        let at = slot * row + kv * d;
        k_cache[at..at + d].convert_to_f32_slice(&mut k);
        v_cache[at..at + d].convert_to_f32_slice(&mut v);
        for (h, st) in state.iter_mut().enumerate() {
            let s = dot_f16(&qh[h * d..(h + 1) * d], &k) * shape.scale;
            st.push(s, &v, &mut tmp);
        }
    }
    for (h, st) in state.iter().enumerate() {
        let inv = if st.sum == 0.0 { 0.0 } else { 1.0 / st.sum };
        out[h * d..(h + 1) * d].iter_mut().zip(&st.acc).for_each(|(o, a)| *o = a * inv);
    }
}

/// Online-softmax state of one query head.
struct Online {
    max: f32,
    sum: f32,
    /// f16-representable values.
    acc: Vec<f32>,
}

impl Online {
    fn new(d: usize) -> Self {
        Self { max: f32::NEG_INFINITY, sum: 0.0, acc: vec![0.0; d] }
    }

    #[inline]
    fn push(&mut self, s: f32, v: &[f32], tmp: &mut [f16]) {
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > self.max {
            let old = self.max;
            self.max = s;
            ms = (old - s).exp();
            self.acc.iter_mut().for_each(|a| *a *= ms);
            round_f16(&mut self.acc, tmp);
        } else {
            vs = (s - self.max).exp();
        }
        self.acc.iter_mut().zip(v).for_each(|(a, x)| *a = x.mul_add(vs, *a));
        round_f16(&mut self.acc, tmp);
        self.sum = self.sum.mul_add(ms, vs);
    }
}

/// Rounds every value to the nearest f16 (ties to even), through the hardware converters when
/// the CPU has them.
#[inline]
fn round_f16(x: &mut [f32], tmp: &mut [f16]) {
    tmp.convert_from_f32_slice(x);
    tmp.convert_to_f32_slice(x);
}

/// `ggml_vec_dot_f16` as the AVX-512 build computes it; `q` and `k` hold f16 values.
#[inline]
fn dot_f16(q: &[f32], k: &[f32]) -> f32 {
    let np = q.len() / STEP * STEP;
    let mut acc = [[0f32; LANES]; 4];
    for (qc, kc) in q[..np].chunks_exact(STEP).zip(k[..np].chunks_exact(STEP)) {
        for (j, a) in acc.iter_mut().enumerate() {
            for l in 0..LANES {
                a[l] = qc[j * LANES + l].mul_add(kc[j * LANES + l], a[l]);
            }
        }
    }
    let mut lanes = [0f32; LANES];
    for l in 0..LANES {
        lanes[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = reduce_add_16(&lanes) as f64;
    for (a, b) in q[np..].iter().zip(&k[np..]) {
        sum += (a * b) as f64;
    }
    sum as f32
}

/// `_mm512_reduce_add_ps`: halves folded 16 -> 8 -> 4, then (0+2) + (1+3).
#[inline]
fn reduce_add_16(x: &[f32; LANES]) -> f32 {
    let t: [f32; 8] = std::array::from_fn(|i| x[i] + x[i + 8]);
    let u: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
    (u[0] + u[2]) + (u[1] + u[3])
}

/// The same arithmetic with the head (64 values) in four zmm registers: f16 rounding by the
/// hardware converters, the lane reduction spelled out. Bit-identical to the scalar version.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{AttnShape, STEP};
    use half::f16;
    use std::arch::x86_64::*;

    /// Query heads per KV head this path keeps in registers/stack state.
    pub(super) const MAX_GROUP: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round16(x: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x))
    }

    /// 64 halves -> four f32 vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load64(src: &[f16]) -> [__m512; 4] {
        assert!(src.len() >= STEP);
        let p = src.as_ptr() as *const __m256i;
        // SAFETY: 64 halves = 4 x 32 readable bytes (asserted); unaligned loads.
        unsafe { [0, 1, 2, 3].map(|i| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(i)))) }
    }

    /// `_mm512_reduce_add_ps` in GCC's order: 16 -> 8 -> 4, then (0+2) + (1+3).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce(x: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(x);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        let t = _mm256_add_ps(lo, hi);
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
        let w = _mm_add_ps(u, _mm_shuffle_ps::<0b01_00_11_10>(u, u));
        _mm_cvtss_f32(w) + _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(w, w))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn attend_group_d64(
        q: &[f32],
        table: &[u32],
        ctx: usize,
        kv: usize,
        shape: &AttnShape,
        (k_cache, v_cache): (&[f16], &[f16]),
        out: &mut [f32],
    ) {
        let (bs, row) = (shape.block_size, shape.num_kv_heads * STEP);
        let g = shape.num_heads / shape.num_kv_heads;
        let zero = _mm512_setzero_ps();
        let mut qh = [[zero; 4]; MAX_GROUP];
        let mut acc = [[zero; 4]; MAX_GROUP];
        let (mut max, mut sum) = ([f32::NEG_INFINITY; MAX_GROUP], [0f32; MAX_GROUP]);
        for h in 0..g {
            for i in 0..4 {
                let src = &q[h * STEP + i * 16..h * STEP + i * 16 + 16];
                // SAFETY: 16 readable floats (sliced above); unaligned load.
                qh[h][i] = round16(unsafe { _mm512_loadu_ps(src.as_ptr()) });
            }
        }
        for j in 0..ctx {
            let at = (table[j / bs] as usize * bs + j % bs) * row + kv * STEP;
            let k = load64(&k_cache[at..at + STEP]);
            let v = load64(&v_cache[at..at + STEP]);
            for h in 0..g {
                let q = &qh[h];
                let lanes = _mm512_add_ps(
                    _mm512_add_ps(_mm512_mul_ps(q[0], k[0]), _mm512_mul_ps(q[2], k[2])),
                    _mm512_add_ps(_mm512_mul_ps(q[1], k[1]), _mm512_mul_ps(q[3], k[3])),
                );
                let s = reduce(lanes) * shape.scale;
                let (mut ms, mut vs) = (1f32, 1f32);
                if s > max[h] {
                    ms = (max[h] - s).exp();
                    max[h] = s;
                    let m = _mm512_set1_ps(ms);
                    acc[h] = acc[h].map(|a| round16(_mm512_mul_ps(a, m)));
                } else {
                    vs = (s - max[h]).exp();
                }
                let w = _mm512_set1_ps(vs);
                for i in 0..4 {
                    acc[h][i] = round16(_mm512_fmadd_ps(v[i], w, acc[h][i]));
                }
                sum[h] = sum[h].mul_add(ms, vs);
            }
        }
        for h in 0..g {
            let inv = _mm512_set1_ps(if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] });
            for i in 0..4 {
                let dst = &mut out[h * STEP + i * 16..h * STEP + i * 16 + 16];
                // SAFETY: 16 writable floats (sliced above); unaligned store.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_mul_ps(acc[h][i], inv)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_path_is_bit_identical_to_scalar() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIP: no AVX-512F");
            return;
        }
        let mut rng = crate::testutil::TestRng::new(5);
        for (heads, kv_heads, ctx) in [(9usize, 3usize, 1usize), (9, 3, 37), (14, 2, 130), (4, 4, 300)] {
            let shape =
                AttnShape { num_heads: heads, num_kv_heads: kv_heads, head_dim: 64, block_size: 16, scale: 0.125 };
            let blocks = ctx.div_ceil(16);
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let n = blocks * 16 * kv_heads * 64;
            let scale_by = |v: Vec<f32>, s: f32| v.into_iter().map(|x| f16::from_f32(x * s)).collect::<Vec<_>>();
            let (k, v) = (scale_by(rng.vec(n), 3.0), scale_by(rng.vec(n), 2.0));
            let g = heads / kv_heads;
            for kvh in 0..kv_heads {
                let q: Vec<f32> = rng.vec(g * 64).iter().map(|x| x * 4.0).collect();
                let (mut a, mut b) = (vec![0f32; g * 64], vec![0f32; g * 64]);
                attend_group_scalar(&q, &table, ctx, kvh, &shape, (&k, &v), &mut a);
                // SAFETY: AVX-512F checked above.
                unsafe { avx512::attend_group_d64(&q, &table, ctx, kvh, &shape, (&k, &v), &mut b) };
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "heads {heads}/{kv_heads} ctx {ctx} kv head {kvh}");
            }
        }
    }

    #[test]
    fn round_f16_matches_scalar_conversion() {
        let mut rng = crate::testutil::TestRng::new(11);
        let mut x: Vec<f32> =
            rng.vec(1000).iter().enumerate().map(|(i, v)| v * 10f32.powi(i as i32 % 12 - 8)).collect();
        x.extend([65504.0, 65520.0, 1e-8, -6.1e-5, 0.0, -0.0]);
        let want: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut tmp = vec![f16::ZERO; x.len()];
        round_f16(&mut x, &mut tmp);
        assert_eq!(
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn dot_is_the_lane_reduction_of_exact_products() {
        // Products of f16 values are exact in f32; with integers the result is exact whatever
        // the order, so this checks indexing (the order itself is checked against llama.cpp by
        // the reference test of the whole model).
        let q: Vec<f32> = (0..72).map(|i| (i % 7) as f32 - 3.0).collect();
        let k: Vec<f32> = (0..72).map(|i| (i % 5) as f32).collect();
        let want: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
        assert_eq!(dot_f16(&q, &k), want);
    }
}
