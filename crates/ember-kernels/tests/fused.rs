//! The fused element-wise ops (`rms_norm`, `rope`, `swiglu`, `residual_add`) through burn's
//! dispatch against f64 references, and on burn-flex against the generic burn-op fallbacks.

use burn::tensor::{Device, Tensor, TensorData};
use ember_kernels::{RopeScaling, geglu, positions_from, residual_add, rms_norm, rope, swiglu};
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

fn random(rng: &mut StdRng, len: usize, range: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-range..range)).collect()
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what} [{i}]: {g} vs {w}"
        );
    }
}

fn rms_norm_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(w)
                .map(move |(&v, &g)| v as f64 * inv * g as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn rope_ref(
    x: &[f32],
    heads: usize,
    head_dim: usize,
    start: usize,
    rope_dim: usize,
    base: f32,
    neox: bool,
) -> Vec<f64> {
    let half = rope_dim / 2;
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (i, row) in out.chunks_mut(heads * head_dim).enumerate() {
        let pos = (start + i) as f64;
        for head in row.chunks_mut(head_dim) {
            for p in 0..half {
                let theta = pos * (base as f64).powf(-2.0 * p as f64 / rope_dim as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = if neox {
                    (p, p + half)
                } else {
                    (2 * p, 2 * p + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
    out
}

#[test]
fn rms_norm_matches_f64() {
    let mut rng = StdRng::seed_from_u64(1);
    for (n, d) in [(1, 576), (3, 64), (40, 96)] {
        let x = random(&mut rng, n * d, 3.0);
        let w = random(&mut rng, d, 1.5);
        let eps = 1e-5;
        let got = to_vec(rms_norm(
            Tensor::from_data(TensorData::new(x.clone(), [n, d]), &device()),
            &Tensor::from_data(TensorData::new(w.clone(), [d]), &device()),
            eps,
        ));
        assert_close(&got, &rms_norm_ref(&x, &w, eps), 1e-5, "rms_norm");
    }
}

/// Frequency factors divide each pair's angle, as ggml's `freq_factors`: with factors of
/// `2^-j` (exact divisors), pair `i` at position `p` rotates exactly as pair `i` does at
/// position `p * 2^j` without factors, bit for bit (doubling `theta` commutes with ggml's
/// f32 recurrence). Both pairings, partial rotation, short and parallel batches.
#[test]
fn rope_factors_divide_each_pairs_angle() {
    let mut rng = StdRng::seed_from_u64(12);
    for neox in [false, true] {
        for (n, heads, head_dim, rope_dim) in [(3, 2, 64, 64), (40, 3, 32, 16), (5, 1, 128, 96)] {
            let half = rope_dim / 2;
            let x = random(&mut rng, n * heads * head_dim, 2.0);
            let shifts: Vec<u32> = (0..half).map(|_| rng.random_range(0..4u32)).collect();
            let factors: Vec<f32> = shifts.iter().map(|&j| 0.5f32.powi(j as i32)).collect();
            let positions: Vec<u32> = (0..n).map(|_| rng.random_range(0..5000u32)).collect();
            let run = |positions: Vec<u32>, factors: Option<Vec<f32>>| {
                to_vec(rope(
                    Tensor::from_data(TensorData::new(x.clone(), [n, heads, head_dim]), &device()),
                    positions.into(),
                    rope_dim,
                    10_000.0,
                    RopeScaling {
                        factors: factors.map(Into::into),
                        freq_scale: 1.0,
                    },
                    neox,
                ))
            };
            let got = run(positions.clone(), Some(factors));
            let plain: Vec<Vec<f32>> = (0..4)
                .map(|j| run(positions.iter().map(|p| p << j).collect(), None))
                .collect();
            for (i, &g) in got.iter().enumerate() {
                let dim = i % head_dim;
                let pair = match (dim < rope_dim, neox) {
                    (false, _) => None,
                    (true, true) => Some(dim % half),
                    (true, false) => Some(dim / 2),
                };
                let want = match pair {
                    Some(pair) => plain[shifts[pair] as usize][i],
                    None => x[i],
                };
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "rope {n}x{heads}x{head_dim} (rope_dim {rope_dim}, neox {neox}) [{i}]"
                );
            }
            // All-ones factors are no factors.
            let ones = run(positions.clone(), Some(vec![1.0; half]));
            assert_eq!(ones, plain[0], "factors of 1");
        }
    }
}

/// The scaled angles themselves, bit for bit, against a scalar copy of ggml's
/// `ggml_rope_cache_init` and `rope_yarn` (`ext_factor = 0`, `mscale = 1`): each pair holds
/// `(1, 0)`, which any rotation, fused or not, turns into exactly `(cos t, sin t)`. Factors
/// that are not powers of two (so `theta / f` and `theta * (1 / f)` differ) and linear scales.
#[test]
fn rope_scaled_angles_are_ggmls() {
    let mut rng = StdRng::seed_from_u64(13);
    for neox in [false, true] {
        for (n, heads, head_dim, rope_dim, freq_scale) in [
            (4, 2, 64, 64, 1.0f32),
            (33, 1, 32, 24, 0.125),
            (6, 3, 128, 128, 0.3),
        ] {
            let half = rope_dim / 2;
            let base = 500_000.0f32;
            let factors: Vec<f32> = (0..half).map(|_| rng.random_range(1.0..8.0f32)).collect();
            let mut x = vec![0.0f32; n * heads * head_dim];
            for head in x.chunks_mut(head_dim) {
                for p in 0..half {
                    head[if neox { p } else { 2 * p }] = 1.0;
                }
            }
            let positions: Vec<u32> = (0..n).map(|_| rng.random_range(1..9000u32)).collect();
            let got = to_vec(rope(
                Tensor::from_data(TensorData::new(x.clone(), [n, heads, head_dim]), &device()),
                positions.clone().into(),
                rope_dim,
                base,
                RopeScaling {
                    factors: Some(factors.clone().into()),
                    freq_scale,
                },
                neox,
            ));
            let theta_scale = base.powf(-2.0 / rope_dim as f32);
            for (r, &pos) in positions.iter().enumerate() {
                let mut theta = pos as f32;
                for (p, &f) in factors.iter().enumerate() {
                    let t = freq_scale * (theta / f);
                    let (c, s) = (t.cos(), t.sin());
                    for h in 0..heads {
                        let at = |dim: usize| got[(r * heads + h) * head_dim + dim];
                        let (i0, i1) = if neox {
                            (p, p + half)
                        } else {
                            (2 * p, 2 * p + 1)
                        };
                        assert_eq!(
                            (at(i0).to_bits(), at(i1).to_bits()),
                            (c.to_bits(), s.to_bits()),
                            "rope_dim {rope_dim}, neox {neox}, row {r}, pair {p}"
                        );
                    }
                    theta *= theta_scale;
                }
            }
        }
    }
}

#[test]
fn rope_matches_f64() {
    let mut rng = StdRng::seed_from_u64(2);
    for neox in [false, true] {
        for (n, heads, head_dim, rope_dim, start) in [
            (1, 9, 64, 64, 0),
            (1, 3, 64, 64, 77),
            (5, 4, 32, 16, 3),
            (40, 2, 16, 16, 100),
        ] {
            let x = random(&mut rng, n * heads * head_dim, 2.0);
            let base = 10_000.0;
            let got = to_vec(rope(
                Tensor::from_data(TensorData::new(x.clone(), [n, heads, head_dim]), &device()),
                positions_from(start, n),
                rope_dim,
                base,
                RopeScaling::NONE,
                neox,
            ));
            // ggml's f32 angle recurrence drifts from the exact angle by a few ulps of theta.
            let want = rope_ref(&x, heads, head_dim, start, rope_dim, base, neox);
            assert_close(&got, &want, 1e-4, "rope");
        }
    }
}

#[test]
fn swiglu_and_add_match_f64() {
    let mut rng = StdRng::seed_from_u64(3);
    for len in [1, 1536, 100_000] {
        let g = random(&mut rng, len, 8.0);
        let u = random(&mut rng, len, 2.0);
        let t = |v: &Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [len]), &device());
        let got = to_vec(swiglu(t(&g), t(&u)));
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
            .collect();
        assert_close(&got, &want, 1e-6, "swiglu");
        let got = to_vec(residual_add(t(&g), t(&u)));
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        assert_close(&got, &want, 1e-6, "residual_add");
    }
}

/// GEGLU against the exact tanh-GELU in f64. ggml (and our CPU kernel) look the GELU up in an
/// f16 table after rounding the input to f16, so the CPU result is within f16 rounding of the
/// exact value (relative 2^-10 twice, on |gelu| at most |x|); the burn-ops fallback is f32.
#[test]
fn geglu_matches_f64_within_f16_table_rounding() {
    let mut rng = StdRng::seed_from_u64(5);
    for len in [1, 2048, 100_000] {
        let mut g = random(&mut rng, len, 12.0);
        // The clamps at +-10 and values near 0.
        g[0] = -10.0;
        if len > 3 {
            g[1] = 10.0;
            g[2] = 1e-4;
            g[3] = -9.99;
        }
        let u = random(&mut rng, len, 2.0);
        let t = |v: &Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [len]), &device());
        let got = to_vec(geglu(t(&g), t(&u)));
        for ((&x, &up), &y) in g.iter().zip(&u).zip(&got) {
            let (x64, u64) = (x as f64, up as f64);
            let gelu = 0.5
                * x64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * x64 * (1.0 + 0.044715 * x64 * x64))
                        .tanh());
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x64 * u64
            } else {
                gelu * u64
            };
            let tol = 3e-3 * (x64.abs() * u64.abs()) + 1e-6;
            assert!(
                (y as f64 - want).abs() <= tol,
                "geglu({x}, {up}) = {y}, want {want}"
            );
        }
    }
}

/// The Flex kernels against the generic burn-op bodies, run on Flex tensors.
#[cfg(feature = "flex")]
mod against_fallback {
    use super::*;
    use burn::backend::Flex;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::tensor::FloatTensor;
    use ember_kernels::{
        EmberBackend, positions_from, rms_norm_fallback, rope_fallback, swiglu_fallback,
    };

    fn flex<const D: usize>(v: &[f32], shape: [usize; D]) -> FloatTensor<Flex> {
        Flex::float_from_data(TensorData::new(v.to_vec(), shape), &Default::default())
    }

    fn host(t: FloatTensor<Flex>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    fn assert_same(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what} [{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn flex_ops_match_fallbacks() {
        let mut rng = StdRng::seed_from_u64(4);
        let (n, d) = (7, 128);
        let x = random(&mut rng, n * d, 3.0);
        let w = random(&mut rng, d, 1.5);
        let a = host(<Flex as EmberBackend>::rms_norm(
            flex(&x, [n, d]),
            flex(&w, [d]),
            1e-6,
        ));
        let b = host(rms_norm_fallback::<Flex>(
            flex(&x, [n, d]),
            flex(&w, [d]),
            1e-6,
        ));
        assert_same(&a, &b, 1e-5, "rms_norm");

        for neox in [false, true] {
            for (rope_dim, scaled) in [(32, false), (64, false), (64, true)] {
                let (h, hd) = (3, 64);
                let x = random(&mut rng, n * h * hd, 2.0);
                // Llama 3.1-like frequency factors, 1 to 8, and linear scaling by 4.
                let scaling = match scaled {
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
                let a = host(<Flex as EmberBackend>::rope(
                    flex(&x, [n, h, hd]),
                    positions_from(41, n),
                    rope_dim,
                    10_000.0,
                    scaling.clone(),
                    neox,
                ));
                let b = host(rope_fallback::<Flex>(
                    flex(&x, [n, h, hd]),
                    &positions_from(41, n),
                    rope_dim,
                    10_000.0,
                    &scaling,
                    neox,
                ));
                // Same angles, same products: only the fused multiply-add order may differ.
                assert_same(&a, &b, 1e-6, "rope");
            }
        }

        let g = random(&mut rng, n * d, 8.0);
        let a = host(<Flex as EmberBackend>::swiglu(
            flex(&g, [n, d]),
            flex(&x, [n, d]),
        ));
        let b = host(swiglu_fallback::<Flex>(flex(&g, [n, d]), flex(&x, [n, d])));
        // The fused kernel takes `e^x` from ggml's polynomial (within 1.5 ulp of libm's), the
        // burn-ops fallback from libm: a few ulp apart at most.
        assert_same(&a, &b, 2e-6, "swiglu");
    }
}

/// ggml's vectorized `expf` (what its SiLU uses): within 1.5 ulp of the exact value over the
/// range where the result is a normal f32, `+inf` past the top, `0` far below, NaN kept.
#[test]
fn ggml_expf_is_within_its_documented_error() {
    use ember_kernels::cpu::fused::ggml_expf;
    let mut rng = StdRng::seed_from_u64(9);
    let mut worst = 0.0f64;
    for i in 0..200_000 {
        let x = if i < 1000 {
            -87.0 + 175.0 * i as f32 / 1000.0
        } else {
            rng.random_range(-87.3f32..88.7)
        };
        let got = ggml_expf(x) as f64;
        let want = (x as f64).exp();
        let ulp = (want as f32).to_bits();
        let ulp = (f32::from_bits(ulp + 1) as f64 - want as f32 as f64).abs();
        worst = worst.max((got - want).abs() / ulp);
    }
    // ARM's routine claims 1.45 ulp plus rounding; measured here up to 2.2 near the bottom
    // of the normal range.
    assert!(worst <= 2.5, "worst error {worst} ulp");
    assert_eq!(ggml_expf(0.0), 1.0);
    assert_eq!(ggml_expf(200.0), f32::INFINITY);
    assert_eq!(ggml_expf(-200.0), 0.0);
    assert!(ggml_expf(f32::NAN).is_nan());
}

/// Bit for bit ggml's own `ggml_v_expf` (AVX-512 build, llama.cpp 0c1e570) on 8016 inputs:
/// random, a sweep, the overflow and underflow edges, zeros, infinities and NaN. The fixture
/// holds (input, output) f32 pairs written by that C function compiled with `gcc -O2
/// -march=native` (the generator is not committed: it is llama.cpp's code).
#[test]
fn ggml_expf_is_ggml_bit_for_bit() {
    use ember_kernels::cpu::fused::ggml_expf;
    let raw = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ggml_expf.bin"
    ))
    .expect("fixture");
    let vals: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(vals.len() >= 16_000);
    for pair in vals.chunks_exact(2) {
        let (x, want) = (pair[0], pair[1]);
        let got = ggml_expf(x);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "expf({x:e}): {got:e} vs ggml {want:e}"
        );
    }
}
