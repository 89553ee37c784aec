//! Token embedding lookup. Quantized tables are dequantized row by row on lookup (a 150k-token
//! vocabulary in f32 would cost half a gigabyte), float tables are gathered directly.

use crate::error::Result;
use crate::weights::Weight;
use candle_core::Tensor;

pub struct Embedding {
    table: Weight,
}

impl Embedding {
    pub fn new(table: Weight) -> Self {
        Self { table }
    }

    /// `ids`: `[rows]` u32 -> `[rows, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.table {
            Weight::Quant(q) => q.embedding(ids)?,
            Weight::Float(t) => t.index_select(ids, 0)?,
        })
    }
}
