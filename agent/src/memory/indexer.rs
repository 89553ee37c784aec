//! Background indexing of the memory store. qdrant-edge writes into plain (brute-force) segments;
//! its optimizers give segments past the indexing threshold an HNSW index and merge small ones,
//! but only when asked. After every [`INDEX_EVERY`] points written, a pass runs on a blocking
//! thread, one at a time; a write never waits for one to start (it may wait behind a running
//! pass: see `EmbeddedBackend::optimize`). Must not: run on the async workers, or fail a write.

use super::{Inner, MemoryError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Mutex;

/// Points written between two background passes.
pub const INDEX_EVERY: usize = 20_000;

#[derive(Debug, Default)]
pub struct Indexer {
    pending: AtomicUsize,
    /// Held for the length of a pass.
    pass: Arc<Mutex<()>>,
}

impl Indexer {
    /// Counts `n` written points; past [`INDEX_EVERY`], starts a pass on `backend` unless one
    /// runs (the count then waits for the next write).
    pub(super) fn wrote(&self, n: usize, target: Arc<Inner>) {
        if self.pending.fetch_add(n, Ordering::Relaxed) + n < INDEX_EVERY {
            return;
        }
        let Ok(guard) = Arc::clone(&self.pass).try_lock_owned() else { return };
        self.pending.store(0, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let _pass = guard;
            if let Err(e) = pass(&target.backend) {
                tracing::warn!(error = %e, "memory indexing pass failed; searches stay exact, only slower");
            }
        });
    }

    /// Runs a pass now, after any running one.
    pub(super) async fn run_now(&self, target: Arc<Inner>) -> Result<(), MemoryError> {
        let _pass = self.pass.lock().await;
        self.pending.store(0, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || pass(&target.backend))
            .await
            .map_err(|e| MemoryError::Backend(format!("indexing task failed: {e}")))?
    }
}

fn pass(backend: &super::backend::Backend) -> Result<(), MemoryError> {
    let t = Instant::now();
    if backend.optimize()? {
        tracing::info!(ms = t.elapsed().as_millis() as u64, "memory store indexed (HNSW)");
    }
    Ok(())
}
