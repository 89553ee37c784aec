//! Quantized matrix multiply on CPU: `out[m, n] = x[m, k] * W^T` with W in ggml Q4_1 or Q8_0.
//!
//! Owns the weight repacking (`matrix.rs`), activation quantization (`act.rs`, vectorized in
//! `avx512_act.rs`), the tile kernels (`avx512.rs`: AVX-512 VNNI, `portable.rs`: every other
//! CPU), the parallel driver and the plain reference. Semantics are those of ggml's x86 build
//! (what llama.cpp runs on this kind of machine), bit for bit: Q4_1 weights meet Q8_1
//! activations and Q8_0 weights meet Q8_0 activations (ggml's `vec_dot_type`), each activation
//! row is quantized in 32-blocks on its own, and one output is `ggml_vec_dot_q4_1_q8_1` /
//! `ggml_vec_dot_q8_0_q8_0` of `arch/x86/quants.c` as GCC compiled them: 8 f32 partial sums, one
//! per 4-byte group of the block (the int32 lanes of a ymm `vpdpbusd`), each updated per block
//! by `fma(dw * dx, group_sum, acc)`; then `hsum_float_8` and, for Q4_1, `+ summs` where
//! `summs = fma(mw, sx, summs)` per block. (With Q8 activations the model is chaotic at the
//! last bit, so matching llama.cpp's tokens needs its exact rounding sequence, not just an
//! accurate sum.) llamafile's sgemm never runs for these shapes in llama.cpp: it has no Q4_1
//! case, and the Q8_0 output matrix only ever sees one row per sequence.
//!
//! Batch invariance (a hard requirement of the engine): an output element depends only on its
//! weight row and its activation row, through a fixed sequence of float operations. The fast
//! kernels vectorize across 16 output columns (one f32 lane each) and reuse weights across 2
//! activation rows, but never split or reorder the sums of one element, so the result does not
//! depend on m, on the tiling, or on how rayon splits the work; it is the same bits as
//! `qmatmul_reference`. Must not: reduce in any other order, fuse or unfuse a rounding, or
//! quantize activations with batch-dependent scales. (Non-finite activations give garbage, as
//! in ggml; still the same garbage for a row whatever the batch.)

mod act;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_act;
mod matrix;
mod portable;
#[cfg(test)]
mod tests;

use std::ops::Range;

use rayon::prelude::*;

use crate::sink::OutSink;

use act::{ActBlock, QActs};
pub use matrix::QuantMatrix;
use matrix::Tile;

/// Values per ggml block (Q4_1, Q8_0, Q8_1 all use 32).
const QK: usize = 32;
/// Output columns per tile: one zmm of f32 / i32 lanes.
const TILE: usize = 16;
/// Activation rows per kernel call (at most): each loaded weight tile is reused this many times.
/// 2 rows x (8 partial sums + `summs`) + the weight registers fill the 32 zmm registers.
const ROWS: usize = 2;

/// Supported weight formats (ggml block layouts, as stored in GGUF files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 32 weights per block: `d: f16, m: f16, qs: [u8; 16]` (two nibbles each); `w = d * q + m`.
    Q4_1,
    /// 32 weights per block: `d: f16, qs: [i8; 32]`; `w = d * q`.
    Q8_0,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    KNotMultipleOf32 { k: usize },
    /// `expected` is `None` when n * k overflows.
    ByteLength { expected: Option<usize>, got: usize },
}

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantError::KNotMultipleOf32 { k } => write!(f, "quantized matrix: k = {k} is not a multiple of 32"),
            QuantError::ByteLength { expected: Some(e), got } => {
                write!(f, "quantized matrix: expected {e} bytes of blocks, got {got}")
            }
            QuantError::ByteLength { expected: None, got } => {
                write!(f, "quantized matrix: shape overflows usize ({got} bytes given)")
            }
        }
    }
}

impl std::error::Error for QuantError {}

/// Which kernel family runs. Detected at runtime; never depends on the call's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// avx512f + avx512bw + avx512vnni, detected at runtime.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    Portable,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Isa::Avx512Vnni;
        }
        Isa::Portable
    }
}

/// `out[m, n] = x[m, k] * W^T`. Quantizes each row of `x` (ggml Q8_1 for Q4_1 weights, Q8_0 for
/// Q8_0 weights), then runs the tile kernels in parallel on the current rayon pool (the global
/// one unless called under `install`). Bit-identical to `qmatmul_reference` and batch invariant
/// (see the module docs). Small decode calls are cheapest from inside a rayon worker: waking the
/// pool from an outside thread costs ~10 us, so from outside they run on the caller alone.
pub fn qmatmul(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let isa = Isa::detect();
    qmatmul_with(w, x, m, out, isa, Plan::new(w, m))
}

/// The plain reference: ggml's quantization and x86 `ggml_vec_dot_*` arithmetic written as
/// scalar code on the original ggml blocks, one output element at a time.
pub fn qmatmul_reference(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    check_shapes(w, x, m, out);
    let acts = QActs::quantize_ref(x, m, k);
    let bb = w.qtype().block_bytes();
    let bytes = w.to_ggml_bytes();
    for i in 0..m {
        let xr = acts.row(i);
        for j in 0..n {
            let wrow = &bytes[j * (k / QK) * bb..][..(k / QK) * bb];
            out[i * n + j] = match w.qtype() {
                QuantType::Q4_1 => ref_dot_q4_1(wrow, xr),
                QuantType::Q8_0 => ref_dot_q8_0(wrow, xr),
            };
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `hsum_float_8`: `((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))`.
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
}

/// `ggml_vec_dot_q4_1_q8_1` (x86, AVX2 + VNNI) on one ggml Q4_1 row. Group g < 4 holds the low
/// nibbles of bytes 4g..4g+4 times x[4g..], group 4 + g their high nibbles times x[16 + 4g..]
/// (`bytes_from_nibbles_32` puts low nibbles in bytes 0..16, high ones in 16..32).
fn ref_dot_q4_1(wrow: &[u8], x: &[ActBlock]) -> f32 {
    let (mut acc, mut summs) = ([0f32; 8], 0f32);
    for (blk, xb) in wrow.chunks_exact(20).zip(x) {
        let (dw, mw, qs) = (f16_at(blk, 0), f16_at(blk, 2), &blk[4..20]);
        summs = mw.mul_add(xb.s, summs);
        let dd = dw * xb.d;
        for (g, a) in acc.iter_mut().enumerate() {
            let (c, high) = (g % 4, g >= 4);
            let xs = if high { &xb.qs[16 + 4 * c..20 + 4 * c] } else { &xb.qs[4 * c..4 * c + 4] };
            let sumi: i32 = qs[4 * c..4 * c + 4]
                .iter()
                .zip(xs)
                .map(|(&q, &xq)| if high { q >> 4 } else { q & 0x0F } as i32 * xq as i32)
                .sum();
            *a = dd.mul_add(sumi as f32, *a);
        }
    }
    hsum8(acc) + summs
}

/// `ggml_vec_dot_q8_0_q8_0` (x86, AVX2) on one ggml Q8_0 row: group g = bytes 4g..4g+4.
fn ref_dot_q8_0(wrow: &[u8], x: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (blk, xb) in wrow.chunks_exact(34).zip(x) {
        let (dw, qs) = (f16_at(blk, 0), &blk[2..34]);
        let dd = dw * xb.d;
        for (g, a) in acc.iter_mut().enumerate() {
            let sumi: i32 = (4 * g..4 * g + 4).map(|j| qs[j] as i8 as i32 * xb.qs[j] as i32).sum();
            *a = dd.mul_add(sumi as f32, *a);
        }
    }
    hsum8(acc)
}

fn check_shapes(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * w.cols(), "qmatmul: x must be [m, k] = [{m}, {}]", w.cols());
    assert_eq!(out.len(), m * w.rows(), "qmatmul: out must be [m, n] = [{m}, {}]", w.rows());
}

/// How one call is cut into independent units: rectangles of (tile range) x (row range).
/// Only speed depends on it, never results.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub tiles_per_unit: usize,
    pub rows_per_unit: usize,
}

impl Plan {
    /// Below this many multiply-adds a call runs on the calling thread. Measured here: from a
    /// thread outside the pool, waking it and waiting costs ~10 us (about 1M MACs of work at
    /// m = 1); from inside a rayon worker (the caller runs under `install`/`scope`) a fork-join
    /// costs ~1 us.
    const INLINE_MACS_OUTSIDE: usize = 1 << 20;
    const INLINE_MACS_IN_POOL: usize = 1 << 17;

    fn new(w: &QuantMatrix, m: usize) -> Self {
        let n_tiles = w.n_tiles().max(1);
        let threads = rayon::current_num_threads();
        let inline = match rayon::current_thread_index() {
            Some(_) => Self::INLINE_MACS_IN_POOL,
            None => Self::INLINE_MACS_OUTSIDE,
        };
        if threads == 1 || m * n_tiles * TILE * w.cols() < inline {
            return Plan { tiles_per_unit: n_tiles, rows_per_unit: m.max(1) };
        }
        // Rows per unit: enough to reuse each tile from L1 many times, few enough that the
        // unit's quantized activations stay in L2 (64 rows x 1.5 k bytes). Larger units, to
        // stream big weights fewer times, measured no faster.
        let rows_per_unit = m.clamp(1, 64);
        let row_units = m.div_ceil(rows_per_unit);
        // Several units per thread so an unlucky thread (others share these cores) can be helped.
        let tile_units = (threads * 4).div_ceil(row_units).clamp(1, n_tiles);
        Plan { tiles_per_unit: n_tiles.div_ceil(tile_units), rows_per_unit }
    }
}

/// The driver behind `qmatmul`, with the kernel family and the work split chosen by the caller
/// (tests use this to check that neither changes a single bit).
pub(crate) fn qmatmul_with(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32], isa: Isa, plan: Plan) {
    check_shapes(w, x, m, out);
    if m == 0 || w.rows() == 0 {
        return;
    }
    let mut acts = take_scratch();
    acts.quantize(x, m, w.cols(), isa);
    let (n_tiles, tpu, rpu) = (w.n_tiles(), plan.tiles_per_unit.max(1), plan.rows_per_unit.max(1));
    let (tile_units, row_units) = (n_tiles.div_ceil(tpu), m.div_ceil(rpu));
    let sink = OutSink::new(out, w.rows());
    let unit = |u: usize| {
        // Tile-major unit order: rayon's halving split gives each thread its own weight columns.
        let (tu, ru) = (u / row_units, u % row_units);
        let tiles = tu * tpu..((tu + 1) * tpu).min(n_tiles);
        let rows = ru * rpu..((ru + 1) * rpu).min(m);
        run_unit(w, &acts, isa, tiles, rows, &sink);
    };
    if tile_units * row_units == 1 {
        unit(0);
    } else {
        (0..tile_units * row_units).into_par_iter().for_each(unit);
    }
    put_scratch(acts);
}

/// All (tile, row) outputs of one unit: per tile, the rows in groups of up to `ROWS` so the
/// tile's weights come from L1 after the first group. Which group a row lands in (and so which
/// kernel shape computes it) changes no bit: every kernel does the same per-lane arithmetic.
fn run_unit(w: &QuantMatrix, acts: &QActs, isa: Isa, tiles: Range<usize>, rows: Range<usize>, sink: &OutSink) {
    let mut scales = Vec::new();
    for t in tiles {
        let stored = w.tile(t);
        widen_scales(isa, stored.scales, &mut scales);
        let tile = Tile { qs: stored.qs, scales: &scales };
        let cols = t * TILE..((t + 1) * TILE).min(w.rows());
        let mut r = rows.start;
        while r < rows.end {
            let g = Group { w, tile, acts, isa, row0: r, cols: cols.clone(), sink };
            r += match rows.end - r {
                1 => g.run::<1>(),
                _ => g.run::<ROWS>(),
            };
        }
    }
}

/// f16 scale bits -> f32 into `out` (resized). Exact, so it cannot change results.
fn widen_scales(isa: Isa, bits: &[u16], out: &mut Vec<f32>) {
    out.resize(bits.len(), 0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512Vnni` is only constructed after detecting avx512f/bw/vnni.
        Isa::Avx512Vnni => unsafe { avx512::widen_f16(bits, out) },
        Isa::Portable => out.iter_mut().zip(bits).for_each(|(o, &b)| *o = half::f16::from_bits(b).to_f32()),
    }
}

/// One kernel call: R activation rows x one tile.
struct Group<'a> {
    w: &'a QuantMatrix,
    tile: Tile<'a>,
    acts: &'a QActs,
    isa: Isa,
    row0: usize,
    cols: Range<usize>,
    sink: &'a OutSink,
}

impl Group<'_> {
    fn run<const R: usize>(&self) -> usize {
        let x: [&[ActBlock]; R] = std::array::from_fn(|i| self.acts.row(self.row0 + i));
        let res = match (self.isa, self.w.qtype()) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512Vnni` is only constructed after detecting avx512f/bw/vnni.
            (Isa::Avx512Vnni, QuantType::Q4_1) => unsafe { avx512::q4_1_tile::<R>(self.tile, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Isa::Avx512Vnni, QuantType::Q8_0) => unsafe { avx512::q8_0_tile::<R>(self.tile, x) },
            (Isa::Portable, QuantType::Q4_1) => portable::q4_1_tile::<R>(self.tile, x),
            (Isa::Portable, QuantType::Q8_0) => portable::q8_0_tile::<R>(self.tile, x),
        };
        for (i, vals) in res.iter().enumerate() {
            // SAFETY: units partition [rows] x [tiles], so (row0 + i, cols) is written by this
            // call only, and `write` checks the bounds.
            unsafe { self.sink.write(self.row0 + i, self.cols.start, &vals[..self.cols.len()]) };
        }
        R
    }
}

thread_local! {
    /// Reused activation buffers, so a decode step does not allocate. Taken (not borrowed) for
    /// the call, so a nested call on the same thread (rayon work stealing) simply allocates.
    static SCRATCH: std::cell::Cell<QActs> = std::cell::Cell::new(QActs::default());
}

fn take_scratch() -> QActs {
    SCRATCH.with(|s| s.take())
}

fn put_scratch(a: QActs) {
    SCRATCH.with(|s| s.set(a));
}
