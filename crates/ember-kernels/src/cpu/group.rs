//! Matmuls over group-quantized safetensors weights (AWQ, GPTQ, EXL2, compressed-tensors) read
//! in their packed form, with 8-bit integer activations.
//!
//! One kernel serves every format. A weight is consumed as a sequence of *positions* `p` (input
//! features in the order the kernel reads them: the stored order, except for GPTQ/CT act-order,
//! whose inputs are visited sorted by group, and EXL2, whose rows are stored permuted), cut into
//! *groups* (runs of positions sharing one scale and zero point per output) and each group into
//! *segments* of at most [`SEG`] positions. Per call:
//!
//! 1. every activation row is gathered into position order and quantized per segment, `xq =
//!    round(x / dx)` with `dx = max|x| / 127` (Q8_0-style symmetric blocks of at most 32, like
//!    llama.cpp's activations); per (row, group) `zsum = Σ_seg dx · Σ xq`;
//! 2. output columns are split into tiles of [`TN`]; per tile (a rayon task) and per segment the
//!    codes are unpacked straight from the packed tensors into `Quads` (lane = column, each
//!    `u32` = four positions' `u8` codes), whole words at a time where the layout allows (GPTQ /
//!    EXL2 4-bit: two masks per word give 8 positions; compressed-tensors 4-bit: the same per
//!    column, reading each column's words of the segment from its k-contiguous row; CT 8-bit:
//!    two words per 8 positions; other 2/4/8-bit cases: one shift and mask per position; AWQ:
//!    lanes in nibble order, unpermuted on output), and the integer dot
//!    runs as `vpdpbusd` (AVX-512 VNNI), `vpmaddubsw` + `vpmaddwd` (AVX2, codes <= 7 bits) or
//!    portable 32-bit lanes, for every activation row against the same unpacked codes;
//! 3. `facc[j] += dx · acc[j]` per segment and, per group,
//!    `y[j] += s[g][j] · (facc[j] − z[g][j] · zsum)`, with `s` and `z` decoded to f32 once at
//!    construction (`2 · groups · n` f32: e.g. 110 KiB for a 576x1536 g64 weight whose packed
//!    tensors take ~470 KiB).
//!
//! Every format and bit width takes this path; no format needs a dequantized copy. GPTQ and CT
//! act-order (`g_idx` not non-decreasing): positions follow the inputs sorted by group (a stable
//! argsort computed once at construction) and the activations are gathered into that order once
//! per call. The codes are repacked once, at construction, into position order in the format's
//! own word layout (`PackedWeight::sorted`), so act-order weights take the same word-at-a-time
//! paths as natural order instead of visiting `qweight` rows in random order (cache misses: ~5x
//! slower at m = 1). Memory cost: one more copy of the packed codes, `k · n · bits / 8` bytes
//! (e.g. ~430 KiB for a 576x1536 4-bit weight), for act-order weights only.

use std::sync::Arc;

use ember_quant::group::{
    ByteView, GroupError, GroupFormat, GroupQuantized, PackedLinear, awq, ct::ScaleDtype, exl2,
    gptq::GptqZeros,
};
use half::{bf16, f16};
use rayon::prelude::*;

use super::Columns;

/// Output columns per task (the integer accumulators of one activation row: 4 AVX2 vectors).
pub const TN: usize = 32;
/// Positions per activation-quantization segment (llama.cpp's Q8 block size).
pub const SEG: usize = 32;

/// A run of positions inside one group.
#[derive(Clone, Copy, Debug)]
struct Seg {
    p0: usize,
    len: usize,
}

/// A group in position order: its index in the format's parameter tensors and its segments.
#[derive(Clone, Copy, Debug)]
struct Group {
    /// Index into the format's scales / zeros (GPTQ/CT group, EXL2 group).
    g: usize,
    /// First and one-past-last segment.
    s0: usize,
    s1: usize,
}

/// Format-specific facts computed once.
#[derive(Clone, Debug)]
enum Layout {
    AwqGemm,
    AwqGemv {
        zw: usize,
    },
    Gptq,
    /// Per EXL2 group: bits, first q_weight row, first permuted row.
    Exl2 {
        groups: Vec<exl2::Exl2Group>,
    },
    Ct {
        g: usize,
        wpr: usize,
        legacy: bool,
        zp_legacy: bool,
    },
}

/// A validated packed weight and its precomputed traversal plan.
#[derive(Debug)]
pub(crate) struct PackedWeight {
    /// The weight as given (what the matrix reports and dequantizes from).
    pub(crate) source: PackedLinear,
    /// The weight the kernel reads: `source`, except AWQ GEMM, which is repacked once into
    /// GPTQ's layout ([`awq::AwqGemm::to_gptq`]: a word per column holds 8 inputs, which the
    /// word-at-a-time paths read; AWQ's own words hold 8 columns of one input). That costs one
    /// more copy of the codes (`k·n/2` bytes) and gives the same `(q − z)·s` values. (A `k`
    /// that is not a multiple of 8, which GPTQ cannot pack, keeps AWQ's own path.)
    pub(crate) w: PackedLinear,
    pub(crate) desc: GroupQuantized,
    /// Position `p` reads input `order[p]` (`None`: position = input).
    order: Option<Vec<u32>>,
    /// GPTQ / CT act-order: the codes repacked in position order, in the layout of `qweight` /
    /// `weight_packed` (position `p` stored where input `p` would be), so their reads follow
    /// positions directly.
    sorted: Option<Vec<u8>>,
    segs: Vec<Seg>,
    groups: Vec<Group>,
    layout: Layout,
    /// Padded width: `n` rounded up to a multiple of [`TN`].
    npad: usize,
    /// `[groups][npad]` f32 scale of every (group in position order, column); zero past `n`.
    scale: Vec<f32>,
    /// `[groups][npad]` f32 zero point (in code units) of every (group, column).
    zero: Vec<f32>,
}

fn i32_at(b: &[u8], i: usize) -> i32 {
    i32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// Groups and segments from each position's group index (`gi[p]`, non-decreasing runs).
fn plan_runs(gi: impl Iterator<Item = usize>) -> (Vec<Seg>, Vec<Group>) {
    let mut segs = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    for (p, g) in gi.enumerate() {
        let new_group = groups.last().is_none_or(|last| last.g != g);
        if new_group {
            groups.push(Group {
                g,
                s0: segs.len(),
                s1: segs.len(),
            });
        }
        let last = groups.last_mut().expect("pushed");
        if new_group || segs.last().is_some_and(|s: &Seg| s.len == SEG) {
            segs.push(Seg { p0: p, len: 0 });
            last.s1 += 1;
        }
        segs.last_mut().expect("pushed").len += 1;
    }
    (segs, groups)
}

/// Position order and plan for a format with an optional per-input group index.
fn plan_gidx(k: usize, gidx: impl Fn(usize) -> usize) -> (Option<Vec<u32>>, Vec<Seg>, Vec<Group>) {
    let sorted = (1..k).all(|i| gidx(i - 1) <= gidx(i));
    if sorted {
        let (s, g) = plan_runs((0..k).map(&gidx));
        (None, s, g)
    } else {
        let mut order: Vec<u32> = (0..k as u32).collect();
        order.sort_by_key(|&i| gidx(i as usize)); // stable
        let (s, g) = plan_runs(order.iter().map(|&i| gidx(i as usize)));
        (Some(order), s, g)
    }
}

fn ct_dense_words(len: usize, b: u32) -> usize {
    (len * b as usize).div_ceil(32)
}

impl PackedWeight {
    /// Validates `w` and plans its traversal.
    pub(crate) fn new(w: PackedLinear) -> Result<Self, GroupError> {
        let source = PackedLinear::new(w)?;
        let w = match &source {
            PackedLinear::AwqGemm {
                k,
                n,
                group_size,
                bits,
                qweight,
                qzeros,
                scales,
            } if k.is_multiple_of(8) => {
                let t = awq::AwqGemm {
                    k: *k,
                    n: *n,
                    group_size: *group_size,
                    bits: *bits,
                    qweight: qweight.as_slice(),
                    qzeros: qzeros.as_slice(),
                    scales: scales.as_slice(),
                }
                .to_gptq()?;
                PackedLinear::new(PackedLinear::Gptq {
                    k: *k,
                    n: *n,
                    bits: 4,
                    group_size: *group_size,
                    zeros: GptqZeros::V2,
                    qweight: ByteView::from_vec(t.qweight),
                    qzeros: ByteView::from_vec(t.qzeros),
                    scales: ByteView::from_vec(t.scales),
                    g_idx: None,
                })?
            }
            other => other.clone(),
        };
        let desc = source.desc();
        let (k, n) = (desc.k, desc.n);
        let (order, segs, groups, layout) = match &w {
            PackedLinear::AwqGemm { group_size, .. } => {
                let (s, g) = plan_runs((0..k).map(|i| i / group_size));
                (None, s, g, Layout::AwqGemm)
            }
            PackedLinear::AwqGemv { group_size, .. } => {
                let (s, g) = plan_runs((0..k).map(|i| i / group_size));
                let zw = awq::gemv_zeros_width(k, *group_size).expect("validated");
                (None, s, g, Layout::AwqGemv { zw })
            }
            PackedLinear::Gptq {
                group_size, g_idx, ..
            } => {
                let gs = *group_size;
                let (o, s, g) = match g_idx {
                    Some(gi) => {
                        let gi = gi.as_slice();
                        plan_gidx(k, |i| i32_at(gi, i) as usize)
                    }
                    None => plan_gidx(k, |i| i / gs),
                };
                (o, s, g, Layout::Gptq)
            }
            PackedLinear::Exl2 {
                q_invperm,
                q_weight,
                q_scale,
                q_scale_max,
                q_groups,
                ..
            } => {
                let v = exl2::Exl2 {
                    k,
                    n,
                    q_weight: q_weight.as_slice(),
                    q_scale: q_scale.as_slice(),
                    q_scale_max: q_scale_max.as_slice(),
                    q_groups: q_groups.as_slice(),
                    q_invperm: q_invperm.as_slice(),
                };
                let eg = v.groups()?;
                let inv = q_invperm.as_slice();
                let mut order = vec![0u32; k];
                for i in 0..k {
                    order[i32_at(inv, i) as usize] = i as u32;
                }
                let identity = order.iter().enumerate().all(|(i, &o)| o as usize == i);
                let (s, g) =
                    plan_runs((0..k).map(|r| eg.partition_point(|gr| gr.row_start <= r) - 1));
                (
                    (!identity).then_some(order),
                    s,
                    g,
                    Layout::Exl2 { groups: eg },
                )
            }
            PackedLinear::Ct {
                bits,
                group_size,
                weight_packed,
                weight_zero_point,
                weight_g_idx,
                ..
            } => {
                let gs = *group_size;
                let (o, s, g) = match weight_g_idx {
                    Some(gi) => {
                        let gi = gi.as_slice();
                        plan_gidx(k, |i| i32_at(gi, i) as usize)
                    }
                    None => plan_gidx(k, |i| i / gs),
                };
                let ng = k.div_ceil(gs);
                // Dense (CT >= 0.17) unless the length only fits the legacy packing (validated).
                let legacy = weight_packed.as_slice().len() != n * ct_dense_words(k, *bits) * 4;
                let zp_legacy = weight_zero_point
                    .as_ref()
                    .is_some_and(|z| z.as_slice().len() != ng * ct_dense_words(n, *bits) * 4);
                let wpr = if legacy {
                    k.div_ceil(32 / *bits as usize)
                } else {
                    ct_dense_words(k, *bits)
                };
                let layout = Layout::Ct {
                    g: ng,
                    wpr,
                    legacy,
                    zp_legacy,
                };
                (o, s, g, layout)
            }
        };
        let npad = n.div_ceil(TN) * TN;
        let mut pw = Self {
            source,
            w,
            desc,
            order,
            sorted: None,
            segs,
            groups,
            layout,
            npad,
            scale: Vec::new(),
            zero: Vec::new(),
        };
        // Per-call f16/bf16 decoding and EXL2 scale reconstruction, done once.
        let mut scale = vec![0.0f32; pw.groups.len() * npad];
        let mut zero = vec![0.0f32; pw.groups.len() * npad];
        for (gi, grp) in pw.groups.iter().enumerate() {
            for j0 in (0..n).step_by(TN) {
                let tn = TN.min(n - j0);
                let (mut s, mut z) = ([0.0f32; TN], [0.0f32; TN]);
                params(&pw, grp, j0, tn, &mut s, &mut z);
                let o = gi * npad + j0;
                for l in 0..tn {
                    let c = lane_col(&pw, l);
                    scale[o + l] = s[c];
                    zero[o + l] = z[c];
                }
            }
        }
        pw.scale = scale;
        pw.zero = zero;
        pw.sorted = repack_sorted(&pw);
        Ok(pw)
    }
}

/// Address of element `e` (width `b`) of column `c` for the K-packed formats whose codes may be
/// read out of order: `(word, shift)` of its low bits; a field crossing a word boundary (GPTQ and
/// dense CT widths not dividing 32) continues in the low bits of the next word along `e`, which
/// is `word + step`.
fn code_addr(pw: &PackedWeight, c: usize, e: usize) -> (usize, u32, usize) {
    let n = pw.desc.n;
    match (&pw.w, &pw.layout) {
        (PackedLinear::Gptq { bits, .. }, _) => {
            let bit = e * *bits as usize;
            (c + bit / 32 * n, (bit % 32) as u32, n)
        }
        (PackedLinear::Ct { bits, .. }, Layout::Ct { wpr, legacy, .. }) => {
            let b = *bits as usize;
            if *legacy {
                let pf = 32 / b;
                (c * wpr + e / pf, ((e % pf) * b) as u32, 1)
            } else {
                (c * wpr + e * b / 32, ((e * b) % 32) as u32, 1)
            }
        }
        _ => unreachable!("GPTQ or CT"),
    }
}

/// GPTQ / CT act-order codes repacked into position order (`PackedWeight::sorted`); `None`
/// without act-order or for other formats.
fn repack_sorted(pw: &PackedWeight) -> Option<Vec<u8>> {
    let order = pw.order.as_ref()?;
    let (src, b) = match &pw.w {
        PackedLinear::Gptq { qweight, bits, .. } => (qweight.as_slice(), *bits),
        PackedLinear::Ct {
            weight_packed,
            bits,
            ..
        } => (weight_packed.as_slice(), *bits),
        _ => return None,
    };
    let mut dst = vec![0u32; src.len() / 4];
    let mask = (1u64 << b) - 1;
    for c in 0..pw.desc.n {
        for (p, &i) in order.iter().enumerate() {
            let (w, off, step) = code_addr(pw, c, i as usize);
            let mut v = u64::from(portable::word(src, w)) >> off;
            if off + b > 32 {
                v |= u64::from(portable::word(src, w + step)) << (32 - off);
            }
            let v = v & mask;
            let (w, off, step) = code_addr(pw, c, p);
            dst[w] |= (v << off) as u32;
            if off + b > 32 {
                dst[w + step] |= (v >> (32 - off)) as u32;
            }
        }
    }
    Some(dst.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// Scale and zero point of every lane of tile `j0..j0 + tn` for group `grp` (decoded once, at
/// construction).
fn params(
    pw: &PackedWeight,
    grp: &Group,
    j0: usize,
    tn: usize,
    s: &mut [f32; TN],
    z: &mut [f32; TN],
) {
    use portable::{stream_get, word};
    let n = pw.desc.n;
    let g = grp.g;
    match (&pw.w, &pw.layout) {
        (PackedLinear::AwqGemm { qzeros, scales, .. }, _) => {
            let (qz, sc) = (qzeros.as_slice(), scales.as_slice());
            let nw = n / 8;
            for j in 0..tn {
                let c = j0 + j;
                let shift = 4 * awq::AWQ_REVERSE_ORDER[c % 8] as u32;
                z[j] = ((word(qz, g * nw + c / 8) >> shift) & 0xF) as f32;
                s[j] = f16_at(sc, g * n + c);
            }
        }
        (PackedLinear::AwqGemv { qzeros, scales, .. }, Layout::AwqGemv { zw }) => {
            let (qz, sc) = (qzeros.as_slice(), scales.as_slice());
            for j in 0..tn {
                let c = j0 + j;
                z[j] = ((word(qz, c * zw + g / 8) >> (4 * (g % 8))) & 0xF) as f32;
                s[j] = f16_at(sc, c * zw * 8 + g);
            }
        }
        (
            PackedLinear::Gptq {
                bits,
                zeros,
                qzeros,
                scales,
                ..
            },
            _,
        ) => {
            let (qz, sc, b) = (qzeros.as_slice(), scales.as_slice(), *bits);
            let zw = n * b as usize / 32;
            let mask = (1u32 << b) - 1;
            for j in 0..tn {
                let c = j0 + j;
                let st = stream_get(qz, g * zw, 1, c, b);
                let zv = match zeros {
                    GptqZeros::V1 => (st + 1) & mask,
                    GptqZeros::V2 => st,
                };
                z[j] = zv as f32;
                s[j] = f16_at(sc, g * n + c);
            }
        }
        (
            PackedLinear::Exl2 {
                q_scale,
                q_scale_max,
                ..
            },
            Layout::Exl2 { groups },
        ) => {
            let (qs, qsm) = (q_scale.as_slice(), q_scale_max.as_slice());
            let np = exl2::padded_n(n);
            let m = f16::from_f32(f16_at(qsm, g) / 256.0).to_f32();
            let zero = (1u32 << (groups[g].bits - 1)) as f32;
            for j in 0..tn {
                let c = j0 + j;
                let code = (word(qs, g * (np / 8) + c / 8) >> (4 * (c % 8))) & 0xF;
                s[j] = f16::from_f32(((code + 1) * (code + 1)) as f32 * m).to_f32();
                z[j] = zero;
            }
        }
        (
            PackedLinear::Ct {
                bits,
                scale_dtype,
                weight_scale,
                weight_zero_point,
                ..
            },
            Layout::Ct {
                g: ng, zp_legacy, ..
            },
        ) => {
            let (b, sc, ng) = (*bits, weight_scale.as_slice(), *ng);
            for j in 0..tn {
                let c = j0 + j;
                let i = c * ng + g;
                s[j] = match scale_dtype {
                    ScaleDtype::F16 => f16_at(sc, i),
                    ScaleDtype::Bf16 => bf16::from_le_bytes([sc[2 * i], sc[2 * i + 1]]).to_f32(),
                    ScaleDtype::F32 => f32::from_bits(word(sc, i)),
                };
                // value = (u − zp_u) · s, both stored with the `2^(b−1)` offset.
                z[j] = match weight_zero_point {
                    Some(zp) => {
                        let zp = zp.as_slice();
                        if *zp_legacy {
                            let pf = 32 / b as usize;
                            ((word(zp, (c / pf) * ng + g) >> ((c % pf) as u32 * b))
                                & ((1 << b) - 1)) as f32
                        } else {
                            stream_get(zp, g, ng, c, b) as f32
                        }
                    }
                    None => (1u32 << (b - 1)) as f32,
                };
            }
        }
        _ => unreachable!("layout matches the weight"),
    }
}

/// Index of position `p`'s code in the GPTQ / CT code stream the kernel reads: `order[p]` in
/// the stored codes, `p` itself in the repacked ones (`PackedWeight::sorted`) or without
/// act-order.
fn code_index(pw: &PackedWeight, p: usize) -> usize {
    match (&pw.sorted, &pw.order) {
        (None, Some(o)) => o[p] as usize,
        _ => p,
    }
}

/// Column (within its tile) of kernel lane `l`: the identity except for AWQ-GEMM, whose lanes
/// follow the nibble order of its words (see `unpack_quads`).
fn lane_col(pw: &PackedWeight, l: usize) -> usize {
    match pw.w {
        PackedLinear::AwqGemm { .. } => {
            let (c, h, v) = (l / 8, (l / 4) % 2, l % 4);
            8 * c + awq::AWQ_ORDER[2 * v + h]
        }
        _ => l,
    }
}

/// The kernel's hot functions, instantiated once for the build's baseline target and, on
/// x86-64, once with AVX2 enabled (the same portable code, auto-vectorized 256 bits wide): a
/// plain `#[inline(always)]` body is not inlined into a `#[target_feature]` caller, so every
/// function carries the attributes itself.
macro_rules! kernel_fns {
    ($(#[$attr:meta])*) => {
        use super::*;

        $(#[$attr])*
        #[inline]
        pub(super) fn word(b: &[u8], i: usize) -> u32 {
            u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
        }

        /// Element `e` (width `b`) of a little-endian bitstream whose word `j` is `first + j * stride`.
        $(#[$attr])*
        #[inline]
        pub(super) fn stream_get(bytes: &[u8], first: usize, stride: usize, e: usize, b: u32) -> u32 {
            let p = e * b as usize;
            let (j, off) = (p / 32, (p % 32) as u32);
            let mut v = word(bytes, first + j * stride) >> off;
            if off + b > 32 {
                v |= word(bytes, first + (j + 1) * stride) << (32 - off);
            }
            v & ((1u32 << b) - 1)
        }

        /// Loads `tn <= TN` consecutive words starting at word `first` (zeros past `tn`).
        $(#[$attr])*
        #[inline]
        pub(super) fn load_words(bytes: &[u8], first: usize, tn: usize) -> [u32; TN] {
            let mut w = [0u32; TN];
            let src = &bytes[4 * first..4 * (first + tn)];
            for (d, s) in w.iter_mut().zip(src.chunks_exact(4)) {
                *d = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
            w
        }

        /// Element `e` (width `b`) of each of `tn` columns of a K-packed stream whose rows are
        /// `stride` words apart (GPTQ `qweight`, EXL2 `q_weight`).
        $(#[$attr])*
        #[inline]
        pub(super) fn unpack_lanes(
            bytes: &[u8],
            first: usize,
            stride: usize,
            e: usize,
            b: u32,
            tn: usize,
            dst: &mut [u8; TN],
        ) {
            let p = e * b as usize;
            let (j, off) = (p / 32, (p % 32) as u32);
            let mask = (1u32 << b) - 1;
            let lo0 = 4 * (first + j * stride);
            let straddle = off + b > 32;
            if tn == TN {
                // A whole tile: fixed-size slices, no bounds checks in the loop (vectorized).
                let lo: &[u8; 4 * TN] = bytes[lo0..lo0 + 4 * TN].try_into().expect("TN words");
                let lw = |c: usize| {
                    u32::from_le_bytes([lo[4 * c], lo[4 * c + 1], lo[4 * c + 2], lo[4 * c + 3]])
                };
                if straddle {
                    let hi0 = 4 * (first + (j + 1) * stride);
                    let hi: &[u8; 4 * TN] =
                        bytes[hi0..hi0 + 4 * TN].try_into().expect("TN words");
                    for c in 0..TN {
                        let h = u32::from_le_bytes([hi[4 * c], hi[4 * c + 1], hi[4 * c + 2], hi[4 * c + 3]]);
                        dst[c] = (((lw(c) >> off) | (h << (32 - off))) & mask) as u8;
                    }
                } else {
                    for c in 0..TN {
                        dst[c] = ((lw(c) >> off) & mask) as u8;
                    }
                }
            } else {
                for c in 0..tn {
                    dst[c] = stream_get(bytes, first + c, stride, e, b) as u8;
                }
            }
        }

        /// Codes of segment `seg` (inside group `grp`) for tile `j0..j0 + tn`: `codes[t][j]` is the
        /// code of position `seg.p0 + t`, column `j0 + j` (lanes past `tn` are left as they are).
        $(#[$attr])*
        #[inline]
        pub(super) fn unpack(pw: &PackedWeight, grp: &Group, seg: Seg, j0: usize, tn: usize, codes: &mut [[u8; TN]; SEG]) {
            let n = pw.desc.n;
            let input = |p: usize| code_index(pw, p);
            match (&pw.w, &pw.layout) {
                (PackedLinear::AwqGemm { qweight, .. }, _) => {
                    let qw = qweight.as_slice();
                    let nw = n / 8;
                    for (t, dst) in codes[..seg.len].iter_mut().enumerate() {
                        let kk = seg.p0 + t;
                        let words = load_words(qw, kk * nw + j0 / 8, tn / 8);
                        for (c, w) in words[..TN / 8].iter().enumerate() {
                            for (i, &col) in awq::AWQ_ORDER.iter().enumerate() {
                                dst[8 * c + col] = ((w >> (4 * i)) & 0xF) as u8;
                            }
                        }
                    }
                }
                (PackedLinear::AwqGemv { qweight, .. }, _) => {
                    let qw = qweight.as_slice();
                    let kw = pw.desc.k / 8;
                    for j in 0..tn {
                        let row = (j0 + j) * kw;
                        for t in 0..seg.len {
                            let kk = seg.p0 + t;
                            codes[t][j] = ((word(qw, row + kk / 8) >> (4 * (kk % 8))) & 0xF) as u8;
                        }
                    }
                }
                (PackedLinear::Gptq { bits, qweight, .. }, _) => {
                    let qw = pw.sorted.as_deref().unwrap_or(qweight.as_slice());
                    for (t, dst) in codes[..seg.len].iter_mut().enumerate() {
                        unpack_lanes(qw, j0, n, input(seg.p0 + t), *bits, tn, dst);
                    }
                }
                (PackedLinear::Exl2 { q_weight, .. }, Layout::Exl2 { groups }) => {
                    let qw = q_weight.as_slice();
                    let gr = groups[grp.g];
                    let np = exl2::padded_n(n);
                    for (t, dst) in codes[..seg.len].iter_mut().enumerate() {
                        let r = seg.p0 + t - gr.row_start;
                        unpack_lanes(qw, gr.qrow_start * np + j0, np, r, gr.bits, tn, dst);
                    }
                }
                (
                    PackedLinear::Ct {
                        bits,
                        weight_packed,
                        ..
                    },
                    Layout::Ct { wpr, legacy, .. },
                ) => {
                    let (wp, b) = (pw.sorted.as_deref().unwrap_or(weight_packed.as_slice()), *bits);
                    let pf = 32 / b as usize;
                    for j in 0..tn {
                        let row = (j0 + j) * wpr;
                        for t in 0..seg.len {
                            let kk = input(seg.p0 + t);
                            codes[t][j] = if *legacy {
                                ((word(wp, row + kk / pf) >> ((kk % pf) as u32 * b)) & ((1 << b) - 1))
                                    as u8
                            } else {
                                stream_get(wp, row, 1, kk, b) as u8
                            };
                        }
                    }
                }
                _ => unreachable!("layout matches the weight"),
            }
        }

        /// Codes of segment `seg` for tile `j0..j0 + tn` in dot layout ([`Quads`]); returns the
        /// number of chunks used (`2 · ceil(len / 8)`). Chunks hold finite codes everywhere (their
        /// activations past the segment are zero).
        $(#[$attr])*
        #[inline]
        pub(super) fn unpack_quads(
            pw: &PackedWeight,
            grp: &Group,
            seg: Seg,
            j0: usize,
            tn: usize,
            codes: &mut [[u8; TN]; SEG],
            quads: &mut Quads,
        ) -> usize {
            let nc = 2 * seg.len.div_ceil(8);
            // 4-bit codes packed along k with a column's words contiguous along n (GPTQ without
            // act-order, EXL2 4-bit groups): one word holds 8 consecutive positions, nibble `u`
            // = position `u`; `w & 0x0F0F0F0F` is positions (0, 2, 4, 6), `(w >> 4) & ..` is
            // (1, 3, 5, 7): exactly the chunk layout, two masks per word.
            let kpacked = match (&pw.w, &pw.layout) {
                (PackedLinear::Gptq { bits: 4, qweight, .. }, _)
                    if (pw.order.is_none() || pw.sorted.is_some()) && seg.p0 % 8 == 0 =>
                {
                    let qw = pw.sorted.as_deref().unwrap_or(qweight.as_slice());
                    Some((qw, seg.p0 / 8 * pw.desc.n + j0, pw.desc.n))
                }
                (PackedLinear::Exl2 { q_weight, .. }, Layout::Exl2 { groups }) => {
                    let gr = groups[grp.g];
                    let r = seg.p0 - gr.row_start;
                    let np = exl2::padded_n(pw.desc.n);
                    (gr.bits == 4 && r % 8 == 0)
                        .then(|| (q_weight.as_slice(), (gr.qrow_start + r / 8) * np + j0, np))
                }
                _ => None,
            };
            if let Some((qw, first, stride)) = kpacked {
                for b in 0..nc / 2 {
                    let w0 = first + b * stride;
                    if tn == TN {
                        let src: &[u8; 4 * TN] = qw[4 * w0..4 * (w0 + TN)].try_into().expect("TN words");
                        let (lo, hi) = quads.split_at_mut(2 * b + 1);
                        let (lo, hi) = (&mut lo[2 * b], &mut hi[0]);
                        for c in 0..TN {
                            let w = u32::from_le_bytes([src[4 * c], src[4 * c + 1], src[4 * c + 2], src[4 * c + 3]]);
                            lo[c] = w & 0x0F0F_0F0F;
                            hi[c] = (w >> 4) & 0x0F0F_0F0F;
                        }
                    } else {
                        for c in 0..tn {
                            let w = word(qw, w0 + c);
                            quads[2 * b][c] = w & 0x0F0F_0F0F;
                            quads[2 * b + 1][c] = (w >> 4) & 0x0F0F_0F0F;
                        }
                    }
                }
                return nc;
            }
            // K-packed widths dividing 32 (2, 4, 8 bits; GPTQ with act-order, EXL2 groups):
            // every position's field sits in one word per column, at a uniform shift, so each
            // position costs one shift and mask per lane, ORed into its byte of its chunk.
            let gather = match (&pw.w, &pw.layout) {
                (PackedLinear::Gptq { bits, qweight, .. }, _) if 32 % *bits == 0 => {
                    let qw = pw.sorted.as_deref().unwrap_or(qweight.as_slice());
                    Some((qw, j0, pw.desc.n, *bits, 0))
                }
                (PackedLinear::Exl2 { q_weight, .. }, Layout::Exl2 { groups }) => {
                    let gr = groups[grp.g];
                    let np = exl2::padded_n(pw.desc.n);
                    (32 % gr.bits == 0)
                        .then(|| (q_weight.as_slice(), gr.qrow_start * np + j0, np, gr.bits, gr.row_start))
                }
                _ => None,
            };
            if let Some((qw, first, stride, b, base)) = gather {
                let mask = (1u32 << b) - 1;
                let input = |p: usize| code_index(pw, p);
                // EXL2 positions index the group's stream directly (its rows are stored permuted).
                let exl2 = matches!(pw.layout, Layout::Exl2 { .. });
                for (ci, q) in quads[..nc].iter_mut().enumerate() {
                    let (bk, h) = (ci / 2, ci % 2);
                    *q = [0u32; TN];
                    for u in 0..4 {
                        let t = 8 * bk + h + 2 * u;
                        if t >= seg.len {
                            break;
                        }
                        let e = if exl2 { seg.p0 + t - base } else { input(seg.p0 + t) };
                        let bit = e * b as usize;
                        let (row, off) = (bit / 32, (bit % 32) as u32);
                        let w0 = first + row * stride;
                        let sh = 8 * u as u32;
                        if tn == TN {
                            let src: &[u8; 4 * TN] = qw[4 * w0..4 * (w0 + TN)].try_into().expect("TN words");
                            for c in 0..TN {
                                let w = u32::from_le_bytes([src[4 * c], src[4 * c + 1], src[4 * c + 2], src[4 * c + 3]]);
                                q[c] |= ((w >> off) & mask) << sh;
                            }
                        } else {
                            for c in 0..tn {
                                q[c] |= ((word(qw, w0 + c) >> off) & mask) << sh;
                            }
                        }
                    }
                }
                return nc;
            }
            // compressed-tensors: rows along k (a column's codes are contiguous), widths dividing
            // 32 (dense and legacy packing coincide). Per column, 4-bit: one word = 8 positions,
            // the two masks above; 8-bit: two words = 8 positions, bytes (0, 2) and (1, 3) of
            // each; 2-bit (or a segment not starting on a word): one shift and mask per position.
            if let (PackedLinear::Ct { bits, weight_packed, .. }, Layout::Ct { wpr, .. }) = (&pw.w, &pw.layout)
                && 32 % *bits == 0
            {
                let b = *bits;
                let wp = pw.sorted.as_deref().unwrap_or(weight_packed.as_slice());
                let pf = 32 / b as usize;
                let nb = nc / 2;
                if b == 4 && seg.p0 % 8 == 0 {
                    if tn == TN && nb == SEG / 8 {
                        // A whole tile and segment: fixed-size reads, 8 columns at a time.
                        for c8 in 0..TN / 8 {
                            let mut w = [[0u32; 8]; SEG / 8];
                            for c in 0..8 {
                                let w0 = 4 * ((j0 + 8 * c8 + c) * wpr + seg.p0 / 8);
                                let src: &[u8; 16] = wp[w0..w0 + 16].try_into().expect("4 words");
                                for (bk, s) in src.chunks_exact(4).enumerate() {
                                    w[bk][c] = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                                }
                            }
                            for (bk, wb) in w.iter().enumerate() {
                                for c in 0..8 {
                                    quads[2 * bk][8 * c8 + c] = wb[c] & 0x0F0F_0F0F;
                                    quads[2 * bk + 1][8 * c8 + c] = (wb[c] >> 4) & 0x0F0F_0F0F;
                                }
                            }
                        }
                        return nc;
                    }
                    for c in 0..tn {
                        let w0 = (j0 + c) * wpr + seg.p0 / 8;
                        let src = &wp[4 * w0..4 * (w0 + nb)];
                        for (bk, s) in src.chunks_exact(4).enumerate() {
                            let w = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                            quads[2 * bk][c] = w & 0x0F0F_0F0F;
                            quads[2 * bk + 1][c] = (w >> 4) & 0x0F0F_0F0F;
                        }
                    }
                    return nc;
                }
                if b == 8 && seg.p0 % 4 == 0 {
                    // Words of the segment (the last may hold fewer than 4 positions).
                    let nw = seg.len.div_ceil(4);
                    // Bytes 0 and 2 (`sh` = 0) or 1 and 3 (`sh` = 8) of `w` in its low half.
                    let pair = |w: u32, sh: u32| {
                        let e = (w >> sh) & 0x00FF_00FF;
                        (e | (e >> 8)) & 0xFFFF
                    };
                    for c in 0..tn {
                        let w0 = (j0 + c) * wpr + seg.p0 / 4;
                        let src = &wp[4 * w0..4 * (w0 + nw)];
                        let w = |i: usize| {
                            src.get(4 * i..4 * i + 4)
                                .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                        };
                        for bk in 0..nb {
                            let (a, z) = (w(2 * bk), w(2 * bk + 1));
                            quads[2 * bk][c] = pair(a, 0) | (pair(z, 0) << 16);
                            quads[2 * bk + 1][c] = pair(a, 8) | (pair(z, 8) << 16);
                        }
                    }
                    return nc;
                }
                let mask = (1u32 << b) - 1;
                for q in quads[..nc].iter_mut() {
                    *q = [0u32; TN];
                }
                for c in 0..tn {
                    let row = (j0 + c) * wpr;
                    for t in 0..seg.len {
                        let e = code_index(pw, seg.p0 + t);
                        let (ci, u) = (t / 8 * 2 + t % 2, (t % 8) / 2);
                        let v = (word(wp, row + e / pf) >> ((e % pf) as u32 * b)) & mask;
                        quads[ci][c] |= v << (8 * u);
                    }
                }
                return nc;
            }
            if let PackedLinear::AwqGemm { qweight, .. } = &pw.w {
                // Lanes in storage order ([`awq_lane_col`]): lane `8c + 4h + v` is nibble
                // `2v + h` of word `c`, so a position's 32 codes are 8 masked words.
                let qw = qweight.as_slice();
                let nw = pw.desc.n / 8;
                for (t, dst) in codes[..seg.len].iter_mut().enumerate() {
                    let w0 = (seg.p0 + t) * nw + j0 / 8;
                    for c in 0..tn / 8 {
                        let w = word(qw, w0 + c);
                        let (lo, hi) = (w & 0x0F0F_0F0F, (w >> 4) & 0x0F0F_0F0F);
                        dst[8 * c..8 * c + 4].copy_from_slice(&lo.to_le_bytes());
                        dst[8 * c + 4..8 * c + 8].copy_from_slice(&hi.to_le_bytes());
                    }
                }
            } else {
                unpack(pw, grp, seg, j0, tn, codes);
            }
            for (ci, q) in quads[..nc].iter_mut().enumerate() {
                let (b, h) = (ci / 2, ci % 2);
                let r = |u: usize| &codes[8 * b + h + 2 * u];
                let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                for c in 0..TN {
                    q[c] = u32::from_le_bytes([r0[c], r1[c], r2[c], r3[c]]);
                }
            }
            nc
        }

        /// Output columns `j0..j0 + tn` for every activation row: `y[i * TN + j]` (lanes past `tn`
        /// hold garbage).
        $(#[$attr])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn tile(
            pw: &PackedWeight,
            acts: &Acts,
            m: usize,
            j0: usize,
            tn: usize,
            y: &mut [f32],
            facc: &mut [f32],
            isa: Isa,
        ) {
            let (ns, ng) = (pw.segs.len(), pw.groups.len());
            let mut codes = [[0u8; TN]; SEG];
            let mut quads: Quads = [[0u32; TN]; SEG / 4];
            y.fill(0.0);
            for (gi, grp) in pw.groups.iter().enumerate() {
                facc.fill(0.0);
                for si in grp.s0..grp.s1 {
                    let seg = pw.segs[si];
                    let nc = unpack_quads(pw, grp, seg, j0, tn, &mut codes, &mut quads);
                    seg_rows(isa, &quads, nc, acts, si, ns, m, facc);
                }
                let o = gi * pw.npad + j0;
                let s: &[f32; TN] = pw.scale[o..o + TN].try_into().expect("TN");
                let z: &[f32; TN] = pw.zero[o..o + TN].try_into().expect("TN");
                for i in 0..m {
                    let zs = acts.zsum[i * ng + gi];
                    let fa: &[f32; TN] = facc[i * TN..(i + 1) * TN].try_into().expect("TN");
                    let yr: &mut [f32; TN] = (&mut y[i * TN..(i + 1) * TN]).try_into().expect("TN");
                    for j in 0..TN {
                        yr[j] += s[j] * (fa[j] - z[j] * zs);
                    }
                }
            }
        }

        /// [`seg_rows_portable`] with the dot this CPU runs fastest ([`Isa`]).
        $(#[$attr])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn seg_rows(isa: Isa, quads: &Quads, nc: usize, acts: &Acts, si: usize, ns: usize, m: usize, facc: &mut [f32]) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Vnni` is only chosen when the CPU has these features.
                Isa::Vnni => unsafe { super::x86::seg_rows_vnni(quads, nc, acts, si, ns, m, facc) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2 and codes fit in 7 bits.
                Isa::Avx2 => unsafe { super::x86::seg_rows_avx2(quads, nc, acts, si, ns, m, facc) },
                _ => seg_rows_portable(quads, nc, acts, si, ns, m, facc),
            }
        }

        /// `facc[i][j] += dx[i][si] · Σ_c Σ_b byte_b(quads[c][j]) · byte_b(xq[i][si][c])` for
        /// every row `i` (portable: 32-bit lanes, auto-vectorized).
        $(#[$attr])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn seg_rows_portable(quads: &Quads, nc: usize, acts: &Acts, si: usize, ns: usize, m: usize, facc: &mut [f32]) {
            for i in 0..m {
                let xq = &acts.xq[(i * ns + si) * (SEG / 4)..][..nc];
                let mut acc = [0i32; TN];
                for (q, &xv) in quads.iter().zip(xq) {
                    let xb = xv.to_le_bytes().map(|v| v as i8 as i32);
                    for j in 0..TN {
                        let c = q[j];
                        acc[j] += (c & 0xFF) as i32 * xb[0]
                            + ((c >> 8) & 0xFF) as i32 * xb[1]
                            + ((c >> 16) & 0xFF) as i32 * xb[2]
                            + (c >> 24) as i32 * xb[3];
                    }
                }
                let d = acts.dx[i * ns + si];
                let fa: &mut [f32; TN] = (&mut facc[i * TN..(i + 1) * TN]).try_into().expect("TN");
                for j in 0..TN {
                    fa[j] += d * acc[j] as f32;
                }
            }
        }
    };
}

mod portable {
    kernel_fns!();
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    kernel_fns!(#[target_feature(enable = "avx2,fma")]);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    kernel_fns!(#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]);
}

/// One segment's codes for one tile in dot layout: chunk `2b + h` (`b`: 8-position block,
/// `h` in 0..2), lane `j` holds the codes of positions `8b + h + 2u` (`u` = byte 0..4) of column
/// `j0 + j`, one per byte: what `vpdpbusd` multiplies by a broadcast quad of activations.
type Quads = [[u32; TN]; SEG / 4];

/// The integer dot a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    /// `vpmaddubsw` + `vpmaddwd`: exact only for codes below 128 (at most 7 bits).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `vpdpbusd`.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Acts, Quads, SEG, TN};

    /// [`super::portable::seg_rows_portable`] with `vpdpbusd` (codes `u8`, activations `i8`,
    /// exact `i32` sums).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn seg_rows_vnni(
        quads: &Quads,
        nc: usize,
        acts: &Acts,
        si: usize,
        ns: usize,
        m: usize,
        facc: &mut [f32],
    ) {
        assert!(nc <= SEG / 4 && facc.len() >= m * TN);
        for i in 0..m {
            let xq = &acts.xq[(i * ns + si) * (SEG / 4)..][..nc];
            let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for (q, &xv) in quads.iter().zip(xq) {
                let xb = _mm512_set1_epi32(xv as i32);
                // SAFETY: `q` is TN = 32 `u32`s: two unaligned 64-byte loads in bounds.
                let (q0, q1) = unsafe {
                    (
                        _mm512_loadu_si512(q.as_ptr().cast()),
                        _mm512_loadu_si512(q.as_ptr().add(16).cast()),
                    )
                };
                a0 = _mm512_dpbusd_epi32(a0, q0, xb);
                a1 = _mm512_dpbusd_epi32(a1, q1, xb);
            }
            let d = _mm512_set1_ps(acts.dx[i * ns + si]);
            let fa = facc[i * TN..(i + 1) * TN].as_mut_ptr();
            // SAFETY: `fa` points at TN = 32 f32s (asserted above).
            unsafe {
                let f0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(a0), _mm512_loadu_ps(fa));
                let f1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(a1), _mm512_loadu_ps(fa.add(16)));
                _mm512_storeu_ps(fa, f0);
                _mm512_storeu_ps(fa.add(16), f1);
            }
        }
    }

    /// [`super::portable::seg_rows_portable`] with `vpmaddubsw` + `vpmaddwd`: a pair of
    /// products is at most `2 · 127 · 127 < i16::MAX` for codes below 128, so the saturating
    /// 16-bit step is exact (callers guarantee codes of at most 7 bits).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn seg_rows_avx2(
        quads: &Quads,
        nc: usize,
        acts: &Acts,
        si: usize,
        ns: usize,
        m: usize,
        facc: &mut [f32],
    ) {
        assert!(nc <= SEG / 4 && facc.len() >= m * TN);
        let ones = _mm256_set1_epi16(1);
        for i in 0..m {
            let xq = &acts.xq[(i * ns + si) * (SEG / 4)..][..nc];
            let mut a = [_mm256_setzero_si256(); 4];
            for (q, &xv) in quads.iter().zip(xq) {
                let xb = _mm256_set1_epi32(xv as i32);
                for (v, acc) in a.iter_mut().enumerate() {
                    // SAFETY: `q` is TN = 32 `u32`s: four unaligned 32-byte loads in bounds.
                    let qv = unsafe { _mm256_loadu_si256(q.as_ptr().add(8 * v).cast()) };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qv, xb), ones);
                    *acc = _mm256_add_epi32(*acc, p);
                }
            }
            let d = _mm256_set1_ps(acts.dx[i * ns + si]);
            let fa = facc[i * TN..(i + 1) * TN].as_mut_ptr();
            for (v, acc) in a.iter().enumerate() {
                // SAFETY: `fa` points at TN = 32 f32s (asserted above).
                unsafe {
                    let p = fa.add(8 * v);
                    _mm256_storeu_ps(
                        p,
                        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(*acc), _mm256_loadu_ps(p)),
                    );
                }
            }
        }
    }
}

/// Activations in position order, quantized per segment.
struct Acts {
    /// `[m][segments][SEG / 4]` quads of `i8` codes in [`Quads`]' chunk order (zero past the
    /// segment's length).
    xq: Vec<u32>,
    /// `[m][segments]` scales.
    dx: Vec<f32>,
    /// `[m][groups]`: `Σ_seg dx · Σ xq` over the group's segments.
    zsum: Vec<f32>,
}

fn quantize_acts(pw: &PackedWeight, x: &[f32], m: usize) -> Acts {
    let k = pw.desc.k;
    let (ns, ng) = (pw.segs.len(), pw.groups.len());
    let mut xq = vec![0u32; m * ns * (SEG / 4)];
    let mut dx = vec![0.0f32; m * ns];
    let mut zsum = vec![0.0f32; m * ng];
    let mut xp = vec![0.0f32; k];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        let xr: &[f32] = match &pw.order {
            Some(o) => {
                for (d, &src) in xp.iter_mut().zip(o) {
                    *d = row[src as usize];
                }
                &xp
            }
            None => row,
        };
        for (gi, grp) in pw.groups.iter().enumerate() {
            let mut zs = 0.0f32;
            for s in grp.s0..grp.s1 {
                let seg = pw.segs[s];
                let v = &xr[seg.p0..seg.p0 + seg.len];
                let amax = v.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0i32;
                let mut bytes = [0u8; SEG];
                for (t, &xv) in v.iter().enumerate() {
                    let r = (xv * id).round().clamp(-127.0, 127.0) as i8;
                    let u = t % 8;
                    bytes[t - u + 4 * (u % 2) + u / 2] = r as u8;
                    sum += r as i32;
                }
                let dst = &mut xq[(i * ns + s) * (SEG / 4)..][..SEG / 4];
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                dx[i * ns + s] = d;
                zs += d * sum as f32;
            }
            zsum[i * ng + gi] = zs;
        }
    }
    Acts { xq, dx, zsum }
}

/// The dot and instantiation for this weight on this CPU.
fn choose_isa(pw: &PackedWeight) -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Isa::Vnni;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && pw.desc.bits <= 7
        {
            return Isa::Avx2;
        }
    }
    let _ = pw;
    Isa::Portable
}

/// `x @ W^T` for row-major `x: [m, k]`, returning `[m, n]` (see the module docs).
pub(crate) fn matmul(pw: &Arc<PackedWeight>, x: &[f32], m: usize) -> Vec<f32> {
    matmul_isa(pw, x, m, choose_isa(pw))
}

/// [`matmul`] with a given dot (`isa` must be supported by this CPU and, for `Isa::Avx2`, the
/// weight's codes must fit in 7 bits).
fn matmul_isa(pw: &Arc<PackedWeight>, x: &[f32], m: usize, isa: Isa) -> Vec<f32> {
    let (n, k) = (pw.desc.n, pw.desc.k);
    debug_assert_eq!(x.len(), m * k);
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let acts = quantize_acts(pw, x, m);
    let mut out = Vec::with_capacity(m * n);
    let dst = Columns::new(&mut out.spare_capacity_mut()[..m * n], m, n);
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    (0..n.div_ceil(TN)).into_par_iter().for_each_init(
        || (vec![0.0f32; m * TN], vec![0.0f32; m * TN]),
        |(y, facc), t| {
            let j0 = t * TN;
            let tn = TN.min(n - j0);
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Vnni` means the CPU has every feature `avx512::tile` enables.
                Isa::Vnni => unsafe { avx512::tile(pw, &acts, m, j0, tn, y, facc, isa) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                _ if avx2 => unsafe { avx2::tile(pw, &acts, m, j0, tn, y, facc, isa) },
                _ => portable::tile(pw, &acts, m, j0, tn, y, facc, isa),
            }
            if matches!(pw.w, PackedLinear::AwqGemm { .. }) {
                facc[..m * TN].copy_from_slice(&y[..m * TN]);
                for i in 0..m {
                    for l in 0..tn {
                        y[i * tn + lane_col(pw, l)] = facc[i * TN + l];
                    }
                }
            } else {
                for i in 0..m {
                    y.copy_within(i * TN..i * TN + tn, i * tn);
                }
            }
            // SAFETY: task `t` alone writes columns `j0..j0 + tn`.
            unsafe { dst.write(j0, &y[..m * tn]) };
        },
    );
    // SAFETY: the tasks above wrote all `m` rows of every column range `j0..j0 + tn`, and those
    // ranges cover `0..n` (a panic in any task would have unwound past this point).
    unsafe { out.set_len(m * n) };
    out
}

/// Rows `start..start + out.len() / k` of the dense weight, in parallel.
pub(crate) fn dequantize_rows(pw: &PackedWeight, start: usize, out: &mut [f32]) {
    let k = pw.desc.k.max(1);
    const ROWS: usize = 16;
    out.par_chunks_mut(ROWS * k)
        .enumerate()
        .for_each(|(i, dst)| {
            // Validated at construction: whole rows inside the matrix cannot fail.
            pw.source
                .view()
                .dequantize_rows(start + i * ROWS, dst)
                .expect("validated packed weight");
        });
}

/// A short description such as `"AWQ-GEMM 4-bit g64"`.
pub(crate) fn type_name(d: &GroupQuantized) -> String {
    let f = match d.format {
        GroupFormat::AwqGemm => "AWQ-GEMM",
        GroupFormat::AwqGemv => "AWQ-GEMV",
        GroupFormat::Gptq => "GPTQ",
        GroupFormat::Exl2 => return format!("EXL2 {}-bit max", d.bits),
        GroupFormat::CompressedTensors => "CT",
    };
    if d.group_size >= d.k {
        format!("{f} {}-bit per-channel", d.bits)
    } else {
        format!("{f} {}-bit g{}", d.bits, d.group_size)
    }
}

#[cfg(test)]
mod tests {
    use ember_quant::group::{ByteView, gptq};

    use super::*;

    /// Every dot this CPU supports gives the same result as the portable one (the integer sums
    /// are exact; only the f32 accumulation order may differ).
    #[test]
    fn isas_agree() {
        let (n, k, m) = (80usize, 256usize, 3usize);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104_729 % 997) as f32 / 300.0) - 1.6)
            .collect();
        let mut weights = Vec::new();
        let t = awq::quantize(&w, n, k, 64).unwrap();
        weights.push(PackedLinear::AwqGemm {
            k,
            n,
            group_size: 64,
            bits: 4,
            qweight: ByteView::from_vec(t.qweight),
            qzeros: ByteView::from_vec(t.qzeros),
            scales: ByteView::from_vec(t.scales),
        });
        let perm: Vec<u32> = (0..k as u32).map(|i| (i * 37) % k as u32).collect();
        for (bits, act) in [(4u32, false), (4, true), (2, true), (8, false), (8, true)] {
            let t = gptq::quantize(
                &w,
                n,
                k,
                &gptq::GptqOptions {
                    bits,
                    group_size: 64,
                    act_order: act.then_some(&perm[..]),
                    sym: false,
                    format: gptq::GptqZeros::V2,
                },
            )
            .unwrap();
            weights.push(PackedLinear::Gptq {
                k,
                n,
                bits,
                group_size: 64,
                zeros: gptq::GptqZeros::V2,
                qweight: ByteView::from_vec(t.qweight),
                qzeros: ByteView::from_vec(t.qzeros),
                scales: ByteView::from_vec(t.scales),
                g_idx: Some(ByteView::from_vec(t.g_idx)),
            });
        }
        // compressed-tensors: 2/3/4/8 bits, natural and act-order (repacked) codes; groups of
        // 64 (word-aligned segments) and 20 (segments starting inside a word).
        let gidx_of = |g: usize, act: bool| {
            let mut gi: Vec<i32> = (0..k).map(|i| (i / g) as i32).collect();
            if act {
                gi.reverse();
                gi.rotate_left(7);
            }
            ByteView::from_vec(gi.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        for (bits, g, act) in [
            (4u32, 64usize, false),
            (4, 64, true),
            (4, 20, false),
            (4, 20, true),
            (8, 64, false),
            (8, 64, true),
            (8, 20, true),
            (2, 64, true),
            (3, 64, true),
        ] {
            let t = ember_quant::group::ct::quantize(&w, n, k, bits, g, false, ScaleDtype::F16)
                .unwrap();
            weights.push(PackedLinear::Ct {
                k,
                n,
                bits,
                group_size: g,
                scale_dtype: ScaleDtype::F16,
                weight_packed: ByteView::from_vec(t.weight_packed),
                weight_scale: ByteView::from_vec(t.weight_scale),
                weight_shape: ByteView::from_vec(t.weight_shape),
                weight_zero_point: t.weight_zero_point.map(ByteView::from_vec),
                weight_g_idx: Some(gidx_of(g, act)),
            });
        }
        let t = exl2::quantize(&w, n, k, &[5, 4, 4, 2], 64, exl2::Exl2Perm::ColumnNorm).unwrap();
        weights.push(PackedLinear::Exl2 {
            k,
            n,
            q_weight: ByteView::from_vec(t.q_weight),
            q_scale: ByteView::from_vec(t.q_scale),
            q_scale_max: ByteView::from_vec(t.q_scale_max),
            q_groups: ByteView::from_vec(t.q_groups),
            q_invperm: ByteView::from_vec(t.q_invperm),
        });
        for w in weights {
            let pw = Arc::new(PackedWeight::new(w).unwrap());
            let want = matmul_isa(&pw, &x, m, Isa::Portable);
            let mut isas = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && pw.desc.bits <= 7
                {
                    isas.push(Isa::Avx2);
                }
                if choose_isa(&pw) == Isa::Vnni {
                    isas.push(Isa::Vnni);
                }
            }
            for isa in isas {
                let got = matmul_isa(&pw, &x, m, isa);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{isa:?} {:?}: {g} vs {w}",
                        pw.desc
                    );
                }
            }
        }
    }
}
