//! Dequantization, bit-exact with ggml's `dequantize_row_*` (ggml-quants.c): every output is
//! computed with the same f32 operations in the same order, so results match to the bit.

use crate::convert::{bf16_bytes_to_f32, f16_bits_to_f32_fast, f16_bytes_to_f32};
use crate::error::{QuantError, expected_bytes};
use crate::types::GgmlType;

/// Elements per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Whether [`dequantize`], [`crate::quantize()`] and [`crate::dot_row`] handle `ty`.
pub const fn supports_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
    )
}

/// Dequantizes `src` (exactly the bytes of `dst.len()` elements of `ty`) into `dst`.
///
/// Errors if the type is unsupported, `dst.len()` is not whole blocks, or `src` has the wrong
/// length. Never panics.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    if !supports_dequantize(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let expected = expected_bytes(ty, dst.len())?;
    if src.len() != expected {
        return Err(QuantError::LengthMismatch {
            ty,
            expected_bytes: expected,
            actual_bytes: src.len(),
        });
    }
    use GgmlType::*;
    match ty {
        F32 => {
            for (o, b) in dst.iter_mut().zip(src.as_chunks::<4>().0) {
                *o = f32::from_le_bytes(*b);
            }
        }
        F16 => {
            for (o, b) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
                *o = f16_bits_to_f32_fast(u16::from_le_bytes(*b));
            }
        }
        BF16 => {
            for (o, b) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
                *o = bf16_bytes_to_f32(*b);
            }
        }
        Q4_0 => blocks(src, dst, block_q4_0),
        Q4_1 => blocks(src, dst, block_q4_1),
        Q5_0 => blocks(src, dst, block_q5_0),
        Q5_1 => blocks(src, dst, block_q5_1),
        Q8_0 => blocks(src, dst, block_q8_0),
        Q8_1 => blocks(src, dst, block_q8_1),
        Q2_K => blocks(src, dst, block_q2_k),
        Q3_K => blocks(src, dst, block_q3_k),
        Q4_K => blocks(src, dst, block_q4_k),
        Q5_K => blocks(src, dst, block_q5_k),
        Q6_K => blocks(src, dst, block_q6_k),
        Q8_K => blocks(src, dst, block_q8_k),
        _ => return Err(QuantError::Unsupported(ty)),
    }
    Ok(())
}

/// Applies a per-block kernel over whole blocks (lengths already validated by the caller).
#[inline(always)]
fn blocks<const TS: usize, const BS: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; TS], &mut [f32; BS]),
) {
    let (sb, _) = src.as_chunks::<TS>();
    let (db, _) = dst.as_chunks_mut::<BS>();
    for (s, d) in sb.iter().zip(db.iter_mut()) {
        f(s, d);
    }
}

#[inline(always)]
pub(crate) fn f16_at<const N: usize>(b: &[u8; N], off: usize) -> f32 {
    f16_bytes_to_f32([b[off], b[off + 1]])
}

// Block layouts (ggml-common.h), little-endian, halves as IEEE f16:
//   q4_0: d, qs[16]                 q4_1: d, m, qs[16]
//   q5_0: d, qh[4], qs[16]          q5_1: d, m, qh[4], qs[16]
//   q8_0: d, qs[32] (i8)            q8_1: d, s, qs[32] (s = d*sum(qs), unused here)
//   q2_K: scales[16], qs[64], d, dmin
//   q3_K: hmask[32], qs[64], scales[12], d
//   q4_K: d, dmin, scales[12], qs[128]
//   q5_K: d, dmin, scales[12], qh[32], qs[128]
//   q6_K: ql[128], qh[64], scales[16] (i8), d
//   q8_K: d (f32), qs[256] (i8), bsums[16] (i16)

pub(crate) fn block_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

pub(crate) fn block_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

pub(crate) fn block_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

pub(crate) fn block_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((q & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

pub(crate) fn block_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

pub(crate) fn block_q8_1(b: &[u8; 36], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[4 + j] as i8) as f32 * d;
    }
}

pub(crate) fn block_q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    let mut yi = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    y[yi + l] = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                }
                yi += 16;
            }
        }
    }
}

/// Unpacks the 16 six-bit Q3_K scales (still offset by 32).
#[inline(always)]
pub(crate) fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for j in 0..16 {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        out[j] = (lo | (hi << 4)) as i8;
    }
    out
}

pub(crate) fn block_q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let hm = &b[0..32];
    let scales = q3_k_scales(&b[96..108]);
    let d_all = f16_at(b, 108);
    let mut is = 0;
    let mut yi = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let k = 16 * half + l;
                    let low = ((q[k] >> shift) & 3) as i32;
                    let sub = if hm[k] & m != 0 { 0 } else { 4 };
                    y[yi + l] = dl * (low - sub) as f32;
                }
                yi += 16;
            }
            m <<= 1;
        }
    }
}

/// ggml's `get_scale_min_k4`: the j-th 6-bit (scale, min) pair of Q4_K/Q5_K.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub(crate) fn block_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    for k in 0..4 {
        let q = &b[16 + 32 * k..16 + 32 * k + 32];
        let (sc, m) = scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            y[64 * k + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[64 * k + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

pub(crate) fn block_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    for k in 0..4 {
        let ql = &b[48 + 32 * k..48 + 32 * k + 32];
        let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
        let (sc, m) = scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * k + l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            y[64 * k + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

pub(crate) fn block_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let yo = 128 * n;
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            // ggml evaluates `d * sc * q` left to right.
            y[yo + l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[yo + l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[yo + l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[yo + l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

pub(crate) fn block_q8_k(b: &[u8; 292], y: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..256 {
        y[j] = d * (b[4 + j] as i8) as f32;
    }
}
