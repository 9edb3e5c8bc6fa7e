//! The GGUF writer: a builder that collects metadata and tensors and writes a v3 (or v2) file
//! with correct alignment.

use std::io::Write;
use std::path::Path;

use ember_quant::GgmlType;

use crate::error::GgufWriteError;
use crate::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::value::{MetaArray, MetaValue};

/// A tensor queued for writing.
#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file.
///
/// Metadata keys keep insertion order; setting a key that already exists replaces its value in
/// place. The alignment comes from `general.alignment` (set it with
/// [`GgufWriter::set_alignment`] or as a u32 metadata value), default 32. Tensor data is
/// written in insertion order, each tensor starting at a multiple of the alignment.
///
/// ```
/// use ember_formats::{GgufFile, GgufWriter};
/// use ember_quant::GgmlType;
///
/// let mut w = GgufWriter::new();
/// w.add("general.architecture", "llama");
/// w.add("llama.block_count", 2u32);
/// w.add_tensor("tok_embd.weight", &[4, 2], GgmlType::F32, vec![0u8; 32]).unwrap();
/// let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
/// assert_eq!(f.architecture(), Some("llama"));
/// assert_eq!(f.tensor("tok_embd.weight").unwrap().n_elements(), 8);
/// ```
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file.
    pub fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Write this version (2 or 3; the encodings are identical for little-endian files).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Set a metadata value (replacing an existing one with the same key, in place).
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key, value));
        }
        self
    }

    /// Set a string array value.
    pub fn add_string_array<I, S>(&mut self, key: impl Into<String>, values: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.add(
            key,
            MetaValue::Array(MetaArray::String(values.into_iter().collect())),
        )
    }

    /// Set an array value.
    pub fn add_array(&mut self, key: impl Into<String>, values: impl Into<MetaArray>) -> &mut Self {
        self.add(key, MetaValue::Array(values.into()))
    }

    /// Set `general.alignment` (a non-zero power of two; checked when writing).
    pub fn set_alignment(&mut self, alignment: u32) -> &mut Self {
        self.add(ALIGNMENT_KEY, MetaValue::U32(alignment))
    }

    /// Queue a tensor. `dims` are in ggml order (`dims[0]` is the row length); `data` must be
    /// exactly the size the dims and type imply.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
        data: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, GgufWriteError> {
        let name = name.into();
        let data = data.into();
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufWriteError::DuplicateTensor(name));
        }
        if dims.len() > MAX_DIMS as usize {
            return Err(GgufWriteError::TooManyDims {
                tensor: name,
                n_dims: dims.len(),
                limit: MAX_DIMS as usize,
            });
        }
        let bad_dims = || GgufWriteError::BadDims {
            tensor: name.clone(),
            dims: dims.to_vec(),
            ggml_type,
        };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(bad_dims)?;
        if !dims
            .first()
            .copied()
            .unwrap_or(1)
            .is_multiple_of(ggml_type.block_size() as u64)
        {
            return Err(bad_dims());
        }
        let expected = ggml_type.bytes_for(n_elements).ok_or_else(bad_dims)?;
        if expected != data.len() as u64 {
            return Err(GgufWriteError::SizeMismatch {
                tensor: name,
                expected,
                got: data.len() as u64,
            });
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        Ok(self)
    }

    fn alignment(&self) -> Result<u64, GgufWriteError> {
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, MetaValue::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some((_, v)) => Err(GgufWriteError::BadAlignment(format!(
                "{v:?} (must be a u32 non-zero power of two)"
            ))),
        }
    }

    /// Write the file.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<(), GgufWriteError> {
        if !matches!(self.version, 2 | 3) {
            return Err(GgufWriteError::UnsupportedVersion(self.version));
        }
        let alignment = self.alignment()?;

        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC);
        head.extend_from_slice(&self.version.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&v.meta_type().id().to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + t.data.len() as u64, alignment);
        }
        let data_offset = align_up(head.len() as u64, alignment);
        head.resize(data_offset as usize, 0);
        w.write_all(&head)?;

        let mut written = 0u64;
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            write_zeros(&mut w, off - written)?;
            w.write_all(&t.data)?;
            written = off + t.data.len() as u64;
        }
        // Pad the end so the file length is a multiple of the alignment (as gguf-py does).
        write_zeros(&mut w, align_up(written, alignment) - written)?;
        w.flush()?;
        Ok(())
    }

    /// Write the file to memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufWriteError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    /// Write the file to `path` (created or truncated).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufWriteError> {
        let path = path.as_ref();
        let io = |source| GgufWriteError::IoPath {
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::File::create(path).map_err(io)?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w).map_err(|e| match e {
            GgufWriteError::Io(source) => io(source),
            e => e,
        })?;
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn write_zeros<W: Write>(w: &mut W, mut n: u64) -> std::io::Result<()> {
    const Z: [u8; 256] = [0; 256];
    while n > 0 {
        let k = n.min(Z.len() as u64) as usize;
        w.write_all(&Z[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&a.element_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => each!(v),
        MetaArray::U16(v) => each!(v),
        MetaArray::I16(v) => each!(v),
        MetaArray::U32(v) => each!(v),
        MetaArray::I32(v) => each!(v),
        MetaArray::F32(v) => each!(v),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        MetaArray::String(v) => {
            for s in v.iter() {
                put_str(out, s);
            }
        }
        MetaArray::Array(v) => {
            for inner in v {
                put_array(out, inner);
            }
        }
        MetaArray::U64(v) => each!(v),
        MetaArray::I64(v) => each!(v),
        MetaArray::F64(v) => each!(v),
    }
}
