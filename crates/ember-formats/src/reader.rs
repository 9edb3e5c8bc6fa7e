//! The GGUF reader: parses the header (metadata and tensor infos) of a memory-mapped or
//! in-memory file and hands out zero-copy views of tensor data.

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::Arc;

use ember_quant::GgmlType;

use crate::error::GgufError;
use crate::value::{MetaArray, MetaType, MetaValue, StringArray};

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Maximum number of tensor dimensions (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Maximum nesting of metadata arrays (an array of arrays is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest possible encoding of one metadata entry: key length (8), value type (4), and a
/// one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoding of one tensor info: name length (8), n_dims (4), type (4),
/// offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// The bytes behind a [`GgufFile`]: a read-only memory map or an owned buffer.
pub(crate) enum Backing {
    /// A read-only shared mapping of a file (`map_file`), never written through: dropping its
    /// pages (`SharedBytes::release`) loses nothing.
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A cheaply clonable, reference-counted handle to the whole file's bytes.
///
/// Holding a `SharedBytes` keeps the memory mapping (or buffer) alive even after the
/// [`GgufFile`] it came from is dropped, so a consumer can keep zero-copy weight views without
/// borrowing the `GgufFile`. Dereferences to `[u8]`.
#[derive(Clone)]
pub struct SharedBytes(Arc<Backing>);

impl SharedBytes {
    pub(crate) fn new(backing: Backing) -> Self {
        SharedBytes(Arc::new(backing))
    }

    /// Lets the operating system drop the resident pages of `range` of a memory-mapped file
    /// (pages it shares with bytes outside `range` included): the bytes stay readable and the
    /// same, read back from the file when next touched. For weights copied elsewhere at load
    /// (repacked), so that the copy does not double the resident memory. A hint: an owned
    /// buffer, a range past the end or a refusal by the system leaves everything as it is.
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        if let Backing::Mmap(map) = &*self.0
            && range.start < range.end
            && range.end <= map.len()
        {
            // SAFETY: `map_file` maps the file read-only and shared (`Mmap::map`: no private
            // copy-on-write pages), so dropping its pages loses nothing: the next read faults
            // the file's unchanged bytes back in, and references into the mapping stay valid.
            #[allow(unsafe_code)]
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.end - range.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len())
    }
}

/// An owned, zero-copy view of one tensor's data: a [`SharedBytes`] plus a byte range.
/// Keeps the mapping alive; dereferences to `[u8]`.
#[derive(Clone)]
pub struct SharedSlice {
    bytes: SharedBytes,
    range: Range<usize>,
}

impl SharedSlice {
    /// The whole file this slice points into.
    pub fn file_bytes(&self) -> &SharedBytes {
        &self.bytes
    }

    /// The byte range inside the file.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }
}

impl Deref for SharedSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes.get(self.range.clone()).unwrap_or(&[])
    }
}

impl AsRef<[u8]> for SharedSlice {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for SharedSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedSlice({:?})", self.range)
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to [`GgufFile::data_offset`].
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of dims; 1 for zero dims). Validated not to overflow when
    /// the file was parsed.
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Number of rows (`n_elements / dims[0]`; 0 if `dims[0]` is 0).
    pub fn n_rows(&self) -> u64 {
        match self.dims.first() {
            Some(&0) => 0,
            Some(&d0) => self.n_elements() / d0,
            None => 1,
        }
    }
}

/// A parsed GGUF file (v2 or v3, little-endian).
///
/// The header is parsed and validated eagerly; tensor data stays in the mapping and is
/// handed out as zero-copy slices. Every tensor's range was checked to lie inside the file.
pub struct GgufFile {
    bytes: SharedBytes,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.bytes.len())
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and parse the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len == 0 {
            // Mapping an empty file is an error on some platforms; parse an empty buffer to
            // get the usual "truncated magic" error instead.
            return Self::from_backing(Backing::Owned(Vec::new()));
        }
        let map = map_file(&file).map_err(io_err)?;
        Self::from_backing(Backing::Mmap(map))
    }

    /// Parse a file held in memory (tests, fuzzing, downloads).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(backing: Backing) -> Result<GgufFile, GgufError> {
        let bytes = SharedBytes(Arc::new(backing));
        let header = parse(&bytes)?;
        Ok(GgufFile {
            bytes,
            version: header.version,
            metadata: header.metadata,
            meta_index: header.meta_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata entries, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        let &i = self.meta_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// Any integer value that fits in u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    /// Any integer value that fits in u64.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Any integer value that fits in i32.
    pub fn get_i32(&self, key: &str) -> Option<i32> {
        self.get(key)?.as_i32()
    }

    /// Any integer value that fits in i64.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// An f32 value (an f64 value is narrowed).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// An f64 or f32 value.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// An array value.
    pub fn get_array(&self, key: &str) -> Option<&MetaArray> {
        self.get(key)?.as_array()
    }

    /// A string array, as borrowed strings.
    pub fn get_string_array(&self, key: &str) -> Option<Vec<&str>> {
        Some(self.get_array(key)?.as_strings()?.to_vec())
    }

    /// An integer array whose elements all fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?.to_i32_vec()
    }

    /// An integer array whose elements all fit in u32.
    pub fn get_u32_array(&self, key: &str) -> Option<Vec<u32>> {
        self.get_array(key)?.to_u32_vec()
    }

    /// A float (or integer) array as f32.
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?.to_f32_vec()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info for a name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let &i = self.tensor_index.get(name)?;
        self.tensors.get(i)
    }

    /// Absolute byte range of a tensor's data, `None` if `info` does not fit this file
    /// (only possible for an info that did not come from this file).
    pub fn tensor_range(&self, info: &TensorInfo) -> Option<Range<usize>> {
        let start = self.data_offset.checked_add(info.offset)?;
        let end = start.checked_add(info.n_bytes)?;
        if end > self.bytes.len() as u64 {
            return None;
        }
        Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    /// Zero-copy view of a tensor's data. Empty if `info` did not come from this file and does
    /// not fit it.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        self.tensor_range(info)
            .and_then(|r| self.bytes.get(r))
            .unwrap_or(&[])
    }

    /// Zero-copy view of a tensor's data that owns a reference to the mapping, so it can
    /// outlive this `GgufFile`.
    pub fn shared_tensor_data(&self, info: &TensorInfo) -> SharedSlice {
        SharedSlice {
            bytes: self.bytes.clone(),
            range: self.tensor_range(info).unwrap_or(0..0),
        }
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A reference-counted handle to the whole file: clone it to keep the memory mapping alive
    /// independently of this `GgufFile` (e.g. for weights that are used zero-copy after the
    /// header has been dropped). Pair it with [`GgufFile::tensor_range`] to locate tensors.
    pub fn shared_bytes(&self) -> SharedBytes {
        self.bytes.clone()
    }
}

#[allow(unsafe_code)]
pub(crate) fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only (`Mmap::map`: shared, never written through, so
    // `SharedBytes::release` only drops pages the file gives back). memmap2 requires that the
    // file is not modified or truncated while mapped; a model file being rewritten under a
    // running engine is outside our contract (the same contract llama.cpp's mmap loader has).
    // All parsing is bounds-checked against the mapping's length, so any content is safe.
    unsafe { memmap2::Mmap::map(file) }
}

/// The parsed header.
struct Header {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let available = self.remaining();
        let truncated = || GgufError::Truncated {
            what,
            offset: self.pos as u64,
            needed: n,
            available,
            context: String::new(),
        };
        if n > available {
            return Err(truncated());
        }
        let end = self.pos.checked_add(n as usize).ok_or_else(truncated)?;
        let s = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.arr(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.arr(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length then UTF-8 bytes.
    fn str(&mut self, what: &'static str) -> Result<&'a str, GgufError> {
        let len = self.u64(what)?;
        let start = self.offset();
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what,
            offset: start,
            context: String::new(),
        })
    }

    /// Validate that `count` items of at least `min_each` bytes fit in what remains, and
    /// return the count as usize. `count_offset` is where the count was read from.
    fn check_count(
        &self,
        count: u64,
        min_each: u64,
        count_offset: u64,
        what: &'static str,
    ) -> Result<usize, GgufError> {
        let remaining = self.remaining();
        match count.checked_mul(min_each) {
            Some(total) if total <= remaining => {
                usize::try_from(count).map_err(|_| unreachable_count())
            }
            _ => Err(GgufError::CountTooLarge {
                what,
                count,
                offset: count_offset,
                min_bytes_each: min_each,
                remaining,
                context: String::new(),
            }),
        }
    }
}

/// A count that fits the file always fits usize; this only exists to avoid a panic path.
fn unreachable_count() -> GgufError {
    GgufError::CountTooLarge {
        what: "item",
        count: u64::MAX,
        offset: 0,
        min_bytes_each: 1,
        remaining: 0,
        context: String::new(),
    }
}

fn parse(buf: &[u8]) -> Result<Header, GgufError> {
    let mut cur = Cursor { buf, pos: 0 };

    let magic = match cur.take(4, "magic") {
        Ok(m) => m,
        Err(_) => {
            return Err(GgufError::BadMagic {
                found: buf.to_vec(),
            });
        }
    };
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }

    let version = cur.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "GGUF v1 (32-bit counts and lengths) is obsolete; re-convert the model \
                         (only v2 and v3 are supported)",
            });
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::BigEndian {
                raw: v,
                version: v.swap_bytes(),
            });
        }
        _ => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "only versions 2 and 3 are supported",
            });
        }
    }

    let tensors_offset = cur.offset();
    let n_tensors = cur.u64("tensor count")?;
    let kv_offset = cur.offset();
    let n_kv = cur.u64("metadata entry count")?;
    let n_kv = cur.check_count(n_kv, MIN_KV_BYTES, kv_offset, "metadata entry")?;
    let n_tensors = cur.check_count(
        n_tensors,
        MIN_TENSOR_INFO_BYTES,
        tensors_offset,
        "tensor info",
    )?;

    // Metadata.
    let mut metadata = Vec::with_capacity(n_kv);
    let mut meta_index = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key_offset = cur.offset();
        let key = cur
            .str("metadata key")
            .map_err(|e| e.with_context(|| format!("metadata entry #{i}")))?;
        let value = read_kv_value(&mut cur)
            .map_err(|e| e.with_context(|| format!("metadata key {key:?}")))?;
        if meta_index.insert(key.to_owned(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey {
                key: key.to_owned(),
                offset: key_offset,
            });
        }
        metadata.push((key.to_owned(), value));
    }

    // Alignment.
    let alignment = match meta_index.get(ALIGNMENT_KEY).and_then(|&i| metadata.get(i)) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => {
            let a = match v.as_integer() {
                Some(a) => a,
                None => {
                    return Err(GgufError::WrongMetaType {
                        key: ALIGNMENT_KEY.to_owned(),
                        expected: "u32",
                        found: v.meta_type().name(),
                    });
                }
            };
            match u32::try_from(a) {
                Ok(a) if a.is_power_of_two() => u64::from(a),
                _ => {
                    return Err(GgufError::BadAlignment {
                        value: u64::try_from(a).unwrap_or(0),
                    });
                }
            }
        }
    };

    // Tensor infos.
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info_offset = cur.offset();
        let info = read_tensor_info(&mut cur, info_offset)
            .map_err(|e| e.with_context(|| format!("tensor info #{i}")))?;
        if let Some(first) = tensor_index.insert(info.name.clone(), i) {
            return Err(GgufError::DuplicateTensor {
                name: info.name,
                first,
                second: i,
            });
        }
        tensors.push(info);
    }

    // Data section.
    let header_end = cur.offset();
    let data_offset = header_end
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or(GgufError::BadAlignment { value: alignment })?;
    let file_len = buf.len() as u64;
    for t in &tensors {
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    data_offset,
                    offset: t.offset,
                    n_bytes: t.n_bytes,
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }

    Ok(Header {
        version,
        metadata,
        meta_index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

fn read_meta_type(cur: &mut Cursor<'_>, what: &'static str) -> Result<MetaType, GgufError> {
    let offset = cur.offset();
    let id = cur.u32(what)?;
    MetaType::from_id(id).ok_or(GgufError::UnknownValueType {
        type_id: id,
        offset,
        context: String::new(),
    })
}

fn read_kv_value(cur: &mut Cursor<'_>) -> Result<MetaValue, GgufError> {
    let ty = read_meta_type(cur, "metadata value type")?;
    read_value(cur, ty)
}

fn read_value(cur: &mut Cursor<'_>, ty: MetaType) -> Result<MetaValue, GgufError> {
    const W: &str = "metadata value";
    Ok(match ty {
        MetaType::U8 => MetaValue::U8(u8::from_le_bytes(cur.arr(W)?)),
        MetaType::I8 => MetaValue::I8(i8::from_le_bytes(cur.arr(W)?)),
        MetaType::U16 => MetaValue::U16(u16::from_le_bytes(cur.arr(W)?)),
        MetaType::I16 => MetaValue::I16(i16::from_le_bytes(cur.arr(W)?)),
        MetaType::U32 => MetaValue::U32(u32::from_le_bytes(cur.arr(W)?)),
        MetaType::I32 => MetaValue::I32(i32::from_le_bytes(cur.arr(W)?)),
        MetaType::F32 => MetaValue::F32(f32::from_le_bytes(cur.arr(W)?)),
        MetaType::Bool => MetaValue::Bool(u8::from_le_bytes(cur.arr(W)?) != 0),
        MetaType::String => MetaValue::String(cur.str("metadata string value")?.to_owned()),
        MetaType::Array => MetaValue::Array(read_array(cur, 1)?),
        MetaType::U64 => MetaValue::U64(u64::from_le_bytes(cur.arr(W)?)),
        MetaType::I64 => MetaValue::I64(i64::from_le_bytes(cur.arr(W)?)),
        MetaType::F64 => MetaValue::F64(f64::from_le_bytes(cur.arr(W)?)),
    })
}

/// Decode `count` fixed-size little-endian elements.
fn fixed<const N: usize, T>(
    cur: &mut Cursor<'_>,
    count: usize,
    conv: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    // `count * N` was validated against the remaining bytes by `check_count`.
    let bytes = cur.take((count as u64) * (N as u64), "array elements")?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            conv(a)
        })
        .collect())
}

fn read_array(cur: &mut Cursor<'_>, depth: usize) -> Result<MetaArray, GgufError> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep {
            limit: MAX_ARRAY_DEPTH,
            offset: cur.offset(),
            context: String::new(),
        });
    }
    let ty = read_meta_type(cur, "array element type")?;
    let count_offset = cur.offset();
    let count = cur.u64("array length")?;
    let n = cur.check_count(count, ty.min_size() as u64, count_offset, "array element")?;
    Ok(match ty {
        MetaType::U8 => MetaArray::U8(fixed(cur, n, u8::from_le_bytes)?),
        MetaType::I8 => MetaArray::I8(fixed(cur, n, i8::from_le_bytes)?),
        MetaType::U16 => MetaArray::U16(fixed(cur, n, u16::from_le_bytes)?),
        MetaType::I16 => MetaArray::I16(fixed(cur, n, i16::from_le_bytes)?),
        MetaType::U32 => MetaArray::U32(fixed(cur, n, u32::from_le_bytes)?),
        MetaType::I32 => MetaArray::I32(fixed(cur, n, i32::from_le_bytes)?),
        MetaType::F32 => MetaArray::F32(fixed(cur, n, f32::from_le_bytes)?),
        MetaType::Bool => MetaArray::Bool(fixed(cur, n, |[b]: [u8; 1]| b != 0)?),
        MetaType::U64 => MetaArray::U64(fixed(cur, n, u64::from_le_bytes)?),
        MetaType::I64 => MetaArray::I64(fixed(cur, n, i64::from_le_bytes)?),
        MetaType::F64 => MetaArray::F64(fixed(cur, n, f64::from_le_bytes)?),
        MetaType::String => {
            let mut a = StringArray::with_capacity(n);
            for i in 0..n {
                let s = cur
                    .str("array string element")
                    .map_err(|e| e.with_context(|| format!("array element #{i}")))?;
                a.push(s);
            }
            MetaArray::String(a)
        }
        MetaType::Array => {
            let mut v = Vec::new();
            for _ in 0..n {
                v.push(read_array(cur, depth + 1)?);
            }
            MetaArray::Array(v)
        }
    })
}

fn read_tensor_info(cur: &mut Cursor<'_>, info_offset: u64) -> Result<TensorInfo, GgufError> {
    let name = cur.str("tensor name")?.to_owned();
    let n_dims = cur.u32("tensor n_dims")?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: name,
            n_dims,
            limit: MAX_DIMS,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(cur.u64("tensor dimension")?);
    }
    let type_id = cur.u32("tensor type")?;
    let offset = cur.u64("tensor data offset")?;
    let Some(ggml_type) = GgmlType::from_id(type_id) else {
        return Err(GgufError::UnknownTensorType {
            tensor: name,
            type_id,
            offset: info_offset,
        });
    };
    // ggml stores ne as int64: the element count must fit in i64.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    let Some(n_elements) = n_elements else {
        return Err(GgufError::DimsOverflow { tensor: name, dims });
    };
    let block_size = ggml_type.block_size() as u64;
    let dim0 = dims.first().copied().unwrap_or(1);
    if !dim0.is_multiple_of(block_size) {
        return Err(GgufError::NotBlockMultiple {
            tensor: name,
            ggml_type,
            dim0,
            block_size,
        });
    }
    let Some(n_bytes) = ggml_type.bytes_for(n_elements) else {
        return Err(GgufError::DimsOverflow { tensor: name, dims });
    };
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_bytes,
    })
}
