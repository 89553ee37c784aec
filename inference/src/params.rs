//! Per-request generation parameters with OpenAI semantics, and their validation.
//!
//! This is the contract between callers (CLI, HTTP server, agents) and the engine. It knows
//! nothing about HTTP or JSON field names; `server` maps OpenAI requests onto it.

use crate::error::EngineError;
use crate::grammar::Constraint;

/// Largest `top_logprobs` OpenAI accepts.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How one request is sampled and when it stops. Defaults are OpenAI's.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Number of independent completions sharing the prompt's KV blocks.
    pub n: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p * p_max`; 0 disables it.
    pub min_p: f32,
    /// OpenAI presence penalty in [-2, 2]: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2]: subtracted per occurrence in the generated text.
    pub frequency_penalty: f32,
    /// HF/llama.cpp repetition penalty (> 0, 1 disables it), over prompt and generated tokens.
    pub repetition_penalty: f32,
    /// Added to the logits of the given token ids before anything else ([-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
    /// Per-request seed: the same seed gives the same output whatever else is in the batch.
    pub seed: Option<u64>,
    /// Maximum generated tokens; `None` means up to the context length.
    pub max_tokens: Option<usize>,
    /// Keep generating past EOS / stop token ids (benchmarks).
    pub ignore_eos: bool,
    /// Extra token ids that end the sequence (besides the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the sequence; matched on text, never emitted.
    pub stop: Vec<String>,
    /// Return the chosen token's logprob (and `top_logprobs` alternatives).
    pub logprobs: bool,
    /// Number of alternatives per position, at most [`MAX_TOP_LOGPROBS`].
    pub top_logprobs: usize,
    /// Output must follow this grammar (structured outputs, tool calls).
    pub constraint: Option<Constraint>,
    /// Scheduling class: `Background` work (an agent's conversation summary) is admitted only
    /// while no normal request waits, and is preempted first.
    pub priority: Priority,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: None,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            constraint: None,
            priority: Priority::Normal,
        }
    }
}

/// How the scheduler ranks a request against others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// First come, first served among its peers.
    #[default]
    Normal,
    /// Yields to every normal request: admitted after them, preempted before them.
    Background,
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else default.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks every field's range; `vocab_size` bounds `logit_bias` keys.
    pub fn validate(&self, vocab_size: usize) -> Result<(), EngineError> {
        let bad = |param: &'static str, message: String| Err(EngineError::InvalidParam { param, message });
        if self.n == 0 || self.n > 128 {
            return bad("n", format!("n must be between 1 and 128, got {}", self.n));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature", format!("temperature must be in [0, 2], got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {}", self.repetition_penalty),
            );
        }
        if let Some((id, b)) =
            self.logit_bias.iter().find(|(id, b)| *id as usize >= vocab_size || !(-100.0..=100.0).contains(b))
        {
            return bad(
                "logit_bias",
                format!("logit_bias entry {id}: {b} needs a token id below {vocab_size} and a bias in [-100, 100]"),
            );
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs),
            );
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "max_tokens must be at least 1".to_string());
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "stop strings must not be empty".to_string());
        }
        Ok(())
    }
}
