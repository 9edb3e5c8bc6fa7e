//! Qwen 3 (`qwen3`): the llama block with an RMS norm over every Q and K head before RoPE
//! (QK-norm, as Gemma 3), NEOX RoPE, and a head size (`attention.key_length`) independent of
//! `n_embd / n_head`. Follows llama.cpp's `qwen3` graph (`src/models/qwen3.cpp`), including
//! its optional Q/K/V biases and fused `attn_qkv`.

use std::sync::Arc;

use burn::tensor::Tensor;
use ember_kernels::{QuantMatrix, residual_add, swiglu};

use crate::layers::{QkvProj, head_rms_norm, rms_norm, rope};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

struct Block {
    attn_norm: Tensor<1>,
    qkv: QkvProj,
    q_norm: Tensor<1>,
    k_norm: Tensor<1>,
    wo: Arc<QuantMatrix>,
    ffn_norm: Tensor<1>,
    w_gate: Arc<QuantMatrix>,
    w_up: Arc<QuantMatrix>,
    w_down: Arc<QuantMatrix>,
}

/// Qwen 3 (`qwen3`): the llama block with an RMS norm over every Q and K head before RoPE
/// (QK-norm), NEOX RoPE, and a head size (`attention.key_length`) independent of
/// `n_embd / n_head`.
pub struct Qwen3 {
    config: ModelConfig,
    blocks: Vec<Block>,
}

impl Qwen3 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let c = config;
        let (d, hd) = (c.n_embd, c.head_dim);
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            blocks.push(Block {
                attn_norm: w.vector(&name("attn_norm"), d)?,
                qkv: QkvProj::load(w, i, d, [c.n_head * hd, c.n_head_kv * hd, c.n_head_kv * hd])?,
                q_norm: w.vector(&name("attn_q_norm"), hd)?,
                k_norm: w.vector(&name("attn_k_norm"), hd)?,
                wo: w.matrix(&name("attn_output"), d, c.n_head * hd)?,
                ffn_norm: w.vector(&name("ffn_norm"), d)?,
                w_gate: w.matrix(&name("ffn_gate"), c.n_ff, d)?,
                w_up: w.matrix(&name("ffn_up"), c.n_ff, d)?,
                w_down: w.matrix(&name("ffn_down"), d, c.n_ff)?,
            });
        }
        Ok(Self {
            config: config.clone(),
            blocks,
        })
    }
}

impl Architecture for Qwen3 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        vec![None; self.config.n_layer]
    }

    fn blocks(&self, mut x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let n = pass.n_rows;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        // The first `pass.layers()` blocks (all but for a self-speculative draft), indexed by
        // their true layer so per-layer windows, RoPE and cache layers stay theirs.
        let last = pass.layers().min(self.blocks.len());
        for (layer, b) in self.blocks.iter().enumerate().take(last) {
            x = pass.enter(layer, x);
            let h = rms_norm(x.clone(), &b.attn_norm, c.rms_eps);
            let (q, k, v) = b.qkv.forward(h, pass);
            let q = head_rms_norm(q, c.n_head, &b.q_norm, c.rms_eps);
            let k = head_rms_norm(k, c.n_head_kv, &b.k_norm, c.rms_eps);
            let v = v.reshape([n, c.n_head_kv, c.head_dim]);
            let rope = |x| rope(x, &pass.positions, c.rope_dim, c.rope_base, c.rope_mode);
            let (q, k) = (rope(q), rope(k));
            let attn = pass.attend(layer, q, k, v, scale)?;
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
