//! Run leases: how several kiln processes sharing one database hand runs over. A process works a
//! run only while it holds the run's lease (`lease_owner`, `lease_until`) and renews it well
//! before `lease_until`; a run whose holder died is claimed by another after the lease expires.
//! It owns the lease statements only; when to renew and what to do with a claimed run belong to
//! the runtime.
//!
//! Every change is ONE conditional UPDATE, so the database decides races: in Postgres a second
//! writer blocks on the row lock and then re-checks the WHERE clause against the committed row
//! (READ COMMITTED re-evaluation), in SQLite writers are serialised outright. Lease times come
//! from this process's clock: hosts sharing a database need clocks in sync to well under a TTL.

use std::time::Duration;

use sqlx::Row;

use super::{now_ms, ttl_ms, Result, RunStore, StoreError};

/// Non-terminal runs whose lease has expired, or which nobody holds but should be worked
/// (queued or in progress; a run waiting for approval without a holder waits for the approval).
/// Uses $3 as "now".
const ORPHAN: &str = "status IN ('queued', 'in_progress', 'requires_action') \
     AND ((lease_owner IS NOT NULL AND lease_until < $3) \
       OR (lease_owner IS NULL AND status IN ('queued', 'in_progress')))";

impl RunStore {
    /// Takes the lease of `run_id` for `ttl` if nobody holds it, `owner` already does, or it has
    /// expired. False when another owner holds a live lease; `NotFound` for an unknown run.
    pub async fn try_acquire(&self, run_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE kiln_runs SET lease_owner = $2, lease_until = $3 WHERE id = $1 \
             AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until IS NULL OR lease_until < $4)",
        )
        .bind(run_id)
        .bind(owner)
        .bind(now.saturating_add(ttl_ms(ttl)))
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.changed_or_not_found(run_id, done.rows_affected()).await
    }

    /// Extends `owner`'s lease to now + `ttl`. False if `owner` no longer holds it (another
    /// process took it over after it expired): the caller must stop working the run.
    pub async fn renew(&self, run_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query("UPDATE kiln_runs SET lease_until = $3 WHERE id = $1 AND lease_owner = $2")
            .bind(run_id)
            .bind(owner)
            .bind(now.saturating_add(ttl_ms(ttl)))
            .execute(&self.pool)
            .await?;
        self.changed_or_not_found(run_id, done.rows_affected()).await
    }

    /// Gives the lease up (a no-op if `owner` does not hold it), so another process may take the
    /// run at once instead of waiting for the TTL.
    pub async fn release(&self, run_id: &str, owner: &str) -> Result<()> {
        sqlx::query("UPDATE kiln_runs SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2")
            .bind(run_id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes the leases of up to `limit` orphaned runs (oldest first) and returns their ids. Two
    /// processes claiming at once never get the same run: the claim is one UPDATE whose WHERE
    /// clause (repeated outside the subquery for exactly this reason) is re-checked against the
    /// row a concurrent claimer just committed, which then no longer looks orphaned.
    pub async fn claim_orphans(&self, owner: &str, ttl: Duration, limit: usize) -> Result<Vec<String>> {
        let now = now_ms();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "UPDATE kiln_runs SET lease_owner = $1, lease_until = $2 \
             WHERE id IN (SELECT id FROM kiln_runs WHERE {ORPHAN} ORDER BY created_at, id LIMIT $4) \
             AND {ORPHAN} RETURNING id"
        );
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(now.saturating_add(ttl_ms(ttl)))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get::<String, _>(0).map_err(StoreError::from)).collect()
    }

    /// True if an UPDATE changed the run; false if it exists but the condition refused; NotFound
    /// if it does not exist (checked only on refusal, the uncommon path).
    async fn changed_or_not_found(&self, run_id: &str, rows: u64) -> Result<bool> {
        if rows > 0 {
            return Ok(true);
        }
        let exists =
            sqlx::query("SELECT id FROM kiln_runs WHERE id = $1").bind(run_id).fetch_optional(&self.pool).await?;
        match exists {
            Some(_) => Ok(false),
            None => Err(StoreError::NotFound(format!("run {run_id}"))),
        }
    }
}
