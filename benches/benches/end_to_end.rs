//! End-to-end: model load, prefill, one decode step, an 8-row batched decode step, on each
//! model of `ember_benches::models()` (SmolLM2 and Gemma 3 by default), on rayon's global
//! pool (all cores unless `RAYON_NUM_THREADS` says otherwise).
//!
//! Ids read `<what>/<model>`: `load/<model>/repacked` and `/mapped` (`LoadedModel::open_with`,
//! with and without repacking: file to ready model, tokenizer included), `prefill/<model>/512`
//! (512 prompt tokens into a fresh cache, last logits), `decode/<model>/ctx512` (one token
//! after 512 cached), `batch8/<model>/ctx128` (one token for each of 8 sequences of 128 cached
//! positions, one pass, as `ember serve`'s scheduler runs eight streams; sampling is
//! `crates/ember-runtime/benches/sampling.rs`). Throughput is tokens; `ember bench` and
//! `cargo xtask bench-vs-llamacpp` are the llama-bench-style numbers to set beside llama.cpp.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_benches::{DecodeBatch, models, tokens};
use ember_models::{Logits, default_device};
use ember_runtime::loaded::{LoadOptions, LoadedModel};

const PROMPT: usize = 512;
const DECODE_CTX: usize = 512;
const BATCH: usize = 8;
const BATCH_CTX: usize = 128;

fn bench(c: &mut Criterion) {
    let device = default_device();
    for (name, path) in models() {
        let mut group = c.benchmark_group("load");
        group.sample_size(10);
        for (layout, no_repack) in [("repacked", false), ("mapped", true)] {
            let opts = LoadOptions {
                no_repack,
                ..LoadOptions::default()
            };
            group.bench_function(BenchmarkId::new(&name, layout), |b| {
                b.iter(|| LoadedModel::open_with(&path, &device, &opts).expect("load"))
            });
        }
        group.finish();

        let loaded = LoadedModel::open(&path, &device).expect("load");
        let model = &loaded.model;

        let mut group = c.benchmark_group("prefill");
        group.sample_size(10);
        group.throughput(Throughput::Elements(PROMPT as u64));
        let prompt = tokens(model, PROMPT, 0);
        group.bench_function(BenchmarkId::new(&name, PROMPT), |b| {
            b.iter(|| {
                let mut cache = model.new_cache(PROMPT).expect("cache");
                model
                    .forward(&prompt, &mut cache, Logits::Last)
                    .expect("prefill")
            })
        });
        group.finish();

        let mut group = c.benchmark_group("decode");
        group.throughput(Throughput::Elements(1));
        let mut one = DecodeBatch::new(model, 1, DECODE_CTX).expect("prefill");
        group.bench_function(BenchmarkId::new(&name, format!("ctx{DECODE_CTX}")), |b| {
            b.iter(|| one.step(model).expect("decode"))
        });
        group.finish();

        let mut group = c.benchmark_group(format!("batch{BATCH}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        let mut eight = DecodeBatch::new(model, BATCH, BATCH_CTX).expect("prefill");
        group.bench_function(BenchmarkId::new(&name, format!("ctx{BATCH_CTX}")), |b| {
            b.iter(|| eight.step(model).expect("step"))
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
