//! OpenAI's Files API, the part vector stores need: `POST /v1/files` (multipart: `file`,
//! `purpose`), `GET /v1/files` (paged: `after`, `limit`, `order`, `purpose`), `GET
//! /v1/files/{id}`, `GET /v1/files/{id}/content` (the bytes as uploaded) and `DELETE
//! /v1/files/{id}` (which also removes the file from every vector store). Maps HTTP to
//! [`kiln_agent::vector_stores`] and its errors to OpenAI's; the bytes live in the run store.
//! Must not: store, chunk or search anything itself.

use super::audit::{self, AdminAction};
use super::error::{ApiError, ApiResult};
use super::multipart;
use super::request::{body_bytes, query_error};
use super::Shared;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_agent::store::{FileRecord, Page};
use kiln_agent::vector_stores::{VectorStores, VsError, MAX_FILE_BYTES};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

impl From<VsError> for ApiError {
    fn from(e: VsError) -> Self {
        match e {
            VsError::NotFound(m) => ApiError::not_found(m),
            VsError::Invalid { field, message } => ApiError::invalid(&field, message),
            VsError::TooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", m).with_code("file_too_large")
            }
            VsError::Unavailable(m) => ApiError::unavailable(m),
            VsError::Backend(m) => ApiError::internal(m),
        }
    }
}

/// The service, or a 503 while the agent layer (and its store) is not started.
pub fn service(state: &Shared) -> ApiResult<VectorStores> {
    let rt = state.agents().ok_or_else(|| ApiError::unavailable("the run store is not open yet; retry shortly"))?;
    Ok(VectorStores::new(rt.store().clone(), state.memory().cloned()))
}

/// A file object as OpenAI shapes it.
pub fn file_json(f: &FileRecord) -> Value {
    json!({"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at / 1000,
        "filename": f.filename, "purpose": f.purpose, "status": "processed", "status_details": null,
        "expires_at": null})
}

/// OpenAI's list paging: `limit` 1..=`max` (default 20), `order` asc|desc (default desc).
pub fn page(
    limit: Option<i64>,
    order: Option<&str>,
    after: Option<String>,
    before: Option<String>,
    max: i64,
) -> ApiResult<Page> {
    let limit = match limit {
        None => 20,
        Some(n) if (1..=max).contains(&n) => n as usize,
        Some(_) => return Err(ApiError::invalid("limit", format!("limit must be between 1 and {max}"))),
    };
    let desc = match order {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(ApiError::invalid("order", "order must be 'asc' or 'desc'")),
    };
    Ok(Page { limit, after, before, desc })
}

/// A list response: `data`, `first_id`, `last_id`, `has_more`.
pub fn list_json(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().map(|v| v["id"].clone());
    let last = data.last().map(|v| v["id"].clone());
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}

pub async fn create(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let body = body_bytes(body)?;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let parts = multipart::parse(&body, &multipart::boundary(ct)?)?;
    let field = |n: &str| parts.iter().find(|p| p.name == n);
    let file = field("file").ok_or_else(|| ApiError::invalid("file", "the form has no `file` field"))?;
    let purpose = field("purpose").ok_or_else(|| ApiError::invalid("purpose", "the form has no `purpose` field"))?;
    let purpose =
        std::str::from_utf8(&purpose.data).map_err(|_| ApiError::invalid("purpose", "purpose is not text"))?;
    let filename = file.filename.clone().unwrap_or_else(|| "file".into());
    if file.data.len() > MAX_FILE_BYTES {
        let m = format!("the file is {} bytes; files may be at most {MAX_FILE_BYTES} bytes", file.data.len());
        return Err(VsError::TooLarge(m).into());
    }
    let f = service(&state)?.create_file(&filename, purpose.trim(), file.data.clone()).await?;
    Ok(Json(file_json(&f)))
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListQuery {
    limit: Option<i64>,
    order: Option<String>,
    after: Option<String>,
    purpose: Option<String>,
}

pub async fn list(State(state): State<Shared>, q: Result<Query<ListQuery>, QueryRejection>) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let p = page(q.limit, q.order.as_deref(), q.after, None, 10_000)?;
    let (files, more) = service(&state)?.list_files(&p, q.purpose.as_deref()).await?;
    Ok(Json(list_json(files.iter().map(file_json).collect(), more)))
}

pub async fn get(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(file_json(&service(&state)?.file(&id).await?)))
}

pub async fn content(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<Response> {
    let bytes = service(&state)?.file_content(&id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

pub async fn delete(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<(Extension<AdminAction>, Json<Value>)> {
    service(&state)?.delete_file(&id).await?;
    Ok((audit::action("file.delete", id.clone()), Json(json!({"id": id, "object": "file", "deleted": true}))))
}
