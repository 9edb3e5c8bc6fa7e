//! compressed-tensors `pack-quantized` INT weights (what llm-compressor writes for
//! W4A16/W8A16), group or channel strategy, symmetric or asymmetric.
//!
//! Sources (compressed-tensors @ ac8e2ba8): `compressors/pack_quantized/base.py::
//! PackedQuantizationCompressor.compress/decompress` (tensor set), `pack_quantized/helpers.py::
//! pack_to_int32/unpack_from_int32` (dense little-endian bitstream per row since 0.17.0; the
//! legacy `32 // b` codes-per-word packing before it), `quantization/lifecycle/
//! forward_helpers.py::_dequantize/_process_group` (dequantization, `g_idx`),
//! `quantization/utils/helpers.py::calculate_qparams/calculate_range` and `_quantize` (quantizer).
//!
//! Tensors: `weight_packed` I32 `[n, ceil(k·b/32)]` (dense) or `[n, ceil(k/(32/b))]` (legacy),
//! codes stored as `u = q + 2^(b−1)` along k; `weight_scale` `[n, G]` (F16, BF16 or F32);
//! `weight_shape` I64 (or I32) `[2] = [n, k]`; `weight_zero_point` I32 `[ceil(n·b/32), G]`
//! packed along n (asymmetric only); `weight_g_idx` I32 `[k]` (optional). `G = ceil(k/g)`;
//! channel strategy is `g = k`. Dequantization: `W[n, k] = (q − zp[n, gk]) · s[n, gk]`,
//! `gk = k / g` or `g_idx[k]`.

use half::{bf16, f16};

use super::{
    GroupError, GroupFormat, GroupQuantized, GroupTensors, bf16_at, check_group_size, check_weight,
    expect_len, f16_at, for_rows, i32_at, mul, stream_get, stream_put, word, words_to_bytes,
};

const BITS_ALLOWED: &str = "2..=8";

/// The dtype of `weight_scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDtype {
    /// F16.
    F16,
    /// BF16 (the usual model dtype).
    Bf16,
    /// F32.
    F32,
}

impl ScaleDtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            ScaleDtype::F16 | ScaleDtype::Bf16 => 2,
            ScaleDtype::F32 => 4,
        }
    }

    fn read(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            ScaleDtype::F16 => f16_at(bytes, i),
            ScaleDtype::Bf16 => bf16_at(bytes, i),
            ScaleDtype::F32 => f32::from_bits(word(bytes, i)),
        }
    }

    /// `v` rounded to this dtype (as f32).
    pub fn round(self, v: f32) -> f32 {
        match self {
            ScaleDtype::F16 => f16::from_f32(v).to_f32(),
            ScaleDtype::Bf16 => bf16::from_f32(v).to_f32(),
            ScaleDtype::F32 => v,
        }
    }

    fn bytes(self, v: f32) -> Vec<u8> {
        match self {
            ScaleDtype::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
            ScaleDtype::Bf16 => bf16::from_f32(v).to_le_bytes().to_vec(),
            ScaleDtype::F32 => v.to_le_bytes().to_vec(),
        }
    }
}

/// How codes are packed into words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtPacking {
    /// CT ≥ 0.17: one little-endian bitstream per row (codes may straddle words).
    Dense,
    /// CT < 0.17: `32 / b` codes per word, no straddling.
    Legacy,
}

fn check_bits(bits: u32) -> Result<(), GroupError> {
    if !(2..=8).contains(&bits) {
        return Err(GroupError::UnsupportedBits {
            format: GroupFormat::CompressedTensors,
            bits,
            allowed: BITS_ALLOWED,
        });
    }
    Ok(())
}

pub(crate) fn dense_words(len: usize, bits: u32) -> usize {
    (len.saturating_mul(bits as usize)).div_ceil(32)
}

pub(crate) fn legacy_words(len: usize, bits: u32) -> usize {
    len.div_ceil(32 / bits as usize)
}

fn get(bytes: &[u8], packing: CtPacking, first: usize, stride: usize, e: usize, b: u32) -> u32 {
    match packing {
        CtPacking::Dense => stream_get(bytes, first, stride, e, b),
        CtPacking::Legacy => {
            let pf = 32 / b as usize;
            (word(bytes, first + (e / pf) * stride) >> ((e % pf) as u32 * b)) & ((1 << b) - 1)
        }
    }
}

/// Tells dense from legacy by the packed width (they agree for 2, 4 and 8 bits). When the two
/// widths coincide for 3/5/6/7 bits (e.g. 3-bit with k = 40: 4 words either way) the checkpoint
/// carries no marker and dense is assumed.
pub(crate) fn detect(
    tensor: &'static str,
    actual_bytes: usize,
    other: usize,
    len: usize,
    bits: u32,
) -> Result<CtPacking, GroupError> {
    let dense = mul(&[other, dense_words(len, bits), 4]);
    let legacy = mul(&[other, legacy_words(len, bits), 4]);
    if actual_bytes == dense && dense != usize::MAX {
        Ok(CtPacking::Dense)
    } else if actual_bytes == legacy && legacy != usize::MAX {
        Ok(CtPacking::Legacy)
    } else {
        Err(GroupError::Length {
            tensor,
            expected: dense,
            actual: actual_bytes,
        })
    }
}

/// A borrowed compressed-tensors `pack-quantized` tensor set.
#[derive(Clone, Copy, Debug)]
pub struct CtPacked<'a> {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// `num_bits`.
    pub bits: u32,
    /// `group_size` (use `k` for the channel strategy); `G = ceil(k/g)`.
    pub group_size: usize,
    /// The dtype of `weight_scale`.
    pub scale_dtype: ScaleDtype,
    /// `weight_packed` bytes (I32).
    pub weight_packed: &'a [u8],
    /// `weight_scale` bytes, `[n, G]`.
    pub weight_scale: &'a [u8],
    /// `weight_shape` bytes: I64 `[2]` (or I32 `[2]`) = `[n, k]`.
    pub weight_shape: &'a [u8],
    /// `weight_zero_point` bytes (I32, packed along n); `None` for symmetric.
    pub weight_zero_point: Option<&'a [u8]>,
    /// `weight_g_idx` bytes (I32 `[k]`); `None` means `k / g`.
    pub weight_g_idx: Option<&'a [u8]>,
}

struct Layout {
    g: usize,
    wpr: usize,
    packing: CtPacking,
    zp_packing: CtPacking,
}

impl CtPacked<'_> {
    /// The common description.
    pub fn desc(&self) -> GroupQuantized {
        GroupQuantized {
            format: GroupFormat::CompressedTensors,
            bits: self.bits,
            group_size: self.group_size,
            k: self.k,
            n: self.n,
        }
    }

    fn check(&self) -> Result<Layout, GroupError> {
        check_bits(self.bits)?;
        check_group_size(
            GroupFormat::CompressedTensors,
            self.group_size,
            self.k,
            false,
        )?;
        let g = self.k.div_ceil(self.group_size);
        let b = self.bits;
        let packing = detect("weight_packed", self.weight_packed.len(), self.n, self.k, b)?;
        let wpr = match packing {
            CtPacking::Dense => dense_words(self.k, b),
            CtPacking::Legacy => legacy_words(self.k, b),
        };
        expect_len(
            "weight_scale",
            self.weight_scale,
            mul(&[self.n, g, self.scale_dtype.size()]),
        )?;
        let (rows, cols) = match self.weight_shape.len() {
            16 => {
                let s = self.weight_shape;
                let a = i64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                let c = i64::from_le_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
                (a, c)
            }
            8 => (
                i32_at(self.weight_shape, 0) as i64,
                i32_at(self.weight_shape, 1) as i64,
            ),
            actual => {
                return Err(GroupError::Length {
                    tensor: "weight_shape",
                    expected: 16,
                    actual,
                });
            }
        };
        if rows != self.n as i64 || cols != self.k as i64 {
            return Err(GroupError::WeightShape {
                rows,
                cols,
                n: self.n,
                k: self.k,
            });
        }
        let zp_packing = match self.weight_zero_point {
            Some(zp) => detect("weight_zero_point", zp.len(), g, self.n, b)?,
            None => CtPacking::Dense,
        };
        if let Some(gi) = self.weight_g_idx {
            expect_len("weight_g_idx", gi, mul(&[self.k, 4]))?;
            for index in 0..self.k {
                let value = i32_at(gi, index);
                if value < 0 || value as usize >= g {
                    return Err(GroupError::GroupIndexOutOfRange {
                        tensor: "weight_g_idx",
                        index,
                        value: value as i64,
                        groups: g,
                    });
                }
            }
        }
        Ok(Layout {
            g,
            wpr,
            packing,
            zp_packing,
        })
    }

    /// Checks bits, group size, every tensor length (dense or legacy packing), `weight_shape`
    /// and every `weight_g_idx` entry.
    pub fn validate(&self) -> Result<(), GroupError> {
        self.check().map(|_| ())
    }

    fn row_unchecked(&self, l: &Layout, n: usize, out: &mut [f32]) {
        let b = self.bits;
        let off = (1i32 << (b - 1)) as f32;
        for (k, o) in out.iter_mut().enumerate() {
            let gk = match self.weight_g_idx {
                Some(gi) => i32_at(gi, k) as usize,
                None => k / self.group_size,
            };
            let u = get(self.weight_packed, l.packing, n * l.wpr, 1, k, b);
            let zp = match self.weight_zero_point {
                Some(zp) => get(zp, l.zp_packing, gk, l.g, n, b) as f32 - off,
                None => 0.0,
            };
            let s = self.scale_dtype.read(self.weight_scale, n * l.g + gk);
            *o = (u as f32 - off - zp) * s;
        }
    }
}

impl GroupTensors for CtPacked<'_> {
    fn desc(&self) -> GroupQuantized {
        CtPacked::desc(self)
    }
    fn validate(&self) -> Result<(), GroupError> {
        CtPacked::validate(self)
    }
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) -> Result<(), GroupError> {
        let l = self.check()?;
        for_rows(self.n, self.k, start, out, |row, o| {
            self.row_unchecked(&l, row, o)
        })
    }
}

/// Unpacked compressed-tensors parameters in the `[n][k]` orientation: the writer's input.
#[derive(Clone, Copy, Debug)]
pub struct CtParts<'a> {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// `num_bits`, 2..=8.
    pub bits: u32,
    /// Group size; `G = ceil(k/g)`.
    pub group_size: usize,
    /// Signed codes in `[−2^(b−1), 2^(b−1) − 1]`, `[n][k]`.
    pub codes: &'a [i8],
    /// Signed zero points, `[n][G]`; `None` for symmetric (no tensor is written).
    pub zero_points: Option<&'a [i8]>,
    /// Scales `[n][G]`, written in `scale_dtype`.
    pub scales: &'a [f32],
    /// The dtype of `weight_scale`.
    pub scale_dtype: ScaleDtype,
}

/// An owned compressed-tensors tensor set (dense packing) with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct CtTensors {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// `num_bits`.
    pub bits: u32,
    /// Group size.
    pub group_size: usize,
    /// The dtype of `weight_scale`.
    pub scale_dtype: ScaleDtype,
    /// `weight_packed` bytes (I32).
    pub weight_packed: Vec<u8>,
    /// `weight_scale` bytes.
    pub weight_scale: Vec<u8>,
    /// `weight_shape` bytes (I64 `[n, k]`).
    pub weight_shape: Vec<u8>,
    /// `weight_zero_point` bytes (I32), asymmetric only.
    pub weight_zero_point: Option<Vec<u8>>,
}

impl CtTensors {
    /// A borrowed view.
    pub fn view(&self) -> CtPacked<'_> {
        CtPacked {
            k: self.k,
            n: self.n,
            bits: self.bits,
            group_size: self.group_size,
            scale_dtype: self.scale_dtype,
            weight_packed: &self.weight_packed,
            weight_scale: &self.weight_scale,
            weight_shape: &self.weight_shape,
            weight_zero_point: self.weight_zero_point.as_deref(),
            weight_g_idx: None,
        }
    }
}

impl CtParts<'_> {
    /// Packs with the dense (CT ≥ 0.17) `pack_to_int32`; identical to the legacy packing for
    /// 2, 4 and 8 bits.
    pub fn pack(&self) -> Result<CtTensors, GroupError> {
        check_bits(self.bits)?;
        check_group_size(
            GroupFormat::CompressedTensors,
            self.group_size,
            self.k,
            false,
        )?;
        let (b, k, n) = (self.bits, self.k, self.n);
        let g = k.div_ceil(self.group_size);
        let lens = [
            ("codes", self.codes.len(), mul(&[n, k])),
            (
                "zero_points",
                self.zero_points.map_or(mul(&[n, g]), |z| z.len()),
                mul(&[n, g]),
            ),
            ("scales", self.scales.len(), mul(&[n, g])),
        ];
        for (tensor, actual, expected) in lens {
            if actual != expected || expected == usize::MAX {
                return Err(GroupError::Length {
                    tensor,
                    expected,
                    actual,
                });
            }
        }
        let (min, max) = (-(1i64 << (b - 1)), (1i64 << (b - 1)) - 1);
        let bufs = [
            ("codes", Some(self.codes)),
            ("zero_points", self.zero_points),
        ];
        for (what, buf) in bufs {
            if let Some(buf) = buf
                && let Some(index) = buf.iter().position(|&v| (v as i64) < min || v as i64 > max)
            {
                return Err(GroupError::ValueOutOfRange {
                    what,
                    index,
                    value: buf[index] as i64,
                    min,
                    max,
                });
            }
        }
        let off = 1i32 << (b - 1);
        let wpr = dense_words(k, b);
        let mut wp = vec![0u32; n * wpr];
        for row in 0..n {
            for kk in 0..k {
                let u = (self.codes[row * k + kk] as i32 + off) as u32;
                stream_put(&mut wp, row * wpr, 1, kk, b, u);
            }
        }
        let weight_zero_point = self.zero_points.map(|zp| {
            let mut w = vec![0u32; dense_words(n, b) * g];
            for row in 0..n {
                for j in 0..g {
                    let u = (zp[row * g + j] as i32 + off) as u32;
                    stream_put(&mut w, j, g, row, b, u);
                }
            }
            words_to_bytes(&w)
        });
        let weight_scale = self
            .scales
            .iter()
            .flat_map(|&s| self.scale_dtype.bytes(s))
            .collect();
        let mut weight_shape = (n as i64).to_le_bytes().to_vec();
        weight_shape.extend((k as i64).to_le_bytes());
        Ok(CtTensors {
            k,
            n,
            bits: b,
            group_size: self.group_size,
            scale_dtype: self.scale_dtype,
            weight_packed: words_to_bytes(&wp),
            weight_scale,
            weight_shape,
            weight_zero_point,
        })
    }
}

/// Owned unpacked parameters produced by [`quantize_parts`].
#[derive(Clone, Debug, PartialEq)]
pub struct CtOwnedParts {
    /// Signed codes `[n][k]`.
    pub codes: Vec<i8>,
    /// Signed zero points `[n][G]` (`None` when symmetric).
    pub zero_points: Option<Vec<i8>>,
    /// Scales `[n][G]`, already rounded to the scale dtype.
    pub scales: Vec<f32>,
}

/// Round-to-nearest compressed-tensors quantization of `weight` (`[n][k]`), after
/// `calculate_qparams` and `_quantize` (min/max widened to include 0; round half to even):
/// symmetric `s = max(|min|, |max|) / ((qmax − qmin)/2)`, `zp = 0`; asymmetric
/// `s = (max − min)/(qmax − qmin)`, `zp = round(clamp(qmin − min/s, qmin, qmax))`; a zero scale
/// becomes `f32::EPSILON`; `s` is rounded to `scale_dtype`, then
/// `q = clamp(round(w/s + zp), qmin, qmax)`.
pub fn quantize_parts(
    weight: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
    symmetric: bool,
    scale_dtype: ScaleDtype,
) -> Result<CtOwnedParts, GroupError> {
    check_bits(bits)?;
    check_group_size(GroupFormat::CompressedTensors, group_size, k, false)?;
    check_weight(weight, n, k)?;
    let g = k.div_ceil(group_size);
    let (qmin, qmax) = (
        -((1i32 << (bits - 1)) as f32),
        ((1i32 << (bits - 1)) - 1) as f32,
    );
    let mut codes = vec![0i8; n * k];
    let mut zps = vec![0i8; n * g];
    let mut scales = vec![0f32; n * g];
    for row in 0..n {
        for j in 0..g {
            let (a, e) = (
                row * k + j * group_size,
                row * k + ((j + 1) * group_size).min(k),
            );
            let x = &weight[a..e];
            let (mn, mx) = x
                .iter()
                .fold((0.0f32, 0.0f32), |(p, q), &v| (p.min(v), q.max(v)));
            let raw = if symmetric {
                mn.abs().max(mx) / ((qmax - qmin) / 2.0)
            } else {
                (mx - mn) / (qmax - qmin)
            };
            let mut s = scale_dtype.round(if raw == 0.0 { f32::EPSILON } else { raw });
            if s == 0.0 {
                s = scale_dtype.round(f32::MIN_POSITIVE.max(raw));
            }
            let zp = if symmetric {
                0.0
            } else {
                (qmin - mn / s).clamp(qmin, qmax).round_ties_even()
            };
            for (i, &v) in x.iter().enumerate() {
                codes[a + i] = ((v / s + zp).round_ties_even()).clamp(qmin, qmax) as i8;
            }
            zps[row * g + j] = zp as i8;
            scales[row * g + j] = s;
        }
    }
    Ok(CtOwnedParts {
        codes,
        zero_points: (!symmetric).then_some(zps),
        scales,
    })
}

/// Quantizes `weight` (`[n][k]`) with [`quantize_parts`] and packs it (dense packing).
pub fn quantize(
    weight: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
    symmetric: bool,
    scale_dtype: ScaleDtype,
) -> Result<CtTensors, GroupError> {
    let p = quantize_parts(weight, n, k, bits, group_size, symmetric, scale_dtype)?;
    CtParts {
        k,
        n,
        bits,
        group_size,
        codes: &p.codes,
        zero_points: p.zero_points.as_deref(),
        scales: &p.scales,
        scale_dtype,
    }
    .pack()
}
