//! Ember's hot operations, expressed as a burn backend extension.
//!
//! Model code calls the free functions here on ordinary `burn::tensor::Tensor`s. The
//! [`EmberBackend`] extension routes each call to the backend the tensor lives on: our own
//! CPU kernels for burn-flex, and for every other backend a default built from plain burn
//! ops (correct everywhere, fast nowhere).

pub mod cpu;
mod matrix;
mod ops;
pub mod paged;

pub use cpu::kquant::SoloRow;
pub use matrix::{QuantMatrix, QuantMatrixError, SharedBytes};
pub use ops::{
    EmberBackend, causal_attention, causal_attention_fallback, geglu, geglu_fallback,
    paged_attention, paged_attention_fallback, positions_from, quant_matmul, quant_matmul_fallback,
    quant_matmul_solo, residual_add, rms_norm, rms_norm_fallback, rope, rope_fallback,
    round_to_f16, swiglu, swiglu_fallback, try_paged_attention,
};
pub use paged::{KvDtype, PagedAttention, PagedError, PagedLayerStore, SeqAttn};
