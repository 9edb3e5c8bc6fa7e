//! Dot products of f16 and bf16 weight rows with f32 activations: what a Hugging Face
//! checkpoint's dense layers (and its tied embedding as the output head) run on.
//!
//! Written by hand because the portable path converts each half value with bit tricks before a
//! separate dot: with F16C (one instruction per 8 values) and FMA the row streams at memory
//! speed, as llama.cpp's f16 path does. The sum order differs from `ember_quant::dot_row`
//! (four 8-lane accumulators), so results agree with it to f32 rounding, not bit for bit.

use ember_quant::GgmlType;

/// `row · x` for an F16 or BF16 row (`row.len() == 2 * x.len()`), any other type through
/// `ember_quant::dot_row`.
#[inline]
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if matches!(ty, GgmlType::F16 | GgmlType::BF16) && simd() && row.len() == 2 * x.len() {
        // SAFETY: `simd()` checked AVX2, FMA and F16C at run time; the length check above is
        // what the kernel's unchecked loads rely on.
        return unsafe {
            if ty == GgmlType::F16 {
                x86::dot_f16(row, x)
            } else {
                x86::dot_bf16(row, x)
            }
        };
    }
    ember_quant::dot_row(ty, row, x)
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Eight f16 values at `p` as f32.
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p` and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    /// Eight bf16 values at `p` as f32 (a bf16 is the top half of an f32).
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p` and AVX2.
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX is implied by the callers' AVX2.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    macro_rules! dot_kernel {
        ($name:ident, $load:ident, $scalar:expr) => {
            /// `row · x`, `row` holding `x.len()` 2-byte values.
            ///
            /// # Safety
            /// AVX2, FMA and F16C must be available and `row.len() == 2 * x.len()`.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(row: &[u8], x: &[f32]) -> f32 {
                let k = x.len();
                let (w, xs) = (row.as_ptr(), x.as_ptr());
                // SAFETY: every load below reads values `i..i + 8` with `i + 8 <= k`, inside
                // both `x` (k values) and `row` (2k bytes); the features are the caller's.
                unsafe {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut i = 0;
                    while i + 32 <= k {
                        for (j, a) in acc.iter_mut().enumerate() {
                            let at = i + 8 * j;
                            *a = _mm256_fmadd_ps(
                                $load(w.add(2 * at)),
                                _mm256_loadu_ps(xs.add(at)),
                                *a,
                            );
                        }
                        i += 32;
                    }
                    while i + 8 <= k {
                        acc[0] = _mm256_fmadd_ps(
                            $load(w.add(2 * i)),
                            _mm256_loadu_ps(xs.add(i)),
                            acc[0],
                        );
                        i += 8;
                    }
                    let sum =
                        _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                    let mut total = hsum(sum);
                    for t in i..k {
                        let bits = u16::from_le_bytes([row[2 * t], row[2 * t + 1]]);
                        total += $scalar(bits) * x[t];
                    }
                    total
                }
            }
        };
    }

    dot_kernel!(dot_f16, load_f16, |b: u16| half::f16::from_bits(b).to_f32());
    dot_kernel!(dot_bf16, load_bf16, |b: u16| f32::from_bits(
        (b as u32) << 16
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Against the f64 sum of the exactly converted values, for lengths around every loop edge.
    #[test]
    fn half_dots_match_f64_reference() {
        let mut rng = StdRng::seed_from_u64(11);
        for ty in [GgmlType::F16, GgmlType::BF16] {
            for k in [1usize, 7, 8, 9, 31, 32, 33, 40, 64, 100, 576, 1536] {
                let x: Vec<f32> = (0..k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let w: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let row = ember_quant::quantize(ty, &w).expect("quantize");
                let mut wq = vec![0f32; k];
                ember_quant::dequantize(ty, &row, &mut wq).expect("dequantize");
                let want: f64 = wq.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let scale: f64 = wq
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let got = dot_row(ty, &row, &x) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * scale.max(1.0),
                    "{ty} k={k}: {got} vs {want}"
                );
            }
        }
    }
}
