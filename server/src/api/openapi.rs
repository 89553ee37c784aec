//! The OpenAPI 3.1 document of kiln's whole HTTP API, served at `GET /openapi.json`. Request
//! bodies and query strings are described by JSON Schemas derived from the handlers' own request
//! types (schemars; the raw-JSON fields they check by hand point to `openapi_shapes.rs`), the
//! credential each operation needs comes from the one scope table (`scopes::rule_for`), and every
//! error is OpenAI's `{"error": {...}}` body. The fuzz suite (`tests/fuzz/`) is driven by it.
//!
//! Owns: the operation list (one row per route and method, checked against the scope table by a
//! test here and against the router by the fuzz suite). Must not: validate requests or answer
//! anything but the document.

use super::agents::{Decision, RunRequest, ToolOutputs};
use super::embeddings::EmbeddingRequest;
use super::files::ListQuery as FilesListQuery;
use super::memory::{AddBody, ListQuery as MemoryListQuery, PatchBody, SearchBody};
use super::misc::{DetokenizeRequest, TokenizeRequest};
use super::request::{ChatRequest, CompletionRequest, Sampling};
use super::responses::ListQuery as ResponsesListQuery;
use super::responses_items::ResponsesRequest;
use super::scopes::{rule_for, Need};
use super::vector_stores::{
    AttachBody as VsAttachBody, BatchBody as VsBatchBody, CreateBody as VsCreateBody, FilesQuery as VsFilesQuery,
    ListQuery as VsListQuery, SearchBody as VsSearchBody, UpdateBody as VsUpdateBody,
};
use axum::http::Method;
use kiln_agent::AgentSpec;
use schemars::gen::{SchemaGenerator, SchemaSettings};
use schemars::schema::Schema;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// What a successful answer is.
#[derive(Clone, Copy)]
enum Answer {
    /// A JSON object.
    Json,
    /// A JSON object, or server-sent events with `"stream": true`.
    JsonOrStream,
    /// Prometheus text.
    Text,
    /// A WebSocket upgrade (101).
    WebSocket,
    /// Bytes as stored (a file's content).
    Bytes,
}

/// One operation: a method on a path template.
struct Op {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    tag: &'static str,
    body: Option<SchemaFn>,
    query: Option<SchemaFn>,
    /// The body is `multipart/form-data` (a file upload), not JSON.
    form: bool,
    answer: Answer,
}

const fn op(
    method: &'static str,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
) -> Op {
    Op { method, path, id, summary, tag, body: None, query: None, form: false, answer: Answer::Json }
}

impl Op {
    const fn body(mut self, f: SchemaFn) -> Op {
        self.body = Some(f);
        self
    }
    const fn form(mut self, f: SchemaFn) -> Op {
        self.body = Some(f);
        self.form = true;
        self
    }
    const fn query(mut self, f: SchemaFn) -> Op {
        self.query = Some(f);
        self
    }
    const fn answer(mut self, a: Answer) -> Op {
        self.answer = a;
        self
    }
}

fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// The type's schema itself, not a `$ref` to it (query structs are split into parameters).
fn inline<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    T::json_schema(g)
}

/// Chat and completions read their sampling fields from the same object (see
/// `request::parse_with_sampling`): the body is both.
fn with_sampling<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    let (req, sampling) = (g.subschema_for::<T>(), g.subschema_for::<Sampling>());
    serde_json::from_value(json!({"allOf": [req, sampling]})).expect("allOf of two schemas")
}

/// `POST /v1/files`: OpenAI's multipart upload.
fn upload(_: &mut SchemaGenerator) -> Schema {
    let purposes: Vec<&str> = kiln_agent::vector_stores::PURPOSES.to_vec();
    serde_json::from_value(json!({"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary",
            "description": "At most 4 MiB; only UTF-8 text files can be attached to a vector store."},
        "purpose": {"enum": purposes}}}))
    .expect("a literal schema")
}

fn any_object(_: &mut SchemaGenerator) -> Schema {
    serde_json::from_value(json!({"type": "object", "description": "A JSON merge patch of the agent's fields."}))
        .expect("a literal schema")
}

use Answer::{Bytes, JsonOrStream, Text, WebSocket};

/// Every operation kiln serves.
const OPS: &[Op] = &[
    op("get", "/health", "health", "server", "200 when the model is loaded and the server is not draining, else 503."),
    op("get", "/openapi.json", "openapi", "server", "This document."),
    op("get", "/metrics", "metrics", "server", "Prometheus metrics (kiln: and vllm: names).").answer(Text),
    op("get", "/v1/models", "listModels", "models", "The served models."),
    op("get", "/v1/models/{id}", "getModel", "models", "One served model."),
    op("post", "/v1/chat/completions", "createChatCompletion", "inference", "OpenAI Chat Completions.")
        .body(with_sampling::<ChatRequest>)
        .answer(JsonOrStream),
    op("post", "/v1/completions", "createCompletion", "inference", "OpenAI (legacy) Completions.")
        .body(with_sampling::<CompletionRequest>)
        .answer(JsonOrStream),
    op("post", "/v1/responses", "createResponse", "inference", "OpenAI Responses (also `agent:NAME` and mcp tools).")
        .body(schema_of::<ResponsesRequest>)
        .answer(JsonOrStream),
    op("get", "/v1/responses/{id}", "getResponse", "inference", "A stored response."),
    op("delete", "/v1/responses/{id}", "deleteResponse", "inference", "Deletes a stored response."),
    op("get", "/v1/responses/{id}/input_items", "listInputItems", "inference", "A stored response's input items.")
        .query(inline::<ResponsesListQuery>),
    op("post", "/v1/responses/{id}/cancel", "cancelResponse", "inference", "Cancels a background response."),
    op("post", "/tokenize", "tokenize", "inference", "Token ids of a prompt or of chat messages (vLLM's shape).")
        .body(schema_of::<TokenizeRequest>),
    op("post", "/detokenize", "detokenize", "inference", "Text of token ids.").body(schema_of::<DetokenizeRequest>),
    op("post", "/v1/embeddings", "createEmbedding", "embeddings", "OpenAI Embeddings.")
        .body(schema_of::<EmbeddingRequest>),
    op("post", "/v1/agents", "createAgent", "agents", "Defines an agent.").body(schema_of::<AgentSpec>),
    op("get", "/v1/agents", "listAgents", "agents", "The defined agents."),
    op("get", "/v1/agents/{name}", "getAgent", "agents", "One agent's definition."),
    op("patch", "/v1/agents/{name}", "updateAgent", "agents", "Changes an agent's definition.").body(any_object),
    op("delete", "/v1/agents/{name}", "deleteAgent", "agents", "Deletes an agent."),
    op("post", "/v1/agents/{name}/runs", "createRun", "agents", "Starts a run of an agent.")
        .body(schema_of::<RunRequest>)
        .answer(JsonOrStream),
    op("get", "/v1/runs/{id}", "getRun", "agents", "A run: status, output, usage, cost."),
    op("get", "/v1/runs/{id}/steps", "listRunSteps", "agents", "A run's durable steps."),
    op("post", "/v1/runs/{id}/cancel", "cancelRun", "agents", "Cancels a run."),
    op("post", "/v1/runs/{id}/approve", "approveRun", "agents", "Approves a paused call.").body(schema_of::<Decision>),
    op("post", "/v1/runs/{id}/reject", "rejectRun", "agents", "Rejects a paused call.").body(schema_of::<Decision>),
    op("post", "/v1/runs/{id}/tool_outputs", "submitToolOutputs", "agents", "Results of client tools.")
        .body(schema_of::<ToolOutputs>),
    op("get", "/v1/runs/{id}/events", "runEvents", "agents", "A run's events over a WebSocket.").answer(WebSocket),
    op("post", "/v1/memory/{scope}", "addMemory", "memory", "Stores a memory in a scope.").body(schema_of::<AddBody>),
    op("get", "/v1/memory/{scope}", "listMemories", "memory", "A scope's memories, paged.")
        .query(inline::<MemoryListQuery>),
    op("delete", "/v1/memory/{scope}", "deleteMemoryScope", "memory", "Deletes every memory of a scope."),
    op("post", "/v1/memory/{scope}/search", "searchMemory", "memory", "Semantic search in a scope.")
        .body(schema_of::<SearchBody>),
    op("get", "/v1/memory/{scope}/{id}", "getMemory", "memory", "One memory."),
    op("patch", "/v1/memory/{scope}/{id}", "updateMemory", "memory", "Changes a memory.").body(schema_of::<PatchBody>),
    op("delete", "/v1/memory/{scope}/{id}", "deleteMemory", "memory", "Deletes a memory."),
    op("post", "/v1/files", "createFile", "files", "Uploads a file (multipart: file, purpose).").form(upload),
    op("get", "/v1/files", "listFiles", "files", "The uploaded files, paged.").query(inline::<FilesListQuery>),
    op("get", "/v1/files/{file_id}", "retrieveFile", "files", "One file's metadata."),
    op("delete", "/v1/files/{file_id}", "deleteFile", "files", "Deletes a file (and removes it from vector stores)."),
    op("get", "/v1/files/{file_id}/content", "downloadFile", "files", "A file's bytes.").answer(Bytes),
    op("post", "/v1/vector_stores", "createVectorStore", "vector_stores", "Creates a vector store.")
        .body(schema_of::<VsCreateBody>),
    op("get", "/v1/vector_stores", "listVectorStores", "vector_stores", "The vector stores, paged.")
        .query(inline::<VsListQuery>),
    op("get", "/v1/vector_stores/{id}", "getVectorStore", "vector_stores", "One vector store."),
    op("post", "/v1/vector_stores/{id}", "modifyVectorStore", "vector_stores", "Changes a vector store.")
        .body(schema_of::<VsUpdateBody>),
    op(
        "delete",
        "/v1/vector_stores/{id}",
        "deleteVectorStore",
        "vector_stores",
        "Deletes a vector store and its chunks.",
    ),
    op(
        "post",
        "/v1/vector_stores/{id}/files",
        "createVectorStoreFile",
        "vector_stores",
        "Attaches (ingests) a text file.",
    )
    .body(schema_of::<VsAttachBody>),
    op(
        "get",
        "/v1/vector_stores/{id}/files",
        "listVectorStoreFiles",
        "vector_stores",
        "A vector store's files, paged.",
    )
    .query(inline::<VsFilesQuery>),
    op("get", "/v1/vector_stores/{id}/files/{file_id}", "getVectorStoreFile", "vector_stores", "One attached file."),
    op(
        "delete",
        "/v1/vector_stores/{id}/files/{file_id}",
        "deleteVectorStoreFile",
        "vector_stores",
        "Detaches a file.",
    ),
    op(
        "post",
        "/v1/vector_stores/{id}/search",
        "searchVectorStore",
        "vector_stores",
        "Hybrid search of a vector store.",
    )
    .body(schema_of::<VsSearchBody>),
    op(
        "post",
        "/v1/vector_stores/{id}/file_batches",
        "createVectorStoreFileBatch",
        "vector_stores",
        "Attaches several files.",
    )
    .body(schema_of::<VsBatchBody>),
    op(
        "get",
        "/v1/vector_stores/{id}/file_batches/{batch_id}",
        "getVectorStoreFileBatch",
        "vector_stores",
        "One file batch.",
    ),
];

/// The document for a server serving the chat model `chat` (and the embedding model `embed`):
/// the `model` fields list exactly the names this server accepts, so a client (or the fuzz
/// suite) reading it knows what a valid request is.
pub fn document(chat: &str, embed: Option<&str>) -> Value {
    let mut doc = base().clone();
    let schemas = &mut doc["components"]["schemas"];
    for name in ["ChatRequest", "CompletionRequest", "TokenizeRequest", "DetokenizeRequest", "AgentSpec"] {
        schemas[name]["properties"]["model"] = json!({"enum": [chat]});
    }
    schemas["EmbeddingRequest"]["properties"]["model"] = json!({"enum": embed.into_iter().collect::<Vec<_>>()});
    schemas["ResponsesRequest"]["properties"]["model"] = json!({"anyOf": [{"enum": [chat]}, {"type": "string", "pattern": "^agent:[A-Za-z0-9_-]{1,64}$",
            "description": "`agent:NAME` runs the stored agent NAME."}]});
    doc
}

/// What does not depend on the served models (built once).
fn base() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

fn build() -> Value {
    let mut settings = SchemaSettings::draft2019_09();
    settings.definitions_path = "#/components/schemas/".into();
    settings.meta_schema = None;
    let mut gen = settings.into_generator();
    let mut paths = Map::new();
    for o in OPS {
        let item = paths.entry(o.path).or_insert_with(|| json!({}));
        item[o.method] = operation(o, &mut gen);
    }
    let mut schemas: Map<String, Value> =
        gen.take_definitions().into_iter().map(|(k, v)| (k, serde_json::to_value(v).expect("schema"))).collect();
    schemas.insert("Error".into(), error_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kiln",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "kiln's HTTP API: OpenAI's Chat Completions, Completions, Embeddings and Responses, \
                plus agents, runs, memory, tokenization, health and metrics. Every error is OpenAI's error body.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "An API key or a JWT; the names in each operation's requirement are the scope it needs."}},
        },
    })
}

fn operation(o: &Op, gen: &mut SchemaGenerator) -> Value {
    let method = Method::from_bytes(o.method.to_uppercase().as_bytes()).expect("a known method");
    let mut params: Vec<Value> = path_params(o.path);
    if let Some(q) = o.query {
        params.extend(query_params(q(gen)));
    }
    let mut v = json!({
        "operationId": o.id,
        "summary": o.summary,
        "tags": [o.tag],
        "security": security(rule_for(&method, &concrete(o.path)).need),
        "responses": responses(o.answer),
    });
    if !params.is_empty() {
        v["parameters"] = Value::Array(params);
    }
    if let Some(b) = o.body {
        let schema = serde_json::to_value(b(gen)).expect("schema");
        let ct = if o.form { "multipart/form-data" } else { "application/json" };
        v["requestBody"] = json!({"required": true, "content": {ct: {"schema": schema}}});
    }
    v
}

/// The path with each `{param}` filled, for the scope table (whose templates match any segment).
fn concrete(template: &str) -> String {
    template.split('/').map(|s| if s.starts_with('{') { "x" } else { s }).collect::<Vec<_>>().join("/")
}

fn security(need: Need) -> Value {
    match need {
        Need::Public => json!([]),
        Need::Credential => json!([{"bearer": []}]),
        Need::Scope(s) => json!([{"bearer": [s.as_str()]}]),
    }
}

fn path_params(template: &str) -> Vec<Value> {
    template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            let schema = match name {
                "scope" => json!({"type": "string", "pattern": "^((agent|user|run):[A-Za-z0-9._@-]{1,128}|global)$",
                    "description": "agent:{name}, user:{id}, run:{id} or global"}),
                _ => json!({"type": "string"}),
            };
            json!({"name": name, "in": "path", "required": true, "schema": schema})
        })
        .collect()
}

/// A derived query struct's fields as optional query parameters (`null` is no value in a URL).
fn query_params(s: Schema) -> Vec<Value> {
    let v = serde_json::to_value(s).expect("schema");
    let props = v["properties"].as_object().cloned().unwrap_or_default();
    props
        .into_iter()
        .map(|(name, mut schema)| {
            if let Some(types) = schema["type"].as_array() {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                schema["type"] = if kept.len() == 1 { kept[0].clone() } else { Value::Array(kept) };
            }
            json!({"name": name, "in": "query", "required": false, "schema": schema})
        })
        .collect()
}

fn responses(answer: Answer) -> Value {
    let object = json!({"schema": {"type": "object"}});
    let ok = match answer {
        Answer::Json => json!({"description": "OK", "content": {"application/json": object}}),
        Answer::JsonOrStream => json!({"description": "OK (server-sent events with \"stream\": true)", "content": {
            "application/json": object, "text/event-stream": {"schema": {"type": "string"}}}}),
        Answer::Text => json!({"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}),
        Answer::WebSocket => json!({"description": "OK"}),
        Answer::Bytes => json!({"description": "OK", "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}),
    };
    let err = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut r = json!({"200": ok, "4XX": err("A client error (OpenAI's error body)"),
        "5XX": err("A server error (OpenAI's error body)")});
    if matches!(answer, Answer::WebSocket) {
        r["101"] = json!({"description": "Switching Protocols: run events as JSON text frames"});
    }
    r
}

/// OpenAI's error body.
fn error_schema() -> Value {
    json!({"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}})
}

#[cfg(test)]
mod tests {
    use super::super::scopes::ROUTES;
    use super::*;

    /// Every path of the scope table is documented and every documented path is in the table;
    /// the fuzz suite checks the router answers each one.
    #[test]
    fn documents_every_route_of_the_scope_table() {
        let doc = document("m", None);
        let paths = doc["paths"].as_object().unwrap();
        let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
        let mut table: Vec<&str> = ROUTES.iter().map(|r| r.template).collect();
        table.dedup();
        documented.sort_unstable();
        table.sort_unstable();
        table.dedup();
        assert_eq!(documented, table);
        let ops: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(ops, OPS.len(), "one row per method and path");
    }

    #[test]
    fn bodies_come_from_the_request_types() {
        let doc = document("m", Some("e"));
        let schemas = &doc["components"]["schemas"];
        for name in ["ChatRequest", "Sampling", "CompletionRequest", "EmbeddingRequest", "AgentSpec", "Error"] {
            assert!(schemas[name].is_object(), "{name} missing");
        }
        assert_eq!(schemas["AgentSpec"]["additionalProperties"], json!(false));
        assert_eq!(schemas["ChatRequest"]["properties"]["model"], json!({"enum": ["m"]}));
        assert_eq!(schemas["EmbeddingRequest"]["properties"]["model"], json!({"enum": ["e"]}));
        assert!(schemas["ChatRequest"]["required"].as_array().unwrap().contains(&json!("messages")));
        let chat = &doc["paths"]["/v1/chat/completions"]["post"];
        assert_eq!(chat["security"], json!([{"bearer": ["inference"]}]));
        assert_eq!(doc["paths"]["/health"]["get"]["security"], json!([]));
        let q = &doc["paths"]["/v1/memory/{scope}"]["get"]["parameters"];
        assert_eq!(q.as_array().unwrap().len(), 3, "{q}");
    }
}
