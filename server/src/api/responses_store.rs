//! Where Responses API records live between requests: the [`ResponseStore`] trait (one JSON
//! record per response id), its two implementations (the agent run store, SQLite or Postgres,
//! once the agent runtime is up: stored responses then survive a restart and are shared by
//! replicas; a bounded in-memory one before that or without it), and the parked engine sessions
//! that let `previous_response_id` reuse a turn's K/V. Must not: interpret records
//! (`responses.rs` does) or know HTTP.

use futures_util::future::BoxFuture;
use kiln_agent::store::RunStore;
use kiln_inference::session::Session;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

/// Storage failed (a durable store's I/O); the server answers 500.
#[derive(Debug, thiserror::Error)]
#[error("response store: {0}")]
pub struct StoreError(pub String);

/// One JSON record per response id. Async because a durable store (SQL) will stand behind it.
pub trait ResponseStore: Send + Sync {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Value>, StoreError>>;
    fn put<'a>(&'a self, id: &'a str, record: Value) -> BoxFuture<'a, Result<(), StoreError>>;
    /// True when the id existed.
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
}

/// Keeps the newest `capacity` records; older ones are forgotten (then a 404, as for any
/// unknown id). RAM only: a restart forgets everything.
pub struct MemoryStore {
    capacity: usize,
    inner: Mutex<(HashMap<String, Value>, VecDeque<String>)>,
}

impl MemoryStore {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), inner: Mutex::new((HashMap::new(), VecDeque::new())) }
    }
}

impl ResponseStore for MemoryStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Value>, StoreError>> {
        let v = self.inner.lock().expect("store lock").0.get(id).cloned();
        Box::pin(async move { Ok(v) })
    }

    fn put<'a>(&'a self, id: &'a str, record: Value) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut g = self.inner.lock().expect("store lock");
        let (map, order) = &mut *g;
        if map.insert(id.to_string(), record).is_none() {
            order.push_back(id.to_string());
        }
        while map.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut g = self.inner.lock().expect("store lock");
        let (map, order) = &mut *g;
        let existed = map.remove(id).is_some();
        if existed {
            order.retain(|k| k != id);
        }
        Box::pin(async move { Ok(existed) })
    }
}

/// The durable store: the agent runtime's run store (table `kiln_responses`).
pub struct SqlStore(pub RunStore);

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl ResponseStore for SqlStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Value>, StoreError>> {
        Box::pin(async move { self.0.get_response(id).await.map_err(store_err) })
    }

    fn put<'a>(&'a self, id: &'a str, record: Value) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.0.put_response(id, &record).await.map_err(store_err) })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { self.0.delete_response(id).await.map_err(store_err) })
    }
}

/// Engine sessions parked after a stored turn, keyed by response id, least recently parked
/// evicted first (dropping a `Session` releases its blocks). A continuation *takes* the session,
/// so a response continues in place once; later forks re-render and hit the prefix cache.
pub struct ParkedSessions {
    capacity: usize,
    inner: Mutex<VecDeque<(String, Parked)>>,
}

/// A parked session and what its history was rendered with (instructions, tools): a next turn
/// rendered with anything else must re-send its whole conversation instead of appending.
pub struct Parked {
    pub session: Session,
    pub rendered_with: String,
}

impl ParkedSessions {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, inner: Mutex::new(VecDeque::new()) }
    }

    pub fn take(&self, id: &str) -> Option<Parked> {
        let mut q = self.inner.lock().expect("sessions lock");
        let at = q.iter().position(|(k, _)| k == id)?;
        q.remove(at).map(|(_, s)| s)
    }

    pub fn park(&self, id: String, parked: Parked) {
        let evicted = {
            let mut q = self.inner.lock().expect("sessions lock");
            q.push_back((id, parked));
            let n = q.len().saturating_sub(self.capacity);
            q.drain(..n).collect::<Vec<_>>()
        };
        // Dropped outside the lock: closing a session sends to the engine.
        drop(evicted);
    }
}

/// What the Responses endpoints share.
pub struct Responses {
    memory: Arc<dyn ResponseStore>,
    /// Set once when the agent runtime starts (see [`Responses::set_durable`]).
    durable: OnceLock<Arc<dyn ResponseStore>>,
    pub sessions: ParkedSessions,
    /// Background responses still running, by id (`cancel` aborts them).
    pub running: tokio::sync::Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Default for Responses {
    fn default() -> Self {
        Self {
            memory: Arc::new(MemoryStore::new(STORED_RESPONSES)),
            durable: OnceLock::new(),
            sessions: ParkedSessions::new(PARKED_SESSIONS),
            running: Default::default(),
        }
    }
}

impl Responses {
    /// Where records go: the durable store once set, else RAM. `serve` sets it before the
    /// engine, and no response is made without an engine, so nothing is left behind in RAM.
    pub fn store(&self) -> &Arc<dyn ResponseStore> {
        self.durable.get().unwrap_or(&self.memory)
    }

    /// Stores records in `store` from now on (first call wins).
    pub fn set_durable(&self, store: Arc<dyn ResponseStore>) {
        let _ = self.durable.set(store);
    }
}

/// Records the in-memory store keeps.
pub const STORED_RESPONSES: usize = 4096;
/// Sessions kept parked for continuation (each holds its K/V blocks until evicted or the
/// engine reclaims them under memory pressure).
pub const PARKED_SESSIONS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn bounded_get_put_delete() {
        let s = MemoryStore::new(2);
        s.put("a", json!(1)).await.unwrap();
        s.put("b", json!(2)).await.unwrap();
        s.put("c", json!(3)).await.unwrap();
        assert_eq!(s.get("a").await.unwrap(), None);
        assert_eq!(s.get("c").await.unwrap(), Some(json!(3)));
        assert!(s.delete("b").await.unwrap());
        assert!(!s.delete("b").await.unwrap());
        assert_eq!(s.get("b").await.unwrap(), None);
    }
}
