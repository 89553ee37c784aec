//! kiln-inference: the engine. One owner thread runs scheduler -> runner -> sampler each step;
//! callers talk to it only through [`EngineHandle`] and the [`TokenStream`]s it returns.

mod admission;
pub mod block_hash;
pub mod block_manager;
pub mod chat;
mod core;
pub mod defaults;
pub mod detok;
pub mod embed;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod loader;
pub mod params;
pub mod runner;
pub mod sampler;
pub mod scheduler;
mod sequence;
pub mod session;
pub mod stop;
pub mod stream;
#[cfg(test)]
mod test_rng;
pub mod tokenizer;

pub use defaults::SamplingDefaults;
pub use engine::{EngineConfig, EngineHandle, Prompt};
pub use error::EngineError;
pub use grammar::{Constraint, Grammar, Trigger};
pub use params::{Priority, SamplingParams};
pub use session::{Session, SessionInput};
pub use stream::{Delta, FinishReason, TokenLogprob, TokenStream};
