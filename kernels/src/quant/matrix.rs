//! `QuantMatrix`: ggml Q4_1 / Q8_0 weight blocks repacked into row tiles for the VNNI kernels.
//!
//! Owns the packed layout and the only code that reads or writes it byte by byte (packing at
//! construction, unpacking back to ggml bytes for the reference and for tests). It does no math.
//!
//! Packed layout. Weight rows (outputs) are grouped in tiles of `TILE` = 16 rows, the last tile
//! padded with zero-scale rows. For tile `t` and 32-wide block `b` of the k axis:
//! - `qs` holds `lines_per_block` 64-byte lines; line `c` is `[16 rows][4 bytes]`, so one zmm
//!   load feeds one `vpdpbusd` that advances all 16 rows by 4 k-values:
//!   - Q4_1 (4 lines): row r's bytes are ggml `qs[4c..4c+4]` untouched; their low nibbles are
//!     k = 4c..4c+4 and their high nibbles k = 16+4c..16+4c+4 (ggml's nibble order).
//!   - Q8_0 (8 lines): row r's bytes are ggml `qs[4c..4c+4]` xor 0x80, i.e. `w + 128` as u8, so
//!     they sit on the unsigned side of `vpdpbusd` (see `avx512.rs` for the correction).
//! - `scales` holds the f16 bits `[scales_per_row][16 rows]`: d, then (Q4_1) m.
//!
//! Tiles are contiguous (`[tile][block][line]`), so one tile's weights stream sequentially.

use rayon::prelude::*;

use super::{QuantError, QuantType, QK, TILE};

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
    /// Bytes of one 32-value ggml block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_1 => 20,
            QuantType::Q8_0 => 34,
        }
    }
    pub(crate) const fn lines_per_block(self) -> usize {
        match self {
            QuantType::Q4_1 => 4,
            QuantType::Q8_0 => 8,
        }
    }
    pub(crate) const fn scales_per_row(self) -> usize {
        match self {
            QuantType::Q4_1 => 2,
            QuantType::Q8_0 => 1,
        }
    }
}

impl QuantMatrix {
    /// `bytes` = n rows of k/32 ggml blocks, row-major, exactly as stored in a GGUF file.
    pub fn from_ggml_bytes(qtype: QuantType, n: usize, k: usize, bytes: &[u8]) -> Result<Self, QuantError> {
        if !k.is_multiple_of(QK) {
            return Err(QuantError::KNotMultipleOf32 { k });
        }
        let nb = k / QK;
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
            qs.par_chunks_mut(nb * lpb)
                .zip(scales.par_chunks_mut(nb * spr * TILE))
                .enumerate()
                .for_each(|(t, (q, s))| {
                    for r in 0..TILE {
                        let row = t * TILE + r;
                        let src = (row < n).then(|| &bytes[row * nb * qtype.block_bytes()..][..nb * qtype.block_bytes()]);
                        pack_row(qtype, src, r, q, s);
                    }
                });
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
        let nb = self.k / QK;
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

    pub(crate) fn tile(&self, t: usize) -> TileView<'_> {
        let nb = self.k / QK;
        let lines = nb * self.qtype.lines_per_block();
        let scales = nb * self.qtype.scales_per_row() * TILE;
        TileView { qs: &self.qs[t * lines..][..lines], scales: &self.scales[t * scales..][..scales] }
    }
}

/// Writes one ggml row (`None` = padding row) into row `r` of a tile's packed buffers.
fn pack_row(qtype: QuantType, src: Option<&[u8]>, r: usize, qs: &mut [Line], scales: &mut [u16]) {
    let (lpb, spr, bb) = (qtype.lines_per_block(), qtype.scales_per_row(), qtype.block_bytes());
    for (b, (lines, sc)) in qs.chunks_exact_mut(lpb).zip(scales.chunks_exact_mut(spr * TILE)).enumerate() {
        let blk = src.map(|s| &s[b * bb..][..bb]);
        match (qtype, blk) {
            // Padding: zero scales; Q8_0 stores w = 0 as 0x80 so the offset algebra stays uniform.
            (QuantType::Q4_1, None) => {}
            (QuantType::Q8_0, None) => lines.iter_mut().for_each(|l| l.0[4 * r..4 * r + 4].fill(0x80)),
            (QuantType::Q4_1, Some(blk)) => {
                sc[r] = u16::from_le_bytes([blk[0], blk[1]]);
                sc[TILE + r] = u16::from_le_bytes([blk[2], blk[3]]);
                for (c, line) in lines.iter_mut().enumerate() {
                    line.0[4 * r..4 * r + 4].copy_from_slice(&blk[4 + 4 * c..8 + 4 * c]);
                }
            }
            (QuantType::Q8_0, Some(blk)) => {
                sc[r] = u16::from_le_bytes([blk[0], blk[1]]);
                for (c, line) in lines.iter_mut().enumerate() {
                    for j in 0..4 {
                        line.0[4 * r + j] = blk[2 + 4 * c + j] ^ 0x80;
                    }
                }
            }
        }
    }
}

/// Reads row `r` of a tile back into ggml blocks (`dst`: k/32 blocks).
fn unpack_row(qtype: QuantType, tile: TileView<'_>, r: usize, dst: &mut [u8]) {
    let (lpb, spr, bb) = (qtype.lines_per_block(), qtype.scales_per_row(), qtype.block_bytes());
    let blocks = tile.qs.chunks_exact(lpb).zip(tile.scales.chunks_exact(spr * TILE));
    for ((lines, sc), blk) in blocks.zip(dst.chunks_exact_mut(bb)) {
        match qtype {
            QuantType::Q4_1 => {
                blk[0..2].copy_from_slice(&sc[r].to_le_bytes());
                blk[2..4].copy_from_slice(&sc[TILE + r].to_le_bytes());
                for (c, line) in lines.iter().enumerate() {
                    blk[4 + 4 * c..8 + 4 * c].copy_from_slice(&line.0[4 * r..4 * r + 4]);
                }
            }
            QuantType::Q8_0 => {
                blk[0..2].copy_from_slice(&sc[r].to_le_bytes());
                for (c, line) in lines.iter().enumerate() {
                    for j in 0..4 {
                        blk[2 + 4 * c + j] = line.0[4 * r + j] ^ 0x80;
                    }
                }
            }
        }
    }
}
