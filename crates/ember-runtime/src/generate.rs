//! Generation for one caller: prompt in, tokens out. It runs the serving engine's scheduler
//! ([`crate::engine`]) inline, one sequence, so the CLI and the server share one loop: the
//! same stopping rules, context shift and speculative decoding.

use std::time::Instant;

use burn::tensor::Tensor;
use ember_kv::{KvBudget, KvOptions};
use ember_models::{Model, ModelError};
use serde::Serialize;
use tokio::sync::mpsc::unbounded_channel;

use crate::engine::{Counters, EngineConfig, EngineRequest, Event, Scheduler, SchedulerParts};
use crate::loaded::LoadedModel;
use crate::sampling::SamplingParams;
use crate::spec::{SpecConfig, SpecStats};
use crate::tokenizer::GgufTokenizer;

/// The engine's timings (llama-server's fields).
pub use crate::engine::Timings;

/// Why a generation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt does not fit the context; nothing is truncated.
    #[error(
        "the prompt is {prompt} tokens but the context size is {ctx}: use a shorter prompt or a larger --ctx-size (nothing was truncated)"
    )]
    PromptTooLong {
        /// Prompt length, in tokens.
        prompt: usize,
        /// Context size, in tokens.
        ctx: usize,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    /// The model failed (setting up its cache, or a forward pass).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The engine refused the request ([`generate_on_engine`]).
    #[error(transparent)]
    Submit(#[from] crate::engine::SubmitError),
    /// The one-sequence scheduler could not be set up (KV cache, speculation settings, draft
    /// model).
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The engine reported an error while generating, or stopped without finishing; found
    /// inside [`Interrupted`](Self::Interrupted).
    #[error("generation failed: {0}")]
    Failed(String),
    /// The generation failed after the prompt was accepted: `partial` is everything generated
    /// (and passed to `on_text`) before the failure, so a caller can still show or save it.
    #[error("{error} (after {} generated tokens)", .partial.tokens.len())]
    Interrupted {
        /// The failure (never itself `Interrupted`).
        error: Box<GenerateError>,
        /// What was generated before it.
        partial: Box<PartialOutput>,
    },
}

impl GenerateError {
    /// What was generated before the failure ([`GenerateError::Interrupted`]); `None` when
    /// the request was refused before anything ran.
    pub fn partial(&self) -> Option<&PartialOutput> {
        match self {
            Self::Interrupted { partial, .. } => Some(partial),
            _ => None,
        }
    }

    fn interrupted(self, partial: PartialOutput) -> Self {
        match self {
            // Never nested: the innermost partial output is the whole of it.
            e @ Self::Interrupted { .. } => e,
            e => Self::Interrupted {
                error: Box::new(e),
                partial: Box::new(partial),
            },
        }
    }
}

/// One generation for [`generate`], [`generate_with_draft`], [`generate_on_engine`] or a
/// [`Generation`].
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt, already tokenized (e.g. [`LoadedModel::tokenize_prompt`]).
    pub prompt_tokens: Vec<u32>,
    /// Tokens to generate at most; 0 runs nothing.
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first one, which is not shown.
    pub stop: Vec<String>,
    /// Context size in tokens (prompt + generated).
    pub ctx_size: usize,
    /// Stop at the model's end-of-generation tokens (off for reference runs that want exactly
    /// `max_tokens`).
    pub stop_at_eog: bool,
    /// When the context fills during generation, drop the older half of the tokens after the
    /// first `keep` (as llama.cpp's context shift) and go on, instead of stopping.
    pub context_shift: Option<ContextShift>,
    /// KV cache type and block size.
    pub kv: KvOptions,
    /// Speculative decoding (default: none).
    pub spec: SpecConfig,
}

/// Opt-in context shifting (llama.cpp's `--context-shift`): keep the first `keep` tokens (the
/// BOS, a system prompt), discard the older half of the rest of what is cached, recompute the
/// cache from what is left. As in llama.cpp, `keep` is capped at the prompt's length (only
/// prompt tokens are pinned), and a shift that would discard nothing ends generation with
/// [`StopReason::ContextFull`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextShift {
    /// Tokens at the start of the sequence never dropped (capped at the prompt's length).
    pub keep: usize,
}

/// Why a generation ended (serialized in snake case: `length`, `end_of_generation`, ...).
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

/// What a generation that failed midway had produced (see [`GenerateError::Interrupted`]).
#[derive(Clone, Debug, Default)]
pub struct PartialOutput {
    /// Tokens generated before the failure.
    pub tokens: Vec<u32>,
    /// Their text, as passed to `on_text`.
    pub text: String,
    /// Counts and times measured by the caller's loop (the engine reports its own only when a
    /// request finishes): `prompt_n`, `prompt_ms`, `predicted_n`, `predicted_ms`.
    pub timings: Timings,
    /// Tokens dropped by context shifts; empty when not known (the engine reports shifts only
    /// when a request finishes).
    pub context_shifts: Vec<usize>,
    /// What speculative decoding did; `None` when not known, for the same reason.
    pub spec: Option<SpecStats>,
}

/// The result of a finished generation.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// Every generated token, an end-of-generation token included (its text is not shown).
    pub tokens: Vec<u32>,
    /// The generated text, as passed to `on_text`: no end-of-generation token text, nothing
    /// from a matched stop string on.
    pub text: String,
    /// Prompt and generation counts and times (llama-server's fields).
    pub timings: Timings,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// Tokens dropped by context shifts, one entry per shift (empty when none happened).
    pub context_shifts: Vec<usize>,
    /// What speculative decoding did (`None` without it).
    pub spec: Option<SpecStats>,
}

/// Last-row logits of a forward pass as a host vector (empty when the pass returned none).
pub fn last_logits(logits: Tensor<2>) -> Vec<f32> {
    let [rows, vocab] = logits.dims();
    let mut all = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
    let start = rows.saturating_sub(1) * vocab;
    if start > all.len() {
        return Vec::new();
    }
    all.split_off(start)
}

/// The request's prompt checks.
fn check_prompt(req: &GenerateRequest, ctx: usize) -> Result<(), GenerateError> {
    if req.prompt_tokens.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if req.prompt_tokens.len() > ctx {
        return Err(GenerateError::PromptTooLong {
            prompt: req.prompt_tokens.len(),
            ctx,
        });
    }
    Ok(())
}

/// The output of a request for no tokens: nothing is run (llama.cpp's `-n 0`).
fn nothing_generated() -> GenerateOutput {
    GenerateOutput {
        tokens: Vec::new(),
        text: String::new(),
        timings: Timings::default(),
        stop_reason: StopReason::Length,
        context_shifts: Vec::new(),
        spec: None,
    }
}

/// Generates from `req.prompt_tokens`, calling `on_text` with each piece of text as soon as it
/// is safe to show (complete UTF-8, not a possible stop-string prefix).
///
/// A failure after the prompt was accepted is [`GenerateError::Interrupted`], carrying what
/// was generated before it. `max_tokens == 0` runs nothing and returns no tokens.
pub fn generate(
    model: &Model,
    tokenizer: &GgufTokenizer,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    run_inline(model, tokenizer, None, None, req, on_text)
}

/// [`generate`] with a draft model for `--spec draft` (its vocabulary is checked against the
/// target's first: a mismatch is an error naming the first differing token).
pub fn generate_with_draft(
    target: &LoadedModel,
    draft: Option<&LoadedModel>,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    let draft = draft.map(|d| (&d.file, &d.model));
    run_inline(
        &target.model,
        &target.tokenizer,
        Some(&target.file),
        draft,
        req,
        on_text,
    )
}

/// The engine's scheduler, one sequence, on this thread.
fn run_inline(
    model: &Model,
    tokenizer: &GgufTokenizer,
    target_file: Option<&ember_formats::GgufFile>,
    draft: Option<(&ember_formats::GgufFile, &Model)>,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    if req.max_tokens == 0 {
        check_prompt(req, req.ctx_size)?;
        return Ok(nothing_generated());
    }
    let mut generation = Generation::start(model, tokenizer, target_file, draft, req)?;
    collect_events(req.prompt_tokens.len(), || generation.next_event(), on_text)
}

/// One generation run step by step on the calling thread: the engine's scheduler with one
/// sequence, advanced only when the caller asks for the next event. This is what a pull-style
/// token iterator is built on (the facade crate's `TextStream`); [`generate`] is the same loop
/// pushing text into a callback. Dropping it stops the generation: nothing runs in the
/// background.
pub struct Generation<'m> {
    scheduler: Scheduler<'m>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    finished: bool,
}

impl<'m> Generation<'m> {
    /// Checks the request and sets up its KV cache (sized for `req.ctx_size` tokens); nothing
    /// is computed until [`next_event`](Self::next_event). `draft` is the draft model (and
    /// its file, for the vocabulary check) when `req.spec` asks for one; `target_file` is the
    /// target's file, which that check needs too.
    ///
    /// `max_tokens == 0` is run as asked: the first event is `Done` with no tokens (after the
    /// prompt is computed); [`generate`] skips the run entirely instead.
    pub fn start(
        model: &'m Model,
        tokenizer: &'m GgufTokenizer,
        target_file: Option<&ember_formats::GgufFile>,
        draft: Option<(&ember_formats::GgufFile, &'m Model)>,
        req: &GenerateRequest,
    ) -> Result<Self, GenerateError> {
        check_prompt(req, req.ctx_size)?;
        let mut kv = req.kv.clone();
        kv.budget = Some(KvBudget::Tokens(req.ctx_size));
        let config = EngineConfig {
            kv,
            spec: req.spec.clone(),
            ..EngineConfig::new(1, req.ctx_size)
        };
        let parts = SchedulerParts::new(model, draft, target_file, &config)?;
        let mut scheduler = Scheduler::new(
            model,
            tokenizer,
            draft.map(|d| d.1),
            config,
            parts,
            Counters::detached(),
        );
        let (tx, events) = unbounded_channel();
        scheduler.push(engine_request(req), tx);
        Ok(Self {
            scheduler,
            events,
            finished: false,
        })
    }

    /// [`start`](Self::start) for a [`LoadedModel`] and an optional loaded draft model.
    pub fn start_loaded(
        target: &'m LoadedModel,
        draft: Option<&'m LoadedModel>,
        req: &GenerateRequest,
    ) -> Result<Self, GenerateError> {
        Self::start(
            &target.model,
            &target.tokenizer,
            Some(&target.file),
            draft.map(|d| (&d.file, &d.model)),
            req,
        )
    }

    /// Runs scheduler steps until the next event: a [`Event::Token`], then finally one
    /// [`Event::Done`] or [`Event::Error`]; `None` after that.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.finished {
            return None;
        }
        let event = loop {
            if let Ok(ev) = self.events.try_recv() {
                break Some(ev);
            }
            if self.scheduler.idle() {
                break self.events.try_recv().ok();
            }
            self.scheduler.guarded_step();
        };
        if !matches!(event, Some(Event::Token { .. })) {
            self.finished = true;
        }
        event
    }
}

/// [`generate`] through a running [`Engine`](crate::engine::Engine) (the server's, shared with
/// other requests). Failures after the request was accepted are
/// [`GenerateError::Interrupted`], as in [`generate`].
pub fn generate_on_engine(
    engine: &crate::engine::Engine,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    if req.max_tokens == 0 {
        check_prompt(req, engine.ctx_size())?;
        return Ok(nothing_generated());
    }
    let mut stream = engine.submit(engine_request(req))?;
    collect_events(req.prompt_tokens.len(), || stream.blocking_next(), on_text)
}

/// The engine's form of a request (its speculation settings are the engine's own).
fn engine_request(req: &GenerateRequest) -> EngineRequest {
    EngineRequest {
        prompt_tokens: req.prompt_tokens.clone(),
        max_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        stop: req.stop.clone(),
        ignore_eos: !req.stop_at_eog,
        logprobs: None,
        context_shift: req.context_shift,
        spec: Default::default(),
    }
}

/// Reads an engine stream to its end. On an error event, what came before it is kept (with
/// timings measured here, since the engine reports its own only when done).
fn collect_events(
    prompt_len: usize,
    mut next: impl FnMut() -> Option<Event>,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    let t0 = Instant::now();
    let mut first: Option<Instant> = None;
    let (mut tokens, mut text) = (Vec::new(), String::new());
    let error = loop {
        match next() {
            Some(Event::Token {
                id, text: piece, ..
            }) => {
                // An end-of-generation token is listed, its text is not shown.
                first.get_or_insert_with(Instant::now);
                tokens.push(id);
                text.push_str(&piece);
                on_text(&piece);
            }
            Some(Event::Done {
                stop_reason,
                timings,
                context_shifts,
                spec,
            }) => {
                return Ok(GenerateOutput {
                    tokens,
                    text,
                    timings,
                    stop_reason,
                    context_shifts,
                    spec,
                });
            }
            Some(Event::Error(e)) => break GenerateError::Failed(e),
            None => break GenerateError::Failed("the engine stopped".into()),
        }
    };
    let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1e3;
    let now = Instant::now();
    let timings = Timings {
        // The prompt was computed if a token came (how much of it the prefix cache served is
        // not known here).
        prompt_n: if first.is_some() { prompt_len } else { 0 },
        prompt_ms: ms(t0, first.unwrap_or(now)),
        predicted_n: tokens.len(),
        predicted_ms: first.map_or(0.0, |f| ms(f, now)),
        ..Timings::default()
    };
    Err(error.interrupted(PartialOutput {
        tokens,
        text,
        timings,
        context_shifts: Vec::new(),
        spec: None,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// SmolLM2, loaded once (the context-shift tests run the real model through the engine).
    fn smollm() -> &'static LoadedModel {
        static M: OnceLock<LoadedModel> = OnceLock::new();
        M.get_or_init(|| {
            let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2");
            LoadedModel::open(&path, &ember_models::default_device()).expect("load SmolLM2")
        })
    }

    fn request(
        prompt: &[u32],
        max_tokens: usize,
        ctx: usize,
        keep: Option<usize>,
    ) -> GenerateRequest {
        GenerateRequest {
            prompt_tokens: prompt.to_vec(),
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ctx_size: ctx,
            stop_at_eog: false,
            context_shift: keep.map(|keep| ContextShift { keep }),
            kv: KvOptions {
                block_size: 4,
                ..KvOptions::default()
            },
            spec: SpecConfig::default(),
        }
    }

    /// The issue #14 failure: shifts computed over the whole history rebuilt a cache larger
    /// than the context and every token was lost. Any length, context and `keep` must either
    /// run to `max_tokens` or stop with `ContextFull` when a shift cannot drop anything; this
    /// now runs the engine's scheduler on the real model (small contexts, so many shifts).
    #[test]
    fn context_shift_keeps_the_cache_within_the_context_for_any_length() {
        let m = smollm();
        for ctx in [2usize, 3, 8, 13] {
            for plen in [1, 2, ctx - 1, ctx] {
                let prompt: Vec<u32> = (0..plen as u32).map(|i| 1000 + i).collect();
                for keep in [0, 1, plen, 1000] {
                    for n in [1, 3 * ctx + 7] {
                        let req = request(&prompt, n, ctx, Some(keep));
                        let case = format!("ctx {ctx} prompt {plen} keep {keep} n {n}");
                        let mut shown = String::new();
                        let out = generate(&m.model, &m.tokenizer, &req, |p| shown.push_str(p))
                            .unwrap_or_else(|e| panic!("{case}: {e}"));
                        let pinned = keep.min(plen);
                        // The first token needs no cache room; each later one needs one slot.
                        let fits = plen + n - 1 <= ctx;
                        if fits || ctx - pinned >= 2 {
                            assert_eq!(out.stop_reason, StopReason::Length, "{case}");
                            assert_eq!(out.tokens.len(), n, "{case}");
                            assert_eq!(out.context_shifts.is_empty(), fits, "{case}");
                        } else {
                            assert_eq!(out.stop_reason, StopReason::ContextFull, "{case}");
                            assert_eq!(out.tokens.len(), ctx - plen + 1, "{case}");
                        }
                        assert!(out.context_shifts.iter().all(|&d| d >= 1), "{case}");
                        assert_eq!(out.timings.predicted_n, out.tokens.len(), "{case}");
                        assert_eq!(shown, out.text, "{case}");
                        assert_eq!(out.text, m.tokenizer.decode(&out.tokens, true), "{case}");
                    }
                }
            }
        }
    }

    /// After a shift the sequence continues from exactly the text a fresh run over the kept
    /// window would see: the token after a shift equals greedy decoding of that window.
    #[test]
    fn a_shift_continues_from_the_kept_window() {
        let m = smollm();
        let prompt = m.tokenize_prompt("The quick brown fox jumps over").unwrap();
        let ctx = prompt.len() + 6;
        let req = request(&prompt, 12, ctx, Some(1));
        let out = generate(&m.model, &m.tokenizer, &req, |_| {}).unwrap();
        assert_eq!(out.tokens.len(), 12);
        let dropped = out.context_shifts[0];
        // The window when the first shift happened: the cache was full (ctx tokens) and the
        // next token had no room.
        let mut all = prompt.clone();
        all.extend_from_slice(&out.tokens);
        let first_shift_at = ctx + 1; // tokens in `all` when the cache overflowed
        let mut window: Vec<u32> = all[..first_shift_at].to_vec();
        window.drain(1..1 + dropped);
        let fresh = generate(
            &m.model,
            &m.tokenizer,
            &request(&window, 1, ctx, None),
            |_| {},
        )
        .unwrap();
        assert_eq!(
            fresh.tokens[0], all[first_shift_at],
            "token after the shift"
        );
    }

    #[test]
    fn without_a_shift_a_full_context_is_a_stop_reason_not_an_error() {
        let m = smollm();
        let req = request(&[1000, 1001, 1002], 50, 8, None);
        let out = generate(&m.model, &m.tokenizer, &req, |_| {}).unwrap();
        assert_eq!(out.stop_reason, StopReason::ContextFull);
        assert_eq!(out.tokens.len(), 8 - 3 + 1);
    }

    /// The engine path: an error event after some tokens, or a stream that ends without
    /// `Done`, keeps the tokens; `Done` is a normal result.
    #[test]
    fn engine_stream_failures_keep_what_was_generated() {
        let token = |id: u32, text: &str| Event::Token {
            id,
            text: text.to_string(),
            logprob: None,
        };
        let streams = [
            (
                vec![
                    token(28, ","),
                    token(253, " a"),
                    Event::Error("boom".into()),
                ],
                "boom",
            ),
            (vec![token(28, ","), token(253, " a")], "the engine stopped"),
        ];
        for (events, why) in streams {
            let mut events = events.into_iter();
            let mut shown = String::new();
            let err = collect_events(5, || events.next(), |p| shown.push_str(p)).unwrap_err();
            let partial = err.partial().expect("a partial output");
            assert_eq!(partial.tokens, [28, 253]);
            assert_eq!(partial.text, ", a");
            assert_eq!(shown, ", a");
            assert_eq!(partial.timings.prompt_n, 5);
            assert_eq!(partial.timings.predicted_n, 2);
            assert!(err.to_string().contains(why), "{err}");
        }
        let mut events = vec![
            token(28, ","),
            Event::Done {
                stop_reason: StopReason::Length,
                timings: Default::default(),
                context_shifts: vec![3],
                spec: None,
            },
        ]
        .into_iter();
        let out = collect_events(5, || events.next(), |_| {}).unwrap();
        assert_eq!(out.tokens, [28]);
        assert_eq!(out.stop_reason, StopReason::Length);
        assert_eq!(out.context_shifts, [3]);
    }
}
