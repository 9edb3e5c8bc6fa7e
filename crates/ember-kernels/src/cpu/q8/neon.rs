//! aarch64 NEON versions of the q8 dot kernels (decode [`dot_packed_rows`], [`dot`] and
//! [`dot_batch`]); everything else falls back to `super::scalar`.
//!
//! Every function here returns exactly what its scalar counterpart returns. Per-block integer
//! sums are exact (`vmull_s8` gives exact `i16` products, `vpadalq_s16` adds them pairwise into
//! `i32` lanes, which cannot overflow for a 32-element block). The float work per block is done
//! with scalar `f32` operations written exactly as in `scalar::dot` (Rust never contracts them
//! into FMA), and blocks are added to the row sum one after another, in block order.
//!
//! `vdotq_s32` (the `dotprod` extension) is not used: its Rust intrinsic is still unstable.
//!
//! The bodies are `#[inline(always)]`; only the entry points carry
//! `#[target_feature(enable = "neon")]`.

use std::arch::aarch64::*;

use ember_quant::GgmlType;

use super::scalar::f16_at;
use super::{ActFormat, BLOCK, BatchScales, QuantizedActs, UnpackedRow, act_format};

/// One block of 32 weight values as two `i8x16` halves (values `0..16` and `16..32`).
type Block = (int8x16_t, int8x16_t);

/// Exact sum of the 32 products of weight block `w` with the activations at `x`.
///
/// # Safety
/// NEON must be available and `x` must point to 32 readable `i8`s.
#[inline(always)]
unsafe fn block_dot(w: Block, x: *const i8) -> i32 {
    // SAFETY: the caller guarantees NEON and 32 readable bytes at `x`.
    unsafe {
        let x0 = vld1q_s8(x);
        let x1 = vld1q_s8(x.add(16));
        let mut acc = vdupq_n_s32(0);
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w.0), vget_low_s8(x0)));
        acc = vpadalq_s16(acc, vmull_high_s8(w.0, x0));
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w.1), vget_low_s8(x1)));
        acc = vpadalq_s16(acc, vmull_high_s8(w.1, x1));
        vaddvq_s32(acc)
    }
}

/// Block `b` of an unpacked row.
///
/// # Safety
/// NEON must be available and `q` must hold at least `(b + 1) * 32` values.
#[inline(always)]
unsafe fn unpacked_block(q: &[i8], b: usize) -> Block {
    debug_assert!(q.len() >= (b + 1) * BLOCK);
    // SAFETY: the caller guarantees NEON and that block `b` is inside `q`.
    unsafe {
        let p = q.as_ptr().add(b * BLOCK);
        (vld1q_s8(p), vld1q_s8(p.add(16)))
    }
}

/// Low and high nibbles of the 16 bytes at `p`: values `0..16` and `16..32` of a 4-bit block.
///
/// # Safety
/// NEON must be available and `p` must point to 16 readable bytes.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller guarantees NEON and 16 readable bytes at `p`.
    unsafe {
        let v = vld1q_u8(p);
        (vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(v))
    }
}

/// The fifth bits of a 5-bit block from its little-endian `qh` bytes at `p`, as `0x10` or 0:
/// bit `j` of `qh` for value `j` (first half), bit `j + 16` for value `j + 16` (second half).
///
/// # Safety
/// NEON must be available and `p` must point to 4 readable bytes.
#[inline(always)]
unsafe fn high_bits(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    // SAFETY: the caller guarantees NEON and 4 readable bytes at `p`.
    unsafe {
        let bits = vld1q_u8(BITS.as_ptr());
        let sel = |lo: u8, hi: u8| {
            let v = vcombine_u8(vdup_n_u8(lo), vdup_n_u8(hi));
            vandq_u8(vtstq_u8(v, bits), vdupq_n_u8(0x10))
        };
        (sel(*p, *p.add(1)), sel(*p.add(2), *p.add(3)))
    }
}

/// Decodes one packed block of `ty` at `blk` (at least `ty.type_size()` bytes) into its 32
/// values, exactly as `scalar::unpack_row` does, plus its scale and offset (0 if none).
///
/// # Safety
/// NEON must be available; `ty` is one of the five integer-path types.
#[inline(always)]
unsafe fn decode_block(ty: GgmlType, blk: &[u8]) -> (Block, f32, f32) {
    assert!(blk.len() >= ty.type_size(), "short block");
    let p = blk.as_ptr();
    // SAFETY: the caller guarantees NEON; every load below stays inside `blk`, which holds a
    // whole block of `ty` (checked above): at most 18 (Q4_0), 20 (Q4_1), 22 (Q5_0), 24 (Q5_1)
    // or 34 (Q8_0) bytes are read.
    unsafe {
        let s = |v: uint8x16_t| vreinterpretq_s8_u8(v);
        match ty {
            GgmlType::Q4_0 => {
                let (lo, hi) = nibbles(p.add(2));
                let eight = vdupq_n_s8(8);
                let w = (vsubq_s8(s(lo), eight), vsubq_s8(s(hi), eight));
                (w, f16_at(blk, 0), 0.0)
            }
            GgmlType::Q4_1 => {
                let (lo, hi) = nibbles(p.add(4));
                ((s(lo), s(hi)), f16_at(blk, 0), f16_at(blk, 2))
            }
            GgmlType::Q5_0 => {
                let (h0, h1) = high_bits(p.add(2));
                let (lo, hi) = nibbles(p.add(6));
                let sixteen = vdupq_n_s8(16);
                let w = (
                    vsubq_s8(s(vorrq_u8(lo, h0)), sixteen),
                    vsubq_s8(s(vorrq_u8(hi, h1)), sixteen),
                );
                (w, f16_at(blk, 0), 0.0)
            }
            GgmlType::Q5_1 => {
                let (h0, h1) = high_bits(p.add(4));
                let (lo, hi) = nibbles(p.add(8));
                let w = (s(vorrq_u8(lo, h0)), s(vorrq_u8(hi, h1)));
                (w, f16_at(blk, 0), f16_at(blk, 2))
            }
            GgmlType::Q8_0 => {
                let q = p.add(2) as *const i8;
                ((vld1q_s8(q), vld1q_s8(q.add(16))), f16_at(blk, 0), 0.0)
            }
            other => unreachable!("no integer path for {other}"),
        }
    }
}

/// Adds block `b`'s contribution to `sum` with `scalar::dot`'s float operations, in its order.
#[inline(always)]
fn accumulate(sum: &mut f32, sumi: i32, d: f32, m: f32, xd: f32, xs: f32, with_min: bool) {
    if with_min {
        *sum += d * xd * sumi as f32 + m * xs;
    } else {
        *sum += sumi as f32 * (d * xd);
    }
}

/// [`super::dot`] with NEON.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot(row: &UnpackedRow, acts: &QuantizedActs, i: usize, with_min: bool) -> f32 {
    let nb = acts.k / BLOCK;
    let xq = &acts.qs[i * acts.k..(i + 1) * acts.k];
    let xd = &acts.d[i * nb..(i + 1) * nb];
    let xs = if with_min {
        &acts.s[i * nb..(i + 1) * nb]
    } else {
        xd
    };
    assert!(
        row.q.len() >= nb * BLOCK && row.d.len() >= nb,
        "row shorter than acts"
    );
    assert!(!with_min || row.m.len() >= nb, "row has no offsets");
    let mut sum = 0.0f32;
    for b in 0..nb {
        // SAFETY: NEON is available (caller); block `b` lies inside `row.q` (asserted) and
        // `xq` (which holds `nb` blocks).
        let sumi = unsafe { block_dot(unpacked_block(&row.q, b), xq.as_ptr().add(b * BLOCK)) };
        let m = if with_min { row.m[b] } else { 0.0 };
        accumulate(&mut sum, sumi, row.d[b], m, xd[b], xs[b], with_min);
    }
    sum
}

/// Activation rows per pass of [`dot_batch`] (each weight block is loaded once per pass).
const ROWS: usize = 4;

/// [`super::dot_batch`] with NEON: up to [`ROWS`] activation rows per pass over the weights,
/// each row's sum built exactly as in [`dot`].
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot_batch(
    row: &UnpackedRow,
    acts: &QuantizedActs,
    _sc: &BatchScales,
    with_min: bool,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    assert_eq!(out.len(), rows.len(), "rows do not match out");
    let k = acts.k;
    let nb = k / BLOCK;
    assert!(
        row.q.len() >= nb * BLOCK && row.d.len() >= nb,
        "row shorter than acts"
    );
    assert!(!with_min || row.m.len() >= nb, "row has no offsets");
    assert!(
        acts.qs.len() >= rows.end * k && acts.d.len() >= rows.end * nb,
        "fewer activation rows than asked for"
    );
    assert!(
        !with_min || acts.s.len() >= rows.end * nb,
        "no activation sums"
    );
    let mut start = rows.start;
    for chunk in out.chunks_mut(ROWS) {
        let r = chunk.len();
        let mut sums = [0.0f32; ROWS];
        for b in 0..nb {
            // SAFETY: NEON is available (caller); block `b` lies inside `row.q` (asserted).
            let w = unsafe { unpacked_block(&row.q, b) };
            let m = if with_min { row.m[b] } else { 0.0 };
            for (j, sum) in sums[..r].iter_mut().enumerate() {
                let i = start + j;
                // SAFETY: NEON is available; row `i < rows.end` of `acts.qs` holds `nb` whole
                // blocks (asserted above).
                let sumi = unsafe { block_dot(w, acts.qs.as_ptr().add(i * k + b * BLOCK)) };
                let xs = if with_min { acts.s[i * nb + b] } else { 0.0 };
                accumulate(sum, sumi, row.d[b], m, acts.d[i * nb + b], xs, with_min);
            }
        }
        chunk.copy_from_slice(&sums[..r]);
        start += r;
    }
}

/// [`super::dot_packed_rows`] with NEON: each block is decoded straight into registers.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot_packed_rows(
    ty: GgmlType,
    rows: &[u8],
    acts: &QuantizedActs,
    i: usize,
    out: &mut [f32],
) {
    let bs = ty.type_size();
    let nb = acts.k / BLOCK;
    let row_bytes = nb * bs;
    assert_eq!(rows.len(), out.len() * row_bytes, "rows do not match out");
    let with_min = match act_format(ty) {
        Some(fmt) => fmt == ActFormat::Q8_1,
        None => panic!("dot_packed_rows called for {ty}, which has no integer path"),
    };
    let xq = &acts.qs[i * acts.k..(i + 1) * acts.k];
    let xd = &acts.d[i * nb..(i + 1) * nb];
    let xs = if with_min {
        &acts.s[i * nb..(i + 1) * nb]
    } else {
        xd
    };
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(row_bytes.max(1))) {
        let mut sum = 0.0f32;
        for (b, blk) in row.chunks_exact(bs).enumerate() {
            // SAFETY: NEON is available (caller); `ty` has an integer path (checked above).
            let (w, d, m) = unsafe { decode_block(ty, blk) };
            // SAFETY: NEON is available; block `b` lies inside `xq` (which holds `nb` blocks).
            let sumi = unsafe { block_dot(w, xq.as_ptr().add(b * BLOCK)) };
            accumulate(&mut sum, sumi, d, m, xd[b], xs[b], with_min);
        }
        *o = sum;
    }
}
