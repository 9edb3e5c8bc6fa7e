//! OpenAI's API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//!
//! Shapes follow OpenAI's exactly (the official client parses them); llama-server's extras are
//! accepted (`top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`, `ignore_eos`) and its
//! `timings` object is added to plain responses and to the last stream chunks. Ember's own
//! `ember` object sets a request's speculative decoding ([`crate::spec`]); a request that
//! speculated reports the counts in `usage.completion_tokens_details` (OpenAI's
//! predicted-outputs fields) and `timings` (`draft_n`, `draft_n_accepted`).

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use ember_runtime::chat::ChatMessage;
use ember_runtime::engine::{EngineRequest, Event, TokenLogprob};
use ember_runtime::sampling::SamplingParams;
use ember_runtime::spec::SpecOverride;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::Shared;
use crate::common::{
    Collected, StopParam, Tracked, check_model, collect, finish_reason, is_served_name, piece,
    seed, stop_list, submit, timings_json, tokenize_chat, tokenize_text, unix_now,
};
use crate::error::{ApiError, JsonBody};
use crate::limits;
use crate::spec::{self, usage_json};

/// OpenAI allows at most 20 alternatives per position.
const MAX_TOP_LOGPROBS: i64 = 20;

/// The body of both completion endpoints; each reads the fields it knows. Unknown fields are
/// ignored, as OpenAI-compatible servers do.
#[derive(Deserialize, Debug, Default)]
pub struct OpenAiRequest {
    model: Option<String>,
    messages: Option<Vec<InMessage>>,
    prompt: Option<PromptParam>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<serde_json::Number>,
    stop: Option<StopParam>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
    /// Chat: a bool; completions: how many alternatives.
    logprobs: Option<Value>,
    top_logprobs: Option<i64>,
    echo: Option<bool>,
    best_of: Option<i64>,
    suffix: Option<String>,
    // Features a client relies on and that are not implemented: refused with a 400 rather
    // than answered with plain text that only looks like success.
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    response_format: Option<Value>,
    logit_bias: Option<Value>,
    /// Ember's extension: this request's speculative decoding ([`crate::spec`]).
    ember: Option<Value>,
}

#[derive(Deserialize, Debug, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize, Debug)]
struct InMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum PromptParam {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Request parsing and validation without a model, for the `openai_request` fuzz target:
/// the body as either endpoint reads it, then every check a handler makes before tokenizing.
#[doc(hidden)]
pub fn validate_request(body: &[u8], ctx: usize) -> Result<(), ApiError> {
    let parsed: OpenAiRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let mut chat = parsed;
    let chat_ok = Params::parse(ctx, &mut chat, Endpoint::Chat).and_then(|_| messages(&mut chat));
    let mut completion: OpenAiRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let completion_ok = Params::parse(ctx, &mut completion, Endpoint::Completions);
    chat_ok.map(|_| ()).or(completion_ok.map(|_| ()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

/// Everything a request asks for, validated.
struct Params {
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
    spec: SpecOverride,
}

impl Params {
    /// Validates everything but the model name and the prompt, for a context of `ctx` tokens.
    fn parse(ctx: usize, r: &mut OpenAiRequest, endpoint: Endpoint) -> Result<Self, ApiError> {
        if let Some(n) = r.n
            && n != 1
        {
            return Err(ApiError::bad_param(
                "n",
                format!("n = {n}: only n = 1 is supported"),
            ));
        }
        if let Some(b) = r.best_of
            && b != 1
        {
            return Err(ApiError::bad_param(
                "best_of",
                format!("best_of = {b}: only 1 is supported"),
            ));
        }
        if r.echo == Some(true) {
            return Err(ApiError::bad_param("echo", "echo is not supported"));
        }
        if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_param("suffix", "suffix is not supported"));
        }
        refuse_unsupported(r)?;
        let (max, param) = match (endpoint, r.max_completion_tokens) {
            (Endpoint::Chat, Some(m)) => (Some(m), "max_completion_tokens"),
            _ => (r.max_tokens, "max_tokens"),
        };
        let max_tokens = match max {
            // Until an end-of-generation token or the context is full.
            None => ctx,
            Some(m) if m < 1 => {
                return Err(ApiError::bad_param(
                    param,
                    format!("{param} is {m}; it must be at least 1"),
                ));
            }
            Some(m) if m as u64 > ctx as u64 => {
                return Err(ApiError::bad_param(
                    param,
                    format!("{param} is {m}, more than the context size of {ctx} tokens"),
                ));
            }
            Some(m) => m as usize,
        };
        let logprobs = match endpoint {
            Endpoint::Chat => {
                let on = match &r.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(ApiError::bad_param(
                            "logprobs",
                            format!("logprobs must be true or false, not {other}"),
                        ));
                    }
                };
                match (on, r.top_logprobs) {
                    (false, Some(_)) => {
                        return Err(ApiError::bad_param(
                            "top_logprobs",
                            "top_logprobs needs logprobs: true",
                        ));
                    }
                    (false, None) => None,
                    (true, n) => Some(top_count("top_logprobs", n.unwrap_or(0))?),
                }
            }
            Endpoint::Completions => match &r.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => None,
                Some(Value::Number(n)) => match n.as_i64() {
                    Some(n) => Some(top_count("logprobs", n)?),
                    None => {
                        return Err(ApiError::bad_param(
                            "logprobs",
                            format!("logprobs must be an integer, not {n}"),
                        ));
                    }
                },
                Some(other) => {
                    return Err(ApiError::bad_param(
                        "logprobs",
                        format!("logprobs must be an integer from 0 to 20, not {other}"),
                    ));
                }
            },
        };
        // llama-server's defaults (SamplingParams::default is llama.cpp's).
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: r.temperature.unwrap_or(d.temperature),
            top_k: limits::top_k("top_k", r.top_k, d.top_k)?,
            top_p: r.top_p.unwrap_or(d.top_p),
            min_p: r.min_p.unwrap_or(d.min_p),
            repeat_penalty: r.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: r.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: r.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: r.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: seed(r.seed.as_ref())?,
        };
        limits::check_sampling(&sampling, &limits::OPENAI_NAMES)?;
        let stop = stop_list(r.stop.take());
        limits::check_stop(&stop)?;
        let stream = r.stream.unwrap_or(false);
        let spec = spec::parse(r.ember.as_ref())?;
        Ok(Params {
            max_tokens,
            sampling,
            stop,
            ignore_eos: r.ignore_eos.unwrap_or(false),
            logprobs,
            stream,
            include_usage: stream
                && r.stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            spec,
        })
    }

    fn engine_request(&self, prompt_tokens: Vec<u32>) -> EngineRequest {
        EngineRequest {
            prompt_tokens,
            max_tokens: self.max_tokens,
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            context_shift: None,
            spec: self.spec.clone(),
        }
    }
}

/// `tools`, `functions`, structured output and `logit_bias` are not implemented yet: a 400
/// that names the field, as the README promises, instead of a reply that ignores them.
fn refuse_unsupported(r: &OpenAiRequest) -> Result<(), ApiError> {
    let present = |v: &Option<Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let not_none =
        |v: &Option<Value>| present(v) && v.as_ref().and_then(Value::as_str) != Some("none");
    if present(&r.tools) || not_none(&r.tool_choice) {
        let param = if present(&r.tools) {
            "tools"
        } else {
            "tool_choice"
        };
        return Err(ApiError::bad_param(
            param,
            "tool calling (tools, tool_choice) is not supported by this server yet",
        ));
    }
    if present(&r.functions) || not_none(&r.function_call) {
        let param = if present(&r.functions) {
            "functions"
        } else {
            "function_call"
        };
        return Err(ApiError::bad_param(
            param,
            "function calling (functions, function_call) is not supported by this server yet",
        ));
    }
    if let Some(format) = r
        .response_format
        .as_ref()
        .filter(|_| present(&r.response_format))
    {
        let kind = format.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::bad_param(
                "response_format",
                format!(
                    "response_format of type `{}` (structured output) is not supported by this server yet; only `text` is",
                    kind.unwrap_or("?")
                ),
            ));
        }
    }
    if present(&r.logit_bias) {
        return Err(ApiError::bad_param(
            "logit_bias",
            "logit_bias is not supported by this server yet",
        ));
    }
    Ok(())
}

fn top_count(param: &'static str, n: i64) -> Result<usize, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&n) {
        Ok(n as usize)
    } else {
        Err(ApiError::bad_param(
            param,
            format!("{param} is {n}; it must be from 0 to {MAX_TOP_LOGPROBS}"),
        ))
    }
}

fn messages(r: &mut OpenAiRequest) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(list) = r.messages.take() else {
        return Err(ApiError::bad_param("messages", "messages is required"));
    };
    if list.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    if list.len() > limits::MAX_MESSAGES {
        return Err(ApiError::bad_param(
            "messages",
            format!(
                "messages has {} entries; at most {} are accepted",
                list.len(),
                limits::MAX_MESSAGES
            ),
        ));
    }
    list.into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::bad_param(
                                    "messages",
                                    format!("content parts of type `{kind}` are not supported (text only)"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(m.role, content))
        })
        .collect()
}

pub async fn chat_completions(
    State(state): State<Shared>,
    JsonBody(mut req): JsonBody<OpenAiRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    check_model(&state, req.model.as_deref())?;
    let params = Params::parse(state.engine.ctx_size(), &mut req, Endpoint::Chat)?;
    let msgs = messages(&mut req)?;
    let prompt = tokenize_chat(&state, msgs, true).await?;
    let tracked = submit(&state, params.engine_request(prompt), arrived)?;
    let ids = Ids::new(&state, &tracked, "chatcmpl");
    if params.stream {
        return Ok(sse(chat_stream(state, tracked, ids, params.include_usage)));
    }
    let prompt_n = tracked.prompt_tokens;
    let done = collect(tracked).await?;
    let logprobs = params.logprobs.map(|_| {
        let content: Vec<Value> = done
            .logprobs
            .iter()
            .map(|l| chat_logprob(&state, l))
            .collect();
        json!({ "content": content, "refusal": null })
    });
    Ok(Json(json!({
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": done.text },
            "logprobs": logprobs,
            "finish_reason": finish_reason(done.stop_reason),
        }],
        "usage": usage(prompt_n, &done),
        "timings": timings_json(&done.timings),
    }))
    .into_response())
}

pub async fn completions(
    State(state): State<Shared>,
    JsonBody(mut req): JsonBody<OpenAiRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    check_model(&state, req.model.as_deref())?;
    let params = Params::parse(state.engine.ctx_size(), &mut req, Endpoint::Completions)?;
    let prompt = match req.prompt.take() {
        None => return Err(ApiError::bad_param("prompt", "prompt is required")),
        Some(PromptParam::Text(t)) => tokenize_text(&state, t, true).await?,
        Some(PromptParam::Texts(mut v)) if v.len() == 1 => {
            tokenize_text(&state, v.remove(0), true).await?
        }
        // Token ids are used as given (no BOS added), as vLLM does.
        Some(PromptParam::Tokens(t)) => t,
        Some(PromptParam::TokenLists(mut v)) if v.len() == 1 => v.remove(0),
        Some(_) => {
            return Err(ApiError::bad_param(
                "prompt",
                "only one prompt per request is supported",
            ));
        }
    };
    let tracked = submit(&state, params.engine_request(prompt), arrived)?;
    let ids = Ids::new(&state, &tracked, "cmpl");
    if params.stream {
        return Ok(sse(completion_stream(
            state,
            tracked,
            ids,
            params.include_usage,
        )));
    }
    let prompt_n = tracked.prompt_tokens;
    let done = collect(tracked).await?;
    let logprobs = params.logprobs.map(|_| {
        let mut lp = CompletionLogprobs::default();
        let mut offset = 0;
        for l in &done.logprobs {
            offset += lp.push(&state, l, offset);
        }
        lp.json()
    });
    Ok(Json(json!({
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{
            "index": 0,
            "text": done.text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(done.stop_reason),
        }],
        "usage": usage(prompt_n, &done),
        "timings": timings_json(&done.timings),
    }))
    .into_response())
}

fn usage(prompt_n: usize, done: &Collected) -> Value {
    usage_json(prompt_n, done.timings.predicted_n, done.spec.as_ref())
}

/// Identifies one response: the same id and timestamp on every chunk.
struct Ids {
    id: String,
    created: u64,
    model: String,
}

impl Ids {
    fn new(state: &Shared, t: &Tracked, prefix: &str) -> Self {
        Ids {
            id: format!("{prefix}-{:x}{:06x}", state.started, t.id()),
            created: unix_now(),
            model: state.config.model_name.clone(),
        }
    }
}

fn sse(events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static) -> Response {
    Sse::new(events).into_response()
}

fn data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn done_marker() -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data("[DONE]"))
}

/// One `chat.completion.chunk`; `usage: null` on every chunk when usage is asked for, as
/// OpenAI does.
fn chat_chunk(ids: &Ids, delta: Value, logprobs: Value, finish: Value, usage: bool) -> Value {
    let mut v = json!({
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }],
    });
    if usage && let Some(o) = v.as_object_mut() {
        o.insert("usage".into(), Value::Null);
    }
    v
}

fn text_chunk(ids: &Ids, text: &str, logprobs: Value, finish: Value, usage: bool) -> Value {
    let mut v = json!({
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish }],
    });
    if usage && let Some(o) = v.as_object_mut() {
        o.insert("usage".into(), Value::Null);
    }
    v
}

/// The closing chunks: the one with `finish_reason` (and llama-server's `timings`), then with
/// `include_usage` one with empty `choices` and the `usage`.
fn finish_chunks(mut last: Value, usage_chunk: Option<Value>, timings: Value) -> Vec<Value> {
    if let Some(o) = last.as_object_mut() {
        o.insert("timings".into(), timings.clone());
    }
    let mut out = vec![last];
    if let Some(mut u) = usage_chunk {
        if let Some(o) = u.as_object_mut() {
            o.insert("timings".into(), timings);
        }
        out.push(u);
    }
    out
}

// The stream owns `tracked`: when the client goes away axum drops the body, the stream and
// with it the engine's RequestStream, which cancels the request.
fn chat_stream(
    state: Shared,
    mut tracked: Tracked,
    ids: Ids,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    async_stream::stream! {
        let role = json!({ "role": "assistant", "content": "" });
        yield data(&chat_chunk(&ids, role, Value::Null, Value::Null, include_usage));
        loop {
            match tracked.next_or_error().await {
                Event::Token { text, logprob, .. } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let lp = logprob.map_or(Value::Null, |l| {
                        json!({ "content": [chat_logprob(&state, &l)], "refusal": null })
                    });
                    let delta = json!({ "content": text });
                    yield data(&chat_chunk(&ids, delta, lp, Value::Null, include_usage));
                }
                Event::Done { stop_reason, timings, spec, .. } => {
                    let last = chat_chunk(
                        &ids,
                        json!({}),
                        Value::Null,
                        json!(finish_reason(stop_reason)),
                        include_usage,
                    );
                    let usage_chunk = include_usage.then(|| json!({
                        "id": ids.id,
                        "object": "chat.completion.chunk",
                        "created": ids.created,
                        "model": ids.model,
                        "choices": [],
                        "usage": usage_json(
                            tracked.prompt_tokens,
                            timings.predicted_n,
                            spec.as_ref(),
                        ),
                    }));
                    for c in finish_chunks(last, usage_chunk, timings_json(&timings)) {
                        yield data(&c);
                    }
                    yield done_marker();
                    break;
                }
                Event::Error(e) => {
                    yield data(&ApiError::internal(e).body());
                    yield done_marker();
                    break;
                }
            }
        }
    }
}

fn completion_stream(
    state: Shared,
    mut tracked: Tracked,
    ids: Ids,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    async_stream::stream! {
        let mut offset = 0;
        loop {
            match tracked.next_or_error().await {
                Event::Token { text, logprob, .. } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    // Offsets count token pieces, as in the plain response.
                    let lp = logprob.map_or(Value::Null, |l| {
                        let mut lp = CompletionLogprobs::default();
                        offset += lp.push(&state, &l, offset);
                        lp.json()
                    });
                    yield data(&text_chunk(&ids, &text, lp, Value::Null, include_usage));
                }
                Event::Done { stop_reason, timings, spec, .. } => {
                    let last = text_chunk(
                        &ids,
                        "",
                        Value::Null,
                        json!(finish_reason(stop_reason)),
                        include_usage,
                    );
                    let usage_chunk = include_usage.then(|| json!({
                        "id": ids.id,
                        "object": "text_completion",
                        "created": ids.created,
                        "model": ids.model,
                        "choices": [],
                        "usage": usage_json(
                            tracked.prompt_tokens,
                            timings.predicted_n,
                            spec.as_ref(),
                        ),
                    }));
                    for c in finish_chunks(last, usage_chunk, timings_json(&timings)) {
                        yield data(&c);
                    }
                    yield done_marker();
                    break;
                }
                Event::Error(e) => {
                    yield data(&ApiError::internal(e).body());
                    yield done_marker();
                    break;
                }
            }
        }
    }
}

/// One position of chat `logprobs.content`.
fn chat_logprob(state: &Shared, l: &TokenLogprob) -> Value {
    let entry = |id: u32, lp: f32| {
        let (token, bytes) = piece(state, id);
        json!({ "token": token, "logprob": lp, "bytes": bytes })
    };
    let mut v = entry(l.id, l.logprob);
    let top: Vec<Value> = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("top_logprobs".into(), Value::Array(top));
    }
    v
}

/// The legacy completions `logprobs` object (parallel lists).
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Map<String, Value>>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Adds one position at character `offset`; returns the token's length in characters.
    fn push(&mut self, state: &Shared, l: &TokenLogprob, offset: usize) -> usize {
        let token = piece(state, l.id).0;
        let len = token.chars().count();
        self.tokens.push(token);
        self.token_logprobs.push(l.logprob);
        self.top_logprobs.push(
            l.top
                .iter()
                .map(|&(id, lp)| (piece(state, id).0, json!(lp)))
                .collect(),
        );
        self.text_offset.push(offset);
        len
    }

    fn json(self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

fn model_object(state: &Shared) -> Value {
    let model = state.engine.model();
    let cfg = model.model.config();
    let size = crate::common::model_bytes(model);
    let n_params = model.weight_summary().params;
    json!({
        "id": state.config.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "ember",
        // llama-server's extra block; vLLM's max_model_len.
        "max_model_len": state.engine.ctx_size(),
        "meta": {
            "n_ctx": state.engine.ctx_size(),
            "n_ctx_train": cfg.context_length,
            "n_vocab": cfg.n_vocab,
            "n_embd": cfg.n_embd,
            "n_params": n_params,
            "size": size,
        },
    })
}

pub async fn list_models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_object(&state)] }))
}

pub async fn get_model(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if is_served_name(&state, &id) {
        Ok(Json(model_object(&state)))
    } else {
        Err(ApiError::model_not_found(&id, &state.config.model_name))
    }
}
