//! The `file_search` tool: the model gives a `query`, kiln searches the vector stores the agent's
//! `file_search` settings name (the Responses API's hosted `file_search` tool) and the model
//! reads the chunks found. The stores, result count, filter and threshold are settings, never
//! arguments: a model cannot search other stores however it calls the tool. The result is text
//! a model reads as passages (`<result file_id=".." filename=".." score=".." attributes='{..}'>`
//! text `</result>`; a model fed JSON tends to echo it back), which [`parse_results`] turns back
//! into the results of the `file_search_call` item.
//!
//! Must not: choose stores from the model's arguments, or call the engine.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use serde_json::{json, Map, Value};

use super::{Tool, ToolDef, ToolError};
use crate::spec::FileSearchSpec;
use crate::vector_stores::{filter, SearchHit, SearchRequest, VectorStores};

pub const NAME: &str = "file_search";
/// OpenAI's default number of results.
pub const DEFAULT_RESULTS: usize = 10;
/// Longest query the model may write (the grammar enforces it).
const MAX_QUERY_CHARS: u64 = 500;

/// Checks the settings: `(field, message)` for the first problem.
pub fn check(f: &FileSearchSpec) -> Result<(), (String, String)> {
    if let Some(n) = f.max_num_results {
        if !(1..=crate::vector_stores::MAX_RESULTS).contains(&n) {
            let m = format!("must be between 1 and {}", crate::vector_stores::MAX_RESULTS);
            return Err(("file_search.max_num_results".into(), m));
        }
    }
    if let Some(t) = f.score_threshold {
        if !(0.0..=1.0).contains(&t) {
            return Err(("file_search.score_threshold".into(), "must be between 0 and 1".into()));
        }
    }
    if let Some(v) = f.filters.as_ref().filter(|v| !v.is_null()) {
        filter::parse(v, "file_search.filters").map_err(|e| match e {
            crate::vector_stores::VsError::Invalid { field, message } => (field, message),
            other => ("file_search.filters".into(), other.to_string()),
        })?;
    }
    Ok(())
}

/// The tool bound to `spec`'s stores.
pub fn bound(stores: VectorStores, spec: FileSearchSpec) -> Arc<dyn Tool> {
    let def = ToolDef {
        name: NAME.into(),
        description: "Search the user's uploaded files for passages relevant to a query; returns the best \
                      matching passages with the file each comes from."
            .into(),
        parameters: json!({"type": "object", "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS,
                "description": "What to look for, in words likely to appear in the passage."},
        }, "required": ["query"]}),
    };
    Arc::new(FileSearchTool { def, stores, spec })
}

struct FileSearchTool {
    def: ToolDef,
    stores: VectorStores,
    spec: FileSearchSpec,
}

impl Tool for FileSearchTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        let (stores, spec) = (self.stores.clone(), self.spec.clone());
        async move {
            let query = match args.get("query") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                _ => return Err(ToolError::Failed("`query` must be a non-empty string".into())),
            };
            let filter = match spec.filters.as_ref().filter(|v| !v.is_null()) {
                Some(v) => Some(filter::parse(v, "filters").map_err(|e| ToolError::Failed(e.to_string()))?),
                None => None,
            };
            let req = SearchRequest {
                queries: vec![query],
                max_num_results: spec.max_num_results.unwrap_or(DEFAULT_RESULTS),
                filter,
                score_threshold: spec.score_threshold,
            };
            let hits =
                stores.search(&spec.vector_store_ids, &req).await.map_err(|e| ToolError::Failed(e.to_string()))?;
            Ok(render(&hits))
        }
        .boxed()
    }
}

/// An attribute value in single quotes: JSON with its own `'` escaped, so the quote ends it.
fn quoted_json(v: &Value) -> String {
    v.to_string().replace('\'', "\\u0027")
}

/// The passages as the model reads them.
pub fn render(hits: &[SearchHit]) -> String {
    if hits.is_empty() {
        return "No passages in the files match this query.".into();
    }
    let mut out = String::from("Passages from the files, best match first:\n");
    for h in hits {
        let name = h.filename.replace('"', "'");
        let score = (h.score * 10_000.0).round() / 10_000.0;
        let attrs = quoted_json(&Value::Object(h.attributes.clone()));
        out.push_str(&format!(
            "\n<result file_id=\"{}\" filename=\"{name}\" score=\"{score}\" attributes='{attrs}'>\n{}\n</result>\n",
            h.file_id, h.text
        ));
    }
    out
}

/// The results [`render`] wrote, as `file_search_call` results (`file_id`, `filename`, `score`,
/// `attributes`, `text`); `None` when the text is not the tool's (an error, a cut result).
pub fn parse_results(content: &str) -> Option<Vec<Value>> {
    if content.starts_with("No passages") {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    let mut rest = content.split_once('\n')?.1;
    while let Some(start) = rest.find("<result file_id=\"") {
        let after = &rest[start..];
        let (head, body) = after.split_once(">\n")?;
        let end = body.find("\n</result>\n")?;
        let field = |k: &str, close: char| -> Option<&str> {
            let from = head.find(&format!(" {k}="))? + k.len() + 3;
            let len = head[from..].find(close)?;
            Some(&head[from..from + len])
        };
        let score: f64 = field("score", '"')?.parse().ok()?;
        let attributes: Map<String, Value> = serde_json::from_str(field("attributes", '\'')?).ok()?;
        out.push(json!({"file_id": field("file_id", '"')?, "filename": field("filename", '"')?, "score": score,
            "attributes": attributes, "text": &body[..end]}));
        rest = &body[end + "\n</result>\n".len()..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_results_parse_back() {
        let attrs: Map<String, Value> = serde_json::from_value(json!({"team": "o'ps", "year": 2024})).unwrap();
        let hit = |id: &str, text: &str| SearchHit {
            vector_store_id: "vs_1".into(),
            file_id: id.into(),
            filename: "a \"b\".md".into(),
            score: 0.51234,
            attributes: attrs.clone(),
            text: text.into(),
            chunk_id: id.into(),
        };
        let hits = [hit("file-1", "line one\n</result> inside"), hit("file-2", "two")];
        let parsed = parse_results(&render(&hits)).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0]["file_id"], "file-1");
        assert_eq!(parsed[0]["filename"], "a 'b'.md");
        assert_eq!(parsed[0]["score"], 0.5123);
        assert_eq!(parsed[0]["attributes"], json!({"team": "o'ps", "year": 2024}));
        assert_eq!(parsed[0]["text"], "line one\n</result> inside");
        assert_eq!(parsed[1]["text"], "two");
        assert_eq!(parse_results(&render(&[])).unwrap(), Vec::<Value>::new());
        assert!(parse_results("the tool failed").is_none() || parse_results("the tool failed") == Some(vec![]));
    }
}
