//! x86-64 versions of the q8 kernels: AVX2 (+FMA, F16C) and AVX-512 VNNI.
//!
//! Every function here returns exactly what its scalar counterpart in `super::scalar` returns,
//! which is what llama.cpp's x86 kernels return: per block, eight exact `i32` lane sums (four
//! products each), converted to f32 and accumulated with one FMA per lane and block; at the end
//! the lanes are folded in `hsum_float_8`'s order and the offsets' FMA chain added.
//!
//! The bodies are `#[inline(always)]` generics; only the entry points (the [`avx2`] module and
//! the `avx2_*` / `avx512_*` functions at the end) carry `#[target_feature]`, so each is
//! compiled once per instruction set. Closures inside the bodies do not inherit those
//! features: intrinsics called from them stop being inlined, so arrays of vectors are filled
//! with loops, not `array::from_fn`.

use std::arch::x86_64::*;
use std::ptr;

use ember_quant::GgmlType;

use super::{ActFormat, BLOCK, Batch, LANES, QuantizedActs, TILE_ROWS, Tile, UnpackedRow};

/// How 32 `u8 x i8` products become 8 `i32` lane sums (lane `L` = bytes `4L..4L + 4`).
trait Dot {
    /// `a` as `u8` (at most 128), `b` as `i8` (never -128 with `a = 128`).
    unsafe fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i;
}

/// `vpmaddubsw` + `vpmaddwd`: pairs of products never exceed `2 * 128 * 127 < i16::MAX`, so
/// the saturating 16-bit step is exact.
struct Avx2;

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)) }
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
    /// Hints that blocks a little past `b` will be read soon.
    #[inline(always)]
    fn prefetch(&self, _b: usize) {}
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
    unsafe fn d(&self, b: usize) -> f32 {
        unsafe { *self.d.add(b) }
    }
    #[inline(always)]
    unsafe fn m(&self, b: usize) -> f32 {
        unsafe { *self.m.add(b) }
    }
}

/// ggml's `hsum_float_8`: the high half added to the low, then lanes two apart, then one.
#[inline(always)]
unsafe fn hsum_float_8(x: __m256) -> f32 {
    unsafe {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// Sum of all lanes (exact: `i32`).
#[inline(always)]
unsafe fn hsum(v: __m256i) -> i32 {
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// One activation row as raw pointers: values, scales, offsets (`d * sum`, Q8_1).
#[derive(Clone, Copy)]
struct Act {
    x: *const i8,
    d: *const f32,
    s: *const f32,
}

/// Activation row `i` of `acts`, after checking it lies inside.
#[inline(always)]
fn act(acts: &QuantizedActs, i: usize) -> Act {
    let nb = acts.k / BLOCK;
    Act {
        x: acts.qs[i * acts.k..(i + 1) * acts.k].as_ptr(),
        d: acts.d[i * nb..(i + 1) * nb].as_ptr(),
        s: acts.s[i * nb..(i + 1) * nb].as_ptr(),
    }
}

/// Activation rows per pass over a weight row in [`row_acts`].
const GROUP: usize = 4;

/// Dots of one weight row (`nb` blocks) with `G` activation rows, llama.cpp's arithmetic per
/// pair (see the module docs): the weight block is unpacked once per pass for all `G`.
#[inline(always)]
unsafe fn row_acts<D: Dot, W: Weights, const G: usize>(w: &W, nb: usize, a: &[Act; G]) -> [f32; G] {
    unsafe {
        let mut acc = [_mm256_setzero_ps(); G];
        let mut summs = [0.0f32; G];
        for b in 0..nb {
            w.prefetch(b);
            let q = w.q(b);
            let (qa, d) = (if W::SIGNED { _mm256_abs_epi8(q) } else { q }, w.d(b));
            for g in 0..G {
                let x = _mm256_loadu_si256(a[g].x.add(b * BLOCK).cast());
                let x = if W::SIGNED { _mm256_sign_epi8(x, q) } else { x };
                let f = _mm256_cvtepi32_ps(D::dot_u8i8(qa, x));
                let dd = _mm256_set1_ps(d * *a[g].d.add(b));
                acc[g] = _mm256_fmadd_ps(dd, f, acc[g]);
                if W::WITH_MIN {
                    summs[g] = w.m(b).mul_add(*a[g].s.add(b), summs[g]);
                }
            }
        }
        let mut out = [0.0f32; G];
        for g in 0..G {
            let h = hsum_float_8(acc[g]);
            out[g] = if W::WITH_MIN { h + summs[g] } else { h };
        }
        out
    }
}

/// `out[i * ld + col]` = dot of weight row `w` with activation row `i`, for every `i < m`.
#[inline(always)]
unsafe fn row_all_acts<D: Dot, W: Weights>(
    w: &W,
    acts: &QuantizedActs,
    m: usize,
    out: &mut [f32],
    ld: usize,
    col: usize,
) {
    let nb = acts.k / BLOCK;
    let mut i0 = 0;
    while i0 < m {
        // Rows past the batch repeat its last; their results are dropped.
        let mut a = [act(acts, m - 1); GROUP];
        for (g, ag) in a.iter_mut().enumerate().take(m - i0) {
            *ag = act(acts, i0 + g);
        }
        // SAFETY: the activation pointers cover `nb` blocks (`act`), the caller's weights
        // too; CPU features are the caller's.
        let r = unsafe { row_acts::<D, W, GROUP>(w, nb, &a) };
        for (g, &v) in r.iter().enumerate().take(m - i0) {
            out[(i0 + g) * ld + col] = v;
        }
        i0 += GROUP;
    }
}

#[inline(always)]
unsafe fn packed_batch_typed<D: Dot, const TY: u8>(rows: &[u8], batch: &Batch, out: &mut [f32]) {
    let nb = batch.acts.k / BLOCK;
    let row_bytes = nb * Packed::<TY>::BS;
    let n = super::packed_rows(rows, row_bytes, batch, out);
    for r in 0..n {
        let w = Packed::<TY> {
            p: rows[r * row_bytes..(r + 1) * row_bytes].as_ptr(),
        };
        // SAFETY: row `r` spans `nb` blocks inside `rows`; CPU features are the caller's.
        unsafe { row_all_acts::<D, _>(&w, &batch.acts, batch.m, out, n, r) };
    }
}

#[inline(always)]
unsafe fn dot_packed_batch<D: Dot>(ty: GgmlType, rows: &[u8], batch: &Batch, out: &mut [f32]) {
    // SAFETY: forwarded; `packed_batch_typed` checks every bound it relies on.
    unsafe {
        match ty {
            GgmlType::Q4_0 => packed_batch_typed::<D, Q4_0>(rows, batch, out),
            GgmlType::Q4_1 => packed_batch_typed::<D, Q4_1>(rows, batch, out),
            GgmlType::Q5_0 => packed_batch_typed::<D, Q5_0>(rows, batch, out),
            GgmlType::Q5_1 => packed_batch_typed::<D, Q5_1>(rows, batch, out),
            GgmlType::Q8_0 => packed_batch_typed::<D, Q8_0>(rows, batch, out),
            other => unreachable!("dot_packed_batch called for {other}, which has no integer path"),
        }
    }
}

/// Runs `f` with `row` seen through the [`Weights`] view its signedness and `with_min` call
/// for, after checking it covers `nb` blocks.
macro_rules! with_unpacked {
    ($row:expr, $nb:expr, $with_min:expr, |$w:ident| $body:expr) => {{
        let row: &UnpackedRow = $row;
        let nb: usize = $nb;
        assert!(
            row.q.len() >= nb * BLOCK && row.d.len() >= nb,
            "row shorter than activations"
        );
        assert!(!$with_min || row.m.len() >= nb, "row has no offsets");
        let (q, d, m) = (row.q.as_ptr(), row.d.as_ptr(), row.m.as_ptr());
        match (row.unsigned, $with_min) {
            (true, true) => {
                let $w = Unpacked::<false, true> { q, d, m };
                $body
            }
            (true, false) => {
                let $w = Unpacked::<false, false> { q, d, m };
                $body
            }
            (false, true) => {
                let $w = Unpacked::<true, true> { q, d, m };
                $body
            }
            (false, false) => {
                let $w = Unpacked::<true, false> { q, d, m };
                $body
            }
        }
    }};
}

#[inline(always)]
unsafe fn dot<D: Dot>(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
    let nb = acts.k / BLOCK;
    let a = [act(acts, i)];
    // SAFETY: `with_unpacked` checks the row covers `nb` blocks, `act` the activations; CPU
    // features are the caller's.
    with_unpacked!(row, nb, with_min, |w| unsafe {
        row_acts::<D, _, 1>(&w, nb, &a)[0]
    })
}

/// AVX2's [`super::tile_matmul`]: the tile's unpacked rows against every activation row.
#[inline(always)]
unsafe fn tile_matmul_rows<D: Dot>(tile: &Tile, batch: &Batch, with_min: bool, out: &mut [f32]) {
    let nb = batch.acts.k / BLOCK;
    let rows = tile.rows;
    assert_eq!(out.len(), batch.m * rows, "out does not match the tile");
    for (l, un) in tile.un[..rows].iter().enumerate() {
        // SAFETY: `with_unpacked` checks the row; `row_all_acts` the activations; CPU
        // features are the caller's.
        with_unpacked!(un, nb, with_min, |w| unsafe {
            row_all_acts::<D, _>(&w, &batch.acts, batch.m, out, rows, l)
        });
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

/// The [`Block16`] of Q4_0 or Q4_1 nibbles transposed by [`Rows16::q4_dwords`]: low nibbles
/// are values `4j..`, high ones `16 + 4j..`; Q4_0's are stored plus 128 as signed weights are.
#[inline(always)]
unsafe fn split_q4<const TY: u8>(q: &[__m512i; 4]) -> Block16 {
    unsafe {
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

/// Q5_0/Q5_1: the nibbles of [`split_q4`] (vector `j` holds values `4j..4j + 4` of each
/// lane's row) with each value's high bit from `qh` (lane `l`: row `l`'s 32 high bits) added
/// as bit 4, and Q5_0's `- 16` and `+ 128` as `+ 112`: the bytes [`Rows16::block`] makes.
#[inline(always)]
unsafe fn with_high_bits<const TY: u8>(mut t: Block16, qh: __m512i) -> Block16 {
    // SAFETY: AVX-512 F/BW is the caller's.
    unsafe {
        let bit4 = _mm512_set1_epi8(0x10);
        for (j, tj) in t.iter_mut().enumerate() {
            // Byte `j / 2` of each lane's high bits in all four bytes of the lane (`vpshufb`
            // indexes within 128-bit lanes), then byte `k` tests bit `4 (j % 2) + k`.
            let spread = _mm512_shuffle_epi8(qh, lane_bytes(j / 2));
            let bits = _mm512_set1_epi32((0x0804_0201u32 << (4 * (j % 2))) as i32);
            let set = _mm512_test_epi8_mask(spread, bits);
            *tj = _mm512_or_si512(*tj, _mm512_maskz_mov_epi8(set, bit4));
        }
        if TY == Q5_0 {
            let offset = _mm512_set1_epi8(112);
            for tj in &mut t {
                *tj = _mm512_add_epi8(*tj, offset);
            }
        }
        t
    }
}

/// A `vpshufb` control that fills each 32-bit lane with byte `byte` of that lane.
#[inline(always)]
unsafe fn lane_bytes(byte: usize) -> __m512i {
    // Lane `p` of a 128-bit block starts at byte 4p.
    let c = |p: i32| (4 * p + byte as i32) * 0x0101_0101;
    // SAFETY: AVX-512 F is the caller's.
    unsafe { _mm512_set4_epi32(c(3), c(2), c(1), c(0)) }
}

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
        // SAFETY: forwarded.
        unsafe { split_q4::<TY>(&self.q4_dwords(b)) }
    }

    /// Block `b`'s packed nibbles of the sixteen rows transposed: vector `j` holds, in lane
    /// `l`, packed dword `j` of row `l` (values `4j..4j + 4` in the low nibbles, `16 + 4j..`
    /// in the high ones). [`split_q4`] makes the [`Block16`] of them.
    #[inline(always)]
    unsafe fn q4_dwords(&self, b: usize) -> [__m512i; 4] {
        unsafe {
            // The nibbles follow the scale (Q4_0), scale and offset (Q4_1), then (Q5_x) the
            // high bits.
            let at = b * Packed::<TY>::BS
                + match TY {
                    Q4_0 => 2,
                    Q4_1 => 4,
                    Q5_0 => 6,
                    _ => 8,
                };
            // Rows 4g..4g + 4, one per 128-bit lane (loads written out, not in a closure: see
            // the module docs).
            let row = |l: usize| self.w[l].p.add(at).cast::<__m128i>();
            let mut z = [_mm512_setzero_si512(); 4];
            for (g, zg) in z.iter_mut().enumerate() {
                let v = _mm512_castsi128_si512(_mm_loadu_si128(row(4 * g)));
                let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(row(4 * g + 1)));
                let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(row(4 * g + 2)));
                *zg = _mm512_inserti32x4::<3>(v, _mm_loadu_si128(row(4 * g + 3)));
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
            [
                _mm512_shuffle_i64x2::<0x44>(a_lo, a_hi),
                _mm512_shuffle_i64x2::<0xEE>(a_lo, a_hi),
                _mm512_shuffle_i64x2::<0x44>(b_lo, b_hi),
                _mm512_shuffle_i64x2::<0xEE>(b_lo, b_hi),
            ]
        }
    }

    /// Scales and offsets (zeros without offsets) of block `b` of the sixteen rows, as f32.
    #[inline(always)]
    unsafe fn scales(&self, b: usize) -> (__m512, __m512) {
        unsafe {
            let (d, m) = self.scale_bits(b);
            let m = if <Packed<TY> as Weights>::WITH_MIN {
                _mm512_cvtph_ps(m)
            } else {
                _mm512_setzero_ps()
            };
            (_mm512_cvtph_ps(d), m)
        }
    }

    /// Q5_0/Q5_1: block `b`'s 32 high bits (bit `i` for value `i`) of the sixteen rows, one
    /// row per 32-bit lane.
    #[inline(always)]
    unsafe fn high_bits(&self, b: usize) -> __m512i {
        let at = if TY == Q5_0 { 2 } else { 4 };
        // SAFETY: the gather reads 4 bytes at `at` in block `b` of each lane's row, inside the
        // rows (`b` is below the block count, the caller's); AVX-512 F is the caller's.
        unsafe {
            _mm512_i32gather_epi32::<1>(
                self.offsets,
                self.base.add(b * Packed::<TY>::BS + at).cast(),
            )
        }
    }

    /// The f16 scales and offsets (garbage without offsets) of block `b` of the sixteen rows,
    /// one per 16-bit lane.
    #[inline(always)]
    unsafe fn scale_bits(&self, b: usize) -> (__m256i, __m256i) {
        unsafe {
            // Each block starts with its f16 scale, then (Q4_1, Q5_1) its f16 offset.
            let head = _mm512_i32gather_epi32::<1>(
                self.offsets,
                self.base.add(b * Packed::<TY>::BS).cast(),
            );
            (
                _mm512_cvtepi32_epi16(head),
                _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head)),
            )
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
    /// `-128 * sum` per block and lane (signed weights only; dangling otherwise).
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
                    let lanes = nb * LANES;
                    batch.corr[row(r) * lanes..(row(r) + 1) * lanes].as_ptr()
                } else {
                    ptr::NonNull::dangling().as_ptr()
                }
            }),
        }
    }
}

/// Where a kernel writes a group's results: activation row `r`'s lanes start at
/// `ptr + r * ld`. A raw pointer, because the tasks of one product write disjoint columns of
/// the same output rows at once; the functions that take one say what must hold.
#[derive(Clone, Copy)]
pub(super) struct Dst {
    pub(super) ptr: *mut f32,
    pub(super) ld: usize,
}

impl Dst {
    /// Row `r`'s first lane.
    #[inline(always)]
    fn row(self, r: usize) -> *mut f32 {
        self.ptr.wrapping_add(r * self.ld)
    }

    /// The same destination, starting `r` rows further down.
    #[inline(always)]
    fn skip(self, r: usize) -> Dst {
        Dst {
            ptr: self.row(r),
            ld: self.ld,
        }
    }

    /// `out` as `m` rows of `rows` floats, after checking its length.
    pub(super) fn of(out: &mut [f32], m: usize, rows: usize) -> Dst {
        assert_eq!(out.len(), m * rows, "out is not m rows of the group's rows");
        Dst {
            ptr: out.as_mut_ptr(),
            ld: rows,
        }
    }
}

/// Running sums of sixteen weight rows (lanes) against `R` activation rows: llama.cpp's eight
/// accumulator lanes as eight vectors, and the offsets' FMA chain.
struct Sums<const R: usize> {
    acc: [[__m512; LANES]; R],
    summs: [__m512; R],
}

impl<const R: usize> Sums<R> {
    #[inline(always)]
    unsafe fn new() -> Self {
        unsafe {
            Sums {
                acc: [[_mm512_setzero_ps(); LANES]; R],
                summs: [_mm512_setzero_ps(); R],
            }
        }
    }

    /// Adds block `b` of sixteen weight rows (`t`, scales `dw`, offsets `mw`) times each
    /// activation row of `a`: per lane `j`, `acc[j] = fma(dw * xd, isum_j, acc[j])`, and
    /// `summs = fma(mw, xs, summs)`, as llama.cpp per row.
    #[inline(always)]
    unsafe fn add_block<W: Weights>(
        &mut self,
        t: &Block16,
        dw: __m512,
        mw: __m512,
        b: usize,
        a: &ActRows<R>,
    ) {
        unsafe {
            for r in 0..R {
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d[r].add(b)));
                for (j, &tj) in t.iter().enumerate() {
                    let init = if W::SIGNED {
                        _mm512_set1_epi32(*a.corr[r].add(b * LANES + j))
                    } else {
                        _mm512_setzero_si512()
                    };
                    let xv = ptr::read_unaligned(a.x[r].add(b * BLOCK + 4 * j).cast::<i32>());
                    let isum = _mm512_dpbusd_epi32(init, tj, _mm512_set1_epi32(xv));
                    self.acc[r][j] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), self.acc[r][j]);
                }
                if W::WITH_MIN {
                    self.summs[r] =
                        _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.s[r].add(b)), self.summs[r]);
                }
            }
        }
    }

    /// Row `r`'s sixteen results: the eight lanes summed in llama.cpp's order, plus the
    /// offsets.
    #[inline(always)]
    unsafe fn total<W: Weights>(&self, r: usize) -> __m512 {
        // SAFETY: AVX-512 F is the caller's.
        unsafe {
            let a = &self.acc[r];
            let h = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a[4], a[0]), _mm512_add_ps(a[6], a[2])),
                _mm512_add_ps(_mm512_add_ps(a[5], a[1]), _mm512_add_ps(a[7], a[3])),
            );
            if W::WITH_MIN {
                _mm512_add_ps(h, self.summs[r])
            } else {
                h
            }
        }
    }

    /// Writes row `r`'s results (the first `rows` lanes) to `dst.ptr + r * dst.ld` for every
    /// `r` below `m`, straight from the registers (a masked store for a partial group).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `rows` floats at each of those rows, and no other
    /// thread may access them meanwhile.
    #[inline(always)]
    unsafe fn store_rows<W: Weights>(&self, m: usize, rows: usize, dst: Dst) {
        debug_assert!((1..=TILE_ROWS).contains(&rows), "rows outside a group");
        let mask: __mmask16 = if rows >= TILE_ROWS {
            0xffff
        } else {
            (1u16 << rows) - 1
        };
        for r in 0..R.min(m) {
            // SAFETY: AVX-512 F is the caller's; the masked store writes only the first
            // `rows` floats at row `r`, which the caller guarantees are ours to write.
            unsafe { _mm512_mask_storeu_ps(dst.row(r), mask, self.total::<W>(r)) };
        }
    }

    /// [`Sums::store_rows`] into a slice: row `r`'s results (first `rows` lanes) to
    /// `out[(i0 + r) * ld + col0..]` for every `r` that is a row of the batch (below `m`),
    /// after checking that they lie inside `out`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store<W: Weights>(
        &self,
        m: usize,
        i0: usize,
        rows: usize,
        out: &mut [f32],
        ld: usize,
        col0: usize,
    ) {
        let n = R.min(m - i0);
        if n == 0 {
            return;
        }
        let start = i0 * ld + col0;
        assert!(
            (1..=TILE_ROWS).contains(&rows) && start + (n - 1) * ld + rows <= out.len(),
            "results past out"
        );
        // SAFETY: rows `0..n` of the destination, `rows` floats each, lie inside `out`
        // (checked), which this call borrows mutably; CPU features are the caller's.
        unsafe {
            self.store_rows::<W>(
                n,
                rows,
                Dst {
                    ptr: out.as_mut_ptr().add(start),
                    ld,
                },
            )
        }
    }
}

/// Activation row `i` of `batch` against up to sixteen packed rows unpacked in registers, into
/// `out[i * ld + col0 + l]`.
#[inline(always)]
unsafe fn packed_row16<const TY: u8>(
    w: &Rows16<TY>,
    rows: usize,
    batch: &Batch,
    i: usize,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let nb = batch.acts.k / BLOCK;
    let a = ActRows::<1>::new(batch, i, <Packed<TY> as Weights>::SIGNED);
    // SAFETY: `b < nb`, the rows' block count (checked by the caller); the activation
    // pointers cover `nb` blocks (`ActRows::new`); CPU features are the caller's.
    unsafe {
        let mut sums = Sums::<1>::new();
        for b in 0..nb {
            w.prefetch(b);
            let t = w.block(b);
            let (dw, mw) = w.scales(b);
            sums.add_block::<Packed<TY>>(&t, dw, mw, b, &a);
        }
        sums.store::<Packed<TY>>(batch.m, i, rows, out, ld, col0);
    }
}

/// `out[i * n + r]` = dot of packed row `r` of `rows` (`n` of them) with activation row `i`,
/// sixteen weight rows at a time. One activation row (decode) unpacks each block in
/// registers; several unpack the sixteen rows to a [`Tile`] first, read back from L1 for
/// every activation row (the model's batches take [`super::tile_matmul`] directly, see
/// [`super::packed_batch_max`]).
#[inline(always)]
unsafe fn packed_batch16<const TY: u8>(rows: &[u8], batch: &Batch, out: &mut [f32]) {
    let nb = batch.acts.k / BLOCK;
    let row_bytes = nb * Packed::<TY>::BS;
    let n = super::packed_rows(rows, row_bytes, batch, out);
    batch.check(<Packed<TY> as Weights>::SIGNED);
    let with_min = <Packed<TY> as Weights>::WITH_MIN;
    let mut tile = Tile::default();
    for (g, group) in rows.chunks(TILE_ROWS * row_bytes.max(1)).enumerate() {
        let cnt = group.len() / row_bytes;
        if batch.m == 1 {
            // SAFETY: forwarded; `Rows16::new` checks the rows, `ActRows::new` the
            // activations.
            unsafe {
                let w = Rows16::<TY>::new(group, row_bytes);
                packed_row16::<TY>(&w, cnt, batch, 0, out, n, g * TILE_ROWS);
            }
            continue;
        }
        // No closures here: they would not inherit this function's target features.
        let tile = &mut tile;
        let mut buf = [0.0f32; 8 * TILE_ROWS];
        // SAFETY: forwarded; `tile_load_typed` and `tile_rows` check their bounds.
        unsafe { tile_load_typed::<TY>(group, row_bytes, tile) };
        tile.rows = cnt;
        tile.nb = nb;
        tile.signed = <Packed<TY> as Weights>::SIGNED;
        tile.interleaved = true;
        let mut i0 = 0;
        while i0 < batch.m {
            let sub = (batch.m - i0).min(8);
            let dst = &mut buf[..sub * cnt];
            let to = Dst::of(dst, sub, cnt);
            // SAFETY: as above; `to` is `dst`, checked.
            unsafe { tile_rows(tile, batch, with_min, i0..i0 + sub, to) };
            for (ii, row) in dst.chunks_exact(cnt).enumerate() {
                let at = (i0 + ii) * n + g * TILE_ROWS;
                out[at..at + cnt].copy_from_slice(row);
            }
            i0 += 8;
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

// Repacked weights (`super::Repacked`): what `Rows16` computes per block of sixteen rows,
// computed once at load and stored in a group's `q` lines and `s` scales, so that decode
// streams each weight byte once with no transpose and no gather. Q8_0 stores the `Block16`
// itself (its 32 bytes a row stay 32); Q4_x and Q5_x store `Rows16::q4_dwords`, still
// nibbles (16 bytes a row), split per use by `split_q4`, and Q5_x one more line of the rows'
// high bits (`Rows16::high_bits`, 4 bytes a row), added per use by `with_high_bits` (a
// `vpshufb` and a byte test a vector): the same vectors as `Rows16::block`.

/// `q` lines per block of a repacked group.
const fn repacked_lines(ty: u8) -> usize {
    match ty {
        Q8_0 => 8,
        // The nibbles' four lines, then the high bits' one.
        Q5_0 | Q5_1 => 5,
        _ => 4,
    }
}

/// `s` entries per block of a repacked group: sixteen f16 scales, then (Q4_1, Q5_1) sixteen
/// f16 offsets.
const fn repacked_scales(ty: u8) -> usize {
    if matches!(ty, Q4_1 | Q5_1) { 32 } else { 16 }
}

/// The `q` lines and `s` entries per block of a repacked `ty` group, or `None` for a type
/// with no repacked kernels.
pub(super) fn repacked_layout(ty: GgmlType) -> Option<(usize, usize)> {
    let tag = repacked_tag(ty)?;
    Some((repacked_lines(tag), repacked_scales(tag)))
}

fn repacked_tag(ty: GgmlType) -> Option<u8> {
    match ty {
        GgmlType::Q4_0 => Some(Q4_0),
        GgmlType::Q4_1 => Some(Q4_1),
        GgmlType::Q5_0 => Some(Q5_0),
        GgmlType::Q5_1 => Some(Q5_1),
        GgmlType::Q8_0 => Some(Q8_0),
        _ => None,
    }
}

/// Repacks up to sixteen packed rows (`row_bytes` each) into `q` and `s` (one group: `nb`
/// blocks of [`repacked_lines`] and [`repacked_scales`]).
#[inline(always)]
unsafe fn repack_group_typed<const TY: u8>(
    rows: &[u8],
    row_bytes: usize,
    q: &mut [super::Line],
    s: &mut [u16],
) {
    // SAFETY: AVX-512 F is the caller's; `Rows16::new` checks the rows.
    let w = unsafe { Rows16::<TY>::new(rows, row_bytes) };
    let nb = row_bytes / Packed::<TY>::BS;
    let (ql, sl) = (repacked_lines(TY), repacked_scales(TY));
    assert!(
        q.len() == nb * ql && s.len() == nb * sl,
        "repacked group size"
    );
    let (qp, sp) = (q.as_mut_ptr(), s.as_mut_ptr());
    for b in 0..nb {
        // SAFETY: `b < nb`, the rows' block count; `q` and `s` hold `nb` blocks (asserted);
        // CPU features are the caller's.
        unsafe {
            let qb = qp.add(b * ql).cast::<__m512i>();
            if TY == Q8_0 {
                let t = w.block(b);
                for (j, tj) in t.iter().enumerate() {
                    _mm512_storeu_si512(qb.add(j), *tj);
                }
            } else {
                for (j, qj) in w.q4_dwords(b).iter().enumerate() {
                    _mm512_storeu_si512(qb.add(j), *qj);
                }
                if matches!(TY, Q5_0 | Q5_1) {
                    _mm512_storeu_si512(qb.add(4), w.high_bits(b));
                }
            }
            let (d, m) = w.scale_bits(b);
            let sb = sp.add(b * sl).cast::<__m256i>();
            _mm256_storeu_si256(sb, d);
            if <Packed<TY> as Weights>::WITH_MIN {
                _mm256_storeu_si256(sb.add(1), m);
            }
        }
    }
}

/// One repacked group's blocks, read back.
struct RepackedGroup<const TY: u8> {
    q: *const __m512i,
    s: *const u16,
    nb: usize,
}

/// How far ahead of the block being dotted [`RepackedGroup::prefetch`] reaches: a group's
/// blocks, and the groups after it, lie one after another. Its hint is T1 (to L2): on the
/// Intel host of 2026-12-07 (evening) Gemma's decode ran 4-7% faster than with T0 (into L1),
/// prompts and 8-row steps the same.
const REPACKED_PREFETCH_BYTES: usize = 4096;

impl<const TY: u8> RepackedGroup<TY> {
    /// Group `g` of `rep`, whose type must be `TY`.
    fn new(rep: &super::Repacked, g: usize) -> Self {
        let (q, s) = rep.group(g);
        let nb = rep.blocks();
        assert_eq!(repacked_tag(rep.ty()), Some(TY), "repacked type");
        // What every read below relies on.
        assert!(
            q.len() == nb * repacked_lines(TY) && s.len() == nb * repacked_scales(TY),
            "repacked group size"
        );
        RepackedGroup {
            q: q.as_ptr().cast(),
            s: s.as_ptr(),
            nb,
        }
    }

    /// Block `b` (below `nb`) in [`Block16`] layout.
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> Block16 {
        unsafe {
            let qb = self.q.add(b * repacked_lines(TY));
            if TY == Q8_0 {
                let mut t = [_mm512_setzero_si512(); 8];
                for (j, tj) in t.iter_mut().enumerate() {
                    *tj = _mm512_loadu_si512(qb.add(j));
                }
                t
            } else {
                let mut q = [_mm512_setzero_si512(); 4];
                for (j, qj) in q.iter_mut().enumerate() {
                    *qj = _mm512_loadu_si512(qb.add(j));
                }
                let t = split_q4::<TY>(&q);
                if matches!(TY, Q5_0 | Q5_1) {
                    with_high_bits::<TY>(t, _mm512_loadu_si512(qb.add(4)))
                } else {
                    t
                }
            }
        }
    }

    /// Block `b`'s scales and offsets (zeros without offsets), as f32.
    #[inline(always)]
    unsafe fn scales(&self, b: usize) -> (__m512, __m512) {
        unsafe {
            let sb = self.s.add(b * repacked_scales(TY)).cast::<__m256i>();
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb));
            let m = if <Packed<TY> as Weights>::WITH_MIN {
                _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(1)))
            } else {
                _mm512_setzero_ps()
            };
            (d, m)
        }
    }

    /// Hints that the lines [`REPACKED_PREFETCH_BYTES`] past block `b` will be read soon.
    #[inline(always)]
    fn prefetch(&self, b: usize) {
        let ql = repacked_lines(TY);
        for line in 0..ql {
            // A hint only: the address may lie past the buffer (`wrapping_add`, never
            // dereferenced).
            let p = self
                .q
                .wrapping_add(b * ql + line + REPACKED_PREFETCH_BYTES / 64)
                .cast::<i8>();
            // SAFETY: prefetching has no architectural effect and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p) };
        }
        // The scales' line as many blocks ahead as the values' (a line prefetched twice costs
        // next to nothing).
        let ahead = REPACKED_PREFETCH_BYTES / (64 * ql);
        let p = self
            .s
            .wrapping_add((b + ahead) * repacked_scales(TY))
            .cast::<i8>();
        // SAFETY: as above.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p) };
    }
}

/// Group `g` of `rep` against activation row 0 of `batch` (one row) into `out` (the group's
/// rows: sixteen, fewer in the last group).
#[inline(always)]
unsafe fn repacked_dot_typed<const TY: u8>(
    rep: &super::Repacked,
    g: usize,
    batch: &Batch,
    out: &mut [f32],
) {
    let w = RepackedGroup::<TY>::new(rep, g);
    assert_eq!(batch.m, 1, "one activation row");
    assert_eq!(w.nb * BLOCK, batch.acts.k, "activations differ in width");
    assert_eq!(out.len(), rep.group_rows(g), "out does not match the group");
    batch.check(<Packed<TY> as Weights>::SIGNED);
    let a = ActRows::<1>::new(batch, 0, <Packed<TY> as Weights>::SIGNED);
    // SAFETY: `b < nb`, the group's block count (`Repacked::group` sized them); the
    // activation pointers cover `nb` blocks (`ActRows::new`); CPU features are the caller's.
    unsafe {
        let mut sums = Sums::<1>::new();
        for b in 0..w.nb {
            w.prefetch(b);
            let t = w.block(b);
            let (dw, mw) = w.scales(b);
            sums.add_block::<Packed<TY>>(&t, dw, mw, b, &a);
        }
        sums.store::<Packed<TY>>(1, 0, out.len(), out, 0, 0);
    }
}

/// Loads group `g` of `rep` into `tile`, as [`tile_load_typed`] loads the packed rows.
#[inline(always)]
unsafe fn tile_load_repacked_typed<const TY: u8>(rep: &super::Repacked, g: usize, tile: &mut Tile) {
    let w = RepackedGroup::<TY>::new(rep, g);
    let nb = w.nb;
    let bufs = TileBuffers::new(tile, nb);
    for b in 0..nb {
        // SAFETY: `b < nb`, the group's block count and the buffers'; CPU features are the
        // caller's.
        unsafe {
            w.prefetch(b);
            let (dw, mw) = w.scales(b);
            bufs.store(b, &w.block(b), dw, mw);
        }
    }
    tile.rows = rep.group_rows(g);
    tile.nb = nb;
    tile.signed = <Packed<TY> as Weights>::SIGNED;
    tile.interleaved = true;
}

/// Group `g` of `rep` against every activation row of `batch` (two or more) into `out`
/// (`m` rows of the group's rows): the first two activation rows are dotted as each block is
/// read and stored into `tile`, so the arithmetic overlaps the group's stream from memory;
/// the other rows read the tile back, as [`tile_matmul`] does.
///
/// # Safety
/// `out` must be valid for writes of the group's rows at each of `batch.m` rows, untouched
/// by any other thread meanwhile; CPU features are the caller's.
#[inline(always)]
unsafe fn repacked_tile_matmul_typed<const TY: u8>(
    rep: &super::Repacked,
    g: usize,
    batch: &Batch,
    tile: &mut Tile,
    out: Dst,
) {
    type W<const TY: u8> = Packed<TY>;
    let w = RepackedGroup::<TY>::new(rep, g);
    let (nb, rows, m) = (w.nb, rep.group_rows(g), batch.m);
    assert!(m >= 1, "no activation rows");
    assert_eq!(nb * BLOCK, batch.acts.k, "activations differ in width");
    batch.check(<W<TY> as Weights>::SIGNED);
    let bufs = TileBuffers::new(tile, nb);
    let a = ActRows::<2>::new(batch, 0, <W<TY> as Weights>::SIGNED);
    // SAFETY: `b < nb`, the group's and the buffers' block count; the activation pointers
    // cover `nb` blocks (`ActRows::new`); CPU features are the caller's.
    unsafe {
        let mut sums = Sums::<2>::new();
        for b in 0..nb {
            w.prefetch(b);
            let t = w.block(b);
            let (dw, mw) = w.scales(b);
            bufs.store(b, &t, dw, mw);
            sums.add_block::<W<TY>>(&t, dw, mw, b, &a);
        }
        // SAFETY: rows 0 and 1 of `out` (those below `m`) are ours to write (the caller's).
        sums.store_rows::<W<TY>>(m, rows, out);
    }
    tile.rows = rows;
    tile.nb = nb;
    tile.signed = <W<TY> as Weights>::SIGNED;
    tile.interleaved = true;
    if m > 2 {
        // SAFETY: forwarded; `tile_rows` checks every bound but `out`'s, the caller's.
        unsafe { tile_rows(tile, batch, <W<TY> as Weights>::WITH_MIN, 2..m, out.skip(2)) };
    }
}

/// Unpacks up to sixteen packed rows into `tile` ([`Block16`] layout per block, scales and
/// offsets as f32).
#[inline(always)]
unsafe fn tile_load_typed<const TY: u8>(rows: &[u8], row_bytes: usize, tile: &mut Tile) {
    // SAFETY: AVX-512 F is the caller's.
    let w = unsafe { Rows16::<TY>::new(rows, row_bytes) };
    let nb = row_bytes / Packed::<TY>::BS;
    let bufs = TileBuffers::new(tile, nb);
    for b in 0..nb {
        // SAFETY: `b < nb`, the rows' block count and the buffers'; CPU features are the
        // caller's.
        unsafe {
            w.prefetch(b);
            let t = w.block(b);
            let (dw, mw) = w.scales(b);
            bufs.store(b, &t, dw, mw);
        }
    }
}

/// A [`Tile`]'s interleaved buffers, grown to `nb` blocks of sixteen rows.
struct TileBuffers {
    q: *mut i8,
    d: *mut f32,
    m: *mut f32,
    nb: usize,
}

impl TileBuffers {
    /// Grows (never clears: every byte below `nb` blocks is stored before it is read) the
    /// tile's buffers to `nb` blocks.
    #[inline(always)]
    fn new(tile: &mut Tile, nb: usize) -> Self {
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
        TileBuffers {
            q: tile.q.as_mut_ptr(),
            d: tile.d.as_mut_ptr(),
            m: tile.m.as_mut_ptr(),
            nb,
        }
    }

    /// Stores block `b` (below `nb`): its vectors, scales and offsets.
    #[inline(always)]
    unsafe fn store(&self, b: usize, t: &Block16, dw: __m512, mw: __m512) {
        assert!(b < self.nb, "block past the tile");
        // SAFETY: the buffers hold `nb` blocks (`new`); AVX-512 F is the caller's.
        unsafe {
            for (j, tj) in t.iter().enumerate() {
                _mm512_storeu_si512(self.q.add((b * 8 + j) * 4 * TILE_ROWS).cast(), *tj);
            }
            _mm512_storeu_ps(self.d.add(b * TILE_ROWS), dw);
            _mm512_storeu_ps(self.m.add(b * TILE_ROWS), mw);
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

/// [`tile_pair`] over activation rows `range`, two at a time, into `out`'s rows from 0.
///
/// # Safety
/// `out` must be valid for writes of `tile.rows` floats at each of `range.len()` rows,
/// untouched by any other thread meanwhile; CPU features are the caller's.
#[inline(always)]
unsafe fn tile_rows(
    tile: &Tile,
    batch: &Batch,
    with_min: bool,
    range: std::ops::Range<usize>,
    out: Dst,
) {
    tile.check(batch);
    batch.check(tile.signed);
    assert!(range.end <= batch.m, "rows past the batch");
    assert!(
        (1..=TILE_ROWS).contains(&tile.rows),
        "tile rows outside a group"
    );
    assert!(!with_min || !tile.signed, "offsets with signed weights");
    let (first, end) = (range.start, range.end);
    let mut i0 = first;
    while i0 < end {
        let dst = out.skip(i0 - first);
        // SAFETY: forwarded; buffers checked above and in `ActRows::new`, `out` by the caller.
        unsafe {
            match (tile.signed, with_min) {
                (false, true) => tile_pair::<Unpacked<false, true>>(tile, batch, i0, end, dst),
                (false, false) => tile_pair::<Unpacked<false, false>>(tile, batch, i0, end, dst),
                (true, _) => tile_pair::<Unpacked<true, false>>(tile, batch, i0, end, dst),
            }
        }
        i0 += 2;
    }
}

/// Rows `i0` and `i0 + 1` (when below `end`) into `dst`'s rows 0 and 1.
#[inline(always)]
unsafe fn tile_pair<W: Weights>(tile: &Tile, batch: &Batch, i0: usize, end: usize, dst: Dst) {
    let a = ActRows::<2>::new(batch, i0, W::SIGNED);
    let (q, d, mm) = (tile.q.as_ptr(), tile.d.as_ptr(), tile.m.as_ptr());
    // SAFETY: the tile's buffers cover `nb` blocks of 16 rows (`Tile::check`), the activation
    // pointers `nb` blocks (`ActRows::new`); CPU features are the caller's.
    unsafe {
        let mut sums = Sums::<2>::new();
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
            sums.add_block::<W>(&t, dw, mw, b, &a);
        }
        // Row `i0 + r` goes to `dst`'s row `r`.
        sums.store_rows::<W>(end - i0, tile.rows, dst);
    }
}

/// `out[i * tile.rows + l]` = dot of the tile's row `l` with activation row `i`, every `i`.
#[inline(always)]
unsafe fn tile_matmul(tile: &Tile, batch: &Batch, with_min: bool, out: &mut [f32]) {
    let out = Dst::of(out, batch.m, tile.rows);
    // SAFETY: forwarded; `tile_rows` checks every other bound.
    unsafe { tile_rows(tile, batch, with_min, 0..batch.m, out) }
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
unsafe fn quantize_acts_into(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    fmt: ActFormat,
) {
    let nb = x.len() / BLOCK;
    assert!(
        qs.len() == nb * BLOCK && d.len() == nb && s.len() == nb,
        "not whole blocks"
    );
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
}

/// Entry points compiled for AVX2 + FMA + F16C. Callers must have checked that the CPU
/// supports them (see `super::isa`).
pub(super) mod avx2 {
    use super::*;

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn quantize_acts_into(
        x: &[f32],
        qs: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        fmt: ActFormat,
    ) {
        // SAFETY: the features the body needs are enabled on this function.
        unsafe { super::quantize_acts_into(x, qs, d, s, fmt) }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn unpack_row(ty: GgmlType, row: &[u8], out: &mut UnpackedRow) {
        // SAFETY: the features the body needs are enabled on this function.
        unsafe { super::unpack_row(ty, row, out) }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn dot(
        row: &UnpackedRow,
        acts: &QuantizedActs,
        i: usize,
        with_min: bool,
    ) -> f32 {
        // SAFETY: the features the body needs are enabled on this function.
        unsafe { super::dot::<Avx2>(row, acts, i, with_min) }
    }
}

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
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn avx2_tile_matmul(tile: &Tile, batch: &Batch, with_min: bool, out: &mut [f32]) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe { tile_matmul_rows::<Avx2>(tile, batch, with_min, out) }
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

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_repack_group(
    ty: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    q: &mut [super::Line],
    s: &mut [u16],
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe {
        match repacked_tag(ty) {
            Some(Q4_0) => repack_group_typed::<Q4_0>(rows, row_bytes, q, s),
            Some(Q4_1) => repack_group_typed::<Q4_1>(rows, row_bytes, q, s),
            Some(Q5_0) => repack_group_typed::<Q5_0>(rows, row_bytes, q, s),
            Some(Q5_1) => repack_group_typed::<Q5_1>(rows, row_bytes, q, s),
            Some(Q8_0) => repack_group_typed::<Q8_0>(rows, row_bytes, q, s),
            _ => unreachable!("{ty} is not repacked"),
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_repacked_dot(
    rep: &super::Repacked,
    g: usize,
    batch: &Batch,
    out: &mut [f32],
) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe {
        match repacked_tag(rep.ty()) {
            Some(Q4_0) => repacked_dot_typed::<Q4_0>(rep, g, batch, out),
            Some(Q4_1) => repacked_dot_typed::<Q4_1>(rep, g, batch, out),
            Some(Q5_0) => repacked_dot_typed::<Q5_0>(rep, g, batch, out),
            Some(Q5_1) => repacked_dot_typed::<Q5_1>(rep, g, batch, out),
            Some(Q8_0) => repacked_dot_typed::<Q8_0>(rep, g, batch, out),
            _ => unreachable!("{} is not repacked", rep.ty()),
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_tile_load_repacked(rep: &super::Repacked, g: usize, tile: &mut Tile) {
    // SAFETY: the features the body needs are enabled on this function.
    unsafe {
        match repacked_tag(rep.ty()) {
            Some(Q4_0) => tile_load_repacked_typed::<Q4_0>(rep, g, tile),
            Some(Q4_1) => tile_load_repacked_typed::<Q4_1>(rep, g, tile),
            Some(Q5_0) => tile_load_repacked_typed::<Q5_0>(rep, g, tile),
            Some(Q5_1) => tile_load_repacked_typed::<Q5_1>(rep, g, tile),
            Some(Q8_0) => tile_load_repacked_typed::<Q8_0>(rep, g, tile),
            _ => unreachable!("{} is not repacked", rep.ty()),
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C); `out` must be valid for
/// writes of the group's rows at each of `batch.m` rows, untouched by other threads meanwhile.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn avx512_repacked_tile_matmul(
    rep: &super::Repacked,
    g: usize,
    batch: &Batch,
    tile: &mut Tile,
    out: Dst,
) {
    // SAFETY: the features the body needs are enabled on this function; `out` is the
    // caller's.
    unsafe {
        match repacked_tag(rep.ty()) {
            Some(Q4_0) => repacked_tile_matmul_typed::<Q4_0>(rep, g, batch, tile, out),
            Some(Q4_1) => repacked_tile_matmul_typed::<Q4_1>(rep, g, batch, tile, out),
            Some(Q5_0) => repacked_tile_matmul_typed::<Q5_0>(rep, g, batch, tile, out),
            Some(Q5_1) => repacked_tile_matmul_typed::<Q5_1>(rep, g, batch, tile, out),
            Some(Q8_0) => repacked_tile_matmul_typed::<Q8_0>(rep, g, batch, tile, out),
            _ => unreachable!("{} is not repacked", rep.ty()),
        }
    }
}
