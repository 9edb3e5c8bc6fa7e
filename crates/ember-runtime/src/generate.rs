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
    /// The generation failed after the prompt was accepted: `partial` is everything generated
    /// (and passed to `on_text`) before the failure, so a caller can still show or save it.
    #[error("{error} (after {} generated tokens)", .partial.tokens.len())]
    Interrupted {
        error: Box<GenerateError>,
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
/// BOS, a system prompt), discard the older half of the rest of what is cached, recompute the
/// cache from what is left. As in llama.cpp, `keep` is capped at the prompt's length (only
/// prompt tokens are pinned), and a shift that would discard nothing ends generation with
/// [`StopReason::ContextFull`].
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

/// What a generation that failed midway had produced (see [`GenerateError::Interrupted`]).
#[derive(Clone, Debug, Default)]
pub struct PartialOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub timings: Timings,
    pub context_shifts: Vec<usize>,
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

/// The request's prompt checks, shared by both loops.
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
    check_prompt(req, req.ctx_size)?;
    if req.max_tokens == 0 {
        return Ok(nothing_generated());
    }
    let mut cache = model.new_cache_with(&req.kv, req.ctx_size)?;
    run(tokenizer, req, on_text, |tokens, fresh| {
        if fresh {
            cache = model.new_cache_with(&req.kv, req.ctx_size)?;
        }
        Ok(last_logits(model.forward(
            tokens,
            &mut cache,
            Logits::Last,
        )?))
    })
}

/// Everything [`run`] has produced so far, and the text it still holds back.
struct Progress {
    tokens: Vec<u32>,
    text: String,
    timings: Timings,
    context_shifts: Vec<usize>,
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// When the prompt's pass ended (generation began).
    started: Option<Instant>,
}

impl Progress {
    fn emit(&mut self, piece: &str, on_text: &mut impl FnMut(&str)) {
        self.text.push_str(piece);
        on_text(piece);
    }

    /// Shows what was held back (an unfinished character, a possible stop-string prefix).
    fn flush(&mut self, on_text: &mut impl FnMut(&str)) {
        let tail = self.decoder.finish();
        let out = self.stops.push(&tail);
        self.emit(&out.text, on_text);
        if !out.stopped {
            let rest = self.stops.finish();
            self.emit(&rest, on_text);
        }
    }
}

/// The generation loop over `forward(tokens, fresh)`, which appends `tokens` to the sequence's
/// cache (to a new, empty cache when `fresh`) and returns the last position's logits.
fn run(
    tokenizer: &GgufTokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
    mut forward: impl FnMut(&[u32], bool) -> Result<Vec<f32>, GenerateError>,
) -> Result<GenerateOutput, GenerateError> {
    let mut p = Progress {
        tokens: Vec::new(),
        text: String::new(),
        timings: Timings {
            prompt_n: req.prompt_tokens.len(),
            ..Timings::default()
        },
        context_shifts: Vec::new(),
        decoder: StreamDecoder::new(true),
        stops: StopMatcher::new(req.stop.clone()),
        started: None,
    };
    let t0 = Instant::now();
    let result = steps(tokenizer, req, &mut p, &mut on_text, &mut forward);
    // Also on failure: the held-back text belongs to tokens that were generated.
    if !matches!(result, Ok(StopReason::StopString)) {
        p.flush(&mut on_text);
    }
    let t = &mut p.timings;
    t.predicted_n = p.tokens.len();
    match p.started {
        Some(t1) => t.predicted_ms = t1.elapsed().as_secs_f64() * 1e3,
        None => t.prompt_ms = t0.elapsed().as_secs_f64() * 1e3,
    }
    match result {
        Ok(stop_reason) => Ok(GenerateOutput {
            tokens: p.tokens,
            text: p.text,
            timings: p.timings,
            stop_reason,
            context_shifts: p.context_shifts,
        }),
        Err(e) => Err(e.interrupted(PartialOutput {
            tokens: p.tokens,
            text: p.text,
            timings: p.timings,
            context_shifts: p.context_shifts,
        })),
    }
}

/// [`run`]'s steps; returns why generation stopped. What it produced is in `p`.
fn steps(
    tokenizer: &GgufTokenizer,
    req: &GenerateRequest,
    p: &mut Progress,
    on_text: &mut impl FnMut(&str),
    forward: &mut impl FnMut(&[u32], bool) -> Result<Vec<f32>, GenerateError>,
) -> Result<StopReason, GenerateError> {
    let prompt = &req.prompt_tokens;
    let mut sampler = Sampler::new(req.sampling.clone());
    // The penalties look at everything generated; `window` is what the cache holds (the
    // prompt and output minus what context shifts dropped).
    let mut history = prompt.clone();
    let mut window = prompt.clone();
    let t0 = Instant::now();
    let mut logits = forward(prompt, false)?;
    p.timings.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
    p.started = Some(Instant::now());
    while p.tokens.len() < req.max_tokens {
        if logits.is_empty() {
            return Err(GenerateError::Failed(
                "the model returned no logits".to_string(),
            ));
        }
        let next = sampler.sample(&logits, &history);
        p.tokens.push(next);
        history.push(next);
        if req.stop_at_eog && tokenizer.is_eog(next) {
            return Ok(StopReason::EndOfGeneration);
        }
        let piece = p.decoder.push(tokenizer, next);
        let out = p.stops.push(&piece);
        p.emit(&out.text, on_text);
        if out.stopped {
            return Ok(StopReason::StopString);
        }
        if p.tokens.len() == req.max_tokens {
            break;
        }
        if window.len() >= req.ctx_size {
            let Some(shift) = req.context_shift else {
                return Ok(StopReason::ContextFull);
            };
            // The cache holds `window`; `next` has no room. Rebuild it from the kept tokens
            // and `next` in one pass: recomputing costs one prefill per shift but gives
            // exactly the K/V a fresh run over the shorter text would (no re-rotated keys).
            let keep = shift.keep.min(prompt.len()).min(window.len());
            let discard = (window.len() - keep) / 2;
            if discard == 0 {
                return Ok(StopReason::ContextFull);
            }
            window.drain(keep..keep + discard);
            window.push(next);
            logits = forward(&window, true)?;
            p.context_shifts.push(discard);
            continue;
        }
        logits = forward(&[next], false)?;
        window.push(next);
    }
    Ok(StopReason::Length)
}

/// [`generate`] through the continuous-batching [`Engine`](crate::engine::Engine): the same
/// sampling and stopping rules, run by the scheduler the server uses (a context shift is not
/// available there; use [`generate`] for it). Failures after the request was accepted are
/// [`GenerateError::Interrupted`], as in [`generate`].
pub fn generate_on_engine(
    engine: &crate::engine::Engine,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    use crate::engine::EngineRequest;
    if req.max_tokens == 0 {
        check_prompt(req, engine.ctx_size())?;
        return Ok(nothing_generated());
    }
    let mut stream = engine.submit(EngineRequest {
        prompt_tokens: req.prompt_tokens.clone(),
        max_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        stop: req.stop.clone(),
        ignore_eos: !req.stop_at_eog,
        logprobs: None,
    })?;
    collect_events(req.prompt_tokens.len(), || stream.blocking_next(), on_text)
}

/// Reads an engine stream to its end. On an error event, what came before it is kept (with
/// timings measured here, since the engine reports its own only when done).
fn collect_events(
    prompt_len: usize,
    mut next: impl FnMut() -> Option<crate::engine::Event>,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    use crate::engine::Event;
    let t0 = Instant::now();
    let mut first: Option<Instant> = None;
    let (mut tokens, mut text) = (Vec::new(), String::new());
    let error = loop {
        match next() {
            Some(Event::Token {
                id, text: piece, ..
            }) => {
                // As `generate`: an end-of-generation token is listed, its text is not shown.
                first.get_or_insert_with(Instant::now);
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
    };
    Err(error.interrupted(PartialOutput {
        tokens,
        text,
        timings,
        context_shifts: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::engine::Event;

    /// SmolLM2's tokenizer (the loop decodes real pieces; the model itself is faked).
    fn tokenizer() -> &'static GgufTokenizer {
        static TOK: OnceLock<GgufTokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2");
            let file = ember_formats::GgufFile::open(&path).expect("open SmolLM2");
            GgufTokenizer::from_gguf(&file).expect("SmolLM2 tokenizer")
        })
    }

    /// Ordinary word pieces (", a band of"): the fake model emits them in turn.
    const WORDS: [u32; 4] = [28, 253, 5975, 282];

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
            kv: KvOptions::default(),
        }
    }

    /// A fake model with a KV cache of `ctx` positions that fails as the real one does when a
    /// pass does not fit, checks every context shift against the text so far, and fails on
    /// purpose at pass `fail_at` (0 = the prompt's).
    struct Fake {
        ctx: usize,
        keep: usize,
        cached: usize,
        /// The prompt and every token the fake has made the sampler pick.
        text: Vec<u32>,
        passes: usize,
        fail_at: Option<usize>,
    }

    impl Fake {
        fn new(req: &GenerateRequest, fail_at: Option<usize>) -> Self {
            Self {
                ctx: req.ctx_size,
                // As the loop pins it: only prompt tokens.
                keep: req
                    .context_shift
                    .map_or(0, |s| s.keep.min(req.prompt_tokens.len())),
                cached: 0,
                text: req.prompt_tokens.clone(),
                passes: 0,
                fail_at,
            }
        }

        fn forward(&mut self, tokens: &[u32], fresh: bool) -> Result<Vec<f32>, GenerateError> {
            if self.fail_at == Some(self.passes) {
                return Err(GenerateError::Failed(format!(
                    "injected at pass {}",
                    self.passes
                )));
            }
            if fresh {
                // A shift: the pinned prefix, then the newest tokens, ending with the last one
                // sampled.
                let keep = self.keep;
                assert_eq!(tokens[..keep], self.text[..keep], "kept prefix");
                let tail = &tokens[keep..];
                assert_eq!(
                    *tail,
                    self.text[self.text.len() - tail.len()..],
                    "newest tokens"
                );
                assert!(tail.len() < self.text.len() - keep, "something was dropped");
                self.cached = 0;
            } else if self.passes > 0 {
                assert_eq!(
                    tokens,
                    &self.text[self.text.len() - 1..],
                    "one decode token"
                );
            }
            if self.cached + tokens.len() > self.ctx {
                return Err(GenerateError::Failed(format!(
                    "context is full: {} tokens cached + {} new exceeds {}",
                    self.cached,
                    tokens.len(),
                    self.ctx
                )));
            }
            self.cached += tokens.len();
            let next = WORDS[self.passes % WORDS.len()];
            self.passes += 1;
            self.text.push(next);
            let mut logits = vec![0.0; tokenizer().vocab_size()];
            logits[next as usize] = 1.0;
            Ok(logits)
        }
    }

    fn run_fake(
        req: &GenerateRequest,
        fail_at: Option<usize>,
    ) -> (Result<GenerateOutput, GenerateError>, String) {
        let mut fake = Fake::new(req, fail_at);
        let mut shown = String::new();
        let out = run(
            tokenizer(),
            req,
            |piece| shown.push_str(piece),
            |tokens, fresh| fake.forward(tokens, fresh),
        );
        (out, shown)
    }

    /// The reported failure: shifts were computed over the whole history, so the second one
    /// rebuilt a cache larger than the context ("0 tokens cached + 65 new exceeds the context
    /// size of 64") and every token was lost. Any length, context and `keep` must now either
    /// run to `max_tokens` or stop with `ContextFull` when a shift cannot drop anything.
    #[test]
    fn context_shift_keeps_the_cache_within_the_context_for_any_length() {
        for ctx in [1usize, 2, 3, 4, 5, 8, 13, 64] {
            for plen in [1, 2, 3, ctx.saturating_sub(1), ctx] {
                if plen == 0 || plen > ctx {
                    continue;
                }
                let prompt: Vec<u32> = (0..plen as u32).map(|i| 1000 + i).collect();
                for keep in [0, 1, 2, plen, plen + 1, 1000] {
                    for n in [1, 2, ctx, 3 * ctx + 7, 300] {
                        let req = request(&prompt, n, ctx, Some(keep));
                        let case = format!("ctx {ctx} prompt {plen} keep {keep} n {n}");
                        let (out, shown) = run_fake(&req, None);
                        let out = out.unwrap_or_else(|e| panic!("{case}: {e}"));
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
                        assert_eq!(out.text, tokenizer().decode(&out.tokens, true), "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn without_a_shift_a_full_context_is_a_stop_reason_not_an_error() {
        let req = request(&[1000, 1001, 1002], 50, 8, None);
        let (out, _) = run_fake(&req, None);
        let out = out.unwrap();
        assert_eq!(out.stop_reason, StopReason::ContextFull);
        assert_eq!(out.tokens.len(), 8 - 3 + 1);
    }

    /// A failure midway hands back everything generated (and shown) before it.
    #[test]
    fn a_failure_midway_keeps_what_was_generated() {
        // Pass 0 is the prompt's, pass k produces the token after the k-th.
        let req = request(&[1000, 1001, 1002], 20, 64, None);
        let (out, shown) = run_fake(&req, Some(6));
        let err = out.unwrap_err();
        let partial = err.partial().expect("a partial output");
        assert_eq!(partial.tokens, [28, 253, 5975, 282, 28, 253]);
        assert_eq!(partial.text, tokenizer().decode(&partial.tokens, true));
        assert_eq!(shown, partial.text, "everything kept was shown");
        assert_eq!(partial.timings.predicted_n, 6);
        assert_eq!(partial.timings.prompt_n, 3);
        let msg = err.to_string();
        assert!(
            msg.contains("injected at pass 6") && msg.contains("after 6 generated tokens"),
            "{msg}"
        );

        // The prompt's own pass fails: nothing was generated, the error still says so.
        let (out, shown) = run_fake(&req, Some(0));
        let err = out.unwrap_err();
        assert!(err.partial().unwrap().tokens.is_empty());
        assert!(shown.is_empty());

        // A failure while a shift rebuilds the cache keeps the shifts already made.
        let req = request(&[1000, 1001, 1002], 100, 8, Some(1));
        let (out, _) = run_fake(&req, Some(12));
        let partial = out.unwrap_err().partial().unwrap().clone();
        assert_eq!(partial.tokens.len(), 12);
        assert!(!partial.context_shifts.is_empty());
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
            },
        ]
        .into_iter();
        let out = collect_events(5, || events.next(), |_| {}).unwrap();
        assert_eq!(out.tokens, [28]);
        assert_eq!(out.stop_reason, StopReason::Length);
    }
}
