//! Typed errors of the GGUF reader and writer.

use std::path::PathBuf;

/// Why a GGUF file could not be read.
///
/// Variants that arise while parsing a particular metadata entry or tensor info carry a
/// `context` string (for example
/// ` (in array element #5, in metadata key "tokenizer.ggml.tokens")`), empty when the error is
/// not tied to one entry. Offsets are absolute byte offsets into the file, except a tensor's
/// `offset`, which is relative to the data section as the tensor info stores it. The enum is
/// `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// Opening, reading or mapping the file failed.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic is {found:02x?} (expected \"GGUF\" = [47, 47, 55, 46])")]
    BadMagic {
        /// The first bytes of the file (fewer than 4 if the file is shorter).
        found: Vec<u8>,
    },

    /// A GGUF version this reader does not handle.
    #[error("unsupported GGUF version {version}: {reason}")]
    UnsupportedVersion {
        /// The version field as read.
        version: u32,
        /// What to do about it (v1 files need re-converting).
        reason: &'static str,
    },

    /// A big-endian GGUF file (the version field reads byte-swapped).
    #[error(
        "big-endian GGUF file (version field reads {raw:#010x}, i.e. version {version} byte-swapped); only little-endian files are supported"
    )]
    BigEndian {
        /// The version field as read, little-endian.
        raw: u32,
        /// The version it means once byte-swapped.
        version: u32,
    },

    /// The file ends before a field that the header says is there.
    #[error(
        "truncated GGUF: {what} at offset {offset} needs {needed} bytes but only {available} remain{context}"
    )]
    Truncated {
        /// The field being read (`"tensor count"`, `"array string element"`, ...).
        what: &'static str,
        /// Where the field starts.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
        /// The entry being parsed, innermost first (` (in array element #5, in metadata key
        /// "x")`), or empty.
        context: String,
    },

    /// A count (of metadata entries, tensors or array elements) that the rest of the file
    /// cannot possibly hold. Rejected before anything is allocated for it.
    #[error(
        "{what} count {count} at offset {offset} is impossible: each takes at least {min_bytes_each} bytes but only {remaining} bytes remain{context}"
    )]
    CountTooLarge {
        /// What is counted (`"metadata entry"`, `"tensor"`, `"array element"`, ...).
        what: &'static str,
        /// The count as read.
        count: u64,
        /// Where the count was read from.
        offset: u64,
        /// The smallest encoding of one item.
        min_bytes_each: u64,
        /// Bytes left in the file after the count.
        remaining: u64,
        /// The entry being parsed, innermost first (` (in array element #5, in metadata key
        /// "x")`), or empty.
        context: String,
    },

    /// A string (key, value or tensor name) that is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8{context}")]
    InvalidUtf8 {
        /// Which string (`"metadata key"`, `"tensor name"`, ...).
        what: &'static str,
        /// Where the string bytes start.
        offset: u64,
        /// The entry being parsed, innermost first (` (in array element #5, in metadata key
        /// "x")`), or empty.
        context: String,
    },

    /// A metadata value type id outside the GGUF spec (0..=12).
    #[error("unknown metadata value type {type_id} at offset {offset}{context}")]
    UnknownValueType {
        /// The type id as read.
        type_id: u32,
        /// Where the type id was read from.
        offset: u64,
        /// The entry being parsed, innermost first (` (in array element #5, in metadata key
        /// "x")`), or empty.
        context: String,
    },

    /// Arrays nested deeper than the reader allows.
    #[error("metadata arrays nested deeper than the limit of {limit} at offset {offset}{context}")]
    NestingTooDeep {
        /// The nesting limit, [`MAX_ARRAY_DEPTH`](crate::MAX_ARRAY_DEPTH).
        limit: usize,
        /// Where the array that is one level too deep starts.
        offset: u64,
        /// The entry being parsed, innermost first (` (in array element #5, in metadata key
        /// "x")`), or empty.
        context: String,
    },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
        /// Where its second occurrence starts.
        offset: u64,
    },

    /// A metadata value with a type the reader cannot use for that key (e.g. a string
    /// `general.alignment`).
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongMetaType {
        /// The key.
        key: String,
        /// The type name the reader needs (`"u32"`).
        expected: &'static str,
        /// The type name in the file.
        found: &'static str,
    },

    /// `general.alignment` is zero, not a power of two, or too large for a u32.
    #[error("invalid general.alignment {value}: must be a non-zero power of two")]
    BadAlignment {
        /// The alignment as read (0 if negative).
        value: u64,
    },

    /// Two tensors with the same name.
    #[error("duplicate tensor name {name:?} (tensor infos #{first} and #{second})")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
        /// Index of the first tensor info with that name.
        first: usize,
        /// Index of the second one.
        second: usize,
    },

    /// A tensor type id that ggml does not define.
    #[error(
        "tensor {tensor:?} has unknown ggml type id {type_id} (tensor info at offset {offset})"
    )]
    UnknownTensorType {
        /// The tensor name.
        tensor: String,
        /// The type id as read.
        type_id: u32,
        /// Where the tensor info starts.
        offset: u64,
    },

    /// More dimensions than ggml supports.
    #[error("tensor {tensor:?} has {n_dims} dimensions; the limit is {limit}")]
    TooManyDims {
        /// The tensor name.
        tensor: String,
        /// The dimension count as read.
        n_dims: u32,
        /// The limit, [`MAX_DIMS`](crate::MAX_DIMS).
        limit: u32,
    },

    /// The product of the dimensions (or the byte size) does not fit in 63 bits.
    #[error("tensor {tensor:?}: element count of dims {dims:?} overflows")]
    DimsOverflow {
        /// The tensor name.
        tensor: String,
        /// The dimensions as read.
        dims: Vec<u64>,
    },

    /// The row length is not a whole number of quantization blocks.
    #[error(
        "tensor {tensor:?}: row length dims[0] = {dim0} is not a multiple of the {ggml_type} block size {block_size}"
    )]
    NotBlockMultiple {
        /// The tensor name.
        tensor: String,
        /// The tensor's type.
        ggml_type: ember_quant::GgmlType,
        /// The row length.
        dim0: u64,
        /// Elements per block of the type.
        block_size: u64,
    },

    /// A tensor offset that is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The tensor name.
        tensor: String,
        /// The data offset as read, relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },

    /// Tensor data that would extend past the end of the file.
    #[error(
        "tensor {tensor:?}: data [{start}, {end}) (data section at {data_offset} + offset {offset}, {n_bytes} bytes) extends past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The tensor name.
        tensor: String,
        /// Absolute offset of the data section.
        data_offset: u64,
        /// The tensor's offset relative to the data section.
        offset: u64,
        /// The tensor's size in bytes, from its dims and type.
        n_bytes: u64,
        /// Absolute start of the data (`u64::MAX` if it overflows).
        start: u64,
        /// Absolute end of the data, exclusive (`u64::MAX` if it overflows).
        end: u64,
        /// The file length in bytes.
        file_len: u64,
    },
}

impl GgufError {
    /// Append an enclosing context (e.g. `metadata key "x"`) to variants that carry one.
    pub(crate) fn with_context(mut self, ctx: impl FnOnce() -> String) -> Self {
        match &mut self {
            GgufError::Truncated { context, .. }
            | GgufError::CountTooLarge { context, .. }
            | GgufError::InvalidUtf8 { context, .. }
            | GgufError::UnknownValueType { context, .. }
            | GgufError::NestingTooDeep { context, .. } => {
                // Innermost context first: " (in array element #2, in metadata key \"x\")".
                if context.is_empty() {
                    *context = format!(" (in {})", ctx());
                } else if context.ends_with(')') {
                    context.pop();
                    *context = format!("{context}, in {})", ctx());
                }
            }
            _ => {}
        }
        self
    }
}

/// Why a GGUF file could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufWriteError {
    /// Writing failed.
    #[error("cannot write GGUF: {0}")]
    Io(#[from] std::io::Error),

    /// Writing to a path failed.
    #[error("cannot write GGUF file {path}: {source}")]
    IoPath {
        /// The file being written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Only versions 2 and 3 can be written.
    #[error("cannot write GGUF version {0}: only versions 2 and 3 are supported")]
    UnsupportedVersion(u32),

    /// A tensor name was added twice.
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),

    /// More dimensions than ggml supports.
    #[error("tensor {tensor:?} has {n_dims} dimensions; the limit is {limit}")]
    TooManyDims {
        /// The tensor name.
        tensor: String,
        /// The number of dims given.
        n_dims: usize,
        /// The limit, [`MAX_DIMS`](crate::MAX_DIMS).
        limit: usize,
    },

    /// Dims whose element count overflows, or whose row length is not a multiple of the
    /// block size.
    #[error("tensor {tensor:?}: dims {dims:?} are not valid for type {ggml_type}")]
    BadDims {
        /// The tensor name.
        tensor: String,
        /// The dims given.
        dims: Vec<u64>,
        /// The type given.
        ggml_type: ember_quant::GgmlType,
    },

    /// The data length does not match what the dims and type require.
    #[error("tensor {tensor:?}: got {got} bytes of data, dims and type need {expected}")]
    SizeMismatch {
        /// The tensor name.
        tensor: String,
        /// Bytes the dims and type need.
        expected: u64,
        /// Bytes given.
        got: u64,
    },

    /// `general.alignment` is not a u32 non-zero power of two.
    #[error("invalid general.alignment: {0}")]
    BadAlignment(String),
}
