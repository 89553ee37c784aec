//! The durable run store: agents, runs, steps, leases, stored responses, and uploaded files and
//! vector store records (`files.rs`), in SQLite (default)
//! or Postgres through one sqlx code path.
//!
//! It owns the schema (embedded migrations, run at open), the record types and every SQL statement.
//! It must not interpret runs (the tool loop in `run.rs` does) nor know about HTTP.
//!
//! Why sqlx's `Any` driver: it keeps ONE set of SQL statements for both backends, where an enum
//! over two pools would need every query written (or macro-expanded) twice. The price is Any's
//! small type set, so JSON is stored as TEXT (serialised by serde_json) and times as BIGINT unix
//! milliseconds; statements use `$N` placeholders, which SQLite accepts as well. The only
//! backend-specific code is connection setup (SQLite: WAL, create-if-missing; Postgres: an
//! advisory lock around migrations so two processes opening one database do not race).

mod files;
mod leases;
mod runs;
mod schema;

pub use files::{FileRecord, Page, VectorStoreRow, VsFileRow};

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Row};

/// Errors of the store. `NotFound` and `Conflict` are the caller's business (404/409); `Backend`
/// is the database failing or being unreachable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("store backend: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return StoreError::Conflict(db.message().to_string());
            }
        }
        StoreError::Backend(e.to_string())
    }
}

/// A stored JSON column that does not parse is corruption, not a caller error.
fn parse_json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Backend(format!("stored JSON does not parse: {e}")))
}

fn to_json_text(v: &Value) -> String {
    v.to_string()
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where a run is in its life. Stored and serialised as snake_case strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    InProgress,
    RequiresAction,
    Completed,
    Incomplete,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::InProgress,
        RunStatus::RequiresAction,
        RunStatus::Completed,
        RunStatus::Incomplete,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// A terminal run never changes status again and is never claimed.
    pub fn is_terminal(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::Incomplete | RunStatus::Failed | RunStatus::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::InProgress => "in_progress",
            RunStatus::RequiresAction => "requires_action",
            RunStatus::Completed => "completed",
            RunStatus::Incomplete => "incomplete",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for RunStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| StoreError::Backend(format!("unknown run status `{s}` in the store")))
    }
}

/// What a step records. Stored and serialised as snake_case strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    ModelOutput,
    ToolCall,
    ToolResult,
    Status,
    Approval,
}

impl StepKind {
    pub const ALL: [StepKind; 5] =
        [StepKind::ModelOutput, StepKind::ToolCall, StepKind::ToolResult, StepKind::Status, StepKind::Approval];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::ModelOutput => "model_output",
            StepKind::ToolCall => "tool_call",
            StepKind::ToolResult => "tool_result",
            StepKind::Status => "status",
            StepKind::Approval => "approval",
        }
    }
}

impl FromStr for StepKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        StepKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| StoreError::Backend(format!("unknown step kind `{s}` in the store")))
    }
}

/// One run of an agent. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub agent: String,
    pub status: RunStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub usage: Value,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The process working the run, while its lease lasts (see `leases.rs`).
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
}

impl RunRecord {
    /// A new queued run with a fresh id (`run_` + a random UUID) and no output, usage or lease.
    pub fn new(agent: &str, input: Value) -> RunRecord {
        let now = now_ms();
        RunRecord {
            id: format!("run_{}", uuid::Uuid::new_v4().simple()),
            agent: agent.to_string(),
            status: RunStatus::Queued,
            input,
            output: None,
            usage: Value::Object(Default::default()),
            error: None,
            created_at: now,
            updated_at: now,
            lease_owner: None,
            lease_until: None,
        }
    }
}

/// One recorded step of a run; `seq` counts 0, 1, 2.. per run with no gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub run_id: String,
    pub seq: i64,
    pub kind: StepKind,
    pub data: Value,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
}

/// Unix milliseconds now. A clock before 1970 is treated as 0 rather than failing a write.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The store handle: a connection pool; clones share it.
#[derive(Debug, Clone)]
pub struct RunStore {
    pool: AnyPool,
    backend: Backend,
}

impl RunStore {
    /// Opens (creating if missing) and migrates a store: `sqlite://PATH` (relative or absolute;
    /// `sqlite:///abs/path`), `sqlite::memory:` (private to this handle and its clones) or
    /// `postgres://user:pass@host:port/db` (also `postgresql://`).
    pub async fn open(url: &str) -> Result<RunStore> {
        sqlx::any::install_default_drivers();
        let (backend, pool) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // One plain connection first: the pool retries a refused connection until its acquire
            // timeout, and a wrong URL should fail at startup in milliseconds, not 30 seconds.
            AnyConnection::connect(url).await?.close().await?;
            let pool = AnyPoolOptions::new().max_connections(16).connect(url).await?;
            (Backend::Postgres, pool)
        } else if url.starts_with("sqlite:") {
            (Backend::Sqlite, open_sqlite(url).await?)
        } else {
            return Err(StoreError::Backend(format!("unsupported store URL `{url}` (sqlite:// or postgres://)")));
        };
        let store = RunStore { pool, backend };
        schema::migrate(&store).await?;
        Ok(store)
    }

    /// Stores (inserts or replaces) an agent definition by name.
    pub async fn put_agent(&self, name: &str, spec: &Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO kiln_agents (name, spec, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(to_json_text(spec))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_agent(&self, name: &str) -> Result<Option<Value>> {
        let row =
            sqlx::query("SELECT spec FROM kiln_agents WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        row.map(|r| parse_json(&r.try_get::<String, _>(0)?)).transpose()
    }

    /// Every stored agent, by name.
    pub async fn list_agents(&self) -> Result<Vec<Value>> {
        let rows = sqlx::query("SELECT spec FROM kiln_agents ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter().map(|r| parse_json(&r.try_get::<String, _>(0)?)).collect()
    }

    /// Deletes an agent; false if there was none. Its runs stay (they are history).
    pub async fn delete_agent(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM kiln_agents WHERE name = $1").bind(name).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores (inserts or replaces) a Responses API response object.
    pub async fn put_response(&self, id: &str, body: &Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO kiln_responses (id, body, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )
        .bind(id)
        .bind(to_json_text(body))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_response(&self, id: &str) -> Result<Option<Value>> {
        let row =
            sqlx::query("SELECT body FROM kiln_responses WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.map(|r| parse_json(&r.try_get::<String, _>(0)?)).transpose()
    }

    pub async fn delete_response(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM kiln_responses WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes stored responses created before `before_ms` (unix ms); returns how many.
    pub async fn prune_responses(&self, before_ms: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM kiln_responses WHERE created_at < $1").bind(before_ms).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    /// Closes the pool (waits for connections to be returned); other clones stop working too.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// SQLite: the file (and its directory) is created if missing, and the database is switched to
/// WAL so readers never block the one writer. `:memory:` gets a single connection that never
/// closes: each SQLite connection to `:memory:` is its own database, so a pool of several (or
/// one that recycles idle connections) would lose or split the data.
async fn open_sqlite(url: &str) -> Result<AnyPool> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path == ":memory:" || path.is_empty() || query.contains("mode=memory");
    if in_memory {
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect(url)
            .await?;
        return Ok(pool);
    }
    if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
    }
    let url = if query.contains("mode=") {
        url.to_string()
    } else if query.is_empty() {
        format!("{url}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    };
    let pool = AnyPoolOptions::new().max_connections(8).connect(&url).await?;
    // WAL is a property of the database file: setting it once here holds for every connection.
    // Switching needs the file to itself, and SQLite answers "locked" at once (no busy wait)
    // while another process opening the same fresh file holds it: retry for a while.
    let mut tries = 0;
    loop {
        match sqlx::query("PRAGMA journal_mode = WAL").fetch_all(&pool).await {
            Ok(_) => return Ok(pool),
            Err(e) if tries < 50 && e.to_string().contains("locked") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20 * tries)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn get_opt_json(row: &AnyRow, col: &str) -> Result<Option<Value>> {
    row.try_get::<Option<String>, _>(col)?.map(|t| parse_json(&t)).transpose()
}
