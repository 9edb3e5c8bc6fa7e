//! Owned group-quantized weights: the tensor sets of [`super`] with their bytes shared rather
//! than borrowed, so that a loaded model can keep them where they lie (a memory map) for as
//! long as it runs.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::awq::{self, AwqGemm, AwqGemv};
use super::ct::{self, CtPacked, CtPacking, ScaleDtype};
use super::exl2::{Exl2, padded_n};
use super::gptq::{Gptq, GptqZeros};
use super::{GroupError, GroupFormat, GroupQuantized, GroupTensors};

/// A byte range of a shared buffer (a memory-mapped file, or a `Vec`): cloning shares it.
#[derive(Clone)]
pub struct ByteView {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl ByteView {
    /// `range` of `owner`, or `None` when the range is not inside it.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(Self { owner, range })
    }

    /// Owns `bytes` (tests and weights made in memory).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            owner: Arc::new(bytes),
            range,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    /// `range` of these bytes (relative to this view) as a view of the same owner, sharing it
    /// (no copy); `None` when the range is not inside this view.
    pub fn slice(&self, range: Range<usize>) -> Option<ByteView> {
        if range.start > range.end || range.end > self.range.len() {
            return None;
        }
        Some(Self {
            owner: Arc::clone(&self.owner),
            range: self.range.start + range.start..self.range.start + range.end,
        })
    }
}

/// `range` of `src` as a zero-copy view (the range is always inside a validated tensor; a
/// length error otherwise).
fn narrow(
    tensor: &'static str,
    src: &ByteView,
    range: Range<usize>,
) -> Result<ByteView, GroupError> {
    let actual = src.as_slice().len();
    src.slice(range.clone()).ok_or(GroupError::Length {
        tensor,
        expected: range.end,
        actual,
    })
}

/// Bytes `cols` of every `row_bytes`-byte row of `src`, copied into a new buffer: a column range
/// of a row-major tensor.
fn copy_columns(
    tensor: &'static str,
    src: &ByteView,
    row_bytes: usize,
    cols: Range<usize>,
) -> Result<ByteView, GroupError> {
    let bytes = src.as_slice();
    let rows = bytes.len().checked_div(row_bytes).unwrap_or(0);
    if rows * row_bytes != bytes.len() || cols.start > cols.end || cols.end > row_bytes {
        return Err(GroupError::Length {
            tensor,
            expected: rows.saturating_mul(row_bytes),
            actual: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(rows * cols.len());
    for row in bytes.chunks_exact(row_bytes.max(1)).take(rows) {
        out.extend_from_slice(&row[cols.clone()]);
    }
    Ok(ByteView::from_vec(out))
}

impl AsRef<[u8]> for ByteView {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for ByteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteView({} bytes)", self.range.len())
    }
}

/// A group-quantized linear weight whose tensors are [`ByteView`]s: the owned counterpart of
/// the borrowed sets ([`AwqGemm`], [`AwqGemv`], [`Gptq`], [`Exl2`], [`CtPacked`]), with the
/// same fields. Build it with [`PackedLinear::new`], which validates it once;
/// [`view`](Self::view) then lends the borrowed set.
#[derive(Clone, Debug)]
pub enum PackedLinear {
    /// AutoAWQ GEMM.
    AwqGemm {
        /// In features.
        k: usize,
        /// Out features.
        n: usize,
        /// Inputs per group.
        group_size: usize,
        /// Bits per code (4).
        bits: u32,
        /// `qweight` I32 `[k, n/8]`.
        qweight: ByteView,
        /// `qzeros` I32 `[k/g, n/8]`.
        qzeros: ByteView,
        /// `scales` F16 `[k/g, n]`.
        scales: ByteView,
    },
    /// AutoAWQ GEMV.
    AwqGemv {
        /// In features.
        k: usize,
        /// Out features.
        n: usize,
        /// Inputs per group.
        group_size: usize,
        /// Bits per code (4).
        bits: u32,
        /// `qweight` I32 `[n, k/8]`.
        qweight: ByteView,
        /// `qzeros`, padded.
        qzeros: ByteView,
        /// `scales`, padded.
        scales: ByteView,
    },
    /// GPTQ (v1 or v2 zeros, optional act-order `g_idx`).
    Gptq {
        /// In features.
        k: usize,
        /// Out features.
        n: usize,
        /// Bits per code.
        bits: u32,
        /// Inputs per group.
        group_size: usize,
        /// The zero-point convention.
        zeros: GptqZeros,
        /// `qweight` I32 `[k·b/32, n]`.
        qweight: ByteView,
        /// `qzeros` I32 `[G, n·b/32]`.
        qzeros: ByteView,
        /// `scales` F16 `[G, n]`.
        scales: ByteView,
        /// `g_idx` I32 `[k]`.
        g_idx: Option<ByteView>,
    },
    /// exllamav2 EXL2.
    Exl2 {
        /// In features.
        k: usize,
        /// Out features.
        n: usize,
        /// `q_weight` I32 bit streams.
        q_weight: ByteView,
        /// `q_scale` 4-bit codes.
        q_scale: ByteView,
        /// `q_scale_max` F16 per group.
        q_scale_max: ByteView,
        /// `q_groups` I16 pairs.
        q_groups: ByteView,
        /// `q_invperm` I32 `[k]`.
        q_invperm: ByteView,
    },
    /// compressed-tensors `pack-quantized`.
    Ct {
        /// In features.
        k: usize,
        /// Out features.
        n: usize,
        /// Bits per code.
        bits: u32,
        /// Inputs per group (`k` for the channel strategy).
        group_size: usize,
        /// The scales' dtype.
        scale_dtype: ScaleDtype,
        /// `weight_packed` I32 `[n, k·b/32]`.
        weight_packed: ByteView,
        /// `weight_scale` `[n, G]`.
        weight_scale: ByteView,
        /// `weight_shape` `[2]`.
        weight_shape: ByteView,
        /// `weight_zero_point`, packed.
        weight_zero_point: Option<ByteView>,
        /// `weight_g_idx` I32 `[k]`.
        weight_g_idx: Option<ByteView>,
    },
}

impl PackedLinear {
    /// Validates the set once (every length, index and permutation), so that later row
    /// decoding cannot fail on malformed bytes.
    ///
    /// An empty matrix (`k` or `n` zero) is refused too: every tensor length then checks out
    /// at zero bytes whatever the other dimension says, and a kernel planning `k` inputs would
    /// allocate by a number no byte of the file bounds.
    pub fn new(weight: PackedLinear) -> Result<Self, GroupError> {
        let view = weight.view();
        view.validate()?;
        let d = view.desc();
        for (dim, value) in [("k", d.k), ("n", d.n)] {
            if value == 0 {
                return Err(GroupError::BadDimension {
                    format: d.format,
                    dim,
                    value,
                    requirement: "must be at least 1",
                });
            }
        }
        drop(view);
        Ok(weight)
    }

    /// The borrowed tensor set over these bytes.
    pub fn view(&self) -> Box<dyn GroupTensors + Send + Sync + '_> {
        match self {
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
        }
    }

    /// Output rows `rows` (a range of `0..n`) of this weight as a weight of its own: one part of
    /// a fused layer (Phi-3's `qkv_proj` = Q, K, V rows; `gate_up_proj` = gate, up rows). The
    /// result dequantizes to exactly rows `rows` of this weight's dequantization (the same f32
    /// bits) and is validated as [`PackedLinear::new`] does.
    ///
    /// Tensors whose output rows are contiguous bytes (AWQ GEMV `qweight`/`qzeros`/`scales`;
    /// compressed-tensors `weight_packed`, `weight_scale` and `weight_zero_point`, whose word
    /// rows run along `n`) become narrowed views of the same buffer (no copy); tensors holding
    /// outputs as columns (GPTQ, AWQ GEMM, EXL2 `q_weight`/`q_scale`) have each row's column
    /// range copied; tensors independent of `n` (`g_idx`, `q_invperm`, `q_groups`,
    /// `q_scale_max`, `weight_g_idx`) are shared as they are. compressed-tensors `weight_shape`
    /// is rewritten with the new `n` in its own dtype (I64 or I32). EXL2 tensors hold
    /// `padded_n(len)` columns: source columns `start..start + padded_n(len)`.
    ///
    /// Alignment: formats that pack several outputs into one word (AWQ GEMM, GPTQ, EXL2, and
    /// compressed-tensors with a zero point) can only be cut at word boundaries, so
    /// `rows.start` must be a multiple of 32 and `rows.len()` a multiple of 32 unless the range
    /// ends at `n` (then any length: the packed tail is the source's own). compressed-tensors
    /// zero points in the legacy packing (`32 / bits` codes per word, 3/5/6/7 bits) also need
    /// `rows.start` to be a multiple of `32 / bits`, and a tail (`rows.end == n`, length not a
    /// multiple of 32) whose packed width would read as the dense packing is refused. AWQ GEMV
    /// and symmetric compressed-tensors take any range.
    ///
    /// An empty range, `rows.end > n` or a misaligned range is [`GroupError::BadSlice`]; a
    /// malformed `self` is the error its validation gives. Nothing is allocated before the
    /// range is checked against `n` and `self` is validated.
    pub fn slice_outputs(&self, rows: Range<usize>) -> Result<PackedLinear, GroupError> {
        let (format, n) = match self {
            PackedLinear::AwqGemm { n, .. } => (GroupFormat::AwqGemm, *n),
            PackedLinear::AwqGemv { n, .. } => (GroupFormat::AwqGemv, *n),
            PackedLinear::Gptq { n, .. } => (GroupFormat::Gptq, *n),
            PackedLinear::Exl2 { n, .. } => (GroupFormat::Exl2, *n),
            PackedLinear::Ct { n, .. } => (GroupFormat::CompressedTensors, *n),
        };
        let (start, end) = (rows.start, rows.end);
        let bad = |requirement| GroupError::BadSlice {
            format,
            start,
            end,
            n,
            requirement,
        };
        if start >= end {
            return Err(bad("the range must not be empty"));
        }
        if end > n {
            return Err(bad("the range must end at or before n"));
        }
        self.view().validate()?;
        let len = end - start;
        // Outputs packed into words: cut at multiples of 32, or keep the source's own tail.
        let word_aligned = || {
            if !start.is_multiple_of(32) {
                Err(bad(
                    "start must be a multiple of 32 (outputs packed into words)",
                ))
            } else if !len.is_multiple_of(32) && end != n {
                Err(bad(
                    "length must be a multiple of 32 unless the range ends at n",
                ))
            } else {
                Ok(())
            }
        };
        let sliced = match self {
            PackedLinear::AwqGemm {
                k,
                n,
                group_size,
                bits,
                qweight,
                qzeros,
                scales,
            } => {
                word_aligned()?;
                // 8 columns per word.
                let (row, cols) = (n / 8 * 4, start / 2..end / 2);
                PackedLinear::AwqGemm {
                    k: *k,
                    n: len,
                    group_size: *group_size,
                    bits: *bits,
                    qweight: copy_columns("qweight", qweight, row, cols.clone())?,
                    qzeros: copy_columns("qzeros", qzeros, row, cols)?,
                    scales: copy_columns("scales", scales, n * 2, 2 * start..2 * end)?,
                }
            }
            PackedLinear::AwqGemv {
                k,
                n: _,
                group_size,
                bits,
                qweight,
                qzeros,
                scales,
            } => {
                let zw =
                    awq::gemv_zeros_width(*k, *group_size).ok_or(GroupError::BadGroupSize {
                        format,
                        group_size: *group_size,
                        k: *k,
                        requirement: "GEMV needs 32, 64 or >= 128",
                    })?;
                // Row bytes: qweight k/8 words, qzeros zw words, scales 8·zw f16.
                let (qw, qz, sc) = (k / 8 * 4, zw * 4, zw * 16);
                PackedLinear::AwqGemv {
                    k: *k,
                    n: len,
                    group_size: *group_size,
                    bits: *bits,
                    qweight: narrow("qweight", qweight, start * qw..end * qw)?,
                    qzeros: narrow("qzeros", qzeros, start * qz..end * qz)?,
                    scales: narrow("scales", scales, start * sc..end * sc)?,
                }
            }
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
            } => {
                word_aligned()?;
                let b = *bits as usize;
                // qzeros rows: n·b/32 words, column c at bit c·b (start·b and end·b are whole
                // words: start % 32 == 0, and end is n or start + 32·m).
                PackedLinear::Gptq {
                    k: *k,
                    n: len,
                    bits: *bits,
                    group_size: *group_size,
                    zeros: *zeros,
                    qweight: copy_columns("qweight", qweight, n * 4, 4 * start..4 * end)?,
                    qzeros: copy_columns("qzeros", qzeros, n * b / 8, start * b / 8..end * b / 8)?,
                    scales: copy_columns("scales", scales, n * 2, 2 * start..2 * end)?,
                    g_idx: g_idx.clone(),
                }
            }
            PackedLinear::Exl2 {
                k,
                n,
                q_weight,
                q_scale,
                q_scale_max,
                q_groups,
                q_invperm,
            } => {
                word_aligned()?;
                // start % 32 == 0, so start + padded_n(len) = padded_n(end) <= padded_n(n).
                let (np, cols) = (padded_n(*n), start..start + padded_n(len));
                PackedLinear::Exl2 {
                    k: *k,
                    n: len,
                    q_weight: copy_columns(
                        "q_weight",
                        q_weight,
                        np * 4,
                        4 * cols.start..4 * cols.end,
                    )?,
                    // 8 four-bit codes per word.
                    q_scale: copy_columns(
                        "q_scale",
                        q_scale,
                        np / 2,
                        cols.start / 2..cols.end / 2,
                    )?,
                    q_scale_max: q_scale_max.clone(),
                    q_groups: q_groups.clone(),
                    q_invperm: q_invperm.clone(),
                }
            }
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
            } => {
                let (b, g) = (*bits, k.div_ceil(*group_size));
                let weight_zero_point = match weight_zero_point {
                    None => None,
                    Some(zp) => {
                        word_aligned()?;
                        // `[words along n, G]`: a range of word rows is contiguous.
                        let bytes = zp.as_slice().len();
                        let rows = match ct::detect("weight_zero_point", bytes, g, *n, b)? {
                            CtPacking::Dense => {
                                let w0 = start * b as usize / 32;
                                w0..w0 + ct::dense_words(len, b)
                            }
                            CtPacking::Legacy => {
                                let per_word = 32 / b as usize;
                                if !start.is_multiple_of(per_word) {
                                    return Err(bad(
                                        "legacy zero points: start must also be a multiple of 32 / bits",
                                    ));
                                }
                                if ct::dense_words(len, b) == ct::legacy_words(len, b) {
                                    return Err(bad(
                                        "legacy zero points: this tail would read as dense; use a multiple of 32",
                                    ));
                                }
                                let w0 = start / per_word;
                                w0..w0 + ct::legacy_words(len, b)
                            }
                        };
                        let row = g * 4;
                        Some(narrow(
                            "weight_zero_point",
                            zp,
                            rows.start * row..rows.end * row,
                        )?)
                    }
                };
                let packed_row = weight_packed.as_slice().len() / n;
                let scale_row = g * scale_dtype.size();
                let shape = match weight_shape.as_slice().len() {
                    16 => [len as i64, *k as i64]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                    _ => [len as i32, *k as i32]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                };
                PackedLinear::Ct {
                    k: *k,
                    n: len,
                    bits: b,
                    group_size: *group_size,
                    scale_dtype: *scale_dtype,
                    weight_packed: narrow(
                        "weight_packed",
                        weight_packed,
                        start * packed_row..end * packed_row,
                    )?,
                    weight_scale: narrow(
                        "weight_scale",
                        weight_scale,
                        start * scale_row..end * scale_row,
                    )?,
                    weight_shape: ByteView::from_vec(shape),
                    weight_zero_point,
                    weight_g_idx: weight_g_idx.clone(),
                }
            }
        };
        PackedLinear::new(sliced)
    }

    /// The common description (format, bits, group size, `k`, `n`).
    pub fn desc(&self) -> GroupQuantized {
        self.view().desc()
    }

    /// Bytes held by the packed tensors (what the weight costs in memory).
    pub fn packed_bytes(&self) -> usize {
        let len = |v: &ByteView| v.as_slice().len();
        let opt = |v: &Option<ByteView>| v.as_ref().map_or(0, len);
        match self {
            PackedLinear::AwqGemm {
                qweight,
                qzeros,
                scales,
                ..
            }
            | PackedLinear::AwqGemv {
                qweight,
                qzeros,
                scales,
                ..
            } => len(qweight) + len(qzeros) + len(scales),
            PackedLinear::Gptq {
                qweight,
                qzeros,
                scales,
                g_idx,
                ..
            } => len(qweight) + len(qzeros) + len(scales) + opt(g_idx),
            PackedLinear::Exl2 {
                q_weight,
                q_scale,
                q_scale_max,
                q_groups,
                q_invperm,
                ..
            } => len(q_weight) + len(q_scale) + len(q_scale_max) + len(q_groups) + len(q_invperm),
            PackedLinear::Ct {
                weight_packed,
                weight_scale,
                weight_shape,
                weight_zero_point,
                weight_g_idx,
                ..
            } => {
                len(weight_packed)
                    + len(weight_scale)
                    + len(weight_shape)
                    + opt(weight_zero_point)
                    + opt(weight_g_idx)
            }
        }
    }
}
