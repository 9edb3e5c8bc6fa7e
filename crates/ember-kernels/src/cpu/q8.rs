//! Integer dot products of ggml's legacy block formats against activations quantized to 8 bits,
//! computed exactly as llama.cpp computes them on x86, so that every result has llama.cpp's
//! bits.
//!
//! llama.cpp never multiplies a Q4_1 weight by an f32 activation: it first quantizes the
//! activation row to Q8_1 (Q8_0 for the symmetric formats) and then, per 32-value block `b`,
//! takes eight integer sums of four products each (`isum_b[L]` over values `4L..4L + 4`) and
//! accumulates them in eight f32 lanes, `acc[L] = fma(dw_b * da_b, isum_b[L], acc[L])`. The row
//! result is the lanes folded as `hsum_float_8` folds them, `((a0 + a4) + (a2 + a6)) + ((a1 +
//! a5) + (a3 + a7))`, plus, for the formats with an offset, `summs = fma(mw_b, sa_b, summs)`
//! chained over the blocks. That is the definition here (the private `scalar` module); every
//! SIMD kernel returns the same bits, and the model's logits come out as llama.cpp's, bit for
//! bit (`ember-runtime`'s fidelity test). Anything less exact is not a rounding detail on these
//! models: one activation rounded the other way moves SmolLM2's logits by tenths.
//!
//! Entry points: [`dot_packed_batch`] straight off the packed blocks (decode, small batches),
//! and [`Tile`] + [`tile_matmul`] for large batches (16 weight rows unpacked to memory once and
//! reused for every activation row). On AVX-512 VNNI the kernels lay 16 weight rows across the
//! lanes of a vector and keep the eight accumulators of each row in eight vectors, so one
//! `vpdpbusd` yields the lane sums of 16 rows and no horizontal work is done until the end.
//!
//! Each entry point picks, once per process, the best instruction set the CPU has ([`isa`]):
//! AVX-512 VNNI, AVX2 (+FMA, F16C), NEON (aarch64), or portable scalar code.

use std::sync::OnceLock;

use ember_quant::GgmlType;
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
mod neon;
mod repack;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
pub(crate) use repack::RELEASE_STEP;
pub use repack::Repacked;
pub(crate) use repack::{GroupLayout, Line, Lines, repack_groups};

/// Elements per block in every format handled here.
pub const BLOCK: usize = 32;

/// Four-value groups per block: ggml's eight f32 accumulator lanes.
pub const LANES: usize = 8;

/// How activations are quantized for a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Symmetric, one f16 scale per block (ggml's Q8_0).
    Q8_0,
    /// Q8_0 plus `s = d * sum(q)` per block, for weights with an offset (ggml's Q8_1).
    Q8_1,
}

/// The activation format llama.cpp pairs with a weight type, or `None` where this module has
/// no integer path.
pub fn act_format(ty: GgmlType) -> Option<ActFormat> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(ActFormat::Q8_0),
        GgmlType::Q4_1 | GgmlType::Q5_1 => Some(ActFormat::Q8_1),
        _ => None,
    }
}

/// Whether a type's weights may be negative (its blocks have no offset).
fn signed(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// `m` rows of `k` activations quantized in blocks of 32.
pub struct QuantizedActs {
    /// Values per row: a multiple of [`BLOCK`].
    pub k: usize,
    /// `m * k` quantized values.
    pub qs: Vec<i8>,
    /// One scale per block (already rounded through f16, as ggml stores it).
    pub d: Vec<f32>,
    /// `d * sum(q)` per block rounded through f16 (Q8_1 only; zeros for Q8_0).
    pub s: Vec<f32>,
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// An instruction set the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, whatever the target.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX2 + FMA + F16C + AVX-512 (F, BW, VL, VNNI).
    Avx512Vnni,
    /// aarch64 NEON (Advanced SIMD): the dot products; quantization and unpacking run the
    /// scalar code.
    Neon,
}

impl Isa {
    /// Whether this CPU can run code compiled for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            _ => false,
        }
    }
}

/// The instruction set the dispatched kernels use: the best this CPU supports, detected once.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        [Isa::Avx512Vnni, Isa::Avx2, Isa::Neon]
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Scalar)
    })
}

/// Quantizes row-major `x: [m, k]` (`k` a multiple of 32) as ggml's x86 `quantize_row_q8_{0,1}`
/// does: scale by `127 / amax` and round half to even (`_mm256_round_ps`), which differs from
/// the scalar reference (`1 / d`, round half away from zero) in the last bit now and then.
pub fn quantize_acts(x: &[f32], k: usize, fmt: ActFormat) -> QuantizedActs {
    quantize_acts_with(isa(), x, k, fmt)
}

/// [`quantize_acts`] compiled for `isa`, which must be [`Isa::supported`] (panics otherwise).
pub fn quantize_acts_with(isa: Isa, x: &[f32], k: usize, fmt: ActFormat) -> QuantizedActs {
    match isa {
        Isa::Scalar => scalar::quantize_acts(x, k, fmt),
        Isa::Neon if isa.supported() => scalar::quantize_acts(x, k, fmt),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if isa.supported() => {
            assert!(k.is_multiple_of(BLOCK), "k is not a multiple of {BLOCK}");
            let nb = x.len() / BLOCK;
            let mut acts = QuantizedActs {
                k,
                qs: vec![0; nb * BLOCK],
                d: vec![0.0; nb],
                s: vec![0.0; nb],
            };
            let x = &x[..nb * BLOCK];
            // SAFETY (every call): the CPU supports AVX2, FMA and F16C (checked at run time).
            let run = |x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]| unsafe {
                x86::avx2::quantize_acts_into(x, qs, d, s, fmt)
            };
            if nb < 2 * ACT_BLOCKS_PER_TASK {
                run(x, &mut acts.qs, &mut acts.d, &mut acts.s);
            } else {
                // Each block is quantized alone, so the split gives the same bytes.
                x.par_chunks(ACT_BLOCKS_PER_TASK * BLOCK)
                    .zip(acts.qs.par_chunks_mut(ACT_BLOCKS_PER_TASK * BLOCK))
                    .zip(acts.d.par_chunks_mut(ACT_BLOCKS_PER_TASK))
                    .zip(acts.s.par_chunks_mut(ACT_BLOCKS_PER_TASK))
                    .for_each(|(((x, qs), d), s)| run(x, qs, d, s));
            }
            acts
        }
        _ => panic!("{isa:?} is not supported by this CPU"),
    }
}

/// Blocks a task of [`quantize_acts`] takes once an input holds at least twice as many: a
/// prompt's activations are quantized on every worker, a decode row (SmolLM2: 18 to 48
/// blocks) on the calling thread.
const ACT_BLOCKS_PER_TASK: usize = 256;

/// One weight row unpacked to `i8` values with per-block scale `d` and offset `m`.
#[derive(Default)]
pub struct UnpackedRow {
    /// The row's values, one `i8` each: Q4_0 and Q5_0 centred (minus 8, minus 16), Q4_1 and
    /// Q5_1 as stored (non-negative), Q8_0 as stored.
    pub q: Vec<i8>,
    /// One scale per block.
    pub d: Vec<f32>,
    /// One offset per block (Q4_1, Q5_1); zeros for the symmetric formats.
    pub m: Vec<f32>,
    /// Every value in `q` is non-negative (Q4_1, Q5_1): lets SIMD skip a sign fix-up.
    pub unsigned: bool,
}

/// Unpacks one row of `ty` blocks (a type with [`act_format`] `Some`).
pub fn unpack_row(ty: GgmlType, row: &[u8], out: &mut UnpackedRow) {
    unpack_row_with(isa(), ty, row, out)
}

/// [`unpack_row`] compiled for `isa`, which must be [`Isa::supported`] (panics otherwise).
pub fn unpack_row_with(isa: Isa, ty: GgmlType, row: &[u8], out: &mut UnpackedRow) {
    match isa {
        Isa::Scalar => scalar::unpack_row(ty, row, out),
        Isa::Neon if isa.supported() => scalar::unpack_row(ty, row, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if isa.supported() => {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
            unsafe { x86::avx2::unpack_row(ty, row, out) }
        }
        _ => panic!("{isa:?} is not supported by this CPU"),
    }
}

/// Dot product of an unpacked weight row with activation row `i`, as llama.cpp's
/// `ggml_vec_dot_*_q8_*` computes it (see the module docs).
pub fn dot(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
    dot_with(isa(), row, acts, i, with_min)
}

/// [`dot`] compiled for `isa`, which must be [`Isa::supported`] (panics otherwise).
pub fn dot_with(
    isa: Isa,
    row: &UnpackedRow,
    acts: &QuantizedActs,
    i: usize,
    with_min: bool,
) -> f32 {
    match isa {
        Isa::Scalar => scalar::dot(row, acts, i, with_min),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon if isa.supported() => {
            // SAFETY: the CPU supports NEON (checked at run time).
            unsafe { neon::dot(row, acts, i, with_min) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if isa.supported() => {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
            unsafe { x86::avx2::dot(row, acts, i, with_min) }
        }
        _ => panic!("{isa:?} is not supported by this CPU"),
    }
}

/// `m` activation rows prepared for [`dot_packed_batch`] and [`tile_matmul`].
pub struct Batch {
    /// Activation rows.
    pub m: usize,
    /// The rows quantized in blocks of [`BLOCK`].
    pub acts: QuantizedActs,
    /// Per row, block and lane, `-128 * sum` of the lane's four values: laid out
    /// `[row][block][lane]` (AVX-512 VNNI with Q8_0 activations only, i.e. signed weights,
    /// which its kernels store plus 128).
    pub corr: Vec<i32>,
}

impl Batch {
    /// Panics unless the batch holds its `m` rows (and their corrections, for signed weights
    /// on AVX-512 VNNI).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn check(&self, signed: bool) {
        let nb = self.acts.k / BLOCK;
        assert!(
            self.acts.qs.len() >= self.m * self.acts.k,
            "activations shorter than m"
        );
        assert!(self.acts.d.len() >= self.m * nb && self.acts.s.len() >= self.m * nb);
        assert!(
            !signed || self.corr.len() >= self.m * nb * LANES,
            "batch not prepared for signed weights on AVX-512 VNNI"
        );
    }
}

/// Quantizes row-major `x: [m, k]` ([`quantize_acts`]) and prepares it for
/// [`dot_packed_batch`] and [`tile_matmul`].
pub fn prepare_batch(x: &[f32], k: usize, m: usize, fmt: ActFormat) -> Batch {
    prepare_batch_with(isa(), x, k, m, fmt)
}

/// [`prepare_batch`] compiled for `isa`, which must be [`Isa::supported`].
pub fn prepare_batch_with(isa: Isa, x: &[f32], k: usize, m: usize, fmt: ActFormat) -> Batch {
    assert_eq!(x.len(), m * k, "x is not m rows of k");
    let acts = quantize_acts_with(isa, x, k, fmt);
    let corr = if isa == Isa::Avx512Vnni && fmt == ActFormat::Q8_0 {
        let group = |g: &[i8]| -128 * g.iter().map(|&v| v as i32).sum::<i32>();
        if acts.qs.len() < 2 * ACT_BLOCKS_PER_TASK * BLOCK {
            acts.qs.chunks_exact(4).map(group).collect()
        } else {
            acts.qs
                .par_chunks_exact(4)
                .with_min_len(ACT_BLOCKS_PER_TASK * BLOCK / 4)
                .map(group)
                .collect()
        }
    } else {
        Vec::new()
    };
    Batch { m, acts, corr }
}

/// Weight rows per [`Tile`] (and per pass of the AVX-512 VNNI kernels).
pub const TILE_ROWS: usize = 16;

/// Up to [`TILE_ROWS`] weight rows unpacked for [`tile_matmul`]: as [`UnpackedRow`]s or, for
/// AVX-512 VNNI, interleaved so that each 64-byte group holds four consecutive values of one
/// block from every row (`q[((b * 8 + j) * 16 + l) * 4 + e]` = value `4j + e` of block `b` of
/// row `l`, plus 128 as a `u8` bit pattern for signed types), with per-block scales
/// `d[b * 16 + l]` and offsets `m[b * 16 + l]`. Lanes past `rows` repeat the last row.
#[derive(Default)]
pub struct Tile {
    /// Weight rows loaded (at most [`TILE_ROWS`]).
    pub rows: usize,
    /// Blocks per row.
    pub nb: usize,
    /// The weight type has no offset, so its values may be negative (Q4_0, Q5_0, Q8_0).
    pub signed: bool,
    /// The interleaved values (AVX-512 VNNI only; layout above).
    pub q: Vec<i8>,
    /// The interleaved scales, `d[b * 16 + l]` (AVX-512 VNNI only).
    pub d: Vec<f32>,
    /// The interleaved offsets, `m[b * 16 + l]` (AVX-512 VNNI only).
    pub m: Vec<f32>,
    /// The rows unpacked one by one (every other instruction set); may hold more than `rows`
    /// entries, left from an earlier load.
    pub un: Vec<UnpackedRow>,
    interleaved: bool,
}

impl Tile {
    /// Loads the packed `ty` rows in `rows` (at most [`TILE_ROWS`], each `row_bytes` long).
    pub fn load(&mut self, ty: GgmlType, rows: &[u8], row_bytes: usize) {
        self.load_with(isa(), ty, rows, row_bytes)
    }

    /// [`Tile::load`] for kernels compiled for `isa`, which must be [`Isa::supported`].
    pub fn load_with(&mut self, isa: Isa, ty: GgmlType, rows: &[u8], row_bytes: usize) {
        let n = rows.len() / row_bytes.max(1);
        assert!(
            n <= TILE_ROWS && n * row_bytes == rows.len(),
            "bad tile rows"
        );
        assert!(act_format(ty).is_some(), "{ty} has no integer path");
        self.rows = n;
        self.nb = row_bytes / ty.type_size();
        self.signed = signed(ty);
        self.interleaved = false;
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.supported() && n > 0 => {
                // SAFETY: the CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked).
                unsafe { x86::avx512_tile_load(ty, rows, row_bytes, self) };
                self.interleaved = true;
            }
            _ => {
                self.un.resize_with(n.max(self.un.len()), Default::default);
                for (un, row) in self.un.iter_mut().zip(rows.chunks_exact(row_bytes.max(1))) {
                    unpack_row_with(isa, ty, row, un);
                }
            }
        }
    }

    /// Panics unless the tile is interleaved and matches `batch`'s width.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn check(&self, batch: &Batch) {
        let nb = self.nb;
        assert!(self.interleaved, "tile not interleaved");
        assert_eq!(
            nb * BLOCK,
            batch.acts.k,
            "tile width differs from activations"
        );
        assert!(self.q.len() >= nb * BLOCK * TILE_ROWS);
        assert!(self.d.len() >= nb * TILE_ROWS && self.m.len() >= nb * TILE_ROWS);
    }
}

/// `out[i * tile.rows + l]` = `dot(row l of tile, activation row i)` for every row `i` of
/// `batch`: bit for bit [`dot`]'s results.
pub fn tile_matmul(tile: &Tile, batch: &Batch, with_min: bool, out: &mut [f32]) {
    tile_matmul_with(isa(), tile, batch, with_min, out)
}

/// [`tile_matmul`] compiled for `isa`, which must be [`Isa::supported`] and the one `tile`
/// and `batch` were prepared for.
pub fn tile_matmul_with(isa: Isa, tile: &Tile, batch: &Batch, with_min: bool, out: &mut [f32]) {
    let (m, rows) = (batch.m, tile.rows);
    assert_eq!(out.len(), m * rows, "out does not match the tile");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.supported() && tile.rows > 0 => {
            // SAFETY: the CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked).
            unsafe { x86::avx512_tile_matmul(tile, batch, with_min, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
            unsafe { x86::avx2_tile_matmul(tile, batch, with_min, out) }
        }
        Isa::Scalar | Isa::Avx2 | Isa::Avx512Vnni | Isa::Neon => {
            for (l, un) in tile.un[..rows].iter().enumerate() {
                for i in 0..m {
                    out[i * rows + l] = dot_with(isa, un, &batch.acts, i, with_min);
                }
            }
        }
    }
}

/// The largest batch for which [`dot_packed_batch`] beats [`Tile`] + [`tile_matmul`] on this
/// CPU: AVX-512 VNNI unpacks sixteen rows per block in registers, which pays only for one
/// activation row; the other kernels unpack a block per weight row and reuse it for up to
/// eight.
pub fn packed_batch_max() -> usize {
    match isa() {
        Isa::Avx512Vnni => 1,
        _ => 8,
    }
}

/// `out[i * n + r]` = dot of packed `ty` row `r` of `rows` (`n` rows of `batch.acts.k`
/// values) with activation row `i` of `batch`, for every `i < batch.m`: bit for bit what
/// [`unpack_row`] then [`dot`] give, reading the packed blocks directly (decode, and the small
/// batches of several sequences decoding together).
pub fn dot_packed_batch(ty: GgmlType, rows: &[u8], batch: &Batch, out: &mut [f32]) {
    dot_packed_batch_with(isa(), ty, rows, batch, out)
}

/// [`dot_packed_batch`] compiled for `isa`, which must be [`Isa::supported`] and the one
/// `batch` was prepared for.
pub fn dot_packed_batch_with(isa: Isa, ty: GgmlType, rows: &[u8], batch: &Batch, out: &mut [f32]) {
    let row_bytes = batch.acts.k / BLOCK * ty.type_size();
    let n = packed_rows(rows, row_bytes, batch, out);
    assert!(act_format(ty).is_some(), "{ty} has no integer path");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
            unsafe { x86::avx2_dot_packed_batch(ty, rows, batch, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.supported() => {
            // SAFETY: the CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked).
            unsafe { x86::avx512_dot_packed_batch(ty, rows, batch, out) }
        }
        Isa::Scalar | Isa::Neon if isa.supported() => {
            // Unpack each row once, then one dot per activation row.
            let with_min = act_format(ty) == Some(ActFormat::Q8_1);
            let mut un = UnpackedRow::default();
            for (r, row) in rows.chunks_exact(row_bytes.max(1)).enumerate() {
                unpack_row_with(isa, ty, row, &mut un);
                for i in 0..batch.m {
                    out[i * n + r] = dot_with(isa, &un, &batch.acts, i, with_min);
                }
            }
        }
        _ => panic!("{isa:?} is not supported by this CPU"),
    }
}

/// The number of packed rows of `row_bytes` in `rows`, after checking that they are whole rows
/// of `batch`'s width and that `out` holds one result per row and activation row (every
/// packed-batch kernel relies on this).
fn packed_rows(rows: &[u8], row_bytes: usize, batch: &Batch, out: &[f32]) -> usize {
    let n = rows.len() / row_bytes.max(1);
    assert_eq!(
        n * row_bytes,
        rows.len(),
        "rows do not match the activations"
    );
    assert_eq!(out.len(), batch.m * n, "out does not match the rows");
    n
}

/// The portable kernels: the definition of what every SIMD version must return.
mod scalar {
    use super::*;

    /// Quantizes one block with reciprocal scale `inv`, returning the sum of the values.
    pub(super) fn quantize_block(src: &[f32], dst: &mut [i8], inv: f32) -> i32 {
        let mut sum = 0i32;
        for (q, &v) in dst.iter_mut().zip(src) {
            let r = (v * inv).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        sum
    }

    pub(super) fn quantize_acts(x: &[f32], k: usize, fmt: ActFormat) -> QuantizedActs {
        debug_assert_eq!(k % BLOCK, 0);
        let nb = x.len() / BLOCK;
        let mut qs = vec![0i8; x.len()];
        let mut d = vec![0.0f32; nb];
        let mut s = vec![0.0f32; nb];
        for (b, (src, dst)) in x
            .chunks_exact(BLOCK)
            .zip(qs.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = src.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let sum = quantize_block(src, dst, inv);
            d[b] = round_f16(scale);
            if fmt == ActFormat::Q8_1 {
                // ggml: `GGML_FP32_TO_FP16(d * sum)` with the unrounded f32 scale.
                s[b] = round_f16(sum as f32 * scale);
            }
        }
        QuantizedActs { k, qs, d, s }
    }

    pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }
    pub(super) fn unpack_row(ty: GgmlType, row: &[u8], out: &mut UnpackedRow) {
        let bs = ty.type_size();
        let nb = row.len() / bs;
        out.q.resize(nb * BLOCK, 0);
        out.d.resize(nb, 0.0);
        out.m.resize(nb, 0.0);
        out.unsigned = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        for (b, blk) in row.chunks_exact(bs).enumerate() {
            let q = &mut out.q[b * BLOCK..(b + 1) * BLOCK];
            match ty {
                GgmlType::Q4_0 => {
                    out.d[b] = f16_at(blk, 0);
                    let qs = &blk[2..18];
                    for j in 0..16 {
                        q[j] = (qs[j] & 0x0F) as i8 - 8;
                        q[j + 16] = (qs[j] >> 4) as i8 - 8;
                    }
                }
                GgmlType::Q4_1 => {
                    out.d[b] = f16_at(blk, 0);
                    out.m[b] = f16_at(blk, 2);
                    let qs = &blk[4..20];
                    for j in 0..16 {
                        q[j] = (qs[j] & 0x0F) as i8;
                        q[j + 16] = (qs[j] >> 4) as i8;
                    }
                }
                GgmlType::Q5_0 => {
                    out.d[b] = f16_at(blk, 0);
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    let qs = &blk[6..22];
                    for j in 0..16 {
                        let h0 = (((qh >> j) << 4) & 0x10) as u8;
                        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                        q[j] = ((qs[j] & 0x0F) | h0) as i8 - 16;
                        q[j + 16] = ((qs[j] >> 4) | h1) as i8 - 16;
                    }
                }
                GgmlType::Q5_1 => {
                    out.d[b] = f16_at(blk, 0);
                    out.m[b] = f16_at(blk, 2);
                    let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                    let qs = &blk[8..24];
                    for j in 0..16 {
                        let h0 = (((qh >> j) << 4) & 0x10) as u8;
                        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                        q[j] = ((qs[j] & 0x0F) | h0) as i8;
                        q[j + 16] = ((qs[j] >> 4) | h1) as i8;
                    }
                }
                GgmlType::Q8_0 => {
                    out.d[b] = f16_at(blk, 0);
                    for (dst, &v) in q.iter_mut().zip(&blk[2..34]) {
                        *dst = v as i8;
                    }
                }
                other => unreachable!("unpack_row called for {other}, which has no integer path"),
            }
        }
    }

    /// ggml's `hsum_float_8`: halves added, then pairs of the four, then the last two.
    #[inline(always)]
    pub(super) fn hsum8(a: &[f32; LANES]) -> f32 {
        ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
    }

    /// The lane sums of one block: `out[L] = sum of w[4L + e] * x[4L + e]`, `e < 4`.
    #[inline(always)]
    pub(super) fn block_lanes(w: &[i8], x: &[i8]) -> [i32; LANES] {
        let mut out = [0i32; LANES];
        for (l, o) in out.iter_mut().enumerate() {
            for e in 0..4 {
                *o += w[4 * l + e] as i32 * x[4 * l + e] as i32;
            }
        }
        out
    }

    pub(super) fn dot(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
        let nb = acts.k / BLOCK;
        let xq = &acts.qs[i * acts.k..(i + 1) * acts.k];
        let xd = &acts.d[i * nb..(i + 1) * nb];
        let xs = &acts.s[i * nb..(i + 1) * nb];
        assert!(
            row.q.len() >= acts.k && row.d.len() >= nb,
            "row shorter than activations"
        );
        assert!(!with_min || row.m.len() >= nb, "row has no offsets");
        let mut acc = [0.0f32; LANES];
        let mut summs = 0.0f32;
        for b in 0..nb {
            let blk = b * BLOCK..(b + 1) * BLOCK;
            let lanes = block_lanes(&row.q[blk.clone()], &xq[blk]);
            let dd = row.d[b] * xd[b];
            for (a, &s) in acc.iter_mut().zip(&lanes) {
                *a = dd.mul_add(s as f32, *a);
            }
            if with_min {
                summs = row.m[b].mul_add(xs[b], summs);
            }
        }
        let h = hsum8(&acc);
        if with_min { h + summs } else { h }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Prompt-sized inputs are quantized on every worker: the same bytes as block by block,
    /// at the split's edge and past it, for both formats (with the Q8_0 corrections).
    #[test]
    fn split_activation_quantization_equals_block_by_block() {
        let mut rng = StdRng::seed_from_u64(0xac7);
        let edge = 2 * ACT_BLOCKS_PER_TASK;
        for nb in [edge - 1, edge, edge + 1, 3 * edge + 7] {
            let mut x: Vec<f32> = (0..nb * BLOCK)
                .map(|_| rng.random_range(-6.0..6.0f32))
                .collect();
            x[5 * BLOCK..6 * BLOCK].fill(0.0);
            for fmt in [ActFormat::Q8_0, ActFormat::Q8_1] {
                let all = prepare_batch(&x, BLOCK, nb, fmt);
                for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                    let one = prepare_batch(xb, BLOCK, 1, fmt);
                    let at = format!("{fmt:?} {nb}: block {b}");
                    assert_eq!(
                        all.acts.qs[b * BLOCK..(b + 1) * BLOCK],
                        one.acts.qs[..],
                        "{at}"
                    );
                    assert_eq!(all.acts.d[b].to_bits(), one.acts.d[0].to_bits(), "{at}");
                    assert_eq!(all.acts.s[b].to_bits(), one.acts.s[0].to_bits(), "{at}");
                    if !one.corr.is_empty() {
                        assert_eq!(
                            all.corr[b * BLOCK / 4..(b + 1) * BLOCK / 4],
                            one.corr[..],
                            "{at}"
                        );
                    }
                }
            }
        }
    }

    /// f64 reference: dequantize the weight row, dequantize the quantized activations, dot.
    fn reference(ty: GgmlType, row: &[u8], acts: &QuantizedActs, i: usize) -> f64 {
        let k = acts.k;
        let mut w = vec![0.0f32; k];
        ember_quant::dequantize(ty, row, &mut w).unwrap();
        let xq = &acts.qs[i * k..(i + 1) * k];
        let nb = k / BLOCK;
        (0..k)
            .map(|j| w[j] as f64 * xq[j] as f64 * acts.d[i * nb + j / BLOCK] as f64)
            .sum()
    }

    #[test]
    fn integer_dot_matches_dequantized_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            for _ in 0..20 {
                let k = 32 * rng.random_range(1..12);
                let w: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let x: Vec<f32> = (0..2 * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                let row = ember_quant::quantize(ty, &w).unwrap();
                let fmt = act_format(ty).unwrap();
                let acts = quantize_acts(&x, k, fmt);
                let mut un = UnpackedRow::default();
                unpack_row(ty, &row, &mut un);
                for i in 0..2 {
                    let got = dot(&un, &acts, i, fmt == ActFormat::Q8_1) as f64;
                    let want = reference(ty, &row, &acts, i);
                    // Q8_1's `s = round_f16(d * sum(q))` differs from `round_f16(d) * sum(q)`
                    // (what the reference uses) by up to an f16 half-ulp for each of the two
                    // roundings: 2^-10 relative, times the block offset `m`.
                    let nb = k / BLOCK;
                    let offset_err: f64 = if fmt == ActFormat::Q8_1 {
                        (0..nb)
                            .map(|b| (un.m[b] as f64 * acts.s[i * nb + b] as f64).abs())
                            .sum::<f64>()
                            * 2f64.powi(-10)
                    } else {
                        0.0
                    };
                    let tol = 1e-4 * (1.0 + want.abs()) + 1.01 * offset_err;
                    assert!((got - want).abs() <= tol, "{ty} k={k}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn activation_quantization_matches_ggml_reference() {
        // ember-quant's reference quantizer implements ggml's quantize_row_q8_0_ref.
        let mut rng = StdRng::seed_from_u64(11);
        let x: Vec<f32> = (0..256).map(|_| rng.random_range(-5.0..5.0f32)).collect();
        let acts = quantize_acts(&x, 256, ActFormat::Q8_0);
        let bytes = ember_quant::quantize(GgmlType::Q8_0, &x).unwrap();
        for b in 0..8 {
            let blk = &bytes[b * 34..(b + 1) * 34];
            assert_eq!(acts.d[b], scalar::f16_at(blk, 0));
            for j in 0..32 {
                // Rounding ties may go the other way (x86 rounds half to even).
                let diff = (acts.qs[b * 32 + j] as i32 - blk[2 + j] as i8 as i32).abs();
                assert!(diff <= 1, "block {b} item {j}");
            }
        }
    }

    /// Bit patterns, with every NaN the same (NaN payloads are not part of the contract).
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter()
            .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
            .collect()
    }

    /// A random finite f16 (normals across the whole range, subnormals, zeros), as raw bits.
    fn random_f16(rng: &mut StdRng) -> u16 {
        let sign = if rng.random_bool(0.5) { 0x8000 } else { 0 };
        let mag = match rng.random_range(0..10) {
            0 => 0,
            1 => rng.random_range(1..0x400),       // subnormal
            2 => rng.random_range(0x400..0x7C00),  // any normal
            _ => rng.random_range(0x1000..0x3000), // typical scale magnitudes
        };
        sign | mag
    }

    /// Random blocks of `ty`: every quant bit pattern, random finite scales.
    fn random_row(ty: GgmlType, nb: usize, rng: &mut StdRng) -> Vec<u8> {
        let bs = ty.type_size();
        let mut row: Vec<u8> = (0..nb * bs).map(|_| rng.random()).collect();
        let scales = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            2
        } else {
            1
        };
        for blk in row.chunks_exact_mut(bs) {
            for s in 0..scales {
                blk[2 * s..2 * s + 2].copy_from_slice(&random_f16(rng).to_le_bytes());
            }
        }
        row
    }

    /// Activations of mixed magnitudes, with some all-zero, tiny, infinite and NaN blocks.
    fn random_acts(len: usize, rng: &mut StdRng) -> Vec<f32> {
        let mut x = vec![0.0f32; len];
        for blk in x.chunks_exact_mut(BLOCK) {
            let kind = rng.random_range(0..20);
            let mag = match kind {
                0 => 0.0,
                1 => 1e-42,
                2 => 1e30,
                _ => 10f32.powf(rng.random_range(-4.0..2.0)),
            };
            for v in blk.iter_mut() {
                *v = rng.random_range(-1.0..1.0f32) * mag;
            }
            match kind {
                3 => blk[rng.random_range(0..BLOCK)] = f32::INFINITY,
                4 => blk[rng.random_range(0..BLOCK)] = f32::NAN,
                5 => {
                    // Exact ties after scaling: values that are multiples of amax / 254.
                    for v in blk.iter_mut() {
                        *v = rng.random_range(-254i32..=254) as f32 * 0.5;
                    }
                    blk[0] = 127.0;
                }
                _ => {}
            }
        }
        x
    }

    fn simd_isas() -> Vec<Isa> {
        [Isa::Avx2, Isa::Avx512Vnni, Isa::Neon]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    #[test]
    fn simd_kernels_match_scalar_bit_for_bit() {
        let isas = simd_isas();
        eprintln!(
            "comparing {isas:?} against scalar (dispatch picks {:?})",
            isa()
        );
        let mut rng = StdRng::seed_from_u64(0x5EED);
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ];
        for case in 0..400 {
            let ty = types[case % types.len()];
            let nb = match case % 4 {
                0 => rng.random_range(1..8),
                1 => rng.random_range(8..70),
                2 => 18,
                _ => 48,
            };
            let k = nb * BLOCK;
            let m = rng.random_range(1..4);
            let n = rng.random_range(1..6);
            let fmt = act_format(ty).unwrap();
            let with_min = fmt == ActFormat::Q8_1;
            let x = random_acts(m * k, &mut rng);
            let rows: Vec<u8> = (0..n).flat_map(|_| random_row(ty, nb, &mut rng)).collect();
            let row_bytes = nb * ty.type_size();

            let acts = quantize_acts_with(Isa::Scalar, &x, k, fmt);
            let mut want = vec![0.0f32; n * m];
            let mut un = UnpackedRow::default();
            let mut unpacked = Vec::new();
            for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
                unpack_row_with(Isa::Scalar, ty, row, &mut un);
                for i in 0..m {
                    want[i * n + r] = dot_with(Isa::Scalar, &un, &acts, i, with_min);
                }
                unpacked.push((un.q.clone(), bits(&un.d), bits(&un.m), un.unsigned));
            }

            for &isa in &isas {
                let ctx = format!("{isa:?} {ty} k={k} m={m} n={n} case={case}");
                let a = quantize_acts_with(isa, &x, k, fmt);
                assert_eq!(a.qs, acts.qs, "{ctx}: quantized activations");
                assert_eq!(bits(&a.d), bits(&acts.d), "{ctx}: activation scales");
                assert_eq!(bits(&a.s), bits(&acts.s), "{ctx}: activation sums");
                let mut un = UnpackedRow::default();
                for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
                    unpack_row_with(isa, ty, row, &mut un);
                    let (q, d, mm, unsigned) = &unpacked[r];
                    assert_eq!(&un.q, q, "{ctx}: unpacked values");
                    assert_eq!(&bits(&un.d), d, "{ctx}: unpacked scales");
                    if with_min {
                        assert_eq!(&bits(&un.m), mm, "{ctx}: unpacked offsets");
                    }
                    assert_eq!(un.unsigned, *unsigned, "{ctx}: signedness");
                    for i in 0..m {
                        let got = dot_with(isa, &un, &acts, i, with_min);
                        assert_eq!(bits(&[got]), bits(&[want[i * n + r]]), "{ctx}: dot row {r}");
                    }
                }
                let batch = prepare_batch_with(isa, &x, k, m, fmt);
                let mut got = vec![0.0f32; n * m];
                dot_packed_batch_with(isa, ty, &rows, &batch, &mut got);
                assert_eq!(bits(&got), bits(&want), "{ctx}: packed");
            }
        }
    }

    #[test]
    fn tile_matmul_matches_scalar_bit_for_bit() {
        let mut isas = simd_isas();
        isas.push(Isa::Scalar);
        let mut rng = StdRng::seed_from_u64(0x711E);
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ];
        for case in 0..200 {
            let ty = types[case % types.len()];
            let m = [2, 3, 4, 5, 8, 17, 1, 9][(case / types.len()) % 8];
            let nb = match case % 3 {
                0 => rng.random_range(1..8),
                1 => rng.random_range(8..40),
                _ => 18,
            };
            let k = nb * BLOCK;
            let n = if case % 2 == 0 {
                TILE_ROWS
            } else {
                rng.random_range(1..=TILE_ROWS)
            };
            let fmt = act_format(ty).unwrap();
            let with_min = fmt == ActFormat::Q8_1;
            let x = random_acts(m * k, &mut rng);
            let rows: Vec<u8> = (0..n).flat_map(|_| random_row(ty, nb, &mut rng)).collect();
            let row_bytes = nb * ty.type_size();
            let acts = quantize_acts_with(Isa::Scalar, &x, k, fmt);
            let mut want = vec![0.0f32; m * n];
            let mut un = UnpackedRow::default();
            for (l, row) in rows.chunks_exact(row_bytes).enumerate() {
                unpack_row_with(Isa::Scalar, ty, row, &mut un);
                for i in 0..m {
                    want[i * n + l] = dot_with(Isa::Scalar, &un, &acts, i, with_min);
                }
            }
            for &isa in &isas {
                let ctx = format!("{isa:?} {ty} k={k} m={m} n={n} case={case}");
                let batch = prepare_batch_with(isa, &x, k, m, fmt);
                let mut tile = Tile::default();
                tile.load_with(isa, ty, &rows, row_bytes);
                let mut got = vec![0.0f32; m * n];
                tile_matmul_with(isa, &tile, &batch, with_min, &mut got);
                assert_eq!(bits(&got), bits(&want), "{ctx}: tile");
            }
        }
    }

    #[test]
    fn packed_batch_matches_scalar_bit_for_bit() {
        let mut isas = simd_isas();
        isas.push(Isa::Scalar);
        let mut rng = StdRng::seed_from_u64(0xFA57);
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ];
        let batches = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17];
        for case in 0..330 {
            let ty = types[case % types.len()];
            let m = batches[(case / types.len()) % batches.len()];
            let nb = match case % 3 {
                0 => rng.random_range(1..8),
                1 => rng.random_range(8..40),
                _ => 18,
            };
            let k = nb * BLOCK;
            // One tile, part of one, and several with a partial last one.
            let n = match case % 4 {
                0 => TILE_ROWS,
                1 => rng.random_range(1..TILE_ROWS),
                2 => rng.random_range(TILE_ROWS + 1..4 * TILE_ROWS),
                _ => 2 * TILE_ROWS,
            };
            let fmt = act_format(ty).unwrap();
            let with_min = fmt == ActFormat::Q8_1;
            let x = random_acts(m * k, &mut rng);
            let rows: Vec<u8> = (0..n).flat_map(|_| random_row(ty, nb, &mut rng)).collect();
            let row_bytes = nb * ty.type_size();
            let acts = quantize_acts_with(Isa::Scalar, &x, k, fmt);
            let mut want = vec![0.0f32; m * n];
            let mut un = UnpackedRow::default();
            for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
                unpack_row_with(Isa::Scalar, ty, row, &mut un);
                for i in 0..m {
                    want[i * n + r] = dot_with(Isa::Scalar, &un, &acts, i, with_min);
                }
            }
            for &isa in &isas {
                let ctx = format!("{isa:?} {ty} k={k} m={m} n={n} case={case}");
                let batch = prepare_batch_with(isa, &x, k, m, fmt);
                let mut got = vec![0.0f32; m * n];
                dot_packed_batch_with(isa, ty, &rows, &batch, &mut got);
                assert_eq!(bits(&got), bits(&want), "{ctx}: packed batch");
            }
        }
    }
}
