//! Attaching a file to a vector store (read its text, chunk it by tokens, embed every chunk in one
//! batch and store them in the store's scope) and detaching it (its chunks deleted by id).
//! The attachment row is written `in_progress` before any chunk, and `completed` (with the chunks'
//! ids) after they are durable, so a detach always knows what to delete.
//! Must not: search, or write outside the store's own scope.

use super::{check_pairs, chunk, filter, invalid, now_ms, Result, VectorStores, VsError, VsFile, VsFileBody};
use crate::memory::{NewMemory, Scope};
use crate::store::VsFileRow;
use serde_json::{json, Map, Value};

/// The file's bytes as text, or a 400 saying why they are not: vector stores take UTF-8 text
/// (text, markdown, code, JSON, CSV...). A NUL byte marks a binary file even when it decodes.
fn text_of(file_id: &str, filename: &str, bytes: Vec<u8>) -> Result<String> {
    let not_text = |why: &str| {
        invalid(
            "file_id",
            format!(
                "file '{file_id}' ({filename}) {why}: vector stores take UTF-8 text files \
                 (plain text, markdown, code, JSON, CSV); convert other formats to text first"
            ),
        )
    };
    let text = String::from_utf8(bytes).map_err(|_| not_text("is not UTF-8 text"))?;
    if text.contains('\0') {
        return Err(not_text("contains NUL bytes (a binary file)"));
    }
    if text.trim().is_empty() {
        return Err(not_text("has no text"));
    }
    Ok(text)
}

/// A chunk's memory metadata: where it comes from, the file's attributes (read back as they
/// are), and each string/boolean attribute again as `attr_{key}` for the store's exact filter.
fn chunk_metadata(file_id: &str, filename: &str, index: usize, attrs: &Map<String, Value>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("file_id".into(), json!(file_id));
    m.insert("filename".into(), json!(filename));
    m.insert("chunk".into(), json!(index));
    m.insert("attributes".into(), Value::Object(attrs.clone()));
    for (k, v) in attrs {
        if (v.is_string() || v.is_boolean()) && filter::pushable_key(k) {
            m.insert(filter::attr_field(k), v.clone());
        }
    }
    m
}

impl VectorStores {
    /// Attaches (or re-attaches, replacing its chunks) file `file_id` to store `vs`.
    pub async fn attach(
        &self,
        vs: &str,
        file_id: &str,
        attributes: Map<String, Value>,
        strategy: Option<&Value>,
    ) -> Result<VsFile> {
        let memory = self.memory()?.clone();
        self.row(vs).await?;
        check_pairs("attributes", &attributes, false)?;
        let file = self.file(file_id).await?;
        let embedder = memory.embedder().clone();
        let chunking = chunk::strategy(strategy, chunk::model_max_tokens(&embedder))?;
        let text = text_of(file_id, &file.filename, self.file_content(file_id).await?)?;
        if self.store.get_vs_file(vs, file_id).await?.is_some() {
            self.detach(vs, file_id).await?;
        }
        let mut body = VsFileBody {
            status: "in_progress".into(),
            usage_bytes: 0,
            attributes: attributes.clone(),
            chunking: chunking.clone(),
            last_error: None,
            chunks: 0,
        };
        let mut row = VsFileRow {
            vector_store_id: vs.to_string(),
            file_id: file_id.to_string(),
            body: to_value(&body)?,
            chunk_ids: Vec::new(),
            created_at: now_ms(),
        };
        self.store.put_vs_file(&row).await?;
        let (e, t, c) = (embedder.clone(), text.clone(), chunking.clone());
        let pieces = tokio::task::spawn_blocking(move || chunk::split(&e, &t, &c))
            .await
            .map_err(|e| VsError::Backend(format!("chunking task failed: {e}")))?;
        let items = pieces.map(|p| {
            p.into_iter()
                .enumerate()
                .map(|(i, text)| NewMemory {
                    metadata: chunk_metadata(file_id, &file.filename, i, &attributes),
                    text,
                    ..NewMemory::default()
                })
                .collect::<Vec<_>>()
        });
        let stored = match items {
            Ok(items) => memory.add(&Scope::VectorStore(vs.to_string()), items).await.map_err(VsError::from),
            Err(e) => Err(e),
        };
        match stored {
            Ok(chunks) => {
                body.status = "completed".into();
                body.usage_bytes = text.len() as i64;
                body.chunks = chunks.len();
                row.chunk_ids = chunks.into_iter().map(|m| m.id).collect();
            }
            Err(e) => {
                // Recorded, so the store's file counts say it failed; the caller gets the error.
                body.status = "failed".into();
                body.last_error = Some(("server_error".into(), e.to_string()));
                row.body = to_value(&body)?;
                self.store.put_vs_file(&row).await?;
                return Err(e);
            }
        }
        row.body = to_value(&body)?;
        self.store.put_vs_file(&row).await?;
        // Read again: the record may have changed (a rename, a batch) while the file was ingested.
        let mut store_row = self.row(vs).await?;
        store_row.body["last_active_at"] = json!(now_ms());
        self.store.put_vector_store(&store_row).await?;
        VsFile::from_row(row)
    }

    /// Removes a file from a store: its chunks, then its attachment row.
    pub async fn detach(&self, vs: &str, file_id: &str) -> Result<()> {
        self.row(vs).await?;
        let row = if super::plausible(file_id) { self.store.get_vs_file(vs, file_id).await? } else { None };
        let row =
            row.ok_or_else(|| VsError::NotFound(format!("No file found with id '{file_id}' in vector store '{vs}'.")))?;
        if !row.chunk_ids.is_empty() {
            let memory = self.memory()?;
            let scope = Scope::VectorStore(vs.to_string());
            for id in &row.chunk_ids {
                match memory.delete(&scope, id).await {
                    Ok(()) | Err(crate::memory::MemoryError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.store.delete_vs_file(vs, file_id).await?;
        Ok(())
    }
}

fn to_value(b: &VsFileBody) -> Result<Value> {
    serde_json::to_value(b).map_err(|e| VsError::Backend(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_text_files_are_ingested() {
        assert!(text_of("f", "a.md", b"# Title\n\nSome text.".to_vec()).is_ok());
        for bad in [vec![0xff, 0xfe, 0x00, 0x41], b"PK\x03\x04\0\0".to_vec(), b"   \n".to_vec()] {
            match text_of("f", "x.bin", bad) {
                Err(VsError::Invalid { field, message }) => {
                    assert_eq!(field, "file_id");
                    assert!(message.contains("UTF-8 text files"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn chunk_metadata_carries_filterable_attributes() {
        let attrs: Map<String, Value> =
            serde_json::from_value(json!({"region": "eu", "year": 2023, "odd key": "x"})).unwrap();
        let m = chunk_metadata("file-1", "a.txt", 3, &attrs);
        assert_eq!(m["attr_region"], "eu");
        assert!(!m.contains_key("attr_year") && !m.contains_key("attr_odd key"));
        assert_eq!(m["attributes"]["year"], 2023);
    }
}
