//! The Responses API's hosted `file_search` tool over kiln's vector stores: a request's
//! `{"type": "file_search", "vector_store_ids", "max_num_results"?, "filters"?, "ranking_options"?}`
//! becomes the `file_search` settings of the run's agent (the agent layer offers the model a
//! `file_search(query)` function, runs the search itself and feeds the chunks back), and each
//! call comes back as a `file_search_call` item (`queries`, `status`, and `results` when the
//! request has `include: ["file_search_call.results"]`).
//! Owns: that mapping. Must not: search (kiln-agent's tool does) or drive the run.

use super::error::{ApiError, ApiResult};
use super::files::service;
use super::vector_stores::score_threshold;
use super::Shared;
use kiln_agent::history::{CallRecord, ResultStep};
use kiln_agent::spec::FileSearchSpec;
use kiln_agent::vector_stores::{filter, VsError, MAX_RESULTS};
use serde_json::{json, Value};

/// The tool's type and its function's name.
pub const FILE_SEARCH: &str = "file_search";

/// A `file_search` tool entry (at `p`, e.g. `tools[0]`) as the agent's settings; every vector
/// store it names must exist.
pub async fn settings(state: &Shared, p: &str, t: &Value) -> ApiResult<FileSearchSpec> {
    let ids = t.get("vector_store_ids").and_then(Value::as_array).filter(|a| !a.is_empty() && a.len() <= 16);
    let ids = ids.ok_or_else(|| {
        ApiError::invalid(&format!("{p}.vector_store_ids"), "vector_store_ids must list 1 to 16 vector store ids")
    })?;
    let mut vector_store_ids = Vec::new();
    let vs = service(state)?;
    for (i, id) in ids.iter().enumerate() {
        let at = format!("{p}.vector_store_ids[{i}]");
        let id = id.as_str().ok_or_else(|| ApiError::invalid(&at, "vector store ids are strings"))?;
        vs.get(id).await.map_err(|e| {
            let mut err = ApiError::from(e);
            err.param = Some(at.clone());
            err
        })?;
        vector_store_ids.push(id.to_string());
    }
    let max_num_results = match t.get("max_num_results").filter(|v| !v.is_null()) {
        None => None,
        Some(n) => match n.as_u64() {
            Some(n) if (1..=MAX_RESULTS as u64).contains(&n) => Some(n as usize),
            _ => {
                let m = format!("max_num_results must be between 1 and {MAX_RESULTS}");
                return Err(ApiError::invalid(&format!("{p}.max_num_results"), m));
            }
        },
    };
    let filters = t.get("filters").filter(|v| !v.is_null()).cloned();
    if let Some(f) = &filters {
        filter::parse(f, &format!("{p}.filters")).map_err(|e: VsError| ApiError::from(e))?;
    }
    let score_threshold = score_threshold(&format!("{p}.ranking_options"), t.get("ranking_options"))?;
    Ok(FileSearchSpec { vector_store_ids, max_num_results, filters, score_threshold })
}

/// A call of the tool, before its result: `in_progress`, with the query it searched for.
pub fn call_item(c: &CallRecord) -> Value {
    let args: Value = serde_json::from_str(&c.arguments).unwrap_or_default();
    let queries: Vec<Value> = args.get("query").cloned().into_iter().collect();
    json!({"type": "file_search_call", "id": c.id, "status": "in_progress", "queries": queries, "results": null})
}

/// The call's item once its result is in: `completed` (with the chunks found, when asked for) or
/// `failed`.
pub fn complete(item: &mut Value, r: &ResultStep, with_results: bool) {
    item["status"] = json!(if r.is_error { "failed" } else { "completed" });
    if !with_results || r.is_error {
        return;
    }
    // The tool's own text; a result cut by the size limit loses its last passage.
    if let Some(results) = kiln_agent::tools::file_search::parse_results(&r.content) {
        item["results"] = Value::Array(results);
    }
}
