//! File batches (OpenAI's `vector_stores.file_batches`): several files attached in one request,
//! each as [`VectorStores::attach`] does it, before the answer (so the batch is `completed` on
//! the first poll). A file that cannot be ingested (not text) counts as `failed` in the batch
//! instead of failing it. The batch records live in the store's own record (`batches`), small
//! and read with it. Must not: ingest differently from a single attach.

use super::{invalid, new_id, now_ms, FileCounts, Result, VectorStores, VsError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most files in one batch (OpenAI's limit).
pub const MAX_BATCH_FILES: usize = 500;

/// One file of a batch: its id and, when given, its own attributes and strategy.
#[derive(Debug, Clone, Default)]
pub struct BatchFile {
    pub file_id: String,
    pub attributes: Map<String, Value>,
    pub chunking_strategy: Option<Value>,
}

/// A finished batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub vector_store_id: String,
    pub created_at: i64,
    pub file_ids: Vec<String>,
    pub completed: u64,
    pub failed: u64,
}

impl Batch {
    pub fn file_counts(&self) -> FileCounts {
        let total = self.completed + self.failed;
        FileCounts { completed: self.completed, failed: self.failed, total, ..FileCounts::default() }
    }
}

impl VectorStores {
    /// Attaches every file (all must exist: an unknown one is `NotFound` before anything is done).
    pub async fn create_batch(&self, vs: &str, files: Vec<BatchFile>) -> Result<Batch> {
        self.memory()?;
        self.row(vs).await?;
        if files.is_empty() || files.len() > MAX_BATCH_FILES {
            return Err(invalid("file_ids", format!("a batch holds 1 to {MAX_BATCH_FILES} files")));
        }
        for f in &files {
            self.file(&f.file_id).await?;
        }
        let mut batch = Batch {
            id: new_id("vsfb_"),
            vector_store_id: vs.to_string(),
            created_at: now_ms(),
            file_ids: files.iter().map(|f| f.file_id.clone()).collect(),
            completed: 0,
            failed: 0,
        };
        for f in files {
            match self.attach(vs, &f.file_id, f.attributes, f.chunking_strategy.as_ref()).await {
                Ok(_) => batch.completed += 1,
                // Not text (or bad attributes): this file fails, the batch goes on.
                Err(VsError::Invalid { .. }) => batch.failed += 1,
                Err(e) => return Err(e),
            }
        }
        // Re-read: the attaches above rewrote the record (`last_active_at`).
        let mut row = self.row(vs).await?;
        let value = serde_json::to_value(&batch).map_err(|e| VsError::Backend(e.to_string()))?;
        if !row.body["batches"].is_object() {
            row.body["batches"] = Value::Object(Map::new());
        }
        row.body["batches"][&batch.id] = value;
        self.store.put_vector_store(&row).await?;
        Ok(batch)
    }

    pub async fn batch(&self, vs: &str, id: &str) -> Result<Batch> {
        let row = self.row(vs).await?;
        let found = row.body["batches"].get(id).cloned();
        let found = found.ok_or_else(|| VsError::NotFound(format!("No file batch found with id '{id}' in '{vs}'.")))?;
        serde_json::from_value(found).map_err(|e| VsError::Backend(format!("batch {id} does not parse: {e}")))
    }
}
