//! The embedded memory backend: one qdrant-edge shard (Qdrant's engine, in process) in a
//! directory. Owns the shard's config (an unnamed cosine dense vector and the `bm25` sparse vector
//! with Qdrant's IDF modifier), its payload indexes, the filter
//! translation and durability: every write is flushed (WAL and segments, fsync) before it returns,
//! because qdrant-edge 0.7.2 does not replay its WAL on load. Must not: embed text, resolve
//! conflicts or know scopes' syntax (it filters on the payload fields it is given). All methods
//! block (disk I/O); async callers run them on `spawn_blocking`.

use super::hybrid::SPARSE;
use super::MemoryError;
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::{
    Condition, CreateIndex, CreateVectorName, Distance, EdgeConfigBuilder, EdgeShard, EdgeSparseVectorParamsBuilder,
    EdgeVectorParamsBuilder, FieldCondition, FieldIndexOperations, Filter, JsonPath, Match, Modifier, NamedQuery,
    PayloadFieldSchema, PayloadOps, PayloadSchemaType, PointId, PointInsertOperations, PointOperations, PointStruct,
    QueryEnum, Range, ScrollRequest, SearchParams, SearchRequest, SetPayloadOp, SparseVector, SparseVectorConfig,
    UpdateOperation, Vector, VectorInternal, VectorNameConfig, VectorNameOperations, Vectors, WithPayloadInterface,
};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// One payload condition the store can ask for (exact match or "still alive at").
#[derive(Debug, Clone)]
pub enum Cond {
    /// `field == value` (string, integer or bool).
    Eq(String, Value),
    /// `field > value` (milliseconds); used for "not expired".
    Gt(String, i64),
    /// `field <= value`; used to purge expired memories.
    Lte(String, i64),
}

/// A point to write: its text's embedding and BM25 terms, and its payload.
#[derive(Debug, Clone)]
pub struct NewPoint {
    pub id: Uuid,
    pub dense: Vec<f32>,
    pub sparse: SparseVector,
    pub payload: Map<String, Value>,
}

/// A stored point: id, payload, and (on search) its cosine score.
#[derive(Debug, Clone)]
pub struct Hit {
    pub id: Uuid,
    pub score: f32,
    pub payload: Map<String, Value>,
}

/// Smallest HNSW beam a search uses.
const HNSW_EF: usize = 256;

/// Payload fields the store filters on; indexed so filters stay cheap as the store grows.
const INDEXED: [(&str, PayloadSchemaType); 3] = [
    ("scope", PayloadSchemaType::Keyword),
    ("key", PayloadSchemaType::Keyword),
    ("expires_at", PayloadSchemaType::Integer),
];

/// qdrant-edge shard under a directory. Reads share the lock; a write holds it alone because
/// `EdgeShard::flush` `try_lock`s the shard's internals and panics if anyone else holds them.
pub struct EmbeddedBackend {
    shard: RwLock<EdgeShard>,
    dim: usize,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend").field("path", &self.path).field("dim", &self.dim).finish()
    }
}

fn backend<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> MemoryError {
    move |e| MemoryError::Backend(format!("{what}: {e}"))
}

impl EmbeddedBackend {
    /// Opens the shard in `dir`, creating it (and its indexes) when the directory holds none.
    /// A shard made for another vector size is refused: its vectors cannot be compared.
    pub fn open(dir: &Path, dim: usize) -> Result<Self, MemoryError> {
        std::fs::create_dir_all(dir).map_err(backend("create memory directory"))?;
        let existing = dir.join("edge_config.json").exists();
        let shard = if existing {
            let shard = EdgeShard::load(dir, None).map_err(backend("open memory shard"))?;
            let have = shard.config().vectors.get("").map(|v| v.size);
            if have != Some(dim) {
                return Err(MemoryError::Backend(format!(
                    "memory shard in {} holds {have:?}-dimensional vectors; the embedding model makes {dim}",
                    dir.display()
                )));
            }
            shard
        } else {
            let params = EdgeVectorParamsBuilder::new(dim, Distance::Cosine).build();
            let sparse = EdgeSparseVectorParamsBuilder::new().modifier(Modifier::Idf).build();
            let config = EdgeConfigBuilder::new().vector("", params).sparse_vector(SPARSE, sparse).build();
            EdgeShard::new(dir, config).map_err(backend("create memory shard"))?
        };
        let missing_sparse = !shard.config().sparse_vectors.contains_key(SPARSE);
        let me = Self { shard: RwLock::new(shard), dim, path: dir.to_path_buf() };
        if !existing {
            me.create_indexes()?;
        }
        if missing_sparse {
            me.add_sparse_vector()?;
        }
        Ok(me)
    }

    /// A shard written before keyword search existed gets its `bm25` vector now. Its older
    /// points have no terms (they are still found by meaning); new and updated ones do.
    fn add_sparse_vector(&self) -> Result<(), MemoryError> {
        let config = VectorNameConfig::sparse(SparseVectorConfig { modifier: Some(Modifier::Idf), datatype: None });
        let op = CreateVectorName { vector_name: SPARSE.into(), config };
        tracing::warn!(path = %self.path.display(), "memory shard predates keyword search: adding its `bm25` vector");
        self.write(UpdateOperation::VectorNameOperation(VectorNameOperations::CreateVectorName(op)))
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn create_indexes(&self) -> Result<(), MemoryError> {
        for (field, ty) in INDEXED {
            let op = FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: json_path(field)?,
                field_schema: Some(PayloadFieldSchema::FieldType(ty)),
            });
            self.write(UpdateOperation::FieldIndexOperation(op))?;
        }
        Ok(())
    }

    /// Applies one operation and flushes it to disk before returning (the write is durable).
    fn write(&self, op: UpdateOperation) -> Result<(), MemoryError> {
        let shard = self.shard.write().map_err(|_| MemoryError::Backend("memory shard lock poisoned".into()))?;
        shard.update(op).map_err(backend("write memory"))?;
        shard.flush();
        Ok(())
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, EdgeShard>, MemoryError> {
        self.shard.read().map_err(|_| MemoryError::Backend("memory shard lock poisoned".into()))
    }

    /// Inserts or replaces points (one WAL record, one flush for the whole batch).
    pub fn upsert(&self, points: Vec<NewPoint>) -> Result<(), MemoryError> {
        if points.is_empty() {
            return Ok(());
        }
        let points = points
            .into_iter()
            .map(|p| {
                let vectors = HashMap::from([
                    (String::new(), Vector::new_dense(p.dense)),
                    (SPARSE.to_string(), Vector(VectorInternal::Sparse(p.sparse))),
                ]);
                PointStruct::new(PointId::Uuid(p.id), Vectors::from(vectors), Value::Object(p.payload)).into()
            })
            .collect();
        let op = PointOperations::UpsertPoints(PointInsertOperations::PointsList(points));
        self.write(UpdateOperation::PointOperation(op))
    }

    /// Replaces one point's whole payload, keeping its vector (a fact that won or lost keeps
    /// its text's embedding; only its history changes).
    pub fn overwrite_payload(&self, id: Uuid, payload: Map<String, Value>) -> Result<(), MemoryError> {
        let op = SetPayloadOp {
            payload: qdrant_edge::Payload(payload),
            points: Some(vec![PointId::Uuid(id)]),
            filter: None,
            key: None,
        };
        self.write(UpdateOperation::PayloadOperation(PayloadOps::OverwritePayload(op)))
    }

    pub fn delete(&self, ids: &[Uuid]) -> Result<(), MemoryError> {
        let ids = ids.iter().map(|&id| PointId::Uuid(id)).collect();
        self.write(UpdateOperation::PointOperation(PointOperations::DeletePoints { ids }))
    }

    /// Deletes every point matching all `conds` (they must be non-empty: never "delete all").
    pub fn delete_where(&self, conds: &[Cond]) -> Result<(), MemoryError> {
        if conds.is_empty() {
            return Err(MemoryError::Backend("refusing an unfiltered delete".into()));
        }
        let op = PointOperations::DeletePointsByFilter(filter(conds)?);
        self.write(UpdateOperation::PointOperation(op))
    }

    /// Runs qdrant-edge's optimizers until they plan nothing more: segments past the indexing
    /// threshold get their HNSW index, small ones merge. Readers go on meanwhile (the optimizer
    /// swaps segments under its own locks); writers wait, because a flush must not race it.
    pub fn optimize(&self) -> Result<bool, MemoryError> {
        self.read()?.optimize().map_err(backend("optimize memory"))
    }

    /// Points by id, in the order asked; missing ids are left out.
    pub fn retrieve(&self, ids: &[Uuid]) -> Result<Vec<Hit>, MemoryError> {
        let ids: Vec<_> = ids.iter().map(|&id| PointId::Uuid(id)).collect();
        let records = self.read()?.retrieve(&ids, Some(WithPayloadInterface::Bool(true)), None);
        Ok(records.map_err(backend("read memory"))?.into_iter().filter_map(|r| hit(r.id, 0.0, r.payload)).collect())
    }

    /// Up to `limit` points matching `conds`, by id from `from` (inclusive); the next id if more.
    pub fn scroll(
        &self,
        conds: &[Cond],
        from: Option<Uuid>,
        limit: usize,
    ) -> Result<(Vec<Hit>, Option<Uuid>), MemoryError> {
        let req = ScrollRequest {
            offset: from.map(PointId::Uuid),
            limit: Some(limit.max(1)),
            filter: Some(filter(conds)?),
            with_payload: Some(WithPayloadInterface::Bool(true)),
            ..Default::default()
        };
        let (records, next) = self.read()?.scroll(req).map_err(backend("list memory"))?;
        let next = next.and_then(|id| match id {
            PointId::Uuid(u) => Some(u),
            PointId::NumId(_) => None,
        });
        Ok((records.into_iter().filter_map(|r| hit(r.id, 0.0, r.payload)).collect(), next))
    }

    /// The `limit` nearest points to `vector` by cosine among those matching `conds`.
    pub fn search(
        &self,
        vector: Vec<f32>,
        conds: &[Cond],
        limit: usize,
        threshold: Option<f32>,
    ) -> Result<Vec<Hit>, MemoryError> {
        self.nearest(NamedQuery { query: VectorInternal::Dense(vector), using: None }, conds, limit, threshold)
    }

    /// The `limit` best points for the BM25 `terms` (scored with the shard's IDF) among `conds`.
    pub fn search_sparse(&self, terms: SparseVector, conds: &[Cond], limit: usize) -> Result<Vec<Hit>, MemoryError> {
        if terms.indices.is_empty() {
            return Ok(Vec::new());
        }
        let query = NamedQuery { query: VectorInternal::Sparse(terms), using: Some(SPARSE.into()) };
        self.nearest(query, conds, limit, None)
    }

    fn nearest(
        &self,
        query: NamedQuery<VectorInternal>,
        conds: &[Cond],
        limit: usize,
        threshold: Option<f32>,
    ) -> Result<Vec<Hit>, MemoryError> {
        let req = SearchRequest {
            query: QueryEnum::Nearest(query),
            filter: Some(filter(conds)?),
            // Beam width of HNSW segments: wide enough that top-k matches brute force (plain
            // segments are exact either way).
            params: Some(SearchParams { hnsw_ef: Some(limit.max(HNSW_EF)), ..Default::default() }),
            limit,
            offset: 0,
            with_payload: Some(WithPayloadInterface::Bool(true)),
            with_vector: None,
            score_threshold: threshold,
        };
        let points = self.read()?.search(req).map_err(backend("search memory"))?;
        Ok(points.into_iter().filter_map(|p| hit(p.id, p.score, p.payload)).collect())
    }
}

fn hit(id: PointId, score: f32, payload: Option<qdrant_edge::Payload>) -> Option<Hit> {
    match id {
        PointId::Uuid(id) => Some(Hit { id, score, payload: payload.map(|p| p.0).unwrap_or_default() }),
        // The store only writes UUID ids; anything else was not written by it.
        PointId::NumId(_) => None,
    }
}

fn json_path(field: &str) -> Result<JsonPath, MemoryError> {
    field.parse().map_err(|_| MemoryError::Invalid { field: "filter", message: format!("bad field name `{field}`") })
}

/// All conditions must hold (Qdrant `must`).
fn filter(conds: &[Cond]) -> Result<Filter, MemoryError> {
    let mut must = Vec::with_capacity(conds.len());
    for c in conds {
        let fc = match c {
            Cond::Eq(field, value) => FieldCondition::new_match(json_path(field)?, match_value(field, value)?),
            Cond::Gt(field, v) => FieldCondition::new_range(json_path(field)?, range(None, Some(*v))),
            Cond::Lte(field, v) => FieldCondition::new_range(json_path(field)?, range(Some(*v), None)),
        };
        must.push(Condition::Field(fc));
    }
    Ok(Filter { must: Some(must), ..Default::default() })
}

fn range(lte: Option<i64>, gt: Option<i64>) -> Range<OrderedFloat<f64>> {
    let f = |v: i64| OrderedFloat(v as f64);
    Range { lt: None, gt: gt.map(f), gte: None, lte: lte.map(f) }
}

fn match_value(field: &str, v: &Value) -> Result<Match, MemoryError> {
    match v {
        Value::String(s) => Ok(Match::from(s.clone())),
        Value::Bool(b) => Ok(Match::from(*b)),
        Value::Number(n) if n.is_i64() => Ok(Match::from(n.as_i64().unwrap_or_default())),
        _ => Err(MemoryError::Invalid {
            field: "filter",
            message: format!("`{field}`: only exact matches on strings, integers and booleans are supported"),
        }),
    }
}
