//! Building blocks shared by every architecture. Quantized vs float weights and CPU vs CUDA
//! attention are decided here, inside the layers, so model files never fork on them.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;

pub use attention::Attention;
pub use embedding::Embedding;
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::RmsNorm;
