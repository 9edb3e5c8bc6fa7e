//! Group-quantized safetensors weight formats: AWQ, GPTQ, EXL2 and compressed-tensors
//! `pack-quantized`.
//!
//! Each format has a borrowed tensor set (the raw little-endian bytes of its tensors as they sit
//! in a safetensors file: [`awq::AwqGemm`], [`awq::AwqGemv`], [`gptq::Gptq`], [`exl2::Exl2`],
//! [`ct::CtPacked`]) with
//!
//! * `validate()`: every length and shape is checked against `(k, n, bits, group_size)` before
//!   any tensor is read; a malformed set is a [`GroupError`], never a panic;
//! * `dequantize_into(out)`: the dense weight as `f32`, **`[n rows][k columns]` row-major**, i.e.
//!   the `nn.Linear.weight` / GGUF `out_features x in_features` orientation (`k` = in features,
//!   `n` = out features);
//! * `dequantize_row(row, out)`: one output row (`out.len() == k`) of that matrix.
//!
//! The same three calls are available through the [`GroupTensors`] trait.
//!
//! Each format also has a writer: an unpacked `*Parts` struct (integer codes in the same
//! `[n][k]` orientation plus per-group parameters) whose `pack()` produces exactly the bytes the
//! published packer produces, and a round-to-nearest `quantize` that builds the parts from an
//! `f32` weight. The layouts, formulas and upstream sources are in `/work/notes/formats-spec.md`
//! sections 1-4; each module names the upstream functions it follows.

use half::{bf16, f16};
use thiserror::Error;

pub mod awq;
pub mod ct;
pub mod exl2;
pub mod gptq;
mod packed;

pub use packed::{ByteView, PackedLinear};

/// Which group-quantized format a tensor set is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupFormat {
    /// AutoAWQ `version: "gemm"`: codes packed along N with the `[0,2,4,6,1,3,5,7]` nibble order.
    AwqGemm,
    /// AutoAWQ `version: "gemv"`: codes packed along K, sequential nibbles, padded zeros/scales.
    AwqGemv,
    /// AutoGPTQ / GPTQModel `qweight`/`qzeros`/`scales`/`g_idx` (v1 or v2 zero convention).
    Gptq,
    /// exllamav2 EXL2: per-group bit widths, 4-bit scale codes, a row permutation.
    Exl2,
    /// compressed-tensors `pack-quantized` (INT weights, group or channel strategy).
    CompressedTensors,
}

/// The common description of a group-quantized linear weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupQuantized {
    /// The format.
    pub format: GroupFormat,
    /// Bits per code. For EXL2 the width varies per group; this is the widest group's.
    pub bits: u32,
    /// Inputs per group (`-1` in a config means `k`). For EXL2 (variable groups) this is the row
    /// count of the first group.
    pub group_size: usize,
    /// In features (the columns of the dequantized `[n][k]` matrix).
    pub k: usize,
    /// Out features (the rows of the dequantized `[n][k]` matrix).
    pub n: usize,
}

/// Why a group-quantized tensor set (or a writer's input) was rejected. Every variant names the
/// tensor or parameter and the numbers involved.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum GroupError {
    /// `bits` is not a width the format allows.
    #[error("{format:?}: {bits}-bit codes are not supported (allowed: {allowed})")]
    UnsupportedBits {
        /// The format.
        format: GroupFormat,
        /// The width asked for.
        bits: u32,
        /// The widths the format allows.
        allowed: &'static str,
    },
    /// The group size is zero, or does not divide `k` where the format needs that.
    #[error("{format:?}: group size {group_size} is invalid for k = {k} ({requirement})")]
    BadGroupSize {
        /// The format.
        format: GroupFormat,
        /// The group size.
        group_size: usize,
        /// The in-feature count.
        k: usize,
        /// What the format requires.
        requirement: &'static str,
    },
    /// A dimension does not meet the format's divisibility or range requirement.
    #[error("{format:?}: {dim} = {value} is invalid ({requirement})")]
    BadDimension {
        /// The format.
        format: GroupFormat,
        /// `"k"` or `"n"` (or another named parameter).
        dim: &'static str,
        /// Its value.
        value: usize,
        /// What the format requires.
        requirement: &'static str,
    },
    /// A tensor's byte length disagrees with the shape implied by the description.
    #[error("tensor {tensor}: {actual} bytes, expected {expected}")]
    Length {
        /// The tensor (or buffer) name.
        tensor: &'static str,
        /// The byte (or element, for `f32`/code buffers) count the description implies
        /// (`usize::MAX` when that count overflows).
        expected: usize,
        /// The count given.
        actual: usize,
    },
    /// A group index (GPTQ `g_idx`, CT `weight_g_idx`) is outside `0..groups`.
    #[error("tensor {tensor}[{index}] = {value} is out of range 0..{groups}")]
    GroupIndexOutOfRange {
        /// The tensor name.
        tensor: &'static str,
        /// The position in the tensor.
        index: usize,
        /// The stored value.
        value: i64,
        /// The group count.
        groups: usize,
    },
    /// A permutation (EXL2 `q_invperm`, an act-order `perm`) is not a permutation of `0..len`.
    #[error(
        "{tensor}[{index}] = {value} breaks the permutation of 0..{len} (out of range or repeated)"
    )]
    NotPermutation {
        /// The tensor or parameter name.
        tensor: &'static str,
        /// The position of the first offending entry.
        index: usize,
        /// Its value.
        value: i64,
        /// The permutation length.
        len: usize,
    },
    /// EXL2 `q_groups` is inconsistent.
    #[error("q_groups group {group}: {problem} (value {value})")]
    BadQGroups {
        /// The group index (pair index in `q_groups`).
        group: usize,
        /// What is wrong.
        problem: &'static str,
        /// The offending number.
        value: i64,
    },
    /// CT `weight_shape` does not hold `[n, k]`.
    #[error("tensor weight_shape = [{rows}, {cols}], expected [{n}, {k}]")]
    WeightShape {
        /// Stored dim 0.
        rows: i64,
        /// Stored dim 1.
        cols: i64,
        /// Expected out features.
        n: usize,
        /// Expected in features.
        k: usize,
    },
    /// A requested output row is `>= n`.
    #[error("row {row} is out of range 0..{n}")]
    RowOutOfRange {
        /// The row asked for.
        row: usize,
        /// The out-feature count.
        n: usize,
    },
    /// An output-row range given to [`PackedLinear::slice_outputs`] is empty, runs past `n`, or
    /// does not fall on the boundaries the format packs its outputs at.
    #[error("{format:?}: output rows {start}..{end} of 0..{n} cannot be sliced ({requirement})")]
    BadSlice {
        /// The format.
        format: GroupFormat,
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// The out-feature count.
        n: usize,
        /// What the range must satisfy.
        requirement: &'static str,
    },
    /// A writer input value is out of the range its field can hold.
    #[error("{what}[{index}] = {value} does not fit (allowed {min}..={max})")]
    ValueOutOfRange {
        /// The input buffer name.
        what: &'static str,
        /// The position in it.
        index: usize,
        /// The value.
        value: i64,
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// A weight given to a quantizer holds NaN or an infinity.
    #[error("weight[{index}] is not finite")]
    NonFinite {
        /// The position of the first non-finite value.
        index: usize,
    },
    /// GPTQ v1 stores `zero - 1` unmasked, so a zero point of 0 overflows into every higher
    /// field of its word (the v1 `sym=False` defect); write `gptq_v2` instead.
    #[error(
        "GPTQ v1 cannot store zero point 0 (group {group}, column {column}); use the v2 format"
    )]
    V1ZeroUnrepresentable {
        /// The group.
        group: usize,
        /// The output column.
        column: usize,
    },
}

/// Uniform access to the borrowed tensor sets of every format.
pub trait GroupTensors {
    /// The common description.
    fn desc(&self) -> GroupQuantized;
    /// Checks every shape and length (and index tensors) against the description.
    fn validate(&self) -> Result<(), GroupError>;
    /// Output rows `start..start + out.len() / k` of the dense weight, row-major: the one
    /// decoding routine of each format (a tile of rows for a matmul). `out.len()` must be a
    /// multiple of `k` and the rows must exist.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) -> Result<(), GroupError>;

    /// The dense weight, `[n][k]` row-major (`out.len() == n * k`).
    fn dequantize_into(&self, out: &mut [f32]) -> Result<(), GroupError> {
        let d = self.desc();
        expect_out(out, mul(&[d.n, d.k]))?;
        self.dequantize_rows(0, out)
    }

    /// Output row `row` of the dense weight (`out.len() == k`).
    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), GroupError> {
        let d = self.desc();
        if row >= d.n {
            return Err(GroupError::RowOutOfRange { row, n: d.n });
        }
        expect_out(out, d.k)?;
        self.dequantize_rows(row, out)
    }
}

/// Runs `row(r, out_r)` for rows `start..` filling `out`, after checking that `out` holds whole
/// rows of `k` values and that the last one is below `n`.
pub(crate) fn for_rows(
    n: usize,
    k: usize,
    start: usize,
    out: &mut [f32],
    mut row: impl FnMut(usize, &mut [f32]),
) -> Result<(), GroupError> {
    if k == 0 {
        // An empty matrix has no values to write.
        return expect_out(out, 0);
    }
    if !out.len().is_multiple_of(k) {
        return Err(GroupError::Length {
            tensor: "out",
            expected: out.len().div_ceil(k) * k,
            actual: out.len(),
        });
    }
    let rows = out.len() / k;
    if start.checked_add(rows).is_none_or(|end| end > n) {
        return Err(GroupError::RowOutOfRange {
            row: start.saturating_add(rows).saturating_sub(1),
            n,
        });
    }
    for (i, o) in out.chunks_exact_mut(k).enumerate() {
        row(start + i, o);
    }
    Ok(())
}

/// `a * b * ...` without overflow; `usize::MAX` stands for "does not fit".
pub(crate) fn mul(parts: &[usize]) -> usize {
    parts
        .iter()
        .try_fold(1usize, |acc, &p| acc.checked_mul(p))
        .unwrap_or(usize::MAX)
}

/// Checks that a tensor has exactly `expected` bytes.
pub(crate) fn expect_len(
    tensor: &'static str,
    bytes: &[u8],
    expected: usize,
) -> Result<(), GroupError> {
    if bytes.len() != expected || expected == usize::MAX {
        return Err(GroupError::Length {
            tensor,
            expected,
            actual: bytes.len(),
        });
    }
    Ok(())
}

/// Checks an output buffer length.
pub(crate) fn expect_out(out: &[f32], expected: usize) -> Result<(), GroupError> {
    if out.len() != expected || expected == usize::MAX {
        return Err(GroupError::Length {
            tensor: "out",
            expected,
            actual: out.len(),
        });
    }
    Ok(())
}

/// Checks a group size: non-zero, and dividing `k` when `divides` is set.
pub(crate) fn check_group_size(
    format: GroupFormat,
    group_size: usize,
    k: usize,
    divides: bool,
) -> Result<(), GroupError> {
    if group_size == 0 {
        return Err(GroupError::BadGroupSize {
            format,
            group_size,
            k,
            requirement: "must be at least 1",
        });
    }
    if divides && !k.is_multiple_of(group_size) {
        return Err(GroupError::BadGroupSize {
            format,
            group_size,
            k,
            requirement: "must divide k",
        });
    }
    Ok(())
}

/// Little-endian 32-bit word `i` of a byte slice (never an unaligned cast).
#[inline]
pub(crate) fn word(bytes: &[u8], i: usize) -> u32 {
    let b = &bytes[4 * i..4 * i + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Little-endian signed 32-bit value `i`.
#[inline]
pub(crate) fn i32_at(bytes: &[u8], i: usize) -> i32 {
    word(bytes, i) as i32
}

/// Little-endian f16 value `i`, widened to f32.
#[inline]
pub(crate) fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// Little-endian bf16 value `i`, widened to f32.
#[inline]
pub(crate) fn bf16_at(bytes: &[u8], i: usize) -> f32 {
    bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// Element `e` (width `b` ≤ 8) of a little-endian bitstream whose word `j` is word
/// `first + j * stride` of `bytes`. Elements may straddle two words.
#[inline]
pub(crate) fn stream_get(bytes: &[u8], first: usize, stride: usize, e: usize, b: u32) -> u32 {
    let p = e * b as usize;
    let j = p / 32;
    let off = (p % 32) as u32;
    let mut v = word(bytes, first + j * stride) >> off;
    if off + b > 32 {
        v |= word(bytes, first + (j + 1) * stride) << (32 - off);
    }
    v & ((1u32 << b) - 1)
}

/// ORs `v` (masked to `b` bits) into element `e` of the bitstream described as in [`stream_get`].
#[inline]
pub(crate) fn stream_put(words: &mut [u32], first: usize, stride: usize, e: usize, b: u32, v: u32) {
    let v = v & ((1u32 << b) - 1);
    let p = e * b as usize;
    let j = p / 32;
    let off = (p % 32) as u32;
    words[first + j * stride] |= v << off;
    if off + b > 32 {
        words[first + (j + 1) * stride] |= v >> (32 - off);
    }
}

/// Words to their little-endian bytes.
pub(crate) fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// f16 values to their little-endian bytes.
pub(crate) fn f16_to_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Checks a quantizer's weight: `n * k` finite values.
pub(crate) fn check_weight(weight: &[f32], n: usize, k: usize) -> Result<(), GroupError> {
    let expected = mul(&[n, k]);
    if weight.len() != expected || expected == usize::MAX {
        return Err(GroupError::Length {
            tensor: "weight",
            expected,
            actual: weight.len(),
        });
    }
    if let Some(index) = weight.iter().position(|x| !x.is_finite()) {
        return Err(GroupError::NonFinite { index });
    }
    Ok(())
}

/// Checks that `perm` is a permutation of `0..len`.
pub(crate) fn check_perm(
    tensor: &'static str,
    len: usize,
    value_at: impl Fn(usize) -> i64,
) -> Result<(), GroupError> {
    let mut seen = vec![false; len];
    for index in 0..len {
        let value = value_at(index);
        if value < 0 || value as u64 >= len as u64 || seen[value as usize] {
            return Err(GroupError::NotPermutation {
                tensor,
                index,
                value,
                len,
            });
        }
        seen[value as usize] = true;
    }
    Ok(())
}
