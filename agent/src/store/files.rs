//! Files and vector stores in the run store: uploaded file bytes and their metadata, vector store
//! records and the (store, file) attachments with the memory ids of their chunks. Owns these
//! tables' statements and paging. Must not: chunk, embed or interpret anything (the vector store
//! service in `crate::vector_stores` does).

use super::{parse_json, to_json_text, Result, RunStore};
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

/// An uploaded file's metadata (its bytes are read separately). Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub created_at: i64,
}

/// A vector store: its id, its JSON body (name, metadata, expiry...) and creation time.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorStoreRow {
    pub id: String,
    pub body: Value,
    pub created_at: i64,
}

/// A file attached to a vector store: its JSON body (status, attributes, chunking, usage) and the
/// memory ids of its chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct VsFileRow {
    pub vector_store_id: String,
    pub file_id: String,
    pub body: Value,
    pub chunk_ids: Vec<String>,
    pub created_at: i64,
}

/// One page of a list ordered by id (ids are time-ordered): `limit` rows after / before the
/// given ids (exclusive), newest first when `desc`. Callers ask for `limit + 1` to learn `has_more`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub limit: usize,
    pub after: Option<String>,
    pub before: Option<String>,
    pub desc: bool,
}

impl Page {
    /// ` AND id < $n ...` conditions and `ORDER BY ... LIMIT ...` for column `col`, numbering
    /// placeholders from `first`; returns the SQL tail and the values to bind, in order.
    fn sql(&self, col: &str, first: usize) -> (String, Vec<String>) {
        let (after_op, before_op, dir) = if self.desc { ("<", ">", "DESC") } else { (">", "<", "ASC") };
        let mut sql = String::new();
        let mut binds = Vec::new();
        for (op, v) in [(after_op, &self.after), (before_op, &self.before)] {
            if let Some(v) = v {
                sql.push_str(&format!(" AND {col} {op} ${}", first + binds.len()));
                binds.push(v.clone());
            }
        }
        sql.push_str(&format!(" ORDER BY {col} {dir} LIMIT {}", self.limit));
        (sql, binds)
    }
}

fn file_row(r: &AnyRow) -> Result<FileRecord> {
    Ok(FileRecord {
        id: r.try_get("id")?,
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
        bytes: r.try_get("bytes")?,
        created_at: r.try_get("created_at")?,
    })
}

fn vs_row(r: &AnyRow) -> Result<VectorStoreRow> {
    Ok(VectorStoreRow {
        id: r.try_get("id")?,
        body: parse_json(&r.try_get::<String, _>("body")?)?,
        created_at: r.try_get("created_at")?,
    })
}

fn vs_file_row(r: &AnyRow) -> Result<VsFileRow> {
    let ids = parse_json(&r.try_get::<String, _>("chunk_ids")?)?;
    Ok(VsFileRow {
        vector_store_id: r.try_get("vector_store_id")?,
        file_id: r.try_get("file_id")?,
        body: parse_json(&r.try_get::<String, _>("body")?)?,
        chunk_ids: serde_json::from_value(ids).unwrap_or_default(),
        created_at: r.try_get("created_at")?,
    })
}

const FILE_COLS: &str = "id, filename, purpose, bytes, created_at";
const VS_FILE_COLS: &str = "vector_store_id, file_id, body, chunk_ids, created_at";

impl RunStore {
    pub async fn put_file(&self, f: &FileRecord, content: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO kiln_files (id, filename, purpose, bytes, content, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&f.id)
        .bind(&f.filename)
        .bind(&f.purpose)
        .bind(f.bytes)
        .bind(content.to_vec())
        .bind(f.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRecord>> {
        let sql = format!("SELECT {FILE_COLS} FROM kiln_files WHERE id = $1");
        let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(file_row).transpose()
    }

    pub async fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let row =
            sqlx::query("SELECT content FROM kiln_files WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get::<Vec<u8>, _>(0)).transpose()?)
    }

    /// A page of files, optionally of one `purpose`.
    pub async fn list_files(&self, page: &Page, purpose: Option<&str>) -> Result<Vec<FileRecord>> {
        let (tail, binds) = page.sql("id", 2);
        let sql = format!("SELECT {FILE_COLS} FROM kiln_files WHERE ($1 = '' OR purpose = $1){tail}");
        let mut q = sqlx::query(&sql).bind(purpose.unwrap_or_default().to_string());
        for b in binds {
            q = q.bind(b);
        }
        q.fetch_all(&self.pool).await?.iter().map(file_row).collect()
    }

    pub async fn delete_file(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM kiln_files WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Inserts or replaces a vector store's record.
    pub async fn put_vector_store(&self, v: &VectorStoreRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO kiln_vector_stores (id, body, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )
        .bind(&v.id)
        .bind(to_json_text(&v.body))
        .bind(v.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_vector_store(&self, id: &str) -> Result<Option<VectorStoreRow>> {
        let row = sqlx::query("SELECT id, body, created_at FROM kiln_vector_stores WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(vs_row).transpose()
    }

    pub async fn list_vector_stores(&self, page: &Page) -> Result<Vec<VectorStoreRow>> {
        let (tail, binds) = page.sql("id", 1);
        let sql = format!("SELECT id, body, created_at FROM kiln_vector_stores WHERE 1 = 1{tail}");
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(b);
        }
        q.fetch_all(&self.pool).await?.iter().map(vs_row).collect()
    }

    /// Deletes a vector store and its attachment rows (one transaction); false if there was none.
    pub async fn delete_vector_store(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM kiln_vector_store_files WHERE vector_store_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM kiln_vector_stores WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Inserts or replaces one attachment.
    pub async fn put_vs_file(&self, f: &VsFileRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO kiln_vector_store_files (vector_store_id, file_id, body, chunk_ids, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (vector_store_id, file_id) \
             DO UPDATE SET body = excluded.body, chunk_ids = excluded.chunk_ids",
        )
        .bind(&f.vector_store_id)
        .bind(&f.file_id)
        .bind(to_json_text(&f.body))
        .bind(to_json_text(&Value::from(f.chunk_ids.clone())))
        .bind(f.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_vs_file(&self, vs: &str, file: &str) -> Result<Option<VsFileRow>> {
        let sql =
            format!("SELECT {VS_FILE_COLS} FROM kiln_vector_store_files WHERE vector_store_id = $1 AND file_id = $2");
        let row = sqlx::query(&sql).bind(vs).bind(file).fetch_optional(&self.pool).await?;
        row.as_ref().map(vs_file_row).transpose()
    }

    /// A page of a store's attachments, ordered by file id (upload order).
    pub async fn list_vs_files(&self, vs: &str, page: &Page) -> Result<Vec<VsFileRow>> {
        let (tail, binds) = page.sql("file_id", 2);
        let sql = format!("SELECT {VS_FILE_COLS} FROM kiln_vector_store_files WHERE vector_store_id = $1{tail}");
        let mut q = sqlx::query(&sql).bind(vs);
        for b in binds {
            q = q.bind(b);
        }
        q.fetch_all(&self.pool).await?.iter().map(vs_file_row).collect()
    }

    /// Every attachment of a store (for its file counts and usage).
    pub async fn all_vs_files(&self, vs: &str) -> Result<Vec<VsFileRow>> {
        let sql = format!("SELECT {VS_FILE_COLS} FROM kiln_vector_store_files WHERE vector_store_id = $1");
        sqlx::query(&sql).bind(vs).fetch_all(&self.pool).await?.iter().map(vs_file_row).collect()
    }

    /// Every attachment of a file, in any store.
    pub async fn attachments_of(&self, file: &str) -> Result<Vec<VsFileRow>> {
        let sql = format!("SELECT {VS_FILE_COLS} FROM kiln_vector_store_files WHERE file_id = $1");
        sqlx::query(&sql).bind(file).fetch_all(&self.pool).await?.iter().map(vs_file_row).collect()
    }

    pub async fn delete_vs_file(&self, vs: &str, file: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM kiln_vector_store_files WHERE vector_store_id = $1 AND file_id = $2")
            .bind(vs)
            .bind(file)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sql_numbers_its_placeholders() {
        let p = Page { limit: 3, after: Some("b".into()), before: None, desc: true };
        assert_eq!(p.sql("id", 2), (" AND id < $2 ORDER BY id DESC LIMIT 3".to_string(), vec!["b".to_string()]));
        let p = Page { limit: 5, after: Some("a".into()), before: Some("z".into()), desc: false };
        let (sql, binds) = p.sql("id", 1);
        assert_eq!(sql, " AND id > $1 AND id < $2 ORDER BY id ASC LIMIT 5");
        assert_eq!(binds.len(), 2);
    }

    #[tokio::test]
    async fn files_and_vector_stores_round_trip_in_sqlite() {
        let s = RunStore::open("sqlite::memory:").await.unwrap();
        let bytes: Vec<u8> = (0..=255u8).collect();
        for (i, id) in ["file-a", "file-b", "file-c"].iter().enumerate() {
            let f = FileRecord {
                id: id.to_string(),
                filename: format!("{i}.bin"),
                purpose: "assistants".into(),
                bytes: 256,
                created_at: i as i64,
            };
            s.put_file(&f, &bytes).await.unwrap();
        }
        assert_eq!(s.file_content("file-b").await.unwrap().unwrap(), bytes, "binary content survives");
        let page = Page { limit: 2, after: Some("file-c".into()), before: None, desc: true };
        let ids: Vec<String> = s.list_files(&page, None).await.unwrap().into_iter().map(|f| f.id).collect();
        assert_eq!(ids, ["file-b", "file-a"]);
        assert!(s.list_files(&page, Some("batch")).await.unwrap().is_empty());
        let vs = VectorStoreRow { id: "vs_1".into(), body: serde_json::json!({"name": "n"}), created_at: 1 };
        s.put_vector_store(&vs).await.unwrap();
        let row = VsFileRow {
            vector_store_id: "vs_1".into(),
            file_id: "file-a".into(),
            body: serde_json::json!({"status": "completed"}),
            chunk_ids: vec!["c1".into()],
            created_at: 2,
        };
        s.put_vs_file(&row).await.unwrap();
        assert_eq!(s.get_vs_file("vs_1", "file-a").await.unwrap().unwrap(), row);
        assert_eq!(s.attachments_of("file-a").await.unwrap().len(), 1);
        assert!(s.delete_vector_store("vs_1").await.unwrap());
        assert!(s.all_vs_files("vs_1").await.unwrap().is_empty());
        assert!(s.delete_file("file-a").await.unwrap() && !s.delete_file("file-a").await.unwrap());
    }
}
