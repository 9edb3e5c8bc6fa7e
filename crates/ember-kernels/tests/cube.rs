//! The CubeCL kernels on the first wgpu adapter (Mesa's lavapipe where the machine has no GPU),
//! against f64 references and against the CPU kernels on burn-flex. GPU float order differs
//! from the CPU kernels', so matmuls and norms compare within a tolerance; rounding to f16 is
//! integer arithmetic and compares bit for bit.
//!
//! Where no Vulkan, Metal or DX12 adapter exists every test prints why and passes.
#![cfg(all(feature = "wgpu", feature = "flex"))]

use std::sync::{Arc, OnceLock};

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use ember_kernels::{
    KvDtype, PagedAttention, PagedLayerStore, QuantMatrix, RopeScaling, SeqAttn, geglu,
    paged_attention, paged_write, quant_matmul, residual_add, rms_norm, rope, round_to_f16, swiglu,
};
use ember_quant::GgmlType;
use rand::seq::SliceRandom;
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

/// Values around every f16 rounding case: ties between neighbours (both parities), f16
/// subnormals and their ties, overflow to infinity, signed zeros, NaN.
fn f16_edge_values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let h = half::f16::from_bits(rng.random_range(0..0x7C00u16));
        let next = half::f16::from_bits(h.to_bits() + 1).to_f32();
        let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
        let v = match rng.random_range(0..6) {
            0 => (h.to_f32() + next) / 2.0,
            1 => h.to_f32(),
            2 => rng.random_range(-1.0e-5..1.0e-5),
            3 => [65504.0, 65519.0, 65520.0, 1.0e6, 0.0, 2.9802322e-8][rng.random_range(0..6)],
            4 => f32::NAN,
            _ => rng.random_range(-70000.0..70000.0),
        };
        out.push(sign * v);
    }
    out
}

/// `paged_write` into a store kept on the device stores the bytes the host store's `write`
/// stores: f16 rounding (ties to even, subnormals, overflow) bit for bit, f32 unchanged,
/// rows in any slot order, and a block copy (copy-on-write) copies every head.
#[test]
fn paged_write_on_device_stores_the_host_stores_bytes() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(31);
    for dtype in [KvDtype::F16, KvDtype::F32] {
        let (n_blocks, bs, n_kv, d) = (9, 5, 2, 64);
        let mut host = PagedLayerStore::new(dtype, n_blocks, bs, n_kv, d).unwrap();
        let mut dev = PagedLayerStore::new_on(dtype, n_blocks, bs, n_kv, d, &gpu).unwrap();
        assert!(dev.is_on_device() && !host.is_on_device());
        assert_eq!(dev.bytes(), host.bytes());
        // Every slot of the first 8 blocks once, in a random order, in three calls.
        let mut slots: Vec<u32> = (0..(8 * bs) as u32).collect();
        slots.shuffle(&mut rng);
        for part in slots.chunks(17) {
            let k = f16_edge_values(&mut rng, part.len() * n_kv * d);
            let v = f16_edge_values(&mut rng, part.len() * n_kv * d);
            for (i, &at) in part.iter().enumerate() {
                let row = i * n_kv * d..(i + 1) * n_kv * d;
                let (b, s) = (at as usize / bs, at as usize % bs);
                host.write(b, s, &k[row.clone()], &v[row]).unwrap();
            }
            let shape = [part.len(), n_kv, d];
            paged_write(
                &mut dev,
                upload(&k, shape, &gpu),
                upload(&v, shape, &gpu),
                part,
            )
            .unwrap();
        }
        host.copy_slots(2, 8, 3).unwrap();
        dev.copy_slots(2, 8, 3).unwrap();
        let back = dev.to_host().unwrap();
        assert!(!back.is_on_device());
        let (mut a, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
        for block in 0..n_blocks {
            for head in 0..n_kv {
                for slot in 0..bs {
                    for which in 0..2 {
                        if which == 0 {
                            host.k_row_f32(block, head, slot, &mut a).unwrap();
                            back.k_row_f32(block, head, slot, &mut b).unwrap();
                        } else {
                            host.v_row_f32(block, head, slot, &mut a).unwrap();
                            back.v_row_f32(block, head, slot, &mut b).unwrap();
                        }
                        for (e, (x, y)) in a.iter().zip(&b).enumerate() {
                            assert!(
                                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                                "{dtype} block {block} head {head} slot {slot} [{e}]: host {x} device {y}"
                            );
                        }
                    }
                }
            }
        }
        // A host operation on the device store is refused, not run on empty arenas.
        assert!(
            dev.write(0, 0, &vec![0.0; n_kv * d], &vec![0.0; n_kv * d])
                .is_err()
        );
        assert!(back.k_row_f32(0, 0, 0, &mut a).is_ok());
        assert!(dev.k_row_f32(0, 0, 0, &mut a).is_err());
    }
}

/// f64 attention of one query head over `keys` (visible positions' K and V rows).
fn attend_f64(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f64> {
    let scores: Vec<f64> = k
        .iter()
        .map(|kr| {
            q.iter()
                .zip(kr)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0.0f64; q.len()];
    for (wi, vr) in w.iter().zip(v) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o += wi / z * *x as f64;
        }
    }
    out
}

/// The flash-attention kernel over a store on the device, against f64 attention over the
/// stored values (read back from the host copy): a decoded token, a short batch with a sliding
/// window, a long batch (tiles of 64 keys and more) with and without a window, GQA groups of
/// 1-4, head dims 64, 80, 128 and 256, blocks of 1-32 slots, shuffled and released table
/// entries, gap rows (zero), both storage types.
#[test]
fn paged_attention_on_device_matches_f64_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(32);
    let mut worst = 0.0f64;
    for case in 0..8 {
        let dtype = [KvDtype::F16, KvDtype::F32][case % 2];
        let d = [64, 80, 128, 256][case / 2];
        let n_kv = rng.random_range(1..=2);
        let n_head = n_kv * [1, 2, 4][rng.random_range(0..3)];
        let bs = [1, 7, 16, 32][rng.random_range(0..4)];
        let shapes: [(usize, usize, Option<usize>); 3] = [
            (rng.random_range(0..150), 1, None),
            (
                rng.random_range(0..100),
                rng.random_range(2..20),
                Some(rng.random_range(1..60)),
            ),
            (
                rng.random_range(0..40),
                rng.random_range(64..72),
                [None, Some(rng.random_range(1..100))][case % 2],
            ),
        ];
        let blocks: usize = shapes.iter().map(|&(p, n, _)| (p + n).div_ceil(bs)).sum();
        let mut pool: Vec<u32> = (0..blocks as u32 + 2).collect();
        pool.shuffle(&mut rng);
        let mut host = PagedLayerStore::new(dtype, pool.len(), bs, n_kv, d).unwrap();
        let mut dev = PagedLayerStore::new_on(dtype, pool.len(), bs, n_kv, d, &gpu).unwrap();
        let mut seqs = Vec::new();
        let mut row = 1;
        for (n_past, n_q, window) in shapes {
            let t = n_past + n_q;
            let mut table: Vec<u32> = pool.drain(..t.div_ceil(bs)).collect();
            let k: Vec<f32> = (0..t * n_kv * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let v: Vec<f32> = (0..t * n_kv * d)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let slots: Vec<u32> = (0..t)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            for (p, &at) in slots.iter().enumerate() {
                let r = p * n_kv * d..(p + 1) * n_kv * d;
                let (b, s) = (at as usize / bs, at as usize % bs);
                host.write(b, s, &k[r.clone()], &v[r]).unwrap();
            }
            let shape = [t, n_kv, d];
            paged_write(
                &mut dev,
                upload(&k, shape, &gpu),
                upload(&v, shape, &gpu),
                &slots,
            )
            .unwrap();
            let mut seq = SeqAttn {
                q_start: row,
                n_q,
                n_past,
                block_table: Arc::from(&[][..]),
                window,
                path_rows: n_q,
            };
            table[..seq.visible_keys().start / bs].fill(u32::MAX);
            seq.block_table = table.into();
            seqs.push(seq);
            row += n_q + 1;
        }
        let n_rows = row;
        let q: Vec<f32> = (0..n_rows * n_head * d)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        seqs.shuffle(&mut rng);
        let seqs: Arc<[SeqAttn]> = seqs.into();
        let scale = 1.0 / (d as f32).sqrt();
        let attn = PagedAttention {
            store: Arc::new(dev),
            seqs: seqs.clone(),
            scale,
        };
        let got = to_vec(paged_attention(upload(&q, [n_rows, n_head, d], &gpu), attn));
        assert_eq!(got.len(), n_rows * n_head * d);
        let mut seen = vec![false; n_rows];
        let group = n_head / n_kv;
        for seq in seqs.iter() {
            for i in 0..seq.n_q {
                let (r, qp) = (seq.q_start + i, seq.n_past + i);
                seen[r] = true;
                let lo = seq.window.map_or(0, |w| (qp + 1).saturating_sub(w));
                for h in 0..n_head {
                    let (mut ks, mut vs) = (Vec::new(), Vec::new());
                    for p in lo..=qp {
                        let b = seq.block_table[p / bs] as usize;
                        let (mut kr, mut vr) = (vec![0.0f32; d], vec![0.0f32; d]);
                        host.k_row_f32(b, h / group, p % bs, &mut kr).unwrap();
                        host.v_row_f32(b, h / group, p % bs, &mut vr).unwrap();
                        ks.push(kr);
                        vs.push(vr);
                    }
                    let at = (r * n_head + h) * d;
                    let want = attend_f64(&q[at..at + d], &ks, &vs, scale);
                    for (e, (g, w)) in got[at..at + d].iter().zip(&want).enumerate() {
                        let err = (*g as f64 - w).abs();
                        worst = worst.max(err);
                        assert!(
                            err <= 2e-5,
                            "case {case} ({dtype}, d {d}, bs {bs}, window {:?}) row {r} head {h} [{e}]: gpu {g} vs {w}",
                            seq.window
                        );
                    }
                }
            }
        }
        for (r, _) in seen.iter().enumerate().filter(|(_, s)| !**s) {
            let at = r * n_head * d;
            assert!(
                got[at..at + n_head * d].iter().all(|&x| x == 0.0),
                "gap row {r}"
            );
        }
    }
    println!("paged attention on the device: worst difference from f64 {worst:e}");
}

/// RoPE (both pairings, a partial rotation, positions past the first few thousand), SwiGLU,
/// GEGLU and the residual add on the device against the CPU kernels. RoPE's angles come from
/// the host on both paths and the rotation is two products and a sum, so the results agree
/// to a few f32 ulps; SwiGLU differs by the GPU's `exp`; GEGLU by ggml's f16 table, which the
/// CPU kernel rounds the gate and its GELU through (up to ~1e-3 of the value).
#[test]
fn rope_and_elementwise_ops_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = StdRng::seed_from_u64(33);
    for (rows, heads, d, rope_dim, neox) in [
        (3, 4, 64, 64, false),
        (5, 2, 128, 128, true),
        (2, 3, 96, 64, true),
        (4, 1, 80, 32, false),
    ] {
        let x: Vec<f32> = (0..rows * heads * d)
            .map(|_| rng.random_range(-3.0..3.0f32))
            .collect();
        let positions: Arc<[u32]> = (0..rows).map(|_| rng.random_range(0..9000)).collect();
        // Llama 3.1-like frequency factors and linear scaling on the partial-rotation cases.
        let scaling = match rope_dim < d {
            false => RopeScaling::NONE,
            true => RopeScaling {
                factors: Some(
                    (0..rope_dim / 2)
                        .map(|_| rng.random_range(1.0..8.0f32))
                        .collect(),
                ),
                freq_scale: 0.25,
            },
        };
        let run = |dev: &Device| {
            to_vec(rope(
                upload(&x, [rows, heads, d], dev),
                positions.clone(),
                rope_dim,
                10000.0,
                scaling.clone(),
                neox,
            ))
        };
        let (g, c) = (run(&gpu), run(&cpu));
        for (i, (a, b)) in g.iter().zip(&c).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "rope {rows}x{heads}x{d} (rope_dim {rope_dim}, neox {neox}) [{i}]: gpu {a} vs cpu {b}"
            );
            if i % d >= rope_dim {
                assert_eq!(a.to_bits(), x[i].to_bits(), "passed through");
            }
        }
    }
    let n = 3000;
    // Gates across GEGLU's +-10 cut-offs and SwiGLU's saturation.
    let gate: Vec<f32> = (0..n).map(|_| rng.random_range(-14.0..14.0f32)).collect();
    let up: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0f32)).collect();
    type Op = fn(Tensor<2>, Tensor<2>) -> Tensor<2>;
    let ops: [(&str, Op, f32); 3] = [
        ("swiglu", swiglu::<2>, 2e-6),
        ("geglu", geglu::<2>, 2e-3),
        ("residual_add", residual_add::<2>, 0.0),
    ];
    for (name, op, tol) in ops {
        let run = |dev: &Device| {
            to_vec(op(
                upload(&gate, [30, 100], dev),
                upload(&up, [30, 100], dev),
            ))
        };
        let (g, c) = (run(&gpu), run(&cpu));
        for (i, (a, b)) in g.iter().zip(&c).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{name} [{i}] (gate {}, up {}): gpu {a} vs cpu {b}",
                gate[i],
                up[i]
            );
        }
    }
}
