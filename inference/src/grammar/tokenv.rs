//! The bridge between our tokenizer and llguidance: a `toktrie` token trie over the exact bytes
//! of every token id the model can emit, and `tokenize_bytes` through our real tokenizer (the
//! grammar engine forces tokens, so they must be the canonical ones the model was trained on).
//!
//! Special tokens (`<|im_end|>` and friends) carry toktrie's 0xFF marker so no grammar string can
//! spell them by accident; non-special added tokens (Qwen's `<tool_call>`) are plain text, so a
//! grammar literal `"<tool_call>"` matches both the single token and its spelled-out pieces.

use crate::tokenizer::Tokenizer;
use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use std::collections::HashSet;

pub(crate) struct KilnTokEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl KilnTokEnv {
    /// `vocab_size` is the model's logits width (it may exceed the tokenizer's vocabulary: padded
    /// embedding rows become empty words, which no grammar can ever allow).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Self {
        let specials: HashSet<u32> = tokenizer
            .inner()
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                if specials.contains(&id) && !bytes.is_empty() {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let eos = tokenizer.eos_ids.first().copied().unwrap_or(0);
        let mut info = TokRxInfo::new(vocab_size as u32, eos);
        info.tok_bos = tokenizer.bos_id;
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&tokenizer.eos_ids);
        Self { trie, tokenizer: tokenizer.clone() }
    }
}

impl TokenizerEnv for KilnTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Grammar text is UTF-8 except when a forced prefix ends inside a character; the trie's
        // greedy split is the only tokenization such bytes have.
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}
