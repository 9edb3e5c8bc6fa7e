//! Scalar f16/bf16 conversions, matching ggml's `GGML_FP16_TO_FP32` / `GGML_FP32_TO_FP16` and
//! `ggml_compute_fp32_to_bf16` (round to nearest even, NaN kept quiet).

use half::{bf16, f16};

/// Reads a little-endian IEEE half at `b[0..2]` as f32.
#[inline(always)]
pub fn f16_bytes_to_f32(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// f32 to little-endian IEEE half bytes, round to nearest even (as ggml).
#[inline]
pub fn f32_to_f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// Reads a little-endian bfloat16 as f32 (exact: bf16 is the top half of an f32).
#[inline(always)]
pub fn bf16_bytes_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

/// f32 to little-endian bfloat16 bytes, round to nearest even; NaN stays NaN (quiet).
#[inline]
pub fn f32_to_bf16_bytes(x: f32) -> [u8; 2] {
    bf16::from_f32(x).to_bits().to_le_bytes()
}

/// Branch-free f16 bits to f32, exact for every input (normals, subnormals, inf, NaN).
///
/// The scalar `half` conversion branches per element; this form (the FP16 library's
/// `fp16_ieee_to_fp32_value`, also ggml's generic path) is plain integer/float arithmetic with a
/// select, so loops over it auto-vectorize. Used on the F16 hot paths.
#[inline(always)]
pub fn f16_bits_to_f32_fast(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);
    // Normal numbers: move the exponent/mantissa into place, then rescale by 2^-112.
    let exp_offset: u32 = 0xE0 << 23;
    let exp_scale = f32::from_bits(0x0780_0000);
    let normalized = f32::from_bits((two_w >> 4).wrapping_add(exp_offset)) * exp_scale;
    // Subnormals: build 0.5 + m*2^-24 and subtract the 0.5 back out, exactly.
    let magic_mask: u32 = 126 << 23;
    let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;
    let denorm_cutoff: u32 = 1 << 27;
    let bits = if two_w < denorm_cutoff {
        denormalized.to_bits()
    } else {
        normalized.to_bits()
    };
    f32::from_bits(sign | bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_f16_matches_half_for_all_bit_patterns() {
        for h in 0..=u16::MAX {
            let a = f16_bits_to_f32_fast(h);
            let b = f16::from_bits(h).to_f32();
            if b.is_nan() {
                assert!(a.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn bf16_round_trip_and_nan() {
        for &x in &[
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            3.5,
            -1e-30,
            1e30,
            f32::INFINITY,
        ] {
            let b = f32_to_bf16_bytes(x);
            let y = bf16_bytes_to_f32(b);
            assert!(y == x || (y - x).abs() <= x.abs() / 128.0, "{x} -> {y}");
        }
        assert!(bf16_bytes_to_f32(f32_to_bf16_bytes(f32::NAN)).is_nan());
        // Round to nearest even at the halfway point.
        assert_eq!(
            f32_to_bf16_bytes(f32::from_bits(0x3f80_8000)),
            0x3f80u16.to_le_bytes()
        );
        assert_eq!(
            f32_to_bf16_bytes(f32::from_bits(0x3f81_8000)),
            0x3f82u16.to_le_bytes()
        );
    }
}
