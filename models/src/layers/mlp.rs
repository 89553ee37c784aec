//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, gate and up fused into one matmul.

use crate::error::Result;
use crate::layers::Linear;
use candle_core::Tensor;

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
        let gate = gu.narrow(1, 0, self.intermediate)?;
        let up = gu.narrow(1, self.intermediate, self.intermediate)?;
        let h = (candle_nn::ops::silu(&gate)? * up)?;
        self.down.forward(&h)
    }
}
