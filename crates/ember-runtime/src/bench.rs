//! llama-bench semantics: `pp` processes `n_prompt` tokens in one batch; `tg` generates
//! `n_gen` tokens one at a time; both start from a cache holding `n_depth` tokens (llama-bench's
//! `-d`, 0 by default: an empty cache), filled before the clock starts. Each test runs once to
//! warm up, then `reps` timed times; throughput is tokens per second of each repetition.

use std::time::Instant;

use ember_kv::SequenceCache;
use ember_models::{Logits, Model, ModelError};
use serde::Serialize;

use crate::generate::last_logits;

/// One test's result, with llama-bench's JSON field names.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Prompt tokens processed in one batch (a `pp` test); 0 for a `tg` test.
    pub n_prompt: usize,
    /// Tokens generated one at a time (a `tg` test); 0 for a `pp` test.
    pub n_gen: usize,
    /// Tokens already in the cache when the test starts (not timed).
    pub n_depth: usize,
    /// Thread count reported by the caller (recorded, not applied here).
    pub n_threads: usize,
    /// Mean wall time of one repetition, in nanoseconds.
    pub avg_ns: u64,
    /// Sample standard deviation of the repetitions' wall times, in nanoseconds.
    pub stddev_ns: u64,
    /// Mean throughput, in tokens per second.
    pub avg_ts: f64,
    /// Sample standard deviation of the throughput, in tokens per second.
    pub stddev_ts: f64,
    /// Wall time of each timed repetition, in nanoseconds (the warm-up run excluded).
    pub samples_ns: Vec<u64>,
    /// Throughput of each timed repetition, in tokens per second.
    pub samples_ts: Vec<f64>,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Token ids to feed: any valid ids do (llama-bench uses random ones).
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// A cache for `depth + n` tokens holding `depth` of them.
fn filled_cache(model: &Model, depth: usize, n: usize) -> Result<SequenceCache, ModelError> {
    let mut cache = model.new_cache(depth + n)?;
    if depth > 0 {
        // Any valid ids do, as for the test itself (llama-bench fills its depth with random
        // ones); these are the test's sequence shifted by one.
        let toks: Vec<u32> = tokens(depth + 1, model.config().n_vocab)[1..].to_vec();
        model.forward(&toks, &mut cache, Logits::Last)?;
    }
    Ok(cache)
}

fn run_pp(model: &Model, cache: &mut SequenceCache, n: usize) -> Result<(), ModelError> {
    let toks = tokens(n, model.config().n_vocab);
    last_logits(model.forward(&toks, cache, Logits::Last)?);
    Ok(())
}

fn run_tg(model: &Model, cache: &mut SequenceCache, n: usize) -> Result<(), ModelError> {
    let toks = tokens(n, model.config().n_vocab);
    for t in toks {
        last_logits(model.forward(&[t], cache, Logits::Last)?);
    }
    Ok(())
}

/// Runs one test (`n_prompt` > 0 for pp, else `n_gen` for tg) from an empty cache: one
/// warm-up run, then `reps` timed ones (at least 1), each from a fresh cache.
pub fn bench(
    model: &Model,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    n_threads: usize,
) -> Result<BenchResult, ModelError> {
    bench_at_depth(model, n_prompt, n_gen, 0, reps, n_threads)
}

/// [`bench()`] with `n_depth` tokens in the cache before each run (llama-bench's `-d`): each
/// repetition fills a fresh cache to that depth, then times the test alone.
pub fn bench_at_depth(
    model: &Model,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    reps: usize,
    n_threads: usize,
) -> Result<BenchResult, ModelError> {
    let run = |m: &Model| -> Result<u64, ModelError> {
        let n = if n_prompt > 0 { n_prompt } else { n_gen };
        let mut cache = filled_cache(m, n_depth, n)?;
        let t = Instant::now();
        if n_prompt > 0 {
            run_pp(m, &mut cache, n_prompt)?;
        } else {
            run_tg(m, &mut cache, n_gen)?;
        }
        Ok(t.elapsed().as_nanos() as u64)
    };
    run(model)?; // warm-up, as llama-bench does
    let mut samples_ns = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        samples_ns.push(run(model)?);
    }
    let n = (n_prompt + n_gen) as f64;
    let samples_ts: Vec<f64> = samples_ns.iter().map(|&ns| n * 1e9 / ns as f64).collect();
    let (avg_ns, std_ns) = mean_std(&samples_ns.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let (avg_ts, stddev_ts) = mean_std(&samples_ts);
    Ok(BenchResult {
        n_prompt,
        n_gen,
        n_depth,
        n_threads,
        avg_ns: avg_ns as u64,
        stddev_ns: std_ns as u64,
        avg_ts,
        stddev_ts,
        samples_ns,
        samples_ts,
    })
}
