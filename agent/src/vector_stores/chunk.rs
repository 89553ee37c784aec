//! Chunking a vector store file's text by tokens of the embedding model, with overlap: OpenAI's
//! `chunking_strategy` (`auto`: 800 tokens, 400 overlap; `static`: the caller's sizes) capped to
//! what the embedding model reads in one input, so the embedder never silently cuts a chunk
//! (all-MiniLM-L6-v2 reads 256 tokens, 254 of them text: its chunks are at most 254 tokens).
//! Owns: the strategy's validation and the split. Must not: embed or store anything.

use super::VsError;
use kiln_inference::embed::{EmbedHandle, EmbedInput};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// OpenAI's `auto` strategy.
pub const AUTO_MAX_TOKENS: usize = 800;
pub const AUTO_OVERLAP_TOKENS: usize = 400;
/// OpenAI's bounds on a `static` strategy's chunk size.
pub const STATIC_MIN_TOKENS: usize = 100;
pub const STATIC_MAX_TOKENS: usize = 4096;

/// The strategy a file was chunked with: what was asked and what was used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunking {
    /// `auto` or `static`, as asked.
    pub kind: String,
    /// The sizes used (tokens of the embedding model's tokenizer).
    pub max_chunk_size_tokens: usize,
    pub chunk_overlap_tokens: usize,
    /// The sizes asked for (auto: 800 / 400).
    pub requested_max_chunk_size_tokens: usize,
    pub requested_chunk_overlap_tokens: usize,
    /// The most text tokens the embedding model reads in one input (its sequence length less
    /// its special tokens): the cap on `max_chunk_size_tokens`.
    pub model_max_tokens: usize,
}

impl Chunking {
    /// Whether the model's input length made the chunks smaller than asked.
    pub fn capped(&self) -> bool {
        self.max_chunk_size_tokens < self.requested_max_chunk_size_tokens
            || self.chunk_overlap_tokens < self.requested_chunk_overlap_tokens
    }
}

/// Text tokens one embedding input may hold: the sequence length less the special tokens the
/// model's template adds (BERT: `[CLS]`, `[SEP]`).
pub fn model_max_tokens(e: &EmbedHandle) -> usize {
    let specials = e.tokenize(&EmbedInput::Text(String::new()), false).map_or(2, |ids| ids.len());
    e.info().sentence.max_seq_length.saturating_sub(specials).max(1)
}

fn invalid(message: impl Into<String>) -> VsError {
    VsError::Invalid { field: "chunking_strategy".into(), message: message.into() }
}

/// `chunking_strategy` (absent or null: auto) as the sizes to use under `model_max` tokens.
pub fn strategy(v: Option<&Value>, model_max: usize) -> Result<Chunking, VsError> {
    let (kind, max, overlap) = match v {
        None | Some(Value::Null) => ("auto", AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS),
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("auto") => ("auto", AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS),
            Some("static") => {
                let s = o.get("static").ok_or_else(|| invalid("a static strategy needs a `static` object"))?;
                let num = |k: &str| {
                    s.get(k)
                        .and_then(Value::as_u64)
                        .map(|n| n as usize)
                        .ok_or_else(|| invalid(format!("`static.{k}` must be an integer")))
                };
                let (max, overlap) = (num("max_chunk_size_tokens")?, num("chunk_overlap_tokens")?);
                if !(STATIC_MIN_TOKENS..=STATIC_MAX_TOKENS).contains(&max) {
                    return Err(invalid(format!(
                        "max_chunk_size_tokens must be between {STATIC_MIN_TOKENS} and {STATIC_MAX_TOKENS}"
                    )));
                }
                if overlap > max / 2 {
                    return Err(invalid("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens"));
                }
                ("static", max, overlap)
            }
            _ => return Err(invalid("type must be 'auto' or 'static'")),
        },
        Some(_) => return Err(invalid("chunking_strategy must be an object")),
    };
    let used = max.min(model_max);
    Ok(Chunking {
        kind: kind.into(),
        max_chunk_size_tokens: used,
        chunk_overlap_tokens: overlap.min(used / 2),
        requested_max_chunk_size_tokens: max,
        requested_chunk_overlap_tokens: overlap,
        model_max_tokens: model_max,
    })
}

/// Splits `text` into chunks of at most `c.max_chunk_size_tokens` tokens, each starting
/// `c.chunk_overlap_tokens` tokens before the previous one ended. A chunk is the text between
/// its first token's start and its last token's end, so it keeps the file's own spacing; one
/// whose text re-tokenizes longer than the model reads (a word split differently at its edge)
/// is shortened a token at a time until it fits. CPU work: call it off the async runtime.
pub fn split(e: &EmbedHandle, text: &str, c: &Chunking) -> Result<Vec<String>, VsError> {
    let enc = e
        .tokenizer()
        .inner()
        .encode(text, false)
        .map_err(|err| VsError::Backend(format!("tokenizing the file failed: {err}")))?;
    let offsets = enc.get_offsets().to_vec();
    let n = offsets.len();
    let (max, overlap) = (c.max_chunk_size_tokens.max(1), c.chunk_overlap_tokens);
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = (start + max).min(n);
        let chunk = loop {
            let piece = text.get(offsets[start].0..offsets[end - 1].1).unwrap_or_default();
            if end == start + 1 || e.tokenize(&EmbedInput::Text(piece.to_string()), false).is_ok() {
                break piece;
            }
            end -= 1;
        };
        if !chunk.trim().is_empty() {
            out.push(chunk.to_string());
        }
        if end == n {
            break;
        }
        // The next chunk repeats the last `overlap` tokens of this one, and always moves on.
        start = end.saturating_sub(overlap).max(start + 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategies_are_validated_and_capped_to_the_model() {
        let auto = strategy(None, 254).unwrap();
        assert_eq!((auto.max_chunk_size_tokens, auto.chunk_overlap_tokens), (254, 127));
        assert!(auto.capped());
        let s = json!({"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}});
        let st = strategy(Some(&s), 254).unwrap();
        assert_eq!((st.kind.as_str(), st.max_chunk_size_tokens, st.chunk_overlap_tokens), ("static", 100, 50));
        assert!(!st.capped());
        let big = json!({"type": "static", "static": {"max_chunk_size_tokens": 1000, "chunk_overlap_tokens": 100}});
        let b = strategy(Some(&big), 254).unwrap();
        assert_eq!((b.max_chunk_size_tokens, b.chunk_overlap_tokens), (254, 100));
        for bad in [
            json!({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}}),
            json!({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}}),
            json!({"type": "static"}),
            json!({"type": "semantic"}),
            json!("auto"),
        ] {
            assert!(matches!(strategy(Some(&bad), 254), Err(VsError::Invalid { .. })), "{bad}");
        }
    }
}
