//! CPU-only scheduler tests: a fake model loop drives [`Scheduler`] (schedule -> sample a token for
//! every sequence that asked for logits -> finish some) and every step is checked against the
//! invariants in [`check_invariants`]. No tensors, no model.

use std::collections::{BTreeMap, HashSet};

use super::*;
use crate::block_hash::{block_hashes, extend_hashes};
use crate::test_rng::Rng;

fn cfg(max_num_seqs: usize, max_num_batched_tokens: usize, num_blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens,
        num_blocks,
        block_size,
        enable_prefix_caching: true,
        long_prefill_token_threshold: 0,
    }
}

fn ids(out: &SchedulerOutput) -> Vec<SeqId> {
    out.seqs.iter().map(|s| s.id).collect()
}

/// `(id, start, num_tokens, needs_logits)` of each scheduled sequence, for compact asserts.
fn plan(out: &SchedulerOutput) -> Vec<(SeqId, usize, usize, bool)> {
    out.seqs.iter().map(|s| (s.id, s.start, s.num_tokens, s.needs_logits)).collect()
}

/// Schedules one step, checks every invariant, and plays the model: each sequence that asked for
/// logits gets one sampled token.
fn step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule();
    check_invariants(s, &out);
    for seq in out.seqs.iter().filter(|q| q.needs_logits) {
        s.append_token(seq.id);
    }
    out
}

/// Everything that must hold after any `schedule()`.
fn check_invariants(s: &Scheduler, out: &SchedulerOutput) {
    let bs = s.block_size();
    // Budget: exact accounting, never exceeded.
    let sum: usize = out.seqs.iter().map(|q| q.num_tokens).sum();
    assert_eq!(out.num_batched_tokens, sum);
    assert!(sum <= s.cfg.max_num_batched_tokens, "budget exceeded: {sum}");
    // Each scheduled sequence appears once, is running, in running-list order, and owns exactly
    // the blocks it will write.
    let mut seen = HashSet::new();
    // Decodes (one token) come first, then the rest; each group in running order.
    let mut last_pos = [None, None];
    for q in &out.seqs {
        assert!(seen.insert(q.id), "sequence {} scheduled twice", q.id);
        assert!(q.num_tokens > 0);
        let pos = s.running.iter().position(|&r| r == q.id).expect("scheduled sequence is running");
        let group = usize::from(q.num_tokens > 1);
        assert!(last_pos[group] < Some(pos), "scheduled out of running order");
        last_pos[group] = Some(pos);
        let st = &s.seqs[&q.id];
        assert_eq!(st.num_computed, q.start + q.num_tokens);
        assert_eq!(q.needs_logits, st.num_computed == st.len);
        assert_eq!(q.block_table, st.table.blocks());
        for p in q.start..q.start + q.num_tokens {
            let b = st.table.blocks()[p / bs];
            assert_eq!(s.blocks.ref_count(b), 1, "seq {} writes shared block {b}", q.id);
        }
    }
    for id in &out.preempted {
        assert!(!seen.contains(id), "preempted sequence {id} was scheduled");
        assert!(s.waiting.contains(id));
    }
    // Queues: every sequence is in exactly one; waiting ones hold no KV; running ones are covered.
    assert_eq!(s.running.len() + s.waiting.len(), s.seqs.len());
    let all: HashSet<SeqId> = s.running.iter().chain(s.waiting.iter()).copied().collect();
    assert_eq!(all.len(), s.seqs.len());
    // Waiting sequences hold KV only as resumed sessions or forks without a slot (covered like
    // running ones).
    for id in &s.waiting {
        let st = &s.seqs[id];
        assert!(st.table.len() * bs >= st.num_computed);
        assert_eq!(st.num_computed == 0, st.table.is_empty());
    }
    for id in &s.running {
        let st = &s.seqs[id];
        assert!(st.table.len() * bs >= st.num_computed);
        assert!(st.num_computed <= st.len);
    }
    assert!(s.running.len() <= s.cfg.max_num_seqs, "max_num_seqs exceeded");
    check_blocks(s);
}

/// Block usage: each block's ref count equals the table entries naming it; exactly the
/// unreferenced blocks are free.
fn check_blocks(s: &Scheduler) {
    let mut refs = vec![0u32; s.num_total_blocks()];
    for st in s.seqs.values().chain(s.parked.values()) {
        for &b in st.table.blocks() {
            refs[b as usize] += 1;
        }
    }
    for (b, &n) in refs.iter().enumerate() {
        assert_eq!(s.blocks.ref_count(b as BlockId), n, "ref count of block {b}");
    }
    assert_eq!(s.num_free_blocks(), refs.iter().filter(|&&n| n == 0).count());
}

fn assert_all_free(s: &Scheduler) {
    assert_eq!(s.num_running() + s.num_waiting() + s.num_parked(), 0);
    assert_eq!(s.num_free_blocks(), s.num_total_blocks());
    check_blocks(s);
}

#[test]
fn prefill_then_decode_is_one_code_path() {
    let mut s = Scheduler::new(cfg(4, 64, 8, 4));
    s.add(1, 10, Vec::new());
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 0, 10, true)]);
    assert_eq!(out.seqs[0].block_table, vec![0, 1, 2]);
    assert_eq!(plan(&step(&mut s)), vec![(1, 10, 1, true)]);
    assert_eq!(plan(&step(&mut s)), vec![(1, 11, 1, true)]);
    assert_eq!(s.num_computed(1), Some(12));
    assert_eq!(s.seq_len(1), Some(13));
    s.finish(1);
    assert_all_free(&s);
}

#[test]
fn chunked_prefill_respects_token_budget_exactly() {
    let mut s = Scheduler::new(cfg(4, 8, 16, 4));
    s.add(1, 20, Vec::new());
    s.add(2, 5, Vec::new());
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 0, 8, false)]);
    assert_eq!(out.num_batched_tokens, 8);
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 8, 8, false)]);
    assert_eq!(out.num_batched_tokens, 8);
    // The last 4 prompt tokens of 1, then a partial first chunk of 2 fills the budget exactly.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 16, 4, true), (2, 0, 4, false)]);
    assert_eq!(out.num_batched_tokens, 8);
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 20, 1, true), (2, 4, 1, true)]);
    assert_eq!(out.num_batched_tokens, 2);
    s.finish(1);
    s.finish(2);
    assert_all_free(&s);
}

#[test]
fn decode_is_scheduled_before_new_prefills() {
    let mut s = Scheduler::new(cfg(4, 4, 16, 4));
    s.add(1, 3, Vec::new());
    s.add(2, 1, Vec::new());
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 3, true), (2, 0, 1, true)]);
    s.add(3, 10, Vec::new());
    // Both decoders first, then the new prompt gets only what is left of the budget.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 3, 1, true), (2, 1, 1, true), (3, 0, 2, false)]);
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 4, 1, true), (2, 2, 1, true), (3, 2, 2, false)]);
    for id in 1..=3 {
        s.finish(id);
    }
    assert_all_free(&s);
}

#[test]
fn admission_waits_for_blocks_without_preempting() {
    let mut s = Scheduler::new(cfg(8, 64, 4, 4));
    s.add(1, 12, Vec::new()); // 3 of 4 blocks
    assert_eq!(ids(&step(&mut s)), vec![1]);
    s.add(2, 8, Vec::new()); // needs 2 blocks, 1 free
    s.add(3, 2, Vec::new()); // would fit, but must not overtake 2
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 12, 1, true)]);
    assert!(out.preempted.is_empty());
    assert_eq!(s.num_waiting(), 2);
    s.finish(1);
    assert_eq!(ids(&step(&mut s)), vec![2, 3]);
    s.finish(2);
    s.finish(3);
    assert_all_free(&s);
}

#[test]
fn max_num_seqs_caps_running() {
    let mut s = Scheduler::new(cfg(4, 64, 32, 4));
    for id in 0..6 {
        s.add(id, 3, Vec::new());
    }
    assert_eq!(ids(&step(&mut s)), vec![0, 1, 2, 3]);
    assert_eq!((s.num_running(), s.num_waiting()), (4, 2));
    assert_eq!(ids(&step(&mut s)), vec![0, 1, 2, 3]);
    s.finish(1);
    assert_eq!(ids(&step(&mut s)), vec![0, 2, 3, 4]);
    assert!(s.is_running(4) && !s.is_running(5));
    for id in 0..6 {
        s.finish(id);
    }
    assert_all_free(&s);
}

#[test]
fn a_request_with_n_starts_on_one_slot_and_its_forks_take_free_slots() {
    let mut s = Scheduler::new(cfg(3, 64, 32, 4));
    s.add(1, 5, Vec::new()); // n = 4
    s.add(2, 5, Vec::new());
    // One slot each: nothing is reserved for 1's children.
    assert_eq!(ids(&step(&mut s)), vec![1, 2]);
    // The prompt is done: the engine forks before sampling. One slot is free: 10 runs right
    // after its parent; 11 and 12 wait in choice order, holding the shared prompt blocks.
    for child in [10, 11, 12] {
        s.fork(1, child);
    }
    assert_eq!(s.running, vec![1, 10, 2]);
    assert_eq!(s.waiting, vec![11, 12]);
    // (The fake model sampled the parent's token first; the children copied it.)
    assert_eq!((s.num_computed(12), s.seq_len(12)), (Some(5), Some(6)));
    assert_eq!(s.blocks.ref_count(0), 4);
    s.add(3, 5, Vec::new()); // a later request
    assert_eq!(s.waiting, vec![11, 12, 3]);
    assert_eq!(ids(&step(&mut s)), vec![1, 10, 2]);
    s.finish(2);
    // Family 1 holds 2 of 3 slots (its share, rounded up) while 3 waits: 3 goes first.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 6, 1, true), (10, 6, 1, true), (3, 0, 5, true)]);
    assert_eq!(s.waiting, vec![11, 12]);
    s.add(4, 5, Vec::new());
    s.finish(1);
    // Below its share again, 11 takes the free slot ahead of the later request 4, computing
    // only its sampled token (its prompt's K/V is shared): 10's shared partial block is copied.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(10, 7, 1, true), (3, 5, 1, true), (11, 5, 1, true)]);
    assert_eq!(out.admitted, vec![(11, 5)]);
    assert_eq!(out.copies.len(), 1);
    assert_eq!(s.waiting, vec![12, 4]);
    for id in [3, 4, 10, 11, 12] {
        s.finish(id);
    }
    assert_all_free(&s);
}

#[test]
fn an_n_request_alone_runs_its_choices_in_waves_on_few_slots() {
    let mut s = Scheduler::new(cfg(2, 64, 32, 4));
    s.add(1, 6, Vec::new()); // n = 5 on 2 slots
    step(&mut s);
    for child in 2..=5 {
        s.fork(1, child);
    }
    assert_eq!((s.running.clone(), s.waiting.clone()), (vec![1, 2], vec![3, 4, 5].into()));
    // Only its own forks wait: they are not held back by the share rule.
    for (done, next) in [(1, 3), (2, 4), (3, 5)] {
        step(&mut s);
        s.finish(done);
        assert_eq!(ids(&step(&mut s)).last(), Some(&next));
    }
    for id in 4..=5 {
        s.finish(id);
    }
    assert_all_free(&s);
}

#[test]
fn preemption_picks_newest_requeues_it_at_front_and_it_resumes() {
    let mut s = Scheduler::new(cfg(8, 64, 4, 4));
    for id in 1..=4 {
        s.add(id, 4, Vec::new());
    }
    assert_eq!(ids(&step(&mut s)), vec![1, 2, 3, 4]);
    assert_eq!(s.num_free_blocks(), 0);
    s.add(5, 2, Vec::new());
    // Every decoder now needs a fifth slot, i.e. a new block: 1 takes 4's, 2 takes 3's.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 4, 1, true), (2, 4, 1, true)]);
    assert_eq!(out.preempted, vec![4, 3]);
    assert_eq!(s.waiting, vec![3, 4, 5]);
    assert_eq!((s.num_computed(3), s.seq_len(3)), (Some(0), Some(5)));
    s.finish(1);
    // 3 recomputes all 5 known tokens (prompt + its sampled one) and asks for logits; 4 does not
    // fit, so 5 waits behind it.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(2, 5, 1, true), (3, 0, 5, true)]);
    assert_eq!(s.waiting, vec![4, 5]);
    assert_eq!(plan(&step(&mut s)), vec![(2, 6, 1, true), (3, 5, 1, true)]);
    for id in 1..=5 {
        s.finish(id);
    }
    assert_all_free(&s);
}

#[test]
fn sequence_preempts_itself_when_it_is_the_newest() {
    let mut s = Scheduler::new(cfg(8, 64, 3, 2));
    s.add(1, 3, Vec::new()); // 2 blocks
    s.add(2, 2, Vec::new()); // 1 block
    assert_eq!(ids(&step(&mut s)), vec![1, 2]);
    // 1 writes position 3 inside its block; 2 needs a new block and is the newest.
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 3, 1, true)]);
    assert_eq!(out.preempted, vec![2]);
    assert_eq!(s.waiting, vec![2]);
    // 1 takes the freed block; 2 (3 tokens, 2 blocks) waits for room.
    assert_eq!(plan(&step(&mut s)), vec![(1, 4, 1, true)]);
    s.finish(1);
    assert_eq!(plan(&step(&mut s)), vec![(2, 0, 3, true)]);
    s.finish(2);
    assert_all_free(&s);
}

#[test]
fn fork_copies_the_shared_partial_block_once_per_extra_writer() {
    let mut s = Scheduler::new(cfg(3, 64, 8, 4));
    s.add(1, 6, Vec::new());
    let out = step(&mut s);
    assert_eq!(out.seqs[0].block_table, vec![0, 1]);
    // n = 3: the engine forks after the prompt's logits, then samples one token for each.
    s.fork(1, 2);
    s.fork(1, 3);
    for id in 1..=3 {
        s.append_token(id);
    }
    assert_eq!(s.blocks.ref_count(1), 3);
    // Position 6 is in shared block 1: 1 and 3 get copies; 2, last, owns the original.
    let out = step(&mut s);
    assert_eq!(ids(&out), vec![1, 3, 2]);
    assert_eq!(out.copies, vec![(1, 2), (1, 3)]);
    assert_eq!(out.seqs[0].block_table, vec![0, 2]);
    assert_eq!(out.seqs[1].block_table, vec![0, 3]);
    assert_eq!(out.seqs[2].block_table, vec![0, 1]);
    // The full prompt block stays shared: it is only read.
    assert_eq!(s.blocks.ref_count(0), 3);
    // Later decodes (one inside, one crossing into a new block) copy nothing.
    assert!(step(&mut s).copies.is_empty());
    assert!(step(&mut s).copies.is_empty());
    for id in 1..=3 {
        s.finish(id);
    }
    assert_all_free(&s);
}

#[test]
fn fork_on_a_block_boundary_needs_no_copy() {
    let mut s = Scheduler::new(cfg(2, 64, 8, 4));
    s.add(1, 8, Vec::new());
    step(&mut s);
    s.fork(1, 2);
    s.append_token(1);
    s.append_token(2);
    let out = step(&mut s);
    assert!(out.copies.is_empty());
    assert_eq!(out.seqs[0].block_table, vec![0, 1, 2]);
    assert_eq!(out.seqs[1].block_table, vec![0, 1, 3]);
    s.finish(1);
    assert_eq!(s.blocks.ref_count(0), 1);
    s.finish(2);
    assert_all_free(&s);
}

#[test]
fn fork_of_a_preempted_parent_waits_right_behind_it() {
    let mut s = Scheduler::new(cfg(4, 64, 2, 2));
    s.add(1, 2, Vec::new());
    s.add(2, 2, Vec::new());
    step(&mut s);
    let out = step(&mut s); // both need a 3rd slot: 2 is preempted for 1
    assert_eq!(out.preempted, vec![2]);
    s.fork(2, 3);
    assert_eq!(s.waiting, vec![2, 3]);
    assert_eq!(s.num_computed(3), Some(0));
    s.finish(1);
    assert_eq!(ids(&step(&mut s)), vec![2]); // 2 x 3 tokens need 4 blocks: 3 waits
    s.finish(2);
    assert_eq!(plan(&step(&mut s)), vec![(3, 0, 3, true)]);
    s.finish(3);
    assert_all_free(&s);
}

#[test]
fn all_blocks_free_after_a_fake_model_loop_finishes_everything() {
    let mut s = Scheduler::new(cfg(3, 10, 12, 4));
    let targets: BTreeMap<SeqId, usize> = (0..8).map(|id| (id, 3 + 5 * id as usize)).collect();
    for (&id, &t) in &targets {
        s.add(id, 1 + (t / 2), Vec::new());
    }
    let mut steps = 0;
    while s.num_running() + s.num_waiting() > 0 {
        steps += 1;
        assert!(steps < 500, "no progress");
        step(&mut s);
        for (&id, &t) in &targets {
            if s.seq_len(id).is_some_and(|l| l >= t) {
                s.finish(id);
            }
        }
    }
    assert_all_free(&s);
}

#[test]
fn abort_while_waiting_leaves_the_queue_and_blocks_untouched() {
    let mut s = Scheduler::new(cfg(1, 64, 8, 4));
    s.add(1, 4, Vec::new());
    s.add(2, 4, Vec::new());
    s.add(3, 4, Vec::new());
    step(&mut s);
    let free = s.num_free_blocks();
    s.finish(2);
    assert_eq!(s.num_free_blocks(), free);
    assert_eq!(s.waiting, vec![3]);
    s.finish(1);
    assert_eq!(ids(&step(&mut s)), vec![3]);
    s.finish(3);
    assert_all_free(&s);
}

#[test]
fn abort_mid_prefill_frees_its_blocks() {
    let mut s = Scheduler::new(cfg(4, 8, 8, 4));
    s.add(1, 20, Vec::new());
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 8, false)]);
    assert_eq!(s.num_free_blocks(), 6);
    s.finish(1);
    assert_all_free(&s);
    assert!(step(&mut s).seqs.is_empty());
}

#[test]
fn preempted_then_finished_frees_everything() {
    let mut s = Scheduler::new(cfg(4, 64, 2, 2));
    s.add(1, 2, Vec::new());
    s.add(2, 2, Vec::new());
    step(&mut s);
    assert_eq!(step(&mut s).preempted, vec![2]);
    s.finish(2); // aborted while preempted
    s.finish(1);
    assert_all_free(&s);
}

#[test]
fn engine_misuse_is_a_noop() {
    let mut s = Scheduler::new(cfg(2, 64, 4, 4));
    s.finish(42);
    s.append_token(42);
    s.fork(42, 43);
    s.add(1, 0, Vec::new()); // empty prompt: nothing to compute, would block the queue
    s.add(2, 17, Vec::new()); // never fits 16 slots
    assert_eq!(s.num_waiting(), 0);
    s.add(3, 4, Vec::new());
    s.add(3, 8, Vec::new()); // duplicate id
    s.fork(3, 3); // into an existing id
    assert_eq!((s.num_waiting(), s.seq_len(3)), (1, Some(4)));
    assert_eq!(ids(&step(&mut s)), vec![3]);
    s.finish(3);
    s.add(4, 4, Vec::new());
    assert_eq!(ids(&step(&mut s)), vec![4]);
    s.finish(4);
    s.finish(4);
    assert_eq!((s.num_computed(4), s.is_running(4)), (None, false));
    assert_all_free(&s);
}

#[test]
fn fits_matches_cache_capacity() {
    let s = Scheduler::new(cfg(2, 64, 4, 4));
    assert!(s.fits(0));
    assert!(s.fits(16));
    assert!(!s.fits(17));
    assert_eq!(s.num_total_blocks(), 4);
}

/// The fake engine around the scheduler in the property test. `kv` simulates the cache contents
/// (slot -> token id) so copy-on-write and block reuse are checked end to end, not just counted.
struct World {
    s: Scheduler,
    rng: Rng,
    /// Per live sequence: token ids known so far (prompt + sampled).
    tokens: BTreeMap<SeqId, Vec<u32>>,
    /// Finish once `len` reaches this.
    target: BTreeMap<SeqId, usize>,
    /// Children still to fork at the first logits (OpenAI `n - 1`).
    forks: BTreeMap<SeqId, usize>,
    /// Chained block hashes of each live sequence's known tokens.
    hashes: BTreeMap<SeqId, Vec<BlockHash>>,
    /// Parked sessions' tokens.
    parked: BTreeMap<SeqId, Vec<u32>>,
    kv: Vec<u32>,
    next_id: SeqId,
    preemptions: usize,
    copies: usize,
    resumed: usize,
}

impl World {
    fn new(c: SchedulerConfig, seed: u64) -> Self {
        let kv = vec![u32::MAX; c.num_blocks * c.block_size];
        let (tokens, target, forks) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let (hashes, parked) = (BTreeMap::new(), BTreeMap::new());
        let (s, rng) = (Scheduler::new(c), Rng(seed));
        Self { s, rng, tokens, target, forks, hashes, parked, kv, next_id: 0, preemptions: 0, copies: 0, resumed: 0 }
    }

    fn add_random(&mut self) {
        let prompt = 1 + self.rng.below(24);
        let total = prompt + 1 + self.rng.below(16);
        let n = 1 + self.rng.below(5);
        if !self.s.fits(total) {
            return; // the engine rejects these up front
        }
        let id = self.next_id;
        self.next_id += 1;
        // A few shared stems, so prompts often share cached prefixes.
        let stem = self.rng.below(3) as u32;
        let toks: Vec<u32> = (0..prompt as u32)
            .map(|i| if i < 14 { 5000 + stem * 100 + i } else { self.rng.below(1000) as u32 })
            .collect();
        let hashes = block_hashes(&toks, self.s.block_size());
        self.s.add(id, prompt, hashes.clone());
        self.hashes.insert(id, hashes);
        self.tokens.insert(id, toks);
        self.target.insert(id, total);
        self.forks.insert(id, n - 1);
    }

    fn abort_random(&mut self) {
        if self.tokens.is_empty() {
            return;
        }
        let i = self.rng.below(self.tokens.len());
        let id = *self.tokens.keys().nth(i).unwrap_or(&0);
        self.remove(id);
    }

    fn remove(&mut self, id: SeqId) {
        self.s.finish(id);
        self.tokens.remove(&id);
        self.target.remove(&id);
        self.forks.remove(&id);
        self.hashes.remove(&id);
    }

    /// Ends `id`'s turn: parks it (a session) or finishes it.
    fn end_turn(&mut self, id: SeqId) {
        if self.rng.below(3) == 0 && self.forks.get(&id).copied().unwrap_or(0) == 0 {
            let toks = self.tokens.remove(&id).unwrap_or_default();
            assert!(self.s.park(id));
            self.parked.insert(id, toks);
            self.target.remove(&id);
            self.forks.remove(&id);
            self.hashes.remove(&id);
        } else {
            self.remove(id);
        }
    }

    /// A random session operation: resume with a rollback and new tokens, fork, or release.
    fn session_op(&mut self) {
        let Some(&id) = self.parked.keys().nth(self.rng.below(self.parked.len().max(1))) else { return };
        match self.rng.below(4) {
            0 => {
                let child = self.next_id;
                self.next_id += 1;
                if self.s.fork_parked(id, child) {
                    self.parked.insert(child, self.parked[&id].clone());
                }
            }
            1 => {
                self.s.finish(id);
                self.parked.remove(&id);
            }
            _ => self.resume(id),
        }
    }

    fn resume(&mut self, id: SeqId) {
        let mut toks = self.parked.remove(&id).unwrap_or_default();
        let keep = toks.len() - self.rng.below(3).min(toks.len());
        toks.truncate(keep);
        toks.extend((0..1 + self.rng.below(6)).map(|_| self.rng.below(1000) as u32));
        let total = toks.len() + 1 + self.rng.below(6);
        if !self.s.fits(total) {
            self.s.finish(id);
            return;
        }
        let hashes = block_hashes(&toks, self.s.block_size());
        if self.s.resume(id, toks.len(), keep, hashes.clone()) {
            self.resumed += 1;
        } else {
            self.s.add(id, toks.len(), hashes.clone());
        }
        self.hashes.insert(id, hashes);
        self.tokens.insert(id, toks);
        self.target.insert(id, total);
        self.forks.insert(id, 0);
    }

    /// One engine step: schedule, apply copies, "compute" (write KV), verify every running
    /// sequence reads back its own tokens, then sample, fork and finish.
    fn step(&mut self) {
        let out = self.s.schedule();
        check_invariants(&self.s, &out);
        self.preemptions += out.preempted.len();
        self.copies += out.copies.len();
        let bs = self.s.block_size();
        for &(src, dst) in &out.copies {
            let (src, dst) = (src as usize * bs, dst as usize * bs);
            self.kv.copy_within(src..src + bs, dst);
        }
        for q in &out.seqs {
            for p in q.start..q.start + q.num_tokens {
                let slot = q.block_table[p / bs] as usize * bs + p % bs;
                self.kv[slot] = self.tokens[&q.id][p];
            }
        }
        self.s.step_done();
        self.verify_kv();
        for q in out.seqs.iter().filter(|q| q.needs_logits) {
            let mut family = vec![q.id];
            for _ in 0..self.forks.insert(q.id, 0).unwrap_or(0) {
                let child = self.next_id;
                self.next_id += 1;
                self.s.fork(q.id, child);
                self.tokens.insert(child, self.tokens[&q.id].clone());
                self.hashes.insert(child, self.hashes[&q.id].clone());
                self.target.insert(child, self.target[&q.id]);
                family.push(child);
            }
            for id in family {
                let tok = self.rng.below(1000) as u32;
                self.tokens.entry(id).or_default().push(tok);
                self.s.append_token(id);
                let hashes = self.hashes.entry(id).or_default();
                let known = hashes.len();
                extend_hashes(hashes, &self.tokens[&id], bs);
                self.s.add_hashes(id, &hashes[known..]);
                assert_eq!(self.s.seq_len(id), Some(self.tokens[&id].len()));
                if self.tokens[&id].len() >= self.target[&id] {
                    self.end_turn(id);
                }
            }
        }
    }

    /// Every sequence holding KV (running, waiting after a resume, parked) reads back its own
    /// tokens, cache hits included.
    fn verify_kv(&self) {
        let bs = self.s.block_size();
        let live = self.s.seqs.iter().map(|(id, st)| (st, &self.tokens[id]));
        let parked = self.s.parked.iter().map(|(id, st)| (st, &self.parked[id]));
        for (st, toks) in live.chain(parked) {
            for (p, &tok) in toks.iter().enumerate().take(st.num_computed) {
                assert_eq!(self.kv[st.table.slot(p, bs) as usize], tok, "KV at {p}");
            }
        }
    }
}

/// Thousands of random steps with random adds, forks (n > 1) and aborts over tight and loose
/// caches: every step satisfies [`check_invariants`] and every running sequence's cached KV reads
/// back its own tokens; at the end everything drains and all blocks are free.
#[test]
fn random_steps_keep_invariants() {
    let capped = SchedulerConfig { long_prefill_token_threshold: 5, ..cfg(6, 16, 24, 4) };
    let configs = [cfg(6, 16, 16, 4), cfg(4, 7, 9, 2), cfg(8, 64, 40, 8), cfg(3, 5, 8, 3), capped];
    for (k, &c) in configs.iter().enumerate() {
        let mut w = World::new(c, 0x2545_f491_4f6c_dd1d ^ (k as u64 + 1));
        for _ in 0..3000 {
            for _ in 0..w.rng.below(3) {
                match w.rng.below(10) {
                    0..=3 => w.add_random(),
                    4 => w.abort_random(),
                    5 | 6 => w.session_op(),
                    _ => {}
                }
            }
            w.step();
        }
        let mut drain = 0;
        while !w.tokens.is_empty() {
            drain += 1;
            assert!(drain < 10_000, "config {k}: no progress while draining");
            w.step();
        }
        for id in std::mem::take(&mut w.parked).into_keys() {
            w.s.finish(id);
        }
        assert_all_free(&w.s);
        let c = w.s.cache_counters();
        eprintln!(
            "config {k}: {} preemptions, {} copies, {} resumed, {} evicted sessions, {c:?}",
            w.preemptions,
            w.copies,
            w.resumed,
            w.s.evicted_sessions()
        );
        assert!(c.hit_tokens > 0 && w.resumed > 0, "config {k}: no cache hit or no resumed session");
        // The loose cache (config 2) is there to cover the no-pressure path.
        assert!(k == 2 || w.preemptions > 0, "config {k} never preempted");
        assert!(w.copies > 0, "config {k} never copied on write");
    }
}

#[test]
fn decodes_go_first_and_a_long_prefill_is_always_capped() {
    let c = SchedulerConfig { long_prefill_token_threshold: 8, ..cfg(8, 32, 64, 4) };
    let mut s = Scheduler::new(c);
    s.add(1, 100, Vec::new());
    // Even alone, the long prompt computes at most the threshold per step (short steps are what
    // bound the wait of a request arriving in the middle of one).
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 8, false)]);
    // A short request arrives: it is admitted at once, beside the long one's next chunk.
    s.add(2, 3, Vec::new());
    assert_eq!(plan(&step(&mut s)), vec![(1, 8, 8, false), (2, 0, 3, true)]);
    // 2 now decodes, and goes first; 1 goes on in chunks.
    assert_eq!(plan(&step(&mut s)), vec![(2, 3, 1, true), (1, 16, 8, false)]);
    s.finish(1);
    s.finish(2);
    assert_all_free(&s);
}

#[test]
fn background_work_waits_behind_normal_requests_and_is_preempted_first() {
    let mut s = Scheduler::new(cfg(2, 64, 32, 4));
    s.add_background(1, 3, Vec::new());
    s.add(2, 3, Vec::new());
    s.add(3, 3, Vec::new());
    // The normal requests take both slots though the background one came first.
    assert_eq!(ids(&step(&mut s)), vec![2, 3]);
    s.finish(2);
    assert_eq!(ids(&step(&mut s)), vec![3, 1]);
    s.finish(1);
    s.finish(3);
    assert_all_free(&s);

    // Three blocks: the older background sequence outgrows its block first; it is the one
    // preempted (recomputed later), not the newer normal one.
    let mut s = Scheduler::new(cfg(2, 64, 3, 4));
    s.add_background(1, 2, Vec::new());
    s.add(2, 4, Vec::new());
    let out = (0..8).map(|_| step(&mut s)).find(|o| !o.preempted.is_empty()).expect("a preemption");
    assert_eq!(out.preempted, vec![1]);
    assert_eq!(ids(&out), vec![2]);
    s.finish(1);
    s.finish(2);
    assert_all_free(&s);
}
