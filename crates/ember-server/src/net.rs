//! The accept loop. Written on hyper directly rather than `axum::serve`, which sets no timer
//! (so no header timeout) and has no connection limit: a few hundred half-open connections
//! used to hold every descriptor and `/health` stopped answering.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;

use crate::ServerConfig;
use crate::limits::{HYPER_MAX_HEAD_BYTES, HYPER_MAX_HEADERS};

/// Descriptors kept free for the model file, the listener and the process's own use.
const RESERVED_FDS: usize = 64;

pub struct ConnLimits {
    pub header_timeout: Duration,
    /// How long a write may wait for the client to read (a client that stops reading a
    /// stream would otherwise hold its connection for good).
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl ConnLimits {
    pub fn from_config(config: &ServerConfig) -> Self {
        let mut max_connections = config.max_connections.max(1);
        // More connections than descriptors would make `accept` fail for everyone, `/health`
        // included; stay under the soft limit.
        if let Some(fds) = open_files_limit() {
            let fit = fds.saturating_sub(RESERVED_FDS).max(1);
            if max_connections > fit {
                eprintln!(
                    "warning: --max-connections {max_connections} is more than this process's \
                     open-file limit allows ({fds}); using {fit} (raise it with `ulimit -n`)"
                );
                max_connections = fit;
            }
        }
        Self {
            header_timeout: config.header_timeout,
            write_timeout: config.body_timeout,
            max_connections,
            shutdown_grace: config.shutdown_grace,
        }
    }
}

/// The soft `RLIMIT_NOFILE` from `/proc/self/limits` (Linux); `None` elsewhere.
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(HYPER_MAX_HEADERS)
        .max_buf_size(HYPER_MAX_HEAD_BYTES);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: wait for connections to close instead of
                    // spinning on the error.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.write_timeout));
        let service = TowerToHyperService::new(app.clone());
        let io = TokioIo::new(Box::pin(stream));
        let conn = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout, malformed head): nothing to do.
            let _ = conn.await;
            drop(permit);
        });
    }
    eprintln!(
        "shutting down: waiting up to {:?} for open requests",
        limits.shutdown_grace
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            eprintln!("shutdown: dropped the requests still open");
        }
    }
}

/// A 503 with a JSON body for a connection over the limit, then close. Bounded in time so
/// that refusing cannot itself pile up.
async fn refuse_busy(mut stream: TcpStream, max: usize) {
    let body = serde_json::json!({
        "error": {
            "message": format!("the server has {max} open connections, its limit (--max-connections); retry shortly"),
            "type": "server_error",
            "param": null,
            "code": "too_many_connections",
        }
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
