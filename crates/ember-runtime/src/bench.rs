//! llama-bench semantics: `pp` processes `n_prompt` tokens in one batch from an empty cache;
//! `tg` generates `n_gen` tokens one at a time from an empty cache. Each test runs once to
//! warm up, then `reps` timed times; throughput is tokens per second of each repetition.

use std::time::Instant;

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

fn run_pp(model: &Model, n: usize) -> Result<(), ModelError> {
    let mut cache = model.new_cache(n)?;
    let toks = tokens(n, model.config().n_vocab);
    last_logits(model.forward(&toks, &mut cache, Logits::Last)?);
    Ok(())
}

fn run_tg(model: &Model, n: usize) -> Result<(), ModelError> {
    let mut cache = model.new_cache(n)?;
    let toks = tokens(n, model.config().n_vocab);
    for t in toks {
        last_logits(model.forward(&[t], &mut cache, Logits::Last)?);
    }
    Ok(())
}

/// Runs one test (`n_prompt` > 0 for pp, else `n_gen` for tg): one warm-up run, then `reps`
/// timed ones (at least 1), each from a fresh cache.
pub fn bench(
    model: &Model,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    n_threads: usize,
) -> Result<BenchResult, ModelError> {
    let run = |m: &Model| {
        if n_prompt > 0 {
            run_pp(m, n_prompt)
        } else {
            run_tg(m, n_gen)
        }
    };
    run(model)?; // warm-up, as llama-bench does
    let mut samples_ns = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        run(model)?;
        samples_ns.push(t.elapsed().as_nanos() as u64);
    }
    let n = (n_prompt + n_gen) as f64;
    let samples_ts: Vec<f64> = samples_ns.iter().map(|&ns| n * 1e9 / ns as f64).collect();
    let (avg_ns, std_ns) = mean_std(&samples_ns.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let (avg_ts, stddev_ts) = mean_std(&samples_ts);
    Ok(BenchResult {
        n_prompt,
        n_gen,
        n_threads,
        avg_ns: avg_ns as u64,
        stddev_ns: std_ns as u64,
        avg_ts,
        stddev_ts,
        samples_ns,
        samples_ts,
    })
}
