//! Block quantization formats of ggml/GGUF: the type table, dequantization and reference
//! quantization. No burn dependency: usable on its own.

pub mod types;

pub use types::{ALL_TYPES, GgmlType};
