//! Typed errors of the GGUF reader and writer.

use std::path::PathBuf;

/// Why a GGUF file could not be read.
///
/// Variants that arise while parsing a particular metadata entry or tensor info carry a
/// `context` string (for example ` (in array element #5, in metadata key "tokenizer.ggml.tokens")`), empty when the
/// error is not tied to one entry. Offsets are absolute byte offsets into the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// Opening, reading or mapping the file failed.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic is {found:02x?} (expected \"GGUF\" = [47, 47, 55, 46])")]
    BadMagic { found: Vec<u8> },

    /// A GGUF version this reader does not handle.
    #[error("unsupported GGUF version {version}: {reason}")]
    UnsupportedVersion { version: u32, reason: &'static str },

    /// A big-endian GGUF file (the version field reads byte-swapped).
    #[error(
        "big-endian GGUF file (version field reads {raw:#010x}, i.e. version {version} byte-swapped); only little-endian files are supported"
    )]
    BigEndian { raw: u32, version: u32 },

    /// The file ends before a field that the header says is there.
    #[error(
        "truncated GGUF: {what} at offset {offset} needs {needed} bytes but only {available} remain{context}"
    )]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        available: u64,
        context: String,
    },

    /// A count (of metadata entries, tensors or array elements) that the rest of the file
    /// cannot possibly hold. Rejected before anything is allocated for it.
    #[error(
        "{what} count {count} at offset {offset} is impossible: each takes at least {min_bytes_each} bytes but only {remaining} bytes remain{context}"
    )]
    CountTooLarge {
        what: &'static str,
        count: u64,
        offset: u64,
        min_bytes_each: u64,
        remaining: u64,
        context: String,
    },

    /// A string (key, value or tensor name) that is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8{context}")]
    InvalidUtf8 {
        what: &'static str,
        offset: u64,
        context: String,
    },

    /// A metadata value type id outside the GGUF spec (0..=12).
    #[error("unknown metadata value type {type_id} at offset {offset}{context}")]
    UnknownValueType {
        type_id: u32,
        offset: u64,
        context: String,
    },

    /// Arrays nested deeper than the reader allows.
    #[error("metadata arrays nested deeper than the limit of {limit} at offset {offset}{context}")]
    NestingTooDeep {
        limit: usize,
        offset: u64,
        context: String,
    },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },

    /// A metadata value with a type the reader cannot use for that key (e.g. a string
    /// `general.alignment`).
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongMetaType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },

    /// `general.alignment` is zero or not a power of two.
    #[error("invalid general.alignment {value}: must be a non-zero power of two")]
    BadAlignment { value: u64 },

    /// Two tensors with the same name.
    #[error("duplicate tensor name {name:?} (tensor infos #{first} and #{second})")]
    DuplicateTensor {
        name: String,
        first: usize,
        second: usize,
    },

    /// A tensor type id that ggml does not define.
    #[error(
        "tensor {tensor:?} has unknown ggml type id {type_id} (tensor info at offset {offset})"
    )]
    UnknownTensorType {
        tensor: String,
        type_id: u32,
        offset: u64,
    },

    /// More dimensions than ggml supports.
    #[error("tensor {tensor:?} has {n_dims} dimensions; the limit is {limit}")]
    TooManyDims {
        tensor: String,
        n_dims: u32,
        limit: u32,
    },

    /// The product of the dimensions (or the byte size) does not fit in 63 bits.
    #[error("tensor {tensor:?}: element count of dims {dims:?} overflows")]
    DimsOverflow { tensor: String, dims: Vec<u64> },

    /// The row length is not a whole number of quantization blocks.
    #[error(
        "tensor {tensor:?}: row length dims[0] = {dim0} is not a multiple of the {ggml_type} block size {block_size}"
    )]
    NotBlockMultiple {
        tensor: String,
        ggml_type: ember_quant::GgmlType,
        dim0: u64,
        block_size: u64,
    },

    /// A tensor offset that is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    /// Tensor data that would extend past the end of the file.
    #[error(
        "tensor {tensor:?}: data [{start}, {end}) (data section at {data_offset} + offset {offset}, {n_bytes} bytes) extends past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        tensor: String,
        data_offset: u64,
        offset: u64,
        n_bytes: u64,
        start: u64,
        end: u64,
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
        path: PathBuf,
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
        tensor: String,
        n_dims: usize,
        limit: usize,
    },

    /// Dims whose element count overflows, or whose row length is not a multiple of the
    /// block size.
    #[error("tensor {tensor:?}: dims {dims:?} are not valid for type {ggml_type}")]
    BadDims {
        tensor: String,
        dims: Vec<u64>,
        ggml_type: ember_quant::GgmlType,
    },

    /// The data length does not match what the dims and type require.
    #[error("tensor {tensor:?}: got {got} bytes of data, dims and type need {expected}")]
    SizeMismatch {
        tensor: String,
        expected: u64,
        got: u64,
    },

    /// `general.alignment` is not a u32 non-zero power of two.
    #[error("invalid general.alignment: {0}")]
    BadAlignment(String),
}
