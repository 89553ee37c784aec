//! Admission control: how much work may wait for the engine at once, counted in requests and in
//! prompt tokens, and the [`Ticket`] that keeps one request counted until it first runs.
//!
//! A request is refused for one of two reasons, and they must not be confused: it could get in
//! later (others wait; `Overloaded`, HTTP 429 with Retry-After), or it never can (its prompts
//! alone are more than may ever wait; `NeverFits`, HTTP 400). Nothing waiting means a request
//! that can fit always gets in, however large.
//!
//! A ticket gives its share back when dropped, wherever that happens (the request starts
//! running, is cancelled or fails while waiting, is refused by the engine thread, or is left in
//! the command queue at shutdown), so the counts cannot drift from what really waits.
//! Must not: decide scheduling order (the scheduler does), or know HTTP.

use crate::engine::EngineStats;
use crate::error::EngineError;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// The bounds, and what waits now.
pub(crate) struct Admission {
    max_requests: usize,
    max_tokens: usize,
    /// One lock for both counts, so a request is checked against both at once. It guards two
    /// additions; nobody holds it for longer.
    waiting: Mutex<Waiting>,
    stats: Arc<EngineStats>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub requests: usize,
    pub tokens: usize,
}

/// One accepted request's share of the waiting counts; dropping it gives the share back.
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    tokens: usize,
}

impl Admission {
    pub fn new(max_requests: usize, max_tokens: usize, stats: Arc<EngineStats>) -> Arc<Self> {
        let (max_requests, max_tokens) = (max_requests.max(1), max_tokens.max(1));
        Arc::new(Self { max_requests, max_tokens, waiting: Mutex::default(), stats })
    }

    pub fn max_requests(&self) -> usize {
        self.max_requests
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn waiting(&self) -> Waiting {
        *self.lock()
    }

    /// Counts the prompts of one caller's request (their token counts) as waiting, all or none:
    /// `NeverFits` when they exceed a bound on their own, `Overloaded` when they would push
    /// the waiting work past a bound while something else waits.
    pub fn admit(self: &Arc<Self>, prompts: &[usize]) -> Result<Vec<Ticket>, EngineError> {
        let tokens: usize = prompts.iter().sum();
        self.check_fits(prompts.len(), tokens)?;
        let mut w = self.lock();
        let busy = w.requests > 0;
        if busy && (w.requests + prompts.len() > self.max_requests || w.tokens + tokens > self.max_tokens) {
            drop(w);
            self.stats.rejected_requests.fetch_add(1, Ordering::Relaxed);
            return Err(EngineError::Overloaded);
        }
        w.requests += prompts.len();
        w.tokens += tokens;
        self.stats.waiting_tokens.store(w.tokens as u64, Ordering::Relaxed);
        drop(w);
        Ok(prompts.iter().map(|&tokens| Ticket { admission: self.clone(), tokens }).collect())
    }

    fn check_fits(&self, requests: usize, tokens: usize) -> Result<(), EngineError> {
        if requests > self.max_requests {
            return Err(EngineError::NeverFits {
                param: "prompt",
                message: format!(
                    "{requests} prompts exceed the {} requests this server queues at once; split them",
                    self.max_requests
                ),
            });
        }
        if tokens > self.max_tokens {
            let what =
                if requests == 1 { "the prompt has".to_string() } else { format!("the {requests} prompts have") };
            return Err(EngineError::NeverFits {
                param: "prompt",
                message: format!(
                    "{what} {tokens} tokens, more than the {} prompt tokens this server queues at once",
                    self.max_tokens
                ),
            });
        }
        Ok(())
    }

    fn release(&self, tokens: usize) {
        let mut w = self.lock();
        debug_assert!(w.requests > 0 && w.tokens >= tokens, "admission counts out of step: {w:?}");
        w.requests = w.requests.saturating_sub(1);
        w.tokens = w.tokens.saturating_sub(tokens);
        self.stats.waiting_tokens.store(w.tokens as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Nothing can panic while the lock is held (additions only), but a poisoned lock must
        // not take admission down with it.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.release(self.tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(requests: usize, tokens: usize) -> Arc<Admission> {
        Admission::new(requests, tokens, Arc::new(EngineStats::default()))
    }

    #[test]
    fn bounds_in_requests_and_tokens_refuse_only_while_others_wait() {
        let a = admission(3, 100);
        // Idle: one request as large as the bound always gets in.
        let big = a.admit(&[100]).unwrap();
        assert!(matches!(a.admit(&[1]), Err(EngineError::Overloaded)));
        drop(big);
        assert_eq!(a.waiting(), Waiting::default());
        let t1 = a.admit(&[40]).unwrap();
        let t2 = a.admit(&[60]).unwrap();
        assert_eq!(a.waiting(), Waiting { requests: 2, tokens: 100 });
        assert!(matches!(a.admit(&[1]), Err(EngineError::Overloaded)));
        drop(t2);
        let t3 = a.admit(&[10, 10]).unwrap(); // all of a batch at once
        assert_eq!(a.waiting(), Waiting { requests: 3, tokens: 60 });
        assert!(matches!(a.admit(&[1]), Err(EngineError::Overloaded)), "a 4th request");
        assert_eq!(a.stats.rejected_requests.load(Ordering::Relaxed), 3);
        drop((t1, t3));
        assert_eq!(a.waiting(), Waiting::default());
        assert_eq!(a.stats.waiting_tokens.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn what_can_never_wait_is_never_fits_not_overloaded() {
        let a = admission(3, 100);
        let busy = a.admit(&[1]).unwrap();
        for prompts in [&[101][..], &[50, 51], &[1, 1, 1, 1]] {
            match a.admit(prompts) {
                Err(EngineError::NeverFits { param: "prompt", .. }) => {}
                other => panic!("{prompts:?}: expected NeverFits, got {:?}", other.map(|t| t.len())),
            }
        }
        assert_eq!(a.stats.rejected_requests.load(Ordering::Relaxed), 0, "a 400 is not a 429");
        drop(busy);
        assert_eq!(a.waiting(), Waiting::default());
    }
}
