//! The KV block manager: hands out fixed-size KV cache blocks by id, counts references to each
//! block so sequences can share them (forks for `n > 1`; prefix caching later), and performs
//! copy-on-write bookkeeping.
//!
//! It owns only ids and counts. It must not touch a tensor, know a model, or know what a sequence
//! is: the caller keeps one [`BlockTable`] per sequence, and the runner copies KV contents for the
//! `(src, dst)` pairs this module returns.
//!
//! Every fallible operation is all-or-nothing: on [`OutOfBlocks`] nothing changed, so the
//! scheduler can preempt someone and simply retry.

use std::collections::VecDeque;

use thiserror::Error;

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

/// Fixed pool of `num_blocks` blocks of `block_size` token slots each.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    /// `ref_counts[b]`: how many table entries point at block `b`; 0 means it is in `free`.
    ref_counts: Vec<u32>,
    /// Free blocks, oldest-freed first. FIFO (not a stack) so reuse is predictable in tests and
    /// so a freed block keeps its contents as long as possible, which prefix caching will want.
    free: VecDeque<BlockId>,
}

impl BlockManager {
    /// Panics on a zero block size or a cache whose slot indices do not fit a `u32`: both are
    /// startup configuration errors, never request-driven.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be > 0");
        assert!(
            num_blocks.checked_mul(block_size).is_some_and(|s| s <= u32::MAX as usize),
            "KV cache of {num_blocks} blocks x {block_size} slots overflows u32 slot indices"
        );
        Self { block_size, ref_counts: vec![0; num_blocks], free: (0..num_blocks as BlockId).collect() }
    }

    pub fn num_total(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
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
    /// KV contents to copy, in order, before the step writes.
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
    /// any more go to the back of the free list.
    pub fn free(&mut self, table: &mut BlockTable) {
        for b in table.0.drain(..) {
            if self.decr(b) == 0 {
                self.free.push_back(b);
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

    /// Pops a free block and gives it one reference. Callers check availability first.
    fn take_free(&mut self) -> BlockId {
        let b = self.free.pop_front();
        debug_assert!(b.is_some(), "take_free on an empty free list");
        let b = b.unwrap_or_default();
        debug_assert_eq!(self.ref_counts[b as usize], 0, "free block {b} has references");
        self.ref_counts[b as usize] = 1;
        b
    }

    fn incr(&mut self, b: BlockId) {
        debug_assert!(self.ref_counts[b as usize] > 0, "fork of free block {b}");
        self.ref_counts[b as usize] += 1;
    }

    /// Decrements `b`'s count and returns the new count. Underflow is an engine bug (a block
    /// freed twice): loud in debug builds, clamped at 0 in release so the pool is not corrupted
    /// into handing the block out twice.
    fn decr(&mut self, b: BlockId) -> u32 {
        let rc = &mut self.ref_counts[b as usize];
        debug_assert!(*rc > 0, "ref count underflow on block {b}");
        if *rc == 0 {
            // Already on the free list; do not push it again.
            return u32::MAX;
        }
        *rc -= 1;
        *rc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the pool's bookkeeping against the live tables: each block's count equals the
    /// number of table entries naming it, and exactly the unreferenced blocks are free, once.
    fn check_consistent(bm: &BlockManager, tables: &[&BlockTable]) {
        let mut expected = vec![0u32; bm.num_total()];
        for t in tables {
            for &b in t.blocks() {
                expected[b as usize] += 1;
            }
        }
        assert_eq!(bm.ref_counts, expected);
        let mut free: Vec<BlockId> = bm.free.iter().copied().collect();
        free.sort_unstable();
        let unreferenced: Vec<BlockId> =
            (0..bm.num_total() as BlockId).filter(|&b| expected[b as usize] == 0).collect();
        assert_eq!(free, unreferenced);
    }

    #[test]
    fn blocks_for_and_slot_mapping() {
        let bm = BlockManager::new(8, 4);
        assert_eq!(bm.blocks_for(0), 0);
        assert_eq!(bm.blocks_for(1), 1);
        assert_eq!(bm.blocks_for(4), 1);
        assert_eq!(bm.blocks_for(5), 2);
        let t = BlockTable(vec![3, 0, 7]);
        assert_eq!(t.slot(0, 4), 12);
        assert_eq!(t.slot(3, 4), 15);
        assert_eq!(t.slot(4, 4), 0);
        assert_eq!(t.slot(9, 4), 29);
    }

    #[test]
    fn allocate_grows_only_as_needed_and_in_fifo_order() {
        let mut bm = BlockManager::new(4, 4);
        let mut t = BlockTable::new();
        bm.allocate(&mut t, 5).unwrap();
        assert_eq!(t.blocks(), &[0, 1]);
        bm.allocate(&mut t, 8).unwrap(); // still covered
        assert_eq!(t.len(), 2);
        bm.allocate(&mut t, 3).unwrap(); // never shrinks
        assert_eq!(t.len(), 2);
        bm.allocate(&mut t, 9).unwrap();
        assert_eq!(t.blocks(), &[0, 1, 2]);
        assert_eq!(bm.num_free(), 1);
        bm.free(&mut t);
        assert!(t.is_empty());
        // FIFO: 3 was free the longest, then 0, 1, 2 in the order they were released.
        let mut u = BlockTable::new();
        bm.allocate(&mut u, 16).unwrap();
        assert_eq!(u.blocks(), &[3, 0, 1, 2]);
        bm.free(&mut u);
        check_consistent(&bm, &[]);
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut bm = BlockManager::new(3, 2);
        let mut a = BlockTable::new();
        bm.allocate(&mut a, 2).unwrap();
        let mut b = BlockTable::new();
        assert!(!bm.can_allocate(&b, 6));
        assert_eq!(bm.allocate(&mut b, 6), Err(OutOfBlocks { needed: 3, free: 2 }));
        assert!(b.is_empty());
        assert_eq!(bm.num_free(), 2);
        assert!(bm.can_allocate(&b, 4));
        bm.allocate(&mut b, 4).unwrap();
        check_consistent(&bm, &[&a, &b]);
        bm.free(&mut a);
        bm.free(&mut b);
        assert_eq!(bm.num_free(), bm.num_total());
    }

    #[test]
    fn fork_shares_blocks_and_free_releases_on_last_reference() {
        let mut bm = BlockManager::new(4, 4);
        let mut parent = BlockTable::new();
        bm.allocate(&mut parent, 6).unwrap();
        let mut child = bm.fork(&parent);
        assert_eq!(child.blocks(), parent.blocks());
        assert_eq!(bm.ref_count(0), 2);
        assert_eq!(bm.num_free(), 2);
        bm.free(&mut parent);
        // The child still holds them.
        assert_eq!(bm.num_free(), 2);
        assert_eq!(bm.ref_count(0), 1);
        check_consistent(&bm, &[&child]);
        bm.free(&mut child);
        assert_eq!(bm.num_free(), 4);
        check_consistent(&bm, &[]);
    }

    #[test]
    fn make_writable_copies_only_shared_blocks_in_range() {
        let mut bm = BlockManager::new(8, 4);
        let mut parent = BlockTable::new();
        bm.allocate(&mut parent, 10).unwrap(); // blocks 0,1,2; positions 8,9 in block 2
        let mut child = bm.fork(&parent);
        // Parent writes position 10 (block index 2): only that block is copied.
        let copies = bm.make_writable(&mut parent, 10, 11).unwrap();
        assert_eq!(copies, vec![(2, 3)]);
        assert_eq!(parent.blocks(), &[0, 1, 3]);
        assert_eq!(bm.ref_count(2), 1);
        assert_eq!(bm.ref_count(3), 1);
        // The child is now the sole owner of block 2: writing it needs no copy.
        assert_eq!(bm.make_writable(&mut child, 10, 11).unwrap(), vec![]);
        assert_eq!(child.blocks(), &[0, 1, 2]);
        // A range spanning two shared blocks copies both; an empty range copies nothing.
        assert_eq!(bm.make_writable(&mut child, 3, 3).unwrap(), vec![]);
        let copies = bm.make_writable(&mut child, 3, 5).unwrap();
        assert_eq!(copies, vec![(0, 4), (1, 5)]);
        check_consistent(&bm, &[&parent, &child]);
        bm.free(&mut parent);
        bm.free(&mut child);
        assert_eq!(bm.num_free(), bm.num_total());
    }

    #[test]
    fn make_writable_is_all_or_nothing() {
        let mut bm = BlockManager::new(3, 2);
        let mut parent = BlockTable::new();
        bm.allocate(&mut parent, 4).unwrap();
        let mut child = bm.fork(&parent);
        let err = bm.make_writable(&mut child, 0, 4).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 2, free: 1 });
        assert_eq!(child.blocks(), parent.blocks());
        assert_eq!(bm.num_free(), 1);
        check_consistent(&bm, &[&parent, &child]);
        bm.free(&mut parent);
        bm.free(&mut child);
        assert_eq!(bm.num_free(), 3);
    }

    #[test]
    fn prepare_write_counts_growth_and_copies_together() {
        let mut bm = BlockManager::new(4, 2);
        let mut parent = BlockTable::new();
        bm.allocate(&mut parent, 3).unwrap(); // 2 blocks, position 3 free in block 1
        let mut child = bm.fork(&parent);
        // Writing 3..6 needs a copy of block 1 and one new block: 2 of the 2 free.
        let mut other = BlockTable::new();
        bm.allocate(&mut other, 1).unwrap();
        assert_eq!(bm.num_free(), 1);
        assert_eq!(bm.prepare_write(&mut child, 3, 6), Err(OutOfBlocks { needed: 2, free: 1 }));
        assert_eq!(child.blocks(), parent.blocks());
        bm.free(&mut other);
        let copies = bm.prepare_write(&mut child, 3, 6).unwrap();
        assert_eq!(copies, vec![(1, 3)]);
        assert_eq!(child.blocks(), &[0, 3, 2]);
        check_consistent(&bm, &[&parent, &child]);
        bm.free(&mut parent);
        bm.free(&mut child);
        assert_eq!(bm.num_free(), bm.num_total());
    }

    #[test]
    fn ref_counts_never_underflow_across_forks_and_frees() {
        let mut bm = BlockManager::new(4, 4);
        let mut a = BlockTable::new();
        bm.allocate(&mut a, 8).unwrap();
        let mut b = bm.fork(&a);
        let mut c = bm.fork(&b);
        assert_eq!(bm.ref_count(0), 3);
        bm.free(&mut b);
        bm.free(&mut b); // the table was emptied: a second free is harmless
        assert_eq!(bm.ref_count(0), 2);
        bm.free(&mut a);
        bm.free(&mut c);
        assert_eq!(bm.ref_count(0), 0);
        assert_eq!(bm.num_free(), 4);
        check_consistent(&bm, &[]);
    }

    /// A table smuggled past the counting (only possible inside this module) frees a block twice:
    /// debug builds must catch it rather than put the block on the free list twice.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "ref count underflow")]
    fn double_free_is_caught_in_debug_builds() {
        let mut bm = BlockManager::new(2, 4);
        let mut a = BlockTable::new();
        bm.allocate(&mut a, 4).unwrap();
        let mut smuggled = BlockTable(a.blocks().to_vec());
        bm.free(&mut a);
        bm.free(&mut smuggled);
    }

    /// Tiny xorshift PRNG: deterministic, no crates.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    /// Random allocate/fork/make_writable/free on many tables; the pool always matches the
    /// tables, written ranges are exclusive, and everything is free once all tables are freed.
    #[test]
    fn random_operations_keep_the_pool_consistent() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut bm = BlockManager::new(24, 4);
        let mut tables: Vec<BlockTable> = Vec::new();
        for _ in 0..5000 {
            match rng.below(5) {
                0 => {
                    let mut t = BlockTable::new();
                    let _ = bm.allocate(&mut t, rng.below(30));
                    tables.push(t);
                }
                1 if !tables.is_empty() => {
                    let i = rng.below(tables.len());
                    let n = rng.below(40);
                    let before = tables[i].len();
                    if bm.allocate(&mut tables[i], n).is_err() {
                        assert_eq!(tables[i].len(), before);
                    }
                }
                2 if !tables.is_empty() => {
                    let i = rng.below(tables.len());
                    let t = bm.fork(&tables[i]);
                    tables.push(t);
                }
                3 if !tables.is_empty() => {
                    let i = rng.below(tables.len());
                    let first = rng.below(tables[i].len() * 4 + 1);
                    let end = first + rng.below(9);
                    if bm.prepare_write(&mut tables[i], first, end).is_ok() {
                        for p in first..end {
                            assert_eq!(bm.ref_count(tables[i].blocks()[p / 4]), 1);
                        }
                    }
                }
                _ if !tables.is_empty() => {
                    let i = rng.below(tables.len());
                    let mut t = tables.swap_remove(i);
                    bm.free(&mut t);
                }
                _ => {}
            }
            let refs: Vec<&BlockTable> = tables.iter().collect();
            check_consistent(&bm, &refs);
        }
        for t in &mut tables {
            bm.free(t);
        }
        assert_eq!(bm.num_free(), bm.num_total());
        check_consistent(&bm, &[]);
    }
}
