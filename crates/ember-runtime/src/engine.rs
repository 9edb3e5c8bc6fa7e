//! The serving engine: continuous (iteration-level) batching over one paged KV cache.
//!
//! A scheduler thread owns the model's cache. At every step it admits waiting requests while
//! there is room, then builds one ragged batch under a token budget: every running sequence
//! that is decoding contributes its one new token first (running sequences have priority),
//! then prompts fill the rest of the budget in chunks (chunked prefill, mixed with decode in
//! the same pass). One forward pass serves the whole batch, so 8 decoding streams cost about
//! one read of the weights instead of eight. When the KV pool runs out, the most recently
//! admitted sequence is preempted: its blocks are freed (they stay in the prefix cache) and it
//! waits to be recomputed, its generated tokens kept. A request whose stream is dropped (the
//! client went away) is cancelled and its blocks freed at the next step.
//!
//! With speculation on ([`SpecConfig`]), a decoding sequence's step carries the tokens a
//! proposer guessed after its last one; the pass checks them all (one row each, each with the
//! arithmetic it has in a plain one-token step, so greedy output is token for token the same)
//! and the acceptance rule keeps what the target would have produced. Rejected positions are
//! cut from the cache before they are committed: they never reach the prefix cache.
//!
//! Callers (the server, tools) submit an [`EngineRequest`] and read [`Event`]s from the
//! returned [`RequestStream`]; the engine knows nothing about HTTP. The CLI's
//! [`generate`](crate::generate::generate) runs the same scheduler inline, one sequence.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_kv::{KvBudget, KvError, KvOptions, PagedKvCache, SeqId};
use ember_models::{BatchSeq, Logits, Model, ModelError, PassOptions, UBATCH};
use ember_spec::adaptive::DraftLength;
use ember_spec::drafter::{DraftItem, DraftSeq, Drafter};
use ember_spec::lookup::PromptLookup;
use ember_spec::verify::{self, Verdict};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::generate::{ContextShift, StopReason};
use crate::loaded::LoadedModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::spec::{Proposer, SpecConfig, SpecError, SpecOverride, SpecStats};
use crate::stop::StopMatcher;
use crate::tokenizer::{GgufTokenizer, StreamDecoder};

/// How an [`Engine`] schedules and how much memory it takes; [`EngineConfig::new`] gives
/// llama-server's defaults for a slot count and a context size.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoding at once (`--parallel`).
    pub max_running: usize,
    /// Requests that may wait for a slot; one more is refused with [`SubmitError::QueueFull`].
    pub max_waiting: usize,
    /// Tokens per forward pass (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Longest sequence (prompt plus generated), per request.
    pub ctx_size: usize,
    /// KV cache element type, block size and prefix caching; its `budget` is replaced by
    /// `kv_budget_tokens` (at least `ctx_size`).
    pub kv: KvOptions,
    /// Token positions the shared KV pool holds over all sequences.
    pub kv_budget_tokens: usize,
    /// Speculative decoding for requests that do not choose their own.
    pub spec: SpecConfig,
    /// Proposed tokens checked per step over all sequences, at most: with many streams a
    /// step's rows already cost real compute, so each stream drafts less (none at all once
    /// the decode rows alone reach this).
    pub spec_row_budget: usize,
}

impl EngineConfig {
    /// `parallel` sequences of `ctx_size` each, f16 KV, 512-token batches.
    pub fn new(parallel: usize, ctx_size: usize) -> Self {
        let parallel = parallel.max(1);
        Self {
            max_running: parallel,
            max_waiting: 64 * parallel,
            max_batch_tokens: 512,
            ctx_size,
            kv: KvOptions::default(),
            kv_budget_tokens: parallel * ctx_size,
            spec: SpecConfig::default(),
            spec_row_budget: DEFAULT_SPEC_ROW_BUDGET,
        }
    }
}

/// See [`EngineConfig::spec_row_budget`]: one stream drafts up to 15 tokens, 4 up to 3 each,
/// 8 up to 1 each, 16 or more none.
pub const DEFAULT_SPEC_ROW_BUDGET: usize = 16;

/// Why an engine (or [`generate`](crate::generate::generate)'s one-sequence scheduler) could
/// not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The KV cache could not be set up (its size or layout is unusable for this model).
    #[error("KV cache: {0}")]
    Kv(#[from] KvError),
    /// A setting is out of range (e.g. a zero slot count, batch size or context size).
    #[error("bad engine config: {0}")]
    Config(String),
    /// The scheduler thread could not be spawned.
    #[error("could not start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The speculation settings are invalid for this model or draft model.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The draft model's cache could not be set up.
    #[error("the draft model: {0}")]
    Draft(ModelError),
}

/// Why [`Engine::submit`] refused a request; nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The prompt does not fit the engine's per-request context; nothing is truncated.
    #[error(
        "the prompt is {prompt} tokens but the context size is {ctx}: use a shorter prompt or a larger context (nothing was truncated)"
    )]
    PromptTooLong {
        /// Prompt length, in tokens.
        prompt: usize,
        /// The engine's context size, in tokens.
        ctx: usize,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    /// [`EngineConfig::max_waiting`] requests are already waiting; retry later.
    #[error("the server is busy: {waiting} requests are already waiting; retry later")]
    QueueFull {
        /// Requests waiting when this one was refused.
        waiting: usize,
    },
    /// A prompt token id is not in the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The first offending id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The scheduler thread has ended.
    #[error("the engine has stopped")]
    Stopped,
    /// The request's speculation override is invalid or needs what this engine lacks.
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// One request for [`Engine::submit`].
#[derive(Clone, Debug, Default)]
pub struct EngineRequest {
    /// The prompt, already tokenized; at most the engine's `ctx_size` tokens.
    pub prompt_tokens: Vec<u32>,
    /// Tokens to generate at most (the context may end generation sooner).
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first one, which is not sent.
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely ones.
    pub logprobs: Option<usize>,
    /// When the context fills, drop older tokens and go on instead of stopping.
    pub context_shift: Option<ContextShift>,
    /// This request's speculation settings over the engine's.
    pub spec: SpecOverride,
}

/// Log-probabilities at one step, under the model's own distribution (log-softmax of the raw
/// logits, before sampling's filters and temperature).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The chosen token.
    pub id: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at this step, best first.
    pub top: Vec<(u32, f32)>,
}

/// llama-server's timing fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Prompt tokens computed (not served from the prefix cache).
    pub prompt_n: usize,
    /// Milliseconds from admission (a slot free) to the first generated token.
    pub prompt_ms: f64,
    /// Tokens generated.
    pub predicted_n: usize,
    /// Milliseconds from the first generated token to the end.
    pub predicted_ms: f64,
    /// Prompt tokens served from the prefix cache.
    pub cache_n: usize,
    /// Tokens proposed by speculation and checked (llama-server's name); absent without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_n: Option<u64>,
    /// Proposed tokens the model accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_n_accepted: Option<u64>,
}

/// What a request's [`RequestStream`] yields: [`Token`](Event::Token)s, then exactly one
/// [`Done`](Event::Done) or [`Error`](Event::Error), then the end of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token. `text` is what is safe to show now (complete UTF-8, a possible stop
    /// string held back); it may be empty. The last token's event also carries any held-back
    /// text that turned out not to be a stop string.
    Token {
        /// Token id (an end-of-generation token is sent too; its own text is never shown).
        id: u32,
        /// Text released by this token.
        text: String,
        /// Log-probabilities, when the request asked for them ([`EngineRequest::logprobs`]).
        logprob: Option<TokenLogprob>,
    },
    /// The request finished normally.
    Done {
        /// Why it ended.
        stop_reason: StopReason,
        /// Its counts and times.
        timings: Timings,
        /// Tokens dropped by each context shift (empty when none happened).
        context_shifts: Vec<usize>,
        /// What speculation did; `None` when the request did not speculate.
        spec: Option<SpecStats>,
    },
    /// The request failed (a panic while computing its batch, or the engine stopped); the
    /// message says why. Tokens sent before it stand.
    Error(String),
}

/// The engine's gauges and counters, as published after its latest step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Sequences admitted (holding KV blocks).
    pub running: usize,
    /// Requests accepted and waiting for a slot.
    pub waiting: usize,
    /// KV blocks in use.
    pub kv_used_blocks: usize,
    /// KV blocks in the pool.
    pub kv_total_blocks: usize,
    /// Prompt tokens computed since the start (prefix-cache hits not counted).
    pub prompt_tokens_total: u64,
    /// Tokens generated since the start.
    pub generated_tokens_total: u64,
    /// Sequences preempted (KV blocks given back, recomputed later) since the start.
    pub preemptions_total: u64,
    /// Tokens proposed by speculation and checked, since the start.
    pub spec_drafted_total: u64,
    /// Proposed tokens accepted, since the start.
    pub spec_accepted_total: u64,
}

/// Whether the scheduler is alive, and the batches it failed (a panic in a forward pass or in
/// sampling fails that batch's requests; the engine goes on with the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineHealth {
    /// Whether the scheduler thread is alive.
    pub running: bool,
    /// Batches failed since the start.
    pub failed_batches: u64,
    /// Batches failed in a row since the last one that succeeded.
    pub consecutive_failures: u64,
    /// Why the latest batch failed (the panic message), if one has.
    pub last_failure: Option<String>,
}

impl EngineHealth {
    /// Failing batches in a row this many times means nothing is being served.
    pub const DEGRADED_AFTER: u64 = 3;

    /// The scheduler runs and is not failing every batch.
    pub fn healthy(&self) -> bool {
        self.running && self.consecutive_failures < Self::DEGRADED_AFTER
    }
}

#[derive(Default)]
pub(crate) struct Failures {
    count: u64,
    consecutive: u64,
    last: Option<String>,
}

/// The events of one request. Dropping it cancels the request.
pub struct RequestStream {
    id: u64,
    rx: UnboundedReceiver<Event>,
}

impl RequestStream {
    /// The next event; `None` once the request's last event (`Done` or `Error`) was read, or
    /// if the engine went away without sending one.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// [`next`](Self::next) for callers without an async runtime (it panics when called from
    /// within one, as tokio's `blocking_recv` does).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// The poll form of [`next`](Self::next), for implementing `futures::Stream` over this
    /// stream (the facade crate's `EngineStream` does).
    pub fn poll_next_event(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }

    /// The request's id, unique within this engine (counted from 1 in submission order).
    pub fn id(&self) -> u64 {
        self.id
    }
}

struct Submission {
    req: EngineRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
}

struct Shared {
    model: Arc<LoadedModel>,
    draft: Option<Arc<LoadedModel>>,
    config: EngineConfig,
    tx: Mutex<Option<Sender<Submission>>>,
    /// Published by the scheduler after every step.
    stats: Arc<Mutex<EngineStats>>,
    /// Requests accepted and not running: in the channel or in the scheduler's queue. Counted
    /// here, not from the last published stats, so the queue limit holds between steps.
    pending: Arc<AtomicUsize>,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
    failures: Arc<Mutex<Failures>>,
}

/// A handle to the engine; clones share it. The scheduler thread stops when the last handle
/// is dropped.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Sets up the KV pool and starts the scheduler thread (`ember-engine`) for `model`.
    pub fn start(model: Arc<LoadedModel>, config: EngineConfig) -> Result<Engine, EngineError> {
        Self::start_with_draft(model, None, config)
    }

    /// [`start`](Self::start) with a draft model for [`Proposer::Draft`]; its vocabulary must be
    /// the target's, token for token.
    pub fn start_with_draft(
        model: Arc<LoadedModel>,
        draft: Option<Arc<LoadedModel>>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let parts = SchedulerParts::new(
            &model.model,
            draft.as_deref().map(|d| (&d.file, &d.model)),
            Some(&model.file),
            &config,
        )?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            model,
            draft,
            config,
            tx: Mutex::new(Some(tx)),
            stats: Arc::new(Mutex::new(EngineStats::default())),
            pending: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
            thread: Mutex::new(None),
            failures: Arc::new(Mutex::new(Failures::default())),
        });
        // The thread holds what it needs but not `Shared` itself, so dropping the last
        // `Engine` closes the channel and ends the loop.
        let model = Arc::clone(&shared.model);
        let draft = shared.draft.clone();
        let config = shared.config.clone();
        let counters = Counters {
            stats: Arc::clone(&shared.stats),
            pending: Arc::clone(&shared.pending),
            failures: Arc::clone(&shared.failures),
        };
        let handle = std::thread::Builder::new()
            .name("ember-engine".into())
            .spawn(move || {
                let mut scheduler = Scheduler::new(
                    &model.model,
                    &model.tokenizer,
                    draft.as_deref().map(|d| &d.model),
                    config,
                    parts,
                    counters,
                );
                scheduler.run(rx)
            })?;
        if let Ok(mut t) = shared.thread.lock() {
            *t = Some(handle);
        }
        Ok(Engine { shared })
    }

    /// Queues a request and returns its event stream; checked first (prompt length and ids,
    /// speculation override, queue room), so a refusal queues nothing. Dropping the stream
    /// cancels the request.
    pub fn submit(&self, req: EngineRequest) -> Result<RequestStream, SubmitError> {
        let ctx = self.shared.config.ctx_size;
        let vocab = self.shared.model.model.config().n_vocab;
        if req.prompt_tokens.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.prompt_tokens.len() > ctx {
            return Err(SubmitError::PromptTooLong {
                prompt: req.prompt_tokens.len(),
                ctx,
            });
        }
        if let Some(&id) = req.prompt_tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::TokenOutOfRange { id, vocab });
        }
        check_override(
            &req.spec,
            &self.shared.config.spec,
            self.shared.draft.is_some(),
        )?;
        let pending = &self.shared.pending;
        let max = self.shared.config.max_waiting;
        // Reserve a queue place atomically: concurrent submitters cannot overshoot the limit.
        if let Err(waiting) = pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then(|| n + 1)
        }) {
            return Err(SubmitError::QueueFull { waiting });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = unbounded_channel();
        let sub = Submission {
            req,
            events,
            submitted: Instant::now(),
        };
        let sent = self
            .shared
            .tx
            .lock()
            .ok()
            .and_then(|guard| guard.as_ref().map(|tx| tx.send(sub).is_ok()));
        if sent != Some(true) {
            pending.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(RequestStream { id, rx })
    }

    /// The gauges and counters published after the scheduler's latest step.
    pub fn stats(&self) -> EngineStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The model this engine serves (its tokenizer and chat template included).
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.shared.model
    }

    /// Whether the scheduler thread is alive, and the batches it has failed.
    pub fn health(&self) -> EngineHealth {
        let running = self
            .shared
            .thread
            .lock()
            .is_ok_and(|t| t.as_ref().is_some_and(|h| !h.is_finished()));
        let (failed_batches, consecutive_failures, last_failure) = self
            .shared
            .failures
            .lock()
            .map(|f| (f.count, f.consecutive, f.last.clone()))
            .unwrap_or_default();
        EngineHealth {
            running,
            failed_batches,
            consecutive_failures,
            last_failure,
        }
    }

    /// The longest sequence a request may have, prompt plus generated, in tokens.
    pub fn ctx_size(&self) -> usize {
        self.shared.config.ctx_size
    }

    /// The settings the engine was started with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut t) = self.thread.lock()
            && let Some(h) = t.take()
        {
            let _ = h.join();
        }
    }
}

/// Whether a request's own speculation settings can run on this engine.
fn check_override(o: &SpecOverride, config: &SpecConfig, has_draft: bool) -> Result<(), SpecError> {
    if o.is_empty() {
        return Ok(());
    }
    let merged = merge_spec(config, o);
    if merged.draft_max == 0 || merged.draft_max > crate::spec::MAX_DRAFT {
        return Err(SpecError::DraftMax(merged.draft_max));
    }
    if merged.draft_min == 0 || merged.draft_min > merged.draft_max {
        return Err(SpecError::DraftMin {
            min: merged.draft_min,
            max: merged.draft_max,
        });
    }
    match merged.proposer {
        Proposer::Draft if !has_draft => Err(SpecError::Unavailable(Proposer::Draft)),
        Proposer::SelfSpec if config.proposer != Proposer::SelfSpec => {
            Err(SpecError::Unavailable(Proposer::SelfSpec))
        }
        _ => Ok(()),
    }
}

/// The engine's settings with a request's overrides applied.
fn merge_spec(config: &SpecConfig, o: &SpecOverride) -> SpecConfig {
    let mut c = config.clone();
    if let Some(p) = o.proposer {
        c.proposer = p;
    }
    if let Some(n) = o.draft_max {
        c.draft_max = n;
        // A request that lowers the maximum below the engine's minimum means "at most n".
        c.draft_min = c.draft_min.min(n.max(1));
    }
    if let Some(n) = o.draft_min {
        c.draft_min = n;
    }
    c
}

/// What the scheduler owns besides the model: built (and checked) before it starts, so a bad
/// setting is an error from [`Engine::start`], not a dead thread.
pub(crate) struct SchedulerParts {
    cache: PagedKvCache,
    /// Runs the draft model ([`Proposer::Draft`]).
    draft: Option<Drafter>,
    /// Layers of the target that self-speculation runs ([`Proposer::SelfSpec`]).
    selfspec: Option<usize>,
    costs: SpecCosts,
}

impl SchedulerParts {
    pub(crate) fn new(
        model: &Model,
        draft: Option<(&ember_formats::GgufFile, &Model)>,
        target_file: Option<&ember_formats::GgufFile>,
        config: &EngineConfig,
    ) -> Result<Self, EngineError> {
        if config.max_running == 0 || config.max_batch_tokens == 0 || config.ctx_size == 0 {
            return Err(EngineError::Config(
                "max_running, max_batch_tokens and ctx_size must be at least 1".into(),
            ));
        }
        let n_layer = model.n_layers();
        config.spec.validate(n_layer, draft.is_some())?;
        let mut kv = config.kv.clone();
        let budget = config.kv_budget_tokens.max(config.ctx_size);
        kv.budget = Some(KvBudget::Tokens(budget));
        let cache = PagedKvCache::new(&model.kv_config(&kv, config.ctx_size))?;
        // The drafters' caches follow the target's sequences, prefix sharing included (a
        // shared system prompt is computed once by the drafter too).
        let dkv = config.kv.clone();
        // Room for each sequence's partly filled last block and its proposals on top of the
        // target's budget.
        let draft_budget =
            budget + config.max_running * (config.kv.block_size + crate::spec::MAX_DRAFT);
        // Weight bytes, not file tensors: a checkpoint directory's file is only its metadata.
        let draft_cost = match draft {
            Some((_, m)) => m.weight_bytes() as f64 / (model.weight_bytes() as f64).max(1.0),
            None => 1.0,
        };
        let draft = match draft {
            Some((file, m)) => {
                let target_file = target_file.ok_or_else(|| {
                    EngineError::Config(
                        "a draft model needs the target's file to check its vocabulary".into(),
                    )
                })?;
                ember_spec::vocab::check_same_vocab(target_file, file)
                    .map_err(|e| SpecError::Vocab(e.to_string()))?;
                Some(
                    Drafter::new(m, None, &dkv, config.ctx_size, draft_budget)
                        .map_err(EngineError::Draft)?,
                )
            }
            None => None,
        };
        let selfspec = if config.spec.proposer == Proposer::SelfSpec {
            Some(config.spec.self_layers(n_layer)?)
        } else {
            None
        };
        let costs = SpecCosts {
            draft: draft_cost,
            selfspec: selfspec.map_or(1.0, |n| n as f64 / n_layer.max(1) as f64),
        };
        Ok(Self {
            cache,
            draft,
            selfspec,
            costs,
        })
    }
}

/// The counters a scheduler publishes to its [`Engine`] handles.
pub(crate) struct Counters {
    pub(crate) stats: Arc<Mutex<EngineStats>>,
    pub(crate) pending: Arc<AtomicUsize>,
    pub(crate) failures: Arc<Mutex<Failures>>,
}

impl Counters {
    pub(crate) fn detached() -> Self {
        Self {
            stats: Arc::new(Mutex::new(EngineStats::default())),
            pending: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(Mutex::new(Failures::default())),
        }
    }
}

/// What a verification row costs next to a one-row step, roughly (a decode pass with 9 rows
/// took 2.3x a one-row pass for SmolLM2 and 3.7x for Gemma 3 on 2 cores; see
/// docs/performance.md): the least a proposal must be accepted for drafting to pay.
const ROW_COST: f64 = 0.15;

/// What a drafted token costs each model-running proposer, as a fraction of a target pass.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpecCosts {
    /// The draft model's weights over the target's.
    draft: f64,
    /// The layers self-speculation runs over the target's.
    selfspec: f64,
}

impl SpecCosts {
    fn per_token(self, proposer: Proposer) -> f64 {
        match proposer {
            Proposer::None | Proposer::Lookup => 0.0,
            Proposer::Draft => self.draft,
            Proposer::SelfSpec => self.selfspec,
        }
    }
}

/// A sequence's speculation state.
struct SeqSpec {
    config: SpecConfig,
    length: DraftLength,
    lookup: PromptLookup,
    /// Its sequence in the drafter's cache (draft or self), once it has drafted.
    draft_seq: Option<DraftSeq>,
    /// The draft model's own sampler (its coin flips are not the target's).
    draft_sampler: Option<Sampler>,
    stats: SpecStats,
}

impl SeqSpec {
    fn new(config: SpecConfig, sampling: &SamplingParams, break_even: f64) -> Self {
        let mut draft_params = sampling.clone();
        draft_params.seed = sampling.seed.map(|s| s ^ 0x5bec_d1ce_d00d_f00d);
        Self {
            length: DraftLength::new(config.draft_min, config.draft_max)
                .with_break_even(break_even),
            lookup: PromptLookup::new(config.ngram_max, 1),
            draft_seq: None,
            draft_sampler: config
                .proposer
                .uses_model()
                .then(|| Sampler::new(draft_params)),
            stats: SpecStats {
                proposer: config.proposer,
                ..SpecStats::default()
            },
            config,
        }
    }
}

/// A request on the scheduler thread.
struct Sequence {
    req: EngineRequest,
    events: UnboundedSender<Event>,
    /// Its sequence in the KV cache while admitted.
    kv: Option<SeqId>,
    /// The tokens whose K/V the sequence needs: the prompt then generated tokens (after a
    /// context shift, the window that was kept).
    tokens: Vec<u32>,
    /// The leading `tokens` computed as a prompt (ubatch slicing, see `solo_ubatch`): the
    /// prompt's length, or after a context shift the whole window rebuilt.
    prompt_len: usize,
    /// The prompt and everything generated, for the sampler's penalties (a context shift does
    /// not make it forget).
    history: Vec<u32>,
    /// Leading `tokens` whose K/V are in the cache.
    computed: usize,
    generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    cache_n: usize,
    prompt_computed: usize,
    context_shifts: Vec<usize>,
    spec: Option<SeqSpec>,
}

impl Sequence {
    /// The ubatch that the next token to compute belongs to when this sequence runs alone
    /// (llama.cpp's slicing: the prompt in [`UBATCH`]-token slices from its start, then one
    /// token per step): `(end, rows)`, where a chunk starting there may end and how many rows
    /// that ubatch has. Generated tokens recomputed after a preemption may go together: each
    /// row still takes the one-row arithmetic it had when it was decoded.
    fn solo_ubatch(&self) -> (usize, usize) {
        let n_prompt = self.prompt_len;
        if self.computed >= n_prompt {
            return (self.tokens.len(), 1);
        }
        let start = self.computed / UBATCH * UBATCH;
        let end = (start + UBATCH).min(n_prompt);
        (end, end - start)
    }

    fn new(sub: Submission, engine_spec: &SpecConfig, costs: SpecCosts) -> Self {
        let Submission {
            req,
            events,
            submitted,
        } = sub;
        let spec_config = merge_spec(engine_spec, &req.spec);
        Self {
            tokens: req.prompt_tokens.clone(),
            prompt_len: req.prompt_tokens.len(),
            history: req.prompt_tokens.clone(),
            sampler: Sampler::new(req.sampling.clone()),
            decoder: StreamDecoder::new(true),
            stops: StopMatcher::new(req.stop.clone()),
            spec: spec_config.enabled().then(|| {
                // Prompt lookup's proposals cost nothing to make: no break-even (a wrong one
                // costs a verification row, and the zero-acceptance cool-down bounds that).
                let break_even = match spec_config.proposer {
                    Proposer::Draft | Proposer::SelfSpec => {
                        ROW_COST + costs.per_token(spec_config.proposer)
                    }
                    _ => 0.0,
                };
                SeqSpec::new(spec_config, &req.sampling, break_even)
            }),
            req,
            events,
            kv: None,
            computed: 0,
            generated: 0,
            submitted,
            admitted: None,
            first_token: None,
            cache_n: 0,
            prompt_computed: 0,
            context_shifts: Vec::new(),
        }
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    fn timings(&self, now: Instant) -> Timings {
        let start = self.admitted.unwrap_or(self.submitted);
        let first = self.first_token.unwrap_or(now);
        let spec = self.spec.as_ref().map(|s| &s.stats);
        Timings {
            prompt_n: self.prompt_computed,
            prompt_ms: first.saturating_duration_since(start).as_secs_f64() * 1e3,
            predicted_n: self.generated,
            predicted_ms: now.saturating_duration_since(first).as_secs_f64() * 1e3,
            cache_n: self.cache_n,
            draft_n: spec.map(|s| s.drafted),
            draft_n_accepted: spec.map(|s| s.accepted),
        }
    }

    /// Whether its next step decodes a generated token (so it may speculate).
    fn decoding(&self) -> bool {
        self.computed + 1 == self.tokens.len() && self.computed >= self.prompt_len
    }
}

/// Picks one sequence's proposed tokens from the draft's logits: with the draft's own sampler
/// (greedy when the request is), the history its penalties see, and the distributions it drew
/// from (the acceptance rule needs each q).
struct Chooser {
    sampler: Sampler,
    history: Vec<u32>,
    q: Vec<Vec<(u32, f64)>>,
    proposed: Vec<u32>,
}

impl Chooser {
    /// The chooser of a speculating sequence; it holds the sequence's draft sampler, which
    /// the caller puts back after drafting.
    fn take_from(s: &mut Sequence) -> Option<Chooser> {
        let sp = s.spec.as_mut()?;
        Some(Chooser {
            sampler: sp
                .draft_sampler
                .take()
                .unwrap_or_else(|| Sampler::new(s.req.sampling.clone())),
            history: s.history.clone(),
            q: Vec::new(),
            proposed: Vec::new(),
        })
    }

    fn choose(&mut self, row: &[f32]) -> Option<u32> {
        let token = if self.sampler.is_greedy() {
            self.sampler.sample(row, &self.history)
        } else {
            let q = self.sampler.distribution(row, &self.history);
            let u = self.sampler.uniform();
            let t = verify::draw(&q, u)?;
            self.q.push(q);
            t
        };
        self.history.push(token);
        self.proposed.push(token);
        Some(token)
    }
}

/// One item of a step's batch.
struct Planned {
    /// Index in `running`.
    idx: usize,
    /// Tokens of the sequence computed by this pass (after `computed`).
    len: usize,
    /// Whether the pass returns logits for it (its last row, or every row when drafting).
    logits: bool,
    /// Proposed tokens verified after its one decode token (`len` is 1 then).
    drafts: Vec<u32>,
    /// Each draft's proposal distribution (empty: deterministic, one-hot at the draft).
    q: Vec<Vec<(u32, f64)>>,
}

/// What emitting a token did to its sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Emitted {
    Continue,
    Finished(StopReason),
    /// The context filled and a shift dropped older tokens: the cache must be rebuilt.
    Shifted,
}

pub(crate) struct Scheduler<'m> {
    model: &'m Model,
    tokenizer: &'m GgufTokenizer,
    draft_model: Option<&'m Model>,
    config: EngineConfig,
    cache: PagedKvCache,
    draft: Option<Drafter>,
    selfspec: Option<usize>,
    costs: SpecCosts,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    counters: Counters,
    prompt_total: u64,
    generated_total: u64,
    preempted_total: u64,
    drafted_total: u64,
    accepted_total: u64,
}

/// A panic's message, for the failed requests and `/health`.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl<'m> Scheduler<'m> {
    pub(crate) fn new(
        model: &'m Model,
        tokenizer: &'m GgufTokenizer,
        draft_model: Option<&'m Model>,
        config: EngineConfig,
        parts: SchedulerParts,
        counters: Counters,
    ) -> Self {
        Self {
            model,
            tokenizer,
            draft_model,
            config,
            cache: parts.cache,
            draft: parts.draft,
            selfspec: parts.selfspec,
            costs: parts.costs,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters,
            prompt_total: 0,
            generated_total: 0,
            preempted_total: 0,
            drafted_total: 0,
            accepted_total: 0,
        }
    }

    /// Queues a request (the inline loop's way in; the engine thread reads its channel).
    pub(crate) fn push(&mut self, req: EngineRequest, events: UnboundedSender<Event>) {
        let sub = Submission {
            req,
            events,
            submitted: Instant::now(),
        };
        let seq = Sequence::new(sub, &self.config.spec, self.costs);
        self.waiting.push_back(seq);
    }

    pub(crate) fn idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    fn run(&mut self, rx: Receiver<Submission>) {
        // Runs until every `Engine` handle is gone; what is in flight then gets an error.
        'serve: loop {
            // Idle: block until a request arrives (waking now and then to publish stats).
            if self.idle() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(sub) => {
                        let seq = Sequence::new(sub, &self.config.spec, self.costs);
                        self.waiting.push_back(seq)
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(sub) => {
                        let seq = Sequence::new(sub, &self.config.spec, self.costs);
                        self.waiting.push_back(seq)
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => break 'serve,
                }
            }
            self.guarded_step();
            self.publish();
        }
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = seq.events.send(Event::Error("the engine stopped".into()));
        }
    }

    /// One step; a panic outside the forward pass (sampling, decoding text) fails the running
    /// requests, and the queue and later requests are served as usual.
    pub(crate) fn guarded_step(&mut self) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.step())) {
            let running: Vec<usize> = (0..self.running.len()).collect();
            self.fail_batch(&running, &panic_message(payload.as_ref()));
            self.reclaim_orphans();
        }
    }

    fn publish(&self) {
        if let Ok(mut s) = self.counters.stats.lock() {
            *s = EngineStats {
                running: self.running.len(),
                waiting: self.counters.pending.load(Ordering::Acquire),
                kv_used_blocks: self.cache.used_blocks(),
                kv_total_blocks: self.cache.total_blocks(),
                prompt_tokens_total: self.prompt_total,
                generated_tokens_total: self.generated_total,
                preemptions_total: self.preempted_total,
                spec_drafted_total: self.drafted_total,
                spec_accepted_total: self.accepted_total,
            };
        }
    }

    /// Fails the requests at `idxs` in `running` after a panic: each gets an error event and
    /// its KV blocks back, and the failure is counted for [`Engine::health`].
    fn fail_batch(&mut self, idxs: &[usize], why: &str) {
        let msg = format!(
            "internal error while computing this request ({why}); the request failed, the server goes on"
        );
        let mut idxs = idxs.to_vec();
        idxs.sort_unstable();
        idxs.dedup();
        for &idx in idxs.iter().rev() {
            if idx < self.running.len() {
                let mut s = self.running.remove(idx);
                let _ = s.events.send(Event::Error(msg.clone()));
                self.release(&mut s);
            }
        }
        if let Ok(mut f) = self.counters.failures.lock() {
            f.count += 1;
            f.consecutive += 1;
            f.last = Some(why.to_string());
        }
    }

    /// After a panic outside the forward pass a sequence may have been dropped while out of
    /// `running` (between `remove` and `release`): free every cache sequence nobody owns.
    fn reclaim_orphans(&mut self) {
        let owned: std::collections::HashSet<SeqId> = self
            .running
            .iter()
            .chain(self.waiting.iter())
            .filter_map(|s| s.kv)
            .collect();
        for seq in self.cache.sequences() {
            if !owned.contains(&seq) {
                let _ = self.cache.free(seq);
            }
        }
    }

    /// Gives back a sequence's KV blocks (and its drafter sequence): it finished, failed, was
    /// cancelled or is preempted.
    fn release(&mut self, seq: &mut Sequence) {
        if let Some(kv) = seq.kv.take() {
            let _ = self.cache.free(kv);
        }
        seq.computed = 0;
        if let Some(sp) = seq.spec.as_mut()
            && let Some(d) = sp.draft_seq.take()
            && let Some(drafter) = self.draft.as_mut()
        {
            drafter.free(d);
        }
    }

    /// One scheduling iteration: drop cancelled requests, admit, run one batch, sample.
    fn step(&mut self) {
        // Cancelled requests free their blocks now.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                let mut s = self.running.remove(i);
                self.release(&mut s);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.cancelled());
        let gone = before - self.waiting.len();
        sub_pending(&self.counters.pending, gone);

        // Admit while there are free slots.
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            sub_pending(&self.counters.pending, 1);
            match self.cache.add_sequence(&seq.tokens) {
                Ok((kv, cached)) => {
                    seq.kv = Some(kv);
                    seq.computed = cached;
                    if seq.admitted.is_none() {
                        seq.admitted = Some(Instant::now());
                        seq.cache_n = cached;
                    }
                    self.running.push(seq);
                }
                Err(e) => {
                    let _ = seq.events.send(Event::Error(e.to_string()));
                }
            }
        }
        if self.running.is_empty() {
            return;
        }

        let mut speculate = true;
        loop {
            let mut plan = self.plan();
            if plan.is_empty() {
                return;
            }
            if speculate {
                self.propose(&mut plan);
            }
            let drafted = plan.iter().any(|p| !p.drafts.is_empty());
            // Token storage for items that carry proposals (their rows are not in `tokens`).
            let with_drafts: Vec<Vec<u32>> = plan
                .iter()
                .map(|p| {
                    if p.drafts.is_empty() {
                        Vec::new()
                    } else {
                        let s = &self.running[p.idx];
                        let mut t = vec![s.tokens[s.computed]];
                        t.extend_from_slice(&p.drafts);
                        t
                    }
                })
                .collect();
            let batch: Vec<BatchSeq<'_>> = plan
                .iter()
                .zip(&with_drafts)
                .filter_map(|(p, own)| {
                    let s = &self.running[p.idx];
                    if !p.drafts.is_empty() {
                        // Every row checks one token with a plain decode step's arithmetic.
                        return Some(BatchSeq {
                            seq: s.kv?,
                            tokens: own,
                            logits: Some(Logits::All),
                            solo_rows: Some(1),
                        });
                    }
                    Some(BatchSeq {
                        seq: s.kv?,
                        tokens: &s.tokens[s.computed..s.computed + p.len],
                        logits: p.logits.then_some(Logits::Last),
                        solo_rows: Some(s.solo_ubatch().1),
                    })
                })
                .collect();
            let (model, cache) = (self.model, &mut self.cache);
            let opts = PassOptions {
                layers: None,
                defer_commit: true,
            };
            // A panic inside the pass (a kernel bug, a fault injected by a test) must not take
            // the scheduler thread, and every later request, with it.
            let result = catch_unwind(AssertUnwindSafe(|| {
                fail::fail_point!("engine::forward");
                model.forward_batch_with(&batch, cache, opts)
            }));
            drop(batch);
            let result = match result {
                Ok(r) => r,
                Err(payload) => {
                    let idxs: Vec<usize> = plan.iter().map(|p| p.idx).collect();
                    let why = format!(
                        "the forward pass panicked: {}",
                        panic_message(payload.as_ref())
                    );
                    // The pass may have left positions appended: nothing of it is kept.
                    self.fail_batch(&idxs, &why);
                    return;
                }
            };
            match result {
                Ok(logits) => {
                    if let Ok(mut f) = self.counters.failures.lock() {
                        f.consecutive = 0;
                    }
                    self.after_forward(&plan, logits);
                    return;
                }
                Err(ModelError::Kv(KvError::OutOfBlocks { .. })) if drafted => {
                    // Proposals are optional: try the step without them before preempting.
                    speculate = false;
                }
                Err(ModelError::Kv(KvError::OutOfBlocks { .. })) if self.running.len() > 1 => {
                    // Preempt the newest sequence: its blocks go back (still cached for its
                    // recompute) and it waits at the front of the queue.
                    if let Some(mut s) = self.running.pop() {
                        self.preempted_total += 1;
                        self.release(&mut s);
                        self.waiting.push_front(s);
                        self.counters.pending.fetch_add(1, Ordering::AcqRel);
                    }
                }
                Err(e) => {
                    // Nothing advanced (the pass rolls back); the batch's requests fail.
                    let msg = match e {
                        ModelError::Kv(KvError::OutOfBlocks { .. }) => format!(
                            "the KV cache cannot hold this sequence ({e}); raise the KV budget"
                        ),
                        other => other.to_string(),
                    };
                    let mut idxs: Vec<usize> = plan.iter().map(|p| p.idx).collect();
                    idxs.sort_unstable();
                    for &idx in idxs.iter().rev() {
                        let mut s = self.running.remove(idx);
                        let _ = s.events.send(Event::Error(msg.clone()));
                        self.release(&mut s);
                    }
                    return;
                }
            }
        }
    }

    /// The next batch. Decoding sequences first, then prompt chunks, within the token budget.
    /// A chunk never crosses the end of the ubatch its first token has when the sequence runs
    /// alone ([`Sequence::solo_ubatch`]), and it is computed with that ubatch's arithmetic, so
    /// where the budget cuts a prompt and what else is in the batch change nothing in its
    /// results.
    fn plan(&self) -> Vec<Planned> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = Vec::new();
        let pending = |s: &Sequence| s.tokens.len() - s.computed;
        let item = |idx, len, logits| Planned {
            idx,
            len,
            logits,
            drafts: Vec::new(),
            q: Vec::new(),
        };
        for (i, s) in self.running.iter().enumerate() {
            if pending(s) == 1 && budget > 0 {
                plan.push(item(i, 1, true));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = pending(s);
            if left > 1 && budget > 0 {
                let n = left.min(budget).min(s.solo_ubatch().0 - s.computed);
                plan.push(item(i, n, n == left));
                budget -= n;
            }
        }
        plan
    }

    /// Fills in the proposals of the decoding items whose requests speculate, as many as each
    /// one's adaptive length, the load and its room (context, `max_tokens`) allow.
    fn propose(&mut self, plan: &mut [Planned]) {
        let decoding = plan
            .iter()
            .filter(|p| self.running[p.idx].decoding())
            .count();
        if decoding == 0 {
            return;
        }
        let used: usize = plan.iter().map(|p| p.len).sum();
        let batch_room = self.config.max_batch_tokens.saturating_sub(used);
        // Under load each stream drafts less: the step's rows already cost compute.
        let per_seq = (self.config.spec_row_budget / decoding).saturating_sub(1);
        let mut room_left = batch_room;
        // (plan index, tokens wanted) of the items a drafter runs for.
        let mut model_items: Vec<(usize, usize)> = Vec::new();
        for (pi, p) in plan.iter_mut().enumerate() {
            let s = &mut self.running[p.idx];
            if !s.decoding() {
                continue;
            }
            let (room_ctx, room_len) = (
                self.config.ctx_size.saturating_sub(s.tokens.len()),
                s.req.max_tokens.saturating_sub(s.generated + 1),
            );
            let Some(sp) = s.spec.as_mut() else { continue };
            let want = sp.length.next();
            let k = want.min(per_seq).min(room_ctx).min(room_len).min(room_left);
            if k == 0 || k < sp.config.draft_min {
                continue;
            }
            match sp.config.proposer {
                Proposer::None => {}
                Proposer::Lookup => {
                    let drafts = sp.lookup.propose(&s.history, k);
                    if drafts.len() >= sp.config.draft_min {
                        room_left -= drafts.len();
                        p.drafts = drafts;
                    }
                }
                Proposer::Draft | Proposer::SelfSpec => {
                    room_left -= k;
                    model_items.push((pi, k));
                }
            }
        }
        for proposer in [Proposer::Draft, Proposer::SelfSpec] {
            let items: Vec<(usize, usize)> = model_items
                .iter()
                .copied()
                .filter(|&(pi, _)| {
                    let s = &self.running[plan[pi].idx];
                    s.spec.as_ref().map(|sp| sp.config.proposer) == Some(proposer)
                })
                .collect();
            if items.is_empty() {
                continue;
            }
            match (proposer, self.selfspec) {
                (Proposer::SelfSpec, Some(layers)) => self.propose_self(layers, plan, &items),
                (Proposer::SelfSpec, None) => {}
                _ => self.propose_with_model(plan, &items),
            }
        }
    }

    /// Self-speculation for `items` (plan index, tokens wanted): the target's first `layers`
    /// layers and its head propose, on forks of the sequences in the target's own cache. A
    /// fork shares every block (the first layers' K/V of the context are exactly what the
    /// draft needs: nothing to catch up, nothing kept in step), its writes go to copies of
    /// the shared last block, and it is freed after drafting without a commit.
    fn propose_self(&mut self, layers: usize, plan: &mut [Planned], items: &[(usize, usize)]) {
        let mut choosers = Vec::with_capacity(items.len());
        let mut forks = Vec::with_capacity(items.len());
        let mut current = Vec::with_capacity(items.len());
        for &(pi, _) in items {
            let s = &mut self.running[plan[pi].idx];
            let fork = s.kv.and_then(|kv| self.cache.fork(kv).ok());
            forks.push(fork);
            current.push(s.tokens.last().copied());
            let Some(c) = Chooser::take_from(s) else {
                continue;
            };
            choosers.push(c);
        }
        let opts = PassOptions {
            layers: Some(layers),
            defer_commit: true,
        };
        if choosers.len() == items.len() {
            loop {
                let active: Vec<usize> = (0..items.len())
                    .filter(|&i| {
                        forks[i].is_some()
                            && current[i].is_some()
                            && choosers[i].proposed.len() < items[i].1
                    })
                    .collect();
                if active.is_empty() {
                    break;
                }
                let tokens: Vec<[u32; 1]> = active
                    .iter()
                    .map(|&i| [current[i].unwrap_or_default()])
                    .collect();
                let batch: Vec<BatchSeq<'_>> = active
                    .iter()
                    .zip(&tokens)
                    .filter_map(|(&i, t)| {
                        Some(BatchSeq {
                            seq: forks[i]?,
                            tokens: t,
                            logits: Some(Logits::Last),
                            solo_rows: None,
                        })
                    })
                    .collect();
                // A full pool only means fewer proposals this step.
                let Ok(logits) = self.model.forward_batch_with(&batch, &mut self.cache, opts)
                else {
                    break;
                };
                let [rows, vocab] = logits.dims();
                let flat = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
                if rows != active.len() || flat.len() != rows * vocab {
                    break;
                }
                for (r, &i) in active.iter().enumerate() {
                    current[i] = choosers[i].choose(&flat[r * vocab..(r + 1) * vocab]);
                }
            }
        }
        for fork in forks.into_iter().flatten() {
            let _ = self.cache.free(fork);
        }
        for (&(pi, _), c) in items.iter().zip(choosers) {
            let p = &mut plan[pi];
            let Some(sp) = self.running[p.idx].spec.as_mut() else {
                continue;
            };
            sp.draft_sampler = Some(c.sampler);
            if c.proposed.len() >= sp.config.draft_min {
                p.q = c.q;
                p.drafts = c.proposed;
            }
        }
    }

    /// Runs a drafter for `items` (plan index, tokens wanted): every sequence's proposals
    /// come from one batched draft pass per token. A drafter failure (its own cache full)
    /// only means no proposals this step.
    fn propose_with_model(&mut self, plan: &mut [Planned], items: &[(usize, usize)]) {
        let (Some(drafter), Some(model)) = (self.draft.as_mut(), self.draft_model) else {
            return;
        };
        let mut seqs = Vec::with_capacity(items.len());
        for &(pi, _) in items {
            let s = &mut self.running[plan[pi].idx];
            let Some(sp) = s.spec.as_mut() else { return };
            let seq = match sp.draft_seq {
                Some(d) => d,
                None => match drafter.add_sequence() {
                    Ok(d) => {
                        sp.draft_seq = Some(d);
                        d
                    }
                    Err(_) => return,
                },
            };
            seqs.push(seq);
        }
        let mut choosers = Vec::with_capacity(items.len());
        for &(pi, _) in items {
            let s = &mut self.running[plan[pi].idx];
            let Some(c) = Chooser::take_from(s) else {
                return;
            };
            choosers.push(c);
        }
        let mut draft_items: Vec<DraftItem<'_>> = items
            .iter()
            .zip(&seqs)
            .map(|(&(pi, k), &seq)| DraftItem {
                seq,
                context: &self.running[plan[pi].idx].tokens,
                max: k,
                proposed: Vec::new(),
            })
            .collect();
        let result = drafter.propose(model, &mut draft_items, |i, row| choosers[i].choose(row));
        let proposed: Vec<Vec<u32>> = draft_items.into_iter().map(|d| d.proposed).collect();
        for ((&(pi, _), c), drafts) in items.iter().zip(choosers).zip(proposed) {
            let p = &mut plan[pi];
            let s = &mut self.running[p.idx];
            let Some(sp) = s.spec.as_mut() else { continue };
            sp.draft_sampler = Some(c.sampler);
            if result.is_ok() && drafts.len() >= sp.config.draft_min {
                p.q = c.q;
                p.q.truncate(drafts.len());
                p.drafts = drafts;
            }
        }
    }

    fn after_forward(&mut self, plan: &[Planned], logits: burn::tensor::Tensor<2>) {
        let [rows, vocab] = logits.dims();
        let flat = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
        // 1. In plan order: what each chunk computed, and the logits rows of those that asked
        //    for some (their first row, and where the sequence's cache stood before).
        let mut row = 0;
        let mut sampled: Vec<(usize, usize, usize)> = Vec::new(); // (plan index, first row, start)
        // The cache operations of step 3, in plan order: a commit, or sampled entry k's.
        let mut order: Vec<Result<usize, usize>> = Vec::new();
        for (pi, p) in plan.iter().enumerate() {
            let s = &mut self.running[p.idx];
            let start = s.computed;
            if s.generated == 0 {
                // Prompt tokens (a context shift's rebuild is not counted again).
                let prompt_part = p.len.min(s.prompt_len.saturating_sub(s.computed));
                s.prompt_computed += prompt_part;
                self.prompt_total += prompt_part as u64;
            }
            s.computed += p.len;
            if !p.logits {
                order.push(Err(p.idx));
                continue;
            }
            let n_rows = 1 + p.drafts.len();
            if row + n_rows > rows {
                break;
            }
            order.push(Ok(sampled.len()));
            sampled.push((pi, row, start));
            row += n_rows;
        }
        // 2. Each sequence picks its tokens from its rows: sampling (penalties, top-k, the
        //    softmax over the whole vocabulary), draft verification, detokenizing and stop
        //    strings. Sequences share nothing here, so with several they run on the workers
        //    the forward pass just left idle (each on its own sampler: the same tokens as in
        //    any order).
        let mut slot = vec![usize::MAX; self.running.len()];
        for (k, &(pi, _, _)) in sampled.iter().enumerate() {
            slot[plan[pi].idx] = k;
        }
        let mut work: Vec<(usize, &mut Sequence)> = self
            .running
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| slot[*i] != usize::MAX)
            .map(|(i, s)| (slot[i], s))
            .collect();
        let (tokenizer, ctx) = (self.tokenizer, self.config.ctx_size);
        let pick = |(k, s): &mut (usize, &mut Sequence)| {
            let (pi, first, _) = sampled[*k];
            let p = &plan[pi];
            let rows = &flat[first * vocab..(first + 1 + p.drafts.len()) * vocab];
            (*k, pick_tokens(tokenizer, s, p, rows, vocab, ctx))
        };
        let mut picked: Vec<(usize, Picked)> = if work.len() > 1 {
            use rayon::prelude::*;
            work.par_iter_mut().with_max_len(1).map(pick).collect()
        } else {
            work.iter_mut().map(pick).collect()
        };
        drop(work);
        // One result per sampled chunk (the plan holds each sequence once).
        debug_assert_eq!(picked.len(), sampled.len());
        picked.sort_unstable_by_key(|x| x.0);
        let mut picked: Vec<Option<Picked>> = picked.into_iter().map(|(_, g)| Some(g)).collect();
        // 3. In plan order again: counters, speculation statistics and the caches.
        let mut finished = Vec::new();
        let mut shifted = Vec::new();
        for entry in order {
            let k = match entry {
                Err(idx) => {
                    if let Some(kv) = self.running[idx].kv {
                        let _ = self.cache.commit(kv);
                    }
                    continue;
                }
                Ok(k) => k,
            };
            let Some(got) = picked[k].take() else {
                continue;
            };
            let (pi, _, start) = sampled[k];
            let p = &plan[pi];
            let s = &mut self.running[p.idx];
            self.generated_total += got.emitted as u64;
            if !p.drafts.is_empty() {
                self.drafted_total += p.drafts.len() as u64;
                self.accepted_total += got.accepted as u64;
                if let Some(sp) = s.spec.as_mut() {
                    sp.length.record(p.drafts.len(), got.accepted);
                    sp.stats.drafted += p.drafts.len() as u64;
                    sp.stats.accepted += got.accepted as u64;
                    sp.stats.steps += 1;
                }
                // The cache holds the decode token and every proposal: keep the accepted ones.
                s.computed = start + 1 + got.accepted;
            }
            if let Some(kv) = s.kv {
                // Rejected positions go before the commit: they never reach the prefix
                // cache, and window blocks are released only for what is kept.
                let _ = self.cache.truncate(kv, s.computed);
                let _ = self.cache.commit(kv);
            }
            match got.outcome {
                Emitted::Continue => {}
                Emitted::Finished(reason) => finished.push((p.idx, reason)),
                Emitted::Shifted => shifted.push(p.idx),
            }
        }
        for idx in shifted {
            self.rebuild(idx);
        }
        finished.sort_unstable_by_key(|f| f.0);
        let now = Instant::now();
        for &(idx, reason) in finished.iter().rev() {
            let mut s = self.running.remove(idx);
            fail::fail_point!("engine::finish");
            let _ = s.events.send(Event::Done {
                stop_reason: reason,
                timings: s.timings(now),
                context_shifts: std::mem::take(&mut s.context_shifts),
                spec: s.spec.as_ref().map(|sp| sp.stats.clone()),
            });
            self.release(&mut s);
        }
    }

    /// After a context shift: the sequence's cache is rebuilt from its kept window (the
    /// prefix cache may still hold the pinned start).
    fn rebuild(&mut self, idx: usize) {
        let Some(s) = self.running.get_mut(idx) else {
            return;
        };
        if let Some(kv) = s.kv.take() {
            let _ = self.cache.free(kv);
        }
        match self.cache.add_sequence(&s.tokens) {
            Ok((kv, cached)) => {
                // Never the whole window: the last token's row gives the next logits.
                s.kv = Some(kv);
                s.computed = cached;
            }
            Err(e) => {
                let mut s = self.running.remove(idx);
                let _ = s.events.send(Event::Error(e.to_string()));
                self.release(&mut s);
            }
        }
    }
}

fn sub_pending(pending: &AtomicUsize, n: usize) {
    if n > 0 {
        let _ = pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
            Some(p.saturating_sub(n))
        });
    }
}

/// What a sequence took from its logits rows in one step.
struct Picked {
    outcome: Emitted,
    /// Proposals accepted.
    accepted: usize,
    /// Tokens emitted (accepted proposals and the target's own).
    emitted: usize,
}

/// Sequence `s`'s tokens from its `rows` (`vocab` logits each) of a pass planned as `p`: row r
/// checks proposal r (the last row, after every proposal, is a plain step); tokens are taken
/// until one is not the proposal, which is then the target's own, or the request ends.
fn pick_tokens(
    tokenizer: &GgufTokenizer,
    s: &mut Sequence,
    p: &Planned,
    rows: &[f32],
    vocab: usize,
    ctx: usize,
) -> Picked {
    let mut got = Picked {
        outcome: Emitted::Continue,
        accepted: 0,
        emitted: 0,
    };
    for (r, logits) in rows.chunks_exact(vocab).enumerate() {
        let (next, took_draft) = match p.drafts.get(r) {
            None => (s.sampler.sample(logits, &s.history), false),
            Some(&x) => match check_draft(s, logits, x, p.q.get(r)) {
                Verdict::Accepted => (x, true),
                Verdict::Rejected { token } => (token, false),
            },
        };
        got.accepted += usize::from(took_draft);
        got.outcome = emit(tokenizer, s, next, logits, ctx);
        got.emitted += 1;
        if got.outcome != Emitted::Continue || !took_draft {
            break;
        }
    }
    got
}

/// The acceptance rule for proposal `x` at a row whose logits are `logits`: greedy requests
/// accept exactly the token plain decoding picks; sampling ones accept `x` with probability
/// `min(1, p(x)/q(x))` and otherwise draw from `max(0, p - q)`, which leaves the target's
/// distribution `p` (the whole sampling chain, as without speculation) unchanged.
fn check_draft(s: &mut Sequence, logits: &[f32], x: u32, q: Option<&Vec<(u32, f64)>>) -> Verdict {
    if s.sampler.is_greedy() {
        let t = s.sampler.sample(logits, &s.history);
        return if t == x {
            Verdict::Accepted
        } else {
            Verdict::Rejected { token: t }
        };
    }
    let p = s.sampler.distribution(logits, &s.history);
    let one_hot;
    let q: &[(u32, f64)] = match q {
        Some(q) => q,
        None => {
            one_hot = verify::one_hot(x);
            &one_hot
        }
    };
    let (u1, u2) = (s.sampler.uniform(), s.sampler.uniform());
    verify::verify(&p, q, x, u1, u2)
}

/// Takes `next` as `s`'s next token: streams its text and says whether the request is
/// finished, or a context shift made room for it.
fn emit(
    tokenizer: &GgufTokenizer,
    s: &mut Sequence,
    next: u32,
    logits: &[f32],
    ctx: usize,
) -> Emitted {
    if s.first_token.is_none() {
        s.first_token = Some(Instant::now());
    }
    let logprob = s.req.logprobs.map(|n| logprobs(logits, next, n));
    s.tokens.push(next);
    s.history.push(next);
    s.generated += 1;
    let mut outcome = Emitted::Continue;
    let mut text = String::new();
    if !s.req.ignore_eos && tokenizer.is_eog(next) {
        outcome = Emitted::Finished(StopReason::EndOfGeneration);
    } else {
        let piece = s.decoder.push(tokenizer, next);
        let out = s.stops.push(&piece);
        text.push_str(&out.text);
        if out.stopped {
            outcome = Emitted::Finished(StopReason::StopString);
        } else if s.generated >= s.req.max_tokens {
            outcome = Emitted::Finished(StopReason::Length);
        } else if s.tokens.len() > ctx {
            // The sampled token has no room for its K/V: the context is full.
            outcome = match shift_window(s) {
                true => Emitted::Shifted,
                false => Emitted::Finished(StopReason::ContextFull),
            };
        }
    }
    if matches!(
        outcome,
        Emitted::Finished(
            StopReason::EndOfGeneration | StopReason::Length | StopReason::ContextFull
        )
    ) {
        // Flush what was held back (an unfinished character or stop-string prefix).
        let tail = s.decoder.finish();
        let out = s.stops.push(&tail);
        text.push_str(&out.text);
        if !out.stopped {
            text.push_str(&s.stops.finish());
        }
    }
    let sent = s.events.send(Event::Token {
        id: next,
        text,
        logprob,
    });
    if sent.is_err() {
        // The client went away; the next step frees the sequence.
        return Emitted::Continue;
    }
    outcome
}

/// llama.cpp's context shift on `s.tokens` (the cached window and the token just sampled,
/// which has no room): keep the first `keep` tokens (capped at the prompt, as llama.cpp pins
/// only prompt tokens), drop the older half of the rest. The window is then recomputed as a
/// fresh prompt: one prefill per shift, but exactly the K/V a run over the shorter text has
/// (no re-rotated keys). False when there is no shift, or it would drop nothing.
fn shift_window(s: &mut Sequence) -> bool {
    let Some(shift) = s.req.context_shift else {
        return false;
    };
    let Some(next) = s.tokens.pop() else {
        return false;
    };
    let window = s.tokens.len();
    let keep = shift.keep.min(s.req.prompt_tokens.len()).min(window);
    let discard = (window - keep) / 2;
    if discard == 0 {
        s.tokens.push(next);
        return false;
    }
    s.tokens.drain(keep..keep + discard);
    s.tokens.push(next);
    s.prompt_len = s.tokens.len();
    s.context_shifts.push(discard);
    true
}

/// The chosen token's log-probability under the model (log-softmax of the raw logits) and
/// the `n` most likely tokens.
fn logprobs(logits: &[f32], chosen: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let lp = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse)
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if n > 0 && n < ids.len() {
        ids.select_nth_unstable_by(n - 1, by_logit);
    }
    ids.truncate(n);
    ids.sort_unstable_by(by_logit);
    TokenLogprob {
        id: chosen,
        logprob: lp(chosen),
        top: ids.into_iter().map(|id| (id, lp(id))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After every step, each sequence's cache holds exactly its computed tokens, all
    /// committed: rejected proposals were cut before the commit, so nothing of them reaches
    /// the cache or the prefix cache, and the output equals plain decoding.
    #[test]
    fn rejected_proposals_leave_nothing_in_the_cache() {
        let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2");
        let m = LoadedModel::open(&path, &ember_models::default_device()).expect("load");
        let prompt = m
            .tokenize_prompt("one two three, one two three, one two four, one two")
            .expect("tokenize");
        let run = |proposer: Proposer| {
            let mut config = EngineConfig::new(2, 128);
            config.kv.block_size = 4;
            config.spec = SpecConfig {
                proposer,
                ngram_max: 2,
                ..SpecConfig::default()
            };
            let parts = SchedulerParts::new(&m.model, None, None, &config).expect("parts");
            let mut s = Scheduler::new(
                &m.model,
                &m.tokenizer,
                None,
                config,
                parts,
                Counters::detached(),
            );
            // Two sequences at once, each with its own stream.
            let (tx, mut rx) = unbounded_channel();
            let (tx2, _rx2) = unbounded_channel();
            let req = EngineRequest {
                prompt_tokens: prompt.clone(),
                max_tokens: 60,
                sampling: SamplingParams::greedy(),
                ignore_eos: true,
                ..Default::default()
            };
            s.push(req.clone(), tx);
            s.push(req, tx2);
            while !s.idle() {
                s.guarded_step();
                for seq in &s.running {
                    let Some(kv) = seq.kv else { continue };
                    let alloc = s.cache.allocator();
                    assert_eq!(
                        alloc.tokens(kv).expect("tokens"),
                        &seq.tokens[..seq.computed],
                        "cached tokens"
                    );
                    assert_eq!(alloc.committed_len(kv).expect("len"), seq.computed);
                }
            }
            let mut tokens = Vec::new();
            let mut stats = None;
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Token { id, .. } => tokens.push(id),
                    Event::Done { spec, .. } => stats = spec,
                    Event::Error(e) => panic!("{e}"),
                }
            }
            assert_eq!(s.cache.used_blocks(), 0);
            (tokens, stats)
        };
        let (plain, _) = run(Proposer::None);
        let (spec, stats) = run(Proposer::Lookup);
        assert_eq!(spec, plain);
        let stats = stats.expect("spec stats");
        assert!(
            stats.accepted > 0 && stats.accepted < stats.drafted,
            "both accepted and rejected proposals: {stats:?}"
        );
    }
}
