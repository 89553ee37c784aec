//! One sequence (one choice of one request) as the engine thread sees it: its tokens, its
//! sampler state, and the channel back to the caller. Scheduling state (computed tokens, blocks)
//! lives in the scheduler, not here.

use crate::admission::Ticket;
use crate::block_hash::{extend_hashes, BlockHash};
use crate::error::EngineError;
use crate::grammar::{Accepted, SeqGrammar};
use crate::params::SamplingParams;
use crate::sampler::SeqSampler;
use crate::stream::{Event, FinishReason};
use llguidance::toktrie::SimpleVob;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// What the choices of one request share.
pub(crate) struct Group {
    pub params: SamplingParams,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<[AtomicBool]>,
    /// Prompt + generated tokens may not exceed this.
    pub max_len: usize,
    /// A session's turn: it parks with its K/V when it ends.
    pub session: bool,
    /// Compute the prompt's K/V only; nothing is sampled.
    pub prefill_only: bool,
    /// The caller's span: engine log lines about this request are its children.
    pub span: tracing::Span,
}

pub(crate) struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    group: Arc<Group>,
    /// Choice index within the request (OpenAI `choices[i].index`).
    index: usize,
    sampler: SeqSampler,
    /// Choices still to fork off this one once its prompt is computed (`n - 1` for choice 0).
    pending_forks: usize,
    /// Constrained decoding state; `None` for free generation.
    grammar: Option<Box<SeqGrammar>>,
    /// Chained hashes of the full blocks of `tokens` (empty when prefix caching is off).
    pub block_hashes: Vec<BlockHash>,
    /// Counts the request as waiting for admission control until it is first scheduled (taken
    /// then) or the sequence is dropped, however it ends. Forked choices have none.
    pub ticket: Option<Ticket>,
}

/// What one sample did to a sequence.
pub(crate) struct Sampled {
    /// Tokens appended (the sampled one, a replacement, forced ones); 0 when it ended on EOS.
    pub appended: usize,
    /// Of those, the ones the grammar forced.
    pub forced: usize,
    pub finish: Option<FinishReason>,
}

impl Seq {
    pub fn new(prompt: Vec<u32>, group: Arc<Group>, index: usize, grammar: Option<SeqGrammar>) -> Self {
        let sampler = SeqSampler::new(&group.params, index as u64, &prompt);
        let pending_forks = if index == 0 { group.params.n - 1 } else { 0 };
        let grammar = grammar.map(Box::new);
        Self {
            block_hashes: Vec::new(),
            ticket: None,
            prompt_len: prompt.len(),
            tokens: prompt,
            group,
            index,
            sampler,
            pending_forks,
            grammar,
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The caller dropped its stream, or a stop string ended this choice.
    pub fn is_cancelled(&self) -> bool {
        self.group.events.is_closed() || self.group.cancel[self.index].load(Ordering::Relaxed)
    }

    pub fn take_pending_forks(&mut self) -> usize {
        std::mem::take(&mut self.pending_forks)
    }

    /// A sibling choice sharing this sequence's prompt (and, through the scheduler, its blocks),
    /// plus any tokens the grammar forced before the first sample (re-sent on its own stream).
    pub fn fork(&self, index: usize) -> Self {
        let prompt = self.tokens[..self.prompt_len].to_vec();
        let mut child = Self::new(prompt, self.group.clone(), index, self.grammar.as_ref().map(|g| g.fork()));
        for &t in &self.tokens[self.prompt_len..] {
            child.push(t, None);
        }
        child.block_hashes = self.block_hashes.clone();
        child
    }

    /// Hashes the blocks that appended tokens have filled; returns the new hashes.
    pub fn extend_hashes(&mut self, block_size: usize) -> &[BlockHash] {
        let known = self.block_hashes.len();
        extend_hashes(&mut self.block_hashes, &self.tokens, block_size);
        &self.block_hashes[known..]
    }

    /// Tells the caller how many prompt tokens were already cached when it started.
    pub fn report_cached(&self, tokens: usize) {
        let _ = self.group.events.send(Event::Cached { tokens });
    }

    pub fn is_session(&self) -> bool {
        self.group.session
    }

    pub fn prefill_only(&self) -> bool {
        self.group.prefill_only
    }

    pub fn span(&self) -> &tracing::Span {
        &self.group.span
    }

    /// Appends what the grammar forces before anything is sampled (a schema's opening
    /// `{"name": "`); returns how many, and whether that already ends the sequence.
    pub fn start(&mut self) -> (usize, Option<FinishReason>) {
        let forced = if self.group.params.logprobs { 0 } else { self.push_forced() };
        (forced, self.end_reason())
    }

    /// Whether the next sample needs a grammar mask.
    pub fn needs_mask(&self) -> bool {
        self.grammar.as_ref().is_some_and(|g| g.is_engaged())
    }

    /// Lends the grammar out for a mask computed beside the forward pass; see `put_grammar`.
    pub fn take_grammar(&mut self) -> Option<Box<SeqGrammar>> {
        self.grammar.take()
    }

    pub fn put_grammar(&mut self, g: Box<SeqGrammar>) {
        self.grammar = Some(g);
    }

    /// Samples the next token from `logits` (restricted to `mask` for a constrained sequence)
    /// and reports it, plus any tokens the grammar then forces; says why the sequence ends, if it
    /// does. An EOS / stop token ends it without being emitted.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        eos: &[u32],
        mask: Option<&SimpleVob>,
    ) -> Result<Sampled, EngineError> {
        let (logprobs, ignore_eos) = (self.group.params.logprobs, self.group.params.ignore_eos);
        let s = self.sampler.sample(logits, mask);
        let is_stop = eos.contains(&s.token) || self.group.params.stop_token_ids.contains(&s.token);
        if is_stop && !ignore_eos {
            return Ok(Sampled { appended: 0, forced: 0, finish: Some(FinishReason::Stop) });
        }
        let accepted = match self.grammar.as_mut() {
            Some(g) => g.accept(s.token)?,
            None => Accepted::Continue,
        };
        let before = self.tokens.len();
        let complete = accepted == Accepted::Complete;
        match accepted {
            Accepted::Replace(tokens) => tokens.into_iter().for_each(|t| self.push(t, None)),
            _ => self.push(s.token, logprobs.then_some((s.logprob, s.top_logprobs))),
        }
        let forced = if !complete && !logprobs { self.push_forced() } else { 0 };
        Ok(Sampled { appended: self.tokens.len() - before, forced, finish: self.end_reason() })
    }

    /// A complete grammar ends the sequence (`stop`), as do the length limits (`length`).
    fn end_reason(&self) -> Option<FinishReason> {
        if self.grammar.as_ref().is_some_and(|g| g.is_complete()) {
            return Some(FinishReason::Stop);
        }
        self.at_max_len().then_some(FinishReason::Length)
    }

    /// Appends what the grammar forces (no model step needed to pick them), within the length
    /// limits. Callers skip it when logprobs are requested: forced tokens have none to report.
    fn push_forced(&mut self) -> usize {
        let remaining = self.remaining();
        let Some(g) = self.grammar.as_mut() else { return 0 };
        let forced = g.forced(remaining);
        let n = forced.len();
        for t in forced {
            self.push(t, None);
        }
        n
    }

    fn at_max_len(&self) -> bool {
        self.remaining() == 0
    }

    /// Tokens this sequence may still generate (`max_tokens`, then the context length).
    fn remaining(&self) -> usize {
        let generated = self.tokens.len() - self.prompt_len;
        let by_request = self.group.params.max_tokens.map_or(usize::MAX, |m| m.saturating_sub(generated));
        by_request.min(self.group.max_len.saturating_sub(self.tokens.len()))
    }

    fn push(&mut self, token: u32, logprob: Option<(f32, Vec<(u32, f32)>)>) {
        self.sampler.accept(token);
        self.tokens.push(token);
        let _ = self.group.events.send(Event::Token { index: self.index, token, logprob });
    }

    pub fn finish(&self, reason: FinishReason) {
        let _ = self.group.events.send(Event::Finished { index: self.index, reason });
    }

    pub fn fail(&self, e: EngineError) {
        let _ = self.group.events.send(Event::Error(e));
    }
}
