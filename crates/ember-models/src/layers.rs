//! Building blocks shared by architectures. The arithmetic lives in `ember_kernels`, fused on
//! burn-flex and built from plain burn ops on other backends.

use std::sync::Arc;

use burn::tensor::Tensor;

use crate::RopeMode;

/// `x * w / sqrt(mean(x^2) + eps)` over the last dimension of `x: [n, d]`.
pub fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f32) -> Tensor<2> {
    ember_kernels::rms_norm(x, weight, eps)
}

/// Rotates the first `rope_dim` dimensions of every head of `x: [n, heads, head_dim]`, whose
/// row `i` sits at position `positions[i]` (a ragged batch mixes sequences).
///
/// Angles are computed in f32 with the same recurrence as ggml (`theta *= theta_scale` per
/// pair) so our rounding follows llama.cpp's rather than an exact f64 value.
pub fn rope(
    x: Tensor<3>,
    positions: &Arc<[u32]>,
    rope_dim: usize,
    base: f32,
    mode: RopeMode,
) -> Tensor<3> {
    ember_kernels::rope(
        x,
        Arc::clone(positions),
        rope_dim,
        base,
        mode == RopeMode::Neox,
    )
}
