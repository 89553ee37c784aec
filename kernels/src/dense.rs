//! Dense float matmul of encoder layers: `out[m, n] = x[m, k] · W[n, k]^T + b`, W in PyTorch
//! `Linear` layout, repacked once at load into column panels.
//!
//! Two precisions, chosen per matrix at load:
//! - `F32`: every output is one fused multiply-add chain over k in order, from 0, then `+ b`.
//!   The AVX-512 kernel does exactly that per lane, so it equals `dense_reference` bit for bit.
//! - `Bf16`: weights and activations rounded to bfloat16 (nearest-even), products summed in f32
//!   pairwise (`vdpbf16ps`: 2 k-values per lane per instruction). About 4x the f32 throughput on
//!   AVX-512 BF16 CPUs; ~3 significant digits per operand, which a BERT encoder's outputs
//!   tolerate (cosine to f32 > 0.9999, measured on all-MiniLM-L6-v2).
//!
//! Batch invariance (the embedding queue relies on it): an output element depends only on its
//! activation row and weight column, through a fixed sequence of operations. Kernels run up to
//! `MR` rows at once; a short group repeats its last row rather than using another kernel, and
//! no reduction is split across threads, so neither m nor the work split changes a bit.
//! Must not: reorder the k sum by m, or use a different kernel for leftover rows.

#[cfg(target_arch = "x86_64")]
mod avx512;

use rayon::prelude::*;

use crate::sink::OutSink;

/// Output columns per panel: two zmm of f32.
pub const NR: usize = 32;
/// Activation rows per kernel call: `MR x NR / 16` accumulators + `NR / 16` weight registers + a
/// broadcast. (4 x 64, 6 x 64 and 12 x 32 measured the same here: the FMA / `vdpbf16ps` port is
/// the limit, ~110 f32 and ~210 bf16 GFLOP/s per Zen 4 core.)
const MR: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DensePrecision {
    #[default]
    F32,
    Bf16,
}

impl DensePrecision {
    /// The fastest precision this CPU runs natively (`Bf16` needs AVX-512 BF16; elsewhere it
    /// would be emulated, slower than f32).
    pub fn fastest() -> Self {
        if Isa::detect() == Isa::Avx512Bf16 {
            DensePrecision::Bf16
        } else {
            DensePrecision::F32
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512Bf16,
    Avx512,
    Portable,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            return if is_x86_feature_detected!("avx512bf16") { Isa::Avx512Bf16 } else { Isa::Avx512 };
        }
        Isa::Portable
    }
}

/// A weight matrix packed for `dense`.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    n: usize,
    k: usize,
    packed: Packed,
    /// `[panels * NR]`, zero past n.
    bias: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
enum Packed {
    /// `[panel][k][NR]` f32, columns past n zero.
    F32(Vec<f32>),
    /// `[panel][k / 2][NR]` pairs of bf16 (`k` even in the low half), k padded to even, columns
    /// past n zero.
    Bf16(Vec<u32>),
}

impl DenseMatrix {
    /// `w`: `[n, k]` row-major (a PyTorch `Linear` weight); `bias`: `[n]`.
    pub fn new(w: &[f32], bias: Option<&[f32]>, n: usize, k: usize, precision: DensePrecision) -> Self {
        assert_eq!(w.len(), n * k, "dense: weight must be [n, k] = [{n}, {k}]");
        let panels = n.div_ceil(NR);
        let bias = bias.map(|b| {
            assert_eq!(b.len(), n, "dense: bias must be [n] = [{n}]");
            let mut padded = b.to_vec();
            padded.resize(panels * NR, 0.0);
            padded
        });
        let packed = match precision {
            DensePrecision::F32 => {
                let mut p = vec![0f32; panels * k * NR];
                for (j, row) in w.chunks_exact(k).enumerate() {
                    let base = (j / NR) * k * NR + j % NR;
                    for (kk, &v) in row.iter().enumerate() {
                        p[base + kk * NR] = v;
                    }
                }
                Packed::F32(p)
            }
            DensePrecision::Bf16 => {
                let kp = k.div_ceil(2);
                let mut p = vec![0u32; panels * kp * NR];
                for (j, row) in w.chunks_exact(k).enumerate() {
                    let base = (j / NR) * kp * NR + j % NR;
                    for (i, pair) in row.chunks(2).enumerate() {
                        p[base + i * NR] = bf16_pair(pair[0], pair.get(1).copied().unwrap_or(0.0));
                    }
                }
                Packed::Bf16(p)
            }
        };
        Self { n, k, packed, bias }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn precision(&self) -> DensePrecision {
        match self.packed {
            Packed::F32(_) => DensePrecision::F32,
            Packed::Bf16(_) => DensePrecision::Bf16,
        }
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// Round-to-nearest-even f32 -> bf16 bits (what `vcvtne2ps2bf16` does for finite inputs).
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn bf16_pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `out[m, n] = x[m, k] · W^T + bias`, in parallel on the current rayon pool.
pub fn dense(x: &[f32], m: usize, w: &DenseMatrix, out: &mut [f32]) {
    dense_with(x, m, w, out, Isa::detect(), Split::new(w, m))
}

/// The plain reference: one output element at a time, in the documented operation order
/// (`F32`: fma chain; `Bf16`: per k pair, `acc += x[2i+1] w[2i+1]` then `acc += x[2i] w[2i]`, the
/// order Intel documents for `vdpbf16ps`). `w` is `[n, k]` row-major, unpacked.
pub fn dense_reference(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    precision: DensePrecision,
    out: &mut [f32],
) {
    let k = x.len().checked_div(m).unwrap_or_else(|| w.len() / n.max(1));
    check(x, m, n, k, bias, out);
    let round = |v: f32| match precision {
        DensePrecision::F32 => v,
        DensePrecision::Bf16 => bf16_value(bf16_bits(v)),
    };
    for i in 0..m {
        let xr: Vec<f32> = x[i * k..(i + 1) * k].iter().map(|&v| round(v)).collect();
        for j in 0..n {
            let wr: Vec<f32> = w[j * k..(j + 1) * k].iter().map(|&v| round(v)).collect();
            let mut acc = 0f32;
            match precision {
                DensePrecision::F32 => xr.iter().zip(&wr).for_each(|(a, b)| acc = a.mul_add(*b, acc)),
                DensePrecision::Bf16 => {
                    for (a, b) in xr.chunks(2).zip(wr.chunks(2)) {
                        if a.len() == 2 {
                            acc += a[1] * b[1];
                        }
                        acc += a[0] * b[0];
                    }
                }
            }
            out[i * n + j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
}

fn check(x: &[f32], m: usize, n: usize, k: usize, bias: Option<&[f32]>, out: &[f32]) {
    assert_eq!(x.len(), m * k, "dense: x must be [m, k] = [{m}, {k}]");
    assert_eq!(out.len(), m * n, "dense: out must be [m, n] = [{m}, {n}]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "dense: bias must be [n] = [{n}]");
    }
}

/// How one call is cut into units of (panel range) x (row range). Only speed depends on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Split {
    pub panels_per_unit: usize,
    pub rows_per_unit: usize,
}

impl Split {
    /// Below this many multiply-adds a call stays on the calling thread (waking the pool costs
    /// about as much as this much work).
    const INLINE_MACS: usize = 1 << 18;

    fn new(w: &DenseMatrix, m: usize) -> Self {
        let panels = w.panels().max(1);
        let threads = rayon::current_num_threads();
        if threads == 1 || m * w.n * w.k < Self::INLINE_MACS {
            return Split { panels_per_unit: panels, rows_per_unit: m.max(1) };
        }
        // 64 rows of activations (<= 64 x 1536 x 4 B) stay in L2 while every panel of the unit
        // streams past them; each panel (<= 1536 x 32 x 4 B) stays in L2 across the row groups.
        let rows_per_unit = m.clamp(1, 64);
        let row_units = m.div_ceil(rows_per_unit);
        // Several units per thread so a thread slowed by other work can be helped.
        let panel_units = (threads * 4).div_ceil(row_units).clamp(1, panels);
        Split { panels_per_unit: panels.div_ceil(panel_units), rows_per_unit }
    }
}

/// Activations as the kernels read them: f32 rows, or bf16 pairs per row (`[m][k / 2]`).
pub(crate) enum Acts<'a> {
    F32(&'a [f32]),
    Bf16(Vec<u32>),
}

impl Acts<'_> {
    fn bf16(x: &[f32], m: usize, k: usize, isa: Isa) -> Vec<u32> {
        let kp = k.div_ceil(2);
        let mut out = vec![0u32; m * kp];
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Bf16 && k.is_multiple_of(2) {
            // SAFETY: avx512f + avx512bf16 were detected (that is what `Avx512Bf16` means).
            unsafe { avx512::to_bf16_pairs(x, &mut out) };
            return out;
        }
        let _ = isa;
        for (row, o) in x.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(kp.max(1))) {
            for (i, pair) in row.chunks(2).enumerate() {
                o[i] = bf16_pair(pair[0], pair.get(1).copied().unwrap_or(0.0));
            }
        }
        out
    }
}

pub(crate) fn dense_with(x: &[f32], m: usize, w: &DenseMatrix, out: &mut [f32], isa: Isa, split: Split) {
    check(x, m, w.n, w.k, w.bias.as_deref().map(|b| &b[..w.n]), out);
    if m == 0 || w.n == 0 {
        return;
    }
    let acts = match w.packed {
        Packed::F32(_) => Acts::F32(x),
        Packed::Bf16(_) => Acts::Bf16(Acts::bf16(x, m, w.k, isa)),
    };
    let panels = w.panels();
    let (ppu, rpu) = (split.panels_per_unit.max(1), split.rows_per_unit.max(1));
    let (panel_units, row_units) = (panels.div_ceil(ppu), m.div_ceil(rpu));
    let sink = OutSink::new(out, w.n);
    let unit = |u: usize| {
        let (pu, ru) = (u / row_units, u % row_units);
        let rows = ru * rpu..((ru + 1) * rpu).min(m);
        let mut r = rows.start;
        while r < rows.end {
            let live = (rows.end - r).min(MR);
            let group = Group { row0: r, live, panels: pu * ppu..((pu + 1) * ppu).min(panels) };
            // SAFETY: units partition [rows] x [panels], so this group's outputs are written by
            // this call only.
            unsafe { run_group(w, &acts, isa, group, &sink) };
            r += live;
        }
    };
    if panel_units * row_units == 1 {
        unit(0);
    } else {
        (0..panel_units * row_units).into_par_iter().for_each(unit);
    }
}

/// `MR` rows from `row0` (rows past `live` repeat the last live row and are not stored) x a
/// range of panels: one kernel call per panel, row pointers set up once.
struct Group {
    row0: usize,
    live: usize,
    panels: std::ops::Range<usize>,
}

/// Where a tile's outputs go: `live` rows of `cols` columns, with the panel's bias.
pub(crate) struct TileOut<'a> {
    dst: [*mut f32; MR],
    live: usize,
    cols: usize,
    bias: &'a [f32],
}

/// # Safety
/// No other thread may touch the group's outputs during the call.
unsafe fn run_group(w: &DenseMatrix, acts: &Acts, isa: Isa, g: Group, sink: &OutSink) {
    let k = w.k;
    let rows: [usize; MR] = std::array::from_fn(|i| g.row0 + i.min(g.live - 1));
    // SAFETY: exclusive per the caller's contract; `row_ptr` checks that whole rows are in
    // bounds, so offsets below n stay inside. (Repeated rows are never stored to.)
    let row_starts = rows.map(|r| unsafe { sink.row_ptr(r, 0, w.n) });
    let zeros = [0f32; NR];
    let out = |p: usize| TileOut {
        // SAFETY: p * NR < n (p is a panel of this matrix), inside the row.
        dst: row_starts.map(|d| unsafe { d.add(p * NR) }),
        live: g.live,
        cols: NR.min(w.n - p * NR),
        bias: w.bias.as_deref().map_or(&zeros[..], |b| &b[p * NR..(p + 1) * NR]),
    };
    match (&w.packed, acts) {
        (Packed::F32(pw), Acts::F32(x)) => {
            let xr: [&[f32]; MR] = rows.map(|r| &x[r * k..(r + 1) * k]);
            for p in g.panels {
                let panel = &pw[p * k * NR..(p + 1) * k * NR];
                #[cfg(target_arch = "x86_64")]
                if isa != Isa::Portable {
                    // SAFETY: avx512f was detected (any non-portable Isa); the tile is exclusive.
                    unsafe { avx512::tile_f32(panel, xr, out(p)) };
                    continue;
                }
                // SAFETY: the tile is exclusive.
                unsafe { out(p).store(tile_f32_portable(panel, xr)) };
            }
        }
        (Packed::Bf16(pw), Acts::Bf16(x)) => {
            let kp = k.div_ceil(2);
            let xr: [&[u32]; MR] = rows.map(|r| &x[r * kp..(r + 1) * kp]);
            for p in g.panels {
                let panel = &pw[p * kp * NR..(p + 1) * kp * NR];
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512Bf16 {
                    // SAFETY: avx512f + avx512bf16 were detected; the tile is exclusive.
                    unsafe { avx512::tile_bf16(panel, xr, out(p)) };
                    continue;
                }
                // SAFETY: the tile is exclusive.
                unsafe { out(p).store(tile_bf16_portable(panel, xr)) };
            }
        }
        _ => unreachable!("activations are prepared for the matrix's precision"),
    }
}

impl TileOut<'_> {
    /// Portable epilogue: `acc + bias` into the live rows.
    /// # Safety
    /// The tile's outputs must be exclusive to the caller.
    unsafe fn store(&self, acc: [[f32; NR]; MR]) {
        for (a, &d) in acc.iter().zip(&self.dst).take(self.live) {
            for (c, (v, b)) in a.iter().zip(self.bias).take(self.cols).enumerate() {
                // SAFETY: `dst` rows have `cols` writable elements, exclusive to this tile.
                unsafe { *d.add(c) = v + b };
            }
        }
    }
}

fn tile_f32_portable(panel: &[f32], x: [&[f32]; MR]) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (kk, wk) in panel.chunks_exact(NR).enumerate() {
        for (a, xr) in acc.iter_mut().zip(&x) {
            for (o, wv) in a.iter_mut().zip(wk) {
                *o = xr[kk].mul_add(*wv, *o);
            }
        }
    }
    acc
}

fn tile_bf16_portable(panel: &[u32], x: [&[u32]; MR]) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    let half = |v: u32, hi: bool| bf16_value(if hi { (v >> 16) as u16 } else { v as u16 });
    for (i, wk) in panel.chunks_exact(NR).enumerate() {
        for (a, xr) in acc.iter_mut().zip(&x) {
            for (o, &wv) in a.iter_mut().zip(wk) {
                *o += half(xr[i], true) * half(wv, true);
                *o += half(xr[i], false) * half(wv, false);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests;
