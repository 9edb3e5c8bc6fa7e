//! Integer dot products of ggml's K-quant weights (Q2_K to Q6_K) against activations quantized
//! to Q8_K, the way llama.cpp computes them on CPU.
//!
//! Activations are quantized in blocks of 256 exactly as ggml's `quantize_row_q8_K_ref` (which
//! its x86 build uses too): `iscale = -127 / max`, round half to even, `d = 1 / iscale`, plus
//! the sum of every 16 quantized values (`bsums`) for the Q2_K/Q4_K/Q5_K minimums.
//!
//! Per 256-block the sub-block sums are exact integers. The float combination of Q4_K and Q6_K
//! is llama.cpp's x86 build's, so those two agree with it bit for bit:
//! - Q4_K: llama.cpp repacks every Q4_K matrix with a multiple of 8 rows into 8x8 interleaved
//!   blocks, whose result per row is `acc - acc_min` with `acc = fma(isum, dw * da, acc)` and
//!   `acc_min = fma(summins, dmin * da, acc_min)`. Its `gemv` (a batch's last `m % 4` rows, or
//!   all of them when `m < 4`) chains that once per 256-block; its `gemm` (the rows in whole
//!   groups of four) once per pair of 32-value sub-blocks, four times per block.
//! - Q6_K: with fewer than 8 activation rows, `ggml_vec_dot_q6_K_q8_K`'s AVX2 code: eight i32
//!   lanes per block (lane `L` = the unsigned 6-bit values `4L..4L + 4` of every 32-value
//!   chunk times their scales, minus `32 * scale * bsum` of the 16-value groups `2L`, `2L + 1`),
//!   accumulated by `fma(da * dw, lane, acc)` and folded as `hsum_float_8`; with 8 or more rows
//!   its tiled kernel: `sum = fma(isum * dw, da, sum)` per block (written as a multiply and
//!   an add in ggml's intrinsics, fused by GCC).
//!
//! Q2_K, Q3_K and Q5_K follow ggml's generic reference (`d = x.d * y.d`, `dmin = x.dmin *
//! y.d`; Q5_K: `sum += d * isum`, `mins -= dmin * summins`, result `mins + sum`; Q2_K: `sum +=
//! d * isum - dmin * summins`; Q3_K: `sum += d * isum`), not yet its x86 kernels' order. Every
//! SIMD version returns the scalar code's bits.

use ember_quant::{GgmlType, QK_K};
use half::f16;

use super::q8::Isa;
pub use repack::Repacked;

pub mod repack;
#[cfg(target_arch = "x86_64")]
pub mod tile;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Q4_K block bytes: `d`, `dmin` (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
/// Q5_K inserts 32 bytes of fifth bits before the nibbles.
const fn q45k_bytes(q5: bool) -> usize {
    if q5 { 176 } else { 144 }
}

/// Q2_K block bytes: 16 scale/min bytes, 64 bytes of 2-bit values, `d`, `dmin` (f16).
const Q2K_BYTES: usize = 84;
/// Q3_K block bytes: 32 high-bit bytes, 64 bytes of 2-bit values, 12 scale bytes, `d` (f16).
const Q3K_BYTES: usize = 110;
/// Q6_K block bytes: 128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, `d` (f16).
const Q6K_BYTES: usize = 210;

/// Whether [`dot_rows`] handles `ty`.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
    )
}

/// Activation rows from which llama.cpp runs Q6_K (and other non-repacked K-quant) matmuls
/// through its tiled kernel, whose float order differs from its per-row dot.
pub const TILED_MIN_ROWS: usize = 8;

/// `m` rows of `k` activations quantized to Q8_K.
pub struct Q8K {
    /// Values per row: a multiple of 256.
    pub k: usize,
    /// `m * k` quantized values.
    pub qs: Vec<i8>,
    /// One scale per 256-block.
    pub d: Vec<f32>,
    /// Sum of each 16 consecutive values (16 per block).
    pub bsums: Vec<i16>,
    /// Per block (4 per block), the sums of 32-value sub-blocks `2c` (low i16) and `2c + 1`
    /// (high i16) from `bsums`, packed for one `vpmaddwd` against Q4_K's mins: the prompt
    /// tile reads them once per weight tile, so they are added up here once per batch.
    pub pair_sums: Vec<i32>,
    /// Each row's place in the batch it has alone ([`SoloRow`]), which picks llama.cpp's
    /// arithmetic; `None`: row `i` of these `m` rows.
    pub solo: Option<std::sync::Arc<[SoloRow]>>,
}

/// Where an activation row sits in the batch llama.cpp computes it in when its sequence runs
/// alone: that batch's `m` rows, and its index `i` there. llama.cpp picks K-quant kernels by
/// batch size (Q4_K: its gemm for rows in whole groups of four, gemv for the rest; Q6_K: its
/// tiled kernel from 8 rows), so a row batched with other sequences keeps its solo arithmetic
/// only if the kernel is told this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoloRow {
    /// Rows of the solo batch.
    pub m: u32,
    /// This row's index in it (`i < m`).
    pub i: u32,
}

/// ggml's `nearest_int`: round half to even through the `1.5 * 2^23` trick (|x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Blocks a task of [`quantize_q8k`] takes once an input holds at least twice as many (all rows
/// together): a prompt's activations go to every worker (each block is quantized alone, so the
/// result is the same), while a decode row of a 1-8B model (8 to 56 blocks) stays on the
/// calling thread.
const Q8K_BLOCKS_PER_TASK: usize = 32;

/// Quantizes row-major `x: [m, k]` (`k` a multiple of 256) as `quantize_row_q8_K_ref`.
pub fn quantize_q8k(x: &[f32], k: usize) -> Q8K {
    assert!(k.is_multiple_of(QK_K), "k is not a multiple of 256");
    let nb = x.len() / QK_K;
    let mut out = Q8K {
        k,
        qs: vec![0; x.len()],
        d: vec![0.0; nb],
        bsums: vec![0; nb * 16],
        pair_sums: Vec::new(),
        solo: None,
    };
    let vector = q8k_vector();
    if nb < 2 * Q8K_BLOCKS_PER_TASK {
        x.chunks_exact(QK_K)
            .zip(out.qs.chunks_exact_mut(QK_K))
            .zip(out.d.iter_mut())
            .zip(out.bsums.chunks_exact_mut(16))
            .for_each(|(((xb, qs), d), bsums)| quantize_q8k_block(vector, xb, qs, d, bsums));
    } else {
        use rayon::prelude::*;
        x.par_chunks_exact(QK_K)
            .zip(out.qs.par_chunks_exact_mut(QK_K))
            .zip(out.d.par_iter_mut())
            .zip(out.bsums.par_chunks_exact_mut(16))
            .with_min_len(Q8K_BLOCKS_PER_TASK)
            .for_each(|(((xb, qs), d), bsums)| quantize_q8k_block(vector, xb, qs, d, bsums));
    }
    out.pair_sums = out.bsums.chunks_exact(4).map(pack_pair_sums).collect();
    out
}

/// Four consecutive 16-value sums as one [`Q8K::pair_sums`] entry: `s[0] + s[1]` in the low
/// i16, `s[2] + s[3]` in the high (each `|.| <= 32 * 127`, an exact i16).
#[inline]
fn pack_pair_sums(s: &[i16]) -> i32 {
    let lo = s[0] as i32 + s[1] as i32;
    let hi = s[2] as i32 + s[3] as i32;
    (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32
}

/// One 256-value block of [`quantize_q8k`]: its values, scale and sixteen sums (left zero for
/// an all-zero block, as ggml does). `vector`: with AVX-512, which the caller has checked the
/// CPU has ([`q8k_vector`]); the same bytes either way (tested).
fn quantize_q8k_block(vector: bool, xb: &[f32], qs: &mut [i8], d: &mut f32, bsums: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vector` is only set where the CPU has AVX-512 F/BW ([`q8k_vector`]); the
        // slices are one block's, as the function asserts.
        return unsafe { x86::avx512::quantize_q8k_block(xb, qs, d, bsums) };
    }
    let _ = vector;
    quantize_q8k_block_scalar(xb, qs, d, bsums)
}

/// Whether [`quantize_q8k_block`] may take its AVX-512 code on this CPU (detected once per
/// call of [`quantize_q8k`], not per block).
fn q8k_vector() -> bool {
    cfg!(target_arch = "x86_64") && Isa::Avx512Vnni.supported()
}

/// [`quantize_q8k_block`] in scalar code: `quantize_row_q8_K_ref`'s block, transcribed.
fn quantize_q8k_block_scalar(xb: &[f32], qs: &mut [i8], d: &mut f32, bsums: &mut [i16]) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in xb {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return;
    }
    let iscale = -127.0f32 / max;
    for (q, &v) in qs.iter_mut().zip(xb) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, g) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = g.iter().map(|&v| v as i16).sum();
    }
    *d = 1.0 / iscale;
}

impl Q8K {
    /// The number of activation rows.
    pub fn rows(&self) -> usize {
        self.qs.len() / self.k.max(1)
    }

    /// `(m, i)` of row `i` for the kernel choice: its [`SoloRow`], or its place in this batch.
    #[inline]
    pub fn shape(&self, i: usize) -> (usize, usize) {
        row_shape(self.solo.as_deref(), self.rows(), i)
    }

    /// Whether row `i` takes Q6_K's tiled arithmetic (llama.cpp's from 8 rows).
    #[inline]
    pub fn q6k_tiled(&self, i: usize) -> bool {
        q6k_tiled_at(self.shape(i))
    }

    /// Whether row `i` takes repacked Q4_K's gemm (rows in whole groups of four) rather than
    /// its gemv.
    #[inline]
    pub fn q4k_pairs(&self, i: usize) -> bool {
        q4k_pairs_at(self.shape(i))
    }
}

/// `(m, i)` of row `i` of a `rows`-row batch for the kernel choice: its [`SoloRow`] (where
/// `solo` has one for it), or its place in the batch. [`Q8K::shape`] before quantizing.
#[inline]
pub fn row_shape(solo: Option<&[SoloRow]>, rows: usize, i: usize) -> (usize, usize) {
    match solo.and_then(|s| s.get(i)) {
        Some(r) => (r.m as usize, r.i as usize),
        None => (rows, i),
    }
}

/// [`Q8K::q6k_tiled`] for a row of shape `(m, i)`.
#[inline]
pub fn q6k_tiled_at((m, _): (usize, usize)) -> bool {
    m >= TILED_MIN_ROWS
}

/// [`Q8K::q4k_pairs`] for a row of shape `(m, i)`.
#[inline]
pub fn q4k_pairs_at((m, i): (usize, usize)) -> bool {
    m >= 4 && i < m - m % 4
}

/// ggml's `hsum_float_8`.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
}

/// `32 * (bsums[2L] * sc[2L] + bsums[2L + 1] * sc[2L + 1])` per lane `L`: the Q6_K offset's
/// share of each of ggml's eight lanes.
#[inline(always)]
fn q6k_offsets(bsums: &[i16], scales: &[u8]) -> [i32; 8] {
    let mut out = [0i32; 8];
    for (l, o) in out.iter_mut().enumerate() {
        let s = |j: usize| bsums[j] as i32 * scales[j] as i8 as i32;
        *o = 32 * (s(2 * l) + s(2 * l + 1));
    }
    out
}

fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// How llama.cpp's repacked Q4_K kernels fold one row's exact integer sums into floats: per
/// pair of sub-blocks (`pairs`, its gemm) or per block (its gemv), the mins kept apart and
/// subtracted at the end. The scalar, AVX2 and AVX-512 dots feed it the same integers.
pub(super) struct Q4kFold {
    pairs: bool,
    acc: f32,
    acc_min: f32,
    isum: i32,
    imin: i32,
}

impl Q4kFold {
    #[inline(always)]
    pub(super) fn new(pairs: bool) -> Self {
        Q4kFold {
            pairs,
            acc: 0.0,
            acc_min: 0.0,
            isum: 0,
            imin: 0,
        }
    }

    /// Sub-block pair `c` of a block: `s` its scaled integer products, `mn` the block's mins,
    /// `bs` its activation sums per 16 values, `dd`/`dmin` its float scales.
    #[inline(always)]
    pub(super) fn pair(&mut self, c: usize, s: i32, mn: &[u8; 8], bs: &[i16], dd: f32, dmin: f32) {
        let mi = mn[2 * c] as i32 * (bs[4 * c] as i32 + bs[4 * c + 1] as i32)
            + mn[2 * c + 1] as i32 * (bs[4 * c + 2] as i32 + bs[4 * c + 3] as i32);
        if self.pairs {
            self.acc = (s as f32).mul_add(dd, self.acc);
            self.acc_min = (mi as f32).mul_add(dmin, self.acc_min);
        } else {
            self.isum += s;
            self.imin += mi;
        }
    }

    /// A whole block's integer sums at once (the gemv fold only): `isum` its scaled
    /// products, `imin` its mins' term, as [`Q4kFold::pair`] would sum them.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) fn block(&mut self, isum: i32, imin: i32, dd: f32, dmin: f32) {
        debug_assert!(!self.pairs);
        self.isum += isum;
        self.imin += imin;
        self.end_block(dd, dmin);
    }

    /// After a block's four pairs.
    #[inline(always)]
    pub(super) fn end_block(&mut self, dd: f32, dmin: f32) {
        if !self.pairs {
            self.acc = (self.isum as f32).mul_add(dd, self.acc);
            self.acc_min = (self.imin as f32).mul_add(dmin, self.acc_min);
            (self.isum, self.imin) = (0, 0);
        }
    }

    #[inline(always)]
    pub(super) fn result(&self) -> f32 {
        self.acc - self.acc_min
    }
}

/// The eight 6-bit scales and mins of a Q4_K block (ggml's `get_scale_min_k4`, decoded four
/// at a time as its `utmp` code does).
#[inline(always)]
fn q4k_scales(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    const M1: u32 = 0x3f3f_3f3f;
    const M2: u32 = 0x0f0f_0f0f;
    const M3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let sc_lo = u0 & M1;
    let sc_hi = (u2 & M2) | (((u0 >> 6) & M3) << 4);
    let mn_lo = u1 & M1;
    let mn_hi = ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4);
    let join = |lo: u32, hi: u32| ((hi as u64) << 32 | lo as u64).to_le_bytes();
    (join(sc_lo, sc_hi), join(mn_lo, mn_hi))
}

/// `sum_j bsums[j] * mins[j / 2]`: the Q4_K minimums' integer term.
#[inline(always)]
fn q4k_summins(bsums: &[i16], mins: &[u8; 8]) -> i32 {
    bsums
        .iter()
        .enumerate()
        .map(|(j, &s)| s as i32 * mins[j / 2] as i32)
        .sum()
}

/// `sum_j bsums[j] * (scales[j] >> 4)`: the Q2_K minimums' integer term.
#[inline(always)]
fn q2k_summs(bsums: &[i16], scales: &[u8]) -> i32 {
    bsums
        .iter()
        .zip(scales)
        .map(|(&s, &sc)| s as i32 * (sc >> 4) as i32)
        .sum()
}

/// The 16 six-bit Q3_K scales, still offset by 32 (decoded four at a time as ggml does).
#[inline(always)]
fn q3k_scales(s: &[u8]) -> [u8; 16] {
    const M1: u32 = 0x0303_0303;
    const M2: u32 = 0x0f0f_0f0f;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let v = [
        (a0 & M2) | ((tmp & M1) << 4),
        (a1 & M2) | (((tmp >> 2) & M1) << 4),
        ((a0 >> 4) & M2) | (((tmp >> 4) & M1) << 4),
        ((a1 >> 4) & M2) | (((tmp >> 6) & M1) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, x) in out.chunks_exact_mut(4).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Dots consecutive packed `ty` rows (`rows` holds exactly `out.len()` of them) with
/// activation row `i` of `acts`.
pub fn dot_rows(ty: GgmlType, rows: &[u8], acts: &Q8K, i: usize, out: &mut [f32]) {
    dot_rows_with(super::q8::isa(), ty, rows, acts, i, out)
}

/// [`dot_rows`] compiled for `isa`, which must be [`Isa::supported`] (panics otherwise).
pub fn dot_rows_with(isa: Isa, ty: GgmlType, rows: &[u8], acts: &Q8K, i: usize, out: &mut [f32]) {
    assert!(supported(ty), "{ty} has no Q8_K path");
    let nb = acts.k / QK_K;
    let row_bytes = nb * ty.type_size();
    assert_eq!(rows.len(), out.len() * row_bytes, "rows do not match out");
    let qs = &acts.qs[i * acts.k..(i + 1) * acts.k];
    let d = &acts.d[i * nb..(i + 1) * nb];
    let bsums = &acts.bsums[i * nb * 16..(i + 1) * nb * 16];
    let row = |r: usize| &rows[r * row_bytes..(r + 1) * row_bytes];
    let tiled = acts.q6k_tiled(i);
    // llama.cpp's repacked Q4_K: whole groups of four rows take its gemm, the rest its gemv.
    let q4k_pairs = acts.q4k_pairs(i);
    match isa {
        Isa::Scalar | Isa::Neon if isa.supported() => {
            for (r, o) in out.iter_mut().enumerate() {
                *o = match ty {
                    GgmlType::Q2_K => scalar::dot_q2k(row(r), qs, d, bsums),
                    GgmlType::Q3_K => scalar::dot_q3k(row(r), qs, d),
                    GgmlType::Q4_K => scalar::dot_q4k(row(r), qs, d, bsums, q4k_pairs),
                    GgmlType::Q5_K => scalar::dot_q45k::<true>(row(r), qs, d, bsums),
                    _ => scalar::dot_q6k(row(r), qs, d, bsums, tiled),
                };
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => {
            for (r, o) in out.iter_mut().enumerate() {
                // SAFETY: the CPU supports AVX2 (checked at run time); slice lengths are
                // checked above (`nb` blocks each).
                *o = unsafe {
                    match ty {
                        GgmlType::Q2_K => x86::avx2::dot_q2k(row(r), qs, d, bsums),
                        GgmlType::Q3_K => x86::avx2::dot_q3k(row(r), qs, d),
                        GgmlType::Q4_K => x86::avx2::dot_q4k(row(r), qs, d, bsums, q4k_pairs),
                        GgmlType::Q5_K => x86::avx2::dot_q45k::<true>(row(r), qs, d, bsums),
                        _ => x86::avx2::dot_q6k(row(r), qs, d, bsums, tiled),
                    }
                };
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.supported() => {
            for (r, o) in out.iter_mut().enumerate() {
                // SAFETY: the CPU supports AVX2 and AVX-512 F/BW/VL/VNNI (checked at run
                // time); slice lengths are checked above.
                *o = unsafe {
                    match ty {
                        GgmlType::Q2_K => x86::avx512::dot_q2k(row(r), qs, d, bsums),
                        GgmlType::Q3_K => x86::avx512::dot_q3k(row(r), qs, d),
                        GgmlType::Q4_K if q4k_pairs => {
                            x86::avx512::dot_q4k(row(r), qs, d, bsums, true)
                        }
                        GgmlType::Q4_K => x86::avx512::dot_q4k_gemv(row(r), qs, d, bsums),
                        GgmlType::Q5_K => x86::avx512::dot_q45k::<true>(row(r), qs, d, bsums),
                        _ => x86::avx512::dot_q6k(row(r), qs, d, bsums, tiled),
                    }
                };
            }
        }
        _ => panic!("{isa:?} is not supported by this CPU"),
    }
}

/// The portable kernels: the definition of what every SIMD version must return.
mod scalar {
    use super::*;

    /// Q4_K, or Q5_K with `Q5`.
    pub fn dot_q45k<const Q5: bool>(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        let (mut sum, mut mins) = (0.0f32, 0.0f32);
        let off = if Q5 { 48 } else { 16 };
        for (b, x) in row.chunks_exact(q45k_bytes(Q5)).enumerate() {
            let q8 = &qs[b * QK_K..(b + 1) * QK_K];
            let (sc, mn) = q4k_scales(&x[4..16]);
            let summins = q4k_summins(&bsums[b * 16..(b + 1) * 16], &mn);
            let mut isum = 0i32;
            for c in 0..4 {
                let q4 = &x[off + 32 * c..off + 32 + 32 * c];
                let (mut lo, mut hi) = (0i32, 0i32);
                for l in 0..32 {
                    let (mut a, mut h) = ((q4[l] & 0xF) as i32, (q4[l] >> 4) as i32);
                    if Q5 {
                        a += (((x[16 + l] >> (2 * c)) & 1) as i32) << 4;
                        h += (((x[16 + l] >> (2 * c + 1)) & 1) as i32) << 4;
                    }
                    lo += a * q8[64 * c + l] as i32;
                    hi += h * q8[64 * c + 32 + l] as i32;
                }
                isum += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
            }
            sum += f16_at(x, 0) * d[b] * isum as f32;
            mins -= f16_at(x, 2) * d[b] * summins as f32;
        }
        mins + sum
    }

    /// Q4_K as llama.cpp's repacked kernels: `pairs` chains the FMAs per pair of sub-blocks
    /// (its gemm), else per block (its gemv).
    pub fn dot_q4k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], pairs: bool) -> f32 {
        let mut fold = Q4kFold::new(pairs);
        for (b, x) in row.chunks_exact(q45k_bytes(false)).enumerate() {
            let q8 = &qs[b * QK_K..(b + 1) * QK_K];
            let bs = &bsums[b * 16..(b + 1) * 16];
            let (sc, mn) = q4k_scales(&x[4..16]);
            let (dd, dmin) = (f16_at(x, 0) * d[b], f16_at(x, 2) * d[b]);
            for c in 0..4 {
                let q4 = &x[16 + 32 * c..48 + 32 * c];
                let (mut lo, mut hi) = (0i32, 0i32);
                for l in 0..32 {
                    lo += (q4[l] & 0xF) as i32 * q8[64 * c + l] as i32;
                    hi += (q4[l] >> 4) as i32 * q8[64 * c + 32 + l] as i32;
                }
                let s = sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
                fold.pair(c, s, &mn, bs, dd, dmin);
            }
            fold.end_block(dd, dmin);
        }
        fold.result()
    }

    pub fn dot_q2k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16]) -> f32 {
        let mut sum = 0.0f32;
        for (b, x) in row.chunks_exact(Q2K_BYTES).enumerate() {
            let q8 = &qs[b * QK_K..(b + 1) * QK_K];
            let summs = q2k_summs(&bsums[b * 16..(b + 1) * 16], &x[..16]);
            let mut isum = 0i32;
            for n in 0..2 {
                let q2 = &x[16 + 32 * n..48 + 32 * n];
                for j in 0..4 {
                    for h in 0..2 {
                        let s: i32 = (0..16)
                            .map(|l| {
                                let a = (q2[16 * h + l] >> (2 * j)) & 3;
                                a as i32 * q8[128 * n + 32 * j + 16 * h + l] as i32
                            })
                            .sum();
                        isum += (x[8 * n + 2 * j + h] & 0xF) as i32 * s;
                    }
                }
            }
            let (dall, dmin) = (d[b] * f16_at(x, 80), d[b] * f16_at(x, 82));
            sum += dall * isum as f32 - dmin * summs as f32;
        }
        sum
    }

    pub fn dot_q3k(row: &[u8], qs: &[i8], d: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for (b, x) in row.chunks_exact(Q3K_BYTES).enumerate() {
            let q8 = &qs[b * QK_K..(b + 1) * QK_K];
            let sc = q3k_scales(&x[96..108]);
            let mut isum = 0i32;
            for t in 0..8 {
                let q3 = &x[32 + 32 * (t / 4)..64 + 32 * (t / 4)];
                for h in 0..2 {
                    let s: i32 = (0..16)
                        .map(|l| {
                            let k = 16 * h + l;
                            let low = ((q3[k] >> (2 * (t % 4))) & 3) as i32;
                            let a = low - if x[k] & (1 << t) != 0 { 0 } else { 4 };
                            a * q8[32 * t + k] as i32
                        })
                        .sum();
                    isum += (sc[2 * t + h] as i32 - 32) * s;
                }
            }
            sum += f16_at(x, 108) * d[b] * isum as f32;
        }
        sum
    }

    /// `tiled`: llama.cpp's tiled kernel's combination (8+ activation rows), else its
    /// per-row dot's (see the module docs).
    pub fn dot_q6k(row: &[u8], qs: &[i8], d: &[f32], bsums: &[i16], tiled: bool) -> f32 {
        let mut acc = [0.0f32; 8];
        let mut sum = 0.0f32;
        for (b, x) in row.chunks_exact(Q6K_BYTES).enumerate() {
            let q8 = &qs[b * QK_K..(b + 1) * QK_K];
            let mut a = [0u8; QK_K];
            for n in 0..2 {
                let (ql, qh) = (&x[64 * n..64 * n + 64], &x[128 + 32 * n..160 + 32 * n]);
                let a = &mut a[128 * n..128 * n + 128];
                for l in 0..32 {
                    a[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    a[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    a[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    a[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            let mut lanes = [0i32; 8];
            for (e, (&av, &yv)) in a.iter().zip(q8).enumerate() {
                let sc = x[192 + e / 16] as i8 as i32;
                lanes[(e % 32) / 4] += sc * av as i32 * yv as i32;
            }
            let off = q6k_offsets(&bsums[b * 16..(b + 1) * 16], &x[192..208]);
            for (l, o) in lanes.iter_mut().zip(off) {
                *l -= o;
            }
            let dw = f16_at(x, 208);
            if tiled {
                let isum: i32 = lanes.iter().sum();
                // `buf + (isum * dw) * da` in ggml's intrinsics; GCC fuses the outer pair.
                sum = (isum as f32 * dw).mul_add(d[b], sum);
            } else {
                let dd = d[b] * dw;
                for (a, &l) in acc.iter_mut().zip(&lanes) {
                    *a = dd.mul_add(l as f32, *a);
                }
            }
        }
        if tiled { sum } else { hsum8(&acc) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const ISAS: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Neon];

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (126.6, 127),
        ] {
            assert_eq!(nearest_int(x), want, "{x}");
            assert_eq!(nearest_int(x), x.round_ties_even() as i32);
        }
    }

    #[test]
    fn q8k_matches_ggml_reference_shape() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut x: Vec<f32> = (0..512).map(|_| rng.random_range(-2.0..2.0f32)).collect();
        x[300] = -5.0;
        for v in &mut x[..256] {
            *v = 0.0;
        }
        let q = quantize_q8k(&x, 512);
        assert_eq!(q.d[0], 0.0);
        assert!(q.qs[..256].iter().all(|&v| v == 0));
        // `iscale = -127 / max` maps the max-abs value to -127 whatever its sign.
        assert_eq!(q.qs[300], -127);
        assert_eq!(q.d[1], 1.0 / (-127.0f32 / -5.0));
        for j in 0..32 {
            let s: i16 = q.qs[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum();
            assert_eq!(q.bsums[j], s);
        }
    }

    /// The AVX-512 block quantizer gives the scalar one's bytes: random blocks at scales from
    /// 1e-30 to 3e4, the largest magnitude twice with both signs (the first sets the sign),
    /// zero and single-value blocks, negative zeros, NaN and infinity.
    #[test]
    fn q8k_vector_blocks_equal_the_scalar_ones() {
        if !q8k_vector() {
            eprintln!("skipped: this CPU has no AVX-512, so blocks take the scalar code");
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x9b);
        for case in 0..400 {
            let scale = [1e-30f32, 1e-3, 1.0, 7.5, 3e4][case % 5];
            let mut x: Vec<f32> = (0..QK_K).map(|_| rng.random_range(-scale..scale)).collect();
            match case % 7 {
                // The largest magnitude twice with both signs: the first one sets the sign.
                1 => {
                    let (i, j) = (rng.random_range(0..QK_K), rng.random_range(0..QK_K));
                    x[i] = 2.0 * scale;
                    x[j] = -2.0 * scale;
                }
                2 => x.fill(0.0),
                3 => x.iter_mut().for_each(|v| *v = v.abs()),
                4 => {
                    x.fill(0.0);
                    x[rng.random_range(0..QK_K)] = -scale;
                }
                5 => x.iter_mut().step_by(3).for_each(|v| *v = -0.0),
                // Values that are not finite: NaN is skipped by the maximum, infinity is it.
                6 => {
                    let i = rng.random_range(0..QK_K);
                    x[i] = if case % 2 == 0 {
                        f32::NAN
                    } else {
                        f32::INFINITY
                    };
                }
                _ => {}
            }
            let mut want = (vec![0i8; QK_K], 0.0f32, vec![0i16; 16]);
            let mut got = (vec![0i8; QK_K], 0.0f32, vec![0i16; 16]);
            quantize_q8k_block_scalar(&x, &mut want.0, &mut want.1, &mut want.2);
            quantize_q8k_block(true, &x, &mut got.0, &mut got.1, &mut got.2);
            assert_eq!(got.0, want.0, "case {case}: values");
            assert_eq!(got.1.to_bits(), want.1.to_bits(), "case {case}: d");
            assert_eq!(got.2, want.2, "case {case}: sums");
        }
    }

    /// Inputs split across the workers (from `2 * Q8K_BLOCKS_PER_TASK` blocks) give each
    /// block what quantizing it alone gives, at the split's edge and past it, zero blocks too.
    #[test]
    fn q8k_split_across_workers_equals_block_by_block() {
        let mut rng = StdRng::seed_from_u64(0x98);
        let edge = 2 * Q8K_BLOCKS_PER_TASK;
        for nb in [edge - 1, edge, edge + 1, 517] {
            let mut x: Vec<f32> = (0..nb * QK_K)
                .map(|_| rng.random_range(-4.0..4.0f32))
                .collect();
            x[3 * QK_K..4 * QK_K].fill(0.0);
            let all = quantize_q8k(&x, QK_K);
            for (b, xb) in x.chunks_exact(QK_K).enumerate() {
                let one = quantize_q8k(xb, QK_K);
                assert_eq!(
                    all.qs[b * QK_K..(b + 1) * QK_K],
                    one.qs[..],
                    "{nb}: block {b}"
                );
                assert_eq!(all.d[b].to_bits(), one.d[0].to_bits(), "{nb}: block {b}");
                assert_eq!(
                    all.bsums[b * 16..(b + 1) * 16],
                    one.bsums[..],
                    "{nb}: block {b}"
                );
            }
        }
    }

    fn case(rng: &mut StdRng, ty: GgmlType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let w = ember_quant::quantize(ty, &wf).unwrap();
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
        let mut wd = vec![0.0f32; n * k];
        ember_quant::dequantize(ty, &w, &mut wd).unwrap();
        (w, wd, x)
    }

    #[test]
    fn dots_match_dequantized_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            for k in [256, 768, 4096] {
                let n = 9;
                let (w, wd, x) = case(&mut rng, ty, n, k);
                let acts = quantize_q8k(&x, k);
                let mut got = vec![0.0f32; n];
                dot_rows_with(Isa::Scalar, ty, &w, &acts, 0, &mut got);
                let row_bytes = k / QK_K * ty.type_size();
                for j in 0..n {
                    let wr = &wd[j * k..(j + 1) * k];
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for (e, &wv) in wr.iter().enumerate() {
                        let xv = acts.d[e / QK_K] as f64 * acts.qs[e] as f64;
                        want += wv as f64 * xv;
                        mag += (wv as f64 * xv).abs();
                    }
                    let err = (got[j] as f64 - want).abs();
                    assert!(
                        err <= 1e-5 * mag,
                        "{ty} k={k} row {j}: {} vs {want}",
                        got[j]
                    );
                    // Against f32 activations: only the 8-bit activation error.
                    let f = ember_quant::dot_row(ty, &w[j * row_bytes..(j + 1) * row_bytes], &x);
                    assert!(
                        (got[j] - f).abs() <= 2e-2 * mag as f32,
                        "{ty} k={k} row {j}: {} vs f32 {f}",
                        got[j]
                    );
                }
            }
        }
    }

    #[test]
    fn every_isa_is_bit_identical() {
        let mut rng = StdRng::seed_from_u64(11);
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            for k in [256, 768, 2048] {
                let n = 5;
                let (w, _, _) = case(&mut rng, ty, n, k);
                // Seven activation rows: 0..4 take repacked Q4_K's gemm fold, 4..7 its gemv
                // fold (decode's kernel). Each fold sees extreme values (rows 1, 4) and the
                // largest activation sums of both signs (all -127: rows 2, 5; all +127 but
                // the first: rows 3, 6).
                let m = 7;
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                for i in [1, 4] {
                    for v in x[i * k..(i + 1) * k].iter_mut().step_by(3) {
                        *v *= 1e3;
                    }
                }
                for (i, sign) in [(2, 1.0f32), (3, -1.0), (5, 1.0), (6, -1.0)] {
                    let row = &mut x[i * k..(i + 1) * k];
                    row.fill(1.0);
                    // `iscale = -127 / max` per 256-block: a slightly larger -1 first in each
                    // block flips the rest to +127.
                    if sign < 0.0 {
                        for v in row.iter_mut().step_by(QK_K) {
                            *v = -1.0001;
                        }
                    }
                }
                let acts = quantize_q8k(&x, k);
                assert!(acts.q4k_pairs(3) && !acts.q4k_pairs(4));
                assert!(acts.qs[2 * k..3 * k].iter().all(|&q| q == -127));
                assert!(
                    acts.qs[3 * k..4 * k]
                        .iter()
                        .enumerate()
                        .all(|(e, &q)| q == if e % QK_K == 0 { -127 } else { 127 })
                );
                for i in 0..m {
                    let mut want = vec![0.0f32; n];
                    dot_rows_with(Isa::Scalar, ty, &w, &acts, i, &mut want);
                    for isa in ISAS.into_iter().filter(|isa| isa.supported()) {
                        let mut got = vec![0.0f32; n];
                        dot_rows_with(isa, ty, &w, &acts, i, &mut got);
                        for j in 0..n {
                            assert_eq!(got[j].to_bits(), want[j].to_bits(), "{ty} {isa:?} k={k}");
                        }
                    }
                }
            }
        }
    }
}
