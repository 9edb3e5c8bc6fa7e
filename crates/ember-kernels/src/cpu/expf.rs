//! glibc's `expf`, sixteen lanes at a time, bit for bit.
//!
//! llama.cpp's one-row flash attention takes every softmax weight from libm's scalar `expf`
//! (one call per key and head), and so did our transcription of it; the call and its
//! dependency chain were most of a decode row's attention time. glibc's `expf` (since 2.28,
//! from Arm's optimized-routines) is a short sequence of f64 operations on a 32-entry table,
//! so it vectorizes exactly. On x86-64 glibc runs its FMA build (`__expf_fma`) on any CPU with
//! FMA and AVX2; which of its products are fused was read off that build's machine code
//! (Debian glibc 2.36), and the constants are its `__exp2f_data`. [`expf`] transcribes it for
//! one value and [`expf16`] for sixteen; both hand arguments outside glibc's fast path (|x| of
//! 88 and more, infinities, NaN) to libm itself, so every input gets libm's bits (tested
//! against `f32::exp`, which calls libm's `expf`, on a sweep of every range).

/// `2^(i/32)` as f64 bits minus `i << 47`, so that adding `k << 47` gives `2^(k/32)`.
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// `32 / ln 2`.
const INV_LN2_N: f64 = f64::from_bits(0x40471547652b82fe);
/// The cubic's coefficients, scaled for `r` in units of `1/32`.
const C0: f64 = f64::from_bits(0x3ebc6af84b912394);
const C1: f64 = f64::from_bits(0x3f2ebfce50fac4f3);
const C2: f64 = f64::from_bits(0x3f962e42ff0c52d6);
/// `1.5 * 2^52`: adding it rounds to an integer, kept in the low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// glibc takes its slow path when the top 12 bits of `|x|` exceed this (|x| >= 88).
const FAST_ABSTOP_MAX: u32 = 0x42a;

/// Whether `x` takes glibc's fast path (every finite |x| below 88).
#[inline(always)]
fn fast_path(x: f32) -> bool {
    (x.to_bits() >> 20) & 0x7ff <= FAST_ABSTOP_MAX
}

/// `e^x` with glibc's bits: its fast path transcribed (the FMAs where `__expf_fma` fuses),
/// libm itself for the rest.
pub fn expf(x: f32) -> f32 {
    if !fast_path(x) {
        return x.exp();
    }
    let xd = x as f64;
    // z = x * 32/ln2 = k + r, k rounded to nearest by the shift (one fused rounding).
    let kds = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kds.to_bits();
    let kd = kds - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    // 2^(k/32) from the table, then 2^(r/32) ~ C0 r^3 + C1 r^2 + C2 r + 1.
    let s = f64::from_bits(TAB[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(C0, C1);
    let r2 = r * r;
    let y = r.mul_add(C2, 1.0);
    let y = z.mul_add(r2, y);
    (y * s) as f32
}

#[cfg(target_arch = "x86_64")]
pub use x86::expf16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{C0, C1, C2, FAST_ABSTOP_MAX, INV_LN2_N, SHIFT, TAB};

    /// Eight lanes of the fast path in f64 (inputs already widened).
    #[inline(always)]
    unsafe fn fast8(xd: __m512d, tab: &[__m512i; 4]) -> __m256 {
        // SAFETY: AVX-512 F is the caller's.
        unsafe {
            let inv = _mm512_set1_pd(INV_LN2_N);
            let shift = _mm512_set1_pd(SHIFT);
            let kds = _mm512_fmadd_pd(inv, xd, shift);
            let ki = _mm512_castpd_si512(kds);
            let kd = _mm512_sub_pd(kds, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            // Table entry `ki % 32`: bits 0..4 pick one of 16 from two registers, bit 4 the
            // pair.
            let lo = _mm512_permutex2var_epi64(tab[0], ki, tab[1]);
            let hi = _mm512_permutex2var_epi64(tab[2], ki, tab[3]);
            let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
            let t = _mm512_mask_blend_epi64(upper, lo, hi);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let z = _mm512_fmadd_pd(r, _mm512_set1_pd(C0), _mm512_set1_pd(C1));
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(r, _mm512_set1_pd(C2), _mm512_set1_pd(1.0));
            let y = _mm512_fmadd_pd(z, r2, y);
            _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
        }
    }

    /// [`super::expf`] of sixteen lanes: glibc's fast path in two halves of eight f64, and
    /// libm's scalar `expf` for any lane outside it.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn expf16(x: __m512) -> __m512 {
        // SAFETY: AVX-512 F is the caller's; `TAB` is 32 u64 (four 64-byte loads).
        unsafe {
            let tp = TAB.as_ptr().cast::<__m512i>();
            let tab = [
                _mm512_loadu_si512(tp),
                _mm512_loadu_si512(tp.add(1)),
                _mm512_loadu_si512(tp.add(2)),
                _mm512_loadu_si512(tp.add(3)),
            ];
            let bits = _mm512_castps_si512(x);
            let abstop = _mm512_and_si512(_mm512_srli_epi32::<20>(bits), _mm512_set1_epi32(0x7ff));
            let slow = _mm512_cmpgt_epi32_mask(abstop, _mm512_set1_epi32(FAST_ABSTOP_MAX as i32));
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(x),
            )));
            let (lo, hi) = (fast8(lo, &tab), fast8(hi, &tab));
            let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
            ));
            if slow == 0 {
                return y;
            }
            let mut xs = [0.0f32; 16];
            let mut ys = [0.0f32; 16];
            _mm512_storeu_ps(xs.as_mut_ptr(), x);
            _mm512_storeu_ps(ys.as_mut_ptr(), y);
            for l in 0..16 {
                if slow & (1 << l) != 0 {
                    ys[l] = xs[l].exp();
                }
            }
            _mm512_loadu_ps(ys.as_ptr())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits of `f32::exp` (libm) for `xs`, and of ours, compared; panics on the first
    /// difference.
    fn check(xs: &[f32]) {
        for &x in xs {
            let (want, got) = (x.exp(), expf(x));
            assert!(
                want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                "expf({x:e} = {:#x}): libm {want:e}, ours {got:e}",
                x.to_bits()
            );
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            use std::arch::x86_64::*;
            for ch in xs.chunks(16) {
                let mut lanes = [0.0f32; 16];
                lanes[..ch.len()].copy_from_slice(ch);
                let mut out = [0.0f32; 16];
                // SAFETY: AVX-512 F detected above; 16-float buffers.
                unsafe {
                    let y = expf16(_mm512_loadu_ps(lanes.as_ptr()));
                    _mm512_storeu_ps(out.as_mut_ptr(), y);
                }
                for (x, y) in lanes.iter().zip(&out) {
                    let want = x.exp();
                    assert!(
                        want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                        "expf16({x:e}): libm {want:e}, ours {y:e}"
                    );
                }
            }
        }
    }

    /// Every 61st f32 bit pattern (both signs, all exponents: the fast path, the underflow
    /// and overflow ranges, subnormals, infinities and NaNs), plus the edges of glibc's
    /// branches.
    #[test]
    fn matches_libm_on_a_sweep_of_every_range() {
        let mut xs: Vec<f32> = (0..u32::MAX / 61).map(|i| f32::from_bits(i * 61)).collect();
        // 88, its negation, and glibc's overflow and two underflow thresholds
        // (0x1.62e42ep6, -0x1.9fe368p6, -0x1.9d1d9ep6).
        for edge in [
            0x42b00000u32,
            0xc2b00000,
            0x42b17217,
            0xc2cff1b4,
            0xc2ce8ecf,
        ] {
            for d in -64i32..64 {
                xs.push(f32::from_bits(edge.wrapping_add_signed(d)));
            }
        }
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ]);
        check(&xs);
    }

    /// Every f32 in [-104, 0], the range attention's weights come from. Slow in debug
    /// builds: `cargo test --release -p ember-kernels expf -- --ignored`.
    #[test]
    #[ignore]
    fn matches_libm_on_every_non_positive_input() {
        let (start, end) = ((-0.0f32).to_bits(), (-104.0f32).to_bits());
        let mut xs = Vec::with_capacity(1 << 20);
        for bits in (start..=end).step_by(1 << 20) {
            xs.clear();
            xs.extend((bits..=end.min(bits + (1 << 20) - 1)).map(f32::from_bits));
            check(&xs);
        }
    }
}
