//! Decode's weight stream from DRAM: one activation row against every matrix of a 1B-class
//! llama (Llama 3.2 1B's layer shapes, 16 layers: 7 matmuls of 0.6-9.4 MB a layer, about
//! 550 MB at Q4_0, more than the caches hold), in model order, as `quant_matmul_rows` runs them in a
//! decode step, from a rayon worker (`rayon::scope`) as `Model::forward_batch_with` runs its
//! pass. Unlike the model, it does not keep the other workers polling between calls
//! (`keep_awake`), so a worker may fall asleep between two matmuls. `Throughput::Bytes` is the
//! weight bytes, so criterion's GB/s reads against the machine's DRAM bandwidth. The `one`
//! variant streams the same bytes as a single matrix: the gap between the two is what the
//! per-call cost (task spawn and join, any worker wake-up, activation quantization, a cold
//! start of each stream) takes.
//!
//! `cargo bench -p ember-kernels --bench decode_stream`; ids read
//! `decode_stream/<type>/<layers|one>/<packed|repacked>`. Quantizing the weights takes a few
//! seconds a type (K-quants most of a minute); `DECODE_STREAM_TYPES=Q4_K,Q5_K` picks types
//! (default: Q4_0, Q8_0, Q4_K and Q5_K; Q6_K and the others by name).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_kernels::QuantMatrix;
use ember_kernels::cpu::quant_matmul_rows;
use ember_quant::GgmlType;
use rand::{Rng, SeedableRng, rngs::StdRng};

const HIDDEN: usize = 2048;
const FFN: usize = 8192;
const KV: usize = 512;
const LAYERS: usize = 16;

/// `(k, n)` of one layer's matmuls, in the order a decode step runs them.
const LAYER: [(usize, usize); 7] = [
    (HIDDEN, HIDDEN),
    (HIDDEN, KV),
    (HIDDEN, KV),
    (HIDDEN, HIDDEN),
    (HIDDEN, FFN),
    (HIDDEN, FFN),
    (FFN, HIDDEN),
];

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn matrix(ty: GgmlType, n: usize, k: usize, seed: u64) -> QuantMatrix {
    QuantMatrix::quantize(ty, n, k, &random(n * k, seed)).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_stream");
    let types =
        std::env::var("DECODE_STREAM_TYPES").unwrap_or_else(|_| "Q4_0,Q8_0,Q4_K,Q5_K".into());
    for name in types.split(',') {
        use GgmlType::*;
        let known = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K];
        let Some(ty) = known
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
        else {
            panic!("DECODE_STREAM_TYPES: unknown type {name:?}");
        };
        let mut layers: Vec<QuantMatrix> = (0..LAYERS)
            .flat_map(|l| LAYER.iter().enumerate().map(move |(i, &s)| (l * 7 + i, s)))
            .map(|(seed, (k, n))| matrix(ty, n, k, seed as u64))
            .collect();
        let rows: usize = LAYER.iter().map(|&(k, n)| k * n).sum::<usize>() * LAYERS / HIDDEN;
        let mut one = vec![matrix(ty, rows, HIDDEN, 999)];
        let bytes: usize = layers.iter().map(|w| w.bytes().len()).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        let xs: Vec<Vec<f32>> = [HIDDEN, FFN].iter().map(|&k| random(k, k as u64)).collect();
        let x = |k: usize| &xs[usize::from(k == FFN)];
        for repack in [false, true] {
            if repack && !(layers.iter_mut().all(|w| w.repack()) && one[0].repack()) {
                continue; // No repacked layout on this CPU.
            }
            let layout = if repack { "repacked" } else { "packed" };
            for (name, ws) in [("layers", &layers), ("one", &one)] {
                group.bench_function(BenchmarkId::new(format!("{ty}/{name}"), layout), |b| {
                    b.iter(|| {
                        rayon::scope(|_| {
                            for w in ws.iter() {
                                std::hint::black_box(quant_matmul_rows(w, x(w.cols()), 1));
                            }
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
