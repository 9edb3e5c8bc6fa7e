//! Text handling for Ember without any tensor code: the tokenizer built from GGUF metadata and
//! chat-template rendering. Kept free of `burn` so that it builds fast and can be fuzzed
//! cheaply; `ember-runtime` re-exports both modules under their old paths.
pub mod chat;
pub mod tokenizer;
