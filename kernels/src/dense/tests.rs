use super::*;
use crate::testutil::{max_abs_diff, TestRng};

const SHAPES: [(usize, usize, usize); 7] =
    [(1, 32, 16), (3, 40, 17), (8, 64, 384), (9, 384, 384), (17, 1152, 384), (70, 96, 1536), (5, 7, 3)];

fn inputs(seed: u64, m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = TestRng::new(seed);
    (rng.vec(m * k), rng.vec(n * k), rng.vec(n))
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    if Isa::detect() != Isa::Portable {
        v.push(Isa::Avx512);
    }
    if Isa::detect() == Isa::Avx512Bf16 {
        v.push(Isa::Avx512Bf16);
    }
    v
}

fn splits(w: &DenseMatrix, m: usize) -> [Split; 3] {
    [Split::new(w, m), Split { panels_per_unit: 1, rows_per_unit: 1 }, Split { panels_per_unit: 2, rows_per_unit: 5 }]
}

#[test]
fn f32_equals_reference_bit_for_bit() {
    for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
        let (x, w, b) = inputs(s as u64, m, n, k);
        let mut want = vec![0f32; m * n];
        dense_reference(&x, m, &w, n, Some(&b), DensePrecision::F32, &mut want);
        let packed = DenseMatrix::new(&w, Some(&b), n, k, DensePrecision::F32);
        for isa in isas() {
            for split in splits(&packed, m) {
                let mut got = vec![f32::NAN; m * n];
                dense_with(&x, m, &packed, &mut got, isa, split);
                assert_eq!(got, want, "{m}x{n}x{k} {isa:?} {split:?}");
            }
        }
    }
}

#[test]
fn bf16_matches_reference() {
    for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
        let (x, w, b) = inputs(100 + s as u64, m, n, k);
        let mut want = vec![0f32; m * n];
        dense_reference(&x, m, &w, n, None, DensePrecision::Bf16, &mut want);
        let packed = DenseMatrix::new(&w, None, n, k, DensePrecision::Bf16);
        for isa in isas() {
            let mut got = vec![f32::NAN; m * n];
            dense_with(&x, m, &packed, &mut got, isa, Split::new(&packed, m));
            if isa == Isa::Portable {
                assert_eq!(got, want, "{m}x{n}x{k} portable");
            } else {
                // The hardware may add a pair's two exact products in another order: a few ulps
                // of the running sum (|sum| <= k here) at most.
                let d = max_abs_diff(&got, &want);
                assert!(d <= 1e-6 * k as f32, "{m}x{n}x{k} {isa:?}: {d}");
            }
        }
        // And bf16 stays close to exact math: inputs in [-1, 1) lose < 2^-8 relative each.
        let mut exact = vec![0f32; m * n];
        dense_reference(&x, m, &w, n, Some(&b), DensePrecision::F32, &mut exact);
        let mut got = vec![0f32; m * n];
        dense(&x, m, &DenseMatrix::new(&w, Some(&b), n, k, DensePrecision::Bf16), &mut got);
        let d = max_abs_diff(&got, &exact);
        assert!(d <= 2.0 * (k as f32).sqrt() / 256.0, "{m}x{n}x{k}: bf16 off by {d}");
    }
}

/// A row's output is the same bits whatever else is in the batch and however the call is split.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let (n, k) = (96, 384);
    let (x, w, b) = inputs(7, 21, n, k);
    for precision in [DensePrecision::F32, DensePrecision::Bf16] {
        let packed = DenseMatrix::new(&w, Some(&b), n, k, precision);
        let mut all = vec![0f32; 21 * n];
        dense(&x, 21, &packed, &mut all);
        for isa in isas() {
            let mut batch = vec![0f32; 21 * n];
            dense_with(&x, 21, &packed, &mut batch, isa, Split { panels_per_unit: 1, rows_per_unit: 3 });
            for (r0, len) in [(0, 1), (4, 2), (13, 8)] {
                let mut part = vec![0f32; len * n];
                dense_with(&x[r0 * k..(r0 + len) * k], len, &packed, &mut part, isa, Split::new(&packed, len));
                assert_eq!(part, batch[r0 * n..(r0 + len) * n], "{precision:?} {isa:?} rows {r0}+{len}");
            }
            if isa == Isa::detect() {
                assert_eq!(batch, all, "{precision:?}: split changed results");
            }
        }
    }
}
