//! Property tests: quantize → dequantize error bounds per type, re-quantization stability,
//! `dot_row` against an f64 dequantize-then-dot, and input validation.

use ember_quant::{
    ALL_TYPES, GgmlType, QuantError, dequantize, dot_row, quantize, supports_dequantize,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Approximately normal samples (sum of uniforms) without pulling in rand_distr.
fn gauss(rng: &mut StdRng) -> f32 {
    (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0
}

/// `n_blocks` blocks of `bs` values; each block gets its own magnitude and shape, covering
/// zeros, constants, one-signed data, sparse data and outliers.
fn make_input(seed: u64, bs: usize, n_blocks: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(bs * n_blocks);
    for _ in 0..n_blocks {
        let scale = 10f32.powf(rng.random_range(-3.0..3.0));
        let kind = rng.random_range(0..8);
        let start = out.len();
        for _ in 0..bs {
            let g = gauss(&mut rng) * scale;
            out.push(match kind {
                0 => 0.0,
                1 => g.abs(),
                2 => -g.abs(),
                3 => scale,
                4 if rng.random::<f32>() < 0.8 => 0.0,
                _ => g,
            });
        }
        if kind >= 5 && rng.random::<bool>() {
            let i = start + rng.random_range(0..bs);
            out[i] *= 30.0;
        }
    }
    out
}

/// Largest |x - y| allowed in a block, from the block's values. For the fixed-point formats the
/// bound is derived: half a quantization step plus the f16 rounding of the stored scale/min
/// (2^-11 relative), plus a full step where ggml clamps the end code (Q4_0/Q5_0 map the
/// opposite extreme to 2^(b-1), clamped to 2^(b-1)-1). K-quants are least-squares fits with
/// quantized sub-block scales (and Q6_K/Q3_K deliberately clip group extremes), so their bounds
/// are empirical: about 1.4x the worst error seen over 6000 blocks of `make_input` data.
fn tolerance(ty: GgmlType, block: &[f32]) -> f32 {
    let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let min = block.iter().fold(f32::MAX, |a, v| a.min(*v));
    let max = block.iter().fold(f32::MIN, |a, v| a.max(*v));
    let range = max - min;
    // Q2_K/Q4_K/Q5_K clamp their min to <= 0, so they cover [min(min, 0), max(max, 0)].
    let span = max.max(0.0) - min.min(0.0);
    let f16_eps = 1.0 / 2048.0;
    use GgmlType::*;
    match ty {
        F32 => 0.0,
        // Per element, handled in `check_error`.
        F16 | BF16 => f32::NAN,
        Q8_0 | Q8_1 => amax * (0.5 / 127.0 + 128.0 * f16_eps),
        Q4_0 => amax * (1.0 / 8.0 + 9.0 * f16_eps),
        Q5_0 => amax * (1.0 / 16.0 + 17.0 * f16_eps),
        Q4_1 => range * (0.5 / 15.0 + 16.0 * f16_eps) + amax * 2.0 * f16_eps,
        Q5_1 => range * (0.5 / 31.0 + 32.0 * f16_eps) + amax * 2.0 * f16_eps,
        // Half a step, plus the f32 rounding of `x * iscale` and of `d = 1 / iscale`: each is
        // off by up to 2^-24 relative on values of up to 127 steps, i.e. up to 127 * 2^-23 of
        // half a step (a CI run found a block 1.65e-5 over the old 1e-5 allowance).
        Q8_K => amax * (0.5 / 127.0) * (1.0 + 2.0 * 127.0 * f32::EPSILON),
        Q6_K => amax * 0.15,
        Q5_K => span * 0.07,
        Q4_K => span * 0.1,
        Q3_K => amax * 0.33,
        Q2_K => span * 0.45,
        _ => 0.0,
    }
}

fn check_error(ty: GgmlType, x: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
    match ty {
        GgmlType::F16 => {
            for (a, b) in x.iter().zip(y) {
                // Half an ulp relative, or half the smallest subnormal (2^-25) absolute.
                prop_assert!((a - b).abs() <= a.abs() / 2048.0 + 3e-8, "{ty}: {a} -> {b}");
            }
        }
        GgmlType::BF16 => {
            for (a, b) in x.iter().zip(y) {
                prop_assert!((a - b).abs() <= a.abs() / 256.0, "{ty}: {a} -> {b}");
            }
        }
        _ => {
            let bs = ty.block_size();
            for (k, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
                let tol = tolerance(ty, xb);
                let err = xb
                    .iter()
                    .zip(yb)
                    .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()));
                prop_assert!(
                    err <= tol,
                    "{ty} block {k}: max error {err} > tolerance {tol}"
                );
            }
        }
    }
    Ok(())
}

fn round_trip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let q = quantize(ty, x).expect("quantize");
    assert_eq!(q.len() as u64, ty.bytes_for(x.len() as u64).expect("size"));
    let mut y = vec![0.0f32; x.len()];
    dequantize(ty, &q, &mut y).expect("dequantize");
    (q, y)
}

/// The f64 dot of `w` and `x`, and the scale its f32 rounding error is measured against:
/// Σ over groups of (group max |w|) * Σ|x|. Using the group max rather than Σ|w*x| accounts
/// for the block offsets (Q4_1/Q5_1/K-quant mins), which `dot_row` applies as separate sums.
fn dot_f64(w: &[f32], x: &[f32], group: usize) -> (f64, f64) {
    let dot = w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
    let mag = w
        .chunks(group)
        .zip(x.chunks(group))
        .map(|(wg, xg)| {
            let amax = wg.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            amax * xg.iter().map(|v| v.abs() as f64).sum::<f64>()
        })
        .sum();
    (dot, mag)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn quantize_dequantize_within_bounds(seed in any::<u64>(), n_blocks in 1usize..5) {
        for &ty in SUPPORTED {
            let bs = ty.block_size().max(32);
            let x = make_input(seed, bs, n_blocks);
            let (_, y) = round_trip(ty, &x);
            check_error(ty, &x, &y)?;
        }
    }

    #[test]
    fn requantizing_is_stable(seed in any::<u64>(), n_blocks in 1usize..4) {
        for &ty in SUPPORTED {
            let bs = ty.block_size().max(32);
            let x = make_input(seed, bs, n_blocks);
            let (q1, y1) = round_trip(ty, &x);
            let (q2, y2) = round_trip(ty, &y1);
            use GgmlType::*;
            match ty {
                // Values on the grid map back to the same codes and the same f16 scale.
                F32 | F16 | BF16 | Q4_0 | Q5_0 | Q8_0 => prop_assert_eq!(q1, q2, "{}", ty),
                // Same d and codes; s = f16(d*sum) was computed from the unrounded f32 d the
                // first time and from the f16 one the second, so it may move by an f16 ulp.
                Q8_1 => {
                    for (a, b) in q1.chunks(36).zip(q2.chunks(36)) {
                        prop_assert_eq!(&a[..2], &b[..2], "{}", ty);
                        prop_assert_eq!(&a[4..], &b[4..], "{}", ty);
                    }
                }
                // Same values. The f32 scale may move by an ulp (1/(1/d) != d in f32), and when
                // the block's extremes tie in magnitude (codes -127 and +127) the sign of the
                // scale, and with it every code, can flip.
                Q8_K => {
                    for (a, b) in y1.iter().zip(&y2) {
                        prop_assert!((a - b).abs() <= a.abs() * 1e-6, "{}: {} vs {}", ty, a, b);
                    }
                }
                // Min/offset and fitted formats: no exact fixpoint, but a second pass must
                // stay within the same error bound of the first.
                _ => check_error(ty, &y1, &y2)?,
            }
        }
    }

    #[test]
    fn dot_row_matches_f64_dequantized_dot(seed in any::<u64>(), n_blocks in 1usize..5) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        for &ty in SUPPORTED {
            let bs = ty.block_size().max(32);
            let w = make_input(seed, bs, n_blocks);
            let x: Vec<f32> = (0..w.len()).map(|_| gauss(&mut rng)).collect();
            let (q, y) = round_trip(ty, &w);
            let (want, mag) = dot_f64(&y, &x, bs);
            let got = dot_row(ty, &q, &x) as f64;
            prop_assert!((got - want).abs() <= 4e-6 * mag + 1e-30,
                "{}: dot_row {} vs {} (magnitude {})", ty, got, want, mag);
        }
    }
}

#[test]
fn dot_row_handles_plain_types_with_odd_lengths() {
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for n in [1usize, 7, 31, 33, 100] {
            let w = make_input(n as u64, n, 1);
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let (q, y) = round_trip(ty, &w);
            let (want, mag) = dot_f64(&y, &x, 32);
            let got = dot_row(ty, &q, &x) as f64;
            assert!((got - want).abs() <= 4e-6 * mag + 1e-30, "{ty} n={n}");
        }
    }
}

#[test]
fn zero_input_gives_zero_output() {
    for &ty in SUPPORTED {
        let n = ty.block_size().max(32) * 2;
        let (_, y) = round_trip(ty, &vec![0.0; n]);
        assert!(y.iter().all(|v| *v == 0.0), "{ty}");
    }
}

#[test]
fn invalid_requests_are_errors_not_panics() {
    for &ty in ALL_TYPES {
        let bs = ty.block_size();
        if !supports_dequantize(ty) {
            assert_eq!(
                quantize(ty, &vec![0.0; bs]),
                Err(QuantError::Unsupported(ty))
            );
            let mut d = vec![0.0; bs];
            assert_eq!(
                dequantize(ty, &vec![0; ty.type_size()], &mut d),
                Err(QuantError::Unsupported(ty))
            );
            continue;
        }
        if bs > 1 {
            assert!(matches!(
                quantize(ty, &vec![1.0; bs + 1]),
                Err(QuantError::NotWholeBlocks { .. })
            ));
            let mut d = vec![0.0; bs - 1];
            assert!(matches!(
                dequantize(ty, &[], &mut d),
                Err(QuantError::NotWholeBlocks { .. })
            ));
        }
        let mut d = vec![0.0; bs];
        for len in [0, ty.type_size() - 1, ty.type_size() + 1] {
            assert_eq!(
                dequantize(ty, &vec![0; len], &mut d),
                Err(QuantError::LengthMismatch {
                    ty,
                    expected_bytes: ty.type_size(),
                    actual_bytes: len
                })
            );
        }
        // Empty input is valid and produces nothing.
        assert_eq!(quantize(ty, &[]), Ok(Vec::new()));
        assert_eq!(dequantize(ty, &[], &mut []), Ok(()));
    }
}

#[test]
fn non_finite_inputs_do_not_panic() {
    for &ty in SUPPORTED {
        let n = ty.block_size().max(32);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e-40] {
            let mut x = make_input(3, n, 1);
            x[n / 2] = bad;
            let q = quantize(ty, &x).expect("quantize");
            let mut y = vec![0.0; n];
            dequantize(ty, &q, &mut y).expect("dequantize");
            let _ = dot_row(ty, &q, &y);
        }
    }
}

#[test]
fn type_table_matches_ggml() {
    // (id, block size, bytes per block) from ggml.h / ggml-common.h. Note gguf-py 0.19 lists
    // Q8_1 as 40 bytes; ggml's block_q8_1 is 36 (two halves + 32 quants).
    let expected: &[(GgmlType, u32, usize, usize)] = &[
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q8_1, 9, 32, 36),
        (GgmlType::Q2_K, 10, 256, 84),
        (GgmlType::Q3_K, 11, 256, 110),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::Q8_K, 15, 256, 292),
        (GgmlType::BF16, 30, 1, 2),
    ];
    for &(ty, id, bs, ts) in expected {
        assert_eq!(
            (ty.id(), ty.block_size(), ty.type_size()),
            (id, bs, ts),
            "{ty}"
        );
        assert_eq!(GgmlType::from_id(id), Some(ty));
    }
}
