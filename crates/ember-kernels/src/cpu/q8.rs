//! Integer dot products of ggml's legacy block formats against activations quantized to 8 bits,
//! the way llama.cpp computes them on CPU.
//!
//! llama.cpp never multiplies a Q4_1 weight by an f32 activation: it first quantizes the
//! activation row to Q8_1 (Q8_0 for the symmetric formats) and sums `i8 x i8` products per
//! 32-element block. Doing the same gives results within float rounding of llama.cpp's (f32
//! activations would differ by the activation quantization error, several tenths of a logit on
//! SmolLM2) and is faster, since integer products vectorize well.
//!
//! Weight rows are unpacked once into `i8` values plus per-block scale and offset, then dotted
//! with every activation row: one unpack serves a whole batch.

use ember_quant::GgmlType;
use half::f16;

/// Elements per block in every format handled here.
pub const BLOCK: usize = 32;

/// How activations are quantized for a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Symmetric, one f16 scale per block (ggml's Q8_0).
    Q8_0,
    /// Q8_0 plus `s = d * sum(q)` per block, for weights with an offset (ggml's Q8_1).
    Q8_1,
}

/// The activation format llama.cpp pairs with a weight type, or `None` where we have no
/// integer path (those go through f32 dot products).
pub fn act_format(ty: GgmlType) -> Option<ActFormat> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(ActFormat::Q8_0),
        GgmlType::Q4_1 | GgmlType::Q5_1 => Some(ActFormat::Q8_1),
        _ => None,
    }
}

/// `m` rows of `k` activations quantized in blocks of 32.
pub struct QuantizedActs {
    pub k: usize,
    /// `m * k` quantized values.
    pub qs: Vec<i8>,
    /// One scale per block (already rounded through f16, as ggml stores it).
    pub d: Vec<f32>,
    /// `d * sum(q)` per block rounded through f16 (Q8_1 only; zeros for Q8_0).
    pub s: Vec<f32>,
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Quantizes row-major `x: [m, k]` (`k` a multiple of 32) as ggml's x86 `quantize_row_q8_{0,1}`
/// does: scale by `127 / amax` and round half to even (`_mm256_round_ps`), which differs from
/// the scalar reference (`1 / d`, round half away from zero) in the last bit now and then.
pub fn quantize_acts(x: &[f32], k: usize, fmt: ActFormat) -> QuantizedActs {
    debug_assert_eq!(k % BLOCK, 0);
    let nb = x.len() / BLOCK;
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0.0f32; nb];
    let mut s = vec![0.0f32; nb];
    for (b, (src, dst)) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = src.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in dst.iter_mut().zip(src) {
            let r = (v * inv).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        d[b] = round_f16(scale);
        if fmt == ActFormat::Q8_1 {
            s[b] = round_f16(sum as f32 * scale);
        }
    }
    QuantizedActs { k, qs, d, s }
}

/// One weight row unpacked to `i8` values with per-block scale `d` and offset `m`.
#[derive(Default)]
pub struct UnpackedRow {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Unpacks one row of `ty` blocks (a type with [`act_format`] `Some`).
pub fn unpack_row(ty: GgmlType, row: &[u8], out: &mut UnpackedRow) {
    let bs = ty.type_size();
    let nb = row.len() / bs;
    out.q.resize(nb * BLOCK, 0);
    out.d.resize(nb, 0.0);
    out.m.resize(nb, 0.0);
    for (b, blk) in row.chunks_exact(bs).enumerate() {
        let q = &mut out.q[b * BLOCK..(b + 1) * BLOCK];
        match ty {
            GgmlType::Q4_0 => {
                out.d[b] = f16_at(blk, 0);
                let qs = &blk[2..18];
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0F) as i8 - 8;
                    q[j + 16] = (qs[j] >> 4) as i8 - 8;
                }
            }
            GgmlType::Q4_1 => {
                out.d[b] = f16_at(blk, 0);
                out.m[b] = f16_at(blk, 2);
                let qs = &blk[4..20];
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0F) as i8;
                    q[j + 16] = (qs[j] >> 4) as i8;
                }
            }
            GgmlType::Q5_0 => {
                out.d[b] = f16_at(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let qs = &blk[6..22];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    q[j] = ((qs[j] & 0x0F) | h0) as i8 - 16;
                    q[j + 16] = ((qs[j] >> 4) | h1) as i8 - 16;
                }
            }
            GgmlType::Q5_1 => {
                out.d[b] = f16_at(blk, 0);
                out.m[b] = f16_at(blk, 2);
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                let qs = &blk[8..24];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    q[j] = ((qs[j] & 0x0F) | h0) as i8;
                    q[j + 16] = ((qs[j] >> 4) | h1) as i8;
                }
            }
            GgmlType::Q8_0 => {
                out.d[b] = f16_at(blk, 0);
                for (dst, &v) in q.iter_mut().zip(&blk[2..34]) {
                    *dst = v as i8;
                }
            }
            other => unreachable!("unpack_row called for {other}, which has no integer path"),
        }
    }
}

/// Sum of `a[i] * b[i]` over one block; written so LLVM vectorizes it (widening multiply-add).
#[inline(always)]
fn block_dot(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = 0i32;
    for i in 0..BLOCK {
        acc += a[i] as i32 * b[i] as i32;
    }
    acc
}

/// Dot product of an unpacked weight row with activation row `i`.
pub fn dot(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
    let nb = acts.k / BLOCK;
    let xq = &acts.qs[i * acts.k..(i + 1) * acts.k];
    let xd = &acts.d[i * nb..(i + 1) * nb];
    let mut sum = 0.0f32;
    if with_min {
        let xs = &acts.s[i * nb..(i + 1) * nb];
        for b in 0..nb {
            let sumi = block_dot(
                &row.q[b * BLOCK..(b + 1) * BLOCK],
                &xq[b * BLOCK..(b + 1) * BLOCK],
            );
            sum += row.d[b] * xd[b] * sumi as f32 + row.m[b] * xs[b];
        }
    } else {
        for b in 0..nb {
            let sumi = block_dot(
                &row.q[b * BLOCK..(b + 1) * BLOCK],
                &xq[b * BLOCK..(b + 1) * BLOCK],
            );
            sum += sumi as f32 * (row.d[b] * xd[b]);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// f64 reference: dequantize the weight row, dequantize the quantized activations, dot.
    fn reference(ty: GgmlType, row: &[u8], acts: &QuantizedActs, i: usize) -> f64 {
        let k = acts.k;
        let mut w = vec![0.0f32; k];
        ember_quant::dequantize(ty, row, &mut w).unwrap();
        let xq = &acts.qs[i * k..(i + 1) * k];
        let nb = k / BLOCK;
        (0..k)
            .map(|j| w[j] as f64 * xq[j] as f64 * acts.d[i * nb + j / BLOCK] as f64)
            .sum()
    }

    #[test]
    fn integer_dot_matches_dequantized_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            for _ in 0..20 {
                let k = 32 * rng.random_range(1..12);
                let w: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let x: Vec<f32> = (0..2 * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                let row = ember_quant::quantize(ty, &w).unwrap();
                let fmt = act_format(ty).unwrap();
                let acts = quantize_acts(&x, k, fmt);
                let mut un = UnpackedRow::default();
                unpack_row(ty, &row, &mut un);
                for i in 0..2 {
                    let got = dot(&un, &acts, i, fmt == ActFormat::Q8_1) as f64;
                    let want = reference(ty, &row, &acts, i);
                    // Q8_1's `s` is rounded through f16: allow that rounding, relative to scale.
                    let tol = 1e-4 * (1.0 + want.abs())
                        + if fmt == ActFormat::Q8_1 {
                            2e-3 * k as f64 / 32.0
                        } else {
                            0.0
                        };
                    assert!((got - want).abs() <= tol, "{ty} k={k}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn activation_quantization_matches_ggml_reference() {
        // ember-quant's reference quantizer implements ggml's quantize_row_q8_0_ref.
        let mut rng = StdRng::seed_from_u64(11);
        let x: Vec<f32> = (0..256).map(|_| rng.random_range(-5.0..5.0f32)).collect();
        let acts = quantize_acts(&x, 256, ActFormat::Q8_0);
        let bytes = ember_quant::quantize(GgmlType::Q8_0, &x).unwrap();
        for b in 0..8 {
            let blk = &bytes[b * 34..(b + 1) * 34];
            assert_eq!(acts.d[b], f16_at(blk, 0));
            for j in 0..32 {
                // Rounding ties may go the other way (x86 rounds half to even).
                let diff = (acts.qs[b * 32 + j] as i32 - blk[2 + j] as i8 as i32).abs();
                assert!(diff <= 1, "block {b} item {j}");
            }
        }
    }
}
