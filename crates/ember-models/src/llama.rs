//! The llama architecture (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks of GQA attention
//! with RoPE and a SwiGLU feed-forward, RMSNorm, optionally tied embeddings.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use ember_formats::GgufFile;
use ember_kernels::{
    QuantMatrix, causal_attention, quant_matmul, residual_add, round_to_f16, swiglu,
};
use ember_kv::ContiguousKvCache;

use crate::layers::{rms_norm, rope};
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

pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    token_embd: Arc<QuantMatrix>,
    blocks: Vec<Block>,
    output_norm: Tensor<1>,
    output: Arc<QuantMatrix>,
}

/// Which positions of a batch to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (teacher forcing, perplexity).
    All,
}

impl LlamaModel {
    pub fn load(file: &GgufFile, config: ModelConfig, device: &Device) -> Result<Self, ModelError> {
        let w = Weights::new(file, device);
        let c = &config;
        let (d, hd) = (c.n_embd, c.head_dim);
        let token_embd = w.matrix("token_embd.weight", c.n_vocab, d)?;
        let output = if w.has("output.weight") {
            w.matrix("output.weight", c.n_vocab, d)?
        } else {
            Arc::clone(&token_embd)
        };
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
            output_norm: w.vector("output_norm.weight", d)?,
            config,
            device: device.clone(),
            token_embd,
            blocks,
            output,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh KV cache for one sequence of at most `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> ContiguousKvCache {
        ContiguousKvCache::new(self.config.n_layer, n_ctx)
    }

    /// Runs `tokens` (which follow the `cache.len()` positions already cached) through the
    /// model, appends them to the cache and returns logits `[rows, n_vocab]`, where rows is 1
    /// for [`Logits::Last`] and `tokens.len()` for [`Logits::All`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut ContiguousKvCache,
        which: Logits,
    ) -> Result<Tensor<2>, ModelError> {
        // Run the whole pass on a rayon worker: the kernels' parallel loops then start from
        // inside the pool (work-stealing, no cross-thread hand-off per op) instead of each one
        // injecting a job and putting the calling thread to sleep. On 2 cores that hand-off
        // cost more than the small decode matmuls themselves.
        rayon::scope(|_| self.forward_in_pool(tokens, cache, which))
    }

    fn forward_in_pool(
        &self,
        tokens: &[u32],
        cache: &mut ContiguousKvCache,
        which: Logits,
    ) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::EmptyBatch);
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: c.n_vocab,
            });
        }
        cache.reserve(n)?;
        let start = cache.len();
        let embd = self
            .token_embd
            .gather_rows(tokens)
            .map_err(|source| ModelError::Weight {
                name: "token_embd.weight".into(),
                source,
            })?;
        let mut x = Tensor::<2>::from_data(TensorData::new(embd, [n, c.n_embd]), &self.device);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(x.clone(), &b.attn_norm, c.rms_eps);
            let q = quant_matmul(h.clone(), &b.wq).reshape([n, c.n_head, c.head_dim]);
            let k = quant_matmul(h.clone(), &b.wk).reshape([n, c.n_head_kv, c.head_dim]);
            let v = quant_matmul(h, &b.wv).reshape([n, c.n_head_kv, c.head_dim]);
            let rope = |x| rope(x, start, c.rope_dim, c.rope_base, c.rope_mode);
            let q = round_to_f16(rope(q).swap_dims(0, 1));
            let k = round_to_f16(rope(k).swap_dims(0, 1));
            let v = round_to_f16(v.swap_dims(0, 1));
            let (k_all, v_all) = cache.append(layer, k, v)?;
            let attn = causal_attention(q, k_all, v_all, scale);
            x = residual_add(x, quant_matmul(attn, &b.wo));

            let h = rms_norm(x.clone(), &b.ffn_norm, c.rms_eps);
            let gate = quant_matmul(h.clone(), &b.w_gate);
            let up = quant_matmul(h, &b.w_up);
            x = residual_add(x, quant_matmul(swiglu(gate, up), &b.w_down));
        }
        cache.advance(n);
        let x = match which {
            Logits::Last => x.slice([n - 1..n, 0..c.n_embd]),
            Logits::All => x,
        };
        let x = rms_norm(x, &self.output_norm, c.rms_eps);
        Ok(quant_matmul(x, &self.output))
    }
}
