//! kiln-kernels: the hot loops of kiln, on raw slices. Every fast kernel has a plain reference
//! implementation with the same signature in the same module, and tests compare the two on random
//! inputs for many shapes. Kernels know nothing of models, requests or tensors libraries.

pub mod activation;
pub mod attention;
mod attention_f16;
pub mod dense;
pub mod encoder_attention;
pub mod ggml_ops;
pub mod quant;
pub mod rope;
mod sink;
#[cfg(test)]
pub(crate) mod testutil;

pub use attention::{paged_attention, paged_attention_reference, write_kv, AttnShape, KvElem, TokenCtx};
pub use rope::{rope_inplace, rope_inplace_reference, HeadsSpan, RopeStyle, RopeTable};
