//! Building blocks shared by architectures, on plain burn ops.

use burn::tensor::{Device, Tensor, TensorData};

use crate::RopeMode;

/// `x * w / sqrt(mean(x^2) + eps)` over the last dimension of `x: [n, d]`.
pub fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f32) -> Tensor<2> {
    let ms = x.clone().powi_scalar(2).mean_dim(1);
    let inv = ms.add_scalar(eps).sqrt().recip();
    x.mul(inv).mul(weight.clone().unsqueeze::<2>())
}

/// Cosines and sines for rotary embeddings at positions `start..start + n`, each `[n, rope_dim/2]`.
///
/// Computed in f32 with the same recurrence as ggml (`theta *= theta_scale` per pair) so our
/// rounding follows llama.cpp's rather than an exact f64 value.
pub struct RopeTable {
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
}

impl RopeTable {
    pub fn new(start: usize, n: usize, rope_dim: usize, base: f32, device: &Device) -> Self {
        let half = rope_dim / 2;
        let theta_scale = base.powf(-2.0 / rope_dim as f32);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            let mut theta = p as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [n, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, half]), device),
        }
    }
}

/// Rotates the first `rope_dim` dimensions of every head of `x: [n, heads, head_dim]`.
pub fn rope(x: Tensor<3>, table: &RopeTable, rope_dim: usize, mode: RopeMode) -> Tensor<3> {
    let [n, h, d] = x.dims();
    let half = rope_dim / 2;
    let (rot, pass) = if rope_dim < d {
        (
            x.clone().slice([0..n, 0..h, 0..rope_dim]),
            Some(x.slice([0..n, 0..h, rope_dim..d])),
        )
    } else {
        (x, None)
    };
    let rotated = match mode {
        RopeMode::Normal => {
            // Pairs are adjacent: view as [n, h, half, 2].
            let cos = table.cos.clone().reshape([n, 1, half, 1]);
            let sin = table.sin.clone().reshape([n, 1, half, 1]);
            let pairs = rot.reshape([n, h, half, 2]);
            let x0 = pairs.clone().slice([0..n, 0..h, 0..half, 0..1]);
            let x1 = pairs.slice([0..n, 0..h, 0..half, 1..2]);
            let r0 = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
            let r1 = x0.mul(sin).add(x1.mul(cos));
            Tensor::cat(vec![r0, r1], 3).reshape([n, h, rope_dim])
        }
        RopeMode::Neox => {
            let cos = table.cos.clone().reshape([n, 1, half]);
            let sin = table.sin.clone().reshape([n, 1, half]);
            let x0 = rot.clone().slice([0..n, 0..h, 0..half]);
            let x1 = rot.slice([0..n, 0..h, half..rope_dim]);
            let r0 = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
            let r1 = x1.mul(cos).add(x0.mul(sin));
            Tensor::cat(vec![r0, r1], 2)
        }
    };
    match pass {
        Some(pass) => Tensor::cat(vec![rotated, pass], 2),
        None => rotated,
    }
}
