//! One sequence (one choice of one request) as the engine thread sees it: its tokens, its
//! sampler state, and the channel back to the caller. Scheduling state (computed tokens, blocks)
//! lives in the scheduler, not here.

use crate::error::EngineError;
use crate::params::SamplingParams;
use crate::sampler::SeqSampler;
use crate::stream::{Event, FinishReason};
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
}

impl Seq {
    pub fn new(prompt: Vec<u32>, group: Arc<Group>, index: usize) -> Self {
        let sampler = SeqSampler::new(&group.params, index as u64, &prompt);
        let pending_forks = if index == 0 { group.params.n - 1 } else { 0 };
        Self { prompt_len: prompt.len(), tokens: prompt, group, index, sampler, pending_forks }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The caller dropped its stream, or a stop string ended this choice.
    pub fn is_cancelled(&self) -> bool {
        self.group.events.is_closed() || self.group.cancel[self.index].load(Ordering::Relaxed)
    }

    pub fn take_pending_forks(&mut self) -> usize {
        std::mem::take(&mut self.pending_forks)
    }

    /// A sibling choice sharing this sequence's prompt (and, through the scheduler, its blocks).
    pub fn fork(&self, index: usize) -> Self {
        let prompt = self.tokens[..self.prompt_len].to_vec();
        Self::new(prompt, self.group.clone(), index)
    }


    /// Samples the next token from `logits` and reports it; returns why the sequence ends, if it
    /// does. An EOS / stop token ends it without being emitted.
    pub fn sample(&mut self, logits: &mut [f32], eos: &[u32]) -> Option<FinishReason> {
        let p = &self.group.params;
        let s = self.sampler.sample(logits);
        let is_stop = eos.contains(&s.token) || p.stop_token_ids.contains(&s.token);
        if is_stop && !p.ignore_eos {
            return Some(FinishReason::Stop);
        }
        self.sampler.accept(s.token);
        self.tokens.push(s.token);
        let logprob = p.logprobs.then(|| (s.logprob, s.top_logprobs));
        let _ = self.group.events.send(Event::Token { index: self.index, token: s.token, logprob });
        let generated = self.tokens.len() - self.prompt_len;
        let hit_max = p.max_tokens.is_some_and(|m| generated >= m) || self.tokens.len() >= self.group.max_len;
        hit_max.then_some(FinishReason::Length)
    }

    pub fn finish(&self, reason: FinishReason) {
        let _ = self.group.events.send(Event::Finished { index: self.index, reason });
    }

    pub fn fail(&self, e: EngineError) {
        let _ = self.group.events.send(Event::Error(e));
    }
}
