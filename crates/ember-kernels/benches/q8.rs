//! `quant_matmul_rows` on SmolLM2-135M's matrix shapes (hidden 576, MLP 1536, vocab 49152).
//!
//! Shapes are named `k x n` (input features x output features). For `m = 1` (decode) the
//! throughput is the weight bytes streamed per call; for `m = 64` (prefill) it is the same
//! bytes, so GB/s there reads as "weight bytes per second", a proxy for work done.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_kernels::QuantMatrix;
use ember_kernels::cpu::quant_matmul_rows;
use ember_quant::GgmlType;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn matrix(ty: GgmlType, n: usize, k: usize, rng: &mut StdRng) -> QuantMatrix {
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
    QuantMatrix::quantize(ty, n, k, &w).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let cases = [
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_0, 576, 1536),
        (GgmlType::Q4_0, 1536, 576),
        (GgmlType::Q8_0, 576, 49152),
    ];
    let mut group = c.benchmark_group("quant_matmul_rows");
    group.sample_size(20);
    for (ty, k, n) in cases {
        let w = matrix(ty, n, k, &mut rng);
        for m in [1usize, 64] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
            group.throughput(Throughput::Bytes(w.bytes().len() as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{ty}/{k}x{n}"), format!("m{m}")),
                &x,
                |b, x| b.iter(|| quant_matmul_rows(&w, x, m)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
