//! Sessions in the scheduler: a sequence whose turn ended can be parked with its blocks, resumed
//! with more tokens (computing only what is new), forked into children that share its blocks
//! copy-on-write, and released. Parked sessions are the first thing given up when blocks run
//! short (least recently parked first); a released session's full blocks stay in the prefix
//! cache, so its next turn usually recomputes little.
//!
//! Owns only the parked states' bookkeeping; the engine decides when a turn parks, what a
//! resumed turn appends, and when a session expires.

use super::{Scheduler, SeqId, SeqState};
use crate::block_manager::BlockHash;

impl Scheduler {
    /// Parks the running or waiting `id`: it leaves the queues but keeps its blocks and KV.
    /// Returns false (and changes nothing) for an unknown id.
    pub fn park(&mut self, id: SeqId) -> bool {
        let Some(s) = self.seqs.remove(&id) else { return false };
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(i);
        }
        self.parked.insert(id, s);
        self.parked_order.push_back(id);
        true
    }

    /// Resumes the parked `id` as a waiting sequence of `len` tokens whose first `keep` equal
    /// the parked ones (the rest is new or rewritten); `hashes` are the chained hashes of all
    /// `len` tokens' full blocks. Its K/V up to `keep` is reused; at least one token is computed
    /// so the turn has logits. Returns false when `id` is not parked (never parked, released or
    /// evicted): the caller then [`add`](Self::add)s it as a new sequence.
    pub fn resume(&mut self, id: SeqId, len: usize, keep: usize, hashes: Vec<BlockHash>) -> bool {
        if len == 0 || !self.fits(len) || self.seqs.contains_key(&id) {
            return false;
        }
        let Some(mut s) = self.parked.remove(&id) else { return false };
        self.parked_order.retain(|&p| p != id);
        let computed = s.num_computed.min(keep).min(len - 1);
        let bs = self.blocks.block_size();
        self.blocks.truncate(&mut s.table, computed);
        s.num_computed = computed;
        // Blocks past `computed` are rewritten; their registrations go when they are written.
        s.registered = s.registered.min(computed / bs);
        s.len = len;
        s.hashes = hashes;
        // A new turn is a new request: it waits behind the sequences that already ran.
        s.started = false;
        if s.table.is_empty() {
            s.num_computed = 0;
        }
        self.seqs.insert(id, s);
        self.waiting.push_back(id);
        true
    }

    /// Forks the parked `parent` into a new parked `child` sharing its blocks. Returns false
    /// when `parent` is not parked or `child` is taken.
    pub fn fork_parked(&mut self, parent: SeqId, child: SeqId) -> bool {
        if self.knows(child) {
            return false;
        }
        let Some(p) = self.parked.get(&parent) else { return false };
        // A forked session is a conversation of its own, not a choice of its parent's request.
        let state = SeqState { family: child, ..Self::fork_state(&mut self.blocks, p) };
        self.parked.insert(child, state);
        self.parked_order.push_back(child);
        true
    }

    /// Releases the parked `id`'s blocks (session closed or expired). Returns whether it was
    /// parked.
    pub fn release_parked(&mut self, id: SeqId) -> bool {
        let Some(mut s) = self.parked.remove(&id) else { return false };
        self.parked_order.retain(|&p| p != id);
        self.blocks.free(&mut s.table);
        true
    }

    /// Releases the least recently parked session to free blocks; false when none is parked.
    pub(super) fn evict_parked(&mut self) -> bool {
        let Some(id) = self.parked_order.front().copied() else { return false };
        self.release_parked(id);
        self.evicted_sessions += 1;
        tracing::debug!(seq = id, free_blocks = self.blocks.num_free(), "parked session evicted");
        true
    }

    pub fn is_parked(&self, id: SeqId) -> bool {
        self.parked.contains_key(&id)
    }

    pub fn num_parked(&self) -> usize {
        self.parked.len()
    }
}
