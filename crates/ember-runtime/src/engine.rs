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
//! Callers (the server, tools) submit an [`EngineRequest`] and read [`Event`]s from the
//! returned [`RequestStream`]; the engine knows nothing about HTTP.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_kv::{KvBudget, KvError, KvOptions, PagedKvCache, SeqId};
use ember_models::{BatchSeq, Logits, ModelError, UBATCH};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::generate::StopReason;
use crate::loaded::LoadedModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::StreamDecoder;

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
    pub kv: KvOptions,
    /// Token positions the shared KV pool holds over all sequences.
    pub kv_budget_tokens: usize,
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("KV cache: {0}")]
    Kv(#[from] KvError),
    #[error("bad engine config: {0}")]
    Config(String),
    #[error("could not start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "the prompt is {prompt} tokens but the context size is {ctx}: use a shorter prompt or a larger context (nothing was truncated)"
    )]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    #[error("the server is busy: {waiting} requests are already waiting; retry later")]
    QueueFull { waiting: usize },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub prompt_tokens: Vec<u32>,
    /// Tokens to generate at most (the context may end generation sooner).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely ones.
    pub logprobs: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The most likely tokens at this step, best first.
    pub top: Vec<(u32, f32)>,
}

/// llama-server's timing fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Prompt tokens computed (not served from the prefix cache).
    pub prompt_n: usize,
    pub prompt_ms: f64,
    pub predicted_n: usize,
    pub predicted_ms: f64,
    /// Prompt tokens served from the prefix cache.
    pub cache_n: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token. `text` is what is safe to show now (complete UTF-8, a possible stop
    /// string held back); it may be empty. The last token's event also carries any held-back
    /// text that turned out not to be a stop string.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        stop_reason: StopReason,
        timings: Timings,
    },
    Error(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_used_blocks: usize,
    pub kv_total_blocks: usize,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    /// Sequences preempted (KV blocks given back, recomputed later) since the start.
    pub preemptions_total: u64,
}

/// Whether the scheduler is alive, and the batches it failed (a panic in a forward pass or in
/// sampling fails that batch's requests; the engine goes on with the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineHealth {
    pub running: bool,
    pub failed_batches: u64,
    /// Batches failed in a row since the last one that succeeded.
    pub consecutive_failures: u64,
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
struct Failures {
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
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// For callers without an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

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
    pub fn start(model: Arc<LoadedModel>, config: EngineConfig) -> Result<Engine, EngineError> {
        if config.max_running == 0 || config.max_batch_tokens == 0 || config.ctx_size == 0 {
            return Err(EngineError::Config(
                "max_running, max_batch_tokens and ctx_size must be at least 1".into(),
            ));
        }
        let mut kv = config.kv.clone();
        kv.budget = Some(KvBudget::Tokens(
            config.kv_budget_tokens.max(config.ctx_size),
        ));
        let cache = PagedKvCache::new(&model.model.kv_config(&kv, config.ctx_size))?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            model,
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
        let mut scheduler = Scheduler {
            model: Arc::clone(&shared.model),
            config: shared.config.clone(),
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: Arc::clone(&shared.stats),
            pending: Arc::clone(&shared.pending),
            prompt_total: 0,
            generated_total: 0,
            preempted_total: 0,
            failures: Arc::clone(&shared.failures),
        };
        let handle = std::thread::Builder::new()
            .name("ember-engine".into())
            .spawn(move || scheduler.run(rx))?;
        if let Ok(mut t) = shared.thread.lock() {
            *t = Some(handle);
        }
        Ok(Engine { shared })
    }

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

    pub fn stats(&self) -> EngineStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

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

    pub fn ctx_size(&self) -> usize {
        self.shared.config.ctx_size
    }

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

/// A request on the scheduler thread.
struct Sequence {
    req: EngineRequest,
    events: UnboundedSender<Event>,
    /// Its sequence in the KV cache while admitted.
    kv: Option<SeqId>,
    /// Prompt then generated tokens: every token whose K/V the sequence needs.
    tokens: Vec<u32>,
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
}

impl Sequence {
    /// The ubatch that the next token to compute belongs to when this sequence runs alone
    /// (llama.cpp's slicing: the prompt in [`UBATCH`]-token slices from its start, then one
    /// token per step): `(end, rows)`, where a chunk starting there may end and how many rows
    /// that ubatch has. Generated tokens recomputed after a preemption may go together: each
    /// row still takes the one-row arithmetic it had when it was decoded.
    fn solo_ubatch(&self) -> (usize, usize) {
        let n_prompt = self.req.prompt_tokens.len();
        if self.computed >= n_prompt {
            return (self.tokens.len(), 1);
        }
        let start = self.computed / UBATCH * UBATCH;
        let end = (start + UBATCH).min(n_prompt);
        (end, end - start)
    }

    fn new(sub: Submission) -> Self {
        let Submission {
            req,
            events,
            submitted,
        } = sub;
        Self {
            tokens: req.prompt_tokens.clone(),
            sampler: Sampler::new(req.sampling.clone()),
            decoder: StreamDecoder::new(true),
            stops: StopMatcher::new(req.stop.clone()),
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
        }
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    fn timings(&self, now: Instant) -> Timings {
        let start = self.admitted.unwrap_or(self.submitted);
        let first = self.first_token.unwrap_or(now);
        Timings {
            prompt_n: self.prompt_computed,
            prompt_ms: first.saturating_duration_since(start).as_secs_f64() * 1e3,
            predicted_n: self.generated,
            predicted_ms: now.saturating_duration_since(first).as_secs_f64() * 1e3,
            cache_n: self.cache_n,
        }
    }
}

struct Scheduler {
    model: Arc<LoadedModel>,
    config: EngineConfig,
    cache: PagedKvCache,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    stats: Arc<Mutex<EngineStats>>,
    pending: Arc<AtomicUsize>,
    prompt_total: u64,
    generated_total: u64,
    preempted_total: u64,
    failures: Arc<Mutex<Failures>>,
}

/// A panic's message, for the failed requests and `/health`.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Scheduler {
    fn run(&mut self, rx: Receiver<Submission>) {
        // Runs until every `Engine` handle is gone; what is in flight then gets an error.
        'serve: loop {
            // Idle: block until a request arrives (waking now and then to publish stats).
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(sub) => self.waiting.push_back(Sequence::new(sub)),
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(sub) => self.waiting.push_back(Sequence::new(sub)),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => break 'serve,
                }
            }
            // A panic outside the forward pass (sampling, decoding text) fails the running
            // requests; the queue and later requests are served as usual.
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.step())) {
                let running: Vec<usize> = (0..self.running.len()).collect();
                self.fail_batch(&running, &panic_message(payload.as_ref()));
                self.reclaim_orphans();
            }
            self.publish();
        }
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = seq.events.send(Event::Error("the engine stopped".into()));
        }
    }

    fn publish(&self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = EngineStats {
                running: self.running.len(),
                waiting: self.pending.load(Ordering::Acquire),
                kv_used_blocks: self.cache.used_blocks(),
                kv_total_blocks: self.cache.total_blocks(),
                prompt_tokens_total: self.prompt_total,
                generated_tokens_total: self.generated_total,
                preemptions_total: self.preempted_total,
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
        if let Ok(mut f) = self.failures.lock() {
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

    fn release(&mut self, seq: &mut Sequence) {
        if let Some(kv) = seq.kv.take() {
            let _ = self.cache.free(kv);
        }
        seq.computed = 0;
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
        self.pending
            .fetch_sub(before - self.waiting.len(), Ordering::AcqRel);

        // Admit while there are free slots.
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.pending.fetch_sub(1, Ordering::AcqRel);
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

        loop {
            let plan = self.plan();
            if plan.is_empty() {
                return;
            }
            let batch: Vec<BatchSeq<'_>> = plan
                .iter()
                .filter_map(|&(idx, len, logits)| {
                    let s = &self.running[idx];
                    Some(BatchSeq {
                        seq: s.kv?,
                        tokens: &s.tokens[s.computed..s.computed + len],
                        logits: logits.then_some(Logits::Last),
                        solo_rows: Some(s.solo_ubatch().1),
                    })
                })
                .collect();
            let (model, cache) = (&self.model, &mut self.cache);
            // A panic inside the pass (a kernel bug, a fault injected by a test) must not take
            // the scheduler thread, and every later request, with it.
            let result = catch_unwind(AssertUnwindSafe(|| {
                fail::fail_point!("engine::forward");
                model.model.forward_batch(&batch, cache)
            }));
            drop(batch);
            let result = match result {
                Ok(r) => r,
                Err(payload) => {
                    let idxs: Vec<usize> = plan.iter().map(|p| p.0).collect();
                    let why = format!(
                        "the forward pass panicked: {}",
                        panic_message(payload.as_ref())
                    );
                    self.fail_batch(&idxs, &why);
                    return;
                }
            };
            match result {
                Ok(logits) => {
                    if let Ok(mut f) = self.failures.lock() {
                        f.consecutive = 0;
                    }
                    self.after_forward(&plan, logits);
                    return;
                }
                Err(ModelError::Kv(KvError::OutOfBlocks { .. })) if self.running.len() > 1 => {
                    // Preempt the newest sequence: its blocks go back (still cached for its
                    // recompute) and it waits at the front of the queue.
                    if let Some(mut s) = self.running.pop() {
                        self.preempted_total += 1;
                        self.release(&mut s);
                        self.waiting.push_front(s);
                        self.pending.fetch_add(1, Ordering::AcqRel);
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
                    let mut idxs: Vec<usize> = plan.iter().map(|p| p.0).collect();
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

    /// The next batch: `(index in running, tokens, wants logits)`. Decoding sequences first,
    /// then prompt chunks, within the token budget. A chunk never crosses the end of the
    /// ubatch its first token has when the sequence runs alone ([`Sequence::solo_ubatch`]),
    /// and it is computed with that ubatch's arithmetic, so where the budget cuts a prompt
    /// and what else is in the batch change nothing in its results.
    fn plan(&self) -> Vec<(usize, usize, bool)> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = Vec::new();
        let pending = |s: &Sequence| s.tokens.len() - s.computed;
        for (i, s) in self.running.iter().enumerate() {
            if pending(s) == 1 && budget > 0 {
                plan.push((i, 1, true));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = pending(s);
            if left > 1 && budget > 0 {
                let n = left.min(budget).min(s.solo_ubatch().0 - s.computed);
                plan.push((i, n, n == left));
                budget -= n;
            }
        }
        plan
    }

    fn after_forward(&mut self, plan: &[(usize, usize, bool)], logits: burn::tensor::Tensor<2>) {
        let [rows, vocab] = logits.dims();
        let flat = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
        let mut row = 0;
        let mut finished = Vec::new();
        for &(idx, len, wants) in plan {
            let s = &mut self.running[idx];
            let was_prompt = s.computed < s.req.prompt_tokens.len();
            if was_prompt {
                let prompt_part = len.min(s.req.prompt_tokens.len() - s.computed);
                s.prompt_computed += prompt_part;
                self.prompt_total += prompt_part as u64;
            }
            s.computed += len;
            if !wants {
                continue;
            }
            if row >= rows {
                break;
            }
            let logits = &flat[row * vocab..(row + 1) * vocab];
            row += 1;
            if let Some(reason) = sample_one(&self.model, s, logits, self.config.ctx_size) {
                finished.push((idx, reason));
            }
            self.generated_total += 1;
        }
        finished.sort_unstable_by_key(|f| f.0);
        let now = Instant::now();
        for &(idx, reason) in finished.iter().rev() {
            let mut s = self.running.remove(idx);
            fail::fail_point!("engine::finish");
            let _ = s.events.send(Event::Done {
                stop_reason: reason,
                timings: s.timings(now),
            });
            self.release(&mut s);
        }
    }
}

/// Samples the next token of `s` from its logits row, streams it, and says whether the
/// request is finished.
fn sample_one(
    model: &LoadedModel,
    s: &mut Sequence,
    logits: &[f32],
    ctx: usize,
) -> Option<StopReason> {
    let next = s.sampler.sample(logits, &s.tokens);
    if s.first_token.is_none() {
        s.first_token = Some(Instant::now());
    }
    let logprob = s.req.logprobs.map(|n| logprobs(logits, next, n));
    s.tokens.push(next);
    s.generated += 1;
    let tok = &model.tokenizer;
    let mut reason = None;
    let mut text = String::new();
    if !s.req.ignore_eos && tok.is_eog(next) {
        reason = Some(StopReason::EndOfGeneration);
    } else {
        let piece = s.decoder.push(tok, next);
        let out = s.stops.push(&piece);
        text.push_str(&out.text);
        if out.stopped {
            reason = Some(StopReason::StopString);
        } else if s.generated >= s.req.max_tokens {
            reason = Some(StopReason::Length);
        } else if s.tokens.len() > ctx {
            // The sampled token has no room for its K/V: the context is full.
            reason = Some(StopReason::ContextFull);
        }
    }
    if matches!(
        reason,
        Some(StopReason::EndOfGeneration | StopReason::Length | StopReason::ContextFull)
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
        return None;
    }
    reason
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
