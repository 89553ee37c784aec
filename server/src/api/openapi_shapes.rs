//! JSON Schemas for the request fields the handlers keep as raw JSON (`serde_json::Value`) because
//! their own code checks them field by field to name the exact path in a 400 (`messages[2].
//! content`, `tools[0].function.parameters`). The derived schemas of the request types point here
//! (`#[schemars(schema_with = ...)]`), so `/openapi.json` says what those fields accept and a
//! fuzzer driven by it reaches the code behind them (templates, tool grammars, schema compiling).
//!
//! Owns: these shapes, in the OpenAI API's terms. Must not: validate anything (the handlers do;
//! a shape here that disagrees with them is a documentation bug the fuzz suite finds).

use schemars::gen::SchemaGenerator;
use schemars::schema::Schema;
use serde_json::{json, Value};

fn schema(v: Value) -> Schema {
    serde_json::from_value(v).expect("a literal schema is valid")
}

/// `X` or JSON `null` (serde reads `null` as "not given" for every optional field).
fn nullable(v: Value) -> Value {
    json!({"anyOf": [v, {"type": "null"}]})
}

/// Message content: a string, or text parts.
fn content() -> Value {
    json!({"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
            "type": {"const": "text"}, "text": {"type": "string"}}}},
    ]})
}

fn tool_call() -> Value {
    json!({"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name", "arguments"], "properties": {
            "name": {"type": "string"},
            "arguments": {"type": "string", "description": "The call's arguments as a JSON text."}}},
    }})
}

/// One chat message of any role, as OpenAI's Chat Completions API takes it.
pub fn chat_message() -> Value {
    json!({"oneOf": [
        {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"enum": ["system", "developer"]}, "content": content(), "name": {"type": "string"}}},
        {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"const": "user"}, "content": content(), "name": {"type": "string"}}},
        {"type": "object", "required": ["role"], "properties": {
            "role": {"const": "assistant"},
            "content": nullable(content()),
            "tool_calls": {"type": "array", "items": tool_call()}}},
        {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
            "role": {"const": "tool"}, "content": content(), "tool_call_id": {"type": "string"}}},
    ]})
}

pub fn chat_messages(_: &mut SchemaGenerator) -> Schema {
    schema(json!({"type": "array", "minItems": 1, "items": chat_message()}))
}

pub fn optional_chat_messages(g: &mut SchemaGenerator) -> Schema {
    schema(nullable(serde_json::to_value(chat_messages(g)).expect("a schema serializes")))
}

/// A JSON Schema given by the client (tool parameters, `response_format`): any object.
fn client_schema() -> Value {
    json!({"type": "object", "description": "A JSON Schema (objects, arrays, enums, const, anyOf, $ref/$defs, bounds, patterns)."})
}

pub fn function_tool() -> Value {
    json!({"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "parameters": client_schema(),
            "strict": {"type": "boolean"}}},
    }})
}

pub fn chat_tools(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"type": "array", "items": function_tool()})))
}

pub fn tool_choice(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"anyOf": [
        {"enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
    ]})))
}

pub fn response_format(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "schema": client_schema(),
                "strict": {"type": "boolean"}}}}},
    ]})))
}

/// The Responses API's `input`: a string, or items (messages, `function_call`,
/// `function_call_output`, `mcp_approval_response`).
pub fn responses_input(_: &mut SchemaGenerator) -> Schema {
    let message = json!({"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"},
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object",
            "required": ["type", "text"], "properties": {
                "type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}}]}}});
    let call = json!({"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string"}}});
    let output = json!({"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string"}, "output": {"type": "string"}}});
    let approval = json!({"type": "object", "required": ["type", "approval_request_id", "approve"], "properties": {
        "type": {"const": "mcp_approval_response"}, "approval_request_id": {"type": "string"},
        "approve": {"type": "boolean"}, "reason": {"type": "string"}}});
    schema(nullable(json!({"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"anyOf": [message, call, output, approval]}},
    ]})))
}

/// The Responses API's `tools`: flat function tools, `mcp` tools naming a configured server, and
/// `file_search` over kiln's vector stores.
pub fn responses_tools(_: &mut SchemaGenerator) -> Schema {
    let function = json!({"type": "object", "required": ["type", "name"], "properties": {
        "type": {"const": "function"}, "name": {"type": "string"}, "description": {"type": "string"},
        "parameters": client_schema(), "strict": {"type": "boolean"}}});
    let mcp = json!({"type": "object", "required": ["type", "server_label"], "properties": {
        "type": {"const": "mcp"},
        "server_label": {"type": "string", "description": "A server of --mcp-config, or `kiln` for the builtins."},
        "allowed_tools": {"type": "array", "items": {"type": "string"}},
        "require_approval": {"anyOf": [{"enum": ["always", "never"]}, {"type": "object"}]}}});
    schema(nullable(json!({"type": "array", "items": {"anyOf": [function, mcp, file_search_tool()]}})))
}

/// The Responses API's `tool_choice`: a mode, or `{"type": "function", "name"}` (flat).
pub fn responses_tool_choice(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"anyOf": [
        {"enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "function"}, "name": {"type": "string"}}},
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "file_search"}}},
    ]})))
}

/// The Responses API's `text`: `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
pub fn responses_text(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"type": "object", "properties": {"format": {"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "name", "schema"], "properties": {
            "type": {"const": "json_schema"},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "schema": client_schema(), "strict": {"type": "boolean"}}},
    ]}}})))
}

/// Any JSON value (`metadata` values, agent `variables`, `reasoning`).
pub fn any_object(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"type": "object"})))
}

/// A vector store file's `chunking_strategy`.
pub fn chunking_strategy(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "auto"}}},
        {"type": "object", "required": ["type", "static"], "properties": {
            "type": {"const": "static"},
            "static": {"type": "object", "required": ["max_chunk_size_tokens", "chunk_overlap_tokens"], "properties": {
                "max_chunk_size_tokens": {"type": "integer", "minimum": 100, "maximum": 4096,
                    "description": "Capped to what the embedding model reads in one input (254 for all-MiniLM-L6-v2)."},
                "chunk_overlap_tokens": {"type": "integer", "minimum": 0,
                    "description": "At most half of max_chunk_size_tokens."}}}}},
    ]})))
}

/// A vector store's `expires_after` (echoed; kiln does not expire stores).
pub fn expires_after(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"type": "object", "required": ["anchor", "days"], "properties": {
        "anchor": {"const": "last_active_at"}, "days": {"type": "integer", "minimum": 1, "maximum": 365}}})))
}

/// A vector store file's `attributes`: up to 16 keys; strings, numbers or booleans.
pub fn attributes(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"type": "object", "maxProperties": 16, "additionalProperties": {
        "anyOf": [{"type": "string", "maxLength": 512}, {"type": "number"}, {"type": "boolean"}]}})))
}

/// A vector store search's `query`: a string or strings.
pub fn vs_query(_: &mut SchemaGenerator) -> Schema {
    schema(json!({"anyOf": [{"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": 10, "items": {"type": "string", "minLength": 1}}]}))
}

fn comparison_filter() -> Value {
    json!({"type": "object", "required": ["type", "key", "value"], "properties": {
        "type": {"enum": ["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]},
        "key": {"type": "string", "minLength": 1},
        "value": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"},
            {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}]}}]}}})
}

/// OpenAI's attribute `filters`: a comparison, or `and`/`or` of filters.
pub fn vs_filters(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(filters_value()))
}

fn filters_value() -> Value {
    json!({"anyOf": [comparison_filter(), {"type": "object", "required": ["type", "filters"], "properties": {
        "type": {"enum": ["and", "or"]}, "filters": {"type": "array", "minItems": 1, "items": comparison_filter()}}}]})
}

/// `ranking_options`: the ranker (kiln: hybrid search) and a score threshold.
pub fn ranking_options(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(ranking_value()))
}

fn ranking_value() -> Value {
    json!({"type": "object", "properties": {"ranker": {"enum": ["auto", "none", "default-2024-11-15"]},
        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1}}})
}

/// The Responses API's `file_search` tool.
fn file_search_tool() -> Value {
    json!({"type": "object", "required": ["type", "vector_store_ids"], "properties": {
        "type": {"const": "file_search"},
        "vector_store_ids": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "max_num_results": {"type": "integer", "minimum": 1, "maximum": 50},
        "filters": filters_value(),
        "ranking_options": ranking_value()}})
}

/// The Responses API's `include`: names of extras.
pub fn include_list(_: &mut SchemaGenerator) -> Schema {
    schema(nullable(json!({"type": "array", "items": {"type": "string"}})))
}
