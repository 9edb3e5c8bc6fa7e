//! The router in-process (no socket) over the real SmolLM2: response shapes, streaming and
//! the error contract. The Python tests in `tests/server/` drive a real `ember serve` with
//! the official clients.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::loaded::LoadedModel;
use ember_server::{ServerConfig, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const CTX: usize = 256;

fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = match std::env::var_os("EMBER_TEST_SMOLLM2") {
                Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
                _ => ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2"),
            };
            let model = LoadedModel::open(&path, &ember_models::default_device()).expect("load");
            Engine::start(Arc::new(model), EngineConfig::new(2, CTX)).expect("start engine")
        })
        .clone()
}

fn app(api_key: Option<&str>) -> Router {
    let mut config = ServerConfig::new("smollm2");
    config.aliases = vec!["smollm2-135m-instruct-q4_1".into()];
    config.api_key = api_key.map(str::to_string);
    config.body_limit_bytes = 64 * 1024;
    router(engine(), config)
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("request")
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn chat_completion_has_openai_shape() {
    let app = app(None);
    let body = json!({
        "model": "smollm2-135m-instruct-q4_1",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": 2,
    });
    let (status, _, text) = send(&app, post("/v1/chat/completions", body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v = json_of(&text);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    let reason = choice["finish_reason"].as_str().expect("finish_reason");
    assert!(reason == "length" || reason == "stop", "{reason}");
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().expect("usage");
    assert!((1..=4).contains(&completion), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + completion)
    );
    let lp = choice["logprobs"]["content"].as_array().expect("logprobs");
    assert!(!lp.is_empty());
    assert_eq!(lp[0]["top_logprobs"].as_array().map(Vec::len), Some(2));
    assert!(v["timings"]["predicted_n"].is_u64());
}

#[tokio::test]
async fn completion_stream_is_sse_ending_in_done() {
    let app = app(None);
    let body = json!({
        "prompt": "The capital of France is",
        "max_tokens": 5,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let (status, headers, text) = send(&app, post("/v1/completions", body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not data: {e:?}"))
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e))
        .collect();
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(finish["timings"]["prompt_n"].is_u64());
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert!(!text.is_empty());
}

#[tokio::test]
async fn errors_are_openai_json() {
    let app = app(None);
    let too_long = format!("context size is {CTX}");
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/v1/chat/completions", "{not json"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
                    .to_string(),
            ),
            StatusCode::NOT_FOUND,
            "gpt-4",
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "x", "max_tokens": -1}).to_string(),
            ),
            StatusCode::BAD_REQUEST,
            "at least 1",
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "x", "max_tokens": 1_000_000_000}).to_string(),
            ),
            StatusCode::BAD_REQUEST,
            "context size",
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "word ".repeat(CTX * 2), "max_tokens": 1}).to_string(),
            ),
            StatusCode::BAD_REQUEST,
            &too_long,
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "x".repeat(100 * 1024)}).to_string(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            post(
                "/v1/completions",
                json!({"prompt": "x", "n": 2}).to_string(),
            ),
            StatusCode::BAD_REQUEST,
            "n = 1",
        ),
        (get("/v1/nothing"), StatusCode::NOT_FOUND, "no route"),
    ];
    for (req, want, needle) in cases {
        let uri = req.uri().clone();
        let (status, _, text) = send(&app, req).await;
        assert_eq!(status, want, "{uri}: {text}");
        let v = json_of(&text);
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{uri}: {text}"));
        assert!(msg.contains(needle), "{uri}: {msg:?} lacks {needle:?}");
        assert!(v["error"]["type"].is_string());
    }
    // Ollama routes speak Ollama's error shape.
    let (status, _, text) = send(&app, post("/api/generate", "[")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json_of(&text)["error"].is_string(), "{text}");
}

#[tokio::test]
async fn api_key_guards_all_but_health() {
    let app = app(Some("sesame"));
    let (status, _, _) = send(&app, get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, text) = send(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(&text)["error"]["code"], "invalid_api_key");
    let req = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sesame")
        .body(Body::empty())
        .expect("request");
    let (status, _, text) = send(&app, req).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(json_of(&text)["data"][0]["id"], "smollm2");
    let (status, _, text) = send(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
}

#[tokio::test]
async fn metrics_expose_engine_gauges() {
    let app = app(None);
    let (status, _, text) = send(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "ember_requests_running",
        "ember_requests_waiting",
        "ember_kv_cache_used_blocks",
        "ember_kv_cache_total_blocks",
        "ember_prompt_tokens_total",
        "ember_generated_tokens_total",
        "ember_time_to_first_token_seconds_bucket",
        "ember_time_per_output_token_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}
