//! Safetensors files: a memory-mapped, validating reader with zero-copy tensor views, and a
//! writer that lays files out the way the reference implementation does.
//!
//! The format (from the reference `safetensors` crate, `tensor.rs`): bytes `0..8` hold the
//! header length `n` (u64 little-endian, at most [`MAX_HEADER_SIZE`]); bytes `8..8+n` hold a
//! UTF-8 JSON object mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin,
//! end]}` plus an optional `"__metadata__"` object of strings; the data section follows at
//! `8+n`. Offsets are relative to the data section, and the tensors, sorted by offset, must
//! tile it exactly: no gap, no overlap, nothing after the last one.
//!
//! The header is parsed here with serde_json rather than with the `safetensors` crate: the
//! format is a few lines of rules, and parsing it ourselves gives every hostile case its own
//! typed error naming the file, the tensor and the numbers (the crate reports most of them as
//! one untyped variant without the file), rejects duplicate names (which the crate's
//! `HashMap` silently collapses), and validates each entry while it is read, so a hostile
//! header costs at most a small multiple of its own size in memory before it is refused.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::reader::{Backing, SharedBytes, map_file};

/// The largest header length accepted, in bytes (the reference reader's `MAX_HEADER_SIZE`).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;
/// The most dimensions a tensor's shape may have (refused beyond, before allocating).
pub const MAX_SHAPE_DIMS: usize = 64;
/// The header key that holds the free-form string metadata.
pub const METADATA_KEY: &str = "__metadata__";
/// The name used for the file in errors about a buffer parsed with
/// [`SafetensorsFile::from_bytes`].
pub const IN_MEMORY: &str = "<in-memory safetensors>";

/// Size of the header-length prefix.
const N_LEN: usize = 8;

/// A tensor element type, as spelled in the header's `"dtype"` field.
///
/// The variants are declared in the reference implementation's `Dtype` order (roughly by
/// increasing width), which is what `Ord` compares: the writer sorts tensors by dtype
/// descending so that wider types come first and stay aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum StDtype {
    /// `BOOL`: one byte per element.
    Bool,
    /// `F4`: MXFP4 (E2M1), 4 bits.
    F4,
    /// `F6_E2M3`: MXFP6, 6 bits.
    F6E2M3,
    /// `F6_E3M2`: MXFP6, 6 bits.
    F6E3M2,
    /// `U8`.
    U8,
    /// `I8`.
    I8,
    /// `F8_E5M2`.
    F8E5M2,
    /// `F8_E4M3`.
    F8E4M3,
    /// `F8_E8M0`: the MX scale type.
    F8E8M0,
    /// `F8_E4M3FNUZ`.
    F8E4M3Fnuz,
    /// `F8_E5M2FNUZ`.
    F8E5M2Fnuz,
    /// `I16`.
    I16,
    /// `U16`.
    U16,
    /// `F16`: IEEE half precision.
    F16,
    /// `BF16`: bfloat16.
    BF16,
    /// `I32`.
    I32,
    /// `U32`.
    U32,
    /// `F32`.
    F32,
    /// `C64`: complex with two f32 parts.
    C64,
    /// `F64`.
    F64,
    /// `I64`.
    I64,
    /// `U64`.
    U64,
}

impl StDtype {
    /// Every dtype, in `Ord` order.
    pub const ALL: [StDtype; 22] = [
        StDtype::Bool,
        StDtype::F4,
        StDtype::F6E2M3,
        StDtype::F6E3M2,
        StDtype::U8,
        StDtype::I8,
        StDtype::F8E5M2,
        StDtype::F8E4M3,
        StDtype::F8E8M0,
        StDtype::F8E4M3Fnuz,
        StDtype::F8E5M2Fnuz,
        StDtype::I16,
        StDtype::U16,
        StDtype::F16,
        StDtype::BF16,
        StDtype::I32,
        StDtype::U32,
        StDtype::F32,
        StDtype::C64,
        StDtype::F64,
        StDtype::I64,
        StDtype::U64,
    ];

    /// The name as written in the file (`"F16"`, `"BOOL"`, `"F8_E4M3"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            StDtype::Bool => "BOOL",
            StDtype::F4 => "F4",
            StDtype::F6E2M3 => "F6_E2M3",
            StDtype::F6E3M2 => "F6_E3M2",
            StDtype::U8 => "U8",
            StDtype::I8 => "I8",
            StDtype::F8E5M2 => "F8_E5M2",
            StDtype::F8E4M3 => "F8_E4M3",
            StDtype::F8E8M0 => "F8_E8M0",
            StDtype::F8E4M3Fnuz => "F8_E4M3FNUZ",
            StDtype::F8E5M2Fnuz => "F8_E5M2FNUZ",
            StDtype::I16 => "I16",
            StDtype::U16 => "U16",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::I32 => "I32",
            StDtype::U32 => "U32",
            StDtype::F32 => "F32",
            StDtype::C64 => "C64",
            StDtype::F64 => "F64",
            StDtype::I64 => "I64",
            StDtype::U64 => "U64",
        }
    }

    /// Bits per element (4 for `F4`, 6 for the `F6` types, 8 for `BOOL`).
    pub fn size_bits(&self) -> usize {
        match self {
            StDtype::F4 => 4,
            StDtype::F6E2M3 | StDtype::F6E3M2 => 6,
            StDtype::Bool
            | StDtype::U8
            | StDtype::I8
            | StDtype::F8E5M2
            | StDtype::F8E4M3
            | StDtype::F8E8M0
            | StDtype::F8E4M3Fnuz
            | StDtype::F8E5M2Fnuz => 8,
            StDtype::I16 | StDtype::U16 | StDtype::F16 | StDtype::BF16 => 16,
            StDtype::I32 | StDtype::U32 | StDtype::F32 => 32,
            StDtype::C64 | StDtype::F64 | StDtype::I64 | StDtype::U64 => 64,
        }
    }

    /// The dtype a header names (exact, case-sensitive spelling), or `None` if unknown.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Bytes that `n_elements` elements take, or `None` if that overflows or is not a whole
    /// number of bytes (an odd count of `F4` elements, say).
    pub fn bytes_for(&self, n_elements: usize) -> Option<usize> {
        let bits = n_elements.checked_mul(self.size_bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for StDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a safetensors file, validated: its byte range lies inside the file and holds
/// exactly `n_elements * dtype bits / 8` bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StTensorInfo {
    /// The name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The element type.
    pub dtype: StDtype,
    /// The shape, outermost dimension first (row-major, as PyTorch).
    pub shape: Vec<usize>,
    /// Start of the data, in bytes from the start of the file (not of the data section).
    pub offset: usize,
    /// Length of the data in bytes.
    pub n_bytes: usize,
}

impl StTensorInfo {
    /// Number of elements (product of the shape; 1 for a scalar). Validated not to overflow
    /// when the file was parsed; saturates at `usize::MAX` for a hand-built info.
    pub fn n_elements(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX)
    }
}

/// Why a safetensors file could not be read or written.
///
/// Every variant names the file (its path, or [`IN_MEMORY`] for a buffer), and those about
/// one tensor name it. Offsets named `begin`/`end` are the header's `data_offsets`, relative
/// to the data section. The enum is `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// Opening, mapping, writing or renaming the file failed.
    #[error("I/O error on safetensors file {file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The file is shorter than the 8-byte header length.
    #[error("{file} is not a safetensors file: {len} bytes, shorter than the 8-byte header length")]
    TooSmall {
        /// The file.
        file: String,
        /// Its length.
        len: usize,
    },

    /// The header length is above [`MAX_HEADER_SIZE`].
    #[error("safetensors header of {file} claims {header_len} bytes, above the limit of {max}")]
    HeaderTooLarge {
        /// The file.
        file: String,
        /// The header length as read.
        header_len: u64,
        /// [`MAX_HEADER_SIZE`].
        max: u64,
    },

    /// The header length runs past the end of the file.
    #[error(
        "safetensors header of {file} claims {header_len} bytes but only {available} follow the length field (file is {file_len} bytes)"
    )]
    HeaderBeyondFile {
        /// The file.
        file: String,
        /// The header length as read.
        header_len: u64,
        /// Bytes after the 8-byte length field.
        available: usize,
        /// The file length.
        file_len: usize,
    },

    /// The header is not valid UTF-8.
    #[error("safetensors header of {file} is not valid UTF-8: {source}")]
    HeaderNotUtf8 {
        /// The file.
        file: String,
        /// Where the invalid bytes are (relative to the header start).
        #[source]
        source: std::str::Utf8Error,
    },

    /// The header is not valid JSON (or has something after the JSON object other than
    /// whitespace).
    #[error("safetensors header of {file} is not valid JSON: {source}")]
    InvalidJson {
        /// The file.
        file: String,
        /// serde_json's message, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// The header is valid JSON but not an object.
    #[error("safetensors header of {file} is not a JSON object: {message}")]
    HeaderNotObject {
        /// The file.
        file: String,
        /// What was found (serde_json's message).
        message: String,
    },

    /// A tensor entry is not a JSON object.
    #[error("tensor {tensor:?} in {file}: its header entry is {found}, expected an object")]
    EntryNotObject {
        /// The file.
        file: String,
        /// The tensor name (the entry's key).
        tensor: String,
        /// What the entry is (`"a string"`, `"an array"`, ...).
        found: &'static str,
    },

    /// A tensor entry lacks a field or has one of the wrong type.
    #[error("tensor {tensor:?} in {file}: {reason}")]
    BadEntry {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// What is wrong (`missing "dtype"`, `"shape" element 1 is a negative number`, ...).
        reason: String,
    },

    /// The `__metadata__` entry is not an object of strings.
    #[error("{METADATA_KEY} of {file}: {reason}")]
    BadMetadata {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },

    /// A dtype this reader does not know.
    #[error("tensor {tensor:?} in {file}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The dtype as written.
        dtype: String,
    },

    /// Two tensors with the same name (header keys repeat).
    #[error("tensor {tensor:?} appears twice in {file}")]
    DuplicateTensor {
        /// The file.
        file: String,
        /// The repeated name.
        tensor: String,
    },

    /// A tensor named `__metadata__` given to the writer.
    #[error("tensor name {tensor:?} is reserved in safetensors files ({file})")]
    ReservedName {
        /// The file.
        file: String,
        /// The name.
        tensor: String,
    },

    /// The element count of a shape (or its size in bits) overflows.
    #[error(
        "tensor {tensor:?} in {file}: the element count of shape {shape:?} ({dtype}) overflows"
    )]
    ShapeOverflow {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The dtype.
        dtype: StDtype,
        /// The shape as written.
        shape: Vec<u64>,
    },

    /// The data of a sub-byte dtype does not fill a whole number of bytes.
    #[error(
        "tensor {tensor:?} in {file}: {n_elements} elements of {dtype} take {bits} bits, not a whole number of bytes"
    )]
    NotByteSized {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The dtype.
        dtype: StDtype,
        /// The element count.
        n_elements: usize,
        /// Their size in bits.
        bits: usize,
    },

    /// The byte range of a tensor disagrees with its dtype and shape.
    #[error(
        "tensor {tensor:?} in {file}: {dtype} shape {shape:?} needs {expected} bytes but data_offsets [{begin}, {end}] span {found}"
    )]
    SizeMismatch {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The dtype.
        dtype: StDtype,
        /// The shape.
        shape: Vec<usize>,
        /// Bytes the dtype and shape need.
        expected: usize,
        /// Bytes the offsets span.
        found: u64,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
    },

    /// Data given to the writer disagrees with its dtype and shape.
    #[error(
        "tensor {tensor:?} for {file}: {dtype} shape {shape:?} needs {expected} bytes but {found} were given"
    )]
    WriteSizeMismatch {
        /// The file being written.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The dtype.
        dtype: StDtype,
        /// The shape.
        shape: Vec<usize>,
        /// Bytes the dtype and shape need.
        expected: usize,
        /// Bytes given.
        found: usize,
    },

    /// A tensor's end offset is before its begin offset.
    #[error("tensor {tensor:?} in {file}: data_offsets [{begin}, {end}] end before they begin")]
    OffsetsReversed {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
    },

    /// A tensor's data runs past the end of the file.
    #[error(
        "tensor {tensor:?} in {file}: data_offsets [{begin}, {end}] run past the data section of {data_len} bytes"
    )]
    OffsetOutOfRange {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
        /// Length of the data section (file length minus 8 minus the header).
        data_len: usize,
    },

    /// Two tensors' byte ranges overlap.
    #[error(
        "tensor {tensor:?} in {file}: data_offsets [{begin}, {end}] overlap tensor {other:?}, which ends at {other_end}"
    )]
    OverlappingTensors {
        /// The file.
        file: String,
        /// The later tensor (by offset).
        tensor: String,
        /// Its start offset.
        begin: u64,
        /// Its end offset.
        end: u64,
        /// The earlier tensor it overlaps.
        other: String,
        /// Where the earlier tensor ends.
        other_end: u64,
    },

    /// Bytes of the data section between two tensors (or before the first) belong to none.
    #[error(
        "tensor {tensor:?} in {file}: data_offsets [{begin}, {end}] leave a gap after offset {previous_end} (tensors must tile the data section)"
    )]
    DataGap {
        /// The file.
        file: String,
        /// The tensor after the gap.
        tensor: String,
        /// Its start offset.
        begin: u64,
        /// Its end offset.
        end: u64,
        /// Where the previous tensor ends (0 for the first).
        previous_end: u64,
    },

    /// The data section is longer than the tensors cover.
    #[error(
        "{file}: the tensors cover {covered} bytes of data but the data section has {data_len} (trailing bytes, or a truncated header)"
    )]
    TrailingData {
        /// The file.
        file: String,
        /// Where the last tensor ends.
        covered: u64,
        /// Length of the data section.
        data_len: usize,
    },
}

/// A parsed safetensors file: a read-only memory mapping (or an owned buffer) and its
/// validated header. Tensor data is handed out as zero-copy slices of the mapping.
///
/// The file must not be modified or truncated while it is mapped. [`write_safetensors`]
/// replaces files by renaming, so rewriting a mapped file with it is safe: the mapping keeps
/// the old contents.
pub struct SafetensorsFile {
    bytes: SharedBytes,
    path: Option<PathBuf>,
    header_len: usize,
    tensors: Vec<StTensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("len", &self.bytes.len())
            .field("header_len", &self.header_len)
            .field("n_tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl SafetensorsFile {
    /// Memory-map and parse the file at `path`.
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let name = path.display().to_string();
        let io = |source| SafetensorsError::Io {
            file: name.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let backing = if len == 0 {
            // Mapping an empty file fails on some platforms: parse an empty buffer instead to
            // get the usual "too small" error.
            Backing::Owned(Vec::new())
        } else {
            Backing::Mmap(map_file(&file).map_err(io)?)
        };
        Self::from_backing(backing, Some(path.to_path_buf()), &name)
    }

    /// Parse a file held in memory (tests, fuzzing, downloads). Errors name it [`IN_MEMORY`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SafetensorsError> {
        Self::from_backing(Backing::Owned(bytes), None, IN_MEMORY)
    }

    fn from_backing(
        bytes: Backing,
        path: Option<PathBuf>,
        file: &str,
    ) -> Result<Self, SafetensorsError> {
        let header = parse(bytes.as_slice(), file)?;
        Ok(SafetensorsFile {
            bytes: SharedBytes::new(bytes),
            path,
            header_len: header.header_len,
            tensors: header.tensors,
            index: header.index,
            metadata: header.metadata,
        })
    }

    /// The tensors in file order (sorted by offset; zero-sized tensors that share an offset
    /// keep their header order).
    pub fn tensors(&self) -> &[StTensorInfo] {
        &self.tensors
    }

    /// The tensor with this name.
    pub fn tensor(&self, name: &str) -> Option<&StTensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// Zero-copy view of a tensor's bytes. Empty if `info` did not come from this file and
    /// does not fit it.
    pub fn data(&self, info: &StTensorInfo) -> &[u8] {
        info.offset
            .checked_add(info.n_bytes)
            .and_then(|end| self.bytes.get(info.offset..end))
            .unwrap_or(&[])
    }

    /// The `__metadata__` strings (empty when the header has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The path this file was opened from (`None` for [`SafetensorsFile::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The header length `n` (the JSON, padding included).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Where the data section starts: `8 + n`.
    pub fn data_offset(&self) -> usize {
        N_LEN + self.header_len
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole file as a shared handle that keeps the mapping alive on its own (for weights
    /// used zero-copy after this reader is dropped). A tensor's bytes are
    /// `info.offset..info.offset + info.n_bytes` of it.
    pub fn shared_bytes(&self) -> SharedBytes {
        self.bytes.clone()
    }
}

/// The validated header.
struct Header {
    header_len: usize,
    tensors: Vec<StTensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

fn parse(bytes: &[u8], file: &str) -> Result<Header, SafetensorsError> {
    let file_len = bytes.len();
    let mut len_bytes = [0u8; N_LEN];
    match bytes.get(..N_LEN) {
        Some(b) => len_bytes.copy_from_slice(b),
        None => {
            return Err(SafetensorsError::TooSmall {
                file: file.to_owned(),
                len: file_len,
            });
        }
    }
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_SIZE {
        return Err(SafetensorsError::HeaderTooLarge {
            file: file.to_owned(),
            header_len: n,
            max: MAX_HEADER_SIZE,
        });
    }
    let available = file_len - N_LEN;
    let header_len = match usize::try_from(n) {
        Ok(n) if n <= available => n,
        _ => {
            return Err(SafetensorsError::HeaderBeyondFile {
                file: file.to_owned(),
                header_len: n,
                available,
                file_len,
            });
        }
    };
    let data_start = N_LEN + header_len;
    let text = std::str::from_utf8(&bytes[N_LEN..data_start]).map_err(|source| {
        SafetensorsError::HeaderNotUtf8 {
            file: file.to_owned(),
            source,
        }
    })?;
    let data_len = file_len - data_start;

    // Entries are checked as they are read; the first problem is parked here and parsing is
    // aborted with a placeholder serde error.
    let mut failure = None;
    let visitor = HeaderVisitor {
        file,
        data_len,
        failure: &mut failure,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de
        .deserialize_map(visitor)
        .and_then(|h| de.end().map(|()| h));
    if let Some(e) = failure {
        return Err(e);
    }
    let RawHeader {
        mut tensors,
        metadata,
        mut index,
    } = parsed.map_err(|source| {
        if source.classify() == serde_json::error::Category::Data {
            // Every inner visitor accepts any JSON value, so a data error can only be the
            // top level's type.
            SafetensorsError::HeaderNotObject {
                file: file.to_owned(),
                message: source.to_string(),
            }
        } else {
            SafetensorsError::InvalidJson {
                file: file.to_owned(),
                source,
            }
        }
    })?;

    // Sort by offset (stable: zero-sized tensors at one offset keep header order), then check
    // that the ranges tile the data section exactly.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].offset, tensors[i].n_bytes));
    let mut new_pos = vec![0usize; tensors.len()];
    for (pos, &i) in order.iter().enumerate() {
        new_pos[i] = pos;
    }
    let mut slots: Vec<Option<StTensorInfo>> = tensors.drain(..).map(Some).collect();
    tensors = order.iter().filter_map(|&i| slots[i].take()).collect();
    for v in index.values_mut() {
        *v = new_pos[*v];
    }

    let mut previous_end = 0usize;
    let mut previous: Option<&str> = None;
    for t in &tensors {
        let (begin, end) = (t.offset, t.offset + t.n_bytes);
        if begin < previous_end {
            return Err(SafetensorsError::OverlappingTensors {
                file: file.to_owned(),
                tensor: t.name.clone(),
                begin: begin as u64,
                end: end as u64,
                other: previous.unwrap_or_default().to_owned(),
                other_end: previous_end as u64,
            });
        }
        if begin > previous_end {
            return Err(SafetensorsError::DataGap {
                file: file.to_owned(),
                tensor: t.name.clone(),
                begin: begin as u64,
                end: end as u64,
                previous_end: previous_end as u64,
            });
        }
        previous_end = end;
        previous = Some(&t.name);
    }
    if previous_end != data_len {
        return Err(SafetensorsError::TrailingData {
            file: file.to_owned(),
            covered: previous_end as u64,
            data_len,
        });
    }
    // Offsets become absolute.
    for t in &mut tensors {
        t.offset += data_start;
    }
    Ok(Header {
        header_len,
        tensors,
        index,
        metadata: metadata.unwrap_or_default(),
    })
}

/// The header as read: tensors (offsets relative to the data section, each entry already
/// checked on its own) in header order, and the metadata.
struct RawHeader {
    tensors: Vec<StTensorInfo>,
    index: HashMap<String, usize>,
    metadata: Option<BTreeMap<String, String>>,
}

struct HeaderVisitor<'a> {
    file: &'a str,
    data_len: usize,
    failure: &'a mut Option<SafetensorsError>,
}

impl HeaderVisitor<'_> {
    fn fail<E: de::Error>(&mut self, e: SafetensorsError) -> E {
        *self.failure = Some(e);
        E::custom("invalid safetensors header")
    }
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to entries")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut tensors = Vec::new();
        let mut index = HashMap::new();
        let mut metadata = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                let value = map.next_value_seed(MetadataSeed)?;
                if metadata.is_some() {
                    let reason = "appears twice in the header".to_owned();
                    return Err(self.fail(SafetensorsError::BadMetadata {
                        file: self.file.to_owned(),
                        reason,
                    }));
                }
                match value {
                    Ok(m) => metadata = Some(m),
                    Err(reason) => {
                        return Err(self.fail(SafetensorsError::BadMetadata {
                            file: self.file.to_owned(),
                            reason,
                        }));
                    }
                }
                continue;
            }
            if index.contains_key(&key) {
                return Err(self.fail(SafetensorsError::DuplicateTensor {
                    file: self.file.to_owned(),
                    tensor: key,
                }));
            }
            let raw = map.next_value_seed(EntrySeed)?;
            match check_entry(self.file, key, raw, self.data_len) {
                Ok(info) => {
                    index.insert(info.name.clone(), tensors.len());
                    tensors.push(info);
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(RawHeader {
            tensors,
            index,
            metadata,
        })
    }
}

/// What a JSON value is, for messages.
mod kind {
    pub const BOOL: &str = "a boolean";
    pub const NUMBER: &str = "a number";
    pub const NEGATIVE: &str = "a negative number";
    pub const FRACTION: &str = "a fractional or out-of-range number";
    pub const STRING: &str = "a string";
    pub const NULL: &str = "null";
    pub const ARRAY: &str = "an array";
    pub const OBJECT: &str = "an object";
}

/// Visitor methods for the JSON kinds a visitor does not handle itself: each maps the kind to
/// `$out(kind)`, draining arrays and objects.
macro_rules! other_kinds {
    ($out:expr; $($m:ident)*) => { $( other_kinds!(@ $m $out); )* };
    (@bool $out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out(kind::BOOL))
        }
    };
    (@i64 $out:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out(kind::NUMBER))
        }
    };
    (@u64 $out:expr) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out(kind::NUMBER))
        }
    };
    (@f64 $out:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out(kind::NUMBER))
        }
    };
    (@str $out:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($out(kind::STRING))
        }
    };
    (@unit $out:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out(kind::NULL))
        }
    };
    (@seq $out:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($out(kind::ARRAY))
        }
    };
    (@map $out:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($out(kind::OBJECT))
        }
    };
}

/// The `__metadata__` value: a map of strings, or why not.
struct MetadataSeed;

impl<'de> DeserializeSeed<'de> for MetadataSeed {
    type Value = Result<BTreeMap<String, String>, String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn metadata_not_object(found: &str) -> Result<BTreeMap<String, String>, String> {
    Err(format!("is {found}, expected an object of strings"))
}

impl<'de> Visitor<'de> for MetadataSeed {
    type Value = Result<BTreeMap<String, String>, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of strings")
    }

    other_kinds!(metadata_not_object; bool i64 u64 f64 str seq);

    /// `null` means no metadata, as the reference reader (an `Option`) takes it.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(BTreeMap::new()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        let mut problem = None;
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Val>()?;
            if problem.is_some() {
                continue; // drain the rest
            }
            match value {
                Val::Str(s) => match out.entry(key) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(s);
                    }
                    std::collections::btree_map::Entry::Occupied(o) => {
                        problem = Some(format!("key {:?} appears twice", o.key()));
                    }
                },
                other => {
                    let found = other.kind();
                    problem = Some(format!("value of {key:?} is {found}, expected a string"));
                }
            }
        }
        Ok(match problem {
            Some(p) => Err(p),
            None => Ok(out),
        })
    }
}

/// A tensor entry as read, before checking.
enum RawEntry {
    NotObject(&'static str),
    Object {
        dtype: Option<Val>,
        shape: Option<Val>,
        offsets: Option<Val>,
        duplicate_field: Option<&'static str>,
    },
}

struct EntrySeed;

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = RawEntry;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawEntry, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = RawEntry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tensor entry")
    }

    other_kinds!(RawEntry::NotObject; bool i64 u64 f64 str unit seq);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEntry, A::Error> {
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        let mut duplicate_field = None;
        while let Some(key) = map.next_key::<String>()? {
            let (slot, name) = match key.as_ref() {
                "dtype" => (&mut dtype, "dtype"),
                "shape" => (&mut shape, "shape"),
                "data_offsets" => (&mut offsets, "data_offsets"),
                _ => {
                    // Unknown fields are ignored, as the reference reader does.
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let value = map.next_value::<Val>()?;
            if slot.is_some() {
                duplicate_field.get_or_insert(name);
            } else {
                *slot = Some(value);
            }
        }
        Ok(RawEntry::Object {
            dtype,
            shape,
            offsets,
            duplicate_field,
        })
    }
}

/// A field value: a string, an array of at most [`MAX_SHAPE_DIMS`] non-negative integers (or
/// why it is not one), or another kind of value.
enum Val {
    Str(String),
    UInts(Vec<u64>),
    BadArray(String),
    Other(&'static str),
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::Str(_) => kind::STRING,
            Val::UInts(_) | Val::BadArray(_) => kind::ARRAY,
            Val::Other(k) => k,
        }
    }
}

impl<'de> de::Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Val, D::Error> {
        d.deserialize_any(ValVisitor)
    }
}

struct ValVisitor;

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    other_kinds!(Val::Other; bool i64 u64 f64 unit map);

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Val, E> {
        Ok(Val::Str(s.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val, A::Error> {
        let mut out = Vec::new();
        let mut problem = None;
        let mut i = 0usize;
        while let Some(e) = seq.next_element::<Elem>()? {
            if problem.is_none() {
                match e.0 {
                    _ if i >= MAX_SHAPE_DIMS => {
                        problem = Some(format!("has more than {MAX_SHAPE_DIMS} elements"));
                    }
                    Ok(v) => out.push(v),
                    Err(found) => {
                        problem = Some(format!(
                            "element {i} is {found}, expected a non-negative integer"
                        ));
                    }
                }
            }
            i += 1;
        }
        Ok(match problem {
            Some(p) => Val::BadArray(p),
            None => Val::UInts(out),
        })
    }
}

/// An array element: a non-negative integer, or the kind of value found.
struct Elem(Result<u64, &'static str>);

impl<'de> de::Deserialize<'de> for Elem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Elem, D::Error> {
        d.deserialize_any(ElemVisitor)
    }
}

struct ElemVisitor;

fn elem_err(found: &'static str) -> Elem {
    Elem(Err(found))
}

impl<'de> Visitor<'de> for ElemVisitor {
    type Value = Elem;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a non-negative integer")
    }

    other_kinds!(elem_err; bool str unit seq map);

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Elem, E> {
        Ok(Elem(Ok(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Elem, E> {
        Ok(Elem(u64::try_from(v).map_err(|_| kind::NEGATIVE)))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Elem, E> {
        Ok(Elem(Err(kind::FRACTION)))
    }
}

/// Check one entry on its own: fields present and typed, known dtype, element count without
/// overflow, offsets in order and inside the data section, byte count exact.
fn check_entry(
    file: &str,
    tensor: String,
    raw: RawEntry,
    data_len: usize,
) -> Result<StTensorInfo, SafetensorsError> {
    let bad = |tensor: String, reason: String| SafetensorsError::BadEntry {
        file: file.to_owned(),
        tensor,
        reason,
    };
    let (dtype, shape, offsets, duplicate_field) = match raw {
        RawEntry::NotObject(found) => {
            return Err(SafetensorsError::EntryNotObject {
                file: file.to_owned(),
                tensor,
                found,
            });
        }
        RawEntry::Object {
            dtype,
            shape,
            offsets,
            duplicate_field,
        } => (dtype, shape, offsets, duplicate_field),
    };
    if let Some(field) = duplicate_field {
        return Err(bad(tensor, format!("field {field:?} appears twice")));
    }
    let dtype = match dtype {
        None => return Err(bad(tensor, "missing \"dtype\"".to_owned())),
        Some(Val::Str(s)) => match StDtype::parse(&s) {
            Some(d) => d,
            None => {
                return Err(SafetensorsError::UnknownDtype {
                    file: file.to_owned(),
                    tensor,
                    dtype: s,
                });
            }
        },
        Some(v) => {
            let found = v.kind();
            return Err(bad(
                tensor,
                format!("\"dtype\" is {found}, expected a string"),
            ));
        }
    };
    let uints = |tensor: &str, field: &str, v: Option<Val>| match v {
        None => Err(bad(tensor.to_owned(), format!("missing {field:?}"))),
        Some(Val::UInts(u)) => Ok(u),
        Some(Val::BadArray(reason)) => Err(bad(tensor.to_owned(), format!("{field:?} {reason}"))),
        Some(v) => {
            let found = v.kind();
            Err(bad(
                tensor.to_owned(),
                format!("{field:?} is {found}, expected an array of non-negative integers"),
            ))
        }
    };
    let shape = uints(&tensor, "shape", shape)?;
    let offsets = uints(&tensor, "data_offsets", offsets)?;
    let [begin, end] = offsets[..] else {
        let n = offsets.len();
        return Err(bad(
            tensor,
            format!("\"data_offsets\" has {n} elements, expected [begin, end]"),
        ));
    };
    if end < begin {
        return Err(SafetensorsError::OffsetsReversed {
            file: file.to_owned(),
            tensor,
            begin,
            end,
        });
    }
    let overflow = |tensor: String, shape: Vec<u64>| SafetensorsError::ShapeOverflow {
        file: file.to_owned(),
        tensor,
        dtype,
        shape,
    };
    let dims: Option<Vec<usize>> = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    let Some(dims) = dims else {
        return Err(overflow(tensor, shape));
    };
    let Some(n_elements) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        return Err(overflow(tensor, shape));
    };
    let Some(bits) = n_elements.checked_mul(dtype.size_bits()) else {
        return Err(overflow(tensor, shape));
    };
    if bits % 8 != 0 {
        return Err(SafetensorsError::NotByteSized {
            file: file.to_owned(),
            tensor,
            dtype,
            n_elements,
            bits,
        });
    }
    let expected = bits / 8;
    if u64::try_from(expected).ok() != Some(end - begin) {
        return Err(SafetensorsError::SizeMismatch {
            file: file.to_owned(),
            tensor,
            dtype,
            shape: dims,
            expected,
            found: end - begin,
            begin,
            end,
        });
    }
    // `end` fits the data section, hence usize.
    let in_range = usize::try_from(end).is_ok_and(|e| e <= data_len);
    if !in_range {
        return Err(SafetensorsError::OffsetOutOfRange {
            file: file.to_owned(),
            tensor,
            begin,
            end,
            data_len,
        });
    }
    Ok(StTensorInfo {
        name: tensor,
        dtype,
        shape: dims,
        offset: begin as usize,
        n_bytes: expected,
    })
}

// ---------------------------------------------------------------------------------------------
// Writing

/// A tensor to write: its name, dtype, shape and bytes (little-endian, row-major).
#[derive(Clone, Debug)]
pub struct StWriteTensor<'a> {
    /// The name.
    pub name: String,
    /// The element type.
    pub dtype: StDtype,
    /// The shape, outermost first.
    pub shape: Vec<usize>,
    /// The data: exactly `n_elements * dtype bits / 8` bytes.
    pub data: Cow<'a, [u8]>,
}

impl<'a> StWriteTensor<'a> {
    /// A tensor borrowing or owning its data.
    pub fn new(
        name: impl Into<String>,
        dtype: StDtype,
        shape: impl Into<Vec<usize>>,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Self {
        StWriteTensor {
            name: name.into(),
            dtype,
            shape: shape.into(),
            data: data.into(),
        }
    }
}

/// The header bytes (length prefix included) and the tensors in the order their data follows.
fn prepare<'t, 'a>(
    file: &str,
    tensors: &'t [StWriteTensor<'a>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<&'t StWriteTensor<'a>>), SafetensorsError> {
    let mut names = std::collections::HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name == METADATA_KEY {
            return Err(SafetensorsError::ReservedName {
                file: file.to_owned(),
                tensor: t.name.clone(),
            });
        }
        if !names.insert(t.name.as_str()) {
            return Err(SafetensorsError::DuplicateTensor {
                file: file.to_owned(),
                tensor: t.name.clone(),
            });
        }
        let shape_u64 = || t.shape.iter().map(|&d| d as u64).collect();
        let n_elements = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let Some(bits) = n_elements.and_then(|n| n.checked_mul(t.dtype.size_bits())) else {
            return Err(SafetensorsError::ShapeOverflow {
                file: file.to_owned(),
                tensor: t.name.clone(),
                dtype: t.dtype,
                shape: shape_u64(),
            });
        };
        if bits % 8 != 0 {
            return Err(SafetensorsError::NotByteSized {
                file: file.to_owned(),
                tensor: t.name.clone(),
                dtype: t.dtype,
                n_elements: n_elements.unwrap_or_default(),
                bits,
            });
        }
        if bits / 8 != t.data.len() {
            return Err(SafetensorsError::WriteSizeMismatch {
                file: file.to_owned(),
                tensor: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                expected: bits / 8,
                found: t.data.len(),
            });
        }
    }
    // The reference writer's order: dtype descending (wider types first), then name.
    let mut order: Vec<&StWriteTensor> = tensors.iter().collect();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));

    // Compact JSON as serde_json writes the reference's header: "__metadata__" first, then
    // the tensors in data order, fields dtype, shape, data_offsets.
    let json_str = |s: &str| serde_json::Value::from(s).to_string();
    let mut h = String::from("{");
    h.push_str(&json_str(METADATA_KEY));
    h.push_str(":{");
    for (i, (k, v)) in metadata.iter().enumerate() {
        if i > 0 {
            h.push(',');
        }
        h.push_str(&json_str(k));
        h.push(':');
        h.push_str(&json_str(v));
    }
    h.push('}');
    let mut offset = 0usize;
    for t in &order {
        let end = offset + t.data.len();
        h.push(',');
        h.push_str(&json_str(&t.name));
        h.push_str(":{\"dtype\":");
        h.push_str(&json_str(t.dtype.name()));
        h.push_str(",\"shape\":[");
        for (i, d) in t.shape.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&d.to_string());
        }
        h.push_str(&format!("],\"data_offsets\":[{offset},{end}]}}"));
        offset = end;
    }
    h.push('}');
    // Pad with spaces to a multiple of 8, so the data section starts 8-aligned.
    let padded = h.len().next_multiple_of(N_LEN);
    let n = padded as u64;
    if n > MAX_HEADER_SIZE {
        return Err(SafetensorsError::HeaderTooLarge {
            file: file.to_owned(),
            header_len: n,
            max: MAX_HEADER_SIZE,
        });
    }
    let mut out = Vec::with_capacity(N_LEN + padded);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.resize(N_LEN + padded, b' ');
    Ok((out, order))
}

/// Serialize tensors and metadata to an in-memory safetensors file, laid out as
/// [`write_safetensors`] writes it.
pub fn safetensors_to_bytes(
    tensors: &[StWriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, SafetensorsError> {
    let (mut out, order) = prepare(IN_MEMORY, tensors, metadata)?;
    for t in order {
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// Writes a safetensors file the way the reference writer does: tensors sorted by dtype
/// descending (the reference `Dtype` order, see [`StDtype`]) then by name, data packed in that
/// order, the header JSON compact with `"__metadata__"` first (always written, `{}` when
/// `metadata` is empty) and padded with spaces to a multiple of 8 bytes.
///
/// The file is written to a temporary file in the same directory (`.NAME.tmp.PID.N`),
/// synced, and renamed into place at the end: a failed write never leaves a half file under
/// the final name, and a file that is already there (and mapped by a reader) is replaced
/// atomically. The temporary file is removed on failure.
///
/// Errors: a tensor named `__metadata__`, a duplicate name, data whose length disagrees with
/// the dtype and shape, a header above [`MAX_HEADER_SIZE`], or I/O.
pub fn write_safetensors(
    path: &Path,
    tensors: &[StWriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(), SafetensorsError> {
    let name = path.display().to_string();
    let (header, order) = prepare(&name, tensors, metadata)?;
    let io = |source| SafetensorsError::Io {
        file: name.clone(),
        source,
    };
    let (mut file, tmp) = create_temp(path).map_err(io)?;
    let written = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        w.write_all(&header)?;
        for t in &order {
            w.write_all(&t.data)?;
        }
        w.flush()?;
        drop(w);
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp.0, path)
    })();
    match written {
        Ok(()) => {
            tmp.disarm();
            Ok(())
        }
        Err(e) => Err(io(e)), // `tmp` removes the temporary file when dropped
    }
}

/// A temporary file that is removed when dropped, unless disarmed.
struct TempPath(PathBuf);

impl TempPath {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Create a new, unique temporary file beside `path`.
fn create_temp(path: &Path) -> std::io::Result<(File, TempPath)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(file_name) = path.file_name() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the output path has no file name",
        ));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp.{pid}.{n}"));
        let tmp = dir.join(tmp_name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, TempPath(tmp))),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}
