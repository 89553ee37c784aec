//! Runs and their step log. It owns the statements that create runs, change their status and
//! append steps; it must not decide what a step means (the tool loop does).
//!
//! The step log is what a restart resumes from, so appends are atomic and retry-safe: a step with
//! an idempotency key is recorded at most once per run.

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{get_opt_json, now_ms, parse_json, to_json_text, Result, RunRecord, RunStatus, RunStore, StepKind};
use super::{StepRecord, StoreError};

const RUN_COLUMNS: &str =
    "id, agent, status, input, output, usage, error, created_at, updated_at, lease_owner, lease_until";
const STEP_COLUMNS: &str = "run_id, seq, kind, data, idempotency_key, created_at";
/// The statuses `set_status` may leave; kept in one place so the SQL and `is_terminal` agree.
const LIVE_STATUSES: &str = "('queued', 'in_progress', 'requires_action')";

impl RunStore {
    /// Records a new run; an existing id is a `Conflict`.
    pub async fn create_run(&self, run: &RunRecord) -> Result<()> {
        let sql =
            format!("INSERT INTO kiln_runs ({RUN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)");
        sqlx::query(&sql)
            .bind(&run.id)
            .bind(&run.agent)
            .bind(run.status.as_str())
            .bind(to_json_text(&run.input))
            .bind(run.output.as_ref().map(to_json_text))
            .bind(to_json_text(&run.usage))
            .bind(run.error.clone())
            .bind(run.created_at)
            .bind(run.updated_at)
            .bind(run.lease_owner.clone())
            .bind(run.lease_until)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_run(&self, id: &str) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM kiln_runs WHERE id = $1");
        let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// The newest `limit` runs (of one agent, or of all), newest first.
    pub async fn list_runs(&self, agent: Option<&str>, limit: usize) -> Result<Vec<RunRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM kiln_runs WHERE ($1 IS NULL OR agent = $1) \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql).bind(agent).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Moves a run to `status`. `output`, `usage` and `error` replace the stored values when
    /// given and are kept when `None`. A terminal run never changes again: setting the status of
    /// one is a `Conflict` (so a worker finishing a run that was just cancelled learns it lost);
    /// an unknown id is `NotFound`.
    pub async fn set_status(
        &self,
        id: &str,
        status: RunStatus,
        output: Option<Value>,
        usage: Option<Value>,
        error: Option<String>,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE kiln_runs SET status = $2, output = COALESCE($3, output), usage = COALESCE($4, usage), \
             error = COALESCE($5, error), updated_at = $6 WHERE id = $1 AND status IN {LIVE_STATUSES}"
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(status.as_str())
            .bind(output.as_ref().map(to_json_text))
            .bind(usage.as_ref().map(to_json_text))
            .bind(error)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        match self.get_run(id).await? {
            None => Err(StoreError::NotFound(format!("run {id}"))),
            Some(run) => Err(StoreError::Conflict(format!("run {id} is already {}", run.status.as_str()))),
        }
    }

    /// Appends a step and returns its seq (0 for a run's first step, then 1, 2.. with no gaps,
    /// however many writers append at once). An unknown run is `NotFound`.
    ///
    /// Retries: if `idempotency_key` is already recorded for this run with the same kind and
    /// data, the append is a no-op that returns the existing seq (a retried write after a lost
    /// reply must not fail the run); the same key with a different kind or data is a `Conflict`.
    pub async fn append_step(
        &self,
        run_id: &str,
        kind: StepKind,
        data: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        // Touching the run row first serialises appends to one run: Postgres holds the row lock,
        // SQLite the write lock, until commit, so MAX(seq) below cannot be read by two writers.
        // Taking a write lock first also spares SQLite the read-to-write upgrade that fails with
        // SQLITE_BUSY instead of waiting.
        let touched = sqlx::query("UPDATE kiln_runs SET updated_at = $2 WHERE id = $1")
            .bind(run_id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        if touched.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("run {run_id}")));
        }
        if let Some(key) = idempotency_key {
            let sql = format!("SELECT {STEP_COLUMNS} FROM kiln_steps WHERE run_id = $1 AND idempotency_key = $2");
            let row = sqlx::query(&sql).bind(run_id).bind(key).fetch_optional(&mut *tx).await?;
            if let Some(existing) = row.as_ref().map(step_from_row).transpose()? {
                if existing.kind == kind && &existing.data == data {
                    return Ok(existing.seq);
                }
                let msg = format!("run {run_id} already has a different step with idempotency key `{key}`");
                return Err(StoreError::Conflict(msg));
            }
        }
        let seq: i64 = sqlx::query(
            "INSERT INTO kiln_steps (run_id, seq, kind, data, idempotency_key, created_at) \
             SELECT $1, COALESCE(MAX(seq) + 1, 0), $2, $3, $4, $5 FROM kiln_steps WHERE run_id = $1 \
             RETURNING seq",
        )
        .bind(run_id)
        .bind(kind.as_str())
        .bind(to_json_text(data))
        .bind(idempotency_key)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        tx.commit().await?;
        Ok(seq)
    }

    /// A run's steps in order.
    pub async fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>> {
        let sql = format!("SELECT {STEP_COLUMNS} FROM kiln_steps WHERE run_id = $1 ORDER BY seq");
        let rows = sqlx::query(&sql).bind(run_id).fetch_all(&self.pool).await?;
        rows.iter().map(step_from_row).collect()
    }

    /// The step recorded under `key`: how a resumed run finds a tool result already recorded
    /// (and so never runs a completed call twice).
    pub async fn step_by_key(&self, run_id: &str, key: &str) -> Result<Option<StepRecord>> {
        let sql = format!("SELECT {STEP_COLUMNS} FROM kiln_steps WHERE run_id = $1 AND idempotency_key = $2");
        let row = sqlx::query(&sql).bind(run_id).bind(key).fetch_optional(&self.pool).await?;
        row.as_ref().map(step_from_row).transpose()
    }
}

fn run_from_row(row: &AnyRow) -> Result<RunRecord> {
    Ok(RunRecord {
        id: row.try_get("id")?,
        agent: row.try_get("agent")?,
        status: row.try_get::<String, _>("status")?.parse()?,
        input: parse_json(&row.try_get::<String, _>("input")?)?,
        output: get_opt_json(row, "output")?,
        usage: parse_json(&row.try_get::<String, _>("usage")?)?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: row.try_get("lease_until")?,
    })
}

fn step_from_row(row: &AnyRow) -> Result<StepRecord> {
    Ok(StepRecord {
        run_id: row.try_get("run_id")?,
        seq: row.try_get("seq")?,
        kind: row.try_get::<String, _>("kind")?.parse()?,
        data: parse_json(&row.try_get::<String, _>("data")?)?,
        idempotency_key: row.try_get("idempotency_key")?,
        created_at: row.try_get("created_at")?,
    })
}
