//! kiln-models: model architectures as pure functions of (weights, flattened batch, paged KV
//! cache) -> logits. Knows weights and math; knows nothing of requests, scheduling or HTTP.

pub mod error;

pub use error::{ModelError, Result};
