//! A quantized weight matrix that stays in its GGUF blocks (usually inside a memory map).

use std::fmt;
use std::sync::Arc;

use ember_quant::GgmlType;
use ember_quant::group::{GroupError, GroupQuantized, PackedLinear};
use rayon::prelude::*;

use crate::cpu::group::PackedWeight;

/// A byte range inside a shared, immutable buffer (a memory-mapped file, or a `Vec<u8>`).
///
/// Cloning is an `Arc` increment: weights are never copied out of the mapping.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// A view of `owner[start..start + len]`, or `None` if that range is outside the buffer.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Option<Self> {
        let end = start.checked_add(len)?;
        if end > owner.as_ref().as_ref().len() {
            return None;
        }
        Some(Self { owner, start, len })
    }

    /// Wraps an owned buffer (tests, weights made at run time).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    /// The bytes of the range.
    pub fn as_slice(&self) -> &[u8] {
        &self.owner.as_ref().as_ref()[self.start..self.start + self.len]
    }

    /// Bytes in the range.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len)
    }
}

/// Why a [`QuantMatrix`] could not be made or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantMatrixError {
    /// A row is not a whole number of blocks.
    #[error("row length {cols} is not a multiple of the {ty} block size {block}")]
    PartialBlock {
        /// The matrix's type.
        ty: GgmlType,
        /// The requested row length in values.
        cols: usize,
        /// Values per block of `ty`.
        block: usize,
    },
    /// The buffer does not hold exactly `rows x cols` values of the type.
    #[error("{ty} matrix {rows}x{cols} needs {expected} bytes, got {got}")]
    WrongSize {
        /// The matrix's type.
        ty: GgmlType,
        /// The requested rows.
        rows: usize,
        /// The requested columns.
        cols: usize,
        /// Bytes such a matrix takes (`usize::MAX` if that overflows).
        expected: usize,
        /// Bytes the buffer has.
        got: usize,
    },
    /// ember-quant cannot dequantize (or quantize) this type.
    #[error("type {0} cannot be dequantized yet")]
    Unsupported(GgmlType),
    /// A group-quantized weight ([`QuantMatrix::packed`]) failed validation.
    #[error("packed weight: {0}")]
    Packed(#[from] GroupError),
    /// A row index past the last row.
    #[error("row {row} out of range for a matrix of {rows} rows")]
    RowOutOfRange {
        /// The requested row.
        row: usize,
        /// Rows in the matrix.
        rows: usize,
    },
}

/// How a [`QuantMatrix`] stores its values.
#[derive(Clone, Copy, Debug)]
pub enum Storage<'a> {
    /// ggml blocks, row-major: every row is `cols / block_size` blocks of `ty`.
    Ggml {
        /// The block type.
        ty: GgmlType,
        /// The blocks of every row.
        bytes: &'a [u8],
    },
    /// A group-quantized safetensors weight (AWQ, GPTQ, EXL2, compressed-tensors) in its
    /// native packed tensors.
    Packed(&'a PackedLinear),
}

#[derive(Clone, Debug)]
enum Repr {
    Ggml {
        bytes: SharedBytes,
        ty: GgmlType,
        row_bytes: usize,
        /// The rows repacked for this CPU's matmul kernels ([`QuantMatrix::repack`]); `bytes`
        /// stay the blocks every other reader uses.
        repacked: Option<Arc<crate::cpu::Repacked>>,
    },
    Packed(Arc<PackedWeight>),
}

/// A `rows x cols` weight matrix that stays quantized: either row-major ggml blocks (each row is
/// `cols` elements packed in `cols / block_size` blocks; in GGUF terms `cols` is `dims[0]` and
/// `rows` is `dims[1]`), or a group-quantized safetensors weight kept in its packed tensors
/// ([`QuantMatrix::packed`]). As a linear layer's weight, `cols` is the input width and `rows`
/// the output width.
///
/// Every method works for both storages. The ggml-specific accessors
/// ([`ggml_type`](Self::ggml_type), [`bytes`](Self::bytes), [`row`](Self::row)) keep their
/// meaning for ggml storage; for packed weights see each one's docs, and use [`storage`](Self::storage),
/// [`packed`](Self::packed) or [`type_name`](Self::type_name) instead.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    repr: Repr,
    rows: usize,
    cols: usize,
    /// Copies of the values on GPU devices, made on first use or by `upload`.
    #[cfg(feature = "cube")]
    pub(crate) device_copies: crate::cube::DeviceCopies,
}

impl QuantMatrix {
    /// A `rows x cols` matrix of type `ty` over `bytes`, which must hold exactly `rows` rows of
    /// `cols / block_size` blocks. Nothing is copied or converted.
    pub fn new(
        bytes: SharedBytes,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantMatrixError> {
        if !ember_quant::supports_dequantize(ty) {
            return Err(QuantMatrixError::Unsupported(ty));
        }
        let block = ty.block_size();
        if !cols.is_multiple_of(block) {
            return Err(QuantMatrixError::PartialBlock { ty, cols, block });
        }
        let row_bytes = cols / block * ty.type_size();
        let expected = row_bytes.checked_mul(rows);
        if expected != Some(bytes.len()) {
            return Err(QuantMatrixError::WrongSize {
                ty,
                rows,
                cols,
                expected: expected.unwrap_or(usize::MAX),
                got: bytes.len(),
            });
        }
        Ok(Self {
            repr: Repr::Ggml {
                bytes,
                ty,
                row_bytes,
                repacked: None,
            },
            rows,
            cols,
            #[cfg(feature = "cube")]
            device_copies: Default::default(),
        })
    }

    /// A group-quantized weight left in its packed tensors (zero-copy: the
    /// [`ByteView`](ember_quant::group::ByteView)s are kept, e.g. over a memory-mapped safetensors file):
    /// `rows = n` (out features), `cols = k` (in features). The tensors are validated once here
    /// ([`PackedLinear::new`]) and a traversal plan is built (`O(k)` memory: group and
    /// activation-quantization segments, and for act-order GPTQ/CT and EXL2 the input order).
    pub fn packed(w: PackedLinear) -> Result<Self, QuantMatrixError> {
        let pw = PackedWeight::new(w)?;
        let (rows, cols) = (pw.desc.n, pw.desc.k);
        Ok(Self {
            repr: Repr::Packed(Arc::new(pw)),
            rows,
            cols,
            #[cfg(feature = "cube")]
            device_copies: Default::default(),
        })
    }

    /// Quantizes a row-major f32 matrix (tests and tiny generated models).
    pub fn quantize(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Self, QuantMatrixError> {
        assert_eq!(values.len(), rows * cols, "values must hold rows * cols");
        let mut bytes = Vec::new();
        for row in values.chunks(cols.max(1)) {
            let q =
                ember_quant::quantize(ty, row).map_err(|_| QuantMatrixError::Unsupported(ty))?;
            bytes.extend_from_slice(&q);
        }
        Self::new(SharedBytes::from_vec(bytes), ty, rows, cols)
    }

    /// The block format of every row. A packed group-quantized weight has no ggml type: it
    /// reports [`GgmlType::F32`], the type its rows dequantize to
    /// ([`dequantize_row_into`](Self::dequantize_row_into)); check [`packed`](Self::packed) /
    /// [`storage`](Self::storage) before relying on the blocks, and print [`type_name`](Self::type_name).
    pub fn ggml_type(&self) -> GgmlType {
        match &self.repr {
            Repr::Ggml { ty, .. } => *ty,
            Repr::Packed(_) => GgmlType::F32,
        }
    }

    /// A human-readable storage type: ggml's name (`"q4_0"`, `"q4_K"`, `"f16"`) or, for packed
    /// weights, format, bits and group size (`"AWQ-GEMM 4-bit g64"`, `"GPTQ 3-bit g128"`,
    /// `"CT 8-bit per-channel"`, `"EXL2 6-bit max"`).
    pub fn type_name(&self) -> String {
        match &self.repr {
            Repr::Ggml { ty, .. } => ty.to_string(),
            Repr::Packed(p) => crate::cpu::group::type_name(&p.desc),
        }
    }

    /// How the values are stored.
    pub fn storage(&self) -> Storage<'_> {
        match &self.repr {
            Repr::Ggml { bytes, ty, .. } => Storage::Ggml {
                ty: *ty,
                bytes: bytes.as_slice(),
            },
            Repr::Packed(p) => Storage::Packed(&p.source),
        }
    }

    /// The packed group-quantized weight, if this matrix is one.
    pub fn packed_weight(&self) -> Option<&PackedLinear> {
        match &self.repr {
            Repr::Ggml { .. } => None,
            Repr::Packed(p) => Some(&p.source),
        }
    }

    /// The group-quantization description (format, bits, group size, `k`, `n`) of a packed
    /// weight; `None` for ggml storage.
    pub fn group_desc(&self) -> Option<GroupQuantized> {
        match &self.repr {
            Repr::Ggml { .. } => None,
            Repr::Packed(p) => Some(p.desc),
        }
    }

    pub(crate) fn packed_plan(&self) -> Option<&Arc<PackedWeight>> {
        match &self.repr {
            Repr::Ggml { .. } => None,
            Repr::Packed(p) => Some(p),
        }
    }

    /// Repacks the rows once for this CPU's matmul kernels, as llama.cpp's CPU_REPACK does
    /// ([`crate::cpu::Repacked`]: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K on AVX-512 VNNI), so that decode
    /// streams each weight byte once with no in-register shuffling. Results keep their bits.
    /// Returns whether the matrix is now repacked: false, and nothing held, where the kernels
    /// read the blocks as they are. The blocks stay the ones [`bytes`](Self::bytes),
    /// [`row`](Self::row) and dequantization read; a caller that needs them rarely (a mapped
    /// file's weights) may let their pages go.
    pub fn repack(&mut self) -> bool {
        self.repack_releasing(&|_| {})
    }

    /// [`repack`](Self::repack), calling `release` with each range of [`bytes`](Self::bytes)
    /// once it is copied (see [`Repacked::new_releasing`](crate::cpu::Repacked::new_releasing)).
    pub fn repack_releasing(&mut self, release: &(dyn Fn(std::ops::Range<usize>) + Sync)) -> bool {
        let (rows, cols) = (self.rows, self.cols);
        match &mut self.repr {
            Repr::Ggml {
                bytes,
                ty,
                repacked,
                ..
            } => {
                if repacked.is_none() {
                    *repacked = crate::cpu::Repacked::new_releasing(
                        *ty,
                        bytes.as_slice(),
                        rows,
                        cols,
                        release,
                    )
                    .map(Arc::new);
                }
                repacked.is_some()
            }
            Repr::Packed(_) => false,
        }
    }

    /// The repacked rows, if [`repack`](Self::repack) made them.
    pub fn repacked(&self) -> Option<&crate::cpu::Repacked> {
        match &self.repr {
            Repr::Ggml { repacked, .. } => repacked.as_deref(),
            Repr::Packed(_) => None,
        }
    }

    /// Bytes held in memory beside the blocks: the repacked copy, if any.
    pub fn repacked_bytes(&self) -> usize {
        self.repacked().map_or(0, |r| r.bytes())
    }

    /// Rows: a linear layer's output width.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Values per row: a linear layer's input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed blocks of every row, row-major. Empty for a packed group-quantized weight
    /// (its tensors are in [`packed_weight`](Self::packed_weight)).
    pub fn bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Ggml { bytes, .. } => bytes.as_slice(),
            Repr::Packed(_) => &[],
        }
    }

    /// Bytes the weight occupies (ggml blocks, or every packed tensor).
    pub fn storage_bytes(&self) -> usize {
        match &self.repr {
            Repr::Ggml { bytes, .. } => bytes.len(),
            Repr::Packed(p) => p.source.packed_bytes(),
        }
    }

    /// The packed blocks of row `r`. Panics if `r >= rows` (callers index with trusted shapes)
    /// or if the matrix is a packed group-quantized weight (whose rows are not contiguous
    /// bytes: use [`dequantize_row_into`](Self::dequantize_row_into)).
    pub fn row(&self, r: usize) -> &[u8] {
        match &self.repr {
            Repr::Ggml {
                bytes, row_bytes, ..
            } => &bytes.as_slice()[r * row_bytes..(r + 1) * row_bytes],
            Repr::Packed(_) => {
                panic!("QuantMatrix::row: a packed group-quantized weight has no ggml rows")
            }
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values). For packed weights this is exactly the
    /// format's `dequantize_row`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) -> Result<(), QuantMatrixError> {
        if r >= self.rows {
            return Err(QuantMatrixError::RowOutOfRange {
                row: r,
                rows: self.rows,
            });
        }
        match &self.repr {
            Repr::Ggml { ty, .. } => ember_quant::dequantize(*ty, self.row(r), out)
                .map_err(|_| QuantMatrixError::Unsupported(*ty)),
            Repr::Packed(p) => Ok(p.source.view().dequantize_row(r, out)?),
        }
    }

    /// Dequantizes the given rows (an embedding lookup), row-major `[ids.len(), cols]`.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>, QuantMatrixError> {
        let mut out = vec![0.0f32; ids.len() * self.cols];
        for (dst, &id) in out.chunks_mut(self.cols.max(1)).zip(ids) {
            self.dequantize_row_into(id as usize, dst)?;
        }
        Ok(out)
    }

    /// Dequantizes rows `start..start + n` in parallel into `out` (`n * cols` values).
    pub fn dequantize_rows_into(&self, start: usize, out: &mut [f32]) {
        if let Some(crate::cpu::Repacked::KQuant(k)) = self.repacked() {
            // The mapped pages of repacked rows may have been let go (`repack_releasing`):
            // reading them here would fault them back in beside the copy (the GEMM path of
            // Q5_K prompts). The copy holds the same blocks.
            return k.dequantize_rows_into(start, out);
        }
        match &self.repr {
            Repr::Ggml { ty, .. } => {
                out.par_chunks_mut(self.cols.max(1))
                    .enumerate()
                    .for_each(|(i, dst)| {
                        // Shapes were validated in `new`, so dequantizing a whole row cannot fail.
                        let _ = ember_quant::dequantize(*ty, self.row(start + i), dst);
                    });
            }
            Repr::Packed(p) => crate::cpu::group::dequantize_rows(p, start, out),
        }
    }

    /// The whole matrix as row-major f32 (the generic fallback and tests).
    pub fn dequantize_all(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        self.dequantize_rows_into(0, &mut out);
        out
    }
}
