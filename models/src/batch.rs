//! The flattened batch one forward pass computes: the rows of every scheduled sequence laid end
//! to end, with where each row's K/V goes and which keys it may see. Built by the engine's runner;
//! models only read it.

use crate::error::{ModelError, Result};
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
    pub fn push_seq(&mut self, tokens: &[u32], start: usize, table: &[u32], block_size: usize, needs_logits: bool) -> Result<()> {
        let end = start + tokens.len();
        if tokens.is_empty() || table.len() * block_size < end {
            return Err(ModelError::InvalidBatch(format!(
                "{} tokens at {start} need {} slots, table has {}",
                tokens.len(),
                end,
                table.len() * block_size
            )));
        }
        let t = self.block_tables.len() as u32;
        self.block_tables.push(table.to_vec());
        for (i, &tok) in tokens.iter().enumerate() {
            let pos = start + i;
            self.token_ids.push(tok);
            self.positions.push(pos as u32);
            self.slots.push(table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
            self.rows.push(TokenCtx { table: t, ctx_len: pos as u32 + 1 });
        }
        if needs_logits {
            self.logits_rows.push(self.token_ids.len() as u32 - 1);
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
