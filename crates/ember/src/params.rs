//! What a single generation asks for: length, sampling, stop strings, context shift.

use ember_runtime::sampling::SamplingParams;

/// Settings of one generation. The defaults are `ember generate`'s: 128 tokens at most, and
/// llama.cpp's sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalties, a
/// random seed).
///
/// Every field has a builder method of the same name:
///
/// ```
/// let params = ember::GenerateParams::default().max_tokens(32).temperature(0.0).stop("\n");
/// assert_eq!(params.max_tokens, 32);
/// assert_eq!(params.sampling.temperature, 0.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    /// Tokens to generate at most; 0 generates nothing (as llama.cpp's `-n 0`). The context
    /// may end generation sooner.
    pub max_tokens: usize,
    /// The sampling chain: penalties, top-k, top-p, min-p, temperature, seed.
    pub sampling: SamplingParams,
    /// Generation stops when one of these strings appears; the stop string itself is not
    /// part of the output.
    pub stop: Vec<String>,
    /// Keep generating past the model's end-of-generation tokens.
    pub ignore_eos: bool,
    /// `Some(keep)`: when the context fills, drop the oldest half of the tokens after the
    /// BOS and `keep` more, and go on (llama.cpp's context shift). `None` (the default): stop
    /// with [`StopReason::ContextFull`](crate::StopReason::ContextFull).
    pub context_shift: Option<usize>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            context_shift: None,
        }
    }
}

impl GenerateParams {
    /// Greedy decoding (temperature 0): the same output every run.
    pub fn greedy() -> Self {
        Self::default().temperature(0.0)
    }

    /// Sets [`max_tokens`](Self::max_tokens).
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// Sets the whole sampling chain.
    pub fn sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Temperature, 0 or more; 0 is greedy.
    pub fn temperature(mut self, t: f32) -> Self {
        self.sampling.temperature = t;
        self
    }

    /// Top-k (0 disables).
    pub fn top_k(mut self, k: usize) -> Self {
        self.sampling.top_k = k;
        self
    }

    /// Top-p, 0 to 1 (1 disables).
    pub fn top_p(mut self, p: f32) -> Self {
        self.sampling.top_p = p;
        self
    }

    /// Min-p, 0 to 1 (0 disables).
    pub fn min_p(mut self, p: f32) -> Self {
        self.sampling.min_p = p;
        self
    }

    /// Repetition penalty (1 disables).
    pub fn repeat_penalty(mut self, r: f32) -> Self {
        self.sampling.repeat_penalty = r;
        self
    }

    /// The RNG seed: the same seed gives the same output.
    pub fn seed(mut self, seed: u64) -> Self {
        self.sampling.seed = Some(seed);
        self
    }

    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    /// Sets [`ignore_eos`](Self::ignore_eos).
    pub fn ignore_eos(mut self, yes: bool) -> Self {
        self.ignore_eos = yes;
        self
    }

    /// Sets [`context_shift`](Self::context_shift).
    pub fn context_shift(mut self, keep: Option<usize>) -> Self {
        self.context_shift = keep;
        self
    }
}

/// Rejects sampling values no sampler can use (the CLI's and the server's ranges): a bad
/// value is an [`Error::InvalidOption`](crate::Error::InvalidOption) naming it, before anything runs.
pub(crate) fn check_sampling(p: &SamplingParams) -> crate::Result<()> {
    let bad = |option: &'static str, message: String| {
        Err(crate::Error::InvalidOption { option, message })
    };
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return bad(
            "temperature",
            format!("{}; it must be 0 or more", p.temperature),
        );
    }
    for (option, v) in [("top_p", p.top_p), ("min_p", p.min_p)] {
        if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
            return bad(option, format!("{v}; it must be from 0 to 1"));
        }
    }
    if !(p.repeat_penalty.is_finite() && p.repeat_penalty > 0.0) {
        return bad(
            "repeat_penalty",
            format!(
                "{}; it must be more than 0 (1 turns it off)",
                p.repeat_penalty
            ),
        );
    }
    for (option, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if !v.is_finite() {
            return bad(option, format!("{v}; it must be a finite number"));
        }
    }
    if p.repeat_last_n < -1 {
        return bad(
            "repeat_last_n",
            format!("{}; it must be -1 (all), 0 (off) or more", p.repeat_last_n),
        );
    }
    Ok(())
}

/// The prompt checks every generation gets before anything runs: not empty, every id in the
/// vocabulary, and room in the context for the prompt and one generated token (llama.cpp
/// refuses the same; nothing is ever truncated). A prompt that fills the context exactly is
/// allowed when nothing is generated or a context shift will make room.
pub(crate) fn check_prompt(
    tokens: &[u32],
    vocab: usize,
    ctx: usize,
    params: &GenerateParams,
) -> crate::Result<()> {
    if tokens.is_empty() {
        return Err(crate::Error::EmptyPrompt);
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(crate::Error::TokenOutOfRange { id, vocab });
    }
    let prompt = tokens.len();
    let exact_ok = params.max_tokens == 0 || params.context_shift.is_some();
    if prompt < ctx || (prompt == ctx && exact_ok) {
        Ok(())
    } else {
        Err(crate::Error::PromptTooLong { prompt, ctx })
    }
}
