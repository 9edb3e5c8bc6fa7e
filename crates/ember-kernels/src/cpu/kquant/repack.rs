//! Q4_K, Q5_K and Q6_K weights repacked once, at load, for decode's one-row kernels on
//! AVX-512 VNNI (as llama.cpp's CPU_REPACK does for its Q4_K kernels).
//!
//! The per-row dots (`super::x86`) decode every block's 6-bit scales and mins in scalar code
//! and reduce each block's products across a vector, row after row: at decode that work, not
//! memory, kept them at 82-86% of the bandwidth limit. Here, per group of sixteen rows and per
//! 256-value block, the blocks' 4-byte words are transposed: word `t` of the sixteen rows fills
//! line `t` of the block (lane `l` = row `l`). Every row then has its `d`/`dmin`, its scale
//! words and its quants in its own 32-bit lane, so sixteen rows are decoded and summed at once
//! (four products per lane and instruction against four broadcast activations) with no
//! horizontal reduction. The bytes are the packed ones, moved: the copy is as large (the last
//! group padded to sixteen rows; Q6_K's 210-byte blocks to 53 words, 1% more). Prompt
//! batches build their tiles from the lines (`super::tile::KTile::load_repacked`), and
//! [`Repacked::unpack_group`] gives the packed rows back where a kernel needs them (Q6_K
//! batches that mix folds, dequantization), so the mapping's pages are not read again after
//! the copy. The arithmetic is the per-row
//! kernels' (exact integer sums, then the same float steps per row), so every result keeps
//! its bits (tested against them).

use ember_quant::{GgmlType, QK_K};
use rayon::prelude::*;

use super::Q8K;
pub(super) use crate::cpu::q8::Line;
use crate::cpu::q8::{GroupLayout, Isa, isa, repack_groups};

/// Rows per group: one per 32-bit lane of a 512-bit vector.
pub const GROUP_ROWS: usize = 16;

/// A Q4_K, Q5_K or Q6_K matrix's rows repacked for this CPU's decode kernel (see the module docs).
pub struct Repacked {
    ty: GgmlType,
    rows: usize,
    /// 256-value blocks a row.
    nb: usize,
    /// 4-byte words (lines) a block: Q4_K 36, Q5_K 44, Q6_K 53 (the last half padding).
    words: usize,
    q: crate::cpu::q8::Lines,
}

impl std::fmt::Debug for Repacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Repacked({} {}x{}, {} bytes)",
            self.ty,
            self.rows,
            self.nb * QK_K,
            self.bytes()
        )
    }
}

impl Repacked {
    /// Repacks `rows` rows of `ty` blocks (`bytes`, row-major, `k` values a row) for this CPU's
    /// decode kernel; `None` where the per-row kernels read the packed blocks best: a CPU
    /// without AVX-512 VNNI, a type other than Q4_K, Q5_K and Q6_K, or an empty matrix.
    ///
    /// Panics if `bytes` is not `rows` whole rows of `k` values (a [`crate::QuantMatrix`] has
    /// checked that).
    pub fn new(ty: GgmlType, bytes: &[u8], rows: usize, k: usize) -> Option<Self> {
        Self::build(isa(), ty, bytes, rows, k, &|_| {})
    }

    /// [`Repacked::new`] for kernels compiled for `isa` (`None` unless it is a supported
    /// AVX-512 VNNI).
    pub fn new_with(isa: Isa, ty: GgmlType, bytes: &[u8], rows: usize, k: usize) -> Option<Self> {
        Self::build(isa, ty, bytes, rows, k, &|_| {})
    }

    /// [`Repacked::new`], calling `release` with each range of `bytes` once it is repacked (a
    /// few MiB at a time, in order), so that a caller can let a mapping's pages go while the
    /// copy grows. Not called where nothing is repacked.
    pub fn new_releasing(
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        k: usize,
        release: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Option<Self> {
        Self::build(isa(), ty, bytes, rows, k, release)
    }

    fn build(
        isa: Isa,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        k: usize,
        release: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Option<Self> {
        if isa != Isa::Avx512Vnni || !isa.supported() || rows == 0 || k == 0 {
            return None;
        }
        if !matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
            return None;
        }
        assert!(k.is_multiple_of(QK_K), "partial block");
        let (nb, block) = (k / QK_K, ty.type_size());
        let row_bytes = nb * block;
        assert_eq!(
            Some(bytes.len()),
            row_bytes.checked_mul(rows),
            "not whole rows"
        );
        let words = block.div_ceil(4);
        let layout = GroupLayout {
            groups: rows.div_ceil(GROUP_ROWS),
            rows_per_group: GROUP_ROWS,
            row_bytes,
            // Line `t` of a block: word `t` of its sixteen rows.
            q: nb * words,
            s: 0,
        };
        let (q, _) = repack_groups(&layout, rows, release, |g: usize, lines, _| {
            let first = g * GROUP_ROWS;
            // Each lane's row (lanes past the last row repeat it; their results are never
            // stored).
            let rows16: [&[u8]; GROUP_ROWS] = std::array::from_fn(|l| {
                let r = (first + l).min(rows - 1);
                &bytes[r * row_bytes..(r + 1) * row_bytes]
            });
            // SAFETY: a supported AVX-512 VNNI ISA was checked above (it implies F/BW);
            // `lines` holds the group's `nb` blocks of `words` lines and every row `nb`
            // blocks of `block` bytes.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::transpose_in(&rows16, nb, block, lines)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (rows16, lines);
                unreachable!("no repacked K-quants off x86-64")
            }
        });
        Some(Repacked {
            ty,
            rows,
            nb,
            words,
            q,
        })
    }

    /// The block type the rows came from.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values a row.
    pub fn cols(&self) -> usize {
        self.nb * QK_K
    }

    /// Groups of [`GROUP_ROWS`] rows (the last may hold fewer).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP_ROWS)
    }

    /// Rows of group `g`.
    pub fn group_rows(&self, g: usize) -> usize {
        assert!(g < self.groups(), "group {g} past the matrix");
        GROUP_ROWS.min(self.rows - g * GROUP_ROWS)
    }

    /// Bytes the repacked copy holds in memory.
    pub fn bytes(&self) -> usize {
        self.q.len() * size_of::<Line>()
    }

    /// Group `g`'s lines: its blocks' words, one row a lane (see the module docs).
    pub(super) fn group(&self, g: usize) -> &[Line] {
        let n = self.nb * self.words;
        &self.q[g * n..(g + 1) * n]
    }

    /// Writes group `g`'s rows, as packed blocks, to `out` (exactly [`group_rows`] rows): for
    /// the kernels that read packed rows.
    ///
    /// [`group_rows`]: Self::group_rows
    pub fn unpack_group(&self, g: usize, out: &mut [u8]) {
        let n = self.group_rows(g);
        let block = self.ty.type_size();
        let row_bytes = self.nb * block;
        assert_eq!(out.len(), n * row_bytes, "not the group's rows");
        let mut rows: Vec<&mut [u8]> = out.chunks_exact_mut(row_bytes).collect();
        // SAFETY: a `Repacked` exists only where the CPU supports AVX-512 F/BW (`build`); the
        // group holds `nb` blocks of `words` lines and each of the `n` rows `nb` blocks.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::transpose_out(self.group(g), self.nb, block, &mut rows)
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = rows;
            unreachable!("no repacked K-quants off x86-64")
        }
    }

    /// Rows `start..start + out.len() / cols` dequantized into `out` (whole rows), read from
    /// this copy: the blocks' mapped pages may have been let go when it was made. Panics if
    /// `out` is not whole rows inside the matrix.
    pub fn dequantize_rows_into(&self, start: usize, out: &mut [f32]) {
        let k = self.cols();
        let n = out.len() / k;
        assert!(
            n * k == out.len() && start + n <= self.rows,
            "rows past the matrix"
        );
        let row_bytes = self.nb * self.ty.type_size();
        // `out` split at group boundaries: (group, its first row here, those rows' values).
        let mut parts = Vec::new();
        let (mut rest, mut r) = (out, start);
        while !rest.is_empty() {
            let g = r / GROUP_ROWS;
            let end = ((g + 1) * GROUP_ROWS).min(start + n);
            let (here, after) = rest.split_at_mut((end - r) * k);
            parts.push((g, r, here));
            (rest, r) = (after, end);
        }
        parts.into_par_iter().for_each(|(g, r0, dst)| {
            let mut rows = vec![0u8; self.group_rows(g) * row_bytes];
            self.unpack_group(g, &mut rows);
            let first = r0 - g * GROUP_ROWS;
            for (row, d) in rows[first * row_bytes..]
                .chunks_exact(row_bytes)
                .zip(dst.chunks_exact_mut(k))
            {
                // Whole rows of a type ember-quant dequantizes: this cannot fail.
                let _ = ember_quant::dequantize(self.ty, row, d);
            }
        });
    }

    /// Whether [`Repacked::dot`] computes activation row `i` of `acts`: Q5_K always; Q4_K
    /// where llama.cpp takes its gemv (see [`Q8K::q4k_pairs`]); Q6_K where it takes its per-row
    /// dot (see [`Q8K::q6k_tiled`]).
    pub fn dots(&self, acts: &Q8K, i: usize) -> bool {
        self.dots_shape(acts.shape(i))
    }

    /// [`Repacked::dots`] for a row of shape `(m, i)` ([`super::row_shape`]), which needs no
    /// quantized activations.
    pub fn dots_shape(&self, shape: (usize, usize)) -> bool {
        match self.ty {
            GgmlType::Q4_K => !super::q4k_pairs_at(shape),
            GgmlType::Q6_K => !super::q6k_tiled_at(shape),
            _ => true,
        }
    }

    /// `out[l]` = dot of row `16g + l` with activation row `i` of `acts`, for the group's rows:
    /// bit for bit what [`super::dot_rows`] gives on the packed rows. Panics unless
    /// [`Repacked::dots`] says it computes that row, or if the sizes disagree.
    pub fn dot(&self, g: usize, acts: &Q8K, i: usize, out: &mut [f32]) {
        assert!(
            self.dots(acts, i),
            "batch-shaped folds take the packed kernels"
        );
        let n = self.group_rows(g);
        assert!(
            out.len() == n && acts.k == self.cols() && i < acts.rows(),
            "bad sizes"
        );
        let nb = self.nb;
        let qs = &acts.qs[i * acts.k..(i + 1) * acts.k];
        let d = &acts.d[i * nb..(i + 1) * nb];
        let bsums = &acts.bsums[i * nb * 16..(i + 1) * nb * 16];
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a `Repacked` exists only where the CPU supports AVX2, FMA, F16C and
            // AVX-512 F/BW/VL/VNNI (`build`); the kernel checks the sizes it relies on.
            let all = unsafe {
                let lines = self.group(g);
                match self.ty {
                    GgmlType::Q4_K => {
                        super::x86::avx512::repacked_dot::<false>(lines, nb, qs, d, bsums)
                    }
                    GgmlType::Q5_K => {
                        super::x86::avx512::repacked_dot::<true>(lines, nb, qs, d, bsums)
                    }
                    _ => super::x86::avx512::repacked_dot_q6k(lines, nb, qs, d, bsums),
                }
            };
            out.copy_from_slice(&all[..n]);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (qs, d, bsums);
            unreachable!("no repacked K-quants off x86-64")
        }
    }
}

/// The 4-byte-word transposition between sixteen rows' blocks and a group's lines, sixteen
/// words of sixteen rows at a time in registers. By hand because no crate transposes across
/// vector lanes; the scalar copy it replaced (sixteen 4-byte moves a line) was part of the
/// repack's cost at load.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{GROUP_ROWS, Line};

    /// `o[j]` lane `i` = `r[i]` lane `j`: a 16 x 16 transpose of 32-bit words (stage one
    /// interleaves words, stage two pairs of words, stages three and four move 128-bit lanes).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
        }
        // `u[4a + e]`, 128-bit lane `k`: rows `4a..4a + 4` of word `4k + e`.
        let mut u = [_mm512_setzero_si512(); 16];
        for a in 0..4 {
            let (t0, t1, t2, t3) = (t[4 * a], t[4 * a + 1], t[4 * a + 2], t[4 * a + 3]);
            u[4 * a] = _mm512_unpacklo_epi64(t0, t2);
            u[4 * a + 1] = _mm512_unpackhi_epi64(t0, t2);
            u[4 * a + 2] = _mm512_unpacklo_epi64(t1, t3);
            u[4 * a + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        // Word `4k + e` takes lane `k` of `u[e]`, `u[4 + e]`, `u[8 + e]`, `u[12 + e]`.
        let mut o = [_mm512_setzero_si512(); 16];
        for e in 0..4 {
            let (a, b, c, d) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
            let v0 = _mm512_shuffle_i32x4::<0x44>(a, b);
            let v1 = _mm512_shuffle_i32x4::<0xEE>(a, b);
            let v2 = _mm512_shuffle_i32x4::<0x44>(c, d);
            let v3 = _mm512_shuffle_i32x4::<0xEE>(c, d);
            o[e] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            o[4 + e] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
            o[8 + e] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            o[12 + e] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
        }
        o
    }

    /// The byte mask of the first `len` bytes (all 64 from 64 up).
    fn first_bytes(len: usize) -> u64 {
        if len >= 64 { !0 } else { (1u64 << len) - 1 }
    }

    /// Fills a group's `lines` (`nb` blocks of `block.div_ceil(4)` lines) from its sixteen
    /// rows: word `t` of block `b` of row `l` to lane `l` of line `t` of block `b`; a last
    /// partial word is zero-padded.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW; each row holds `nb` blocks of `block` bytes and
    /// `lines` `nb` blocks of lines.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn transpose_in(
        rows: &[&[u8]; GROUP_ROWS],
        nb: usize,
        block: usize,
        lines: &mut [Line],
    ) {
        let words = block.div_ceil(4);
        assert!(lines.len() == nb * words && rows.iter().all(|r| r.len() >= nb * block));
        for b in 0..nb {
            for t0 in (0..words).step_by(16) {
                let mask = first_bytes(block - 4 * t0);
                // SAFETY: the masked loads read only bytes `4 * t0..block` of block `b`.
                let r = std::array::from_fn(|l| unsafe {
                    _mm512_maskz_loadu_epi8(mask, rows[l][b * block + 4 * t0..].as_ptr().cast())
                });
                // SAFETY: AVX-512 F is enabled here.
                let o = unsafe { transpose(r) };
                for (j, v) in o.iter().enumerate().take(words - t0) {
                    let line = &mut lines[b * words + t0 + j];
                    // SAFETY: a line is 64 bytes, 64-byte aligned.
                    unsafe { _mm512_store_si512(line.0.as_mut_ptr().cast(), *v) };
                }
            }
        }
    }

    /// [`transpose_in`] backwards, for the group's first `rows.len()` rows (1 to 16): each
    /// row's `nb` blocks of `block` bytes from the `lines`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW; `lines` holds `nb` blocks of lines and each row
    /// `nb` blocks of `block` bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn transpose_out(
        lines: &[Line],
        nb: usize,
        block: usize,
        rows: &mut [&mut [u8]],
    ) {
        let words = block.div_ceil(4);
        assert!(lines.len() == nb * words && rows.len() <= GROUP_ROWS);
        assert!(rows.iter().all(|r| r.len() >= nb * block));
        for b in 0..nb {
            for t0 in (0..words).step_by(16) {
                let mask = first_bytes(block - 4 * t0);
                // SAFETY: lines `t0..t0 + 16` of block `b` where they exist (64-byte aligned);
                // the rest, zeros, are masked off below.
                let r = std::array::from_fn(|j| match lines.get(b * words + t0 + j) {
                    Some(line) if t0 + j < words => unsafe {
                        _mm512_load_si512(line.0.as_ptr().cast())
                    },
                    _ => _mm512_setzero_si512(),
                });
                // SAFETY: AVX-512 F is enabled here.
                let o = unsafe { transpose(r) };
                for (row, v) in rows.iter_mut().zip(o) {
                    let at = row[b * block + 4 * t0..].as_mut_ptr();
                    // SAFETY: the masked store writes only bytes `4 * t0..block` of block `b`.
                    unsafe { _mm512_mask_storeu_epi8(at.cast(), mask, v) };
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{SoloRow, dot_rows_with, quantize_q8k};
    use super::*;
    use crate::cpu::q8::RELEASE_STEP;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn avx512() -> bool {
        let ok = Isa::Avx512Vnni.supported();
        if !ok {
            eprintln!("skipped: this CPU has no AVX-512 VNNI, so nothing is repacked");
        }
        ok
    }

    /// `rows` rows of `k` values quantized to `ty`: random scales per row, every fourth row
    /// extreme (the format's largest magnitudes, mixed signs), every fifth all zero. The
    /// repack and tile tests' weights.
    pub(in crate::cpu::kquant) fn weights(
        rng: &mut StdRng,
        ty: GgmlType,
        rows: usize,
        k: usize,
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        for r in 0..rows {
            let w: Vec<f32> = match r % 5 {
                4 => vec![0.0; k],
                3 => (0..k)
                    .map(|j| if j % 3 == 0 { -60.0 } else { 1.0 })
                    .collect(),
                _ => {
                    let scale = rng.random_range(0.001..8.0f32);
                    (0..k).map(|_| rng.random_range(-scale..scale)).collect()
                }
            };
            bytes.extend(ember_quant::quantize(ty, &w).unwrap());
        }
        bytes
    }

    /// `m` activation rows of `k`; the last is constant (every quantized value +-127).
    fn acts(rng: &mut StdRng, m: usize, k: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
        let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        x[(m - 1) * k..].fill(sign * 2.5);
        x
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn repacked_dots_equal_the_per_row_kernels_bit_for_bit() {
        if !avx512() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x4b_2e9a);
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            // A partial group alone; whole groups; whole plus a partial group of one row and
            // of fifteen; one, two, three and ten blocks a row.
            for (rows, k) in [
                (1, 256),
                (15, 512),
                (16, 256),
                (17, 768),
                (33, 2560),
                (47, 256),
            ] {
                let bytes = weights(&mut rng, ty, rows, k);
                let rep = Repacked::new_with(Isa::Avx512Vnni, ty, &bytes, rows, k).expect("rep");
                let row_bytes = k / QK_K * ty.type_size();
                let padded = k / QK_K * ty.type_size().div_ceil(4) * 4;
                assert_eq!(rep.bytes(), padded * rep.groups() * GROUP_ROWS);
                for m in [1usize, 3] {
                    let a = quantize_q8k(&acts(&mut rng, m, k), k);
                    for i in 0..m {
                        let mut want = vec![0.0f32; rows];
                        dot_rows_with(Isa::Scalar, ty, &bytes, &a, i, &mut want);
                        let mut simd = vec![0.0f32; rows];
                        dot_rows_with(Isa::Avx512Vnni, ty, &bytes, &a, i, &mut simd);
                        assert_eq!(bits(&simd), bits(&want), "{ty} {rows}x{k} row {i}");
                        for g in 0..rep.groups() {
                            let n = rep.group_rows(g);
                            let mut got = vec![0.0f32; n];
                            rep.dot(g, &a, i, &mut got);
                            let want = &want[g * GROUP_ROWS..g * GROUP_ROWS + n];
                            assert_eq!(bits(&got), bits(want), "{ty} {rows}x{k} g{g} row {i}");
                        }
                    }
                }
                // The packed rows come back.
                for g in 0..rep.groups() {
                    let n = rep.group_rows(g);
                    let mut out = vec![0u8; n * row_bytes];
                    rep.unpack_group(g, &mut out);
                    let start = g * GROUP_ROWS * row_bytes;
                    assert!(
                        out == bytes[start..start + n * row_bytes],
                        "{ty} unpack g{g}"
                    );
                }
            }
        }
    }

    #[test]
    fn batch_shaped_rows_are_left_to_the_packed_kernels() {
        if !avx512() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        let bytes = weights(&mut rng, GgmlType::Q4_K, 16, 256);
        let rep = Repacked::new(GgmlType::Q4_K, &bytes, 16, 256).unwrap();
        let mut a = quantize_q8k(&acts(&mut rng, 1, 256), 256);
        assert!(rep.dots(&a, 0));
        // A row whose solo batch had four rows takes llama.cpp's gemm fold.
        a.solo = Some(vec![SoloRow { m: 4, i: 0 }].into());
        assert!(!rep.dots(&a, 0));
        let q5 = weights(&mut rng, GgmlType::Q5_K, 16, 256);
        let rep5 = Repacked::new(GgmlType::Q5_K, &q5, 16, 256).unwrap();
        assert!(rep5.dots(&a, 0));
        // Q6_K: a row of a solo batch of 8 or more takes llama.cpp's tiled kernel.
        let q6 = weights(&mut rng, GgmlType::Q6_K, 16, 256);
        let rep6 = Repacked::new(GgmlType::Q6_K, &q6, 16, 256).unwrap();
        assert!(rep6.dots(&a, 0));
        a.solo = Some(vec![SoloRow { m: 8, i: 7 }].into());
        assert!(!rep6.dots(&a, 0) && !rep.dots(&a, 0) && rep5.dots(&a, 0));
    }

    #[test]
    fn only_avx512_and_q4k_q5k_q6k_repack() {
        let bytes = vec![0u8; 144 * 2];
        assert!(Repacked::new_with(Isa::Scalar, GgmlType::Q4_K, &bytes, 2, 256).is_none());
        if Isa::Avx2.supported() {
            assert!(Repacked::new_with(Isa::Avx2, GgmlType::Q4_K, &bytes, 2, 256).is_none());
        }
        if !avx512() {
            return;
        }
        let isa = Isa::Avx512Vnni;
        assert!(Repacked::new_with(isa, GgmlType::Q4_K, &bytes, 2, 256).is_some());
        assert!(Repacked::new_with(isa, GgmlType::Q4_K, &[], 0, 256).is_none());
        let q6k = vec![0u8; 210 * 2];
        assert!(Repacked::new_with(isa, GgmlType::Q6_K, &q6k, 2, 256).is_some());
        let q3k = vec![0u8; 110 * 2];
        assert!(Repacked::new_with(isa, GgmlType::Q3_K, &q3k, 2, 256).is_none());
    }

    #[test]
    fn release_covers_the_source_once_in_order() {
        if !avx512() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(12);
        // Q4_K rows of 8192 values are 4608 bytes: 16 rows are 72 KiB, 56 groups a step.
        let (rows, k) = (1000usize, 8192);
        let bytes = weights(&mut rng, GgmlType::Q4_K, rows, k);
        let seen = std::sync::Mutex::new(Vec::new());
        let rep = Repacked::new_releasing(GgmlType::Q4_K, &bytes, rows, k, &|r| {
            seen.lock().unwrap().push(r)
        })
        .unwrap();
        let seen = seen.into_inner().unwrap();
        assert!(seen.len() > 1, "{seen:?}");
        let mut at = 0;
        for r in &seen {
            assert_eq!(r.start, at, "{seen:?}");
            assert!(r.end > r.start && r.end - r.start <= RELEASE_STEP);
            at = r.end;
        }
        assert_eq!(at, bytes.len());
        let row_bytes = k / QK_K * 144;
        let mut out = vec![0u8; 8 * row_bytes];
        rep.unpack_group(rep.groups() - 1, &mut out);
        assert!(out == bytes[(rows - 8) * row_bytes..]);
    }
}
