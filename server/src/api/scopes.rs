//! Which scope each route needs: the one table ([`ROUTES`]) that authorization reads, and the
//! scope names credentials carry (`inference`, `embeddings`, `agents`, `memory`, `admin`,
//! `metrics`). Every route needs exactly one scope, none (`/health`), or only a valid credential
//! (`/v1/models`, and any path no route serves, so an unknown path says nothing to a stranger).
//!
//! The split: reading and running agents needs `agents`; changing what an agent *is* (create,
//! patch, delete its definition: its instructions, tools and HTTP hosts) needs `admin`, because a
//! definition decides what every later run may do. Memory reads and single-item writes need
//! `memory`; wiping a whole scope (`DELETE /v1/memory/{scope}`) needs `admin`. Files and vector
//! stores (OpenAI's retrieval APIs) need `memory`, deletes included: the OpenAI SDK's ordinary
//! clean-up (`vector_stores.delete`) must work with the key that created them. `admin` does not
//! imply the other scopes: an operator key can manage agents without generating text.
//!
//! Owns: the scope names, scope sets and the route table. Must not: read credentials or
//! decide who a caller is (`auth.rs` does), or answer requests.

use axum::http::Method;

/// One permission a credential may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Inference,
    Embeddings,
    Agents,
    Memory,
    Admin,
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 6] =
        [Scope::Inference, Scope::Embeddings, Scope::Agents, Scope::Memory, Scope::Admin, Scope::Metrics];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Embeddings => "embeddings",
            Scope::Agents => "agents",
            Scope::Memory => "memory",
            Scope::Admin => "admin",
            Scope::Metrics => "metrics",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of scopes (a bit set; cheap to copy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);
    pub const ALL: Scopes = Scopes(0b11_1111);

    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn with(self, s: Scope) -> Scopes {
        Scopes(self.0 | s.bit())
    }

    pub fn without(self, s: Scope) -> Scopes {
        Scopes(self.0 & !s.bit())
    }

    /// Configured names (keys file): every name must be a scope, or `*` for all of them.
    pub fn parse_strict<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Scopes, String> {
        names.into_iter().try_fold(Scopes::NONE, |acc, n| match (n, Scope::parse(n)) {
            ("*", _) => Ok(Scopes::ALL),
            (_, Some(s)) => Ok(acc.with(s)),
            _ => Err(format!("unknown scope '{n}' (known: {}, or * for all)", Scopes::ALL.names().join(", "))),
        })
    }

    /// Names from a token's claims: names kiln does not know are ignored (an identity provider
    /// issues scopes for other services too); `*` is not special here.
    pub fn from_claims<'a>(names: impl IntoIterator<Item = &'a str>) -> Scopes {
        names.into_iter().filter_map(Scope::parse).fold(Scopes::NONE, Scopes::with)
    }

    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL.into_iter().filter(|s| self.contains(*s)).map(Scope::as_str).collect()
    }
}

/// What a route asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: no credential is read (`/health`).
    Public,
    /// Any valid credential, whatever its scopes.
    Credential,
    Scope(Scope),
}

/// One row of the table: `method` (`*`: any, including ones the route refuses with 405) and a
/// path template whose `{name}` segments match any one non-empty segment.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    pub template: &'static str,
    pub need: Need,
}

const fn rule(method: &'static str, template: &'static str, need: Need) -> Rule {
    Rule { method, template, need }
}

use Need::{Credential, Public, Scope as S};
use Scope::{Admin, Agents, Embeddings, Inference, Memory, Metrics};

/// Every route kiln serves and what it needs; the first matching row wins (a method-specific
/// row before its path's `*` row).
pub const ROUTES: &[Rule] = &[
    rule("*", "/health", Public),
    rule("*", "/openapi.json", Credential),
    rule("*", "/v1/models", Credential),
    rule("*", "/v1/models/{id}", Credential),
    rule("*", "/v1/chat/completions", S(Inference)),
    rule("*", "/v1/completions", S(Inference)),
    rule("*", "/v1/responses", S(Inference)),
    rule("*", "/v1/responses/{id}", S(Inference)),
    rule("*", "/v1/responses/{id}/input_items", S(Inference)),
    rule("*", "/v1/responses/{id}/cancel", S(Inference)),
    rule("*", "/tokenize", S(Inference)),
    rule("*", "/detokenize", S(Inference)),
    rule("*", "/v1/embeddings", S(Embeddings)),
    rule("*", "/metrics", S(Metrics)),
    rule("POST", "/v1/agents", S(Admin)),
    rule("*", "/v1/agents", S(Agents)),
    rule("PATCH", "/v1/agents/{name}", S(Admin)),
    rule("DELETE", "/v1/agents/{name}", S(Admin)),
    rule("*", "/v1/agents/{name}", S(Agents)),
    rule("*", "/v1/agents/{name}/runs", S(Agents)),
    rule("*", "/v1/runs/{id}", S(Agents)),
    rule("*", "/v1/runs/{id}/steps", S(Agents)),
    rule("*", "/v1/runs/{id}/cancel", S(Agents)),
    rule("*", "/v1/runs/{id}/approve", S(Agents)),
    rule("*", "/v1/runs/{id}/reject", S(Agents)),
    rule("*", "/v1/runs/{id}/tool_outputs", S(Agents)),
    rule("*", "/v1/runs/{id}/events", S(Agents)),
    rule("DELETE", "/v1/memory/{scope}", S(Admin)),
    rule("*", "/v1/memory/{scope}", S(Memory)),
    rule("*", "/v1/memory/{scope}/search", S(Memory)),
    rule("*", "/v1/memory/{scope}/{id}", S(Memory)),
    rule("*", "/v1/files", S(Memory)),
    rule("*", "/v1/files/{file_id}", S(Memory)),
    rule("*", "/v1/files/{file_id}/content", S(Memory)),
    rule("*", "/v1/vector_stores", S(Memory)),
    rule("*", "/v1/vector_stores/{id}", S(Memory)),
    rule("*", "/v1/vector_stores/{id}/files", S(Memory)),
    rule("*", "/v1/vector_stores/{id}/files/{file_id}", S(Memory)),
    rule("*", "/v1/vector_stores/{id}/search", S(Memory)),
    rule("*", "/v1/vector_stores/{id}/file_batches", S(Memory)),
    rule("*", "/v1/vector_stores/{id}/file_batches/{batch_id}", S(Memory)),
];

/// What a path no route serves needs (the router answers it 404 once a credential is valid).
pub const UNKNOWN: Rule = rule("*", "other", Credential);

fn matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return false;
                }
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return false,
        }
    }
}

/// The row for this request ([`UNKNOWN`] when no route serves the path).
pub fn rule_for(method: &Method, path: &str) -> &'static Rule {
    ROUTES
        .iter()
        .find(|r| (r.method == "*" || r.method == method.as_str()) && matches(r.template, path))
        .unwrap_or(&UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_sets_and_names() {
        assert_eq!(Scopes::ALL.names().len(), 6);
        assert_eq!(Scopes::parse_strict(["*"]).unwrap(), Scopes::ALL);
        let s = Scopes::parse_strict(["inference", "metrics"]).unwrap();
        assert!(s.contains(Scope::Inference) && s.contains(Scope::Metrics) && !s.contains(Scope::Admin));
        assert!(Scopes::parse_strict(["inferense"]).unwrap_err().contains("unknown scope 'inferense'"));
        assert_eq!(Scopes::from_claims("openid inference profile *".split(' ')), Scopes::NONE.with(Scope::Inference));
        assert_eq!(Scopes::ALL.without(Scope::Admin).names().len(), 5);
    }

    #[test]
    fn routes_map_to_one_need() {
        let need = |m: Method, p: &str| rule_for(&m, p).need;
        assert_eq!(need(Method::GET, "/health"), Public);
        assert_eq!(need(Method::GET, "/v1/models/x"), Credential);
        assert_eq!(need(Method::POST, "/v1/chat/completions"), S(Inference));
        assert_eq!(need(Method::GET, "/v1/chat/completions"), S(Inference));
        assert_eq!(need(Method::POST, "/v1/agents"), S(Admin));
        assert_eq!(need(Method::GET, "/v1/agents"), S(Agents));
        assert_eq!(need(Method::GET, "/v1/agents/a"), S(Agents));
        assert_eq!(need(Method::PATCH, "/v1/agents/a"), S(Admin));
        assert_eq!(need(Method::POST, "/v1/agents/a/runs"), S(Agents));
        assert_eq!(need(Method::DELETE, "/v1/memory/user:ada"), S(Admin));
        assert_eq!(need(Method::DELETE, "/v1/memory/user:ada/m1"), S(Memory));
        assert_eq!(need(Method::POST, "/v1/memory/user:ada/search"), S(Memory));
        assert_eq!(need(Method::POST, "/v1/files"), S(Memory));
        assert_eq!(need(Method::DELETE, "/v1/vector_stores/vs_1/files/file-1"), S(Memory));
        for p in ["/v1/models/", "/v1/agents//runs", "/nope", "/v1/runs/x/y/z", ""] {
            assert_eq!(rule_for(&Method::GET, p).template, "other", "{p}");
        }
    }
}
