//! Plain-Rust CPU kernels (no burn types): quantized activations and integer dot products.

pub mod attention;
pub mod expf;
pub mod fused;
pub mod group;
pub mod half_dot;
pub mod kquant;
pub mod paged_attention;
pub mod q8;

use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr;
use std::thread::LocalKey;

use rayon::prelude::*;

use crate::QuantMatrix;

/// Weight rows per parallel task: enough work to amortize scheduling, small enough that two
/// threads split even the narrowest layer (192 rows) evenly.
const ROWS_PER_TASK: usize = 16;

/// Output rows per task of the final transpose.
const TRANSPOSE_ROWS: usize = 8;

/// Largest batch that [`q8::dot_packed_batch`] takes, straight off the packed blocks; larger
/// ones unpack [`q8::Tile`]s to memory once and reuse them for every activation row.
const SMALL_BATCH_MAX: usize = 8;

thread_local! {
    /// Each thread's unpacked weight tile and output buffer for the batched integer matmuls,
    /// kept from call to call. rayon runs a `for_each_init` closure's `init` once per job it
    /// splits off, several per call, and a fresh tile allocates and zero-fills up to 30 KB
    /// each time: on 8-stream decode that was about a tenth of the matmul's time.
    static Q8_TILE: RefCell<(q8::Tile, Vec<f32>)> = RefCell::default();
    #[cfg(target_arch = "x86_64")]
    static K_TILE: RefCell<kquant::tile::KTile> = RefCell::default();
    /// Packed rows unpacked from a repacked K-quant group, and the output buffer.
    static K_ROWS: RefCell<(Vec<u8>, Vec<f32>)> = RefCell::default();
}

/// A matrix's rows repacked once, at load, for this CPU's kernels ([`QuantMatrix::repack`]).
#[derive(Debug)]
pub enum Repacked {
    /// Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
    Blocks(q8::Repacked),
    /// Q4_K, Q5_K and Q6_K.
    KQuant(kquant::Repacked),
}

impl Repacked {
    /// The layout of [`q8::Repacked::new_releasing`] or [`kquant::Repacked::new_releasing`],
    /// whichever serves `ty`; `None` where neither does on this CPU.
    pub fn new_releasing(
        ty: ember_quant::GgmlType,
        bytes: &[u8],
        rows: usize,
        k: usize,
        release: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Option<Self> {
        if kquant::supported(ty) {
            kquant::Repacked::new_releasing(ty, bytes, rows, k, release).map(Repacked::KQuant)
        } else {
            q8::Repacked::new_releasing(ty, bytes, rows, k, release).map(Repacked::Blocks)
        }
    }

    /// Bytes the repacked copy holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Repacked::Blocks(r) => r.bytes(),
            Repacked::KQuant(r) => r.bytes(),
        }
    }
}

/// Runs `f` on this thread's scratch in `key` (a fresh one if it is already in use, which the
/// callers here, who never nest, do not cause).
fn with_scratch<T: Default, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut T::default()),
    })
}

/// A row-major `[m, n]` output, possibly uninitialized, that parallel tasks fill by disjoint
/// column ranges.
struct Columns<'a> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    _out: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: `Columns` is only written, through `write` or the pointer `at` gives a kernel, whose
// callers keep the column ranges of concurrent calls disjoint.
unsafe impl Sync for Columns<'_> {}

impl<'a> Columns<'a> {
    fn new(out: &'a mut [MaybeUninit<f32>], m: usize, n: usize) -> Self {
        assert_eq!(out.len(), m * n, "out is not m x n");
        Columns {
            ptr: out.as_mut_ptr().cast(),
            m,
            n,
            _out: PhantomData,
        }
    }

    /// Columns `j0..j0 + cols` of row 0, for a kernel to write all `m` rows (which the caller
    /// states, so that it cannot write rows past the output) itself at stride
    /// [`Columns::ld`] (under `write`'s rule: no two concurrent writers of a column).
    fn at(&self, j0: usize, cols: usize, m: usize) -> *mut f32 {
        assert!(j0 + cols <= self.n, "columns out of range");
        assert_eq!(m, self.m, "rows other than the output's");
        self.ptr.wrapping_add(j0)
    }

    /// The distance between rows, in floats.
    fn ld(&self) -> usize {
        self.n
    }

    /// Copies `src` (`[m, cols]`) into columns `j0..j0 + cols` of every row.
    ///
    /// # Safety
    /// No other call may write an overlapping column range at the same time.
    unsafe fn write(&self, j0: usize, src: &[f32]) {
        if self.m == 0 {
            return;
        }
        let cols = src.len() / self.m;
        assert!(
            cols * self.m == src.len() && j0 + cols <= self.n,
            "columns out of range"
        );
        for (i, row) in src.chunks_exact(cols.max(1)).enumerate() {
            // SAFETY: row `i < m`, columns `j0..j0 + cols <= n` lie inside the `m * n` output
            // borrowed for `'a`; the caller keeps concurrent ranges disjoint.
            let dst = unsafe { self.ptr.add(i * self.n + j0) };
            if let Ok(tile) = <&[f32; q8::TILE_ROWS]>::try_from(row) {
                // A whole tile: a fixed-size copy the compiler inlines.
                // SAFETY: as above, `TILE_ROWS = cols` floats.
                unsafe { dst.cast::<[f32; q8::TILE_ROWS]>().write_unaligned(*tile) };
            } else {
                // SAFETY: as above.
                unsafe { ptr::copy_nonoverlapping(row.as_ptr(), dst, cols) };
            }
        }
    }
}

/// `x @ w^T` for row-major `x: [m, w.cols()]`, returning `[m, w.rows()]`.
///
/// Types with an integer path quantize `x` to 8 bits first, as llama.cpp does (Q8_0/Q8_1 for
/// the legacy formats, Q8_K for K-quants); others take f32 dot products straight off the
/// blocks. Packed group-quantized weights ([`QuantMatrix::packed`]) take [`group`]'s integer
/// kernel. Each task owns whole weight rows, so every
/// weight byte is read from memory once per call, whatever `m` is.
pub fn quant_matmul_rows(w: &QuantMatrix, x: &[f32], m: usize) -> Vec<f32> {
    quant_matmul_rows_solo(w, x, m, None)
}

/// [`quant_matmul_rows`] with each row's place in its solo batch (`solo`, one per row), which
/// decides K-quant arithmetic as llama.cpp decides it by batch size; the other types' results
/// do not depend on the batch.
pub fn quant_matmul_rows_solo(
    w: &QuantMatrix,
    x: &[f32],
    m: usize,
    solo: Option<&std::sync::Arc<[kquant::SoloRow]>>,
) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    debug_assert_eq!(x.len(), m * k);
    if let Some(pw) = w.packed_plan() {
        return group::matmul(pw, x, m);
    }
    let ty = w.ggml_type();
    if kquant::supported(ty) {
        return kquant_matmul(w, x, m, solo.filter(|s| s.len() == m).cloned());
    }
    let Some(fmt) = q8::act_format(ty) else {
        return f32_matmul(w, x, m);
    };
    if let Some(Repacked::Blocks(rep)) = w.repacked() {
        return repacked_matmul(rep, x, m, fmt);
    }
    let row_bytes = k / q8::BLOCK * ty.type_size();
    let bytes = w.bytes();
    if m == 1 {
        // Decode: dot straight from the packed blocks, nothing to amortize an unpack.
        let batch = q8::prepare_batch(x, k, 1, fmt);
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, dst)| {
                let start = task * ROWS_PER_TASK * row_bytes;
                let rows = &bytes[start..start + dst.len() * row_bytes];
                q8::dot_packed_batch(ty, rows, &batch, dst);
            });
        return out;
    }
    // Batched: each task multiplies a tile of weight rows with every activation row and
    // writes its columns of `[m, n]`. Small batches dot straight off the packed blocks;
    // larger ones unpack the tile once and reuse it for every activation row.
    let batch = q8::prepare_batch(x, k, m, fmt);
    let mut out = Vec::with_capacity(m * n);
    let dst = Columns::new(&mut out.spare_capacity_mut()[..m * n], m, n);
    let tiles = (0..n.div_ceil(q8::TILE_ROWS)).into_par_iter();
    let tile_rows = |t: usize| {
        let j0 = t * q8::TILE_ROWS;
        let rows = q8::TILE_ROWS.min(n - j0);
        (j0, rows, &bytes[j0 * row_bytes..(j0 + rows) * row_bytes])
    };
    if m <= q8::packed_batch_max().min(SMALL_BATCH_MAX) {
        tiles.for_each(|t| {
            let (j0, rows, w_rows) = tile_rows(t);
            let mut buf = [0.0f32; SMALL_BATCH_MAX * q8::TILE_ROWS];
            let buf = &mut buf[..m * rows];
            q8::dot_packed_batch(ty, w_rows, &batch, buf);
            // SAFETY: task `t` alone writes columns `j0..j0 + rows`.
            unsafe { dst.write(j0, buf) };
        });
    } else {
        let with_min = fmt == q8::ActFormat::Q8_1;
        tiles.for_each(|t| {
            with_scratch(&Q8_TILE, |(tile, buf)| {
                let (j0, rows, w_rows) = tile_rows(t);
                if buf.len() < m * rows {
                    buf.resize(m * rows, 0.0);
                }
                let buf = &mut buf[..m * rows];
                tile.load(ty, w_rows, row_bytes);
                // Writes all of `buf`.
                q8::tile_matmul(tile, &batch, with_min, buf);
                // SAFETY: task `t` alone writes columns `j0..j0 + rows`.
                unsafe { dst.write(j0, buf) };
            })
        });
    }
    // SAFETY: the tasks above wrote all `m` rows of every column range `j0..j0 + rows`, and
    // those ranges cover `0..n` (a panic in any task would have unwound past this point).
    unsafe { out.set_len(m * n) };
    out
}

/// [`quant_matmul_rows`] for repacked rows ([`QuantMatrix::repack`]): one group of sixteen rows
/// per task, dotted in place for one activation row, loaded into a tile for more (what the
/// packed path does on this CPU, see [`q8::packed_batch_max`]), the first two rows dotted
/// while the group streams in ([`q8::Repacked::tile_matmul`]).
fn repacked_matmul(rep: &q8::Repacked, x: &[f32], m: usize, fmt: q8::ActFormat) -> Vec<f32> {
    let (n, k) = (rep.rows(), rep.blocks() * q8::BLOCK);
    let batch = q8::prepare_batch(x, k, m, fmt);
    if m == 1 {
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(q8::TILE_ROWS)
            .enumerate()
            .for_each(|(g, dst)| rep.dot(g, &batch, dst));
        return out;
    }
    let mut out = Vec::with_capacity(m * n);
    let dst = Columns::new(&mut out.spare_capacity_mut()[..m * n], m, n);
    (0..rep.groups()).into_par_iter().for_each(|g| {
        with_scratch(&Q8_TILE, |(tile, _)| {
            let at = dst.at(g * q8::TILE_ROWS, rep.group_rows(g), batch.m);
            // SAFETY: `at` is columns `16g..16g + rows` of the `m` rows of `out` (stride
            // `n`), which task `g` alone writes; the kernel writes all of them.
            unsafe { rep.tile_matmul_to(g, &batch, tile, at, dst.ld()) };
        })
    });
    // SAFETY: the tasks above wrote all `m` rows of every group's columns, which cover `0..n`.
    unsafe { out.set_len(m * n) };
    out
}

/// [`quant_matmul_rows_solo`] of the same activations with each of `ws`, in one parallel
/// region over every matrix's row groups, where all of them allow it: repacked, as wide as
/// `x`, and for K-quants every activation row one that dots in place (decode rows, see
/// [`kquant::Repacked::dots`]). `None` otherwise (the caller multiplies them one by one).
/// The activations are quantized once per format, and a decode step's Q/K/V or gate/up
/// products pay for one fork and join instead of three or two; every result is the
/// one-by-one call's bits (the same kernels on the same groups).
pub fn quant_matmul_rows_many(
    ws: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    solo: Option<&std::sync::Arc<[kquant::SoloRow]>>,
) -> Option<Vec<Vec<f32>>> {
    /// One matrix's kernel: q8 groups with the index of their activation batch, or K-quant
    /// groups dotted in place against the Q8_K row.
    enum Part<'a> {
        Q8(&'a q8::Repacked, usize),
        K(&'a kquant::Repacked),
    }
    let k = ws.first()?.cols();
    if m == 0 || x.len() != m * k || ws.iter().any(|w| w.cols() != k) {
        return None;
    }
    let mut formats: Vec<q8::ActFormat> = Vec::new();
    let mut parts = Vec::with_capacity(ws.len());
    for w in ws {
        match w.repacked()? {
            Repacked::Blocks(rep) => {
                let fmt = q8::act_format(w.ggml_type())?;
                let b = match formats.iter().position(|&f| f == fmt) {
                    Some(b) => b,
                    None => {
                        formats.push(fmt);
                        formats.len() - 1
                    }
                };
                parts.push(Part::Q8(rep, b));
            }
            Repacked::KQuant(rep) => parts.push(Part::K(rep)),
        }
    }
    let solo = solo.filter(|s| s.len() == m);
    // K-quant rows must all dot in place (decode rows: what `kquant_repacked_matmul` does
    // for them); prompt rows take its tiles. Decided from the rows' shapes, before anything
    // is quantized.
    let dots_all = |rep: &kquant::Repacked| {
        (0..m).all(|i| rep.dots_shape(kquant::row_shape(solo.map(|s| &s[..]), m, i)))
    };
    if parts
        .iter()
        .any(|p| matches!(p, Part::K(rep) if !dots_all(rep)))
    {
        return None;
    }
    let q8k = parts.iter().any(|p| matches!(p, Part::K(_))).then(|| {
        let mut acts = kquant::quantize_q8k(x, k);
        acts.solo = solo.cloned();
        acts
    });
    let batches: Vec<q8::Batch> = formats
        .iter()
        .map(|&f| q8::prepare_batch(x, k, m, f))
        .collect();
    let mut outs: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| Vec::with_capacity(m * w.rows()))
        .collect();
    let tasks: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let groups = match p {
                Part::Q8(rep, _) => rep.groups(),
                Part::K(rep) => rep.groups(),
            };
            (0..groups).map(move |g| (i, g))
        })
        .collect();
    {
        let dsts: Vec<Columns<'_>> = outs
            .iter_mut()
            .zip(ws)
            .map(|(o, w)| Columns::new(&mut o.spare_capacity_mut()[..m * w.rows()], m, w.rows()))
            .collect();
        tasks.into_par_iter().for_each(|(i, g)| {
            with_scratch(&Q8_TILE, |(tile, buf)| match &parts[i] {
                Part::Q8(rep, b) => {
                    let rows = rep.group_rows(g);
                    if m == 1 {
                        if buf.len() < rows {
                            buf.resize(rows, 0.0);
                        }
                        let buf = &mut buf[..rows];
                        rep.dot(g, &batches[*b], buf);
                        // SAFETY: task `(i, g)` alone writes matrix `i`'s columns of group `g`.
                        unsafe { dsts[i].write(g * q8::TILE_ROWS, buf) };
                    } else {
                        let at = dsts[i].at(g * q8::TILE_ROWS, rows, batches[*b].m);
                        // SAFETY: `at` is matrix `i`'s columns of group `g` in its `m` rows
                        // (stride `ld`), which task `(i, g)` alone writes; the kernel writes
                        // all of them.
                        unsafe { rep.tile_matmul_to(g, &batches[*b], tile, at, dsts[i].ld()) };
                    }
                }
                Part::K(rep) => {
                    let rows = rep.group_rows(g);
                    if buf.len() < m * rows {
                        buf.resize(m * rows, 0.0);
                    }
                    let buf = &mut buf[..m * rows];
                    let acts = q8k.as_ref().expect("Q8_K activations for K-quant parts");
                    for (row, dst_row) in buf.chunks_exact_mut(rows).enumerate() {
                        rep.dot(g, acts, row, dst_row);
                    }
                    // SAFETY: as above.
                    unsafe { dsts[i].write(g * kquant::repack::GROUP_ROWS, buf) };
                }
            })
        });
    }
    for (o, w) in outs.iter_mut().zip(ws) {
        // SAFETY: the tasks above wrote all `m` rows of every group's columns of every matrix,
        // which cover `0..w.rows()`.
        unsafe { o.set_len(m * w.rows()) };
    }
    Some(outs)
}

/// [`quant_matmul_rows`] for K-quants: activations quantized to Q8_K, integer dots per row.
fn kquant_matmul(
    w: &QuantMatrix,
    x: &[f32],
    m: usize,
    solo: Option<std::sync::Arc<[kquant::SoloRow]>>,
) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let ty = w.ggml_type();
    let mut acts = kquant::quantize_q8k(x, k);
    acts.solo = solo;
    if let Some(Repacked::KQuant(rep)) = w.repacked() {
        return kquant_repacked_matmul(rep, &acts, m);
    }
    let row_bytes = k / ember_quant::QK_K * ty.type_size();
    let bytes = w.bytes();
    if m == 1 {
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, dst)| {
                let start = task * ROWS_PER_TASK * row_bytes;
                let rows = &bytes[start..start + dst.len() * row_bytes];
                kquant::dot_rows(ty, rows, &acts, 0, dst);
            });
        return out;
    }
    // A tile of weight rows stays in cache while every activation row is dotted with it.
    let tiled = kquant_tiled(ty, &acts);
    let mut out = Vec::with_capacity(m * n);
    let dst = Columns::new(&mut out.spare_capacity_mut()[..m * n], m, n);
    (0..n.div_ceil(q8::TILE_ROWS))
        .into_par_iter()
        .for_each(|t| {
            with_scratch(&K_ROWS, |(_, buf)| {
                let j0 = t * q8::TILE_ROWS;
                let rows = q8::TILE_ROWS.min(n - j0);
                if buf.len() < m * rows {
                    buf.resize(m * rows, 0.0);
                }
                let buf = &mut buf[..m * rows];
                let w_rows = &bytes[j0 * row_bytes..(j0 + rows) * row_bytes];
                kquant_tile(ty, w_rows, row_bytes, &acts, tiled, buf);
                // SAFETY: task `t` alone writes columns `j0..j0 + rows`.
                unsafe { dst.write(j0, buf) };
            })
        });
    // SAFETY: the tasks above wrote all `m` rows of every column range `j0..j0 + rows`, and
    // those ranges cover `0..n` (a panic in any task would have unwound past this point).
    unsafe { out.set_len(m * n) };
    out
}

/// [`kquant_matmul`] for repacked rows ([`QuantMatrix::repack`]): decode, and batches whose
/// every row takes the per-row arithmetic (several sequences' decode rows; any Q5_K batch),
/// dot a group of sixteen rows a task in place, one activation row after another while the
/// group is in cache; other batches (Q4_K and Q6_K prompts, whose rows keep their solo
/// batch's folds) load the group's tile for the batched kernel straight from its lines
/// ([`kquant::tile::KTile::load_repacked`]), or, for a Q6_K batch that mixes folds, unpack
/// the packed rows into scratch for the per-row kernels: the file's pages are not read
/// again. (Q5_K prompts of 64 rows and more take the float GEMM, which dequantizes from the
/// copy too.)
fn kquant_repacked_matmul(rep: &kquant::Repacked, acts: &kquant::Q8K, m: usize) -> Vec<f32> {
    let n = rep.rows();
    if m == 1 && rep.dots(acts, 0) {
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(kquant::repack::GROUP_ROWS)
            .enumerate()
            .for_each(|(g, dst)| rep.dot(g, acts, 0, dst));
        return out;
    }
    let ty = rep.ty();
    let row_bytes = rep.cols() / ember_quant::QK_K * ty.type_size();
    let in_place = (0..m).all(|i| rep.dots(acts, i));
    let tiled = kquant_tiled(ty, acts);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = tiled; // The tile kernel is x86-only.
    let mut out = Vec::with_capacity(m * n);
    let dst = Columns::new(&mut out.spare_capacity_mut()[..m * n], m, n);
    (0..rep.groups()).into_par_iter().for_each(|g| {
        with_scratch(&K_ROWS, |(w_rows, buf)| {
            let rows = rep.group_rows(g);
            #[cfg(target_arch = "x86_64")]
            if tiled && !in_place {
                with_scratch(&K_TILE, |tile| {
                    tile.load_repacked(rep, g);
                    let at = dst.at(g * kquant::repack::GROUP_ROWS, rows, m);
                    // SAFETY: `tiled` holds only where the CPU supports AVX-512 F/BW/VL/VNNI
                    // and FMA (`q8::isa`). `at` is columns `16g..16g + rows` of the `m` rows
                    // of `out` (stride `ld`), which task `g` alone writes; it writes all of
                    // them.
                    unsafe { kquant::tile::matmul_to(tile, acts, 0..m, at, dst.ld()) };
                });
                return;
            }
            if buf.len() < m * rows {
                buf.resize(m * rows, 0.0);
            }
            let buf = &mut buf[..m * rows];
            if in_place {
                for (i, dst_row) in buf.chunks_exact_mut(rows).enumerate() {
                    rep.dot(g, acts, i, dst_row);
                }
            } else {
                w_rows.resize(rows * row_bytes, 0);
                rep.unpack_group(g, w_rows);
                kquant_tile(ty, w_rows, row_bytes, acts, false, buf);
            }
            // SAFETY: task `g` alone writes columns `16g..16g + rows`.
            unsafe { dst.write(g * kquant::repack::GROUP_ROWS, buf) };
        })
    });
    // SAFETY: the tasks above wrote all `m` rows of every group's columns, which cover `0..n`.
    unsafe { out.set_len(m * n) };
    out
}

/// Whether a batch of `ty` rows takes the sixteen-row tile kernel ([`kquant::tile`]): Q4_K,
/// and Q6_K where every row takes llama.cpp's tiled arithmetic, on AVX-512 VNNI.
fn kquant_tiled(ty: ember_quant::GgmlType, acts: &kquant::Q8K) -> bool {
    use ember_quant::GgmlType::{Q4_K, Q6_K};
    q8::isa() == q8::Isa::Avx512Vnni
        && (ty == Q4_K || (ty == Q6_K && (0..acts.rows()).all(|i| acts.q6k_tiled(i))))
}

/// `buf[i * rows + r]` = dot of row `r` of the packed `w_rows` (1 to 16 rows of `row_bytes`)
/// with activation row `i` of `acts`, for every row of `acts`: sixteen rows unpacked once, one
/// per vector lane, where `tiled` ([`kquant_tiled`]), else per-row dots; llama.cpp's
/// arithmetic either way (tested).
fn kquant_tile(
    ty: ember_quant::GgmlType,
    w_rows: &[u8],
    row_bytes: usize,
    acts: &kquant::Q8K,
    tiled: bool,
    buf: &mut [f32],
) {
    let (rows, m) = (w_rows.len() / row_bytes, acts.rows());
    debug_assert_eq!(buf.len(), m * rows);
    #[cfg(target_arch = "x86_64")]
    if tiled {
        with_scratch(&K_TILE, |tile| {
            tile.load(ty, w_rows, row_bytes);
            // SAFETY: `tiled` holds only where the CPU supports AVX-512 F/BW/VL/VNNI and FMA
            // (`q8::isa`). It writes all of `buf`.
            unsafe { kquant::tile::matmul(tile, acts, 0..m, buf) };
        });
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = tiled; // The tile kernel is x86-only.
    for (i, dst_row) in buf.chunks_exact_mut(rows).enumerate() {
        kquant::dot_rows(ty, w_rows, acts, i, dst_row);
    }
}

/// [`quant_matmul_rows`] for types without an integer path: f32 dot products off the blocks.
fn f32_matmul(w: &QuantMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let ty = w.ggml_type();
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(m * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, dst)| {
            for (jj, dst_row) in dst.chunks_mut(m).enumerate() {
                let row = w.row(task * ROWS_PER_TASK + jj);
                for (i, d) in dst_row.iter_mut().enumerate() {
                    *d = half_dot::dot_row(ty, row, &x[i * k..(i + 1) * k]);
                }
            }
        });
    if m == 1 {
        return out_t;
    }
    // Transpose `[n, m]` to `[m, n]`, a band of output rows per task: each task reads
    // `TRANSPOSE_ROWS` consecutive values of every `out_t` row.
    let mut out = vec![0.0f32; m * n];
    out.par_chunks_mut(TRANSPOSE_ROWS * n)
        .enumerate()
        .for_each(|(band, dst)| {
            let i0 = band * TRANSPOSE_ROWS;
            let rows = dst.len() / n;
            for (j, col) in out_t.chunks_exact(m).enumerate() {
                for (r, &v) in col[i0..i0 + rows].iter().enumerate() {
                    dst[r * n + j] = v;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_quant::GgmlType;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// The batched path (tiles, then laid side by side) gives every output exactly the
    /// scalar `unpack_row` + `dot` value, partial last tile included.
    #[test]
    fn batched_matmul_matches_row_dots_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            for (m, n, k) in [
                (2, 40, 64),
                (5, 16, 576),
                (17, 37, 96),
                (8, 3, 32),
                (8, 49, 160),
                (9, 33, 64),
                (3, 17, 32),
                (16, 20, 96),
                (1, 37, 96),
                (1, 3, 32),
                (1, 64, 160),
                (70, 18, 64),
            ] {
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let mut w = QuantMatrix::quantize(ty, n, k, &wf).unwrap();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                let got = quant_matmul_rows(&w, &x, m);
                // The same matmul on the repacked rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 on
                // AVX-512 VNNI):
                // groups of sixteen with a partial last one, in decode and batches.
                let expect_repack = q8::isa() == q8::Isa::Avx512Vnni
                    && matches!(
                        ty,
                        GgmlType::Q4_0
                            | GgmlType::Q4_1
                            | GgmlType::Q5_0
                            | GgmlType::Q5_1
                            | GgmlType::Q8_0
                    );
                assert_eq!(w.repack(), expect_repack, "{ty}");
                let repacked = quant_matmul_rows(&w, &x, m);
                assert_eq!(
                    repacked.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty} repacked m={m} n={n} k={k}"
                );
                let fmt = q8::act_format(ty).unwrap();
                let acts = q8::quantize_acts_with(q8::Isa::Scalar, &x, k, fmt);
                let mut un = q8::UnpackedRow::default();
                for j in 0..n {
                    q8::unpack_row_with(q8::Isa::Scalar, ty, w.row(j), &mut un);
                    for i in 0..m {
                        let want = q8::dot_with(
                            q8::Isa::Scalar,
                            &un,
                            &acts,
                            i,
                            fmt == q8::ActFormat::Q8_1,
                        );
                        assert_eq!(
                            got[i * n + j].to_bits(),
                            want.to_bits(),
                            "{ty} m={m} n={n} k={k} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    /// K-quants: every output is the scalar Q8_K row dot, for m = 1 and batched (partial
    /// last tile included).
    #[test]
    fn kquant_matmul_matches_row_dots_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(5);
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            for (m, n, k) in [
                (1, 37, 512),
                (3, 17, 256),
                (4, 16, 256),
                (5, 33, 512),
                (6, 19, 768),
                (7, 16, 512),
                (9, 16, 256),
                (10, 21, 768),
                (11, 17, 256),
                (17, 40, 768),
                (64, 5, 256),
            ] {
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let w = QuantMatrix::quantize(ty, n, k, &wf).unwrap();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                let got = quant_matmul_rows(&w, &x, m);
                let acts = kquant::quantize_q8k(&x, k);
                let row_bytes = k / ember_quant::QK_K * ty.type_size();
                for i in 0..m {
                    let mut want = vec![0.0f32; n];
                    kquant::dot_rows_with(
                        q8::Isa::Scalar,
                        ty,
                        &w.bytes()[..n * row_bytes],
                        &acts,
                        i,
                        &mut want,
                    );
                    for j in 0..n {
                        assert_eq!(
                            got[i * n + j].to_bits(),
                            want[j].to_bits(),
                            "{ty} m={m} n={n} k={k} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    /// A row batched under a [`kquant::SoloRow`] gets the bits it gets in a batch of that
    /// shape: Q4_K's gemm/gemv and Q6_K's tiled/per-row arithmetic follow the solo batch, not
    /// the call's (a decode row beside a prompt chunk, a prompt chunk cut short).
    #[test]
    fn solo_rows_keep_their_batch_arithmetic() {
        let mut rng = StdRng::seed_from_u64(0x5010);
        let (n, k) = (40, 512);
        let shapes: [(u32, u32); 9] = [
            (1, 0),
            (9, 8),
            (9, 0),
            (1, 0),
            (5, 4),
            (5, 2),
            (64, 63),
            (3, 1),
            (12, 11),
        ];
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let w = QuantMatrix::quantize(ty, n, k, &wf).unwrap();
            let m = shapes.len();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
            let solo: std::sync::Arc<[kquant::SoloRow]> = shapes
                .iter()
                .map(|&(m, i)| kquant::SoloRow { m, i })
                .collect();
            let got = quant_matmul_rows_solo(&w, &x, m, Some(&solo));
            for (r, &(sm, si)) in shapes.iter().enumerate() {
                // The row alone in a batch of its solo shape, the other rows random.
                let (sm, si) = (sm as usize, si as usize);
                let mut xb: Vec<f32> = (0..sm * k)
                    .map(|_| rng.random_range(-3.0..3.0f32))
                    .collect();
                xb[si * k..(si + 1) * k].copy_from_slice(&x[r * k..(r + 1) * k]);
                let want = quant_matmul_rows(&w, &xb, sm);
                for j in 0..n {
                    assert_eq!(
                        got[r * n + j].to_bits(),
                        want[si * n + j].to_bits(),
                        "{ty} row {r} as ({sm}, {si}), column {j}"
                    );
                }
            }
        }
    }

    /// Repacked Q4_K, Q5_K and Q6_K rows (AVX-512 VNNI) give the packed rows' bits in decode,
    /// in batches and for rows that keep their solo batch's arithmetic (Q4_K's gemm fold,
    /// Q6_K's tiled kernel), with a partial last group.
    #[test]
    fn repacked_kquant_matmul_equals_the_packed_one_bit_for_bit() {
        use kquant::SoloRow;
        let mut rng = StdRng::seed_from_u64(0x4b_91);
        let avx512 = q8::isa() == q8::Isa::Avx512Vnni;
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            for (m, n, k) in [
                (1, 37, 256),
                (1, 16, 768),
                (2, 33, 512),
                (5, 20, 256),
                (9, 47, 256),
                // A prompt past Q4_K's gemm groups and Q6_K's tile limit, written by the
                // tile kernel straight into the output's columns.
                (70, 37, 256),
            ] {
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let packed = QuantMatrix::quantize(ty, n, k, &wf).unwrap();
                let mut repacked = packed.clone();
                assert_eq!(repacked.repack(), avx512, "{ty}");
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(quant_matmul_rows(&repacked, &x, m)),
                    bits(quant_matmul_rows(&packed, &x, m)),
                    "{ty} m={m} n={n} k={k}"
                );
                // The GEMM path's dequantization reads the copy: the same values, from a
                // start inside a group to the end.
                let start = 5.min(n - 1);
                let mut a = vec![0.0f32; (n - start) * k];
                let mut b = a.clone();
                repacked.dequantize_rows_into(start, &mut a);
                packed.dequantize_rows_into(start, &mut b);
                assert_eq!(bits(a), bits(b), "{ty} dequantize from {start}");
                // Rows from solo batches of 4, 5 and 9: Q4_K's gemm and gemv folds, Q6_K's
                // tiled and per-row arithmetic, mixed.
                let solo: std::sync::Arc<[SoloRow]> = (0..m)
                    .map(|i| SoloRow {
                        m: [4, 5, 9][i % 3],
                        i: (i % 4) as u32,
                    })
                    .collect();
                assert_eq!(
                    bits(quant_matmul_rows_solo(&repacked, &x, m, Some(&solo))),
                    bits(quant_matmul_rows_solo(&packed, &x, m, Some(&solo))),
                    "{ty} solo m={m} n={n} k={k}"
                );
            }
        }
    }

    /// Several matrices over the same activations in one region give each one-by-one call's
    /// bits: one and several activation rows, two activation formats in one call, K-quants
    /// mixed with each other and with Q8_0 (one row), rows of a solo prompt, a partial last
    /// group. Where a matrix does not allow it (not repacked, K-quants with several rows) the
    /// call says so and the caller multiplies them one by one.
    #[test]
    fn matmul_many_equals_separate_calls_bit_for_bit() {
        use kquant::SoloRow;
        let mut rng = StdRng::seed_from_u64(0x3a_7c);
        let avx512 = q8::isa() == q8::Isa::Avx512Vnni;
        let k = 512;
        let sets: [&[(GgmlType, usize)]; 5] = [
            &[
                (GgmlType::Q4_1, 48),
                (GgmlType::Q4_1, 16),
                (GgmlType::Q4_1, 16),
            ],
            &[
                (GgmlType::Q4_0, 37),
                (GgmlType::Q5_1, 32),
                (GgmlType::Q8_0, 16),
            ],
            &[
                (GgmlType::Q4_K, 32),
                (GgmlType::Q4_K, 17),
                (GgmlType::Q6_K, 16),
            ],
            &[(GgmlType::Q8_0, 33), (GgmlType::Q5_K, 16)],
            &[(GgmlType::Q6_K, 64), (GgmlType::Q4_K, 64)],
        ];
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut kquant_decode_taken = 0;
        for set in sets {
            let ws: Vec<QuantMatrix> = set
                .iter()
                .map(|&(ty, n)| {
                    let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                    let mut w = QuantMatrix::quantize(ty, n, k, &wf).unwrap();
                    assert_eq!(w.repack(), avx512, "{ty}");
                    w
                })
                .collect();
            let refs: Vec<&QuantMatrix> = ws.iter().collect();
            let kquants = set.iter().any(|&(ty, _)| kquant::supported(ty));
            for m in [1usize, 2, 5, 8] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                // The last rows of a 7-row solo prompt (Q4_K's gemm fold, Q6_K's tiled
                // kernel), decode rows of m sequences (as `ember serve` batches them), and no
                // solo rows at all.
                let prompt: std::sync::Arc<[SoloRow]> = (0..m)
                    .map(|i| SoloRow {
                        m: 7,
                        i: (7 - m + i) as u32,
                    })
                    .collect();
                let decode_rows: std::sync::Arc<[SoloRow]> =
                    (0..m).map(|_| SoloRow { m: 1, i: 0 }).collect();
                for (solo, decode) in [
                    (None, false),
                    (Some(&prompt), false),
                    (Some(&decode_rows), true),
                ] {
                    let got = quant_matmul_rows_many(&refs, &x, m, solo);
                    let at = format!("{set:?} m={m} solo={solo:?}");
                    let Some(got) = got else {
                        // Refused only without AVX-512 VNNI, or for K-quant rows that take
                        // tiles.
                        assert!(!avx512 || (kquants && m > 1 && !decode), "{at}: refused");
                        continue;
                    };
                    assert!(avx512, "{at}: taken without repacked weights");
                    assert_eq!(got.len(), ws.len());
                    for (w, g) in ws.iter().zip(&got) {
                        let want = quant_matmul_rows_solo(w, &x, m, solo);
                        assert_eq!(bits(g), bits(&want), "{at} {}", w.ggml_type());
                    }
                    if kquants && decode {
                        kquant_decode_taken += 1;
                    }
                }
            }
        }
        // Every K-quant set took the shared region for decode rows, one or several.
        assert!(
            !avx512 || kquant_decode_taken == 3 * 4,
            "{kquant_decode_taken}"
        );
        // Not repacked: refused.
        let wf: Vec<f32> = (0..16 * k)
            .map(|_| rng.random_range(-1.0..1.0f32))
            .collect();
        let plain = QuantMatrix::quantize(GgmlType::Q4_1, 16, k, &wf).unwrap();
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
        assert!(quant_matmul_rows_many(&[&plain], &x, 1, None).is_none());
    }
}
