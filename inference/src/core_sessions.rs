//! Sessions on the engine thread: the record of each open session (its conversation's tokens),
//! and what a turn, a fork and a close do to it and to the scheduler's parked state.
//!
//! Invariant: whatever the scheduler holds parked under a session's id is K/V of a prefix of
//! that session's recorded tokens; when the tokens change without a park, the parked state is
//! released rather than left describing other tokens.

use super::{Core, SessionRecord};
use crate::engine::SessionTurn;
use crate::error::EngineError;
use crate::scheduler::SeqId;
use std::time::Instant;

impl Core {
    pub(super) fn open_session(&mut self, id: SeqId) {
        let rec = SessionRecord { tokens: Vec::new(), busy: false, closing: false, last_used: Instant::now() };
        self.sessions.insert(id, rec);
    }

    /// The handle is gone: release the session now, or when its running turn ends.
    pub(super) fn close_session(&mut self, id: SeqId) {
        match self.sessions.get_mut(&id) {
            Some(rec) if rec.busy => rec.closing = true,
            Some(_) => {
                self.sessions.remove(&id);
                self.p.sched.finish(id);
            }
            None => {}
        }
    }

    /// Starts a turn: the session's prompt is its history plus `input` (or `input` alone when
    /// the caller re-sends the whole conversation), of which the first `keep` tokens equal the
    /// history whose K/V may still be parked. Returns `(id, prompt, keep)`.
    pub(super) fn begin_turn(
        &mut self,
        turn: SessionTurn,
        input: Vec<u32>,
    ) -> Result<(SeqId, Vec<u32>, usize), EngineError> {
        let rec = self.sessions.get_mut(&turn.id).ok_or(EngineError::UnknownSession(turn.id))?;
        if rec.busy || rec.closing {
            return Err(EngineError::SessionBusy(turn.id));
        }
        let prompt = if turn.replace { input } else { [rec.tokens.as_slice(), &input].concat() };
        let keep = rec.tokens.iter().zip(&prompt).take_while(|(a, b)| a == b).count();
        rec.busy = true;
        Ok((turn.id, prompt, keep))
    }

    /// A turn ended (finished or cancelled) with the session's conversation now `tokens`: park
    /// its sequence with the K/V, or release everything if the handle was dropped meanwhile.
    pub(super) fn end_turn(&mut self, id: SeqId, tokens: Vec<u32>) {
        let Some(rec) = self.sessions.get_mut(&id) else {
            self.p.sched.finish(id);
            return;
        };
        if rec.closing {
            self.sessions.remove(&id);
            self.p.sched.finish(id);
            return;
        }
        (rec.tokens, rec.busy, rec.last_used) = (tokens, false, Instant::now());
        if !self.p.sched.park(id) {
            // The turn never reached the scheduler (a grammar forced its whole output): what is
            // parked describes the old history.
            self.p.sched.release_parked(id);
        }
    }

    /// A turn failed or was refused before it ran: the session keeps its previous history.
    pub(super) fn end_turn_early(&mut self, id: Option<SeqId>) {
        let Some(rec) = id.and_then(|id| self.sessions.get_mut(&id)) else { return };
        (rec.busy, rec.last_used) = (false, Instant::now());
        if rec.closing {
            let id = id.unwrap_or_default();
            self.sessions.remove(&id);
            self.p.sched.finish(id);
        }
    }

    /// Forks an idle session into `children`: each gets its history and shares its parked
    /// blocks copy-on-write (when they are still parked; otherwise the prefix cache serves).
    pub(super) fn fork_session(&mut self, parent: SeqId, children: &[SeqId]) -> Result<(), EngineError> {
        let rec = self.sessions.get(&parent).ok_or(EngineError::UnknownSession(parent))?;
        if rec.busy || rec.closing {
            return Err(EngineError::SessionBusy(parent));
        }
        let tokens = rec.tokens.clone();
        for &child in children {
            self.p.sched.fork_parked(parent, child);
            let rec = SessionRecord { tokens: tokens.clone(), busy: false, closing: false, last_used: Instant::now() };
            self.sessions.insert(child, rec);
        }
        Ok(())
    }
}
