//! Searching vector stores: each query in each store's scope through [`MemoryStore::search`]
//! (hybrid), the attribute filter applied (see `filter.rs`), the hits of all queries and stores
//! merged by score (a chunk found twice keeps its best), best first.
//! Must not: write anything.

use super::{filter::Filter, Result, VectorStores, VsError};
use crate::memory::{MemoryError, Scope, SearchMode, SearchQuery, MAX_LIMIT};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Largest `max_num_results` (OpenAI's bound).
pub const MAX_RESULTS: usize = 50;

/// One search over one or more stores.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// One query or several (their results merged).
    pub queries: Vec<String>,
    pub max_num_results: usize,
    pub filter: Option<Filter>,
    /// Results scoring below are left out (the hybrid score: 1 = first in both rankings).
    pub score_threshold: Option<f32>,
}

/// One chunk found.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub vector_store_id: String,
    pub file_id: String,
    pub filename: String,
    pub score: f32,
    pub attributes: Map<String, Value>,
    pub text: String,
    /// The chunk's memory id (results of several queries are merged on it).
    pub chunk_id: String,
}

impl VectorStores {
    /// The best chunks of `stores` for `req`, best first. Unknown stores are `NotFound`.
    pub async fn search(&self, stores: &[String], req: &SearchRequest) -> Result<Vec<SearchHit>> {
        let memory = self.memory()?;
        if !(1..=MAX_RESULTS).contains(&req.max_num_results) {
            let m = format!("max_num_results must be between 1 and {MAX_RESULTS}");
            return Err(VsError::Invalid { field: "max_num_results".into(), message: m });
        }
        if req.queries.is_empty() || req.queries.iter().any(|q| q.trim().is_empty()) {
            return Err(VsError::Invalid { field: "query".into(), message: "query must not be empty".into() });
        }
        let (exact, rest) = req.filter.as_ref().map(Filter::pushdown).unwrap_or_default();
        // What only `matches` decides is applied to a deeper candidate list.
        let depth = if rest { MAX_LIMIT } else { req.max_num_results };
        let mut best: HashMap<String, SearchHit> = HashMap::new();
        for vs in stores {
            self.row(vs).await?;
            for query in &req.queries {
                let q = SearchQuery {
                    query: query.clone(),
                    top_k: depth,
                    score_threshold: req.score_threshold,
                    filter: exact.clone(),
                    mode: SearchMode::Hybrid,
                };
                let found = match memory.search(&Scope::VectorStore(vs.clone()), q).await {
                    Ok(found) => found,
                    // A store without chunks yet: nothing to find.
                    Err(MemoryError::NotFound(_)) => Vec::new(),
                    Err(e) => return Err(e.into()),
                };
                for s in found {
                    let md = &s.memory.metadata;
                    let attributes = md.get("attributes").and_then(Value::as_object).cloned().unwrap_or_default();
                    if req.filter.as_ref().is_some_and(|f| !f.matches(&attributes)) {
                        continue;
                    }
                    let text_of = |k: &str| md.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    let hit = SearchHit {
                        vector_store_id: vs.clone(),
                        file_id: text_of("file_id"),
                        filename: text_of("filename"),
                        score: s.score,
                        attributes,
                        text: s.memory.text.clone(),
                        chunk_id: s.memory.id.clone(),
                    };
                    match best.get(&hit.chunk_id) {
                        Some(b) if b.score >= hit.score => {}
                        _ => {
                            best.insert(hit.chunk_id.clone(), hit);
                        }
                    }
                }
            }
        }
        let mut hits: Vec<SearchHit> = best.into_values().collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.chunk_id.cmp(&b.chunk_id)));
        hits.truncate(req.max_num_results);
        Ok(hits)
    }
}
