//! Causal attention for one sequence on the CPU, one query row at a time with an online
//! softmax (no `n x t` score matrix), following llama.cpp's CPU flash-attention arithmetic for
//! an f16 KV cache: Q rounded to f16, f32 dot products, and the weighted sum of V kept in f16
//! (`VKQ16`), rounded after every update. Matching that rounding keeps our logits within float
//! noise of llama.cpp's.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

#[cfg(test)]
fn r16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds every value to the nearest f16 (ties to even) in place. Whole-slice conversions use
/// F16C when the CPU has it, far cheaper than converting one value at a time; the result is
/// the same as rounding each value separately.
fn round_slice(xs: &mut [f32], tmp: &mut [f16]) {
    tmp.convert_from_f32_slice(xs);
    tmp.convert_to_f32_slice(xs);
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_kv: usize,
    /// Queries (the last `n` of the `t` positions).
    pub n: usize,
    /// Keys and values.
    pub t: usize,
    pub head_dim: usize,
}

/// `q: [n_head, n, d]`, `k`, `v: [n_kv, t, d]` (row-major). Query `i` sits at position
/// `t - n + i` and sees keys `0..=t - n + i`. Query head `h` reads kv head `h / (n_head / n_kv)`.
/// Returns `[n, n_head * d]`.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
    let AttnShape {
        n_head,
        n_kv,
        n,
        t,
        head_dim: d,
    } = s;
    let group = n_head / n_kv;
    let past = t - n;
    let mut out = vec![0.0f32; n * n_head * d];
    // One task per (query row, head): each writes its own d-wide slice of `out`.
    let scratch = || (vec![0.0f32; d], vec![0.0f32; d], vec![f16::ZERO; d]);
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(scratch, |(qrow, acc, tmp), (idx, dst)| {
            let (i, h) = (idx / n_head, idx % n_head);
            let kvh = h / group;
            qrow.copy_from_slice(&q[(h * n + i) * d..(h * n + i + 1) * d]);
            round_slice(qrow, tmp);
            acc.iter_mut().for_each(|a| *a = 0.0);
            let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
            for ic in 0..=past + i {
                let krow = &k[(kvh * t + ic) * d..(kvh * t + ic + 1) * d];
                let vrow = &v[(kvh * t + ic) * d..(kvh * t + ic + 1) * d];
                let score = qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>() * scale;
                let (mut ms, mut vs) = (1.0f32, 1.0f32);
                if score > m {
                    let old = m;
                    m = score;
                    ms = (old - m).exp();
                    acc.iter_mut().for_each(|a| *a *= ms);
                    round_slice(acc, tmp);
                } else {
                    vs = (score - m).exp();
                }
                for (a, &x) in acc.iter_mut().zip(vrow) {
                    *a += x * vs;
                }
                round_slice(acc, tmp);
                sum = sum * ms + vs;
            }
            let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
            for (o, a) in dst.iter_mut().zip(acc.iter()) {
                *o = a * inv;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Naive f64 softmax attention.
    fn naive(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f64> {
        let d = s.head_dim;
        let group = s.n_head / s.n_kv;
        let mut out = vec![0.0f64; s.n * s.n_head * d];
        for h in 0..s.n_head {
            let kvh = h / group;
            for i in 0..s.n {
                let visible = s.t - s.n + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|x| {
                                q[(h * s.n + i) * d + x] as f64 * k[(kvh * s.t + j) * d + x] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = w.iter().sum();
                for x in 0..d {
                    out[(i * s.n_head + h) * d + x] = (0..visible)
                        .map(|j| w[j] * v[(kvh * s.t + j) * d + x] as f64)
                        .sum::<f64>()
                        / z;
                }
            }
        }
        out
    }

    #[test]
    fn slice_rounding_equals_per_value_rounding() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut xs: Vec<f32> = (0..4096)
            .map(|i| match i % 4 {
                0 => rng.random_range(-70000.0..70000.0f32),
                1 => rng.random_range(-1e-6..1e-6f32),
                _ => rng.random_range(-4.0..4.0f32),
            })
            .collect();
        let want: Vec<f32> = xs.iter().map(|&x| r16(x)).collect();
        let mut tmp = vec![f16::ZERO; xs.len()];
        round_slice(&mut xs, &mut tmp);
        for (a, b) in xs.iter().zip(&want) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn matches_naive_attention_within_f16_rounding() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            let n_kv = rng.random_range(1..4);
            let group = rng.random_range(1..4);
            let d = 8 * rng.random_range(1..9);
            let t = rng.random_range(1..40);
            let n = rng.random_range(1..=t);
            let s = AttnShape {
                n_head: n_kv * group,
                n_kv,
                n,
                t,
                head_dim: d,
            };
            let mut fill = |len: usize| -> Vec<f32> {
                (0..len)
                    .map(|_| r16(rng.random_range(-2.0..2.0f32)))
                    .collect()
            };
            let q = fill(s.n_head * n * d);
            let k = fill(n_kv * t * d);
            let v = fill(n_kv * t * d);
            let scale = 1.0 / (d as f32).sqrt();
            let got = causal_attention(&q, &k, &v, s, scale);
            let want = naive(&q, &k, &v, s, scale);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 2e-2, "{s:?}: {g} vs {w}");
            }
        }
    }
}
