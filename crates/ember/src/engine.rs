//! The continuous-batching engine for many concurrent requests.

use ember_runtime::chat::ChatMessage;
use ember_runtime::engine::{EngineRequest, EngineStats};

use crate::Model;
use crate::error::Result;
use crate::params::GenerateParams;
use crate::stream::EngineStream;

/// How [`Model::engine`](crate::Model::engine) sizes the engine. The defaults are
/// `ember serve`'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Requests decoded together (default 4); more wait in a queue.
    pub parallel: usize,
    /// Context size per request in tokens. Default: the model's trained length, capped so
    /// that `parallel` contexts fit in the model's KV budget. When the requests together need
    /// more than the budget, the newest is preempted and recomputed later (same output).
    pub ctx_size: Option<usize>,
    /// Tokens per forward pass: decode tokens plus prompt chunks (default 512).
    pub max_batch_tokens: usize,
    /// Requests that may wait for a slot (default: 64 per parallel slot); one more is refused
    /// with [`SubmitError::QueueFull`](ember_runtime::engine::SubmitError::QueueFull).
    pub max_queue: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            parallel: 4,
            ctx_size: None,
            max_batch_tokens: 512,
            max_queue: None,
        }
    }
}

/// A running engine: a scheduler thread that batches every submitted request's next tokens
/// (and prompt chunks) into shared forward passes. Clones share it; the thread stops when the
/// last clone is dropped. Each request's output is the one it would get alone.
/// Streams keep the engine alive: a request goes on after the last `Engine` handle is
/// dropped, until its stream is dropped too.
#[derive(Clone)]
pub struct Engine {
    inner: ember_runtime::engine::Engine,
    /// The model it runs (for tokenizing and the cached chat template).
    model: Model,
}

impl Engine {
    pub(crate) fn new(inner: ember_runtime::engine::Engine, model: Model) -> Self {
        Self { inner, model }
    }

    /// The model it runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Submits a text prompt (tokenized as [`Model::tokenize`] does).
    pub fn generate(&self, prompt: &str, params: &GenerateParams) -> Result<EngineStream> {
        let tokens = self.model.tokenize(prompt)?;
        self.generate_tokens(tokens, params)
    }

    /// Submits prompt token ids.
    pub fn generate_tokens(
        &self,
        prompt_tokens: Vec<u32>,
        params: &GenerateParams,
    ) -> Result<EngineStream> {
        crate::params::check_sampling(&params.sampling)?;
        let vocab = self.model.config().n_vocab;
        crate::params::check_prompt(&prompt_tokens, vocab, self.inner.ctx_size(), params)?;
        let prompt = prompt_tokens.len();
        if params.max_tokens == 0 {
            return Ok(EngineStream::empty(prompt));
        }
        let tokenizer = self.model.tokenizer();
        let request = EngineRequest {
            prompt_tokens,
            max_tokens: params.max_tokens,
            sampling: params.sampling.clone(),
            stop: params.stop.clone(),
            ignore_eos: params.ignore_eos,
            logprobs: None,
            context_shift: params
                .context_shift
                .map(|keep| ember_runtime::generate::ContextShift {
                    keep: keep + usize::from(tokenizer.add_bos()),
                }),
            spec: Default::default(),
        };
        let stream = self.inner.submit(request)?;
        Ok(EngineStream::new(stream, self.inner.clone(), prompt))
    }

    /// Submits a chat: `messages` rendered with the model's chat template, the reply streamed.
    pub fn chat(&self, messages: &[ChatMessage], params: &GenerateParams) -> Result<EngineStream> {
        let tokens = self.model.chat_tokens(messages)?;
        self.generate_tokens(tokens, params)
    }

    /// Requests running and waiting, KV blocks in use, token and preemption counters.
    pub fn stats(&self) -> EngineStats {
        self.inner.stats()
    }

    /// The context size of each request, in tokens.
    pub fn ctx_size(&self) -> usize {
        self.inner.ctx_size()
    }

    /// The runtime's engine handle: what `ember-server` serves over HTTP, and the lower-level
    /// API (logprobs, per-request speculation settings, health).
    pub fn runtime(&self) -> &ember_runtime::engine::Engine {
        &self.inner
    }

    /// The runtime's engine handle, by value.
    pub fn into_runtime(self) -> ember_runtime::engine::Engine {
        self.inner
    }
}
