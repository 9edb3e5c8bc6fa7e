#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod arch;
mod error;
mod from_hf;
mod image;
mod quant;
mod quantized;
mod to_hf;
mod tokenizer;
mod util;

pub use error::ConvertError;
pub use from_hf::hf_to_gguf;
pub use image::{CheckpointImage, ImageOptions, LinearWeight, checkpoint_image};
pub use quant::{
    QuantizeOptions, TARGET_TYPES, file_type_for, parse_type, requantize_gguf, target_type,
};
pub use quantized::{
    AwqVersion, CtStrategy, GroupSize, QuantScheme, QuantWriteFormat, QuantWriteOptions,
    packed_linear,
};
pub use to_hf::{gguf_to_hf, gguf_to_quantized_hf};

/// The architectures (`general.architecture`) that [`gguf_to_hf`] and [`hf_to_gguf`] convert.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3", "phi3"];

/// Where a conversion stands, passed to the progress callback after each tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress<'a> {
    /// Tensors finished so far (1 after the first).
    pub done: usize,
    /// Tensors in all.
    pub total: usize,
    /// The tensor just finished (its name in the output).
    pub tensor: &'a str,
}
