//! Incremental detokenization of one choice: token ids in, UTF-8-safe text deltas out.
//!
//! Owns: a short window of token ids, the prefix/read-offset technique. The window starts at the
//! prefix offset; `ids[..read]` is text already released (or prompt context), decoded again only
//! as the anchor that gives the next token its real leading space / byte neighbours
//! (SentencePiece decoders strip the first token's space; byte-level and byte-fallback tokens
//! may hold part of a character). A push releases `decode(ids) - decode(ids[..read])` once that
//! text is longer and does not end in U+FFFD (a character still missing bytes); then the
//! released tokens become the new anchor and older ids are dropped.
//! Must not: know about stop strings, sampling or the engine; emit a character that later tokens
//! could still change (it holds instead) or lose text at the end (`finish` flushes).

use crate::error::EngineError;
use std::sync::Arc;
use tokenizers::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Unreleased tokens after which the text is released even if it ends in U+FFFD. No real
/// character needs more than 4 byte tokens, so only an invalid byte stream gets here; the cap
/// keeps the window (and each decode) bounded instead of growing with the whole output.
const MAX_PENDING: usize = 16;

pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    /// From the prefix offset on: the anchor tokens, then pushed tokens not yet released.
    ids: Vec<u32>,
    /// Read offset: `ids[..read]` is the anchor, `ids[read..]` the unreleased tokens.
    read: usize,
}

impl IncrementalDetokenizer {
    /// `prompt_tail`: the last few prompt tokens, decoded only as context for the first
    /// generated token and never emitted. Empty is fine (the first token then decodes as if it
    /// started the text).
    pub fn new(tokenizer: Arc<Tokenizer>, prompt_tail: &[u32]) -> Self {
        Self { tokenizer, ids: prompt_tail.to_vec(), read: prompt_tail.len() }
    }

    /// Adds one generated token; returns the text it completes (often empty while a multi-byte
    /// character is still partial, or for a skipped special token). Never contains a partial
    /// character.
    pub fn push(&mut self, token: u32) -> Result<String, EngineError> {
        self.ids.push(token);
        self.release(false)
    }

    /// The sequence ended: returns whatever is still held, as the tokenizer decodes it (an
    /// incomplete final character becomes U+FFFD rather than being dropped). A decode error here
    /// yields an empty string: the same error already surfaced on the `push` that caused it.
    pub fn finish(&mut self) -> String {
        self.release(true).unwrap_or_default()
    }

    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Releases the pending tokens' text if it is complete (always when `flush`).
    fn release(&mut self, flush: bool) -> Result<String, EngineError> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let anchor = self.decode(&self.ids[..self.read])?;
        let text = self.decode(&self.ids)?;
        // Shorter or equal: a skipped special token or a decoder still merging; a trailing
        // U+FFFD: a character whose remaining bytes are in tokens not yet generated.
        let must = flush || self.ids.len() - self.read > MAX_PENDING;
        if !must && (text.len() <= anchor.len() || text.ends_with(REPLACEMENT)) {
            return Ok(String::new());
        }
        let new = new_suffix(&anchor, &text).to_string();
        // The released tokens become the next anchor (the prefix offset moves to the old read
        // offset); the ids before it are never decoded again.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(new)
    }
}

/// The part of `text` after the already released `anchor`. Decoders are prefix-stable in
/// practice, so `text` starts with `anchor`; if one is not (a cleanup rule rewrote earlier
/// text), emit from the first differing character: released text cannot be taken back.
fn new_suffix<'a>(anchor: &str, text: &'a str) -> &'a str {
    if let Some(rest) = text.strip_prefix(anchor) {
        return rest;
    }
    let common = anchor
        .char_indices()
        .zip(text.chars())
        .find(|&((_, a), b)| a != b)
        .map_or(anchor.len().min(text.len()), |((i, _), _)| i);
    // `common` is a char boundary of `anchor`, and text agrees with anchor up to it.
    text.get(common..).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::metaspace::{Metaspace, PrependScheme};
    use tokenizers::decoders::sequence::Sequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    /// GPT-2's byte -> char table: printable Latin-1 bytes stand for themselves, the others are
    /// shifted to 256.. in byte order.
    fn byte_char(b: u8) -> char {
        let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable(b) {
            b as char
        } else {
            char::from_u32(256 + (0..b).filter(|&x| !printable(x)).count() as u32).unwrap()
        }
    }

    /// Byte-level spelling of raw bytes.
    fn bl(bytes: &[u8]) -> String {
        bytes.iter().map(|&b| byte_char(b)).collect()
    }

    /// A GPT-2-style byte-level BPE: one token per byte (id = byte value) plus merges that make
    /// tokens ending in the first byte of "é", holding only continuation bytes of an emoji, and
    /// straddling two CJK characters; "<|end|>" is a special token.
    fn byte_bpe() -> Arc<Tokenizer> {
        let mut vocab: Vocab = (0..=255u8).map(|b| (bl(&[b]), b as u32)).collect();
        let e = "é".as_bytes();
        let smile = "😀".as_bytes();
        let (ri, hon) = ("日".as_bytes(), "本".as_bytes());
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"c".to_vec(), b"a".to_vec()),
            (b"ca".to_vec(), b"f".to_vec()),
            (b"caf".to_vec(), e[..1].to_vec()),          // "caf" + first byte of "é"
            (e[..1].to_vec(), e[1..].to_vec()),          // "é" whole
            (smile[2..3].to_vec(), smile[3..].to_vec()), // two continuation bytes
            (ri[2..].to_vec(), hon[..1].to_vec()),       // end of 日 + start of 本
            (b" ".to_vec(), b"w".to_vec()),
        ];
        let mut merges = Vec::new();
        for (a, b) in pairs {
            let joined = [a.clone(), b.clone()].concat();
            let next = vocab.len() as u32;
            vocab.entry(bl(&joined)).or_insert(next);
            merges.push((bl(&a), bl(&b)));
        }
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().unwrap();
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.add_special_tokens(&[AddedToken::from("<|end|>", true)]);
        Arc::new(tok)
    }

    /// Pushes every id; returns the chunks (finish's last) after checking none has U+FFFD.
    fn stream(tok: &Arc<Tokenizer>, tail: &[u32], ids: &[u32], clean: bool) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new(tok.clone(), tail);
        let mut chunks: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        if clean {
            assert!(chunks.iter().all(|c| !c.contains(REPLACEMENT)), "{chunks:?}");
        }
        chunks.push(d.finish());
        chunks
    }

    const TEXTS: [&str; 7] = [
        "café 日本語 😀! naïve",
        "😀😀 cafécafé",
        "é",
        "日本日本 wow 👩‍👩‍👧 ünïcödé",
        "plain ascii, nothing special",
        " leading space and trailing 😀",
        "mixed<|end|>special",
    ];

    #[test]
    fn byte_level_pushes_concatenate_to_the_full_decode() {
        let tok = byte_bpe();
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            let chunks = stream(&tok, &[], &ids, true);
            let full = tok.decode(&ids, true).unwrap();
            assert_eq!(chunks.concat(), full, "{text}");
            assert_eq!(full, text.replace("<|end|>", ""));
        }
    }

    #[test]
    fn partial_characters_are_held_until_complete() {
        let tok = byte_bpe();
        let ids = tok.encode("café", false).unwrap().get_ids().to_vec();
        // the merges give ["caf" + 0xC3, 0xA9]: nothing can be shown until the second token
        assert_eq!(ids.len(), 2);
        assert_eq!(stream(&tok, &[], &ids, true), vec!["", "café", ""]);
        let smile: Vec<u32> = tok.encode("😀", false).unwrap().get_ids().to_vec();
        assert_eq!(smile.len(), 3); // 0xF0, 0x9F, [0x98 0x80]
        assert_eq!(stream(&tok, &[], &smile, true), vec!["", "", "😀", ""]);
        // a token holding the end of 日 and the start of 本 releases 日 only with 本's last byte
        let ids = tok.encode("日本", false).unwrap().get_ids().to_vec();
        let chunks = stream(&tok, &[], &ids, true);
        assert_eq!(chunks.concat(), "日本");
        assert!(!chunks.iter().any(|c| c == "日"), "{chunks:?}");
    }

    #[test]
    fn finish_flushes_an_incomplete_character_as_replacement() {
        let tok = byte_bpe();
        let ids = [b'a' as u32, 0xF0, 0x9F];
        let chunks = stream(&tok, &[], &ids, true);
        assert_eq!(chunks, vec!["a", "", "", "\u{FFFD}"]);
        assert_eq!(chunks.concat(), tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn invalid_byte_streams_keep_the_window_bounded() {
        let tok = byte_bpe();
        let ids: Vec<u32> = std::iter::repeat_n(0x80, 40).chain([b'a' as u32]).collect();
        let mut d = IncrementalDetokenizer::new(tok.clone(), &[]);
        let mut out = String::new();
        for &id in &ids {
            out += &d.push(id).unwrap();
            assert!(d.ids.len() <= 2 * (MAX_PENDING + 1), "anchor and pending tokens are each capped");
        }
        out += &d.finish();
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn special_tokens_are_skipped() {
        let tok = byte_bpe();
        let end = tok.token_to_id("<|end|>").unwrap();
        let ids = [b'h' as u32, end, b'i' as u32, end];
        assert_eq!(stream(&tok, &[], &ids, true), vec!["h", "", "i", "", ""]);
    }

    /// Tiny LCG for random id sequences.
    fn lcg(state: &mut u64) -> u64 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn random_id_sequences_match_the_full_decode_even_when_invalid() {
        let tok = byte_bpe();
        let vocab = tok.get_vocab_size(true) as u64;
        let mut s = 99;
        for case in 0..500 {
            let n = lcg(&mut s) % 12;
            // bias toward multi-byte pieces (ids >= 0x80) so partial characters are common
            let ids: Vec<u32> = (0..n)
                .map(|_| match lcg(&mut s) % 3 {
                    0 => (lcg(&mut s) % 128) as u32,
                    _ => (128 + lcg(&mut s) % (vocab - 128)) as u32,
                })
                .collect();
            let tail: Vec<u32> = (0..lcg(&mut s) % 3).map(|_| (lcg(&mut s) % 128) as u32).collect();
            let full = tok.decode(&[tail.clone(), ids.clone()].concat(), true).unwrap();
            let context = tok.decode(&tail, true).unwrap();
            let chunks = stream(&tok, &tail, &ids, false);
            assert_eq!(format!("{context}{}", chunks.concat()), full, "case {case}: {tail:?} {ids:?}");
        }
    }

    /// SentencePiece-style (Llama) decoding: "▁" for spaces, byte-fallback tokens, and the first
    /// token's leading space stripped.
    fn sentencepiece(decoder: DecoderWrapper) -> Arc<Tokenizer> {
        let mut vocab: Vocab = ["<unk>", "▁Hello", "▁world", "!", "▁caf"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), 5 + b);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .byte_fallback(true)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(bpe);
        tok.with_decoder(Some(decoder));
        Arc::new(tok)
    }

    #[test]
    fn prompt_tail_gives_the_first_token_its_leading_space() {
        let meta = sentencepiece(DecoderWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)));
        assert_eq!(meta.decode(&[2], true).unwrap(), "world"); // why the context is needed
        assert_eq!(stream(&meta, &[], &[1, 2, 3], true), vec!["Hello", " world", "!", ""]);
        assert_eq!(stream(&meta, &[1], &[2, 3], true), vec![" world", "!", ""]);
        let llama = sentencepiece(DecoderWrapper::Sequence(Sequence::new(vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").unwrap()),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
            DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
        ])));
        let fb = |b: u8| 5 + b as u32;
        // "▁caf" <0xC3> <0xA9> "▁world" <0xF0> <0x9F> <0x98> <0x80>
        let ids = [4, fb(0xC3), fb(0xA9), 2, fb(0xF0), fb(0x9F), fb(0x98), fb(0x80)];
        let chunks = stream(&llama, &[1], &ids, true);
        assert_eq!(chunks, vec![" caf", "", "é", " world", "", "", "", "😀", ""]);
        assert_eq!(stream(&llama, &[], &ids, true).concat(), llama.decode(&ids, true).unwrap());
    }

    #[test]
    fn real_wordpiece_tokenizer_round_trips() {
        let Some(home) = std::env::var_os("HOME") else { return };
        let path = std::path::Path::new(&home).join(".cache/kiln/models/all-minilm-l6-v2/tokenizer.json");
        if !path.exists() {
            println!("skipping: {} not found", path.display());
            return;
        }
        let tok = Arc::new(Tokenizer::from_file(&path).unwrap());
        for text in ["Hello, world! It's a café in 東京, naïve résumé.", "don't stop: 3.14 ok?"] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(stream(&tok, &[], &ids, true).concat(), tok.decode(&ids, true).unwrap(), "{text}");
        }
    }
}
