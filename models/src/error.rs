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
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("I/O error reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
