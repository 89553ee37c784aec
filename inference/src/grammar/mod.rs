//! Constrained decoding: output that follows a grammar token by token, on llguidance (the grammar
//! engine vLLM, SGLang, llama.cpp and mistral.rs use) over our own tokenizer.
//!
//! Owns: the request-side [`Constraint`] (a JSON schema or a Lark grammar, optionally engaged only
//! at a trigger string such as `<tool_call>`), compiling it once per distinct grammar, off the
//! caller's thread and within [`GrammarLimits`] (`compile.rs`: a large-stack thread, a
//! byte-bounded LRU of compiled parsers; each sequence gets a cheap clone), schema rewrites and
//! checks (`schema.rs`), and, in `state.rs`, the per-sequence matcher that yields token masks and
//! forced tokens.
//! Must not: know about OpenAI request shapes (the server turns `response_format` and `tools`
//! into a `Constraint`), compute anything for unconstrained sequences, or overrule the model:
//! the token budget cuts constrained output exactly as it cuts free text.

mod compile;
mod schema;
mod state;
mod tokenv;

pub use compile::CacheUsage;
pub use schema::{closed_objects, GrammarLimits};
pub(crate) use state::{apply_mask, Accepted, SeqGrammar};

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;
use compile::{CompileSlots, Lru};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;
use llguidance::{ParserFactory, TokenParser};
use serde_json::Value;
use std::sync::{Arc, Mutex, OnceLock};
use tokenv::KilnTokEnv;

/// What a constrained request must produce.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Output is one JSON value valid under this schema (`{"type": "object"}` = any object).
    JsonSchema(Value),
    /// llguidance's Lark dialect; `%json {...}` embeds a schema (tool-call formats use it).
    Lark(String),
}

/// Text in the output that engages a lazy grammar.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub text: String,
    /// Only when the output begins with `text` (after leading whitespace), not anywhere.
    pub at_start: bool,
}

/// A grammar plus when it engages.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub grammar: Grammar,
    /// Empty: the whole output follows the grammar. Otherwise free text until the output
    /// contains one of these; the grammar then engages *at* the trigger, so it must begin with
    /// the trigger's text (lazy tool calls in `auto` mode: `<tool_call>`, or `{"name"` first).
    pub triggers: Vec<Trigger>,
}

impl Constraint {
    pub fn json_schema(schema: Value) -> Self {
        Self { grammar: Grammar::JsonSchema(schema), triggers: Vec::new() }
    }

    pub fn lark(text: impl Into<String>) -> Self {
        Self { grammar: Grammar::Lark(text.into()), triggers: Vec::new() }
    }
}

/// Adds llguidance's JSON formatting options to a schema for free-standing JSON output
/// (`response_format`): whitespace between tokens is at most one run of up to 12 spaces and
/// newlines (a space, or a newline plus indentation), never unbounded. Unbounded whitespace lets a small model loop on newlines until
/// `max_tokens`; forbidding it entirely derails models trained to pretty-print (SmolLM2 writes
/// `{\n    "name": ...`; json_object went from 32/50 to 38/50 complete objects with this).
pub fn compact_json_schema(schema: Value) -> Value {
    with_json_options(
        schema,
        serde_json::json!({"item_separator": ",", "key_separator": ":", "whitespace_pattern": "[\\x20\\x0A]{1,12}"}),
    )
}

/// As [`compact_json_schema`] but with no whitespace choice at all (`", "` / `": "`): tool-call
/// arguments, written on one line in every tool format models are trained on (and `{}` for a
/// parameterless tool, never `{\n  }`).
pub fn inline_json_schema(schema: Value) -> Value {
    with_json_options(
        schema,
        serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    )
}

fn with_json_options(mut schema: Value, options: Value) -> Value {
    if let Value::Object(m) = &mut schema {
        m.insert("x-guidance".into(), options);
    }
    schema
}

/// Compiles constraints for one model's tokenizer; shared by every [`crate::EngineHandle`] clone.
pub(crate) struct GrammarCompiler {
    tokenizer: Tokenizer,
    vocab_size: usize,
    limits: GrammarLimits,
    /// Built on first use: the token trie costs ~0.1 s for a 150k vocabulary.
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
    slots: Arc<CompileSlots>,
    cache: Mutex<Lru>,
}

/// A compiled constraint, ready to become a sequence's [`SeqGrammar`].
pub(crate) struct Compiled {
    pub parser: TokenParser,
    pub triggers: Vec<Trigger>,
    pub env: TokEnv,
}

impl GrammarCompiler {
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, limits: GrammarLimits) -> Self {
        let (slots, cache) = (CompileSlots::new(limits.max_concurrent), Mutex::new(Lru::new(limits.cache_bytes)));
        Self { tokenizer, vocab_size, limits, factory: OnceLock::new(), slots, cache }
    }

    fn factory(&self) -> Result<Arc<ParserFactory>, EngineError> {
        let f = self.factory.get_or_init(|| {
            let env: TokEnv = Arc::new(KilnTokEnv::new(&self.tokenizer, self.vocab_size));
            let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            f.quiet();
            // Errors go back to clients: never with the parser's state or the grammar in them.
            f.limits_mut().verbose_errors = false;
            Ok(Arc::new(f))
        });
        f.clone().map_err(|e| EngineError::Internal(format!("cannot build the grammar engine's token trie: {e}")))
    }

    /// Compiles `c` (or clones the cached parser of an identical grammar). An invalid or
    /// unsupported grammar is [`EngineError::Grammar`] naming the problem; one over the limits
    /// is [`EngineError::GrammarLimit`] naming the limit. Blocks the calling thread until the
    /// compile thread is done (at most the compile timeout).
    pub fn compile(&self, c: &Constraint) -> Result<Compiled, EngineError> {
        if c.triggers.iter().any(|t| t.text.is_empty()) {
            return Err(EngineError::Grammar("a grammar trigger must not be empty".into()));
        }
        let key = match &c.grammar {
            Grammar::JsonSchema(v) => format!("json:{v}"),
            Grammar::Lark(t) => format!("lark:{t}"),
        };
        match &c.grammar {
            Grammar::JsonSchema(v) => schema::check_schema(v, key.len() - "json:".len(), &self.limits)?,
            Grammar::Lark(t) => schema::check_bytes(t.len(), &self.limits)?,
        }
        let factory = self.factory()?;
        let cached = self.lock_cache()?.get(&key);
        let parser = match cached {
            Some(p) => p,
            None => {
                let top = match &c.grammar {
                    Grammar::JsonSchema(v) => TopLevelGrammar::from_json_schema(v.clone()),
                    Grammar::Lark(t) => TopLevelGrammar::from_lark(t.clone()),
                };
                let job = {
                    let factory = factory.clone();
                    move || {
                        usable(
                            factory
                                .create_parser(top)
                                .map_err(|e| EngineError::Grammar(clean_error(&e.to_string())))?,
                        )
                    }
                };
                let p = self.slots.run(self.limits.compile_timeout, job)?;
                self.lock_cache()?.put(key, &p);
                p
            }
        };
        Ok(Compiled { parser, triggers: c.triggers.clone(), env: factory.tok_env().clone() })
    }

    pub fn cache_usage(&self) -> CacheUsage {
        self.cache.lock().map(|c| c.usage()).unwrap_or_default()
    }

    fn lock_cache(&self) -> Result<std::sync::MutexGuard<'_, Lru>, EngineError> {
        self.cache.lock().map_err(|_| EngineError::Internal("grammar cache poisoned".into()))
    }
}

/// `p` if it can begin an output: a grammar that compiles but admits no token at all (a schema
/// that is only a reference to itself, `{"$ref": "#"}`) would otherwise fail the sequence on its
/// first step, as an internal error. Costs one mask, on the compile thread, once per grammar.
fn usable(p: TokenParser) -> Result<TokenParser, EngineError> {
    let mut m = llguidance::Matcher::new(Ok(p.deep_clone()));
    match m.compute_mask() {
        Ok(mask) if !mask.is_zero() => Ok(p),
        _ => Err(EngineError::Grammar(
            "no output can satisfy it (for example a schema that only refers to itself)".into(),
        )),
    }
}

/// llguidance prefixes messages with its internal context and may follow them with its state;
/// keep the first line, the part a user can act on, and bound its length.
fn clean_error(e: &str) -> String {
    const MAX_CHARS: usize = 300;
    let line = e.lines().next().unwrap_or(e).trim();
    match line.char_indices().nth(MAX_CHARS) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}
