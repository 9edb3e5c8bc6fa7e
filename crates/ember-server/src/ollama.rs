//! Ollama's API: `/api/generate`, `/api/chat` (NDJSON streams by default), `/api/tags`,
//! `/api/show`, `/api/ps`, `/api/version`.
//!
//! Shapes follow Ollama's (the official `ollama` Python client parses them): durations in
//! nanoseconds, `created_at` in RFC 3339, errors as `{"error": "message"}`. Sampling defaults
//! are Ollama's own (temperature 0.8, top_k 40, top_p 0.9, min_p 0, repeat_penalty 1.1).
//! `num_predict` below 1 means until the context is full, as in Ollama; one above the
//! context is capped to it. `num_ctx` and `keep_alive` are accepted and ignored (the context
//! is fixed when the server starts and the model stays loaded). Ember's own top-level `ember`
//! object sets a request's speculative decoding ([`crate::spec`]); a request that speculated
//! gets `draft_n` and `draft_n_accepted` in its final object.

use std::convert::Infallible;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ember_formats::MetaValue;
use ember_runtime::chat::ChatMessage;
use ember_runtime::engine::{EngineRequest, Event, TokenLogprob};
use ember_runtime::sampling::SamplingParams;
use ember_runtime::spec::{SpecOverride, SpecStats};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::Shared;
use crate::common::{
    StopParam, Tracked, check_model, collect, finish_reason, is_served_name, piece, rfc3339, seed,
    stop_list, submit, tokenize_chat, tokenize_text,
};
use crate::error::{ApiError, JsonBody, OllamaError};
use crate::limits;
use crate::spec;

/// The Ollama version reported by `/api/version`: clients gate features on it, and Ember
/// implements the API as of this release.
const OLLAMA_VERSION: &str = "0.12.0";

const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Deserialize, Debug, Default)]
pub struct Options {
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    num_predict: Option<i64>,
    seed: Option<serde_json::Number>,
    stop: Option<StopParam>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

#[derive(Deserialize, Debug, Default)]
pub struct GenerateRequest {
    model: Option<String>,
    prompt: Option<String>,
    suffix: Option<String>,
    system: Option<String>,
    template: Option<String>,
    context: Option<Vec<u32>>,
    stream: Option<bool>,
    raw: Option<bool>,
    format: Option<Value>,
    options: Option<Options>,
    images: Option<Vec<Value>>,
    think: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    /// Ember's extension: this request's speculative decoding ([`crate::spec`]).
    ember: Option<Value>,
}

#[derive(Deserialize, Debug, Default)]
pub struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<InMessage>>,
    stream: Option<bool>,
    format: Option<Value>,
    options: Option<Options>,
    tools: Option<Vec<Value>>,
    think: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    /// Ember's extension: this request's speculative decoding ([`crate::spec`]).
    ember: Option<Value>,
}

#[derive(Deserialize, Debug)]
struct InMessage {
    role: String,
    content: Option<String>,
    images: Option<Vec<Value>>,
}

#[derive(Deserialize, Debug, Default)]
pub struct ShowRequest {
    model: Option<String>,
    /// Older clients send `name`.
    name: Option<String>,
}

/// What the two generation endpoints share once parsed.
struct Common {
    model: String,
    stream: bool,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    logprobs: Option<usize>,
    spec: SpecOverride,
}

impl Common {
    #[allow(clippy::too_many_arguments)]
    fn parse(
        state: &Shared,
        model: Option<String>,
        stream: Option<bool>,
        format: Option<&Value>,
        think: Option<&Value>,
        options: Option<Options>,
        logprobs: Option<bool>,
        top_logprobs: Option<i64>,
        ember: Option<&Value>,
    ) -> Result<Self, ApiError> {
        check_model(state, model.as_deref()).map_err(|_| {
            let name = model.clone().unwrap_or_default();
            ApiError::not_found(format!("model '{name}' not found"))
        })?;
        match format {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "format (structured output) is not supported",
                ));
            }
        }
        match think {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "\"{}\" does not support thinking",
                    state.config.model_name
                )));
            }
        }
        let o = options.unwrap_or_default();
        let ctx = state.engine.ctx_size();
        let max_tokens = match o.num_predict {
            Some(n) if n > 0 => usize::try_from(n).unwrap_or(ctx).min(ctx),
            _ => ctx,
        };
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: o.temperature.unwrap_or(0.8),
            top_k: limits::top_k("options.top_k", o.top_k, 40)?,
            top_p: o.top_p.unwrap_or(0.9),
            min_p: o.min_p.unwrap_or(0.0),
            repeat_penalty: o.repeat_penalty.unwrap_or(1.1),
            repeat_last_n: o.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: o.presence_penalty.unwrap_or(0.0),
            frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
            seed: seed(o.seed.as_ref())?,
        };
        limits::check_sampling(&sampling, &limits::OLLAMA_NAMES)?;
        let stop = stop_list(o.stop);
        limits::check_stop(&stop)?;
        let logprobs = match (logprobs.unwrap_or(false), top_logprobs) {
            (false, _) => None,
            (true, None) => Some(0),
            (true, Some(n)) if (0..=MAX_TOP_LOGPROBS).contains(&n) => Some(n as usize),
            (true, Some(n)) => {
                return Err(ApiError::bad_request(format!(
                    "top_logprobs is {n}; it must be from 0 to {MAX_TOP_LOGPROBS}"
                )));
            }
        };
        let spec = spec::parse(ember)?;
        Ok(Common {
            model: model
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| state.config.model_name.clone()),
            stream: stream.unwrap_or(true),
            max_tokens,
            sampling,
            stop,
            logprobs,
            spec,
        })
    }

    fn engine_request(&self, prompt_tokens: Vec<u32>) -> EngineRequest {
        EngineRequest {
            prompt_tokens,
            max_tokens: self.max_tokens,
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
            ignore_eos: false,
            logprobs: self.logprobs,
            context_shift: None,
            spec: self.spec.clone(),
        }
    }
}

fn no_images(images: Option<&Vec<Value>>) -> Result<(), ApiError> {
    if images.is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::bad_request(
            "images are not supported by this model",
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Generate,
    Chat,
}

/// The request's text piece as Ollama puts it: `response` or `message.content`.
fn with_text(kind: Kind, mut v: Value, text: &str) -> Value {
    if let Some(o) = v.as_object_mut() {
        match kind {
            Kind::Generate => o.insert("response".into(), json!(text)),
            Kind::Chat => o.insert(
                "message".into(),
                json!({ "role": "assistant", "content": text }),
            ),
        };
    }
    v
}

fn head(model: &str) -> Value {
    json!({ "model": model, "created_at": rfc3339(SystemTime::now()) })
}

/// The answer to a request with nothing to generate: Ollama loads the model and says so.
fn loaded_reply(kind: Kind, model: &str, stream: bool) -> Response {
    let mut v = with_text(kind, head(model), "");
    if let Some(o) = v.as_object_mut() {
        o.insert("done".into(), json!(true));
        o.insert("done_reason".into(), json!("load"));
    }
    if stream {
        ndjson(futures_util::stream::iter([v]))
    } else {
        Json(v).into_response()
    }
}

pub async fn generate(
    State(state): State<Shared>,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let arrived = Instant::now();
    let JsonBody(req) = body?;
    let common = Common::parse(
        &state,
        req.model,
        req.stream,
        req.format.as_ref(),
        req.think.as_ref(),
        req.options,
        req.logprobs,
        req.top_logprobs,
        req.ember.as_ref(),
    )?;
    no_images(req.images.as_ref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix (fill-in-the-middle) is not supported").into());
    }
    if req.template.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(
            "custom templates are not supported; the model's own chat template is used",
        )
        .into());
    }
    let prompt = req.prompt.unwrap_or_default();
    let context = req.context.unwrap_or_default();
    if prompt.is_empty() && context.is_empty() {
        return Ok(loaded_reply(Kind::Generate, &common.model, common.stream));
    }
    // A continuation (`context` from an earlier reply) already starts with the BOS.
    let add_bos = context.is_empty();
    let new_tokens = if req.raw.unwrap_or(false) {
        tokenize_text(&state, prompt, add_bos).await?
    } else {
        let mut msgs = Vec::new();
        if let Some(system) = req.system.filter(|s| !s.is_empty()) {
            msgs.push(ChatMessage::system(system));
        }
        msgs.push(ChatMessage::user(prompt));
        tokenize_chat(&state, msgs, add_bos).await?
    };
    let mut tokens = context;
    tokens.extend(new_tokens);
    run(state, Kind::Generate, common, tokens, arrived).await
}

pub async fn chat(
    State(state): State<Shared>,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let arrived = Instant::now();
    let JsonBody(req) = body?;
    let common = Common::parse(
        &state,
        req.model,
        req.stream,
        req.format.as_ref(),
        req.think.as_ref(),
        req.options,
        req.logprobs,
        req.top_logprobs,
        req.ember.as_ref(),
    )?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request(format!(
            "\"{}\" does not support tools",
            state.config.model_name
        ))
        .into());
    }
    let messages = req.messages.unwrap_or_default();
    if messages.is_empty() {
        return Ok(loaded_reply(Kind::Chat, &common.model, common.stream));
    }
    if messages.len() > limits::MAX_MESSAGES {
        return Err(ApiError::bad_request(format!(
            "messages has {} entries; at most {} are accepted",
            messages.len(),
            limits::MAX_MESSAGES
        ))
        .into());
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        no_images(m.images.as_ref())?;
        msgs.push(ChatMessage::new(m.role, m.content.unwrap_or_default()));
    }
    let tokens = tokenize_chat(&state, msgs, true).await?;
    run(state, Kind::Chat, common, tokens, arrived).await
}

async fn run(
    state: Shared,
    kind: Kind,
    common: Common,
    prompt: Vec<u32>,
    arrived: Instant,
) -> Result<Response, OllamaError> {
    let context = (kind == Kind::Generate).then(|| prompt.clone());
    let tracked = submit(&state, common.engine_request(prompt), arrived)?;
    let logprobs = common.logprobs.is_some();
    if common.stream {
        return Ok(ndjson(stream(
            state,
            kind,
            common.model,
            tracked,
            context,
            logprobs,
            arrived,
        )));
    }
    let prompt_n = tracked.prompt_tokens;
    let done = collect(tracked).await?;
    let mut v = with_text(kind, head(&common.model), &done.text);
    let ctx = context.map(|mut c| {
        c.extend_from_slice(&done.tokens);
        c
    });
    finish(
        &mut v,
        done.stop_reason,
        &done.timings,
        done.spec.as_ref(),
        prompt_n,
        arrived,
        ctx,
    );
    if logprobs && let Some(o) = v.as_object_mut() {
        let lp: Vec<Value> = done.logprobs.iter().map(|l| logprob(&state, l)).collect();
        o.insert("logprobs".into(), Value::Array(lp));
    }
    Ok(Json(v).into_response())
}

/// Fills in the last object's `done`, `done_reason`, durations (ns) and counts, and the
/// speculation counts when the request speculated.
fn finish(
    v: &mut Value,
    reason: ember_runtime::generate::StopReason,
    t: &ember_runtime::engine::Timings,
    spec: Option<&SpecStats>,
    prompt_n: usize,
    arrived: Instant,
    context: Option<Vec<u32>>,
) {
    let ns = |ms: f64| (ms * 1e6).max(0.0) as u64;
    let Some(o) = v.as_object_mut() else {
        return;
    };
    o.insert("done".into(), json!(true));
    o.insert("done_reason".into(), json!(finish_reason(reason)));
    if let Some(c) = context {
        o.insert("context".into(), json!(c));
    }
    let total = u64::try_from(arrived.elapsed().as_nanos()).unwrap_or(u64::MAX);
    o.insert("total_duration".into(), json!(total));
    o.insert("load_duration".into(), json!(0));
    // The whole prompt, including what the prefix cache served (Ollama counts the same).
    o.insert("prompt_eval_count".into(), json!(prompt_n));
    o.insert("prompt_eval_duration".into(), json!(ns(t.prompt_ms)));
    o.insert("eval_count".into(), json!(t.predicted_n));
    o.insert("eval_duration".into(), json!(ns(t.predicted_ms)));
    spec::ollama_fields(o, spec);
}

// Owns `tracked`: a client that goes away drops the body and so cancels the request.
fn stream(
    state: Shared,
    kind: Kind,
    model: String,
    mut tracked: Tracked,
    mut context: Option<Vec<u32>>,
    logprobs: bool,
    arrived: Instant,
) -> impl Stream<Item = Value> + Send + 'static {
    async_stream::stream! {
        loop {
            match tracked.next_or_error().await {
                Event::Token { id, text, logprob: lp } => {
                    if let Some(c) = context.as_mut() {
                        c.push(id);
                    }
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    let mut v = with_text(kind, head(&model), &text);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("done".into(), json!(false));
                        if logprobs && let Some(l) = &lp {
                            o.insert("logprobs".into(), json!([logprob(&state, l)]));
                        }
                    }
                    yield v;
                }
                Event::Done { stop_reason, timings, spec, .. } => {
                    let mut v = with_text(kind, head(&model), "");
                    let prompt_n = tracked.prompt_tokens;
                    let ctx = context.take();
                    finish(&mut v, stop_reason, &timings, spec.as_ref(), prompt_n, arrived, ctx);
                    yield v;
                    break;
                }
                Event::Error(e) => {
                    yield json!({ "error": e });
                    break;
                }
            }
        }
    }
}

fn ndjson(values: impl Stream<Item = Value> + Send + 'static) -> Response {
    let body =
        Body::from_stream(values.map(|v| Ok::<_, Infallible>(Bytes::from(format!("{v}\n")))));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn logprob(state: &Shared, l: &TokenLogprob) -> Value {
    let top: Vec<Value> = l
        .top
        .iter()
        .map(|&(id, lp)| json!({ "token": piece(state, id).0, "logprob": lp }))
        .collect();
    json!({ "token": piece(state, l.id).0, "logprob": l.logprob, "top_logprobs": top })
}

/// llama.cpp's `general.file_type` names (`llama_ftype`), as Ollama shows them.
fn file_type_name(ft: u32) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

fn details(state: &Shared) -> Value {
    let loaded = state.engine.model();
    let file = &loaded.file;
    let arch = file.architecture().unwrap_or("unknown");
    // A checkpoint directory: its in-memory image carries the metadata, not the weights.
    let from_dir = loaded.external.is_some();
    let quant = if from_dir {
        match &loaded.scheme {
            Some(scheme) => scheme.to_string(),
            None => loaded.weight_summary().type_name.to_uppercase(),
        }
    } else {
        file.get_u32("general.file_type")
            .and_then(file_type_name)
            .map(str::to_string)
            .or_else(|| {
                file.tensor("blk.0.ffn_down.weight")
                    .map(|t| t.ggml_type.name().to_uppercase())
            })
            .unwrap_or_else(|| "unknown".into())
    };
    json!({
        "parent_model": "",
        "format": if from_dir { "safetensors" } else { "gguf" },
        "family": arch,
        "families": [arch],
        "parameter_size": parameter_size(state),
        "quantization_level": quant,
    })
}

fn parameter_count(state: &Shared) -> u64 {
    state.engine.model().weight_summary().params
}

/// `general.size_label` when the file has one, else Ollama's style (`134.52M`, `8.0B`).
fn parameter_size(state: &Shared) -> String {
    let file = &state.engine.model().file;
    if let Some(label) = file.get_str("general.size_label") {
        return label.to_string();
    }
    let n = parameter_count(state) as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else {
        format!("{:.2}M", n / 1e6)
    }
}

fn modified_at(state: &Shared) -> String {
    let mtime = state
        .config
        .model_path
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
        .unwrap_or(state.started_at);
    rfc3339(mtime)
}

fn listing(state: &Shared) -> Value {
    let name = &state.config.model_name;
    let mut v = json!({
        "name": name,
        "model": name,
        "modified_at": modified_at(state),
        "size": crate::common::model_bytes(state.engine.model()),
        "details": details(state),
    });
    if let (Some(d), Some(o)) = (&state.config.model_digest, v.as_object_mut()) {
        o.insert("digest".into(), json!(d));
    }
    v
}

pub async fn tags(State(state): State<Shared>) -> Json<Value> {
    Json(json!({ "models": [listing(&state)] }))
}

pub async fn ps(State(state): State<Shared>) -> Json<Value> {
    let mut v = listing(&state);
    if let Some(o) = v.as_object_mut() {
        // Loaded for as long as the server runs.
        o.insert("expires_at".into(), json!("2318-01-01T00:00:00Z"));
        o.insert("size_vram".into(), json!(0));
        o.insert("context_length".into(), json!(state.engine.ctx_size()));
    }
    Json(json!({ "models": [v] }))
}

pub async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION }))
}

fn meta_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I8(x) => json!(x),
        MetaValue::U16(x) => json!(x),
        MetaValue::I16(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F32(x) => json!(x),
        MetaValue::F64(x) => json!(x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::String(s) => json!(s),
        // Vocabularies are huge: Ollama leaves arrays out unless asked to be verbose.
        MetaValue::Array(_) => Value::Null,
    }
}

pub async fn show(
    State(state): State<Shared>,
    body: Result<JsonBody<ShowRequest>, ApiError>,
) -> Result<Json<Value>, OllamaError> {
    let JsonBody(req) = body?;
    if let Some(name) = req.model.or(req.name).filter(|n| !n.is_empty())
        && !is_served_name(&state, &name)
    {
        return Err(ApiError::not_found(format!("model '{name}' not found")).into());
    }
    let file = &state.engine.model().file;
    let mut info = Map::new();
    for (key, value) in file.metadata() {
        if key != "tokenizer.chat_template" {
            info.insert(key.clone(), meta_json(value));
        }
    }
    info.entry("general.parameter_count")
        .or_insert_with(|| json!(parameter_count(&state)));
    let template = file.get_str("tokenizer.chat_template").unwrap_or("");
    let path = state.config.model_path.as_ref().map_or_else(
        || state.config.model_name.clone(),
        |p| p.display().to_string(),
    );
    Ok(Json(json!({
        "license": file.get_str("general.license").unwrap_or(""),
        "modelfile": format!("# Modelfile generated by ember\nFROM {path}\n"),
        "parameters": "temperature 0.8\ntop_k 40\ntop_p 0.9\nrepeat_penalty 1.1",
        "template": template,
        "details": details(&state),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": modified_at(&state),
    })))
}
