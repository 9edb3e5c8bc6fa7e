//! A model file opened for use: the mapping, the model on a device, its tokenizer and its chat
//! template.

use std::path::Path;

use burn::tensor::Device;
use ember_formats::{GgufError, GgufFile};
use ember_models::{Model, ModelError};

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
    /// The tokenizer metadata is missing or unusable.
    #[error("{path}: tokenizer: {error}")]
    Tokenizer {
        /// The file, as displayed.
        path: String,
        /// What the tokenizer builder reported.
        error: TokenizerError,
    },
}

/// A GGUF model ready to run: the memory-mapped file (metadata, chat template), the model
/// with its weights on a device, and the tokenizer built from the file's metadata.
pub struct LoadedModel {
    /// The opened GGUF file, kept for its metadata (chat template, architecture, names).
    pub file: GgufFile,
    /// The model on its device.
    pub model: Model,
    /// The tokenizer described by the file's `tokenizer.*` metadata.
    pub tokenizer: GgufTokenizer,
}

impl LoadedModel {
    /// Opens a GGUF file and loads its tokenizer and model onto `device`
    /// (`ember_models::default_device()` for the default backend).
    pub fn open(path: &Path, device: &Device) -> Result<Self, LoadError> {
        let shown = path.display().to_string();
        let file = GgufFile::open(path).map_err(|error| LoadError::File {
            path: shown.clone(),
            error,
        })?;
        let tokenizer = GgufTokenizer::from_gguf(&file).map_err(|error| LoadError::Tokenizer {
            path: shown.clone(),
            error,
        })?;
        let model = ember_models::load(&file, device)
            .map_err(|error| LoadError::Model { path: shown, error })?;
        Ok(Self {
            file,
            model,
            tokenizer,
        })
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
