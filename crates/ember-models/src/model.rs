//! What every architecture shares: the embedding and output head, the KV cache protocol of a
//! pass (append, write, attend, commit or roll back) and ragged batches. An architecture only
//! supplies its blocks ([`Architecture`]); the runtime sees one [`Model`] type.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_kernels::{
    QuantMatrix, SeqAttn, SoloRow, paged_attention, quant_matmul, quant_matmul_many,
    quant_matmul_solo,
};
use ember_kv::{KvBudget, KvCacheConfig, KvOptions, PagedKvCache, SeqId, SequenceCache};

use crate::layers::rms_norm;
use crate::{ModelConfig, ModelError, Placement, Weights};

/// Which positions of a batch to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (teacher forcing, perplexity).
    All,
}

/// One sequence's part of a batched pass.
#[derive(Clone, Copy, Debug)]
pub struct BatchSeq<'a> {
    /// The cache sequence these tokens extend.
    pub seq: SeqId,
    /// Tokens following the sequence's cached positions (a prompt chunk or a sampled token).
    pub tokens: &'a [u32],
    /// Which of its rows to return logits for (`None`: a prefill chunk that is not the last).
    pub logits: Option<Logits>,
    /// Rows of the ubatch these tokens belong to when the sequence runs alone (see
    /// [`SeqAttn::path_rows`](ember_kernels::SeqAttn::path_rows)); `None`: `tokens.len()`.
    /// A scheduler that cuts a sequence's ubatch into parts, or batches it with other
    /// sequences, passes the solo size so each row keeps the arithmetic it has alone.
    pub solo_rows: Option<usize>,
}

/// How a forward pass runs, beyond its batch: what speculative decoding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassOptions {
    /// Run only the first `n` blocks, then the output norm and head (self-speculation's
    /// draft). `None`: all. The cache must have exactly as many layers as the pass runs.
    pub layers: Option<usize>,
    /// Leave the appended positions uncommitted ([`PagedKvCache::commit`] not called): the
    /// caller truncates what it rejects, then commits. Speculative verification needs this so
    /// rejected tokens never enter the prefix cache and sliding-window blocks are not released
    /// for positions that are then rolled back. On error the pass is rolled back either way.
    pub defer_commit: bool,
}

/// llama.cpp's default micro-batch (`n_ubatch`): a prompt runs in slices of this many tokens,
/// and the slice size picks kernels (attention's tiled path from 64 rows), so Ember slices
/// prompts the same way.
pub const UBATCH: usize = 512;

/// The transformer blocks of one architecture, between the embedding and the output head.
pub trait Architecture: Send + Sync {
    /// Each layer's attention window (`None`: full causal attention).
    fn layer_windows(&self) -> Vec<Option<usize>>;

    /// Scale applied to the token embeddings before the first block (Gemma: `sqrt(n_embd)`).
    fn embedding_scale(&self) -> Option<f32> {
        None
    }

    /// Runs the hidden states `x: [rows, n_embd]` of a batch through the first
    /// [`Pass::layers`] blocks (every block unless the pass is limited), calling
    /// [`Pass::select_outputs`] in the last one that runs.
    fn blocks(&self, x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError>;
}

/// One forward pass over a ragged batch: row ranges, positions and the cache, so a block can
/// store its K/V and attend with one call.
pub struct Pass<'a> {
    /// `(sequence, first row, rows)` of each item.
    pub rows: Vec<(SeqId, usize, usize)>,
    /// Cached length of each item's sequence before this pass.
    pub starts: Vec<usize>,
    /// Each item's solo ubatch rows ([`BatchSeq::solo_rows`]).
    pub path_rows: Vec<usize>,
    /// Position of every row.
    pub positions: Arc<[u32]>,
    /// Rows of the batch: every item's tokens together.
    pub n_rows: usize,
    /// The cache the new positions were appended to; [`attend`](Self::attend) writes and
    /// reads it.
    pub cache: &'a mut PagedKvCache,
    /// The rows whose logits were asked for, when not all of them.
    out_rows: Option<Vec<usize>>,
    /// Each row's place in the batch it has alone ([`SoloRow`]), before and after
    /// [`select_outputs`](Self::select_outputs); `None` when that is its place in this batch
    /// (one sequence computed as llama.cpp would alone).
    solo_in: SoloShapes,
    solo_out: SoloShapes,
    /// Whether an architecture already cut the batch down to `out_rows`.
    selected: bool,
    /// Blocks to run (the first ones); checked against the model and the cache.
    layers: usize,
    /// Which device each block runs on.
    placement: &'a Placement,
}

impl Pass<'_> {
    /// How many blocks this pass runs: the first `layers()` of the model
    /// ([`PassOptions::layers`]). The last of them is the one that calls
    /// [`select_outputs`](Self::select_outputs).
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// The hidden states `x` on the device block `layer` runs on: architectures call it at the
    /// top of every block, and it moves `x` only where a `--gpu-layers` split crosses devices.
    pub fn enter(&self, layer: usize, x: Tensor<2>) -> Tensor<2> {
        let device = self.placement.layer(layer);
        if &x.device() == device {
            x
        } else {
            x.to_device(device)
        }
    }

    /// `x @ w^T` for this pass's rows (before or after [`select_outputs`](Self::select_outputs)),
    /// each with the arithmetic llama.cpp gives it when its sequence runs alone.
    pub fn matmul(&self, x: Tensor<2>, w: &Arc<QuantMatrix>) -> Tensor<2> {
        // No rows (the last layer of a prompt slice whose logits nobody asked for): nothing to
        // compute, and burn-ndarray's matmul divides by the row count.
        if x.dims()[0] == 0 {
            return Tensor::<2>::empty([0, w.rows()], &x.device());
        }
        let solo = if self.selected {
            &self.solo_out
        } else {
            &self.solo_in
        };
        match solo {
            Some(s) if s.len() == x.dims()[0] => quant_matmul_solo(x, w, s),
            _ => quant_matmul(x, w),
        }
    }

    /// [`matmul`](Self::matmul) of `x` with each of `ws`, as one call (the CPU backend runs
    /// them in one parallel region over activations quantized once): the same bits.
    pub fn matmul_many(&self, x: Tensor<2>, ws: &[Arc<QuantMatrix>]) -> Vec<Tensor<2>> {
        if x.dims()[0] == 0 {
            return ws
                .iter()
                .map(|w| Tensor::<2>::empty([0, w.rows()], &x.device()))
                .collect();
        }
        let solo = if self.selected {
            &self.solo_out
        } else {
            &self.solo_in
        };
        let solo = solo.as_ref().filter(|s| s.len() == x.dims()[0]);
        quant_matmul_many(x, ws, solo)
    }

    /// llama.cpp's `inp_out_ids`: in the last layer, right after attention, only the rows whose
    /// logits were asked for go on through the rest of the layer. Architectures call this with
    /// the attention output and the residual stream; it saves the feed-forward work of every
    /// other row, and it is also what keeps llama.cpp's choice of matmul kernel (which depends
    /// on the number of rows) and so its arithmetic.
    pub fn select_outputs(&mut self, a: Tensor<2>, b: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
        self.selected = true;
        match &self.out_rows {
            None => (a, b),
            Some(rows) => (select_rows(a, rows), select_rows(b, rows)),
        }
    }

    /// Stores `k`, `v` (`[rows, n_kv, head_dim]`, after RoPE) for `layer` and returns the
    /// attention of `q` (`[rows, n_head, head_dim]`) over every sequence's cached and new
    /// positions: `[rows, n_head * head_dim]`.
    pub fn attend(
        &mut self,
        layer: usize,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        scale: f32,
    ) -> Result<Tensor<2>, ModelError> {
        // Q goes in as f32: llama.cpp's one-row path rounds it to f16 for an f16 cache, its
        // tiled path (64+ queries) does not, and the kernel picks the path per sequence.
        if self.cache.layer_on_device(layer) {
            // Kept on the GPU: written there, never read back.
            self.cache
                .write_tensors(layer, &self.rows, &self.starts, k, v)?;
        } else {
            let [_, n_kv, head_dim] = k.dims();
            let kv_row = n_kv * head_dim;
            let (k, v) = (host(k), host(v));
            for (&(seq, first, len), &start) in self.rows.iter().zip(&self.starts) {
                let span = first * kv_row..(first + len) * kv_row;
                self.cache
                    .write(layer, seq, start, &k[span.clone()], &v[span])?;
            }
        }
        let mut attn = self.cache.attention(layer, &self.rows, scale)?;
        if attn
            .seqs
            .iter()
            .zip(&self.path_rows)
            .any(|(s, &p)| s.path_rows != p)
        {
            attn.seqs = attn
                .seqs
                .iter()
                .zip(&self.path_rows)
                .map(|(s, &path_rows)| SeqAttn {
                    path_rows,
                    ..s.clone()
                })
                .collect();
        }
        Ok(paged_attention(q, attn))
    }
}

/// A loaded model: shared head and embedding plus its architecture's blocks.
pub struct Model {
    config: ModelConfig,
    device: Device,
    token_embd: Arc<QuantMatrix>,
    output_norm: Tensor<1>,
    output: Arc<QuantMatrix>,
    arch: Box<dyn Architecture>,
    placement: Placement,
    weight_bytes: u64,
    repacked_bytes: u64,
}

impl Model {
    /// The embedding (`token_embd`), output norm and head (`output`, or the embedding when
    /// tied) that every architecture here shares, around `arch`'s blocks.
    pub fn new(
        w: &Weights<'_>,
        config: ModelConfig,
        device: &Device,
        arch: Box<dyn Architecture>,
    ) -> Result<Self, ModelError> {
        let d = config.n_embd;
        let token_embd = w.matrix("token_embd.weight", config.n_vocab, d)?;
        let output = if w.has("output.weight") {
            w.matrix("output.weight", config.n_vocab, d)?
        } else {
            w.head_from_embedding(&token_embd)
        };
        Ok(Self {
            output_norm: w.vector("output_norm.weight", d)?,
            config,
            device: device.clone(),
            token_embd,
            output,
            arch,
            placement: w.placement().clone(),
            weight_bytes: w.total_bytes(),
            repacked_bytes: w.repacked_bytes(),
        })
    }

    /// Bytes of the weights repacked at load for this CPU's kernels (held in memory in place of
    /// the mapping's pages; 0 with repacking off or where no kernel reads a repacked layout).
    pub fn repacked_bytes(&self) -> u64 {
        self.repacked_bytes
    }

    /// Bytes of every weight it was loaded from (the file's tensors, less those a supplied
    /// matrix replaces, plus the supplied matrices' storage): about what one pass streams,
    /// the basis of relative costs such as a draft model's. Parts cut from one fused packed
    /// layer each count the small index tensors they share (`g_idx`, EXL2's permutation).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The hyper-parameters the model was loaded with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The burn device it was loaded for (with a `--gpu-layers` split, the GPU; see
    /// [`placement`](Self::placement)).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Which device each block, the embedding rows and the head are on.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The KV cache layout this model needs for sequences of at most `max_seq_len` positions.
    pub fn kv_config(&self, opts: &KvOptions, max_seq_len: usize) -> KvCacheConfig {
        let c = &self.config;
        KvCacheConfig {
            block_size: opts.block_size,
            dtype: opts.dtype,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
            layer_windows: self.arch.layer_windows(),
            budget: opts.budget.unwrap_or(KvBudget::Tokens(max_seq_len)),
            max_seq_len,
            prefix_caching: opts.prefix_caching,
            // Each layer's K and V where the layer runs (the host arenas unless a GPU).
            layer_devices: (0..self.arch.layer_windows().len())
                .map(|l| self.placement.layer(l).clone())
                .collect(),
        }
    }

    /// The KV layout for a pass over only the first `layers` blocks (the cache has that many
    /// layers, with the windows of those blocks): self-speculation's draft cache. `layers` is
    /// clamped to the model's layer count; 0 gives a layout [`PagedKvCache::new`] refuses.
    pub fn kv_config_layers(
        &self,
        opts: &KvOptions,
        max_seq_len: usize,
        layers: usize,
    ) -> KvCacheConfig {
        let mut config = self.kv_config(opts, max_seq_len);
        config.layer_windows.truncate(layers);
        config.layer_devices.truncate(layers);
        config
    }

    /// The number of transformer blocks.
    pub fn n_layers(&self) -> usize {
        self.config.n_layer
    }

    /// A fresh KV cache (default options: f16, as llama.cpp) for one sequence of at most
    /// `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> Result<SequenceCache, ModelError> {
        self.new_cache_with(&KvOptions::default(), n_ctx)
    }

    /// [`new_cache`](Self::new_cache) with explicit KV options (element type, block size,
    /// budget, prefix caching).
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

    /// [`forward`](Self::forward) for sequence `seq` of a shared paged cache. More than
    /// [`UBATCH`] tokens run in slices of that many, as llama.cpp splits a batch into ubatches
    /// (the slice size decides its kernels, so this keeps its arithmetic). On error the
    /// sequence is rolled back to its length before the call.
    pub fn forward_seq(
        &self,
        tokens: &[u32],
        cache: &mut PagedKvCache,
        seq: SeqId,
        which: Logits,
    ) -> Result<Tensor<2>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyBatch);
        }
        let start = cache.len(seq)?;
        let n_slices = tokens.len().div_ceil(UBATCH);
        let mut parts = Vec::with_capacity(n_slices);
        for (i, slice) in tokens.chunks(UBATCH).enumerate() {
            let logits = match which {
                Logits::All => Some(Logits::All),
                Logits::Last => (i + 1 == n_slices).then_some(Logits::Last),
            };
            let item = BatchSeq {
                seq,
                tokens: slice,
                logits,
                solo_rows: None,
            };
            match self.forward_batch(&[item], cache) {
                Ok(l) => parts.push(l),
                Err(e) => {
                    let _ = cache.truncate(seq, start);
                    return Err(e);
                }
            }
        }
        // Slices without logits rows contribute nothing.
        let mut parts: Vec<_> = parts.into_iter().filter(|t| t.dims()[0] > 0).collect();
        Ok(match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(parts, 0),
        })
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
        self.forward_batch_with(batch, cache, PassOptions::default())
    }

    /// [`forward_batch`](Self::forward_batch) with [`PassOptions`]: only the first blocks
    /// (the cache must then have that many layers, see
    /// [`kv_config_layers`](Self::kv_config_layers)), and/or without committing the appended
    /// positions. The default options are exactly `forward_batch`.
    pub fn forward_batch_with(
        &self,
        batch: &[BatchSeq<'_>],
        cache: &mut PagedKvCache,
        opts: PassOptions,
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
        let layers = match opts.layers {
            None => c.n_layer,
            Some(n) if n == 0 || n > c.n_layer => {
                return Err(ModelError::BadLayerCount {
                    layers: n,
                    n_layer: c.n_layer,
                });
            }
            Some(n) => n,
        };
        // A cache of another shape would fail half-way through the blocks (fewer layers) or
        // silently keep stale layers (more): refuse it before anything is appended. A pass over
        // the first layers of a larger cache is allowed when it is not committed: its positions
        // (self-speculation's drafts, on a fork) are thrown away, never read in other layers.
        let partial = opts.defer_commit && cache.n_layers() > layers;
        if cache.n_layers() != layers && !partial {
            return Err(ModelError::CacheLayers {
                cache: cache.n_layers(),
                layers,
            });
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
        //
        // The other workers are kept polling for work for the whole pass (`keep_awake`), as
        // ggml's thread pool spins between ops: a rayon worker that finds nothing to do for a
        // few tens of microseconds sleeps, and on this VM waking it costs more than the short
        // serial stretches between two parallel loops (8-stream decode slept ~20 times a step
        // and left the second core a fifth idle).
        let done = AtomicBool::new(false);
        let out = rayon::scope(|s| {
            let (runner, done) = (rayon::current_thread_index(), &done);
            for _ in 1..rayon::current_num_threads() {
                s.spawn(move |_| keep_awake(done, runner));
            }
            let _stop = SetOnDrop(done);
            self.forward_in_pool(batch, starts.clone(), cache, layers)
        });
        let result = out.and_then(|logits| {
            if !opts.defer_commit {
                for b in batch {
                    cache.commit(b.seq)?;
                }
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
        starts: Vec<usize>,
        cache: &mut PagedKvCache,
        layers: usize,
    ) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let n = tokens.len();
        let mut embd =
            self.token_embd
                .gather_rows(&tokens)
                .map_err(|source| ModelError::Weight {
                    name: "token_embd.weight".into(),
                    source,
                })?;
        if let Some(s) = self.arch.embedding_scale() {
            embd.iter_mut().for_each(|x| *x *= s);
        }
        let x =
            Tensor::<2>::from_data(TensorData::new(embd, [n, c.n_embd]), self.placement.input());
        crate::trace::tensor("embd", None, &x);
        let mut rows = Vec::with_capacity(batch.len());
        let mut first = 0;
        for b in batch {
            rows.push((b.seq, first, b.tokens.len()));
            first += b.tokens.len();
        }
        let positions: Arc<[u32]> = batch
            .iter()
            .zip(&starts)
            .flat_map(|(b, &s)| (s..s + b.tokens.len()).map(|p| p as u32))
            .collect();
        // Keep only the rows whose logits were asked for.
        let mut keep: Vec<usize> = Vec::new();
        for (b, &(_, first, len)) in batch.iter().zip(&rows) {
            match b.logits {
                None => {}
                Some(Logits::Last) => keep.push(first + len - 1),
                Some(Logits::All) => keep.extend(first..first + len),
            }
        }
        let out_rows = (keep.len() != n).then_some(keep);
        let path_rows = batch
            .iter()
            .map(|b| b.solo_rows.unwrap_or(b.tokens.len()))
            .collect();
        let (solo_in, solo_out) = solo_rows(batch, &starts);
        let mut pass = Pass {
            rows,
            starts,
            path_rows,
            positions,
            n_rows: n,
            cache,
            out_rows,
            selected: false,
            solo_in,
            solo_out,
            layers,
            placement: &self.placement,
        };
        let x = self.arch.blocks(x, &mut pass)?;
        let head = self.placement.head();
        let x = if &x.device() == head {
            x
        } else {
            x.to_device(head)
        };
        let x = match (&pass.out_rows, pass.selected) {
            (Some(rows), false) => select_rows(x, rows),
            _ => x,
        };
        pass.selected = true;
        if x.dims()[0] == 0 {
            return Ok(Tensor::<2>::empty([0, c.n_vocab], head));
        }
        let x = rms_norm(x, &self.output_norm, c.rms_eps);
        crate::trace::tensor("result_norm", None, &x);
        let logits = self.head(&pass, x);
        crate::trace::tensor("result_output", None, &logits);
        crate::trace::next_pass();
        Ok(logits)
    }
}

impl Model {
    /// The head's logits `[rows, n_vocab]` for the normed hidden states `x`. On a GPU whose
    /// largest buffer cannot hold them all (Gemma's rows are 1 MiB: 128 of them fill
    /// lavapipe's 128 MiB), they are computed a buffer's worth of rows at a time and come back
    /// to the host as one tensor there, since every caller reads logits on the host.
    fn head(&self, pass: &Pass<'_>, x: Tensor<2>) -> Tensor<2> {
        #[cfg(feature = "cube")]
        if let Some(limits) = ember_kernels::gpu_memory_limits(&x.device()) {
            let [rows, d] = x.dims();
            let row_bytes = (self.config.n_vocab as u64 * 4).max(1);
            // Tensors index with 32 bits too: no buffer past 4 GiB.
            let max_buffer = limits.max_buffer.min(u32::MAX as u64);
            let per = usize::try_from(max_buffer / row_bytes)
                .unwrap_or(usize::MAX)
                .max(1);
            if rows > per {
                let host = crate::default_device();
                let parts = (0..rows)
                    .step_by(per)
                    .map(|first| {
                        let part = x.clone().slice([first..(first + per).min(rows), 0..d]);
                        let logits = quant_matmul(part, &self.output);
                        Tensor::<2>::from_data(logits.into_data(), &host)
                    })
                    .collect();
                return Tensor::cat(parts, 0);
            }
        }
        pass.matmul(x, &self.output)
    }
}

/// Rows' solo shapes, one per row of a pass (`None`: each row's place in the pass itself).
type SoloShapes = Option<Arc<[SoloRow]>>;

/// Each row's place in the batch llama.cpp computes it in when its sequence runs alone, before
/// and after `inp_out_ids`; `None` for one sequence given without a solo size, whose rows
/// are already in that batch. An item with [`BatchSeq::solo_rows`] `u` is part of a ubatch of
/// `u` rows starting at a multiple of [`UBATCH`] positions (a prompt) or, for `u = 1`, a
/// decoded token; its output rows are alone in theirs (the last of a prompt, or a decode
/// step) unless it asks for all of them.
fn solo_rows(batch: &[BatchSeq<'_>], starts: &[usize]) -> (SoloShapes, SoloShapes) {
    if let [only] = batch
        && only.solo_rows.is_none()
    {
        return (None, None);
    }
    let row = |m: usize, i: usize| SoloRow {
        m: m as u32,
        i: i as u32,
    };
    let (mut rows_in, mut rows_out) = (Vec::new(), Vec::new());
    for (b, &start) in batch.iter().zip(starts) {
        let len = b.tokens.len();
        let first = rows_in.len();
        for r in 0..len {
            rows_in.push(match b.solo_rows {
                None => row(len, r),
                Some(1) => row(1, 0),
                Some(u) => row(u, (start + r) % UBATCH),
            });
        }
        match b.logits {
            None => {}
            Some(Logits::Last) => rows_out.push(row(1, 0)),
            Some(Logits::All) => rows_out.extend_from_slice(&rows_in[first..]),
        }
    }
    (Some(rows_in.into()), Some(rows_out.into()))
}

/// Rows `rows` (ascending) of `x`.
fn select_rows(x: Tensor<2>, rows: &[usize]) -> Tensor<2> {
    let [_, d] = x.dims();
    if rows.is_empty() {
        return Tensor::<2>::empty([0, d], &x.device());
    }
    if rows.windows(2).all(|w| w[1] == w[0] + 1) {
        return x.slice([rows[0]..rows[0] + rows.len(), 0..d]);
    }
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &x.device());
    x.select(0, idx)
}

/// A tensor's values on the host, row-major (the cache stores K/V in host memory).
fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap_or_default()
}

/// How long [`keep_awake`] polls with nothing to run before it gives up and lets its thread
/// sleep as rayon's own idle loop would.
const KEEP_AWAKE_IDLE: Duration = Duration::from_millis(1);

/// Runs other jobs of the pool, polling without sleeping, until `done`.
///
/// It returns at once on the thread running the pass (`runner`), which may pick this job up
/// while it waits inside a parallel loop: spinning there would wait for itself. And it returns
/// after [`KEEP_AWAKE_IDLE`] with nothing to run: a thread that took this job while waiting
/// inside one of the pass's own jobs must get back to that job for the pass to finish.
fn keep_awake(done: &AtomicBool, runner: Option<usize>) {
    if rayon::current_thread_index() == runner {
        return;
    }
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        if idle_since.get_or_insert_with(Instant::now).elapsed() > KEEP_AWAKE_IDLE {
            return;
        }
        std::hint::spin_loop();
    }
}

/// Sets the flag when dropped, so [`keep_awake`] stops even if the pass panics.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
