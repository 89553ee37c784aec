//! kiln-agent: agents, the in-process tool loop, tools (builtin, HTTP, MCP) and durable runs.
//! It sits between `inference` and `server`: it reaches the engine only through its handles
//! (`EngineHandle`, sessions) and never adds agent fields to engine requests; it knows nothing of
//! HTTP or OpenAI JSON (the server maps both).

pub mod conversation;
pub mod cost;
pub mod events;
pub mod history;
pub mod memory;
mod run;
pub mod runtime;
pub mod spec;
pub mod store;
pub mod tools;
pub mod turn;
pub mod vector_stores;

pub use events::RunEvent;
pub use runtime::{AgentRuntime, RunError, RunInput, RuntimeConfig};
pub use spec::AgentSpec;
