//! `ember serve` on a checkpoint directory: the tiny random Phi-3 written as a GPTQ directory
//! (fused layers packed, cut into parts when it loads) serves concurrent requests, each
//! getting the text it gets alone, and the model listings report the directory's weights (its
//! bytes, parameters and quantization), not the small in-memory GGUF that carries its
//! metadata.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ember_convert::{GroupSize, QuantWriteFormat, QuantWriteOptions};
use ember_formats::GgufFile;
use ember_models::testing::ScratchDir;
use ember_models::testing::tiny::{self, TinyArch, TinyDtype};
use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::loaded::LoadedModel;
use ember_server::{ServerConfig, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The tiny Phi-3 as a 4-bit GPTQ directory (act-order, groups of 32).
/// Returns the directory and its scratch root, which removes both when dropped.
fn gptq_dir() -> (ScratchDir, PathBuf) {
    let root = ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), "serve-checkpoint-dir");
    let gguf_path = root.join("tiny.gguf");
    std::fs::write(
        &gguf_path,
        tiny::gguf(TinyArch::Phi3, TinyDtype::F32).expect("tiny phi3"),
    )
    .expect("write");
    let gguf = GgufFile::open(&gguf_path).expect("open");
    let dir = root.join("gptq");
    let opts = QuantWriteOptions {
        format: QuantWriteFormat::Gptq {
            act_order: true,
            sym: true,
            v2: false,
        },
        bits: 4,
        group_size: GroupSize::Size(32),
    };
    ember_convert::gguf_to_quantized_hf(&gguf, &dir, &opts, &mut |_| {}).expect("export");
    (root, dir)
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

fn completion(prompt: &str) -> Request<Body> {
    let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gptq_directory_serves_concurrent_requests_and_reports_its_weights() {
    let (_scratch, dir) = gptq_dir();
    let model = LoadedModel::open(&dir, &ember_models::default_device()).expect("load");
    let summary = model.weight_summary();
    // Independent counts: the tiny model's parameters from its own GGUF, and the bytes the
    // directory holds (its safetensors file; norms widened to F32 in the image and the index
    // tensors shared by fused parts move the sum by a few percent at most).
    let tiny_params: u64 =
        GgufFile::from_bytes(tiny::gguf(TinyArch::Phi3, TinyDtype::F32).expect("tiny phi3"))
            .expect("parse")
            .tensors()
            .iter()
            .map(|t| t.n_elements())
            .sum();
    assert_eq!(summary.params, tiny_params, "{summary:?}");
    let on_disk = std::fs::metadata(dir.join("model.safetensors"))
        .expect("safetensors")
        .len() as f64;
    let ratio = summary.bytes as f64 / on_disk;
    assert!(
        (0.9..1.1).contains(&ratio),
        "{summary:?} vs {on_disk} bytes on disk"
    );
    let image_bytes = model.file.bytes().len() as u64;
    assert!(
        summary.bytes > 2 * image_bytes,
        "{summary:?} vs image {image_bytes}"
    );
    let engine = Engine::start(Arc::new(model), EngineConfig::new(4, 128)).expect("engine");
    let app = router(engine, ServerConfig::new("tiny-phi3-gptq"));

    let (status, tags) = send(&app, get("/api/tags")).await;
    assert_eq!(status, StatusCode::OK);
    let m = &tags["models"][0];
    assert_eq!(m["size"], json!(summary.bytes), "{tags}");
    assert_eq!(m["details"]["format"], "safetensors", "{tags}");
    assert_eq!(m["details"]["family"], "phi3", "{tags}");
    let quant = m["details"]["quantization_level"].as_str().unwrap_or("");
    assert!(quant.starts_with("GPTQ"), "{tags}");
    let (status, models) = send(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][0]["meta"]["n_params"], json!(summary.params));
    assert_eq!(models["data"][0]["meta"]["size"], json!(summary.bytes));

    let prompts = [
        "hello there",
        "the cat sat on",
        "an apple a day",
        "hello there",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        let (status, v) = send(&app, completion(p)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
        alone.push(
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    // Four at once: the scheduler batches them; each decode row goes through the packed
    // kernels on its own, so every text is the one it gets alone.
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let app = app.clone();
            let req = completion(p);
            tokio::spawn(async move { send(&app, req).await })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&alone) {
        let (status, v) = h.await.expect("join");
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()), "{v}");
    }
    assert_eq!(alone[0], alone[3]);
}
