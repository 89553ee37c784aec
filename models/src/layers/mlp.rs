//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, gate and up fused into one matmul.
//!
//! On the CPU the gate activation runs `kiln_kernels::ggml_ops::swiglu` (ggml's polynomial
//! `expf` and rounding sequence, so tokens match llama.cpp's exactly); other devices use candle.

use crate::error::Result;
use crate::layers::Linear;
use candle_core::{Device, Tensor};

pub struct Mlp {
    /// `[2 * intermediate, hidden]`: gate rows then up rows.
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
}

impl Mlp {
    pub fn new(gate_up: Linear, down: Linear, intermediate: usize) -> Self {
        Self { gate_up, down, intermediate }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?; // [rows, 2 * intermediate]
        let h = if matches!(gu.device(), Device::Cpu) {
            let (rows, n) = (gu.dims2()?.0, self.intermediate);
            let v = gu.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let (mut gate, mut up) = (Vec::with_capacity(rows * n), Vec::with_capacity(rows * n));
            for row in v.chunks_exact(2 * n) {
                gate.extend_from_slice(&row[..n]);
                up.extend_from_slice(&row[n..]);
            }
            let mut h = vec![0f32; rows * n];
            kiln_kernels::ggml_ops::swiglu(&gate, &up, n, &mut h);
            Tensor::from_vec(h, (rows, n), &Device::Cpu)?
        } else {
            let gate = gu.narrow(1, 0, self.intermediate)?;
            let up = gu.narrow(1, self.intermediate, self.intermediate)?;
            (candle_nn::ops::silu(&gate)? * up)?
        };
        self.down.forward(&h)
    }
}
