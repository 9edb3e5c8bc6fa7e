//! Flash attention over a paged KV cache, for a ragged batch of sequences.
//!
//! The arithmetic is that of llama.cpp's two CPU flash-attention paths, chosen per sequence:
//! fewer than [`TILE_Q`] queries take the one-row path
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`), more the tiled one
//! (`ggml_compute_forward_flash_attn_ext_tiled`). Both are llama.cpp's bit for bit (tested
//! against transcriptions of its C) where key positions are its cache cells and the path is
//! the one llama.cpp takes: it chooses per batch (tiled when the whole batch has 64+ tokens
//! and the cache is f16 or f32; never for q8_0; split-KV for one query over 512+ cells), so a
//! short sequence batched with a long prompt, or a long q8_0 prompt, is not its bits.
//!
//! Per dtype, following llama.cpp:
//! - `f16`: one-row path with Q rounded to f16 and the V sum kept in f16 (`VKQ16`), rounded
//!   after every update; tiled path in f32.
//! - `f32`: both paths in f32 (`VKQ32`).
//! - `q8_0`: rows dequantized to f32, then as `f32`. llama.cpp's one-row path instead quantizes
//!   Q to q8_0 and takes integer dot products with the K blocks; we keep Q in f32, so scores
//!   differ from llama.cpp's by Q's quantization error (~0.4% of a score's magnitude) but are
//!   closer to exact.
//!
//! A window hides keys more than `window - 1` positions behind the query; keys before the
//! first visible one are never read, so released blocks before it are never touched.
//!
//! Work: the one-row path runs one task per (query row, kv head), for the group of query heads
//! that share the kv head, so each K and V row is read and converted once per group. The
//! tiled path runs one task per block of `TILED_ROWS` query rows and kv head: each tile of
//! 64 keys is converted once for all of the block's query vectors, and its two products are
//! small register-blocked GEMMs. None of this changes any head's sequence of floating-point
//! operations.

use std::ops::Range;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

use super::attention::{TILE_KV, TILE_Q, round_slice};
use crate::paged::{
    Arenas, PagedAttention, PagedError, SeqAttn, dequantize_q8_0_row, first_visible,
};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
mod one_row_x86;

/// f16 conversions. [`Portable`] uses `half`'s slice functions (which pick F16C at run time,
/// per call, out of line); [`F16c`] inlines the F16C instructions into a kernel compiled for
/// AVX2. Both round to nearest even, so they give identical bits.
trait Conv: Copy + Send + Sync {
    /// Rounds every value to the nearest f16 in place; `tmp` is `xs.len()` long.
    fn round(self, xs: &mut [f32], tmp: &mut [f16]);
    /// `src` widened to f32 into `out` (exact).
    fn to_f32(self, src: &[f16], out: &mut [f32]);
    /// `acc[i] = f16(acc[i] * s)` for f16-valued `acc` and `s` (`_mm512_mul_ph`: the f32
    /// product is exact, so one rounding).
    #[inline(always)]
    fn f16_scale(self, acc: &mut [f32], s: f32) {
        acc.iter_mut().for_each(|a| *a = f16_round(*a * s));
    }
    /// `acc[i] = f16(x[i] * v + acc[i])` rounded once (`_mm512_fmadd_ph`), all f16-valued.
    #[inline(always)]
    fn f16_fma(self, acc: &mut [f32], x: &[f32], v: f32) {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a = f16_fma(x, v, *a);
        }
    }
    /// `dst[j][i] = src[i][j]` for `src: [TILE_KV][d]`, `dst: [d][TILE_KV]` (the tiled path's
    /// K tile, moved as it is).
    #[inline(always)]
    fn transpose_tile(self, src: &[f32], d: usize, dst: &mut [f32]) {
        transpose_tile(src, d, dst);
    }
    /// [`gemm_acc`], compiled for this converter's instruction set.
    #[inline(always)]
    fn gemm_acc(self, c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
        gemm_acc(c, a, b, m, k, n);
    }
    /// [`scale_mask_max`], compiled for this converter's instruction set.
    #[inline(always)]
    fn scale_mask_max(self, row: &mut [f32], scale: f32, t0: usize, seen: (usize, usize)) -> f32 {
        scale_mask_max(row, scale, t0, seen, f32::NEG_INFINITY)
    }
    /// Runs one task of the kernel, compiled for this converter's instruction set.
    #[inline(always)]
    fn task<R: Rows<Self>>(self, c: &Call<'_, R, Self>, t: Task<'_>, sc: &mut Scratch) {
        one_row(c, t, sc)
    }
    /// Runs one block of the tiled path, compiled for this converter's instruction set.
    #[inline(always)]
    fn tiled<R: Rows<Self>>(self, c: &Call<'_, R, Self>, b: &Block, sc: &mut TiledScratch) {
        tiled(c, b, sc)
    }
}

#[derive(Clone, Copy)]
struct Portable;

impl Conv for Portable {
    #[inline(always)]
    fn round(self, xs: &mut [f32], tmp: &mut [f16]) {
        round_slice(xs, tmp);
    }
    #[inline(always)]
    fn to_f32(self, src: &[f16], out: &mut [f32]) {
        src.convert_to_f32_slice(out);
    }
}

/// Proof that the CPU has AVX2, FMA and F16C: the private field means only [`F16c::detect`]
/// makes one. It also records whether AVX-512 F is there, for the wider kernel, and whether
/// AVX512-FP16 with BW and VL is (`fp16` is only set together with `avx512`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct F16c {
    avx512: bool,
    /// AVX512-FP16 (with BW and VL): f16 arithmetic in hardware, as llama.cpp's reference
    /// build uses it.
    fp16: bool,
}

#[cfg(target_arch = "x86_64")]
impl F16c {
    fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(F16c {
            avx512: is_x86_feature_detected!("avx512f"),
            fp16: is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512fp16"),
        })
    }
}

#[cfg(target_arch = "x86_64")]
impl Conv for F16c {
    #[inline(always)]
    fn round(self, xs: &mut [f32], _: &mut [f16]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for ch in &mut chunks {
            // SAFETY: `self` proves the CPU has AVX and F16C; `ch` is 8 f32, read and written
            // unaligned.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(ch.as_ptr()));
                _mm256_storeu_ps(ch.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for x in chunks.into_remainder() {
            *x = f16::from_f32(*x).to_f32();
        }
    }

    #[inline(always)]
    fn to_f32(self, src: &[f16], out: &mut [f32]) {
        let n = src.len().min(out.len()) / 8 * 8;
        let (src_body, src_tail) = src.split_at(n);
        let (out_body, out_tail) = out.split_at_mut(n);
        for (s, o) in src_body.chunks_exact(8).zip(out_body.chunks_exact_mut(8)) {
            // SAFETY: `self` proves the CPU has AVX and F16C; `s` is 8 f16 (16 bytes) and `o`
            // 8 f32, both accessed unaligned.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for (s, o) in src_tail.iter().zip(out_tail) {
            *o = s.to_f32();
        }
    }

    #[inline(always)]
    fn f16_scale(self, acc: &mut [f32], s: f32) {
        let mut chunks = acc.chunks_exact_mut(8);
        for ch in &mut chunks {
            // SAFETY: `self` proves AVX and F16C; `ch` is 8 f32, accessed unaligned.
            unsafe {
                let p = _mm256_mul_ps(_mm256_loadu_ps(ch.as_ptr()), _mm256_set1_ps(s));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p);
                _mm256_storeu_ps(ch.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for a in chunks.into_remainder() {
            *a = f16_round(*a * s);
        }
    }

    /// Eight at a time: the FMA in f64 (the product of two f16 is exact, the sum rounds once
    /// at f64 precision), rounded to odd at f32 precision with integer ops, then to nearest
    /// f16 by F16C. Round-to-odd with more than two spare bits makes the second rounding
    /// correct, so this is the single rounding of [`f16_fma`], bit for bit (tested).
    #[inline(always)]
    fn f16_fma(self, acc: &mut [f32], x: &[f32], v: f32) {
        let n = acc.len().min(x.len()) / 8 * 8;
        // SAFETY: `self` proves AVX2, FMA and F16C; every access is inside the first `n`
        // elements of `acc` and `x`, unaligned.
        unsafe {
            let vv = _mm256_set1_pd(v as f64);
            // The 29 f64 mantissa bits below f32 precision, and the lowest f32 one.
            let low = _mm256_set1_epi64x((1 << 29) - 1);
            let odd = _mm256_set1_epi64x(1 << 29);
            let zero = _mm256_setzero_si256();
            let to_odd = |y: __m256d| -> __m128 {
                let bits = _mm256_castpd_si256(y);
                let sticky =
                    _mm256_andnot_si256(_mm256_cmpeq_epi64(_mm256_and_si256(bits, low), zero), odd);
                let t = _mm256_or_si256(_mm256_andnot_si256(low, bits), sticky);
                // Exact: `t` is representable in f32.
                _mm256_cvtpd_ps(_mm256_castsi256_pd(t))
            };
            for i in (0..n).step_by(8) {
                let xs = _mm256_loadu_ps(x.as_ptr().add(i));
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                let lo = _mm256_fmadd_pd(
                    _mm256_cvtps_pd(_mm256_castps256_ps128(xs)),
                    vv,
                    _mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                );
                let hi = _mm256_fmadd_pd(
                    _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(xs)),
                    vv,
                    _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(a)),
                );
                let y = _mm256_set_m128(to_odd(hi), to_odd(lo));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for (a, &x) in acc[n..].iter_mut().zip(&x[n..]) {
            *a = f16_fma(x, v, *a);
        }
    }

    #[inline(always)]
    fn transpose_tile(self, src: &[f32], d: usize, dst: &mut [f32]) {
        if self.avx512 && d.is_multiple_of(16) {
            // SAFETY: `self` proves AVX-512 F; `d` is a multiple of 16 (checked).
            return unsafe { transpose_tile_avx512(src, d, dst) };
        }
        transpose_tile(src, d, dst);
    }

    #[inline(always)]
    fn scale_mask_max(self, row: &mut [f32], scale: f32, t0: usize, seen: (usize, usize)) -> f32 {
        if self.avx512 {
            // SAFETY: `self` proves AVX-512 F.
            return unsafe { scale_mask_max_avx512(row, scale, t0, seen) };
        }
        scale_mask_max(row, scale, t0, seen, f32::NEG_INFINITY)
    }

    #[inline(always)]
    fn gemm_acc(self, c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
        if self.avx512 && n.is_multiple_of(16) {
            // SAFETY: `self` proves AVX-512 F; `n` is a multiple of 16 (checked).
            return unsafe { gemm_acc_avx512(c, a, b, m, k, n) };
        }
        gemm_acc(c, a, b, m, k, n);
    }

    #[inline(always)]
    fn task<R: Rows<Self>>(self, c: &Call<'_, R, Self>, t: Task<'_>, sc: &mut Scratch) {
        if self.avx512 {
            if one_row_x86::supports(c.d, c.group)
                && let (Some(k), Some(v)) = (c.k.f16_arena(), c.v.f16_arena())
            {
                // SAFETY: `self` proves AVX2, FMA, F16C and AVX-512 F, and AVX512-FP16, BW
                // and VL where `self.fp16` says so (what `run` reads); shape checked above.
                return unsafe { one_row_x86::run(c, k, v, t, sc) };
            }
            // SAFETY: `self` proves AVX2, FMA, F16C and (`avx512`) AVX-512 F.
            return unsafe { task_avx512(c, t, sc) };
        }
        // SAFETY: `self` proves the CPU has every feature `task_avx2` is compiled for.
        unsafe { task_avx2(c, t, sc) }
    }

    #[inline(always)]
    fn tiled<R: Rows<Self>>(self, c: &Call<'_, R, Self>, b: &Block, sc: &mut TiledScratch) {
        if self.avx512 {
            // SAFETY: `self` proves AVX2, FMA, F16C and (`avx512`) AVX-512 F.
            return unsafe { tiled_avx512(c, b, sc) };
        }
        // SAFETY: `self` proves the CPU has every feature `tiled_avx2` is compiled for.
        unsafe { tiled_avx2(c, b, sc) }
    }
}

/// [`task`] compiled for AVX2 + FMA + F16C, the F16C conversions inlined. No FMA contraction
/// happens (Rust never fuses a `*` and a `+`), so the arithmetic is the portable code's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn task_avx2<R: Rows<F16c>>(c: &Call<'_, R, F16c>, t: Task<'_>, sc: &mut Scratch) {
    one_row(c, t, sc)
}

/// [`tiled`] compiled for AVX2 + FMA + F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn tiled_avx2<R: Rows<F16c>>(c: &Call<'_, R, F16c>, b: &Block, sc: &mut TiledScratch) {
    tiled(c, b, sc)
}

/// [`Conv::transpose_tile`], one element at a time.
#[inline(always)]
fn transpose_tile(src: &[f32], d: usize, dst: &mut [f32]) {
    let (src, dst) = (&src[..TILE_KV * d], &mut dst[..d * TILE_KV]);
    for (i, row) in src.chunks_exact(d).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            dst[j * TILE_KV + i] = x;
        }
    }
}

/// [`transpose_tile`] sixteen by sixteen in registers: the scalar scatter, four bytes a
/// store, was about a fifth of the tiled path's time at head dim 256 (`perf annotate`).
///
/// # Safety
/// The CPU must support AVX-512 F; `d` must be a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile_avx512(src: &[f32], d: usize, dst: &mut [f32]) {
    assert!(d.is_multiple_of(16) && TILE_KV.is_multiple_of(16));
    let (src, dst) = (&src[..TILE_KV * d], &mut dst[..d * TILE_KV]);
    for i0 in (0..TILE_KV).step_by(16) {
        for j0 in (0..d).step_by(16) {
            // SAFETY: rows `i0..i0 + 16` and columns `j0..j0 + 16` lie in `src` ([TILE_KV][d])
            // and their transposes in `dst` ([d][TILE_KV]); unaligned loads and stores.
            unsafe {
                let r: [__m512i; 16] = std::array::from_fn(|i| {
                    _mm512_loadu_si512(src.as_ptr().add((i0 + i) * d + j0).cast())
                });
                let o = super::kquant::repack::avx512::transpose(r);
                for (j, v) in o.iter().enumerate() {
                    _mm512_storeu_si512(dst.as_mut_ptr().add((j0 + j) * TILE_KV + i0).cast(), *v);
                }
            }
        }
    }
}

/// One row of a key tile's scores: `x = x * scale + mask` (mask 0 for keys `t0 + j` in
/// `seen.0..=seen.1`, else `-inf`), returning the row's maximum as `ggml_vec_max_f32` folds
/// it (`MAX(max, x)` from `start`: `-inf` for a whole row).
#[inline(always)]
fn scale_mask_max(
    row: &mut [f32],
    scale: f32,
    t0: usize,
    (fv, qp): (usize, usize),
    start: f32,
) -> f32 {
    let mut tile_max = start;
    for (j, x) in row.iter_mut().enumerate() {
        let key = t0 + j;
        let mask = if key >= fv && key <= qp {
            0.0
        } else {
            f32::NEG_INFINITY
        };
        *x = *x * scale + mask;
        tile_max = if tile_max > *x { tile_max } else { *x };
    }
    tile_max
}

/// [`scale_mask_max`] sixteen keys at a time (its scalar loop was about a third of the tiled
/// path's own time at head dim 64): the same product and sum per score. The maximum is
/// taken lane-wise, then across lanes: for scores that are not NaN that is the same value as
/// the scalar fold (at most the sign of a zero maximum differs, which no result sees: it is
/// only ever subtracted from or compared with the scores).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_mask_max_avx512(
    row: &mut [f32],
    scale: f32,
    t0: usize,
    (fv, qp): (usize, usize),
) -> f32 {
    let body = row.len() / 16 * 16;
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let (sv, ninf) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut vmax = ninf;
    for j0 in (0..body).step_by(16) {
        // Keys `t0 + j0 + lane` in `fv..=qp`, as lanes `lo..=hi` (an empty range when
        // `qp < t0 + j0` or `fv >= t0 + j0 + 16`); both are clamped to -1..=16 before the cast.
        let base = t0 + j0;
        let lo = fv.saturating_sub(base).min(16) as i32;
        let hi = if qp < base {
            -1
        } else {
            (qp - base).min(15) as i32
        };
        let seen = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(lo))
            & _mm512_cmple_epi32_mask(lane, _mm512_set1_epi32(hi));
        // SAFETY: `j0 + 16 <= body <= row.len()`; unaligned load and store.
        unsafe {
            let p = row.as_mut_ptr().add(j0);
            let x = _mm512_mul_ps(_mm512_loadu_ps(p), sv);
            let x = _mm512_add_ps(x, _mm512_mask_blend_ps(seen, ninf, _mm512_setzero_ps()));
            _mm512_storeu_ps(p, x);
            vmax = _mm512_max_ps(vmax, x);
        }
    }
    let mut lanes = [0.0f32; 16];
    // SAFETY: `lanes` holds sixteen floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), vmax) };
    let head = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if m > x { m } else { x });
    // The tail continues the fold from the lanes' maximum, as the scalar fold would continue
    // (a NaN there stays NaN to the caller instead of being compared away).
    scale_mask_max(&mut row[body..], scale, t0 + body, (fv, qp), head)
}

/// [`gemm_acc`] in AVX-512 registers: eight rows by 32 columns at a time (16 accumulators),
/// each step loading two vectors of `b` and broadcasting eight values of `a`. The generic
/// code's four rows by 64 columns took every `b` operand from memory again for each row and
/// reloaded its row pointers from the stack: 24 loads per 16 FMAs, against 10 here. Each
/// element is the same chain of FMAs in `k` order from its old value, so the same bits.
///
/// # Safety
/// The CPU must support AVX-512 F; `n` must be a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_acc_avx512(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    assert!(n.is_multiple_of(16));
    let (c, a, b) = (&mut c[..m * n], &a[..m * k], &b[..k * n]);
    /// Rows `i0..i0 + RM`, vectors `j0 / 16..j0 / 16 + WV` of columns.
    ///
    /// # Safety
    /// AVX-512 F; the rows and columns lie in `c`, `a` and `b` as [`gemm_acc`] lays them out.
    #[inline(always)]
    unsafe fn block<const RM: usize, const WV: usize>(
        c: &mut [f32],
        a: &[f32],
        b: &[f32],
        (i0, j0): (usize, usize),
        k: usize,
        n: usize,
    ) {
        // SAFETY (all below): row `i0 + r < m` of `a` (`k` long) and of `c`, and columns
        // `j0..j0 + 16 * WV <= n` of `b`'s and `c`'s rows, as the caller guarantees.
        unsafe {
            let cp = c.as_mut_ptr().add(i0 * n + j0);
            let ap = a.as_ptr().add(i0 * k);
            let bp = b.as_ptr().add(j0);
            let mut acc = [[_mm512_setzero_ps(); WV]; RM];
            for (r, row) in acc.iter_mut().enumerate() {
                for (w, v) in row.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(cp.add(r * n + 16 * w));
                }
            }
            for kk in 0..k {
                let bv: [__m512; WV] =
                    std::array::from_fn(|w| _mm512_loadu_ps(bp.add(kk * n + 16 * w)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(r * k + kk));
                    for (v, &y) in row.iter_mut().zip(&bv) {
                        *v = _mm512_fmadd_ps(x, y, *v);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (w, v) in row.iter().enumerate() {
                    _mm512_storeu_ps(cp.add(r * n + 16 * w), *v);
                }
            }
        }
    }
    let mut i0 = 0;
    // SAFETY: every block lies inside the `m x n` output, `m x k` and `k x n` inputs.
    unsafe {
        while i0 + 8 <= m {
            let mut j0 = 0;
            while j0 + 32 <= n {
                block::<8, 2>(c, a, b, (i0, j0), k, n);
                j0 += 32;
            }
            if j0 < n {
                block::<8, 1>(c, a, b, (i0, j0), k, n);
            }
            i0 += 8;
        }
        while i0 < m {
            let mut j0 = 0;
            while j0 + 64 <= n {
                block::<1, 4>(c, a, b, (i0, j0), k, n);
                j0 += 64;
            }
            while j0 < n {
                block::<1, 1>(c, a, b, (i0, j0), k, n);
                j0 += 16;
            }
            i0 += 1;
        }
    }
}

/// [`tiled`] compiled for AVX-512 F as well (same operations, wider vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn tiled_avx512<R: Rows<F16c>>(c: &Call<'_, R, F16c>, b: &Block, sc: &mut TiledScratch) {
    tiled(c, b, sc)
}

/// [`task`] compiled for AVX-512 F as well: the same scalar-order arithmetic (every sum and
/// FMA is spelled out, none reassociated), in 16-lane vectors, half the instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn task_avx512<R: Rows<F16c>>(c: &Call<'_, R, F16c>, t: Task<'_>, sc: &mut Scratch) {
    one_row(c, t, sc)
}

/// Reads rows of one arena as f32. The kernel is generic over this, so the dtype is decided
/// once per call rather than per key or per value.
trait Rows<C: Conv>: Sync {
    /// llama.cpp's one-row path with an f16 V keeps the V sum in f16 and rounds Q to f16 (the
    /// f16 K's dot type).
    const F16_ACC: bool;
    /// Row `row` as f32 into `out`.
    fn read(&self, conv: C, row: usize, out: &mut [f32]);
    /// The arena itself when it holds f16 rows of the head dimension, for kernels that read
    /// it directly.
    #[inline(always)]
    fn f16_arena(&self) -> Option<&[f16]> {
        None
    }
    /// Row `row` as f32: borrowed when stored as f32, otherwise converted into `buf`.
    #[inline(always)]
    fn row<'a>(&'a self, conv: C, row: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.read(conv, row, buf);
        buf
    }
}

struct F32Rows<'s> {
    a: &'s [f32],
    d: usize,
}

impl<C: Conv> Rows<C> for F32Rows<'_> {
    const F16_ACC: bool = false;
    #[inline(always)]
    fn read(&self, _: C, row: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.a[row * self.d..(row + 1) * self.d]);
    }
    #[inline(always)]
    fn row<'a>(&'a self, _: C, row: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self.a[row * self.d..(row + 1) * self.d]
    }
}

struct F16Rows<'s> {
    a: &'s [f16],
    d: usize,
}

impl<C: Conv> Rows<C> for F16Rows<'_> {
    const F16_ACC: bool = true;
    #[inline(always)]
    fn f16_arena(&self) -> Option<&[f16]> {
        Some(self.a)
    }
    #[inline(always)]
    fn read(&self, conv: C, row: usize, out: &mut [f32]) {
        conv.to_f32(&self.a[row * self.d..(row + 1) * self.d], out);
    }
}

struct Q8Rows<'s> {
    a: &'s [u8],
    row_bytes: usize,
}

impl<C: Conv> Rows<C> for Q8Rows<'_> {
    const F16_ACC: bool = false;
    #[inline(always)]
    fn read(&self, _: C, row: usize, out: &mut [f32]) {
        dequantize_q8_0_row(
            &self.a[row * self.row_bytes..(row + 1) * self.row_bytes],
            out,
        );
    }
}

/// Per-task scratch, allocated once per rayon job (never per key). Sized for the `group`
/// query heads that share one kv head.
struct Scratch {
    /// Q of the group's heads, `[group][d]` (rounded to f16 on the f16 one-row path).
    q: Vec<f32>,
    /// Unnormalized outputs, `[group][d]`.
    acc: Vec<f32>,
    /// Running max and softmax denominator per head.
    m: Vec<f32>,
    sum: Vec<f32>,
    /// Scores of the current tile, `[group][TILE_KV]`.
    p: Vec<f32>,
    /// The K and V rows being converted (`[2][d]`).
    vt: Vec<f32>,
    tmp: Vec<f16>,
    rows: [usize; TILE_KV],
    /// Split-KV: each chunk's unnormalized V sums `[SPLIT_KV_CHUNKS][group][d]` and
    /// `[max, sum]` per head `[SPLIT_KV_CHUNKS][group][2]`.
    split_acc: Vec<f32>,
    split_stats: Vec<f32>,
}

impl Scratch {
    fn new(d: usize, group: usize) -> Self {
        Self {
            split_acc: vec![0.0; SPLIT_KV_CHUNKS * group * d],
            split_stats: vec![0.0; SPLIT_KV_CHUNKS * group * 2],
            q: vec![0.0; group * d],
            acc: vec![0.0; group * d],
            m: vec![0.0; group],
            sum: vec![0.0; group],
            p: vec![0.0; group * TILE_KV],
            vt: vec![0.0; 2 * d],
            tmp: vec![f16::ZERO; group * d],
            rows: [0; TILE_KV],
        }
    }
}

/// What every task of one call shares.
struct Call<'a, R, C> {
    q: &'a [f32],
    conv: C,
    k: R,
    v: R,
    seqs: &'a [SeqAttn],
    group: usize,
    n_kv: usize,
    block_size: usize,
    d: usize,
    scale: f32,
    /// Whether one-query sequences over 512+ cells take llama.cpp's split-KV path (f16 and
    /// f32 caches; llama.cpp never splits a q8_0 cache).
    split_kv: bool,
}

/// One task: one query row of `seq` (seeing key positions `keys`) against kv head `kvh`, for
/// the group of query heads `qrows` (`[group][d]`), writing `dst` (`[group][d]`).
struct Task<'a> {
    seq: &'a SeqAttn,
    kvh: usize,
    qrows: &'a [f32],
    keys: Range<usize>,
    dst: &'a mut [f32],
    /// A split-KV chunk's partial result: when given, `dst` gets the unnormalized V sums and
    /// this `[group][2]` the running max and softmax denominator of each head.
    partial: Option<&'a mut [f32]>,
}

/// Paged attention for `q: [n_rows, n_head, head_dim]` (token-major, row-major), returning
/// `[n_rows, n_head * head_dim]`. Query head `h` reads kv head `h / (n_head / n_kv)`. Rows
/// that belong to no sequence come out zero. The call is validated first
/// ([`PagedAttention::validate`]); nothing is read outside the store.
pub fn paged_attention(
    q: &[f32],
    n_rows: usize,
    n_head: usize,
    head_dim: usize,
    attn: &PagedAttention,
) -> Result<Vec<f32>, PagedError> {
    paged_attention_with(q, n_rows, n_head, head_dim, attn, Path::Best)
}

/// Which build of the kernel runs (tests compare them: all give the same bits).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// The code without F16C intrinsics.
    #[cfg_attr(all(not(test), not(target_arch = "x86_64")), allow(dead_code))]
    Portable,
    /// AVX2 + F16C, even where AVX-512 is available.
    #[cfg_attr(any(not(test), not(target_arch = "x86_64")), allow(dead_code))]
    Avx2,
    /// AVX-512 without AVX512-FP16, even where the CPU has it.
    #[cfg_attr(any(not(test), not(target_arch = "x86_64")), allow(dead_code))]
    Avx512,
    /// The widest this CPU runs.
    Best,
}

/// [`paged_attention`] on the build `path` picks (where the CPU has it; else the portable one).
fn paged_attention_with(
    q: &[f32],
    n_rows: usize,
    n_head: usize,
    head_dim: usize,
    attn: &PagedAttention,
    path: Path,
) -> Result<Vec<f32>, PagedError> {
    attn.validate(n_rows, n_head, head_dim)?;
    let expected = n_rows
        .checked_mul(n_head)
        .and_then(|x| x.checked_mul(head_dim))
        .unwrap_or(usize::MAX);
    if q.len() != expected {
        return Err(PagedError::Length {
            what: "q",
            expected,
            got: q.len(),
        });
    }
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable
        && let Some(mut conv) = F16c::detect()
    {
        conv.avx512 &= matches!(path, Path::Best | Path::Avx512);
        conv.fp16 &= conv.avx512 && path == Path::Best;
        return dispatch(q, n_rows, n_head, attn, conv);
    }
    let _ = path;
    dispatch(q, n_rows, n_head, attn, Portable)
}

/// Picks the row reader for the store's dtype, once per call; a store on a GPU device is not
/// the CPU kernel's to read.
fn dispatch<C: Conv>(
    q: &[f32],
    n_rows: usize,
    n_head: usize,
    attn: &PagedAttention,
    conv: C,
) -> Result<Vec<f32>, PagedError> {
    let store = &*attn.store;
    let d = store.head_dim();
    let split_kv = !matches!(store.arenas, Arenas::Q8_0(_));
    macro_rules! call {
        ($k:expr, $v:expr) => {
            run(
                &Call {
                    q,
                    conv,
                    k: $k,
                    v: $v,
                    seqs: &attn.seqs,
                    group: n_head / store.n_kv(),
                    n_kv: store.n_kv(),
                    block_size: store.block_size(),
                    d,
                    scale: attn.scale,
                    split_kv,
                },
                n_rows,
            )
        };
    }
    Ok(match &store.arenas {
        Arenas::F32([k, v]) => call!(F32Rows { a: k, d }, F32Rows { a: v, d }),
        Arenas::F16([k, v]) => call!(
            F16Rows {
                a: k.reinterpret_cast(),
                d
            },
            F16Rows {
                a: v.reinterpret_cast(),
                d
            }
        ),
        Arenas::Q8_0([k, v]) => {
            let row_bytes = store.row_units();
            call!(Q8Rows { a: k, row_bytes }, Q8Rows { a: v, row_bytes })
        }
        #[cfg(feature = "cube")]
        Arenas::Device(_) => {
            return Err(PagedError::Placement(
                "this layer's K and V live on a GPU device: the CPU kernel cannot read them",
            ));
        }
    })
}

fn run<R: Rows<C>, C: Conv>(c: &Call<'_, R, C>, n_rows: usize) -> Vec<f32> {
    let (n_kv, gd) = (c.n_kv, c.group * c.d);
    // Row -> its sequence, so each task finds its own in O(1).
    let mut row_seq = vec![usize::MAX; n_rows];
    for (i, s) in c.seqs.iter().enumerate() {
        row_seq[s.q_start..s.q_start + s.n_q].fill(i);
    }
    let mut out = vec![0.0f32; n_rows * n_kv * gd];
    // One task per (query row, kv head): the heads of a GQA group are adjacent in both `q` and
    // `out`, so a task reads and writes one contiguous `group * d` slice, and converts each K
    // and V row once for the whole group. Each head's arithmetic is unchanged by the sharing.
    out.par_chunks_mut(gd).enumerate().for_each_init(
        || Scratch::new(c.d, c.group),
        |sc, (idx, dst)| {
            let (row, kvh) = (idx / n_kv, idx % n_kv);
            let Some(seq) = c.seqs.get(row_seq[row]) else {
                return;
            };
            if seq.path_rows >= TILE_Q {
                return; // the tiled pass below
            }
            let qp = seq.n_past + (row - seq.q_start);
            let keys = first_visible(qp, seq.window)..qp + 1;
            let qrows = &c.q[idx * gd..(idx + 1) * gd];
            if let Some(chunk) = split_kv_chunk(seq, qp, c.split_kv) {
                return split_kv(c, seq, kvh, qrows, keys, chunk, dst, sc);
            }
            let t = Task {
                seq,
                kvh,
                qrows,
                keys,
                dst,
                partial: None,
            };
            c.conv.task(c, t, sc);
        },
    );
    // The tiled path: blocks of query rows per kv head, each writing its own rows.
    let blocks: Vec<Block> = c
        .seqs
        .iter()
        .filter(|s| s.path_rows >= TILE_Q)
        .flat_map(|seq| {
            (0..seq.n_q).step_by(TILED_ROWS).flat_map(move |r0| {
                (0..n_kv).map(move |kvh| Block {
                    seq,
                    r0,
                    n: TILED_ROWS.min(seq.n_q - r0),
                    kvh,
                })
            })
        })
        .collect();
    if blocks.is_empty() {
        return out;
    }
    let results: Vec<Vec<f32>> = blocks
        .par_iter()
        .map_init(
            || TiledScratch::new(c.d, c.group),
            |sc, b| {
                c.conv.tiled(c, b, sc);
                sc.out[..b.n * gd].to_vec()
            },
        )
        .collect();
    for (b, res) in blocks.iter().zip(&results) {
        for (i, head_rows) in res.chunks_exact(gd).enumerate() {
            let at = ((b.seq.q_start + b.r0 + i) * n_kv + b.kvh) * gd;
            out[at..at + gd].copy_from_slice(head_rows);
        }
    }
    out
}

/// Row indices of kv head `kvh` at `positions` (at most one tile), walking the block table
/// a block at a time instead of dividing per key.
#[inline(always)]
fn fill_rows<R, C>(
    c: &Call<'_, R, C>,
    seq: &SeqAttn,
    kvh: usize,
    positions: Range<usize>,
    rows: &mut [usize],
) {
    let bs = c.block_size;
    let mut p = positions.start;
    let mut i = 0;
    while p < positions.end {
        let (block, slot) = (seq.block_table[p / bs] as usize, p % bs);
        let n = (bs - slot).min(positions.end - p);
        let base = (block * c.n_kv + kvh) * bs + slot;
        for (j, r) in rows[i..i + n].iter_mut().enumerate() {
            *r = base + j;
        }
        (p, i) = (p + n, i + n);
    }
}

/// `x . y` in the order of ggml's AVX-512 `ggml_vec_dot_f16`/`_f32` (which llama.cpp's
/// flash attention scores keys with): four 16-lane FMA accumulators over 64-element chunks,
/// folded pairwise and then as `_mm512_reduce_add_ps` folds them; the elements past the last
/// whole chunk added one by one (in f64 on the f16 path, which is exact for f16 inputs and
/// what ggml does; in f32 with FMA otherwise).
#[inline(always)]
fn ggml_dot(x: &[f32], y: &[f32], f16_inputs: bool) -> f32 {
    let n = x.len().min(y.len());
    let np = n & !63;
    let mut acc = [[0.0f32; 16]; 4];
    for (xc, yc) in x[..np].chunks_exact(64).zip(y[..np].chunks_exact(64)) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, a) in a.iter_mut().enumerate() {
                *a = xc[j * 16 + l].mul_add(yc[j * 16 + l], *a);
            }
        }
    }
    let mut v = [0.0f32; 16];
    for (l, v) in v.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let sum = reduce_add_16(&v);
    if f16_inputs {
        let mut sum = sum as f64;
        for (a, b) in x[np..n].iter().zip(&y[np..n]) {
            sum += (a * b) as f64;
        }
        sum as f32
    } else {
        x[np..n]
            .iter()
            .zip(&y[np..n])
            .fold(sum, |s, (a, b)| a.mul_add(*b, s))
    }
}

/// GCC's `_mm512_reduce_add_ps`: halves added, then quarters, then the pairs of the last four.
#[inline(always)]
fn reduce_add_16(v: &[f32; 16]) -> f32 {
    let mut t = [0.0f32; 8];
    for i in 0..8 {
        t[i] = v[i + 8] + v[i];
    }
    let u = [t[4] + t[0], t[5] + t[1], t[6] + t[2], t[7] + t[3]];
    (u[0] + u[2]) + (u[1] + u[3])
}

/// `x` rounded to the nearest f16 (ties to even), as f32.
#[inline(always)]
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `x * v + a` rounded once to f16 (`_mm512_fmadd_ph`) for f16 inputs: the product is exact
/// in f64 and so is the sum for f16-range values; [`f64_to_f16_value`] then rounds once
/// (`half`'s `from_f64` goes through f32 with F16C, which can round twice).
#[inline(always)]
fn f16_fma(x: f32, v: f32, a: f32) -> f32 {
    f64_to_f16_value(x as f64 * v as f64 + a as f64)
}

/// `x` rounded to the nearest f16 (ties to even, overflow to infinity), as f32.
#[inline(always)]
fn f64_to_f16_value(x: f64) -> f32 {
    let a = x.abs();
    if !a.is_finite() || a == 0.0 {
        return x as f32;
    }
    if a >= 65520.0 {
        return if x > 0.0 {
            f32::INFINITY
        } else {
            f32::NEG_INFINITY
        };
    }
    // The f16 quantum at `a`: 2^(e - 10) for normals (e = floor(log2 a) >= -14), else 2^-24.
    let e = ((a.to_bits() >> 52) as i64 - 1023).max(-14);
    let q = f64::from_bits(((e - 10 + 1023) as u64) << 52);
    // Scaling by a power of two is exact; so is rounding an f64 to an integer and back.
    let r = (a / q).round_ties_even() * q;
    (if x < 0.0 { -r } else { r }) as f32
}

/// llama.cpp's one-row path (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`): one key
/// at a time, the V sum rescaled whenever the max grows, every step with ggml's roundings
/// (`expf`, FMAs where its x86 build fuses, the f16 `VKQ` accumulator rounded after each
/// update), so the result is llama.cpp's bit for bit. The target is llama.cpp built for an
/// x86 CPU with AVX-512 FP16 (the reference machine): for head dims of 128 and more its
/// `ggml_vec_mad_f16` / `ggml_vec_scale_f16` then run in f16 arithmetic with the factor
/// rounded to f16 first; a build without AVX512-FP16 gives slightly different bits there.
#[inline(always)]
fn one_row<R: Rows<C>, C: Conv>(c: &Call<'_, R, C>, t: Task<'_>, sc: &mut Scratch) {
    let Task {
        seq,
        kvh,
        qrows,
        keys,
        dst,
        partial,
    } = t;
    let (d, conv) = (c.d, c.conv);
    let Scratch {
        q,
        acc,
        m,
        sum,
        p,
        vt,
        tmp,
        rows,
        ..
    } = sc;
    let (kbuf, vbuf) = vt.split_at_mut(d);
    let vbuf = &mut vbuf[..d];
    q.copy_from_slice(qrows);
    if R::F16_ACC {
        conv.round(q, tmp);
    }
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    // The part of each head's `VKQ16` that llama.cpp's AVX512-FP16 build updates in native f16
    // arithmetic (`GGML_F16_STEP` = 128 values at a time; the rest in f32 then rounded).
    let np16 = if R::F16_ACC { d & !127 } else { 0 };
    for start in keys.clone().step_by(TILE_KV) {
        let len = TILE_KV.min(keys.end - start);
        fill_rows(c, seq, kvh, start..start + len, &mut rows[..len]);
        // The tile's scores first, each K row converted once for the group's heads.
        for (j, &r) in rows[..len].iter().enumerate() {
            let krow = c.k.row(conv, r, kbuf);
            for (g, qg) in q.chunks_exact(d).enumerate() {
                p[g * TILE_KV + j] = ggml_dot(krow, qg, R::F16_ACC);
            }
        }
        // The online softmax itself goes one key at a time, as llama.cpp's.
        for (j, &r) in rows[..len].iter().enumerate() {
            let vrow = c.v.row(conv, r, vbuf);
            for (g, acc) in acc.chunks_exact_mut(d).enumerate() {
                let score = p[g * TILE_KV + j] * c.scale;
                let (mut ms, mut vs) = (1.0f32, 1.0f32);
                let (head, tail) = acc.split_at_mut(np16);
                if score > m[g] {
                    let old = m[g];
                    m[g] = score;
                    ms = (old - score).exp();
                    // f16 x f16 is exact in f32: one rounding, as `_mm512_mul_ph`.
                    conv.f16_scale(head, f16_round(ms));
                    tail.iter_mut().for_each(|a| *a *= ms);
                    if R::F16_ACC {
                        conv.round(tail, &mut tmp[..d - np16]);
                    }
                } else {
                    vs = (score - m[g]).exp();
                }
                conv.f16_fma(head, vrow, f16_round(vs));
                for (a, &x) in tail.iter_mut().zip(&vrow[np16..]) {
                    *a = x.mul_add(vs, *a);
                }
                if R::F16_ACC {
                    conv.round(tail, &mut tmp[..d - np16]);
                }
                sum[g] = sum[g].mul_add(ms, vs);
            }
        }
    }
    match partial {
        Some(stats) => {
            dst.copy_from_slice(acc);
            for (st, (&m, &s)) in stats.chunks_exact_mut(2).zip(m.iter().zip(sum.iter())) {
                st.copy_from_slice(&[m, s]);
            }
        }
        None => finish(acc, sum, d, dst),
    }
}

/// Threads whose split llama.cpp's split-KV path reproduces: the references' (and
/// llama-bench's default here) 2. Its chunks are `ceil(n_kv / threads)` cells each, so the
/// result depends on the thread count; Ember always computes the 2-thread split, whatever
/// its own thread count.
const SPLIT_KV_CHUNKS: usize = 2;
/// Fewest cache cells (llama.cpp's padded `n_kv`) that take the split-KV path.
const SPLIT_KV_MIN_CELLS: usize = 512;
/// llama.cpp pads the cells an attention reads to a multiple of this (and reads at least it).
const KV_CELL_PAD: usize = 256;

/// The chunk size (in key positions) of llama.cpp's split-KV decode for the query of `seq` at
/// position `qp`, when it takes that path: one query alone in its batch (`neq1 == 1`:
/// `path_rows == 1`) over `n_kv >= 512` cells, where `n_kv` is the length up to the query
/// padded to a multiple of 256. Cells are key positions here, as in llama.cpp's cache for one
/// sequence until a sliding-window cache wraps.
fn split_kv_chunk(seq: &SeqAttn, qp: usize, enabled: bool) -> Option<usize> {
    let n_kv = (qp + 1).div_ceil(KV_CELL_PAD) * KV_CELL_PAD;
    (enabled && seq.path_rows == 1 && n_kv >= SPLIT_KV_MIN_CELLS)
        .then(|| n_kv.div_ceil(SPLIT_KV_CHUNKS))
}

/// llama.cpp's split-KV decode (`use_split_kv_path` in `ggml_compute_forward_flash_attn_ext_f16`):
/// the one-row path over each chunk of `chunk` cells on its own, giving per head a max `M`,
/// a sum `S` and unnormalized V sums, then `ggml_flash_attn_ext_reduce_partials`: chunks in
/// order, skipping empty ones, `M' = fmaxf(M, Mc)`, `VKQ = fma(VKQ, e^(M - M'), VKQc * e^(Mc - M'))`
/// and `S` the same way (as GCC contracts them; read off its machine code), then `VKQ / S`.
#[allow(clippy::too_many_arguments)]
fn split_kv<R: Rows<C>, C: Conv>(
    c: &Call<'_, R, C>,
    seq: &SeqAttn,
    kvh: usize,
    qrows: &[f32],
    keys: Range<usize>,
    chunk: usize,
    dst: &mut [f32],
    sc: &mut Scratch,
) {
    let (d, gd) = (c.d, c.group * c.d);
    let mut accs = std::mem::take(&mut sc.split_acc);
    let mut stats = std::mem::take(&mut sc.split_stats);
    for (i, (acc, st)) in accs
        .chunks_exact_mut(gd)
        .zip(stats.chunks_exact_mut(2 * c.group))
        .enumerate()
    {
        let cells = i * chunk..(i + 1) * chunk;
        let t = Task {
            seq,
            kvh,
            qrows,
            keys: keys.start.max(cells.start)
                ..keys.end.min(cells.end).max(keys.start.max(cells.start)),
            dst: acc,
            partial: Some(st),
        };
        c.conv.task(c, t, sc);
    }
    for g in 0..c.group {
        let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
        let out = &mut dst[g * d..(g + 1) * d];
        out.fill(0.0);
        for (acc, st) in accs.chunks_exact(gd).zip(stats.chunks_exact(2 * c.group)) {
            let (mc, sc) = (st[2 * g], st[2 * g + 1]);
            if sc == 0.0 {
                continue;
            }
            let m_new = m.max(mc);
            let (scale_old, scale_new) = ((m - m_new).exp(), (mc - m_new).exp());
            for (o, &a) in out.iter_mut().zip(&acc[g * d..(g + 1) * d]) {
                *o = o.mul_add(scale_old, a * scale_new);
            }
            s = s.mul_add(scale_old, sc * scale_new);
            m = m_new;
        }
        if s != 0.0 {
            let inv = 1.0 / s;
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
    sc.split_acc = accs;
    sc.split_stats = stats;
}

/// `dst[g] = acc[g] / sum[g]` per head (zero when nothing was visible).
#[inline(always)]
fn finish(acc: &[f32], sum: &[f32], d: usize, dst: &mut [f32]) {
    for ((o, a), &s) in dst.chunks_exact_mut(d).zip(acc.chunks_exact(d)).zip(sum) {
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        for (o, a) in o.iter_mut().zip(a) {
            *o = a * inv;
        }
    }
}

/// Query rows per block of the tiled path: each K and V tile is converted (and K transposed)
/// once for them all. 32 rather than 16 halves that work per query row and lengthens the
/// GEMMs' row count (SmolLM2 pp512 +1-6%, Gemma 3 about +1.5%, docs/performance.md); each
/// row's arithmetic does not depend on its block.
const TILED_ROWS: usize = 32;

/// One block of the tiled path: query rows `r0..r0 + n` of `seq` against kv head `kvh`.
struct Block<'a> {
    seq: &'a SeqAttn,
    r0: usize,
    n: usize,
    kvh: usize,
}

/// Per-task scratch of the tiled path, for up to [`TILED_ROWS`] rows of `group` heads
/// (`mq` query vectors).
struct TiledScratch {
    /// Q, `[mq][d]`.
    q: Vec<f32>,
    /// Scores, then softmax weights, of the current tile, `[mq][TILE_KV]`.
    kq: Vec<f32>,
    /// Unnormalized outputs, `[mq][d]`; then the results.
    out: Vec<f32>,
    /// K of the current tile transposed, `[d][TILE_KV]`, and V, `[TILE_KV][d]`; keys past
    /// the sequence are zero.
    kt: Vec<f32>,
    v: Vec<f32>,
    /// Running max and softmax denominator per query vector.
    m: Vec<f32>,
    s: Vec<f32>,
    /// The current tile's K rows as read, `[TILE_KV][d]` (keys past the sequence zero).
    krows: Vec<f32>,
    rows: [usize; TILE_KV],
}

impl TiledScratch {
    fn new(d: usize, group: usize) -> Self {
        let mq = TILED_ROWS * group;
        Self {
            q: vec![0.0; mq * d],
            kq: vec![0.0; mq * TILE_KV],
            out: vec![0.0; mq * d],
            kt: vec![0.0; d * TILE_KV],
            v: vec![0.0; TILE_KV * d],
            m: vec![0.0; mq],
            s: vec![0.0; mq],
            krows: vec![0.0; TILE_KV * d],
            rows: [0; TILE_KV],
        }
    }
}

/// `c[m][n] += a[m][k] * b[k][n]` (row-major), each element a chain of FMAs in `k` order
/// starting from its old value: the order of ggml's `simd_gemm` (whose blocking changes no
/// element's sequence of operations). Four rows by 64 columns at a time, in registers.
#[inline(always)]
fn gemm_acc(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    const RM: usize = 4;
    const W: usize = 64;
    let (c, a, b) = (&mut c[..m * n], &a[..m * k], &b[..k * n]);
    let mut i0 = 0;
    while i0 + RM <= m {
        let mut j0 = 0;
        while j0 + W <= n {
            let mut acc = [[0.0f32; W]; RM];
            for (r, acc) in acc.iter_mut().enumerate() {
                acc.copy_from_slice(&c[(i0 + r) * n + j0..][..W]);
            }
            for kk in 0..k {
                let brow: &[f32; W] = b[kk * n + j0..][..W].try_into().expect("W columns");
                for (r, acc) in acc.iter_mut().enumerate() {
                    let p = a[(i0 + r) * k + kk];
                    for (x, &y) in acc.iter_mut().zip(brow) {
                        *x = y.mul_add(p, *x);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                c[(i0 + r) * n + j0..][..W].copy_from_slice(acc);
            }
            j0 += W;
        }
        if j0 < n {
            gemm_acc_scalar(c, a, b, i0..i0 + RM, j0..n, k, n);
        }
        i0 += RM;
    }
    if i0 < m {
        gemm_acc_scalar(c, a, b, i0..m, 0..n, k, n);
    }
}

/// [`gemm_acc`]'s arithmetic over rows `rows` and columns `cols`, one element at a time.
#[inline(always)]
fn gemm_acc_scalar(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    rows: Range<usize>,
    cols: Range<usize>,
    k: usize,
    n: usize,
) {
    for i in rows {
        for j in cols.clone() {
            let mut x = c[i * n + j];
            for kk in 0..k {
                x = b[kk * n + j].mul_add(a[i * k + kk], x);
            }
            c[i * n + j] = x;
        }
    }
}

/// llama.cpp's tiled path (`ggml_compute_forward_flash_attn_ext_tiled`), f32 throughout: key
/// tiles of 64 at multiples of 64 positions; per tile the scores are a GEMM of Q with the
/// tile's K, scaled and masked (`-inf`), the softmax advances by the tile maximum (`expf` for
/// the rescale, ggml's vector `expf` for the weights, their sum folded per 16 in f64), and the
/// V sum is a GEMM into the accumulator. Tiles a row cannot see at all are skipped, which is
/// what ggml's all-masked tiles amount to. Per query row the result is llama.cpp's bit for
/// bit (when key positions are its cell indices, as for a sequence in a fresh cache).
#[inline(always)]
fn tiled<R: Rows<C>, C: Conv>(c: &Call<'_, R, C>, b: &Block<'_>, sc: &mut TiledScratch) {
    let (d, g, conv) = (c.d, c.group, c.conv);
    let &Block { seq, r0, n, kvh } = b;
    let mq = n * g;
    let TiledScratch {
        q,
        kq,
        out,
        kt,
        v,
        m,
        s,
        krows,
        rows,
    } = sc;
    for i in 0..n {
        let at = ((seq.q_start + r0 + i) * c.n_kv + kvh) * g * d;
        q[i * g * d..(i + 1) * g * d].copy_from_slice(&c.q[at..at + g * d]);
    }
    out[..mq * d].fill(0.0);
    m[..mq].fill(f32::NEG_INFINITY);
    s[..mq].fill(0.0);
    let qp0 = seq.n_past + r0;
    let qp_last = qp0 + n - 1;
    // Keys before `fv0` are hidden from every row of the block (their blocks may be gone).
    let fv0 = first_visible(qp0, seq.window);
    for t0 in (fv0 / TILE_KV * TILE_KV..=qp_last).step_by(TILE_KV) {
        // Keys `lo..end` are read (`qp_last` is one of them); the rest of the tile is zero.
        let (lo, end) = (t0.max(fv0), (t0 + TILE_KV).min(seq.n_past + seq.n_q));
        let (skip, len) = (lo - t0, end - t0);
        fill_rows(c, seq, kvh, lo..end, &mut rows[skip..len]);
        for (tk, &r) in rows[skip..len].iter().enumerate() {
            let tk = skip + tk;
            c.k.read(conv, r, &mut krows[tk * d..(tk + 1) * d]);
            c.v.read(conv, r, &mut v[tk * d..(tk + 1) * d]);
        }
        for buf in [&mut *krows, &mut *v] {
            buf[..skip * d].fill(0.0);
            buf[len * d..].fill(0.0);
        }
        conv.transpose_tile(krows, d, kt);
        kq[..mq * TILE_KV].fill(0.0);
        conv.gemm_acc(kq, q, kt, mq, d, TILE_KV);
        for (qi, row) in kq[..mq * TILE_KV].chunks_exact_mut(TILE_KV).enumerate() {
            let qp = qp0 + qi / g;
            let fv = first_visible(qp, seq.window);
            let tile_max = conv.scale_mask_max(row, c.scale, t0, (fv, qp));
            if tile_max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let acc = &mut out[qi * d..(qi + 1) * d];
            let m_new = m[qi].max(tile_max);
            if m_new > m[qi] {
                let ms = (m[qi] - m_new).exp();
                acc.iter_mut().for_each(|a| *a *= ms);
                s[qi] *= ms;
            }
            m[qi] = m_new;
            let mut sum = 0.0f64;
            for chunk in row.chunks_exact_mut(16) {
                let mut vals = [0.0f32; 16];
                for (val, x) in vals.iter_mut().zip(chunk.iter_mut()) {
                    *x = super::fused::ggml_expf(*x - m_new);
                    *val = *x;
                }
                sum += reduce_add_16(&vals) as f64;
            }
            s[qi] = (s[qi] as f64 + sum) as f32;
        }
        conv.gemm_acc(out, kq, v, mq, TILE_KV, d);
    }
    for (acc, &sum) in out[..mq * d].chunks_exact_mut(d).zip(&s[..mq]) {
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        acc.iter_mut().for_each(|a| *a *= inv);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::paged::{KvDtype, PagedLayerStore};
    use proptest::prelude::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn r16(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }

    fn fill16(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
        (0..n)
            .map(|_| r16(rng.random_range(-range..range)))
            .collect()
    }

    /// One sequence's data: token-major `q: [n_q, n_head, d]` and `k`, `v: [t, n_kv, d]`.
    struct SeqData {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        n_q: usize,
        t: usize,
    }

    /// One sequence per `(queries, past positions)` shape, with f16-valued Q, K and V drawn
    /// from [-2, 2).
    fn random_seqs(
        rng: &mut StdRng,
        shapes: &[(usize, usize)],
        n_head: usize,
        n_kv: usize,
        d: usize,
    ) -> Vec<SeqData> {
        shapes
            .iter()
            .map(|&(n_q, past)| SeqData {
                q: fill16(rng, n_q * n_head * d, 2.0),
                k: fill16(rng, (past + n_q) * n_kv * d, 2.0),
                v: fill16(rng, (past + n_q) * n_kv * d, 2.0),
                n_q,
                t: past + n_q,
            })
            .collect()
    }

    /// Stores every sequence's K/V through its own block table, drawn from a shuffled pool
    /// (the blocks of one sequence are scattered and out of order). Blocks that no query sees
    /// are released (`u32::MAX`) in the returned tables.
    fn build(
        rng: &mut StdRng,
        dtype: KvDtype,
        block_size: usize,
        n_kv: usize,
        d: usize,
        data: &[SeqData],
        windows: &[Option<usize>],
    ) -> (Arc<PagedLayerStore>, Vec<SeqAttn>) {
        let need: Vec<usize> = data.iter().map(|s| s.t.div_ceil(block_size)).collect();
        let total: usize = need.iter().sum::<usize>() + 3;
        let mut pool: Vec<u32> = (0..total as u32).collect();
        pool.shuffle(rng);
        let mut store = PagedLayerStore::new(dtype, total, block_size, n_kv, d).unwrap();
        let mut seqs = Vec::new();
        let mut q_start = 0;
        for ((s, &n), &window) in data.iter().zip(&need).zip(windows) {
            let mut table: Vec<u32> = pool.drain(..n).collect();
            for p in 0..s.t {
                let (block, slot) = (table[p / block_size] as usize, p % block_size);
                let row = &s.k[p * n_kv * d..(p + 1) * n_kv * d];
                let vrow = &s.v[p * n_kv * d..(p + 1) * n_kv * d];
                store.write(block, slot, row, vrow).unwrap();
            }
            let seq = SeqAttn {
                q_start,
                n_q: s.n_q,
                n_past: s.t - s.n_q,
                block_table: Arc::from(&[][..]),
                window,
                path_rows: s.n_q,
            };
            let first = seq.visible_keys().start / block_size;
            table[..first].fill(u32::MAX);
            seqs.push(SeqAttn {
                block_table: table.into(),
                ..seq
            });
            q_start += s.n_q;
        }
        (Arc::new(store), seqs)
    }

    /// The best build's result, after checking that the AVX-512 build without AVX512-FP16,
    /// the AVX2 build and the portable one give the same bits.
    fn run_all_builds(
        q: &[f32],
        n_rows: usize,
        n_head: usize,
        d: usize,
        attn: &PagedAttention,
    ) -> Vec<f32> {
        let got = paged_attention(q, n_rows, n_head, d, attn).unwrap();
        for path in [Path::Portable, Path::Avx2, Path::Avx512] {
            let other = paged_attention_with(q, n_rows, n_head, d, attn, path).unwrap();
            assert!(
                got.iter()
                    .zip(&other)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path:?} and the best build differ"
            );
        }
        got
    }

    fn concat_q(data: &[SeqData]) -> Vec<f32> {
        data.iter().flat_map(|s| s.q.iter().copied()).collect()
    }

    /// `ggml_compute_forward_flash_attn_ext_tiled` for one query vector over a sequence's
    /// keys `0..t` (cell = position), transcribed from the C without its shortcuts: every
    /// tile from key 0, all-masked ones included (their weights zeroed, then accumulated).
    fn ggml_tiled_one(
        q: &[f32],
        keys: &[&[f32]],
        vals: &[&[f32]],
        qp: usize,
        window: Option<usize>,
        scale: f32,
    ) -> Vec<f32> {
        let d = q.len();
        let t = keys.len();
        let fv = first_visible(qp, window);
        let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
        let mut vkq = vec![0.0f32; d];
        for ic in (0..t).step_by(TILE_KV) {
            let kv_tile = TILE_KV.min(t - ic);
            let mut kq = [f32::NEG_INFINITY; TILE_KV];
            for (tk, x) in kq.iter_mut().enumerate().take(kv_tile) {
                let mut acc = 0.0f32;
                for dk in 0..d {
                    acc = keys[ic + tk][dk].mul_add(q[dk], acc);
                }
                let p = ic + tk;
                let mask = if p >= fv && p <= qp {
                    0.0
                } else {
                    f32::NEG_INFINITY
                };
                *x = acc * scale + mask;
            }
            let tile_max = kq
                .iter()
                .fold(f32::NEG_INFINITY, |mx, &x| if mx > x { mx } else { x });
            if tile_max == f32::NEG_INFINITY {
                kq = [0.0; TILE_KV];
            } else {
                let m_new = m.max(tile_max);
                if m_new > m {
                    let ms = (m - m_new).exp();
                    vkq.iter_mut().for_each(|a| *a *= ms);
                    s *= ms;
                }
                m = m_new;
                let mut sum = 0.0f64;
                for chunk in kq.chunks_exact_mut(16) {
                    chunk
                        .iter_mut()
                        .for_each(|x| *x = crate::cpu::fused::ggml_expf(*x - m_new));
                    sum += reduce_add_16(&<[f32; 16]>::try_from(&*chunk).unwrap()) as f64;
                }
                s = (s as f64 + sum) as f32;
            }
            for (dv, a) in vkq.iter_mut().enumerate() {
                for (tk, &w) in kq.iter().enumerate() {
                    let x = if tk < kv_tile { vals[ic + tk][dv] } else { 0.0 };
                    *a = x.mul_add(w, *a);
                }
            }
        }
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        vkq.iter().map(|a| a * inv).collect()
    }

    /// The AVX-512 scale, mask and maximum give the scalar fold's scores and maximum at every
    /// row length from 1 to 70 (whole vectors and tails), with visible ranges that start,
    /// end or vanish anywhere in a vector.
    #[test]
    fn scale_mask_max_builds_agree() {
        #[cfg(target_arch = "x86_64")]
        {
            if !is_x86_feature_detected!("avx512f") {
                eprintln!("skipped: no AVX-512 F");
                return;
            }
            let mut rng = StdRng::seed_from_u64(0x3a5c);
            for len in 1..=70 {
                for _ in 0..20 {
                    let row: Vec<f32> = (0..len).map(|_| rng.random_range(-50.0..50.0)).collect();
                    let t0 = rng.random_range(0..200);
                    let fv = rng.random_range(0..t0 + len + 20);
                    let qp = rng.random_range(0..t0 + len + 20);
                    let scale = rng.random_range(0.01..1.0f32);
                    let (mut want, mut got) = (row.clone(), row.clone());
                    let m0 = scale_mask_max(&mut want, scale, t0, (fv, qp), f32::NEG_INFINITY);
                    // SAFETY: the CPU has AVX-512 F (checked above).
                    let m1 = unsafe { scale_mask_max_avx512(&mut got, scale, t0, (fv, qp)) };
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "len {len} t0 {t0} fv {fv} qp {qp}");
                    assert_eq!(m1, m0, "len {len} t0 {t0} fv {fv} qp {qp}");
                }
            }
        }
    }

    /// `TILE_Q` queries or more (f16 and f32 caches, windows or not, several sequences in one
    /// batch): every row is llama.cpp's tiled path bit for bit, and the AVX-512, AVX2 and
    /// portable builds agree.
    #[test]
    fn tiled_path_is_llama_cpp_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(7);
        for case in 0..18 {
            let n_kv = rng.random_range(1..=3);
            let group = rng.random_range(1..=4);
            let n_head = n_kv * group;
            // 8: no whole vectors; 80: a 16-column tail after 32-column blocks.
            let d = [8, 32, 64, 80, 96, 256][case % 6];
            let block_size = [1, 4, 16, 32][(case / 4 + case) % 4];
            let dtype = if case % 3 == 2 {
                KvDtype::F32
            } else {
                KvDtype::F16
            };
            let shapes = [
                (
                    rng.random_range(TILE_Q..TILE_Q + 40),
                    rng.random_range(0..150),
                ),
                (TILE_Q, rng.random_range(0..300)),
                (
                    rng.random_range(TILE_Q..TILE_Q + 9),
                    rng.random_range(0..30),
                ),
            ];
            let windows: [Option<usize>; 3] = if case % 2 == 1 {
                [
                    Some(rng.random_range(1..100)),
                    None,
                    Some(rng.random_range(60..200)),
                ]
            } else {
                [None; 3]
            };
            let mut data = random_seqs(&mut rng, &shapes, n_head, n_kv, d);
            // Q off the f16 grid: this path multiplies it in f32 (rounding it, as the one-row
            // path does, changed every row past the first).
            for s in &mut data {
                s.q.iter_mut().for_each(|x| *x *= 1.37);
            }
            let (store, seqs) = build(&mut rng, dtype, block_size, n_kv, d, &data, &windows);
            let scale = 1.0 / (d as f32).sqrt();
            let n_rows: usize = data.iter().map(|s| s.n_q).sum();
            let attn = PagedAttention {
                store,
                seqs: seqs.into(),
                scale,
            };
            let q = concat_q(&data);
            let got = run_all_builds(&q, n_rows, n_head, d, &attn);
            let mut row = 0;
            for (s, &window) in data.iter().zip(&windows) {
                for i in 0..s.n_q {
                    let qp = s.t - s.n_q + i;
                    for h in 0..n_head {
                        let kvh = h / group;
                        let at = |p: usize| (p * n_kv + kvh) * d;
                        let keys: Vec<&[f32]> = (0..s.t).map(|p| &s.k[at(p)..at(p) + d]).collect();
                        let vals: Vec<&[f32]> = (0..s.t).map(|p| &s.v[at(p)..at(p) + d]).collect();
                        let qv = &s.q[(i * n_head + h) * d..(i * n_head + h + 1) * d];
                        let want = ggml_tiled_one(qv, &keys, &vals, qp, window, scale);
                        let o = ((row + i) * n_head + h) * d;
                        for (j, (a, b)) in got[o..o + d].iter().zip(&want).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "case {case} {dtype} d {d} row {i} head {h} [{j}]: {a} vs {b}"
                            );
                        }
                    }
                }
                row += s.n_q;
            }
        }
    }

    /// ggml's `ggml_vec_dot_f16` as its AVX-512 build computes it, transcribed from the C:
    /// `GGML_F16_DOT_*` = four `__m512` FMA accumulators over 64-element steps, folded by
    /// `GGML_F32x16_REDUCE` (`x[0] + x[2]`, `x[1] + x[3]`, then those two, then
    /// `_mm512_reduce_add_ps`), leftovers added in double.
    fn ggml_vec_dot_f16(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len();
        let np = n & !63;
        let mut sum = [[0.0f32; 16]; 4];
        let mut i = 0;
        while i < np {
            for (j, acc) in sum.iter_mut().enumerate() {
                for (l, a) in acc.iter_mut().enumerate() {
                    let at = i + j * 16 + l;
                    *a = x[at].mul_add(y[at], *a);
                }
            }
            i += 64;
        }
        let mut x0 = [0.0f32; 16];
        for l in 0..16 {
            let a = sum[0][l] + sum[2][l];
            let b = sum[1][l] + sum[3][l];
            x0[l] = a + b;
        }
        // GCC's __MM512_REDUCE_OP(+).
        let t3: Vec<f32> = (0..8).map(|l| x0[8 + l] + x0[l]).collect();
        let t6: Vec<f32> = (0..4).map(|l| t3[4 + l] + t3[l]).collect();
        let t8 = [t6[0] + t6[2], t6[1] + t6[3]];
        let mut sumf = (t8[0] + t8[1]) as f64;
        for i in np..n {
            sumf += (x[i] * y[i]) as f64;
        }
        sumf as f32
    }

    /// `x * v + y` rounded once to f16, by brute force: the nearer of the two f16 values
    /// around the exact f64 result (ties to the even one).
    fn fma_f16_reference(x: f32, v: f32, y: f32) -> f32 {
        let exact = x as f64 * v as f64 + y as f64;
        let lo = half::f16::from_f32(exact as f32);
        let candidates = [
            lo,
            f16::from_bits(lo.to_bits().wrapping_add(1)),
            f16::from_bits(lo.to_bits().wrapping_sub(1)),
        ];
        let mut best = lo;
        for c in candidates {
            let (dc, db) = ((c.to_f64() - exact).abs(), (best.to_f64() - exact).abs());
            if dc < db || (dc == db && c.to_bits() & 1 == 0) {
                best = c;
            }
        }
        best.to_f32()
    }

    /// `ggml_compute_forward_flash_attn_ext_f16_one_chunk` for one query head over dense f16
    /// K/V rows, transcribed from the C (f16 `VKQ16`, FMAs where GCC contracts them), as built
    /// for AVX512-FP16: `ggml_vec_mad_f16` / `ggml_vec_scale_f16` work on the first
    /// `d & !127` values in f16 arithmetic with the factor rounded to f16, the rest in f32.
    fn ggml_one_chunk(q: &[f32], keys: &[&[f32]], vals: &[&[f32]], scale: f32) -> Vec<f32> {
        let (vkq16, _, s_sum) = ggml_one_chunk_partial(q, keys, vals, scale);
        let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
        vkq16.iter().map(|&y| y * inv).collect()
    }

    /// `ggml_compute_forward_flash_attn_ext_f16_one_chunk` before its final division, as its
    /// split-KV path writes it: the unnormalized V sums, the max `M` and the sum `S`.
    fn ggml_one_chunk_partial(
        q: &[f32],
        keys: &[&[f32]],
        vals: &[&[f32]],
        scale: f32,
    ) -> (Vec<f32>, f32, f32) {
        let q: Vec<f32> = q.iter().map(|&x| r16(x)).collect();
        let np = q.len() & !127;
        let mut vkq16 = vec![0.0f32; q.len()];
        let (mut s_sum, mut m) = (0.0f32, f32::NEG_INFINITY);
        for (k, v) in keys.iter().zip(vals) {
            let s = ggml_vec_dot_f16(k, &q) * scale;
            let m_old = m;
            let (mut ms, mut vs) = (1.0f32, 1.0f32);
            if s > m {
                m = s;
                ms = (m_old - m).exp();
                for (i, y) in vkq16.iter_mut().enumerate() {
                    *y = if i < np {
                        r16(*y * r16(ms))
                    } else {
                        r16(*y * ms)
                    };
                }
            } else {
                vs = (s - m).exp();
            }
            for (i, (y, &x)) in vkq16.iter_mut().zip(v.iter()).enumerate() {
                *y = if i < np {
                    fma_f16_reference(x, r16(vs), *y)
                } else {
                    r16(x.mul_add(vs, *y))
                };
            }
            s_sum = s_sum.mul_add(ms, vs);
        }
        (vkq16, m, s_sum)
    }

    /// llama.cpp's split-KV decode for one query at `qp` seeing keys `first..=qp` (`keys`,
    /// `vals`): `n_kv` = `qp + 1` padded to 256, two threads' chunks of `n_kv / 2` cells, each
    /// a one-row partial, merged as `ggml_flash_attn_ext_reduce_partials` (with GCC's FMAs).
    fn ggml_split_kv(
        q: &[f32],
        first: usize,
        qp: usize,
        keys: &[&[f32]],
        vals: &[&[f32]],
        scale: f32,
    ) -> Vec<f32> {
        let n_kv = (qp + 1).div_ceil(256) * 256;
        let chunk = n_kv.div_ceil(2);
        let mut vkq = vec![0.0f32; q.len()];
        let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
        for c in 0..2 {
            let cells = c * chunk..(c + 1) * chunk;
            let idx: Vec<usize> = (first..=qp).filter(|p| cells.contains(p)).collect();
            let ks: Vec<&[f32]> = idx.iter().map(|&p| keys[p - first]).collect();
            let vs: Vec<&[f32]> = idx.iter().map(|&p| vals[p - first]).collect();
            let (vc, mc, sc) = ggml_one_chunk_partial(q, &ks, &vs, scale);
            if sc == 0.0 {
                continue;
            }
            let m_new = m.max(mc);
            let (so, sn) = ((m - m_new).exp(), (mc - m_new).exp());
            for (y, &x) in vkq.iter_mut().zip(&vc) {
                *y = y.mul_add(so, x * sn);
            }
            s = s.mul_add(so, sc * sn);
            m = m_new;
        }
        if s != 0.0 {
            let inv = 1.0 / s;
            vkq.iter_mut().for_each(|y| *y *= inv);
        }
        vkq
    }

    /// Runs `data` (with `windows`) through an f16 cache of `block_size`-token blocks on every
    /// build, and checks every head of every row against the transcription of the path
    /// llama.cpp takes for it: split-KV for one query past 256 cells, else the one-row path
    /// (every sequence here has fewer than `TILE_Q` queries).
    fn check_one_query_paths(
        rng: &mut StdRng,
        case: usize,
        data: &[SeqData],
        windows: &[Option<usize>],
        block_size: usize,
        (n_head, n_kv, d): (usize, usize, usize),
    ) {
        let (store, seqs) = build(rng, KvDtype::F16, block_size, n_kv, d, data, windows);
        let scale = 1.0 / (d as f32).sqrt();
        let n_rows: usize = data.iter().map(|s| s.n_q).sum();
        let attn = PagedAttention {
            store,
            seqs: seqs.into(),
            scale,
        };
        let got = run_all_builds(&concat_q(data), n_rows, n_head, d, &attn);
        let group = n_head / n_kv;
        let mut row = 0;
        for (s, &window) in data.iter().zip(windows) {
            for i in 0..s.n_q {
                let qp = s.t - s.n_q + i;
                let first = window.map_or(0, |w| (qp + 1).saturating_sub(w));
                for h in 0..n_head {
                    let kvh = h / group;
                    let at = |x: &'_ [f32], p: usize| -> Vec<f32> {
                        x[(p * n_kv + kvh) * d..(p * n_kv + kvh + 1) * d].to_vec()
                    };
                    let ks: Vec<Vec<f32>> = (first..=qp).map(|p| at(&s.k, p)).collect();
                    let vs: Vec<Vec<f32>> = (first..=qp).map(|p| at(&s.v, p)).collect();
                    let kr: Vec<&[f32]> = ks.iter().map(|v| v.as_slice()).collect();
                    let vr: Vec<&[f32]> = vs.iter().map(|v| v.as_slice()).collect();
                    let qh = &s.q[(i * n_head + h) * d..(i * n_head + h + 1) * d];
                    let want = if s.n_q == 1 && qp >= 256 {
                        ggml_split_kv(qh, first, qp, &kr, &vr, scale)
                    } else {
                        ggml_one_chunk(qh, &kr, &vr, scale)
                    };
                    let o = ((row + i) * n_head + h) * d;
                    for (x, (a, b)) in got[o..o + d].iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "case {case} past {} d {d} row {i} head {h} [{x}]: {a} vs {b}",
                            s.t - s.n_q
                        );
                    }
                }
            }
            row += s.n_q;
        }
    }

    /// One query over 257+ cells (so 512+ padded) with an f16 or f32 cache: llama.cpp's
    /// split-KV path bit for bit, across the 256/257 and 512/513 boundaries where the chunks
    /// move, with windows that empty the first chunk, GQA groups and several head dims,
    /// beside sequences of the other paths; the builds agree.
    #[test]
    fn split_kv_path_is_llama_cpp_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(0x5917);
        for case in 0..12 {
            let n_kv = rng.random_range(1..=2);
            let group = rng.random_range(1..=4);
            let n_head = n_kv * group;
            let d = [64, 256, 8, 96, 128][case % 5];
            let block_size = [16, 32, 7][case % 3];
            let past = [255, 256, 300, 511, 512, 700][case % 6];
            let shapes = [(1, past), (3, 20), (1, rng.random_range(257..600))];
            let windows = [None, None, Some(rng.random_range(1..400))];
            let data = random_seqs(&mut rng, &shapes, n_head, n_kv, d);
            check_one_query_paths(
                &mut rng,
                case,
                &data,
                &windows,
                block_size,
                (n_head, n_kv, d),
            );
        }
    }

    /// The f16 rounding of f64 values is correct (one rounding, ties to even), over random
    /// values and every f16 midpoint, where rounding through f32 would go wrong.
    #[test]
    fn f64_to_f16_rounds_once() {
        let mut rng = StdRng::seed_from_u64(0xF16);
        for bits in 0u16..0x7bff {
            let (a, b) = (f16::from_bits(bits), f16::from_bits(bits + 1));
            let mid = (a.to_f64() + b.to_f64()) / 2.0;
            let even = if bits & 1 == 0 { a } else { b };
            for (x, want) in [(mid, even), (mid + mid * 1e-12, b), (mid - mid * 1e-12, a)] {
                assert_eq!(f64_to_f16_value(x), want.to_f32(), "{x:e}");
                assert_eq!(f64_to_f16_value(-x), -want.to_f32(), "-{x:e}");
            }
        }
        for _ in 0..100_000 {
            let (x, v, y) = (
                r16(rng.random_range(-300.0..300.0f32)),
                r16(rng.random_range(0.0..1.0f32)),
                r16(rng.random_range(-3000.0..3000.0f32)),
            );
            assert_eq!(f16_fma(x, v, y), fma_f16_reference(x, v, y), "{x} {v} {y}");
        }
        assert_eq!(f64_to_f16_value(65520.0), f32::INFINITY);
        assert_eq!(f64_to_f16_value(65519.9), 65504.0);
    }

    /// The F16C versions of the f16 accumulator updates give the scalar ones' bits, on random
    /// values and on exact ties between two f16 values (`a + quantum / 2`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_f16_updates_match_scalar() {
        let Some(conv) = F16c::detect() else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(0xF16A);
        for round in 0..2000 {
            let n = rng.random_range(0..40);
            let v = if round % 2 == 0 {
                0.5
            } else {
                r16(rng.random_range(0.0..1.0f32))
            };
            let mut acc: Vec<f32> = (0..n)
                .map(|_| r16(rng.random_range(-3000.0..3000.0f32)))
                .collect();
            let x: Vec<f32> = acc
                .iter()
                .map(|&a| {
                    if round % 2 == 0 {
                        // The quantum of `a`, so that `x * 0.5 + a` is a tie.
                        let e = (a.abs().max(6.1e-5).log2().floor() as i32).max(-14);
                        2f32.powi(e - 10) * if rng.random_bool(0.5) { 1.0 } else { -1.0 }
                    } else {
                        r16(rng.random_range(-300.0..300.0f32))
                    }
                })
                .collect();
            let mut want = acc.clone();
            Portable.f16_fma(&mut want, &x, v);
            let mut got = acc.clone();
            conv.f16_fma(&mut got, &x, v);
            assert_eq!(
                got.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                "fma, v = {v}"
            );
            let mut want = acc.clone();
            Portable.f16_scale(&mut want, v);
            conv.f16_scale(&mut acc, v);
            assert_eq!(acc, want, "scale, v = {v}");
        }
        // Edge cases, eight lanes at once: a sum just below an f16 midpoint that f32 would
        // round onto it (1025.4999995: 1025, where rounding through f32 gives 1026), overflow,
        // zeros of both signs, f16 subnormals, exact results.
        let x = [
            1.0 + 2f32.powi(-10),
            65504.0,
            -65504.0,
            0.0,
            -0.0,
            2f32.powi(-24),
            -1.0,
            -(1.0 + 2f32.powi(-10)),
        ];
        let acc = [
            1025.0,
            65504.0,
            -65504.0,
            0.0,
            -0.0,
            2f32.powi(-24),
            1.0,
            -1025.0,
        ];
        for v in [1023.0 / 2048.0, 1.0, 0.0, 0.5] {
            let mut want = acc;
            Portable.f16_fma(&mut want, &x, v);
            let mut got = acc;
            conv.f16_fma(&mut got, &x, v);
            assert_eq!(
                got.map(f32::to_bits),
                want.map(f32::to_bits),
                "edge cases, v = {v}"
            );
            if v == 1023.0 / 2048.0 {
                assert_eq!((got[0], got[7]), (1025.0, -1025.0));
            }
        }
    }

    /// Fewer than `TILE_Q` queries with an f16 cache: every head's output is llama.cpp's
    /// one-row path bit for bit, with several sequences in one batch, GQA groups, any block
    /// size and sliding windows; the AVX-512, AVX2 and portable builds agree.
    #[test]
    fn one_row_path_is_llama_cpp_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(0xF1A5);
        for case in 0..16 {
            let n_kv = rng.random_range(1..=3);
            let group = rng.random_range(1..=3);
            let n_head = n_kv * group;
            let d = [8, 64, 96, 256][case % 4];
            let block_size = [1, 4, 16, 32][(case / 4 + case) % 4];
            let shapes = [
                (rng.random_range(1..TILE_Q), rng.random_range(0..150)),
                // One query over at most 256 cells: past that it takes the split-KV path.
                (1, rng.random_range(0..256)),
                (rng.random_range(2..9), rng.random_range(0..40)),
            ];
            let windows = [None, Some(rng.random_range(1..60)), None];
            let mut data = random_seqs(&mut rng, &shapes, n_head, n_kv, d);
            for s in &mut data {
                s.q.iter_mut().for_each(|x| *x *= 1.37);
            }
            check_one_query_paths(
                &mut rng,
                case,
                &data,
                &windows,
                block_size,
                (n_head, n_kv, d),
            );
        }
    }

    /// Naive f64 attention over the stored (rounded / dequantized) K and V.
    fn naive(q: &[f32], n_head: usize, attn: &PagedAttention, n_rows: usize) -> Vec<f64> {
        let s = &*attn.store;
        let (d, bs) = (s.head_dim(), s.block_size());
        let group = n_head / s.n_kv();
        let mut out = vec![0.0f64; n_rows * n_head * d];
        let (mut k, mut v) = (vec![0.0f32; d], vec![0.0f32; d]);
        for seq in attn.seqs.iter() {
            for i in 0..seq.n_q {
                let (row, qp) = (seq.q_start + i, seq.n_past + i);
                let keys = first_visible(qp, seq.window)..qp + 1;
                for h in 0..n_head {
                    let qrow = &q[(row * n_head + h) * d..(row * n_head + h + 1) * d];
                    let mut scores = Vec::new();
                    let mut vals = Vec::new();
                    for p in keys.clone() {
                        let block = seq.block_table[p / bs] as usize;
                        s.k_row_f32(block, h / group, p % bs, &mut k).unwrap();
                        s.v_row_f32(block, h / group, p % bs, &mut v).unwrap();
                        let dot: f64 = qrow
                            .iter()
                            .zip(&k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        scores.push(dot * attn.scale as f64);
                        vals.push(v.clone());
                    }
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = w.iter().sum();
                    let o = &mut out[(row * n_head + h) * d..(row * n_head + h + 1) * d];
                    for (wj, vj) in w.iter().zip(&vals) {
                        for (o, &x) in o.iter_mut().zip(vj) {
                            *o += wj * x as f64 / z;
                        }
                    }
                }
            }
        }
        out
    }

    /// Absolute tolerance against the f64 reference (outputs are convex combinations of V
    /// values in [-1, 1], so absolute error is the right measure; largest errors seen over
    /// 1500 random cases in brackets):
    /// - f32 / q8_0 (both paths) and the tiled f16 path: f32 arithmetic on exactly the
    ///   reference's inputs, f32 rounding of scores, exps and sums over at most ~270 keys
    ///   [8e-7]: 1e-5.
    /// - f16 one-row path: the V sum is rounded to f16 (half an ulp is 2^-12 relative) after
    ///   every key, a random walk over up to ~270 roundings [2.9e-3]: 1e-2 (the dense kernel's
    ///   own test allows 2e-2).
    fn tolerance(dtype: KvDtype, n_q: usize) -> f64 {
        if dtype == KvDtype::F16 && n_q < TILE_Q {
            1e-2
        } else {
            1e-5
        }
    }

    fn check_against_naive(
        seed: u64,
        dtype: KvDtype,
        n_kv: usize,
        group: usize,
        d: usize,
        block_size: usize,
        seqs: &[(usize, usize, Option<usize>)],
    ) -> Result<(), TestCaseError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n_head = n_kv * group;
        let data: Vec<SeqData> = seqs
            .iter()
            .map(|&(past, n_q, _)| SeqData {
                q: fill16(&mut rng, n_q * n_head * d, 2.0),
                k: fill16(&mut rng, (past + n_q) * n_kv * d, 2.0),
                v: fill16(&mut rng, (past + n_q) * n_kv * d, 1.0),
                n_q,
                t: past + n_q,
            })
            .collect();
        let windows: Vec<Option<usize>> = seqs.iter().map(|s| s.2).collect();
        let (store, seqs) = build(&mut rng, dtype, block_size, n_kv, d, &data, &windows);
        let n_rows: usize = data.iter().map(|s| s.n_q).sum();
        let attn = PagedAttention {
            store,
            seqs: seqs.into(),
            scale: 1.0 / (d as f32).sqrt(),
        };
        let q = concat_q(&data);
        let got = run_all_builds(&q, n_rows, n_head, d, &attn);
        let want = naive(&q, n_head, &attn, n_rows);
        let w = n_head * d;
        for seq in attn.seqs.iter() {
            let tol = tolerance(dtype, seq.n_q);
            for i in seq.q_start * w..(seq.q_start + seq.n_q) * w {
                let err = (got[i] as f64 - want[i]).abs();
                prop_assert!(
                    err <= tol,
                    "{dtype} {seq:?} [{i}]: {} vs {} (err {err:e})",
                    got[i],
                    want[i]
                );
            }
        }
        Ok(())
    }

    fn shape_strategy() -> impl Strategy<Value = (KvDtype, usize)> {
        prop_oneof![
            (
                Just(KvDtype::F32),
                prop::sample::select(vec![8, 16, 32, 64, 96])
            ),
            (
                Just(KvDtype::F16),
                prop::sample::select(vec![8, 16, 32, 64, 96])
            ),
            (Just(KvDtype::Q8_0), prop::sample::select(vec![32, 64, 96])),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        #[test]
        fn matches_naive_attention(
            seed in any::<u64>(),
            (dtype, d) in shape_strategy(),
            n_kv in 1usize..=4,
            group in 1usize..=4,
            block_size in prop::sample::select(vec![1usize, 4, 16, 32]),
            seqs in prop::collection::vec(
                (
                    0usize..200,
                    prop_oneof![3 => 1usize..8, 1 => TILE_Q..TILE_Q + 8],
                    prop::option::of(1usize..200),
                ),
                1..4,
            ),
        ) {
            check_against_naive(seed, dtype, n_kv, group, d, block_size, &seqs)?;
        }
    }

    /// The AVX-512 one-row kernel for 64-, 128- and 256-wide f16 heads gives the generic
    /// builds' bits for every group size it has a build for, windows, ragged tiles, and scores
    /// spread far enough (scale up to 40) that many softmax weights take libm's underflow path.
    #[test]
    fn one_row_x86_kernel_matches_generic_builds() {
        let mut rng = StdRng::seed_from_u64(0xD64);
        for (case, d) in (0..24).flat_map(|c| [64, 128, 256].map(|d| (c, d))) {
            let group = 1 + case % 8;
            let n_kv = rng.random_range(1..=2);
            let n_head = n_kv * group;
            let block_size = [1, 16, 32][case % 3];
            let scale = [0.125, 3.0, 40.0][(case / 8) % 3];
            // The last is one query over more than 256 cells: the split-KV path, whose chunks
            // store unnormalized sums (`partial`).
            let shapes = [
                (1, rng.random_range(0..200)),
                (rng.random_range(2..12), rng.random_range(0..70)),
                (1, rng.random_range(60..140)),
                (1, rng.random_range(300..700)),
            ];
            let windows = [None, None, Some(rng.random_range(1..80)), None];
            let data = random_seqs(&mut rng, &shapes, n_head, n_kv, d);
            let (store, seqs) = build(&mut rng, KvDtype::F16, block_size, n_kv, d, &data, &windows);
            let attn = PagedAttention {
                store,
                seqs: seqs.into(),
                scale,
            };
            let n_rows: usize = data.iter().map(|s| s.n_q).sum();
            let got = run_all_builds(&concat_q(&data), n_rows, n_head, d, &attn);
            assert!(got.iter().all(|x| x.is_finite()), "case {case} d {d}");
        }
    }

    /// Rows outside every sequence are zero; a window of 1 attends to the query's own key.
    #[test]
    fn gaps_and_window_of_one() {
        let mut rng = StdRng::seed_from_u64(11);
        let (n_kv, d, bs) = (1, 8, 4);
        let data = [SeqData {
            q: fill16(&mut rng, 2 * d, 1.0),
            k: fill16(&mut rng, 9 * d, 1.0),
            v: fill16(&mut rng, 9 * d, 1.0),
            n_q: 2,
            t: 9,
        }];
        let (store, mut seqs) = build(&mut rng, KvDtype::F32, bs, n_kv, d, &data, &[Some(1)]);
        seqs[0].q_start = 1;
        let attn = PagedAttention {
            store,
            seqs: seqs.into(),
            scale: 0.5,
        };
        let mut q = vec![0.0f32; 4 * d];
        q[d..3 * d].copy_from_slice(&data[0].q);
        let got = paged_attention(&q, 4, 1, d, &attn).unwrap();
        assert!(got[..d].iter().chain(&got[3 * d..]).all(|&x| x == 0.0));
        assert_eq!(&got[d..2 * d], &data[0].v[7 * d..8 * d]);
        assert_eq!(&got[2 * d..3 * d], &data[0].v[8 * d..9 * d]);
        // A wrong q length is an error, not a panic.
        assert!(matches!(
            paged_attention(&q[1..], 4, 1, d, &attn),
            Err(PagedError::Length { what: "q", .. })
        ));
    }
}
