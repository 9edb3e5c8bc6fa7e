//! x86-64 versions of the q8 kernels: AVX2 (+F16C) and AVX-512 VNNI.
//!
//! Every function here returns exactly what its scalar counterpart in `super::scalar` returns.
//! The per-block integer sums are exact however they are computed, and the float work per
//! block is the same IEEE operations (no FMA contraction: each `mul` and `add` rounds as the
//! scalar code's do). Only the per-block products are computed 8 blocks at a time; they are
//! still added to the row sum one block after another, in block order.
//!
//! The bodies are `#[inline(always)]` generics; only the entry points (the [`avx2`] and
//! [`avx512`] modules, and the `avx2_*` / `avx512_*` functions at the end) carry
//! `#[target_feature]`, so each is compiled once per instruction set. Closures inside the
//! bodies do not inherit those features: intrinsics called from them stop being inlined, so
//! arrays of vectors are filled with loops, not `array::from_fn`.

use std::arch::x86_64::*;
use std::ptr;

use ember_quant::GgmlType;

use super::{ActFormat, BLOCK, Batch, BatchScales, QuantizedActs, TILE_ROWS, Tile, UnpackedRow};

/// How 32 `u8 x i8` products become 8 `i32` partial sums.
pub(super) trait Dot {
    /// `a` as `u8` (at most 128), `b` as `i8` (never -128 with `a = 128`).
    unsafe fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i;
    /// `dot_u8i8(a1, b1) + dot_u8i8(a2, b2)`.
    #[inline(always)]
    unsafe fn dot2_u8i8(a1: __m256i, b1: __m256i, a2: __m256i, b2: __m256i) -> __m256i {
        unsafe { _mm256_add_epi32(Self::dot_u8i8(a1, b1), Self::dot_u8i8(a2, b2)) }
    }
}

/// `vpmaddubsw` + `vpmaddwd`: pairs of products never exceed `2 * 128 * 127 < i16::MAX`, so
/// the saturating 16-bit step is exact.
pub(super) struct Avx2;

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)) }
    }
}

/// `vpdpbusd` (AVX-512 VNNI on 256-bit vectors): four products summed straight into `i32`.
pub(super) struct Vnni;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b) }
    }
    #[inline(always)]
    unsafe fn dot2_u8i8(a1: __m256i, b1: __m256i, a2: __m256i, b2: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a1, b1), a2, b2) }
    }
}

/// Block formats as const-generic tags.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;

/// Where a row's 32-value weight blocks and their scales come from.
trait Weights {
    /// Values may be negative (use the sign trick for `u8 x i8`).
    const SIGNED: bool;
    /// Blocks carry an offset `m` (dot against Q8_1 activations).
    const WITH_MIN: bool;
    /// The 32 weights of block `b`, as `i8`.
    unsafe fn q(&self, b: usize) -> __m256i;
    /// Blocks `b` and `b + 1` by halves: `(elements 0..16 of b | of b + 1, 16..32 of b | of
    /// b + 1)`, the layout [`act_pair`] loads activations in.
    unsafe fn q2(&self, b: usize) -> (__m256i, __m256i);
    /// Hints that blocks a little past `b` will be read soon.
    #[inline(always)]
    fn prefetch(&self, _b: usize) {}
    /// Scales of blocks `b..b + 8`.
    unsafe fn d8(&self, b: usize) -> __m256;
    /// Offsets of blocks `b..b + 8`.
    unsafe fn m8(&self, b: usize) -> __m256;
    unsafe fn d(&self, b: usize) -> f32;
    unsafe fn m(&self, b: usize) -> f32;
}

/// How far ahead of the block being dotted packed weights are prefetched.
const PREFETCH_BYTES: usize = 1024;

/// A row straight from its packed ggml blocks.
struct Packed<const TY: u8> {
    p: *const u8,
}

impl<const TY: u8> Packed<TY> {
    const BS: usize = match TY {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    };
}

#[inline(always)]
unsafe fn rd_i16(p: *const u8) -> i16 {
    unsafe { ptr::read_unaligned(p.cast::<i16>()) }
}

/// One f16 to f32 with F16C: the same instruction `half` uses when F16C is present.
#[inline(always)]
unsafe fn f16_to_f32(bits: i16) -> f32 {
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as u16 as i32))) }
}

/// f32 rounded to the nearest f16 and back (as `half::f16::from_f32(x).to_f32()` with F16C).
#[inline(always)]
unsafe fn round_f16(x: f32) -> f32 {
    unsafe {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
    }
}

/// Eight f16 values `stride` bytes apart, as f32.
#[inline(always)]
unsafe fn gather_f16(p: *const u8, stride: usize) -> __m256 {
    unsafe {
        _mm256_cvtph_ps(_mm_setr_epi16(
            rd_i16(p),
            rd_i16(p.add(stride)),
            rd_i16(p.add(2 * stride)),
            rd_i16(p.add(3 * stride)),
            rd_i16(p.add(4 * stride)),
            rd_i16(p.add(5 * stride)),
            rd_i16(p.add(6 * stride)),
            rd_i16(p.add(7 * stride)),
        ))
    }
}

/// 16 bytes of nibbles: low nibbles to elements 0..16, high nibbles to 16..32.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    unsafe {
        let x = _mm_loadu_si128(p.cast());
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(x, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
        _mm256_set_m128i(hi, lo)
    }
}

/// Two 16-byte loads as one vector: `p` in the low half, `q` in the high half.
#[inline(always)]
unsafe fn load_2x128(p: *const u8, q: *const u8) -> __m256i {
    unsafe {
        _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(p.cast())),
            _mm_loadu_si128(q.cast()),
        )
    }
}

/// The nibbles of two blocks' 16 bytes at `p` and `q`: `(low nibbles of p | of q, high
/// nibbles of p | of q)`.
#[inline(always)]
unsafe fn nibbles2(p: *const u8, q: *const u8) -> (__m256i, __m256i) {
    unsafe {
        let x = load_2x128(p, q);
        let mask = _mm256_set1_epi8(0x0F);
        (
            _mm256_and_si256(x, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask),
        )
    }
}

/// Two blocks' high bits (the `u32`s at `p` and `q`) in [`nibbles2`]'s layout, as `0x10`.
#[inline(always)]
unsafe fn high_bits2(p: *const u8, q: *const u8) -> (__m256i, __m256i) {
    unsafe {
        let qp = ptr::read_unaligned(p.cast::<i32>());
        let qq = ptr::read_unaligned(q.cast::<i32>());
        let both = _mm256_set_m128i(_mm_set1_epi32(qq), _mm_set1_epi32(qp));
        let shuf_lo = _mm256_set_epi64x(0x0101_0101_0101_0101, 0, 0x0101_0101_0101_0101, 0);
        let shuf_hi = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
        );
        let bit = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let ones = _mm256_set1_epi64x(-1);
        let x10 = _mm256_set1_epi8(0x10);
        let expand = |shuf| {
            let bytes = _mm256_or_si256(_mm256_shuffle_epi8(both, shuf), bit);
            _mm256_and_si256(_mm256_cmpeq_epi8(bytes, ones), x10)
        };
        (expand(shuf_lo), expand(shuf_hi))
    }
}

/// `0x10` in byte `i` where bit `i` of the little-endian `u32` at `p` is set.
#[inline(always)]
unsafe fn high_bits(p: *const u8) -> __m256i {
    unsafe {
        let qh = ptr::read_unaligned(p.cast::<i32>());
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf);
        let bits = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
        let set = _mm256_cmpeq_epi8(bits, _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

impl<const TY: u8> Weights for Packed<TY> {
    const SIGNED: bool = matches!(TY, Q4_0 | Q5_0 | Q8_0);
    const WITH_MIN: bool = matches!(TY, Q4_1 | Q5_1);

    #[inline(always)]
    fn prefetch(&self, b: usize) {
        // A hint only: the address may lie past the row (`wrapping_add`, never dereferenced).
        let p = self.p.wrapping_add(b * Self::BS + PREFETCH_BYTES);
        // SAFETY: prefetching has no architectural effect and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }

    #[inline(always)]
    unsafe fn q(&self, b: usize) -> __m256i {
        unsafe {
            let p = self.p.add(b * Self::BS);
            match TY {
                Q4_0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
                Q4_1 => nibbles(p.add(4)),
                Q5_0 => _mm256_sub_epi8(
                    _mm256_or_si256(nibbles(p.add(6)), high_bits(p.add(2))),
                    _mm256_set1_epi8(16),
                ),
                Q5_1 => _mm256_or_si256(nibbles(p.add(8)), high_bits(p.add(4))),
                _ => _mm256_loadu_si256(p.add(2).cast()),
            }
        }
    }
    #[inline(always)]
    unsafe fn q2(&self, b: usize) -> (__m256i, __m256i) {
        unsafe {
            let p = self.p.add(b * Self::BS);
            let q = p.add(Self::BS);
            match TY {
                Q4_0 => {
                    let (lo, hi) = nibbles2(p.add(2), q.add(2));
                    let eight = _mm256_set1_epi8(8);
                    (_mm256_sub_epi8(lo, eight), _mm256_sub_epi8(hi, eight))
                }
                Q4_1 => nibbles2(p.add(4), q.add(4)),
                Q5_0 => {
                    let (lo, hi) = nibbles2(p.add(6), q.add(6));
                    let (hlo, hhi) = high_bits2(p.add(2), q.add(2));
                    let sixteen = _mm256_set1_epi8(16);
                    (
                        _mm256_sub_epi8(_mm256_or_si256(lo, hlo), sixteen),
                        _mm256_sub_epi8(_mm256_or_si256(hi, hhi), sixteen),
                    )
                }
                Q5_1 => {
                    let (lo, hi) = nibbles2(p.add(8), q.add(8));
                    let (hlo, hhi) = high_bits2(p.add(4), q.add(4));
                    (_mm256_or_si256(lo, hlo), _mm256_or_si256(hi, hhi))
                }
                _ => (
                    load_2x128(p.add(2), q.add(2)),
                    load_2x128(p.add(18), q.add(18)),
                ),
            }
        }
    }
    #[inline(always)]
    unsafe fn d8(&self, b: usize) -> __m256 {
        unsafe { gather_f16(self.p.add(b * Self::BS), Self::BS) }
    }
    #[inline(always)]
    unsafe fn m8(&self, b: usize) -> __m256 {
        unsafe { gather_f16(self.p.add(b * Self::BS + 2), Self::BS) }
    }
    #[inline(always)]
    unsafe fn d(&self, b: usize) -> f32 {
        unsafe { f16_to_f32(rd_i16(self.p.add(b * Self::BS))) }
    }
    #[inline(always)]
    unsafe fn m(&self, b: usize) -> f32 {
        unsafe { f16_to_f32(rd_i16(self.p.add(b * Self::BS + 2))) }
    }
}

/// A row already unpacked to `i8` values and f32 scales.
struct Unpacked<const SIGNED: bool, const WITH_MIN: bool> {
    q: *const i8,
    d: *const f32,
    m: *const f32,
}

impl<const SIGNED: bool, const WITH_MIN: bool> Weights for Unpacked<SIGNED, WITH_MIN> {
    const SIGNED: bool = SIGNED;
    const WITH_MIN: bool = WITH_MIN;

    #[inline(always)]
    unsafe fn q(&self, b: usize) -> __m256i {
        unsafe { _mm256_loadu_si256(self.q.add(b * BLOCK).cast()) }
    }
    #[inline(always)]
    unsafe fn q2(&self, b: usize) -> (__m256i, __m256i) {
        unsafe {
            let p = self.q.add(b * BLOCK).cast::<u8>();
            (
                load_2x128(p, p.add(BLOCK)),
                load_2x128(p.add(16), p.add(BLOCK + 16)),
            )
        }
    }
    #[inline(always)]
    unsafe fn d8(&self, b: usize) -> __m256 {
        unsafe { _mm256_loadu_ps(self.d.add(b)) }
    }
    #[inline(always)]
    unsafe fn m8(&self, b: usize) -> __m256 {
        unsafe { _mm256_loadu_ps(self.m.add(b)) }
    }
    #[inline(always)]
    unsafe fn d(&self, b: usize) -> f32 {
        unsafe { *self.d.add(b) }
    }
    #[inline(always)]
    unsafe fn m(&self, b: usize) -> f32 {
        unsafe { *self.m.add(b) }
    }
}

/// `i32x8` partial sums of block `b`'s weights times activations `x` (32 `i8`).
#[inline(always)]
unsafe fn block_dot<D: Dot, W: Weights>(w: &W, b: usize, x: *const i8) -> __m256i {
    unsafe {
        let q = w.q(b);
        let x = _mm256_loadu_si256(x.add(b * BLOCK).cast());
        if W::SIGNED {
            D::dot_u8i8(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q))
        } else {
            D::dot_u8i8(q, x)
        }
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256i) -> i32 {
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// `i32x8` partial sums of blocks `b` and `b + 1`: lanes 0..4 hold block `b`'s, 4..8 block
/// `b + 1`'s.
#[inline(always)]
unsafe fn pair_dot<D: Dot, W: Weights>(w: &W, b: usize, x: *const i8) -> __m256i {
    unsafe {
        w.prefetch(b);
        let (qlo, qhi) = w.q2(b);
        let p = x.add(b * BLOCK).cast::<u8>();
        let xlo = load_2x128(p, p.add(BLOCK));
        let xhi = load_2x128(p.add(16), p.add(BLOCK + 16));
        if W::SIGNED {
            D::dot2_u8i8(
                _mm256_abs_epi8(qlo),
                _mm256_sign_epi8(xlo, qlo),
                _mm256_abs_epi8(qhi),
                _mm256_sign_epi8(xhi, qhi),
            )
        } else {
            D::dot2_u8i8(qlo, xlo, qhi, xhi)
        }
    }
}

/// Adds adjacent lane pairs: even lanes get `a[2i] + a[2i + 1]`, odd lanes `b[2i] + b[2i + 1]`.
/// Blends and in-lane shuffles only (cheaper than `vphaddd`).
#[inline(always)]
unsafe fn fold_pairs(a: __m256i, b: __m256i) -> __m256i {
    unsafe {
        let x = _mm256_blend_epi32::<0xAA>(a, b);
        let y = _mm256_blend_epi32::<0x55>(a, b);
        _mm256_add_epi32(x, _mm256_shuffle_epi32::<0xB1>(y))
    }
}

/// Adds lanes two apart within each 128-bit half: lanes 0, 1 get `a[0] + a[2]`, `a[1] +
/// a[3]`, lanes 2, 3 get `b[2] + b[0]`, `b[3] + b[1]`.
#[inline(always)]
unsafe fn fold_quads(a: __m256i, b: __m256i) -> __m256i {
    unsafe {
        let x = _mm256_blend_epi32::<0xCC>(a, b);
        let y = _mm256_blend_epi32::<0x33>(a, b);
        _mm256_add_epi32(x, _mm256_shuffle_epi32::<0x4E>(y))
    }
}

/// Sums of eight blocks from four [`pair_dot`] vectors, lane `j` = block `j`.
#[inline(always)]
unsafe fn reduce8(v: &[__m256i; 4]) -> __m256i {
    unsafe {
        // v[k] = [blk 2k: 4 lanes | blk 2k+1: 4 lanes]. After the folds, the low half holds
        // blocks 0, 2, 4, 6 and the high half 1, 3, 5, 7.
        let s = fold_quads(fold_pairs(v[0], v[1]), fold_pairs(v[2], v[3]));
        _mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }
}

/// Dot product of one weight row (`nb` blocks) with one quantized activation row.
///
/// Float operations per block as in `scalar::dot`: `(d * xd) * sumi [+ m * xs]`, then added
/// to the running sum in block order.
#[inline(always)]
unsafe fn row_dot<D: Dot, W: Weights>(
    w: &W,
    nb: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
) -> f32 {
    unsafe {
        let mut sum = 0.0f32;
        let mut b = 0;
        while b + 8 <= nb {
            let mut v = [_mm256_setzero_si256(); 4];
            for (j, vj) in v.iter_mut().enumerate() {
                *vj = pair_dot::<D, W>(w, b + 2 * j, xq);
            }
            let sumf = _mm256_cvtepi32_ps(reduce8(&v));
            let mut t = _mm256_mul_ps(_mm256_mul_ps(w.d8(b), _mm256_loadu_ps(xd.add(b))), sumf);
            if W::WITH_MIN {
                t = _mm256_add_ps(t, _mm256_mul_ps(w.m8(b), _mm256_loadu_ps(xs.add(b))));
            }
            let mut ts = [0.0f32; 8];
            _mm256_storeu_ps(ts.as_mut_ptr(), t);
            for tv in ts {
                sum += tv;
            }
            b += 8;
        }
        while b < nb {
            let sumi = hsum(block_dot::<D, W>(w, b, xq));
            if W::WITH_MIN {
                sum += w.d(b) * *xd.add(b) * sumi as f32 + w.m(b) * *xs.add(b);
            } else {
                sum += sumi as f32 * (w.d(b) * *xd.add(b));
            }
            b += 1;
        }
        sum
    }
}

/// Sums of eight `i32x8` vectors: lane `r` holds the sum of all lanes of `v[r]`.
#[inline(always)]
unsafe fn reduce_rows8(v: &[__m256i; 8]) -> __m256i {
    unsafe {
        // Each half: `[v0, v1, v2, v3]` (resp. `v4..v8`) summed over that half's lanes.
        let a = fold_quads(fold_pairs(v[0], v[1]), fold_pairs(v[2], v[3]));
        let b = fold_quads(fold_pairs(v[4], v[5]), fold_pairs(v[6], v[7]));
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(a, b),
            _mm256_permute2x128_si256::<0x31>(a, b),
        )
    }
}

/// Dots one weight row (`nb` blocks, unpacked or packed) with the eight activation rows at `x`,
/// returning the eight results (lane `r` = row `x[r]`).
///
/// Each weight block is loaded once and multiplied with all eight rows; the eight per-block
/// integer sums are reduced together, so lane `r` gets exactly `scalar::dot`'s float
/// operations for its row: `(d * xd) * sumi [+ m * xs]` added to the running sum in block
/// order. `xd` and `xs` point at the eight rows' scales of block 0; block `b`'s are
/// `b * stride` further.
#[inline(always)]
unsafe fn row_dot8<D: Dot, W: Weights>(
    w: &W,
    nb: usize,
    x: &[*const i8; 8],
    xd: *const f32,
    xs: *const f32,
    stride: usize,
) -> __m256 {
    unsafe {
        let mut sum = _mm256_setzero_ps();
        for b in 0..nb {
            w.prefetch(b);
            let q = w.q(b);
            let wu = if W::SIGNED { _mm256_abs_epi8(q) } else { q };
            let mut v = [_mm256_setzero_si256(); 8];
            for (vr, &xr) in v.iter_mut().zip(x) {
                let xv = _mm256_loadu_si256(xr.add(b * BLOCK).cast());
                let xv = if W::SIGNED {
                    _mm256_sign_epi8(xv, q)
                } else {
                    xv
                };
                *vr = D::dot_u8i8(wu, xv);
            }
            let f = _mm256_cvtepi32_ps(reduce_rows8(&v));
            let dd = _mm256_mul_ps(_mm256_set1_ps(w.d(b)), _mm256_loadu_ps(xd.add(b * stride)));
            let t = if W::WITH_MIN {
                _mm256_add_ps(
                    _mm256_mul_ps(dd, f),
                    _mm256_mul_ps(_mm256_set1_ps(w.m(b)), _mm256_loadu_ps(xs.add(b * stride))),
                )
            } else {
                _mm256_mul_ps(f, dd)
            };
            sum = _mm256_add_ps(sum, t);
        }
        sum
    }
}

/// `dot(row, acts, i, with_min)` for every `i` in `rows`, into `out`, eight rows per pass.
#[inline(always)]
unsafe fn dot_batch<D: Dot>(
    row: &UnpackedRow,
    acts: &QuantizedActs,
    sc: &BatchScales,
    with_min: bool,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let k = acts.k;
    let nb = k / BLOCK;
    assert_eq!(out.len(), rows.len(), "rows do not match out");
    assert!(rows.end <= sc.m, "rows past the batch");
    assert!(
        acts.qs.len() >= sc.m * k,
        "activations shorter than the batch"
    );
    assert!(sc.stride >= sc.m + 7, "scale stride too small");
    assert!(sc.d.len() >= nb * sc.stride && sc.s.len() >= nb * sc.stride);
    assert!(
        row.q.len() >= nb * BLOCK && row.d.len() >= nb,
        "row shorter than activations"
    );
    assert!(!with_min || row.m.len() >= nb, "row has no offsets");
    if rows.is_empty() {
        return;
    }
    let (q, d, m) = (row.q.as_ptr(), row.d.as_ptr(), row.m.as_ptr());
    let mut i0 = rows.start;
    while i0 < rows.end {
        let n = (rows.end - i0).min(8);
        // Rows past the end repeat the last one; their results are dropped.
        let x: [*const i8; 8] =
            std::array::from_fn(|r| acts.qs[(i0 + r.min(n - 1)) * k..].as_ptr());
        // Scales of rows `i0..i0 + 8` lie within `stride` (at least `m + 7`, and `i0 < m`).
        let xd = sc.d[i0..].as_ptr();
        let xs = sc.s[i0..].as_ptr();
        // SAFETY: the weight pointers cover `nb` blocks and each activation row `k` values
        // (asserted above); block `b`'s eight scales are at `b * stride + i0 .. + 8`, inside
        // `nb * stride` since `i0 + 8 <= m + 7 <= stride`; CPU features are the caller's.
        let v = unsafe {
            let st = sc.stride;
            match (row.unsigned, with_min) {
                (true, true) => {
                    row_dot8::<D, _>(&Unpacked::<false, true> { q, d, m }, nb, &x, xd, xs, st)
                }
                (true, false) => {
                    row_dot8::<D, _>(&Unpacked::<false, false> { q, d, m }, nb, &x, xd, xs, st)
                }
                (false, true) => {
                    row_dot8::<D, _>(&Unpacked::<true, true> { q, d, m }, nb, &x, xd, xs, st)
                }
                (false, false) => {
                    row_dot8::<D, _>(&Unpacked::<true, false> { q, d, m }, nb, &x, xd, xs, st)
                }
            }
        };
        let mut tmp = [0.0f32; 8];
        // SAFETY: `tmp` holds eight floats.
        unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), v) };
        out[i0 - rows.start..i0 - rows.start + n].copy_from_slice(&tmp[..n]);
        i0 += n;
    }
}

/// `out[i * n + r]` = dot of packed row `r` of `rows` (`n` of them) with activation row `i`:
/// [`row_dot8`] straight off the packed blocks, eight activation rows per pass.
#[inline(always)]
unsafe fn packed_batch8<D: Dot, const TY: u8>(rows: &[u8], batch: &Batch, out: &mut [f32]) {
    let (acts, sc, m) = (&batch.acts, &batch.sc, batch.m);
    let k = acts.k;
    let nb = k / BLOCK;
    let row_bytes = nb * Packed::<TY>::BS;
    let n = rows.len() / row_bytes.max(1);
    assert_eq!(
        n * row_bytes,
        rows.len(),
        "rows do not match the activations"
    );
    assert_eq!(out.len(), m * n, "out does not match the rows");
    assert!(acts.qs.len() >= m * k, "activations shorter than the batch");
    assert!(
        sc.m == m && sc.stride >= m + 7,
        "scales do not match the batch"
    );
    assert!(sc.d.len() >= nb * sc.stride && sc.s.len() >= nb * sc.stride);
    for r in 0..n {
        let w = Packed::<TY> {
            p: rows[r * row_bytes..(r + 1) * row_bytes].as_ptr(),
        };
        let mut i0 = 0;
        while i0 < m {
            let cnt = (m - i0).min(8);
            // Rows past the end repeat the last one; their results are dropped.
            let x: [*const i8; 8] = std::array::from_fn(|j| {
                let i = i0 + j.min(cnt - 1);
                acts.qs[i * k..(i + 1) * k].as_ptr()
            });
            // SAFETY: the row spans `nb` blocks (sliced above), each activation row `k` values;
            // block `b`'s eight scales are at `b * stride + i0 .. + 8`, inside `nb * stride`
            // since `i0 + 8 <= m + 7 <= stride`; CPU features are the caller's.
            let v = unsafe {
                let (xd, xs) = (sc.d[i0..].as_ptr(), sc.s[i0..].as_ptr());
                row_dot8::<D, _>(&w, nb, &x, xd, xs, sc.stride)
            };
            let mut tmp = [0.0f32; 8];
            // SAFETY: `tmp` holds eight floats.
            unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), v) };
            for (j, &t) in tmp[..cnt].iter().enumerate() {
                out[(i0 + j) * n + r] = t;
            }
            i0 += 8;
        }
    }
}

#[inline(always)]
unsafe fn dot_packed_batch<D: Dot>(ty: GgmlType, rows: &[u8], batch: &Batch, out: &mut [f32]) {
    // SAFETY: forwarded; `packed_batch8` checks every bound it relies on.
    unsafe {
        match ty {
            GgmlType::Q4_0 => packed_batch8::<D, Q4_0>(rows, batch, out),
            GgmlType::Q4_1 => packed_batch8::<D, Q4_1>(rows, batch, out),
            GgmlType::Q5_0 => packed_batch8::<D, Q5_0>(rows, batch, out),
            GgmlType::Q5_1 => packed_batch8::<D, Q5_1>(rows, batch, out),
            GgmlType::Q8_0 => packed_batch8::<D, Q8_0>(rows, batch, out),
            other => unreachable!("dot_packed_batch called for {other}, which has no integer path"),
        }
    }
}

// AVX-512 VNNI kernels with sixteen weight rows per vector, one row per `i32` lane.
//
// Sixteen rows' block `b` is unpacked in registers and transposed so that vector `j` holds,
// in lane `l`, the four values `4j..4j + 4` of row `l` ([`Block16`]). One `vpdpbusd` of that
// vector with an activation row's four values `4j..4j + 4` (broadcast) then adds four
// products to every row's lane: the per-block integer sums come out one per lane, with no
// horizontal reduction, and the float work is done for sixteen rows at once.
//
// `vpdpbusd` multiplies `u8` by `i8`. Unsigned weights (Q4_1, Q5_1) are the `u8` side as they
// are; signed ones (Q4_0, Q5_0, Q8_0) are stored plus 128 (`^ 0x80`, so `0..=255`) and the
// sum starts from the activation block's `-128 * sum(x)`: `sum((w + 128) * x) - 128 * sum(x)`
// is exactly `sum(w * x)` in `i32`.

/// Sixteen weight rows' block in `vpdpbusd` layout (see above).
type Block16 = [__m512i; 8];

/// `vpermt2d` indices for one butterfly stage of [`transpose16x8`], applied to a vector `a`
/// and its partner `b` (`bit` vectors further): the low output keeps `a`'s elements whose
/// index has bit `bit` clear and takes the others from `b` (index `^ bit`); the high output
/// (`hi`) keeps `b`'s elements with the bit set and takes the others from `a`.
const fn stage_indices(bit: usize, hi: bool) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut l = 0;
    while l < 16 {
        // Element `e` of an 8-element row lives in lane `e` (low half) and `8 + e` (high).
        let (e, half) = (l & 7, l & 8);
        let swapped = (half | (e ^ bit)) as i32;
        idx[l] = match (hi, e & bit != 0) {
            (false, false) => l as i32,
            (false, true) => 16 + swapped,
            (true, true) => 16 + l as i32,
            (true, false) => swapped,
        };
        l += 1;
    }
    idx
}

/// [`stage_indices`] for bits 1, 2 and 4, low and high output.
static STAGES: [[[i32; 16]; 2]; 3] = [
    [stage_indices(1, false), stage_indices(1, true)],
    [stage_indices(2, false), stage_indices(2, true)],
    [stage_indices(4, false), stage_indices(4, true)],
];

/// Transposes sixteen rows of eight `i32` (`a[l]`) into eight vectors of sixteen (lane `l`
/// of result `j` = element `j` of `a[l]`).
///
/// Rows `p` and `p + 8` share vector `p` (low and high half), which makes this an 8x8
/// transpose of lane pairs: three butterfly stages of `vpermt2d`, each swapping the
/// off-diagonal blocks of size 1, 2, then 4.
#[inline(always)]
unsafe fn transpose16x8(a: &[__m256i; 16]) -> Block16 {
    unsafe {
        // A loop, not `array::from_fn` (see the module docs).
        let mut z = [_mm512_setzero_si512(); 8];
        for (p, zp) in z.iter_mut().enumerate() {
            *zp = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a[p]), a[p + 8]);
        }
        for (stage, bit) in [1, 2, 4].into_iter().enumerate() {
            let lo = _mm512_loadu_si512(STAGES[stage][0].as_ptr().cast());
            let hi = _mm512_loadu_si512(STAGES[stage][1].as_ptr().cast());
            for r in 0..8 {
                if r & bit == 0 {
                    let (x, y) = (z[r], z[r | bit]);
                    z[r] = _mm512_permutex2var_epi32(x, lo, y);
                    z[r | bit] = _mm512_permutex2var_epi32(x, hi, y);
                }
            }
        }
        z
    }
}

/// `vpermt2d` indices gathering dwords `j` and `j + 1` (lanes 0..8 and 8..16) of eight rows
/// held four per vector (row `r` of the first vector in lanes `4r..4r + 4`, of the second in
/// `16 + 4r..`), for `j` = 0 and 2.
const fn q4_pair_indices(j0: usize) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut l = 0;
    while l < 16 {
        let (j, r) = (j0 + l / 8, l % 8);
        idx[l] = if r < 4 {
            4 * r + j
        } else {
            16 + 4 * (r - 4) + j
        } as i32;
        l += 1;
    }
    idx
}

static Q4_PAIRS: [[i32; 16]; 2] = [q4_pair_indices(0), q4_pair_indices(2)];

/// How many tiles ahead [`Rows16::prefetch`] reaches.
const PREFETCH_TILES: usize = 2;

/// Up to sixteen consecutive packed rows; past the last row, lanes repeat it (their results
/// are never stored).
struct Rows16<const TY: u8> {
    w: [Packed<TY>; 16],
    base: *const u8,
    /// Byte offset of each lane's row from `base`.
    offsets: __m512i,
    /// The start of the tile [`PREFETCH_TILES`] ahead.
    ahead: *const u8,
    /// Cache lines of that tile to prefetch per block of this one.
    lines_per_block: usize,
}

impl<const TY: u8> Rows16<TY> {
    /// The rows in `rows` (1 to 16 of `row_bytes` each). The CPU must support AVX-512 F.
    #[inline(always)]
    unsafe fn new(rows: &[u8], row_bytes: usize) -> Self {
        let n = rows.len() / row_bytes.max(1);
        assert!(
            (1..=TILE_ROWS).contains(&n) && n * row_bytes == rows.len(),
            "bad tile rows"
        );
        assert_eq!(row_bytes % Packed::<TY>::BS, 0, "partial block");
        assert!(
            rows.len() <= i32::MAX as usize,
            "rows too long for gather offsets"
        );
        let base = rows.as_ptr();
        let offsets: [i32; TILE_ROWS] = std::array::from_fn(|l| (l.min(n - 1) * row_bytes) as i32);
        Rows16 {
            // In bounds (row `n - 1` at most); `wrapping_add` keeps this safe code.
            w: std::array::from_fn(|l| Packed {
                p: base.wrapping_add(l.min(n - 1) * row_bytes),
            }),
            base,
            ahead: base.wrapping_add(TILE_ROWS * PREFETCH_TILES * row_bytes),
            lines_per_block: (TILE_ROWS * row_bytes).div_ceil(64 * (row_bytes / Packed::<TY>::BS)),
            // SAFETY: reads the 64 bytes of a 16-element `i32` array; AVX-512 F is the
            // caller's.
            offsets: unsafe { _mm512_loadu_si512(offsets.as_ptr().cast()) },
        }
    }

    /// Block `b` of the sixteen rows in [`Block16`] layout. `b` must be below the rows' block
    /// count.
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> Block16 {
        unsafe {
            if matches!(TY, Q4_0 | Q4_1) {
                return self.block_q4(b);
            }
            let mut a = [_mm256_setzero_si256(); 16];
            for (al, w) in a.iter_mut().zip(&self.w) {
                *al = w.q(b);
            }
            let mut t = transpose16x8(&a);
            if <Packed<TY> as Weights>::SIGNED {
                let flip = _mm512_set1_epi8(0x80u8 as i8);
                for tj in &mut t {
                    *tj = _mm512_xor_si512(*tj, flip);
                }
            }
            t
        }
    }

    /// [`Rows16::block`] for Q4_0 and Q4_1, with a quarter of the shuffles: the packed bytes'
    /// dword `j` holds values `4j..4j + 4` in its low nibbles and `16 + 4j..` in its high ones,
    /// so transposing the sixteen rows' four packed dwords and splitting nibbles afterwards
    /// gives all eight vectors.
    #[inline(always)]
    unsafe fn block_q4(&self, b: usize) -> Block16 {
        unsafe {
            let at = b * Packed::<TY>::BS + if TY == Q4_0 { 2 } else { 4 };
            let ld = |l: usize| _mm_loadu_si128(self.w[l].p.add(at).cast());
            // Rows 4g..4g + 4, one per 128-bit lane.
            let mut z = [_mm512_setzero_si512(); 4];
            for (g, zg) in z.iter_mut().enumerate() {
                let v = _mm512_castsi128_si512(ld(4 * g));
                let v = _mm512_inserti32x4::<1>(v, ld(4 * g + 1));
                let v = _mm512_inserti32x4::<2>(v, ld(4 * g + 2));
                *zg = _mm512_inserti32x4::<3>(v, ld(4 * g + 3));
            }
            // Dwords (0, 1) and (2, 3) of rows 0..8, then of rows 8..16; then whole columns.
            let i01 = _mm512_loadu_si512(Q4_PAIRS[0].as_ptr().cast());
            let i23 = _mm512_loadu_si512(Q4_PAIRS[1].as_ptr().cast());
            let (a_lo, b_lo) = (
                _mm512_permutex2var_epi32(z[0], i01, z[1]),
                _mm512_permutex2var_epi32(z[0], i23, z[1]),
            );
            let (a_hi, b_hi) = (
                _mm512_permutex2var_epi32(z[2], i01, z[3]),
                _mm512_permutex2var_epi32(z[2], i23, z[3]),
            );
            let q = [
                _mm512_shuffle_i64x2::<0x44>(a_lo, a_hi),
                _mm512_shuffle_i64x2::<0xEE>(a_lo, a_hi),
                _mm512_shuffle_i64x2::<0x44>(b_lo, b_hi),
                _mm512_shuffle_i64x2::<0xEE>(b_lo, b_hi),
            ];
            let mask = _mm512_set1_epi8(0x0F);
            let mut t = [_mm512_setzero_si512(); 8];
            for (j, &qj) in q.iter().enumerate() {
                t[j] = _mm512_and_si512(qj, mask);
                t[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(qj), mask);
            }
            if TY == Q4_0 {
                // (nibble - 8) + 128.
                let offset = _mm512_set1_epi8(120);
                for tj in &mut t {
                    *tj = _mm512_add_epi8(*tj, offset);
                }
            }
            t
        }
    }

    /// Scales and offsets (zeros without offsets) of block `b` of the sixteen rows, as f32.
    #[inline(always)]
    unsafe fn scales(&self, b: usize) -> (__m512, __m512) {
        unsafe {
            // Each block starts with its f16 scale, then (Q4_1, Q5_1) its f16 offset.
            let head = _mm512_i32gather_epi32::<1>(
                self.offsets,
                self.base.add(b * Packed::<TY>::BS).cast(),
            );
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
            let m = if <Packed<TY> as Weights>::WITH_MIN {
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head)))
            } else {
                _mm512_setzero_ps()
            };
            (d, m)
        }
    }

    /// Hints that part `b` of the tile [`PREFETCH_TILES`] ahead will be read soon: that tile
    /// is one contiguous range, prefetched in address order, a share per block of this one.
    ///
    /// Rows are read sixteen short streams at a time, which the hardware prefetchers hardly
    /// follow (decode with one activation row reads rows one after another and needs none).
    #[inline(always)]
    fn prefetch(&self, b: usize) {
        for c in b * self.lines_per_block..(b + 1) * self.lines_per_block {
            // A hint only: the address may lie past the matrix (`wrapping_add`, never
            // dereferenced).
            let p = self.ahead.wrapping_add(c * 64);
            // SAFETY: prefetching has no architectural effect and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
        }
    }
}

/// `R` activation rows of a [`Batch`] as raw pointers (rows past the batch repeat its last).
struct ActRows<const R: usize> {
    x: [*const i8; R],
    d: [*const f32; R],
    s: [*const f32; R],
    /// `-128 * sum(x)` per block (signed weights only; dangling otherwise).
    corr: [*const i32; R],
}

impl<const R: usize> ActRows<R> {
    /// Rows `i0..i0 + R` of `batch`, each sliced (so bounds-checked) to its `nb` blocks.
    #[inline(always)]
    fn new(batch: &Batch, i0: usize, signed: bool) -> Self {
        let (m, k) = (batch.m, batch.acts.k);
        let nb = k / BLOCK;
        assert!(i0 < m, "activation row past the batch");
        let row = |r: usize| (i0 + r).min(m - 1);
        ActRows {
            x: std::array::from_fn(|r| batch.acts.qs[row(r) * k..(row(r) + 1) * k].as_ptr()),
            d: std::array::from_fn(|r| batch.acts.d[row(r) * nb..(row(r) + 1) * nb].as_ptr()),
            s: std::array::from_fn(|r| batch.acts.s[row(r) * nb..(row(r) + 1) * nb].as_ptr()),
            corr: std::array::from_fn(|r| {
                if signed {
                    batch.corr[row(r) * nb..(row(r) + 1) * nb].as_ptr()
                } else {
                    ptr::NonNull::dangling().as_ptr()
                }
            }),
        }
    }
}

/// Adds block `b` of sixteen weight rows (`t`, scales `dw`, offsets `mw`) times each
/// activation row `r` of `a` to `sum[r]`, lane `l` = weight row `l`.
///
/// Per lane, the float operations are `scalar::dot`'s: `(d * xd) * sumi [+ m * xs]` added to
/// the running sum, one block after another.
#[inline(always)]
unsafe fn block_acts<W: Weights, const R: usize>(
    t: &Block16,
    dw: __m512,
    mw: __m512,
    b: usize,
    a: &ActRows<R>,
    sum: &mut [__m512; R],
) {
    unsafe {
        for (r, sum_r) in sum.iter_mut().enumerate() {
            let mut acc = if W::SIGNED {
                _mm512_set1_epi32(*a.corr[r].add(b))
            } else {
                _mm512_setzero_si512()
            };
            for (j, &tj) in t.iter().enumerate() {
                let xv = ptr::read_unaligned(a.x[r].add(b * BLOCK + 4 * j).cast::<i32>());
                acc = _mm512_dpbusd_epi32(acc, tj, _mm512_set1_epi32(xv));
            }
            let f = _mm512_cvtepi32_ps(acc);
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d[r].add(b)));
            let v = if W::WITH_MIN {
                _mm512_add_ps(
                    _mm512_mul_ps(dd, f),
                    _mm512_mul_ps(mw, _mm512_set1_ps(*a.s[r].add(b))),
                )
            } else {
                _mm512_mul_ps(f, dd)
            };
            *sum_r = _mm512_add_ps(*sum_r, v);
        }
    }
}

/// Writes `sum[r]`'s first `rows` lanes to `out[(i0 + r) * ld + col0..]` for every `r` that is
/// a row of the batch (below `m`). The CPU must support AVX-512 F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_sums<const R: usize>(
    sum: &[__m512; R],
    m: usize,
    i0: usize,
    rows: usize,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    for (r, s) in sum.iter().enumerate().take(m - i0) {
        let mut tmp = [0.0f32; TILE_ROWS];
        // SAFETY: `tmp` holds 16 floats; AVX-512 F is the caller's.
        unsafe { _mm512_storeu_ps(tmp.as_mut_ptr(), *s) };
        let at = (i0 + r) * ld + col0;
        out[at..at + rows].copy_from_slice(&tmp[..rows]);
    }
}

/// Runs `body` for each pass over the activation rows `0..m`, with `i0` the pass's first row
/// and the constant `R` its width: 8 rows, or 4 or 2 for what is left at the end.
macro_rules! act_passes {
    ($m:expr, |$i0:ident, $r:ident| $body:expr) => {{
        let m = $m;
        let mut $i0 = 0;
        while $i0 < m {
            match m - $i0 {
                1..=2 => {
                    const $r: usize = 2;
                    $body
                }
                3..=4 => {
                    const $r: usize = 4;
                    $body
                }
                _ => {
                    const $r: usize = 8;
                    $body
                }
            }
            $i0 += 8;
        }
    }};
}

/// Activation rows `i0..i0 + R` of `batch` against sixteen packed rows straight from memory,
/// into `out[i * ld + col0 + l]`.
#[inline(always)]
unsafe fn packed_group<const TY: u8, const R: usize>(
    w: &Rows16<TY>,
    rows: usize,
    batch: &Batch,
    i0: usize,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let nb = batch.acts.k / BLOCK;
    let a = ActRows::<R>::new(batch, i0, <Packed<TY> as Weights>::SIGNED);
    // SAFETY: `b < nb`, the rows' block count (`packed_batch16` checks `row_bytes`); the
    // activation pointers cover `nb` blocks (`ActRows::new`); CPU features are the caller's.
    unsafe {
        let mut sum = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            w.prefetch(b);
            let t = w.block(b);
            let (dw, mw) = w.scales(b);
            block_acts::<Packed<TY>, R>(&t, dw, mw, b, &a, &mut sum);
        }
        store_sums(&sum, batch.m, i0, rows, out, ld, col0);
    }
}

/// `out[i * n + r]` = dot of packed row `r` of `rows` (`n` of them) with activation row `i`,
/// sixteen weight rows and up to eight activation rows per pass, unpacking each block once
/// per pass.
#[inline(always)]
unsafe fn packed_batch16<const TY: u8>(rows: &[u8], batch: &Batch, out: &mut [f32]) {
    let nb = batch.acts.k / BLOCK;
    let row_bytes = nb * Packed::<TY>::BS;
    let n = rows.len() / row_bytes.max(1);
    assert_eq!(
        n * row_bytes,
        rows.len(),
        "rows do not match the activations"
    );
    assert_eq!(out.len(), batch.m * n, "out does not match the rows");
    batch.check(<Packed<TY> as Weights>::SIGNED);
    for (g, group) in rows.chunks(TILE_ROWS * row_bytes.max(1)).enumerate() {
        let cnt = group.len() / row_bytes;
        // SAFETY: forwarded; `Rows16::new` checks the rows, `ActRows::new` the activations.
        unsafe {
            let w = Rows16::<TY>::new(group, row_bytes);
            act_passes!(batch.m, |i0, R| packed_group::<TY, R>(
                &w,
                cnt,
                batch,
                i0,
                out,
                n,
                g * TILE_ROWS
            ));
        }
    }
}

#[inline(always)]
unsafe fn dot_packed_batch_vnni(ty: GgmlType, rows: &[u8], batch: &Batch, out: &mut [f32]) {
    // SAFETY: forwarded; `packed_batch16` checks every bound it relies on.
    unsafe {
        match ty {
            GgmlType::Q4_0 => packed_batch16::<Q4_0>(rows, batch, out),
            GgmlType::Q4_1 => packed_batch16::<Q4_1>(rows, batch, out),
            GgmlType::Q5_0 => packed_batch16::<Q5_0>(rows, batch, out),
            GgmlType::Q5_1 => packed_batch16::<Q5_1>(rows, batch, out),
            GgmlType::Q8_0 => packed_batch16::<Q8_0>(rows, batch, out),
            other => unreachable!("dot_packed_batch called for {other}, which has no integer path"),
        }
    }
}

/// Unpacks up to sixteen packed rows into `tile` ([`Block16`] layout per block, scales and
/// offsets as f32).
#[inline(always)]
unsafe fn tile_load_typed<const TY: u8>(rows: &[u8], row_bytes: usize, tile: &mut Tile) {
    // SAFETY: AVX-512 F is the caller's.
    let w = unsafe { Rows16::<TY>::new(rows, row_bytes) };
    let nb = row_bytes / Packed::<TY>::BS;
    // Every byte below these lengths is written below: grow, never clear.
    let (qn, sn) = (nb * BLOCK * TILE_ROWS, nb * TILE_ROWS);
    if tile.q.len() < qn {
        tile.q.resize(qn, 0);
    }
    if tile.d.len() < sn {
        tile.d.resize(sn, 0.0);
    }
    if tile.m.len() < sn {
        tile.m.resize(sn, 0.0);
    }
    let (q, d, m) = (
        tile.q.as_mut_ptr(),
        tile.d.as_mut_ptr(),
        tile.m.as_mut_ptr(),
    );
    for b in 0..nb {
        // SAFETY: `b < nb`, the rows' block count; `q`, `d` and `m` hold `nb` blocks of 16
        // rows (resized above); CPU features are the caller's.
        unsafe {
            w.prefetch(b);
            let t = w.block(b);
            for (j, tj) in t.iter().enumerate() {
                _mm512_storeu_si512(q.add((b * 8 + j) * 4 * TILE_ROWS).cast(), *tj);
            }
            let (dw, mw) = w.scales(b);
            _mm512_storeu_ps(d.add(b * TILE_ROWS), dw);
            _mm512_storeu_ps(m.add(b * TILE_ROWS), mw);
        }
    }
}

#[inline(always)]
unsafe fn tile_load(ty: GgmlType, rows: &[u8], row_bytes: usize, tile: &mut Tile) {
    // SAFETY: forwarded; `tile_load_typed` checks every bound it relies on.
    unsafe {
        match ty {
            GgmlType::Q4_0 => tile_load_typed::<Q4_0>(rows, row_bytes, tile),
            GgmlType::Q4_1 => tile_load_typed::<Q4_1>(rows, row_bytes, tile),
            GgmlType::Q5_0 => tile_load_typed::<Q5_0>(rows, row_bytes, tile),
            GgmlType::Q5_1 => tile_load_typed::<Q5_1>(rows, row_bytes, tile),
            GgmlType::Q8_0 => tile_load_typed::<Q8_0>(rows, row_bytes, tile),
            other => unreachable!("Tile::load called for {other}, which has no integer path"),
        }
    }
}

/// Activation rows `i0..i0 + R` of `batch` against a loaded [`Tile`], into
/// `out[i * tile.rows + l]`. `W` only says whether the weights are signed and carry offsets.
#[inline(always)]
unsafe fn tile_group<W: Weights, const R: usize>(
    tile: &Tile,
    batch: &Batch,
    i0: usize,
    out: &mut [f32],
) {
    let a = ActRows::<R>::new(batch, i0, W::SIGNED);
    let (q, d, mm) = (tile.q.as_ptr(), tile.d.as_ptr(), tile.m.as_ptr());
    // SAFETY: the tile's buffers cover `nb` blocks of 16 rows (`Tile::check`), the activation
    // pointers `nb` blocks (`ActRows::new`); CPU features are the caller's.
    unsafe {
        let mut sum = [_mm512_setzero_ps(); R];
        for b in 0..tile.nb {
            let mut t = [_mm512_setzero_si512(); 8];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = _mm512_loadu_si512(q.add((b * 8 + j) * 4 * TILE_ROWS).cast());
            }
            let dw = _mm512_loadu_ps(d.add(b * TILE_ROWS));
            let mw = if W::WITH_MIN {
                _mm512_loadu_ps(mm.add(b * TILE_ROWS))
            } else {
                _mm512_setzero_ps()
            };
            block_acts::<W, R>(&t, dw, mw, b, &a, &mut sum);
        }
        store_sums(&sum, batch.m, i0, tile.rows, out, tile.rows, 0);
    }
}

/// `out[i * tile.rows + l]` = dot of the tile's row `l` with activation row `i`, every `i`.
#[inline(always)]
unsafe fn tile_matmul(tile: &Tile, batch: &Batch, with_min: bool, out: &mut [f32]) {
    tile.check(batch);
    batch.check(tile.signed);
    assert_eq!(
        out.len(),
        batch.m * tile.rows,
        "out does not match the tile"
    );
    assert!(!with_min || !tile.signed, "offsets with signed weights");
    // SAFETY: forwarded; buffers checked above and in `ActRows::new`.
    unsafe {
        match (tile.signed, with_min) {
            (false, true) => {
                act_passes!(batch.m, |i0, R| tile_group::<Unpacked<false, true>, R>(
                    tile, batch, i0, out
                ))
            }
            (false, false) => {
                act_passes!(batch.m, |i0, R| tile_group::<Unpacked<false, false>, R>(
                    tile, batch, i0, out
                ))
            }
            (true, _) => {
                act_passes!(batch.m, |i0, R| tile_group::<Unpacked<true, false>, R>(
                    tile, batch, i0, out
                ))
            }
        }
    }
}

/// Activation row `i` as raw pointers, after checking it lies inside `acts`.
#[inline(always)]
fn act_row(acts: &QuantizedActs, i: usize) -> (usize, *const i8, *const f32, *const f32) {
    let nb = acts.k / BLOCK;
    let xq = &acts.qs[i * acts.k..(i + 1) * acts.k];
    let xd = &acts.d[i * nb..(i + 1) * nb];
    let xs = &acts.s[i * nb..(i + 1) * nb];
    (nb, xq.as_ptr(), xd.as_ptr(), xs.as_ptr())
}

#[inline(always)]
unsafe fn packed_rows<D: Dot, const TY: u8>(
    rows: &[u8],
    acts: &QuantizedActs,
    i: usize,
    out: &mut [f32],
) {
    let (nb, xq, xd, xs) = act_row(acts, i);
    let row_bytes = nb * Packed::<TY>::BS;
    assert_eq!(rows.len(), out.len() * row_bytes, "rows do not match out");
    for (r, o) in out.iter_mut().enumerate() {
        // SAFETY: row `r` spans `row_bytes = nb * BS` bytes inside `rows` (asserted above);
        // the activation pointers cover `nb` blocks (`act_row`); CPU features are the caller's.
        *o = unsafe {
            let w = Packed::<TY> {
                p: rows.as_ptr().add(r * row_bytes),
            };
            row_dot::<D, _>(&w, nb, xq, xd, xs)
        };
    }
}

#[inline(always)]
unsafe fn dot_packed_rows<D: Dot>(
    ty: GgmlType,
    rows: &[u8],
    acts: &QuantizedActs,
    i: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded; `packed_rows` checks every bound it relies on.
    unsafe {
        match ty {
            GgmlType::Q4_0 => packed_rows::<D, Q4_0>(rows, acts, i, out),
            GgmlType::Q4_1 => packed_rows::<D, Q4_1>(rows, acts, i, out),
            GgmlType::Q5_0 => packed_rows::<D, Q5_0>(rows, acts, i, out),
            GgmlType::Q5_1 => packed_rows::<D, Q5_1>(rows, acts, i, out),
            GgmlType::Q8_0 => packed_rows::<D, Q8_0>(rows, acts, i, out),
            other => unreachable!("dot_packed_rows called for {other}, which has no integer path"),
        }
    }
}

#[inline(always)]
unsafe fn dot<D: Dot>(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
    let (nb, xq, xd, xs) = act_row(acts, i);
    assert!(
        row.q.len() >= nb * BLOCK && row.d.len() >= nb,
        "row shorter than activations"
    );
    assert!(!with_min || row.m.len() >= nb, "row has no offsets");
    let (q, d, m) = (row.q.as_ptr(), row.d.as_ptr(), row.m.as_ptr());
    // SAFETY: `q`, `d` (and `m` when read, i.e. with_min) cover `nb` blocks (asserted above),
    // the activation pointers too (`act_row`); CPU features are the caller's.
    unsafe {
        match (row.unsigned, with_min) {
            (true, true) => row_dot::<D, _>(&Unpacked::<false, true> { q, d, m }, nb, xq, xd, xs),
            (true, false) => row_dot::<D, _>(&Unpacked::<false, false> { q, d, m }, nb, xq, xd, xs),
            (false, true) => row_dot::<D, _>(&Unpacked::<true, true> { q, d, m }, nb, xq, xd, xs),
            (false, false) => row_dot::<D, _>(&Unpacked::<true, false> { q, d, m }, nb, xq, xd, xs),
        }
    }
}

#[inline(always)]
unsafe fn unpack_typed<const TY: u8>(row: &[u8], out: &mut UnpackedRow) {
    let bs = Packed::<TY>::BS;
    let nb = row.len() / bs;
    out.q.resize(nb * BLOCK, 0);
    out.d.resize(nb, 0.0);
    out.m.resize(nb, 0.0);
    out.unsigned = !<Packed<TY> as Weights>::SIGNED;
    let w = Packed::<TY> { p: row.as_ptr() };
    for b in 0..nb {
        // SAFETY: block `b < nb` lies inside `row`; `out.q` holds `nb * BLOCK` values.
        unsafe {
            _mm256_storeu_si256(out.q.as_mut_ptr().add(b * BLOCK).cast(), w.q(b));
            out.d[b] = w.d(b);
            if <Packed<TY> as Weights>::WITH_MIN {
                out.m[b] = w.m(b);
            }
        }
    }
}

#[inline(always)]
unsafe fn unpack_row(ty: GgmlType, row: &[u8], out: &mut UnpackedRow) {
    // SAFETY: forwarded; `unpack_typed` only touches memory inside `row` and `out`.
    unsafe {
        match ty {
            GgmlType::Q4_0 => unpack_typed::<Q4_0>(row, out),
            GgmlType::Q4_1 => unpack_typed::<Q4_1>(row, out),
            GgmlType::Q5_0 => unpack_typed::<Q5_0>(row, out),
            GgmlType::Q5_1 => unpack_typed::<Q5_1>(row, out),
            GgmlType::Q8_0 => unpack_typed::<Q8_0>(row, out),
            other => unreachable!("unpack_row called for {other}, which has no integer path"),
        }
    }
}

/// `quantize_acts` 32 values at a time. Blocks whose scale is not finite (an infinite input,
/// or an `amax` so small that `127 / amax` overflows) take the scalar code, whose float to
/// integer conversion saturates where `vcvtps2dq` would not.
#[inline(always)]
unsafe fn quantize_acts(x: &[f32], k: usize, fmt: ActFormat) -> QuantizedActs {
    debug_assert_eq!(k % BLOCK, 0);
    let nb = x.len() / BLOCK;
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0.0f32; nb];
    let mut s = vec![0.0f32; nb];
    for b in 0..nb {
        // SAFETY: block `b < nb` is inside `x` and `qs` (both `nb * BLOCK` long at least).
        unsafe {
            let src = x.as_ptr().add(b * BLOCK);
            let v = [
                _mm256_loadu_ps(src),
                _mm256_loadu_ps(src.add(8)),
                _mm256_loadu_ps(src.add(16)),
                _mm256_loadu_ps(src.add(24)),
            ];
            // max(|v|, acc) returns acc when |v| is NaN, as `f32::max` ignores NaN; acc never
            // becomes NaN, so the result is the scalar fold's whatever the order.
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
            let mut acc = _mm256_setzero_ps();
            for &vi in &v {
                acc = _mm256_max_ps(_mm256_and_ps(vi, abs), acc);
            }
            let h = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_max_ss(h, _mm_shuffle_ps::<1>(h, h));
            let amax = _mm_cvtss_f32(h);
            let scale = amax / 127.0;
            let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            if !(amax.is_finite() && inv.is_finite()) {
                let sum = super::scalar::quantize_block(
                    &x[b * BLOCK..(b + 1) * BLOCK],
                    &mut qs[b * BLOCK..(b + 1) * BLOCK],
                    inv,
                );
                d[b] = round_f16(scale);
                if fmt == ActFormat::Q8_1 {
                    s[b] = round_f16(sum as f32 * scale);
                }
                continue;
            }
            // |v * inv| <= ~127 here, so rounding and converting is exact; NaN gives 0 as
            // Rust's `as i32` does.
            let iv = _mm256_set1_ps(inv);
            let mut r = [_mm256_setzero_si256(); 4];
            for (ri, &vi) in r.iter_mut().zip(&v) {
                let p = _mm256_mul_ps(vi, iv);
                let q = _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(p));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(p, p));
                *ri = _mm256_andnot_si256(nan, q);
            }
            let sum = hsum(_mm256_add_epi32(
                _mm256_add_epi32(r[0], r[1]),
                _mm256_add_epi32(r[2], r[3]),
            ));
            let p01 = _mm256_packs_epi32(r[0], r[1]);
            let p23 = _mm256_packs_epi32(r[2], r[3]);
            let p = _mm256_packs_epi16(p01, p23);
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * BLOCK).cast(), p);
            d[b] = round_f16(scale);
            if fmt == ActFormat::Q8_1 {
                s[b] = round_f16(sum as f32 * scale);
            }
        }
    }
    QuantizedActs { k, qs, d, s }
}

/// Entry points compiled for one instruction set. Callers must have checked that the CPU
/// supports it (see `super::isa`).
macro_rules! entry_points {
    ($name:ident, $dot:ty, $features:literal) => {
        pub(super) mod $name {
            use super::*;

            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn quantize_acts(
                x: &[f32],
                k: usize,
                fmt: ActFormat,
            ) -> QuantizedActs {
                // SAFETY: the features the body needs are enabled on this function.
                unsafe { super::quantize_acts(x, k, fmt) }
            }

            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn unpack_row(
                ty: GgmlType,
                row: &[u8],
                out: &mut UnpackedRow,
            ) {
                // SAFETY: the features the body needs are enabled on this function.
                unsafe { super::unpack_row(ty, row, out) }
            }

            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn dot(
                row: &UnpackedRow,
                acts: &QuantizedActs,
                i: usize,
                with_min: bool,
            ) -> f32 {
                // SAFETY: the features the body needs are enabled on this function.
                unsafe { super::dot::<$dot>(row, acts, i, with_min) }
            }

            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn dot_batch(
                row: &UnpackedRow,
                acts: &QuantizedActs,
                sc: &BatchScales,
                with_min: bool,
                rows: std::ops::Range<usize>,
                out: &mut [f32],
            ) {
                // SAFETY: the features the body needs are enabled on this function.
                unsafe { super::dot_batch::<$dot>(row, acts, sc, with_min, rows, out) }
            }

            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn dot_packed_rows(
                ty: GgmlType,
                rows: &[u8],
                acts: &QuantizedActs,
                i: usize,
                out: &mut [f32],
            ) {
                // SAFETY: the features the body needs are enabled on this function.
                unsafe { super::dot_packed_rows::<$dot>(ty, rows, acts, i, out) }
            }
        }
    };
}

entry_points!(avx2, Avx2, "avx2,fma,f16c");
entry_points!(
    avx512,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn avx2_dot_packed_batch(
    ty: GgmlType,
    rows: &[u8],
    batch: &Batch,
    out: &mut [f32],
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { dot_packed_batch::<Avx2>(ty, rows, batch, out) }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_dot_packed_batch(
    ty: GgmlType,
    rows: &[u8],
    batch: &Batch,
    out: &mut [f32],
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { dot_packed_batch_vnni(ty, rows, batch, out) }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_tile_load(
    ty: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    tile: &mut Tile,
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { tile_load(ty, rows, row_bytes, tile) }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_tile_matmul(
    tile: &Tile,
    batch: &Batch,
    with_min: bool,
    out: &mut [f32],
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { tile_matmul(tile, batch, with_min, out) }
}
