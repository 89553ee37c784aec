//! Quantized matrix multiply on CPU: `out[m, n] = x[m, k] * W^T` with W in ggml Q4_1, Q5_0,
//! Q8_0, Q4_K or Q6_K.
//!
//! Owns the weight repacking (`matrix.rs`), activation quantization (`act.rs`, vectorized in
//! `avx512_act.rs`; `kact.rs` for Q8_K), the tile kernels (`avx512.rs`, `avx512_k.rs`: AVX-512
//! VNNI; `portable.rs`, `portable_k.rs`: every other CPU), the parallel driver and the plain
//! reference (`reference.rs`). Semantics are those of ggml's x86 build (what llama.cpp runs on
//! this kind of machine), bit for bit: Q4_1 weights meet Q8_1 activations, Q5_0 and Q8_0 meet
//! Q8_0, Q4_K and Q6_K meet Q8_K (ggml's `vec_dot_type`); each activation row is quantized on
//! its own; one output follows the x86 dot product of its type as GCC compiled it (listed in
//! `reference.rs`). For the 32-blocks that is 8 f32 partial sums, one per 4-byte group of the
//! block (the int32 lanes of a ymm `vpdpbusd`), each updated per block by
//! `fma(dw * dx, group_sum, acc)`; then `hsum_float_8` and, for Q4_1, `+ summs` where
//! `summs = fma(mw, sx, summs)` per block. (With Q8 activations the model is chaotic at the
//! last bit, so matching llama.cpp's tokens needs its exact rounding sequence, not just an
//! accurate sum.)
//!
//! Which llama.cpp path we follow (`Form`): by default the one it takes for a single token
//! (decode), for every row. For Q4_1, Q5_0 and Q8_0 all its paths agree (llamafile's tinyBLAS,
//! used for batches of 2+, has no Q4_1 case and does vec_dot's per-element arithmetic for
//! Q5_0/Q8_0). For the k-quants llama.cpp is not batch invariant: ubatches of 8+ rows send Q6_K
//! through its "tiled" kernel (one integer per super-block, `acc = fma(S * dw, dx, acc)`), and
//! repacked Q4_K rows below `4 * (m / 4)` through a gemm that rounds once per 64 values. So its
//! prompt rows differ from its decode rows in the last bits, and a Q4_K_M model's greedy output
//! depends on llama.cpp's ubatch size (`-ub 1` and the default disagree by up to 0.14 in
//! logprob on Qwen2.5-0.5B). `Form::LlamaCppBatch` reproduces that choice for callers that need
//! llama.cpp's exact numbers; it is checked bit for bit against libggml-cpu's own output.
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
#[cfg(target_arch = "x86_64")]
mod avx512_k;
mod kact;
mod matrix;
mod portable;
mod portable_k;
mod reference;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_k;

use std::ops::Range;

use rayon::prelude::*;

use crate::sink::OutSink;

use act::{ActBlock, QActs};
use kact::{KActBlock, KActs};
pub use matrix::QuantMatrix;
use matrix::Tile;
pub(crate) use reference::hsum8;
pub use reference::{qmatmul_reference, qmatmul_reference_form};

/// Values per ggml block (Q4_1, Q5_0, Q8_0, Q8_1 all use 32).
const QK: usize = 32;
/// Values per k-quant super-block (Q4_K, Q6_K, Q8_K).
const QK_K: usize = 256;
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
    /// 32 weights per block: `d: f16, qh: u32, qs: [u8; 16]`; `w = d * (q - 16)`, q 5 bits.
    Q5_0,
    /// 32 weights per block: `d: f16, qs: [i8; 32]`; `w = d * q`.
    Q8_0,
    /// 256 weights per block: `d, dmin: f16`, 12 bytes of eight 6-bit scales and mins, 128 bytes
    /// of nibbles; `w = d * scale_s * q - dmin * min_s` in 32-value sub-block s.
    Q4_K,
    /// 256 weights per block: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`;
    /// `w = d * scale_g * (q - 32)`, q 6 bits, in 16-value group g.
    Q6_K,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// k is not a whole number of the type's blocks (32 values; 256 for k-quants).
    KNotMultipleOfBlock { k: usize, block: usize },
    /// `expected` is `None` when n * k overflows.
    ByteLength { expected: Option<usize>, got: usize },
}

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantError::KNotMultipleOfBlock { k, block } => {
                write!(f, "quantized matrix: k = {k} is not a multiple of {block}")
            }
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

/// Which of llama.cpp's CPU code paths a call follows. Only the k-quants care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    /// One arithmetic per weight type, whatever the batch: llama.cpp's single-token (decode)
    /// path. Batch invariant; what the engine runs.
    #[default]
    Invariant,
    /// What llama.cpp's CPU backend does with a ubatch of m rows: Q6_K through its tiled kernel
    /// when m >= 8, repacked Q4_K through its gemm for rows below `4 * (m / 4)` (the rest, and
    /// everything when m < 4, as in `Invariant`). Not batch invariant, on purpose: it exists to
    /// reproduce llama.cpp's numbers (its prompt processing) bit for bit.
    LlamaCppBatch,
}

/// Whether row `row` of an m-row call takes llama.cpp's batched k-quant arithmetic.
pub(crate) fn k_batched(qtype: QuantType, form: Form, row: usize, m: usize) -> bool {
    match (form, qtype) {
        (Form::LlamaCppBatch, QuantType::Q6_K) => m >= 8,
        (Form::LlamaCppBatch, QuantType::Q4_K) => row < 4 * (m / 4),
        _ => false,
    }
}

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
    qmatmul_form(w, x, m, out, Form::Invariant)
}

/// `qmatmul` in a chosen `Form` (bit-identical to `qmatmul_reference_form`).
pub fn qmatmul_form(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32], form: Form) {
    let isa = Isa::detect();
    qmatmul_with(w, x, m, out, isa, Plan::new(w, m), form)
}

pub(crate) fn check_shapes(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
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

/// Quantized activations of one call, in the form the weight type meets.
#[derive(Clone, Copy)]
enum Acts<'a> {
    /// Q8_0 / Q8_1 (32-value blocks).
    Q8(&'a QActs),
    /// Q8_K (256-value blocks) for the k-quants.
    K(&'a KActs),
}

/// The driver behind `qmatmul`, with the kernel family and the work split chosen by the caller
/// (tests use this to check that neither changes a single bit).
pub(crate) fn qmatmul_with(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32], isa: Isa, plan: Plan, form: Form) {
    check_shapes(w, x, m, out);
    if m == 0 || w.rows() == 0 {
        return;
    }
    let mut scratch = take_scratch();
    let acts = if w.qtype().is_k() {
        scratch.k.quantize(x, m, w.cols());
        Acts::K(&scratch.k)
    } else {
        scratch.q8.quantize(x, m, w.cols(), isa);
        Acts::Q8(&scratch.q8)
    };
    let (n_tiles, tpu, rpu) = (w.n_tiles(), plan.tiles_per_unit.max(1), plan.rows_per_unit.max(1));
    let (tile_units, row_units) = (n_tiles.div_ceil(tpu), m.div_ceil(rpu));
    let sink = OutSink::new(out, w.rows());
    let unit = |u: usize| {
        // Tile-major unit order: rayon's halving split gives each thread its own weight columns.
        let (tu, ru) = (u / row_units, u % row_units);
        let tiles = tu * tpu..((tu + 1) * tpu).min(n_tiles);
        let rows = ru * rpu..((ru + 1) * rpu).min(m);
        run_unit(Call { w, acts, isa, form, m }, tiles, rows, &sink);
    };
    if tile_units * row_units == 1 {
        unit(0);
    } else {
        (0..tile_units * row_units).into_par_iter().for_each(unit);
    }
    put_scratch(scratch);
}

/// All (tile, row) outputs of one unit: per tile, the rows in groups of up to `ROWS` so the
/// tile's weights come from L1 after the first group. Which group a row lands in (and so which
/// kernel shape computes it) changes no bit: every kernel does the same per-lane arithmetic.
fn run_unit(call: Call<'_>, tiles: Range<usize>, rows: Range<usize>, sink: &OutSink) {
    let Call { w, acts, isa, form, m } = call;
    let mut scales = Vec::new();
    for t in tiles {
        let stored = w.tile(t);
        widen_scales(isa, stored.scales, &mut scales);
        let tile = Tile { qs: stored.qs, scales: &scales };
        let cols = t * TILE..((t + 1) * TILE).min(w.rows());
        let mut r = rows.start;
        while r < rows.end {
            let batched = k_batched(w.qtype(), form, r, m);
            let g = Group { w, tile, acts, isa, row0: r, cols: cols.clone(), sink, batched };
            // Both rows of a pair must take the same k-quant arithmetic.
            let pair = rows.end - r >= 2 && k_batched(w.qtype(), form, r + 1, m) == batched;
            r += if pair { g.run::<ROWS>() } else { g.run::<1>() };
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

/// What every unit of one `qmatmul_with` call shares.
#[derive(Clone, Copy)]
struct Call<'a> {
    w: &'a QuantMatrix,
    acts: Acts<'a>,
    isa: Isa,
    form: Form,
    /// Rows of the whole call (llama.cpp's batched forms depend on it).
    m: usize,
}

/// One kernel call: R activation rows x one tile.
struct Group<'a> {
    w: &'a QuantMatrix,
    tile: Tile<'a>,
    acts: Acts<'a>,
    isa: Isa,
    row0: usize,
    cols: Range<usize>,
    sink: &'a OutSink,
    /// k-quants: llama.cpp's batched arithmetic for these rows (see `Form`).
    batched: bool,
}

impl Group<'_> {
    fn run<const R: usize>(&self) -> usize {
        let res = match self.acts {
            Acts::Q8(a) => self.run_q8::<R>(std::array::from_fn(|i| a.row(self.row0 + i))),
            Acts::K(a) => self.run_k::<R>(std::array::from_fn(|i| a.row(self.row0 + i))),
        };
        for (i, vals) in res.iter().enumerate() {
            // SAFETY: units partition [rows] x [tiles], so (row0 + i, cols) is written by this
            // call only, and `write` checks the bounds.
            unsafe { self.sink.write(self.row0 + i, self.cols.start, &vals[..self.cols.len()]) };
        }
        R
    }

    fn run_q8<const R: usize>(&self, x: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        match (self.isa, self.w.qtype()) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512Vnni` is only constructed after detecting avx512f/bw/vnni.
            (Isa::Avx512Vnni, QuantType::Q4_1) => unsafe { avx512::q4_1_tile::<R>(&self.tile, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above. Q5_0 is packed as Q8_0 (see `matrix.rs`).
            (Isa::Avx512Vnni, QuantType::Q8_0 | QuantType::Q5_0) => unsafe { avx512::q8_0_tile::<R>(&self.tile, x) },
            (Isa::Portable, QuantType::Q4_1) => portable::q4_1_tile::<R>(&self.tile, x),
            (Isa::Portable, QuantType::Q8_0 | QuantType::Q5_0) => portable::q8_0_tile::<R>(&self.tile, x),
            (_, QuantType::Q4_K | QuantType::Q6_K) => unreachable!("k-quants meet Q8_K activations"),
        }
    }

    fn run_k<const R: usize>(&self, x: [&[KActBlock]; R]) -> [[f32; TILE]; R] {
        match (self.isa, self.w.qtype()) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512Vnni` is only constructed after detecting avx512f/bw/vnni.
            (Isa::Avx512Vnni, QuantType::Q4_K) => unsafe { avx512_k::q4_k_tile::<R>(&self.tile, x, self.batched) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Isa::Avx512Vnni, QuantType::Q6_K) => unsafe { avx512_k::q6_k_tile::<R>(&self.tile, x, self.batched) },
            (Isa::Portable, QuantType::Q4_K) => portable_k::q4_k_tile::<R>(&self.tile, x, self.batched),
            (Isa::Portable, QuantType::Q6_K) => portable_k::q6_k_tile::<R>(&self.tile, x, self.batched),
            (_, QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q8_0) => unreachable!("32-blocks meet Q8_0/Q8_1"),
        }
    }
}

/// Per-thread activation buffers of both forms.
#[derive(Default)]
struct Scratch {
    q8: QActs,
    k: KActs,
}

thread_local! {
    /// Reused activation buffers, so a decode step does not allocate. Taken (not borrowed) for
    /// the call, so a nested call on the same thread (rayon work stealing) simply allocates.
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

fn take_scratch() -> Scratch {
    SCRATCH.with(|s| s.take())
}

fn put_scratch(a: Scratch) {
    SCRATCH.with(|s| s.set(a));
}
