//! `TokenStream`: what a caller holds for one request. It receives token events from the engine
//! thread and turns them into text deltas: incremental UTF-8-safe detokenization and stop-string
//! matching happen here, off the engine thread. Dropping the stream aborts the request's
//! sequences within one engine step; a stop string cancels only its own choice.

use crate::detok::IncrementalDetokenizer;
use crate::error::EngineError;
use crate::stop::StopMatcher;
use crate::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id, or a stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// The turn ended with complete tool calls (set by the tool-call parser, never the engine).
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// Log-probabilities of one generated token (raw model distribution).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely alternatives, best first.
    pub top: Vec<(u32, String, f32)>,
}

/// What the engine thread sends for one choice.
#[derive(Debug)]
pub(crate) enum Event {
    Token {
        index: usize,
        token: u32,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
    },
    /// Prompt tokens whose K/V were already cached when the request started (sent once, before
    /// its first token).
    Cached {
        tokens: usize,
    },
    /// A session turn's real prompt (history plus input), known only on the engine thread: its
    /// length and last tokens (the detokenizer's context). Sent before anything else.
    Prompt {
        tokens: usize,
        tail: Vec<u32>,
    },
    Error(EngineError),
}

/// New output of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
}

struct Choice {
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    done: bool,
}

pub struct TokenStream {
    rx: UnboundedReceiver<Event>,
    tokenizer: Arc<Tokenizer>,
    choices: Vec<Choice>,
    /// Per choice: set to ask the engine to stop generating it (stop string matched).
    cancel: Arc<[AtomicBool]>,
    prompt_tokens: usize,
    cached_tokens: usize,
}

impl TokenStream {
    pub(crate) fn new(rx: UnboundedReceiver<Event>, tokenizer: Arc<Tokenizer>, setup: StreamSetup) -> Self {
        let choices = (0..setup.n)
            .map(|_| Choice {
                detok: IncrementalDetokenizer::new(tokenizer.inner(), &setup.prompt_tail),
                stop: StopMatcher::new(&setup.stop),
                done: false,
            })
            .collect();
        Self { rx, tokenizer, choices, cancel: setup.cancel, prompt_tokens: setup.prompt_tokens, cached_tokens: 0 }
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Prompt tokens whose KV was reused rather than computed (prefix cache or session), known
    /// once the request has started (before its first token).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    /// Next delta of any choice; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<Result<Delta, EngineError>> {
        loop {
            if self.choices.iter().all(|c| c.done) {
                return None;
            }
            let ev = match self.rx.recv().await {
                Some(ev) => ev,
                None => return Some(Err(EngineError::Shutdown)),
            };
            if let Some(out) = self.handle(ev) {
                return Some(out);
            }
        }
    }

    /// Blocking variant of [`TokenStream::next`] for synchronous callers (the CLI). Must not be
    /// called from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Result<Delta, EngineError>> {
        loop {
            if self.choices.iter().all(|c| c.done) {
                return None;
            }
            let ev = match self.rx.blocking_recv() {
                Some(ev) => ev,
                None => return Some(Err(EngineError::Shutdown)),
            };
            if let Some(out) = self.handle(ev) {
                return Some(out);
            }
        }
    }

    /// Turns one engine event into a delta, or `None` when it produced nothing to report yet
    /// (e.g. half of a multi-byte character, or text held back by a possible stop string).
    fn handle(&mut self, ev: Event) -> Option<Result<Delta, EngineError>> {
        match ev {
            Event::Error(e) => {
                self.choices.iter_mut().for_each(|c| c.done = true);
                Some(Err(e))
            }
            Event::Token { index, token, logprob } => self.on_token(index, token, logprob),
            Event::Cached { tokens } => {
                self.cached_tokens = tokens;
                None
            }
            Event::Prompt { tokens, tail } => {
                self.prompt_tokens = tokens;
                for c in &mut self.choices {
                    c.detok = IncrementalDetokenizer::new(self.tokenizer.inner(), &tail);
                }
                None
            }
            Event::Finished { index, reason } => {
                let c = self.choices.get_mut(index)?;
                if c.done {
                    return None; // already finished by a stop string
                }
                c.done = true;
                let mut text = c.detok.finish();
                let outcome = c.stop.push(&text);
                text = outcome.emit;
                if !outcome.stopped {
                    text.push_str(&c.stop.finish());
                }
                // `finish` may cut at a stop string that completed while an earlier partial one
                // was still undecided: that is a stop, whatever ended the sequence.
                let reason = if c.stop.stopped() { FinishReason::Stop } else { reason };
                Some(Ok(Delta { index, text, tokens: vec![], logprobs: vec![], finish_reason: Some(reason) }))
            }
        }
    }

    fn on_token(
        &mut self,
        index: usize,
        token: u32,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
    ) -> Option<Result<Delta, EngineError>> {
        let tokenizer = self.tokenizer.clone();
        let c = self.choices.get_mut(index)?;
        if c.done {
            return None; // tokens the engine produced before it saw our cancel flag
        }
        let piece = match c.detok.push(token) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let outcome = c.stop.push(&piece);
        let logprobs = logprob.map(|(lp, top)| vec![token_logprob(&tokenizer, token, lp, &top)]).unwrap_or_default();
        if outcome.stopped {
            c.done = true;
            self.cancel[index].store(true, Ordering::Relaxed);
            let delta = Delta {
                index,
                text: outcome.emit,
                tokens: vec![token],
                logprobs,
                finish_reason: Some(FinishReason::Stop),
            };
            return Some(Ok(delta));
        }
        Some(Ok(Delta { index, text: outcome.emit, tokens: vec![token], logprobs, finish_reason: None }))
    }
}

/// Ids come from the model's own vocabulary, so `token_str`/`token_bytes` only miss for ids the
/// tokenizer does not know (a model with padded embedding rows); those show as empty text.
fn token_logprob(tok: &Tokenizer, token: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
    TokenLogprob {
        token,
        text: tok.token_str(token).unwrap_or_default(),
        bytes: tok.token_bytes(token).unwrap_or_default(),
        logprob,
        top: top.iter().map(|&(id, lp)| (id, tok.token_str(id).unwrap_or_default(), lp)).collect(),
    }
}

/// What the handle tells a new stream about its request.
pub(crate) struct StreamSetup {
    pub n: usize,
    pub stop: Vec<String>,
    pub prompt_tail: Vec<u32>,
    pub prompt_tokens: usize,
    pub cancel: Arc<[AtomicBool]>,
}
