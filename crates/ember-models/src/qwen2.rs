//! Qwen 2 / 2.5 (`qwen2`): the llama block with biases on the Q, K and V projections and NEOX
//! RoPE; the output head is tied to the embedding unless the file has `output.weight`.
//! Follows llama.cpp's `qwen2` graph (`src/models/qwen2.cpp`).

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
    w_gate: Arc<QuantMatrix>,
    w_up: Arc<QuantMatrix>,
    w_down: Arc<QuantMatrix>,
}

/// Qwen 2 / 2.5 (`qwen2`): the llama block with biases on the Q, K and V projections and NEOX
/// RoPE.
pub struct Qwen2 {
    config: ModelConfig,
    blocks: Vec<Block>,
}

impl Qwen2 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let c = config;
        // llama.cpp loads and adds an `output.bias`; our shared head has none.
        if w.has("output.bias") {
            return Err(ModelError::Unsupported("qwen2 output.bias".into()));
        }
        let (d, hd) = (c.n_embd, c.head_dim);
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            blocks.push(Block {
                attn_norm: w.vector(&name("attn_norm"), d)?,
                qkv: QkvProj::load(w, i, d, [c.n_head * hd, c.n_head_kv * hd, c.n_head_kv * hd])?,
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

impl Architecture for Qwen2 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        // llama.cpp's qwen2 has no sliding window (it never reads `sliding_window`).
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
            let q = q.reshape([n, c.n_head, c.head_dim]);
            let k = k.reshape([n, c.n_head_kv, c.head_dim]);
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
