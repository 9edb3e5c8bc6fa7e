//! A model file opened for use: the mapping, the model on a device, its tokenizer and its chat
//! template.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use ember_convert::{ConvertError, ImageOptions, LinearWeight, QuantScheme};
use ember_formats::checkpoint::Checkpoint;
use ember_formats::{GgufError, GgufFile};
use ember_kernels::{QuantMatrix, QuantMatrixError, SharedBytes};
use ember_models::{ExternalWeights, Model, ModelError};

use crate::chat::{BuiltinTemplate, ChatError, ChatTemplate};
use crate::tokenizer::{GgufTokenizer, TokenizerError};

/// Why [`LoadedModel::open`] failed; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The cause is part of the message and deliberately not `source`: callers print the
    // error chain, which would show it twice.
    /// The file could not be read or is not valid GGUF.
    #[error("{path}: {error}")]
    File {
        /// The file, as displayed.
        path: String,
        /// What the GGUF reader reported.
        error: GgufError,
    },
    /// The architecture is unsupported, or its weights or hyperparameters are unusable.
    #[error("{path}: {error}")]
    Model {
        /// The file, as displayed.
        path: String,
        /// What the model loader reported.
        error: ModelError,
    },
    /// A checkpoint directory could not be read: its files, config, tokenizer or quantized
    /// tensors.
    #[error("{path}: {error}")]
    Checkpoint {
        /// The directory, as displayed.
        path: String,
        /// What the checkpoint reader reported (boxed: it is large, and rare).
        error: Box<ConvertError>,
    },
    /// The tokenizer metadata is missing or unusable.
    #[error("{path}: tokenizer: {error}")]
    Tokenizer {
        /// The file, as displayed.
        path: String,
        /// What the tokenizer builder reported.
        error: TokenizerError,
    },
}

/// What [`LoadedModel::weight_summary`] counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSummary {
    /// Bytes the weights take (packed, as stored).
    pub bytes: u64,
    /// Parameters.
    pub params: u64,
    /// The storage type of `blk.0.ffn_down.weight` (`Q4_1`, `F16`, `AWQ 4-bit g64`, ...).
    pub type_name: String,
}

/// How [`LoadedModel::open_with`] loads a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// For a quantized checkpoint directory (AWQ, GPTQ, EXL2, compressed-tensors): dequantize
    /// its linear layers to F16 at load instead of running the packed kernels.
    pub dequantize: bool,
    /// Keep every weight a zero-copy view of the mapped file instead of repacking the
    /// matrices this CPU's kernels have a layout for (`--no-repack`; see
    /// [`ember_models::ModelOptions`]). Same results, less memory touched at load, slower
    /// decode.
    pub no_repack: bool,
    /// On a GPU device, how many blocks (the last ones) run there with the head, the rest on
    /// the CPU (`--gpu-layers`; see [`ember_models::ModelOptions::gpu_layers`]). `None`: all.
    pub gpu_layers: Option<usize>,
    /// On a GPU device, the memory it has for the model in bytes: a model that needs more is
    /// refused before loading (see [`ember_models::ModelOptions::gpu_memory`]).
    pub gpu_memory: Option<u64>,
    /// The longest sequence the model will run, for the GPU memory check (default: the
    /// trained context length, capped by `kv_budget`).
    pub max_context: Option<usize>,
    /// The KV budget in bytes and its element type, for the GPU memory check's default
    /// context (see [`ember_models::ModelOptions::kv_budget`]).
    pub kv_budget: Option<(u64, ember_kernels::KvDtype)>,
}

impl LoadOptions {
    fn model_options(&self) -> ember_models::ModelOptions {
        ember_models::ModelOptions {
            repack: !self.no_repack,
            gpu_layers: self.gpu_layers,
            gpu_memory: self.gpu_memory,
            max_context: self.max_context,
            kv_budget: self.kv_budget,
        }
    }
}

/// A model ready to run: its metadata (chat template), the model with its weights on a
/// device, and the tokenizer built from the metadata.
///
/// A GGUF file is memory-mapped. A Hugging Face checkpoint directory (`config.json`,
/// `tokenizer.json`, safetensors weights, possibly AWQ/GPTQ/EXL2/compressed-tensors
/// quantized) is read into a small in-memory GGUF holding its metadata, tokenizer and norm
/// vectors, while its matrices stay in the safetensors memory maps
/// ([`ember_convert::checkpoint_image`]).
pub struct LoadedModel {
    /// The GGUF file, kept for its metadata (chat template, architecture, names): the mapped
    /// file, or for a checkpoint directory the in-memory image of its metadata.
    pub file: GgufFile,
    /// For a checkpoint directory, its quantization scheme (`None` for GGUF files and dense
    /// checkpoints).
    pub scheme: Option<QuantScheme>,
    /// For a checkpoint directory, its matrices (which the model holds too).
    pub external: Option<ExternalWeights>,
    /// The model on its device.
    pub model: Model,
    /// The tokenizer described by the file's `tokenizer.*` metadata.
    pub tokenizer: GgufTokenizer,
}

impl LoadedModel {
    /// Opens a GGUF file and loads its tokenizer and model onto `device`
    /// (`ember_models::default_device()` for the default backend).
    pub fn open(path: &Path, device: &Device) -> Result<Self, LoadError> {
        Self::open_with(path, device, &LoadOptions::default())
    }

    /// [`open`](Self::open) for a GGUF file or a checkpoint directory, with options.
    pub fn open_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self, LoadError> {
        if path.is_dir() {
            return Self::open_checkpoint(path, device, opts);
        }
        let shown = path.display().to_string();
        let file = GgufFile::open(path).map_err(|error| LoadError::File {
            path: shown.clone(),
            error,
        })?;
        let tokenizer = GgufTokenizer::from_gguf(&file).map_err(|error| LoadError::Tokenizer {
            path: shown.clone(),
            error,
        })?;
        let model = ember_models::load_with_options(&file, None, device, &opts.model_options())
            .map_err(|error| LoadError::Model { path: shown, error })?;
        Ok(Self {
            file,
            scheme: None,
            external: None,
            model,
            tokenizer,
        })
    }

    fn open_checkpoint(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Self, LoadError> {
        let shown = dir.display().to_string();
        let checkpoint_error = |error: ConvertError| LoadError::Checkpoint {
            path: shown.clone(),
            error: Box::new(error),
        };
        let ckpt = Checkpoint::open(dir).map_err(|e| checkpoint_error(e.into()))?;
        let image = ember_convert::checkpoint_image(
            &ckpt,
            &ImageOptions {
                dequantize: opts.dequantize,
            },
        )
        .map_err(checkpoint_error)?;
        let mut external = ExternalWeights::new();
        external.hf_qk_order = image.hf_qk_order;
        for (name, weight) in image.linears {
            let matrix = match weight {
                LinearWeight::Dense {
                    ty,
                    rows,
                    cols,
                    bytes,
                } => {
                    // The view's own whole length always fits it.
                    let len = bytes.as_slice().len();
                    match SharedBytes::new(Arc::new(bytes), 0, len) {
                        Some(shared) => QuantMatrix::new(shared, ty, rows, cols),
                        None => Err(QuantMatrixError::WrongSize {
                            ty,
                            rows,
                            cols,
                            expected: len,
                            got: 0,
                        }),
                    }
                }
                LinearWeight::Packed(packed) => QuantMatrix::packed(packed),
            };
            let matrix = matrix.map_err(|source| LoadError::Model {
                path: shown.clone(),
                error: ModelError::Weight {
                    name: name.clone(),
                    source,
                },
            })?;
            external.insert(name, Arc::new(matrix));
        }
        let file = image.gguf;
        let tokenizer = GgufTokenizer::from_gguf(&file).map_err(|error| LoadError::Tokenizer {
            path: shown.clone(),
            error,
        })?;
        let model =
            ember_models::load_with_options(&file, Some(&external), device, &opts.model_options())
                .map_err(|error| LoadError::Model { path: shown, error })?;
        Ok(Self {
            file,
            scheme: image.scheme,
            external: Some(external),
            model,
            tokenizer,
        })
    }

    /// Bytes and parameters of every weight, and the type of the first block's FFN down
    /// projection (what llama-bench reports as the model type).
    pub fn weight_summary(&self) -> WeightSummary {
        let external = self.external.as_ref();
        let in_file = |name: &str| external.is_none_or(|e| e.get(name).is_none());
        let (mut bytes, mut params) = (0u64, 0u64);
        for t in self.file.tensors().iter().filter(|t| in_file(&t.name)) {
            bytes += t.n_bytes;
            params += t.n_elements();
        }
        for (_, m) in external.into_iter().flat_map(|e| e.iter()) {
            bytes += m.storage_bytes() as u64;
            params += (m.rows() * m.cols()) as u64;
        }
        const PROBE: &str = "blk.0.ffn_down.weight";
        let type_name = match external.and_then(|e| e.get(PROBE)) {
            Some(m) => m.type_name(),
            None => self
                .file
                .tensor(PROBE)
                .map_or("?".to_string(), |t| t.ggml_type.name().to_string()),
        };
        WeightSummary {
            bytes,
            params,
            type_name,
        }
    }

    /// Tokenizes a prompt the way llama.cpp does: BOS as the model says, special tokens parsed.
    pub fn tokenize_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.tokenizer.encode(text, true, true)
    }

    /// The model's own Jinja template, or when the file has none, the built-in template
    /// its architecture uses (llama.cpp falls back the same way; Gemma 3's file has none).
    pub fn chat_template(&self) -> Result<ChatTemplate, ChatError> {
        let piece = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.token_str(i))
                .unwrap_or("")
                .to_string()
        };
        match self.file.get_str("tokenizer.chat_template") {
            Some(src) => ChatTemplate::new(
                src,
                &piece(self.tokenizer.bos_id()),
                &piece(self.tokenizer.eos_id()),
            ),
            None => {
                let arch = self.file.architecture().unwrap_or("");
                let builtin = if arch.starts_with("gemma") {
                    BuiltinTemplate::Gemma
                } else {
                    BuiltinTemplate::ChatMl
                };
                Ok(ChatTemplate::from_builtin(builtin))
            }
        }
    }
}
