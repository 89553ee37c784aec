//! The KV block manager: hands out fixed-size KV cache blocks by id, counts references to each
//! block so sequences can share them (forks for `n > 1`, sessions, prefix caching), performs
//! copy-on-write bookkeeping, and keeps the prefix cache: full blocks registered under their
//! content hash ([`BlockHash`]) stay reusable after their last user frees them, until the pool
//! needs them back (least recently freed first).
//!
//! It owns only ids, counts and hashes. It must not touch a tensor, know a model, or know what a
//! sequence is: the caller keeps one [`BlockTable`] per sequence, computes the hashes, and the
//! runner copies KV contents for the `(src, dst)` pairs this module returns.
//!
//! Every fallible operation is all-or-nothing: on [`OutOfBlocks`] nothing changed, so the
//! scheduler can preempt someone and simply retry.

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

pub use crate::block_hash::BlockHash;

/// Index of a block in the KV cache; block `b` holds slots `b * block_size .. (b + 1) * block_size`.
pub type BlockId = u32;

/// Not enough free blocks for the requested operation (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("out of KV cache blocks: {needed} needed, {free} free")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// The blocks of one sequence, in position order: position `p` lives in block `p / block_size`.
///
/// Deliberately not `Clone`: every copy of a block id must be counted, so the only way to get a
/// second table over the same blocks is [`BlockManager::fork`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockTable(Vec<BlockId>);

impl BlockTable {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.0
    }

    /// Number of blocks (not tokens).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Cache slot of the token at position `pos`: `table[pos / bs] * bs + pos % bs`.
    ///
    /// Panics if `pos` is past the table; the scheduler guarantees that every position it hands
    /// out is covered, so a panic here is an engine bug, not a bad request.
    pub fn slot(&self, pos: usize, block_size: usize) -> u32 {
        // The manager checked at construction that every slot index fits a u32.
        self.0[pos / block_size] * block_size as u32 + (pos % block_size) as u32
    }
}

/// Cumulative prefix-cache counters (vLLM's `prefix_cache_queries` / `_hits`, in tokens).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheCounters {
    /// Prompt tokens looked up at admission.
    pub queried_tokens: u64,
    /// Of those, tokens whose K/V came from cached blocks.
    pub hit_tokens: u64,
    /// Cached blocks whose contents were dropped to reuse the block.
    pub evictions: u64,
}

/// Fixed pool of `num_blocks` blocks of `block_size` token slots each.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    /// `ref_counts[b]`: how many tables point at block `b`; 0 means it is in `free`.
    ref_counts: Vec<u32>,
    /// Unreferenced blocks in eviction order, keyed by the stamp of when they were freed: the
    /// least recently freed is handed out first, so a freed cached block keeps its contents as
    /// long as possible. A map (not a queue) because a cache hit takes a block out of the middle.
    free: BTreeMap<u64, BlockId>,
    /// `free_stamp[b]`: `b`'s key in `free` while it is free.
    free_stamp: Vec<u64>,
    next_stamp: u64,
    /// The content hash of each block registered in the prefix cache.
    hash_of: Vec<Option<BlockHash>>,
    /// Registered blocks by hash: at most one block per hash.
    cached: HashMap<BlockHash, BlockId>,
    /// Free blocks that still hold registered contents (evictable cache).
    free_cached: usize,
    caching: bool,
    counters: CacheCounters,
}

impl BlockManager {
    /// Panics on a zero block size or a cache whose slot indices do not fit a `u32`: both are
    /// startup configuration errors, never request-driven. `caching` turns prefix caching on.
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be > 0");
        assert!(
            num_blocks.checked_mul(block_size).is_some_and(|s| s <= u32::MAX as usize),
            "KV cache of {num_blocks} blocks x {block_size} slots overflows u32 slot indices"
        );
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).map(|b| (b as u64, b)).collect(),
            free_stamp: (0..num_blocks as u64).collect(),
            next_stamp: num_blocks as u64,
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            free_cached: 0,
            caching,
            counters: CacheCounters::default(),
        }
    }

    pub fn num_total(&self) -> usize {
        self.ref_counts.len()
    }

    /// Unreferenced blocks, cached ones included (they are handed out when needed).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Free blocks that still hold reusable cached contents.
    pub fn num_free_cached(&self) -> usize {
        self.free_cached
    }

    /// Blocks registered in the prefix cache (in use or free).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks needed to hold `num_tokens` slots.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// How many tables point at `block` (0 when free or out of range).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts.get(block as usize).copied().unwrap_or(0)
    }

    /// The registered hash of `block`, if any.
    pub fn hash_of(&self, block: BlockId) -> Option<BlockHash> {
        self.hash_of.get(block as usize).copied().flatten()
    }

    /// Whether [`allocate`](Self::allocate) of `num_tokens` slots would succeed.
    pub fn can_allocate(&self, table: &BlockTable, num_tokens: usize) -> bool {
        self.growth(table, num_tokens) <= self.free.len()
    }

    /// Grows `table` so it covers `num_tokens` slots; never shrinks it.
    pub fn allocate(&mut self, table: &mut BlockTable, num_tokens: usize) -> Result<(), OutOfBlocks> {
        let needed = self.growth(table, num_tokens);
        self.check(needed)?;
        for _ in 0..needed {
            let b = self.take_free();
            table.0.push(b);
        }
        Ok(())
    }

    /// The longest run of cached blocks that begins `hashes` (a sequence's chained block
    /// hashes), at most `max_blocks` long. Looking up changes nothing; see
    /// [`admit`](Self::admit).
    pub fn lookup(&self, hashes: &[BlockHash], max_blocks: usize) -> Vec<BlockId> {
        if !self.caching {
            return Vec::new();
        }
        hashes.iter().take(max_blocks).map_while(|h| self.cached.get(h).copied()).collect()
    }

    /// Gives the empty `table` the cached blocks `hit` (from [`lookup`](Self::lookup), as its
    /// first blocks) and then fresh blocks up to `end_pos` slots, all or nothing. Counts the
    /// lookup in the cache counters (`queried` prompt tokens) only when it succeeds.
    pub fn admit(
        &mut self,
        table: &mut BlockTable,
        hit: &[BlockId],
        end_pos: usize,
        queried: usize,
    ) -> Result<(), OutOfBlocks> {
        debug_assert!(table.is_empty(), "admit into a non-empty table");
        // Hit blocks that are free now leave the free pool when taken.
        let revived = hit.iter().filter(|&&b| self.ref_count(b) == 0).count();
        let fresh = self.blocks_for(end_pos).saturating_sub(hit.len());
        self.check(revived + fresh)?;
        for &b in hit {
            self.acquire(b);
            table.0.push(b);
        }
        self.allocate(table, end_pos)?;
        self.counters.queried_tokens += queried as u64;
        self.counters.hit_tokens += (hit.len() * self.block_size) as u64;
        Ok(())
    }

    /// Registers the full, computed `block` under `hash` so later sequences can reuse it. A
    /// no-op when caching is off, the block is already registered, or another block already
    /// holds these contents (two sequences computed the same prefix at once).
    pub fn register(&mut self, block: BlockId, hash: BlockHash) {
        let b = block as usize;
        if !self.caching || b >= self.hash_of.len() || self.hash_of[b].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        debug_assert!(self.ref_counts[b] > 0, "registering free block {block}");
        self.hash_of[b] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Forgets every registered hash (after a failed step, whose blocks may hold garbage).
    pub fn clear_cache(&mut self) {
        self.cached.clear();
        self.hash_of.iter_mut().for_each(|h| *h = None);
        self.free_cached = 0;
    }

    /// A new table sharing every block of `table` (each ref count + 1). Writes to shared blocks
    /// must go through [`make_writable`](Self::make_writable) first.
    pub fn fork(&mut self, table: &BlockTable) -> BlockTable {
        for &b in &table.0 {
            self.incr(b);
        }
        BlockTable(table.0.clone())
    }

    /// Copy-on-write: gives `table` exclusive ownership of every block touched by slots
    /// `first_pos..end_pos` (positions past the table are ignored: allocate first). Each shared
    /// block is swapped for a fresh one; the returned `(src, dst)` pairs tell the runner which
    /// KV contents to copy, in order, before the step writes. An exclusively owned block that is
    /// registered in the cache loses its registration: its contents are about to change.
    pub fn make_writable(
        &mut self,
        table: &mut BlockTable,
        first_pos: usize,
        end_pos: usize,
    ) -> Result<Vec<(BlockId, BlockId)>, OutOfBlocks> {
        let range = self.block_range(table, first_pos, end_pos);
        let shared = table.0[range.clone()].iter().filter(|&&b| self.ref_count(b) > 1).count();
        self.check(shared)?;
        let mut copies = Vec::with_capacity(shared);
        for i in range {
            let src = table.0[i];
            if self.ref_count(src) > 1 {
                let dst = self.take_free();
                // src stays referenced by the other tables, so this never frees it.
                self.decr(src);
                table.0[i] = dst;
                copies.push((src, dst));
            } else {
                self.unregister(src);
            }
        }
        Ok(copies)
    }

    /// [`allocate`](Self::allocate) up to `end_pos` slots, then
    /// [`make_writable`](Self::make_writable) for `first_pos..end_pos`, as one all-or-nothing
    /// step: what the scheduler needs before a sequence writes those positions.
    pub fn prepare_write(
        &mut self,
        table: &mut BlockTable,
        first_pos: usize,
        end_pos: usize,
    ) -> Result<Vec<(BlockId, BlockId)>, OutOfBlocks> {
        // New blocks are never shared, so the copies needed are those of the existing part.
        let range = self.block_range(table, first_pos, end_pos);
        let shared = table.0[range].iter().filter(|&&b| self.ref_count(b) > 1).count();
        self.check(self.growth(table, end_pos) + shared)?;
        let copies = self.make_writable(table, first_pos, end_pos)?;
        self.allocate(table, end_pos)?;
        Ok(copies)
    }

    /// Drops `table`'s reference to each of its blocks and empties it. Blocks nobody references
    /// any more become free, last block first: a sequence's tail is the least likely part to
    /// be shared, so it is the first to be evicted.
    pub fn free(&mut self, table: &mut BlockTable) {
        for b in table.0.drain(..).rev() {
            self.release(b);
        }
    }

    /// Shrinks `table` to the blocks covering `num_tokens` slots, releasing the rest.
    pub fn truncate(&mut self, table: &mut BlockTable, num_tokens: usize) {
        let keep = self.blocks_for(num_tokens);
        while table.0.len() > keep {
            if let Some(b) = table.0.pop() {
                self.release(b);
            }
        }
    }

    /// Blocks `table` must gain to cover `num_tokens` slots.
    fn growth(&self, table: &BlockTable, num_tokens: usize) -> usize {
        self.blocks_for(num_tokens).saturating_sub(table.len())
    }

    /// Indices into `table` of the blocks touched by slots `first_pos..end_pos`.
    fn block_range(&self, table: &BlockTable, first_pos: usize, end_pos: usize) -> std::ops::Range<usize> {
        if first_pos >= end_pos {
            return 0..0;
        }
        let end = self.blocks_for(end_pos).min(table.len());
        let start = (first_pos / self.block_size).min(end);
        start..end
    }

    fn check(&self, needed: usize) -> Result<(), OutOfBlocks> {
        if needed > self.free.len() {
            return Err(OutOfBlocks { needed, free: self.free.len() });
        }
        Ok(())
    }

    /// Pops the least recently freed block and gives it one reference, evicting the cached
    /// contents it may hold. Callers check availability first.
    fn take_free(&mut self) -> BlockId {
        let b = self.free.pop_first().map(|(_, b)| b);
        debug_assert!(b.is_some(), "take_free on an empty free list");
        let b = b.unwrap_or_default();
        debug_assert_eq!(self.ref_counts[b as usize], 0, "free block {b} has references");
        if self.hash_of[b as usize].is_some() {
            self.free_cached -= 1;
            self.unregister(b);
            self.counters.evictions += 1;
        }
        self.ref_counts[b as usize] = 1;
        b
    }

    /// One more reference to `b`, taking it out of the free pool if it was free (a cache hit).
    fn acquire(&mut self, b: BlockId) {
        if self.ref_counts[b as usize] == 0 {
            self.free.remove(&self.free_stamp[b as usize]);
            if self.hash_of[b as usize].is_some() {
                self.free_cached -= 1;
            }
        }
        self.ref_counts[b as usize] += 1;
    }

    /// Drops one reference; the last one puts `b` at the back of the free pool.
    fn release(&mut self, b: BlockId) {
        if self.decr(b) != 0 {
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.free_stamp[b as usize] = stamp;
        self.free.insert(stamp, b);
        if self.hash_of[b as usize].is_some() {
            self.free_cached += 1;
        }
    }

    fn unregister(&mut self, b: BlockId) {
        if let Some(h) = self.hash_of[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
    }

    fn incr(&mut self, b: BlockId) {
        debug_assert!(self.ref_counts[b as usize] > 0, "fork of free block {b}");
        self.ref_counts[b as usize] += 1;
    }

    /// Decrements `b`'s count and returns the new count. Underflow is an engine bug (a block
    /// freed twice): loud in debug builds, ignored in release (returns a non-zero count) so the
    /// pool is not corrupted into handing the block out twice.
    fn decr(&mut self, b: BlockId) -> u32 {
        let rc = &mut self.ref_counts[b as usize];
        debug_assert!(*rc > 0, "ref count underflow on block {b}");
        if *rc == 0 {
            // Already in the free pool; do not add it again.
            return u32::MAX;
        }
        *rc -= 1;
        *rc
    }
}

#[cfg(test)]
#[path = "block_manager_tests.rs"]
mod tests;
