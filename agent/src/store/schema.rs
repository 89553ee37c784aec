//! The store's schema as embedded, numbered migrations, applied at open. It owns DDL only; data
//! statements live beside the methods that use them.
//!
//! Each migration runs once, in a transaction that also records its version, so opening a store
//! again (or a newer kiln opening an older store) is idempotent. Never edit a released migration:
//! append a new one. Tables are prefixed `kiln_` so they can live in a shared Postgres database.

use super::{now_ms, Backend, Result, RunStore};

/// (version, statements). SQL here must mean the same in SQLite and Postgres: TEXT for strings and
/// JSON, BIGINT for integers and unix-millisecond times.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE IF NOT EXISTS kiln_agents (
            name TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS kiln_runs (
            id TEXT PRIMARY KEY,
            agent TEXT NOT NULL,
            status TEXT NOT NULL,
            input TEXT NOT NULL,
            output TEXT,
            usage TEXT NOT NULL,
            error TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            lease_owner TEXT,
            lease_until BIGINT
        )",
            "CREATE INDEX IF NOT EXISTS kiln_runs_agent_created ON kiln_runs (agent, created_at)",
            "CREATE INDEX IF NOT EXISTS kiln_runs_status ON kiln_runs (status)",
            // (run_id, seq) is the primary key: two appends can never record the same seq.
            "CREATE TABLE IF NOT EXISTS kiln_steps (
            run_id TEXT NOT NULL REFERENCES kiln_runs (id) ON DELETE CASCADE,
            seq BIGINT NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            idempotency_key TEXT,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (run_id, seq)
        )",
            // NULL keys are distinct in both databases, so only keyed steps are constrained.
            "CREATE UNIQUE INDEX IF NOT EXISTS kiln_steps_key ON kiln_steps (run_id, idempotency_key)",
            "CREATE TABLE IF NOT EXISTS kiln_responses (
            id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )",
        ],
    ),
    // Stored responses expire by age (`RunStore::prune_responses`).
    (2, &["CREATE INDEX IF NOT EXISTS kiln_responses_created ON kiln_responses (created_at)"]),
    // Files and vector stores (OpenAI's Files and Vector Stores APIs). Ids are time-ordered
    // (UUIDv7), so `ORDER BY id` is creation order and `after` paging is one range condition.
    // `content` is BYTEA: Postgres' binary type; SQLite takes any type name and keeps a bound
    // blob as a blob (BYTEA gets NUMERIC affinity, which never converts blobs).
    (
        3,
        &[
            "CREATE TABLE IF NOT EXISTS kiln_files (
            id TEXT PRIMARY KEY,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            content BYTEA NOT NULL,
            created_at BIGINT NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS kiln_vector_stores (
            id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )",
            // One row per (store, file): status, chunking, attributes and the chunks' memory ids
            // (so a detach deletes exactly those chunks).
            "CREATE TABLE IF NOT EXISTS kiln_vector_store_files (
            vector_store_id TEXT NOT NULL,
            file_id TEXT NOT NULL,
            body TEXT NOT NULL,
            chunk_ids TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (vector_store_id, file_id)
        )",
            "CREATE INDEX IF NOT EXISTS kiln_vector_store_files_file ON kiln_vector_store_files (file_id)",
        ],
    ),
];

/// An arbitrary constant naming kiln's migration lock among Postgres advisory locks.
const PG_MIGRATION_LOCK: i64 = 0x6b696c6e_6d696772; // "kilnmigr"

/// Applies every migration not yet recorded.
pub(super) async fn migrate(store: &RunStore) -> Result<()> {
    // SQLite: take the write lock at BEGIN. A deferred transaction would read the applied
    // versions first and fail (SQLITE_BUSY, not retried) when another process migrated meanwhile;
    // IMMEDIATE waits its turn (busy timeout) and then reads what the other one applied.
    let mut tx = match store.backend {
        Backend::Sqlite => store.pool.begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => store.pool.begin().await?,
    };
    if store.backend == Backend::Postgres {
        // Two kiln processes opening one fresh database would otherwise race on CREATE TABLE
        // (IF NOT EXISTS is not safe under concurrency in Postgres). Released at commit.
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_MIGRATION_LOCK).execute(&mut *tx).await?;
    }
    sqlx::query("CREATE TABLE IF NOT EXISTS kiln_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    for (version, statements) in MIGRATIONS {
        let done = sqlx::query("SELECT version FROM kiln_migrations WHERE version = $1")
            .bind(*version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_some() {
            continue;
        }
        for sql in *statements {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO kiln_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
