//! Per-sequence token sampling with OpenAI semantics: from one row of logits to one token.
//!
//! Owns: a sequence's PRNG (xoshiro256**, seeded through splitmix64, no `rand` crate) and its
//! penalty bookkeeping, plus the math of logit_bias -> repetition penalty -> presence/frequency
//! penalties -> greedy, or temperature -> top-k -> top-p -> min-p -> one draw. Log-probabilities
//! are reported on the model's raw logits, before any of that.
//! Must not: know about batches, tensors, devices or text; keep O(vocab) state between calls
//! (hundreds of sequences each hold a sampler); sort the whole vocabulary.
//!
//! Cost of one [`SeqSampler::sample`] on a vocabulary of V tokens:
//! - greedy: one pass (argmax), plus the sparse penalty edits.
//! - temperature, no top-k/top-p: two passes (max, blocked weight sums) and a scan of one block
//!   of [`BLOCK`] tokens to place the draw; no sorting at all.
//! - top-k: O(V) collection of the tokens near the best one + `select_nth_unstable`.
//! - top-p without top-k: O(V) for the normaliser and per widening of the candidate threshold
//!   (at most four; one for a peaked LLM row), then O(c) expected for a weighted quickselect of
//!   the nucleus among the c candidates. Nothing is ever sorted: the draw walks the kept set in
//!   id order.
//! - logprobs: one more O(V) pass (max + log-sum-exp) and an O(V) top-n scan with n <= 20.

use crate::grammar::apply_mask;
use crate::params::SamplingParams;
use llguidance::toktrie::SimpleVob;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// Tokens per block of the weight prefix sums used to place a draw without a second full pass.
const BLOCK: usize = 256;

/// Candidate thresholds tried in turn, in nats below the best token (temperature-scaled for
/// top-p, raw logits for top-k), until the collected set provably holds what the filter needs.
const WIDEN: [f32; 4] = [8.0, 16.0, 32.0, f32::INFINITY];

/// One sampled token and, when requested, its log-probabilities under the raw model logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// `log_softmax(raw_logits)[token]`; 0.0 when logprobs were not requested.
    pub logprob: f32,
    /// The `top_logprobs` most likely raw tokens, best first, ties by lower id.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Sampling state of one sequence (one choice of one request).
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SamplingParams,
    rng: Rng,
    /// Distinct prompt + generated tokens; filled only when the repetition penalty is on.
    seen: HashSet<u32>,
    /// Occurrences per generated token; filled only when presence/frequency penalties are on.
    counts: HashMap<u32, u32>,
}

impl SeqSampler {
    /// `choice_index` separates the streams of the `n` choices of one seeded request: choice 0
    /// uses exactly `seed`, so `n = 1` and choice 0 of `n > 1` agree.
    pub fn new(params: &SamplingParams, choice_index: u64, prompt_ids: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(os_seed);
        let mut s = Self {
            params: params.clone(),
            rng: Rng::new(seed ^ mix64(choice_index.wrapping_mul(GOLDEN_GAMMA))),
            seen: HashSet::new(),
            counts: HashMap::new(),
        };
        if s.tracks_seen() {
            s.seen.extend(prompt_ids.iter().copied());
        }
        s
    }

    fn tracks_seen(&self) -> bool {
        self.params.repetition_penalty != 1.0
    }

    fn tracks_counts(&self) -> bool {
        self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0
    }

    /// Records a generated token for the penalties. Kept apart from `sample` so the engine can
    /// replay tokens (e.g. after a recompute) without drawing.
    pub fn accept(&mut self, token: u32) {
        if self.tracks_seen() {
            self.seen.insert(token);
        }
        if self.tracks_counts() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Picks the next token from one row of logits (`[vocab]`), among the tokens `mask` allows
    /// when given (a grammar's). The row is scratch: the sparse bias/penalty edits are restored
    /// before returning, masked-out entries stay at -inf.
    pub fn sample(&mut self, logits: &mut [f32], mask: Option<&SimpleVob>) -> Sampled {
        if logits.is_empty() {
            return Sampled { token: 0, logprob: 0.0, top_logprobs: Vec::new() };
        }
        let raw = self.params.logprobs.then(|| raw_logprobs(logits, self.params.top_logprobs));
        if let Some(m) = mask {
            apply_mask(m, logits);
        }
        let undo = self.adjust(logits);
        // `> 0` rather than `== 0` so a NaN temperature can never reach the division.
        let token = if self.params.temperature > 0.0 { self.draw(logits) } else { argmax(logits) as u32 };
        for &(i, x) in undo.iter().rev() {
            logits[i] = x;
        }
        match raw {
            Some(raw) => {
                let l = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
                Sampled { token, logprob: (l as f64 - raw.lse) as f32, top_logprobs: raw.top }
            }
            None => Sampled { token, logprob: 0.0, top_logprobs: Vec::new() },
        }
    }

    /// Applies logit_bias, the repetition penalty and presence/frequency penalties in place, in
    /// that order; returns the original values (in edit order) so `sample` can undo them.
    fn adjust(&self, logits: &mut [f32]) -> Vec<(usize, f32)> {
        let p = &self.params;
        let mut undo = Vec::new();
        for &(id, bias) in &p.logit_bias {
            edit(logits, &mut undo, id, |x| x + bias);
        }
        let rp = p.repetition_penalty;
        // HF/llama.cpp: shrink the logit's magnitude toward 0 once per distinct token.
        for &id in &self.seen {
            edit(logits, &mut undo, id, |x| if x > 0.0 { x / rp } else { x * rp });
        }
        for (&id, &count) in &self.counts {
            let cut = p.presence_penalty + p.frequency_penalty * count as f32;
            edit(logits, &mut undo, id, |x| x - cut);
        }
        undo
    }

    /// Temperature sampling with the top-k / top-p / min-p filters.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let best = argmax(logits);
        let m = logits[best];
        if !m.is_finite() {
            return best as u32; // +inf dominates; all -inf/NaN leaves nothing to weigh
        }
        let sc = Scale { m, inv_t: 1.0 / self.params.temperature };
        if !sc.inv_t.is_finite() {
            return best as u32; // a subnormal temperature is greedy in all but name
        }
        let p = &self.params;
        let top_k_on = p.top_k > 0 && p.top_k < logits.len();
        if !top_k_on && p.top_p >= 1.0 {
            return self.draw_full(logits, sc, p.min_p);
        }
        let kept = kept_candidates(p, logits, sc);
        let total: f64 = kept.iter().map(|&(_, w)| w as f64).sum();
        let u = self.rng.next_f64() * total;
        let mut cum = 0.0;
        for &(id, w) in &kept {
            cum += w as f64;
            if cum > u {
                return id;
            }
        }
        // Rounding pushed `u` past the last partial sum: the last kept token is the draw.
        kept.last().map_or(best as u32, |&(id, _)| id)
    }

    /// Draws from the whole (min-p filtered) distribution without sorting: per-block weight sums
    /// locate the block holding the draw, then only that block is scanned.
    fn draw_full(&mut self, logits: &[f32], sc: Scale, min_w: f32) -> u32 {
        let sums: Vec<f64> = logits.chunks(BLOCK).map(|b| sc.block_weight(b, min_w)).collect();
        let total: f64 = sums.iter().sum();
        let mut u = self.rng.next_f64() * total;
        let mut block = None;
        for (i, &s) in sums.iter().enumerate() {
            if u < s {
                block = Some(i);
                break;
            }
            u -= s;
        }
        let (b, u) = match block {
            Some(b) => (b, u),
            // Rounding carried `u` past the total: the draw is the last token with weight.
            None => match sums.iter().rposition(|&s| s > 0.0) {
                Some(b) => (b, f64::INFINITY),
                None => return argmax(logits) as u32,
            },
        };
        let start = b * BLOCK;
        let mut cum = 0.0;
        let mut last_positive = start;
        for (j, &l) in logits[start..logits.len().min(start + BLOCK)].iter().enumerate() {
            let w = sc.kept_weight(l, min_w) as f64;
            if w > 0.0 {
                last_positive = start + j;
            }
            cum += w;
            if cum > u {
                return (start + j) as u32;
            }
        }
        last_positive as u32
    }
}

/// Applies `f` to `logits[id]` (ignoring ids out of range) and remembers the old value.
fn edit(logits: &mut [f32], undo: &mut Vec<(usize, f32)>, id: u32, f: impl Fn(f32) -> f32) {
    if let Some(x) = logits.get_mut(id as usize) {
        undo.push((id as usize, *x));
        *x = f(*x);
    }
}

/// Index of the largest logit, ties to the lowest id, NaN never wins (0 if nothing is > -inf).
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best
}

/// Temperature scaling relative to the best logit `m`: weight(l) = exp((l - m) / T), so the best
/// token weighs exactly 1 and min-p is a plain comparison against the weight.
#[derive(Debug, Clone, Copy)]
struct Scale {
    m: f32,
    inv_t: f32,
}

impl Scale {
    fn weight(self, l: f32) -> f32 {
        fast_exp((l - self.m) * self.inv_t)
    }

    /// The weight, or 0 when min-p drops the token (`p < min_p * p_max` <=> `weight < min_p`).
    fn kept_weight(self, l: f32, min_w: f32) -> f32 {
        let w = self.weight(l);
        if w >= min_w {
            w
        } else {
            0.0
        }
    }

    /// Sum of kept weights of one block; eight independent f64 lanes so it vectorises and
    /// stays accurate over 150k terms.
    fn block_weight(self, block: &[f32], min_w: f32) -> f64 {
        let mut acc = [0f64; 8];
        let mut chunks = block.chunks_exact(8);
        for c in &mut chunks {
            for (a, &l) in acc.iter_mut().zip(c) {
                *a += self.kept_weight(l, min_w) as f64;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&l| self.kept_weight(l, min_w) as f64).sum();
        tail + acc.iter().sum::<f64>()
    }

    fn total_weight(self, logits: &[f32]) -> f64 {
        logits.chunks(BLOCK).map(|b| self.block_weight(b, 0.0)).sum()
    }
}

/// Order of candidates: higher logit first, ties to the lower id. Candidates are never NaN.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0))
}

/// `(id, logit)` of every token whose logit is at least `cutoff` (NaN never is).
fn collect_above(logits: &[f32], cutoff: f32) -> Vec<(u32, f32)> {
    logits.iter().enumerate().filter(|&(_, &l)| l >= cutoff).map(|(i, &l)| (i as u32, l)).collect()
}

/// The tokens surviving top-k, top-p and min-p as `(id, weight)`, in id order. Only called with
/// top-k or top-p active; `draw_full` needs no list.
///
/// Selection runs on a scratch copy and only yields the worst surviving token; the survivors are
/// then filtered from the id-ordered pool. So the draw walks them in id order, and a seed gives
/// the same token whatever std's (unspecified) selection order is.
fn kept_candidates(p: &SamplingParams, logits: &[f32], sc: Scale) -> Vec<(u32, f32)> {
    let top_k_on = p.top_k > 0 && p.top_k < logits.len();
    let (mut pool, target) = if top_k_on {
        let pool = top_k_set(logits, sc.m, p.top_k);
        // Top-p after top-k works on the distribution renormalised over the k survivors.
        let total: f64 = pool.iter().map(|&(_, l)| sc.weight(l) as f64).sum();
        (pool, total * p.top_p as f64)
    } else {
        nucleus_pool(logits, sc, p.top_p)
    };
    if p.top_p < 1.0 {
        let mut scratch = pool.clone();
        let len = nucleus_len(&mut scratch, sc, target);
        if let Some(worst) = scratch[..len].iter().max_by(|a, b| by_logit_desc(a, b)).copied() {
            pool.retain(|c| by_logit_desc(c, &worst) != Ordering::Greater);
        }
    }
    let mut kept: Vec<(u32, f32)> = pool.into_iter().map(|(id, l)| (id, sc.weight(l))).collect();
    if p.min_p > 0.0 {
        // The best token has weight 1 >= min_p, so this never empties the set.
        kept.retain(|&(_, w)| w >= p.min_p);
    }
    kept
}

/// The k highest logits (ties to lower ids), in id order. Collects only tokens near the best
/// one, widening until at least k are in, then selects the k-th on a copy: O(V), no sort.
fn top_k_set(logits: &[f32], m: f32, k: usize) -> Vec<(u32, f32)> {
    let mut cands = Vec::new();
    for nats in WIDEN {
        cands = collect_above(logits, m - nats);
        if cands.len() >= k {
            break;
        }
    }
    if cands.len() > k {
        let mut scratch = cands.clone();
        let (_, &mut kth, _) = scratch.select_nth_unstable_by(k - 1, by_logit_desc);
        cands.retain(|c| by_logit_desc(c, &kth) != Ordering::Greater);
    }
    cands
}

/// Candidates for top-p without top-k: every token above a weight threshold, widened until their
/// mass reaches `top_p` of the full distribution, so the nucleus (a prefix of the global order)
/// lies inside. Returns them in id order as `(id, logit)`, with the target mass.
fn nucleus_pool(logits: &[f32], sc: Scale, top_p: f32) -> (Vec<(u32, f32)>, f64) {
    let target = sc.total_weight(logits) * top_p as f64;
    let mut cands = Vec::new();
    for nats in WIDEN {
        cands = collect_above(logits, sc.m - nats / sc.inv_t);
        let mass: f64 = cands.iter().map(|&(_, l)| sc.weight(l) as f64).sum();
        if mass >= target {
            break;
        }
    }
    (cands, target)
}

/// Reorders `pool` so its first `len` entries are the nucleus: the shortest prefix of the
/// best-first order whose weight reaches `target` (all of it if rounding never gets there), and
/// returns `len`. A weighted quickselect: each round selects the middle of the undecided range
/// and keeps the half holding the boundary, so O(c) expected instead of sorting O(c log c).
fn nucleus_len(pool: &mut [(u32, f32)], sc: Scale, target: f64) -> usize {
    // Invariant: the boundary token lies in pool[lo..hi]; pool[..lo] is inside the nucleus and
    // better than pool[lo..], whose members are better than pool[hi..]; `need` is the mass
    // still missing after pool[..lo].
    let (mut lo, mut hi, mut need) = (0, pool.len(), target);
    while hi - lo > 1 {
        let mid = lo + (hi - lo - 1) / 2;
        pool[lo..hi].select_nth_unstable_by(mid - lo, by_logit_desc);
        let upper: f64 = pool[lo..=mid].iter().map(|&(_, l)| sc.weight(l) as f64).sum();
        if upper >= need {
            hi = mid + 1;
        } else {
            need -= upper;
            lo = mid + 1;
        }
    }
    (lo + 1).min(pool.len())
}

/// Log-softmax facts of the raw logits, gathered before any edit.
struct RawLogprobs {
    /// log-sum-exp of the raw logits.
    lse: f64,
    /// Top-n `(id, logprob)`, best first, ties to lower ids.
    top: Vec<(u32, f32)>,
}

fn raw_logprobs(logits: &[f32], n: usize) -> RawLogprobs {
    let m = logits[argmax(logits)];
    let lse = if m.is_finite() { m as f64 + Scale { m, inv_t: 1.0 }.total_weight(logits).ln() } else { m as f64 };
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            // Ids arrive in increasing order, so an equal logit already kept has a lower id
            // and stays ahead: only a strictly larger logit can displace the last entry.
            if l.is_nan() || (top.len() == n && l <= top[n - 1].1) {
                continue;
            }
            let pos = top.partition_point(|&(_, x)| x >= l);
            top.insert(pos, (i as u32, l));
            top.truncate(n);
        }
    }
    let top = top.into_iter().map(|(id, l)| (id, (l as f64 - lse) as f32)).collect();
    RawLogprobs { lse, top }
}

/// exp(x) for x <= 0 (arguments are always relative to a maximum), 0 below -87 or for NaN.
/// Branch-free so the weight loops vectorise; relative error ~1e-7 against `f32::exp`
/// (checked in the tests), which is below the f32 rounding of the logits themselves.
#[inline]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x >= -87.0 {
        p * scale
    } else {
        0.0
    }
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function: a bijection with mix64(0) == 0.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fresh seed for unseeded requests: the std hasher's per-process random keys mixed with the
/// clock, taken once per sampler.
fn os_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    h.finish()
}

/// xoshiro256** (Blackman & Vigna), state expanded from a 64-bit seed with splitmix64.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(GOLDEN_GAMMA);
            mix64(x)
        };
        let s = [next(), next(), next(), next()];
        // The all-zero state is a fixed point; splitmix64 essentially never yields it.
        Self { s: if s == [0; 4] { [1, 2, 3, 4] } else { s } }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
