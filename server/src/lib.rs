//! kiln-server: everything behind the `kiln` binary. The HTTP API (`api`), its metrics, the
//! config file, and the subcommands; `main.rs` only parses the command line and dispatches.
//! The only crate that knows HTTP and OpenAI JSON.

pub mod agents;
pub mod api;
pub mod bench;
pub mod bench_agent;
pub mod config;
pub mod engine_args;
pub mod generate;
pub mod http;
pub mod metrics;
pub mod serve;
