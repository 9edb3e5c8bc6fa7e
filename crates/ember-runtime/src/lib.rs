//! The runtime layer: tokenizer built from GGUF metadata, sampling, chat templates and the
//! generation loop that drives a model.
pub mod bench;
pub mod chat;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod loaded;
pub mod sampling;
pub mod stop;
pub mod tokenizer;
