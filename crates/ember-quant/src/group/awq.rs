//! AWQ (AutoAWQ) 4-bit asymmetric group quantization, `gemm` and `gemv` layouts.
//!
//! Sources (AutoAWQ @ 88e4c76b): `awq/modules/linear/gemm.py::WQLinear_GEMM.__init__/from_linear`
//! (GEMM layout and packer), `awq/utils/packing_utils.py::dequantize_gemm` (`AWQ_ORDER`,
//! `AWQ_REVERSE_ORDER`), `awq/modules/linear/gemv.py::WQLinear_GEMV.from_linear` and
//! `calculate_zeros_width` (GEMV layout), `awq/quantize/quantizer.py::pseudo_quantize_tensor`
//! (the quantizer). Dequantization: `W[n, k] = (q − z) · s` (no `+1`, unlike GPTQ v1).
//!
//! GEMM tensors: `qweight` I32 `[k, n/8]`, `qzeros` I32 `[k/g, n/8]` (nibble `i` of word `c`
//! holds column `8c + [0,2,4,6,1,3,5,7][i]`), `scales` F16 `[k/g, n]`.
//! GEMV tensors: `qweight` I32 `[n, k/8]` (sequential nibbles along k), `qzeros` I32 `[n, zw]`,
//! `scales` F16 `[n, 8·zw]`, where `zw` = [`gemv_zeros_width`]; fields past `k/g` are padding.

use half::f16;

use super::{
    GroupError, GroupFormat, GroupQuantized, GroupTensors, check_group_size, check_weight,
    expect_len, f16_at, f16_to_bytes, for_rows, mul, word, words_to_bytes,
};

/// Nibble `i` of a GEMM word holds column `8c + AWQ_ORDER[i]` (`packing_utils.py::AWQ_ORDER`).
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Column `8c + j` sits in nibble `AWQ_REVERSE_ORDER[j]` (`packing_utils.py::AWQ_REVERSE_ORDER`).
pub const AWQ_REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

const BITS_ALLOWED: &str = "4";

fn check_bits(format: GroupFormat, bits: u32) -> Result<(), GroupError> {
    if bits != 4 {
        return Err(GroupError::UnsupportedBits {
            format,
            bits,
            allowed: BITS_ALLOWED,
        });
    }
    Ok(())
}

/// A borrowed AWQ GEMM tensor set (`version: "gemm"`). AWQ is always 4-bit.
#[derive(Clone, Copy, Debug)]
pub struct AwqGemm<'a> {
    /// In features.
    pub k: usize,
    /// Out features (a multiple of 8).
    pub n: usize,
    /// Group size (must divide `k`; `-1` in the config means `k`).
    pub group_size: usize,
    /// Bits from the config; AWQ allows only 4.
    pub bits: u32,
    /// `qweight` bytes, I32 `[k, n/8]`.
    pub qweight: &'a [u8],
    /// `qzeros` bytes, I32 `[k/g, n/8]`.
    pub qzeros: &'a [u8],
    /// `scales` bytes, F16 `[k/g, n]`.
    pub scales: &'a [u8],
}

impl AwqGemm<'_> {
    /// The common description.
    pub fn desc(&self) -> GroupQuantized {
        GroupQuantized {
            format: GroupFormat::AwqGemm,
            bits: self.bits,
            group_size: self.group_size,
            k: self.k,
            n: self.n,
        }
    }

    /// Checks the group size, `n % 8 == 0` and every tensor length.
    pub fn validate(&self) -> Result<(), GroupError> {
        let f = GroupFormat::AwqGemm;
        check_bits(f, self.bits)?;
        check_group_size(f, self.group_size, self.k, true)?;
        if !self.n.is_multiple_of(8) {
            return Err(GroupError::BadDimension {
                format: f,
                dim: "n",
                value: self.n,
                requirement: "must be a multiple of 8",
            });
        }
        let g = self.k / self.group_size;
        let nw = self.n / 8;
        expect_len("qweight", self.qweight, mul(&[self.k, nw, 4]))?;
        expect_len("qzeros", self.qzeros, mul(&[g, nw, 4]))?;
        expect_len("scales", self.scales, mul(&[g, self.n, 2]))?;
        Ok(())
    }

    fn row_unchecked(&self, n: usize, out: &mut [f32]) {
        let nw = self.n / 8;
        let c = n / 8;
        let shift = 4 * AWQ_REVERSE_ORDER[n % 8] as u32;
        for (k, o) in out.iter_mut().enumerate() {
            let gi = k / self.group_size;
            let q = (word(self.qweight, k * nw + c) >> shift) & 0xF;
            let z = (word(self.qzeros, gi * nw + c) >> shift) & 0xF;
            *o = (q as f32 - z as f32) * f16_at(self.scales, gi * self.n + n);
        }
    }
}

impl AwqGemm<'_> {
    /// The same weight in GPTQ's layout (`gptq_v2` zeros, no `g_idx`): codes packed along `k`,
    /// a word per column holding 8 consecutive inputs, which integer kernels read a whole word
    /// at a time (AWQ's words hold 8 columns of one input instead). Every dequantized value is
    /// identical: `(q − z)·s` with the same `q`, `z` and f16 `s`.
    pub fn to_gptq(&self) -> Result<super::gptq::GptqTensors, GroupError> {
        self.validate()?;
        let (k, n, g) = (self.k, self.n, self.group_size);
        let (groups, nw) = (k / g, n / 8);
        let mut codes = vec![0u8; n * k];
        for kk in 0..k {
            for c in 0..nw {
                let w = word(self.qweight, kk * nw + c);
                for (j, &nib) in AWQ_REVERSE_ORDER.iter().enumerate() {
                    codes[(8 * c + j) * k + kk] = ((w >> (4 * nib)) & 0xF) as u8;
                }
            }
        }
        let mut zeros = vec![0u8; n * groups];
        let mut scales = vec![f16::ZERO; n * groups];
        for gi in 0..groups {
            for c in 0..nw {
                let w = word(self.qzeros, gi * nw + c);
                for (j, &nib) in AWQ_REVERSE_ORDER.iter().enumerate() {
                    zeros[(8 * c + j) * groups + gi] = ((w >> (4 * nib)) & 0xF) as u8;
                }
            }
            for col in 0..n {
                let at = 2 * (gi * n + col);
                let bits = u16::from_le_bytes([self.scales[at], self.scales[at + 1]]);
                scales[col * groups + gi] = f16::from_bits(bits);
            }
        }
        super::gptq::GptqParts {
            k,
            n,
            bits: 4,
            group_size: g,
            format: super::gptq::GptqZeros::V2,
            codes: &codes,
            zeros: &zeros,
            scales: &scales,
            g_idx: None,
        }
        .pack()
    }
}

impl GroupTensors for AwqGemm<'_> {
    fn desc(&self) -> GroupQuantized {
        AwqGemm::desc(self)
    }
    fn validate(&self) -> Result<(), GroupError> {
        AwqGemm::validate(self)
    }
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) -> Result<(), GroupError> {
        self.validate()?;
        for_rows(self.n, self.k, start, out, |row, o| {
            self.row_unchecked(row, o)
        })
    }
}

/// `calculate_zeros_width(k, g)` of `gemv.py`: `ceil((k/g)/8)` rounded up to a multiple of 4
/// (g = 32), 2 (g = 64) or 1 (g ≥ 128). `None` for any other group size (upstream raises
/// `NotImplementedError`).
pub fn gemv_zeros_width(k: usize, group_size: usize) -> Option<usize> {
    let m = match group_size {
        32 => 4,
        64 => 2,
        g if g >= 128 => 1,
        _ => return None,
    };
    let base = (k / group_size).div_ceil(8);
    Some(base.div_ceil(m) * m)
}

/// A borrowed AWQ GEMV tensor set (`version: "gemv"`).
#[derive(Clone, Copy, Debug)]
pub struct AwqGemv<'a> {
    /// In features (a multiple of 8).
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// Group size: 32, 64 or ≥ 128, dividing `k`.
    pub group_size: usize,
    /// Bits from the config; AWQ allows only 4.
    pub bits: u32,
    /// `qweight` bytes, I32 `[n, k/8]`.
    pub qweight: &'a [u8],
    /// `qzeros` bytes, I32 `[n, zw]`.
    pub qzeros: &'a [u8],
    /// `scales` bytes, F16 `[n, 8·zw]`.
    pub scales: &'a [u8],
}

impl AwqGemv<'_> {
    /// The common description.
    pub fn desc(&self) -> GroupQuantized {
        GroupQuantized {
            format: GroupFormat::AwqGemv,
            bits: self.bits,
            group_size: self.group_size,
            k: self.k,
            n: self.n,
        }
    }

    fn zw(&self) -> Result<usize, GroupError> {
        let f = GroupFormat::AwqGemv;
        check_group_size(f, self.group_size, self.k, true)?;
        gemv_zeros_width(self.k, self.group_size).ok_or(GroupError::BadGroupSize {
            format: f,
            group_size: self.group_size,
            k: self.k,
            requirement: "GEMV needs 32, 64 or >= 128",
        })
    }

    /// Checks the group size, `k % 8 == 0` and every tensor length.
    pub fn validate(&self) -> Result<(), GroupError> {
        check_bits(GroupFormat::AwqGemv, self.bits)?;
        let zw = self.zw()?;
        if !self.k.is_multiple_of(8) {
            return Err(GroupError::BadDimension {
                format: GroupFormat::AwqGemv,
                dim: "k",
                value: self.k,
                requirement: "must be a multiple of 8",
            });
        }
        expect_len("qweight", self.qweight, mul(&[self.n, self.k / 8, 4]))?;
        expect_len("qzeros", self.qzeros, mul(&[self.n, zw, 4]))?;
        expect_len("scales", self.scales, mul(&[self.n, zw, 8, 2]))?;
        Ok(())
    }

    fn row_unchecked(&self, n: usize, zw: usize, out: &mut [f32]) {
        let kw = self.k / 8;
        for (k, o) in out.iter_mut().enumerate() {
            let gi = k / self.group_size;
            let q = (word(self.qweight, n * kw + k / 8) >> (4 * (k % 8))) & 0xF;
            let z = (word(self.qzeros, n * zw + gi / 8) >> (4 * (gi % 8))) & 0xF;
            *o = (q as f32 - z as f32) * f16_at(self.scales, n * zw * 8 + gi);
        }
    }
}

impl GroupTensors for AwqGemv<'_> {
    fn desc(&self) -> GroupQuantized {
        AwqGemv::desc(self)
    }
    fn validate(&self) -> Result<(), GroupError> {
        AwqGemv::validate(self)
    }
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) -> Result<(), GroupError> {
        self.validate()?;
        let zw = self.zw()?;
        for_rows(self.n, self.k, start, out, |row, o| {
            self.row_unchecked(row, zw, o)
        })
    }
}

/// Unpacked AWQ parameters, all in the `[n][k]` orientation: the writer's input.
#[derive(Clone, Copy, Debug)]
pub struct AwqParts<'a> {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// Group size (divides `k`).
    pub group_size: usize,
    /// Codes `0..=15`, `[n][k]`.
    pub codes: &'a [u8],
    /// Zero points `0..=15`, `[n][k/g]`.
    pub zeros: &'a [u8],
    /// Scales, `[n][k/g]`.
    pub scales: &'a [f16],
}

/// An owned AWQ tensor set (the bytes a safetensors writer stores), with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqTensors {
    /// The layout of the bytes.
    pub format: GroupFormat,
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// Group size.
    pub group_size: usize,
    /// `qweight` bytes (I32, little-endian).
    pub qweight: Vec<u8>,
    /// `qzeros` bytes (I32, little-endian).
    pub qzeros: Vec<u8>,
    /// `scales` bytes (F16, little-endian).
    pub scales: Vec<u8>,
}

impl AwqTensors {
    /// A borrowed GEMM view (meaningful when `format == AwqGemm`).
    pub fn gemm(&self) -> AwqGemm<'_> {
        AwqGemm {
            k: self.k,
            n: self.n,
            group_size: self.group_size,
            bits: 4,
            qweight: &self.qweight,
            qzeros: &self.qzeros,
            scales: &self.scales,
        }
    }

    /// A borrowed GEMV view (meaningful when `format == AwqGemv`).
    pub fn gemv(&self) -> AwqGemv<'_> {
        AwqGemv {
            k: self.k,
            n: self.n,
            group_size: self.group_size,
            bits: 4,
            qweight: &self.qweight,
            qzeros: &self.qzeros,
            scales: &self.scales,
        }
    }
}

impl AwqParts<'_> {
    fn check(&self, format: GroupFormat) -> Result<usize, GroupError> {
        check_group_size(format, self.group_size, self.k, true)?;
        let g = self.k / self.group_size;
        let nk = mul(&[self.n, self.k]);
        if self.codes.len() != nk || nk == usize::MAX {
            return Err(GroupError::Length {
                tensor: "codes",
                expected: nk,
                actual: self.codes.len(),
            });
        }
        let ng = mul(&[self.n, g]);
        for (tensor, len) in [("zeros", self.zeros.len()), ("scales", self.scales.len())] {
            if len != ng {
                return Err(GroupError::Length {
                    tensor,
                    expected: ng,
                    actual: len,
                });
            }
        }
        for (what, buf) in [("codes", self.codes), ("zeros", self.zeros)] {
            if let Some(index) = buf.iter().position(|&v| v > 15) {
                return Err(GroupError::ValueOutOfRange {
                    what,
                    index,
                    value: buf[index] as i64,
                    min: 0,
                    max: 15,
                });
            }
        }
        Ok(g)
    }

    /// Packs into the GEMM layout exactly as `WQLinear_GEMM.from_linear` does (`n % 8 == 0`;
    /// the upstream loop itself additionally needs `n % 32 == 0`).
    pub fn pack_gemm(&self) -> Result<AwqTensors, GroupError> {
        let f = GroupFormat::AwqGemm;
        let g = self.check(f)?;
        if !self.n.is_multiple_of(8) {
            return Err(GroupError::BadDimension {
                format: f,
                dim: "n",
                value: self.n,
                requirement: "must be a multiple of 8",
            });
        }
        let nw = self.n / 8;
        let mut qw = vec![0u32; self.k * nw];
        let mut qz = vec![0u32; g * nw];
        let mut sc = vec![f16::ZERO; g * self.n];
        for n in 0..self.n {
            let (c, shift) = (n / 8, 4 * AWQ_REVERSE_ORDER[n % 8]);
            for k in 0..self.k {
                qw[k * nw + c] |= (self.codes[n * self.k + k] as u32) << shift;
            }
            for j in 0..g {
                qz[j * nw + c] |= (self.zeros[n * g + j] as u32) << shift;
                sc[j * self.n + n] = self.scales[n * g + j];
            }
        }
        Ok(AwqTensors {
            format: f,
            k: self.k,
            n: self.n,
            group_size: self.group_size,
            qweight: words_to_bytes(&qw),
            qzeros: words_to_bytes(&qz),
            scales: f16_to_bytes(&sc),
        })
    }

    /// Packs into the GEMV layout exactly as `WQLinear_GEMV.from_linear` does (`k % 8 == 0`,
    /// group size 32, 64 or ≥ 128; padding fields stay 0).
    pub fn pack_gemv(&self) -> Result<AwqTensors, GroupError> {
        let f = GroupFormat::AwqGemv;
        let g = self.check(f)?;
        let zw = gemv_zeros_width(self.k, self.group_size).ok_or(GroupError::BadGroupSize {
            format: f,
            group_size: self.group_size,
            k: self.k,
            requirement: "GEMV needs 32, 64 or >= 128",
        })?;
        if !self.k.is_multiple_of(8) {
            return Err(GroupError::BadDimension {
                format: f,
                dim: "k",
                value: self.k,
                requirement: "must be a multiple of 8",
            });
        }
        let kw = self.k / 8;
        let mut qw = vec![0u32; self.n * kw];
        let mut qz = vec![0u32; self.n * zw];
        let mut sc = vec![f16::ZERO; self.n * zw * 8];
        for n in 0..self.n {
            for k in 0..self.k {
                qw[n * kw + k / 8] |= (self.codes[n * self.k + k] as u32) << (4 * (k % 8));
            }
            for j in 0..g {
                qz[n * zw + j / 8] |= (self.zeros[n * g + j] as u32) << (4 * (j % 8));
                sc[n * zw * 8 + j] = self.scales[n * g + j];
            }
        }
        Ok(AwqTensors {
            format: f,
            k: self.k,
            n: self.n,
            group_size: self.group_size,
            qweight: words_to_bytes(&qw),
            qzeros: words_to_bytes(&qz),
            scales: f16_to_bytes(&sc),
        })
    }
}

/// Owned unpacked parameters produced by [`quantize_parts`].
#[derive(Clone, Debug, PartialEq)]
pub struct AwqOwnedParts {
    /// Codes `[n][k]`.
    pub codes: Vec<u8>,
    /// Zero points `[n][k/g]`.
    pub zeros: Vec<u8>,
    /// Scales `[n][k/g]`.
    pub scales: Vec<f16>,
}

/// Round-to-nearest AWQ quantization of `weight` (`[n][k]` row-major) into codes, zeros and
/// scales, after `AwqQuantizer.pseudo_quantize_tensor` (zero_point=True, 4-bit):
/// per group of `g` inputs of one output row, `s = f16(max(max − min, 1e-5) / 15)`,
/// `z = clamp(−round(min / s), 0, 15)`, `q = clamp(round(w / s) + z, 0, 15)` (round half to even,
/// as `torch.round`). The scale is rounded to f16 before the codes are computed, which is what
/// `from_linear`'s `round((w + z·s) / s_f16)` yields on an f16 model. One deviation: `min`/`max`
/// are widened to include 0 so the zero point is always representable (AutoAWQ instead clamps
/// `z`, losing the range of all-positive or all-negative groups); for a group holding both
/// signs the result is the same. No activation-aware scale search is done.
pub fn quantize_parts(
    weight: &[f32],
    n: usize,
    k: usize,
    group_size: usize,
) -> Result<AwqOwnedParts, GroupError> {
    check_group_size(GroupFormat::AwqGemm, group_size, k, true)?;
    check_weight(weight, n, k)?;
    let g = k / group_size;
    let mut codes = vec![0u8; n * k];
    let mut zeros = vec![0u8; n * g];
    let mut scales = vec![f16::ZERO; n * g];
    for row in 0..n {
        for j in 0..g {
            let base = row * k + j * group_size;
            let x = &weight[base..base + group_size];
            let (mn, mx) = x
                .iter()
                .fold((0.0f32, 0.0f32), |(a, b), &v| (a.min(v), b.max(v)));
            let s = f16::from_f32((mx - mn).max(1e-5) / 15.0);
            let sf = s.to_f32();
            let z = (-(mn / sf).round_ties_even()).clamp(0.0, 15.0);
            for (i, &v) in x.iter().enumerate() {
                codes[base + i] = ((v / sf).round_ties_even() + z).clamp(0.0, 15.0) as u8;
            }
            zeros[row * g + j] = z as u8;
            scales[row * g + j] = s;
        }
    }
    Ok(AwqOwnedParts {
        codes,
        zeros,
        scales,
    })
}

/// Quantizes `weight` (`[n][k]`) with [`quantize_parts`] and packs it in the GEMM layout.
pub fn quantize(
    weight: &[f32],
    n: usize,
    k: usize,
    group_size: usize,
) -> Result<AwqTensors, GroupError> {
    let p = quantize_parts(weight, n, k, group_size)?;
    AwqParts {
        k,
        n,
        group_size,
        codes: &p.codes,
        zeros: &p.zeros,
        scales: &p.scales,
    }
    .pack_gemm()
}
