#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod engine;
mod error;
mod model;
mod params;
mod stream;

pub use engine::{Engine, EngineOptions};
pub use error::{Error, Result};
pub use model::{DEFAULT_KV_BUDGET_MIB, Model, ModelBuilder};
pub use params::GenerateParams;
pub use stream::{AsyncEngineStream, Completion, EngineStream, TextStream};

pub use burn::tensor::Device;
pub use ember_kv::{KvDtype, KvOptions};
pub use ember_models::ModelConfig;
pub use ember_runtime::chat::{ChatMessage, ChatTemplate};
pub use ember_runtime::engine::{EngineStats, Timings};
pub use ember_runtime::generate::{PartialOutput, StopReason};
pub use ember_runtime::sampling::SamplingParams;
pub use ember_runtime::spec::{Proposer, SpecConfig, SpecStats};
pub use ember_runtime::tokenizer::GgufTokenizer;

/// The layers below the facade, for what it does not cover (each is usable alone).
pub mod layers {
    pub use ember_formats as formats;
    pub use ember_hub as hub;
    pub use ember_kv as kv;
    pub use ember_models as models;
    pub use ember_runtime as runtime;
    pub use ember_spec as spec;
}
