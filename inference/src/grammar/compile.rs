//! Where grammars are compiled, and where compiled grammars are kept.
//!
//! Owns: running llguidance's compiler on a thread of its own with a large explicit stack (its
//! JSON compiler recurses once per property: ~6,500 properties overflow a 2 MiB tokio or
//! blocking-pool stack, and a stack overflow aborts the process, which no panic handler can
//! catch), a bound on compilations at once, the compile-time limit, and the cache of compiled
//! parsers bounded in estimated bytes.
//! Must not: decide what a grammar means (mod.rs) or touch a sequence's state (state.rs).

use crate::error::EngineError;
use llguidance::TokenParser;
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Stack of a compile thread. Reserved address space, committed only as the recursion
/// touches it; 256 MiB holds schemas far past the default size limits.
const COMPILE_STACK_BYTES: usize = 256 << 20;

/// Bounds the compilations running at once; each runs on a fresh large-stack thread.
pub(crate) struct CompileSlots {
    busy: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// Frees its slot when the compile thread ends, however it ends.
struct Slot(Arc<CompileSlots>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.0.busy.lock() {
            *busy -= 1;
        }
        self.0.freed.notify_one();
    }
}

impl CompileSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { busy: Mutex::new(0), freed: Condvar::new(), max: max.max(1) })
    }

    /// Runs `job` on its own thread and waits at most `timeout` for it (slot wait included).
    /// A compile still running then goes on holding its slot, so a flood of slow grammars
    /// cannot start more than `max` threads; its caller is answered at once.
    pub fn run<T: Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        job: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let deadline = Instant::now() + timeout;
        let too_slow = || {
            EngineError::GrammarLimit(format!(
                "compiling the grammar took longer than {} s (grammar_compile_timeout)",
                timeout.as_secs_f32()
            ))
        };
        let slot = self.acquire(deadline).ok_or_else(|| EngineError::Overloaded)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("kiln-grammar".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(move || {
                let _slot = slot;
                let _ = tx.send(job());
            })
            .map_err(|e| EngineError::Internal(format!("cannot start a grammar compile thread: {e}")))?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(too_slow()),
            // The job panicked inside the grammar engine: the grammar is at fault, not kiln's
            // state (nothing shared was being changed), and the message must not leak internals.
            Err(RecvTimeoutError::Disconnected) => {
                Err(EngineError::Grammar("the grammar engine could not compile this grammar".into()))
            }
        }
    }

    fn acquire(self: &Arc<Self>, deadline: Instant) -> Option<Slot> {
        let mut busy = self.busy.lock().ok()?;
        while *busy >= self.max {
            let left = deadline.checked_duration_since(Instant::now())?;
            busy = self.freed.wait_timeout(busy, left).ok()?.0;
        }
        *busy += 1;
        Some(Slot(self.clone()))
    }
}

/// What the grammar cache holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub entries: usize,
    /// Sum of the entries' estimated sizes.
    pub bytes: usize,
    /// The bound on `bytes`.
    pub max_bytes: usize,
}

/// Compiled parsers by grammar text, least recently used evicted first, bounded in bytes.
pub(crate) struct Lru {
    map: HashMap<String, (TokenParser, usize)>,
    order: VecDeque<String>,
    bytes: usize,
    max_bytes: usize,
}

impl Lru {
    pub fn new(max_bytes: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), bytes: 0, max_bytes }
    }

    pub fn get(&mut self, key: &str) -> Option<TokenParser> {
        let p = self.map.get(key)?.0.deep_clone();
        if let Some(i) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(i).expect("position is in range");
            self.order.push_back(k);
        }
        Some(p)
    }

    /// Keeps a copy of `p`, evicting the oldest entries until it fits; a grammar larger than
    /// the whole bound is not kept at all.
    pub fn put(&mut self, key: String, p: &TokenParser) {
        let size = estimated_bytes(&key, p);
        if size > self.max_bytes || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.max_bytes {
            let Some(old) = self.order.pop_front() else { break };
            if let Some((_, s)) = self.map.remove(&old) {
                self.bytes -= s;
            }
        }
        self.bytes += size;
        self.order.push_back(key.clone());
        self.map.insert(key, (p.deep_clone(), size));
    }

    pub fn usage(&self) -> CacheUsage {
        CacheUsage { entries: self.map.len(), bytes: self.bytes, max_bytes: self.max_bytes }
    }
}

/// Fixed cost of a compiled parser beyond its lexer tables and grammar (Earley row tables,
/// the parser's own buffers).
const PARSER_BASE_BYTES: usize = 64 << 10;

/// Bytes of compiled grammar (symbols, rules) per byte of grammar text.
const PARSER_BYTES_PER_KEY_BYTE: usize = 64;

/// An estimate of what one cached parser holds: llguidance's own estimate of its lexer tables
/// (the DFA states and derivative caches, which grow with the grammar's regexes), plus the
/// compiled grammar, which grows with its text. Deliberately high: measured as RSS with 150
/// schemas cached vs none (the `constrained` test's schemas, and heavier ones with formats,
/// patterns and enums), a cached entry added 14-61 KB while this says 200-330 KB, so the real
/// footprint stays well under the configured bound.
fn estimated_bytes(key: &str, p: &TokenParser) -> usize {
    p.parser.lexer_stats().num_bytes + PARSER_BASE_BYTES + key.len() * PARSER_BYTES_PER_KEY_BYTE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_bound_concurrency_and_time() {
        let slots = CompileSlots::new(1);
        assert_eq!(slots.run(Duration::from_secs(5), || Ok(7)).unwrap(), 7);
        let slow = slots.run(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(400));
            Ok(())
        });
        assert!(matches!(slow, Err(EngineError::GrammarLimit(m)) if m.contains("grammar_compile_timeout")));
        // The slow compile still holds the only slot: the next caller cannot start one.
        assert!(matches!(slots.run(Duration::from_millis(50), || Ok(())), Err(EngineError::Overloaded)));
        std::thread::sleep(Duration::from_millis(450));
        assert!(slots.run(Duration::from_secs(5), || Ok(())).is_ok(), "the slot came back");
        let panicked = slots.run(Duration::from_secs(5), || -> Result<(), EngineError> { panic!("inside") });
        assert!(matches!(panicked, Err(EngineError::Grammar(m)) if !m.contains("inside")));
    }

    #[test]
    fn deep_recursion_fits_the_compile_stack() {
        fn depth(n: usize) -> usize {
            let pad = std::hint::black_box([0u8; 512]);
            if n == 0 {
                pad[0] as usize
            } else {
                1 + depth(n - 1) + pad[1] as usize
            }
        }
        // ~100k frames of > 512 B each: far past 2 MiB, well inside the compile stack.
        assert_eq!(CompileSlots::new(1).run(Duration::from_secs(30), || Ok(depth(100_000))).unwrap(), 100_000);
    }
}
