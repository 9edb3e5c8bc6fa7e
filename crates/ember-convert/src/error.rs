//! The crate's error type.

use std::path::PathBuf;

use ember_formats::checkpoint::CheckpointError;
use ember_formats::safetensors::SafetensorsError;
use ember_formats::{GgufError, GgufWriteError};
use ember_quant::group::GroupError;
use ember_quant::{GgmlType, QuantError};
use ember_text::tokenizer::TokenizerError;

/// Why a conversion failed. Nothing is left under the output name when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading or writing a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The input GGUF file could not be parsed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Writing the output GGUF failed.
    #[error(transparent)]
    GgufWrite(#[from] GgufWriteError),
    /// Writing the output safetensors file failed.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The checkpoint directory could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Quantizing or dequantizing a tensor failed.
    #[error("tensor '{tensor}': {source}")]
    Quant {
        /// The tensor.
        tensor: String,
        /// What ember-quant said.
        source: QuantError,
    },
    /// Building the tokenizer from the GGUF metadata failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The requested output type is not one Ember writes (see [`crate::TARGET_TYPES`]).
    #[error(
        "type {0} is not a supported target (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, \
         q2_k, q3_k, q4_k, q5_k, q6_k)"
    )]
    UnsupportedType(GgmlType),
    /// A type name given as text is not one Ember writes.
    #[error(
        "unknown type '{0}' (expected f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, \
         q4_k, q5_k or q6_k)"
    )]
    UnknownTypeName(String),
    /// A safetensors dtype Ember does not write or read here.
    #[error("dtype {0} is not supported here (HF weights must be F32, F16 or BF16)")]
    UnsupportedDtype(String),
    /// The architecture has no conversion (yet).
    #[error(
        "architecture '{0}' is not supported for conversion (supported: llama/mistral, qwen2, \
         qwen3)"
    )]
    UnsupportedArchitecture(String),
    /// A GGUF metadata key the conversion needs is absent or has the wrong type.
    #[error("GGUF metadata key '{0}' is missing or has the wrong type")]
    MissingKey(String),
    /// A GGUF metadata value the conversion cannot express (key and why).
    #[error("GGUF metadata key '{key}': {reason}")]
    UnsupportedMetadata {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A config.json key the conversion needs is absent or has the wrong type.
    #[error("config.json key '{0}' is missing or has the wrong type")]
    MissingConfig(String),
    /// A config.json value the conversion cannot express (key and why).
    #[error("config.json key '{key}': {reason}")]
    UnsupportedConfig {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A tensor has no name in the other format for this architecture.
    #[error("tensor '{name}' has no mapping for architecture '{arch}'")]
    UnmappedTensor {
        /// The tensor.
        name: String,
        /// The architecture.
        arch: String,
    },
    /// A tensor's shape or size disagrees with what the conversion expects.
    #[error("tensor '{name}': {reason}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("tensor '{0}' is missing")]
    MissingTensor(String),
    /// The vocabulary is neither byte-level BPE nor Gemma 3's SentencePiece vocabulary
    /// (`tokenizer.ggml.model` names the one found).
    #[error(
        "tokenizer.ggml.model '{0}' cannot be exported yet for this architecture: byte-level \
         BPE ('gpt2') vocabularies are converted, and SentencePiece ('llama') ones only for gemma3"
    )]
    UnsupportedTokenizerModel(String),
    /// tokenizer.json is malformed or of a kind not converted (message says which).
    #[error("tokenizer.json: {0}")]
    BadTokenizerJson(String),
    /// tokenizer.json's split regexes match no `tokenizer.ggml.pre` llama.cpp knows.
    #[error(
        "the tokenizer.json pre-tokenizer (split regexes {regexes:?}) matches no \
         tokenizer.ggml.pre value llama.cpp knows"
    )]
    UnknownPreTokenizer {
        /// The regexes, in order.
        regexes: Vec<String>,
    },
    /// A `quantization_config` field (or `quantize_config.json` field) names a scheme, format
    /// variant or value that is not supported (the field path, the value found, and why).
    #[error("quantization_config.{field} = {value}: {reason}")]
    UnsupportedQuantization {
        /// The field, e.g. `quant_method`, `bits`, `config_groups.group_0.input_activations`.
        field: String,
        /// The value found (as JSON text, or `absent`).
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A group-quantized linear layer's tensors were rejected by the ember-quant reader or
    /// writer (wrong lengths, `g_idx` out of range, a broken permutation, ...).
    #[error("quantized tensor '{tensor}': {source}")]
    QuantizedTensor {
        /// The layer (`model.layers.0.self_attn.q_proj`) or tensor.
        tensor: String,
        /// What ember-quant said.
        source: GroupError,
    },
    /// A linear layer's in-feature count is not a multiple of the requested group size (AutoAWQ
    /// and AutoGPTQ's kernels require that; use a divisor or `-1`, one group per row).
    #[error(
        "tensor '{tensor}': in-features {k} is not a multiple of group size {group_size} \
         (use a divisor of {k}, or -1 for one group per row)"
    )]
    GroupSizeDoesNotDivide {
        /// The tensor.
        tensor: String,
        /// Its in-feature count.
        k: usize,
        /// The group size asked for.
        group_size: usize,
    },
    /// A JSON file could not be written or read.
    #[error("{}: {source}", path.display())]
    Json {
        /// The path.
        path: PathBuf,
        /// What serde_json said.
        source: serde_json::Error,
    },
}

impl ConvertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> ConvertError {
        ConvertError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_tensor(name: &str, reason: impl Into<String>) -> ConvertError {
        ConvertError::BadTensor {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}
