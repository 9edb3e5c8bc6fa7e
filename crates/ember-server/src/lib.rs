//! The HTTP server: OpenAI- and Ollama-compatible APIs over the continuous-batching engine.
//!
//! Routes (all JSON; see the README's server section for the full contract):
//! - OpenAI: `POST /v1/chat/completions`, `POST /v1/completions` (plain, or `stream: true` as
//!   server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /v1/models/{id}`.
//! - Ollama: `POST /api/generate`, `POST /api/chat` (NDJSON streaming by default),
//!   `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`.
//! - `GET /health` (never needs the API key), `GET /metrics` (Prometheus/OpenMetrics text).
//!
//! Handlers only translate: they tokenize, submit an [`EngineRequest`] and turn the engine's
//! [`Event`]s into the API's shapes. Dropping a response body (the client went away) drops
//! the engine's `RequestStream`, which cancels the request and frees its KV blocks.
//!
//! [`EngineRequest`]: ember_runtime::engine::EngineRequest
//! [`Event`]: ember_runtime::engine::Event

mod auth;
mod common;
mod error;
mod metrics;
mod ollama;
mod openai;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use ember_runtime::chat::ChatTemplate;
use ember_runtime::engine::Engine;

pub use error::ApiError;

/// How the server presents itself and what it accepts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind; loopback unless asked otherwise.
    pub host: String,
    /// Port to bind; 0 picks a free one (the bound address is printed).
    pub port: u16,
    /// When set, every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The name the model is served under (`/v1/models`, `model` in responses).
    pub model_name: String,
    /// Other names a request may use for the model (file stem, manifest aliases). A request
    /// naming any other model gets 404, as vLLM does (llama-server ignores the name).
    pub aliases: Vec<String>,
    /// The GGUF file, for sizes and dates in Ollama's listings.
    pub model_path: Option<PathBuf>,
    /// sha256 of the GGUF file when known (manifest models), for Ollama's `digest`.
    pub model_digest: Option<String>,
    /// Largest request body accepted; larger ones get 413.
    pub body_limit_bytes: usize,
    /// How long a shutdown waits for open requests before dropping them.
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    /// Defaults: 127.0.0.1:8080, no API key, 8 MiB bodies.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            model_name: model_name.into(),
            aliases: Vec::new(),
            model_path: None,
            model_digest: None,
            body_limit_bytes: 8 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Engine,
    pub config: ServerConfig,
    pub metrics: metrics::Metrics,
    /// Compiled once; an unusable template fails only the chat routes.
    pub chat_template: Result<Arc<ChatTemplate>, String>,
    /// Unix seconds at start-up: `created` of the model, and a prefix that keeps response ids
    /// unique across restarts.
    pub started: u64,
    pub started_at: SystemTime,
}

pub(crate) type Shared = Arc<AppState>;

/// The application, without a listener: tests drive it with `tower::ServiceExt::oneshot`.
pub fn router(engine: Engine, config: ServerConfig) -> Router {
    let started_at = SystemTime::now();
    let started = started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let limit = config.body_limit_bytes;
    let chat_template = engine
        .model()
        .chat_template()
        .map(Arc::new)
        .map_err(|e| e.to_string());
    let state = Arc::new(AppState {
        chat_template,
        engine,
        config,
        metrics: metrics::Metrics::new(),
        started,
        started_at,
    });
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{*id}", get(openai::get_model))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/metrics", get(metrics::scrape))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// Binds, prints `listening on http://ADDR` to stderr, serves until Ctrl-C or SIGTERM, then
/// lets open requests finish for up to `shutdown_grace`.
pub async fn serve(engine: Engine, config: ServerConfig) -> anyhow::Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local: SocketAddr = listener.local_addr().context("reading the bound address")?;
    let grace = config.shutdown_grace;
    let app = router(engine, config);
    eprintln!("listening on http://{local}");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        eprintln!("shutting down: waiting up to {grace:?} for open requests");
        let _ = stop_tx.send(true);
    });
    // Streams can run for minutes: past the grace period, stop waiting and drop them.
    let deadline = async move {
        let mut rx = stop_rx;
        if rx.wait_for(|stopped| *stopped).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r.context("serving")?,
        _ = deadline => eprintln!("shutdown: dropped the requests still open"),
    }
    Ok(())
}

/// [`serve`] on a runtime of its own, for callers that are not async (the CLI).
pub fn serve_blocking(engine: Engine, config: ServerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ember-http")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(engine, config))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
