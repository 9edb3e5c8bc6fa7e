//! Speculative decoding through the server, on the real SmolLM2: a server whose engine runs
//! prompt lookup answers greedy requests with exactly the text of one that does not, and
//! reports the counts (OpenAI `usage.completion_tokens_details`, `timings.draft_n`, Ollama's
//! `draft_n`, `/metrics`); the per-request `ember` field turns speculation on or off, and a
//! bad one is a 400 naming it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::loaded::LoadedModel;
use ember_runtime::spec::{Proposer, SpecConfig};
use ember_server::{ServerConfig, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const CTX: usize = 512;

fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = match std::env::var_os("EMBER_TEST_SMOLLM2") {
                Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
                _ => ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2"),
            };
            let model = LoadedModel::open(&path, &ember_models::default_device()).expect("load");
            Arc::new(model)
        })
        .clone()
}

fn engine_with(proposer: Proposer) -> Engine {
    let mut config = EngineConfig::new(2, CTX);
    config.spec = SpecConfig {
        proposer,
        ..SpecConfig::default()
    };
    Engine::start(model(), config).expect("start engine")
}

/// The engine `ember serve --spec lookup` runs.
fn lookup_engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| engine_with(Proposer::Lookup)).clone()
}

/// The engine without speculation (the default).
fn plain_engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| engine_with(Proposer::None)).clone()
}

fn app(engine: Engine) -> Router {
    router(engine, ServerConfig::new("smollm2"))
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, String) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn post(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn call(app: &Router, uri: &str, body: &Value) -> Value {
    let (status, text) = send(app, post(uri, body)).await;
    assert_eq!(status, StatusCode::OK, "{uri} {body}: {text}");
    json_of(&text)
}

const PASSAGE: &str = "The old lighthouse keeper climbed the spiral stairs every evening, \
    lit the great lamp, and watched the ships pass safely through the narrow channel below.";

/// A greedy chat request asking for `PASSAGE` back: the reply copies the prompt, so prompt
/// lookup's proposals are accepted.
fn repeat_chat(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{
            "role": "user",
            "content": format!("Repeat the following text exactly, word for word:\n\n{PASSAGE}"),
        }],
        "max_tokens": 48,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

fn accepted(v: &Value) -> u64 {
    v["usage"]["completion_tokens_details"]["accepted_prediction_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no completion_tokens_details: {v}"))
}

/// A counter's value in `/metrics`, once the engine has published its totals (it does so
/// after each step, which may be just after the response).
async fn metric_at_least(app: &Router, name: &str, min: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let req = Request::get("/metrics").body(Body::empty()).expect("req");
        let (status, text) = send(app, req).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"));
        if value >= min || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn lookup_gives_the_plain_text_and_reports_its_counts() {
    let lookup = app(lookup_engine());
    let plain = app(plain_engine());
    let body = repeat_chat(json!({}));
    let with = call(&lookup, "/v1/chat/completions", &body).await;
    let without = call(&plain, "/v1/chat/completions", &body).await;
    let text = with["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(
        text, without["choices"][0]["message"]["content"],
        "lookup changed the greedy reply"
    );
    assert!(
        text.contains("lighthouse keeper"),
        "the model did not copy: {text:?}"
    );
    assert_eq!(
        with["usage"]["completion_tokens"],
        without["usage"]["completion_tokens"]
    );

    // OpenAI's predicted-output counts and llama-server's timing fields.
    let details = &with["usage"]["completion_tokens_details"];
    let acc = accepted(&with);
    let rejected = details["rejected_prediction_tokens"]
        .as_u64()
        .expect("rejected");
    assert!(acc > 0, "lookup accepted nothing: {with}");
    let timings = &with["timings"];
    assert_eq!(timings["draft_n"].as_u64(), Some(acc + rejected), "{with}");
    assert_eq!(timings["draft_n_accepted"].as_u64(), Some(acc), "{with}");
    // Without speculation neither appears.
    assert!(
        without["usage"].get("completion_tokens_details").is_none(),
        "{without}"
    );
    assert!(without["timings"].get("draft_n").is_none(), "{without}");
    assert!(without["timings"]["predicted_n"].is_u64(), "{without}");

    // The engine's totals in /metrics.
    let drafted = metric_at_least(&lookup, "ember_spec_drafted_tokens_total", 1.0).await;
    let accepted_total = metric_at_least(&lookup, "ember_spec_accepted_tokens_total", 1.0).await;
    assert!(drafted >= (acc + rejected) as f64, "{drafted}");
    assert!(accepted_total >= acc as f64, "{accepted_total}");
    assert!(accepted_total <= drafted);
}

#[tokio::test]
async fn streams_report_the_counts_in_their_last_chunks() {
    let lookup = app(lookup_engine());
    let body = repeat_chat(json!({}));
    let whole = call(&lookup, "/v1/chat/completions", &body).await;
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (status, text) = send(&lookup, post("/v1/chat/completions", &streaming)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(json_of)
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, whole["choices"][0]["message"]["content"]);
    // The counts are the stream's own: how much a step drafts depends on what else runs
    // (the engine's row budget), so they are checked for consistency, not against `whole`.
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    let details = &usage_chunk["usage"]["completion_tokens_details"];
    let acc = accepted(usage_chunk);
    let rejected = details["rejected_prediction_tokens"]
        .as_u64()
        .expect("rejected");
    assert!(acc > 0, "{usage_chunk}");
    let finish = &chunks[chunks.len() - 2];
    assert!(
        finish["choices"][0]["finish_reason"].is_string(),
        "{finish}"
    );
    assert_eq!(finish["timings"]["draft_n"].as_u64(), Some(acc + rejected));
    assert_eq!(finish["timings"]["draft_n_accepted"].as_u64(), Some(acc));
    assert_eq!(usage_chunk["timings"], finish["timings"]);
    // Only the closing chunks carry them.
    assert!(
        chunks[..chunks.len() - 2]
            .iter()
            .all(|c| c.get("timings").is_none() && c["usage"].is_null())
    );

    // The completions endpoint, plain and streamed.
    let prompt = format!("{PASSAGE}\n{PASSAGE}\n{PASSAGE}\n");
    let body = json!({"prompt": prompt, "max_tokens": 32, "temperature": 0});
    let whole = call(&lookup, "/v1/completions", &body).await;
    assert!(accepted(&whole) > 0, "{whole}");
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (status, text) = send(&lookup, post("/v1/completions", &streaming)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let last = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(json_of)
        .last()
        .expect("usage chunk");
    assert!(accepted(&last) > 0, "{last}");
    assert!(last["timings"]["draft_n"].is_u64(), "{last}");
}

#[tokio::test]
async fn the_ember_field_turns_speculation_on_and_off_per_request() {
    let lookup = app(lookup_engine());
    let plain = app(plain_engine());
    let base = call(&plain, "/v1/chat/completions", &repeat_chat(json!({}))).await;
    let want = &base["choices"][0]["message"]["content"];

    // Off on a server that speculates: no counts, same text.
    let off = repeat_chat(json!({"ember": {"spec": "none"}}));
    let v = call(&lookup, "/v1/chat/completions", &off).await;
    assert!(v["usage"].get("completion_tokens_details").is_none(), "{v}");
    assert!(v["timings"].get("draft_n").is_none(), "{v}");
    assert_eq!(&v["choices"][0]["message"]["content"], want);

    // On (with its own draft lengths) on a server that does not: counts, same text.
    let on = repeat_chat(json!({"ember": {"spec": "lookup", "draft_max": 4, "draft_min": 1}}));
    let v = call(&plain, "/v1/chat/completions", &on).await;
    assert!(accepted(&v) > 0, "{v}");
    assert_eq!(&v["choices"][0]["message"]["content"], want);

    // `null` and `{}` are the server's default.
    for ember in [Value::Null, json!({})] {
        let v = call(
            &lookup,
            "/v1/chat/completions",
            &repeat_chat(json!({ "ember": ember })),
        )
        .await;
        assert!(accepted(&v) > 0, "{v}");
    }
}

#[tokio::test]
async fn a_bad_ember_field_is_a_400_naming_it() {
    let lookup = app(lookup_engine());
    let cases = [
        // Not run by this server (the engine's check at submit).
        (json!({"spec": "self"}), "--spec self"),
        (json!({"spec": "draft"}), "--spec draft"),
        (json!({"draft_max": 0}), "ember.draft_max"),
        (json!({"draft_max": 65}), "ember.draft_max"),
        (json!({"draft_max": "8"}), "ember.draft_max"),
        (json!({"draft_min": 9, "draft_max": 4}), "ember.draft_min"),
        // More than the engine's draft_max (8).
        (json!({"draft_min": 9}), "ember.draft_min"),
        (json!({"spec": "bogus"}), "none, lookup, draft or self"),
        (json!({"spec": true}), "ember.spec"),
        (json!({"nope": 1}), "ember.nope"),
        (json!("lookup"), "must be an object"),
    ];
    for (ember, needle) in cases {
        for uri in ["/v1/chat/completions", "/v1/completions"] {
            let body = json!({
                "messages": [{"role": "user", "content": "x"}],
                "prompt": "x",
                "max_tokens": 2,
                "ember": ember,
            });
            let (status, text) = send(&lookup, post(uri, &body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {ember}: {text}");
            let v = json_of(&text);
            assert_eq!(v["error"]["param"], "ember", "{text}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
            let msg = v["error"]["message"].as_str().expect("message");
            assert!(msg.contains(needle), "{ember}: {msg:?} lacks {needle:?}");
            assert!(msg.contains("ember"), "{ember}: {msg:?}");
        }
        // Ollama's routes, in Ollama's error shape.
        for uri in ["/api/generate", "/api/chat"] {
            let body = json!({
                "prompt": "x",
                "messages": [{"role": "user", "content": "x"}],
                "stream": false,
                "ember": ember,
            });
            let (status, text) = send(&lookup, post(uri, &body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {ember}: {text}");
            let msg = json_of(&text)["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{text}"))
                .to_string();
            assert!(
                msg.contains(needle),
                "{uri} {ember}: {msg:?} lacks {needle:?}"
            );
        }
    }
}

#[tokio::test]
async fn ollama_reports_draft_counts_when_it_speculates() {
    let plain = app(plain_engine());
    let generate = |ember: Value, stream: bool| {
        json!({
            "prompt": format!("Repeat the following text exactly, word for word:\n\n{PASSAGE}"),
            "stream": stream,
            "options": {"temperature": 0, "num_predict": 40, "repeat_penalty": 1.0},
            "ember": ember,
        })
    };
    let on = call(
        &plain,
        "/api/generate",
        &generate(json!({"spec": "lookup"}), false),
    )
    .await;
    let off = call(&plain, "/api/generate", &generate(Value::Null, false)).await;
    assert_eq!(on["response"], off["response"]);
    assert_eq!(on["done"], true);
    // Every usual field is still there.
    for key in [
        "done_reason",
        "context",
        "total_duration",
        "prompt_eval_count",
        "eval_count",
        "eval_duration",
    ] {
        assert!(on.get(key).is_some(), "{key} missing: {on}");
    }
    let drafted = on["draft_n"].as_u64().expect("draft_n");
    let acc = on["draft_n_accepted"].as_u64().expect("draft_n_accepted");
    assert!(acc > 0 && acc <= drafted, "{on}");
    assert!(off.get("draft_n").is_none(), "{off}");

    // Streamed: the final object carries them, the others do not.
    let (status, text) = send(
        &plain,
        post("/api/generate", &generate(json!({"spec": "lookup"}), true)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let objects: Vec<Value> = text.lines().map(json_of).collect();
    let last = objects.last().expect("final object");
    assert_eq!(last["done"], true, "{text}");
    let drafted = last["draft_n"].as_u64().expect("draft_n");
    let acc = last["draft_n_accepted"].as_u64().expect("draft_n_accepted");
    assert!(acc > 0 && acc <= drafted, "{last}");
    assert!(
        objects[..objects.len() - 1]
            .iter()
            .all(|o| o.get("draft_n").is_none())
    );
    let streamed: String = objects
        .iter()
        .filter_map(|o| o["response"].as_str())
        .collect();
    assert_eq!(streamed, on["response"]);

    // /api/chat too.
    let chat = json!({
        "messages": [{
            "role": "user",
            "content": format!("Repeat the following text exactly, word for word:\n\n{PASSAGE}"),
        }],
        "stream": false,
        "options": {"temperature": 0, "num_predict": 40},
        "ember": {"spec": "lookup"},
    });
    let v = call(&plain, "/api/chat", &chat).await;
    assert!(v["draft_n"].as_u64().is_some(), "{v}");
    assert!(v["message"]["content"].is_string(), "{v}");
}
