//! Model-free tests of the block pool: ref counts, copy-on-write, and the prefix cache (hashes,
//! LRU eviction of freed cached blocks, hits that revive them), in the style of vLLM's
//! `tests/v1/core/test_prefix_caching.py`.

use super::*;
use crate::block_hash::block_hashes;
use crate::test_rng::Rng;

impl BlockManager {
    fn new_for_test(num_blocks: usize, block_size: usize) -> Self {
        Self::new(num_blocks, block_size, true)
    }
}

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
    let mut free: Vec<BlockId> = bm.free.values().copied().collect();
    free.sort_unstable();
    let unreferenced: Vec<BlockId> = (0..bm.num_total() as BlockId).filter(|&b| expected[b as usize] == 0).collect();
    assert_eq!(free, unreferenced);
    for (&stamp, &b) in &bm.free {
        assert_eq!(bm.free_stamp[b as usize], stamp, "block {b} filed under a stale stamp");
    }
    // The hash map and the per-block hashes describe the same registrations.
    assert_eq!(bm.hash_of.iter().flatten().count(), bm.cached.len());
    for (h, &b) in &bm.cached {
        assert_eq!(bm.hash_of[b as usize], Some(*h));
    }
    let free_cached = bm.free.values().filter(|&&b| bm.hash_of[b as usize].is_some()).count();
    assert_eq!(bm.num_free_cached(), free_cached);
}

#[test]
fn blocks_for_and_slot_mapping() {
    let bm = BlockManager::new_for_test(8, 4);
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
fn allocate_grows_only_as_needed_and_reuses_least_recently_freed_first() {
    let mut bm = BlockManager::new_for_test(4, 4);
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
    // 3 was free the longest; a table is released tail first, so 2, 1, 0 follow.
    let mut u = BlockTable::new();
    bm.allocate(&mut u, 16).unwrap();
    assert_eq!(u.blocks(), &[3, 2, 1, 0]);
    bm.free(&mut u);
    check_consistent(&bm, &[]);
}

#[test]
fn allocate_is_all_or_nothing() {
    let mut bm = BlockManager::new_for_test(3, 2);
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
    let mut bm = BlockManager::new_for_test(4, 4);
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
    let mut bm = BlockManager::new_for_test(8, 4);
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
    let mut bm = BlockManager::new_for_test(3, 2);
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
    let mut bm = BlockManager::new_for_test(4, 2);
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
    let mut bm = BlockManager::new_for_test(4, 4);
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
    let mut bm = BlockManager::new_for_test(2, 4);
    let mut a = BlockTable::new();
    bm.allocate(&mut a, 4).unwrap();
    let mut smuggled = BlockTable(a.blocks().to_vec());
    bm.free(&mut a);
    bm.free(&mut smuggled);
}

/// Random allocate/fork/make_writable/free on many tables; the pool always matches the
/// tables, written ranges are exclusive, and everything is free once all tables are freed.
#[test]
fn random_operations_keep_the_pool_consistent() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut bm = BlockManager::new_for_test(24, 4);
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

/// Registers the full blocks of `table` under `hashes` (what the scheduler does after a step).
fn register_all(bm: &mut BlockManager, table: &BlockTable, hashes: &[BlockHash]) {
    for (&b, &h) in table.blocks().iter().zip(hashes) {
        bm.register(b, h);
    }
}

#[test]
fn a_freed_prefix_is_found_again_and_revived_without_copying() {
    let mut bm = BlockManager::new_for_test(8, 4);
    let prompt: Vec<u32> = (0..10).collect(); // 2 full blocks + 2 tokens
    let hashes = block_hashes(&prompt, 4);
    let mut a = BlockTable::new();
    bm.admit(&mut a, &[], 10, 10).unwrap();
    register_all(&mut bm, &a, &hashes);
    assert_eq!(bm.num_cached(), 2);
    let a_blocks = a.blocks().to_vec();
    bm.free(&mut a);
    assert_eq!((bm.num_free(), bm.num_free_cached()), (8, 2));
    check_consistent(&bm, &[]);
    // Same prefix, different tail: the two full blocks are hits, the rest is fresh.
    let mut other = prompt.clone();
    other.extend([77, 78, 79]);
    let hit = bm.lookup(&block_hashes(&other, 4), (other.len() - 1) / 4);
    assert_eq!(hit, a_blocks[..2]);
    let mut b = BlockTable::new();
    bm.admit(&mut b, &hit, other.len(), other.len()).unwrap();
    assert_eq!(b.blocks()[..2], a_blocks[..2]);
    assert_eq!(bm.num_free_cached(), 0);
    assert_eq!(bm.counters(), CacheCounters { queried_tokens: 10 + 13, hit_tokens: 8, evictions: 0 });
    check_consistent(&bm, &[&b]);
}

#[test]
fn a_hit_on_blocks_in_use_shares_them() {
    let mut bm = BlockManager::new_for_test(6, 4);
    let prompt: Vec<u32> = (0..9).collect();
    let hashes = block_hashes(&prompt, 4);
    let mut a = BlockTable::new();
    bm.admit(&mut a, &[], 9, 9).unwrap();
    register_all(&mut bm, &a, &hashes);
    let hit = bm.lookup(&hashes, 2);
    let mut b = BlockTable::new();
    bm.admit(&mut b, &hit, 9, 9).unwrap();
    assert_eq!(bm.ref_count(a.blocks()[0]), 2);
    assert_eq!(bm.ref_count(a.blocks()[1]), 2);
    assert_ne!(a.blocks()[2], b.blocks()[2], "the partial block is never shared by a hit");
    check_consistent(&bm, &[&a, &b]);
    bm.free(&mut a);
    bm.free(&mut b);
    assert_eq!(bm.num_free(), 6);
    check_consistent(&bm, &[]);
}

#[test]
fn the_least_recently_freed_cached_block_is_evicted_first_and_its_chain_breaks_there() {
    let mut bm = BlockManager::new_for_test(4, 2);
    let prompt: Vec<u32> = (0..8).collect(); // 4 full blocks of 2
    let hashes = block_hashes(&prompt, 2);
    let mut a = BlockTable::new();
    bm.admit(&mut a, &[], 8, 8).unwrap();
    register_all(&mut bm, &a, &hashes);
    let blocks = a.blocks().to_vec();
    bm.free(&mut a); // tail first: block 3 is the least recently freed
    assert_eq!(bm.num_free_cached(), 4);
    let mut x = BlockTable::new();
    bm.allocate(&mut x, 2).unwrap();
    assert_eq!(x.blocks(), &[blocks[3]]);
    assert_eq!(bm.counters().evictions, 1);
    // The first three blocks are still a usable prefix.
    assert_eq!(bm.lookup(&hashes, 4), blocks[..3]);
    bm.allocate(&mut x, 4).unwrap();
    assert_eq!(bm.lookup(&hashes, 4), blocks[..2]);
    check_consistent(&bm, &[&x]);
}

#[test]
fn admit_is_all_or_nothing_counting_revived_blocks() {
    let mut bm = BlockManager::new_for_test(4, 2);
    let prompt: Vec<u32> = (0..5).collect();
    let hashes = block_hashes(&prompt, 2);
    let mut a = BlockTable::new();
    bm.admit(&mut a, &[], 4, 4).unwrap();
    register_all(&mut bm, &a, &hashes);
    bm.free(&mut a);
    let mut hog = BlockTable::new();
    bm.allocate(&mut hog, 4).unwrap(); // takes the 2 never-used blocks
    assert_eq!(bm.num_free(), 2);
    // Reviving 2 cached blocks + 1 fresh = 3 > 2 free: refused, nothing changed.
    let hit = bm.lookup(&hashes, 2);
    assert_eq!(hit.len(), 2);
    let mut b = BlockTable::new();
    assert_eq!(bm.admit(&mut b, &hit, 5, 5), Err(OutOfBlocks { needed: 3, free: 2 }));
    assert!(b.is_empty());
    assert_eq!((bm.num_free(), bm.num_free_cached()), (2, 2));
    assert_eq!(bm.counters().queried_tokens, 4);
    check_consistent(&bm, &[&hog]);
}

#[test]
fn registration_is_first_come_and_off_means_off() {
    let mut bm = BlockManager::new_for_test(4, 2);
    let h = block_hashes(&[1, 2], 2)[0];
    let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
    bm.allocate(&mut a, 2).unwrap();
    bm.allocate(&mut b, 2).unwrap();
    bm.register(a.blocks()[0], h);
    bm.register(b.blocks()[0], h); // same contents computed twice: the first block keeps the key
    assert_eq!(bm.lookup(&[h], 1), a.blocks());
    assert_eq!(bm.hash_of(b.blocks()[0]), None);
    bm.clear_cache();
    assert!(bm.lookup(&[h], 1).is_empty());
    check_consistent(&bm, &[&a, &b]);
    let mut off = BlockManager::new(4, 2, false);
    let mut c = BlockTable::new();
    off.allocate(&mut c, 2).unwrap();
    off.register(c.blocks()[0], h);
    assert!(off.lookup(&[h], 1).is_empty());
    assert_eq!(off.num_cached(), 0);
}

#[test]
fn writing_into_a_registered_block_unregisters_or_copies_it() {
    let mut bm = BlockManager::new_for_test(6, 2);
    let hashes = block_hashes(&[1, 2, 3, 4], 2);
    let mut a = BlockTable::new();
    bm.admit(&mut a, &[], 4, 4).unwrap();
    register_all(&mut bm, &a, &hashes);
    let mut child = bm.fork(&a);
    // The child rewrites position 1 (a rollback): block 0 is shared, so it gets a copy and the
    // cached original stays registered.
    let copies = bm.prepare_write(&mut child, 1, 2).unwrap();
    assert_eq!(copies, vec![(a.blocks()[0], child.blocks()[0])]);
    assert_eq!(bm.hash_of(a.blocks()[0]), Some(hashes[0]));
    check_consistent(&bm, &[&a, &child]);
    // Once the parent is the sole owner of block 1 and rewrites position 3, its registration
    // goes.
    bm.free(&mut child);
    bm.prepare_write(&mut a, 3, 4).unwrap();
    assert_eq!(bm.hash_of(a.blocks()[1]), None);
    assert_eq!(bm.lookup(&hashes, 2), a.blocks()[..1]);
    check_consistent(&bm, &[&a]);
}

#[test]
fn truncate_releases_the_blocks_past_the_end() {
    let mut bm = BlockManager::new_for_test(6, 2);
    let mut a = BlockTable::new();
    bm.allocate(&mut a, 9).unwrap();
    let keep = a.blocks()[..2].to_vec();
    bm.truncate(&mut a, 3);
    assert_eq!(a.blocks(), keep);
    assert_eq!(bm.num_free(), 4);
    check_consistent(&bm, &[&a]);
}

/// Random admissions with shared prefixes, registrations, forks, writes and frees: the pool's
/// bookkeeping always matches the live tables, and every cached block still maps its hash.
#[test]
fn random_caching_operations_keep_the_pool_consistent() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut bm = BlockManager::new_for_test(32, 4);
    let mut tables: Vec<BlockTable> = Vec::new();
    for _ in 0..4000 {
        match rng.below(4) {
            0 => {
                // Prompts from a few shared stems so hits are frequent.
                let stem = rng.below(3) as u32;
                let len = 1 + rng.below(30);
                let prompt: Vec<u32> = (0..len as u32).map(|i| if i < 12 { stem * 100 + i } else { i * 7 }).collect();
                let hashes = block_hashes(&prompt, 4);
                let hit = bm.lookup(&hashes, (len - 1) / 4);
                let mut t = BlockTable::new();
                if bm.admit(&mut t, &hit, len, len).is_ok() {
                    register_all(&mut bm, &t, &hashes);
                    tables.push(t);
                }
            }
            1 if !tables.is_empty() => {
                let i = rng.below(tables.len());
                let t = bm.fork(&tables[i]);
                tables.push(t);
            }
            2 if !tables.is_empty() => {
                let i = rng.below(tables.len());
                let first = rng.below(tables[i].len() * 4 + 1);
                let _ = bm.prepare_write(&mut tables[i], first, first + rng.below(9));
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
