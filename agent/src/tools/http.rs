//! HTTP tools declared in an agent file: a method, a URL template filled from the call's
//! arguments, an argument schema; the host must be on the server's allowlist; the response body
//! is the result.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One `[[http_tools]]` entry of an agent definition (TOML and JSON use the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToolDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// GET, POST, PUT, PATCH or DELETE.
    #[serde(default = "default_method")]
    pub method: String,
    /// `https://api.example.com/items/{id}`: `{arg}` is replaced by that argument, URL-encoded;
    /// arguments not in the template go in the query string (GET/DELETE) or the JSON body.
    pub url: String,
    /// JSON schema of the arguments (an object schema).
    #[serde(default)]
    pub parameters: Option<Value>,
}

fn default_method() -> String {
    "GET".into()
}
