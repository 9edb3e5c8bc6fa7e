//! The CubeCL kernels on the first wgpu adapter (Mesa's lavapipe where the machine has no GPU),
//! against f64 references and against the CPU kernels on burn-flex. GPU float order differs
//! from the CPU kernels', so matmuls and norms compare within a tolerance; rounding to f16 is
//! integer arithmetic and compares bit for bit.
//!
//! Where no Vulkan, Metal or DX12 adapter exists every test prints why and passes.
#![cfg(all(feature = "wgpu", feature = "flex"))]

use std::sync::{Arc, OnceLock};

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use ember_kernels::{QuantMatrix, quant_matmul, rms_norm, round_to_f16};
use ember_quant::GgmlType;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The wgpu device, or `None` (with the reason printed) where none comes up.
fn gpu() -> Option<Device> {
    static GPU: OnceLock<Result<Device, String>> = OnceLock::new();
    let found = GPU.get_or_init(|| {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let probe = device.clone();
        std::panic::catch_unwind(move || {
            let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &probe);
            t.into_data().try_to_vec::<f32>().expect("f32 data")
        })
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into())
        })
        .and_then(|v| {
            if v == [1.0, 2.0] {
                Ok(device)
            } else {
                Err(format!("a round trip through the device gave {v:?}"))
            }
        })
    });
    match found {
        Ok(d) => Some(d.clone()),
        Err(why) => {
            println!("skipped: no wgpu device ({why})");
            None
        }
    }
}

fn upload<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 data")
}

/// Every type: read in place (the first eight) or dequantized at upload (the rest).
const TYPES: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
];

#[test]
fn quant_matmul_matches_f64_reference_and_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = StdRng::seed_from_u64(18);
    for &ty in TYPES {
        // Row counts around the 64-thread cube and past one K-quant super-block; one row
        // longer than the cube's threads times 32 values.
        let shapes: &[(usize, usize)] = if ty.block_size() == 256 {
            &[(1, 256), (7, 512), (33, 2304)]
        } else {
            &[(1, 32), (5, 96), (70, 640), (3, 2080)]
        };
        for &(n, k) in shapes {
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let qm = Arc::new(QuantMatrix::quantize(ty, n, k, &w).expect("quantize"));
            let wd = qm.dequantize_all();
            for m in [1usize, 2, 9] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
                let got = to_vec(quant_matmul(upload(&x, [m, k], &gpu), &qm));
                let on_cpu = to_vec(quant_matmul(upload(&x, [m, k], &cpu), &qm));
                for i in 0..m {
                    let xmax = x[i * k..(i + 1) * k]
                        .iter()
                        .map(|v| (*v as f64).abs())
                        .fold(0.0, f64::max);
                    for j in 0..n {
                        let (xr, wr) = (&x[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k]);
                        let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        // f32 sums of k products: a few ulps of the magnitude.
                        let tol = 1e-6 * mag * (k as f64).sqrt() + 1e-6;
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= tol,
                            "{ty} {n}x{k} m={m} ({i},{j}): gpu {g} vs f64 {want} (tol {tol})"
                        );
                        // The CPU kernels quantize activations to 8 bits where llama.cpp
                        // does: up to half a step (max|x| / 254) per term.
                        let wsum: f64 = wr.iter().map(|v| (*v as f64).abs()).sum();
                        let cpu_tol = tol + wsum * xmax / 254.0 * 1.01;
                        let c = on_cpu[i * n + j] as f64;
                        assert!(
                            (g - c).abs() <= cpu_tol,
                            "{ty} {n}x{k} m={m} ({i},{j}): gpu {g} vs cpu {c} (tol {cpu_tol})"
                        );
                    }
                }
            }
            assert_eq!(
                qm.device_size(),
                match ty {
                    GgmlType::F16 | GgmlType::BF16 | GgmlType::Q2_K | GgmlType::Q3_K => n * k * 4,
                    _ => qm.bytes().len().next_multiple_of(4),
                },
                "{ty}: device bytes"
            );
        }
    }
}

/// `out[i, j] = x[i] . w[j]` in f64 off the dequantized weight, and how far an f32 result may
/// be from it (a few ulps of the products' magnitude per sqrt(k) terms).
fn reference(x: &[f32], wd: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut want = Vec::with_capacity(m * n);
    let mut tol = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let (xr, wr) = (&x[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k]);
            want.push(xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum());
            let mag: f64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            tol.push(1e-6 * mag * (k as f64).sqrt() + 1e-30);
        }
    }
    (want, tol)
}

/// Edges of the grid and of the blocks: more weight rows than one dimension of cubes holds
/// (65535), block scales that are f16 subnormals, and row widths that are not whole 32-value
/// chunks (F32/F16 only; the generic path).
#[test]
fn quant_matmul_edges() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(65537);
    let cases: &[(GgmlType, usize, usize, f32)] = &[
        (GgmlType::Q8_0, 65537, 32, 1.0),
        (GgmlType::Q4_0, 3, 64, 1e-4),
        (GgmlType::Q4_1, 3, 64, 1e-4),
        (GgmlType::Q5_0, 3, 64, 1e-4),
        (GgmlType::Q5_1, 3, 64, 1e-4),
        (GgmlType::Q8_0, 3, 64, 1e-4),
        (GgmlType::Q4_K, 3, 256, 1e-4),
        (GgmlType::Q5_K, 3, 256, 1e-4),
        (GgmlType::Q6_K, 3, 256, 1e-2),
        (GgmlType::F32, 5, 33, 1.0),
        (GgmlType::F16, 5, 33, 1.0),
    ];
    for &(ty, n, k, amp) in cases {
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-amp..amp)).collect();
        let qm = Arc::new(QuantMatrix::quantize(ty, n, k, &w).expect("quantize"));
        let wd = qm.dequantize_all();
        assert!(
            wd.iter().any(|v| *v != 0.0),
            "{ty}: some weight survives quantization"
        );
        for m in [1usize, 9] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
            let got = to_vec(quant_matmul(upload(&x, [m, k], &gpu), &qm));
            let (want, tol) = reference(&x, &wd, m, n, k);
            for (i, ((g, w), t)) in got.iter().zip(&want).zip(&tol).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= *t,
                    "{ty} {n}x{k} m={m} [{i}]: gpu {g} vs f64 {w} (tol {t})"
                );
            }
        }
    }
}

#[test]
fn a_weight_is_uploaded_once_and_reused() {
    let Some(gpu) = gpu() else { return };
    let (n, k) = (48, 64);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect();
    let qm = Arc::new(QuantMatrix::quantize(GgmlType::Q8_0, n, k, &w).expect("quantize"));
    let x: Vec<f32> = (0..k).map(|i| i as f32 / k as f32).collect();
    let first = to_vec(quant_matmul(upload(&x, [1, k], &gpu), &qm));
    assert_eq!(qm.device_copy_count(), 1);
    let second = to_vec(quant_matmul(upload(&x, [1, k], &gpu), &qm));
    assert_eq!(
        qm.device_copy_count(),
        1,
        "the second call reuses the device copy"
    );
    assert_eq!(first, second);
}

#[test]
fn round_to_f16_is_bit_exact() {
    let Some(gpu) = gpu() else { return };
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.996,
        65520.0,
        -65520.0,
        1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        6.103_515_6e-5,     // smallest normal f16
        6.097_555e-5,       // just below it
        5.960_464_5e-8,     // smallest subnormal f16
        2.980_232_2e-8,     // half of it: ties to even, to zero
        2.980_232_5e-8,     // just above half: rounds up
        8.940_697e-8,       // 1.5 subnormal steps: ties to even, to 2 steps
        1.0 + 1.0 / 2048.0, // a tie between two f16s: to even
        1.0 + 3.0 / 2048.0, // a tie: to even (up)
        f32::MIN_POSITIVE,
        1e-45,
    ];
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..20_000 {
        let bits: u32 = rng.random();
        let v = f32::from_bits(bits);
        if !v.is_nan() {
            values.push(v);
        }
        values.push(rng.random_range(-70000.0..70000.0f32));
        values.push(rng.random_range(-1e-4..1e-4f32));
    }
    let n = values.len();
    let got = to_vec(round_to_f16(upload(&values, [n], &gpu)));
    for (v, g) in values.iter().zip(&got) {
        let want = half::f16::from_f32(*v).to_f32();
        assert_eq!(
            g.to_bits(),
            want.to_bits(),
            "{v:e}: gpu {g:e}, want {want:e}"
        );
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, d) in [(1, 64), (3, 576), (5, 640), (2, 2049)] {
        let x: Vec<f32> = (0..rows * d)
            .map(|_| rng.random_range(-3.0..3.0f32))
            .collect();
        let w: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0f32)).collect();
        let run = |dev: &Device| {
            to_vec(rms_norm(
                upload(&x, [rows, d], dev),
                &upload(&w, [d], dev),
                1e-6,
            ))
        };
        let (g, c) = (run(&gpu), run(&cpu));
        for (i, (a, b)) in g.iter().zip(&c).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "rms_norm {rows}x{d} [{i}]: gpu {a} vs cpu {b}"
            );
        }
    }
}
