//! kiln-inference: the engine. One owner thread runs scheduler -> runner -> sampler each step;
//! callers talk to it only through [`EngineHandle`]-style handles and token streams.

pub mod block_manager;
pub mod detok;
pub mod error;
pub mod params;
pub mod sampler;
pub mod scheduler;
pub mod stop;
pub mod tokenizer;

pub use error::EngineError;
pub use params::SamplingParams;
