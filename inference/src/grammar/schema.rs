//! JSON-schema rewrites kiln applies before compiling, and the size checks a schema must pass.
//!
//! Owns: [`closed_objects`] (an object schema that lists `properties` admits no other key unless
//! it says `additionalProperties`; OpenAI strict mode and xgrammar do the same) and the shape
//! limits ([`GrammarLimits`]: bytes, JSON nodes, nesting depth) checked before any compiling.
//! Must not: compile anything, or know which request field a schema came from.

use crate::error::EngineError;
use serde_json::Value;
use std::time::Duration;

/// Bounds on what one constraint may cost to compile and to keep. A grammar over a bound is
/// refused with [`EngineError::GrammarLimit`] naming it (HTTP 400), before any work is done.
#[derive(Debug, Clone)]
pub struct GrammarLimits {
    /// Bytes of a schema (as compact JSON) or of a Lark grammar's text.
    pub max_bytes: usize,
    /// JSON values (objects, arrays, scalars) in a schema, embedded schemas of a Lark grammar
    /// not counted (their bytes are).
    pub max_nodes: usize,
    /// Nesting of a schema's JSON (`{"properties": {"a": {...}}}` is 3 deep).
    pub max_depth: usize,
    /// Wall-clock time one compilation may take before the request is refused.
    pub compile_timeout: Duration,
    /// Compilations running at once (each on its own large-stack thread); more wait.
    pub max_concurrent: usize,
    /// Bytes the cache of compiled grammars may hold (estimated per grammar).
    pub cache_bytes: usize,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_nodes: 100_000,
            max_depth: 64,
            compile_timeout: Duration::from_secs(10),
            max_concurrent: 2,
            cache_bytes: 256 << 20,
        }
    }
}

/// Checks a schema's bytes, node count and depth against `limits`; the error names the limit.
pub(crate) fn check_schema(schema: &Value, bytes: usize, limits: &GrammarLimits) -> Result<(), EngineError> {
    check_bytes(bytes, limits)?;
    // An explicit stack: the walk itself must not recurse on a hostile schema.
    let (mut nodes, mut stack) = (0usize, vec![(schema, 1usize)]);
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if nodes > limits.max_nodes {
            return Err(limit(format!(
                "the schema has more than {} JSON values (max_grammar_nodes)",
                limits.max_nodes
            )));
        }
        if depth > limits.max_depth {
            return Err(limit(format!("the schema nests deeper than {} levels (max_grammar_depth)", limits.max_depth)));
        }
        match v {
            Value::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn check_bytes(bytes: usize, limits: &GrammarLimits) -> Result<(), EngineError> {
    if bytes > limits.max_bytes {
        return Err(limit(format!(
            "the grammar is {bytes} bytes, over the limit of {} bytes (max_grammar_bytes)",
            limits.max_bytes
        )));
    }
    Ok(())
}

fn limit(message: String) -> EngineError {
    EngineError::GrammarLimit(message)
}

/// Keywords whose value is one subschema.
const ONE: [&str; 9] =
    ["items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames", "unevaluatedItems"];
/// Keywords whose value is an array of subschemas.
const MANY: [&str; 4] = ["anyOf", "oneOf", "allOf", "prefixItems"];
/// Keywords whose value maps names to subschemas.
const NAMED: [&str; 5] = ["properties", "patternProperties", "$defs", "definitions", "dependentSchemas"];

/// `schema` with every object schema that declares `properties` closed: no key beyond those
/// listed unless it says `additionalProperties` (or `patternProperties` / `unevaluatedProperties`)
/// itself. Without this a small model fills a parameterless tool (`"properties": {}`) with
/// invented keys; OpenAI strict mode and xgrammar (vLLM's default) read schemas the same way.
/// Walks only schema positions, so a property *named* `properties` is left alone.
pub fn closed_objects(mut schema: Value) -> Value {
    close(&mut schema);
    schema
}

fn close(v: &mut Value) {
    let Value::Object(m) = v else { return };
    let opens_itself = ["additionalProperties", "patternProperties", "unevaluatedProperties"];
    if m.get("properties").is_some_and(Value::is_object) && !opens_itself.iter().any(|k| m.contains_key(*k)) {
        m.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (k, child) in m.iter_mut() {
        match k.as_str() {
            k if ONE.contains(&k) || k == "additionalProperties" || k == "unevaluatedProperties" => match child {
                Value::Array(a) => a.iter_mut().for_each(close), // draft-4 tuple `items`
                c => close(c),
            },
            k if MANY.contains(&k) => {
                if let Value::Array(a) = child {
                    a.iter_mut().for_each(close);
                }
            }
            k if NAMED.contains(&k) => {
                if let Value::Object(named) = child {
                    named.values_mut().for_each(close);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_with_properties_are_closed_unless_they_say_otherwise() {
        let s = closed_objects(json!({
            "type": "object",
            "properties": {
                "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
                "open": {"type": "object", "properties": {}, "additionalProperties": true},
                "list": {"type": "array", "items": {"type": "object", "properties": {"y": {}}}},
                "any": {"type": "object"},
                "either": {"anyOf": [{"properties": {"z": {}}}, {"type": "null"}]},
            },
            "$defs": {"D": {"properties": {"w": {}}}},
        }));
        assert_eq!(s["additionalProperties"], json!(false));
        let p = &s["properties"];
        assert_eq!(p["properties"]["additionalProperties"], json!(false), "a property named 'properties'");
        assert!(p["properties"]["properties"].get("additionalProperties").is_none(), "a name map is not a schema");
        assert_eq!(p["open"]["additionalProperties"], json!(true));
        assert_eq!(p["list"]["items"]["additionalProperties"], json!(false));
        assert!(p["any"].get("additionalProperties").is_none(), "no properties declared: any object");
        assert_eq!(p["either"]["anyOf"][0]["additionalProperties"], json!(false));
        assert_eq!(s["$defs"]["D"]["additionalProperties"], json!(false));
        assert_eq!(closed_objects(json!({"properties": {}}))["additionalProperties"], json!(false));
    }

    #[test]
    fn limits_name_what_was_exceeded() {
        let l = GrammarLimits { max_bytes: 100, max_nodes: 5, max_depth: 3, ..GrammarLimits::default() };
        assert!(check_schema(&json!({"a": 1}), 10, &l).is_ok());
        let msg = |r: Result<(), EngineError>| r.unwrap_err().to_string();
        assert!(msg(check_schema(&json!({}), 101, &l)).contains("max_grammar_bytes"));
        assert!(msg(check_schema(&json!([1, 2, 3, 4, 5]), 10, &l)).contains("max_grammar_nodes"));
        assert!(msg(check_schema(&json!({"a": {"b": {"c": 1}}}), 10, &l)).contains("max_grammar_depth"));
    }
}
