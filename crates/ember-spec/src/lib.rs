//! Speculative decoding: cheap proposers guess the next tokens, the target model checks them
//! all in one forward pass, and an acceptance rule keeps exactly the target's output
//! (token for token when greedy, its distribution when sampling).
//!
//! - [`lookup`]: prompt lookup (n-gram matching over the prompt and the text so far).
//! - [`drafter`]: a smaller draft model, or the target's own first layers (self-speculation),
//!   with its own paged KV cache kept in step with the target's.
//! - [`verify`]: the acceptance rule (Leviathan et al. 2023, Chen et al. 2023).
//! - [`adaptive`]: the draft length, following the running acceptance rate.
//! - [`vocab`]: a draft model must have the target's vocabulary, token for token.
pub mod adaptive;
pub mod drafter;
pub mod lookup;
pub mod verify;
pub mod vocab;
