//! Keyed-fact conflict resolution and the per-(scope, key) write locks that make it hold under
//! concurrent writers. The rule: higher priority wins; equal priority, the later write wins (the
//! store stamps writes under the key's lock, so "later" is arrival order). The loser is appended to
//! the winner's `history`, so reads are deterministic and nothing is silently lost. Must not: touch
//! storage (the store reads and writes around [`resolve`]).

use super::{HistoryEntry, Memory};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

/// Which version stays the live fact; it carries the other in its history.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The incoming write won; it took over the existing fact's id and history.
    Incoming(Memory),
    /// The existing fact stays; the incoming write is recorded as `rejected`.
    Existing(Memory),
}

/// Resolves a write to a key that already holds the live fact `old`.
pub fn resolve(old: &Memory, incoming: &Memory) -> Resolution {
    let wins = (incoming.priority, incoming.updated_at_ms) >= (old.priority, old.updated_at_ms);
    if wins {
        let mut m = incoming.clone();
        // The fact keeps its identity (id, creation time) across versions.
        m.id = old.id.clone();
        m.created_at_ms = old.created_at_ms;
        m.history = old.history.clone();
        m.history.push(entry(old, "superseded"));
        Resolution::Incoming(m)
    } else {
        let mut m = old.clone();
        m.history.push(entry(incoming, "rejected"));
        Resolution::Existing(m)
    }
}

pub(crate) fn entry(m: &Memory, outcome: &str) -> HistoryEntry {
    HistoryEntry {
        text: m.text.clone(),
        metadata: m.metadata.clone(),
        priority: m.priority,
        written_at_ms: m.updated_at_ms,
        outcome: outcome.into(),
    }
}

/// Prune idle lock entries once the map grows past this (locks are created per key on demand).
const PRUNE_AT: usize = 1024;

type LockMap = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// One async mutex per (scope, key): writes to one fact serialize, others run in parallel.
#[derive(Default)]
pub struct KeyLocks {
    map: Mutex<LockMap>,
}

impl KeyLocks {
    pub async fn lock(&self, scope: &str, key: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > PRUNE_AT {
                // Only the map holds an idle lock; nobody can be waiting on it.
                map.retain(|_, l| Arc::strong_count(l) > 1);
            }
            map.entry((scope.to_string(), key.to_string())).or_default().clone()
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(text: &str, priority: i64, at: i64) -> Memory {
        Memory {
            id: format!("id-{text}"),
            scope: "global".into(),
            text: text.into(),
            metadata: Default::default(),
            key: Some("user.city".into()),
            priority,
            created_at_ms: at,
            updated_at_ms: at,
            expires_at_ms: None,
            history: vec![],
        }
    }

    #[test]
    fn higher_priority_wins_either_order() {
        let (low, high) = (fact("Paris", 1, 200), fact("Rome", 5, 100));
        let Resolution::Existing(m) = resolve(&high, &low) else { panic!("low must lose") };
        assert_eq!((m.text.as_str(), m.history[0].outcome.as_str()), ("Rome", "rejected"));
        let Resolution::Incoming(m) = resolve(&low, &high) else { panic!("high must win") };
        assert_eq!((m.text.as_str(), m.id.as_str(), m.history[0].text.as_str()), ("Rome", "id-Paris", "Paris"));
    }

    #[test]
    fn same_priority_later_wins_and_history_accumulates() {
        let a = fact("A", 1, 100);
        let Resolution::Incoming(b) = resolve(&a, &fact("B", 1, 101)) else { panic!() };
        let Resolution::Incoming(c) = resolve(&b, &fact("C", 1, 102)) else { panic!() };
        let texts: Vec<_> = c.history.iter().map(|h| h.text.as_str()).collect();
        assert_eq!((c.text.as_str(), texts), ("C", vec!["A", "B"]));
    }
}
