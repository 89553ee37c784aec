//! `QuantMatrix`: ggml weight blocks (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K) repacked into row tiles for
//! the VNNI kernels.
//!
//! Owns the packed layout and the only code that reads or writes it byte by byte (packing at
//! construction, unpacking back to ggml bytes for the reference and for tests). It does no math.
//!
//! Packed layout. Weight rows (outputs) are grouped in tiles of `TILE` = 16 rows, the last tile
//! padded with zero-scale rows. For tile `t` and block `b` of the k axis (32 values; 256 for the
//! k-quants):
//! - `qs` holds `lines_per_block` 64-byte lines; line `c` is `[16 rows][4 bytes]`, so one zmm
//!   load feeds one `vpdpbusd` that advances all 16 rows by 4 k-values:
//!   - Q4_1 (4 lines): row r's bytes are ggml `qs[4c..4c+4]` untouched; their low nibbles are
//!     k = 4c..4c+4 and their high nibbles k = 16+4c..16+4c+4 (ggml's nibble order).
//!   - Q8_0 (8 lines): row r's bytes are ggml `qs[4c..4c+4]` xor 0x80, i.e. `w + 128` as u8, so
//!     they sit on the unsigned side of `vpdpbusd` (see `avx512.rs` for the correction).
//!   - Q5_0 (8 lines): the 5-bit weights `q - 16` widened to bytes, then stored exactly like
//!     Q8_0. ggml's x86 `vec_dot_q5_0_q8_0` is `vec_dot_q8_0_q8_0` on those bytes (same groups,
//!     same floats), so one kernel serves both; it costs 34 bytes a block instead of 22.
//!   - Q4_K (36 lines): line `8p + c` (p < 4) is row r's ggml `qs[32p + 4c..+4]`: low nibbles
//!     are sub-block 2p's values 4c..4c+4, high nibbles sub-block 2p+1's. Lines 32..36 are a
//!     256-byte table: the 6-bit scale of sub-block s at `16s + r`, its min at `128 + 16s + r`.
//!   - Q6_K (68 lines): line `8v + j` is row r's 6-bit values `32v + 4j..+4` (0..63, unpacked
//!     from ql/qh); lines 64..68 are a table with the i8 scale of 16-group s at `16s + r`.
//! - `scales` holds the f16 bits `[scales_per_row][16 rows]`: d, then (Q4_1) m / (Q4_K) dmin.
//!
//! Tiles are contiguous (`[tile][block][line]`), so one tile's weights stream sequentially.

use rayon::prelude::*;

use super::{QuantError, QuantType, QK, QK_K, TILE};

/// One 64-byte, 64-aligned line of packed quants: exactly one aligned zmm load.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// Quantized weights `W: [n, k]` (n output rows of k inputs), repacked in 16-row tiles.
pub struct QuantMatrix {
    qtype: QuantType,
    n: usize,
    k: usize,
    /// `[n_tiles, k / 32, lines_per_block]`
    qs: Vec<Line>,
    /// `[n_tiles, k / 32, scales_per_row, TILE]` f16 bits
    scales: Vec<u16>,
}

/// The packed data of one tile, as stored.
#[derive(Clone, Copy)]
pub(crate) struct TileView<'a> {
    /// `[k / 32, lines_per_block]`
    pub qs: &'a [Line],
    /// `[k / 32, scales_per_row, TILE]` f16 bits
    pub scales: &'a [u16],
}

/// What a kernel reads to produce 16 output columns: the tile's quants and its scales widened
/// to f32 (exact; done once per tile and unit, not once per block and row group).
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    /// `[k / 32, lines_per_block]`
    pub qs: &'a [Line],
    /// `[k / 32, scales_per_row, TILE]`
    pub scales: &'a [f32],
}

impl QuantType {
    /// Bytes of one ggml block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q8_0 => 34,
            QuantType::Q4_K => 144,
            QuantType::Q6_K => 210,
        }
    }
    /// Values of one ggml block (32, or 256 for the k-quants).
    pub const fn block_values(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            QK
        }
    }
    /// Whether activations meet it as Q8_K (256-value blocks) rather than Q8_0 / Q8_1.
    pub const fn is_k(self) -> bool {
        matches!(self, QuantType::Q4_K | QuantType::Q6_K)
    }
    pub(crate) const fn lines_per_block(self) -> usize {
        match self {
            QuantType::Q4_1 => 4,
            QuantType::Q5_0 | QuantType::Q8_0 => 8,
            QuantType::Q4_K => 36,
            QuantType::Q6_K => 68,
        }
    }
    pub(crate) const fn scales_per_row(self) -> usize {
        match self {
            QuantType::Q4_1 | QuantType::Q4_K => 2,
            QuantType::Q5_0 | QuantType::Q8_0 | QuantType::Q6_K => 1,
        }
    }
}

impl QuantMatrix {
    /// `bytes` = n rows of k/32 ggml blocks, row-major, exactly as stored in a GGUF file.
    pub fn from_ggml_bytes(qtype: QuantType, n: usize, k: usize, bytes: &[u8]) -> Result<Self, QuantError> {
        let bv = qtype.block_values();
        if !k.is_multiple_of(bv) {
            return Err(QuantError::KNotMultipleOfBlock { k, block: bv });
        }
        let nb = k / bv;
        let expected = n.checked_mul(nb).and_then(|b| b.checked_mul(qtype.block_bytes()));
        if expected != Some(bytes.len()) {
            return Err(QuantError::ByteLength { expected, got: bytes.len() });
        }
        let n_tiles = n.div_ceil(TILE);
        let (lpb, spr) = (qtype.lines_per_block(), qtype.scales_per_row());
        let mut qs = vec![Line([0; 64]); n_tiles * nb * lpb];
        let mut scales = vec![0u16; n_tiles * nb * spr * TILE];
        if nb > 0 {
            // Tiles are independent: pack them in parallel (a 30 MB lm_head takes a while).
            qs.par_chunks_mut(nb * lpb).zip(scales.par_chunks_mut(nb * spr * TILE)).enumerate().for_each(
                |(t, (q, s))| {
                    for r in 0..TILE {
                        let row = t * TILE + r;
                        let src =
                            (row < n).then(|| &bytes[row * nb * qtype.block_bytes()..][..nb * qtype.block_bytes()]);
                        pack_row(qtype, src, r, q, s);
                    }
                },
            );
        }
        Ok(Self { qtype, n, k, qs, scales })
    }

    /// Number of output rows n.
    pub fn rows(&self) -> usize {
        self.n
    }
    /// Number of input columns k.
    pub fn cols(&self) -> usize {
        self.k
    }
    pub fn qtype(&self) -> QuantType {
        self.qtype
    }

    /// The original ggml bytes (n rows of k/32 blocks): the inverse of `from_ggml_bytes`.
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let bb = self.qtype.block_bytes();
        let nb = self.k / self.qtype.block_values();
        let mut out = vec![0u8; self.n * nb * bb];
        if nb == 0 {
            return out;
        }
        for (row, dst) in out.chunks_exact_mut(nb * bb).enumerate() {
            let tile = self.tile(row / TILE);
            unpack_row(self.qtype, tile, row % TILE, dst);
        }
        out
    }

    pub(crate) fn n_tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }

    /// Blocks per row.
    pub(crate) fn n_blocks(&self) -> usize {
        self.k / self.qtype.block_values()
    }

    pub(crate) fn tile(&self, t: usize) -> TileView<'_> {
        let nb = self.n_blocks();
        let lines = nb * self.qtype.lines_per_block();
        let scales = nb * self.qtype.scales_per_row() * TILE;
        TileView { qs: &self.qs[t * lines..][..lines], scales: &self.scales[t * scales..][..scales] }
    }
}

/// Writes one ggml row (`None` = padding row) into row `r` of a tile's packed buffers.
fn pack_row(qtype: QuantType, src: Option<&[u8]>, r: usize, qs: &mut [Line], scales: &mut [u16]) {
    let (lpb, spr, bb) = (qtype.lines_per_block(), qtype.scales_per_row(), qtype.block_bytes());
    for (b, (lines, sc)) in qs.chunks_exact_mut(lpb).zip(scales.chunks_exact_mut(spr * TILE)).enumerate() {
        let Some(blk) = src.map(|s| &s[b * bb..][..bb]) else {
            // Padding: zero scales; signed bytes store w = 0 as 0x80 so the offset algebra stays uniform.
            if matches!(qtype, QuantType::Q8_0 | QuantType::Q5_0) {
                lines.iter_mut().for_each(|l| l.0[4 * r..4 * r + 4].fill(0x80));
            }
            continue;
        };
        let f16_at = |at: usize| u16::from_le_bytes([blk[at], blk[at + 1]]);
        match qtype {
            QuantType::Q4_1 => {
                (sc[r], sc[TILE + r]) = (f16_at(0), f16_at(2));
                for (c, line) in lines.iter_mut().enumerate() {
                    line.0[4 * r..4 * r + 4].copy_from_slice(&blk[4 + 4 * c..8 + 4 * c]);
                }
            }
            QuantType::Q8_0 | QuantType::Q5_0 => {
                sc[r] = f16_at(0);
                let w: [i8; QK] =
                    if qtype == QuantType::Q8_0 { std::array::from_fn(|j| blk[2 + j] as i8) } else { q5_0_values(blk) };
                put_bytes(lines, r, |j| w[j] as u8 ^ 0x80);
            }
            QuantType::Q4_K => {
                (sc[r], sc[TILE + r]) = (f16_at(0), f16_at(2));
                put_bytes(&mut lines[..32], r, |j| blk[16 + j]);
                let (scl, mn) = k4_scales(blk[4..16].try_into().expect("12 bytes"));
                for s in 0..8 {
                    put_meta(&mut lines[32..], 16 * s + r, scl[s]);
                    put_meta(&mut lines[32..], 128 + 16 * s + r, mn[s]);
                }
            }
            QuantType::Q6_K => {
                sc[r] = f16_at(208);
                let q = q6_k_values(blk);
                put_bytes(&mut lines[..64], r, |j| q[j]);
                for s in 0..16 {
                    put_meta(&mut lines[64..], 16 * s + r, blk[192 + s]);
                }
            }
        }
    }
}

/// Reads row `r` of a tile back into ggml blocks (`dst`: k / block_values blocks).
fn unpack_row(qtype: QuantType, tile: TileView<'_>, r: usize, dst: &mut [u8]) {
    let (lpb, spr, bb) = (qtype.lines_per_block(), qtype.scales_per_row(), qtype.block_bytes());
    let blocks = tile.qs.chunks_exact(lpb).zip(tile.scales.chunks_exact(spr * TILE));
    for ((lines, sc), blk) in blocks.zip(dst.chunks_exact_mut(bb)) {
        match qtype {
            QuantType::Q4_1 => {
                blk[0..2].copy_from_slice(&sc[r].to_le_bytes());
                blk[2..4].copy_from_slice(&sc[TILE + r].to_le_bytes());
                get_bytes(lines, r, &mut blk[4..20]);
            }
            QuantType::Q8_0 => {
                blk[0..2].copy_from_slice(&sc[r].to_le_bytes());
                get_bytes(lines, r, &mut blk[2..34]);
                blk[2..34].iter_mut().for_each(|b| *b ^= 0x80);
            }
            QuantType::Q5_0 => {
                let mut w = [0u8; QK];
                get_bytes(lines, r, &mut w);
                blk.fill(0);
                blk[0..2].copy_from_slice(&sc[r].to_le_bytes());
                for (j, &b) in w.iter().enumerate() {
                    // Stored as (q - 16) ^ 0x80; q is 0..31: low 4 bits in a nibble, bit 4 in qh.
                    let q = ((b ^ 0x80) as i8 as i32 + 16) as u8;
                    blk[6 + j % 16] |= (q & 0xF) << (4 * (j / 16));
                    blk[2 + j / 8] |= (q >> 4) << (j % 8);
                }
            }
            QuantType::Q4_K => {
                blk[0..2].copy_from_slice(&sc[r].to_le_bytes());
                blk[2..4].copy_from_slice(&sc[TILE + r].to_le_bytes());
                get_bytes(&lines[..32], r, &mut blk[16..144]);
                let scl = std::array::from_fn(|s| get_meta(&lines[32..], 16 * s + r));
                let mn = std::array::from_fn(|s| get_meta(&lines[32..], 128 + 16 * s + r));
                blk[4..16].copy_from_slice(&k4_scales_pack(&scl, &mn));
            }
            QuantType::Q6_K => {
                let mut q = [0u8; QK_K];
                get_bytes(&lines[..64], r, &mut q);
                blk.fill(0);
                for (e, &v) in q.iter().enumerate() {
                    // ggml's q6_K order: 128-halves h, within them 32-runs t of ql nibble / qh pair.
                    let (h, t, l) = (e / 128, (e % 128) / 32, e % 32);
                    blk[64 * h + 32 * (t % 2) + l] |= (v & 0xF) << (4 * (t / 2));
                    blk[128 + 32 * h + l] |= (v >> 4) << (2 * t);
                }
                for s in 0..16 {
                    blk[192 + s] = get_meta(&lines[64..], 16 * s + r);
                }
                blk[208..210].copy_from_slice(&sc[r].to_le_bytes());
            }
        }
    }
}

/// Value j of a block goes to line j / 4, bytes `4r + j % 4` (the `[16 rows][4 bytes]` lines).
fn put_bytes(lines: &mut [Line], r: usize, val: impl Fn(usize) -> u8) {
    for (c, line) in lines.iter_mut().enumerate() {
        for i in 0..4 {
            line.0[4 * r + i] = val(4 * c + i);
        }
    }
}

fn get_bytes(lines: &[Line], r: usize, dst: &mut [u8]) {
    for (c, d) in dst.chunks_exact_mut(4).enumerate() {
        d.copy_from_slice(&lines[c].0[4 * r..4 * r + 4]);
    }
}

/// Byte `at` of the table spread over consecutive lines.
fn put_meta(lines: &mut [Line], at: usize, v: u8) {
    lines[at / 64].0[at % 64] = v;
}

fn get_meta(lines: &[Line], at: usize) -> u8 {
    lines[at / 64].0[at % 64]
}

/// The 32 signed weights `q - 16` of a ggml Q5_0 block (`d: f16, qh: u32, qs: [u8; 16]`):
/// value j < 16 is the low nibble of qs[j], value 16 + j its high nibble; bit j of qh is bit 4.
pub(crate) fn q5_0_values(blk: &[u8]) -> [i8; QK] {
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    std::array::from_fn(|j| {
        let nib = (blk[6 + j % 16] >> (4 * (j / 16))) & 0xF;
        (nib as i32 | (((qh >> j) & 1) << 4) as i32) as i8 - 16
    })
}

/// The 256 unsigned 6-bit values of a ggml Q6_K block (`ql: [u8; 128], qh: [u8; 64],
/// scales: [i8; 16], d: f16`), as ggml's `dequantize_row_q6_K` orders them (before the -32).
pub(crate) fn q6_k_values(blk: &[u8]) -> [u8; QK_K] {
    std::array::from_fn(|e| {
        let (h, t, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = (blk[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 0xF;
        let high = (blk[128 + 32 * h + l] >> (2 * t)) & 3;
        low | (high << 4)
    })
}

/// Q4_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins (ggml's `get_scale_min_k4`).
pub(crate) fn k4_scales(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let sc = std::array::from_fn(|j| if j < 4 { q[j] & 63 } else { (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4) });
    let mn = std::array::from_fn(|j| if j < 4 { q[j + 4] & 63 } else { (q[j + 4] >> 4) | ((q[j] >> 6) << 4) });
    (sc, mn)
}

/// The inverse of `k4_scales` (all 96 bits are used, so it is a bijection).
fn k4_scales_pack(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    q
}
