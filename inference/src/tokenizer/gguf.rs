//! Builds a `tokenizers::Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata, so a GGUF-only
//! model tokenizes exactly as llama.cpp (the format's reference implementation) does.
//!
//! Owns: the byte-level BPE model, the choice of pre-tokenizer per `tokenizer.ggml.pre`, the
//! registration of control / user-defined tokens, and reading bos/eos/template metadata.
//! Must not: guess. An unknown `tokenizer.ggml.model` or `pre` type is an error naming it; a
//! generic fallback would tokenize "almost right" and silently degrade every answer.

use super::{eog_text, RawSpecials, TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED};
use crate::error::EngineError;
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TEMPLATE_TOOL_USE: &str = "tokenizer.chat_template.tool_use";
/// Every key whose token ends generation (llama.cpp's eos / eot / eom).
const KEYS_EOG: [&str; 3] =
    ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"];

/// The GPT-2 split (also what `ByteLevel(use_regex=true)` applies): contractions, optional-space
/// letter runs, optional-space digit runs, optional-space punctuation runs, whitespace.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's split (from its tokenizer.json): case-insensitive contractions, a letter run that may
/// take one leading non-letter (so " word" and "(word" stay whole), *single* digits, punctuation
/// runs that swallow trailing newlines, newline runs, whitespace.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: like Qwen2's but digits go in groups of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer families we reproduce, named after llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PreType {
    /// Plain GPT-2 regex.
    Gpt2,
    /// Every digit its own piece, then the GPT-2 regex (SmolLM, StarCoder, Refact, CodeShell...).
    DigitsThenGpt2,
    /// Qwen2 regex (also StableLM2, DeepSeek-R1 distills of Qwen, Megrez).
    Qwen2,
    /// Llama 3 regex, whole-word vocabulary hits skip the merges.
    Llama3,
}

/// Maps `tokenizer.ggml.pre` to a family exactly as llama.cpp's `llama_vocab::impl::load` does
/// for the names we support. Anything else is refused by name.
pub(super) fn pre_type(name: &str) -> Result<PreType, EngineError> {
    Ok(match name {
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de"
        | "gigachat" | "mellum" | "exaone4" | "trillion" | "granite-docling" | "a.x-4.0" => PreType::Gpt2,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => PreType::DigitsThenGpt2,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "stablelm2" | "megrez" | "hunyuan" => PreType::Qwen2,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => PreType::Llama3,
        other => {
            return Err(EngineError::Tokenizer(format!(
                "unsupported GGUF pre-tokenizer type '{other}' ({KEY_PRE}); put the model's tokenizer.json beside the GGUF file"
            )))
        }
    })
}

/// Builds the HF pre-tokenizer equivalent to llama.cpp's regex list for `pre`.
///
/// llama.cpp splits the raw text with each regex of the family in turn (matches and the text
/// between them become pieces), then maps each piece to byte-level unicode. HF does the same with
/// `Split(regex, Isolated)` steps followed by `ByteLevel(use_regex = false)`. `add_prefix_space`
/// is always false: llama.cpp never prepends a space for BPE vocabularies, and a prefix space
/// would turn `<|im_start|>user` into `Ġuser` (wrong ids, silently worse output).
pub(super) fn pre_tokenizer(pre: PreType) -> Result<PreTokenizerWrapper, EngineError> {
    let mut steps = pre_regexes(pre)
        .iter()
        .map(|re| {
            Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map(PreTokenizerWrapper::Split)
                .map_err(|e| EngineError::Tokenizer(format!("pre-tokenizer regex {re:?}: {e}")))
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
}

/// The regexes of each family, in llama.cpp's order.
fn pre_regexes(pre: PreType) -> &'static [&'static str] {
    match pre {
        PreType::Gpt2 => &[GPT2_REGEX],
        // `\p{N}` first isolates every digit, so "2024" is four tokens, as SmolLM was trained.
        PreType::DigitsThenGpt2 => &[r"\p{N}", GPT2_REGEX],
        PreType::Qwen2 => &[QWEN2_REGEX],
        PreType::Llama3 => &[LLAMA3_REGEX],
    }
}

/// Everything a GGUF file says about its tokenizer.
pub(super) struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub raw: RawSpecials,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    pub eos_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub template: Option<String>,
    pub tool_use_template: Option<String>,
}

fn missing(key: &str) -> EngineError {
    EngineError::Tokenizer(format!("GGUF metadata has no '{key}'"))
}

fn bad(key: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("GGUF metadata '{key}': {e}"))
}

fn get_str<'a>(c: &'a Content, key: &str) -> Result<Option<&'a str>, EngineError> {
    c.metadata.get(key).map(|v| v.to_string().map(String::as_str).map_err(|e| bad(key, e))).transpose()
}

/// Any integer width: converters write ids as u32, i32 or u64 depending on their version.
fn as_u32(v: &Value) -> Option<u32> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x),
        Value::I8(x) => u32::try_from(x).ok(),
        Value::I16(x) => u32::try_from(x).ok(),
        Value::I32(x) => u32::try_from(x).ok(),
        Value::U64(x) => u32::try_from(x).ok(),
        Value::I64(x) => u32::try_from(x).ok(),
        _ => None,
    }
}

fn get_u32(c: &Content, key: &str) -> Result<Option<u32>, EngineError> {
    c.metadata.get(key).map(|v| as_u32(v).ok_or_else(|| bad(key, format!("not a token id: {v:?}")))).transpose()
}

fn get_strings<'a>(c: &'a Content, key: &str) -> Result<Vec<&'a str>, EngineError> {
    let arr = c.metadata.get(key).ok_or_else(|| missing(key))?.to_vec().map_err(|e| bad(key, e))?;
    arr.iter().map(|v| v.to_string().map(String::as_str).map_err(|e| bad(key, e))).collect()
}

/// Reads and converts the whole tokenizer section of `content`.
pub(super) fn build(content: &Content) -> Result<GgufTokenizer, EngineError> {
    let model = get_str(content, KEY_MODEL)?.ok_or_else(|| missing(KEY_MODEL))?;
    if model != "gpt2" {
        // "llama" (SentencePiece), "bert" (WordPiece), "t5" (Unigram)... are real formats we have
        // not implemented; say so instead of mis-tokenizing.
        return Err(EngineError::Tokenizer(format!(
            "unsupported GGUF tokenizer model '{model}' ({KEY_MODEL}); only byte-level BPE ('gpt2') is built from \
             GGUF metadata: put the model's tokenizer.json beside the GGUF file"
        )));
    }
    let pre_name = get_str(content, KEY_PRE)?.ok_or_else(|| missing(KEY_PRE))?;
    let pre = pre_type(pre_name)?;
    let tokens = get_strings(content, KEY_TOKENS)?;
    let merges = get_strings(content, KEY_MERGES)?;
    let types = token_types(content, tokens.len())?;

    let bpe = bpe_model(&tokens, &merges, pre == PreType::Llama3)?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    register_added_tokens(&mut tokenizer, &tokens, &types);
    let raw = RawSpecials::new(&tokenizer);

    let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|s| s.to_string());
    let bos_id = get_u32(content, KEY_BOS)?.filter(|&i| (i as usize) < tokens.len());
    // llama.cpp's default for BPE vocabularies is no BOS, except the Llama 3 family.
    let add_bos = match content.metadata.get(KEY_ADD_BOS) {
        Some(v) => v.to_bool().map_err(|e| bad(KEY_ADD_BOS, e))?,
        None => pre == PreType::Llama3,
    };
    let eos_ids = eog_ids(content, &tokens, &types)?;
    let eos_token = token_text(get_u32(content, KEYS_EOG[0])?);
    Ok(GgufTokenizer {
        tokenizer,
        raw,
        bos_id,
        add_bos: add_bos && bos_id.is_some(),
        eos_ids,
        bos_token: token_text(bos_id),
        eos_token,
        template: get_str(content, KEY_TEMPLATE)?.map(str::to_string),
        tool_use_template: get_str(content, KEY_TEMPLATE_TOOL_USE)?.map(str::to_string),
    })
}

/// `tokenizer.ggml.token_type`, or all-normal when absent (old converters).
fn token_types(content: &Content, n: usize) -> Result<Vec<i32>, EngineError> {
    let Some(v) = content.metadata.get(KEY_TOKEN_TYPE) else {
        tracing::warn!("GGUF has no {KEY_TOKEN_TYPE}: no token will be treated as special");
        return Ok(vec![1; n]);
    };
    let arr = v.to_vec().map_err(|e| bad(KEY_TOKEN_TYPE, e))?;
    if arr.len() != n {
        return Err(bad(KEY_TOKEN_TYPE, format!("{} entries for {n} tokens", arr.len())));
    }
    arr.iter()
        .map(|v| match *v {
            Value::I32(x) => Ok(x),
            Value::U32(x) => i32::try_from(x).map_err(|e| bad(KEY_TOKEN_TYPE, e)),
            Value::U8(x) => Ok(x.into()),
            Value::I8(x) => Ok(x.into()),
            ref other => Err(bad(KEY_TOKEN_TYPE, format!("not an integer: {other:?}"))),
        })
        .collect()
}

/// The BPE model over the full GGUF vocabulary (ids are positions in `tokenizer.ggml.tokens`).
///
/// GGUF stores gpt2-model tokens and merges already in byte-level unicode form (`Ġ` for a space),
/// which is exactly what HF's BPE expects after the `ByteLevel` pre-tokenizer, so they go in as is.
/// Special tokens stay in this vocabulary too, so their ids are the GGUF ids.
fn bpe_model(tokens: &[&str], merges: &[&str], ignore_merges: bool) -> Result<BPE, EngineError> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        // llama.cpp renames empty tokens the same way; an empty key would collide.
        let t = if t.is_empty() { format!("[EMPTY_{i}]") } else { t.to_string() };
        if let Some(prev) = vocab.insert(t.clone(), i as u32) {
            // llama.cpp asserts on this too: a duplicate would make one id undecodable.
            return Err(bad(KEY_TOKENS, format!("token {t:?} appears at ids {prev} and {i}")));
        }
    }
    let merges = merges
        .iter()
        .map(|m| {
            // Search from the second char, as llama.cpp does, so a pair whose left side starts
            // with a space still splits at the separator.
            let skip = m.chars().next().map_or(0, char::len_utf8);
            let pos =
                m[skip..].find(' ').map(|p| p + skip).ok_or_else(|| bad(KEY_MERGES, format!("no space in {m:?}")))?;
            Ok((m[..pos].to_string(), m[pos + 1..].to_string()))
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("building BPE from GGUF vocabulary: {e}")))
}

/// Control and unknown tokens become *special* added tokens: split out of the text only when
/// special parsing is on, skipped by `decode(skip_special)`. User-defined tokens (Qwen's
/// `<tool_call>`) become plain added tokens, which llama.cpp (like HF) splits out even when special
/// parsing is off. The tokens keep their GGUF ids because the model vocabulary already has them.
fn register_added_tokens(tok: &mut tokenizers::Tokenizer, tokens: &[&str], types: &[i32]) {
    let pick = |want: &[i32], special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|&(t, ty)| want.contains(ty) && !t.is_empty())
            .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
            .collect()
    };
    let special = pick(&[TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN], true);
    let user = pick(&[TOKEN_TYPE_USER_DEFINED], false);
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);
}

/// Every id that ends generation: the explicit eos/eot/eom keys first, then control tokens whose
/// text llama.cpp also treats as end-of-generation (e.g. SmolLM2 and Qwen2 stop on both
/// `<|im_end|>` and `<|endoftext|>`; only one of them is the GGUF eos).
fn eog_ids(content: &Content, tokens: &[&str], types: &[i32]) -> Result<Vec<u32>, EngineError> {
    let mut ids = Vec::new();
    for key in KEYS_EOG {
        if let Some(id) = get_u32(content, key)?.filter(|&i| (i as usize) < tokens.len()) {
            ids.push(id);
        }
    }
    for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        if ty == TOKEN_TYPE_CONTROL && eog_text(t) && !ids.contains(&(i as u32)) {
            ids.push(i as u32);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_types_map_like_llama_cpp() {
        assert_eq!(pre_type("smollm").ok(), Some(PreType::DigitsThenGpt2));
        assert_eq!(pre_type("qwen2").ok(), Some(PreType::Qwen2));
        assert_eq!(pre_type("llama-bpe").ok(), Some(PreType::Llama3));
        assert_eq!(pre_type("gpt-2").ok(), Some(PreType::Gpt2));
        assert_eq!(pre_regexes(PreType::DigitsThenGpt2).len(), 2);
    }

    #[test]
    fn every_family_builds() {
        for p in [PreType::Gpt2, PreType::DigitsThenGpt2, PreType::Qwen2, PreType::Llama3] {
            assert!(pre_tokenizer(p).is_ok(), "{p:?}");
        }
    }
}
