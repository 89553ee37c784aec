//! OpenAI's Vector Stores API: `POST/GET /v1/vector_stores`, `GET/POST/DELETE
//! /v1/vector_stores/{id}`, `POST/GET /v1/vector_stores/{id}/files`, `GET/DELETE
//! /v1/vector_stores/{id}/files/{file_id}`, `POST /v1/vector_stores/{id}/search` and `POST
//! /v1/vector_stores/{id}/file_batches`, `GET .../file_batches/{batch_id}`, in OpenAI's object
//! shapes (`vector_store`, `vector_store.file`, `vector_store.search_results.page`,
//! `vector_store.files_batch`).
//! Attaching a file ingests it before answering, so the object comes back `completed` (the SDK's
//! `create_and_poll` / `upload_and_poll` see it on their first poll). Maps JSON to
//! [`kiln_agent::vector_stores`]; must not chunk, embed or search itself.

use super::audit::{self, AdminAction};
use super::error::{ApiError, ApiResult};
use super::files::{list_json, page, service};
use super::openapi_shapes as shapes;
use super::request::{body_bytes, parse_body, query_error};
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use kiln_agent::vector_stores::{
    filter, Batch, BatchFile, NewStore, SearchRequest, StorePatch, VectorStore, VsFile, MAX_BATCH_FILES,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A vector store object (times in Unix seconds).
pub fn store_json(v: &VectorStore) -> Value {
    let days = v.expires_after.as_ref().and_then(|e| e["days"].as_i64());
    json!({
        "id": v.id, "object": "vector_store", "created_at": v.created_at / 1000, "name": v.name,
        "usage_bytes": v.usage_bytes, "file_counts": v.file_counts,
        "status": if v.file_counts.in_progress > 0 { "in_progress" } else { "completed" },
        "expires_after": v.expires_after, "expires_at": days.map(|d| v.last_active_at / 1000 + d * 86_400),
        "last_active_at": v.last_active_at / 1000, "metadata": v.metadata,
    })
}

/// A vector store file object. `chunking_strategy` holds the sizes used; when the embedding
/// model's input length made them smaller than asked, `chunking_note` says so.
pub fn vs_file_json(f: &VsFile) -> Value {
    let b = &f.body;
    let c = &b.chunking;
    let mut v = json!({
        "id": f.file_id, "object": "vector_store.file", "usage_bytes": b.usage_bytes,
        "created_at": f.created_at / 1000, "vector_store_id": f.vector_store_id, "status": b.status,
        "last_error": b.last_error.as_ref().map(|(code, message)| json!({"code": code, "message": message})),
        "chunking_strategy": {"type": "static", "static": {
            "max_chunk_size_tokens": c.max_chunk_size_tokens, "chunk_overlap_tokens": c.chunk_overlap_tokens}},
        "attributes": b.attributes, "chunks": b.chunks,
    });
    if c.capped() {
        v["chunking_note"] = json!(format!(
            "asked for {} ({} / {} tokens); chunks are at most {} tokens, what the embedding model reads in one input",
            c.kind, c.requested_max_chunk_size_tokens, c.requested_chunk_overlap_tokens, c.model_max_tokens
        ));
    }
    v
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct CreateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    file_ids: Option<Vec<String>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::chunking_strategy")]
    chunking_strategy: Option<Value>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::expires_after")]
    expires_after: Option<Value>,
}

pub async fn create(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let b: CreateBody = parse_body(&body_bytes(body)?)?;
    let new = NewStore {
        name: b.name,
        metadata: b.metadata.unwrap_or_default(),
        expires_after: b.expires_after,
        file_ids: b.file_ids.unwrap_or_default(),
        chunking_strategy: b.chunking_strategy,
    };
    Ok(Json(store_json(&service(&state)?.create(new).await?)))
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListQuery {
    limit: Option<i64>,
    order: Option<String>,
    after: Option<String>,
    before: Option<String>,
}

pub async fn list(State(state): State<Shared>, q: Result<Query<ListQuery>, QueryRejection>) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let p = page(q.limit, q.order.as_deref(), q.after, q.before, 100)?;
    let (stores, more) = service(&state)?.list(&p).await?;
    Ok(Json(list_json(stores.iter().map(store_json).collect(), more)))
}

pub async fn get(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(store_json(&service(&state)?.get(&id).await?)))
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct UpdateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::expires_after")]
    expires_after: Option<Value>,
}

pub async fn update(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: UpdateBody = parse_body(&body_bytes(body)?)?;
    let patch = StorePatch { name: b.name, metadata: b.metadata, expires_after: b.expires_after };
    Ok(Json(store_json(&service(&state)?.update(&id, patch).await?)))
}

pub async fn delete(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<(Extension<AdminAction>, Json<Value>)> {
    service(&state)?.delete(&id).await?;
    let done = audit::action("vector_store.delete", id.clone());
    Ok((done, Json(json!({"id": id, "object": "vector_store.deleted", "deleted": true}))))
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct AttachBody {
    file_id: String,
    #[serde(default)]
    #[schemars(schema_with = "shapes::attributes")]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::chunking_strategy")]
    chunking_strategy: Option<Value>,
}

pub async fn attach(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: AttachBody = parse_body(&body_bytes(body)?)?;
    let vs = service(&state)?;
    let f = vs.attach(&id, &b.file_id, b.attributes.unwrap_or_default(), b.chunking_strategy.as_ref()).await?;
    Ok(Json(vs_file_json(&f)))
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FilesQuery {
    limit: Option<i64>,
    order: Option<String>,
    after: Option<String>,
    before: Option<String>,
    /// Only files of this status: `in_progress`, `completed`, `failed`, `cancelled`.
    filter: Option<String>,
}

pub async fn list_files(
    State(state): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    if let Some(f) = q.filter.as_deref().filter(|f| !["in_progress", "completed", "failed", "cancelled"].contains(f)) {
        return Err(ApiError::invalid("filter", format!("unknown status '{f}'")));
    }
    let p = page(q.limit, q.order.as_deref(), q.after, q.before, 100)?;
    let (files, more) = service(&state)?.list_vs_files(&id, &p, q.filter.as_deref()).await?;
    Ok(Json(list_json(files.iter().map(vs_file_json).collect(), more)))
}

pub async fn get_file(State(state): State<Shared>, Path((id, file)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    Ok(Json(vs_file_json(&service(&state)?.vs_file(&id, &file).await?)))
}

pub async fn detach(
    State(state): State<Shared>,
    Path((id, file)): Path<(String, String)>,
) -> ApiResult<(Extension<AdminAction>, Json<Value>)> {
    let vs = service(&state)?;
    vs.vs_file(&id, &file).await?;
    vs.detach(&id, &file).await?;
    let done = audit::action("vector_store.file.delete", format!("{id}/{file}"));
    Ok((done, Json(json!({"id": file, "object": "vector_store.file.deleted", "deleted": true}))))
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct SearchBody {
    #[schemars(schema_with = "shapes::vs_query")]
    query: Value,
    #[serde(default)]
    max_num_results: Option<i64>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::vs_filters")]
    filters: Option<Value>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::ranking_options")]
    ranking_options: Option<Value>,
    /// Accepted; kiln searches with the query as given.
    #[serde(default)]
    rewrite_query: Option<bool>,
}

/// `query`: a string or an array of strings.
fn queries(v: &Value) -> ApiResult<Vec<String>> {
    let bad = || ApiError::invalid("query", "query must be a non-empty string or an array of them");
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) if !a.is_empty() && a.len() <= 10 => {
            a.iter().map(|q| q.as_str().map(str::to_string).ok_or_else(bad)).collect()
        }
        _ => Err(bad()),
    }
}

/// `ranking_options`: `ranker` (`auto` or `none`: the one hybrid ranking) and `score_threshold`
/// (0..=1).
pub fn score_threshold(p: &str, v: Option<&Value>) -> ApiResult<Option<f32>> {
    let Some(o) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let o = o.as_object().ok_or_else(|| ApiError::invalid(p, "ranking_options must be an object"))?;
    if let Some(r) = o.get("ranker").filter(|r| !r.is_null()) {
        if !matches!(r.as_str(), Some("auto" | "none" | "default-2024-11-15")) {
            return Err(ApiError::invalid(&format!("{p}.ranker"), "kiln ranks by hybrid search: use 'auto'"));
        }
    }
    match o.get("score_threshold") {
        None | Some(Value::Null) => Ok(None),
        Some(t) => match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => Ok(Some(t as f32)),
            _ => Err(ApiError::invalid(&format!("{p}.score_threshold"), "score_threshold must be between 0 and 1")),
        },
    }
}

pub async fn search(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: SearchBody = parse_body(&body_bytes(body)?)?;
    let _ = b.rewrite_query;
    let queries = queries(&b.query)?;
    let filter = b.filters.as_ref().filter(|f| !f.is_null()).map(|f| filter::parse(f, "filters")).transpose()?;
    let max = match b.max_num_results {
        None => 10,
        Some(n @ 1..=50) => n as usize,
        Some(_) => return Err(ApiError::invalid("max_num_results", "max_num_results must be between 1 and 50")),
    };
    let score_threshold = score_threshold("ranking_options", b.ranking_options.as_ref())?;
    let req = SearchRequest { queries: queries.clone(), max_num_results: max, filter, score_threshold };
    let hits = service(&state)?.search(std::slice::from_ref(&id), &req).await?;
    let data: Vec<Value> = hits
        .iter()
        .map(|h| {
            json!({"file_id": h.file_id, "filename": h.filename, "score": h.score, "attributes": h.attributes,
                "content": [{"type": "text", "text": h.text}]})
        })
        .collect();
    Ok(Json(json!({"object": "vector_store.search_results.page", "search_query": queries, "data": data,
        "has_more": false, "next_page": null})))
}

fn batch_json(b: &Batch) -> Value {
    json!({"id": b.id, "object": "vector_store.files_batch", "created_at": b.created_at / 1000,
        "vector_store_id": b.vector_store_id, "status": "completed", "file_counts": b.file_counts()})
}

#[derive(Deserialize, JsonSchema)]
pub(super) struct BatchFileBody {
    file_id: String,
    #[serde(default)]
    #[schemars(schema_with = "shapes::attributes")]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::chunking_strategy")]
    chunking_strategy: Option<Value>,
}

/// `file_ids` (sharing `attributes` and `chunking_strategy`) or `files` (each with its own).
#[derive(Deserialize, JsonSchema)]
pub(super) struct BatchBody {
    #[serde(default)]
    file_ids: Option<Vec<String>>,
    #[serde(default)]
    files: Option<Vec<BatchFileBody>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::attributes")]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    #[schemars(schema_with = "shapes::chunking_strategy")]
    chunking_strategy: Option<Value>,
}

pub async fn create_batch(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: BatchBody = parse_body(&body_bytes(body)?)?;
    let shared = |file_id: String| BatchFile {
        file_id,
        attributes: b.attributes.clone().unwrap_or_default(),
        chunking_strategy: b.chunking_strategy.clone(),
    };
    let files: Vec<BatchFile> = match (b.file_ids.clone(), b.files) {
        (Some(ids), None) => ids.into_iter().map(shared).collect(),
        (None, Some(files)) => files
            .into_iter()
            .map(|f| BatchFile {
                file_id: f.file_id,
                attributes: f.attributes.unwrap_or_default(),
                chunking_strategy: f.chunking_strategy,
            })
            .collect(),
        _ => return Err(ApiError::invalid("file_ids", "give either file_ids or files")),
    };
    if files.len() > MAX_BATCH_FILES {
        return Err(ApiError::invalid("file_ids", format!("a batch holds at most {MAX_BATCH_FILES} files")));
    }
    Ok(Json(batch_json(&service(&state)?.create_batch(&id, files).await?)))
}

pub async fn get_batch(
    State(state): State<Shared>,
    Path((id, batch)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(batch_json(&service(&state)?.batch(&id, &batch).await?)))
}
