//! Constrained decoding: output that follows a grammar token by token, on llguidance (the grammar
//! engine vLLM, SGLang, llama.cpp and mistral.rs use) over our own tokenizer.
//!
//! Owns: the request-side [`Constraint`] (a JSON schema or a Lark grammar, optionally engaged only
//! at a trigger string such as `<tool_call>`), compiling it once per distinct grammar (an LRU
//! of compiled parsers; each sequence gets a cheap clone), and, in `state.rs`, the per-sequence
//! matcher that yields token masks and forced tokens; in `closing.rs`, ending the JSON before
//! the token budget runs out.
//! Must not: know about OpenAI request shapes (the server turns `response_format` and `tools`
//! into a `Constraint`), or compute anything for unconstrained sequences.

mod closing;
mod state;
mod tokenv;

pub(crate) use state::{apply_mask, Accepted, SeqGrammar};

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;
use closing::Closers;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;
use llguidance::{ParserFactory, TokenParser};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use tokenv::KilnTokEnv;

/// Distinct grammars kept compiled; a schema used again skips compilation entirely.
const CACHE_CAPACITY: usize = 128;

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
    /// The output is JSON (or JSON in tool-call tags): close it before the token budget ends
    /// rather than let `max_tokens` cut it (`closing.rs`). Never for free text.
    pub closes_json: bool,
}

impl Constraint {
    pub fn json_schema(schema: Value) -> Self {
        Self { grammar: Grammar::JsonSchema(schema), triggers: Vec::new(), closes_json: true }
    }

    /// A Lark grammar; set `closes_json` when its output is JSON.
    pub fn lark(text: impl Into<String>) -> Self {
        Self { grammar: Grammar::Lark(text.into()), triggers: Vec::new(), closes_json: false }
    }
}

/// Adds llguidance's JSON formatting options to a schema for free-standing JSON output
/// (`response_format`): whitespace between tokens is at most one short run (a space, or a newline
/// plus indentation), never free. Unbounded whitespace lets a small model loop on newlines until
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
    /// Built on first use: the token trie costs ~0.1 s for a 150k vocabulary.
    factory: OnceLock<Result<(Arc<ParserFactory>, Arc<Closers>), String>>,
    cache: Mutex<Lru>,
}

/// A compiled constraint, ready to become a sequence's [`SeqGrammar`].
pub(crate) struct Compiled {
    pub parser: TokenParser,
    pub triggers: Vec<Trigger>,
    pub env: TokEnv,
    /// `None` unless the constraint closes its JSON at the budget.
    pub closers: Option<Arc<Closers>>,
}

impl GrammarCompiler {
    pub fn new(tokenizer: Tokenizer, vocab_size: usize) -> Self {
        Self { tokenizer, vocab_size, factory: OnceLock::new(), cache: Mutex::new(Lru::default()) }
    }

    fn factory(&self) -> Result<(Arc<ParserFactory>, Arc<Closers>), EngineError> {
        let f = self.factory.get_or_init(|| {
            let env: TokEnv = Arc::new(KilnTokEnv::new(&self.tokenizer, self.vocab_size));
            let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            f.quiet();
            Ok((Arc::new(f), Arc::new(Closers::new(env.tok_trie()))))
        });
        f.clone().map_err(|e| EngineError::Internal(format!("cannot build the grammar engine's token trie: {e}")))
    }

    /// Compiles `c` (or clones the cached parser of an identical grammar). An invalid or
    /// unsupported grammar is [`EngineError::Grammar`] naming the problem.
    pub fn compile(&self, c: &Constraint) -> Result<Compiled, EngineError> {
        let (factory, closers) = self.factory()?;
        let key = match &c.grammar {
            Grammar::JsonSchema(v) => format!("json:{v}"),
            Grammar::Lark(t) => format!("lark:{t}"),
        };
        let cached = self.cache.lock().map_err(|_| EngineError::Internal("grammar cache poisoned".into()))?.get(&key);
        let parser = match cached {
            Some(p) => p,
            None => {
                let top = match &c.grammar {
                    Grammar::JsonSchema(v) => TopLevelGrammar::from_json_schema(v.clone()),
                    Grammar::Lark(t) => TopLevelGrammar::from_lark(t.clone()),
                };
                let p = factory.create_parser(top).map_err(|e| EngineError::Grammar(clean_error(&e.to_string())))?;
                self.cache.lock().map_err(|_| EngineError::Internal("grammar cache poisoned".into()))?.put(key, &p);
                p
            }
        };
        if c.triggers.iter().any(|t| t.text.is_empty()) {
            return Err(EngineError::Grammar("a grammar trigger must not be empty".into()));
        }
        let closers = c.closes_json.then_some(closers);
        Ok(Compiled { parser, triggers: c.triggers.clone(), env: factory.tok_env().clone(), closers })
    }
}

/// llguidance prefixes messages with its internal context; keep the part a user can act on.
fn clean_error(e: &str) -> String {
    e.lines().next().unwrap_or(e).trim().to_string()
}

/// Compiled parsers by grammar text, least recently used evicted first.
#[derive(Default)]
struct Lru {
    map: HashMap<String, TokenParser>,
    order: VecDeque<String>,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<TokenParser> {
        let p = self.map.get(key)?.deep_clone();
        if let Some(i) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(i).expect("position is in range");
            self.order.push_back(k);
        }
        Some(p)
    }

    fn put(&mut self, key: String, p: &TokenParser) {
        if self.map.len() >= CACHE_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.map.insert(key, p.deep_clone());
    }
}
