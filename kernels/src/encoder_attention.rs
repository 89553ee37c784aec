//! Bidirectional (encoder) self-attention over variable-length sequences laid end to end, no
//! padding: every token attends to all tokens of its own sequence and to nothing else.
//!
//! Layout: `qkv` is `[tokens, 3 * heads * head_dim]` (Q of all heads, then K, then V, each
//! head-major), `offsets` is `[seqs + 1]` token offsets (sequence s is rows
//! `offsets[s]..offsets[s + 1]`), `out` is `[tokens, heads * head_dim]`.
//!
//! The fast path (AVX-512, head_dim 16/32/64) runs one unit per (sequence, head) in parallel:
//! K transposed and V gathered into contiguous scratch, then for 4 query rows at a time the
//! scores (fma chains over head_dim), a softmax with the vector `exp`, and P·V. A unit reads only
//! its own sequence, and a query row's arithmetic does not depend on which rows share its group,
//! so results do not depend on the batch. Elsewhere the f64 reference runs (slow, exact).

use rayon::prelude::*;

use crate::sink::OutSink;

#[derive(Debug, Clone, Copy)]
pub struct EncoderAttnShape {
    pub heads: usize,
    pub head_dim: usize,
    /// Score multiplier, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl EncoderAttnShape {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

fn check(qkv: &[f32], offsets: &[usize], s: &EncoderAttnShape, out: &[f32]) -> usize {
    let tokens = offsets.last().copied().unwrap_or(0);
    assert!(offsets.first().is_none_or(|&o| o == 0), "attention: offsets must start at 0");
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "attention: offsets must not decrease");
    assert_eq!(qkv.len(), tokens * 3 * s.hidden(), "attention: qkv must be [tokens, 3 * hidden]");
    assert_eq!(out.len(), tokens * s.hidden(), "attention: out must be [tokens, hidden]");
    tokens
}

/// See the module docs. Parallel on the current rayon pool.
pub fn encoder_attention(qkv: &[f32], offsets: &[usize], shape: &EncoderAttnShape, out: &mut [f32]) {
    check(qkv, offsets, shape, out);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && matches!(shape.head_dim, 16 | 32 | 64) {
        let sink = OutSink::new(out, shape.hidden());
        let units: Vec<(usize, usize)> =
            (0..offsets.len().saturating_sub(1)).flat_map(|s| (0..shape.heads).map(move |h| (s, h))).collect();
        let run = |&(s, h): &(usize, usize)| {
            let rows = offsets[s]..offsets[s + 1];
            // SAFETY: avx512f detected; units are distinct (sequence, head) pairs, so each writes
            // its own rectangle (rows of s) x (columns of h) of `out`, which stays borrowed.
            unsafe {
                match shape.head_dim {
                    16 => simd::unit::<1>(qkv, rows, h, shape, &sink),
                    32 => simd::unit::<2>(qkv, rows, h, shape, &sink),
                    _ => simd::unit::<4>(qkv, rows, h, shape, &sink),
                }
            }
        };
        let work: usize = offsets.windows(2).map(|w| (w[1] - w[0]).pow(2)).sum::<usize>() * shape.hidden();
        if work < 1 << 16 {
            units.iter().for_each(run);
        } else {
            units.par_iter().for_each(run);
        }
        return;
    }
    encoder_attention_reference(qkv, offsets, shape, out)
}

/// Plain f64 softmax attention, one query row and head at a time.
pub fn encoder_attention_reference(qkv: &[f32], offsets: &[usize], shape: &EncoderAttnShape, out: &mut [f32]) {
    check(qkv, offsets, shape, out);
    let (d, hd) = (shape.head_dim, shape.hidden());
    let row = |t: usize, part: usize, h: usize| &qkv[t * 3 * hd + part * hd + h * d..][..d];
    for w in offsets.windows(2) {
        for i in w[0]..w[1] {
            for h in 0..shape.heads {
                let q = row(i, 0, h);
                let scores: Vec<f64> = (w[0]..w[1])
                    .map(|j| {
                        q.iter().zip(row(j, 1, h)).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * shape.scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                for c in 0..d {
                    let v: f64 = (w[0]..w[1]).zip(&p).map(|(j, pj)| pj * row(j, 2, h)[c] as f64).sum();
                    out[i * hd + h * d + c] = (v / sum) as f32;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over register arrays
mod simd {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::EncoderAttnShape;
    use crate::activation::simd::exp16;
    use crate::sink::OutSink;

    /// Query rows per group: their scores share each K load, their outputs each V load.
    const R: usize = 4;

    /// One (sequence, head): `DV` = head_dim / 16 vectors per row.
    /// # Safety
    /// No other thread may touch `out[rows, h * head_dim..][..head_dim]` during the call.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unit<const DV: usize>(
        qkv: &[f32],
        rows: Range<usize>,
        h: usize,
        s: &EncoderAttnShape,
        out: &OutSink,
    ) {
        let (d, hd, len) = (DV * 16, s.hidden(), rows.len());
        if len == 0 {
            return;
        }
        let lp = len.div_ceil(16) * 16;
        // K^T `[d][lp]` (zero past len) and V `[len][d]`, contiguous.
        let mut kt = vec![0f32; d * lp];
        let mut v = vec![0f32; len * d];
        for (j, t) in rows.clone().enumerate() {
            let r = &qkv[t * 3 * hd..(t + 1) * 3 * hd];
            for (c, &x) in r[hd + h * d..][..d].iter().enumerate() {
                kt[c * lp + j] = x;
            }
            v[j * d..(j + 1) * d].copy_from_slice(&r[2 * hd + h * d..][..d]);
        }
        let mut p = vec![0f32; R * lp];
        for i0 in (0..len).step_by(R) {
            let live = (len - i0).min(R);
            let q: [&[f32]; R] = std::array::from_fn(|r| {
                let t = rows.start + i0 + r.min(live - 1);
                &qkv[t * 3 * hd + h * d..][..d]
            });
            scores(&q, &kt, lp, s.scale, &mut p);
            let sums: [f32; R] = std::array::from_fn(|r| softmax_row(&mut p[r * lp..(r + 1) * lp], len));
            let o = weighted_values::<DV>(&p, lp, &v, len);
            for r in 0..live {
                // SAFETY: this unit's rectangle, exclusive (the caller's contract).
                let dst = unsafe { out.row_ptr(rows.start + i0 + r, h * d, d) };
                let inv = _mm512_set1_ps(1.0 / sums[r]);
                for c in 0..DV {
                    // SAFETY: `dst` has d = 16 DV writable f32.
                    unsafe { _mm512_storeu_ps(dst.add(16 * c), _mm512_mul_ps(o[r][c], inv)) };
                }
            }
        }
    }

    /// `p[r][j] = scale * q[r] · k[j]` for all `lp` keys (padding keys give 0; masked later).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scores(q: &[&[f32]; R], kt: &[f32], lp: usize, scale: f32, p: &mut [f32]) {
        let d = q[0].len();
        assert!(kt.len() == d * lp && p.len() == R * lp && q.iter().all(|r| r.len() == d));
        for jb in (0..lp).step_by(16) {
            let mut acc = [_mm512_setzero_ps(); R];
            for c in 0..d {
                // SAFETY: c < d and jb + 16 <= lp, so the load is inside `kt` (asserted size).
                let k = unsafe { _mm512_loadu_ps(kt.as_ptr().add(c * lp + jb)) };
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][c]), k, acc[r]);
                }
            }
            for r in 0..R {
                // SAFETY: r * lp + jb + 16 <= R * lp = p.len().
                unsafe {
                    _mm512_storeu_ps(p.as_mut_ptr().add(r * lp + jb), _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)))
                };
            }
        }
    }

    /// Softmax numerators over the first `len` of `row` in place (padding set to 0); returns
    /// their sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn softmax_row(row: &mut [f32], len: usize) -> f32 {
        let mask = |jb: usize| -> __mmask16 { ((1u32 << (len - jb).min(16)) - 1) as __mmask16 };
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for jb in (0..row.len()).step_by(16) {
            // SAFETY: jb + 16 <= row.len() (a multiple of 16).
            let x = unsafe { _mm512_loadu_ps(row.as_ptr().add(jb)) };
            mx = _mm512_mask_max_ps(mx, mask(jb.min(len)), mx, x);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        for jb in (0..row.len()).step_by(16) {
            // SAFETY: as above.
            unsafe {
                let x = _mm512_loadu_ps(row.as_ptr().add(jb));
                let e = _mm512_maskz_mov_ps(mask(jb.min(len)), exp16(_mm512_sub_ps(x, max)));
                sum = _mm512_add_ps(sum, e);
                _mm512_storeu_ps(row.as_mut_ptr().add(jb), e);
            }
        }
        _mm512_reduce_add_ps(sum)
    }

    /// `o[r] = sum_j p[r][j] v[j]` over the `len` keys.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn weighted_values<const DV: usize>(p: &[f32], lp: usize, v: &[f32], len: usize) -> [[__m512; DV]; R] {
        assert!(p.len() == R * lp && v.len() == len * DV * 16 && len <= lp);
        let mut o = [[_mm512_setzero_ps(); DV]; R];
        for j in 0..len {
            let vj: [__m512; DV] = std::array::from_fn(|c| {
                // SAFETY: (j, c) inside `v` (asserted size).
                unsafe { _mm512_loadu_ps(v.as_ptr().add(j * DV * 16 + 16 * c)) }
            });
            for r in 0..R {
                let w = _mm512_set1_ps(p[r * lp + j]);
                for c in 0..DV {
                    o[r][c] = _mm512_fmadd_ps(w, vj[c], o[r][c]);
                }
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs_diff, TestRng};

    fn run(lens: &[usize], heads: usize, head_dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
        let mut offsets = vec![0];
        lens.iter().for_each(|l| offsets.push(offsets.last().unwrap() + l));
        let t = *offsets.last().unwrap();
        let shape = EncoderAttnShape { heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt() };
        let qkv: Vec<f32> = TestRng::new(seed).vec(t * 3 * heads * head_dim).into_iter().map(|x| x * 3.0).collect();
        let (mut got, mut want) = (vec![f32::NAN; t * heads * head_dim], vec![0f32; t * heads * head_dim]);
        encoder_attention(&qkv, &offsets, &shape, &mut got);
        encoder_attention_reference(&qkv, &offsets, &shape, &mut want);
        let d = max_abs_diff(&got, &want);
        assert!(d < 2e-5, "lens {lens:?} heads {heads} dim {head_dim}: {d}");
        (got, qkv, offsets)
    }

    #[test]
    fn matches_reference_across_shapes() {
        run(&[1], 2, 32, 1);
        run(&[5, 17, 2, 33], 12, 32, 2);
        run(&[64, 3], 3, 64, 3);
        run(&[9, 130], 4, 16, 4);
        run(&[7], 2, 24, 5); // no fast path for this head size
        run(&[], 2, 32, 6);
    }

    /// A sequence's outputs are the same bits alone and in any batch.
    #[test]
    fn sequences_do_not_depend_on_the_batch() {
        let lens = [3, 40, 1, 17];
        let (all, qkv, offsets) = run(&lens, 12, 32, 9);
        let (hd, shape) = (12 * 32, EncoderAttnShape { heads: 12, head_dim: 32, scale: 32f32.sqrt().recip() });
        for (s, w) in offsets.windows(2).enumerate() {
            let mut alone = vec![0f32; (w[1] - w[0]) * hd];
            encoder_attention(&qkv[w[0] * 3 * hd..w[1] * 3 * hd], &[0, lens[s]], &shape, &mut alone);
            assert_eq!(alone, all[w[0] * hd..w[1] * hd], "sequence {s}");
        }
    }
}
