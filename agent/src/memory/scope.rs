//! Memory scopes: `agent:{name}`, `user:{id}`, `run:{id}` and `global`, parsed and validated here,
//! and `vs:{id}`, a vector store's chunks (see `crate::vector_stores`): that one is never parsed
//! from a string, so the memory routes, which take scopes as strings, cannot reach it.
//! A scope is stored as the `scope` payload field of every memory (a keyword index), and every
//! read or delete the store issues carries a must-match condition on it, so no operation can
//! cross scopes. Must not: know the backend's filter types or HTTP.

use super::MemoryError;
use std::fmt;
use std::str::FromStr;

/// Longest name/id inside a scope; scopes travel in URLs and payload indexes.
const MAX_NAME_LEN: usize = 128;

/// Where a memory lives; searches never leave their scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// One agent's private notes.
    Agent(String),
    /// Facts about one end user, shared by the agents that serve them.
    User(String),
    /// One run/session's working memory.
    Run(String),
    /// Shared by every agent; keyed facts resolve conflicts by priority, then time.
    Global,
    /// The chunks of one vector store's files; written and read only through the vector stores
    /// API (its files carry their own attributes and lifecycle), never as a memory scope.
    VectorStore(String),
}

impl Scope {
    /// The scope's kind (`agent`, `user`, `run`, `global`).
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Agent(_) => "agent",
            Scope::User(_) => "user",
            Scope::Run(_) => "run",
            Scope::Global => "global",
            Scope::VectorStore(_) => "vs",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Agent(n) => write!(f, "agent:{n}"),
            Scope::User(n) => write!(f, "user:{n}"),
            Scope::Run(n) => write!(f, "run:{n}"),
            Scope::Global => f.write_str("global"),
            Scope::VectorStore(n) => write!(f, "vs:{n}"),
        }
    }
}

impl FromStr for Scope {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "global" {
            return Ok(Scope::Global);
        }
        let invalid = |message: String| MemoryError::Invalid { field: "scope", message };
        let Some((kind, name)) = s.split_once(':') else {
            return Err(invalid(format!(
                "scope must be `agent:{{name}}`, `user:{{id}}`, `run:{{id}}` or `global`, got `{s}`"
            )));
        };
        validate_name(name).map_err(|m| invalid(format!("{m} in scope `{s}`")))?;
        let name = name.to_string();
        match kind {
            "agent" => Ok(Scope::Agent(name)),
            "user" => Ok(Scope::User(name)),
            "run" => Ok(Scope::Run(name)),
            "vs" => Err(invalid(format!("`{s}` is a vector store's scope; use the vector stores API for it"))),
            _ => Err(invalid(format!("unknown scope kind `{kind}` (agent, user, run or global)"))),
        }
    }
}

/// Names are plain identifiers so a scope string is one unambiguous keyword (no `:` inside).
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name after `:` must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("the name is longer than {MAX_NAME_LEN} bytes"));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@');
    if let Some(c) = name.chars().find(|&c| !ok(c)) {
        return Err(format!("`{c}` is not allowed (letters, digits, `_ - . @`)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for s in ["agent:planner", "user:u-42", "run:0f3a.b", "global", "user:a@b.c"] {
            assert_eq!(s.parse::<Scope>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_scopes() {
        for s in ["", "agent", "agent:", "team:x", "agent:a:b", "agent:a b", "global:x", "GLOBAL"] {
            let err = s.parse::<Scope>().unwrap_err();
            assert!(matches!(err, MemoryError::Invalid { field: "scope", .. }), "{s}: {err}");
        }
        assert!(format!("agent:{}", "x".repeat(129)).parse::<Scope>().is_err());
        // Printed, never parsed: the memory routes cannot name a vector store's chunks.
        assert_eq!(Scope::VectorStore("vs_1".into()).to_string(), "vs:vs_1");
        assert!("vs:vs_1".parse::<Scope>().is_err());
    }
}
