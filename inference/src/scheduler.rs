//! The scheduler: decides, each engine step, which sequences compute how many new tokens, and owns
//! the [`BlockManager`] that backs their KV cache.
//!
//! It is phase-free (vLLM v1's idea): a sequence is just `num_computed` (tokens whose K/V are in
//! the cache) and `len` (prompt + generated tokens known so far). A step grants each scheduled
//! sequence up to `len - num_computed` tokens under one token budget, so prefill, chunked prefill
//! and decode are one code path. When blocks run out, parked sessions are released first (least
//! recently parked first), then the newest running sequence is preempted by recompute: its blocks
//! are freed and it goes back to the front of the waiting queue.
//!
//! Prefix caching: a new sequence starts from the longest run of cached full blocks matching its
//! block hashes (computed by the engine from its tokens); blocks become cached once a step has
//! computed them ([`Scheduler::step_done`]). Sessions: a sequence can be parked between turns
//! ([`Scheduler::park`]) keeping its blocks, resumed with more tokens, or forked.
//!
//! Choices of one request (OpenAI `n`): the request runs on one slot until its prompt is done;
//! then the engine forks its children. Those that find no free slot wait, sharing the prompt's
//! blocks copy-on-write, ahead of requests that never ran; but while another request waits, a
//! request whose choices already hold half the slots lets it go first, so `n = 64` cannot keep
//! everyone else out until it ends.
//!
//! It knows ids, counts and hashes only: it must not touch a tensor, a token id, a model or a
//! request's sampling state. Engine misuse (unknown ids, duplicate ids) is a logged no-op, never a
//! panic; internal invariants are `debug_assert`s.

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockHash, BlockId, BlockManager, BlockTable, CacheCounters};

pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Cap on running sequences.
    pub max_num_seqs: usize,
    /// Token budget of one step, summed over all scheduled sequences.
    pub max_num_batched_tokens: usize,
    pub num_blocks: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Reuse cached full blocks across sequences (automatic prefix caching).
    pub enable_prefix_caching: bool,
    /// Most prompt tokens one sequence computes in a step while others wait or prefill too
    /// (vLLM's `long_prefill_token_threshold`); 0: no cap.
    pub long_prefill_token_threshold: usize,
}

/// One sequence's share of a step: compute positions `start..start + num_tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// First position computed this step (= `num_computed` before the step).
    pub start: usize,
    pub num_tokens: usize,
    /// `start + num_tokens == len`: the engine samples a token for this sequence.
    pub needs_logits: bool,
    /// The sequence's blocks, covering at least `start + num_tokens` positions.
    pub block_table: Vec<BlockId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Running decodes first, then running prefill chunks (each oldest first), then newly
    /// admitted sequences (FCFS).
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences admitted from the waiting queue this step, with how many of their tokens were
    /// already in the cache (prefix-cache hits, or a resumed session's own KV).
    pub admitted: Vec<(SeqId, usize)>,
    /// Sequences preempted by recompute this step: their KV is gone, they wait to start over.
    pub preempted: Vec<SeqId>,
    /// Copy-on-write `(src, dst)` block copies. The runner must apply them in this order, before
    /// the forward pass writes: a block freed by a preemption later in the same step may be the
    /// `dst` of a later pair after being the `src` of an earlier one.
    pub copies: Vec<(BlockId, BlockId)>,
    /// Sum of `num_tokens` over `seqs`; never above `max_num_batched_tokens`.
    pub num_batched_tokens: usize,
}

#[derive(Debug)]
struct SeqState {
    num_computed: usize,
    len: usize,
    /// The request this sequence is a choice of: its own id, or its fork parent's family.
    family: SeqId,
    /// It has run (or is a fork of one that did): it waits ahead of requests that never ran.
    started: bool,
    table: BlockTable,
    /// Chained hashes of the full blocks of the known tokens (the engine supplies them).
    hashes: Vec<BlockHash>,
    /// Leading blocks already offered to the prefix cache.
    registered: usize,
    /// Background work: admitted after normal sequences, preempted before them.
    background: bool,
}

impl SeqState {
    fn new(id: SeqId, len: usize, hashes: Vec<BlockHash>) -> Self {
        let table = BlockTable::new();
        Self { num_computed: 0, len, family: id, started: false, table, hashes, registered: 0, background: false }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    /// Running and waiting sequences.
    seqs: HashMap<SeqId, SeqState>,
    /// Scheduling priority, oldest first; a fork sits right after its parent. The back is the
    /// "newest" sequence, the first to be preempted.
    running: Vec<SeqId>,
    /// FCFS; preempted sequences re-enter at the front, forks without a slot right behind the
    /// sequences that already ran. A waiting sequence holds blocks only when it is a resumed
    /// session or such a fork.
    waiting: VecDeque<SeqId>,
    /// Sessions between turns: they keep their blocks until resumed, released or evicted.
    parked: HashMap<SeqId, SeqState>,
    /// Parked ids, least recently parked first (the eviction order).
    parked_order: VecDeque<SeqId>,
    /// Sequences computed in the step being run, whose full blocks join the prefix cache once
    /// the step succeeds.
    computing: Vec<SeqId>,
    evicted_sessions: u64,
}

impl Scheduler {
    /// Panics on a configuration that could never schedule anything (zero caps); that is a startup
    /// error, not a request's.
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.max_num_seqs > 0, "max_num_seqs must be > 0");
        assert!(cfg.max_num_batched_tokens > 0, "max_num_batched_tokens must be > 0");
        Self {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            cfg,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            parked: HashMap::new(),
            parked_order: VecDeque::new(),
            computing: Vec::new(),
            evicted_sessions: 0,
        }
    }

    /// Enqueues a new sequence at the back of the waiting queue; `hashes` are the chained hashes
    /// of its full prompt blocks (empty: no prefix caching for it). It needs one running slot,
    /// whatever its `n`: its children are forked later and take slots as they free up.
    ///
    /// Requests that could block the queue forever are refused with a warning instead: an empty
    /// prompt (nothing to compute) or one that can never fit the cache.
    pub fn add(&mut self, id: SeqId, prompt_len: usize, hashes: Vec<BlockHash>) {
        if self.knows(id) {
            tracing::warn!(seq = id, "scheduler: duplicate sequence id ignored");
            return;
        }
        if prompt_len == 0 || !self.fits(prompt_len) {
            tracing::warn!(seq = id, prompt_len, "scheduler: prompt is empty or exceeds the KV cache; ignored");
            return;
        }
        self.seqs.insert(id, SeqState::new(id, prompt_len, hashes));
        self.waiting.push_back(id);
    }

    /// [`add`](Self::add) for background work: it waits while any normal sequence waits, and
    /// is the first preempted when blocks run out.
    pub fn add_background(&mut self, id: SeqId, prompt_len: usize, hashes: Vec<BlockHash>) {
        self.add(id, prompt_len, hashes);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.background = true;
        }
    }

    fn is_background(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.background)
    }

    /// Forks `child` from `parent`: it shares the parent's blocks (copy-on-write), `num_computed`
    /// and `len`. It runs right after the parent when a running slot is free; otherwise it waits,
    /// keeping the shared blocks, behind the sequences that already ran and ahead of the rest
    /// (right after the parent if the parent itself was preempted).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        if self.knows(child) {
            tracing::warn!(seq = child, "scheduler: fork into an existing id ignored");
            return;
        }
        let Some(p) = self.seqs.get(&parent) else {
            tracing::warn!(seq = parent, "scheduler: fork of an unknown sequence ignored");
            return;
        };
        let state = SeqState { started: true, ..Self::fork_state(&mut self.blocks, p) };
        self.seqs.insert(child, state);
        let per_family = self.running_per_family();
        let yields =
            self.over_share(&per_family, child) && self.waiting.iter().any(|w| !self.over_share(&per_family, *w));
        let full = self.running.len() >= self.cfg.max_num_seqs;
        match self.running.iter().position(|&s| s == parent) {
            Some(i) if !full && !yields => self.running.insert(i + 1, child),
            Some(_) => {
                let started = self.waiting.iter().take_while(|w| self.seqs.get(w).is_some_and(|s| s.started)).count();
                self.waiting.insert(started, child);
            }
            None => match self.waiting.iter().position(|&s| s == parent) {
                Some(i) => self.waiting.insert(i + 1, child),
                None => debug_assert!(false, "sequence {parent} is neither running nor waiting"),
            },
        }
    }

    /// A new sequence sharing `p`'s blocks and tokens, in `p`'s family.
    fn fork_state(blocks: &mut BlockManager, p: &SeqState) -> SeqState {
        SeqState {
            num_computed: p.num_computed,
            len: p.len,
            family: p.family,
            started: p.started,
            table: blocks.fork(&p.table),
            hashes: p.hashes.clone(),
            registered: p.registered,
            background: p.background,
        }
    }

    /// A token was sampled for `id`: its known length grows by one.
    pub fn append_token(&mut self, id: SeqId) {
        self.append_tokens(id, 1);
    }

    /// `n` tokens were appended to `id` at once (a sampled one plus tokens a grammar forces):
    /// the next step computes them together, like a prefill chunk.
    pub fn append_tokens(&mut self, id: SeqId, n: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.len += n;
        }
    }

    /// Hashes of blocks of `id` that its appended tokens have filled.
    pub fn add_hashes(&mut self, id: SeqId, hashes: &[BlockHash]) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.hashes.extend_from_slice(hashes);
        }
    }

    /// Removes `id` (finished or aborted, running, waiting or parked) and frees its blocks.
    /// Unknown ids are a no-op, so aborting twice is harmless.
    pub fn finish(&mut self, id: SeqId) {
        if self.release_parked(id) {
            return;
        }
        let Some(mut s) = self.seqs.remove(&id) else { return };
        self.blocks.free(&mut s.table);
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(i);
        }
    }

    /// Plans one step: running sequences first (oldest first, preempting the newest when blocks
    /// run out), then waiting ones in FCFS order. `num_computed` advances by what was granted.
    /// The caller runs the step, then calls [`step_done`](Self::step_done) or
    /// [`step_failed`](Self::step_failed).
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.computing.clear();
        let cap = self.prefill_cap();
        self.schedule_running(&mut out, &mut budget, cap);
        // Blocks are short this step: admitting now would hand the blocks just freed straight to
        // a new sequence (possibly the one just preempted) and thrash.
        if out.preempted.is_empty() {
            self.admit_waiting(&mut out, &mut budget, cap);
        }
        out.num_batched_tokens = self.cfg.max_num_batched_tokens - budget;
        self.computing.extend(out.seqs.iter().map(|s| s.id));
        out
    }

    /// The step's forward pass wrote its K/V: full blocks now computed join the prefix cache.
    pub fn step_done(&mut self) {
        let bs = self.blocks.block_size();
        for id in std::mem::take(&mut self.computing) {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            let full = (s.num_computed / bs).min(s.hashes.len()).min(s.table.len());
            for j in s.registered..full {
                self.blocks.register(s.table.blocks()[j], s.hashes[j]);
            }
            s.registered = s.registered.max(full);
        }
    }

    /// The step failed: its blocks may hold garbage, so nothing cached is trusted any more.
    pub fn step_failed(&mut self) {
        self.computing.clear();
        self.blocks.clear_cache();
        for s in self.seqs.values_mut().chain(self.parked.values_mut()) {
            s.registered = 0;
        }
    }

    /// Running sequences get their tokens decodes first (a decode is one token and a user
    /// waiting on it), then prefill chunks, each group oldest first. When blocks run out, the
    /// newest running sequence not yet scheduled this step is preempted (possibly `id` itself).
    fn schedule_running(&mut self, out: &mut SchedulerOutput, budget: &mut usize, cap: usize) {
        let wanted = |s: &Self, id: &SeqId| s.seqs.get(id).map_or(0, |st| st.len.saturating_sub(st.num_computed));
        let (decodes, prefills): (Vec<SeqId>, Vec<SeqId>) =
            self.running.iter().copied().filter(|id| wanted(self, id) > 0).partition(|id| wanted(self, id) == 1);
        for id in decodes.into_iter().chain(prefills) {
            if *budget == 0 {
                break;
            }
            if !self.is_running(id) {
                continue; // preempted earlier in this step
            }
            let grant = wanted(self, &id).min(*budget).min(cap);
            loop {
                if let Some(copies) = self.reserve(id, grant) {
                    out.copies.extend(copies);
                    out.seqs.extend(self.commit(id, grant));
                    *budget -= grant;
                    break;
                }
                let scheduled = |v: &SeqId| out.seqs.iter().any(|q| q.id == *v);
                // Background work goes first, then the newest.
                let candidates = || self.running.iter().rev().copied().filter(|v| !scheduled(v));
                let Some(victim) = candidates().find(|&v| self.is_background(v)).or_else(|| candidates().next()) else {
                    break;
                };
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
        }
    }

    /// The most prompt tokens one sequence may compute this step: `long_prefill_token_threshold`
    /// (0: the whole budget). Always, not only while others wait: a step cannot be interrupted,
    /// so a request that arrives during a lone long prompt's step waits for the rest of it; with
    /// short steps its first token never waits for much of someone else's prompt.
    fn prefill_cap(&self) -> usize {
        match self.cfg.long_prefill_token_threshold {
            0 => usize::MAX,
            threshold => threshold,
        }
    }

    fn admit_waiting(&mut self, out: &mut SchedulerOutput, budget: &mut usize, cap: usize) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(i) = self.next_waiting() else { break };
            let id = self.waiting[i];
            // Stop at the first one that does not fit, so later (smaller) requests cannot
            // overtake it forever. Never preempt a running sequence to admit a waiting one.
            let Some((cached, copies)) = self.admit_one(id, (*budget).min(cap)) else { break };
            self.waiting.remove(i);
            self.running.push(id);
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            s.started = true;
            let grant = (s.len - s.num_computed).min(*budget).min(cap);
            *budget -= grant;
            out.copies.extend(copies);
            out.admitted.push((id, cached));
            out.seqs.extend(self.commit(id, grant));
        }
    }

    /// Index in `waiting` of the next sequence to admit: the front, unless it must let another
    /// waiting sequence go first (see [`over_share`](Self::over_share)).
    fn next_waiting(&self) -> Option<usize> {
        if self.waiting.is_empty() {
            return None;
        }
        let per_family = self.running_per_family();
        let eligible = |w: &SeqId| !self.over_share(&per_family, *w);
        // Background work only when no normal sequence can go.
        let normal = self.waiting.iter().position(|w| eligible(w) && !self.is_background(*w));
        Some(normal.or_else(|| self.waiting.iter().position(eligible)).unwrap_or(0))
    }

    /// Whether `id` is a forked choice of a request whose choices already run on half the slots
    /// (rounded up): it then lets waiting sequences that are not such forks take a slot first.
    /// A request's choices so take free slots as they come, but cannot starve the requests that
    /// arrive behind them.
    fn over_share(&self, per_family: &HashMap<SeqId, usize>, id: SeqId) -> bool {
        let share = self.cfg.max_num_seqs.div_ceil(2);
        self.seqs.get(&id).is_some_and(|s| s.family != id && per_family.get(&s.family).is_some_and(|&n| n >= share))
    }

    /// Running sequences per request (family).
    fn running_per_family(&self) -> HashMap<SeqId, usize> {
        let mut per_family = HashMap::new();
        for s in self.running.iter().filter_map(|id| self.seqs.get(id)) {
            *per_family.entry(s.family).or_default() += 1;
        }
        per_family
    }

    /// Gives the waiting sequence `id` the blocks for its first chunk under `budget`: a fresh
    /// one starts from its longest cached prefix, a resumed session from its own KV. Returns the
    /// tokens it starts with, plus copy-on-write copies. `None` when the blocks are not there
    /// even after releasing parked sessions and unpinning other waiting sessions.
    fn admit_one(&mut self, id: SeqId, budget: usize) -> Option<(usize, Vec<(BlockId, BlockId)>)> {
        let mut unpinned = false;
        loop {
            let s = self.seqs.get_mut(&id)?;
            let result = if s.table.is_empty() {
                let bs = self.blocks.block_size();
                // At least one token is computed, so the step has logits to sample from.
                let hit = self.blocks.lookup(&s.hashes, (s.len - 1) / bs);
                let start = hit.len() * bs;
                let end = start + (s.len - start).min(budget);
                self.blocks.admit(&mut s.table, &hit, end, s.len).map(|()| {
                    (s.num_computed, s.registered) = (start, hit.len());
                    (start, Vec::new())
                })
            } else {
                let (start, end) = (s.num_computed, (s.len).min(s.num_computed + budget));
                self.blocks.prepare_write(&mut s.table, start, end).map(|c| (start, c))
            };
            match result {
                Ok(r) => return Some(r),
                Err(_) if self.evict_parked() => continue,
                Err(_) if !unpinned => {
                    // Sessions waiting behind this one may hold the blocks it needs; they fall
                    // back to the prefix cache (their blocks stay cached until reused).
                    self.unpin_waiting(id);
                    unpinned = true;
                }
                Err(_) => return None,
            }
        }
    }

    /// Makes `id`'s table cover and own the slots of its next `grant` tokens, releasing parked
    /// sessions if blocks are short. `None` when the blocks are not there (nothing changed).
    fn reserve(&mut self, id: SeqId, grant: usize) -> Option<Vec<(BlockId, BlockId)>> {
        loop {
            let s = self.seqs.get_mut(&id)?;
            let start = s.num_computed;
            match self.blocks.prepare_write(&mut s.table, start, start + grant) {
                Ok(copies) => return Some(copies),
                Err(_) if self.evict_parked() => continue,
                Err(_) => return None,
            }
        }
    }

    /// Advances `id` by `grant` tokens and describes that for the runner.
    fn commit(&mut self, id: SeqId, grant: usize) -> Option<ScheduledSeq> {
        let s = self.seqs.get_mut(&id)?;
        let start = s.num_computed;
        s.num_computed += grant;
        debug_assert!(s.num_computed <= s.len);
        debug_assert!(s.table.len() * self.blocks.block_size() >= s.num_computed);
        Some(ScheduledSeq {
            id,
            start,
            num_tokens: grant,
            needs_logits: s.num_computed == s.len,
            block_table: s.table.blocks().to_vec(),
        })
    }

    /// Preempts `id` by recompute: frees its KV and puts it at the front of the waiting queue.
    fn preempt(&mut self, id: SeqId) {
        if let Some(i) = self.running.iter().rposition(|&r| r == id) {
            self.running.remove(i);
        }
        self.drop_kv(id);
        self.waiting.push_front(id);
        tracing::debug!(seq = id, free_blocks = self.blocks.num_free(), "preempted by recompute");
    }

    /// Frees the KV of a running or waiting sequence; it will be recomputed (from the prefix
    /// cache where its blocks survive).
    fn drop_kv(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            self.blocks.free(&mut s.table);
            (s.num_computed, s.registered) = (0, 0);
        }
    }

    /// Frees the blocks of every waiting sequence but `except` (resumed sessions hold some).
    fn unpin_waiting(&mut self, except: SeqId) {
        let pinned: Vec<SeqId> = self
            .waiting
            .iter()
            .copied()
            .filter(|&w| w != except && self.seqs.get(&w).is_some_and(|s| !s.table.is_empty()))
            .collect();
        for id in pinned {
            self.drop_kv(id);
        }
    }

    fn knows(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id) || self.parked.contains_key(&id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    /// Free blocks that still hold reusable cached prefixes (a subset of the free blocks).
    pub fn num_free_cached_blocks(&self) -> usize {
        self.blocks.num_free_cached()
    }

    pub fn num_total_blocks(&self) -> usize {
        self.blocks.num_total()
    }

    pub fn block_size(&self) -> usize {
        self.blocks.block_size()
    }

    pub fn cache_counters(&self) -> CacheCounters {
        self.blocks.counters()
    }

    /// Parked sessions released to make room for others (their next turn starts from the
    /// prefix cache instead).
    pub fn evicted_sessions(&self) -> u64 {
        self.evicted_sessions
    }

    /// Tokens of `id` whose K/V are in the cache; `None` for an unknown id.
    pub fn num_computed(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).or_else(|| self.parked.get(&id)).map(|s| s.num_computed)
    }

    /// Prompt + generated tokens known for `id`; `None` for an unknown id.
    pub fn seq_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).or_else(|| self.parked.get(&id)).map(|s| s.len)
    }

    pub fn is_running(&self, id: SeqId) -> bool {
        self.running.contains(&id)
    }

    /// Whether a sequence of `total_len` tokens could ever fit the whole cache on its own (the
    /// engine rejects requests that cannot, or they would preempt themselves forever).
    pub fn fits(&self, total_len: usize) -> bool {
        self.blocks.blocks_for(total_len) <= self.blocks.num_total()
    }
}

#[path = "scheduler_sessions.rs"]
mod sessions;

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
