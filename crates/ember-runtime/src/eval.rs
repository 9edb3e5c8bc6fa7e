//! Teacher-forced evaluation: logits at every position, and perplexity as llama-perplexity
//! computes it.

use ember_models::{BatchSeq, Logits, Model, ModelError};
use serde::Serialize;

/// Logits after every position of `tokens` (row `i` predicts token `i + 1`), computed in
/// batches of at most `batch` tokens over one growing cache.
pub fn teacher_forced_logits(
    model: &Model,
    tokens: &[u32],
    batch: usize,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut cache = model.new_cache(tokens.len())?;
    let mut rows = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(batch.max(1)) {
        let logits = model.forward(chunk, &mut cache, Logits::All)?;
        let [n, vocab] = logits.dims();
        let flat = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
        rows.extend((0..n).map(|i| flat[i * vocab..(i + 1) * vocab].to_vec()));
    }
    Ok(rows)
}

/// Logits the way a generation computes them: the prompt in one batch (its last row), then
/// each of `continuation` fed one token at a time. Row `j` predicts `continuation[j]`, the last
/// row what follows it. This mirrors how llama.cpp produced its reference logits, batch sizes
/// included (its attention takes a different path for batches of 64 tokens or more).
pub fn prompt_then_step_logits(
    model: &Model,
    prompt: &[u32],
    continuation: &[u32],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut cache = model.new_cache(prompt.len() + continuation.len())?;
    let mut rows = Vec::with_capacity(continuation.len() + 1);
    let first = model.forward(prompt, &mut cache, Logits::Last)?;
    rows.push(first.into_data().try_to_vec::<f32>().unwrap_or_default());
    for &t in continuation {
        let row = model.forward(&[t], &mut cache, Logits::Last)?;
        rows.push(row.into_data().try_to_vec::<f32>().unwrap_or_default());
    }
    Ok(rows)
}

/// The result of [`perplexity`].
#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    /// `exp` of the mean negative log-likelihood over the scored tokens.
    pub ppl: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Chunks of `ctx` tokens evaluated.
    pub chunks: usize,
}

/// Why [`perplexity`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    /// The text is shorter than two chunks (or `ctx` < 2).
    #[error("need at least 2 * ctx = {needed} tokens for perplexity, the text has {got}")]
    TooShort {
        /// Tokens needed: `2 * ctx`.
        needed: usize,
        /// Tokens the text has.
        got: usize,
    },
    /// A forward pass or the cache failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// `log(sum(exp(logits)))` computed stably, then `-log p(target)`.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    lse - logits[target as usize] as f64
}

/// llama-perplexity's default micro-batch (`n_ubatch`).
const PERPLEXITY_UBATCH: usize = 512;

/// llama-perplexity's method: split `tokens` into non-overlapping chunks of `ctx` tokens (the
/// tail that doesn't fill a chunk is dropped), put BOS first in each chunk when `bos` is given,
/// run each chunk from an empty cache and score the second half of it: the predictions of
/// tokens `ctx/2 + 1 .. ctx`. `on_chunk` sees the running estimate after each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<Perplexity, PerplexityError> {
    if ctx < 2 || tokens.len() < 2 * ctx {
        return Err(PerplexityError::TooShort {
            needed: 2 * ctx.max(2),
            got: tokens.len(),
        });
    }
    let n_chunks = tokens.len() / ctx;
    let first = ctx / 2;
    let (mut nll_sum, mut count) = (0.0f64, 0usize);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        let mut cache = model.new_cache(ctx)?;
        let (cache, seq) = cache.parts();
        // Micro-batches of 512 as llama-perplexity's default `n_ubatch` (so attention and
        // matmuls see the batch sizes llama.cpp does), logits only where rows are scored.
        for start in (0..ctx).step_by(PERPLEXITY_UBATCH) {
            let end = (start + PERPLEXITY_UBATCH).min(ctx);
            let scored = end > first;
            let batch = BatchSeq {
                seq,
                tokens: &chunk[start..end],
                logits: scored.then_some(Logits::All),
                solo_rows: None,
            };
            let logits = model.forward_batch(&[batch], cache)?;
            if !scored {
                continue;
            }
            let [_, vocab] = logits.dims();
            let flat = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
            for i in start.max(first)..end.min(ctx - 1) {
                // Targets come from the original tokens: only the input had BOS swapped in.
                let row = i - start;
                nll_sum += nll(
                    &flat[row * vocab..(row + 1) * vocab],
                    tokens[c * ctx + i + 1],
                );
                count += 1;
            }
        }
        on_chunk(c + 1, n_chunks, (nll_sum / count as f64).exp());
    }
    Ok(Perplexity {
        ppl: (nll_sum / count as f64).exp(),
        tokens: count,
        chunks: n_chunks,
    })
}

/// The `k` highest logits as `(id, logit)`, highest first, ties to the lower id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < ids.len() && k > 0 {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_by(order);
    ids.into_iter().map(|i| (i, logits[i as usize])).collect()
}
