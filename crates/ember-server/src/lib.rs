#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod auth;
mod common;
mod error;
mod guard;
mod limits;
mod metrics;
mod net;
mod ollama;
pub(crate) mod openai;
mod spec;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use ember_runtime::chat::ChatTemplate;
use ember_runtime::engine::Engine;

pub use error::ApiError;

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::guard::host_name;
    pub use crate::openai::validate_request as validate_openai_request;
}

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
    /// Host names served besides loopback names and IP literals (`--allowed-hosts`): `*` for
    /// any, `.example.com` for a domain and its subdomains. Other `Host`s get 403 (DNS
    /// rebinding).
    pub allowed_hosts: Vec<String>,
    /// Web origins allowed to call the server from a browser, with CORS headers
    /// (`--cors-origin`, `*` for any). Empty: no CORS headers, and requests carrying another
    /// site's `Origin` get 403.
    pub cors_origins: Vec<String>,
    /// A client must send a request's headers within this time, also while a kept-alive
    /// connection sits idle; the connection is closed otherwise.
    pub header_timeout: Duration,
    /// A client must send a request's body within this time (408 otherwise), and may stop
    /// reading a response for at most this long (the connection is closed after that).
    pub body_timeout: Duration,
    /// Open connections at most; further ones get a 503 and are closed.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Defaults: 127.0.0.1:8080, no API key, 8 MiB bodies, loopback names only, no CORS,
    /// 10 s for headers, 30 s for a body, 256 connections.
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
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 256,
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
    let cors = guard::cors_layer(&config.cors_origins);
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
    let app = Router::new()
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
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(DefaultBodyLimit::max(limit));
    // Outermost first: the Host/Origin check sees every request (preflights included), CORS
    // headers go on every answer, and no error leaves without a JSON body.
    let app = match cors {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        guard::check_host_and_origin,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limits::check_headers,
    ))
    .layer(axum::middleware::from_fn(error::json_errors))
    .with_state(state)
}

/// 200 while the engine's scheduler runs and serves; 503 once it has stopped, or while it
/// fails every batch (`degraded`); with its counters.
async fn health(
    axum::extract::State(state): axum::extract::State<Shared>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let health = state.engine.health();
    let stats = state.engine.stats();
    let engine_state = if !health.running {
        "stopped"
    } else if health.healthy() {
        "running"
    } else {
        "degraded"
    };
    let body = serde_json::json!({
        "status": if health.healthy() { "ok" } else { "error" },
        "engine": {
            "state": engine_state,
            "running": stats.running,
            "waiting": stats.waiting,
            "failed_batches_total": health.failed_batches,
            "consecutive_failures": health.consecutive_failures,
            "last_failure": health.last_failure,
        },
    });
    let status = if health.healthy() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .code("method_not_allowed")
    .for_path(uri.path())
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    ApiError::not_found(format!("no route for {}", uri.path())).for_path(uri.path())
}

/// Binds, prints `listening on http://ADDR` to stderr, serves until Ctrl-C or SIGTERM, then
/// lets open requests finish for up to `shutdown_grace`.
pub async fn serve(engine: Engine, config: ServerConfig) -> Result<(), ServeError> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|error| ServeError::Bind { addr, error })?;
    let local: SocketAddr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    eprintln!("listening on http://{local}");
    serve_on(listener, engine, config, shutdown_signal()).await
}

/// Serves on a bound listener until `shutdown` resolves, then lets open requests finish for
/// up to `shutdown_grace`. Connections get `header_timeout`, `max_connections` and the rest
/// of [`ServerConfig`]'s limits.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    engine: Engine,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let conn = net::ConnLimits::from_config(&config);
    let app = router(engine, config);
    net::serve_connections(listener, app, conn, shutdown).await;
    Ok(())
}

/// Why the server could not start serving. (The cause is part of each message and
/// deliberately not `source`: callers print the error chain, which would show it twice.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address could not be bound (in use, not allowed, not an address of this host).
    #[error("binding {addr}: {error}")]
    Bind {
        /// The `host:port` asked for.
        addr: String,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("reading the bound address: {0}")]
    LocalAddr(std::io::Error),
    /// The tokio runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// [`serve`] on a runtime of its own, for callers that are not async (the CLI).
pub fn serve_blocking(engine: Engine, config: ServerConfig) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ember-http")
        .build()
        .map_err(ServeError::Runtime)?;
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
