//! Batched K-quant matmul on AVX-512 VNNI: sixteen weight rows unpacked once into a [`KTile`]
//! and dotted with every activation row, one weight row per vector lane.
//!
//! The arithmetic is that of `super::scalar` (llama.cpp's): the integer sums per 32-value
//! (Q4_K) or 16-value (Q6_K) sub-block are exact whatever their order, and the float steps
//! per row are the same operations in the same order, only done for sixteen rows at once. So
//! the results equal [`super::dot_rows`]'s bit for bit (tested), at a fraction of the cost:
//! the per-row kernels decode each packed block again for every activation row. Activation
//! rows go four at a time (`ACT_ROWS`), so each tile vector loaded feeds four `vpdpbusd`s.
//!
//! Layout: block `b`'s values for the sixteen rows are stored as groups of four consecutive
//! values per row, `q[((b * 64 + g) * 16 + l) * 4 + e]` = value `4g + e` of row `l` (unsigned:
//! Q4_K 0..15, Q6_K 0..63), so one `vpdpbusd` against four activation values (broadcast) adds
//! four products to every row's lane.

use std::arch::x86_64::*;

use ember_quant::{GgmlType, QK_K};

use super::repack::{Line, Repacked};
use super::x86::avx512::{lane_byte, lane_signed_byte, q4k_lane_scales, q6k_lane_values};
use super::{Q6K_BYTES, Q8K, f16_at, q4k_scales, q45k_bytes};

/// Weight rows per tile (vector lanes).
pub const ROWS: usize = 16;

/// Up to [`ROWS`] Q4_K or Q6_K rows unpacked (lanes past `rows` repeat the last row).
#[derive(Default)]
pub struct KTile {
    /// Weight rows loaded (1 to [`ROWS`]; 0 before the first [`KTile::load`]).
    pub rows: usize,
    nb: usize,
    ty: Option<GgmlType>,
    /// Values, see the module docs.
    q: Vec<u8>,
    /// Per block and sub-block, the sixteen rows' scales (`[b][s][16]`): Q4_K 8 sub-blocks,
    /// Q6_K 16 (signed).
    sc: Vec<i32>,
    /// Q4_K only: per block and pair of sub-blocks `c` (`[b][c][16]`), the sixteen rows' mins
    /// `2c` (low i16) and `2c + 1` (high i16), for one `vpmaddwd` against the activation sums.
    mn: Vec<i32>,
    /// Per block, the sixteen rows' `d` (and Q4_K's `dmin`).
    d: Vec<f32>,
    dmin: Vec<f32>,
}

impl KTile {
    /// Unpacks the `ty` rows in `rows` (1 to 16, each `row_bytes` long).
    pub fn load(&mut self, ty: GgmlType, rows: &[u8], row_bytes: usize) {
        assert!(
            matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K),
            "{ty} has no K-quant tile"
        );
        let n = rows.len() / row_bytes.max(1);
        assert!(
            (1..=ROWS).contains(&n) && n * row_bytes == rows.len(),
            "bad tile rows"
        );
        let bs = ty.type_size();
        assert_eq!(row_bytes % bs, 0, "partial block");
        let nb = row_bytes / bs;
        let subs = if ty == GgmlType::Q4_K { 8 } else { 16 };
        self.rows = n;
        self.nb = nb;
        self.ty = Some(ty);
        self.q.resize(nb * QK_K * ROWS, 0);
        self.sc.resize(nb * subs * ROWS, 0);
        self.mn.resize(nb * 4 * ROWS, 0);
        self.d.resize(nb * ROWS, 0.0);
        self.dmin.resize(nb * ROWS, 0.0);
        let mut vals = [0u8; QK_K];
        for l in 0..ROWS {
            let row = &rows[l.min(n - 1) * row_bytes..][..row_bytes];
            for (b, x) in row.chunks_exact(bs).enumerate() {
                if ty == GgmlType::Q4_K {
                    for c in 0..4 {
                        let q4 = &x[16 + 32 * c..48 + 32 * c];
                        for i in 0..32 {
                            vals[64 * c + i] = q4[i] & 0xF;
                            vals[64 * c + 32 + i] = q4[i] >> 4;
                        }
                    }
                    let (sc, mn) = q4k_scales(&x[4..16]);
                    for (s, &v) in sc.iter().enumerate() {
                        self.sc[(b * 8 + s) * ROWS + l] = v as i32;
                    }
                    for c in 0..4 {
                        self.mn[(b * 4 + c) * ROWS + l] =
                            mn[2 * c] as i32 | (mn[2 * c + 1] as i32) << 16;
                    }
                    self.d[b * ROWS + l] = f16_at(x, 0);
                    self.dmin[b * ROWS + l] = f16_at(x, 2);
                } else {
                    debug_assert_eq!(x.len(), Q6K_BYTES);
                    for h in 0..2 {
                        let (ql, qh) = (&x[64 * h..64 * h + 64], &x[128 + 32 * h..160 + 32 * h]);
                        let v = &mut vals[128 * h..128 * h + 128];
                        for i in 0..32 {
                            v[i] = (ql[i] & 0xF) | ((qh[i] & 3) << 4);
                            v[i + 32] = (ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4);
                            v[i + 64] = (ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4);
                            v[i + 96] = (ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4);
                        }
                    }
                    for s in 0..16 {
                        self.sc[(b * 16 + s) * ROWS + l] = x[192 + s] as i8 as i32;
                    }
                    self.d[b * ROWS + l] = f16_at(x, 208);
                }
                for g in 0..QK_K / 4 {
                    let at = ((b * 64 + g) * ROWS + l) * 4;
                    self.q[at..at + 4].copy_from_slice(&vals[4 * g..4 * g + 4]);
                }
            }
        }
        debug_assert!(q45k_bytes(false) == GgmlType::Q4_K.type_size());
    }

    /// [`KTile::load`] of group `g` of a repacked Q4_K or Q6_K matrix, read from its lines:
    /// the same tile, bit for bit (tested), built with vector code. The repacked layout
    /// already holds a row per lane, so each tile vector is a line or two masked and shifted,
    /// where `load` gathers every value and scale of the sixteen rows in scalar code (which,
    /// with an unpack of the lines back to rows before it, had made Q4_K prompts 5% slower
    /// than before repacking).
    pub fn load_repacked(&mut self, rep: &Repacked, g: usize) {
        let ty = rep.ty();
        assert!(
            matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K),
            "{ty} has no K-quant tile"
        );
        let nb = rep.cols() / QK_K;
        let subs = if ty == GgmlType::Q4_K { 8 } else { 16 };
        self.rows = rep.group_rows(g);
        self.nb = nb;
        self.ty = Some(ty);
        self.q.resize(nb * QK_K * ROWS, 0);
        self.sc.resize(nb * subs * ROWS, 0);
        self.mn.resize(nb * 4 * ROWS, 0);
        self.d.resize(nb * ROWS, 0.0);
        self.dmin.resize(nb * ROWS, 0.0);
        // SAFETY: a `Repacked` exists only where the CPU supports AVX2, FMA, F16C and AVX-512
        // F/BW/VL/VNNI (its `build`); the buffers were sized for `nb` blocks above.
        unsafe { load_lines(self, ty, rep.group(g), nb) }
    }
}

/// [`KTile::load_repacked`]'s body: `lines` holds `nb` blocks of one group's lines.
///
/// # Safety
/// The CPU must support the features enabled below (AVX2, FMA, F16C, AVX-512 F/BW/VL/VNNI);
/// `tile`'s buffers must hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn load_lines(tile: &mut KTile, ty: GgmlType, lines: &[Line], nb: usize) {
    let words = ty.type_size().div_ceil(4);
    assert_eq!(lines.len(), nb * words, "not the group's lines");
    let subs = if ty == GgmlType::Q4_K { 8 } else { 16 };
    assert!(tile.q.len() >= nb * QK_K * ROWS && tile.sc.len() >= nb * subs * ROWS);
    assert!(
        tile.d.len() >= nb * ROWS && tile.dmin.len() >= nb * ROWS && tile.mn.len() >= nb * 4 * ROWS
    );
    let m4 = _mm512_set1_epi8(0xF);
    let byte = _mm512_set1_epi32(0xFF);
    // SAFETY (all below): the lines are 64-byte aligned and indexed inside `lines`; every
    // store lies in the buffers checked above: block `b` of `nb`, 64 value groups, 8 or 16
    // scales and 4 min pairs of 16 lanes each.
    unsafe {
        for (b, block) in lines.chunks_exact(words).enumerate() {
            let line = |t: usize| _mm512_load_si512(block[t].0.as_ptr().cast());
            let q = tile.q.as_mut_ptr().add(b * QK_K * ROWS);
            let put_q = |g: usize, v: __m512i| _mm512_storeu_si512(q.add(g * 64).cast(), v);
            let sc = tile.sc.as_mut_ptr().add(b * subs * ROWS);
            let put_sc = |s: usize, v: __m512i| _mm512_storeu_si512(sc.add(s * ROWS).cast(), v);
            let dm = line(if ty == GgmlType::Q4_K { 0 } else { 52 });
            // `d` is the low half of its word (Q4_K: word 0; Q6_K: word 52, the rest padding),
            // Q4_K's `dmin` the high half of word 0: f16 to f32 is exact.
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
            _mm512_storeu_ps(tile.d.as_mut_ptr().add(b * ROWS), d);
            if ty == GgmlType::Q4_K {
                let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
                _mm512_storeu_ps(tile.dmin.as_mut_ptr().add(b * ROWS), dmin);
                // Nibbles: value group `16c + j` is the low (j < 8) or high nibbles of word
                // `4 + 8c + j % 8`.
                for c in 0..4 {
                    for j in 0..8 {
                        let w = line(4 + 8 * c + j);
                        put_q(16 * c + j, _mm512_and_si512(w, m4));
                        put_q(
                            16 * c + 8 + j,
                            _mm512_and_si512(_mm512_srli_epi16::<4>(w), m4),
                        );
                    }
                }
                let [sc_lo, sc_hi, mn_lo, mn_hi] = q4k_lane_scales(line(1), line(2), line(3));
                for s in 0..8 {
                    put_sc(s, lane_byte(if s < 4 { sc_lo } else { sc_hi }, s % 4));
                }
                // Mins `2c` (low i16) and `2c + 1` (high i16): bytes `2c % 4`, `2c % 4 + 1`.
                let mn = tile.mn.as_mut_ptr().add(b * 4 * ROWS);
                for c in 0..4 {
                    let v = if c < 2 { mn_lo } else { mn_hi };
                    let v = _mm512_srl_epi32(v, _mm_cvtsi32_si128(16 * (c % 2) as i32));
                    let pair = _mm512_or_si512(
                        _mm512_and_si512(v, byte),
                        _mm512_and_si512(_mm512_slli_epi32::<8>(v), _mm512_set1_epi32(0xFF_0000)),
                    );
                    _mm512_storeu_si512(mn.add(c * ROWS).cast(), pair);
                }
            } else {
                debug_assert_eq!(words, 53);
                // Value group `32h + 8q + j`: chunk `q`'s values `4j..4j + 4` of half `h`,
                // from its words `16h + j`, `16h + 8 + j` (nibbles) and `32 + 8h + j` (high
                // bits).
                for h in 0..2 {
                    for j in 0..8 {
                        let (ql0, ql1, qh) =
                            (line(16 * h + j), line(16 * h + 8 + j), line(32 + 8 * h + j));
                        for q in 0..4 {
                            put_q(32 * h + 8 * q + j, q6k_lane_values(ql0, ql1, qh, q));
                        }
                    }
                }
                // Scale `s`: signed byte `s % 4` of word `48 + s / 4`.
                for s in 0..16 {
                    put_sc(s, lane_signed_byte(line(48 + s / 4), s % 4));
                }
            }
        }
    }
}

/// `out[i * tile.rows + l]` = dot of tile row `l` with activation row `i` of `acts`, for the
/// rows `range`; `out` holds `range.len()` rows of `tile.rows`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and FMA.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul(tile: &KTile, acts: &Q8K, range: std::ops::Range<usize>, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        range.len() * tile.rows,
        "out does not match the tile"
    );
    // SAFETY: `out` holds `range.len()` rows of `tile.rows` floats (checked); the CPU
    // features are the caller's.
    unsafe { matmul_to(tile, acts, range, out.as_mut_ptr(), tile.rows) }
}

/// [`matmul`] writing the result for activation row `range.start + i` straight to
/// `out.add(i * ld)` (`tile.rows` floats from there), so that the tasks of one product can
/// fill their columns of a shared row-major output without a copy.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and FMA; for every `i < range.len()`,
/// `out.add(i * ld)` must be valid for writes of `tile.rows` floats that no other thread
/// reads or writes until this returns.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_to(
    tile: &KTile,
    acts: &Q8K,
    range: std::ops::Range<usize>,
    out: *mut f32,
    ld: usize,
) {
    // An empty tile would leave `out` unwritten, which the callers hand on as results.
    let ty = tile.ty.expect("the tile holds no rows");
    let nb = tile.nb;
    let m = acts.rows();
    assert_eq!(acts.k, nb * QK_K, "tile width differs from activations");
    assert!(range.end <= m, "rows past the batch");
    assert!((1..=ROWS).contains(&tile.rows), "tile rows outside a group");
    // The first `tile.rows` lanes of each result (the last group of a matrix can be short).
    let mask: __mmask16 = if tile.rows == ROWS {
        0xffff
    } else {
        (1u16 << tile.rows) - 1
    };
    assert!(
        acts.qs.len() >= m * acts.k
            && acts.d.len() >= m * nb
            && acts.bsums.len() >= m * nb * 16
            && acts.pair_sums.len() >= m * nb * 4
    );
    let subs = if ty == GgmlType::Q4_K { 8 } else { 16 };
    assert!(tile.q.len() >= nb * QK_K * ROWS && tile.sc.len() >= nb * subs * ROWS);
    assert!(
        tile.d.len() >= nb * ROWS && tile.dmin.len() >= nb * ROWS && tile.mn.len() >= nb * 4 * ROWS
    );
    // Activation rows in groups of `ACT_ROWS`, so each tile vector loaded serves several
    // `vpdpbusd`s; a last partial group repeats its last row (results dropped).
    let (start, len) = (range.start, range.len());
    for g0 in (0..len).step_by(ACT_ROWS) {
        let count = ACT_ROWS.min(len - g0);
        let at = |r: usize| start + g0 + r.min(count - 1);
        let xs: [*const i8; ACT_ROWS] = std::array::from_fn(|r| acts.qs[at(r) * acts.k..].as_ptr());
        let da: [*const f32; ACT_ROWS] = std::array::from_fn(|r| acts.d[at(r) * nb..].as_ptr());
        // SAFETY: the buffers were checked above to cover `nb` blocks of sixteen rows (tile)
        // and of these activation rows (`at(r) < m`); the CPU features are this function's.
        let v = unsafe {
            if ty == GgmlType::Q4_K {
                // llama.cpp's repacked Q4_K: gemm (FMA per sub-block pair) for the rows in
                // whole groups of four, gemv (per block) for the rest.
                let pairs: [bool; ACT_ROWS] = std::array::from_fn(|r| acts.q4k_pairs(at(r)));
                let sums: [*const i32; ACT_ROWS] =
                    std::array::from_fn(|r| acts.pair_sums[at(r) * nb * 4..].as_ptr());
                if pairs.iter().all(|&p| p) {
                    q4k_pair_rows(tile, &xs, &da, &sums)
                } else {
                    q4k_rows(tile, &xs, &da, &sums, pairs)
                }
            } else {
                let bsums: [*const i16; ACT_ROWS] =
                    std::array::from_fn(|r| acts.bsums[at(r) * nb * 16..].as_ptr());
                q6k_rows(tile, &xs, &da, &bsums)
            }
        };
        for (r, vr) in v.iter().enumerate().take(count) {
            // SAFETY: row `g0 + r < range.len()` of `out` holds `tile.rows` floats ours to
            // write (the caller's); the mask stores just those.
            unsafe { _mm512_mask_storeu_ps(out.wrapping_add((g0 + r) * ld), mask, *vr) };
        }
    }
}

/// Activation rows dotted together with each tile vector loaded: four `vpdpbusd`s per load
/// instead of one (the tile of a wide matrix lives in L2, not L1). Q4_K's per-row state then
/// slightly exceeds the 32 vector registers (a few block scales spill to L1); eight rows at a
/// time measured no faster.
const ACT_ROWS: usize = 4;

/// The lane sums of values `4 * g0 .. 4 * (g0 + groups)` of block `b`, sixteen rows, for
/// each of the activation rows `xs`.
#[inline(always)]
unsafe fn group_sums<const R: usize>(
    tile: &KTile,
    b: usize,
    g0: usize,
    groups: usize,
    xs: &[*const i8; R],
) -> [__m512i; R] {
    // SAFETY (caller): AVX-512 VNNI; `b` is a block of the tile and each `xs[r]` an
    // activation row.
    unsafe {
        let mut acc = [_mm512_setzero_si512(); R];
        let q = tile.q.as_ptr().add((b * 64 + g0) * ROWS * 4);
        for g in 0..groups {
            let w = _mm512_loadu_si512(q.add(g * ROWS * 4).cast());
            for (r, a) in acc.iter_mut().enumerate() {
                let x = std::ptr::read_unaligned(xs[r].add(b * QK_K + 4 * (g0 + g)).cast::<i32>());
                *a = _mm512_dpbusd_epi32(*a, w, _mm512_set1_epi32(x));
            }
        }
        acc
    }
}

/// Activation rows `xs` against the tile's sixteen Q4_K rows (see `super::scalar::dot_q4k`),
/// each with its own fold (`pairs`).
#[inline(always)]
unsafe fn q4k_rows<const R: usize>(
    tile: &KTile,
    xs: &[*const i8; R],
    da: &[*const f32; R],
    pair_sums: &[*const i32; R],
    pairs: [bool; R],
) -> [__m512; R] {
    // SAFETY (caller): AVX-512 F/VNNI and FMA; buffers checked by `matmul`.
    unsafe {
        let (mut acc, mut acc_min) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        for b in 0..tile.nb {
            let wd = _mm512_loadu_ps(tile.d.as_ptr().add(b * ROWS));
            let wmin = _mm512_loadu_ps(tile.dmin.as_ptr().add(b * ROWS));
            // Loops, not `array::from_fn`: a closure does not inherit this code's target
            // features, so intrinsics inside one need not inline (see `q8::x86`).
            let (mut dd, mut dmin) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            for r in 0..R {
                let da = _mm512_set1_ps(*da[r].add(b));
                dd[r] = _mm512_mul_ps(wd, da);
                dmin[r] = _mm512_mul_ps(wmin, da);
            }
            let (mut isum, mut imin) = ([_mm512_setzero_si512(); R], [_mm512_setzero_si512(); R]);
            for c in 0..4 {
                let mut s = group_sums(tile, b, 16 * c, 8, xs);
                let sc = tile.sc.as_ptr().add((b * 8 + 2 * c) * ROWS);
                let sc_lo = _mm512_loadu_si512(sc.cast());
                let sc_hi = _mm512_loadu_si512(sc.add(ROWS).cast());
                for v in &mut s {
                    *v = _mm512_mullo_epi32(sc_lo, *v);
                }
                let hi = group_sums(tile, b, 16 * c + 8, 8, xs);
                let mn = _mm512_loadu_si512(tile.mn.as_ptr().add((b * 4 + c) * ROWS).cast());
                for r in 0..R {
                    let s = _mm512_add_epi32(s[r], _mm512_mullo_epi32(sc_hi, hi[r]));
                    // Mins 0..63 and sums of 32 activations (|.| <= 4064) are exact i16
                    // pairs; `vpmaddwd` adds their products exactly in i32.
                    let b2 = _mm512_set1_epi32(*pair_sums[r].add(b * 4 + c));
                    let mi = _mm512_madd_epi16(mn, b2);
                    if pairs[r] {
                        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd[r], acc[r]);
                        acc_min[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mi), dmin[r], acc_min[r]);
                    } else {
                        isum[r] = _mm512_add_epi32(isum[r], s);
                        imin[r] = _mm512_add_epi32(imin[r], mi);
                    }
                }
            }
            for r in 0..R {
                if !pairs[r] {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), dd[r], acc[r]);
                    acc_min[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[r]), dmin[r], acc_min[r]);
                }
            }
        }
        for r in 0..R {
            acc[r] = _mm512_sub_ps(acc[r], acc_min[r]);
        }
        acc
    }
}

/// [`q4k_rows`] where every activation row takes the gemm (all `pairs`), the case of every
/// prompt row but a ragged last few: a sub-block pair's `sc_lo * lo + sc_hi * hi` is formed in
/// float instead of with two `vpmulld`s (two uops each, ten cycles' latency) and converted
/// once. That is exact, so the same bits: `|lo|, |hi| <= 32 * 15 * 128 = 61440` and scales
/// `<= 63`, so every product and their sum (`<= 7.8e6 < 2^24`) is an integer a float holds
/// exactly, and the one rounding `fma` does is of an exact value. Without the per-block
/// integer sums of the gemv rows, the per-row state fits the 32 vector registers (the mixed
/// kernel spills a few to the stack).
#[inline(always)]
unsafe fn q4k_pair_rows<const R: usize>(
    tile: &KTile,
    xs: &[*const i8; R],
    da: &[*const f32; R],
    pair_sums: &[*const i32; R],
) -> [__m512; R] {
    // SAFETY (caller): AVX-512 F/VNNI and FMA; buffers checked by `matmul`.
    unsafe {
        let (mut acc, mut acc_min) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        for b in 0..tile.nb {
            let wd = _mm512_loadu_ps(tile.d.as_ptr().add(b * ROWS));
            let wmin = _mm512_loadu_ps(tile.dmin.as_ptr().add(b * ROWS));
            let (mut dd, mut dmin) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            for r in 0..R {
                let da = _mm512_set1_ps(*da[r].add(b));
                dd[r] = _mm512_mul_ps(wd, da);
                dmin[r] = _mm512_mul_ps(wmin, da);
            }
            for c in 0..4 {
                let sc = tile.sc.as_ptr().add((b * 8 + 2 * c) * ROWS);
                let sc_lo = _mm512_cvtepi32_ps(_mm512_loadu_si512(sc.cast()));
                let sc_hi = _mm512_cvtepi32_ps(_mm512_loadu_si512(sc.add(ROWS).cast()));
                let mut s = [_mm512_setzero_ps(); R];
                for (f, v) in s.iter_mut().zip(group_sums(tile, b, 16 * c, 8, xs)) {
                    *f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), sc_lo);
                }
                let hi = group_sums(tile, b, 16 * c + 8, 8, xs);
                let mn = _mm512_loadu_si512(tile.mn.as_ptr().add((b * 4 + c) * ROWS).cast());
                for r in 0..R {
                    let s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[r]), sc_hi, s[r]);
                    let b2 = _mm512_set1_epi32(*pair_sums[r].add(b * 4 + c));
                    let mi = _mm512_madd_epi16(mn, b2);
                    acc[r] = _mm512_fmadd_ps(s, dd[r], acc[r]);
                    acc_min[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mi), dmin[r], acc_min[r]);
                }
            }
        }
        for r in 0..R {
            acc[r] = _mm512_sub_ps(acc[r], acc_min[r]);
        }
        acc
    }
}

/// Activation rows `xs` against the tile's sixteen Q6_K rows, with llama.cpp's tiled-kernel
/// combination (`fma(isum * dw, da, sum)` per block; see `super::scalar::dot_q6k`).
#[inline(always)]
unsafe fn q6k_rows<const R: usize>(
    tile: &KTile,
    xs: &[*const i8; R],
    da: &[*const f32; R],
    bsums: &[*const i16; R],
) -> [__m512; R] {
    // SAFETY (caller): AVX-512 F/VNNI and FMA; buffers checked by `matmul`.
    unsafe {
        let mut sum = [_mm512_setzero_ps(); R];
        for b in 0..tile.nb {
            let mut s = [_mm512_setzero_si512(); R];
            for k in 0..16 {
                let raw = group_sums(tile, b, 4 * k, 4, xs);
                let sc = _mm512_loadu_si512(tile.sc.as_ptr().add((b * 16 + k) * ROWS).cast());
                for r in 0..R {
                    let off = _mm512_set1_epi32(32 * *bsums[r].add(b * 16 + k) as i32);
                    s[r] = _mm512_add_epi32(
                        s[r],
                        _mm512_mullo_epi32(sc, _mm512_sub_epi32(raw[r], off)),
                    );
                }
            }
            let dw = _mm512_loadu_ps(tile.d.as_ptr().add(b * ROWS));
            for r in 0..R {
                sum[r] = _mm512_fmadd_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(s[r]), dw),
                    _mm512_set1_ps(*da[r].add(b)),
                    sum[r],
                );
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kquant::repack::tests::weights;
    use crate::cpu::kquant::{dot_rows_with, quantize_q8k};
    use crate::cpu::q8::Isa;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// A tile read from a repacked group equals the tile of the group's packed rows, field by
    /// field, for whole and partial groups (lanes past the last row repeat it in both), one
    /// to ten blocks a row, random, extreme and all-zero rows.
    #[test]
    fn repacked_tiles_equal_packed_tiles() {
        if !Isa::Avx512Vnni.supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x7e_11);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            for (rows, k) in [(1, 256), (15, 512), (16, 256), (17, 768), (47, 2560)] {
                let bytes = weights(&mut rng, ty, rows, k);
                let rep = Repacked::new_with(Isa::Avx512Vnni, ty, &bytes, rows, k).unwrap();
                let row_bytes = k / QK_K * ty.type_size();
                let (mut want, mut got) = (KTile::default(), KTile::default());
                for g in 0..rep.groups() {
                    let n = rep.group_rows(g);
                    let start = g * ROWS * row_bytes;
                    want.load(ty, &bytes[start..start + n * row_bytes], row_bytes);
                    got.load_repacked(&rep, g);
                    let at = format!("{ty} {rows}x{k} g{g}");
                    assert_eq!(
                        (got.rows, got.nb, got.ty),
                        (want.rows, want.nb, want.ty),
                        "{at}"
                    );
                    assert!(got.q == want.q, "{at}: values");
                    assert!(got.sc == want.sc, "{at}: scales");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got.d), bits(&want.d), "{at}: d");
                    if ty == GgmlType::Q4_K {
                        assert!(got.mn == want.mn, "{at}: mins");
                        assert_eq!(bits(&got.dmin), bits(&want.dmin), "{at}: dmin");
                    }
                }
            }
        }
    }

    #[test]
    fn q4k_gemm_rows_are_exact_at_the_largest_sums() {
        // Every nibble 15 and every scale and min 63 (all bits set), against activations that
        // quantize to -127 throughout (a row of equal values; Q8_K's range is +-127) and to
        // one -127 then +127 per block (a leading maximum, then its negation): the largest
        // negative and positive sub-block sums the float scale path of `q4k_pair_rows` must
        // hold exactly (60960 and 7.7e6 in magnitude). Every third weight row has all scales
        // and mins zero, where that path's sum is -0.0 for negative sums (the integer path's
        // +0.0): the results must still be the same bits.
        if !Isa::Avx512Vnni.supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let ty = GgmlType::Q4_K;
        let (n, k) = (16, 2 * QK_K);
        let row_bytes = k / QK_K * ty.type_size();
        let mut w = vec![0xffu8; n * row_bytes];
        for (r, row) in w.chunks_exact_mut(row_bytes).enumerate() {
            for (b, block) in row.chunks_exact_mut(ty.type_size()).enumerate() {
                // d from 1.0 up, varied per row and block; dmin = 1.0 (f16).
                let d = half::f16::from_f32(1.0 + (r * 2 + b) as f32 / 64.0).to_le_bytes();
                block[..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
                if r % 3 == 2 {
                    block[4..16].fill(0);
                }
            }
        }
        let m = 8;
        let x: Vec<f32> = (0..m * k)
            .map(|i| match ((i / k) % 2, i % QK_K) {
                (0, _) | (_, 0) => 1.0,
                _ => -1.0,
            })
            .collect();
        let acts = quantize_q8k(&x, k);
        assert!(
            acts.qs[..k].iter().all(|&q| q == -127),
            "the extreme activations"
        );
        assert!(
            (1..k).all(|j| acts.qs[k + j] == if j % QK_K == 0 { -127 } else { 127 }),
            "the extreme positive activations"
        );
        let mut tile = KTile::default();
        tile.load(ty, &w, row_bytes);
        let mut out = vec![0.0f32; m * n];
        // SAFETY: the CPU supports AVX-512 VNNI (checked above) and FMA with it.
        unsafe { matmul(&tile, &acts, 0..m, &mut out) };
        for i in 0..m {
            assert!(acts.q4k_pairs(i), "row {i} takes the gemm");
            let mut want = vec![0.0f32; n];
            dot_rows_with(Isa::Scalar, ty, &w, &acts, i, &mut want);
            for j in 0..n {
                assert_eq!(out[i * n + j].to_bits(), want[j].to_bits(), "({i}, {j})");
            }
        }
    }

    /// Any range of activation rows, grouped in fours from its start (partial last groups,
    /// gemm and gemv Q4_K rows in one group), gives the scalar row dots' bits.
    #[test]
    fn row_ranges_match_row_dots() {
        if !Isa::Avx512Vnni.supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x711e);
        // Rows 0..8 take Q4_K's gemm fold, 8..11 its gemv fold; Q6_K is tiled from 8 rows.
        let (n, k, m) = (13, 768, 11);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let w = ember_quant::quantize(ty, &wf).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
            let acts = quantize_q8k(&x, k);
            let mut tile = KTile::default();
            tile.load(ty, &w, k / QK_K * ty.type_size());
            for range in [0..11, 3..10, 5..6, 6..11, 8..11] {
                let mut out = vec![0.0f32; range.len() * n];
                // SAFETY: the CPU supports AVX-512 VNNI (checked above) and FMA with it.
                unsafe { matmul(&tile, &acts, range.clone(), &mut out) };
                for (o, i) in range.clone().enumerate() {
                    let mut want = vec![0.0f32; n];
                    dot_rows_with(Isa::Scalar, ty, &w, &acts, i, &mut want);
                    for j in 0..n {
                        assert_eq!(
                            out[o * n + j].to_bits(),
                            want[j].to_bits(),
                            "{ty} rows {range:?}: ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    /// `matmul_to` into a wider output (2 columns before the tile's, 3 after, every row) writes
    /// `matmul`'s bits into the tile's columns and nothing else: partial groups of 1 and 15
    /// rows, a whole group, 1 to 5 activation rows.
    #[test]
    fn matmul_to_writes_only_its_columns() {
        if !Isa::Avx512Vnni.supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x70_c0);
        let sentinel = f32::from_bits(0x7fc0_dead);
        let k = 512;
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            for n in [1usize, 15, 16] {
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let w = ember_quant::quantize(ty, &wf).unwrap();
                let mut tile = KTile::default();
                tile.load(ty, &w, k / QK_K * ty.type_size());
                for m in [1usize, 2, 3, 5] {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                    let acts = quantize_q8k(&x, k);
                    let mut want = vec![0.0f32; m * n];
                    // SAFETY: the CPU supports AVX-512 VNNI (checked above) and FMA with it.
                    unsafe { matmul(&tile, &acts, 0..m, &mut want) };
                    let ld = n + 5;
                    let mut wide = vec![sentinel; m * ld];
                    // SAFETY: as above; row `i`'s columns 2..2 + n of `wide` lie inside it.
                    unsafe { matmul_to(&tile, &acts, 0..m, wide.as_mut_ptr().add(2), ld) };
                    for (i, row) in wide.chunks_exact(ld).enumerate() {
                        for (j, v) in row.iter().enumerate() {
                            let expect = if (2..2 + n).contains(&j) {
                                want[i * n + j - 2]
                            } else {
                                sentinel
                            };
                            assert_eq!(
                                v.to_bits(),
                                expect.to_bits(),
                                "{ty} n={n} m={m} ({i}, {j})"
                            );
                        }
                    }
                }
            }
        }
    }
}
