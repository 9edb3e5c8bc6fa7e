//! Test support shared by this crate's tests and `cargo xtask`: tiny random models whose
//! llama.cpp logits are checked in as fixtures.

pub mod tiny;
