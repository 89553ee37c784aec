//! `response_format` -> the engine's [`Constraint`]: `text` (none), `json_object` (any JSON
//! object) or `json_schema` (output valid under the schema). The schema goes to the grammar
//! engine as given; what it cannot honour comes back as a 400 naming the keyword (see
//! `grammar_error`), never silently dropped.

use super::error::{ApiError, ApiResult};
use kiln_inference::chat::valid_name;
use kiln_inference::grammar::{closed_objects, compact_json_schema};
use kiln_inference::{Constraint, EngineError};
use serde_json::{json, Value};

const PARAM: &str = "response_format";

/// The constraint a `response_format` value asks for (`None` for plain text).
pub fn constraint(rf: Option<&Value>) -> ApiResult<Option<Constraint>> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else { return Ok(None) };
    let kind = rf
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(PARAM, "response_format needs a 'type'"))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::json_schema(compact_json_schema(json!({"type": "object"}))))),
        "json_schema" => {
            let spec = rf.get("json_schema").and_then(Value::as_object).ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema",
                    "response_format of type 'json_schema' needs a 'json_schema' object",
                )
            })?;
            match spec.get("name").and_then(Value::as_str) {
                Some(n) if valid_name(n) => {}
                _ => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "json_schema.name is required: a-z, A-Z, 0-9, '_' and '-', at most 64 characters",
                    ))
                }
            }
            let schema = match spec.get("schema") {
                Some(s @ Value::Object(_)) => s.clone(),
                // OpenAI treats a missing schema as "any JSON".
                None | Some(Value::Null) => json!({}),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "json_schema.schema must be a JSON schema object",
                    ))
                }
            };
            Ok(Some(Constraint::json_schema(compact_json_schema(closed_objects(schema)))))
        }
        other => Err(ApiError::invalid(
            PARAM,
            format!("unknown response_format type '{other}'; expected text, json_object or json_schema"),
        )),
    }
}

/// A grammar the engine could not compile is the client's mistake: 400 on the field it came
/// from; everything else keeps its usual mapping.
pub fn grammar_error(e: EngineError, grammar_param: &str, prompt_param: &str) -> ApiError {
    match e {
        EngineError::Grammar(m) => ApiError::invalid(grammar_param, format!("unsupported or invalid schema: {m}")),
        EngineError::GrammarLimit(m) => ApiError::invalid(grammar_param, m).with_code("grammar_too_large"),
        other => ApiError::from_engine(other, prompt_param),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(constraint(None).unwrap().is_none());
        assert!(constraint(Some(&json!({"type": "text"}))).unwrap().is_none());
        assert!(constraint(Some(&json!({"type": "json_object"}))).unwrap().is_some());
        let ok = json!({"type": "json_schema", "json_schema": {"name": "a_b-1", "schema": {"type": "object"}}});
        assert!(constraint(Some(&ok)).unwrap().is_some());
        for bad in [
            json!({}),
            json!({"type": "xml"}),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
        ] {
            let e = constraint(Some(&bad)).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
