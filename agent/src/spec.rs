//! Agent definitions (TOML files and JSON objects share one shape) and their validation.
//! This module owns the `AgentSpec` type, its parsing (every error names the field that failed, so
//! the server's 400 can name it too), its rules, the instructions template and merge-patching.
//! It must not know about HTTP, the engine or the store: the served models and known tool names
//! come in through `SpecContext`, and the caller decides what to do with a `SpecError`.

use std::collections::HashSet;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::conversation::ConversationPolicy;
use crate::tools::client::ClientToolDef;
use crate::tools::http::HttpToolDef;

/// Bounds on `max_steps`: a run always gets at least one model turn, and a hundred turns is far
/// past any loop that is still making progress.
pub const MAX_STEPS_LIMIT: u32 = 100;
const NAME_MAX_LEN: usize = 64;
const HTTP_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// An invalid agent definition. `field` is a path into the definition (`max_steps`,
/// `tool_rules.terminal[0]`, `http_tools[1].url`); an empty path means the whole document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError { field: field.into(), message: message.into() }
    }
}

/// Rules the tool loop enforces on an agent's calls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolRules {
    /// A call to one of these tools ends the run; its arguments are the run's output.
    #[serde(default)]
    pub terminal: Vec<String>,
    /// At most this many tool calls in one model turn (unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls_per_step: Option<usize>,
    /// A call to one of these pauses the run (`requires_action`) until it is approved.
    #[serde(default)]
    pub requires_approval: Vec<String>,
    /// The run's first model turn must call a tool (the Responses API's `tool_choice:
    /// "required"`); later turns choose freely.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub call_first: bool,
}

/// The `file_search` tool's settings (the Responses API's `file_search` tool): the vector stores
/// it searches and how. An agent listing `file_search` in `tools` needs them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSearchSpec {
    pub vector_store_ids: Vec<String>,
    /// Chunks per search, 1..=50 (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_results: Option<usize>,
    /// OpenAI's attribute filter (comparison or compound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Value>,
    /// Chunks scoring below are left out (`ranking_options.score_threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_threshold: Option<f32>,
}

/// One agent: its instructions, model, tools and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    // The bounds `validate` enforces, stated for the OpenAPI document.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A minijinja template rendered with the run's `variables` (strict: a missing variable is an
    /// error, never an empty string the model would silently see).
    #[serde(default)]
    pub instructions: String,
    pub model: String,
    /// Tools the agent may call, by name: known tools (builtins, MCP) or this agent's HTTP tools.
    #[serde(default)]
    pub tools: Vec<String>,
    /// HTTP tools declared by this agent; declaring one makes it callable (see `tool_names`).
    #[serde(default)]
    pub http_tools: Vec<HttpToolDef>,
    /// Tools the caller runs (the run pauses for their results); declaring one makes it callable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_tools: Vec<ClientToolDef>,
    #[serde(default = "default_max_steps")]
    #[schemars(range(min = 1, max = 100))]
    pub max_steps: u32,
    #[serde(default = "default_max_tokens_per_step")]
    #[schemars(range(min = 1))]
    pub max_tokens_per_step: u32,
    /// JSON schema (of an object) the final output must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    #[serde(default)]
    pub tool_rules: ToolRules,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Compaction and recall when a run continues a conversation (Responses API chains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationPolicy>,
    /// What the `file_search` tool searches (needed when `tools` lists it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_search: Option<FileSearchSpec>,
}

fn default_max_steps() -> u32 {
    10
}

fn default_max_tokens_per_step() -> u32 {
    512
}

/// What validation checks names against: the served model names and the known tool names
/// (builtins and MCP tools); the agent's own HTTP tools are added by `validate`.
#[derive(Debug, Clone, Default)]
pub struct SpecContext {
    pub models: Vec<String>,
    pub tools: HashSet<String>,
}

impl AgentSpec {
    /// Parses a TOML agent file. Unknown keys are errors (a typo must not silently drop a rule).
    pub fn from_toml_str(src: &str) -> Result<AgentSpec, SpecError> {
        let de = toml::Deserializer::parse(src).map_err(|e| SpecError::new("", e.message().trim()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let message = e.inner().message().trim().to_string();
            path_error(e.path(), message)
        })
    }

    /// Parses a JSON agent object (the body of POST /v1/agents).
    pub fn from_json(value: Value) -> Result<AgentSpec, SpecError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let message = e.inner().to_string();
            path_error(e.path(), message)
        })
    }

    /// The agent as a JSON object (what the store keeps and GET /v1/agents returns).
    pub fn to_json(&self) -> Value {
        // Through text, not `to_value`: that widens f32 to f64 and a temperature of 0.2 would read
        // back as 0.20000000298023224; the text form prints the shortest f32 digits. A struct of
        // strings, numbers and JSON values always serialises and parses.
        let text = serde_json::to_string(self).expect("AgentSpec serialises to JSON");
        serde_json::from_str(&text).expect("serde_json parses its own output")
    }

    /// Every tool the agent may call: `tools` in order, then HTTP tools not already listed.
    pub fn tool_names(&self) -> Vec<String> {
        let mut names = self.tools.clone();
        let own = self.http_tools.iter().map(|t| &t.name).chain(self.client_tools.iter().map(|t| &t.name));
        for name in own {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    /// Checks every rule; the first failure is returned, naming its field.
    pub fn validate(&self, ctx: &SpecContext) -> Result<(), SpecError> {
        check_name("name", &self.name)?;
        if !ctx.models.iter().any(|m| m == &self.model) {
            let served = ctx.models.join(", ");
            return Err(SpecError::new("model", format!("unknown model `{}` (served: {served})", self.model)));
        }
        self.validate_limits()?;
        self.validate_http_tools(ctx)?;
        self.validate_client_tools(ctx)?;
        self.validate_tools(ctx)?;
        self.validate_rules()?;
        if let Some(schema) = &self.output_schema {
            check_object_schema("output_schema", schema)?;
        }
        if let Some(c) = &self.conversation {
            c.validate()?;
        }
        self.compile_instructions()?;
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), SpecError> {
        if !(1..=MAX_STEPS_LIMIT).contains(&self.max_steps) {
            return Err(SpecError::new("max_steps", format!("must be between 1 and {MAX_STEPS_LIMIT}")));
        }
        if self.max_tokens_per_step == 0 {
            return Err(SpecError::new("max_tokens_per_step", "must be at least 1"));
        }
        if let Some(t) = self.temperature {
            // The same range the OpenAI API accepts; NaN must not reach the sampler.
            if !(0.0..=2.0).contains(&t) {
                return Err(SpecError::new("temperature", "must be between 0 and 2"));
            }
        }
        Ok(())
    }

    fn validate_http_tools(&self, ctx: &SpecContext) -> Result<(), SpecError> {
        let mut seen = HashSet::new();
        for (i, t) in self.http_tools.iter().enumerate() {
            let at = |f: &str| format!("http_tools[{i}].{f}");
            check_name(&at("name"), &t.name)?;
            if !seen.insert(t.name.as_str()) {
                return Err(SpecError::new(at("name"), format!("duplicate HTTP tool `{}`", t.name)));
            }
            // A builtin or MCP tool of the same name would make every call ambiguous.
            if ctx.tools.contains(&t.name) {
                return Err(SpecError::new(at("name"), format!("`{}` is already a known tool", t.name)));
            }
            if !HTTP_METHODS.contains(&t.method.to_ascii_uppercase().as_str()) {
                let allowed = HTTP_METHODS.join(", ");
                return Err(SpecError::new(at("method"), format!("must be one of {allowed}")));
            }
            if !(t.url.starts_with("http://") || t.url.starts_with("https://")) {
                return Err(SpecError::new(at("url"), "must be an http:// or https:// URL"));
            }
            if let Some(p) = &t.parameters {
                check_object_schema(&at("parameters"), p)?;
            }
        }
        Ok(())
    }

    fn validate_client_tools(&self, ctx: &SpecContext) -> Result<(), SpecError> {
        let mut seen = HashSet::new();
        for (i, t) in self.client_tools.iter().enumerate() {
            let at = |f: &str| format!("client_tools[{i}].{f}");
            check_name(&at("name"), &t.name)?;
            let clash = ctx.tools.contains(&t.name) || self.http_tools.iter().any(|h| h.name == t.name);
            if !seen.insert(t.name.as_str()) || clash {
                return Err(SpecError::new(at("name"), format!("`{}` names another tool too", t.name)));
            }
            if let Some(p) = &t.parameters {
                check_object_schema(&at("parameters"), p)?;
            }
        }
        Ok(())
    }

    fn validate_tools(&self, ctx: &SpecContext) -> Result<(), SpecError> {
        let mut seen = HashSet::new();
        for (i, name) in self.tools.iter().enumerate() {
            let field = format!("tools[{i}]");
            if !seen.insert(name.as_str()) {
                return Err(SpecError::new(field, format!("duplicate tool `{name}`")));
            }
            let own =
                self.http_tools.iter().any(|t| &t.name == name) || self.client_tools.iter().any(|t| &t.name == name);
            if !own && !ctx.tools.contains(name) {
                return Err(SpecError::new(field, format!("unknown tool `{name}`")));
            }
        }
        Ok(())
    }

    fn validate_rules(&self) -> Result<(), SpecError> {
        let names = self.tool_names();
        let lists =
            [("terminal", &self.tool_rules.terminal), ("requires_approval", &self.tool_rules.requires_approval)];
        for (list, entries) in lists {
            for (i, name) in entries.iter().enumerate() {
                if !names.contains(name) {
                    let msg = format!("`{name}` is not one of the agent's tools");
                    return Err(SpecError::new(format!("tool_rules.{list}[{i}]"), msg));
                }
            }
        }
        if self.tool_rules.max_calls_per_step == Some(0) {
            return Err(SpecError::new("tool_rules.max_calls_per_step", "must be at least 1"));
        }
        if self.tool_rules.call_first && names.is_empty() {
            return Err(SpecError::new("tool_rules.call_first", "the agent has no tools to call"));
        }
        let searches = names.iter().any(|n| n == crate::tools::file_search::NAME);
        match &self.file_search {
            None if searches => Err(SpecError::new("file_search", "`file_search` in tools needs its vector_store_ids")),
            Some(f) if f.vector_store_ids.is_empty() => {
                Err(SpecError::new("file_search.vector_store_ids", "must name at least one vector store"))
            }
            Some(f) => crate::tools::file_search::check(f).map_err(|(field, m)| SpecError::new(field, m)),
            None => Ok(()),
        }
    }

    /// Compiles the instructions template (syntax only: variables come with each run).
    fn compile_instructions(&self) -> Result<(), SpecError> {
        let env = template_env();
        env.template_from_str(&self.instructions).map_err(|e| SpecError::new("instructions", template_msg(&e)))?;
        Ok(())
    }

    /// Renders the instructions with a run's variables. A variable the template uses but `vars`
    /// lacks is an error naming it (field `variables`), never an empty string.
    pub fn render_instructions(&self, vars: &Map<String, Value>) -> Result<String, SpecError> {
        let env = template_env();
        let tmpl =
            env.template_from_str(&self.instructions).map_err(|e| SpecError::new("instructions", template_msg(&e)))?;
        // Strict mode alone says "undefined value" without the name; the caller needs the name.
        // Globals (`range`, `namespace`..) count as undeclared too, but are always there.
        let globals: HashSet<&str> = env.globals().map(|(name, _)| name).collect();
        let mut missing: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !vars.contains_key(v) && !globals.contains(v.as_str()))
            .collect();
        missing.sort();
        if !missing.is_empty() {
            return Err(SpecError::new("variables", format!("missing variable(s): {}", missing.join(", "))));
        }
        tmpl.render(minijinja::Value::from_serialize(vars)).map_err(|e| {
            let field = if e.kind() == minijinja::ErrorKind::UndefinedError { "variables" } else { "instructions" };
            SpecError::new(field, template_msg(&e))
        })
    }

    /// Applies a JSON merge patch (RFC 7396, what PATCH /v1/agents/{name} takes) and re-parses the
    /// result. The name cannot change. The caller still runs `validate` on the result.
    pub fn apply_patch(&self, patch: Value) -> Result<AgentSpec, SpecError> {
        let Value::Object(ref fields) = patch else {
            return Err(SpecError::new("", "a patch must be a JSON object"));
        };
        if let Some(name) = fields.get("name") {
            if name.as_str() != Some(self.name.as_str()) {
                return Err(SpecError::new("name", "an agent's name cannot change"));
            }
        }
        let mut doc = self.to_json();
        merge_patch(&mut doc, &patch);
        AgentSpec::from_json(doc)
    }
}

/// Loads every `*.toml` file in `dir` (sorted by file name, so the order is stable); an error
/// names the file. Duplicate agent names across files are an error too.
pub fn load_dir(dir: &Path) -> Result<Vec<AgentSpec>, SpecError> {
    let shown = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| SpecError::new(shown.clone(), e.to_string()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| SpecError::new(shown.clone(), e.to_string()))?.path();
        if path.extension().is_some_and(|x| x == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut specs: Vec<AgentSpec> = Vec::with_capacity(paths.len());
    for path in paths {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(&path).map_err(|e| SpecError::new(file.clone(), e.to_string()))?;
        let spec = AgentSpec::from_toml_str(&src).map_err(|e| in_file(&file, e))?;
        if specs.iter().any(|s| s.name == spec.name) {
            return Err(SpecError::new(file, format!("name: agent `{}` is defined twice", spec.name)));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn in_file(file: &str, e: SpecError) -> SpecError {
    let field = if e.field.is_empty() { file.to_string() } else { format!("{file}: {}", e.field) };
    SpecError::new(field, e.message)
}

/// Maps a serde path (`.` for the root) and message to a field path. serde_path_to_error already
/// ends the path with an unknown key, but reports a missing field at its containing object; the
/// missing field itself is the useful name.
fn path_error(path: &serde_path_to_error::Path, message: String) -> SpecError {
    let mut field = path.to_string();
    if field == "." {
        field.clear();
    }
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split_once('`')).map(|(key, _)| key);
    if let Some(key) = missing {
        field = if field.is_empty() { key.to_string() } else { format!("{field}.{key}") };
    }
    SpecError::new(field, message)
}

fn check_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > NAME_MAX_LEN || !ok_chars {
        let msg = format!("must be 1 to {NAME_MAX_LEN} characters of a-z, A-Z, 0-9, _ and -");
        return Err(SpecError::new(field, msg));
    }
    Ok(())
}

/// A schema of an object: a JSON object whose `type` is `"object"`.
fn check_object_schema(field: &str, schema: &Value) -> Result<(), SpecError> {
    match schema.get("type") {
        Some(Value::String(t)) if t == "object" && schema.is_object() => Ok(()),
        _ => Err(SpecError::new(field, "must be a JSON schema object with \"type\": \"object\"")),
    }
}

fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env
}

fn template_msg(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("{} (line {line})", e.detail().unwrap_or(&e.kind().to_string())),
        None => e.to_string(),
    }
}

/// RFC 7396: objects merge key by key, `null` deletes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(fields) = target else { unreachable!("made an object above") };
    for (key, value) in patch_fields {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
