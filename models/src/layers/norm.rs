//! RMS normalization (llama family): `x / sqrt(mean(x^2) + eps) * w`, per row.

use crate::error::Result;
use candle_core::Tensor;

pub struct RmsNorm {
    /// `[hidden]` f32
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps: eps as f32 }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}
