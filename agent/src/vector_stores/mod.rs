//! Files and vector stores (OpenAI's Files and Vector Stores APIs) and their search, the data
//! behind the `file_search` tool. File bytes and the records of stores and attachments live in
//! the durable run store (`crate::store`, SQLite or Postgres); a store's chunks are memories in
//! its own memory scope (`vs:{id}`), embedded in one batch per file through the memory store and
//! searched through [`MemoryStore::search`] (hybrid: dense + BM25, fused by rank).
//!
//! Attaching a file ingests it before answering (its status is `completed` or the request fails),
//! so there is no background work to lose on a restart. Owns: validation of what clients send
//! (ids, metadata, attributes), ids, file counts. Must not: know HTTP or OpenAI's JSON shapes (the
//! server renders the records), or touch the memory store's internals.

mod batch;
pub mod chunk;
pub mod filter;
mod ingest;
mod search;

pub use batch::{Batch, BatchFile, MAX_BATCH_FILES};
pub use chunk::Chunking;
pub use filter::Filter;
pub use search::{SearchHit, SearchRequest, MAX_RESULTS};

use crate::memory::{MemoryError, MemoryStore, Scope};
use crate::store::{FileRecord, Page, RunStore, StoreError, VectorStoreRow, VsFileRow};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Largest file accepted by `create_file`.
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// File purposes OpenAI defines (kept as given; only text files can join a vector store).
pub const PURPOSES: [&str; 6] = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"];
/// OpenAI's limits on `metadata` and `attributes`: pairs, key length, string value length.
const MAX_PAIRS: usize = 16;
const MAX_KEY: usize = 64;
const MAX_VALUE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum VsError {
    #[error("{0}")]
    NotFound(String),
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    TooLarge(String),
    /// The embedding model or the memory store cannot serve now (or is not configured).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Backend(String),
}

impl From<StoreError> for VsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => VsError::NotFound(m),
            other => VsError::Backend(other.to_string()),
        }
    }
}

impl From<MemoryError> for VsError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::NotFound(m) => VsError::NotFound(m),
            MemoryError::Invalid { field, message } => VsError::Invalid { field: field.into(), message },
            MemoryError::Unavailable(m) => VsError::Unavailable(m),
            MemoryError::Backend(m) => VsError::Backend(m),
        }
    }
}

pub type Result<T, E = VsError> = std::result::Result<T, E>;

fn invalid(field: &str, message: impl Into<String>) -> VsError {
    VsError::Invalid { field: field.to_string(), message: message.into() }
}

/// How many of a store's files are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FileCounts {
    pub in_progress: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub total: u64,
}

/// A vector store as clients see it. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorStore {
    pub id: String,
    pub name: Option<String>,
    pub metadata: Map<String, Value>,
    /// OpenAI's `{"anchor": "last_active_at", "days": N}`, echoed (kiln does not expire stores).
    pub expires_after: Option<Value>,
    pub created_at: i64,
    pub last_active_at: i64,
    pub file_counts: FileCounts,
    /// Bytes of the text of its completed files.
    pub usage_bytes: i64,
}

/// What an attachment records beside its ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsFileBody {
    /// `in_progress` (being ingested), `completed` or `failed`.
    pub status: String,
    pub usage_bytes: i64,
    pub attributes: Map<String, Value>,
    pub chunking: Chunking,
    /// `(code, message)` of a failed ingestion.
    pub last_error: Option<(String, String)>,
    pub chunks: usize,
}

/// A file attached to a vector store.
#[derive(Debug, Clone, PartialEq)]
pub struct VsFile {
    pub vector_store_id: String,
    pub file_id: String,
    pub created_at: i64,
    pub body: VsFileBody,
}

impl VsFile {
    fn from_row(r: VsFileRow) -> Result<Self> {
        let body = serde_json::from_value(r.body).map_err(|e| {
            VsError::Backend(format!("attachment {}/{} does not parse: {e}", r.vector_store_id, r.file_id))
        })?;
        Ok(VsFile { vector_store_id: r.vector_store_id, file_id: r.file_id, created_at: r.created_at, body })
    }
}

/// What a new store is made of.
#[derive(Debug, Clone, Default)]
pub struct NewStore {
    pub name: Option<String>,
    pub metadata: Map<String, Value>,
    pub expires_after: Option<Value>,
    /// Files to attach at once (with `chunking_strategy`).
    pub file_ids: Vec<String>,
    pub chunking_strategy: Option<Value>,
}

/// A change to a store; `None` keeps the field.
#[derive(Debug, Clone, Default)]
pub struct StorePatch {
    pub name: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub expires_after: Option<Value>,
}

/// One page of a list and whether more follow.
pub type Listed<T> = (Vec<T>, bool);

/// The files and vector stores service; cheap to clone.
#[derive(Clone)]
pub struct VectorStores {
    store: RunStore,
    /// `None` without an embedding model: files work, vector stores answer `Unavailable`.
    memory: Option<MemoryStore>,
}

fn now_ms() -> i64 {
    crate::store::now_ms()
}

/// A time-ordered id (UUIDv7, hex) with OpenAI's prefix: lists page by id.
fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

/// Whether `id` could be one of ours (`file-` / `vs_` + hex): anything else (a NUL byte, which
/// Postgres refuses in TEXT, a kilobyte of junk) is answered without asking the database.
fn plausible(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A page whose cursors are plausible ids (else a 400 naming the cursor).
fn check_page(page: &Page) -> Result<()> {
    for (name, v) in [("after", &page.after), ("before", &page.before)] {
        if v.as_deref().is_some_and(|v| !plausible(v)) {
            return Err(invalid(name, format!("`{name}` must be an object id")));
        }
    }
    Ok(())
}

/// Validates OpenAI-style metadata (string values) or attributes (strings, numbers, booleans).
pub fn check_pairs(field: &str, m: &Map<String, Value>, strings_only: bool) -> Result<()> {
    if m.len() > MAX_PAIRS {
        return Err(invalid(field, format!("at most {MAX_PAIRS} keys")));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_KEY {
            return Err(invalid(field, format!("keys are 1 to {MAX_KEY} characters (`{k}`)")));
        }
        let ok = match v {
            Value::String(s) => s.len() <= MAX_VALUE,
            Value::Number(_) | Value::Bool(_) => !strings_only,
            _ => false,
        };
        if !ok {
            let want = if strings_only { "strings" } else { "strings, numbers or booleans" };
            return Err(invalid(
                field,
                format!("values are {want} (strings up to {MAX_VALUE} characters); `{k}` is not"),
            ));
        }
    }
    Ok(())
}

impl VectorStores {
    pub fn new(store: RunStore, memory: Option<MemoryStore>) -> Self {
        Self { store, memory }
    }

    pub(crate) fn memory(&self) -> Result<&MemoryStore> {
        self.memory.as_ref().ok_or_else(|| {
            VsError::Unavailable("vector stores need an embedding model; start kiln with --embedding-model PATH".into())
        })
    }

    // Files.

    pub async fn create_file(&self, filename: &str, purpose: &str, content: Vec<u8>) -> Result<FileRecord> {
        if !PURPOSES.contains(&purpose) {
            return Err(invalid("purpose", format!("purpose must be one of {}", PURPOSES.join(", "))));
        }
        if filename.is_empty() || filename.len() > 512 || filename.contains('\0') {
            return Err(invalid("file", "the file needs a filename of 1 to 512 bytes, without NUL"));
        }
        if content.len() > MAX_FILE_BYTES {
            return Err(VsError::TooLarge(format!(
                "the file is {} bytes; the limit is {MAX_FILE_BYTES}",
                content.len()
            )));
        }
        let f = FileRecord {
            id: new_id("file-"),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes: content.len() as i64,
            created_at: now_ms(),
        };
        self.store.put_file(&f, &content).await?;
        Ok(f)
    }

    pub async fn file(&self, id: &str) -> Result<FileRecord> {
        let found = if plausible(id) { self.store.get_file(id).await? } else { None };
        found.ok_or_else(|| VsError::NotFound(format!("No such File object: {id}")))
    }

    pub async fn file_content(&self, id: &str) -> Result<Vec<u8>> {
        let found = if plausible(id) { self.store.file_content(id).await? } else { None };
        found.ok_or_else(|| VsError::NotFound(format!("No such File object: {id}")))
    }

    pub async fn list_files(&self, page: &Page, purpose: Option<&str>) -> Result<Listed<FileRecord>> {
        check_page(page)?;
        if purpose.is_some_and(|p| !PURPOSES.contains(&p)) {
            return Ok((Vec::new(), false));
        }
        let mut rows = self.store.list_files(&Page { limit: page.limit + 1, ..page.clone() }, purpose).await?;
        let more = rows.len() > page.limit;
        rows.truncate(page.limit);
        Ok((rows, more))
    }

    /// Deletes a file, and first removes it (and its chunks) from every vector store, as OpenAI does.
    pub async fn delete_file(&self, id: &str) -> Result<()> {
        self.file(id).await?;
        for a in self.store.attachments_of(id).await? {
            self.detach(&a.vector_store_id, id).await?;
        }
        self.store.delete_file(id).await?;
        Ok(())
    }

    // Vector stores.

    pub async fn create(&self, new: NewStore) -> Result<VectorStore> {
        self.memory()?;
        check_pairs("metadata", &new.metadata, true)?;
        check_expiry(new.expires_after.as_ref())?;
        for (i, f) in new.file_ids.iter().enumerate() {
            self.file(f).await.map_err(|_| invalid(&format!("file_ids[{i}]"), format!("no file `{f}`")))?;
        }
        let now = now_ms();
        let body = json!({"name": new.name, "metadata": new.metadata, "expires_after": new.expires_after,
            "last_active_at": now});
        let row = VectorStoreRow { id: new_id("vs_"), body, created_at: now };
        self.store.put_vector_store(&row).await?;
        for f in &new.file_ids {
            self.attach(&row.id, f, Map::new(), new.chunking_strategy.as_ref()).await?;
        }
        self.get(&row.id).await
    }

    async fn row(&self, id: &str) -> Result<VectorStoreRow> {
        let found = if plausible(id) { self.store.get_vector_store(id).await? } else { None };
        found.ok_or_else(|| VsError::NotFound(format!("No vector store found with id '{id}'.")))
    }

    async fn render(&self, row: VectorStoreRow) -> Result<VectorStore> {
        let mut counts = FileCounts::default();
        let mut usage = 0;
        for f in self.store.all_vs_files(&row.id).await? {
            let f = VsFile::from_row(f)?;
            match f.body.status.as_str() {
                "completed" => counts.completed += 1,
                "failed" => counts.failed += 1,
                "cancelled" => counts.cancelled += 1,
                _ => counts.in_progress += 1,
            }
            counts.total += 1;
            usage += f.body.usage_bytes;
        }
        let b = &row.body;
        Ok(VectorStore {
            name: b["name"].as_str().map(str::to_string),
            metadata: b["metadata"].as_object().cloned().unwrap_or_default(),
            expires_after: Some(b["expires_after"].clone()).filter(|v| !v.is_null()),
            last_active_at: b["last_active_at"].as_i64().unwrap_or(row.created_at),
            created_at: row.created_at,
            id: row.id,
            file_counts: counts,
            usage_bytes: usage,
        })
    }

    pub async fn get(&self, id: &str) -> Result<VectorStore> {
        let row = self.row(id).await?;
        self.render(row).await
    }

    pub async fn list(&self, page: &Page) -> Result<Listed<VectorStore>> {
        check_page(page)?;
        let mut rows = self.store.list_vector_stores(&Page { limit: page.limit + 1, ..page.clone() }).await?;
        let more = rows.len() > page.limit;
        rows.truncate(page.limit);
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.render(r).await?);
        }
        Ok((out, more))
    }

    pub async fn update(&self, id: &str, patch: StorePatch) -> Result<VectorStore> {
        let mut row = self.row(id).await?;
        if let Some(m) = &patch.metadata {
            check_pairs("metadata", m, true)?;
            row.body["metadata"] = Value::Object(m.clone());
        }
        if let Some(n) = patch.name {
            row.body["name"] = json!(n);
        }
        if let Some(e) = patch.expires_after {
            check_expiry(Some(&e))?;
            row.body["expires_after"] = e;
        }
        row.body["last_active_at"] = json!(now_ms());
        self.store.put_vector_store(&row).await?;
        self.render(row).await
    }

    /// Deletes a store: its chunks first, then its records.
    pub async fn delete(&self, id: &str) -> Result<()> {
        self.row(id).await?;
        self.memory()?.delete_scope(&Scope::VectorStore(id.to_string())).await?;
        self.store.delete_vector_store(id).await?;
        Ok(())
    }

    pub async fn vs_file(&self, vs: &str, file: &str) -> Result<VsFile> {
        self.row(vs).await?;
        let row = if plausible(file) { self.store.get_vs_file(vs, file).await? } else { None };
        VsFile::from_row(
            row.ok_or_else(|| VsError::NotFound(format!("No file found with id '{file}' in vector store '{vs}'.")))?,
        )
    }

    /// A page of a store's files, optionally only those of one status.
    pub async fn list_vs_files(&self, vs: &str, page: &Page, status: Option<&str>) -> Result<Listed<VsFile>> {
        check_page(page)?;
        self.row(vs).await?;
        let mut out = Vec::new();
        let mut cursor = page.clone();
        // Status is in the JSON body: page through rows until the page is full or they run out.
        loop {
            let rows = self.store.list_vs_files(vs, &Page { limit: page.limit + 1, ..cursor.clone() }).await?;
            let exhausted = rows.len() <= page.limit;
            let last = rows.last().map(|r| r.file_id.clone());
            for r in rows {
                let f = VsFile::from_row(r)?;
                if status.is_none_or(|s| s == f.body.status) {
                    out.push(f);
                }
            }
            if out.len() > page.limit || exhausted {
                break;
            }
            cursor.after = last;
        }
        let more = out.len() > page.limit;
        out.truncate(page.limit);
        Ok((out, more))
    }
}

/// `expires_after`: `{"anchor": "last_active_at", "days": 1..=365}` or nothing.
fn check_expiry(v: Option<&Value>) -> Result<()> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(()) };
    let ok = v["anchor"] == "last_active_at" && v["days"].as_u64().is_some_and(|d| (1..=365).contains(&d));
    if !ok {
        return Err(invalid(
            "expires_after",
            "expires_after must be {\"anchor\": \"last_active_at\", \"days\": 1..365}",
        ));
    }
    Ok(())
}
