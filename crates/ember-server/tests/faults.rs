//! A panic inside a forward pass (issue #14): injected with the `fail` crate's
//! `engine::forward` point. The batch's requests fail with a JSON 500, the engine goes on
//! serving, and `/health` counts the failure. Its own test binary: fail points are global to
//! the process.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::loaded::LoadedModel;
use ember_server::{ServerConfig, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

fn completion() -> Request<Body> {
    Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}).to_string(),
        ))
        .expect("request")
}

#[tokio::test]
async fn a_panicking_forward_pass_fails_its_batch_and_the_engine_goes_on() {
    let path = match std::env::var_os("EMBER_TEST_SMOLLM2") {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2"),
    };
    let model = LoadedModel::open(&path, &ember_models::default_device()).expect("load");
    let engine = Engine::start(Arc::new(model), EngineConfig::new(2, 128)).expect("engine");
    let app = router(engine.clone(), ServerConfig::new("smollm2"));

    let (status, first) = call(&app, completion()).await;
    assert_eq!(status, StatusCode::OK, "{first}");

    fail::cfg("engine::forward", "1*panic(injected fault)").expect("fail point");
    let (status, v) = call(&app, completion()).await;
    fail::remove("engine::forward");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("injected fault"), "{v}");

    // The engine still serves, with the same answer as before the fault, and no KV leaked.
    let (status, again) = call(&app, completion()).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
    let health = Request::get("/health")
        .body(Body::empty())
        .expect("request");
    let (status, h) = call(&app, health).await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert_eq!(h["engine"]["state"], "running", "{h}");
    assert_eq!(h["engine"]["failed_batches_total"], 1, "{h}");
    assert!(
        h["engine"]["last_failure"]
            .as_str()
            .is_some_and(|s| s.contains("injected fault")),
        "{h}"
    );
    // The scheduler publishes stats after each step; give it one idle tick.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(engine.stats().kv_used_blocks, 0, "KV blocks leaked");

    // A panic outside the pass, just after a finished sequence left the running list and
    // before its blocks went back: the request fails, its blocks are reclaimed.
    fail::cfg("engine::finish", "1*panic(fault after finishing)").expect("fail point");
    let (status, v) = call(&app, completion()).await;
    fail::remove("engine::finish");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        engine.stats().kv_used_blocks,
        0,
        "KV blocks leaked after a step panic"
    );

    // Every batch failing: /health says so (503, degraded) until a batch succeeds again.
    fail::cfg("engine::forward", "3*panic(broken kernel)").expect("fail point");
    for _ in 0..3 {
        let (status, v) = call(&app, completion()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    }
    fail::remove("engine::forward");
    let health = || {
        Request::get("/health")
            .body(Body::empty())
            .expect("request")
    };
    let (status, h) = call(&app, health()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{h}");
    assert_eq!(h["engine"]["state"], "degraded", "{h}");
    let (status, v) = call(&app, completion()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], first["choices"][0]["text"]);
    let (status, h) = call(&app, health()).await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert_eq!(h["engine"]["failed_batches_total"], 5, "{h}");
}
