//! x86-64 versions of the K-quant dots: AVX2 and AVX-512 VNNI.
//!
//! Each returns exactly what `super::scalar` returns: the per-block integer sums are exact
//! however they are computed, and the float combination per block is the same operations.

use std::arch::x86_64::*;

use super::{
    Q2K_BYTES, Q3K_BYTES, Q4kFold, Q6K_BYTES, QK_K, hsum8, q3k_scales, q4k_scales, q45k_bytes,
};

#[inline(always)]
unsafe fn hsum256(v: __m256i) -> i32 {
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// How far ahead of the block being dotted decode's kernels prefetch weights: the hardware
/// prefetchers alone leave the two-thread decode well short of the bandwidth limit. Measured
/// on a 1B Q4_K_M decode: 21.7 t/s without, about 30 at 1 KiB, about 36 at 4 KiB
/// (docs/performance.md, 2026-12-06, AMD host); on the Intel host of 2026-12-07 (evening),
/// 16 KiB ran 7-8% faster than 4 KiB in each of six rounds, 2, 8, 32 and 64 KiB slower.
/// The hint is T1 (to L2, not L1): a block is read once, so L1 gains nothing from holding
/// it early; on that host T1 and T2 ran 3-17% faster than T0 and NTA at half the speed.
const PREFETCH_BYTES: usize = 16384;

/// Prefetches the cache lines of the `len`-byte block `PREFETCH_BYTES` past the one at `p`.
#[inline(always)]
fn prefetch_ahead(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        // A hint only: the address may lie past the weights (`wrapping_add`, never
        // dereferenced).
        let q = p.wrapping_add(PREFETCH_BYTES + off);
        // SAFETY: prefetching has no architectural effect and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(q.cast()) };
        off += 64;
    }
}

/// The two f16 values at `x[off..off + 4]`, converted exactly (as `half` does).
#[inline(always)]
unsafe fn f16x2(x: &[u8], off: usize) -> (f32, f32) {
    let v = u32::from_le_bytes([x[off], x[off + 1], x[off + 2], x[off + 3]]);
    // SAFETY (caller): F16C is enabled.
    unsafe {
        let f = _mm_cvtph_ps(_mm_cvtsi32_si128(v as i32));
        (_mm_cvtss_f32(f), _mm_cvtss_f32(_mm_shuffle_ps::<1>(f, f)))
    }
}

/// `sum_j bsums[j] * mins[j / 2]` for one block's 16 `bsums`.
#[inline(always)]
unsafe fn mins_dot(bsums: &[i16], mins: &[u8; 8]) -> i32 {
    assert!(bsums.len() >= 16);
    unsafe {
        // SAFETY: 16 i16 (asserted) and 8 bytes are read.
        let bs = _mm256_loadu_si256(bsums.as_ptr().cast());
        let m = _mm_cvtepu8_epi16(_mm_loadl_epi64(mins.as_ptr().cast()));
        let m = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
        hsum256(_mm256_madd_epi16(bs, m))
    }
}

/// 16 in each byte of `qh` with bit mask `m` set, else 0.
#[inline(always)]
unsafe fn bit16(qh: __m256i, m: u8) -> __m256i {
    unsafe {
        let m = _mm256_set1_epi8(m as i8);
        _mm256_and_si256(
            _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m),
            _mm256_set1_epi8(16),
        )
    }
}

/// Q5_K's fifth bits for chunk `c`: 16 where bit `2c` (low nibbles) or `2c + 1` (high
/// nibbles) of `qh` is set, else 0.
#[inline(always)]
unsafe fn q5_high(qh: __m256i, c: usize) -> (__m256i, __m256i) {
    // SAFETY (caller): AVX2 is enabled.
    unsafe { (bit16(qh, 1 << (2 * c)), bit16(qh, 2 << (2 * c))) }
}

/// `(s & 3) << 4` per byte.
#[inline(always)]
unsafe fn high2(s: __m256i, m3: __m256i) -> __m256i {
    unsafe { _mm256_slli_epi16::<4>(_mm256_and_si256(s, m3)) }
}

/// The four 32-byte vectors of 6-bit Q6_K values (0..64, not yet minus 32) of half `n` of a
/// block: positions `128n + 32t .. 128n + 32t + 32` for `t = 0..4`.
#[inline(always)]
unsafe fn q6k_half(x: &[u8], n: usize) -> [__m256i; 4] {
    debug_assert!(x.len() >= Q6K_BYTES);
    unsafe {
        let m4 = _mm256_set1_epi8(0xF);
        let m3 = _mm256_set1_epi8(3);
        let p = x.as_ptr();
        // SAFETY (caller): `x` is one 210-byte Q6_K block, so these 32-byte loads are inside.
        let ql0 = _mm256_loadu_si256(p.add(64 * n).cast());
        let ql1 = _mm256_loadu_si256(p.add(64 * n + 32).cast());
        let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
        // 16-bit shifts: the bits they move across bytes are masked off.
        [
            _mm256_or_si256(_mm256_and_si256(ql0, m4), high2(qh, m3)),
            _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                high2(_mm256_srli_epi16::<2>(qh), m3),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                high2(_mm256_srli_epi16::<4>(qh), m3),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                high2(_mm256_srli_epi16::<6>(qh), m3),
            ),
        ]
    }
}

/// The Q6_K offset shares of ggml's eight lanes for one block (see `super::q6k_offsets`).
#[inline(always)]
unsafe fn q6k_offsets(bsums: &[i16], scales: &[u8]) -> __m256i {
    assert!(bsums.len() >= 16 && scales.len() >= 16);
    // SAFETY (caller): AVX2 is enabled; 16 i16 and 16 bytes are read, as asserted.
    unsafe {
        let b = _mm256_loadu_si256(bsums.as_ptr().cast());
        let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(scales.as_ptr().cast()));
        _mm256_slli_epi32::<5>(_mm256_madd_epi16(b, sc))
    }
}

/// Combines one Q6_K block's eight lane sums into the running result: the tiled kernel's
/// `fma(isum * dw, da, sum)`, or the per-row dot's `fma(da * dw, lane, acc)`.
#[inline(always)]
unsafe fn q6k_combine(
    lanes: __m256i,
    dw: f32,
    da: f32,
    tiled: bool,
    sum: &mut f32,
    acc: &mut __m256,
) {
    // SAFETY (caller): AVX2 and FMA are enabled.
    unsafe {
        if tiled {
            *sum = (hsum256(lanes) as f32 * dw).mul_add(da, *sum);
        } else {
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(da * dw), _mm256_cvtepi32_ps(lanes), *acc);
        }
    }
}

/// The result of [`q6k_combine`]'s accumulation.
#[inline(always)]
unsafe fn q6k_result(tiled: bool, sum: f32, acc: __m256) -> f32 {
    if tiled {
        return sum;
    }
    let mut a = [0.0f32; 8];
    // SAFETY (caller): AVX is enabled; `a` holds 8 floats.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc) };
    hsum8(&a)
}

/// Q4_K as llama.cpp's repacked kernels (see `super::scalar::dot_q4k`), for AVX2 and up.
#[inline(always)]
unsafe fn q4k_body(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], pairs: bool) -> f32 {
    let nb = row.len() / q45k_bytes(false);
    assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
    // SAFETY (caller): AVX2, FMA and F16C are enabled. Loads are inside the 144-byte block and
    // the block's 256 activations, as asserted.
    unsafe {
        let m4 = _mm256_set1_epi8(0xF);
        let mut fold = Q4kFold::new(pairs);
        for (b, x) in row.chunks_exact(q45k_bytes(false)).enumerate() {
            prefetch_ahead(x.as_ptr(), q45k_bytes(false));
            let (sc, mn) = q4k_scales(&x[4..16]);
            let bs = &bsums[b * 16..(b + 1) * 16];
            let (xd, xmin) = f16x2(x, 0);
            let (dd, dmin) = (xd * d[b], xmin * d[b]);
            let mut block = _mm256_setzero_si256();
            for c in 0..4 {
                let y = qs.as_ptr().add(b * QK_K + 64 * c);
                let q4 = _mm256_loadu_si256(x.as_ptr().add(16 + 32 * c).cast());
                let (y0, y1) = (
                    _mm256_loadu_si256(y.cast()),
                    _mm256_loadu_si256(y.add(32).cast()),
                );
                let lo = _mm256_and_si256(q4, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
                // Pairs of products are at most 2 * 15 * 128: exact in i16.
                let slo = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(lo, y0),
                    _mm256_set1_epi16(sc[2 * c] as i16),
                );
                let shi = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(hi, y1),
                    _mm256_set1_epi16(sc[2 * c + 1] as i16),
                );
                if pairs {
                    fold.pair(c, hsum256(_mm256_add_epi32(slo, shi)), &mn, bs, dd, dmin);
                } else {
                    // The gemv fold needs only the block's total: one reduction per block.
                    block = _mm256_add_epi32(block, _mm256_add_epi32(slo, shi));
                }
            }
            if pairs {
                fold.end_block(dd, dmin);
            } else {
                fold.block(hsum256(block), mins_dot(bs, &mn), dd, dmin);
            }
        }
        fold.result()
    }
}

/// Q2_K's dot (see `super::scalar::dot_q2k`), for AVX2 and up.
#[inline(always)]
unsafe fn q2k_body(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
    let nb = row.len() / Q2K_BYTES;
    assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
    // SAFETY (caller): AVX2 and F16C are enabled. Loads are inside the block (84 bytes),
    // `qs` (256 values per block) and `bsums` (16 per block), as asserted.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(0xF);
        let mut sum = 0.0f32;
        for (b, x) in row.chunks_exact(Q2K_BYTES).enumerate() {
            prefetch_ahead(x.as_ptr(), Q2K_BYTES);
            let sc = _mm_loadu_si128(x.as_ptr().cast());
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), m4));
            let bs = _mm256_loadu_si256(bsums.as_ptr().add(16 * b).cast());
            let summs = hsum256(_mm256_madd_epi16(bs, mins));
            let mut acc = _mm256_setzero_si256();
            for n in 0..2 {
                let q2 = _mm256_loadu_si256(x.as_ptr().add(16 + 32 * n).cast());
                for j in 0..4 {
                    let a =
                        _mm256_and_si256(_mm256_srl_epi16(q2, _mm_cvtsi32_si128(2 * j as i32)), m3);
                    let y = _mm256_loadu_si256(qs.as_ptr().add(b * QK_K + 128 * n + 32 * j).cast());
                    // Elements 0..16 use scale 8n + 2j, 16..32 the next one.
                    let k = 8 * n + 2 * j;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16((x[k + 1] & 0xF) as i16),
                        _mm_set1_epi16((x[k] & 0xF) as i16),
                    );
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, y), s));
                }
            }
            let isum = hsum256(acc);
            let (xd, xmin) = f16x2(x, 80);
            let (dall, dmin) = (d[b] * xd, d[b] * xmin);
            sum += dall * isum as f32 - dmin * summs as f32;
        }
        sum
    }
}

/// Q3_K's dot (see `super::scalar::dot_q3k`), for AVX2 and up.
#[inline(always)]
unsafe fn q3k_body(row: &[u8], qs: &[i8], d: &[f32]) -> f32 {
    let nb = row.len() / Q3K_BYTES;
    assert!(qs.len() >= nb * QK_K && d.len() >= nb);
    // SAFETY (caller): AVX2 and F16C are enabled. Loads are inside the block (110 bytes) and
    // `qs` (256 values per block), as asserted.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let four = _mm256_set1_epi8(4);
        let mut sum = 0.0f32;
        for (b, x) in row.chunks_exact(Q3K_BYTES).enumerate() {
            prefetch_ahead(x.as_ptr(), Q3K_BYTES);
            let sc = q3k_scales(&x[96..108]);
            let hm = _mm256_loadu_si256(x.as_ptr().cast());
            let mut acc = _mm256_setzero_si256();
            for t in 0..8 {
                let q3 = _mm256_loadu_si256(x.as_ptr().add(32 + 32 * (t / 4)).cast());
                let low = _mm256_and_si256(
                    _mm256_srl_epi16(q3, _mm_cvtsi32_si128(2 * (t % 4) as i32)),
                    m3,
                );
                // a + 4 in 0..8: the high bit set adds 4; (a + 4) * y - 4 * y, both exact.
                let m = _mm256_set1_epi8((1u8 << t) as i8);
                let h = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, m), m), four);
                let a = _mm256_or_si256(low, h);
                let y = _mm256_loadu_si256(qs.as_ptr().add(b * QK_K + 32 * t).cast());
                let p = _mm256_sub_epi16(_mm256_maddubs_epi16(a, y), _mm256_maddubs_epi16(four, y));
                let s = _mm256_set_m128i(
                    _mm_set1_epi16(sc[2 * t + 1] as i16 - 32),
                    _mm_set1_epi16(sc[2 * t] as i16 - 32),
                );
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
            }
            let isum = hsum256(acc);
            let (_, xd) = f16x2(x, 106);
            sum += xd * d[b] * isum as f32;
        }
        sum
    }
}

pub mod avx2 {
    use super::*;

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `qs` holds `QK_K` values, `d` one scale and
    /// `bsums` 16 sums per block of `row`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], pairs: bool) -> f32 {
        // SAFETY: AVX2, FMA and F16C are enabled here.
        unsafe { q4k_body(row, qs, d, bsums, pairs) }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C; `qs` holds `QK_K` values and `d` one scale per
    /// block of `row`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q3k(row: &[u8], qs: &[i8], d: &[f32]) -> f32 {
        // SAFETY: AVX2 and F16C are enabled here.
        unsafe { q3k_body(row, qs, d) }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C; `qs` holds `QK_K` values, `d` one scale and
    /// `bsums` 16 sums per block of `row`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q2k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        // SAFETY: AVX2 and F16C are enabled here.
        unsafe { q2k_body(row, qs, d, bsums) }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C; `qs` holds `QK_K` values, `d` one scale and `bsums` 16 sums
    /// per block of `row`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q45k<const Q5: bool>(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        let nb = row.len() / q45k_bytes(Q5);
        let off = if Q5 { 48 } else { 16 };
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        let m4 = _mm256_set1_epi8(0xF);
        let (mut sum, mut mins) = (0.0f32, 0.0f32);
        for (b, x) in row.chunks_exact(q45k_bytes(Q5)).enumerate() {
            prefetch_ahead(x.as_ptr(), q45k_bytes(Q5));
            // SAFETY: Q5_K blocks hold 32 bytes of fifth bits at 16.
            let qh = if Q5 {
                unsafe { _mm256_loadu_si256(x.as_ptr().add(16).cast()) }
            } else {
                _mm256_setzero_si256()
            };
            let (sc, mn) = q4k_scales(&x[4..16]);
            // SAFETY: AVX2 is enabled here.
            let summins = unsafe { mins_dot(&bsums[b * 16..], &mn) };
            let mut acc = _mm256_setzero_si256();
            for c in 0..4 {
                // SAFETY: 32 bytes at `off + 32c` lie in the block, 64 values at
                // `b * 256 + 64c` in `qs` (asserted above).
                let (q4, y0, y1) = unsafe {
                    let y = qs.as_ptr().add(b * QK_K + 64 * c);
                    (
                        _mm256_loadu_si256(x.as_ptr().add(off + 32 * c).cast()),
                        _mm256_loadu_si256(y.cast()),
                        _mm256_loadu_si256(y.add(32).cast()),
                    )
                };
                let mut lo = _mm256_and_si256(q4, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
                if Q5 {
                    // SAFETY: AVX2 is enabled here.
                    let (hl, hh) = unsafe { q5_high(qh, c) };
                    lo = _mm256_or_si256(lo, hl);
                    hi = _mm256_or_si256(hi, hh);
                }
                // Pairs of products are at most 2 * 31 * 127: exact in i16.
                let plo = _mm256_maddubs_epi16(lo, y0);
                let phi = _mm256_maddubs_epi16(hi, y1);
                let slo = _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * c] as i16));
                let shi = _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * c + 1] as i16));
                acc = _mm256_add_epi32(acc, _mm256_add_epi32(slo, shi));
            }
            // SAFETY: AVX2 is enabled here.
            let isum = unsafe { hsum256(acc) };
            // SAFETY: F16C is enabled here.
            let (xd, xmin) = unsafe { f16x2(x, 0) };
            sum += xd * d[b] * isum as f32;
            mins -= xmin * d[b] * summins as f32;
        }
        mins + sum
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C; `qs` holds `QK_K` values and `d` one scale per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], tiled: bool) -> f32 {
        let nb = row.len() / Q6K_BYTES;
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        let (mut sum, mut acc) = (0.0f32, _mm256_setzero_ps());
        for (b, x) in row.chunks_exact(Q6K_BYTES).enumerate() {
            prefetch_ahead(x.as_ptr(), Q6K_BYTES);
            let mut lanes = _mm256_setzero_si256();
            for n in 0..2 {
                // SAFETY: `x` is a whole block; AVX2 is enabled.
                let a = unsafe { q6k_half(x, n) };
                for (t, &at) in a.iter().enumerate() {
                    // SAFETY: 32 values at `b * 256 + 128n + 32t` lie in `qs` (asserted).
                    let y = unsafe {
                        _mm256_loadu_si256(qs.as_ptr().add(b * QK_K + 128 * n + 32 * t).cast())
                    };
                    // Unsigned 6-bit values: pairs of products at most 2 * 63 * 128, exact.
                    let p = _mm256_maddubs_epi16(at, y);
                    let j = 8 * n + 2 * t;
                    let sc = _mm256_set_m128i(
                        _mm_set1_epi16(x[192 + j + 1] as i8 as i16),
                        _mm_set1_epi16(x[192 + j] as i8 as i16),
                    );
                    lanes = _mm256_add_epi32(lanes, _mm256_madd_epi16(p, sc));
                }
            }
            // SAFETY: AVX2, FMA and F16C are enabled here; the block's last two bytes are `d`.
            unsafe {
                let lanes = _mm256_sub_epi32(lanes, q6k_offsets(&bsums[b * 16..], &x[192..208]));
                let (_, xd) = f16x2(x, 206);
                q6k_combine(lanes, xd, d[b], tiled, &mut sum, &mut acc);
            }
        }
        // SAFETY: AVX is enabled here.
        unsafe { q6k_result(tiled, sum, acc) }
    }
}

pub mod avx512 {
    use super::*;

    /// `super::super::quantize_q8k_block_scalar` sixteen values at a time, the same bytes:
    /// the largest magnitude by a lane-wise maximum, then the first value that has it (its
    /// sign sets the scale's, as the scalar scan's first strict maximum does); each value's
    /// product and `nearest_int` as the scalar code's; the sums of sixteen exact in i32.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_q8k_block(xb: &[f32], qs: &mut [i8], d: &mut f32, bsums: &mut [i16]) {
        assert!(xb.len() == QK_K && qs.len() == QK_K && bsums.len() == 16);
        // SAFETY (all below): `16 * g + 16 <= QK_K` for every vector `g` of the block.
        unsafe {
            let at = |g: usize| _mm512_loadu_ps(xb.as_ptr().add(16 * g));
            let mut vmax = _mm512_setzero_ps();
            for g in 0..16 {
                // NaN magnitudes are skipped, as the scalar `>` skips them: `max_ps` returns
                // its second operand when either is NaN.
                vmax = _mm512_max_ps(_mm512_abs_ps(at(g)), vmax);
            }
            let amax = _mm512_reduce_max_ps(vmax);
            if amax == 0.0 {
                return;
            }
            let mut max = 0.0f32;
            for g in 0..16 {
                let hit =
                    _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(at(g)), _mm512_set1_ps(amax));
                if hit != 0 {
                    max = xb[16 * g + hit.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127.0f32 / max;
            let (iv, shift) = (_mm512_set1_ps(iscale), _mm512_set1_ps(12_582_912.0));
            let (low, half) = (
                _mm512_set1_epi32(0x007f_ffff),
                _mm512_set1_epi32(0x0040_0000),
            );
            for (g, sum) in bsums.iter_mut().enumerate() {
                // `nearest_int(iscale * v).min(127)`: the product rounds once, as in scalar code.
                let bits = _mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(iv, at(g)), shift));
                let q = _mm512_sub_epi32(_mm512_and_si512(bits, low), half);
                let q = _mm512_min_epi32(q, _mm512_set1_epi32(127));
                _mm_storeu_si128(qs.as_mut_ptr().add(16 * g).cast(), _mm512_cvtepi32_epi8(q));
                *sum = _mm512_reduce_add_epi32(q) as i16;
            }
            *d = 1.0 / iscale;
        }
    }

    /// `q4k_scales` of sixteen repacked Q4_K/Q5_K rows at once, one row a lane, from the
    /// block's three scale words `u0, u1, u2` (its lines 1-3): `[scales 0..4, scales 4..8,
    /// mins 0..4, mins 4..8]`, value `s` in byte `s % 4` of its vector ([`lane_byte`]).
    ///
    /// # Safety
    /// AVX-512 F/BW, inlined into a function that enables them.
    #[inline(always)]
    pub(in crate::cpu::kquant) unsafe fn q4k_lane_scales(
        u0: __m512i,
        u1: __m512i,
        u2: __m512i,
    ) -> [__m512i; 4] {
        // SAFETY: the caller enables the features (this is inlined into it).
        unsafe {
            let (m1, m2, m3) = (
                _mm512_set1_epi32(0x3f3f_3f3f),
                _mm512_set1_epi32(0x0f0f_0f0f),
                _mm512_set1_epi32(0x0303_0303),
            );
            // The high two bits of scales (mins) 4..8 sit above scales (mins) 0..4.
            let high = |u: __m512i| {
                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u), m3))
            };
            [
                _mm512_and_si512(u0, m1),
                _mm512_or_si512(_mm512_and_si512(u2, m2), high(u0)),
                _mm512_and_si512(u1, m1),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(u2), m2), high(u1)),
            ]
        }
    }

    /// Byte `i` (0..4) of every lane of `v`, zero-extended.
    ///
    /// # Safety
    /// AVX-512 F, inlined into a function that enables it.
    #[inline(always)]
    pub(in crate::cpu::kquant) unsafe fn lane_byte(v: __m512i, i: usize) -> __m512i {
        // SAFETY: the caller enables the features (this is inlined into it).
        unsafe {
            _mm512_and_si512(
                _mm512_srl_epi32(v, _mm_cvtsi32_si128(8 * i as i32)),
                _mm512_set1_epi32(0xFF),
            )
        }
    }

    /// Signed byte `i` (0..4) of every lane of `v`, sign-extended: Q6_K's scale `4w + i` from
    /// its scale word `w`.
    ///
    /// # Safety
    /// AVX-512 F, inlined into a function that enables it.
    #[inline(always)]
    pub(in crate::cpu::kquant) unsafe fn lane_signed_byte(v: __m512i, i: usize) -> __m512i {
        // SAFETY: the caller enables the features (this is inlined into it).
        unsafe {
            let up = _mm512_sll_epi32(v, _mm_cvtsi32_si128(24 - 8 * i as i32));
            _mm512_srai_epi32::<24>(up)
        }
    }

    /// Sixteen repacked Q6_K rows' values `4j..4j + 4` of 32-value chunk `q` (0..4) of a half
    /// block, one row a lane, unsigned (0..63): the nibbles of `ql0` (q even) or `ql1` (q
    /// odd), low for q < 2 and high after, with bits `2q, 2q + 1` of the high-bit word `qh`
    /// above them. `ql0`, `ql1` and `qh` are the half's words `j` of its first and second 32
    /// bytes of nibbles and of its high bits.
    ///
    /// # Safety
    /// AVX-512 F/BW, inlined into a function that enables them.
    #[inline(always)]
    pub(in crate::cpu::kquant) unsafe fn q6k_lane_values(
        ql0: __m512i,
        ql1: __m512i,
        qh: __m512i,
        q: usize,
    ) -> __m512i {
        // SAFETY: the caller enables the features (this is inlined into it).
        unsafe {
            let m4 = _mm512_set1_epi8(0xF);
            let ql = if q.is_multiple_of(2) { ql0 } else { ql1 };
            let nib = if q < 2 {
                _mm512_and_si512(ql, m4)
            } else {
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4)
            };
            let high = _mm512_and_si512(
                _mm512_srl_epi16(qh, _mm_cvtsi32_si128(2 * q as i32)),
                _mm512_set1_epi8(3),
            );
            _mm512_or_si512(nib, _mm512_slli_epi16::<4>(high))
        }
    }

    /// # Safety
    /// As [`super::avx2::dot_q4k`], on a CPU with AVX-512 F/BW/VL/VNNI too.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q4k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], pairs: bool) -> f32 {
        // SAFETY: AVX2, FMA and F16C are enabled here.
        unsafe { q4k_body(row, qs, d, bsums, pairs) }
    }

    /// Q4_K with llama.cpp's gemv fold (`pairs == false` in [`dot_q4k`]): one FMA pair per
    /// block, so a block's integer sums are formed in one 512-bit accumulator (two 256-bit
    /// halves of sub-blocks per instruction, where the shared AVX2 body takes one) and reduced
    /// once. Decode's Q4_K kernel.
    ///
    /// # Safety
    /// As [`dot_q4k`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q4k_gemv(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        let nb = row.len() / q45k_bytes(false);
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        // i16 lane `l` takes scale `a` in the low half (lanes 0..16), `b` in the high half.
        let pick = |a: i16, b: i16| {
            let mut v = [a; 32];
            v[16..].fill(b);
            // SAFETY: 32 i16 are read from `v`.
            unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
        };
        let (i02, i13, i46, i57) = (pick(0, 2), pick(1, 3), pick(4, 6), pick(5, 7));
        let m4 = _mm512_set1_epi8(0xF);
        let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
        for (b, x) in row.chunks_exact(q45k_bytes(false)).enumerate() {
            prefetch_ahead(x.as_ptr(), q45k_bytes(false));
            let (sc, mn) = q4k_scales(&x[4..16]);
            // SAFETY: loads lie in the 144-byte block (nibbles at 16..144) and in the block's
            // 256 activations (asserted); `sc` holds 8 bytes; AVX2, F16C and AVX-512 F/BW are
            // enabled here.
            let (isum, imin, xd, xmin) = unsafe {
                let scv =
                    _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr().cast())));
                let y = qs.as_ptr().add(b * QK_K);
                let ys = |a: usize, b: usize| {
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(y.add(a).cast())),
                        _mm256_loadu_si256(y.add(b).cast()),
                    )
                };
                // Chunk `c` (32 bytes at 16 + 32c): low nibbles are sub-block 2c (values
                // 64c..64c + 32), high nibbles sub-block 2c + 1.
                let x01 = _mm512_loadu_si512(x.as_ptr().add(16).cast());
                let x23 = _mm512_loadu_si512(x.as_ptr().add(80).cast());
                let part = |q: __m512i, y: __m512i, idx: __m512i| {
                    // Pairs of products are at most 2 * 15 * 127: exact in i16.
                    _mm512_madd_epi16(
                        _mm512_maddubs_epi16(q, y),
                        _mm512_permutexvar_epi16(idx, scv),
                    )
                };
                let hi = |q: __m512i| _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                let p = _mm512_add_epi32(
                    _mm512_add_epi32(
                        part(_mm512_and_si512(x01, m4), ys(0, 64), i02),
                        part(hi(x01), ys(32, 96), i13),
                    ),
                    _mm512_add_epi32(
                        part(_mm512_and_si512(x23, m4), ys(128, 192), i46),
                        part(hi(x23), ys(160, 224), i57),
                    ),
                );
                let (xd, xmin) = f16x2(x, 0);
                (
                    _mm512_reduce_add_epi32(p),
                    mins_dot(&bsums[b * 16..], &mn),
                    xd,
                    xmin,
                )
            };
            // `Q4kFold::block`'s float steps, on the same exact integers (tested bit for bit).
            acc = (isum as f32).mul_add(xd * d[b], acc);
            acc_min = (imin as f32).mul_add(xmin * d[b], acc_min);
        }
        acc - acc_min
    }

    /// # Safety
    /// As [`super::avx2::dot_q3k`], on a CPU with AVX-512 F/BW/VL/VNNI too.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q3k(row: &[u8], qs: &[i8], d: &[f32]) -> f32 {
        // SAFETY: AVX2 and F16C are enabled here.
        unsafe { q3k_body(row, qs, d) }
    }

    /// # Safety
    /// As [`super::avx2::dot_q2k`], on a CPU with AVX-512 F/BW/VL/VNNI too.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q2k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        // SAFETY: AVX2 and F16C are enabled here.
        unsafe { q2k_body(row, qs, d, bsums) }
    }

    /// # Safety
    /// As [`super::avx2::dot_q45k`], on a CPU with AVX-512 F/BW/VL/VNNI too.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q45k<const Q5: bool>(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        let nb = row.len() / q45k_bytes(Q5);
        let off = if Q5 { 48 } else { 16 };
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        let m4 = _mm256_set1_epi8(0xF);
        let (mut sum, mut mins) = (0.0f32, 0.0f32);
        for (b, x) in row.chunks_exact(q45k_bytes(Q5)).enumerate() {
            prefetch_ahead(x.as_ptr(), q45k_bytes(Q5));
            // SAFETY: Q5_K blocks hold 32 bytes of fifth bits at 16.
            let qh = if Q5 {
                unsafe { _mm256_loadu_si256(x.as_ptr().add(16).cast()) }
            } else {
                _mm256_setzero_si256()
            };
            let (sc, mn) = q4k_scales(&x[4..16]);
            // SAFETY: AVX2 is enabled here.
            let summins = unsafe { mins_dot(&bsums[b * 16..], &mn) };
            let mut acc = _mm512_setzero_si512();
            for c in 0..4 {
                // SAFETY: as in the AVX2 version.
                let (q4, y) = unsafe {
                    (
                        _mm256_loadu_si256(x.as_ptr().add(off + 32 * c).cast()),
                        _mm512_loadu_si512(qs.as_ptr().add(b * QK_K + 64 * c).cast()),
                    )
                };
                let mut lo = _mm256_and_si256(q4, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
                if Q5 {
                    // SAFETY: AVX2 is enabled here.
                    let (hl, hh) = unsafe { q5_high(qh, c) };
                    lo = _mm256_or_si256(lo, hl);
                    hi = _mm256_or_si256(hi, hh);
                }
                // Low nibbles are sub-block 2c (values 64c..64c+32), high ones 2c + 1.
                let a = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                // As AVX2: i16 pair sums (exact), then scaled pairs into i32; cheaper than
                // `vpdpbusd` followed by a 32-bit multiply.
                let p = _mm512_maddubs_epi16(a, y);
                let s = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_set1_epi16(sc[2 * c] as i16)),
                    _mm256_set1_epi16(sc[2 * c + 1] as i16),
                );
                acc = _mm512_add_epi32(acc, _mm512_madd_epi16(p, s));
            }
            let isum = _mm512_reduce_add_epi32(acc);
            // SAFETY: F16C is enabled here.
            let (xd, xmin) = unsafe { f16x2(x, 0) };
            sum += xd * d[b] * isum as f32;
            mins -= xmin * d[b] * summins as f32;
        }
        mins + sum
    }

    /// # Safety
    /// As [`super::avx2::dot_q6k`], on a CPU with AVX-512 F/BW/VL/VNNI too.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q6k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], tiled: bool) -> f32 {
        let nb = row.len() / Q6K_BYTES;
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        // i16 lane `l` of a 64-value pair-sum vector belongs to sub-block `base + l / 8`.
        let mut eighth = [0i16; 32];
        for (l, e) in eighth.iter_mut().enumerate() {
            *e = (l / 8) as i16;
        }
        // SAFETY: 32 i16 are read from `eighth`.
        let eighth = unsafe { _mm512_loadu_si512(eighth.as_ptr().cast()) };
        let mut idxs = [eighth; 4];
        for (base, v) in idxs.iter_mut().enumerate() {
            *v = _mm512_add_epi16(eighth, _mm512_set1_epi16(4 * base as i16));
        }
        let (mut sum, mut acc) = (0.0f32, _mm256_setzero_ps());
        for (b, x) in row.chunks_exact(Q6K_BYTES).enumerate() {
            prefetch_ahead(x.as_ptr(), Q6K_BYTES);
            // SAFETY: the 16 scale bytes at 192 lie in the block.
            let scales = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(unsafe {
                _mm_loadu_si128(x.as_ptr().add(192).cast())
            }));
            let mut acc16 = _mm512_setzero_si512();
            for n in 0..2 {
                // SAFETY: `x` is a whole block; AVX2 is enabled.
                let a = unsafe { q6k_half(x, n) };
                for h in 0..2 {
                    let av =
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a[2 * h]), a[2 * h + 1]);
                    // SAFETY: 64 values at `b * 256 + 128n + 64h` lie in `qs` (asserted).
                    let y = unsafe {
                        _mm512_loadu_si512(qs.as_ptr().add(b * QK_K + 128 * n + 64 * h).cast())
                    };
                    // As AVX2: exact i16 pair sums of the unsigned values, then scaled pairs.
                    let p = _mm512_maddubs_epi16(av, y);
                    let s = _mm512_permutexvar_epi16(idxs[2 * n + h], scales);
                    acc16 = _mm512_add_epi32(acc16, _mm512_madd_epi16(p, s));
                }
            }
            // Lanes 0..8 hold chunk 2h's lanes, 8..16 chunk 2h + 1's: ggml's lane L is both.
            let lanes = _mm256_add_epi32(
                _mm512_castsi512_si256(acc16),
                _mm512_extracti64x4_epi64::<1>(acc16),
            );
            // SAFETY: AVX2, FMA and F16C are enabled here; the block's last two bytes are `d`.
            unsafe {
                let lanes = _mm256_sub_epi32(lanes, q6k_offsets(&bsums[b * 16..], &x[192..208]));
                let (_, xd) = f16x2(x, 206);
                q6k_combine(lanes, xd, d[b], tiled, &mut sum, &mut acc);
            }
        }
        // SAFETY: AVX is enabled here.
        unsafe { q6k_result(tiled, sum, acc) }
    }

    /// Sixteen repacked Q4_K rows (or Q5_K with `Q5`) dotted with one activation row at once
    /// (`super::super::repack`): `lines` holds the group's `nb` blocks of 36 (44) lines, word
    /// `t` of row `l`'s block in lane `l` of line `t`. Every row's integer sums are exact, and
    /// its float steps are [`dot_q4k_gemv`]'s (Q4_K) or [`dot_q45k`]'s (Q5_K), lane by lane.
    ///
    /// # Safety
    /// As [`dot_q4k`]. `qs` holds `QK_K` values, `d` one scale and `bsums` 16 sums per block.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn repacked_dot<const Q5: bool>(
        lines: &[super::super::repack::Line],
        nb: usize,
        qs: &[i8],
        d: &[f32],
        bsums: &[i16],
    ) -> [f32; 16] {
        let words = q45k_bytes(Q5) / 4;
        assert!(lines.len() == nb * words, "not the group's lines");
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        // Line offsets in a block: d/dmin, the three scale words, Q5_K's eight words of fifth
        // bits, then the 32 words of nibbles.
        let nib = if Q5 { 12 } else { 4 };
        let m4 = _mm512_set1_epi8(0xF);
        let one = _mm512_set1_epi8(1);
        let mut acc = _mm512_setzero_ps();
        let mut acc_min = _mm512_setzero_ps();
        for b in 0..nb {
            // SAFETY: `b * words + words <= lines.len()` (asserted); the lines are 64-byte
            // aligned. The activation loads lie in the block's 256 values (asserted).
            let (isum, imin, dm) = unsafe {
                let l: *const __m512i = lines.as_ptr().add(b * words).cast();
                // Hints only: the addresses may lie past the lines (never dereferenced). One
                // line at a time between the dots below: all of a block's at once filled the
                // core's miss buffers and stalled it on the prefetches.
                let prefetch = |t: usize| {
                    let ahead = l.wrapping_add(t).cast::<u8>().wrapping_add(PREFETCH_BYTES);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                };
                for t in 0..nib {
                    prefetch(t);
                }
                let dm = _mm512_load_si512(l.cast());
                let (u0, u1, u2) = (
                    _mm512_load_si512(l.add(1).cast()),
                    _mm512_load_si512(l.add(2).cast()),
                    _mm512_load_si512(l.add(3).cast()),
                );
                // Scales and mins 0..4 in `*_lo`, 4..8 in `*_hi`.
                let [sc_lo, sc_hi, mn_lo, mn_hi] = q4k_lane_scales(u0, u1, u2);
                // Scale `s` of every row as an i32 lane.
                let scale = |s: usize| lane_byte(if s < 4 { sc_lo } else { sc_hi }, s % 4);
                let y = qs.as_ptr().add(b * QK_K);
                let yw = |off: usize| {
                    _mm512_set1_epi32(std::ptr::read_unaligned(y.add(off).cast::<i32>()))
                };
                let mut isum = _mm512_setzero_si512();
                for c in 0..4 {
                    let (mut lo_acc, mut hi_acc) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for j in 0..8 {
                        prefetch(nib + 8 * c + j);
                        let q = _mm512_load_si512(l.add(nib + 8 * c + j).cast());
                        let mut lo = _mm512_and_si512(q, m4);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                        if Q5 {
                            // Bit `2c` (`2c + 1`) of each byte of the fifth bits, as 16.
                            let qh = _mm512_load_si512(l.add(4 + j).cast());
                            let bit = |s: usize| {
                                let v = _mm512_srl_epi32(qh, _mm_cvtsi32_si128(s as i32));
                                _mm512_slli_epi16::<4>(_mm512_and_si512(v, one))
                            };
                            lo = _mm512_or_si512(lo, bit(2 * c));
                            hi = _mm512_or_si512(hi, bit(2 * c + 1));
                        }
                        // Unsigned weights (at most 31) times signed activations: four products
                        // a lane, exact in i32.
                        lo_acc = _mm512_dpbusd_epi32(lo_acc, lo, yw(64 * c + 4 * j));
                        hi_acc = _mm512_dpbusd_epi32(hi_acc, hi, yw(64 * c + 32 + 4 * j));
                    }
                    isum = _mm512_add_epi32(
                        isum,
                        _mm512_add_epi32(
                            _mm512_mullo_epi32(lo_acc, scale(2 * c)),
                            _mm512_mullo_epi32(hi_acc, scale(2 * c + 1)),
                        ),
                    );
                }
                // The mins' term: mins `2k`, `2k + 1` of every row as i16 pairs against the
                // activation sums of their 32 values each (at most 32 * 127: exact in i16).
                let bs = &bsums[b * 16..(b + 1) * 16];
                let mut imin = _mm512_setzero_si512();
                let byte = _mm512_set1_epi32(0xFF);
                for k in 0..4 {
                    let v = if k < 2 { mn_lo } else { mn_hi };
                    let pair = if k % 2 == 0 {
                        _mm512_or_si512(
                            _mm512_and_si512(v, byte),
                            _mm512_and_si512(
                                _mm512_slli_epi32::<8>(v),
                                _mm512_set1_epi32(0xFF_0000),
                            ),
                        )
                    } else {
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi32::<16>(v), byte),
                            _mm512_and_si512(
                                _mm512_srli_epi32::<8>(v),
                                _mm512_set1_epi32(0xFF_0000),
                            ),
                        )
                    };
                    let s0 = (bs[4 * k] + bs[4 * k + 1]) as u16 as u32;
                    let s1 = (bs[4 * k + 2] + bs[4 * k + 3]) as u16 as u32;
                    let sums = _mm512_set1_epi32((s0 | s1 << 16) as i32);
                    imin = _mm512_add_epi32(imin, _mm512_madd_epi16(pair, sums));
                }
                (isum, imin, dm)
            };
            // The rows' `d` (low half of each lane) and `dmin` (high half), converted exactly.
            let xd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
            let xmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
            let db = _mm512_set1_ps(d[b]);
            let (dd, dmin) = (_mm512_mul_ps(xd, db), _mm512_mul_ps(xmin, db));
            let (isum, imin) = (_mm512_cvtepi32_ps(isum), _mm512_cvtepi32_ps(imin));
            if Q5 {
                // `dot_q45k`: `sum += xd * d * isum`, `mins -= xmin * d * summins`.
                acc = _mm512_add_ps(acc, _mm512_mul_ps(dd, isum));
                acc_min = _mm512_sub_ps(acc_min, _mm512_mul_ps(dmin, imin));
            } else {
                // `dot_q4k_gemv`: `acc = fma(isum, xd * d, acc)`, the same for the mins.
                acc = _mm512_fmadd_ps(isum, dd, acc);
                acc_min = _mm512_fmadd_ps(imin, dmin, acc_min);
            }
        }
        let result = if Q5 {
            _mm512_add_ps(acc_min, acc)
        } else {
            _mm512_sub_ps(acc, acc_min)
        };
        let mut out = [0.0f32; 16];
        // SAFETY: `out` holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), result) };
        out
    }

    /// Sixteen repacked Q6_K rows dotted with one activation row at once
    /// (`super::super::repack`): `lines` holds the group's `nb` blocks of 53 lines (the 210-byte
    /// block's words, the last one half padding), word `t` of row `l`'s block in lane `l` of
    /// line `t`. Each of ggml's eight lanes `L` per row (see `super::scalar::dot_q6k`) is
    /// formed exactly as a vector of the sixteen rows', then folded into its own float
    /// accumulator as [`dot_q6k`] does with fewer than 8 rows, and the eight are summed as
    /// `hsum_float_8`.
    ///
    /// # Safety
    /// As [`dot_q6k`]. `qs` holds `QK_K` values, `d` one scale and `bsums` 16 sums per block.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn repacked_dot_q6k(
        lines: &[super::super::repack::Line],
        nb: usize,
        qs: &[i8],
        d: &[f32],
        bsums: &[i16],
    ) -> [f32; 16] {
        let words = Q6K_BYTES.div_ceil(4);
        assert!(lines.len() == nb * words, "not the group's lines");
        assert!(qs.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * 16);
        let low16 = _mm512_set1_epi32(0xFFFF);
        let mut acc = [_mm512_setzero_ps(); 8];
        for b in 0..nb {
            // SAFETY: `b * words + words <= lines.len()` (asserted); the lines are 64-byte
            // aligned. The activation loads lie in the block's 256 values (asserted).
            let (lanes, dw) = unsafe {
                let l: *const __m512i = lines.as_ptr().add(b * words).cast();
                // Hints only (never dereferenced), one line per step as in `repacked_dot`.
                let prefetch = |t: usize| {
                    let ahead = l.wrapping_add(t).cast::<u8>().wrapping_add(PREFETCH_BYTES);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                };
                let line = |t: usize| _mm512_load_si512(l.add(t).cast());
                // Scale `j` (signed byte `j % 4` of word `48 + j / 4`) of every row, as an i32
                // lane; `dup` puts it in both i16 halves.
                let scale = |j: usize| lane_signed_byte(line(48 + j / 4), j % 4);
                let dup = |s: __m512i| {
                    _mm512_or_si512(_mm512_and_si512(s, low16), _mm512_slli_epi32::<16>(s))
                };
                let y = qs.as_ptr().add(b * QK_K);
                let yw = |off: usize| {
                    _mm512_set1_epi32(std::ptr::read_unaligned(y.add(off).cast::<i32>()))
                };
                let bs = &bsums[b * 16..(b + 1) * 16];
                let mut lanes = [_mm512_setzero_si512(); 8];
                for (lane, out) in lanes.iter_mut().enumerate() {
                    for n in 0..2 {
                        for t in [16 * n + lane, 16 * n + 8 + lane, 32 + 8 * n + lane] {
                            prefetch(t);
                        }
                        // Words `L` of the half's first and second 32 bytes of nibbles, and of
                        // its high bits: values `4L..4L + 4` of its four 32-value chunks.
                        let (ql0, ql1, qh) = (
                            line(16 * n + lane),
                            line(16 * n + 8 + lane),
                            line(32 + 8 * n + lane),
                        );
                        for q in 0..4 {
                            let v = q6k_lane_values(ql0, ql1, qh, q);
                            let t = 4 * n + q;
                            // Unsigned 6-bit values: pairs of products at most 2 * 63 * 127,
                            // exact in i16; then scaled pairs into i32.
                            let p = _mm512_maddubs_epi16(v, yw(32 * t + 4 * lane));
                            let s = dup(scale(2 * t + lane / 4));
                            *out = _mm512_add_epi32(*out, _mm512_madd_epi16(p, s));
                        }
                    }
                    // The offset's share: 32 * (bs[2L] * sc[2L] + bs[2L + 1] * sc[2L + 1]).
                    let pair = _mm512_or_si512(
                        _mm512_and_si512(scale(2 * lane), low16),
                        _mm512_slli_epi32::<16>(scale(2 * lane + 1)),
                    );
                    let sums =
                        (bs[2 * lane] as u16 as u32) | ((bs[2 * lane + 1] as u16 as u32) << 16);
                    let off = _mm512_madd_epi16(pair, _mm512_set1_epi32(sums as i32));
                    *out = _mm512_sub_epi32(*out, _mm512_slli_epi32::<5>(off));
                }
                for t in 48..words {
                    prefetch(t);
                }
                // `d`: the low half of word 52.
                let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(line(52)));
                (lanes, dw)
            };
            // `dot_q6k`'s per-row fold: `acc[L] = fma(d * dw, lane L, acc[L])`.
            let dd = _mm512_mul_ps(_mm512_set1_ps(d[b]), dw);
            for (a, lane) in acc.iter_mut().zip(lanes) {
                *a = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(lane), *a);
            }
        }
        // `hsum_float_8`, lane by lane.
        let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
        let sum = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(a4, a0), _mm512_add_ps(a6, a2)),
            _mm512_add_ps(_mm512_add_ps(a5, a1), _mm512_add_ps(a7, a3)),
        );
        let mut out = [0.0f32; 16];
        // SAFETY: `out` holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum) };
        out
    }
}
