//! OpenAI's vector store search `filters` on file attributes: comparisons (`eq`, `ne`, `gt`,
//! `gte`, `lt`, `lte`, `in`, `nin`) and compounds (`and`, `or`). Every filter is evaluated
//! exactly on each candidate chunk's attributes; the `eq` conditions on string and boolean
//! attributes that must all hold are also handed to the memory store as its exact metadata
//! filter (the chunks carry them as `attr_{key}`), so such searches stay top-k exact however
//! large the store. Anything else is applied to the store's best `MAX_LIMIT` candidates.
//! Owns: parsing (every mistake a 400 naming the path), matching, the store-side part.
//! Must not: query a store.

use super::VsError;
use serde_json::{Map, Value};

/// Where a chunk carries attribute `key` for the store's exact filter.
pub fn attr_field(key: &str) -> String {
    format!("attr_{key}")
}

/// Whether `attr_{key}` is a name the memory store filters on (letters, digits, `_`, `-`).
pub fn pushable_key(key: &str) -> bool {
    let f = attr_field(key);
    f.len() <= 64 && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Nin,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Cmp { op: Op, key: String, value: Value },
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

fn invalid(path: &str, message: impl Into<String>) -> VsError {
    VsError::Invalid { field: path.to_string(), message: message.into() }
}

/// Parses a filter object; `path` names it in errors (`filters`, `tools[0].filters`).
pub fn parse(v: &Value, path: &str) -> Result<Filter, VsError> {
    parse_at(v, path, 0)
}

fn parse_at(v: &Value, path: &str, depth: usize) -> Result<Filter, VsError> {
    if depth > 8 {
        return Err(invalid(path, "filters nest at most 8 deep"));
    }
    let o = v.as_object().ok_or_else(|| invalid(path, "a filter must be an object"))?;
    let ty = o.get("type").and_then(Value::as_str).unwrap_or_default();
    if let Some(kind) = match ty {
        "and" => Some(true),
        "or" => Some(false),
        _ => None,
    } {
        let list = o.get("filters").and_then(Value::as_array).filter(|l| !l.is_empty());
        let list = list.ok_or_else(|| invalid(path, format!("an `{ty}` filter needs a non-empty `filters` array")))?;
        let parts = list
            .iter()
            .enumerate()
            .map(|(i, f)| parse_at(f, &format!("{path}.filters[{i}]"), depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(if kind { Filter::And(parts) } else { Filter::Or(parts) });
    }
    let op = match ty {
        "eq" => Op::Eq,
        "ne" => Op::Ne,
        "gt" => Op::Gt,
        "gte" => Op::Gte,
        "lt" => Op::Lt,
        "lte" => Op::Lte,
        "in" => Op::In,
        "nin" => Op::Nin,
        _ => return Err(invalid(path, "type must be eq, ne, gt, gte, lt, lte, in, nin, and or or")),
    };
    let key = o.get("key").and_then(Value::as_str).filter(|k| !k.is_empty());
    let key = key.ok_or_else(|| invalid(&format!("{path}.key"), "a comparison needs a non-empty string `key`"))?;
    let value = o.get("value").cloned().unwrap_or(Value::Null);
    let scalar = |v: &Value| v.is_string() || v.is_number() || v.is_boolean();
    let ok = match op {
        Op::Eq | Op::Ne => scalar(&value),
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => value.is_number(),
        Op::In | Op::Nin => value.as_array().is_some_and(|a| a.iter().all(scalar)),
    };
    if !ok {
        let want = match op {
            Op::Eq | Op::Ne => "a string, number or boolean",
            Op::Gt | Op::Gte | Op::Lt | Op::Lte => "a number",
            Op::In | Op::Nin => "an array of strings, numbers or booleans",
        };
        return Err(invalid(&format!("{path}.value"), format!("`{ty}` compares with {want}")));
    }
    Ok(Filter::Cmp { op, key: key.to_string(), value })
}

/// JSON values equal as attributes: numbers by value (`5` equals `5.0`), the rest exactly.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

impl Filter {
    /// Whether a chunk with `attrs` passes. A comparison on a missing key fails, except `ne`
    /// and `nin` (a missing value is not the one excluded).
    pub fn matches(&self, attrs: &Map<String, Value>) -> bool {
        match self {
            Filter::And(l) => l.iter().all(|f| f.matches(attrs)),
            Filter::Or(l) => l.iter().any(|f| f.matches(attrs)),
            Filter::Cmp { op, key, value } => {
                let Some(have) = attrs.get(key) else { return matches!(op, Op::Ne | Op::Nin) };
                let num = || have.as_f64().zip(value.as_f64());
                let listed = || value.as_array().is_some_and(|l| l.iter().any(|v| same(have, v)));
                match op {
                    Op::Eq => same(have, value),
                    Op::Ne => !same(have, value),
                    Op::Gt => num().is_some_and(|(a, b)| a > b),
                    Op::Gte => num().is_some_and(|(a, b)| a >= b),
                    Op::Lt => num().is_some_and(|(a, b)| a < b),
                    Op::Lte => num().is_some_and(|(a, b)| a <= b),
                    Op::In => listed(),
                    Op::Nin => !listed(),
                }
            }
        }
    }

    /// The exact metadata conditions the memory store can apply (eq on a string or boolean
    /// attribute, at the top or inside a top-level `and`), and whether anything is left that only
    /// [`Filter::matches`] can decide.
    pub fn pushdown(&self) -> (Map<String, Value>, bool) {
        let mut out = Map::new();
        let mut rest = false;
        let parts: Vec<&Filter> = match self {
            Filter::And(l) => l.iter().collect(),
            other => vec![other],
        };
        for p in parts {
            match p {
                Filter::Cmp { op: Op::Eq, key, value }
                    if (value.is_string() || value.is_boolean())
                        && pushable_key(key)
                        && out.get(&attr_field(key)).is_none_or(|v| v == value) =>
                {
                    out.insert(attr_field(key), value.clone());
                }
                _ => rest = true,
            }
        }
        (out, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn comparisons_and_compounds_match_like_openai() {
        let a = attrs(json!({"region": "eu", "year": 2023, "draft": false}));
        let f = |v: Value| parse(&v, "filters").unwrap();
        assert!(f(json!({"type": "eq", "key": "region", "value": "eu"})).matches(&a));
        assert!(!f(json!({"type": "ne", "key": "region", "value": "eu"})).matches(&a));
        assert!(f(json!({"type": "gte", "key": "year", "value": 2023.0})).matches(&a));
        assert!(!f(json!({"type": "gt", "key": "year", "value": 2023})).matches(&a));
        assert!(f(json!({"type": "in", "key": "region", "value": ["us", "eu"]})).matches(&a));
        assert!(f(json!({"type": "nin", "key": "missing", "value": ["x"]})).matches(&a));
        assert!(!f(json!({"type": "lt", "key": "region", "value": 3})).matches(&a), "no order on strings");
        let or = f(json!({"type": "or", "filters": [
            {"type": "eq", "key": "region", "value": "us"}, {"type": "eq", "key": "draft", "value": false}]}));
        assert!(or.matches(&a));
    }

    #[test]
    fn bad_filters_name_their_path() {
        for (v, path) in [
            (json!({"type": "eq", "value": 1}), "filters.key"),
            (json!({"type": "gt", "key": "k", "value": "x"}), "filters.value"),
            (json!({"type": "and", "filters": [{"type": "like", "key": "k", "value": 1}]}), "filters.filters[0]"),
            (json!({"type": "or", "filters": []}), "filters"),
            (json!([1]), "filters"),
        ] {
            match parse(&v, "filters") {
                Err(VsError::Invalid { field, .. }) => assert_eq!(field, path, "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_exact_string_and_bool_equalities_go_to_the_store() {
        let f = parse(
            &json!({"type": "and", "filters": [
                {"type": "eq", "key": "region", "value": "eu"},
                {"type": "eq", "key": "draft", "value": false},
                {"type": "eq", "key": "year", "value": 2023}]}),
            "filters",
        )
        .unwrap();
        let (exact, rest) = f.pushdown();
        assert_eq!(Value::Object(exact), json!({"attr_region": "eu", "attr_draft": false}));
        assert!(rest, "the number is compared after the search");
        let (exact, rest) = parse(&json!({"type": "eq", "key": "a b", "value": "x"}), "f").unwrap().pushdown();
        assert!(exact.is_empty() && rest);
    }
}
