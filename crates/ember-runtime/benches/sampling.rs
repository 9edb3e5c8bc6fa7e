//! One sampling step over a whole vocabulary's logits: SmolLM2's 49152 and Gemma 3's 262144,
//! with the server's default chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8), with
//! repetition penalties over 64 tokens, and greedy. Every `ember serve` stream pays this once
//! a token on the scheduler thread.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_runtime::sampling::{Sampler, SamplingParams};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut group = c.benchmark_group("sample");
    group.sample_size(30);
    for vocab in [49_152usize, 262_144] {
        // Logits of a real model's spread: most far below the few best.
        let logits: Vec<f32> = (0..vocab)
            .map(|_| rng.random_range(-12.0..4.0f32) + rng.random_range(-2.0..2.0f32))
            .collect();
        let history: Vec<u32> = (0..256)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let chains = [
            ("default", SamplingParams::default()),
            (
                "penalties",
                SamplingParams {
                    repeat_penalty: 1.1,
                    presence_penalty: 0.5,
                    ..SamplingParams::default()
                },
            ),
            ("greedy", SamplingParams::greedy()),
        ];
        group.throughput(Throughput::Elements(vocab as u64));
        for (name, params) in chains {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(1),
                ..params
            });
            group.bench_with_input(BenchmarkId::new(name, vocab), &logits, |b, l| {
                b.iter(|| s.sample(l, &history))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
