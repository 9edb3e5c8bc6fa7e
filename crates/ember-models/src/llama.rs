//! The llama architecture (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks of GQA attention
//! with RoPE and a SwiGLU feed-forward, RMSNorm, optionally tied embeddings.

use std::sync::Arc;

use burn::tensor::Tensor;
use ember_kernels::{QuantMatrix, residual_add, swiglu};

use crate::layers::{rms_norm, rope};
use crate::model::{Architecture, Pass};
use crate::trace;
use crate::{ModelConfig, ModelError, Weights};

struct Block {
    attn_norm: Tensor<1>,
    wq: Arc<QuantMatrix>,
    wk: Arc<QuantMatrix>,
    wv: Arc<QuantMatrix>,
    wo: Arc<QuantMatrix>,
    ffn_norm: Tensor<1>,
    w_gate: Arc<QuantMatrix>,
    w_up: Arc<QuantMatrix>,
    w_down: Arc<QuantMatrix>,
}

/// The `llama` architecture (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks of GQA
/// attention with RoPE ([`RopeMode::Normal`](crate::RopeMode::Normal)) and a SwiGLU
/// feed-forward, RMS norms. [`load`](crate::load) picks it for `general.architecture = llama`.
pub struct Llama {
    config: ModelConfig,
    blocks: Vec<Block>,
}

impl Llama {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let c = config;
        let (d, hd) = (c.n_embd, c.head_dim);
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            blocks.push(Block {
                attn_norm: w.vector(&name("attn_norm"), d)?,
                wq: w.matrix(&name("attn_q"), c.n_head * hd, d)?,
                wk: w.matrix(&name("attn_k"), c.n_head_kv * hd, d)?,
                wv: w.matrix(&name("attn_v"), c.n_head_kv * hd, d)?,
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

impl Architecture for Llama {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        // llama.cpp ignores `sliding_window` for this architecture; so do we, to agree with it.
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
            let l = Some(layer);
            let h = rms_norm(x.clone(), &b.attn_norm, c.rms_eps);
            trace::tensor("attn_norm", l, &h);
            let q = pass
                .matmul(h.clone(), &b.wq)
                .reshape([n, c.n_head, c.head_dim]);
            let k = pass
                .matmul(h.clone(), &b.wk)
                .reshape([n, c.n_head_kv, c.head_dim]);
            let v = pass.matmul(h, &b.wv).reshape([n, c.n_head_kv, c.head_dim]);
            trace::tensor("Vcur", l, &v);
            trace::tensor("Qpre", l, &q);
            let rope = |x| rope(x, &pass.positions, c.rope_dim, c.rope_base, c.rope_mode);
            let (q, k) = (rope(q), rope(k));
            trace::tensor("Qcur", l, &q);
            trace::tensor("Kcur", l, &k);
            let attn = pass.attend(layer, q, k, v, scale)?;
            trace::tensor("kqv_out", l, &attn);
            let mut attn_out = pass.matmul(attn, &b.wo);
            trace::tensor("attn_out", l, &attn_out);
            if layer + 1 == last {
                (attn_out, x) = pass.select_outputs(attn_out, x);
            }
            x = residual_add(x, attn_out);
            trace::tensor("ffn_inp", l, &x);

            let h = rms_norm(x.clone(), &b.ffn_norm, c.rms_eps);
            trace::tensor("ffn_norm", l, &h);
            let gate = pass.matmul(h.clone(), &b.w_gate);
            let up = pass.matmul(h, &b.w_up);
            trace::tensor("ffn_gate", l, &gate);
            trace::tensor("ffn_up", l, &up);
            let act = swiglu(gate, up);
            trace::tensor("ffn_swiglu", l, &act);
            let ffn_out = pass.matmul(act, &b.w_down);
            trace::tensor("ffn_out", l, &ffn_out);
            x = residual_add(x, ffn_out);
            trace::tensor("l_out", l, &x);
        }
        Ok(x)
    }
}
