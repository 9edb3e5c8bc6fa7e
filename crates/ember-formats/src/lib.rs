//! GGUF reading and writing for Ember.
//!
//! * [`GgufFile`] memory-maps a GGUF v2/v3 file, parses and validates its header (metadata and
//!   tensor infos) and hands out zero-copy views of tensor data. It is hardened against hostile
//!   input: every count, length and offset is checked against the file size before use, so no
//!   input makes it panic or allocate more than a small multiple of the file size.
//! * [`GgufWriter`] builds GGUF files (tests and tooling use it to make tiny models).
//!
//! Layout reminder (all little-endian): magic `GGUF`, u32 version, u64 tensor count, u64
//! metadata count, metadata entries (u64-length key, u32 type, value), tensor infos (name,
//! u32 n_dims, u64 dims, u32 ggml type, u64 offset), padding to `general.alignment` (default
//! 32), then tensor data at those offsets.

#![deny(unsafe_code)]

mod error;
mod reader;
mod value;
mod writer;

pub use ember_quant::GgmlType;
pub use error::{GgufError, GgufWriteError};
pub use reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufFile, MAX_ARRAY_DEPTH, MAX_DIMS, SharedBytes,
    SharedSlice, TensorInfo,
};
pub use value::{MetaArray, MetaType, MetaValue, StringArray};
pub use writer::GgufWriter;
