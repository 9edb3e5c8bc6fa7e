#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod gpu_size;
mod matrix;
// Built with no backend feature (as ember-kv uses this crate), the `Dispatch` impl that
// `#[backend_extension]` generates has no backend arm left and never reads its arguments.
#[cfg_attr(
    not(any(feature = "flex", feature = "ndarray", feature = "cube")),
    allow(unused_variables)
)]
mod ops;
pub mod paged;

pub use cpu::kquant::SoloRow;
#[cfg(feature = "cube")]
pub use cube::{GpuMemoryLimits, gpu_memory_limits};
pub use gpu_size::{GPU_IN_PLACE_TYPES, gpu_matrix_bytes};
pub use matrix::{QuantMatrix, QuantMatrixError, SharedBytes, Storage};
pub use ops::{
    EmberBackend, RopeScaling, causal_attention, causal_attention_fallback, geglu, geglu_fallback,
    paged_attention, paged_attention_fallback, paged_write, positions_from, quant_matmul,
    quant_matmul_fallback, quant_matmul_many, quant_matmul_solo, residual_add, rms_norm,
    rms_norm_fallback, rope, rope_fallback, round_to_f16, swiglu, swiglu_fallback,
    try_paged_attention,
};
pub use paged::{KvDtype, PagedAttention, PagedError, PagedLayerStore, SeqAttn};
