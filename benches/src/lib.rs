//! End-to-end benches of Ember on real models (`benches/end_to_end.rs`), beside the
//! per-crate kernel benches (`crates/ember-kernels/benches`, `crates/ember-runtime/benches`).
//! This library holds what the benches share: which models to run and how to set up their
//! caches.
//!
//! `cargo bench -p ember-benches`. The models are SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M,
//! pulled through `ember-hub` on first use; `EMBER_BENCH_MODELS` (comma-separated names or
//! GGUF paths, e.g. the 1B written by `cargo xtask bench-model`) replaces the list.

use std::path::PathBuf;

use ember_kv::{KvBudget, KvOptions, PagedKvCache, SeqId};
use ember_models::{BatchSeq, Logits, Model, ModelError};

/// The models a default run measures.
pub const DEFAULT_MODELS: [&str; 2] = ["smollm2-135m-instruct-q4_1", "gemma3-270m-q4_k_m"];

/// `(short name, path)` of each model to bench: `EMBER_BENCH_MODELS` or [`DEFAULT_MODELS`],
/// resolved (and pulled if need be) through `ember-hub`.
pub fn models() -> Vec<(String, PathBuf)> {
    let list = std::env::var("EMBER_BENCH_MODELS").unwrap_or_else(|_| DEFAULT_MODELS.join(","));
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let path = ember_hub::resolve(name)
                .unwrap_or_else(|e| panic!("model {name}: {e} (EMBER_BENCH_MODELS)"));
            let short = path
                .file_stem()
                .map_or(name.to_string(), |s| s.to_string_lossy().into_owned());
            (short, path)
        })
        .collect()
}

/// Token ids to feed: any valid ids do (llama-bench uses random ones).
pub fn tokens(model: &Model, n: usize, seed: usize) -> Vec<u32> {
    let vocab = model.config().n_vocab;
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % vocab) as u32)
        .collect()
}

/// `seqs` decoding sequences sharing one paged cache, each holding a different prompt of
/// `ctx` tokens; one step appends a token to every sequence and [`Self::rewind`] drops it, so
/// each timed step sees the same context.
pub struct DecodeBatch {
    pub cache: PagedKvCache,
    pub seqs: Vec<SeqId>,
    pub ctx: usize,
    next: Vec<Vec<u32>>,
}

impl DecodeBatch {
    /// Prefills `seqs` sequences of `ctx` tokens (room for one more each).
    pub fn new(model: &Model, seqs: usize, ctx: usize) -> Result<Self, ModelError> {
        let defaults = KvOptions::default();
        // Whole blocks for each sequence's ctx + 1 positions.
        let per_seq = (ctx + 1).next_multiple_of(defaults.block_size);
        let opts = KvOptions {
            budget: Some(KvBudget::Tokens(seqs * per_seq)),
            prefix_caching: false,
            ..defaults
        };
        let mut cache = PagedKvCache::new(&model.kv_config(&opts, ctx + 1))?;
        let mut ids = Vec::with_capacity(seqs);
        let mut next = Vec::with_capacity(seqs);
        for s in 0..seqs {
            let (seq, _) = cache.add_sequence(&[])?;
            let prompt = tokens(model, ctx + 1, s);
            model.forward_batch(
                &[BatchSeq {
                    seq,
                    tokens: &prompt[..ctx],
                    logits: Some(Logits::Last),
                    solo_rows: None,
                }],
                &mut cache,
            )?;
            ids.push(seq);
            next.push(vec![prompt[ctx]]);
        }
        Ok(Self {
            cache,
            seqs: ids,
            ctx,
            next,
        })
    }

    /// One pass: a token for every sequence, logits of each; the cache then rewinds to `ctx`.
    pub fn step(&mut self, model: &Model) -> Result<Vec<f32>, ModelError> {
        let batch: Vec<BatchSeq<'_>> = self
            .seqs
            .iter()
            .zip(&self.next)
            .map(|(&seq, t)| BatchSeq {
                seq,
                tokens: t,
                logits: Some(Logits::Last),
                solo_rows: None,
            })
            .collect();
        let logits = model.forward_batch(&batch, &mut self.cache)?;
        // Read back to host memory, as the engine does before sampling.
        let out = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
        self.rewind()?;
        Ok(out)
    }

    /// Drops every position past `ctx`.
    pub fn rewind(&mut self) -> Result<(), ModelError> {
        for &seq in &self.seqs {
            self.cache.truncate(seq, self.ctx)?;
        }
        Ok(())
    }
}
