//! The llama architecture (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks of GQA attention
//! with RoPE and a SwiGLU feed-forward, RMSNorm, optionally tied embeddings.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use ember_formats::GgufFile;
use ember_kernels::{
    KvDtype, QuantMatrix, paged_attention, quant_matmul, residual_add, round_to_f16, swiglu,
};
use ember_kv::{KvCacheConfig, KvOptions, PagedKvCache, SeqId, SequenceCache};

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

    /// The KV cache layout this model needs for sequences of at most `max_seq_len` positions.
    pub fn kv_config(&self, opts: &KvOptions, max_seq_len: usize) -> KvCacheConfig {
        let c = &self.config;
        KvCacheConfig {
            block_size: opts.block_size,
            dtype: opts.dtype,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
            layer_windows: vec![None; c.n_layer],
            budget: opts
                .budget
                .unwrap_or(ember_kv::KvBudget::Tokens(max_seq_len)),
            max_seq_len,
            prefix_caching: opts.prefix_caching,
        }
    }

    /// A fresh KV cache (default options: f16, as llama.cpp) for one sequence of at most
    /// `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> Result<SequenceCache, ModelError> {
        self.new_cache_with(&KvOptions::default(), n_ctx)
    }

    pub fn new_cache_with(
        &self,
        opts: &KvOptions,
        n_ctx: usize,
    ) -> Result<SequenceCache, ModelError> {
        Ok(SequenceCache::new(&self.kv_config(opts, n_ctx))?)
    }

    /// Runs `tokens` (which follow the positions already cached) through the model, appends
    /// them to the cache and returns logits `[rows, n_vocab]`, where rows is 1 for
    /// [`Logits::Last`] and `tokens.len()` for [`Logits::All`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
        which: Logits,
    ) -> Result<Tensor<2>, ModelError> {
        let (cache, seq) = cache.parts();
        self.forward_seq(tokens, cache, seq, which)
    }

    /// [`forward`](Self::forward) for sequence `seq` of a shared paged cache. On error the
    /// sequence is rolled back to its length before the call.
    pub fn forward_seq(
        &self,
        tokens: &[u32],
        cache: &mut PagedKvCache,
        seq: SeqId,
        which: Logits,
    ) -> Result<Tensor<2>, ModelError> {
        self.forward_batch(
            &[BatchSeq {
                seq,
                tokens,
                logits: Some(which),
            }],
            cache,
        )
    }

    /// One pass over a ragged batch: each sequence's `tokens` follow its cached positions.
    /// Every linear layer runs once over all rows (so 8 decoding sequences cost about one
    /// weight read, not eight); attention reads each sequence's own blocks. Returns the logits
    /// rows the items ask for, in item order. Either every sequence advances or (on error)
    /// none does.
    pub fn forward_batch(
        &self,
        batch: &[BatchSeq<'_>],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        if batch.is_empty() || batch.iter().any(|b| b.tokens.is_empty()) {
            return Err(ModelError::EmptyBatch);
        }
        for b in batch {
            if let Some(&id) = b.tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: c.n_vocab,
                });
            }
        }
        let mut starts = Vec::with_capacity(batch.len());
        for b in batch {
            let start = cache.len(b.seq)?;
            if let Err(e) = cache.append(b.seq, b.tokens) {
                for (done, &s) in batch.iter().zip(&starts) {
                    let _ = cache.truncate(done.seq, s);
                }
                return Err(e.into());
            }
            starts.push(start);
        }
        // Run the whole pass on a rayon worker: the kernels' parallel loops then start from
        // inside the pool (work-stealing, no cross-thread hand-off per op) instead of each one
        // injecting a job and putting the calling thread to sleep. On 2 cores that hand-off
        // cost more than the small decode matmuls themselves.
        let out = rayon::scope(|_| self.forward_in_pool(batch, &starts, cache));
        let result = out.and_then(|logits| {
            for b in batch {
                cache.commit(b.seq)?;
            }
            Ok(logits)
        });
        if result.is_err() {
            // Best effort: the error that stopped the pass is the one to report.
            for (b, &s) in batch.iter().zip(&starts) {
                let _ = cache.truncate(b.seq, s);
            }
        }
        result
    }

    fn forward_in_pool(
        &self,
        batch: &[BatchSeq<'_>],
        starts: &[usize],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let n = tokens.len();
        let f16_cache = cache.dtype() == KvDtype::F16;
        let embd = self
            .token_embd
            .gather_rows(&tokens)
            .map_err(|source| ModelError::Weight {
                name: "token_embd.weight".into(),
                source,
            })?;
        let mut x = Tensor::<2>::from_data(TensorData::new(embd, [n, c.n_embd]), &self.device);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        // Row ranges and positions of each item.
        let mut rows = Vec::with_capacity(batch.len());
        let mut q_start = 0;
        for b in batch {
            rows.push((b.seq, q_start, b.tokens.len()));
            q_start += b.tokens.len();
        }
        let positions: Arc<[u32]> = batch
            .iter()
            .zip(starts)
            .flat_map(|(b, &s)| (s..s + b.tokens.len()).map(|p| p as u32))
            .collect();
        let kv_row = c.n_head_kv * c.head_dim;
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(x.clone(), &b.attn_norm, c.rms_eps);
            let q = quant_matmul(h.clone(), &b.wq).reshape([n, c.n_head, c.head_dim]);
            let k = quant_matmul(h.clone(), &b.wk).reshape([n, c.n_head_kv, c.head_dim]);
            let v = quant_matmul(h, &b.wv).reshape([n, c.n_head_kv, c.head_dim]);
            let rope = |x| rope(x, &positions, c.rope_dim, c.rope_base, c.rope_mode);
            // llama.cpp's f16-cache attention rounds Q to f16 as well.
            let q = if f16_cache {
                round_to_f16(rope(q))
            } else {
                rope(q)
            };
            let k = host(rope(k));
            let v = host(v);
            for (&(seq, first, len), &start) in rows.iter().zip(starts) {
                let span = first * kv_row..(first + len) * kv_row;
                cache.write(layer, seq, start, &k[span.clone()], &v[span])?;
            }
            let attn = paged_attention(q, cache.attention(layer, &rows, scale)?);
            x = residual_add(x, quant_matmul(attn, &b.wo));

            let h = rms_norm(x.clone(), &b.ffn_norm, c.rms_eps);
            let gate = quant_matmul(h.clone(), &b.w_gate);
            let up = quant_matmul(h, &b.w_up);
            x = residual_add(x, quant_matmul(swiglu(gate, up), &b.w_down));
        }
        // Keep only the rows whose logits were asked for.
        let mut keep: Vec<usize> = Vec::new();
        for (b, &(_, first, len)) in batch.iter().zip(&rows) {
            match b.logits {
                None => {}
                Some(Logits::Last) => keep.push(first + len - 1),
                Some(Logits::All) => keep.extend(first..first + len),
            }
        }
        let x = if keep.len() == n {
            x
        } else if keep.is_empty() {
            return Ok(Tensor::<2>::empty([0, c.n_vocab], &self.device));
        } else if keep.windows(2).all(|w| w[1] == w[0] + 1) {
            x.slice([keep[0]..keep[0] + keep.len(), 0..c.n_embd])
        } else {
            let idx: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
            let idx = Tensor::<1, burn::tensor::Int>::from_data(
                TensorData::new(idx, [keep.len()]),
                &self.device,
            );
            x.select(0, idx)
        };
        let x = rms_norm(x, &self.output_norm, c.rms_eps);
        Ok(quant_matmul(x, &self.output))
    }
}

/// One sequence's part of a batched pass.
#[derive(Clone, Copy, Debug)]
pub struct BatchSeq<'a> {
    pub seq: SeqId,
    /// Tokens following the sequence's cached positions (a prompt chunk or a sampled token).
    pub tokens: &'a [u32],
    /// Which of its rows to return logits for (`None`: a prefill chunk that is not the last).
    pub logits: Option<Logits>,
}

/// A tensor's values on the host, row-major (the cache stores K/V in host memory).
fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap_or_default()
}
