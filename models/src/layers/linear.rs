//! `y = x W^T (+ b)` over quantized GGUF blocks or float weights. Projections that read the same
//! input (Q/K/V, gate/up) are fused into one matrix at load time when their storage types
//! agree, so the activation is quantized and streamed once per step instead of three times.
//!
//! On CPU, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K weights run on kiln's own kernels
//! (`kiln_kernels::quant`: the arithmetic of ggml's x86 build, batch invariant, faster than
//! candle's `QMatMul`, which rounds like ggml's generic code); every other quant type and every
//! device goes through candle's `QMatMul`.

use crate::error::{ModelError, Result};
use crate::weights::Weight;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor, D};
use kiln_kernels::quant::{qmatmul_form, Form, QuantMatrix, QuantType};
use std::borrow::Cow;
use std::sync::Arc;

enum Part {
    /// A type kiln's kernels have, on CPU, repacked for them.
    Kiln(QuantMatrix),
    Quant(QMatMul),
    /// `[out, in]` f32.
    Float(Tensor),
}

impl Part {
    fn forward(&self, x: &Tensor, form: Form) -> Result<Tensor> {
        Ok(match self {
            Part::Kiln(w) => kiln_forward(w, x, form)?,
            Part::Quant(m) => m.forward(x)?,
            Part::Float(w) => x.matmul(&w.t()?)?,
        })
    }
}

pub struct Linear {
    /// Row blocks of the (possibly fused) weight; outputs are concatenated in order.
    parts: Vec<Part>,
    /// `[out]`
    bias: Option<Tensor>,
    /// Which of llama.cpp's code paths kiln's kernels follow (`Form::Invariant` unless asked).
    form: Form,
}

impl Linear {
    pub fn new(w: Weight, bias: Option<Tensor>) -> Result<Self> {
        Self::fused(vec![w], bias.map(|b| vec![b]))
    }

    /// Stacks the rows of `ws` into one matrix where storage allows it. `biases`, when given,
    /// has one entry per weight.
    pub fn fused(ws: Vec<Weight>, biases: Option<Vec<Tensor>>) -> Result<Self> {
        let bias = match biases {
            Some(bs) if bs.len() == ws.len() => Some(Tensor::cat(&bs, 0)?),
            Some(_) => return Err(ModelError::Invalid("fused linear: one bias per weight".into())),
            None => None,
        };
        let mut parts: Vec<Part> = Vec::new();
        let mut pending: Vec<Weight> = Vec::new();
        for w in ws {
            if let Some(prev) = pending.last() {
                if !same_storage(prev, &w) {
                    parts.push(stack(std::mem::take(&mut pending))?);
                }
            }
            pending.push(w);
        }
        if !pending.is_empty() {
            parts.push(stack(pending)?);
        }
        Ok(Self { parts, bias, form: Form::Invariant })
    }

    /// The same layer with its quantized matmuls in `form` (see `kiln_kernels::quant::Form`).
    pub fn with_form(self, form: Form) -> Self {
        Self { form, ..self }
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.parts.len() == 1 {
            self.parts[0].forward(x, self.form)?
        } else {
            let ys = self.parts.iter().map(|p| p.forward(x, self.form)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&ys, D::Minus1)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

fn same_storage(a: &Weight, b: &Weight) -> bool {
    match (a, b) {
        (Weight::Quant(x), Weight::Quant(y)) => x.dtype() == y.dtype() && x.shape().dims()[1] == y.shape().dims()[1],
        (Weight::Float(_), Weight::Float(_)) => true,
        _ => false,
    }
}

/// `x`: `[rows, in]` f32 on the CPU.
fn kiln_forward(w: &QuantMatrix, x: &Tensor, form: Form) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.cols() {
        return Err(ModelError::Invalid(format!("linear: input has {k} features, weight expects {}", w.cols())));
    }
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; m * w.rows()];
    qmatmul_form(w, &xs, m, &mut out, form);
    Ok(Tensor::from_vec(out, (m, w.rows()), &Device::Cpu)?)
}

/// Wraps a quantized tensor in the fastest matmul that supports it.
fn quant_part(q: Arc<QTensor>) -> Result<Part> {
    let qtype = match q.dtype() {
        GgmlDType::Q4_1 => Some(QuantType::Q4_1),
        GgmlDType::Q5_0 => Some(QuantType::Q5_0),
        GgmlDType::Q8_0 => Some(QuantType::Q8_0),
        GgmlDType::Q4K => Some(QuantType::Q4_K),
        GgmlDType::Q6K => Some(QuantType::Q6_K),
        _ => None,
    };
    match (qtype, q.device()) {
        (Some(t), Device::Cpu) => {
            let (n, k) = q.shape().dims2()?;
            let m =
                QuantMatrix::from_ggml_bytes(t, n, k, &q.data()?).map_err(|e| ModelError::Invalid(e.to_string()))?;
            Ok(Part::Kiln(m))
        }
        _ => Ok(Part::Quant(QMatMul::from_arc(q)?)),
    }
}

/// Concatenates same-storage weights along the output dimension. Quantized rows are whole
/// blocks, so stacking is a byte concatenation.
fn stack(ws: Vec<Weight>) -> Result<Part> {
    if ws.len() == 1 {
        return Ok(match ws.into_iter().next() {
            Some(Weight::Quant(q)) => quant_part(q)?,
            Some(Weight::Float(t)) => Part::Float(t),
            None => unreachable!("len checked"),
        });
    }
    match &ws[0] {
        Weight::Float(_) => {
            let ts: Vec<Tensor> = ws
                .into_iter()
                .map(|w| match w {
                    Weight::Float(t) => t,
                    Weight::Quant(_) => unreachable!("same_storage"),
                })
                .collect();
            Ok(Part::Float(Tensor::cat(&ts, 0)?))
        }
        Weight::Quant(first) => {
            let (dtype, k, device) = (first.dtype(), first.shape().dims()[1], first.device());
            let mut bytes = Vec::new();
            let mut rows = 0;
            for w in &ws {
                let Weight::Quant(q) = w else { unreachable!("same_storage") };
                bytes.extend_from_slice(&q.data()?);
                rows += q.shape().dims()[0];
            }
            let storage = QStorage::from_data(Cow::Owned(bytes), &device, dtype)?;
            let q = QTensor::new(storage, (rows, k))?;
            quant_part(Arc::new(q))
        }
    }
}
