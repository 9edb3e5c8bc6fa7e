//! The generation loop: prompt in, tokens out, one sequence at a time.

use std::time::Instant;

use burn::tensor::Tensor;
use ember_kv::KvOptions;
use ember_models::{Logits, Model, ModelError};
use serde::Serialize;

use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{GgufTokenizer, StreamDecoder};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(
        "the prompt is {prompt} tokens but the context size is {ctx}: use a shorter prompt or a larger --ctx-size (nothing was truncated)"
    )]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Submit(#[from] crate::engine::SubmitError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("generation failed: {0}")]
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Context size in tokens (prompt + generated).
    pub ctx_size: usize,
    /// Stop at the model's end-of-generation tokens (off for reference runs that want exactly
    /// `max_tokens`).
    pub stop_at_eog: bool,
    /// When the context fills during generation, drop the oldest half of the tokens after the
    /// first `keep` (as llama.cpp's context shift) and go on, instead of stopping.
    pub context_shift: Option<ContextShift>,
    /// KV cache type and block size.
    pub kv: KvOptions,
}

/// Opt-in context shifting (llama.cpp's `--context-shift`): keep the first `keep` tokens (the
/// BOS, a system prompt), discard half of the rest, recompute the cache from what is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextShift {
    pub keep: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_tokens` were generated.
    Length,
    /// An end-of-generation token.
    EndOfGeneration,
    /// A stop string.
    StopString,
    /// The context filled up.
    ContextFull,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub prompt_n: usize,
    pub prompt_ms: f64,
    pub predicted_n: usize,
    pub predicted_ms: f64,
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub timings: Timings,
    pub stop_reason: StopReason,
    /// Tokens dropped by context shifts, one entry per shift (empty when none happened).
    pub context_shifts: Vec<usize>,
}

/// Last-row logits of a forward pass as a host vector.
pub fn last_logits(logits: Tensor<2>) -> Vec<f32> {
    let [rows, vocab] = logits.dims();
    let all = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
    all[(rows - 1) * vocab..].to_vec()
}

/// Generates from `req.prompt_tokens`, calling `on_text` with each piece of text as soon as it
/// is safe to show (complete UTF-8, not a possible stop-string prefix).
pub fn generate(
    model: &Model,
    tokenizer: &GgufTokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    let prompt = &req.prompt_tokens;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > req.ctx_size {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            ctx: req.ctx_size,
        });
    }
    let mut cache = model.new_cache_with(&req.kv, req.ctx_size)?;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut history = prompt.clone();
    let mut decoder = StreamDecoder::new(true);
    let mut stops = StopMatcher::new(req.stop.clone());
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut timings = Timings {
        prompt_n: prompt.len(),
        ..Timings::default()
    };

    let t0 = Instant::now();
    let mut logits = last_logits(model.forward(prompt, &mut cache, Logits::Last)?);
    timings.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let mut stop_reason = StopReason::Length;
    let mut context_shifts = Vec::new();
    let mut emit = |piece: &str, text: &mut String| {
        text.push_str(piece);
        on_text(piece);
    };
    while tokens.len() < req.max_tokens {
        let next = sampler.sample(&logits, &history);
        tokens.push(next);
        history.push(next);
        if req.stop_at_eog && tokenizer.is_eog(next) {
            stop_reason = StopReason::EndOfGeneration;
            break;
        }
        let piece = decoder.push(tokenizer, next);
        let out = stops.push(&piece);
        emit(&out.text, &mut text);
        if out.stopped {
            stop_reason = StopReason::StopString;
            break;
        }
        if tokens.len() == req.max_tokens {
            break;
        }
        if cache.len() >= req.ctx_size {
            let Some(shift) = req.context_shift else {
                stop_reason = StopReason::ContextFull;
                break;
            };
            // The cache holds `history` minus `next`. Rebuild it from the kept tokens and
            // `next` in one pass: recomputing costs one prefill per shift but gives exactly
            // the K/V a fresh run over the shorter text would (no re-rotated keys).
            let cached = &history[..history.len() - 1];
            let keep = shift.keep.min(cached.len());
            let discard = (cached.len() - keep) / 2;
            if discard == 0 {
                stop_reason = StopReason::ContextFull;
                break;
            }
            let mut kept = cached[..keep].to_vec();
            kept.extend_from_slice(&cached[keep + discard..]);
            kept.push(next);
            cache = model.new_cache_with(&req.kv, req.ctx_size)?;
            logits = last_logits(model.forward(&kept, &mut cache, Logits::Last)?);
            context_shifts.push(discard);
            continue;
        }
        logits = last_logits(model.forward(&[next], &mut cache, Logits::Last)?);
    }
    if stop_reason != StopReason::StopString {
        let tail = decoder.finish();
        let out = stops.push(&tail);
        emit(&out.text, &mut text);
        if !out.stopped {
            emit(&stops.finish(), &mut text);
        }
    }
    timings.predicted_n = tokens.len();
    timings.predicted_ms = t1.elapsed().as_secs_f64() * 1e3;
    Ok(GenerateOutput {
        tokens,
        text,
        timings,
        stop_reason,
        context_shifts,
    })
}

/// [`generate`] through the continuous-batching [`Engine`](crate::engine::Engine): the same
/// sampling and stopping rules, run by the scheduler the server uses (a context shift is not
/// available there; use [`generate`] for it).
pub fn generate_on_engine(
    engine: &crate::engine::Engine,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    use crate::engine::{EngineRequest, Event};
    let mut stream = engine.submit(EngineRequest {
        prompt_tokens: req.prompt_tokens.clone(),
        max_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        stop: req.stop.clone(),
        ignore_eos: !req.stop_at_eog,
        logprobs: None,
    })?;
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match stream.blocking_next() {
            Some(Event::Token {
                id, text: piece, ..
            }) => {
                // As `generate`: an end-of-generation token is listed, its text is not shown.
                tokens.push(id);
                text.push_str(&piece);
                on_text(&piece);
            }
            Some(Event::Done {
                stop_reason,
                timings,
            }) => {
                return Ok(GenerateOutput {
                    tokens,
                    text,
                    timings: Timings {
                        prompt_n: timings.prompt_n,
                        prompt_ms: timings.prompt_ms,
                        predicted_n: timings.predicted_n,
                        predicted_ms: timings.predicted_ms,
                    },
                    stop_reason,
                    context_shifts: Vec::new(),
                });
            }
            Some(Event::Error(e)) => return Err(GenerateError::Failed(e)),
            None => return Err(GenerateError::Failed("the engine stopped".into())),
        }
    }
}
