//! aarch64 NEON version of the q8 dot product ([`dot`]); quantization and unpacking run the
//! scalar code, and the batched entry points unpack rows and call this.
//!
//! It returns exactly what `scalar::dot` returns: per block, the eight lane sums of four
//! products are exact (`vmull_s8` gives exact `i16` products; `vpaddlq_s16` and `vpaddq_s32`
//! add them in `i32`), converted to f32 and accumulated with one fused multiply-add per lane
//! (`vfmaq_f32`) into two `f32x4` halves; the halves are folded in `hsum_float_8`'s order and
//! the offsets' FMA chain added last.
//!
//! `vdotq_s32` (the `dotprod` extension) is not used: its Rust intrinsic is still unstable.
//! Compile-checked only: no aarch64 machine is available to this project.

use std::arch::aarch64::*;

use super::{BLOCK, QuantizedActs, UnpackedRow};

/// Lane sums of 16 products: lane `L` = values `4L..4L + 4`.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn lanes16(w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: the caller guarantees NEON.
    unsafe {
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)));
        let hi = vpaddlq_s16(vmull_high_s8(w, x));
        vpaddq_s32(lo, hi)
    }
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
    let nb = acts.k / BLOCK;
    let xq = &acts.qs[i * acts.k..(i + 1) * acts.k];
    let xd = &acts.d[i * nb..(i + 1) * nb];
    let xs = &acts.s[i * nb..(i + 1) * nb];
    assert!(
        row.q.len() >= acts.k && row.d.len() >= nb,
        "row shorter than activations"
    );
    assert!(!with_min || row.m.len() >= nb, "row has no offsets");
    // SAFETY: NEON is enabled on this function; every block `b < nb` lies inside `row.q` and
    // `xq` (asserted above).
    unsafe {
        let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut summs = 0.0f32;
        for b in 0..nb {
            let w = row.q.as_ptr().add(b * BLOCK);
            let x = xq.as_ptr().add(b * BLOCK);
            let s0 = lanes16(vld1q_s8(w), vld1q_s8(x));
            let s1 = lanes16(vld1q_s8(w.add(16)), vld1q_s8(x.add(16)));
            let dd = vdupq_n_f32(row.d[b] * xd[b]);
            lo = vfmaq_f32(lo, dd, vcvtq_f32_s32(s0));
            hi = vfmaq_f32(hi, dd, vcvtq_f32_s32(s1));
            if with_min {
                summs = row.m[b].mul_add(xs[b], summs);
            }
        }
        let s = vaddq_f32(hi, lo);
        let h = (vgetq_lane_f32::<0>(s) + vgetq_lane_f32::<2>(s))
            + (vgetq_lane_f32::<1>(s) + vgetq_lane_f32::<3>(s));
        if with_min { h + summs } else { h }
    }
}
