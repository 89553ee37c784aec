//! Quantized matmul: kiln's `qmatmul` (kiln-kernels::quant) against candle's `QMatMul` on the same
//! weights, at the default model's shapes (qkv 960x576, gate_up 3072x576, down 576x1536 in Q4_1;
//! lm_head 49152x576 in Q8_0) for decode (m = 1, 4, 16) and prefill (m = 128, 512) batches.
//!
//! Run: `cargo bench -p kiln-benches --bench quant -- --measurement-time 2 --warm-up-time 1`.
//! Criterion reports time and "elements/s" = FLOP/s (2 m n k); at the end a table prints both
//! sides' GFLOP/s, the ratio, and for m = 1 the GB/s of weight bytes read.
//!
//! `kiln` is called from the bench thread, outside rayon's pool (each parallel call wakes the
//! pool: ~10 us); `kiln_pool` makes the same calls from inside a rayon worker, as an engine
//! running its forward pass under `rayon::scope`/`install` would. candle uses its own spinning
//! thread pool, which the calling thread joins.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use kiln_kernels::quant::{qmatmul, QuantMatrix, QuantType};

/// SmolLM2-135M's shapes, then Qwen2.5-0.5B's (Q4_K_M mix: Q5_0 projections, Q4_K / Q6_K down).
const SHAPES: [(&str, usize, usize, QuantType); 7] = [
    ("qkv", 960, 576, QuantType::Q4_1),
    ("gate_up", 3072, 576, QuantType::Q4_1),
    ("down", 576, 1536, QuantType::Q4_1),
    ("lm_head", 49152, 576, QuantType::Q8_0),
    ("qwen_gate_up", 9728, 896, QuantType::Q5_0),
    ("qwen_down", 896, 4864, QuantType::Q4_K),
    ("qwen_down", 896, 4864, QuantType::Q6_K),
];
const MS: [usize; 5] = [1, 4, 16, 128, 512];

/// splitmix64 uniform in [-1, 1): deterministic inputs without a rand dependency.
fn random_vec(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Per-iteration times of one benchmark, one entry per criterion sample.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// Times `f` like `Bencher::iter` and keeps the per-iteration time of every sample.
fn timed(samples: &mut Samples, iters: u64, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let e = t.elapsed();
    samples.0.push(e.as_secs_f64() / iters as f64);
    e
}

struct Row {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    weight_bytes: usize,
    kiln: f64,
    kiln_pool: f64,
    candle: f64,
}

fn bench_shape(c: &mut Criterion, (name, n, k, qtype): (&'static str, usize, usize, QuantType), rows: &mut Vec<Row>) {
    let dtype = match qtype {
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q5_0 => GgmlDType::Q5_0,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q4_K => GgmlDType::Q4K,
        QuantType::Q6_K => GgmlDType::Q6K,
    };
    let wf = Tensor::from_vec(random_vec(n as u64, n * k), (n, k), &Device::Cpu).unwrap();
    let qt = QTensor::quantize(&wf, dtype).unwrap();
    let bytes = qt.data().unwrap().to_vec();
    let ours = QuantMatrix::from_ggml_bytes(qtype, n, k, &bytes).unwrap();
    let theirs = QMatMul::from_qtensor(qt).unwrap();
    let mut group = c.benchmark_group(format!("qmatmul/{name}_{qtype:?}_{n}x{k}"));
    // Flat sampling: a 1 s candle iteration at m = 512 must not turn into 55 iterations.
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    for m in MS {
        let x = random_vec(7 + m as u64, m * k);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let mut out = vec![0f32; m * n];
        let (mut s_ours, mut s_pool, mut s_theirs) = (Samples::default(), Samples::default(), Samples::default());
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new("kiln", m), |b| {
            b.iter_custom(|iters| timed(&mut s_ours, iters, || qmatmul(&ours, black_box(&x), m, &mut out)))
        });
        group.bench_function(BenchmarkId::new("kiln_pool", m), |b| {
            b.iter_custom(|iters| {
                rayon::scope(|_| timed(&mut s_pool, iters, || qmatmul(&ours, black_box(&x), m, &mut out)))
            })
        });
        group.bench_function(BenchmarkId::new("candle", m), |b| {
            b.iter_custom(|iters| {
                timed(&mut s_theirs, iters, || {
                    black_box(theirs.forward(black_box(&xt)).unwrap());
                })
            })
        });
        let (kiln, kiln_pool, candle) = (s_ours.median(), s_pool.median(), s_theirs.median());
        rows.push(Row { name, m, n, k, weight_bytes: bytes.len(), kiln, kiln_pool, candle });
    }
    group.finish();
}

fn print_table(rows: &[Row]) {
    println!("\n| shape (n x k) | m | kiln us | kiln_pool us | candle us | kiln GFLOP/s | kiln_pool GFLOP/s | candle GFLOP/s | candle / kiln time | weight GB/s kiln / kiln_pool / candle (m=1) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let flop = 2.0 * (r.m * r.n * r.k) as f64;
        let gbs = |t: f64| format!("{:.1}", r.weight_bytes as f64 / t / 1e9);
        let bw = if r.m == 1 {
            format!("{} / {} / {}", gbs(r.kiln), gbs(r.kiln_pool), gbs(r.candle))
        } else {
            String::new()
        };
        println!(
            "| {} {}x{} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {} |",
            r.name,
            r.n,
            r.k,
            r.m,
            r.kiln * 1e6,
            r.kiln_pool * 1e6,
            r.candle * 1e6,
            flop / r.kiln / 1e9,
            flop / r.kiln_pool / 1e9,
            flop / r.candle / 1e9,
            r.candle / r.kiln,
            bw
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut rows = Vec::new();
    for shape in SHAPES {
        bench_shape(&mut c, shape, &mut rows);
    }
    c.final_summary();
    // Filtered-out benchmarks leave no samples (NaN); only print what ran.
    rows.retain(|r| r.kiln.is_finite() || r.kiln_pool.is_finite() || r.candle.is_finite());
    print_table(&rows);
}
