//! What both APIs share: the model name check, tokenizing prompts, submitting to the engine
//! and reading its events with the latency metrics recorded on the way.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use ember_runtime::chat::{ChatEncodeError, ChatMessage, ChatTemplate};
use ember_runtime::engine::{EngineRequest, Event, RequestStream, Timings, TokenLogprob};
use ember_runtime::generate::StopReason;
use ember_runtime::loaded::LoadedModel;
use ember_runtime::spec::SpecStats;
use ember_runtime::tokenizer::TokenizerError;
use serde_json::{Value, json};

use crate::Shared;
use crate::error::ApiError;

/// The model's size in bytes: a GGUF file's length, or for a checkpoint directory the bytes
/// of its weights (its in-memory image holds only metadata and norms).
pub fn model_bytes(model: &LoadedModel) -> u64 {
    if model.external.is_some() {
        model.weight_summary().bytes
    } else {
        model.file.bytes().len() as u64
    }
}

/// Accepts no name (llama-server style), the served name, an alias, or any of those with
/// Ollama's `:latest` tag; anything else is a 404, as vLLM does.
pub fn check_model(state: &Shared, requested: Option<&str>) -> Result<(), ApiError> {
    let Some(name) = requested.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    if is_served_name(state, name) {
        Ok(())
    } else {
        Err(ApiError::model_not_found(name, &state.config.model_name))
    }
}

pub fn is_served_name(state: &Shared, name: &str) -> bool {
    let bare = name.strip_suffix(":latest").unwrap_or(name);
    let cfg = &state.config;
    bare == cfg.model_name || cfg.aliases.iter().any(|a| a == bare)
}

/// A `seed`: a non-negative integer seeds the sampler; a negative one (llama.cpp's and
/// Ollama's -1) or none means a random seed.
pub fn seed(v: Option<&serde_json::Number>) -> Result<Option<u64>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) => match (n.as_u64(), n.as_i64()) {
            (Some(s), _) => Ok(Some(s)),
            (None, Some(_)) => Ok(None),
            _ => Err(ApiError::bad_param(
                "seed",
                format!("seed must be an integer, not {n}"),
            )),
        },
    }
}

fn model(state: &Shared) -> Arc<LoadedModel> {
    Arc::clone(state.engine.model())
}

/// Tokenizes off the async workers: a long prompt takes a while.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
}

/// A plain prompt: BOS as the model says (only when `add_bos`), special tokens parsed (as
/// llama-server: a raw prompt is the caller's own). Tokenizing stops once the prompt passes
/// the context: a huge prompt is refused for the cost of one context's worth of tokens.
pub async fn tokenize_text(
    state: &Shared,
    text: String,
    add_bos: bool,
) -> Result<Vec<u32>, ApiError> {
    let model = model(state);
    let ctx = state.engine.ctx_size();
    blocking(move || {
        model
            .tokenizer
            .encode_bounded(&text, add_bos, true, ctx)
            .map_err(|e| tokenizer_error(e, "prompt", ctx))
    })
    .await
}

/// A conversation through the model's chat template, ready for the assistant's reply. The
/// template's own BOS is dropped when the tokenizer adds one (no double BOS). Message content
/// is tokenized as text: special tokens come only from the template, so a message cannot
/// forge a turn. Bounded by the context like [`tokenize_text`].
pub async fn tokenize_chat(
    state: &Shared,
    messages: Vec<ChatMessage>,
    add_bos: bool,
) -> Result<Vec<u32>, ApiError> {
    let template = chat_template(state)?;
    let model = model(state);
    let ctx = state.engine.ctx_size();
    blocking(move || {
        template
            .render_tokens(&model.tokenizer, &messages, true, add_bos, Some(ctx))
            .map_err(|e| match e {
                ChatEncodeError::Template(e) => ApiError::bad_param("messages", e.to_string()),
                ChatEncodeError::Tokenizer(e) => tokenizer_error(e, "messages", ctx),
            })
    })
    .await
}

/// A prompt over the context is the same 400 as the engine's own check, saying it was
/// measured only as far as needed.
fn tokenizer_error(e: TokenizerError, param: &'static str, ctx: usize) -> ApiError {
    match e {
        TokenizerError::TooLong { at_least, .. } => ApiError::bad_request(format!(
            "the prompt is at least {at_least} tokens but the context size is {ctx}: use a \
             shorter prompt or a larger context (nothing was truncated)"
        ))
        .param(param)
        .code("context_length_exceeded"),
        other => ApiError::bad_param(param, other.to_string()),
    }
}

fn chat_template(state: &Shared) -> Result<Arc<ChatTemplate>, ApiError> {
    state
        .chat_template
        .clone()
        .map_err(|e| ApiError::internal(format!("the model's chat template is unusable: {e}")))
}

/// A submitted request: its events, with time to first token and time between tokens
/// recorded as they arrive. Dropping it cancels the request in the engine.
pub struct Tracked {
    stream: RequestStream,
    state: Shared,
    arrived: Instant,
    last_token: Option<Instant>,
    pub prompt_tokens: usize,
}

pub fn submit(state: &Shared, req: EngineRequest, arrived: Instant) -> Result<Tracked, ApiError> {
    let prompt_tokens = req.prompt_tokens.len();
    let stream = state.engine.submit(req)?;
    Ok(Tracked {
        stream,
        state: Arc::clone(state),
        arrived,
        last_token: None,
        prompt_tokens,
    })
}

impl Tracked {
    pub fn id(&self) -> u64 {
        self.stream.id()
    }

    /// The next event; `Error` if the engine went away without finishing the request.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.stream.next().await?;
        if matches!(ev, Event::Token { .. }) {
            let now = Instant::now();
            let m = &self.state.metrics;
            match self.last_token {
                None => m.observe_ttft(now - self.arrived),
                Some(prev) => m.observe_tpot(now - prev),
            }
            self.last_token = Some(now);
        }
        Some(ev)
    }

    /// Like [`Tracked::next`], but a stream that ends without `Done` is an error.
    pub async fn next_or_error(&mut self) -> Event {
        self.next().await.unwrap_or_else(|| {
            Event::Error("the engine stopped before the request finished".into())
        })
    }
}

/// A whole response, for `stream: false`.
pub struct Collected {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub stop_reason: StopReason,
    pub timings: Timings,
    /// What speculation did; `None` when the request did not speculate.
    pub spec: Option<SpecStats>,
}

pub async fn collect(mut t: Tracked) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    loop {
        match t.next_or_error().await {
            Event::Token {
                id,
                text: piece,
                logprob,
            } => {
                text.push_str(&piece);
                tokens.push(id);
                logprobs.extend(logprob);
            }
            Event::Done {
                stop_reason,
                timings,
                spec,
                ..
            } => {
                return Ok(Collected {
                    text,
                    tokens,
                    logprobs,
                    stop_reason,
                    timings,
                    spec,
                });
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
    }
}

/// OpenAI's and Ollama's reason: `stop` for an end-of-generation token or a stop string,
/// `length` for `max_tokens` or a full context.
pub fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
        StopReason::Length | StopReason::ContextFull => "length",
    }
}

/// llama-server's `timings` object (with its derived rates), with its `draft_n` and
/// `draft_n_accepted` when the request speculated.
pub fn timings_json(t: &Timings) -> Value {
    let per_token = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
    let per_second = |ms: f64, n: usize| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    let mut v = json!({
        "cache_n": t.cache_n,
        "prompt_n": t.prompt_n,
        "prompt_ms": t.prompt_ms,
        "prompt_per_token_ms": per_token(t.prompt_ms, t.prompt_n),
        "prompt_per_second": per_second(t.prompt_ms, t.prompt_n),
        "predicted_n": t.predicted_n,
        "predicted_ms": t.predicted_ms,
        "predicted_per_token_ms": per_token(t.predicted_ms, t.predicted_n),
        "predicted_per_second": per_second(t.predicted_ms, t.predicted_n),
    });
    if let Some(o) = v.as_object_mut() {
        if let Some(n) = t.draft_n {
            o.insert("draft_n".into(), json!(n));
        }
        if let Some(n) = t.draft_n_accepted {
            o.insert("draft_n_accepted".into(), json!(n));
        }
    }
    v
}

/// The text of one token for logprob listings (lossy where a token is part of a character).
pub fn piece(state: &Shared, id: u32) -> (String, Vec<u8>) {
    let bytes = state.engine.model().tokenizer.token_to_piece(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 in UTC with nanoseconds, as Ollama's `created_at`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Stop strings from either API's `stop`.
pub fn stop_list(v: Option<StopParam>) -> Vec<String> {
    let list = match v {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    // An empty stop string would end every request at once.
    list.into_iter().filter(|s| !s.is_empty()).collect()
}

/// `stop`: one string or a list, as both APIs accept.
#[derive(serde::Deserialize, Debug)]
#[serde(untagged)]
pub enum StopParam {
    One(String),
    Many(Vec<String>),
}
