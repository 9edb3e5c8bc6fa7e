//! Gemma 3 (`gemma3`): GQA attention with RMS-normed Q and K (QK-norm), NEOX RoPE with a
//! different base on sliding-window layers, norms after attention and after the feed-forward
//! as well as before, a GELU-gated feed-forward, embeddings scaled by `sqrt(n_embd)`, and
//! sliding-window layers (window `gemma3.attention.sliding_window`) interleaved with global
//! ones: with the default pattern of 6, layer `i` is global iff `i % 6 == 5`. Follows
//! llama.cpp's `gemma3` graph (norm weights in GGUF already include Gemma's `+1`).

use std::sync::Arc;

use burn::tensor::Tensor;
use ember_kernels::{QuantMatrix, geglu, residual_add};

use crate::layers::{rms_norm, rope};
use crate::model::{Architecture, Pass};
use crate::trace;
use crate::{ModelConfig, ModelError, Weights};

struct Block {
    attn_norm: Tensor<1>,
    wq: Arc<QuantMatrix>,
    wk: Arc<QuantMatrix>,
    wv: Arc<QuantMatrix>,
    q_norm: Tensor<1>,
    k_norm: Tensor<1>,
    wo: Arc<QuantMatrix>,
    attn_post_norm: Tensor<1>,
    ffn_norm: Tensor<1>,
    w_gate: Arc<QuantMatrix>,
    w_up: Arc<QuantMatrix>,
    w_down: Arc<QuantMatrix>,
    ffn_post_norm: Tensor<1>,
    /// `Some(window)` on sliding-window layers.
    window: Option<usize>,
    rope_base: f32,
}

/// Gemma 3 (`gemma3`): RMS-normed Q and K (QK-norm), NEOX RoPE with its own base on
/// sliding-window layers, norms after attention and feed-forward as well as before, a
/// GELU-gated feed-forward, embeddings scaled by `sqrt(n_embd)`, and window layers interleaved
/// with global ones ([`SlidingWindow`](crate::SlidingWindow)).
pub struct Gemma3 {
    config: ModelConfig,
    blocks: Vec<Block>,
    /// Q is multiplied by this before attention (which then uses a scale of 1, as llama.cpp).
    attn_scale: f32,
}

impl Gemma3 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let c = config;
        let (d, hd) = (c.n_embd, c.head_dim);
        // Read and checked with the rest of the metadata (`ModelConfig::from_gguf`).
        let swa = c.sliding_window;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            // llama.cpp's `set_swa_pattern(n_pattern)`: a pattern of 0 makes every layer SWA.
            let swa = swa.filter(|s| s.pattern == 0 || i % s.pattern < s.pattern - 1);
            blocks.push(Block {
                attn_norm: w.vector(&name("attn_norm"), d)?,
                wq: w.matrix(&name("attn_q"), c.n_head * hd, d)?,
                wk: w.matrix(&name("attn_k"), c.n_head_kv * hd, d)?,
                wv: w.matrix(&name("attn_v"), c.n_head_kv * hd, d)?,
                q_norm: w.vector(&name("attn_q_norm"), hd)?,
                k_norm: w.vector(&name("attn_k_norm"), hd)?,
                wo: w.matrix(&name("attn_output"), d, c.n_head * hd)?,
                attn_post_norm: w.vector(&name("post_attention_norm"), d)?,
                ffn_norm: w.vector(&name("ffn_norm"), d)?,
                w_gate: w.matrix(&name("ffn_gate"), c.n_ff, d)?,
                w_up: w.matrix(&name("ffn_up"), c.n_ff, d)?,
                w_down: w.matrix(&name("ffn_down"), d, c.n_ff)?,
                ffn_post_norm: w.vector(&name("post_ffw_norm"), d)?,
                window: swa.map(|s| s.window),
                rope_base: swa.map_or(c.rope_base, |s| s.rope_base),
            });
        }
        // gemma_pytorch: the 27B model scales by the query_pre_attn_scalar n_embd / n_head.
        let attn_scale = if c.n_layer == 62 {
            1.0 / ((c.n_embd / c.n_head) as f32).sqrt()
        } else {
            1.0 / (hd as f32).sqrt()
        };
        Ok(Self {
            config: config.clone(),
            blocks,
            attn_scale,
        })
    }
}

impl Architecture for Gemma3 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.blocks.iter().map(|b| b.window).collect()
    }

    fn embedding_scale(&self) -> Option<f32> {
        Some((self.config.n_embd as f32).sqrt())
    }

    fn blocks(&self, mut x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let n = pass.n_rows;
        let hd = c.head_dim;
        // RMS norm of every head's vector: `[n, heads * hd]` viewed as `[n * heads, hd]`.
        let head_norm = |t: Tensor<2>, heads: usize, w: &Tensor<1>| {
            rms_norm(t.reshape([n * heads, hd]), w, c.rms_eps).reshape([n, heads, hd])
        };
        // The first `pass.layers()` blocks (all but for a self-speculative draft), indexed by
        // their true layer so per-layer windows, RoPE and cache layers stay theirs.
        let last = pass.layers().min(self.blocks.len());
        for (layer, b) in self.blocks.iter().enumerate().take(last) {
            x = pass.enter(layer, x);
            let l = Some(layer);
            let h = rms_norm(x.clone(), &b.attn_norm, c.rms_eps);
            trace::tensor("attn_norm", l, &h);
            let q = head_norm(pass.matmul(h.clone(), &b.wq), c.n_head, &b.q_norm);
            let k = head_norm(pass.matmul(h.clone(), &b.wk), c.n_head_kv, &b.k_norm);
            let v = pass.matmul(h, &b.wv).reshape([n, c.n_head_kv, hd]);
            trace::tensor("Qcur_normed", l, &q);
            trace::tensor("Kcur_normed", l, &k);
            trace::tensor("Vcur", l, &v);
            let rope = |x| rope(x, &pass.positions, c.rope_dim, b.rope_base, c.rope_mode);
            let q = rope(q);
            let k = rope(k);
            trace::tensor("Qcur", l, &q);
            trace::tensor("Kcur", l, &k);
            let q = q.mul_scalar(self.attn_scale);
            let attn = pass.attend(layer, q, k, v, 1.0)?;
            trace::tensor("kqv_out", l, &attn);
            let mut attn = pass.matmul(attn, &b.wo);
            trace::tensor("attn_wo", l, &attn);
            if layer + 1 == last {
                (attn, x) = pass.select_outputs(attn, x);
            }
            let attn = rms_norm(attn, &b.attn_post_norm, c.rms_eps);
            trace::tensor("attn_post_norm", l, &attn);
            x = residual_add(attn, x);
            trace::tensor("sa_out", l, &x);

            let h = rms_norm(x.clone(), &b.ffn_norm, c.rms_eps);
            trace::tensor("ffn_norm", l, &h);
            let gate = pass.matmul(h.clone(), &b.w_gate);
            let up = pass.matmul(h, &b.w_up);
            trace::tensor("ffn_gate", l, &gate);
            trace::tensor("ffn_up", l, &up);
            let act = geglu(gate, up);
            trace::tensor("ffn_geglu", l, &act);
            let ffn = pass.matmul(act, &b.w_down);
            trace::tensor("ffn_out", l, &ffn);
            let ffn = rms_norm(ffn, &b.ffn_post_norm, c.rms_eps);
            trace::tensor("ffn_post_norm", l, &ffn);
            x = residual_add(ffn, x);
            trace::tensor("l_out", l, &x);
        }
        Ok(x)
    }
}
