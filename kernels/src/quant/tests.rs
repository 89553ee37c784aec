//! Tests: packing round trip, activation quantization against hand-checked values, every kernel
//! family against the reference bit for bit, batch/split invariance, and the reference against
//! an f64 dequantized product (so the reference itself is a correct matmul).

use half::f16;

use super::act::{quantize_block_ref, QActs};
use super::*;
use crate::testutil::{max_abs_diff, TestRng};

pub(super) const ALL: [QuantType; 5] =
    [QuantType::Q4_1, QuantType::Q5_0, QuantType::Q8_0, QuantType::Q4_K, QuantType::Q6_K];

/// Random valid ggml blocks for an `[n, k]` matrix, with realistic scales (every bit pattern
/// of the quant bytes is a valid block; the f16 fields get plausible magnitudes).
pub(super) fn random_weights(rng: &mut TestRng, qtype: QuantType, n: usize, k: usize) -> Vec<u8> {
    let bb = qtype.block_bytes();
    let mut bytes: Vec<u8> = (0..n * k / qtype.block_values() * bb).map(|_| rng.next_u64() as u8).collect();
    for blk in bytes.chunks_exact_mut(bb) {
        // d in ~[1e-3, 3e-2] like real checkpoints, either sign except where ggml's are >= 0.
        let mag = 0.001 + 0.03 * rng.f32().abs();
        let sign = if rng.f32() < 0.0 && !qtype.is_k() { -1.0 } else { 1.0 };
        let d = f16::from_f32(mag * sign);
        let put = |blk: &mut [u8], at: usize, v: f16| blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
        match qtype {
            QuantType::Q4_1 => {
                put(blk, 0, d);
                put(blk, 2, f16::from_f32(-8.0 * mag * (0.5 + rng.f32().abs())));
            }
            QuantType::Q5_0 | QuantType::Q8_0 => put(blk, 0, d),
            QuantType::Q4_K => {
                put(blk, 0, f16::from_f32(mag / 40.0));
                put(blk, 2, f16::from_f32(mag / 60.0 * rng.f32().abs()));
            }
            QuantType::Q6_K => put(blk, 208, f16::from_f32(mag / 100.0)),
        }
    }
    bytes
}

/// Activations like a real hidden state: mostly O(1), a few outliers, never zero.
pub(super) fn random_acts(rng: &mut TestRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| if rng.below(50) == 0 { 20.0 * rng.f32() } else { 2.0 * rng.f32() } + 1e-3).collect()
}

pub(super) fn run(w: &QuantMatrix, x: &[f32], m: usize, isa: Isa, plan: Option<Plan>) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.rows()];
    qmatmul_with(w, x, m, &mut out, isa, plan.unwrap_or_else(|| Plan::new(w, m)), Form::Invariant);
    out
}

pub(super) fn reference(w: &QuantMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.rows()];
    qmatmul_reference(w, x, m, &mut out);
    out
}

pub(super) fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    if Isa::detect() != Isa::Portable {
        v.push(Isa::detect());
    }
    v
}

pub(super) fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

#[test]
fn pack_round_trips_ggml_bytes() {
    let mut rng = TestRng::new(1);
    for qtype in [QuantType::Q4_1, QuantType::Q5_0, QuantType::Q8_0] {
        for (n, k) in [(1, 32), (15, 64), (16, 96), (17, 576), (40, 32)] {
            let bytes = random_weights(&mut rng, qtype, n, k);
            let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes).unwrap();
            assert_eq!((w.rows(), w.cols(), w.qtype()), (n, k, qtype));
            assert_eq!(w.to_ggml_bytes(), bytes, "{qtype:?} {n}x{k}");
        }
    }
}

#[test]
fn construction_rejects_bad_shapes() {
    let e = QuantMatrix::from_ggml_bytes(QuantType::Q8_0, 2, 48, &[0; 68]).err();
    assert_eq!(e, Some(QuantError::KNotMultipleOfBlock { k: 48, block: 32 }));
    let e = QuantMatrix::from_ggml_bytes(QuantType::Q6_K, 2, 96, &[0; 68]).err();
    assert_eq!(e, Some(QuantError::KNotMultipleOfBlock { k: 96, block: 256 }));
    let e = QuantMatrix::from_ggml_bytes(QuantType::Q4_1, 2, 64, &[0; 79]).err();
    assert_eq!(e, Some(QuantError::ByteLength { expected: Some(80), got: 79 }));
}

#[test]
fn activation_quantization_hand_checked() {
    // amax = 127 -> d = 1, id = 1: q = round(x) with halves rounded to even (ggml x86).
    let mut x = [0.25f32; QK];
    x[..10].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.49, -126.5, 3.5, 0.49999997, -0.0]);
    let b = quantize_block_ref(&x);
    let mut want = [0i8; QK];
    want[..10].copy_from_slice(&[127, 2, -2, 0, 0, 1, -126, 4, 0, 0]);
    assert_eq!(b.qs, want);
    assert_eq!((b.d, b.sum), (1.0, 127 + 2 - 2 + 1 - 126 + 4));
    assert_eq!(b.s, 6.0);

    // amax = 63.5 -> d = 0.5, id = 127 / 63.5 = 2: 0.25 -> 0.5 -> 0, -0.75 -> -1.5 -> -2.
    let mut x = [0.25f32; QK];
    x[0] = -63.5;
    x[1] = -0.75;
    let b = quantize_block_ref(&x);
    assert_eq!(&b.qs[..3], &[-127, -2, 0]);
    assert_eq!((b.d, b.sum), (0.5, -127 - 2));
    assert_eq!(b.s, -64.5);

    // d = 1/127 is not an f16: stored rounded to nearest even; q uses the f32 d (id = 127).
    let mut x = [0.1f32; QK];
    (x[0], x[1]) = (1.0, 0.3);
    let b = quantize_block_ref(&x);
    assert_eq!(b.d, f16::from_f32(1.0 / 127.0).to_f32());
    assert_ne!(b.d, 1.0 / 127.0);
    assert_eq!(&b.qs[..3], &[127, 38, 13]); // 0.3 * 127 = 38.1, 0.1 * 127 = 12.7
    assert_eq!(b.sum, 127 + 38 + 30 * 13);
    assert_eq!(b.s, f16::from_f32(555.0 * (1.0 / 127.0)).to_f32());

    // An all-zero block: d = 0, id = 0, q = 0 (ggml's guard against 0 * inf).
    let b = quantize_block_ref(&[0.0; QK]);
    assert_eq!((b.qs, b.d, b.s, b.sum), ([0; QK], 0.0, 0.0, 0));
}

#[test]
fn activation_quantization_simd_matches_scalar() {
    let mut rng = TestRng::new(2);
    for (m, k) in [(7, 1536), (3, 576), (2, 64)] {
        let mut x = random_acts(&mut rng, m * k);
        // Exact halves at d = 1 (blocks 0 to 2), tiny and huge magnitudes (blocks 3, 4) in the
        // 16-block group path; a subnormal-scale block (its group falls back) at the end.
        for (i, v) in x[..QK].iter_mut().enumerate() {
            *v = i as f32 - 15.5;
        }
        x[QK] = 127.0;
        for (i, v) in x[QK + 1..2 * QK].iter_mut().enumerate() {
            *v = (i as f32 - 15.0) + 0.5;
        }
        if k >= 5 * QK {
            // Block 2 at d = 1: halves and their float neighbours, n + 0.5 and n + 0.5 -+ ulp.
            x[2 * QK] = 127.0;
            for (i, v) in x[2 * QK + 1..3 * QK].iter_mut().enumerate() {
                let half = (i / 3) as f32 * if i % 2 == 0 { 1.0 } else { -1.0 } + 0.5;
                *v = f32::from_bits((half.to_bits() as i32 + (i % 3) as i32 - 1) as u32);
            }
            x[3 * QK..4 * QK].iter_mut().for_each(|v| *v *= 1e-30);
            x[4 * QK..5 * QK].iter_mut().for_each(|v| *v *= 1e30);
            x[k - QK..k].iter_mut().for_each(|v| *v *= 1e-38);
        }
        let want = QActs::quantize_ref(&x, m, k);
        for isa in isas() {
            let mut got = QActs::default();
            got.quantize(&x, m, k, isa);
            for (i, (g, w)) in got.blocks.iter().zip(&want.blocks).enumerate() {
                let what = format!("{isa:?} k={k} block {i}");
                assert_eq!((g.qs, g.sum), (w.qs, w.sum), "{what}");
                assert_eq!((g.d.to_bits(), g.s.to_bits()), (w.d.to_bits(), w.s.to_bits()), "{what}");
            }
        }
    }
}

#[test]
fn kernels_match_reference_bit_for_bit() {
    let ms: Vec<usize> = (1..=9).chain([64]).collect();
    sweep_against_reference(
        3,
        &[QuantType::Q4_1, QuantType::Q5_0, QuantType::Q8_0],
        &[32, 64, 576, 1536],
        &[1, 7, 16, 17, 40, 100],
        &ms,
    );
}

/// Every kernel family on random weights and activations of every shape in the grid equals the
/// reference bit for bit.
pub(super) fn sweep_against_reference(seed: u64, qtypes: &[QuantType], ks: &[usize], ns: &[usize], ms: &[usize]) {
    let mut rng = TestRng::new(seed);
    for &qtype in qtypes {
        for &k in ks {
            for &n in ns {
                let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &random_weights(&mut rng, qtype, n, k)).unwrap();
                for &m in ms {
                    let x = random_acts(&mut rng, m * k);
                    let want = reference(&w, &x, m);
                    for isa in isas() {
                        let got = run(&w, &x, m, isa, None);
                        assert_bits_eq(&got, &want, &format!("{qtype:?} {isa:?} m={m} n={n} k={k}"));
                    }
                }
            }
        }
    }
}

#[test]
fn q8_0_extreme_weights_are_exact() {
    // -128 never comes out of ggml's quantizer but is a valid byte; +128 offset must still be exact.
    let mut rng = TestRng::new(4);
    let (n, k, m) = (33, 256, 5);
    let mut bytes = random_weights(&mut rng, QuantType::Q8_0, n, k);
    for (i, blk) in bytes.chunks_exact_mut(34).enumerate() {
        blk[2..].fill(if i % 2 == 0 { 0x80 } else { 0x7F });
    }
    let w = QuantMatrix::from_ggml_bytes(QuantType::Q8_0, n, k, &bytes).unwrap();
    let x: Vec<f32> = random_acts(&mut rng, m * k).iter().map(|v| if *v < 0.0 { -127.0 } else { 127.0 }).collect();
    let want = reference(&w, &x, m);
    for isa in isas() {
        assert_bits_eq(&run(&w, &x, m, isa, None), &want, &format!("{isa:?}"));
    }
}

#[test]
fn batch_and_split_invariance() {
    let mut rng = TestRng::new(5);
    for qtype in ALL {
        let (n, k, m) = (75, if qtype.is_k() { 512 } else { 576 }, 37);
        let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &random_weights(&mut rng, qtype, n, k)).unwrap();
        let x = random_acts(&mut rng, m * k);
        let isa = Isa::detect();
        let batched = run(&w, &x, m, isa, None);
        // Each row alone.
        for i in 0..m {
            let alone = run(&w, &x[i * k..(i + 1) * k], 1, isa, None);
            assert_bits_eq(&alone, &batched[i * n..(i + 1) * n], &format!("{qtype:?} row {i} alone"));
        }
        // A chunk starting mid-group (rows 3..23), so rows land at other positions of a group.
        let chunk = run(&w, &x[3 * k..23 * k], 20, isa, None);
        assert_bits_eq(&chunk, &batched[3 * n..23 * n], &format!("{qtype:?} chunk"));
        // Other work splits: single tiles, odd row counts per unit, everything in one unit.
        for (tpu, rpu) in [(1, 1), (1, 5), (3, 7), (2, 64), (100, 100)] {
            let plan = Plan { tiles_per_unit: tpu, rows_per_unit: rpu };
            let split = run(&w, &x, m, isa, Some(plan));
            assert_bits_eq(&split, &batched, &format!("{qtype:?} plan {tpu}x{rpu}"));
        }
    }
}

#[test]
fn zero_activation_block_and_degenerate_shapes() {
    let mut rng = TestRng::new(6);
    let (n, k, m) = (20, 256, 3);
    for qtype in ALL {
        let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &random_weights(&mut rng, qtype, n, k)).unwrap();
        let mut x = random_acts(&mut rng, m * k);
        x[k + 256 - 32..k + 256].fill(0.0); // d = 0 block in row 1 (32-blocks)
        x[2 * k..2 * k + 256].fill(0.0); // d = 0 block in row 2 (all types)
        let want = reference(&w, &x, m);
        for isa in isas() {
            assert_bits_eq(&run(&w, &x, m, isa, None), &want, &format!("{qtype:?} {isa:?}"));
        }
        let mut empty: Vec<f32> = vec![];
        qmatmul(&w, &[], 0, &mut empty);
    }
    // k = 0: every output is an empty sum.
    let w = QuantMatrix::from_ggml_bytes(QuantType::Q4_1, 3, 0, &[]).unwrap();
    let mut out = vec![f32::NAN; 6];
    qmatmul(&w, &[], 2, &mut out);
    assert_eq!(out, vec![0.0; 6]);
}

/// The reference is a correct matmul: compare with f64 sums of dequantized weights times
/// dequantized (quantized) activations, plus Q4_1's `m * s` term computed from rounded `s`.
#[test]
fn reference_is_a_matmul() {
    let mut rng = TestRng::new(7);
    let (n, k, m) = (9, 576, 3);
    for qtype in [QuantType::Q4_1, QuantType::Q5_0, QuantType::Q8_0] {
        let bytes = random_weights(&mut rng, qtype, n, k);
        let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes).unwrap();
        let x = random_acts(&mut rng, m * k);
        let got = reference(&w, &x, m);
        let acts = QActs::quantize_ref(&x, m, k);
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = dequant_dot(qtype, &bytes[j * (k / QK) * qtype.block_bytes()..], &acts, i) as f32;
            }
        }
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(max_abs_diff(&got, &want) <= 1e-5 * scale, "{qtype:?}: {}", max_abs_diff(&got, &want));
    }
}

fn dequant_dot(qtype: QuantType, wrow: &[u8], acts: &QActs, i: usize) -> f64 {
    let x = acts.row(i);
    let mut acc = 0f64;
    for b in 0..acts.nb {
        let blk = &wrow[b * qtype.block_bytes()..];
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32() as f64;
        for j in 0..QK {
            let xv = x[b].qs[j] as f64 * x[b].d as f64;
            acc += match qtype {
                QuantType::Q4_1 => {
                    let q = if j < 16 { blk[4 + j] & 0xF } else { blk[4 + j - 16] >> 4 };
                    d * q as f64 * xv
                }
                QuantType::Q8_0 => d * blk[2 + j] as i8 as f64 * xv,
                QuantType::Q5_0 => {
                    let nib = if j < 16 { blk[6 + j] & 0xF } else { blk[6 + j - 16] >> 4 };
                    let hi = (u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]) >> j) & 1;
                    d * ((nib as i32 | (hi as i32) << 4) - 16) as f64 * xv
                }
                QuantType::Q4_K | QuantType::Q6_K => unreachable!("see tests_k"),
            };
        }
        if qtype == QuantType::Q4_1 {
            // sum_j m * x_j = m * d_x * sum(q), which ggml carries as the rounded s.
            acc += f16::from_le_bytes([blk[2], blk[3]]).to_f32() as f64 * x[b].s as f64;
        }
    }
    acc
}
