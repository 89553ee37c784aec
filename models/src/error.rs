//! Typed errors of model loading and forward passes.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model file or directory not found: {0}")]
    NotFound(String),
    #[error("unsupported model architecture '{0}' (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("unsupported tensor type {dtype} for tensor '{tensor}'")]
    UnsupportedDType { tensor: String, dtype: String },
    #[error("missing metadata key '{0}' in model file")]
    MissingMetadata(String),
    #[error("missing tensor '{0}' in model weights")]
    MissingTensor(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    /// A `ForwardBatch` whose indices do not fit the model or the cache; names the row and value.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("I/O error reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Candle(candle_core::Error),
}

/// Drops the backtrace candle attaches to its errors when `RUST_BACKTRACE` is set: its `Display`
/// prints the whole trace, and these messages reach users (the server's error bodies), not logs.
impl From<candle_core::Error> for ModelError {
    fn from(mut e: candle_core::Error) -> Self {
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Self::Candle(e)
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
