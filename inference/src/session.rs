//! [`Session`]: a conversation whose K/V cache the engine keeps between turns. A turn appends
//! tokens (a tool result, the next user message, rendered by the caller) to the session's
//! history and generates; only what was appended is prefilled, because the previous turn's
//! sequence stayed parked with its blocks. Parked sessions give their blocks up under memory
//! pressure (least recently used first) or after a TTL; the next turn then falls back to the
//! prefix cache or recomputes, with the same tokens either way (the kernels are batch
//! invariant). Forking shares the blocks copy-on-write.
//!
//! Owns only the handle side (ids, commands); the state lives on the engine thread
//! (`core_sessions.rs`, `scheduler_sessions.rs`). Dropping the handle releases the session.

use crate::engine::{Command, EngineHandle, SessionTurn};
use crate::error::EngineError;
use crate::params::SamplingParams;
use crate::scheduler::SeqId;
use crate::stream::TokenStream;
use std::sync::atomic::Ordering;

/// What a turn adds to the conversation.
#[derive(Debug, Clone)]
pub enum SessionInput {
    /// Tokens appended to the session's history (its prompts and outputs so far).
    Append(Vec<u32>),
    /// The whole conversation, re-sent: K/V is reused for the longest prefix it shares with the
    /// history (e.g. after the caller trimmed an output at a stop string).
    Replace(Vec<u32>),
}

/// A handle on one open session. Not `Clone`: one owner decides its turns; dropping it
/// releases the session's blocks (at the end of a running turn, if one runs).
pub struct Session {
    id: SeqId,
    engine: EngineHandle,
}

impl Session {
    pub(crate) fn open(engine: EngineHandle) -> Self {
        let id = engine.ids.fetch_add(1, Ordering::Relaxed);
        // A full queue or a stopped engine makes the first turn fail with UnknownSession.
        let _ = engine.tx.send(Command::OpenSession(id));
        Self { id, engine }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs one turn. `params.n` must be 1. The stream's prompt tokens are the whole
    /// conversation; its cached tokens, the part whose K/V was reused. Fails at once (like
    /// [`EngineHandle::generate`]) on bad parameters or overload; a turn while another runs, or
    /// a conversation that overflows the context, fails on the stream with a typed error and
    /// leaves the session as it was.
    pub fn generate(&self, input: SessionInput, params: SamplingParams) -> Result<TokenStream, EngineError> {
        if params.n != 1 {
            return Err(EngineError::InvalidParam { param: "n", message: "a session turn has one choice".into() });
        }
        self.turn(input, params, false)
    }

    /// Computes the K/V of `input` and parks the session without generating: a shared prefix
    /// (instructions, documents) for later turns or forks. The stream ends with no tokens.
    pub fn prefill(&self, input: SessionInput) -> Result<TokenStream, EngineError> {
        // One token of room: nothing is generated, but the context must hold the prompt.
        self.turn(input, SamplingParams { max_tokens: Some(1), ..SamplingParams::default() }, true)
    }

    fn turn(
        &self,
        input: SessionInput,
        params: SamplingParams,
        prefill_only: bool,
    ) -> Result<TokenStream, EngineError> {
        let (tokens, replace) = match input {
            SessionInput::Append(t) => (t, false),
            SessionInput::Replace(t) => (t, true),
        };
        let turn = SessionTurn { id: self.id, replace };
        self.engine.submit(tokens, params, Some(turn), prefill_only)
    }

    /// Forks the idle session into `n` children: each starts with this session's history and
    /// shares its K/V blocks copy-on-write, then runs turns of its own.
    pub async fn fork(&self, n: usize) -> Result<Vec<Session>, EngineError> {
        let children: Vec<SeqId> = (0..n).map(|_| self.engine.ids.fetch_add(1, Ordering::Relaxed)).collect();
        let (reply, rx) = tokio::sync::oneshot::channel();
        let cmd = Command::ForkSession { parent: self.id, children: children.clone(), reply };
        self.engine.tx.send(cmd).map_err(|_| EngineError::Shutdown)?;
        rx.await.map_err(|_| EngineError::Shutdown)??;
        Ok(children.into_iter().map(|id| Session { id, engine: self.engine.clone() }).collect())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Blocking send: a close must not be lost to a momentarily full queue, or the session's
        // blocks would stay parked until its TTL.
        let _ = self.engine.tx.send(Command::CloseSession(self.id));
    }
}
