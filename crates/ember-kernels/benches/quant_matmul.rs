//! `quant_matmul_rows` across weight types and real model shapes.
//!
//! Shapes are named `k x n` (input features x output features): SmolLM2-135M's attention/MLP
//! (576x1536, 1536x576), SmolLM2-360M's hidden/MLP (640x2048) and a 7B-class square projection
//! (4096x4096). Bench ids read `quant_matmul/<type>/<k>x<n>/m<m>` with ggml's type names
//! (`q4_0`, `q4_K`, `f16`), so a filter such as `q4_1/576x1536` or `4096x4096/m1` selects a
//! subset. A full default run takes several minutes: the K-quant and F16 4096x4096 m = 64
//! cases are ~0.7 s per iteration on 2 cores.
//!
//! Throughput:
//! - `m = 1` (decode) reports `Throughput::Bytes(weight bytes)`: decode is bound by streaming the
//!   weights, so criterion's GB/s is the effective weight bandwidth.
//! - `m = 8` (eight sequences decoding together, continuous batching) and `m = 64` (prefill)
//!   report `Throughput::Elements(2 * m * k * n)`: criterion's "elem/s" is FLOP/s (one
//!   multiply and one add per weight per activation row).
//!
//! Besides the shapes above, Q8_0 also runs SmolLM2's tied output projection (576x49152), the
//! largest matmul of a decode step.
//!
//! K-quants (Q2_K..Q6_K) need `k` to be a multiple of 256. 576 and 640 are not, so for those
//! types 576 becomes 512 (576x1536 -> 512x1536) and 640 becomes 768 (640x2048 -> 768x2048);
//! the bench id carries the shape actually measured.
//!
//! What runs is exactly `quant_matmul_rows`: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 take the 8-bit
//! activation path (packed dots for m = 1 and for m up to 8, unpacked tiles above); K-quants
//! quantize activations to Q8_K and take integer dots per (row, activation row) (`cpu::kquant`);
//! F16 takes `ember_quant::dot_row`. In the model (burn-flex), Q4_K and Q6_K take this function
//! at every batch size (llama.cpp's integer arithmetic, bit for bit); the other K-quants go
//! through burn-flex's GEMM on dequantized weights from 64 rows, so their m = 64 numbers here
//! are not the model's prefill path.
//!
//! Types the loader repacks on this CPU (`QuantMatrix::repack`: on AVX-512 VNNI, Q4_0..Q8_0
//! and Q4_K..Q6_K) run a second time from the repacked copy, as a loaded model does, with ids
//! `<type>/<k>x<n>/repacked/m<m>`.
//!
//! Matrices are quantized lazily, only for the benches the filter selects (quantizing a
//! 4096x4096 K-quant matrix takes a while). Defaults: 10 samples, 0.5 s warm-up, 2 s measurement;
//! `--warm-up-time` / `--measurement-time` on the command line override them.

use std::cell::OnceCell;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_kernels::QuantMatrix;
use ember_kernels::cpu::quant_matmul_rows;
use ember_quant::GgmlType;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// `(k, n)`: input features x output features.
const SHAPES: [(usize, usize); 4] = [(576, 1536), (1536, 576), (640, 2048), (4096, 4096)];

const TYPES: [GgmlType; 11] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F16,
];

const BATCHES: [usize; 3] = [1, 8, 64];

/// `(type, k, n)` run only for that type: SmolLM2-135M's Q8_0 output projection.
const EXTRA: [(GgmlType, usize, usize); 1] = [(GgmlType::Q8_0, 576, 49152)];

/// The nearest `k` the type's block size divides (576 -> 512, 640 -> 768 for 256-wide blocks).
fn valid_k(ty: GgmlType, k: usize) -> usize {
    let block = ty.block_size();
    if k.is_multiple_of(block) {
        return k;
    }
    let down = k / block * block;
    let up = down + block;
    if down > 0 && k - down < up - k {
        down
    } else {
        up
    }
}

fn random(len: usize, range: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-range..range)).collect()
}

/// Whether `QuantMatrix::repack` repacks `ty` on this CPU (tried on one small row).
fn repackable(ty: GgmlType) -> bool {
    let k = ty.block_size().max(256);
    QuantMatrix::quantize(ty, 1, k, &random(k, 1.0, 1)).is_ok_and(|mut m| m.repack())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("quant_matmul");
    let cases = SHAPES
        .iter()
        .flat_map(|&(k, n)| TYPES.iter().map(move |&ty| (ty, k, n)))
        .chain(EXTRA);
    for (ty, k0, n) in cases {
        let k = valid_k(ty, k0);
        let weight_bytes = (n * k / ty.block_size() * ty.type_size()) as u64;
        let w: OnceCell<QuantMatrix> = OnceCell::new();
        let weights = || {
            w.get_or_init(|| {
                let values = random(n * k, 1.0, (k * 31 + n) as u64);
                QuantMatrix::quantize(ty, n, k, &values).unwrap()
            })
        };
        // The repacked copy, or `None` where this CPU's kernels read the blocks as they are.
        let r: OnceCell<Option<QuantMatrix>> = OnceCell::new();
        let repacked = || {
            r.get_or_init(|| {
                let mut m = weights().clone();
                m.repack().then_some(m)
            })
            .as_ref()
        };
        let repackable = repackable(ty);
        for m in BATCHES {
            let x = random(m * k, 3.0, m as u64);
            group.throughput(if m == 1 {
                Throughput::Bytes(weight_bytes)
            } else {
                // Elements = FLOPs: criterion's elem/s reads as FLOP/s.
                Throughput::Elements((2 * m * k * n) as u64)
            });
            group.bench_function(
                BenchmarkId::new(format!("{ty}/{k}x{n}"), format!("m{m}")),
                |b| {
                    let w = weights();
                    b.iter(|| quant_matmul_rows(w, &x, m))
                },
            );
            if repackable {
                group.bench_function(
                    BenchmarkId::new(format!("{ty}/{k}x{n}/repacked"), format!("m{m}")),
                    |b| {
                        let w = repacked().expect("repackable on this CPU");
                        b.iter(|| quant_matmul_rows(w, &x, m))
                    },
                );
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
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
