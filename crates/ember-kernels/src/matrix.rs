//! A quantized weight matrix that stays in its GGUF blocks (usually inside a memory map).

use std::fmt;
use std::sync::Arc;

use ember_quant::GgmlType;
use rayon::prelude::*;

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
    /// A row index past the last row.
    #[error("row {row} out of range for a matrix of {rows} rows")]
    RowOutOfRange {
        /// The requested row.
        row: usize,
        /// Rows in the matrix.
        rows: usize,
    },
}

/// A `rows x cols` matrix stored row-major in ggml blocks: each row is `cols` elements packed
/// in `cols / block_size` blocks. In GGUF terms `cols` is `dims[0]` and `rows` is `dims[1]`;
/// as a linear layer's weight, `cols` is the input width and `rows` the output width.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    bytes: SharedBytes,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
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
            bytes,
            ty,
            rows,
            cols,
            row_bytes,
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

    /// The block format of every row.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }
    /// Rows: a linear layer's output width.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Values per row: a linear layer's input width.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The packed blocks of every row, row-major.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// The packed blocks of row `r`. Panics if `r >= rows` (callers index with trusted shapes).
    pub fn row(&self, r: usize) -> &[u8] {
        &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) -> Result<(), QuantMatrixError> {
        if r >= self.rows {
            return Err(QuantMatrixError::RowOutOfRange {
                row: r,
                rows: self.rows,
            });
        }
        ember_quant::dequantize(self.ty, self.row(r), out)
            .map_err(|_| QuantMatrixError::Unsupported(self.ty))
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
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(i, dst)| {
                // Shapes were validated in `new`, so dequantizing a whole row cannot fail.
                let _ = ember_quant::dequantize(self.ty, self.row(start + i), dst);
            });
    }

    /// The whole matrix as row-major f32 (the generic fallback and tests).
    pub fn dequantize_all(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        self.dequantize_rows_into(0, &mut out);
        out
    }
}
