//! The runtime layer: tokenizer built from GGUF metadata, sampling, chat templates and the
//! generation loop that drives a model.
