//! The one-row path ([`super::one_row`]) for an f16 cache with 64-, 128- or 256-wide heads
//! (SmolLM2 and Llama 3.2 1B; Llama 3B-8B and Qwen; Gemma 3), on AVX-512:
//! the same operations in the same order, so the same bits (tested against the generic
//! builds), with the work laid out for the vector unit instead of around slices:
//!
//! - each head's Q (rounded to f16) and its f16-valued V sum are vectors for the whole task
//!   (in registers for small groups at head dim 64, spilled to the stack, in L1, past that),
//!   and K and V rows are converted straight into vectors, never through scratch slices;
//! - the softmax weights of a tile of keys are computed sixteen at a time: the running max
//!   after each key depends on the scores alone, so a scalar scan first fixes each key's
//!   exponent argument (and whether the max grew), then [`expf16`] (glibc's `expf`, bit for
//!   bit) takes sixteen, and only the V updates, which round to f16 after every key, stay
//!   sequential.
//!
//! Decode rows spent most of their attention time in one libm call per key and head and in
//! slice passes over the V sum; those were per-row costs that batching cannot share.

use std::arch::x86_64::*;

use half::f16;

use super::{Call, F16c, Rows, Scratch, TILE_KV, Task, f16_round, fill_rows};
use crate::cpu::expf::expf16;

/// The largest GQA group (query heads per kv head) with a build. Each build keeps its heads'
/// Q and V sums as `2 G NV` vectors (`1.5 G NV` with f16 V sums): registers only while they
/// fit (head dim 64, up to three heads), on the stack (L1) past that, which still beats the
/// slice passes of the generic build.
const MAX_GROUP: usize = 8;

/// Whether [`run`] has a build for heads `d` wide with `group` query heads per kv head.
pub(super) fn supports(d: usize, group: usize) -> bool {
    matches!(d, 64 | 128 | 256) && (1..=MAX_GROUP).contains(&group)
}

/// Runs task `t` with `k`, `v` the f16 arenas behind `c`.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2, FMA and F16C (an `F16c` with `avx512` proves it),
/// and AVX512-FP16, BW and VL where `c.conv.fp16` says so; `supports(c.d, c.group)` must hold.
pub(super) unsafe fn run<R: Rows<F16c>>(
    c: &Call<'_, R, F16c>,
    k: &[f16],
    v: &[f16],
    t: Task<'_>,
    sc: &mut Scratch,
) {
    assert!(supports(c.d, c.group), "one_row_x86: unsupported shape");
    // SAFETY: the CPU features are the caller's; the shape was checked above.
    unsafe {
        // From 128 values a head the V sums are f16 arithmetic: native where the CPU has it.
        match (c.d, c.conv.fp16) {
            (64, _) => width::<R, 4, false>(c, k, v, t, sc),
            (128, false) => width::<R, 8, false>(c, k, v, t, sc),
            (128, true) => width::<R, 8, true>(c, k, v, t, sc),
            (_, false) => width::<R, 16, false>(c, k, v, t, sc),
            (_, true) => width::<R, 16, true>(c, k, v, t, sc),
        }
    }
}

/// [`run`] for heads of `NV` vectors (`16 * NV` values), with AVX512-FP16 V updates if `FP16`.
///
/// # Safety
/// As [`run`], with `c.d == 16 * NV`, and AVX512-FP16, BW and VL if `FP16`.
#[inline(always)]
unsafe fn width<R: Rows<F16c>, const NV: usize, const FP16: bool>(
    c: &Call<'_, R, F16c>,
    k: &[f16],
    v: &[f16],
    t: Task<'_>,
    sc: &mut Scratch,
) {
    // SAFETY: forwarded.
    unsafe {
        match c.group {
            1 => group::<R, 1, NV, FP16>(c, k, v, t, sc),
            2 => group::<R, 2, NV, FP16>(c, k, v, t, sc),
            3 => group::<R, 3, NV, FP16>(c, k, v, t, sc),
            4 => group::<R, 4, NV, FP16>(c, k, v, t, sc),
            5 => group::<R, 5, NV, FP16>(c, k, v, t, sc),
            6 => group::<R, 6, NV, FP16>(c, k, v, t, sc),
            7 => group::<R, 7, NV, FP16>(c, k, v, t, sc),
            _ => group::<R, 8, NV, FP16>(c, k, v, t, sc),
        }
    }
}

/// `x` rounded to the nearest f16 (ties to even), as f32.
#[inline(always)]
unsafe fn round16(x: __m512) -> __m512 {
    // SAFETY: AVX-512 F is the caller's.
    unsafe {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(x))
    }
}

/// `x * v + a` rounded once to f16 for f16-valued inputs, sixteen lanes: the scalar
/// [`super::f16_fma`] (llama.cpp's `_mm512_fmadd_ph` on AVX512-FP16), done as the AVX2
/// build's `f16_fma` does it eight at a time: the FMA in f64 (the product is exact, the sum
/// rounds once), rounded to odd at f32 precision with integer ops (exact in f32), then to
/// nearest f16. Round-to-odd with more than two spare bits makes the second rounding correct.
#[inline(always)]
unsafe fn fma16(x: __m512, v: __m512d, a: __m512) -> __m512 {
    // SAFETY: AVX-512 F is the caller's.
    unsafe {
        // The 29 f64 mantissa bits below f32 precision, and the lowest f32 one.
        let low = _mm512_set1_epi64((1 << 29) - 1);
        let odd = _mm512_set1_epi64(1 << 29);
        let lo = fma8(
            _mm512_castps512_ps256(x),
            v,
            _mm512_castps512_ps256(a),
            low,
            odd,
        );
        let hi = fma8(upper(x), v, upper(a), low, odd);
        let y = _mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
            _mm256_castps_pd(hi),
        );
        round16(_mm512_castpd_ps(y))
    }
}

/// Eight lanes of [`fma16`] (plain functions, not closures: a closure does not inherit the
/// caller's target features, so its intrinsics would not inline).
#[inline(always)]
unsafe fn fma8(x: __m256, v: __m512d, a: __m256, low: __m512i, odd: __m512i) -> __m256 {
    // SAFETY: AVX-512 F is the caller's.
    unsafe {
        let y = _mm512_fmadd_pd(_mm512_cvtps_pd(x), v, _mm512_cvtps_pd(a));
        let bits = _mm512_castpd_si512(y);
        let inexact = _mm512_test_epi64_mask(bits, low);
        let cut = _mm512_andnot_si512(low, bits);
        // Exact: the result is representable in f32.
        _mm512_cvtpd_ps(_mm512_castsi512_pd(_mm512_mask_or_epi64(
            cut, inexact, cut, odd,
        )))
    }
}

/// The upper eight lanes of `z`.
#[inline(always)]
unsafe fn upper(z: __m512) -> __m256 {
    // SAFETY: AVX-512 F is the caller's.
    unsafe { _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z))) }
}

/// Row `r` of an f16 arena of `16 * NV`-wide rows, widened to f32 (exact).
#[inline(always)]
unsafe fn load_row<const NV: usize>(a: &[f16], r: usize) -> [__m512; NV] {
    let row = &a[r * 16 * NV..(r + 1) * 16 * NV];
    // SAFETY: `row` is `16 * NV` f16, read as `NV` unaligned 32-byte pieces of it; AVX-512 F
    // is the caller's.
    unsafe {
        let p = row.as_ptr().cast::<__m256i>();
        let mut out = [_mm512_setzero_ps(); NV];
        for (i, o) in out.iter_mut().enumerate() {
            *o = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(i)));
        }
        out
    }
}

/// Hints that row `r` of an f16 arena of `16 * NV`-wide rows (`NV / 2` cache lines) is read
/// soon.
#[inline(always)]
fn prefetch_row<const NV: usize>(a: &[f16], r: usize) {
    if let Some(row) = a.get(r * 16 * NV..(r + 1) * 16 * NV) {
        let p = row.as_ptr().cast::<i8>();
        for line in 0..NV / 2 {
            // SAFETY: prefetching has no architectural effect and cannot fault; every
            // address lies inside `row` (`32 * NV` bytes).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(64 * line)) };
        }
    }
}

/// [`super::ggml_dot`] of two `16 * NV`-value rows (`NV` a multiple of 4): four FMA
/// accumulators, each taking every fourth vector in order, folded pairwise, then as
/// `_mm512_reduce_add_ps` folds sixteen lanes.
#[inline(always)]
unsafe fn dot<const NV: usize>(k: &[__m512; NV], q: &[__m512; NV]) -> f32 {
    // SAFETY: AVX-512 F is the caller's.
    unsafe {
        let mut a = [_mm512_setzero_ps(); 4];
        for c in 0..NV / 4 {
            for (j, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(k[4 * c + j], q[4 * c + j], *a);
            }
        }
        let v = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let t = _mm256_add_ps(hi, _mm512_castps512_ps256(v));
        let u = _mm_add_ps(_mm256_extractf128_ps::<1>(t), _mm256_castps256_ps128(t));
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)))
    }
}

/// [`group_body`] compiled for AVX-512 F, or (`FP16`) with AVX512-FP16 too.
///
/// # Safety
/// The CPU must support the features [`run`] names for this build.
#[inline(always)]
unsafe fn group<R: Rows<F16c>, const G: usize, const NV: usize, const FP16: bool>(
    c: &Call<'_, R, F16c>,
    k: &[f16],
    v: &[f16],
    t: Task<'_>,
    sc: &mut Scratch,
) {
    // SAFETY: forwarded.
    unsafe {
        if FP16 {
            group_fp16::<R, G, NV>(c, k, v, t, sc)
        } else {
            group_avx512::<R, G, NV>(c, k, v, t, sc)
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn group_avx512<R: Rows<F16c>, const G: usize, const NV: usize>(
    c: &Call<'_, R, F16c>,
    k: &[f16],
    v: &[f16],
    t: Task<'_>,
    sc: &mut Scratch,
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { group_body::<R, G, NV, false>(c, k, v, t, sc) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512fp16")]
unsafe fn group_fp16<R: Rows<F16c>, const G: usize, const NV: usize>(
    c: &Call<'_, R, F16c>,
    k: &[f16],
    v: &[f16],
    t: Task<'_>,
    sc: &mut Scratch,
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { group_body::<R, G, NV, true>(c, k, v, t, sc) }
}

/// Sixteen `bits` (an f16) broadcast to the 32 lanes of an f16 vector.
#[inline(always)]
unsafe fn splat_ph(bits: u16) -> __m512h {
    // SAFETY: AVX-512 F is the caller's; the cast reinterprets 64 bytes as 64 bytes.
    unsafe { std::mem::transmute::<__m512i, __m512h>(_mm512_set1_epi16(bits as i16)) }
}

/// One task: `G` heads of `16 * NV` values over the task's keys. With `FP16` (head dim 128
/// or more only) each head's V sum is 32-lane f16 vectors updated by `vfmadd*ph`/`vmulph`,
/// llama.cpp's own instructions on the reference machine, instead of the f64 emulation of
/// [`fma16`]: the same single roundings, so the same bits.
#[inline(always)]
unsafe fn group_body<R: Rows<F16c>, const G: usize, const NV: usize, const FP16: bool>(
    c: &Call<'_, R, F16c>,
    k: &[f16],
    v: &[f16],
    t: Task<'_>,
    sc: &mut Scratch,
) {
    let Task {
        seq,
        kvh,
        qrows,
        keys,
        dst,
        partial,
    } = t;
    let d = 16 * NV;
    assert!(qrows.len() == G * d && dst.len() == G * d && sc.p.len() >= G * TILE_KV);
    let Scratch { p, rows, .. } = sc;
    // SAFETY (whole body): AVX-512 F, AVX2, FMA and F16C are the caller's, and with `FP16`
    // AVX512-FP16, BW and VL (`group_fp16`); every pointer below comes from a slice of the
    // length it is read or written at (`qrows`, `dst`: `G` rows of `d` f32, asserted; `p`:
    // `G` tiles of `TILE_KV`; chunks of at most 16 floats with the load/store mask covering
    // exactly the chunk; `FP16`'s V rows: `d` f16 each, read as `NV / 2` pieces of 64 bytes).
    unsafe {
        let q: [[__m512; NV]; G] = std::array::from_fn(|g| {
            std::array::from_fn(|i| round16(_mm512_loadu_ps(qrows.as_ptr().add(g * d + 16 * i))))
        });
        let mut acc = [[_mm512_setzero_ps(); NV]; G];
        // `FP16`: the V sums as f16 vectors (the first `NV / 2` of each head's), as bits.
        let mut acc16 = [[_mm512_setzero_si512(); 8]; G];
        let nh = NV / 2;
        assert!(
            !FP16 || (NV >= 8 && nh <= 8),
            "f16 arithmetic is for head dims 128-256"
        );
        let mut m = [f32::NEG_INFINITY; G];
        let mut sum = [0.0f32; G];
        for start in keys.clone().step_by(TILE_KV) {
            let len = TILE_KV.min(keys.end - start);
            fill_rows(c, seq, kvh, start..start + len, &mut rows[..len]);
            // The tile's rows sit in scattered cache blocks that the hardware prefetchers do
            // not foresee: ask for all of them now, K first (read next), then V.
            for a in [k, v] {
                for &r in &rows[..len] {
                    prefetch_row::<NV>(a, r);
                }
            }
            // Scores, each K row converted once for the group's heads.
            for (j, &r) in rows[..len].iter().enumerate() {
                let kr = load_row::<NV>(k, r);
                for (g, qg) in q.iter().enumerate() {
                    p[g * TILE_KV + j] = dot(&kr, qg) * c.scale;
                }
            }
            // Per head: each key's exponent argument under the running max (the old max
            // minus the score where the score raises it, else the score minus the max), then
            // the weights sixteen at a time, in place.
            let mut grew = [0u64; G];
            for (g, grew) in grew.iter_mut().enumerate() {
                let pg = &mut p[g * TILE_KV..g * TILE_KV + len];
                let mut mg = m[g];
                for (j, x) in pg.iter_mut().enumerate() {
                    let s = *x;
                    if s > mg {
                        *x = mg - s;
                        *grew |= 1 << j;
                        mg = s;
                    } else {
                        *x = s - mg;
                    }
                }
                m[g] = mg;
                for ch in pg.chunks_mut(16) {
                    let mask = (u32::MAX >> (32 - ch.len())) as u16;
                    let x = _mm512_maskz_loadu_ps(mask, ch.as_ptr());
                    _mm512_mask_storeu_ps(ch.as_mut_ptr(), mask, expf16(x));
                }
            }
            // The V sums, one key at a time (each update rounds to f16). From 128 values a
            // head, llama.cpp's AVX512-FP16 build updates them in f16 arithmetic
            // ([`super::one_row`]): factors rounded to f16, the FMA rounded once.
            let f16_arith = d >= 128;
            for (j, &r) in rows[..len].iter().enumerate() {
                if FP16 {
                    let row = &v[r * d..(r + 1) * d];
                    let vp = row.as_ptr().cast::<__m512i>();
                    let mut vr = [_mm512_setzero_si512(); 8];
                    for (h, x) in vr.iter_mut().enumerate().take(nh) {
                        // `row` is `d` = 32 `nh` f16: piece `h` is inside it.
                        *x = _mm512_loadu_si512(vp.add(h));
                    }
                    for g in 0..G {
                        let e = p[g * TILE_KV + j];
                        let (ms, vs) = if grew[g] >> j & 1 != 0 {
                            let f = splat_ph(f16::from_f32(e).to_bits());
                            for a in acc16[g].iter_mut().take(nh) {
                                let x = std::mem::transmute::<__m512i, __m512h>(*a);
                                *a = std::mem::transmute::<__m512h, __m512i>(_mm512_mul_ph(x, f));
                            }
                            (e, 1.0)
                        } else {
                            (1.0, e)
                        };
                        let f = splat_ph(f16::from_f32(vs).to_bits());
                        for (a, &x) in acc16[g].iter_mut().zip(&vr).take(nh) {
                            let (a16, x16) = (
                                std::mem::transmute::<__m512i, __m512h>(*a),
                                std::mem::transmute::<__m512i, __m512h>(x),
                            );
                            *a = std::mem::transmute::<__m512h, __m512i>(_mm512_fmadd_ph(
                                x16, f, a16,
                            ));
                        }
                        sum[g] = sum[g].mul_add(ms, vs);
                    }
                    continue;
                }
                let vr = load_row::<NV>(v, r);
                for g in 0..G {
                    let e = p[g * TILE_KV + j];
                    let (ms, vs) = if grew[g] >> j & 1 != 0 {
                        let msv = _mm512_set1_ps(if f16_arith { f16_round(e) } else { e });
                        for a in &mut acc[g] {
                            *a = round16(_mm512_mul_ps(*a, msv));
                        }
                        (e, 1.0)
                    } else {
                        (1.0, e)
                    };
                    if f16_arith {
                        let vsv = _mm512_set1_pd(f16_round(vs) as f64);
                        for (a, &x) in acc[g].iter_mut().zip(&vr) {
                            *a = fma16(x, vsv, *a);
                        }
                    } else {
                        let vsv = _mm512_set1_ps(vs);
                        for (a, &x) in acc[g].iter_mut().zip(&vr) {
                            *a = round16(_mm512_fmadd_ps(x, vsv, *a));
                        }
                    }
                    sum[g] = sum[g].mul_add(ms, vs);
                }
            }
        }
        if FP16 {
            // Widen the f16 sums (exact): piece `h` holds values `32h..32h + 32`.
            for (a, a16) in acc.iter_mut().zip(&acc16) {
                for h in 0..nh {
                    a[2 * h] = _mm512_cvtph_ps(_mm512_castsi512_si256(a16[h]));
                    a[2 * h + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(a16[h]));
                }
            }
        }
        if let Some(stats) = partial {
            // A split-KV chunk: unnormalized sums, and each head's max and sum.
            assert!(stats.len() == 2 * G);
            for g in 0..G {
                for (i, &a) in acc[g].iter().enumerate() {
                    _mm512_storeu_ps(dst.as_mut_ptr().add(g * d + 16 * i), a);
                }
                stats[2 * g..2 * g + 2].copy_from_slice(&[m[g], sum[g]]);
            }
            return;
        }
        for g in 0..G {
            let s = sum[g];
            let inv = _mm512_set1_ps(if s == 0.0 { 0.0 } else { 1.0 / s });
            for (i, &a) in acc[g].iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add(g * d + 16 * i), _mm512_mul_ps(a, inv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{F16c, f16_fma, f16_round};
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// [`fma16`] on sixteen lanes.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn emulated(x: &[f32; 16], v: f32, a: &[f32; 16]) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        // SAFETY: the arrays are sixteen f32; the features are enabled on this function.
        unsafe {
            let r = fma16(
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_set1_pd(v as f64),
                _mm512_loadu_ps(a.as_ptr()),
            );
            _mm512_storeu_ps(out.as_mut_ptr(), r);
        }
        out
    }

    /// `vfmadd…ph` and `vmulph` on 32 lanes of f16 values: `x * v + a` and `a * v`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512fp16")]
    unsafe fn native(x: &[f32; 32], v: f32, a: &[f32; 32]) -> ([f32; 32], [f32; 32]) {
        let bits = |z: &[f32; 32]| z.map(|f| f16::from_f32(f).to_bits());
        let (xb, ab) = (bits(x), bits(a));
        let (mut fma, mut mul) = ([0u16; 32], [0u16; 32]);
        // SAFETY: each array is 32 f16 (64 bytes); the features are enabled on this function.
        unsafe {
            let load = |p: &[u16; 32]| {
                std::mem::transmute::<__m512i, __m512h>(_mm512_loadu_si512(p.as_ptr().cast()))
            };
            let f = splat_ph(f16::from_f32(v).to_bits());
            let store = |p: &mut [u16; 32], r: __m512h| {
                _mm512_storeu_si512(
                    p.as_mut_ptr().cast(),
                    std::mem::transmute::<__m512h, __m512i>(r),
                )
            };
            store(&mut fma, _mm512_fmadd_ph(load(&xb), f, load(&ab)));
            store(&mut mul, _mm512_mul_ph(load(&ab), f));
        }
        let f32s = |z: [u16; 32]| z.map(|b| f16::from_bits(b).to_f32());
        (f32s(fma), f32s(mul))
    }

    /// The AVX-512 V-update primitives against the scalar single roundings, on random f16
    /// values, exact ties between two f16 values, and the edges: a sum just below a midpoint
    /// that f32 would round onto, overflow to infinity, zeros of both signs, subnormals.
    #[test]
    fn f16_updates_match_the_scalar_roundings() {
        let Some(conv) = F16c::detect().filter(|c| c.avx512) else {
            eprintln!("skipped: no AVX-512");
            return;
        };
        if !conv.fp16 {
            eprintln!("no AVX512-FP16: the native f16 instructions are not checked");
        }
        let edges_x = [
            1.0 + 2f32.powi(-10),
            65504.0,
            -65504.0,
            0.0,
            -0.0,
            2f32.powi(-24),
            -1.0,
            -(1.0 + 2f32.powi(-10)),
        ];
        let edges_a = [
            1025.0,
            65504.0,
            -65504.0,
            0.0,
            -0.0,
            2f32.powi(-24),
            1.0,
            -1025.0,
        ];
        let mut rng = StdRng::seed_from_u64(0xF16B);
        for round in 0..4000 {
            let v = match round % 4 {
                0 => 0.5,
                1 => 1023.0 / 2048.0,
                _ => f16_round(rng.random_range(0.0..1.0f32)),
            };
            let a: [f32; 32] = std::array::from_fn(|i| match (round % 5, i) {
                (0, 0..8) => edges_a[i],
                _ => f16_round(rng.random_range(-3000.0..3000.0f32)),
            });
            let x: [f32; 32] = std::array::from_fn(|i| match (round % 5, i) {
                (0, 0..8) => edges_x[i],
                // The quantum of `a`, so that `x * 0.5 + a` is a tie.
                _ if round % 4 == 0 => {
                    let e = (a[i].abs().max(6.1e-5).log2().floor() as i32).max(-14);
                    2f32.powi(e - 10) * if rng.random_bool(0.5) { 1.0 } else { -1.0 }
                }
                _ => f16_round(rng.random_range(-300.0..300.0f32)),
            });
            let want: [f32; 32] = std::array::from_fn(|i| f16_fma(x[i], v, a[i]));
            let bits = |z: &[f32]| z.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for half in 0..2 {
                let (xs, as_) = (&x[16 * half..][..16], &a[16 * half..][..16]);
                // SAFETY: `conv.avx512` proves AVX-512 F (with AVX2, FMA, F16C).
                let got = unsafe { emulated(xs.try_into().unwrap(), v, as_.try_into().unwrap()) };
                assert_eq!(
                    bits(&got),
                    bits(&want[16 * half..][..16]),
                    "emulated, v = {v}"
                );
            }
            if conv.fp16 {
                // SAFETY: `conv.fp16` proves AVX512-FP16, BW and VL.
                let (fma, mul) = unsafe { native(&x, v, &a) };
                assert_eq!(bits(&fma), bits(&want), "vfmadd ph, v = {v}");
                let want_mul: [f32; 32] = std::array::from_fn(|i| f16_round(a[i] * v));
                assert_eq!(bits(&mul), bits(&want_mul), "vmulph, v = {v}");
            }
        }
    }
}
