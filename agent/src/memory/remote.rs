//! The remote memory backend: one collection on a Qdrant server or cluster, over gRPC with the
//! official `qdrant-client`. Owns the collection's schema (the embedded shard's: an unnamed cosine
//! dense vector, the `bm25` sparse vector with Qdrant's IDF modifier, keyword/integer payload
//! indexes), its creation and checking, the translation of [`Cond`]s and points to Qdrant's
//! protobuf types, timeouts, and which failures mean "Qdrant is unavailable" (connection refused,
//! timeout, auth refused: [`MemoryError::Unavailable`], so HTTP 503) versus a real backend error.
//! Every write is sent with `wait=true`: Qdrant acknowledges it only once applied (and in its WAL).
//! Every write is idempotent (upsert by id, whole-payload overwrite, delete), because
//! `qdrant-client` resends a request once after reconnecting when the first try failed in transit.
//! Must not: embed text, resolve conflicts, know scopes' syntax, or add retries of its own.
//!
//! The methods block, like the embedded backend's (callers run them on `spawn_blocking`): each
//! drives its request on the runtime handle captured at [`RemoteBackend::connect`], so the store
//! keeps one synchronous backend interface for both backends and `MemoryStore`'s blocking closures
//! (a keyed write reads, decides and writes in one of them) stay as they are.

use super::embedded::{Cond, Hit, NewPoint};
use super::hybrid::SPARSE;
use super::MemoryError;
use qdrant_client::qdrant::{
    condition, point_id, points_selector, vector_input, vectors, vectors_config, with_payload_selector, Condition,
    CreateCollection, CreateFieldIndexCollection, DeletePoints, DenseVector, Distance, FieldCondition, FieldType,
    Filter, GetPoints, Modifier, NamedVectors, PayloadSchemaType, PointId, PointStruct, PointsIdsList, PointsSelector,
    Query, QueryPoints, Range, ScrollPoints, SetPayloadPoints, SparseVectorConfig, SparseVectorParams, UpsertPoints,
    Vector, VectorInput, VectorParams, Vectors, VectorsConfig, WithPayloadSelector,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::SparseVector;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::runtime::Handle;

/// Points per upsert request: ~0.6 MB of 384-dim vectors, well under gRPC's usual 4 MB message cap.
const UPSERT_CHUNK: usize = 256;

/// Where and how to reach the Qdrant server.
#[derive(Clone)]
pub struct RemoteConfig {
    /// gRPC URL, e.g. `http://qdrant:6334` (`https://` for TLS).
    pub url: String,
    pub api_key: Option<String>,
    pub collection: String,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long one request may take (a down server must not hang a memory route).
    pub request_timeout: Duration,
}

impl RemoteConfig {
    pub const DEFAULT_COLLECTION: &'static str = "kiln_memory";

    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            api_key: None,
            collection: Self::DEFAULT_COLLECTION.into(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for RemoteConfig {
    /// Never prints the API key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &self.url)
            .field("collection", &self.collection)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Payload fields the store filters on, with the type each is indexed as.
const INDEXED: [(&str, FieldType, PayloadSchemaType); 3] = [
    ("scope", FieldType::Keyword, PayloadSchemaType::Keyword),
    ("key", FieldType::Keyword, PayloadSchemaType::Keyword),
    ("expires_at", FieldType::Integer, PayloadSchemaType::Integer),
];

pub struct RemoteBackend {
    client: Qdrant,
    config: RemoteConfig,
    dim: usize,
    rt: Handle,
    /// The collection was found (or made) with our schema; until then every call checks first,
    /// so a server that was down at start is picked up once it answers.
    ready: AtomicBool,
}

impl std::fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBackend").field("config", &self.config).field("dim", &self.dim).finish()
    }
}

impl RemoteBackend {
    /// Connects to `config.url` and makes sure the collection exists with the schema for `dim`-sized
    /// vectors. A server that does not answer is not an error here (kiln starts; memory calls
    /// answer `Unavailable` until it does); a collection with another schema is.
    pub async fn connect(config: RemoteConfig, dim: usize) -> Result<Self, MemoryError> {
        let client = Qdrant::from_url(&config.url)
            .api_key(config.api_key.clone())
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // The check is a health call at build time that only logs; our first call reports.
            .skip_compatibility_check()
            .build()
            .map_err(|e| MemoryError::Backend(format!("Qdrant URL `{}`: {e}", config.url)))?;
        let me = Self { client, config, dim, rt: Handle::current(), ready: AtomicBool::new(false) };
        match me.bounded("opening the collection", me.ensure_collection()).await {
            Ok(()) => me.ready.store(true, Ordering::Release),
            Err(MemoryError::Unavailable(why)) => {
                tracing::warn!(url = %me.config.url, %why, "Qdrant is not reachable; memory answers 503 until it is")
            }
            Err(e) => return Err(e),
        }
        Ok(me)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// Runs one request to completion on the captured runtime, after checking the collection
    /// (until that succeeded once), each within [`Self::deadline`].
    fn run<T, F: Future<Output = Result<T, QdrantError>>>(&self, what: &'static str, fut: F) -> Result<T, MemoryError> {
        if !self.ready.load(Ordering::Acquire) {
            // A schema problem found only now is still "memory cannot serve": 503, with the reason.
            self.rt.block_on(self.bounded("opening the collection", self.ensure_collection())).map_err(
                |e| match e {
                    MemoryError::Backend(m) => MemoryError::Unavailable(m),
                    other => other,
                },
            )?;
            self.ready.store(true, Ordering::Release);
        }
        self.rt.block_on(self.bounded(what, async { fut.await.map_err(|e| self.error(what, e)) }))
    }

    /// The collection vanished under us (deleted on the server): the store cannot serve this
    /// call (503, saying so); the next one makes the collection again, as on first use.
    fn gone(&self, what: &str, status: &tonic::Status) -> MemoryError {
        self.ready.store(false, Ordering::Release);
        MemoryError::Unavailable(format!(
            "Qdrant collection `{}` at {} is gone ({what}: {}); it is created again on the next call",
            self.config.collection,
            self.config.url,
            status.message()
        ))
    }

    /// The most one step may take: a connect plus a request. The client's own timeouts cover
    /// each attempt, but it reconnects once after a failure, and a server that accepts the
    /// connection and then says nothing would otherwise cost two full request timeouts.
    fn deadline(&self) -> Duration {
        self.config.connect_timeout + self.config.request_timeout
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, MemoryError>>,
    ) -> Result<T, MemoryError> {
        match tokio::time::timeout(self.deadline(), fut).await {
            Ok(r) => r,
            Err(_) => Err(MemoryError::Unavailable(format!(
                "Qdrant at {} did not answer ({what}) within {:.1} s",
                self.config.url,
                self.deadline().as_secs_f64()
            ))),
        }
    }

    /// Unreachable, timed out, overloaded or refusing our key: the store cannot serve now (503).
    /// Anything else is the server refusing this request: a backend error.
    fn error(&self, what: &str, e: QdrantError) -> MemoryError {
        use tonic::Code;
        let url = &self.config.url;
        match &e {
            QdrantError::ResponseError { status } => match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    MemoryError::Unavailable(format!("Qdrant at {url} is unreachable ({what}): {}", status.message()))
                }
                // qdrant-client reports a failed connect as `Internal "Failed to connect to ..."`.
                Code::Internal if status.message().starts_with("Failed to connect") => {
                    MemoryError::Unavailable(format!("Qdrant at {url} is unreachable ({what}): {}", status.message()))
                }
                // Qdrant says which: a missing collection, or a point deleted since it was read.
                Code::NotFound if status.message().contains("ollection") => self.gone(what, status),
                Code::NotFound => MemoryError::NotFound(format!("{what}: {}", status.message())),
                Code::Unauthenticated | Code::PermissionDenied => MemoryError::Unavailable(format!(
                    "Qdrant at {url} refused kiln's credentials ({what}; check QDRANT_API_KEY): {}",
                    status.message()
                )),
                _ => MemoryError::Backend(format!("Qdrant {what}: {}: {}", status.code(), status.message())),
            },
            QdrantError::ResourceExhaustedError { .. } => {
                MemoryError::Unavailable(format!("Qdrant at {url} is overloaded ({what}): {e}"))
            }
            QdrantError::Io(_) => MemoryError::Unavailable(format!("Qdrant at {url} ({what}): {e}")),
            _ => MemoryError::Backend(format!("Qdrant {what}: {e}")),
        }
    }

    /// Creates the collection (and its payload indexes) when missing; refuses one whose vectors
    /// do not fit ours. Two kiln processes creating it at once: the loser finds it made.
    async fn ensure_collection(&self) -> Result<(), MemoryError> {
        let name = &self.config.collection;
        let exists = self.client.collection_exists(name).await.map_err(|e| self.error("collection_exists", e))?;
        if !exists {
            let created = self.client.create_collection(self.schema()).await;
            if let Err(e) = created {
                let err = self.error("create_collection", e);
                let now: bool = self.client.collection_exists(name).await.map_err(|e| self.error("exists", e))?;
                if !now {
                    return Err(err);
                }
            }
        }
        let info = self.client.collection_info(name).await.map_err(|e| self.error("collection_info", e))?;
        let info = info.result.ok_or_else(|| MemoryError::Backend(format!("Qdrant sent no info for `{name}`")))?;
        self.check_schema(info.config.as_ref().and_then(|c| c.params.as_ref()))?;
        for (field, ty, schema) in INDEXED {
            match info.payload_schema.get(field).map(|s| s.data_type) {
                Some(t) if t == schema as i32 => {}
                Some(t) => {
                    return Err(self.mismatch(format!(
                        "its payload index on `{field}` is {:?}, not {schema:?}",
                        PayloadSchemaType::try_from(t).unwrap_or(PayloadSchemaType::UnknownType)
                    )))
                }
                None => {
                    let req = CreateFieldIndexCollection {
                        collection_name: name.clone(),
                        wait: Some(true),
                        field_name: field.into(),
                        field_type: Some(ty as i32),
                        ..Default::default()
                    };
                    self.client.create_field_index(req).await.map_err(|e| self.error("create_field_index", e))?;
                }
            }
        }
        Ok(())
    }

    fn schema(&self) -> CreateCollection {
        let dense = VectorParams { size: self.dim as u64, distance: Distance::Cosine as i32, ..Default::default() };
        let sparse = SparseVectorParams { modifier: Some(Modifier::Idf as i32), ..Default::default() };
        CreateCollection {
            collection_name: self.config.collection.clone(),
            vectors_config: Some(VectorsConfig { config: Some(vectors_config::Config::Params(dense)) }),
            sparse_vectors_config: Some(SparseVectorConfig { map: HashMap::from([(SPARSE.to_string(), sparse)]) }),
            ..Default::default()
        }
    }

    fn mismatch(&self, what: String) -> MemoryError {
        MemoryError::Backend(format!(
            "Qdrant collection `{}` at {} does not fit kiln's memory ({what}); kiln needs one unnamed {}-dimensional \
             cosine vector and a `{SPARSE}` sparse vector with the IDF modifier: pick another --qdrant-collection",
            self.config.collection, self.config.url, self.dim
        ))
    }

    fn check_schema(&self, params: Option<&qdrant_client::qdrant::CollectionParams>) -> Result<(), MemoryError> {
        let dense = match params.and_then(|p| p.vectors_config.as_ref()).and_then(|v| v.config.as_ref()) {
            Some(vectors_config::Config::Params(p)) => p,
            Some(vectors_config::Config::ParamsMap(_)) => {
                return Err(self.mismatch("it has named dense vectors, not one unnamed vector".into()))
            }
            None => return Err(self.mismatch("it has no dense vector".into())),
        };
        if dense.size != self.dim as u64 || dense.distance != Distance::Cosine as i32 {
            let distance = Distance::try_from(dense.distance).unwrap_or(Distance::UnknownDistance);
            return Err(self.mismatch(format!("it holds {}-dimensional {distance:?} vectors", dense.size)));
        }
        let sparse = params.and_then(|p| p.sparse_vectors_config.as_ref()).and_then(|s| s.map.get(SPARSE));
        match sparse {
            Some(s) if s.modifier == Some(Modifier::Idf as i32) => Ok(()),
            Some(_) => Err(self.mismatch(format!("its `{SPARSE}` sparse vector has no IDF modifier"))),
            None => Err(self.mismatch(format!("it has no `{SPARSE}` sparse vector"))),
        }
    }

    fn name(&self) -> String {
        self.config.collection.clone()
    }

    /// Inserts or replaces points, `UPSERT_CHUNK` per request. A failure part-way leaves the
    /// earlier chunks written; the caller got an error, so none of them was acknowledged.
    pub fn upsert(&self, points: Vec<NewPoint>) -> Result<(), MemoryError> {
        let mut points = points.into_iter().map(point).peekable();
        while points.peek().is_some() {
            let chunk: Vec<PointStruct> = points.by_ref().take(UPSERT_CHUNK).collect();
            let req =
                UpsertPoints { collection_name: self.name(), wait: Some(true), points: chunk, ..Default::default() };
            self.run("upsert", self.client.upsert_points(req))?;
        }
        Ok(())
    }

    /// Replaces one point's whole payload, keeping its vectors.
    pub fn overwrite_payload(&self, id: Uuid, payload: Map<String, Value>) -> Result<(), MemoryError> {
        let req = SetPayloadPoints {
            collection_name: self.name(),
            wait: Some(true),
            payload: Payload::from(payload).into(),
            points_selector: Some(ids_selector(&[id])),
            ..Default::default()
        };
        self.run("overwrite_payload", self.client.overwrite_payload(req)).map(drop)
    }

    pub fn delete(&self, ids: &[Uuid]) -> Result<(), MemoryError> {
        if ids.is_empty() {
            return Ok(());
        }
        let req = DeletePoints {
            collection_name: self.name(),
            wait: Some(true),
            points: Some(ids_selector(ids)),
            ..Default::default()
        };
        self.run("delete", self.client.delete_points(req)).map(drop)
    }

    /// Deletes every point matching all `conds` (they must be non-empty: never "delete all").
    pub fn delete_where(&self, conds: &[Cond]) -> Result<(), MemoryError> {
        if conds.is_empty() {
            return Err(MemoryError::Backend("refusing an unfiltered delete".into()));
        }
        let selector = points_selector::PointsSelectorOneOf::Filter(filter(conds)?);
        let req = DeletePoints {
            collection_name: self.name(),
            wait: Some(true),
            points: Some(PointsSelector { points_selector_one_of: Some(selector) }),
            ..Default::default()
        };
        self.run("delete", self.client.delete_points(req)).map(drop)
    }

    /// Points by id, in the order asked; missing ids are left out.
    pub fn retrieve(&self, ids: &[Uuid]) -> Result<Vec<Hit>, MemoryError> {
        let req = GetPoints {
            collection_name: self.name(),
            ids: ids.iter().map(|id| point_id(*id)).collect(),
            with_payload: Some(with_payload()),
            ..Default::default()
        };
        let got = self.run("get", self.client.get_points(req))?;
        let mut by_id: HashMap<Uuid, Hit> =
            got.result.into_iter().filter_map(|p| hit(p.id, 0.0, p.payload)).map(|h| (h.id, h)).collect();
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    /// Up to `limit` points matching `conds`, by id from `from` (inclusive); the next id if more.
    pub fn scroll(
        &self,
        conds: &[Cond],
        from: Option<Uuid>,
        limit: usize,
    ) -> Result<(Vec<Hit>, Option<Uuid>), MemoryError> {
        let req = ScrollPoints {
            collection_name: self.name(),
            filter: Some(filter(conds)?),
            offset: from.map(point_id),
            limit: Some(u32::try_from(limit.max(1)).unwrap_or(u32::MAX)),
            with_payload: Some(with_payload()),
            ..Default::default()
        };
        let got = self.run("scroll", self.client.scroll(req))?;
        let next = got.next_page_offset.and_then(uuid_of);
        Ok((got.result.into_iter().filter_map(|p| hit(p.id, 0.0, p.payload)).collect(), next))
    }

    /// The `limit` nearest points to `vector` by cosine among those matching `conds`.
    pub fn search(
        &self,
        vector: Vec<f32>,
        conds: &[Cond],
        limit: usize,
        threshold: Option<f32>,
    ) -> Result<Vec<Hit>, MemoryError> {
        let input = vector_input::Variant::Dense(DenseVector { data: vector });
        self.nearest(input, None, conds, limit, threshold)
    }

    /// The `limit` best points for the BM25 `terms` (scored with the collection's IDF).
    pub fn search_sparse(&self, terms: SparseVector, conds: &[Cond], limit: usize) -> Result<Vec<Hit>, MemoryError> {
        if terms.indices.is_empty() {
            return Ok(Vec::new());
        }
        let input = vector_input::Variant::Sparse(qdrant_client::qdrant::SparseVector {
            indices: terms.indices,
            values: terms.values,
        });
        self.nearest(input, Some(SPARSE.into()), conds, limit, None)
    }

    fn nearest(
        &self,
        input: vector_input::Variant,
        using: Option<String>,
        conds: &[Cond],
        limit: usize,
        threshold: Option<f32>,
    ) -> Result<Vec<Hit>, MemoryError> {
        let query = Query::new_nearest(VectorInput { variant: Some(input) });
        let req = QueryPoints {
            collection_name: self.name(),
            query: Some(query),
            using,
            filter: Some(filter(conds)?),
            score_threshold: threshold,
            limit: Some(limit as u64),
            with_payload: Some(with_payload()),
            ..Default::default()
        };
        let got = self.run("query", self.client.query(req))?;
        Ok(got.result.into_iter().filter_map(|p| hit(p.id, p.score, p.payload)).collect())
    }
}

fn point(p: NewPoint) -> PointStruct {
    let sparse = qdrant_client::qdrant::SparseVector { indices: p.sparse.indices, values: p.sparse.values };
    let named = HashMap::from([(String::new(), Vector::from(p.dense)), (SPARSE.to_string(), Vector::from(sparse))]);
    PointStruct {
        id: Some(point_id(p.id)),
        payload: Payload::from(p.payload).into(),
        vectors: Some(Vectors {
            vectors_options: Some(vectors::VectorsOptions::Vectors(NamedVectors { vectors: named })),
        }),
    }
}

fn point_id(id: Uuid) -> PointId {
    PointId { point_id_options: Some(point_id::PointIdOptions::Uuid(id.to_string())) }
}

fn ids_selector(ids: &[Uuid]) -> PointsSelector {
    let list = PointsIdsList { ids: ids.iter().map(|id| point_id(*id)).collect() };
    PointsSelector { points_selector_one_of: Some(points_selector::PointsSelectorOneOf::Points(list)) }
}

fn with_payload() -> WithPayloadSelector {
    WithPayloadSelector { selector_options: Some(with_payload_selector::SelectorOptions::Enable(true)) }
}

/// The store only writes UUID ids; a numeric id was not written by it.
fn uuid_of(id: PointId) -> Option<Uuid> {
    match id.point_id_options? {
        point_id::PointIdOptions::Uuid(s) => Uuid::parse_str(&s).ok(),
        point_id::PointIdOptions::Num(_) => None,
    }
}

fn hit(id: Option<PointId>, score: f32, payload: HashMap<String, qdrant_client::qdrant::Value>) -> Option<Hit> {
    let id = uuid_of(id?)?;
    Some(Hit { id, score, payload: Map::from(Payload::from(payload)) })
}

/// All conditions must hold (Qdrant `must`); the same translation as the embedded backend's.
fn filter(conds: &[Cond]) -> Result<Filter, MemoryError> {
    let mut must = Vec::with_capacity(conds.len());
    for c in conds {
        let fc = match c {
            Cond::Eq(field, value) => Condition::matches(field.clone(), match_value(field, value)?),
            Cond::Gt(field, v) => range(field, Range { gt: Some(*v as f64), ..Default::default() }),
            Cond::Lte(field, v) => range(field, Range { lte: Some(*v as f64), ..Default::default() }),
        };
        must.push(fc);
    }
    Ok(Filter { must, ..Default::default() })
}

fn range(field: &str, r: Range) -> Condition {
    let fc = FieldCondition { key: field.into(), range: Some(r), ..Default::default() };
    Condition { condition_one_of: Some(condition::ConditionOneOf::Field(fc)) }
}

fn match_value(field: &str, v: &Value) -> Result<qdrant_client::qdrant::r#match::MatchValue, MemoryError> {
    use qdrant_client::qdrant::r#match::MatchValue;
    match v {
        Value::String(s) => Ok(MatchValue::Keyword(s.clone())),
        Value::Bool(b) => Ok(MatchValue::Boolean(*b)),
        Value::Number(n) if n.is_i64() => Ok(MatchValue::Integer(n.as_i64().unwrap_or_default())),
        _ => Err(MemoryError::Invalid {
            field: "filter",
            message: format!("`{field}`: only exact matches on strings, integers and booleans are supported"),
        }),
    }
}
