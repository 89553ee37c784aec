//! The memory API: `POST /v1/memory/{scope}` (add), `POST /v1/memory/{scope}/search`,
//! `GET /v1/memory/{scope}` (list, `?limit=&after=`), `GET/PATCH/DELETE /v1/memory/{scope}/{id}`
//! and `DELETE /v1/memory/{scope}`. Maps JSON to [`kiln_agent::memory`] and its errors to HTTP;
//! scopes, embedding, storage and conflict resolution live in `kiln-agent`. Deletes return an
//! [`audit::AdminAction`] beside their body for the audit log. Must not: embed or store anything
//! itself.

use super::audit::{self, AdminAction};
use super::auth::{Principal, Via};
use super::error::{ApiError, ApiResult};
use super::request::{body_bytes, parse_body, query_error};
use super::scopes::Scope as ScopeName;
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use kiln_agent::memory::{Memory, MemoryError, MemoryPatch, MemoryStore, NewMemory, Scope, SearchMode, SearchQuery};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::NotFound(m) => ApiError::not_found(m),
            MemoryError::Invalid { field, message } => ApiError::invalid(field, message),
            MemoryError::Unavailable(m) => ApiError::unavailable(m),
            MemoryError::Backend(m) => ApiError::internal(m),
        }
    }
}

/// The store, or a clear 503 saying why there is none.
fn store(state: &Shared) -> ApiResult<&MemoryStore> {
    state.engine()?;
    state.memory().ok_or_else(|| {
        ApiError::unavailable(
            "memory is not available: it needs an embedding model; start kiln with --embedding-model PATH",
        )
    })
}

/// The scope a path names, if the caller may use it: with auth on, `user:{id}` memories belong to
/// the caller whose subject is `id` (an API key's `subject`, a token's `sub`), and to `admin`
/// callers; agent, run and global scopes are shared by every caller holding the `memory` scope.
fn scope(s: &str, who: &Principal) -> ApiResult<Scope> {
    let sc = s.parse::<Scope>()?;
    if let Scope::User(user) = &sc {
        if who.via != Via::Open && *user != who.subject && !who.scopes.contains(ScopeName::Admin) {
            let message = format!("memory scope '{sc}' belongs to another subject (you are '{}')", who.subject);
            return Err(super::access::forbidden("wrong_subject", message));
        }
    }
    Ok(sc)
}

/// A memory as clients see it (`created_at`/`updated_at`/`expires_at` in Unix seconds).
pub fn memory_json(m: &Memory) -> Value {
    json!({
        "id": m.id, "object": "memory", "scope": m.scope, "text": m.text, "metadata": m.metadata,
        "key": m.key, "priority": m.priority,
        "created_at": m.created_at_ms / 1000, "updated_at": m.updated_at_ms / 1000,
        "expires_at": m.expires_at_ms.map(|t| t / 1000),
        "history": m.history.iter().map(|h| json!({
            "text": h.text, "metadata": h.metadata, "priority": h.priority,
            "written_at": h.written_at_ms / 1000, "outcome": h.outcome,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AddBody {
    text: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    priority: Option<i64>,
}

pub async fn add(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path(s): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: AddBody = parse_body(&body_bytes(body)?)?;
    let item = NewMemory {
        text: b.text,
        metadata: b.metadata.unwrap_or_default(),
        key: b.key,
        ttl_seconds: b.ttl_seconds,
        priority: b.priority.unwrap_or(0),
    };
    let stored = store(&state)?.add(&scope(&s, &who)?, vec![item]).await?;
    let m = stored.first().ok_or_else(|| ApiError::internal("the store acknowledged no memory"))?;
    Ok(Json(memory_json(m)))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchBody {
    query: String,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    filter: Option<Map<String, Value>>,
    #[serde(default)]
    score_threshold: Option<f32>,
    /// `dense` (cosine, the default), `keyword` (BM25) or `hybrid` (both, fused by rank).
    #[serde(default)]
    mode: SearchMode,
}

pub async fn search(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path(s): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: SearchBody = parse_body(&body_bytes(body)?)?;
    let q = SearchQuery {
        query: b.query,
        top_k: b.top_k.unwrap_or(10),
        score_threshold: b.score_threshold,
        filter: b.filter.unwrap_or_default(),
        mode: b.mode,
    };
    let hits = store(&state)?.search(&scope(&s, &who)?, q).await?;
    let data: Vec<Value> = hits
        .iter()
        .map(|h| {
            let m = &h.memory;
            json!({"id": m.id, "text": m.text, "score": h.score, "metadata": m.metadata, "key": m.key,
                "created_at": m.created_at_ms / 1000})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Deserialize, JsonSchema)]
pub struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

pub async fn list(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path(s): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let page = store(&state)?.list(&scope(&s, &who)?, q.after.as_deref(), q.limit.unwrap_or(20)).await?;
    let data: Vec<Value> = page.data.iter().map(memory_json).collect();
    let first = page.data.first().map(|m| m.id.clone());
    Ok(Json(json!({"object": "list", "data": data, "first_id": first, "last_id": page.last_id,
        "has_more": page.has_more})))
}

pub async fn get(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path((s, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(memory_json(&store(&state)?.get(&scope(&s, &who)?, &id).await?)))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchBody {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

pub async fn patch(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path((s, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: PatchBody = parse_body(&body_bytes(body)?)?;
    let m = store(&state)?.update(&scope(&s, &who)?, &id, MemoryPatch { text: b.text, metadata: b.metadata }).await?;
    Ok(Json(memory_json(&m)))
}

pub async fn delete(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path((s, id)): Path<(String, String)>,
) -> ApiResult<(Extension<AdminAction>, Json<Value>)> {
    let store = store(&state)?;
    let sc = scope(&s, &who)?;
    store.delete(&sc, &id).await?;
    let done = audit::action("memory.delete", format!("{sc}/{id}"));
    Ok((done, Json(json!({"id": id, "object": "memory.deleted", "deleted": true}))))
}

pub async fn delete_scope(
    State(state): State<Shared>,
    Extension(who): Extension<Principal>,
    Path(s): Path<String>,
) -> ApiResult<(Extension<AdminAction>, Json<Value>)> {
    let store = store(&state)?;
    let sc = scope(&s, &who)?;
    store.delete_scope(&sc).await?;
    let done = audit::action("memory.delete_scope", sc.to_string());
    Ok((done, Json(json!({"scope": sc.to_string(), "object": "memory.scope.deleted", "deleted": true}))))
}
