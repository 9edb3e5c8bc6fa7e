//! Reading GGUF blocks in place on a GPU: byte and f16 loads out of a `u32` buffer (WGSL has
//! neither 8-bit nor, everywhere, 16-bit storage), and each block type's dot product of one
//! 32-value chunk with the activations.
//!
//! The arithmetic is f32 throughout: GPU float order differs from llama.cpp's, so the Cube
//! path is tested against the CPU kernels within a tolerance, not bit for bit.

use cubecl::prelude::*;

/// How a weight's bytes are laid out on the device. Every layout is read in chunks of 32 values
/// (a ggml block, or a 32-value slice of a 256-value K-quant super-block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Layout {
    /// f32 values, for every type without an in-place kernel (dequantized once at upload).
    F32,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Layout {
    /// The kernel's compile-time code for this layout.
    pub(crate) fn code(self) -> u32 {
        self as u32
    }

    /// Bytes of one block (for F32: one 32-value chunk).
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Layout::F32 => 128,
            Layout::Q4_0 => 18,
            Layout::Q4_1 => 20,
            Layout::Q5_0 => 22,
            Layout::Q5_1 => 24,
            Layout::Q8_0 => 34,
            Layout::Q4K => 144,
            Layout::Q5K => 176,
            Layout::Q6K => 210,
        }
    }

    /// 32-value chunks per block.
    pub(crate) fn chunks_per_block(self) -> usize {
        match self {
            Layout::Q4K | Layout::Q5K | Layout::Q6K => 8,
            _ => 1,
        }
    }
}

// The layout codes as the kernels compare them.
const F32: u32 = Layout::F32 as u32;
const Q4_0: u32 = Layout::Q4_0 as u32;
const Q4_1: u32 = Layout::Q4_1 as u32;
const Q5_0: u32 = Layout::Q5_0 as u32;
const Q5_1: u32 = Layout::Q5_1 as u32;
const Q8_0: u32 = Layout::Q8_0 as u32;
const Q4K: u32 = Layout::Q4K as u32;
const Q5K: u32 = Layout::Q5K as u32;
// Q6_K is `chunk_dot`'s and `chunk_values`' last branch.

/// Byte `at` of a little-endian `u32` buffer.
#[cube]
pub(crate) fn byte_at(w: &[u32], at: usize) -> u32 {
    (w[at / 4] >> (((at % 4) * 8) as u32)) & 0xFFu32
}

/// The 32 bits at byte `at`, which must be a multiple of 2 (every GGUF block keeps its 16- and
/// 32-bit fields 2-aligned; a 32-bit field may straddle two words).
#[cube]
pub(crate) fn u32_at(w: &[u32], at: usize) -> u32 {
    byte_at(w, at)
        | (byte_at(w, at + 1) << 8)
        | (byte_at(w, at + 2) << 16)
        | (byte_at(w, at + 3) << 24)
}

/// The f16 at byte `at` (2-aligned), widened exactly to f32, subnormals included (by integer
/// arithmetic, since a GPU may flush f32 subnormals and may lack f16 types).
#[cube]
pub(crate) fn half_at(w: &[u32], at: usize) -> f32 {
    let h = (w[at / 4] >> (((at % 4) * 8) as u32)) & 0xFFFFu32;
    f16_bits_to_f32(h)
}

/// An f16 bit pattern as the f32 of the same value.
#[cube]
pub(crate) fn f16_bits_to_f32(h: u32) -> f32 {
    let exp = (h >> 10) & 0x1Fu32;
    let mant = h & 0x3FFu32;
    let v = if exp == 0 {
        // 0 or subnormal: mant * 2^-24, exact in f32.
        f32::cast_from(mant) * 5.960_464_5e-8f32
    } else if exp == 31 {
        f32::reinterpret(0x7F80_0000u32 | (mant << 13))
    } else {
        f32::reinterpret(((exp + 112) << 23) | (mant << 13))
    };
    if (h & 0x8000u32) != 0 { -v } else { v }
}

/// An f32 rounded to the nearest f16 (ties to even, overflow to infinity, f16 subnormals
/// kept), returned as f32: how llama.cpp's f16 KV cache stores K and V.
#[cube]
pub(crate) fn round_f32_to_f16(v: f32) -> f32 {
    let bits = u32::reinterpret(v);
    let sign = bits & 0x8000_0000u32;
    let abs = bits & 0x7FFF_FFFFu32;
    let mut out = 0u32;
    if abs >= 0x7F80_0000u32 {
        // inf, NaN: unchanged.
        out = abs;
    } else if abs >= 0x477F_F000u32 {
        // At or above 65520 (halfway between f16's largest finite value and 2^16): infinity.
        out = 0x7F80_0000u32;
    } else if abs >= 0x3880_0000u32 {
        // Normal f16 range: keep 10 of the 23 mantissa bits, ties to even.
        let lsb = (abs >> 13) & 1u32;
        out = (abs + 0x0FFFu32 + lsb) & 0xFFFF_E000u32;
    } else if abs > 0x3300_0000u32 {
        // f16 subnormals (2^-24 steps): round the value to a multiple of 2^-24, ties to even,
        // by integer arithmetic on the mantissa with its implicit bit.
        let exp = abs >> 23;
        let mant = (abs & 0x007F_FFFFu32) | 0x0080_0000u32;
        // value = mant * 2^(exp - 150); in units of 2^-24: mant >> (126 - exp).
        let shift = 126u32 - exp;
        let q = mant >> shift;
        let rem = mant & ((1u32 << shift) - 1u32);
        let half = 1u32 << (shift - 1u32);
        let mut units = q;
        if rem > half || (rem == half && (q & 1u32) == 1u32) {
            units += 1u32;
        }
        out = u32::reinterpret(f32::cast_from(units) * 5.960_464_5e-8f32);
    } else if abs == 0x3300_0000u32 {
        // Exactly half of the smallest subnormal: ties to even, to zero.
        out = 0u32;
    }
    // Below half the smallest subnormal: zero (`out` stays 0).
    f32::reinterpret(sign | out)
}

/// Signed value of an 8-bit two's-complement byte.
#[cube]
fn signed_byte(b: u32) -> f32 {
    let mut v = f32::cast_from(b);
    if b >= 128u32 {
        v -= 256.0f32;
    }
    v
}

/// `(scale, min)` of sub-block `j` (0..8) in a Q4_K / Q5_K block's 12 packed scale bytes at
/// `at`, as ggml's `get_scale_min_k4`.
#[cube]
fn scale_min_k4(w: &[u32], at: usize, j: usize) -> (f32, f32) {
    let sc = if j < 4 {
        byte_at(w, at + j) & 63u32
    } else {
        (byte_at(w, at + j + 4) & 0xFu32) | ((byte_at(w, at + j - 4) >> 6) << 4)
    };
    let mn = if j < 4 {
        byte_at(w, at + j + 4) & 63u32
    } else {
        (byte_at(w, at + j + 4) >> 4) | ((byte_at(w, at + j) >> 6) << 4)
    };
    (f32::cast_from(sc), f32::cast_from(mn))
}

/// The dot product of 32 weights (chunk `sub` of the block at byte `base`) with
/// `x[xo..xo + 32]`.
#[cube]
pub(crate) fn chunk_dot(
    w: &[u32],
    base: usize,
    sub: usize,
    x: &[f32],
    xo: usize,
    #[comptime] layout: u32,
) -> f32 {
    if comptime!(layout == F32) {
        let word = base / 4;
        let mut acc = 0.0f32;
        for i in 0..32usize {
            acc += x[xo + i] * f32::reinterpret(w[word + i]);
        }
        acc
    } else if comptime!(layout == Q4_0) {
        let mut acc = 0.0f32;
        for i in 0..16usize {
            let q = byte_at(w, base + 2 + i);
            acc += x[xo + i] * (f32::cast_from(q & 0xFu32) - 8.0f32);
            acc += x[xo + i + 16] * (f32::cast_from(q >> 4) - 8.0f32);
        }
        half_at(w, base) * acc
    } else if comptime!(layout == Q4_1) {
        let mut acc = 0.0f32;
        let mut sum = 0.0f32;
        for i in 0..16usize {
            let q = byte_at(w, base + 4 + i);
            let (a, b) = (x[xo + i], x[xo + i + 16]);
            acc += a * f32::cast_from(q & 0xFu32) + b * f32::cast_from(q >> 4);
            sum += a + b;
        }
        half_at(w, base) * acc + half_at(w, base + 2) * sum
    } else if comptime!(layout == Q5_0) {
        let qh = u32_at(w, base + 2);
        let mut acc = 0.0f32;
        for i in 0..16usize {
            let q = byte_at(w, base + 6 + i);
            let lo = (q & 0xFu32) | (((qh >> (i as u32)) & 1u32) << 4);
            let hi = (q >> 4) | (((qh >> (i as u32 + 16u32)) & 1u32) << 4);
            acc += x[xo + i] * (f32::cast_from(lo) - 16.0f32);
            acc += x[xo + i + 16] * (f32::cast_from(hi) - 16.0f32);
        }
        half_at(w, base) * acc
    } else if comptime!(layout == Q5_1) {
        let qh = u32_at(w, base + 4);
        let mut acc = 0.0f32;
        let mut sum = 0.0f32;
        for i in 0..16usize {
            let q = byte_at(w, base + 8 + i);
            let lo = (q & 0xFu32) | (((qh >> (i as u32)) & 1u32) << 4);
            let hi = (q >> 4) | (((qh >> (i as u32 + 16u32)) & 1u32) << 4);
            let (a, b) = (x[xo + i], x[xo + i + 16]);
            acc += a * f32::cast_from(lo) + b * f32::cast_from(hi);
            sum += a + b;
        }
        half_at(w, base) * acc + half_at(w, base + 2) * sum
    } else if comptime!(layout == Q8_0) {
        let mut acc = 0.0f32;
        for i in 0..32usize {
            acc += x[xo + i] * signed_byte(byte_at(w, base + 2 + i));
        }
        half_at(w, base) * acc
    } else if comptime!(layout == Q4K) {
        // d, dmin, 12 scale bytes, then 128 bytes of nibbles: sub-blocks 2j and 2j + 1 are the
        // low and high nibbles of bytes 32j..32j + 32.
        let (sc, mn) = scale_min_k4(w, base + 4, sub);
        let qs = base + 16 + (sub / 2) * 32;
        let shift = ((sub % 2) * 4) as u32;
        let mut acc = 0.0f32;
        let mut sum = 0.0f32;
        for i in 0..32usize {
            let a = x[xo + i];
            acc += a * f32::cast_from((byte_at(w, qs + i) >> shift) & 0xFu32);
            sum += a;
        }
        half_at(w, base) * sc * acc - half_at(w, base + 2) * mn * sum
    } else if comptime!(layout == Q5K) {
        // d, dmin, 12 scale bytes, 32 bytes of high bits (bit `sub` of byte i is value i's
        // fifth bit in sub-block `sub`), 128 bytes of nibbles as Q4_K.
        let (sc, mn) = scale_min_k4(w, base + 4, sub);
        let qs = base + 48 + (sub / 2) * 32;
        let shift = ((sub % 2) * 4) as u32;
        let mut acc = 0.0f32;
        let mut sum = 0.0f32;
        for i in 0..32usize {
            let a = x[xo + i];
            let high = (byte_at(w, base + 16 + i) >> (sub as u32)) & 1u32;
            acc += a * f32::cast_from(((byte_at(w, qs + i) >> shift) & 0xFu32) | (high << 4));
            sum += a;
        }
        half_at(w, base) * sc * acc - half_at(w, base + 2) * mn * sum
    } else {
        // Q6_K: ql[128], qh[64], 16 signed scales, d. Each half (128 values) reads ql[64h..],
        // qh[32h..] and scales[8h..]; its quarter r takes ql[l] or ql[l + 32] (low nibble for
        // r < 2), and qh[l]'s bit pair 2r, for l in 0..32; scale 2r + l / 16.
        let half_index = sub / 4;
        let r = sub % 4;
        let ql = base + 64 * half_index + (r % 2) * 32;
        let qh = base + 128 + 32 * half_index;
        let sc = base + 192 + 8 * half_index + 2 * r;
        let nib = ((r / 2) * 4) as u32;
        let hs = (2 * r) as u32;
        let mut acc_lo = 0.0f32;
        let mut acc_hi = 0.0f32;
        for i in 0..16usize {
            let q =
                ((byte_at(w, ql + i) >> nib) & 0xFu32) | (((byte_at(w, qh + i) >> hs) & 3u32) << 4);
            acc_lo += x[xo + i] * (f32::cast_from(q) - 32.0f32);
            let i2 = i + 16;
            let q2 = ((byte_at(w, ql + i2) >> nib) & 0xFu32)
                | (((byte_at(w, qh + i2) >> hs) & 3u32) << 4);
            acc_hi += x[xo + i2] * (f32::cast_from(q2) - 32.0f32);
        }
        let d = half_at(w, base + 208);
        d * (signed_byte(byte_at(w, sc)) * acc_lo + signed_byte(byte_at(w, sc + 1)) * acc_hi)
    }
}

/// Chunk `sub` of the block at byte `base` as 32 f32 values, written to `out[o..o + 32]`: the
/// same decoding as [`chunk_dot`], for the dequantize-then-GEMM path of large batches.
#[cube]
pub(crate) fn chunk_values(
    w: &[u32],
    base: usize,
    sub: usize,
    out: &mut [f32],
    o: usize,
    #[comptime] layout: u32,
) {
    if comptime!(layout == F32) {
        let word = base / 4;
        for i in 0..32usize {
            out[o + i] = f32::reinterpret(w[word + i]);
        }
    } else if comptime!(layout == Q4_0) {
        let d = half_at(w, base);
        for i in 0..16usize {
            let q = byte_at(w, base + 2 + i);
            out[o + i] = d * (f32::cast_from(q & 0xFu32) - 8.0f32);
            out[o + i + 16] = d * (f32::cast_from(q >> 4) - 8.0f32);
        }
    } else if comptime!(layout == Q4_1) {
        let (d, m) = (half_at(w, base), half_at(w, base + 2));
        for i in 0..16usize {
            let q = byte_at(w, base + 4 + i);
            out[o + i] = d * f32::cast_from(q & 0xFu32) + m;
            out[o + i + 16] = d * f32::cast_from(q >> 4) + m;
        }
    } else if comptime!(layout == Q5_0) {
        let d = half_at(w, base);
        let qh = u32_at(w, base + 2);
        for i in 0..16usize {
            let q = byte_at(w, base + 6 + i);
            let lo = (q & 0xFu32) | (((qh >> (i as u32)) & 1u32) << 4);
            let hi = (q >> 4) | (((qh >> (i as u32 + 16u32)) & 1u32) << 4);
            out[o + i] = d * (f32::cast_from(lo) - 16.0f32);
            out[o + i + 16] = d * (f32::cast_from(hi) - 16.0f32);
        }
    } else if comptime!(layout == Q5_1) {
        let (d, m) = (half_at(w, base), half_at(w, base + 2));
        let qh = u32_at(w, base + 4);
        for i in 0..16usize {
            let q = byte_at(w, base + 8 + i);
            let lo = (q & 0xFu32) | (((qh >> (i as u32)) & 1u32) << 4);
            let hi = (q >> 4) | (((qh >> (i as u32 + 16u32)) & 1u32) << 4);
            out[o + i] = d * f32::cast_from(lo) + m;
            out[o + i + 16] = d * f32::cast_from(hi) + m;
        }
    } else if comptime!(layout == Q8_0) {
        let d = half_at(w, base);
        for i in 0..32usize {
            out[o + i] = d * signed_byte(byte_at(w, base + 2 + i));
        }
    } else if comptime!(layout == Q4K) {
        let (sc, mn) = scale_min_k4(w, base + 4, sub);
        let d = half_at(w, base) * sc;
        let m = half_at(w, base + 2) * mn;
        let qs = base + 16 + (sub / 2) * 32;
        let shift = ((sub % 2) * 4) as u32;
        for i in 0..32usize {
            out[o + i] = d * f32::cast_from((byte_at(w, qs + i) >> shift) & 0xFu32) - m;
        }
    } else if comptime!(layout == Q5K) {
        let (sc, mn) = scale_min_k4(w, base + 4, sub);
        let d = half_at(w, base) * sc;
        let m = half_at(w, base + 2) * mn;
        let qs = base + 48 + (sub / 2) * 32;
        let shift = ((sub % 2) * 4) as u32;
        for i in 0..32usize {
            let high = (byte_at(w, base + 16 + i) >> (sub as u32)) & 1u32;
            let q = ((byte_at(w, qs + i) >> shift) & 0xFu32) | (high << 4);
            out[o + i] = d * f32::cast_from(q) - m;
        }
    } else {
        // Q6_K, laid out as in `chunk_dot`.
        let half_index = sub / 4;
        let r = sub % 4;
        let ql = base + 64 * half_index + (r % 2) * 32;
        let qh = base + 128 + 32 * half_index;
        let sc = base + 192 + 8 * half_index + 2 * r;
        let nib = ((r / 2) * 4) as u32;
        let hs = (2 * r) as u32;
        let d = half_at(w, base + 208);
        let d_lo = d * signed_byte(byte_at(w, sc));
        let d_hi = d * signed_byte(byte_at(w, sc + 1));
        for i in 0..32usize {
            let q =
                ((byte_at(w, ql + i) >> nib) & 0xFu32) | (((byte_at(w, qh + i) >> hs) & 3u32) << 4);
            let scale = if i < 16 { d_lo } else { d_hi };
            out[o + i] = scale * (f32::cast_from(q) - 32.0f32);
        }
    }
}
