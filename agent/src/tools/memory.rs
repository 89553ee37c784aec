//! The agent's memory tools, `memory_store` and `memory_search`: an agent that lists them in
//! `tools` gets both bound, when its run starts, to its own scope (`agent:{name}`), so one agent's
//! notes never reach another's search. The scope is never an argument: a model cannot read or
//! write outside its agent's scope however it calls them. Writes go through [`MemoryStore`]
//! (embedded in process, batched by the embedding queue) and return once durable.
//!
//! Must not: choose a scope from the model's arguments, or call the engine.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use serde_json::{json, Map, Value};

use super::{Tool, ToolDef, ToolError};
use crate::memory::{MemoryStore, NewMemory, Scope, SearchMode, SearchQuery};

pub const STORE: &str = "memory_store";
pub const SEARCH: &str = "memory_search";
/// Both names: an agent may list either or both.
pub const NAMES: [&str; 2] = [STORE, SEARCH];
/// The most memories one search returns (the result goes into the model's context).
const MAX_TOP_K: u64 = 10;

/// The memory tool `name` bound to `scope`; `None` for a name that is not a memory tool.
pub fn bound(name: &str, store: MemoryStore, scope: Scope) -> Option<Arc<dyn Tool>> {
    match name {
        STORE => Some(Arc::new(StoreTool { def: store_def(), store, scope })),
        SEARCH => Some(Arc::new(SearchTool { def: search_def(), store, scope })),
        _ => None,
    }
}

fn store_def() -> ToolDef {
    ToolDef {
        name: STORE.into(),
        description: "Save a fact to your long-term memory so a later conversation can find it. Give a key \
                      (subject.attribute) when the fact replaces an earlier value of the same thing."
            .into(),
        parameters: json!({"type": "object", "properties": {
            "text": {"type": "string", "minLength": 1, "description": "The fact, as a full sentence."},
            "key": {"type": "string", "minLength": 1, "description": "Optional subject.attribute, e.g. ada.seat"},
        }, "required": ["text"]}),
    }
}

fn search_def() -> ToolDef {
    ToolDef {
        name: SEARCH.into(),
        description: "Search your long-term memory for facts related to a query; returns the closest ones.".into(),
        parameters: json!({"type": "object", "properties": {
            "query": {"type": "string", "minLength": 1},
            "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
        }, "required": ["query"]}),
    }
}

fn text_arg(args: &Value, name: &str) -> Result<String, ToolError> {
    match args.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(ToolError::Failed(format!("`{name}` must be a non-empty string"))),
    }
}

struct StoreTool {
    def: ToolDef,
    store: MemoryStore,
    scope: Scope,
}

impl Tool for StoreTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        let (store, scope) = (self.store.clone(), self.scope.clone());
        async move {
            let text = text_arg(&args, "text")?;
            let key = args.get("key").and_then(Value::as_str).filter(|k| !k.is_empty()).map(str::to_string);
            let item = NewMemory { text, metadata: Map::new(), key, ttl_seconds: None, priority: 0 };
            let stored = store.add(&scope, vec![item]).await.map_err(|e| ToolError::Failed(e.to_string()))?;
            let m = stored.first().ok_or_else(|| ToolError::Failed("the store acknowledged nothing".into()))?;
            // The live fact under the key may be an earlier, higher-priority one: say which won.
            Ok(json!({"stored": true, "id": m.id, "text": m.text, "key": m.key}).to_string())
        }
        .boxed()
    }
}

struct SearchTool {
    def: ToolDef,
    store: MemoryStore,
    scope: Scope,
}

impl Tool for SearchTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        let (store, scope) = (self.store.clone(), self.scope.clone());
        async move {
            let query = text_arg(&args, "query")?;
            let top_k = args.get("top_k").and_then(Value::as_u64).unwrap_or(5).clamp(1, MAX_TOP_K) as usize;
            let q = SearchQuery { query, top_k, score_threshold: None, filter: Map::new(), mode: SearchMode::Hybrid };
            // A scope nothing was stored in yet is an empty memory, not an error for the model.
            let hits = match store.search(&scope, q).await {
                Ok(hits) => hits,
                Err(crate::memory::MemoryError::NotFound(_)) => Vec::new(),
                Err(e) => return Err(ToolError::Failed(e.to_string())),
            };
            let found: Vec<Value> = hits
                .iter()
                .map(|h| json!({"text": h.memory.text, "key": h.memory.key, "score": (h.score * 1000.0).round() / 1000.0}))
                .collect();
            Ok(json!({"memories": found}).to_string())
        }
        .boxed()
    }
}
