#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod bench;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod loaded;
pub mod sampling;
pub mod spec;
pub mod stop;

// The tokenizer and chat templates live in the burn-free `ember-text` crate (cheap to fuzz);
// re-exported so `ember_runtime::tokenizer` / `ember_runtime::chat` keep working.
pub use ember_text::{chat, tokenizer};
