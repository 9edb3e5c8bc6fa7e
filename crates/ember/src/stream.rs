//! Streams of generated text: [`TextStream`] (on the calling thread) and what both it and the
//! engine's stream share, [`Completion`].

use std::time::Instant;

use ember_runtime::engine::{Event, Timings};
use ember_runtime::generate::{Generation, PartialOutput, StopReason};
use ember_runtime::spec::SpecStats;

use crate::error::{Error, Result};

/// A finished generation: all its tokens and text, why it stopped, and how long it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The generated token ids (an end-of-generation token is listed, its text is not shown).
    pub tokens: Vec<u32>,
    /// The generated text (a matched stop string excluded).
    pub text: String,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// llama-server's timing fields: prompt and generation token counts and milliseconds.
    pub timings: Timings,
    /// Tokens dropped by each context shift (empty when none happened).
    pub context_shifts: Vec<usize>,
    /// What speculative decoding did (`None` without it).
    pub spec: Option<SpecStats>,
}

/// What one engine event means for a stream.
enum Step {
    Piece(String),
    Skip,
    End,
    Fail(Error),
}

/// Gathers a stream's events into its [`Completion`] (or the partial output of a failure).
struct Collector {
    prompt_tokens: usize,
    tokens: Vec<u32>,
    text: String,
    started: Instant,
    first: Option<Instant>,
    done: Option<Completion>,
    failed: Option<String>,
}

impl Collector {
    fn new(prompt_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            tokens: Vec::new(),
            text: String::new(),
            started: Instant::now(),
            first: None,
            done: None,
            failed: None,
        }
    }

    /// A stream for no tokens: finished before it starts (llama.cpp's `-n 0`).
    fn nothing(prompt_tokens: usize) -> Self {
        let mut c = Self::new(prompt_tokens);
        c.done = Some(Completion {
            prompt_tokens,
            tokens: Vec::new(),
            text: String::new(),
            stop_reason: StopReason::Length,
            timings: Timings::default(),
            context_shifts: Vec::new(),
            spec: None,
        });
        c
    }

    fn ended(&self) -> bool {
        self.done.is_some() || self.failed.is_some()
    }

    fn step(&mut self, event: Option<Event>) -> Step {
        match event {
            Some(Event::Token { id, text, .. }) => {
                self.first.get_or_insert_with(Instant::now);
                self.tokens.push(id);
                self.text.push_str(&text);
                if text.is_empty() {
                    Step::Skip
                } else {
                    Step::Piece(text)
                }
            }
            Some(Event::Done {
                stop_reason,
                timings,
                context_shifts,
                spec,
            }) => {
                self.done = Some(Completion {
                    prompt_tokens: self.prompt_tokens,
                    tokens: std::mem::take(&mut self.tokens),
                    text: std::mem::take(&mut self.text),
                    stop_reason,
                    timings,
                    context_shifts,
                    spec,
                });
                Step::End
            }
            Some(Event::Error(message)) => self.fail(message),
            None => self.fail("the generation stopped before it ended".into()),
        }
    }

    fn fail(&mut self, message: String) -> Step {
        self.failed = Some(message);
        Step::Fail(self.error())
    }

    /// The failure with everything generated before it (timings measured here: the engine
    /// reports its own only when a generation completes).
    fn error(&self) -> Error {
        let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1e3;
        let now = Instant::now();
        let timings = Timings {
            prompt_n: if self.first.is_some() {
                self.prompt_tokens
            } else {
                0
            },
            prompt_ms: ms(self.started, self.first.unwrap_or(now)),
            predicted_n: self.tokens.len(),
            predicted_ms: self.first.map_or(0.0, |f| ms(f, now)),
            ..Timings::default()
        };
        Error::Interrupted {
            message: self.failed.clone().unwrap_or_default(),
            partial: Box::new(PartialOutput {
                tokens: self.tokens.clone(),
                text: self.text.clone(),
                timings,
                context_shifts: Vec::new(),
                spec: None,
            }),
        }
    }

    fn into_result(self) -> Result<Completion> {
        match self.done {
            Some(c) => Ok(c),
            None => Err(self.error()),
        }
    }
}

/// Generated text as it is produced, from [`Model::generate`](crate::Model::generate) or
/// [`Model::chat`](crate::Model::chat).
///
/// Each item is a piece of text safe to show (complete UTF-8; text that may be the start of a
/// stop string is held back until it is known not to be). The generation runs on the calling
/// thread, a scheduler step at a time as items are asked for; dropping the stream stops it.
/// A failure midway is one `Err` item, [`Error::Interrupted`], holding everything generated
/// before it. [`finish`](Self::finish) runs it to the end and returns the [`Completion`].
pub struct TextStream<'m> {
    generation: Option<Generation<'m>>,
    collector: Collector,
}

impl<'m> TextStream<'m> {
    pub(crate) fn new(generation: Generation<'m>, prompt_tokens: usize) -> Self {
        Self {
            generation: Some(generation),
            collector: Collector::new(prompt_tokens),
        }
    }

    pub(crate) fn empty(prompt_tokens: usize) -> Self {
        Self {
            generation: None,
            collector: Collector::nothing(prompt_tokens),
        }
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        match &self.collector.done {
            Some(c) => &c.tokens,
            None => &self.collector.tokens,
        }
    }

    /// Runs the generation to its end (what was not read yet is generated, not shown) and
    /// returns the whole of it.
    pub fn finish(mut self) -> Result<Completion> {
        for item in self.by_ref() {
            item?;
        }
        self.collector.into_result()
    }

    /// [`finish`](Self::finish)'s text.
    pub fn text(self) -> Result<String> {
        Ok(self.finish()?.text)
    }
}

impl Iterator for TextStream<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.collector.ended() {
            return None;
        }
        let generation = self.generation.as_mut()?;
        loop {
            match self.collector.step(generation.next_event()) {
                Step::Piece(text) => return Some(Ok(text)),
                Step::Skip => continue,
                Step::End => {
                    // The scheduler and its KV cache are no longer needed.
                    self.generation = None;
                    return None;
                }
                Step::Fail(e) => {
                    self.generation = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Generated text of one request to an [`Engine`](crate::Engine), as a blocking
/// [`Iterator`]; [`into_async`](Self::into_async) turns it into an async
/// [`futures_core::Stream`] for tokio users. Items are as [`TextStream`]'s. Dropping it
/// cancels the request.
///
/// The iterator blocks the thread while the engine works: inside an async runtime use
/// [`AsyncEngineStream`] (blocking a tokio worker on the iterator panics, as tokio's
/// `blocking_recv` does).
pub struct EngineStream {
    inner: EngineEvents,
}

/// [`EngineStream`]'s async form: a [`futures_core::Stream`] of the same items.
pub struct AsyncEngineStream {
    inner: EngineEvents,
}

/// The engine's events for one request and what they add up to.
struct EngineEvents {
    stream: Option<ember_runtime::engine::RequestStream>,
    /// Held so the engine runs until this request's stream is dropped, even when the caller
    /// dropped every `Engine` handle (`model.engine(..)?.generate(..)?.text()`).
    _engine: Option<ember_runtime::engine::Engine>,
    collector: Collector,
}

impl EngineEvents {
    /// What to yield for `event`; `None` to read on.
    fn handle(&mut self, event: Option<Event>) -> Option<Option<Result<String>>> {
        match self.collector.step(event) {
            Step::Piece(text) => Some(Some(Ok(text))),
            Step::Skip => None,
            Step::End => {
                self.stream = None;
                Some(None)
            }
            Step::Fail(e) => {
                self.stream = None;
                Some(Some(Err(e)))
            }
        }
    }
}

impl EngineStream {
    pub(crate) fn new(
        stream: ember_runtime::engine::RequestStream,
        engine: ember_runtime::engine::Engine,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            inner: EngineEvents {
                stream: Some(stream),
                _engine: Some(engine),
                collector: Collector::new(prompt_tokens),
            },
        }
    }

    pub(crate) fn empty(prompt_tokens: usize) -> Self {
        Self {
            inner: EngineEvents {
                stream: None,
                _engine: None,
                collector: Collector::nothing(prompt_tokens),
            },
        }
    }

    /// The engine's id for this request, while it runs (`None` once it has ended, and for a
    /// request of no tokens, which the engine never saw).
    pub fn id(&self) -> Option<u64> {
        self.inner.stream.as_ref().map(|s| s.id())
    }

    /// The same request as an async stream.
    pub fn into_async(self) -> AsyncEngineStream {
        AsyncEngineStream { inner: self.inner }
    }

    /// Blocks until the request ends and returns the whole of it.
    pub fn finish(mut self) -> Result<Completion> {
        for item in self.by_ref() {
            item?;
        }
        self.inner.collector.into_result()
    }

    /// [`finish`](Self::finish)'s text.
    pub fn text(self) -> Result<String> {
        Ok(self.finish()?.text)
    }
}

impl Iterator for EngineStream {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        let inner = &mut self.inner;
        loop {
            if inner.collector.ended() {
                return None;
            }
            let event = inner.stream.as_mut()?.blocking_next();
            if let Some(item) = inner.handle(event) {
                return item;
            }
        }
    }
}

impl AsyncEngineStream {
    /// Waits for the request to end and returns the whole of it.
    pub async fn completion(mut self) -> Result<Completion> {
        use futures_core::Stream;
        while let Some(item) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut self).poll_next(cx)).await
        {
            item?;
        }
        self.inner.collector.into_result()
    }
}

impl futures_core::Stream for AsyncEngineStream {
    type Item = Result<String>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        // No self-references: the stream is `Unpin`, so the pin can be undone.
        let inner = &mut self.get_mut().inner;
        loop {
            if inner.collector.ended() {
                return Poll::Ready(None);
            }
            let Some(stream) = inner.stream.as_mut() else {
                return Poll::Ready(None);
            };
            let event = match stream.poll_next_event(cx) {
                Poll::Ready(event) => event,
                Poll::Pending => return Poll::Pending,
            };
            if let Some(item) = inner.handle(event) {
                return Poll::Ready(item);
            }
        }
    }
}
