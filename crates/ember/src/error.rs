//! The one error type of the facade: every failure is a typed variant, never a string to parse.

use ember_kv::KvDtype;
use ember_runtime::chat::{ChatEncodeError, ChatError};
use ember_runtime::engine::{EngineError, SubmitError};
use ember_runtime::generate::{GenerateError, PartialOutput};
use ember_runtime::loaded::LoadError;
use ember_runtime::spec::SpecError;
use ember_runtime::tokenizer::TokenizerError;

/// What can go wrong loading a model or generating with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model name could not be resolved or pulled (unknown name, download or checksum
    /// failure, a path that does not exist).
    #[error(transparent)]
    Hub(#[from] ember_hub::HubError),
    /// The file is not a GGUF Ember can run (bad header, unsupported architecture or tensor
    /// type, a tokenizer it cannot build).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The draft model for speculative decoding failed to load or does not fit the target.
    #[error("the draft model {name}: {error}")]
    Draft {
        /// The name or path the draft model was given as.
        name: String,
        /// Why it failed.
        error: Box<Error>,
    },
    /// Text could not be tokenized.
    #[error(transparent)]
    Tokenize(#[from] TokenizerError),
    /// The model's chat template could not be built or rendered.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// Chat messages could not be turned into prompt tokens (e.g. special-token text where
    /// only plain text is allowed).
    #[error(transparent)]
    ChatEncode(#[from] ChatEncodeError),
    /// A KV cache option is invalid (e.g. a block size of 0).
    #[error(transparent)]
    Kv(#[from] ember_kv::KvError),
    /// The KV budget is too small to hold even one token.
    #[error(
        "a KV budget of {budget_mib} MiB holds no token: one token's KV cache takes {per_token_bytes} bytes as {kv_type}"
    )]
    KvBudgetTooSmall {
        /// The budget asked for, in MiB.
        budget_mib: f64,
        /// KV bytes one token takes over all layers.
        per_token_bytes: u64,
        /// The KV storage type.
        kv_type: KvDtype,
    },
    /// An explicit context size needs more KV memory than the budget allows.
    #[error(
        "a context of {ctx_size} tokens needs {:.1} MiB of KV cache ({per_token_bytes} bytes per token as {kv_type}), more than the KV budget of {budget_mib} MiB",
        *ctx_size as f64 * *per_token_bytes as f64 / 1048576.0
    )]
    ContextOverBudget {
        /// The context size asked for, in tokens.
        ctx_size: usize,
        /// KV bytes one token takes over all layers.
        per_token_bytes: u64,
        /// The KV storage type.
        kv_type: KvDtype,
        /// The budget, in MiB.
        budget_mib: f64,
    },
    /// An option is out of its range; `option` names it.
    #[error("{option}: {message}")]
    InvalidOption {
        /// The option's name (as the builder method is called).
        option: &'static str,
        /// What is allowed.
        message: String,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    /// A prompt token id is not in the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The prompt leaves no room in the context for a generated token. Nothing is truncated.
    #[error(
        "the prompt is {prompt} tokens but the context size is {ctx}, which must hold the prompt and at least one generated token: use a shorter prompt or a larger context (nothing was truncated)"
    )]
    PromptTooLong {
        /// Prompt length in tokens.
        prompt: usize,
        /// The context size in tokens.
        ctx: usize,
    },
    /// The speculative-decoding settings are invalid for this model.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A draft model's vocabulary differs from the target's (the first differing token is
    /// named).
    #[error(
        "the draft model cannot propose for this model (speculation needs the same vocabulary): {0}"
    )]
    Vocab(#[from] ember_spec::vocab::VocabMismatch),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine refused a request (its queue is full, or it has stopped).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// A generation could not start.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// A generation failed after it started. `partial` holds everything generated before the
    /// failure (its text was already streamed), so nothing is lost.
    #[error("generation failed: {message} (after {} generated tokens)", .partial.tokens.len())]
    Interrupted {
        /// What went wrong.
        message: String,
        /// What was generated before it.
        partial: Box<PartialOutput>,
    },
}

impl Error {
    /// What was generated before a mid-generation failure ([`Error::Interrupted`]); `None`
    /// for errors raised before anything ran.
    pub fn partial(&self) -> Option<&PartialOutput> {
        match self {
            Self::Interrupted { partial, .. } => Some(partial),
            Self::Generate(e) => e.partial(),
            _ => None,
        }
    }
}

/// `Result` with the facade's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
