//! Building blocks shared by architectures. The arithmetic lives in `ember_kernels`, fused on
//! burn-flex and built from plain burn ops on other backends.

use std::sync::Arc;

use burn::tensor::Tensor;
use ember_kernels::QuantMatrix;

use crate::model::Pass;

use crate::{ModelError, RopeMode, Weights};

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

/// A linear layer `x @ w^T + b`, the bias optional.
pub struct Linear {
    pub w: Arc<QuantMatrix>,
    pub b: Option<Tensor<1>>,
}

impl Linear {
    /// `x: [n, w.cols()]` to `[n, w.rows()]`, with the arithmetic `pass` keeps for its rows.
    pub fn forward(&self, x: Tensor<2>, pass: &Pass<'_>) -> Tensor<2> {
        let y = pass.matmul(x, &self.w);
        match &self.b {
            // A `[1, rows]` bias broadcast over the rows, as ggml_add does.
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

/// Q, K and V projections loaded as llama.cpp's `create_tensor_qkv` does: one fused
/// `attn_qkv` (Q rows, then K, then V) if the file has it, else `attn_q`/`attn_k`/`attn_v`;
/// biases optional either way (`attn_qkv.bias`, or separate ones next to a fused weight).
pub struct QkvProj {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
}

impl QkvProj {
    /// Layer `layer`'s projections from `n_embd` to `n_q`, `n_k` and `n_v` outputs.
    pub fn load(
        w: &Weights<'_>,
        layer: usize,
        n_embd: usize,
        [n_q, n_k, n_v]: [usize; 3],
    ) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{layer}.{t}");
        let bias = |t: &str, len: usize| w.optional_vector(&name(&format!("{t}.bias")), len);
        let fused = name("attn_qkv.weight");
        if !w.has(&fused) {
            let part = |t: &str, rows: usize| -> Result<Linear, ModelError> {
                Ok(Linear {
                    w: w.matrix(&name(&format!("{t}.weight")), rows, n_embd)?,
                    b: bias(t, rows)?,
                })
            };
            return Ok(Self {
                q: part("attn_q", n_q)?,
                k: part("attn_k", n_k)?,
                v: part("attn_v", n_v)?,
            });
        }
        let total = n_q + n_k + n_v;
        let parts = [0..n_q, n_q..n_q + n_k, n_q + n_k..total];
        let biases: [Option<Tensor<1>>; 3] = match bias("attn_qkv", total)? {
            Some(all) => parts.clone().map(|p| Some(all.clone().slice([p]))),
            None => {
                // llama.cpp adds separate biases to a fused weight only when all three exist.
                let (bq, bk, bv) = (
                    bias("attn_q", n_q)?,
                    bias("attn_k", n_k)?,
                    bias("attn_v", n_v)?,
                );
                if bq.is_some() && bk.is_some() && bv.is_some() {
                    [bq, bk, bv]
                } else {
                    [None, None, None]
                }
            }
        };
        let [bq, bk, bv] = biases;
        let [pq, pk, pv] = parts;
        Ok(Self {
            q: Linear {
                w: w.matrix_rows(&fused, total, n_embd, pq)?,
                b: bq,
            },
            k: Linear {
                w: w.matrix_rows(&fused, total, n_embd, pk)?,
                b: bk,
            },
            v: Linear {
                w: w.matrix_rows(&fused, total, n_embd, pv)?,
                b: bv,
            },
        })
    }

    /// `(q, k, v)` for `h: [n, n_embd]`, each `[n, outputs]`.
    pub fn forward(&self, h: Tensor<2>, pass: &Pass<'_>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        (
            self.q.forward(h.clone(), pass),
            self.k.forward(h.clone(), pass),
            self.v.forward(h, pass),
        )
    }
}

/// RMS norm of every head's vector of `x: [n, heads * head_dim]` with the shared `weight:
/// [head_dim]` (QK-norm), giving `[n, heads, head_dim]`.
pub fn head_rms_norm(x: Tensor<2>, heads: usize, weight: &Tensor<1>, eps: f32) -> Tensor<3> {
    let [n, _] = x.dims();
    let hd = weight.dims()[0];
    rms_norm(x.reshape([n * heads, hd]), weight, eps).reshape([n, heads, hd])
}
