#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod checkpoint;
mod error;
mod reader;
pub mod safetensors;
mod value;
mod writer;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use ember_quant::GgmlType;
pub use error::{GgufError, GgufWriteError};
pub use reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufFile, MAX_ARRAY_DEPTH, MAX_DIMS, SharedBytes,
    SharedSlice, TensorInfo,
};
pub use safetensors::{
    SafetensorsError, SafetensorsFile, StDtype, StTensorInfo, StWriteTensor, safetensors_to_bytes,
    write_safetensors,
};
pub use value::{MetaArray, MetaType, MetaValue, StringArray};
pub use writer::GgufWriter;
