//! `dot_row`: the dot product of one quantized row with an f32 vector, dequantizing block by
//! block on the fly (no allocation). This is the inner loop of the CPU matmul, so each type is
//! written as "unpack integer quants to a small f32 stack array, then a fixed-size multi-lane
//! dot" which LLVM auto-vectorizes; per-(sub)block scales are applied once per sub-block sum
//! (`d * sum(q*x) - m * sum(x)`) instead of per element. The summation order therefore differs
//! from dequantize-then-dot, within normal f32 rounding.

use crate::convert::{bf16_bytes_to_f32, f16_bits_to_f32_fast};
use crate::dequant::{f16_at, q3_k_scales, scale_min_k4, supports_dequantize};
use crate::types::GgmlType;

/// Lanes of the partial-sum accumulators: 8 f32 = one AVX register or two SSE ones.
const LANES: usize = 8;

#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ a[i]*b[i] over N elements (N a multiple of 8).
#[inline(always)]
fn dot_n<const N: usize>(a: &[f32; N], b: &[f32; N]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for c in 0..N / LANES {
        for l in 0..LANES {
            acc[l] += a[c * LANES + l] * b[c * LANES + l];
        }
    }
    hsum(acc)
}

/// (Σ a[i]*b[i], Σ b[i]) over N elements (N a multiple of 8).
#[inline(always)]
fn dot_sum_n<const N: usize>(a: &[f32; N], b: &[f32; N]) -> (f32, f32) {
    let mut acc = [0.0f32; LANES];
    let mut sum = [0.0f32; LANES];
    for c in 0..N / LANES {
        for l in 0..LANES {
            acc[l] += a[c * LANES + l] * b[c * LANES + l];
            sum[l] += b[c * LANES + l];
        }
    }
    (hsum(acc), hsum(sum))
}

/// Splits a fixed-size array reference into consecutive `M`-element sub-arrays.
#[inline(always)]
fn sub<const N: usize, const M: usize>(a: &[f32; N]) -> &[[f32; M]] {
    a.as_chunks::<M>().0
}

/// Dot product of one row of `ty` data with `x`.
///
/// Preconditions (checked with `debug_assert!` only, this is the matmul hot loop):
/// - `supports_dequantize(ty)`; an unsupported type returns 0.0 in release builds;
/// - `x.len()` is a whole number of `ty` blocks and `row.len() == ty.bytes_for(x.len())`.
///   Trailing partial blocks of either slice are ignored in release builds.
///
/// The result equals the f64 dot of `dequantize(row)` with `x` up to f32 rounding.
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    debug_assert!(supports_dequantize(ty), "dot_row: unsupported type {ty}");
    debug_assert!(
        x.len().is_multiple_of(ty.block_size()),
        "dot_row: partial block"
    );
    debug_assert_eq!(
        Some(row.len() as u64),
        ty.bytes_for(x.len() as u64),
        "dot_row: row/x length mismatch"
    );
    use GgmlType::*;
    match ty {
        F32 => dot_f32(row, x),
        F16 => dot_f16(row, x),
        BF16 => dot_bf16(row, x),
        Q4_0 => blocks::<18, 32>(row, x, dot_q4_0),
        Q4_1 => blocks::<20, 32>(row, x, dot_q4_1),
        Q5_0 => blocks::<22, 32>(row, x, dot_q5_0),
        Q5_1 => blocks::<24, 32>(row, x, dot_q5_1),
        Q8_0 => blocks::<34, 32>(row, x, dot_q8_0),
        Q8_1 => blocks::<36, 32>(row, x, dot_q8_1),
        Q2_K => blocks::<84, 256>(row, x, dot_q2_k),
        Q3_K => blocks::<110, 256>(row, x, dot_q3_k),
        Q4_K => blocks::<144, 256>(row, x, dot_q4_k),
        Q5_K => blocks::<176, 256>(row, x, dot_q5_k),
        Q6_K => blocks::<210, 256>(row, x, dot_q6_k),
        Q8_K => blocks::<292, 256>(row, x, dot_q8_k),
        _ => 0.0,
    }
}

#[inline(always)]
fn blocks<const TS: usize, const BS: usize>(
    row: &[u8],
    x: &[f32],
    f: impl Fn(&[u8; TS], &[f32; BS]) -> f32,
) -> f32 {
    let (rb, _) = row.as_chunks::<TS>();
    let (xb, _) = x.as_chunks::<BS>();
    let mut total = 0.0f32;
    for (b, xs) in rb.iter().zip(xb) {
        total += f(b, xs);
    }
    total
}

fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    let (rb, _) = row.as_chunks::<{ 4 * 32 }>();
    let (xb, xr) = x.as_chunks::<32>();
    let mut total = 0.0f32;
    let mut w = [0.0f32; 32];
    for (b, xs) in rb.iter().zip(xb) {
        for (o, c) in w.iter_mut().zip(b.as_chunks::<4>().0) {
            *o = f32::from_le_bytes(*c);
        }
        total += dot_n(&w, xs);
    }
    // Plain element types have block size 1, so a tail shorter than 32 is legal. (`get` keeps
    // a too-short row, a precondition violation, from panicking in release builds.)
    let tail = row.get(xb.len() * 128..).unwrap_or_default();
    for (c, v) in tail.as_chunks::<4>().0.iter().zip(xr) {
        total += f32::from_le_bytes(*c) * v;
    }
    total
}

fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let (rb, _) = row.as_chunks::<{ 2 * 32 }>();
    let (xb, xr) = x.as_chunks::<32>();
    let mut total = 0.0f32;
    let mut w = [0.0f32; 32];
    let mut bits = [0u16; 32];
    for (b, xs) in rb.iter().zip(xb) {
        for (o, c) in bits.iter_mut().zip(b.as_chunks::<2>().0) {
            *o = u16::from_le_bytes(*c);
        }
        // `half` converts with F16C when the CPU has it (checked at run time): the same exact
        // values as `f16_bits_to_f32_fast`, several times faster than the portable bit trick.
        bits.reinterpret_cast::<half::f16>()
            .convert_to_f32_slice(&mut w);
        total += dot_n(&w, xs);
    }
    let tail = row.get(xb.len() * 64..).unwrap_or_default();
    for (c, v) in tail.as_chunks::<2>().0.iter().zip(xr) {
        total += f16_bits_to_f32_fast(u16::from_le_bytes(*c)) * v;
    }
    total
}

fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    let (rb, _) = row.as_chunks::<{ 2 * 32 }>();
    let (xb, xr) = x.as_chunks::<32>();
    let mut total = 0.0f32;
    let mut w = [0.0f32; 32];
    for (b, xs) in rb.iter().zip(xb) {
        for (o, c) in w.iter_mut().zip(b.as_chunks::<2>().0) {
            *o = bf16_bytes_to_f32(*c);
        }
        total += dot_n(&w, xs);
    }
    let tail = row.get(xb.len() * 64..).unwrap_or_default();
    for (c, v) in tail.as_chunks::<2>().0.iter().zip(xr) {
        total += bf16_bytes_to_f32(*c) * v;
    }
    total
}

#[inline(always)]
fn dot_q4_0(b: &[u8; 18], x: &[f32; 32]) -> f32 {
    let mut q = [0.0f32; 32];
    for j in 0..16 {
        q[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32;
        q[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32;
    }
    f16_at(b, 0) * dot_n(&q, x)
}

#[inline(always)]
fn dot_q4_1(b: &[u8; 20], x: &[f32; 32]) -> f32 {
    let mut q = [0.0f32; 32];
    for j in 0..16 {
        q[j] = (b[4 + j] & 0x0F) as f32;
        q[j + 16] = (b[4 + j] >> 4) as f32;
    }
    let (qx, sx) = dot_sum_n(&q, x);
    f16_at(b, 0) * qx + f16_at(b, 2) * sx
}

#[inline(always)]
fn unpack_q5(qh: u32, qs: &[u8], q: &mut [f32; 32], offset: i32) {
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (((qs[j] & 0x0F) | (h0 << 4)) as i32 - offset) as f32;
        q[j + 16] = (((qs[j] >> 4) | (h1 << 4)) as i32 - offset) as f32;
    }
}

#[inline(always)]
fn dot_q5_0(b: &[u8; 22], x: &[f32; 32]) -> f32 {
    let mut q = [0.0f32; 32];
    unpack_q5(
        u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
        &b[6..22],
        &mut q,
        16,
    );
    f16_at(b, 0) * dot_n(&q, x)
}

#[inline(always)]
fn dot_q5_1(b: &[u8; 24], x: &[f32; 32]) -> f32 {
    let mut q = [0.0f32; 32];
    unpack_q5(
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        &b[8..24],
        &mut q,
        0,
    );
    let (qx, sx) = dot_sum_n(&q, x);
    f16_at(b, 0) * qx + f16_at(b, 2) * sx
}

#[inline(always)]
fn dot_q8_0(b: &[u8; 34], x: &[f32; 32]) -> f32 {
    let mut q = [0.0f32; 32];
    for j in 0..32 {
        q[j] = (b[2 + j] as i8) as f32;
    }
    f16_at(b, 0) * dot_n(&q, x)
}

#[inline(always)]
fn dot_q8_1(b: &[u8; 36], x: &[f32; 32]) -> f32 {
    let mut q = [0.0f32; 32];
    for j in 0..32 {
        q[j] = (b[4 + j] as i8) as f32;
    }
    f16_at(b, 0) * dot_n(&q, x)
}

#[inline(always)]
fn dot_q2_k(b: &[u8; 84], x: &[f32; 256]) -> f32 {
    let mut q = [0.0f32; 256];
    for n in 0..2 {
        for (s, shift) in [0u32, 2, 4, 6].into_iter().enumerate() {
            for l in 0..32 {
                q[128 * n + 32 * s + l] = ((b[16 + 32 * n + l] >> shift) & 3) as f32;
            }
        }
    }
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut sd = 0.0f32;
    let mut sm = 0.0f32;
    for (k, (qs, xs)) in sub::<256, 16>(&q).iter().zip(sub::<256, 16>(x)).enumerate() {
        let sc = b[k];
        let (qx, sx) = dot_sum_n(qs, xs);
        sd += (sc & 0xF) as f32 * qx;
        sm += (sc >> 4) as f32 * sx;
    }
    d * sd - min * sm
}

#[inline(always)]
fn dot_q3_k(b: &[u8; 110], x: &[f32; 256]) -> f32 {
    let mut q = [0.0f32; 256];
    for n in 0..2 {
        for (s, shift) in [0u32, 2, 4, 6].into_iter().enumerate() {
            let m = 1u8 << (4 * n + s);
            for l in 0..32 {
                let low = ((b[32 + 32 * n + l] >> shift) & 3) as i32;
                let sub = if b[l] & m != 0 { 0 } else { 4 };
                q[128 * n + 32 * s + l] = (low - sub) as f32;
            }
        }
    }
    let scales = q3_k_scales(&b[96..108]);
    let mut s = 0.0f32;
    for (k, (qs, xs)) in sub::<256, 16>(&q).iter().zip(sub::<256, 16>(x)).enumerate() {
        s += (scales[k] as i32 - 32) as f32 * dot_n(qs, xs);
    }
    f16_at(b, 108) * s
}

#[inline(always)]
fn dot_q4_k(b: &[u8; 144], x: &[f32; 256]) -> f32 {
    let mut q = [0.0f32; 256];
    for k in 0..4 {
        for l in 0..32 {
            let v = b[16 + 32 * k + l];
            q[64 * k + l] = (v & 0xF) as f32;
            q[64 * k + 32 + l] = (v >> 4) as f32;
        }
    }
    let scales = &b[4..16];
    let mut sd = 0.0f32;
    let mut sm = 0.0f32;
    for (j, (qs, xs)) in sub::<256, 32>(&q).iter().zip(sub::<256, 32>(x)).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let (qx, sx) = dot_sum_n(qs, xs);
        sd += sc as f32 * qx;
        sm += m as f32 * sx;
    }
    f16_at(b, 0) * sd - f16_at(b, 2) * sm
}

#[inline(always)]
fn dot_q5_k(b: &[u8; 176], x: &[f32; 256]) -> f32 {
    let mut q = [0.0f32; 256];
    for k in 0..4 {
        for l in 0..32 {
            let v = b[48 + 32 * k + l];
            let h = b[16 + l] >> (2 * k);
            q[64 * k + l] = ((v & 0xF) | ((h & 1) << 4)) as f32;
            q[64 * k + 32 + l] = ((v >> 4) | ((h & 2) << 3)) as f32;
        }
    }
    let scales = &b[4..16];
    let mut sd = 0.0f32;
    let mut sm = 0.0f32;
    for (j, (qs, xs)) in sub::<256, 32>(&q).iter().zip(sub::<256, 32>(x)).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let (qx, sx) = dot_sum_n(qs, xs);
        sd += sc as f32 * qx;
        sm += m as f32 * sx;
    }
    f16_at(b, 0) * sd - f16_at(b, 2) * sm
}

#[inline(always)]
fn dot_q6_k(b: &[u8; 210], x: &[f32; 256]) -> f32 {
    let mut q = [0.0f32; 256];
    for n in 0..2 {
        for l in 0..32 {
            let ql0 = b[64 * n + l];
            let ql1 = b[64 * n + 32 + l];
            let qh = b[128 + 32 * n + l];
            let o = 128 * n + l;
            q[o] = (((ql0 & 0xF) | ((qh & 3) << 4)) as i32 - 32) as f32;
            q[o + 32] = (((ql1 & 0xF) | (((qh >> 2) & 3) << 4)) as i32 - 32) as f32;
            q[o + 64] = (((ql0 >> 4) | (((qh >> 4) & 3) << 4)) as i32 - 32) as f32;
            q[o + 96] = (((ql1 >> 4) | (((qh >> 6) & 3) << 4)) as i32 - 32) as f32;
        }
    }
    // Element e uses scale e/16 (the 16 scales run in element order).
    let mut s = 0.0f32;
    for (k, (qs, xs)) in sub::<256, 16>(&q).iter().zip(sub::<256, 16>(x)).enumerate() {
        s += (b[192 + k] as i8) as f32 * dot_n(qs, xs);
    }
    f16_at(b, 208) * s
}

#[inline(always)]
fn dot_q8_k(b: &[u8; 292], x: &[f32; 256]) -> f32 {
    let mut q = [0.0f32; 256];
    for j in 0..256 {
        q[j] = (b[4 + j] as i8) as f32;
    }
    f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * dot_n(&q, x)
}
