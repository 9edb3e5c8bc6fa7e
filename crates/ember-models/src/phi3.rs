//! Phi-3 (`phi3`): the llama block with a fused QKV projection (`attn_qkv`: Q rows, then K,
//! then V) and a fused gate-and-up projection (`ffn_up`: gate rows first, as `ggml_swiglu`
//! activates the first half; separate `attn_q/k/v` and `ffn_gate`/`ffn_up` are taken too, as a
//! checkpoint directory supplies them), NEOX RoPE over `rope.dimension_count` dims of each head, and Q
//! scaled before attention. Follows llama.cpp's `phi3` graph (`src/models/phi3.cpp`): it
//! disables Phi's sliding window (`phi3.attention.sliding_window` is read and dropped, see
//! llama.cpp PR 13676), and so do we.

use std::sync::Arc;

use burn::tensor::Tensor;
use ember_kernels::{QuantMatrix, residual_add, swiglu};

use crate::layers::{QkvProj, rms_norm, rope};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

struct Block {
    attn_norm: Tensor<1>,
    qkv: QkvProj,
    wo: Arc<QuantMatrix>,
    ffn_norm: Tensor<1>,
    /// Rows `0..n_ff` and `n_ff..2 n_ff` of the fused `ffn_up`.
    w_gate: Arc<QuantMatrix>,
    w_up: Arc<QuantMatrix>,
    w_down: Arc<QuantMatrix>,
}

/// Phi-3 (`phi3`): the llama block with a fused QKV projection, a fused gate-and-up
/// projection, and NEOX RoPE over `rope.dimension_count` dims of each head; Phi's sliding
/// window is disabled, as llama.cpp does.
pub struct Phi3 {
    config: ModelConfig,
    blocks: Vec<Block>,
}

impl Phi3 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let c = config;
        // LongRoPE (Phi-3 128k, Phi-3.5): per-dimension frequency factors and an attention
        // factor, which our rope kernel does not take yet.
        for t in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            if w.has(t) {
                return Err(ModelError::Unsupported(format!("phi3 LongRoPE ({t})")));
            }
        }
        let (d, hd) = (c.n_embd, c.head_dim);
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let up = name("ffn_up");
            // GGUF fuses gate and up (`ffn_up`, 2 n_ff rows); a checkpoint directory run
            // without converting supplies them split (ember-convert's checkpoint image).
            let (w_gate, w_up) = if w.has(&name("ffn_gate")) {
                (
                    w.matrix(&name("ffn_gate"), c.n_ff, d)?,
                    w.matrix(&up, c.n_ff, d)?,
                )
            } else {
                (
                    w.matrix_rows(&up, 2 * c.n_ff, d, 0..c.n_ff)?,
                    w.matrix_rows(&up, 2 * c.n_ff, d, c.n_ff..2 * c.n_ff)?,
                )
            };
            blocks.push(Block {
                attn_norm: w.vector(&name("attn_norm"), d)?,
                qkv: QkvProj::load(w, i, d, [c.n_head * hd, c.n_head_kv * hd, c.n_head_kv * hd])?,
                wo: w.matrix(&name("attn_output"), d, c.n_head * hd)?,
                ffn_norm: w.vector(&name("ffn_norm"), d)?,
                w_gate,
                w_up,
                w_down: w.matrix(&name("ffn_down"), d, c.n_ff)?,
            });
        }
        Ok(Self {
            config: config.clone(),
            blocks,
        })
    }
}

impl Architecture for Phi3 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        // llama.cpp: "Phi SWA is currently disabled"; every layer attends to all positions.
        vec![None; self.config.n_layer]
    }

    fn blocks(&self, mut x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let n = pass.n_rows;
        let q_scale = 1.0 / (c.head_dim as f32).sqrt();
        // The first `pass.layers()` blocks (all but for a self-speculative draft), indexed by
        // their true layer so per-layer windows, RoPE and cache layers stay theirs.
        let last = pass.layers().min(self.blocks.len());
        for (layer, b) in self.blocks.iter().enumerate().take(last) {
            x = pass.enter(layer, x);
            let h = rms_norm(x.clone(), &b.attn_norm, c.rms_eps);
            let (q, k, v) = b.qkv.forward(h, pass);
            let q = q.reshape([n, c.n_head, c.head_dim]);
            let k = k.reshape([n, c.n_head_kv, c.head_dim]);
            let v = v.reshape([n, c.n_head_kv, c.head_dim]);
            let rope = |x| rope(x, &pass.positions, c.rope_dim, c.rope_base, c.rope_mode);
            // llama.cpp scales Q itself and attends with a scale of 1 (the f16 rounding of Q
            // then sees the scaled values).
            let q = rope(q).mul_scalar(q_scale);
            let k = rope(k);
            let attn = pass.attend(layer, q, k, v, 1.0)?;
            let mut o = pass.matmul(attn, &b.wo);
            if layer + 1 == last {
                (o, x) = pass.select_outputs(o, x);
            }
            x = residual_add(x, o);

            let h = rms_norm(x.clone(), &b.ffn_norm, c.rms_eps);
            let gate = pass.matmul(h.clone(), &b.w_gate);
            let up = pass.matmul(h, &b.w_up);
            x = residual_add(x, pass.matmul(swiglu(gate, up), &b.w_down));
        }
        Ok(x)
    }
}
