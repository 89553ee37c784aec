//! RMS normalization (llama family): `x / sqrt(mean(x^2) + eps) * w`, per row.
//!
//! On the CPU it runs `kiln_kernels::ggml_ops::rms_norm`, ggml's exact rounding sequence (f64
//! sum of squares, f32 scale, then the weight), because greedy decoding of a quantized model
//! flips on 1-ulp differences and the bar is llama.cpp's tokens. Other devices use candle's op.

use crate::error::Result;
use candle_core::{Device, Tensor};

pub struct RmsNorm {
    /// `[hidden]` f32
    weight: Tensor,
    /// The same weight on the host, for the CPU kernel.
    host_weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let host_weight = weight.flatten_all().and_then(|w| w.to_vec1::<f32>()).unwrap_or_default();
        Self { weight, host_weight, eps: eps as f32 }
    }

    /// `x`: `[rows, hidden]` -> `[rows, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, hidden) = x.dims2()?;
        if !matches!(x.device(), Device::Cpu) || self.host_weight.len() != hidden {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?);
        }
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; rows * hidden];
        kiln_kernels::ggml_ops::rms_norm(&xs, &self.host_weight, self.eps, &mut out);
        Ok(Tensor::from_vec(out, (rows, hidden), &Device::Cpu)?)
    }
}
