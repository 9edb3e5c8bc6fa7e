//! Weights repacked once, at load, into the layout the AVX-512 VNNI kernels compute per call
//! from the packed blocks (as llama.cpp's CPU_REPACK buffers do for its kernels).
//!
//! The packed-block kernel lays sixteen weight rows across a vector's lanes by transposing
//! each block in registers (24 `vpermt2d` for Q8_0 and Q5_x, a quarter of that for Q4_0 and
//! Q4_1) and gathering the sixteen scales: on one activation row that shuffling, not memory,
//! bounded decode. Here it is done once: per group of sixteen rows and per block, the
//! transposed vectors (Q8_0) or transposed nibbles (Q4_x, Q5_x: still half a byte a value),
//! then (Q5_x) the sixteen rows' 32-bit high-bit masks side by side, then the sixteen f16
//! scales (and offsets). The arithmetic is the packed kernel's, on
//! the same vectors, so every result keeps its bits (tested against the packed and the
//! portable kernels).
//!
//! It costs a copy: the repacked bytes equal the packed ones, and the caller may let the
//! mapping's pages go (`ember_formats::SharedBytes::release`).

use ember_quant::GgmlType;
use rayon::prelude::*;

use super::{BLOCK, Batch, Isa, TILE_ROWS, Tile, isa};

/// Source bytes repacked between two calls of a `new_releasing`'s `release` (this module's
/// and `kquant::Repacked`'s).
pub(crate) const RELEASE_STEP: usize = 4 << 20;

/// A 64-byte-aligned line of repacked values: one vector load each, never split across
/// cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

// SAFETY: a line is 64 bytes with no padding; all zeros (any bytes) is a valid value.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; `Copy`, `repr(C)`, no padding, every bit pattern valid.
unsafe impl bytemuck::Pod for Line {}

/// A repacked copy's lines: their own anonymous mapping where the system gives one, else a
/// heap vector.
///
/// Not a `Vec<Line>`: a zeroed allocation aligned to 64 bytes is `posix_memalign` plus a serial
/// memset in Rust's system allocator (only alignments up to 16 take `calloc`), which faulted
/// the whole copy in on one thread before the repack began. A fresh mapping's zero pages are
/// faulted in by the threads that fill them. Not advised to use transparent huge pages: on
/// the 1B benchmark model that made loading 0.2-0.5 s slower (the kernel compacts memory for
/// them at fault time) and decode no faster (docs/performance.md).
pub(crate) enum Lines {
    Mapped(memmap2::MmapMut),
    Heap(Vec<Line>),
}

impl std::ops::Deref for Lines {
    type Target = [Line];
    fn deref(&self) -> &[Line] {
        match self {
            // A mapping is page aligned and was made `n` lines long.
            Lines::Mapped(map) => bytemuck::cast_slice(&map[..]),
            Lines::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [Line] {
        match self {
            Lines::Mapped(map) => bytemuck::cast_slice_mut(&mut map[..]),
            Lines::Heap(v) => v,
        }
    }
}

/// `n` zeroed lines (see [`Lines`]).
pub(crate) fn zeroed_lines(n: usize) -> Lines {
    let bytes = n
        .checked_mul(size_of::<Line>())
        .expect("repacked copy larger than memory");
    if bytes > 0
        && let Ok(map) = memmap2::MmapMut::map_anon(bytes)
    {
        return Lines::Mapped(map);
    }
    Lines::Heap(bytemuck::zeroed_vec(n))
}

/// A repacked copy's buffers: `q` lines and `s` scale entries a group.
pub(crate) struct GroupLayout {
    pub groups: usize,
    pub rows_per_group: usize,
    /// Bytes a source row.
    pub row_bytes: usize,
    /// Lines and (possibly no) scale entries a group.
    pub q: usize,
    pub s: usize,
}

/// The repacking loop both repacked layouts share: fills every group of a fresh copy with
/// `fill(g, lines, scales)` on the workers, about [`RELEASE_STEP`] source bytes at a time,
/// calling `release` with each step's source byte range once its groups are copied.
pub(crate) fn repack_groups(
    layout: &GroupLayout,
    rows: usize,
    release: &(dyn Fn(std::ops::Range<usize>) + Sync),
    fill: impl Fn(usize, &mut [Line], &mut [u16]) + Sync,
) -> (Lines, Vec<u16>) {
    let GroupLayout {
        groups,
        rows_per_group,
        row_bytes,
        q: qn,
        s: sn,
    } = *layout;
    assert!(qn > 0, "a group holds lines");
    let overflow = "repacked copy larger than memory";
    let mut q = zeroed_lines(groups.checked_mul(qn).expect(overflow));
    let mut s = vec![0u16; groups.checked_mul(sn).expect(overflow)];
    let step = (RELEASE_STEP / (rows_per_group * row_bytes).max(1)).max(1);
    for (c, qc) in q.chunks_mut(step * qn).enumerate() {
        let g0 = c * step;
        let n = qc.len() / qn;
        let sc = &mut s[g0 * sn..(g0 + n) * sn];
        // Scale entries a group, or one empty slice each where a layout has none.
        let scales: Vec<&mut [u16]> = if sn == 0 {
            (0..n).map(|_| <&mut [u16]>::default()).collect()
        } else {
            sc.chunks_mut(sn).collect()
        };
        qc.par_chunks_mut(qn)
            .zip(scales)
            .enumerate()
            .for_each(|(i, (qg, sg))| fill(g0 + i, qg, sg));
        let end = ((g0 + n) * rows_per_group).min(rows);
        release(g0 * rows_per_group * row_bytes..end * row_bytes);
    }
    (q, s)
}

/// A matrix's rows repacked for this CPU's kernels (see the module docs): groups of
/// [`TILE_ROWS`] rows, the last one padded by repeating its last row (those lanes' results are
/// never stored).
pub struct Repacked {
    ty: GgmlType,
    rows: usize,
    nb: usize,
    /// Lines and scale entries per block.
    ql: usize,
    sl: usize,
    q: Lines,
    s: Vec<u16>,
}

impl std::fmt::Debug for Repacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Repacked({} {}x{}, {} bytes)",
            self.ty,
            self.rows,
            self.nb * BLOCK,
            self.bytes()
        )
    }
}

impl Repacked {
    /// Repacks `rows` rows of `ty` blocks (`bytes`, row-major, `k` values a row) for this
    /// CPU's kernels; `None` where the packed blocks are what the kernels read best: a CPU
    /// without AVX-512 VNNI, a type other than Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, or an empty
    /// matrix.
    ///
    /// Panics if `bytes` is not `rows` whole rows of `k` values (a [`crate::QuantMatrix`]
    /// has checked that).
    pub fn new(ty: GgmlType, bytes: &[u8], rows: usize, k: usize) -> Option<Self> {
        Self::new_with(isa(), ty, bytes, rows, k)
    }

    /// [`Repacked::new`] for kernels compiled for `isa` (`None` unless it is a supported
    /// AVX-512 VNNI).
    pub fn new_with(isa: Isa, ty: GgmlType, bytes: &[u8], rows: usize, k: usize) -> Option<Self> {
        Self::build(isa, ty, bytes, rows, k, &|_| {})
    }

    /// [`Repacked::new`], calling `release` with each range of `bytes` once it is repacked
    /// (a few MiB at a time, in order), so that a caller can let a mapping's pages go while
    /// the copy grows: memory then peaks near the copy's size, not the copy's plus the
    /// source's. Not called where nothing is repacked.
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
        #[cfg(target_arch = "x86_64")]
        {
            let (ql, sl) = super::x86::repacked_layout(ty)?;
            assert!(k.is_multiple_of(BLOCK), "partial block");
            let nb = k / BLOCK;
            let row_bytes = nb * ty.type_size();
            assert_eq!(
                Some(bytes.len()),
                row_bytes.checked_mul(rows),
                "not whole rows"
            );
            let layout = GroupLayout {
                groups: rows.div_ceil(TILE_ROWS),
                rows_per_group: TILE_ROWS,
                row_bytes,
                q: nb * ql,
                s: nb * sl,
            };
            let (q, s) = repack_groups(&layout, rows, release, |g: usize, qg, sg| {
                let end = ((g + 1) * TILE_ROWS).min(rows);
                let group = &bytes[g * TILE_ROWS * row_bytes..end * row_bytes];
                // SAFETY: the CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked
                // above); the kernel checks the group's sizes.
                unsafe { super::x86::avx512_repack_group(ty, group, row_bytes, qg, sg) };
            });
            Some(Repacked {
                ty,
                rows,
                nb,
                ql,
                sl,
                q,
                s,
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (ty, bytes, release);
            None
        }
    }

    /// The block type the rows came from.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks of [`BLOCK`] values a row.
    pub fn blocks(&self) -> usize {
        self.nb
    }

    /// Groups of [`TILE_ROWS`] rows (the last may hold fewer).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    /// Rows of group `g`.
    pub fn group_rows(&self, g: usize) -> usize {
        assert!(g < self.groups(), "group {g} past the matrix");
        TILE_ROWS.min(self.rows - g * TILE_ROWS)
    }

    /// Bytes the repacked copy holds in memory.
    pub fn bytes(&self) -> usize {
        self.q.len() * size_of::<Line>() + self.s.len() * size_of::<u16>()
    }

    /// Group `g`'s lines and scale entries. Panics if `g` is past the last group.
    pub(super) fn group(&self, g: usize) -> (&[Line], &[u16]) {
        let (qn, sn) = (self.nb * self.ql, self.nb * self.sl);
        (&self.q[g * qn..(g + 1) * qn], &self.s[g * sn..(g + 1) * sn])
    }

    /// `out[l]` = dot of row `16g + l` with the one activation row of `batch` (prepared by
    /// [`super::prepare_batch`] for this CPU), for the group's rows: bit for bit what
    /// [`super::dot_packed_batch`] gives on the packed rows.
    pub fn dot(&self, g: usize, batch: &Batch, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Repacked` exists only where the CPU supports AVX2, FMA, F16C and
        // AVX-512 F/BW/VL/VNNI (`new_with`); the kernel checks every size it relies on.
        unsafe {
            super::x86::avx512_repacked_dot(self, g, batch, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "no repacked weights off x86-64 ({g}, {}, {})",
            batch.m,
            out.len()
        )
    }

    /// `out[i * rows + l]` = dot of row `16g + l` with activation row `i` of `batch`, every
    /// row `i` (`rows` = [`Repacked::group_rows`]): [`Repacked::load_tile`] then
    /// [`super::tile_matmul`] in one pass over the group, bit for bit the same results; `tile`
    /// is left holding the group.
    pub fn tile_matmul(&self, g: usize, batch: &Batch, tile: &mut Tile, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let out = super::x86::Dst::of(out, batch.m, self.group_rows(g));
            // SAFETY: as in `dot`; `out` is the checked slice.
            unsafe { super::x86::avx512_repacked_tile_matmul(self, g, batch, tile, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "no repacked weights off x86-64 ({g}, {}, {}, {})",
            batch.m,
            tile.rows,
            out.len()
        )
    }

    /// [`Repacked::tile_matmul`] writing activation row `i`'s results straight to
    /// `out.add(i * ld)` (`rows` floats from there), so that the tasks of one product can fill
    /// their columns of a shared row-major output without a copy.
    ///
    /// # Safety
    /// For every `i < batch.m`, `out.add(i * ld)` must be valid for writes of
    /// [`Repacked::group_rows`]`(g)` floats that no other thread reads or writes until this
    /// returns.
    pub unsafe fn tile_matmul_to(
        &self,
        g: usize,
        batch: &Batch,
        tile: &mut Tile,
        out: *mut f32,
        ld: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; `out` is the caller's.
        unsafe {
            super::x86::avx512_repacked_tile_matmul(
                self,
                g,
                batch,
                tile,
                super::x86::Dst { ptr: out, ld },
            )
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "no repacked weights off x86-64 ({g}, {}, {}, {out:?}, {ld})",
            batch.m, tile.rows
        )
    }

    /// Loads group `g` into `tile`, as [`Tile::load`] loads its packed rows.
    pub fn load_tile(&self, g: usize, tile: &mut Tile) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`.
        unsafe {
            super::x86::avx512_tile_load_repacked(self, g, tile)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no repacked weights off x86-64 ({g}, {})", tile.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        ActFormat, act_format, dot_packed_batch_with, prepare_batch_with, tile_matmul_with,
    };
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];

    fn avx512() -> bool {
        let ok = Isa::Avx512Vnni.supported();
        if !ok {
            eprintln!("skipped: this CPU has no AVX-512 VNNI, so nothing is repacked");
        }
        ok
    }

    /// `rows` random rows of `k` values quantized to `ty`; every fourth row is extreme (all
    /// at the format's largest magnitude, mixed signs) so the sign offset and the nibble
    /// ends are covered.
    fn weights(rng: &mut StdRng, ty: GgmlType, rows: usize, k: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for r in 0..rows {
            let w: Vec<f32> = if r % 4 == 3 {
                (0..k)
                    .map(|j| if j % 3 == 0 { -1.0 } else { 1.0 })
                    .collect()
            } else {
                let scale = rng.random_range(0.01..4.0f32);
                (0..k).map(|_| rng.random_range(-scale..scale)).collect()
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
    fn repacked_kernels_equal_the_packed_ones_bit_for_bit() {
        if !avx512() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x5e9a_c4ed);
        let isa = Isa::Avx512Vnni;
        for ty in TYPES {
            let fmt = act_format(ty).unwrap();
            // One block; a partial group alone; whole groups; whole plus a partial group of
            // one row and of fifteen; odd block counts.
            for (rows, k) in [
                (1, 32),
                (15, 96),
                (16, 64),
                (17, 32 * 7),
                (33, 768),
                (47, 2080),
                (64, 160),
            ] {
                let bytes = weights(&mut rng, ty, rows, k);
                let rep = Repacked::new_with(isa, ty, &bytes, rows, k).expect("repacked");
                let row_bytes = k / BLOCK * ty.type_size();
                // As many bytes as the packed rows, the last group padded to sixteen.
                assert_eq!(rep.bytes(), row_bytes * rep.groups() * TILE_ROWS);
                for m in [1usize, 2, 3, 4, 9] {
                    let x = acts(&mut rng, m, k);
                    let batch = prepare_batch_with(isa, &x, k, m, fmt);
                    let scalar_batch = prepare_batch_with(Isa::Scalar, &x, k, m, fmt);
                    let mut want = vec![0.0f32; m * rows];
                    dot_packed_batch_with(Isa::Scalar, ty, &bytes, &scalar_batch, &mut want);
                    let mut packed = vec![0.0f32; m * rows];
                    dot_packed_batch_with(isa, ty, &bytes, &batch, &mut packed);
                    assert_eq!(bits(&packed), bits(&want), "{ty} packed {rows}x{k} m={m}");
                    let (mut tile, mut tile_packed) = (Tile::default(), Tile::default());
                    // Reused across groups and sizes, as the matmul's thread-local tile is.
                    let mut fused_tile = Tile::default();
                    for g in 0..rep.groups() {
                        let n = rep.group_rows(g);
                        let col = |out: &[f32], i: usize| out[i * rows + g * 16..][..n].to_vec();
                        if m == 1 {
                            let mut got = vec![0.0f32; n];
                            rep.dot(g, &batch, &mut got);
                            assert_eq!(bits(&got), bits(&col(&want, 0)), "{ty} {rows}x{k} g{g}");
                        }
                        // The tile of the repacked group equals the packed rows' tile.
                        rep.load_tile(g, &mut tile);
                        let group = &bytes[g * 16 * row_bytes..(g * 16 + n) * row_bytes];
                        tile_packed.load_with(isa, ty, group, row_bytes);
                        assert_eq!((tile.rows, tile.nb), (tile_packed.rows, tile_packed.nb));
                        let mut got = vec![0.0f32; m * n];
                        let with_min = fmt == ActFormat::Q8_1;
                        tile_matmul_with(isa, &tile, &batch, with_min, &mut got);
                        for i in 0..m {
                            assert_eq!(
                                bits(&got[i * n..(i + 1) * n]),
                                bits(&col(&want, i)),
                                "{ty} tile {rows}x{k} g{g} row {i} of {m}"
                            );
                        }
                        // Loading while the first two rows are dotted changes no bit, and
                        // leaves the same tile behind.
                        let mut fused = vec![f32::NAN; m * n];
                        rep.tile_matmul(g, &batch, &mut fused_tile, &mut fused);
                        assert_eq!(bits(&fused), bits(&got), "{ty} fused {rows}x{k} g{g} m={m}");
                        let mut again = vec![0.0f32; m * n];
                        tile_matmul_with(isa, &fused_tile, &batch, with_min, &mut again);
                        assert_eq!(bits(&again), bits(&got), "{ty} fused tile {rows}x{k} g{g}");
                        // Into a wider output (2 columns before, 3 after, every row): the
                        // same bits in the group's columns, nothing written elsewhere.
                        let (ld, sentinel) = (n + 5, f32::from_bits(0x7fc0_dead));
                        let mut wide = vec![sentinel; m * ld];
                        // SAFETY: row `i`'s columns `2..2 + n` lie inside `wide`; one thread.
                        unsafe {
                            rep.tile_matmul_to(
                                g,
                                &batch,
                                &mut fused_tile,
                                wide.as_mut_ptr().add(2),
                                ld,
                            )
                        };
                        for (i, row) in wide.chunks_exact(ld).enumerate() {
                            let mut expect = vec![sentinel; ld];
                            expect[2..2 + n].copy_from_slice(&got[i * n..(i + 1) * n]);
                            assert_eq!(
                                bits(row),
                                bits(&expect),
                                "{ty} strided {rows}x{k} g{g} row {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn release_covers_the_source_once_in_order() {
        if !avx512() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        // Q8_0 rows of 8192 values are 8704 bytes: 300 rows are under one step; 2100 rows
        // (132 groups) are five steps of 30 groups, the last of 12 and a partial group.
        for rows in [300usize, 2100] {
            let k = 8192;
            let bytes = weights(&mut rng, GgmlType::Q8_0, rows, k);
            let seen = std::sync::Mutex::new(Vec::new());
            let rep = Repacked::new_releasing(GgmlType::Q8_0, &bytes, rows, k, &|r| {
                seen.lock().unwrap().push(r)
            })
            .unwrap();
            let seen = seen.into_inner().unwrap();
            let mut at = 0;
            for r in &seen {
                assert_eq!(r.start, at, "{seen:?}");
                assert!(r.end > r.start && r.end - r.start <= RELEASE_STEP);
                at = r.end;
            }
            assert_eq!(at, bytes.len());
            // The copy is the same as one made without releasing.
            let plain = Repacked::new(GgmlType::Q8_0, &bytes, rows, k).unwrap();
            for g in 0..rep.groups() {
                let (a, b) = (rep.group(g), plain.group(g));
                assert!(a.0.iter().zip(b.0).all(|(x, y)| x.0 == y.0) && a.1 == b.1);
            }
        }
    }

    /// Fresh lines are zero, as long as asked, writable and aligned, empty or not.
    #[test]
    fn zeroed_lines_are_zero_and_aligned() {
        assert!(zeroed_lines(0).is_empty());
        for n in [1usize, 3, 40_000] {
            let mut lines = zeroed_lines(n);
            assert_eq!(lines.len(), n);
            assert!(lines.iter().all(|l| l.0 == [0; 64]));
            assert_eq!(lines.as_ptr() as usize % 64, 0);
            lines[n - 1].0[63] = 7;
            assert_eq!(lines[n - 1].0[63], 7);
        }
    }

    #[test]
    fn only_avx512_and_the_repacked_types_repack() {
        let bytes = vec![0u8; 18 * 2];
        assert!(Repacked::new_with(Isa::Scalar, GgmlType::Q4_0, &bytes, 2, 32).is_none());
        if Isa::Avx2.supported() {
            assert!(Repacked::new_with(Isa::Avx2, GgmlType::Q4_0, &bytes, 2, 32).is_none());
        }
        if !avx512() {
            return;
        }
        let isa = Isa::Avx512Vnni;
        assert!(Repacked::new_with(isa, GgmlType::Q4_0, &bytes, 2, 32).is_some());
        assert!(Repacked::new_with(isa, GgmlType::Q4_0, &[], 0, 32).is_none());
        assert!(Repacked::new_with(isa, GgmlType::Q4_0, &[], 4, 0).is_none());
        let q5 = vec![0u8; 22 * 2];
        assert!(Repacked::new_with(isa, GgmlType::Q5_0, &q5, 2, 32).is_some());
        let q4k = vec![0u8; 144 * 2];
        assert!(Repacked::new_with(isa, GgmlType::Q4_K, &q4k, 2, 256).is_none());
    }
}
