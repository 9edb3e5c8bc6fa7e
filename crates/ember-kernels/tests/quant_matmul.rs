//! `quant_matmul` and `causal_attention` through burn's dispatch, against f64 references.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use ember_kernels::{
    QuantMatrix, SoloRow, causal_attention, quant_matmul, quant_matmul_many, quant_matmul_solo,
};
use ember_quant::GgmlType;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn device() -> Device {
    #[cfg(feature = "flex")]
    {
        Device::flex()
    }
    #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
    #[allow(deprecated)]
    {
        Device::ndarray()
    }
}

const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
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
];

#[test]
fn quant_matmul_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    for &ty in TYPES {
        let k = if ty.block_size() == 256 { 512 } else { 96 };
        let n = 40;
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let qm = Arc::new(QuantMatrix::quantize(ty, n, k, &w).unwrap());
        let wd = qm.dequantize_all();
        for m in [1usize, 3, 8, 17] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device());
            let got = quant_matmul(xt, &qm)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            for i in 0..m {
                let xnorm = x[i * k..(i + 1) * k]
                    .iter()
                    .map(|v| (*v as f64).abs())
                    .fold(0.0, f64::max);
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| wd[j * k + c] as f64 * x[i * k + c] as f64)
                        .sum();
                    // 8-bit activations (integer paths) cost up to ~1/254 of the block max per term.
                    let wnorm: f64 = (0..k).map(|c| (wd[j * k + c] as f64).abs()).sum();
                    let tol = 1e-4 * (1.0 + want.abs()) + wnorm * xnorm / 200.0;
                    let g = got[i * n + j] as f64;
                    assert!(
                        (g - want).abs() <= tol,
                        "{ty} m={m} ({i},{j}): {g} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

/// `quant_matmul_many` gives each weight's own `quant_matmul` (with solo rows,
/// `quant_matmul_solo`) bits, repacked or not, at the row counts where a single call changes
/// path: one row, Q4_K's gemm fold from 4, Q6_K's tiles from 8, the float GEMM of Q5_K and
/// other K-quants from 64, F16's from 8.
#[test]
fn many_weights_equal_their_separate_calls() {
    use GgmlType::{F16, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0};
    let mut rng = StdRng::seed_from_u64(0x3a11);
    let k = 512;
    let sets: [&[GgmlType]; 4] = [
        &[Q4_1, Q4_1, Q8_0],
        &[Q5_K, Q5_K, Q6_K],
        &[Q4_K, Q6_K],
        &[Q5_0, F16],
    ];
    let bits = |t: Tensor<2>| {
        t.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for set in sets {
        for repack in [false, true] {
            let ws: Vec<Arc<QuantMatrix>> = set
                .iter()
                .zip([32usize, 17, 48])
                .map(|(&ty, n)| {
                    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                    let mut qm = QuantMatrix::quantize(ty, n, k, &w).unwrap();
                    if repack {
                        qm.repack();
                    }
                    Arc::new(qm)
                })
                .collect();
            for m in [1usize, 4, 8, 63, 64, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
                let xt = Tensor::<2>::from_data(TensorData::new(x, [m, k]), &device());
                // Decode rows of m sequences, as `ember serve` batches them.
                let decode: Arc<[SoloRow]> = (0..m).map(|_| SoloRow { m: 1, i: 0 }).collect();
                for solo in [None, Some(&decode)] {
                    let got = quant_matmul_many(xt.clone(), &ws, solo);
                    assert_eq!(got.len(), ws.len());
                    for (w, g) in ws.iter().zip(got) {
                        let want = match solo {
                            Some(s) => quant_matmul_solo(xt.clone(), w, s),
                            None => quant_matmul(xt.clone(), w),
                        };
                        assert!(
                            bits(g) == bits(want),
                            "{set:?} repack={repack} m={m} solo={} {}",
                            solo.is_some(),
                            w.ggml_type()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rows_are_independent_of_batch_size() {
    let mut rng = StdRng::seed_from_u64(6);
    for &ty in TYPES {
        let k = if ty.block_size() == 256 { 256 } else { 64 };
        let n = 24;
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let qm = Arc::new(QuantMatrix::quantize(ty, n, k, &w).unwrap());
        let m = 12;
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
        let all = quant_matmul(
            Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device()),
            &qm,
        )
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
        for i in 0..m {
            let one = quant_matmul(
                Tensor::<2>::from_data(
                    TensorData::new(x[i * k..(i + 1) * k].to_vec(), [1, k]),
                    &device(),
                ),
                &qm,
            )
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
            for j in 0..n {
                let (a, b) = (one[j], all[i * n + j]);
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{ty} row {i} col {j}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn attention_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..10 {
        let (n_kv, group, d) = (rng.random_range(1..3), rng.random_range(1..4), 16);
        let n_head = n_kv * group;
        let t = rng.random_range(1..20);
        let n = rng.random_range(1..=t);
        let mut fill =
            |len| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0f32)).collect() };
        let (q, k, v) = (fill(n_head * n * d), fill(n_kv * t * d), fill(n_kv * t * d));
        let dev = device();
        let out = causal_attention(
            Tensor::from_data(TensorData::new(q.clone(), [n_head, n, d]), &dev),
            Tensor::from_data(TensorData::new(k.clone(), [n_kv, t, d]), &dev),
            Tensor::from_data(TensorData::new(v.clone(), [n_kv, t, d]), &dev),
            0.25,
        )
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
        for h in 0..n_head {
            let kvh = h / group;
            for i in 0..n {
                let vis = t - n + i + 1;
                let s: Vec<f64> = (0..vis)
                    .map(|j| {
                        0.25 * (0..d)
                            .map(|x| {
                                q[(h * n + i) * d + x] as f64 * k[(kvh * t + j) * d + x] as f64
                            })
                            .sum::<f64>()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    let want = (0..vis)
                        .map(|j| e[j] * v[(kvh * t + j) * d + x] as f64)
                        .sum::<f64>()
                        / z;
                    let got = out[(i * n_head + h) * d + x] as f64;
                    assert!((got - want).abs() < 5e-3, "{got} vs {want}");
                }
            }
        }
    }
}
