//! GPTQ (AutoGPTQ layout; v1 and GPTQModel v2 zero conventions), 2/3/4/8-bit.
//!
//! Sources: AutoGPTQ @ 9f7d3707 `auto_gptq/nn_modules/qlinear/qlinear_cuda.py::QuantLinear.pack`
//! (packer, including the 3-bit branch), `qlinear_cuda_old.py::forward` (v1 `zeros + 1` masked),
//! `quantization/quantizer.py::Quantizer.find_params/quantize` (the RTN quantizer),
//! `quantization/gptq.py::GPTQ.fasterquant` (act-order `g_idx`); GPTQModel @ f4c327a1
//! `nn_modules/qlinear/__init__.py::BaseQuantLinear.dequantize_weight` (v2: no `+1`).
//!
//! Tensors: `qweight` I32 `[k·b/32, n]` (codes packed along k), `qzeros` I32 `[G, n·b/32]`
//! (packed along n), `scales` F16 `[G, n]`, `g_idx` I32 `[k]` (optional, default `k / g`), with
//! `G = ceil(k/g)`. Every field is element `e` of a little-endian bitstream (3-bit values
//! straddle words: 32 values per 3 words). Dequantization:
//! `W[n, k] = (q[k, n] − z[g_idx[k], n]) · s[g_idx[k], n]` with `z = (stored + 1) & (2^b − 1)`
//! for v1 and `z = stored` for v2. `qweight` rows stay in the original input order; only
//! `g_idx` carries an act-order permutation.

use half::f16;

use super::{
    GroupError, GroupFormat, GroupQuantized, GroupTensors, check_group_size, check_perm,
    check_weight, expect_len, f16_at, f16_to_bytes, for_rows, i32_at, mul, stream_get, stream_put,
    words_to_bytes,
};

const BITS_ALLOWED: &str = "2, 3, 4, 8";

/// The zero-point convention (`checkpoint_format` / `format` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptqZeros {
    /// `"gptq"` (the default when absent): stored `z − 1`, read back as `(stored + 1) & mask`.
    V1,
    /// `"gptq_v2"`: stored `z`.
    V2,
}

fn check_bits(bits: u32) -> Result<(), GroupError> {
    if !matches!(bits, 2 | 3 | 4 | 8) {
        return Err(GroupError::UnsupportedBits {
            format: GroupFormat::Gptq,
            bits,
            allowed: BITS_ALLOWED,
        });
    }
    Ok(())
}

/// Checks `dim · bits % 32 == 0` (whole words; for 3-bit this is `dim % 32 == 0`).
fn check_packed_dim(dim: &'static str, value: usize, bits: u32) -> Result<(), GroupError> {
    // `value * bits` is used as a length: it must not overflow either.
    let fits = value.checked_mul(bits as usize).is_some();
    if !fits || !(value as u128 * bits as u128).is_multiple_of(32) {
        return Err(GroupError::BadDimension {
            format: GroupFormat::Gptq,
            dim,
            value,
            requirement: "dim * bits must be a multiple of 32 (dim % 32 == 0 for 3-bit)",
        });
    }
    Ok(())
}

/// A borrowed GPTQ tensor set.
#[derive(Clone, Copy, Debug)]
pub struct Gptq<'a> {
    /// In features (`k·bits` a multiple of 32).
    pub k: usize,
    /// Out features (`n·bits` a multiple of 32).
    pub n: usize,
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Group size (`-1` in the config means `k`); `G = ceil(k/g)`.
    pub group_size: usize,
    /// The zero-point convention.
    pub zeros: GptqZeros,
    /// `qweight` bytes, I32 `[k·b/32, n]`.
    pub qweight: &'a [u8],
    /// `qzeros` bytes, I32 `[G, n·b/32]`.
    pub qzeros: &'a [u8],
    /// `scales` bytes, F16 `[G, n]`.
    pub scales: &'a [u8],
    /// `g_idx` bytes, I32 `[k]`; `None` means `g_idx[k] = k / g`.
    pub g_idx: Option<&'a [u8]>,
}

impl Gptq<'_> {
    /// The common description.
    pub fn desc(&self) -> GroupQuantized {
        GroupQuantized {
            format: GroupFormat::Gptq,
            bits: self.bits,
            group_size: self.group_size,
            k: self.k,
            n: self.n,
        }
    }

    fn groups(&self) -> usize {
        self.k.div_ceil(self.group_size)
    }

    /// Checks bits, group size, packed dimensions, every tensor length and every `g_idx` entry.
    pub fn validate(&self) -> Result<(), GroupError> {
        check_bits(self.bits)?;
        check_group_size(GroupFormat::Gptq, self.group_size, self.k, false)?;
        check_packed_dim("k", self.k, self.bits)?;
        check_packed_dim("n", self.n, self.bits)?;
        let b = self.bits as usize;
        let g = self.groups();
        expect_len("qweight", self.qweight, mul(&[self.k * b / 32, self.n, 4]))?;
        expect_len("qzeros", self.qzeros, mul(&[g, self.n * b / 32, 4]))?;
        expect_len("scales", self.scales, mul(&[g, self.n, 2]))?;
        if let Some(gi) = self.g_idx {
            expect_len("g_idx", gi, mul(&[self.k, 4]))?;
            for index in 0..self.k {
                let value = i32_at(gi, index);
                if value < 0 || value as usize >= g {
                    return Err(GroupError::GroupIndexOutOfRange {
                        tensor: "g_idx",
                        index,
                        value: value as i64,
                        groups: g,
                    });
                }
            }
        }
        Ok(())
    }

    fn row_unchecked(&self, n: usize, out: &mut [f32]) {
        let b = self.bits;
        let mask = (1u32 << b) - 1;
        let zw = self.n * b as usize / 32;
        for (k, o) in out.iter_mut().enumerate() {
            let gi = match self.g_idx {
                Some(g) => i32_at(g, k) as usize,
                None => k / self.group_size,
            };
            let q = stream_get(self.qweight, n, self.n, k, b);
            let zs = stream_get(self.qzeros, gi * zw, 1, n, b);
            let z = match self.zeros {
                GptqZeros::V1 => (zs + 1) & mask,
                GptqZeros::V2 => zs,
            };
            *o = (q as f32 - z as f32) * f16_at(self.scales, gi * self.n + n);
        }
    }
}

impl GroupTensors for Gptq<'_> {
    fn desc(&self) -> GroupQuantized {
        Gptq::desc(self)
    }
    fn validate(&self) -> Result<(), GroupError> {
        Gptq::validate(self)
    }
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) -> Result<(), GroupError> {
        self.validate()?;
        for_rows(self.n, self.k, start, out, |row, o| {
            self.row_unchecked(row, o)
        })
    }
}

/// Unpacked GPTQ parameters in the `[n][k]` orientation: the writer's input.
#[derive(Clone, Copy, Debug)]
pub struct GptqParts<'a> {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// Bits: 2, 3, 4 or 8.
    pub bits: u32,
    /// Group size; `G = ceil(k/g)`.
    pub group_size: usize,
    /// Zero convention to write.
    pub format: GptqZeros,
    /// Codes `0..2^b`, `[n][k]`.
    pub codes: &'a [u8],
    /// True zero points `0..2^b`, `[n][G]` (v1 cannot store 0).
    pub zeros: &'a [u8],
    /// Scales `[n][G]`.
    pub scales: &'a [f16],
    /// The group of each input (`[k]`, values `< G`); `None` means `k / g`.
    pub g_idx: Option<&'a [u32]>,
}

/// An owned GPTQ tensor set with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqTensors {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// Bits.
    pub bits: u32,
    /// Group size.
    pub group_size: usize,
    /// Zero convention of `qzeros` (write `checkpoint_format` `"gptq"` for V1, `"gptq_v2"` for V2).
    pub format: GptqZeros,
    /// `qweight` bytes (I32).
    pub qweight: Vec<u8>,
    /// `qzeros` bytes (I32).
    pub qzeros: Vec<u8>,
    /// `scales` bytes (F16).
    pub scales: Vec<u8>,
    /// `g_idx` bytes (I32, always written, as AutoGPTQ does).
    pub g_idx: Vec<u8>,
}

impl GptqTensors {
    /// A borrowed view.
    pub fn view(&self) -> Gptq<'_> {
        Gptq {
            k: self.k,
            n: self.n,
            bits: self.bits,
            group_size: self.group_size,
            zeros: self.format,
            qweight: &self.qweight,
            qzeros: &self.qzeros,
            scales: &self.scales,
            g_idx: Some(&self.g_idx),
        }
    }
}

impl GptqParts<'_> {
    /// Packs exactly as `QuantLinear.pack` does (v1: stores `z − 1`; a zero point of 0 is
    /// rejected with [`GroupError::V1ZeroUnrepresentable`] instead of clobbering the word).
    pub fn pack(&self) -> Result<GptqTensors, GroupError> {
        check_bits(self.bits)?;
        check_group_size(GroupFormat::Gptq, self.group_size, self.k, false)?;
        check_packed_dim("k", self.k, self.bits)?;
        check_packed_dim("n", self.n, self.bits)?;
        let (b, k, n) = (self.bits, self.k, self.n);
        let g = k.div_ceil(self.group_size);
        let max = (1u32 << b) - 1;
        let lens = [
            ("codes", self.codes.len(), mul(&[n, k])),
            ("zeros", self.zeros.len(), mul(&[n, g])),
            ("scales", self.scales.len(), mul(&[n, g])),
            ("g_idx", self.g_idx.map_or(k, |x| x.len()), k),
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
        for (what, buf) in [("codes", self.codes), ("zeros", self.zeros)] {
            if let Some(index) = buf.iter().position(|&v| v as u32 > max) {
                return Err(GroupError::ValueOutOfRange {
                    what,
                    index,
                    value: buf[index] as i64,
                    min: 0,
                    max: max as i64,
                });
            }
        }
        if let Some(gi) = self.g_idx
            && let Some(index) = gi.iter().position(|&v| v as usize >= g)
        {
            return Err(GroupError::GroupIndexOutOfRange {
                tensor: "g_idx",
                index,
                value: gi[index] as i64,
                groups: g,
            });
        }
        let zw = n * b as usize / 32;
        let mut qw = vec![0u32; k * b as usize / 32 * n];
        let mut qz = vec![0u32; g * zw];
        let mut sc = vec![f16::ZERO; g * n];
        for row in 0..n {
            for kk in 0..k {
                stream_put(&mut qw, row, n, kk, b, self.codes[row * k + kk] as u32);
            }
            for j in 0..g {
                let z = self.zeros[row * g + j] as u32;
                let stored = match self.format {
                    GptqZeros::V2 => z,
                    GptqZeros::V1 if z == 0 => {
                        return Err(GroupError::V1ZeroUnrepresentable {
                            group: j,
                            column: row,
                        });
                    }
                    GptqZeros::V1 => z - 1,
                };
                stream_put(&mut qz, j * zw, 1, row, b, stored);
                sc[j * n + row] = self.scales[row * g + j];
            }
        }
        let g_idx: Vec<u8> = (0..k)
            .flat_map(|kk| {
                let v = self.g_idx.map_or(kk / self.group_size, |x| x[kk] as usize);
                (v as i32).to_le_bytes()
            })
            .collect();
        Ok(GptqTensors {
            k,
            n,
            bits: b,
            group_size: self.group_size,
            format: self.format,
            qweight: words_to_bytes(&qw),
            qzeros: words_to_bytes(&qz),
            scales: f16_to_bytes(&sc),
            g_idx,
        })
    }
}

/// Options of [`quantize`].
#[derive(Clone, Copy, Debug)]
pub struct GptqOptions<'a> {
    /// Bits: 2, 3, 4 or 8.
    pub bits: u32,
    /// Group size (`G = ceil(k/g)`).
    pub group_size: usize,
    /// Act-order: the order in which inputs are quantized (`perm`, a permutation of `0..k`,
    /// e.g. `argsort(diag(H), descending)`). Group `j` is the inputs `perm[j·g .. (j+1)·g]`
    /// and `g_idx[perm[i]] = i / g`. `None`: groups of consecutive inputs.
    pub act_order: Option<&'a [u32]>,
    /// Symmetric (`zero = 2^(b−1)`).
    pub sym: bool,
    /// Zero convention to write. V1 with `sym = false` fails if any zero point is 0.
    pub format: GptqZeros,
}

/// Owned unpacked parameters produced by [`quantize_parts`].
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOwnedParts {
    /// Codes `[n][k]`.
    pub codes: Vec<u8>,
    /// True zero points `[n][G]`.
    pub zeros: Vec<u8>,
    /// Scales `[n][G]`.
    pub scales: Vec<f16>,
    /// `g_idx`, `[k]`.
    pub g_idx: Vec<u32>,
}

/// Round-to-nearest GPTQ quantization (no Hessian error feedback) of `weight` (`[n][k]`),
/// after `Quantizer.find_params/quantize`: per group and output row, `xmin = min(min, 0)`,
/// `xmax = max(max, 0)` (both 0 → −1, +1); sym: `xmax = max(|xmin|, xmax)`, `xmin = −xmax`;
/// `scale = f16((xmax − xmin) / maxq)`; `zero = 2^(b−1)` (sym) or
/// `round(−xmin / scale)`; `q = clamp(round(x / scale) + zero, 0, maxq)` (round half to even).
/// The scale is rounded to f16 before the codes are computed, as `pack` recomputes them.
/// One deviation: for sym, upstream sets `xmin = −xmax` only when `xmin < 0`, so a group with
/// no negative value gets half the range and clips its top half; here the range is always
/// `[−xmax, xmax]` (identical whenever the group has a negative value).
pub fn quantize_parts(
    weight: &[f32],
    n: usize,
    k: usize,
    opts: &GptqOptions<'_>,
) -> Result<GptqOwnedParts, GroupError> {
    check_bits(opts.bits)?;
    check_group_size(GroupFormat::Gptq, opts.group_size, k, false)?;
    check_weight(weight, n, k)?;
    let gs = opts.group_size;
    let g = k.div_ceil(gs);
    let order: Vec<u32> = match opts.act_order {
        Some(p) => {
            if p.len() != k {
                return Err(GroupError::Length {
                    tensor: "act_order",
                    expected: k,
                    actual: p.len(),
                });
            }
            check_perm("act_order", k, |i| p[i] as i64)?;
            p.to_vec()
        }
        None => (0..k as u32).collect(),
    };
    let mut g_idx = vec![0u32; k];
    for (i, &col) in order.iter().enumerate() {
        g_idx[col as usize] = (i / gs) as u32;
    }
    let maxq = ((1u32 << opts.bits) - 1) as f32;
    let mut codes = vec![0u8; n * k];
    let mut zeros = vec![0u8; n * g];
    let mut scales = vec![f16::ZERO; n * g];
    for row in 0..n {
        let w = &weight[row * k..(row + 1) * k];
        for j in 0..g {
            let members = &order[j * gs..((j + 1) * gs).min(k)];
            let (mut xmin, mut xmax) = members.iter().fold((0.0f32, 0.0f32), |(a, b), &c| {
                (a.min(w[c as usize]), b.max(w[c as usize]))
            });
            if opts.sym {
                xmax = xmax.max(xmin.abs());
                xmin = -xmax;
            }
            if xmin == 0.0 && xmax == 0.0 {
                xmin = -1.0;
                xmax = 1.0;
            }
            let s = f16::from_f32((xmax - xmin) / maxq);
            let sf = s.to_f32();
            let zero = if opts.sym {
                (maxq + 1.0) / 2.0
            } else {
                (-xmin / sf).round_ties_even().clamp(0.0, maxq)
            };
            for &c in members {
                let c = c as usize;
                codes[row * k + c] = ((w[c] / sf).round_ties_even() + zero).clamp(0.0, maxq) as u8;
            }
            zeros[row * g + j] = zero as u8;
            scales[row * g + j] = s;
        }
    }
    Ok(GptqOwnedParts {
        codes,
        zeros,
        scales,
        g_idx,
    })
}

/// Quantizes `weight` (`[n][k]`) with [`quantize_parts`] and packs it.
pub fn quantize(
    weight: &[f32],
    n: usize,
    k: usize,
    opts: &GptqOptions<'_>,
) -> Result<GptqTensors, GroupError> {
    let p = quantize_parts(weight, n, k, opts)?;
    GptqParts {
        k,
        n,
        bits: opts.bits,
        group_size: opts.group_size,
        format: opts.format,
        codes: &p.codes,
        zeros: &p.zeros,
        scales: &p.scales,
        g_idx: Some(&p.g_idx),
    }
    .pack()
}
