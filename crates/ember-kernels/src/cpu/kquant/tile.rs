//! Batched K-quant matmul on AVX-512 VNNI: sixteen weight rows unpacked once into a [`KTile`]
//! and dotted with every activation row, one weight row per vector lane.
//!
//! The arithmetic is that of `super::scalar` (llama.cpp's): the integer sums per 32-value
//! (Q4_K) or 16-value (Q6_K) sub-block are exact whatever their order, and the float steps
//! per row are the same operations in the same order, only done for sixteen rows at once. So
//! the results equal [`super::dot_rows`]'s bit for bit (tested), at a fraction of the cost:
//! the per-row kernels decode each packed block again for every activation row.
//!
//! Layout: block `b`'s values for the sixteen rows are stored as groups of four consecutive
//! values per row, `q[((b * 64 + g) * 16 + l) * 4 + e]` = value `4g + e` of row `l` (unsigned:
//! Q4_K 0..15, Q6_K 0..63), so one `vpdpbusd` against four activation values (broadcast) adds
//! four products to every row's lane.

use std::arch::x86_64::*;

use ember_quant::{GgmlType, QK_K};

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
    /// Q4_K only: the sixteen rows' mins, as `sc`.
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
        self.mn.resize(nb * subs * ROWS, 0);
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
                    for s in 0..8 {
                        self.sc[(b * 8 + s) * ROWS + l] = sc[s] as i32;
                        self.mn[(b * 8 + s) * ROWS + l] = mn[s] as i32;
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
}

/// `out[i * tile.rows + l]` = dot of tile row `l` with activation row `i` of `acts`, for the
/// rows `range`; `out` holds `range.len()` rows of `tile.rows`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and FMA.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul(tile: &KTile, acts: &Q8K, range: std::ops::Range<usize>, out: &mut [f32]) {
    let Some(ty) = tile.ty else { return };
    let nb = tile.nb;
    let m = acts.rows();
    assert_eq!(acts.k, nb * QK_K, "tile width differs from activations");
    assert!(range.end <= m, "rows past the batch");
    assert_eq!(
        out.len(),
        range.len() * tile.rows,
        "out does not match the tile"
    );
    assert!(
        acts.qs.len() >= m * acts.k && acts.d.len() >= m * nb && acts.bsums.len() >= m * nb * 16
    );
    let subs = if ty == GgmlType::Q4_K { 8 } else { 16 };
    assert!(tile.q.len() >= nb * QK_K * ROWS && tile.sc.len() >= nb * subs * ROWS);
    assert!(
        tile.d.len() >= nb * ROWS
            && tile.dmin.len() >= nb * ROWS
            && tile.mn.len() >= nb * subs * ROWS
    );
    for (oi, i) in range.enumerate() {
        let x = &acts.qs[i * acts.k..(i + 1) * acts.k];
        let da = &acts.d[i * nb..(i + 1) * nb];
        let bsums = &acts.bsums[i * nb * 16..(i + 1) * nb * 16];
        // SAFETY: the buffers were checked above to cover `nb` blocks of sixteen rows (tile)
        // and of this activation row; the CPU features are this function's.
        let v = unsafe {
            if ty == GgmlType::Q4_K {
                // llama.cpp's repacked Q4_K: gemm (FMA per sub-block pair) for the rows in
                // whole groups of four, gemv (per block) for the rest.
                q4k_row(tile, x, da, bsums, acts.q4k_pairs(i))
            } else {
                q6k_row(tile, x, da, bsums)
            }
        };
        let mut tmp = [0.0f32; ROWS];
        // SAFETY: `tmp` holds sixteen floats.
        unsafe { _mm512_storeu_ps(tmp.as_mut_ptr(), v) };
        out[oi * tile.rows..(oi + 1) * tile.rows].copy_from_slice(&tmp[..tile.rows]);
    }
}

/// The lane sums of values `4 * g0 .. 4 * (g0 + groups)` of block `b`, sixteen rows.
#[inline(always)]
unsafe fn group_sums(tile: &KTile, b: usize, g0: usize, groups: usize, x: &[i8]) -> __m512i {
    // SAFETY (caller): AVX-512 VNNI; `b` is a block of the tile and `x` one activation row.
    unsafe {
        let mut acc = _mm512_setzero_si512();
        let q = tile.q.as_ptr().add((b * 64 + g0) * ROWS * 4);
        let xp = x.as_ptr().add(b * QK_K + 4 * g0);
        for g in 0..groups {
            let w = _mm512_loadu_si512(q.add(g * ROWS * 4).cast());
            let a = std::ptr::read_unaligned(xp.add(4 * g).cast::<i32>());
            acc = _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(a));
        }
        acc
    }
}

/// One activation row against the tile's sixteen Q4_K rows (see `super::scalar::dot_q4k`).
#[inline(always)]
unsafe fn q4k_row(tile: &KTile, x: &[i8], da: &[f32], bsums: &[i16], pairs: bool) -> __m512 {
    // SAFETY (caller): AVX-512 F/VNNI and FMA; buffers checked by `matmul`.
    unsafe {
        let (mut acc, mut acc_min) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..tile.nb {
            let dd = _mm512_mul_ps(
                _mm512_loadu_ps(tile.d.as_ptr().add(b * ROWS)),
                _mm512_set1_ps(da[b]),
            );
            let dmin = _mm512_mul_ps(
                _mm512_loadu_ps(tile.dmin.as_ptr().add(b * ROWS)),
                _mm512_set1_ps(da[b]),
            );
            let bs = &bsums[b * 16..b * 16 + 16];
            let (mut isum, mut imin) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in 0..4 {
                let lo = group_sums(tile, b, 16 * c, 8, x);
                let hi = group_sums(tile, b, 16 * c + 8, 8, x);
                let sc =
                    |s: usize| _mm512_loadu_si512(tile.sc.as_ptr().add((b * 8 + s) * ROWS).cast());
                let mn =
                    |s: usize| _mm512_loadu_si512(tile.mn.as_ptr().add((b * 8 + s) * ROWS).cast());
                let s = _mm512_add_epi32(
                    _mm512_mullo_epi32(sc(2 * c), lo),
                    _mm512_mullo_epi32(sc(2 * c + 1), hi),
                );
                let b_lo = bs[4 * c] as i32 + bs[4 * c + 1] as i32;
                let b_hi = bs[4 * c + 2] as i32 + bs[4 * c + 3] as i32;
                let mi = _mm512_add_epi32(
                    _mm512_mullo_epi32(mn(2 * c), _mm512_set1_epi32(b_lo)),
                    _mm512_mullo_epi32(mn(2 * c + 1), _mm512_set1_epi32(b_hi)),
                );
                if pairs {
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd, acc);
                    acc_min = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mi), dmin, acc_min);
                } else {
                    isum = _mm512_add_epi32(isum, s);
                    imin = _mm512_add_epi32(imin, mi);
                }
            }
            if !pairs {
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dd, acc);
                acc_min = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin), dmin, acc_min);
            }
        }
        _mm512_sub_ps(acc, acc_min)
    }
}

/// One activation row against the tile's sixteen Q6_K rows, with llama.cpp's tiled-kernel
/// combination (`fma(isum * dw, da, sum)` per block; see `super::scalar::dot_q6k`).
#[inline(always)]
unsafe fn q6k_row(tile: &KTile, x: &[i8], da: &[f32], bsums: &[i16]) -> __m512 {
    // SAFETY (caller): AVX-512 F/VNNI and FMA; buffers checked by `matmul`.
    unsafe {
        let mut sum = _mm512_setzero_ps();
        for b in 0..tile.nb {
            let mut s = _mm512_setzero_si512();
            for k in 0..16 {
                let raw = group_sums(tile, b, 4 * k, 4, x);
                let off = _mm512_set1_epi32(32 * bsums[b * 16 + k] as i32);
                let sc = _mm512_loadu_si512(tile.sc.as_ptr().add((b * 16 + k) * ROWS).cast());
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(sc, _mm512_sub_epi32(raw, off)));
            }
            let dw = _mm512_loadu_ps(tile.d.as_ptr().add(b * ROWS));
            sum = _mm512_fmadd_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(s), dw),
                _mm512_set1_ps(da[b]),
                sum,
            );
        }
        sum
    }
}
