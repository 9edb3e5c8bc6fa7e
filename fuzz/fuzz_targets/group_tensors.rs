//! Fuzz ember-quant's group-quantized readers (AWQ GEMM/GEMV, GPTQ, EXL2, compressed-tensors
//! `pack-quantized`): `validate` on any parameters and tensor bytes returns a value or a typed
//! error, never panics, and `PackedLinear::new` agrees with it (same error; it also refuses an
//! empty matrix, `k` or `n` zero). A set that
//! validates must dequantize: `dequantize_into` (`n·k` values) succeeds, every checked
//! `dequantize_row` and a two-row `dequantize_rows` tile equal the matching rows of it bit for
//! bit (NaN-aware: raw f16/bf16/f32 scales may be NaN or infinite), the owned `PackedLinear`
//! decodes the same matrix (and any output-row range `slice_outputs` accepts decodes to exactly
//! those rows), and the output holds no NaN when every scale is finite (and no
//! infinity either for f16 scales outside EXL2, whose codes are at most 255 steps from the
//! zero). A set that fails validation fails every `dequantize_*` call with an error. Wrong
//! output lengths and out-of-range rows are errors.
//!
//! Input (bytes past the end read as 0, so a short input is an all-zero tensor set):
//! `[format % 5] [k: u16 % 513] [n: u16 % 513] [bits: u8] [group size: u16, 0xFFFF = k]
//! [flags: u8]`, then one slot per tensor of the format, in the order of its struct fields
//! (EXL2: `q_groups` first, then `q_weight`, `q_scale`, `q_scale_max`, `q_invperm`). A slot is
//! a mode byte, `% 4`: 0 = the length validation expects, 1 = that plus a signed byte, 2 = a
//! u24 LE length; each followed by that many content bytes; 3 = generated content (a valid
//! `g_idx`/`q_invperm`/`weight_shape`/`q_groups` from a few seed bytes, finite scales from
//! content bytes with the exponent's top bit cleared; other tensors as mode 0). `k·n` is
//! capped at 2^16 (`n` shrinks) and every tensor at 512 KiB, so the harness itself never
//! allocates much. Flags: bit 0 = GPTQ `g_idx` / CT `weight_zero_point` present, bit 1 = GPTQ
//! v2 zeros / CT `weight_g_idx` present, bits 2-3 = CT scale dtype (F16, BF16, F32), bit 4 =
//! CT slot lengths for the legacy packing.
#![no_main]

use ember_quant::group::awq::{AwqGemm, AwqGemv, gemv_zeros_width};
use ember_quant::group::ct::{CtPacked, ScaleDtype};
use ember_quant::group::exl2::{EXL2_BITS, Exl2, padded_n};
use ember_quant::group::gptq::{Gptq, GptqZeros};
use ember_quant::group::{ByteView, GroupFormat, GroupTensors, PackedLinear};
use libfuzzer_sys::fuzz_target;

/// The largest tensor the harness builds.
const MAX_TENSOR: usize = 1 << 19;

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u24(&mut self) -> usize {
        usize::from(self.u8()) | usize::from(self.u8()) << 8 | usize::from(self.u8()) << 16
    }
    /// `len` content bytes (zero-padded past the end of the input).
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let take = len.min(self.0.len());
        let mut v = self.0[..take].to_vec();
        self.0 = &self.0[take..];
        v.resize(len, 0);
        v
    }
}

/// How a slot's generated content (mode 3) is made.
#[derive(Clone, Copy)]
enum Gen {
    /// Same as mode 0.
    Plain,
    /// Finite scales of this many bytes each (2 = f16/bf16, 4 = f32).
    Scales(usize),
    /// A valid `g_idx` for `G = ceil(k / g)` groups (an act-order permutation).
    GIdx,
    /// A permutation of `0..k`, I32.
    Perm,
    /// `[n, k]` as I64 (or I32 when the seed byte is odd).
    Shape,
    /// `q_groups` of `g`-row groups with non-increasing widths.
    QGroups,
}

struct Ctx {
    k: usize,
    n: usize,
    group_size: usize,
}

fn slot(c: &mut Cursor, ctx: &Ctx, expected: usize, generate: Gen) -> Vec<u8> {
    let expected = expected.min(MAX_TENSOR);
    match c.u8() % 4 {
        0 => c.bytes(expected),
        1 => {
            let delta = c.u8() as i8 as isize;
            c.bytes(expected.saturating_add_signed(delta).min(MAX_TENSOR))
        }
        2 => {
            let len = c.u24().min(MAX_TENSOR);
            c.bytes(len)
        }
        _ => generated(c, ctx, expected, generate),
    }
}

/// A permutation of `0..len` from a 16-bit seed (xorshift Fisher-Yates).
fn permutation(len: usize, seed: u16) -> Vec<usize> {
    let mut p: Vec<usize> = (0..len).collect();
    let mut s = u32::from(seed) | 0x1_0000;
    for i in (1..len).rev() {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        p.swap(i, s as usize % (i + 1));
    }
    p
}

fn i32s(v: impl IntoIterator<Item = i32>) -> Vec<u8> {
    v.into_iter().flat_map(i32::to_le_bytes).collect()
}

fn generated(c: &mut Cursor, ctx: &Ctx, expected: usize, generate: Gen) -> Vec<u8> {
    let (k, n, g) = (ctx.k, ctx.n, ctx.group_size.max(1));
    match generate {
        Gen::Plain => c.bytes(expected),
        Gen::Scales(size) => {
            let mut v = c.bytes(expected);
            // Clear the exponent's top bit of each little-endian value: finite, below 2.
            for value in v.chunks_exact_mut(size) {
                value[size - 1] &= 0xBF;
            }
            v
        }
        Gen::GIdx => {
            let perm = permutation(k, c.u16());
            let mut gi = vec![0i32; k];
            for (i, &col) in perm.iter().enumerate() {
                gi[col] = (i / g) as i32;
            }
            i32s(gi)
        }
        Gen::Perm => i32s(permutation(k, c.u16()).into_iter().map(|v| v as i32)),
        Gen::Shape => {
            if c.u8() & 1 == 1 {
                i32s([n as i32, k as i32])
            } else {
                [n as i64, k as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }
        }
        Gen::QGroups => {
            let groups = k.div_ceil(g).clamp(1, 512);
            let mut bits: Vec<u32> = (0..groups)
                .map(|_| EXL2_BITS[usize::from(c.u8()) % EXL2_BITS.len()])
                .collect();
            bits.sort_unstable_by(|a, b| b.cmp(a));
            let mut start = 0usize;
            let mut out = Vec::with_capacity(4 * groups);
            for b in bits {
                out.extend((b as i16).to_le_bytes());
                out.extend((start.min(i16::MAX as usize) as i16).to_le_bytes());
                start += g * b as usize / 32;
            }
            out
        }
    }
}

fn bv(v: &[u8]) -> ByteView {
    ByteView::from_vec(v.to_vec())
}

/// Every little-endian value of `bytes` (whole values only) is finite in `dtype`: its exponent
/// is not all ones.
fn all_finite(bytes: &[u8], dtype: ScaleDtype) -> bool {
    let half = |mask: u16| {
        bytes
            .chunks_exact(2)
            .all(|b| u16::from_le_bytes([b[0], b[1]]) & mask != mask)
    };
    match dtype {
        ScaleDtype::F16 => half(0x7C00),
        ScaleDtype::Bf16 => half(0x7F80),
        ScaleDtype::F32 => bytes
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
    }
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn same_all(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| same(x, y))
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor(data);
    let format = c.u8() % 5;
    let k = usize::from(c.u16()) % 513;
    let mut n = usize::from(c.u16()) % 513;
    if k * n > 1 << 16 {
        n = (1 << 16) / k;
    }
    let bits = u32::from(c.u8());
    let gs = c.u16();
    let group_size = if gs == u16::MAX { k } else { usize::from(gs) };
    let flags = c.u8();
    let ctx = Ctx { k, n, group_size };
    let g1 = group_size.max(1);
    let groups = k.div_ceil(g1);
    // Widths used only to size the expected slots (the reader sees `bits` as given).
    let bw = bits.clamp(1, 32) as usize;

    // (the set, whether its scales are all finite, whether finite scales bound the output)
    let (weight, finite_scales, bounded) = match format {
        0 | 1 => {
            let (qw, qz, sc) = if format == 0 {
                let nw = n / 8;
                (k * nw * 4, (k / g1) * nw * 4, (k / g1) * n * 2)
            } else {
                let zw = gemv_zeros_width(k, group_size).unwrap_or(0);
                (n * (k / 8) * 4, n * zw * 4, n * zw * 16)
            };
            let qweight = slot(&mut c, &ctx, qw, Gen::Plain);
            let qzeros = slot(&mut c, &ctx, qz, Gen::Plain);
            let scales = slot(&mut c, &ctx, sc, Gen::Scales(2));
            let finite = all_finite(&scales, ScaleDtype::F16);
            let w = if format == 0 {
                PackedLinear::AwqGemm {
                    k,
                    n,
                    group_size,
                    bits,
                    qweight: bv(&qweight),
                    qzeros: bv(&qzeros),
                    scales: bv(&scales),
                }
            } else {
                PackedLinear::AwqGemv {
                    k,
                    n,
                    group_size,
                    bits,
                    qweight: bv(&qweight),
                    qzeros: bv(&qzeros),
                    scales: bv(&scales),
                }
            };
            (w, finite, true)
        }
        2 => {
            let qweight = slot(&mut c, &ctx, (k * bw / 32) * n * 4, Gen::Plain);
            let qzeros = slot(&mut c, &ctx, groups * (n * bw / 32) * 4, Gen::Plain);
            let scales = slot(&mut c, &ctx, groups * n * 2, Gen::Scales(2));
            let g_idx = (flags & 1 != 0).then(|| slot(&mut c, &ctx, k * 4, Gen::GIdx));
            let finite = all_finite(&scales, ScaleDtype::F16);
            let w = PackedLinear::Gptq {
                k,
                n,
                bits,
                group_size,
                zeros: if flags & 2 != 0 {
                    GptqZeros::V2
                } else {
                    GptqZeros::V1
                },
                qweight: bv(&qweight),
                qzeros: bv(&qzeros),
                scales: bv(&scales),
                g_idx: g_idx.as_deref().map(bv),
            };
            (w, finite, true)
        }
        3 => {
            let q_groups = slot(&mut c, &ctx, 4 * groups.clamp(1, 512), Gen::QGroups);
            let probe = Exl2 {
                k,
                n,
                q_weight: &[],
                q_scale: &[],
                q_scale_max: &[],
                q_groups: &q_groups,
                q_invperm: &[],
            };
            let (g, qrows) = match probe.groups() {
                Ok(gr) => {
                    let last = gr[gr.len() - 1];
                    let qrows = last.qrow_start + (last.rows * last.bits as usize).div_ceil(32);
                    (gr.len(), qrows)
                }
                Err(_) => (q_groups.len() / 4, 0),
            };
            let np = padded_n(n);
            let q_weight = slot(&mut c, &ctx, qrows.saturating_mul(np * 4), Gen::Plain);
            let q_scale = slot(&mut c, &ctx, g * (np / 8) * 4, Gen::Plain);
            let q_scale_max = slot(&mut c, &ctx, g * 2, Gen::Scales(2));
            let q_invperm = slot(&mut c, &ctx, k * 4, Gen::Perm);
            let finite = all_finite(&q_scale_max, ScaleDtype::F16);
            let w = PackedLinear::Exl2 {
                k,
                n,
                q_weight: bv(&q_weight),
                q_scale: bv(&q_scale),
                q_scale_max: bv(&q_scale_max),
                q_groups: bv(&q_groups),
                q_invperm: bv(&q_invperm),
            };
            // f16 rounding of `(q − 2^(b−1))·s` can overflow to infinity.
            (w, finite, false)
        }
        _ => {
            let scale_dtype = [ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32]
                [usize::from((flags >> 2) & 3) % 3];
            let legacy = flags & 16 != 0 && 32 / bw > 0;
            let words = |len: usize| {
                if legacy {
                    len.div_ceil(32 / bw)
                } else {
                    (len * bw).div_ceil(32)
                }
            };
            let weight_packed = slot(&mut c, &ctx, n * words(k) * 4, Gen::Plain);
            let weight_scale = slot(
                &mut c,
                &ctx,
                n * groups * scale_dtype.size(),
                Gen::Scales(scale_dtype.size()),
            );
            let weight_shape = slot(&mut c, &ctx, 16, Gen::Shape);
            let weight_zero_point =
                (flags & 1 != 0).then(|| slot(&mut c, &ctx, groups * words(n) * 4, Gen::Plain));
            let weight_g_idx = (flags & 2 != 0).then(|| slot(&mut c, &ctx, k * 4, Gen::GIdx));
            let finite = all_finite(&weight_scale, scale_dtype);
            let w = PackedLinear::Ct {
                k,
                n,
                bits,
                group_size,
                scale_dtype,
                weight_packed: bv(&weight_packed),
                weight_scale: bv(&weight_scale),
                weight_shape: bv(&weight_shape),
                weight_zero_point: weight_zero_point.as_deref().map(bv),
                weight_g_idx: weight_g_idx.as_deref().map(bv),
            };
            (w, finite, scale_dtype == ScaleDtype::F16)
        }
    };

    // Borrowed sets over the same bytes, built field by field (not through `view`).
    let borrowed: Box<dyn GroupTensors + '_> = match &weight {
        PackedLinear::AwqGemm {
            k,
            n,
            group_size,
            bits,
            qweight,
            qzeros,
            scales,
        } => Box::new(AwqGemm {
            k: *k,
            n: *n,
            group_size: *group_size,
            bits: *bits,
            qweight: qweight.as_slice(),
            qzeros: qzeros.as_slice(),
            scales: scales.as_slice(),
        }),
        PackedLinear::AwqGemv {
            k,
            n,
            group_size,
            bits,
            qweight,
            qzeros,
            scales,
        } => Box::new(AwqGemv {
            k: *k,
            n: *n,
            group_size: *group_size,
            bits: *bits,
            qweight: qweight.as_slice(),
            qzeros: qzeros.as_slice(),
            scales: scales.as_slice(),
        }),
        PackedLinear::Gptq {
            k,
            n,
            bits,
            group_size,
            zeros,
            qweight,
            qzeros,
            scales,
            g_idx,
        } => Box::new(Gptq {
            k: *k,
            n: *n,
            bits: *bits,
            group_size: *group_size,
            zeros: *zeros,
            qweight: qweight.as_slice(),
            qzeros: qzeros.as_slice(),
            scales: scales.as_slice(),
            g_idx: g_idx.as_ref().map(ByteView::as_slice),
        }),
        PackedLinear::Exl2 {
            k,
            n,
            q_weight,
            q_scale,
            q_scale_max,
            q_groups,
            q_invperm,
        } => Box::new(Exl2 {
            k: *k,
            n: *n,
            q_weight: q_weight.as_slice(),
            q_scale: q_scale.as_slice(),
            q_scale_max: q_scale_max.as_slice(),
            q_groups: q_groups.as_slice(),
            q_invperm: q_invperm.as_slice(),
        }),
        PackedLinear::Ct {
            k,
            n,
            bits,
            group_size,
            scale_dtype,
            weight_packed,
            weight_scale,
            weight_shape,
            weight_zero_point,
            weight_g_idx,
        } => Box::new(CtPacked {
            k: *k,
            n: *n,
            bits: *bits,
            group_size: *group_size,
            scale_dtype: *scale_dtype,
            weight_packed: weight_packed.as_slice(),
            weight_scale: weight_scale.as_slice(),
            weight_shape: weight_shape.as_slice(),
            weight_zero_point: weight_zero_point.as_ref().map(ByteView::as_slice),
            weight_g_idx: weight_g_idx.as_ref().map(ByteView::as_slice),
        }),
    };
    let t = borrowed.as_ref();

    let d = t.desc();
    let want_format = [
        GroupFormat::AwqGemm,
        GroupFormat::AwqGemv,
        GroupFormat::Gptq,
        GroupFormat::Exl2,
        GroupFormat::CompressedTensors,
    ][usize::from(format)];
    assert_eq!((d.format, d.k, d.n), (want_format, k, n));

    let valid = t.validate();
    assert_eq!(t.validate(), valid, "validate is not deterministic");
    let owned = PackedLinear::new(weight.clone());
    // The owned form also refuses an empty matrix (k or n zero), which the borrowed readers
    // accept (there is nothing to decode).
    let empty = n == 0 || k == 0;
    let expected = match &valid {
        Ok(()) if empty => None,
        other => Some(other.clone()),
    };
    match expected {
        Some(v) => assert_eq!(
            owned.as_ref().map(|_| ()).map_err(Clone::clone),
            v,
            "PackedLinear::new disagrees with validate"
        ),
        None => assert!(owned.is_err(), "PackedLinear::new accepted an empty matrix"),
    }
    std::hint::black_box((weight.packed_bytes(), format!("{weight:?}"), weight.desc()));

    let nk = n * k;
    let mut out = vec![0f32; nk];
    let mut row = vec![0f32; k];
    let all = t.dequantize_into(&mut out);
    if let Err(e) = valid {
        // Every decoding call refuses a set that does not validate.
        assert!(all.is_err(), "dequantize_into accepted an invalid set ({e})");
        assert!(t.dequantize_row(0, &mut row).is_err());
        assert!(t.dequantize_rows(0, &mut row).is_err());
        assert!(t.dequantize_rows(0, &mut []).is_err());
        std::hint::black_box(e.to_string());
        return;
    }
    if let Err(e) = all {
        panic!("dequantize_into failed on a valid set: {e}");
    }

    // Rows: both ends, the middle and one picked by the header.
    if n > 0 {
        let pick = (usize::from(flags) * 131 + k + usize::from(gs)) % n;
        for r in [0, n - 1, n / 2, pick] {
            if let Err(e) = t.dequantize_row(r, &mut row) {
                panic!("dequantize_row({r}) failed on a valid set: {e}");
            }
            assert!(
                same_all(&row, &out[r * k..(r + 1) * k]),
                "dequantize_row({r}) differs from dequantize_into"
            );
        }
        if n >= 2 {
            let start = pick.min(n - 2);
            let mut tile = vec![0f32; 2 * k];
            if let Err(e) = t.dequantize_rows(start, &mut tile) {
                panic!("dequantize_rows({start}, 2 rows) failed on a valid set: {e}");
            }
            assert!(
                same_all(&tile, &out[start * k..(start + 2) * k]),
                "dequantize_rows({start}, 2 rows) differs from dequantize_into"
            );
        }
    }
    // The owned weight decodes the same matrix (an empty one was refused above).
    if let Ok(owned) = owned {
        let mut again = vec![0f32; nk];
        owned
            .view()
            .dequantize_into(&mut again)
            .expect("the PackedLinear view fails where the borrowed set decoded");
        assert!(same_all(&again, &out), "PackedLinear decodes differently");
        // Any output-row range: an error, or exactly those rows (a fused layer's part).
        let (a, b) = (usize::from(c.u16()) % (n + 2), usize::from(c.u16()) % (n + 2));
        if let Ok(part) = owned.slice_outputs(a..b) {
            assert!(a < b && b <= n, "slice_outputs accepted {a}..{b} of {n}");
            let mut rows = vec![0f32; (b - a) * k];
            part.view()
                .dequantize_into(&mut rows)
                .expect("a slice that validated fails to decode");
            assert!(
                same_all(&rows, &out[a * k..b * k]),
                "slice_outputs({a}..{b}) decodes other rows"
            );
        }
    }

    // Bad shapes of the output and rows past the end are errors.
    assert!(t.dequantize_row(n, &mut row).is_err());
    let mut long = vec![0f32; nk + 1];
    assert!(t.dequantize_into(&mut long).is_err());
    if k > 1 {
        assert!(t.dequantize_rows(0, &mut row[..k - 1]).is_err());
    }
    if k > 0 {
        let mut past = vec![0f32; k];
        assert!(t.dequantize_rows(n, &mut past).is_err());
    }

    if finite_scales {
        if let Some(i) = out.iter().position(|v| v.is_nan()) {
            panic!("finite scales decode to NaN at {i}");
        }
        if bounded && let Some(i) = out.iter().position(|v| !v.is_finite()) {
            panic!("finite f16 scales decode to {} at {i}", out[i]);
        }
    }
});
