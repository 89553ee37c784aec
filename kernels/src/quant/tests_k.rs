//! Tests of the k-quants (Q4_K, Q6_K) and Q8_K activations: packing round trip, Q8_K against
//! hand-checked values, every kernel family against the reference bit for bit, and the
//! reference against an f64 dequantized product written from ggml's `dequantize_row_*`.

use half::f16;

use super::kact::{quantize_block_k, KActs};
use super::tests::{assert_bits_eq, isas, random_acts, random_weights, reference, run, sweep_against_reference};
use super::*;
use crate::testutil::TestRng;

const K_TYPES: [QuantType; 2] = [QuantType::Q4_K, QuantType::Q6_K];

#[test]
fn k_pack_round_trips_ggml_bytes() {
    let mut rng = TestRng::new(11);
    for qtype in K_TYPES {
        for (n, k) in [(1, 256), (15, 512), (16, 256), (17, 768), (40, 256)] {
            let bytes = random_weights(&mut rng, qtype, n, k);
            let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes).unwrap();
            assert_eq!((w.rows(), w.cols(), w.qtype()), (n, k, qtype));
            assert_eq!(w.to_ggml_bytes(), bytes, "{qtype:?} {n}x{k}");
        }
    }
}

#[test]
fn q8_k_quantization_hand_checked() {
    // The largest |x| is negative: iscale = -127 / -(127 / 64) = 64; d = 1 / 64.
    let mut x = [0.5f32; QK_K];
    x[3] = -127.0 / 64.0;
    x[4] = 0.5 / 64.0; // 0.5 -> 0 (half to even)
    x[5] = 1.5 / 64.0; // 1.5 -> 2
    x[6] = -63.5 / 64.0; // -63.5 -> -64
    let b = quantize_block_k(&x);
    assert_eq!(&b.qs[..7], &[32, 32, 32, -127, 0, 2, -64]);
    assert_eq!(b.d, 1.0 / 64.0);
    assert_eq!(b.bsums[0], 32 * 12 - 127 + 2 - 64);
    assert_eq!(b.bsums[1], 32 * 16);

    // The largest |x| is positive, and a tie in |x| keeps the first: iscale = -127 / 4, so the
    // quants come out negated and d = 1 / iscale is negative.
    let mut x = [1.0f32; QK_K];
    x[10] = 4.0;
    x[11] = -4.0;
    let b = quantize_block_k(&x);
    assert_eq!(&b.qs[9..12], &[-32, -127, 127]); // -31.75 -> -32
    assert_eq!(b.d.to_bits(), (1.0f32 / (-127.0f32 / 4.0)).to_bits());

    // d = 1 / iscale, not max / -127 (they differ in the last bit for some max).
    let mut x = [0.0f32; QK_K];
    x[0] = 0.3;
    let b = quantize_block_k(&x);
    assert_eq!(b.d, 1.0 / (-127.0f32 / 0.3));
    assert_eq!(b.qs[0], -127);

    // All zero: d = 0, no quants.
    let b = quantize_block_k(&[0.0; QK_K]);
    assert_eq!((b.d, b.qs, b.bsums), (0.0, [0; QK_K], [0; 16]));
}

#[test]
fn k_kernels_match_reference_bit_for_bit() {
    let ms: Vec<usize> = (1..=5).chain([17]).collect();
    sweep_against_reference(12, &K_TYPES, &[256, 512, 1280], &[1, 7, 16, 17, 40], &ms);
}

/// Extreme but valid blocks: all-max quants and scales, so the integer sums are at their
/// largest (the float conversion of a sum above 2^24 rounds, identically in every kernel).
#[test]
fn k_extreme_blocks_are_exact() {
    let mut rng = TestRng::new(13);
    let (n, k, m) = (33, 512, 3);
    for qtype in K_TYPES {
        let mut bytes = random_weights(&mut rng, qtype, n, k);
        for blk in bytes.chunks_exact_mut(qtype.block_bytes()) {
            match qtype {
                QuantType::Q4_K => blk[4..144].fill(0xFF),
                _ => {
                    blk[..192].fill(0xFF);
                    blk[192..208].fill(0x80); // scale -128
                }
            }
        }
        let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes).unwrap();
        let x: Vec<f32> = random_acts(&mut rng, m * k).iter().map(|v| if *v < 0.5 { -1.0 } else { 1.0 }).collect();
        let want = reference(&w, &x, m);
        for isa in isas() {
            assert_bits_eq(&run(&w, &x, m, isa, None), &want, &format!("{qtype:?} {isa:?}"));
        }
    }
}

/// The reference is a correct matmul: f64 sums of weights dequantized as ggml's
/// `dequantize_row_q4_K` / `dequantize_row_q6_K` do, times the dequantized Q8_K activations.
#[test]
fn k_reference_is_a_matmul() {
    let mut rng = TestRng::new(14);
    let (n, k, m) = (9, 768, 3);
    for qtype in K_TYPES {
        let bytes = random_weights(&mut rng, qtype, n, k);
        let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes).unwrap();
        let x = random_acts(&mut rng, m * k);
        let got = reference(&w, &x, m);
        let mut acts = KActs::default();
        acts.quantize(&x, m, k);
        let row_bytes = k / QK_K * qtype.block_bytes();
        for i in 0..m {
            for j in 0..n {
                let wd = dequant_row(qtype, &bytes[j * row_bytes..(j + 1) * row_bytes]);
                let xr = acts.row(i);
                let want: f64 = (0..k).map(|e| wd[e] * xr[e / QK_K].qs[e % QK_K] as f64 * xr[e / QK_K].d as f64).sum();
                let scale: f64 = (0..k).map(|e| (wd[e] * x[i * k + e] as f64).abs()).sum();
                let diff = (got[i * n + j] as f64 - want).abs();
                assert!(diff <= 1e-5 * scale, "{qtype:?} ({i}, {j}): {} vs {want}", got[i * n + j]);
            }
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f64()
}

/// One row of ggml blocks dequantized in f64, following ggml-quants.c's loops.
fn dequant_row(qtype: QuantType, row: &[u8]) -> Vec<f64> {
    let mut y = Vec::new();
    for blk in row.chunks_exact(qtype.block_bytes()) {
        match qtype {
            QuantType::Q4_K => {
                let (d, dmin, sc, q) = (f16_at(blk, 0), f16_at(blk, 2), &blk[4..16], &blk[16..144]);
                let scale_min = |j: usize| -> (f64, f64) {
                    if j < 4 {
                        ((sc[j] & 63) as f64, (sc[j + 4] & 63) as f64)
                    } else {
                        (
                            ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)) as f64,
                            ((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)) as f64,
                        )
                    }
                };
                for p in 0..4 {
                    let ((s1, m1), (s2, m2)) = (scale_min(2 * p), scale_min(2 * p + 1));
                    y.extend((0..32).map(|l| d * s1 * (q[32 * p + l] & 0xF) as f64 - dmin * m1));
                    y.extend((0..32).map(|l| d * s2 * (q[32 * p + l] >> 4) as f64 - dmin * m2));
                }
            }
            _ => {
                let (ql, qh, sc, d) = (&blk[..128], &blk[128..192], &blk[192..208], f16_at(blk, 208));
                let mut out = [0f64; QK_K];
                for h in 0..2 {
                    for l in 0..32 {
                        let (lo, hi) = (ql[64 * h + l], ql[64 * h + 32 + l]);
                        let bits = qh[32 * h + l];
                        let q = [lo & 0xF, hi & 0xF, lo >> 4, hi >> 4];
                        for (t, &qv) in q.iter().enumerate() {
                            let v = (qv | (((bits >> (2 * t)) & 3) << 4)) as i32 - 32;
                            let s = sc[8 * h + l / 16 + 2 * t] as i8;
                            out[128 * h + 32 * t + l] = d * s as f64 * v as f64;
                        }
                    }
                }
                y.extend(out);
            }
        }
    }
    y
}

/// llama.cpp's batched forms: every kernel family and work split equals the reference, rows
/// take the batched arithmetic exactly where `k_batched` says, and `Form::Invariant` rows are
/// those of a one-row call.
#[test]
fn k_llama_cpp_batch_form_matches_reference() {
    let mut rng = TestRng::new(15);
    let (n, k) = (40, 512);
    for qtype in K_TYPES {
        let w = QuantMatrix::from_ggml_bytes(qtype, n, k, &random_weights(&mut rng, qtype, n, k)).unwrap();
        for m in [1, 3, 4, 5, 7, 8, 9, 17] {
            let x = random_acts(&mut rng, m * k);
            let mut want = vec![f32::NAN; m * n];
            qmatmul_reference_form(&w, &x, m, &mut want, Form::LlamaCppBatch);
            for isa in isas() {
                for plan in [Plan::new(&w, m), Plan { tiles_per_unit: 1, rows_per_unit: 3 }] {
                    let mut got = vec![f32::NAN; m * n];
                    qmatmul_with(&w, &x, m, &mut got, isa, plan, Form::LlamaCppBatch);
                    assert_bits_eq(&got, &want, &format!("{qtype:?} {isa:?} m={m} {plan:?}"));
                }
            }
            let single = reference(&w, &x, m);
            for i in 0..m {
                let same = want[i * n..(i + 1) * n]
                    .iter()
                    .zip(&single[i * n..(i + 1) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert_eq!(!same, k_batched(qtype, Form::LlamaCppBatch, i, m), "{qtype:?} m={m} row {i}");
            }
        }
    }
}
