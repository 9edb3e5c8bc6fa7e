//! Speculative decoding settings and counts, as the engine, the CLI and the server see them.
//! The proposers and the acceptance rule live in `ember-spec`; the engine runs them
//! ([`crate::engine`]), so `generate`, `chat` and `serve` speculate the same way.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Who proposes the tokens the target model then checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proposer {
    /// No speculation: one token per forward pass.
    #[default]
    None,
    /// Prompt lookup: n-gram matches in the prompt and the text so far.
    Lookup,
    /// A smaller draft model with the same vocabulary.
    Draft,
    /// The target's own first layers and its output head (layer-skip self-speculation).
    #[serde(rename = "self")]
    SelfSpec,
}

impl Proposer {
    /// Every proposer's name, as [`name`](Self::name) writes and `FromStr` reads it.
    pub const NAMES: [&'static str; 4] = ["none", "lookup", "draft", "self"];

    /// The name used by `--spec` and the server's `ember.spec` field.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lookup => "lookup",
            Self::Draft => "draft",
            Self::SelfSpec => "self",
        }
    }

    /// Whether proposals come from running a model (a draft model or the target's layers).
    pub fn uses_model(self) -> bool {
        matches!(self, Self::Draft | Self::SelfSpec)
    }
}

impl fmt::Display for Proposer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Proposer {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "lookup" => Ok(Self::Lookup),
            "draft" => Ok(Self::Draft),
            "self" => Ok(Self::SelfSpec),
            other => Err(SpecError::UnknownProposer(other.to_string())),
        }
    }
}

/// The longest draft a request may ask for: verification rows cost real compute, and a draft
/// this long is accepted whole too rarely to pay off.
pub const MAX_DRAFT: usize = 64;

/// How to speculate (`--spec`, `--draft-max`, `--draft-min`, `--spec-ngram`, `--spec-layers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecConfig {
    /// Who proposes; [`Proposer::None`] turns speculation off.
    pub proposer: Proposer,
    /// Most tokens proposed per step; the engine drafts fewer while proposals keep failing.
    pub draft_max: usize,
    /// Fewest tokens worth verifying: a shorter proposal is dropped (plain decoding that step).
    pub draft_min: usize,
    /// Longest n-gram prompt lookup matches (it tries shorter ones down to 1).
    pub ngram_max: usize,
    /// Layers of the target that self-speculation runs; `None`: half of them.
    pub layers: Option<usize>,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            proposer: Proposer::None,
            draft_max: 8,
            draft_min: 1,
            ngram_max: 3,
            layers: None,
        }
    }
}

impl SpecConfig {
    /// Whether a proposer is set (anything but [`Proposer::None`]).
    pub fn enabled(&self) -> bool {
        self.proposer != Proposer::None
    }

    /// Checks the settings against the target's layer count and whether a draft model was
    /// given.
    pub fn validate(&self, n_layer: usize, has_draft_model: bool) -> Result<(), SpecError> {
        if self.draft_max == 0 || self.draft_max > MAX_DRAFT {
            return Err(SpecError::DraftMax(self.draft_max));
        }
        if self.draft_min == 0 || self.draft_min > self.draft_max {
            return Err(SpecError::DraftMin {
                min: self.draft_min,
                max: self.draft_max,
            });
        }
        if self.ngram_max == 0 || self.ngram_max > 64 {
            return Err(SpecError::Ngram(self.ngram_max));
        }
        if self.proposer == Proposer::Draft && !has_draft_model {
            return Err(SpecError::NoDraftModel);
        }
        if self.proposer == Proposer::SelfSpec {
            self.self_layers(n_layer)?;
        }
        Ok(())
    }

    /// The layers self-speculation runs: the chosen count, or half the model's.
    pub fn self_layers(&self, n_layer: usize) -> Result<usize, SpecError> {
        let n = self.layers.unwrap_or(n_layer / 2);
        if n == 0 || n >= n_layer {
            return Err(SpecError::Layers { n, n_layer });
        }
        Ok(n)
    }
}

/// A request's own speculation settings (the server's `ember` extension field): each one
/// given replaces the engine's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecOverride {
    /// Replaces [`SpecConfig::proposer`]; `Some(Proposer::None)` turns speculation off.
    pub proposer: Option<Proposer>,
    /// Replaces [`SpecConfig::draft_max`].
    pub draft_max: Option<usize>,
    /// Replaces [`SpecConfig::draft_min`].
    pub draft_min: Option<usize>,
}

impl SpecOverride {
    /// Whether nothing is overridden (the engine's settings apply as they are).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What speculation did for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SpecStats {
    /// The proposer the request ran with.
    pub proposer: Proposer,
    /// Tokens proposed and checked by the target.
    pub drafted: u64,
    /// Proposed tokens the target accepted (each one a forward pass saved).
    pub accepted: u64,
    /// Verification passes (forward passes that checked at least one proposed token).
    pub steps: u64,
}

/// Invalid speculation settings. The messages name the CLI flags, which the server's
/// `ember` field mirrors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A proposer name other than those in [`Proposer::NAMES`].
    #[error("unknown speculation mode {0:?}: use none, lookup, draft or self")]
    UnknownProposer(String),
    /// `draft_max` outside `1..=MAX_DRAFT`.
    #[error("--draft-max must be between 1 and {MAX_DRAFT}, got {0}")]
    DraftMax(usize),
    /// `draft_min` outside `1..=draft_max`.
    #[error("--draft-min must be between 1 and --draft-max ({max}), got {min}")]
    DraftMin {
        /// The `draft_min` given.
        min: usize,
        /// The `draft_max` in effect.
        max: usize,
    },
    /// `ngram_max` outside `1..=64`.
    #[error("--spec-ngram must be between 1 and 64, got {0}")]
    Ngram(usize),
    /// [`Proposer::Draft`] without a draft model.
    #[error("--spec draft needs a draft model: give --draft-model MODEL")]
    NoDraftModel,
    /// A self-speculation layer count that is 0 or not below the model's.
    #[error("--spec-layers must be between 1 and {} (the model has {n_layer} layers), got {n}", n_layer.saturating_sub(1))]
    Layers {
        /// The layer count asked for (or the default, half the model's).
        n: usize,
        /// The target model's layer count.
        n_layer: usize,
    },
    /// The draft model's vocabulary does not match the target's (the reason is given).
    #[error(
        "the draft model cannot propose for this model (speculation needs the same vocabulary): {0}"
    )]
    Vocab(String),
    /// A request asked for a proposer the engine was not started with (a draft model, or
    /// self-speculation's layers).
    #[error("speculation mode {0} is not enabled on this server (start it with --spec {0})")]
    Unavailable(Proposer),
}
