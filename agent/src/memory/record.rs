//! How a [`Memory`] is laid out as a point payload and read back: `scope`, `text`, `metadata`,
//! `key`, `priority`, `created_at`/`updated_at` (Unix ms), `expires_at` (Unix ms; [`NEVER`] when
//! it has no TTL, so "alive" is one indexed range condition) and `history`. Must not: decide
//! conflicts or touch the backend.

use super::embedded::{Hit, NewPoint};
use super::hybrid;
use super::{conflict, HistoryEntry, Memory, MemoryError, MemoryPatch, NewMemory, Scope};
use qdrant_edge::external::uuid::Uuid;
use serde_json::{json, Map, Value};

/// `expires_at` of a memory without TTL.
pub const NEVER: i64 = i64::MAX;

pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_millis() as i64
}

/// A new memory stamped `now`, with a fresh time-ordered id.
pub fn fresh(scope: &Scope, m: NewMemory, now: i64) -> Memory {
    Memory {
        id: Uuid::now_v7().to_string(),
        scope: scope.to_string(),
        text: m.text,
        metadata: m.metadata,
        key: m.key,
        priority: m.priority,
        created_at_ms: now,
        updated_at_ms: now,
        expires_at_ms: m.ttl_seconds.map(|s| now.saturating_add((s as i64).saturating_mul(1000))),
        history: Vec::new(),
    }
}

pub fn expired(m: &Memory, now: i64) -> bool {
    m.expires_at_ms.is_some_and(|t| t <= now)
}

/// `old` with `patch` applied; the previous version goes to history.
pub fn patched(old: Memory, patch: MemoryPatch, now: i64) -> Memory {
    let mut m = old.clone();
    m.history.push(conflict::entry(&old, "updated"));
    if let Some(t) = patch.text {
        m.text = t;
    }
    if let Some(md) = patch.metadata {
        m.metadata = md;
    }
    m.updated_at_ms = now;
    m
}

pub fn payload(m: &Memory) -> Map<String, Value> {
    let v = json!({
        "scope": m.scope,
        "text": m.text,
        "metadata": m.metadata,
        "key": m.key,
        "priority": m.priority,
        "created_at": m.created_at_ms,
        "updated_at": m.updated_at_ms,
        "expires_at": m.expires_at_ms.unwrap_or(NEVER),
        "history": m.history,
    });
    let Value::Object(mut map) = v else { unreachable!("json! of an object literal") };
    if m.key.is_none() {
        // Absent, not null: the keyword index and key filters only see real keys.
        map.remove("key");
    }
    map
}

pub fn point(m: &Memory, vector: Vec<f32>) -> Result<NewPoint, MemoryError> {
    let id = Uuid::parse_str(&m.id).map_err(|e| MemoryError::Backend(format!("bad memory id {}: {e}", m.id)))?;
    Ok(NewPoint { id, dense: vector, sparse: hybrid::document(&m.text), payload: payload(m) })
}

/// Reads a stored point back; a payload the store did not write is a backend error, not a panic.
pub fn memory(h: &Hit) -> Result<Memory, MemoryError> {
    let p = &h.payload;
    let bad = |f: &str| MemoryError::Backend(format!("memory {} has no valid `{f}` in its payload", h.id));
    let str_of = |f: &str| p.get(f).and_then(Value::as_str).map(str::to_string).ok_or_else(|| bad(f));
    let int_of = |f: &str| p.get(f).and_then(Value::as_i64).ok_or_else(|| bad(f));
    let history: Vec<HistoryEntry> = match p.get("history") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| bad("history"))?,
        None => Vec::new(),
    };
    let expires = int_of("expires_at")?;
    Ok(Memory {
        id: h.id.to_string(),
        scope: str_of("scope")?,
        text: str_of("text")?,
        metadata: p.get("metadata").and_then(Value::as_object).cloned().unwrap_or_default(),
        key: p.get("key").and_then(Value::as_str).map(str::to_string),
        priority: int_of("priority")?,
        created_at_ms: int_of("created_at")?,
        updated_at_ms: int_of("updated_at")?,
        expires_at_ms: (expires != NEVER).then_some(expires),
        history,
    })
}
