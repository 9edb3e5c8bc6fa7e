//! Packed group-quantized weights ([`QuantMatrix::packed`]) against ggml blocks and the
//! dequantize-at-load alternative.
//!
//! Shapes are `k x n` (input x output features): SmolLM2-135M's MLP up (576x1536) and down
//! (1536x576). Per shape: AWQ-GEMM 4-bit g64, GPTQ 4-bit g64 (v2, asymmetric, no act-order),
//! GPTQ 4-bit g64 with act-order, EXL2 ~4.1 bpw (4/5-bit groups of 32, permuted rows),
//! compressed-tensors 4-bit g64 symmetric (bf16 scales) without and with act-order, Q4_1
//! (ggml, the closest legacy block format) and F16 (what dequantizing the AWQ weight at load and
//! storing it as a `QuantMatrix` gives). Bench ids read `packed/<format>/<k>x<n>/m<m>`.
//! m = 1 reports `Throughput::Bytes(storage bytes)`; m = 8 and 16 report FLOP/s as elements.
//! Run e.g. `cargo bench -p ember-kernels --bench packed -- --warm-up-time 1 --measurement-time 3`.

use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_kernels::{QuantMatrix, quant_matmul};
use ember_quant::GgmlType;
use ember_quant::group::{ByteView, PackedLinear, awq, ct, exl2, gptq};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

const SHAPES: [(usize, usize); 2] = [(576, 1536), (1536, 576)];
const BATCHES: [usize; 3] = [1, 8, 16];

fn random(rng: &mut StdRng, len: usize, range: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-range..range)).collect()
}

fn bv(v: Vec<u8>) -> ByteView {
    ByteView::from_vec(v)
}

fn weights(k: usize, n: usize) -> Vec<(String, QuantMatrix)> {
    let mut rng = StdRng::seed_from_u64((k * 31 + n) as u64);
    let w = random(&mut rng, n * k, 1.0);
    let mut out = Vec::new();
    let t = awq::quantize(&w, n, k, 64).unwrap();
    let awq = QuantMatrix::packed(PackedLinear::AwqGemm {
        k,
        n,
        group_size: 64,
        bits: 4,
        qweight: bv(t.qweight),
        qzeros: bv(t.qzeros),
        scales: bv(t.scales),
    })
    .unwrap();
    let dense = awq.dequantize_all();
    out.push(("awq4-g64".to_string(), awq));
    let mut perm: Vec<u32> = (0..k as u32).collect();
    perm.shuffle(&mut rng);
    for act in [false, true] {
        let t = gptq::quantize(
            &w,
            n,
            k,
            &gptq::GptqOptions {
                bits: 4,
                group_size: 64,
                act_order: act.then_some(&perm[..]),
                sym: false,
                format: gptq::GptqZeros::V2,
            },
        )
        .unwrap();
        let name = if act {
            "gptq4-g64-actorder"
        } else {
            "gptq4-g64"
        };
        let q = QuantMatrix::packed(PackedLinear::Gptq {
            k,
            n,
            bits: 4,
            group_size: 64,
            zeros: gptq::GptqZeros::V2,
            qweight: bv(t.qweight),
            qzeros: bv(t.qzeros),
            scales: bv(t.scales),
            g_idx: Some(bv(t.g_idx)),
        })
        .unwrap();
        out.push((name.to_string(), q));
    }
    let plan = exl2::plan(k, 32, 4.1).unwrap();
    let t = exl2::quantize(&w, n, k, &plan, 32, exl2::Exl2Perm::ColumnNorm).unwrap();
    let q = QuantMatrix::packed(PackedLinear::Exl2 {
        k,
        n,
        q_weight: bv(t.q_weight),
        q_scale: bv(t.q_scale),
        q_scale_max: bv(t.q_scale_max),
        q_groups: bv(t.q_groups),
        q_invperm: bv(t.q_invperm),
    })
    .unwrap();
    out.push(("exl2-4.1bpw".to_string(), q));
    let t = ct::quantize(&w, n, k, 4, 64, true, ct::ScaleDtype::Bf16).unwrap();
    for act in [false, true] {
        // Act-order: a shuffled (valid) group index per input.
        let gidx = act.then(|| {
            let mut gi: Vec<i32> = (0..k).map(|i| (i / 64) as i32).collect();
            gi.shuffle(&mut rng);
            bv(gi.iter().flat_map(|v| v.to_le_bytes()).collect())
        });
        let name = if act {
            "ct4-g64-sym-actorder"
        } else {
            "ct4-g64-sym"
        };
        let q = QuantMatrix::packed(PackedLinear::Ct {
            k,
            n,
            bits: 4,
            group_size: 64,
            scale_dtype: ct::ScaleDtype::Bf16,
            weight_packed: bv(t.weight_packed.clone()),
            weight_scale: bv(t.weight_scale.clone()),
            weight_shape: bv(t.weight_shape.clone()),
            weight_zero_point: t.weight_zero_point.clone().map(bv),
            weight_g_idx: gidx,
        })
        .unwrap();
        out.push((name.to_string(), q));
    }
    out.push((
        "q4_1".to_string(),
        QuantMatrix::quantize(GgmlType::Q4_1, n, k, &w).unwrap(),
    ));
    out.push((
        "f16-dequantized-at-load".to_string(),
        QuantMatrix::quantize(GgmlType::F16, n, k, &dense).unwrap(),
    ));
    out
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("packed");
    let device = Device::flex();
    for (k, n) in SHAPES {
        for (name, w) in weights(k, n) {
            let w = Arc::new(w);
            for m in BATCHES {
                let mut rng = StdRng::seed_from_u64(m as u64);
                let x = random(&mut rng, m * k, 3.0);
                group.throughput(if m == 1 {
                    Throughput::Bytes(w.storage_bytes() as u64)
                } else {
                    Throughput::Elements((2 * m * k * n) as u64)
                });
                group.bench_function(
                    BenchmarkId::new(format!("{name}/{k}x{n}"), format!("m{m}")),
                    |b| {
                        b.iter(|| {
                            let xt =
                                Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
                            quant_matmul(xt, &w).into_data()
                        })
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
