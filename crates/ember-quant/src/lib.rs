#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod convert;
pub mod dequant;
pub mod dot;
pub mod error;
pub mod group;
pub mod quantize;
pub mod types;

pub use dequant::{QK_K, dequantize, supports_dequantize};
pub use dot::dot_row;
pub use error::QuantError;
pub use quantize::quantize;
pub use types::{ALL_TYPES, GgmlType};
