//! Block quantization formats of ggml/GGUF: the type table, dequantization, a fused
//! dequantize-and-dot for the CPU matmul, and reference quantization. No burn dependency:
//! usable on its own.
//!
//! Supported for (de)quantization and `dot_row`: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K (see [`supports_dequantize`]). Dequantization and
//! quantization follow ggml-quants.c operation by operation, so results are bit-identical to
//! ggml's reference (non-FMA) code.

pub mod convert;
pub mod dequant;
pub mod dot;
pub mod error;
pub mod quantize;
pub mod types;

pub use dequant::{QK_K, dequantize, supports_dequantize};
pub use dot::dot_row;
pub use error::QuantError;
pub use quantize::quantize;
pub use types::{ALL_TYPES, GgmlType};
