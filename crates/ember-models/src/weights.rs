//! Typed access to a GGUF file's tensors: quantized matrices stay in the memory map, small
//! vectors (norm weights) are copied into burn tensors.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use ember_formats::{GgufFile, TensorInfo};
use ember_kernels::{QuantMatrix, QuantMatrixError, SharedBytes};

use crate::placement::is_cpu;
use crate::{ModelError, Placement};

/// Shape-checked access to a GGUF file's tensors, for architecture loaders: a missing tensor
/// or a shape other than the one asked for is an error naming the tensor.
pub struct Weights<'a> {
    file: &'a GgufFile,
    external: Option<&'a ExternalWeights>,
    placement: Placement,
    repack: bool,
    /// Bytes of the repacked copies made so far.
    repacked_bytes: std::cell::Cell<u64>,
}

/// The embedding: looked up by rows, never multiplied unless tied to the head (which
/// [`Weights::head_from_embedding`] then makes).
const EMBEDDING: &str = "token_embd.weight";

/// Weight matrices supplied beside a GGUF file's own tensors, by GGUF tensor name: how a
/// checkpoint directory runs, its linear layers left where they lie in the safetensors files
/// (dense rows, or AWQ/GPTQ/EXL2 packs) while a small in-memory GGUF carries the metadata,
/// tokenizer and norm vectors. A name found here wins over the file's tensor of that name.
#[derive(Clone, Debug, Default)]
pub struct ExternalWeights {
    matrices: HashMap<String, Arc<QuantMatrix>>,
    /// The Q and K projections keep Hugging Face's row order (rotary pairs `(i, i + d/2)`)
    /// instead of the interleaved order GGUF converters permute llama's into: the model then
    /// rotates them NeoX-style, which is the same arithmetic on the same pairs.
    pub hf_qk_order: bool,
}

impl ExternalWeights {
    /// No matrices, GGUF row order.
    pub fn new() -> Self {
        Self::default()
    }

    /// Supplies `name` (a GGUF tensor name such as `blk.0.attn_q.weight`).
    pub fn insert(&mut self, name: impl Into<String>, matrix: Arc<QuantMatrix>) {
        self.matrices.insert(name.into(), matrix);
    }

    /// The matrix supplied for `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<QuantMatrix>> {
        self.matrices.get(name)
    }

    /// Names and matrices, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<QuantMatrix>)> {
        self.matrices.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many matrices are supplied.
    pub fn len(&self) -> usize {
        self.matrices.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.matrices.is_empty()
    }
}

impl<'a> Weights<'a> {
    /// Tensors of `file`; vectors are created on `device`.
    pub fn new(file: &'a GgufFile, device: &Device) -> Self {
        Self {
            file,
            external: None,
            placement: Placement::single(device),
            repack: true,
            repacked_bytes: Default::default(),
        }
    }

    /// Tensors of `file`, with `external`'s matrices before the file's own.
    pub fn with_external(
        file: &'a GgufFile,
        external: &'a ExternalWeights,
        device: &Device,
    ) -> Self {
        Self {
            file,
            external: Some(external),
            placement: Placement::single(device),
            repack: true,
            repacked_bytes: Default::default(),
        }
    }

    /// Whether the file's matrices are repacked at load for this CPU's kernels
    /// ([`QuantMatrix::repack`]; on by default, as llama.cpp's CPU_REPACK). Off keeps every
    /// weight a zero-copy view of the mapping.
    pub fn with_repack(mut self, repack: bool) -> Self {
        self.repack = repack;
        self
    }

    /// Puts each tensor on the device `placement` gives it (see [`Placement::tensor`]) instead
    /// of every one on the device given at construction.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Where the tensors go.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Repacks `m`, the file's bytes at `range`, if repacking is on and this CPU's kernels
    /// have a layout for its type, letting the mapping's pages of `range` go as they are
    /// copied (so memory peaks near the final size): the kernels read the copy, and the rare
    /// readers of the blocks (dequantization, an embedding lookup) fault back in only what
    /// they touch.
    ///
    /// On a GPU `device` nothing is repacked: the blocks go to the device as they are, now
    /// rather than at the first pass.
    fn repacked(&self, mut m: QuantMatrix, range: Range<usize>, device: &Device) -> QuantMatrix {
        #[cfg(feature = "cube")]
        if m.upload(device) {
            return m;
        }
        let _ = device;
        let file = self.file.shared_bytes();
        let release = |r: Range<usize>| file.release(range.start + r.start..range.start + r.end);
        if self.repack && m.repack_releasing(&release) {
            let total = self.repacked_bytes.get() + m.repacked_bytes() as u64;
            self.repacked_bytes.set(total);
        }
        m
    }

    /// Bytes of the repacked copies of the matrices loaded so far.
    pub fn repacked_bytes(&self) -> u64 {
        self.repacked_bytes.get()
    }

    /// The output head tied to the embedding `embd` (the file's `token_embd.weight`): the
    /// same blocks, repacked for the matmul when repacking is on, while the embedding's
    /// lookups keep reading the blocks.
    pub fn head_from_embedding(&self, embd: &Arc<QuantMatrix>) -> Arc<QuantMatrix> {
        let in_file = self.external.is_none_or(|e| e.get(EMBEDDING).is_none());
        match self
            .file
            .tensor(EMBEDDING)
            .and_then(|t| self.file.tensor_range(t))
        {
            Some(range) if in_file && (self.repack || !is_cpu(self.placement.head())) => {
                Arc::new(self.repacked((**embd).clone(), range, self.placement.head()))
            }
            _ => Arc::clone(embd),
        }
    }

    /// The GGUF file behind the weights.
    pub fn file(&self) -> &'a GgufFile {
        self.file
    }

    /// The device tensor `name` is created on.
    pub fn device(&self, name: &str) -> &Device {
        self.placement.tensor(name)
    }

    /// The supplied matrices, if any.
    pub fn external(&self) -> Option<&'a ExternalWeights> {
        self.external
    }

    /// Bytes of every weight: the file's tensors (those no supplied matrix replaces) and the
    /// supplied matrices' storage (see [`crate::Model::weight_bytes`]).
    pub fn total_bytes(&self) -> u64 {
        let supplied = |name: &str| self.external.is_some_and(|e| e.get(name).is_some());
        let in_file: u64 = self
            .file
            .tensors()
            .iter()
            .filter(|t| !supplied(&t.name))
            .map(|t| t.n_bytes)
            .sum();
        let external: u64 = self
            .external
            .into_iter()
            .flat_map(|e| e.iter())
            .map(|(_, m)| m.storage_bytes() as u64)
            .sum();
        in_file + external
    }

    /// The shape of tensor `name` in GGUF order (`[cols, rows]` for a matrix), wherever it is.
    pub fn dims(&self, name: &str) -> Option<Vec<u64>> {
        if let Some(m) = self.external.and_then(|e| e.get(name)) {
            return Some(vec![m.cols() as u64, m.rows() as u64]);
        }
        self.file.tensor(name).map(|t| t.dims.clone())
    }

    fn info(&self, name: &str) -> Result<&'a TensorInfo, ModelError> {
        self.file
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// Whether the file has a tensor `name` (for optional weights: biases, an untied head).
    pub fn has(&self, name: &str) -> bool {
        self.external.is_some_and(|e| e.get(name).is_some()) || self.file.tensor(name).is_some()
    }

    /// A `rows x cols` matrix (`dims == [cols, rows]` in GGUF order), left in the mapping.
    pub fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Arc<QuantMatrix>, ModelError> {
        self.matrix_rows(name, rows, cols, 0..rows)
    }

    /// Rows `part` of a `rows x cols` matrix as a matrix of its own, viewing the same bytes:
    /// one part of a fused weight (`attn_qkv`, Phi-3's gate-and-up `ffn_up`).
    pub fn matrix_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        part: Range<usize>,
    ) -> Result<Arc<QuantMatrix>, ModelError> {
        if let Some(m) = self.external.and_then(|e| e.get(name)) {
            if (m.rows(), m.cols()) != (rows, cols) || part != (0..rows) {
                // Supplied matrices are whole linear layers: no architecture that runs from a
                // checkpoint directory fuses them, and a packed layout cannot be sliced by rows.
                return Err(ModelError::BadShape {
                    name: name.to_string(),
                    got: vec![m.cols() as u64, m.rows() as u64],
                    expected: vec![cols as u64, part.len() as u64],
                });
            }
            return Ok(Arc::clone(m));
        }
        let info = self.info(name)?;
        if info.dims != [cols as u64, rows as u64] {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                got: info.dims.clone(),
                expected: vec![cols as u64, rows as u64],
            });
        }
        let missing = || ModelError::MissingTensor(name.to_string());
        // The reader checked every tensor's range against the file when it opened it.
        let range = self.file.tensor_range(info).ok_or_else(missing)?;
        let ty = info.ggml_type;
        let row_bytes = ty
            .bytes_for(cols as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| ModelError::Weight {
                name: name.to_string(),
                source: QuantMatrixError::PartialBlock {
                    ty,
                    cols,
                    block: ty.block_size(),
                },
            })?;
        if part.start > part.end || part.end > rows {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                got: info.dims.clone(),
                expected: vec![cols as u64, part.end as u64],
            });
        }
        let start = range.start + part.start * row_bytes;
        let len = part.len() * row_bytes;
        let bytes =
            SharedBytes::new(Arc::new(self.file.shared_bytes()), start, len).ok_or_else(missing)?;
        let m =
            QuantMatrix::new(bytes, ty, part.len(), cols).map_err(|source| ModelError::Weight {
                name: name.to_string(),
                source,
            })?;
        if name == EMBEDDING {
            return Ok(Arc::new(m));
        }
        Ok(Arc::new(self.repacked(
            m,
            start..start + len,
            self.placement.tensor(name),
        )))
    }

    /// [`vector`](Self::vector) for a tensor the file may leave out (an optional bias).
    pub fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Tensor<1>>, ModelError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A 1-D vector of `len` values (norm weights), dequantized into a burn tensor.
    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor<1>, ModelError> {
        let values = self.host_vector(name, len)?;
        Ok(Tensor::from_data(
            TensorData::new(values, [len]),
            self.placement.tensor(name),
        ))
    }

    /// A 1-D vector of `len` values, dequantized to f32 on the host (parameters a kernel takes
    /// as numbers, such as RoPE's frequency factors).
    pub fn host_vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        if info.dims != [len as u64] {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                got: info.dims.clone(),
                expected: vec![len as u64],
            });
        }
        let mut values = vec![0.0f32; len];
        ember_quant::dequantize(info.ggml_type, self.file.tensor_data(info), &mut values).map_err(
            |_| ModelError::UnsupportedType {
                name: name.to_string(),
                ty: info.ggml_type,
            },
        )?;
        Ok(values)
    }
}
