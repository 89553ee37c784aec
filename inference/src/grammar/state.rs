//! One sequence's grammar state: waiting for a trigger (free text, no cost per token), then an
//! llguidance matcher that yields the mask of allowed tokens before each sample, consumes each
//! sampled token, and hands out tokens the grammar forces so the engine can append them without
//! sampling (`{"name": "` after a tool was chosen costs no model steps).

use crate::error::EngineError;
use llguidance::toktrie::{SimpleVob, TokEnv, TokTrie};
use llguidance::{Matcher, TokenParser};

use super::{Compiled, Trigger};

/// The model alone decides what is written: the token budget never overrules it, so the output
/// under a smaller `max_tokens` is a prefix of the output under a larger one (same seed).
pub(crate) struct SeqGrammar {
    env: TokEnv,
    phase: Phase,
}

enum Phase {
    Waiting(Box<Waiting>),
    Engaged(Box<Matcher>),
}

/// Free text until the output contains a trigger.
struct Waiting {
    triggers: Vec<Trigger>,
    proto: TokenParser,
    /// The last output bytes that could still be part of a trigger.
    tail: Vec<u8>,
    /// The output's first bytes after leading whitespace, while an `at_start` trigger can fire.
    head: Vec<u8>,
}

/// What accepting a sampled token did.
#[derive(Debug, PartialEq)]
pub(crate) enum Accepted {
    /// The token stands; generation goes on.
    Continue,
    /// The token stands and the grammar is complete: the sequence ends here (`stop`).
    Complete,
    /// A trigger ended inside the token and the grammar rejects the token's remaining bytes:
    /// the output continues with these tokens (the text up to the trigger's end) instead.
    Replace(Vec<u32>),
}

impl SeqGrammar {
    pub fn new(c: Compiled) -> Self {
        let phase = if c.triggers.is_empty() {
            Phase::Engaged(Box::new(Matcher::new(Ok(c.parser))))
        } else {
            Phase::Waiting(Box::new(Waiting {
                triggers: c.triggers,
                proto: c.parser,
                tail: Vec::new(),
                head: Vec::new(),
            }))
        };
        Self { env: c.env, phase }
    }

    /// An independent copy for a sibling choice (`n > 1`).
    pub fn fork(&self) -> Self {
        let phase = match &self.phase {
            Phase::Waiting(w) => Phase::Waiting(Box::new(Waiting {
                triggers: w.triggers.clone(),
                proto: w.proto.deep_clone(),
                tail: w.tail.clone(),
                head: w.head.clone(),
            })),
            Phase::Engaged(m) => Phase::Engaged(Box::new(m.deep_clone())),
        };
        Self { env: self.env.clone(), phase }
    }

    /// Whether the next token needs a mask.
    pub fn is_engaged(&self) -> bool {
        matches!(self.phase, Phase::Engaged(_))
    }

    /// The tokens the grammar allows next (EOS included once it is complete); `None` while
    /// waiting for the trigger.
    pub fn mask(&mut self) -> Result<Option<SimpleVob>, EngineError> {
        let Phase::Engaged(m) = &mut self.phase else { return Ok(None) };
        let mask = m.compute_mask().map_err(engine)?;
        if mask.is_zero() {
            return Err(EngineError::Internal("the grammar allows no token here".into()));
        }
        Ok(Some(mask))
    }

    /// Advances past a sampled token (which the mask allowed).
    pub fn accept(&mut self, token: u32) -> Result<Accepted, EngineError> {
        match &mut self.phase {
            Phase::Engaged(m) => {
                m.consume_token(token).map_err(|e| engine(format!("rejected token {token}: {e}")))?;
                Ok(if m.is_stopped() { Accepted::Complete } else { Accepted::Continue })
            }
            Phase::Waiting(w) => {
                let bytes = output_bytes(self.env.tok_trie(), token);
                let Some((replay, trigger_len)) = w.watch(bytes) else { return Ok(Accepted::Continue) };
                let (matcher, accepted) = engage(&self.env, &w.proto, &replay, trigger_len, bytes)?;
                self.phase = Phase::Engaged(Box::new(matcher));
                Ok(accepted)
            }
        }
    }

    /// Up to `limit` of the tokens the grammar now forces, already consumed by it (empty when a
    /// choice remains). Only what the output takes is consumed: a forced run cut by the budget
    /// must not leave the grammar complete (`stop`) while the output is not. A failure leaves the
    /// matcher in its error state, which the next mask reports (as `consume_ff_tokens` does).
    pub fn forced(&mut self, limit: usize) -> Vec<u32> {
        let Phase::Engaged(m) = &mut self.phase else { return Vec::new() };
        let mut forced = m.compute_ff_tokens();
        forced.truncate(limit);
        if forced.is_empty() || m.consume_tokens(&forced).is_err() {
            return Vec::new();
        }
        forced
    }

    pub fn is_complete(&self) -> bool {
        matches!(&self.phase, Phase::Engaged(m) if m.is_stopped())
    }
}

impl Waiting {
    /// Feeds one token's bytes; on a trigger the newest bytes completed, returns the output from
    /// the trigger's first byte on (trigger + the rest of this token) and the trigger's length.
    fn watch(&mut self, bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
        let longest = self.triggers.iter().map(|t| t.text.len()).max().unwrap_or(0);
        if self.head.len() < longest {
            let before = self.head.len();
            let skip = if before == 0 { bytes.iter().take_while(|b| b.is_ascii_whitespace()).count() } else { 0 };
            self.head.extend_from_slice(&bytes[skip..]);
            for t in self.triggers.iter().filter(|t| t.at_start) {
                if before < t.text.len() && self.head.starts_with(t.text.as_bytes()) {
                    return Some((self.head.clone(), t.text.len()));
                }
            }
        }
        let before = self.tail.len();
        self.tail.extend_from_slice(bytes);
        for t in self.triggers.iter().filter(|t| !t.at_start) {
            if let Some(end) = find_ending_after(&self.tail, t.text.as_bytes(), before) {
                return Some((self.tail[end - t.text.len()..].to_vec(), t.text.len()));
            }
        }
        let keep = longest.saturating_sub(1).min(self.tail.len());
        self.tail.drain(..self.tail.len() - keep);
        None
    }
}

/// A fresh matcher that has consumed `replay` (a trigger plus the rest of its last token). If the
/// grammar rejects those extra bytes, it consumes the trigger alone and the token is replaced by
/// its bytes up to the trigger's end.
fn engage(
    env: &TokEnv,
    proto: &TokenParser,
    replay: &[u8],
    trigger_len: usize,
    token: &[u8],
) -> Result<(Matcher, Accepted), EngineError> {
    let mut m = Matcher::new(Ok(proto.deep_clone()));
    let all = env.tokenize_bytes(replay);
    if m.try_consume_tokens(&all).map_err(engine)? == all.len() {
        return Ok((m, Accepted::Continue));
    }
    let mut m = Matcher::new(Ok(proto.deep_clone()));
    let trigger = env.tokenize_bytes(&replay[..trigger_len]);
    m.consume_tokens(&trigger).map_err(|e| engine(format!("the grammar does not begin with its trigger: {e}")))?;
    let extra = replay.len() - trigger_len;
    Ok((m, Accepted::Replace(env.tokenize_bytes(&token[..token.len() - extra]))))
}

/// A grammar engine error while decoding, first line only (llguidance may append its state,
/// which must not reach a client). Its parser limits (items per step, lexer fuel) are hit by
/// grammars too wide to decode, such as an object with thousands of optional properties: the
/// request's fault, so [`EngineError::GrammarLimit`]; anything else is kiln's (`Internal`).
fn engine(e: impl std::fmt::Display) -> EngineError {
    let e = e.to_string();
    let line = e.lines().next().unwrap_or_default();
    if line.contains("max is") || line.contains("fuel") {
        EngineError::GrammarLimit(format!("the grammar is too wide to decode (grammar engine limit): {line}"))
    } else {
        EngineError::Internal(format!("grammar engine: {line}"))
    }
}

/// The bytes a token adds to the text (special tokens are stored behind toktrie's 0xFF marker).
fn output_bytes(trie: &TokTrie, token: u32) -> &[u8] {
    let b = trie.token(token);
    match b.first() {
        Some(&TokTrie::SPECIAL_TOKEN_MARKER) => &b[1..],
        _ => b,
    }
}

/// End offset of the first occurrence of `needle` in `hay` that ends after `after` (i.e. one the
/// newest bytes completed).
fn find_ending_after(hay: &[u8], needle: &[u8], after: usize) -> Option<usize> {
    let first_start = (after + 1).saturating_sub(needle.len());
    (first_start..=hay.len().checked_sub(needle.len())?)
        .find(|&s| &hay[s..s + needle.len()] == needle)
        .map(|s| s + needle.len())
}

/// Sets every logit the mask forbids to -inf (ids past the mask, e.g. padded rows, included).
pub(crate) fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_found_only_when_newest_bytes_complete_it() {
        assert_eq!(find_ending_after(b"ab<tool>", b"<tool>", 5), Some(8));
        assert_eq!(find_ending_after(b"<tool>xy", b"<tool>", 6), None, "completed by older bytes");
        assert_eq!(find_ending_after(b"<tool>xy", b"<tool>", 5), Some(6));
        assert_eq!(find_ending_after(b"<to", b"<tool>", 0), None);
        assert_eq!(find_ending_after(b"x<tool>", b"<tool>", 0), Some(7));
    }

    #[test]
    fn mask_sets_forbidden_logits_to_neg_inf() {
        let mut mask = SimpleVob::alloc(70);
        mask.allow_token(3);
        mask.allow_token(40);
        let mut logits = vec![1.0f32; 75];
        apply_mask(&mask, &mut logits);
        for (i, &l) in logits.iter().enumerate() {
            assert_eq!(l.is_finite(), i == 3 || i == 40, "id {i}");
        }
    }
}
