//! Causal attention for one sequence on the CPU with an online softmax (no `n x t` score
//! matrix), following llama.cpp's two CPU flash-attention paths for an f16 KV cache: for small
//! batches (decode, short prompts) Q rounded to f16, f32 dot products and the weighted sum of V
//! kept in f16 (`VKQ16`), rounded after every update; for batches of 64 queries and more, f32
//! throughout with the softmax advancing a tile of 64 keys at a time. Matching that arithmetic
//! keeps our logits within float noise of llama.cpp's.
//!
//! Models run [`super::paged_attention`], which is llama.cpp's arithmetic bit for bit on both
//! paths; this dense kernel serves the backend extension's `causal_attention` op. Its tiled
//! path keeps an older order (per-row tiles, one 16-lane accumulator per dot), not ggml's.

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
pub(crate) fn round_slice(xs: &mut [f32], tmp: &mut [f16]) {
    tmp.convert_from_f32_slice(xs);
    tmp.convert_to_f32_slice(xs);
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query heads: a multiple of `n_kv`.
    pub n_head: usize,
    /// KV heads; query head `h` reads kv head `h / (n_head / n_kv)`.
    pub n_kv: usize,
    /// Queries (the last `n` of the `t` positions).
    pub n: usize,
    /// Keys and values.
    pub t: usize,
    /// Values per head, in q, k and v alike.
    pub head_dim: usize,
}

/// Batches of at least this many queries take the tiled path, as llama.cpp's CPU flash
/// attention does (`GGML_FA_TILE_Q`); smaller ones the one-row-at-a-time f16 path.
pub const TILE_Q: usize = 64;
/// Keys per softmax tile in the tiled path (`GGML_FA_TILE_KV`).
pub const TILE_KV: usize = 64;

/// `q: [n_head, n, d]`, `k`, `v: [n_kv, t, d]` (row-major). Query `i` sits at position
/// `t - n + i` and sees keys `0..=t - n + i`. Query head `h` reads kv head `h / (n_head / n_kv)`.
/// Returns `[n, n_head * d]`.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
    if s.n >= TILE_Q {
        causal_attention_tiled(q, k, v, s, scale)
    } else {
        causal_attention_f16acc(q, k, v, s, scale)
    }
}

/// f32 dot product with 16 independent partial sums, so the compiler can vectorize it (the
/// tiled path does not follow ggml's summation order bit for bit anyway). Always inlined, so the
/// paged kernel's AVX2 build gets it at full width (same operations per lane, same bits).
#[inline(always)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// llama.cpp's tiled CPU flash attention (batches of 64 queries and more): Q stays f32, scores
/// and the V accumulator are f32, and the online softmax advances one tile of 64 keys at a
/// time (tile maximum first, then `exp(s - max)` for the whole tile, its sum taken in f64).
fn causal_attention_tiled(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
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
    out.par_chunks_mut(d).enumerate().for_each_init(
        || (vec![0.0f32; d], [0.0f32; TILE_KV]),
        |(acc, p), (idx, dst)| {
            let (i, h) = (idx / n_head, idx % n_head);
            let kvh = h / group;
            let qrow = &q[(h * n + i) * d..(h * n + i + 1) * d];
            let visible = past + i + 1;
            acc.iter_mut().for_each(|a| *a = 0.0);
            let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
            for tile in (0..visible).step_by(TILE_KV) {
                let len = TILE_KV.min(visible - tile);
                let mut tile_max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(len) {
                    let krow = &k[(kvh * t + tile + j) * d..(kvh * t + tile + j + 1) * d];
                    let score = dot_f32(qrow, krow) * scale;
                    *pj = score;
                    tile_max = tile_max.max(score);
                }
                let m_new = m.max(tile_max);
                if m_new > m {
                    let ms = (m - m_new).exp();
                    acc.iter_mut().for_each(|a| *a *= ms);
                    sum *= ms;
                }
                m = m_new;
                let mut tile_sum = 0.0f64;
                for pj in p.iter_mut().take(len) {
                    *pj = (*pj - m).exp();
                    tile_sum += *pj as f64;
                }
                sum = (sum as f64 + tile_sum) as f32;
                for (j, &pj) in p.iter().enumerate().take(len) {
                    let vrow = &v[(kvh * t + tile + j) * d..(kvh * t + tile + j + 1) * d];
                    for (a, &x) in acc.iter_mut().zip(vrow) {
                        *a += pj * x;
                    }
                }
            }
            let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
            for (o, a) in dst.iter_mut().zip(acc.iter()) {
                *o = a * inv;
            }
        },
    );
    out
}

/// llama.cpp's one-row CPU flash attention with an f16 cache (batches under 64 queries).
fn causal_attention_f16acc(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
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
            // Both paths: fewer than TILE_Q queries, and at least TILE_Q.
            let t = rng.random_range(1..160);
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
