//! The memory store's one backend interface over its two backends: qdrant-edge in process
//! ([`EmbeddedBackend`], the default) and a Qdrant server or cluster ([`RemoteBackend`],
//! `--qdrant-url`). Owns only the dispatch: both take and return the same types with the same
//! semantics (durable on return, filters as [`Cond`]s), so the store never asks which one it has.
//! Must not: hold logic of its own. Every method blocks; async callers use `spawn_blocking`.

use super::embedded::{Cond, EmbeddedBackend, Hit, NewPoint};
use super::remote::RemoteBackend;
use super::MemoryError;
use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::SparseVector;
use serde_json::{Map, Value};

// One per store, inside the store's `Arc`: boxing a variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Backend {
    Embedded(EmbeddedBackend),
    Remote(RemoteBackend),
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Backend::Embedded($b) => $call,
            Backend::Remote($b) => $call,
        }
    };
}

impl Backend {
    /// Dimension of the dense vectors stored.
    pub fn dim(&self) -> usize {
        each!(self, b => b.dim())
    }

    pub fn upsert(&self, points: Vec<NewPoint>) -> Result<(), MemoryError> {
        each!(self, b => b.upsert(points))
    }

    pub fn overwrite_payload(&self, id: Uuid, payload: Map<String, Value>) -> Result<(), MemoryError> {
        each!(self, b => b.overwrite_payload(id, payload))
    }

    pub fn delete(&self, ids: &[Uuid]) -> Result<(), MemoryError> {
        each!(self, b => b.delete(ids))
    }

    pub fn delete_where(&self, conds: &[Cond]) -> Result<(), MemoryError> {
        each!(self, b => b.delete_where(conds))
    }

    pub fn retrieve(&self, ids: &[Uuid]) -> Result<Vec<Hit>, MemoryError> {
        each!(self, b => b.retrieve(ids))
    }

    pub fn scroll(
        &self,
        conds: &[Cond],
        from: Option<Uuid>,
        limit: usize,
    ) -> Result<(Vec<Hit>, Option<Uuid>), MemoryError> {
        each!(self, b => b.scroll(conds, from, limit))
    }

    pub fn search(
        &self,
        vector: Vec<f32>,
        conds: &[Cond],
        limit: usize,
        threshold: Option<f32>,
    ) -> Result<Vec<Hit>, MemoryError> {
        each!(self, b => b.search(vector, conds, limit, threshold))
    }

    pub fn search_sparse(&self, terms: SparseVector, conds: &[Cond], limit: usize) -> Result<Vec<Hit>, MemoryError> {
        each!(self, b => b.search_sparse(terms, conds, limit))
    }

    /// Builds indexes where the engine plans them (embedded); a Qdrant server does this itself.
    pub fn optimize(&self) -> Result<bool, MemoryError> {
        match self {
            Backend::Embedded(b) => b.optimize(),
            Backend::Remote(_) => Ok(false),
        }
    }
}
