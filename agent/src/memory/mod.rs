//! Agent memory: scoped, searchable facts that outlive a conversation. Owns the memory types,
//! validation, batch embedding through the engine's [`EmbedHandle`] (one queued request per
//! batch, never one per memory), TTL, and keyed-fact conflict resolution (see [`conflict`]).
//! Storage is one [`Backend`]: qdrant-edge in process ([`embedded`], the default) or a Qdrant
//! server ([`remote`]). Must not: know HTTP, call an LLM on
//! the write path, or issue a read/delete without its scope condition.

pub mod backend;
pub mod conflict;
pub mod embedded;
pub mod hybrid;
mod indexer;
mod record;
pub mod remote;
pub mod scope;

pub use backend::Backend;
pub use conflict::{resolve, Resolution};
pub use embedded::EmbeddedBackend;
pub use hybrid::SearchMode;
pub use remote::{RemoteBackend, RemoteConfig};
pub use scope::Scope;

use conflict::KeyLocks;
use embedded::{Cond, Hit};
use indexer::Indexer;
use kiln_inference::embed::{EmbedHandle, EmbedInput, EmbedOptions};
use kiln_inference::EngineError;
use qdrant_edge::external::uuid::Uuid;
use record::now_ms;
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;

/// Inputs per queued embedding request: large enough to fill the worker's batches, small enough
/// to stay under its per-request input cap (2048 by default).
const EMBED_CHUNK: usize = 512;
/// Largest `top_k` / page a caller may ask for.
pub const MAX_LIMIT: usize = 1000;
/// Longest `key` (subject + attribute).
const MAX_KEY_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0}")]
    NotFound(String),
    #[error("invalid `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
    /// The embedding model or the store cannot serve now (overloaded, shutting down).
    #[error("memory unavailable: {0}")]
    Unavailable(String),
    #[error("memory backend error: {0}")]
    Backend(String),
}

/// One memory to write.
#[derive(Debug, Clone, Default)]
pub struct NewMemory {
    pub text: String,
    /// A JSON object; its top-level string/integer/bool fields can be filtered on exactly.
    pub metadata: Map<String, Value>,
    /// Subject + attribute of a fact; one live fact per key and scope (conflicts resolve).
    pub key: Option<String>,
    pub ttl_seconds: Option<u64>,
    /// The writing agent's priority; higher wins a key conflict.
    pub priority: i64,
}

/// A version of a keyed fact that lost (or was replaced), kept so nothing is silently lost.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    pub text: String,
    pub metadata: Map<String, Value>,
    pub priority: i64,
    /// When that version was written (Unix milliseconds).
    pub written_at_ms: i64,
    /// `superseded` (a later write won), `rejected` (it lost on arrival) or `updated` (PATCH).
    pub outcome: String,
}

/// A stored memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    pub id: String,
    pub scope: String,
    pub text: String,
    pub metadata: Map<String, Value>,
    pub key: Option<String>,
    pub priority: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub history: Vec<HistoryEntry>,
}

/// A search request inside one scope.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub query: String,
    pub top_k: usize,
    pub score_threshold: Option<f32>,
    /// Exact matches on top-level metadata fields, all of which must hold.
    pub filter: Map<String, Value>,
    pub mode: SearchMode,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoredMemory {
    pub memory: Memory,
    /// Cosine similarity to the query (dense), BM25 (keyword) or the scaled fused rank (hybrid).
    pub score: f32,
}

/// One page of a scope, oldest first (ids are time-ordered UUIDv7).
#[derive(Debug, Clone)]
pub struct MemoryPage {
    pub data: Vec<Memory>,
    /// Pass as `after` for the next page; `None` on the last.
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// A PATCH: fields left `None` keep their value.
#[derive(Debug, Clone, Default)]
pub struct MemoryPatch {
    pub text: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

/// Handle to the memory store; cheap to clone.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    embedder: EmbedHandle,
    locks: KeyLocks,
    indexer: Indexer,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("backend", &self.inner.backend).finish()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> MemoryError {
    MemoryError::Invalid { field, message: message.into() }
}

fn engine_error(e: EngineError) -> MemoryError {
    match e {
        EngineError::InvalidParam { message, .. } => invalid("text", message),
        EngineError::Overloaded => MemoryError::Unavailable("the embedding queue is full; retry".into()),
        other => MemoryError::Unavailable(format!("embedding failed: {other}")),
    }
}

/// Runs blocking backend work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MemoryError> + Send + 'static,
) -> Result<T, MemoryError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| MemoryError::Backend(format!("memory task failed: {e}")))?
}

fn parse_id(id: &str) -> Result<Uuid, MemoryError> {
    Uuid::parse_str(id).map_err(|_| MemoryError::NotFound(format!("no memory `{id}`")))
}

/// Conditions every read in `scope` carries: the scope itself, and "not expired".
fn live(scope: &Scope, now: i64) -> Vec<Cond> {
    vec![Cond::Eq("scope".into(), Value::String(scope.to_string())), Cond::Gt("expires_at".into(), now)]
}

impl MemoryStore {
    /// Opens (or creates) the embedded store in `dir` for `embedder`'s vectors.
    pub async fn open_embedded(dir: &Path, embedder: EmbedHandle) -> Result<Self, MemoryError> {
        let (dir, dim) = (dir.to_path_buf(), embedder.info().dim);
        let backend = blocking(move || EmbeddedBackend::open(&dir, dim)).await?;
        Ok(Self::with_backend(Backend::Embedded(backend), embedder))
    }

    /// Opens (or creates) the collection `config.collection` on the Qdrant server at
    /// `config.url`. A server that does not answer yet is not an error: the store opens and its
    /// calls return [`MemoryError::Unavailable`] until it does. A collection of another shape is.
    pub async fn open_remote(config: RemoteConfig, embedder: EmbedHandle) -> Result<Self, MemoryError> {
        let backend = RemoteBackend::connect(config, embedder.info().dim).await?;
        Ok(Self::with_backend(Backend::Remote(backend), embedder))
    }

    fn with_backend(backend: Backend, embedder: EmbedHandle) -> Self {
        let indexer = Indexer::default();
        Self { inner: Arc::new(Inner { backend, embedder, locks: KeyLocks::default(), indexer }) }
    }

    /// Runs an indexing pass now (after any running one): HNSW for the segments that have
    /// grown past the threshold. Writes start passes by themselves; benchmarks call this to
    /// measure search on an indexed store.
    pub async fn index_now(&self) -> Result<(), MemoryError> {
        self.inner.indexer.run_now(self.inner.clone()).await
    }

    fn wrote(&self, n: usize) {
        self.inner.indexer.wrote(n, self.inner.clone());
    }

    pub fn embedder(&self) -> &EmbedHandle {
        &self.inner.embedder
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// Embeds `texts` as one batch: all chunks are queued before any is awaited, so the worker
    /// packs them into full forward passes. Same options as `/v1/embeddings`' defaults.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, MemoryError> {
        let embedder = self.inner.embedder.clone();
        let pending = blocking(move || {
            let opts = EmbedOptions::default();
            texts
                .chunks(EMBED_CHUNK)
                .map(|c| embedder.submit(c.iter().cloned().map(EmbedInput::Text).collect(), &opts))
                .collect::<Result<Vec<_>, _>>()
                .map_err(engine_error)
        })
        .await?;
        let mut out = Vec::new();
        for p in pending {
            out.extend(p.recv().await.map_err(engine_error)?.into_iter().map(|e| e.vector));
        }
        Ok(out)
    }

    /// Writes `items` to `scope`; returns each as stored once it is durable. Unkeyed memories go
    /// in one upsert; keyed ones resolve against the scope's live fact for their key.
    pub async fn add(&self, scope: &Scope, items: Vec<NewMemory>) -> Result<Vec<Memory>, MemoryError> {
        for item in &items {
            validate_new(item)?;
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let vectors = self.embed(items.iter().map(|i| i.text.clone()).collect()).await?;
        let mut out = vec![None; items.len()];
        let mut plain = Vec::new();
        for (i, (item, vector)) in items.into_iter().zip(vectors).enumerate() {
            match item.key.clone() {
                Some(key) => out[i] = Some(self.add_keyed(scope, &key, item, vector).await?),
                None => plain.push((i, record::fresh(scope, item, now_ms()), vector)),
            }
        }
        let points = plain.iter().map(|(_, m, v)| record::point(m, v.clone())).collect::<Result<Vec<_>, _>>()?;
        let (inner, written) = (self.inner.clone(), out.len());
        blocking(move || inner.backend.upsert(points)).await?;
        self.wrote(written);
        for (i, m, _) in plain {
            out[i] = Some(m);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// One keyed write under the (scope, key) lock, so concurrent writers serialize and the
    /// outcome depends only on (priority, arrival order).
    async fn add_keyed(
        &self,
        scope: &Scope,
        key: &str,
        item: NewMemory,
        vector: Vec<f32>,
    ) -> Result<Memory, MemoryError> {
        let _guard = self.inner.locks.lock(&scope.to_string(), key).await;
        let (inner, scope, key) = (self.inner.clone(), scope.clone(), key.to_string());
        blocking(move || {
            let conds =
                [Cond::Eq("scope".into(), Value::String(scope.to_string())), Cond::Eq("key".into(), key.into())];
            let (found, _) = inner.backend.scroll(&conds, None, 2)?;
            // Taken under the lock: a later arrival never carries an earlier timestamp.
            let now = found.iter().filter_map(|h| record::memory(h).ok()).fold(now_ms(), |t, m| t.max(m.updated_at_ms));
            let existing = found.first().map(record::memory).transpose()?.filter(|m| !record::expired(m, now_ms()));
            let incoming = record::fresh(&scope, item, now);
            let stored = match existing {
                None => {
                    // An expired fact for this key is gone for readers; drop it with its vector.
                    let stale: Vec<Uuid> = found.iter().map(|h| h.id).collect();
                    if !stale.is_empty() {
                        inner.backend.delete(&stale)?;
                    }
                    inner.backend.upsert(vec![record::point(&incoming, vector)?])?;
                    incoming
                }
                Some(old) => match resolve(&old, &incoming) {
                    Resolution::Incoming(m) => {
                        inner.backend.upsert(vec![record::point(&m, vector)?])?;
                        m
                    }
                    Resolution::Existing(m) => {
                        inner.backend.overwrite_payload(parse_id(&m.id)?, record::payload(&m))?;
                        m
                    }
                },
            };
            Ok(stored)
        })
        .await
    }

    /// The `top_k` memories of `scope` best matching `q.query` under `q.mode`, best first.
    pub async fn search(&self, scope: &Scope, q: SearchQuery) -> Result<Vec<ScoredMemory>, MemoryError> {
        if q.query.trim().is_empty() {
            return Err(invalid("query", "query must not be empty"));
        }
        if q.top_k == 0 || q.top_k > MAX_LIMIT {
            return Err(invalid("top_k", format!("top_k must be between 1 and {MAX_LIMIT}")));
        }
        let mut conds = live(scope, now_ms());
        for (k, v) in q.filter {
            validate_field_name(&k)?;
            conds.push(Cond::Eq(format!("metadata.{k}"), v));
        }
        self.ensure_scope(scope).await?;
        let (mode, top_k, threshold) = (q.mode, q.top_k, q.score_threshold);
        let vector = match mode {
            SearchMode::Keyword => Vec::new(),
            _ => self.embed(vec![q.query.clone()]).await?.pop().unwrap_or_default(),
        };
        let inner = self.inner.clone();
        let hits = blocking(move || {
            let b = &inner.backend;
            match mode {
                SearchMode::Dense => b.search(vector, &conds, top_k, threshold),
                SearchMode::Keyword => {
                    let hits = b.search_sparse(hybrid::query(&q.query), &conds, top_k)?;
                    Ok(hits.into_iter().filter(|h| threshold.is_none_or(|t| h.score >= t)).collect())
                }
                SearchMode::Hybrid => {
                    // Each ranking contributes its own candidates; fusion decides the order.
                    let depth = (top_k * 4).clamp(40, MAX_LIMIT);
                    let dense = b.search(vector, &conds, depth, None)?;
                    let sparse = b.search_sparse(hybrid::query(&q.query), &conds, depth)?;
                    Ok(fuse(dense, sparse, top_k, threshold))
                }
            }
        })
        .await?;
        hits.iter().map(|h| Ok(ScoredMemory { memory: record::memory(h)?, score: h.score })).collect()
    }

    /// A scope exists while it holds a live memory; reads of any other scope are `NotFound`.
    async fn ensure_scope(&self, scope: &Scope) -> Result<(), MemoryError> {
        let (inner, conds) = (self.inner.clone(), live(scope, now_ms()));
        let (hits, _) = blocking(move || inner.backend.scroll(&conds, None, 1)).await?;
        if hits.is_empty() {
            return Err(MemoryError::NotFound(format!("memory scope `{scope}` has no memories")));
        }
        Ok(())
    }

    /// One memory by id; an expired one is purged on access and reported missing.
    pub async fn get(&self, scope: &Scope, id: &str) -> Result<Memory, MemoryError> {
        let uuid = parse_id(id)?;
        let (inner, s) = (self.inner.clone(), scope.to_string());
        let hits = blocking(move || inner.backend.retrieve(&[uuid])).await?;
        let m = match hits.first() {
            Some(h) => record::memory(h)?,
            None => return Err(MemoryError::NotFound(format!("no memory `{id}` in scope `{scope}`"))),
        };
        if m.scope != s {
            return Err(MemoryError::NotFound(format!("no memory `{id}` in scope `{scope}`")));
        }
        if record::expired(&m, now_ms()) {
            let inner = self.inner.clone();
            blocking(move || inner.backend.delete(&[uuid])).await?;
            return Err(MemoryError::NotFound(format!("memory `{id}` has expired")));
        }
        Ok(m)
    }

    /// A page of `scope`, oldest first, after the memory `after` (exclusive).
    pub async fn list(&self, scope: &Scope, after: Option<&str>, limit: usize) -> Result<MemoryPage, MemoryError> {
        if limit == 0 || limit > MAX_LIMIT {
            return Err(invalid("limit", format!("limit must be between 1 and {MAX_LIMIT}")));
        }
        let after = after.map(|a| Uuid::parse_str(a).map_err(|_| invalid("after", "not a memory id"))).transpose()?;
        self.ensure_scope(scope).await?;
        let (inner, conds) = (self.inner.clone(), live(scope, now_ms()));
        // Scroll starts *at* its offset: ask for one more and drop the cursor itself.
        let (mut hits, next) = blocking(move || inner.backend.scroll(&conds, after, limit + 1)).await?;
        if after.is_some() && hits.first().map(|h| Some(h.id)) == Some(after) {
            hits.remove(0);
        }
        let has_more = hits.len() > limit || next.is_some();
        hits.truncate(limit);
        let data = hits.iter().map(record::memory).collect::<Result<Vec<_>, _>>()?;
        let last_id = data.last().map(|m| m.id.clone());
        Ok(MemoryPage { data, last_id, has_more })
    }

    /// Changes text and/or metadata (re-embedding new text); the old version goes to history.
    pub async fn update(&self, scope: &Scope, id: &str, patch: MemoryPatch) -> Result<Memory, MemoryError> {
        if let Some(t) = &patch.text {
            validate_text(t)?;
        }
        let first = self.get(scope, id).await?;
        // Re-read under the key lock: a keyed write may have changed the fact meanwhile.
        let (_guard, old) = match &first.key {
            Some(k) => (Some(self.inner.locks.lock(&first.scope, k).await), self.get(scope, id).await?),
            None => (None, first),
        };
        let vector = match &patch.text {
            Some(t) if *t != old.text => Some(self.embed(vec![t.clone()]).await?.pop().unwrap_or_default()),
            _ => None,
        };
        let inner = self.inner.clone();
        blocking(move || {
            let m = record::patched(old, patch, now_ms());
            match vector {
                Some(v) => inner.backend.upsert(vec![record::point(&m, v)?])?,
                None => inner.backend.overwrite_payload(parse_id(&m.id)?, record::payload(&m))?,
            }
            Ok(m)
        })
        .await
    }

    pub async fn delete(&self, scope: &Scope, id: &str) -> Result<(), MemoryError> {
        let m = self.get(scope, id).await?;
        let (inner, uuid) = (self.inner.clone(), parse_id(&m.id)?);
        blocking(move || inner.backend.delete(&[uuid])).await
    }

    /// Deletes every memory in `scope` (and only there).
    pub async fn delete_scope(&self, scope: &Scope) -> Result<(), MemoryError> {
        let (inner, s) = (self.inner.clone(), scope.to_string());
        blocking(move || inner.backend.delete_where(&[Cond::Eq("scope".into(), Value::String(s))])).await
    }

    /// Deletes every expired memory (readers never see them either way; this frees the space).
    pub async fn purge_expired(&self) -> Result<(), MemoryError> {
        let inner = self.inner.clone();
        blocking(move || inner.backend.delete_where(&[Cond::Lte("expires_at".into(), now_ms())])).await
    }
}

/// RRF of the two rankings; each hit's score becomes its scaled fused score.
fn fuse(dense: Vec<Hit>, sparse: Vec<Hit>, top_k: usize, threshold: Option<f32>) -> Vec<Hit> {
    let ids = |hits: &[Hit]| hits.iter().map(|h| h.id).collect::<Vec<_>>();
    let fused = hybrid::rrf(&[ids(&dense), ids(&sparse)], top_k);
    let mut by_id: std::collections::HashMap<Uuid, Hit> = sparse.into_iter().chain(dense).map(|h| (h.id, h)).collect();
    fused
        .into_iter()
        .filter(|(_, score)| threshold.is_none_or(|t| *score >= t))
        .filter_map(|(id, score)| by_id.remove(&id).map(|h| Hit { score, ..h }))
        .collect()
}

fn validate_text(t: &str) -> Result<(), MemoryError> {
    if t.trim().is_empty() {
        return Err(invalid("text", "text must not be empty"));
    }
    Ok(())
}

fn validate_new(m: &NewMemory) -> Result<(), MemoryError> {
    validate_text(&m.text)?;
    if let Some(k) = &m.key {
        if k.trim().is_empty() || k.len() > MAX_KEY_LEN {
            return Err(invalid("key", format!("key must be 1..={MAX_KEY_LEN} bytes and not blank")));
        }
    }
    if m.ttl_seconds == Some(0) {
        return Err(invalid("ttl_seconds", "ttl_seconds must be at least 1"));
    }
    Ok(())
}

/// Filterable metadata fields are plain names (they become payload paths `metadata.{name}`).
fn validate_field_name(k: &str) -> Result<(), MemoryError> {
    let ok = !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(invalid("filter", format!("`{k}` is not a filterable field name (letters, digits, `_`, `-`)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let err = validate_new(&NewMemory { text: "  ".into(), ..Default::default() }).unwrap_err();
        assert!(matches!(err, MemoryError::Invalid { field: "text", .. }));
        let err = validate_new(&NewMemory { text: "x".into(), key: Some("".into()), ..Default::default() });
        assert!(matches!(err, Err(MemoryError::Invalid { field: "key", .. })));
        assert!(validate_field_name("topic").is_ok());
        assert!(validate_field_name("a.b").is_err());
        assert_eq!(record::NEVER, i64::MAX);
    }
}
