//! Rotary position embeddings applied in place to rows of a flattened batch, each row at its own
//! position (tokens of different sequences and chunks share one call).
//!
//! Two pairings exist in the wild and both are needed: `Interleaved` rotates (2i, 2i+1) — what
//! llama-architecture GGUF files expect, because llama.cpp's converter permutes Q/K rows for it —
//! and `Neox` rotates (i, i + d/2) — Hugging Face checkpoints and qwen2 GGUF files.
//!
//! The arithmetic is ggml's x86 build bit for bit (`ggml_rope_cache_init` and `rotate_pairs` in
//! `ggml-cpu/ops.cpp` as GCC compiled them), because llama.cpp's greedy tokens flip on 1-ulp
//! differences of quantized activations: angles by repeated f32 multiplication
//! `theta_{i+1} = theta_i * base^(-2/d)` from `theta_0 = pos`, libm's `cosf`/`sinf`, and the
//! rotation with the fused multiply-adds GCC contracted it into (different for the two styles).

/// Which dimension pairs are rotated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Neox,
}

/// Precomputed cos/sin per position: `[max_pos, rot_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub rot_dim: usize,
    pub base: f32,
    pub max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles as ggml computes them: `theta_scale = powf(base, -2 / rot_dim)` (f32), then per
    /// position `theta = pos` multiplied by `theta_scale` once per pair, all in f32; cos/sin from
    /// libm (glibc's `cosf`/`sinf`, what GCC's `sincosf` gives too).
    pub fn new(rot_dim: usize, max_pos: usize, base: f32) -> Self {
        let half = rot_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        let theta_scale = base.powf(-2.0 / rot_dim as f32);
        for p in 0..max_pos {
            let mut theta = p as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Self { rot_dim, base, max_pos, cos, sin }
    }

    fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.rot_dim / 2;
        (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half])
    }
}

/// Rotates `heads` heads of `head_dim` starting at `offset` in every row of `x` (row stride
/// `stride`), row r at position `positions[r]`. Positions must be below `table.max_pos`.
pub fn rope_inplace(
    x: &mut [f32],
    stride: usize,
    spec: HeadsSpan,
    positions: &[u32],
    table: &RopeTable,
    style: RopeStyle,
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        // SAFETY: fma was detected just above.
        return unsafe { rope_fma(x, stride, spec, positions, table, style) };
    }
    rope_exact(x, stride, spec, positions, table, style)
}

/// `rope_exact` compiled with hardware FMA, so `mul_add` is one instruction instead of a libm
/// call. Same bits: `mul_add` is a single rounding either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn rope_fma(x: &mut [f32], stride: usize, spec: HeadsSpan, positions: &[u32], table: &RopeTable, style: RopeStyle) {
    rope_exact(x, stride, spec, positions, table, style)
}

/// The rotation as llama.cpp's x86 build computes `rotate_pairs` for both styles (x0 = first of
/// the pair, x1 = second; GCC contracted the source's `x0*c - x1*s`, `x0*s + x1*c` into fmas):
/// `x0' = fma(c, x0, -(s * x1))`, `x1' = fma(s, x0, c * x1)`. Checked against llama.cpp's own
/// tensors (its eval callback), where the other contraction of `x1'` differs in ~10% of values.
#[inline(always)]
fn rope_exact(x: &mut [f32], stride: usize, spec: HeadsSpan, positions: &[u32], table: &RopeTable, style: RopeStyle) {
    let half = table.rot_dim / 2;
    for (r, &pos) in positions.iter().enumerate() {
        let (cos, sin) = table.row(pos as usize);
        let row = &mut x[r * stride + spec.offset..r * stride + spec.offset + spec.heads * spec.head_dim];
        for head in row.chunks_exact_mut(spec.head_dim) {
            match style {
                RopeStyle::Neox => {
                    let (a, b) = head[..table.rot_dim].split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1, c, s) = (a[i], b[i], cos[i], sin[i]);
                        a[i] = c.mul_add(x0, -(s * x1));
                        b[i] = s.mul_add(x0, c * x1);
                    }
                }
                RopeStyle::Interleaved => {
                    for (i, pair) in head[..table.rot_dim].chunks_exact_mut(2).enumerate() {
                        let (x0, x1, c, s) = (pair[0], pair[1], cos[i], sin[i]);
                        pair[0] = c.mul_add(x0, -(s * x1));
                        pair[1] = s.mul_add(x0, c * x1);
                    }
                }
            }
        }
    }
}

/// Where the heads to rotate sit inside a row.
#[derive(Debug, Clone, Copy)]
pub struct HeadsSpan {
    pub offset: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Plain reference: recomputes every angle from scratch in f64 with the textbook formula.
pub fn rope_inplace_reference(
    x: &mut [f32],
    stride: usize,
    spec: HeadsSpan,
    positions: &[u32],
    table: &RopeTable,
    style: RopeStyle,
) {
    let d = table.rot_dim;
    let base = table.base as f64;
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..spec.heads {
            let o = r * stride + spec.offset + h * spec.head_dim;
            for i in 0..d / 2 {
                let (i0, i1) = match style {
                    RopeStyle::Neox => (o + i, o + i + d / 2),
                    RopeStyle::Interleaved => (o + 2 * i, o + 2 * i + 1),
                };
                let theta = pos as f64 * base.powf(-2.0 * i as f64 / d as f64);
                let (s, c) = theta.sin_cos();
                let (x0, x1) = (x[i0] as f64, x[i1] as f64);
                x[i0] = (x0 * c - x1 * s) as f32;
                x[i1] = (x0 * s + x1 * c) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs_diff, TestRng};

    #[test]
    fn matches_reference_for_both_styles_and_many_shapes() {
        let mut rng = TestRng::new(7);
        for &(heads, head_dim, rows) in &[(1, 8, 1), (9, 64, 5), (14, 64, 17), (3, 128, 3)] {
            for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
                let table = RopeTable::new(head_dim, 300, 100_000.0);
                let stride = heads * head_dim + 5;
                let spec = HeadsSpan { offset: 3, heads, head_dim };
                let x = rng.vec(rows * stride);
                let positions: Vec<u32> = (0..rows).map(|_| rng.below(300) as u32).collect();
                let (mut fast, mut slow) = (x.clone(), x.clone());
                rope_inplace(&mut fast, stride, spec, &positions, &table, style);
                rope_inplace_reference(&mut slow, stride, spec, &positions, &table, style);
                assert!(max_abs_diff(&fast, &slow) < 2e-4, "{style:?} {heads}x{head_dim}");
                // Bytes outside the span are untouched.
                for r in 0..rows {
                    assert_eq!(fast[r * stride..r * stride + 3], x[r * stride..r * stride + 3]);
                }
            }
        }
    }

    #[test]
    fn fma_and_portable_paths_agree_bit_for_bit() {
        let mut rng = TestRng::new(3);
        let table = RopeTable::new(64, 500, 100_000.0);
        let spec = HeadsSpan { offset: 0, heads: 3, head_dim: 64 };
        let positions: Vec<u32> = (0..7).map(|_| rng.below(500) as u32).collect();
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let x = rng.vec(7 * 192);
            let (mut fast, mut plain) = (x.clone(), x.clone());
            rope_inplace(&mut fast, 192, spec, &positions, &table, style);
            rope_exact(&mut plain, 192, spec, &positions, &table, style);
            assert_eq!(
                fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn angles_are_ggml_iterated_products() {
        // theta_i = pos * ts^i by repeated f32 multiplication, not pos * powf(base, -2i/d).
        let table = RopeTable::new(8, 40, 10_000.0);
        let ts = 10_000f32.powf(-0.25);
        let theta3 = ((37.0f32 * ts) * ts) * ts;
        assert_eq!(table.row(37).0[3].to_bits(), theta3.cos().to_bits());
        assert_eq!(table.row(37).1[3].to_bits(), theta3.sin().to_bits());
    }

    #[test]
    fn position_zero_is_identity() {
        let mut rng = TestRng::new(1);
        let table = RopeTable::new(64, 4, 10_000.0);
        let x = rng.vec(64);
        let mut y = x.clone();
        let spec = HeadsSpan { offset: 0, heads: 1, head_dim: 64 };
        rope_inplace(&mut y, 64, spec, &[0], &table, RopeStyle::Neox);
        assert_eq!(x, y);
    }
}
