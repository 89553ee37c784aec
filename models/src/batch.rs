//! The flattened batch one forward pass computes: the rows of every scheduled sequence laid end
//! to end, with where each row's K/V goes and which keys it may see. Built by the engine's runner;
//! models only read it.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use kiln_kernels::TokenCtx;

#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    /// `[rows]` input token of each row.
    pub token_ids: Vec<u32>,
    /// `[rows]` absolute position of each row in its sequence.
    pub positions: Vec<u32>,
    /// `[rows]` KV-cache slot the row's K/V are written to.
    pub slots: Vec<u32>,
    /// `[rows]` which block table the row reads and how many positions it attends to.
    pub rows: Vec<TokenCtx>,
    /// One block table per sequence in the batch.
    pub block_tables: Vec<Vec<u32>>,
    /// Rows whose logits are returned, in output order.
    pub logits_rows: Vec<u32>,
}

impl ForwardBatch {
    /// Appends `tokens` of one sequence, the first at position `start`, reading `table`.
    /// When `needs_logits`, the last row's logits are returned.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        start: usize,
        table: &[u32],
        block_size: usize,
        needs_logits: bool,
    ) -> Result<()> {
        let end = start.checked_add(tokens.len()).filter(|&e| e <= u32::MAX as usize);
        let Some(end) = end else {
            return Err(ModelError::InvalidBatch(format!(
                "{} tokens at position {start} run past position u32::MAX",
                tokens.len()
            )));
        };
        let capacity = table.len().saturating_mul(block_size);
        if tokens.is_empty() || capacity < end {
            return Err(ModelError::InvalidBatch(format!(
                "{} tokens at {start} need {end} slots, table has {capacity}",
                tokens.len()
            )));
        }
        // Checked: a wild block id must be an error here, not an overflow panic.
        let slot =
            |pos: usize| (table[pos / block_size] as usize).checked_mul(block_size).map(|s| s + pos % block_size);
        let slots = (start..end).map(|p| slot(p).and_then(|s| u32::try_from(s).ok())).collect::<Option<Vec<u32>>>();
        let Some(slots) = slots else {
            let bad = (start..end).map(|p| table[p / block_size]).max().unwrap_or(0);
            return Err(ModelError::InvalidBatch(format!(
                "block {bad} x block size {block_size} overflows a u32 slot"
            )));
        };
        let t = self.block_tables.len() as u32;
        self.block_tables.push(table.to_vec());
        for ((pos, &tok), slot) in (start..).zip(tokens).zip(slots) {
            self.token_ids.push(tok);
            self.positions.push(pos as u32);
            self.slots.push(slot);
            self.rows.push(TokenCtx { table: t, ctx_len: pos as u32 + 1 });
        }
        if needs_logits {
            self.logits_rows.push(self.token_ids.len() as u32 - 1);
        }
        Ok(())
    }

    /// Checks every index the forward pass follows against the model and the cache, so a bad
    /// batch is an `InvalidBatch` naming the row and value rather than a panic in a kernel.
    pub fn validate(&self, cfg: &ModelConfig, cache: &PagedKvCache) -> Result<()> {
        let bad = |msg: String| Err(ModelError::InvalidBatch(msg));
        let rows = self.num_rows();
        if rows == 0 {
            return bad("empty batch".into());
        }
        if (self.positions.len(), self.slots.len(), self.rows.len()) != (rows, rows, rows) {
            let (p, s, r) = (self.positions.len(), self.slots.len(), self.rows.len());
            return bad(format!("{rows} token ids but {p} positions, {s} slots and {r} row contexts"));
        }
        let (layers, row) = (cache.num_layers(), cache.kv_row());
        if (layers, row) != (cfg.num_layers, cfg.num_kv_heads * cfg.head_dim) {
            let want = (cfg.num_layers, cfg.num_kv_heads * cfg.head_dim);
            return bad(format!(
                "KV cache has {layers} layers of {row} values per token, the model needs {} of {}",
                want.0, want.1
            ));
        }
        let (blocks, bs) = (cache.num_blocks(), cache.block_size());
        for (t, table) in self.block_tables.iter().enumerate() {
            if let Some(b) = table.iter().find(|&&b| b as usize >= blocks) {
                return bad(format!("block table {t}: block {b} is past the cache's {blocks} blocks"));
            }
        }
        for r in 0..rows {
            let (tok, pos, slot, ctx) = (self.token_ids[r], self.positions[r], self.slots[r], self.rows[r]);
            if tok as usize >= cfg.vocab_size {
                return bad(format!("row {r}: token id {tok} is past the vocabulary of {}", cfg.vocab_size));
            }
            if pos as usize >= cfg.max_position_embeddings {
                return bad(format!("row {r}: position {pos} is past the context of {}", cfg.max_position_embeddings));
            }
            if slot as usize >= blocks * bs {
                return bad(format!("row {r}: slot {slot} is past the cache's {} slots", blocks * bs));
            }
            let Some(table) = self.block_tables.get(ctx.table as usize) else {
                return bad(format!(
                    "row {r}: reads block table {}, the batch has {}",
                    ctx.table,
                    self.block_tables.len()
                ));
            };
            if ctx.ctx_len == 0 || ctx.ctx_len as usize > table.len() * bs {
                return bad(format!(
                    "row {r}: attends to {} positions, its block table holds {}",
                    ctx.ctx_len,
                    table.len() * bs
                ));
            }
        }
        if let Some(l) = self.logits_rows.iter().find(|&&l| l as usize >= rows) {
            return bad(format!("logits row {l} of a {rows}-row batch"));
        }
        Ok(())
    }

    pub fn num_rows(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }
}
