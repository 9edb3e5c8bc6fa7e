//! Owned group-quantized weights: the tensor sets of [`super`] with their bytes shared rather
//! than borrowed, so that a loaded model can keep them where they lie (a memory map) for as
//! long as it runs.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::awq::{AwqGemm, AwqGemv};
use super::ct::{CtPacked, ScaleDtype};
use super::exl2::Exl2;
use super::gptq::{Gptq, GptqZeros};
use super::{GroupError, GroupQuantized, GroupTensors};

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
