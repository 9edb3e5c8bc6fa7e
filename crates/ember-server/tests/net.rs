//! `ember serve`'s connection handling on a real socket (issue #14): slow or silent clients
//! are cut off by the header timeout, idle kept-alive connections too, and past the
//! connection limit a new client gets a JSON 503 while `/health` keeps answering once the
//! silent ones are gone.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::loaded::LoadedModel;
use ember_server::{ServerConfig, serve_on};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = match std::env::var_os("EMBER_TEST_SMOLLM2") {
                Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
                _ => ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("pull SmolLM2"),
            };
            let model = LoadedModel::open(&path, &ember_models::default_device()).expect("load");
            Engine::start(Arc::new(model), EngineConfig::new(1, 128)).expect("start engine")
        })
        .clone()
}

/// Serves with `config` on a free loopback port; the server stops when the test's runtime
/// ends.
async fn start(config: ServerConfig) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_on(listener, engine(), config, std::future::pending()));
    addr
}

fn config(header_timeout_ms: u64, max_connections: usize) -> ServerConfig {
    let mut c = ServerConfig::new("smollm2");
    c.header_timeout = Duration::from_millis(header_timeout_ms);
    c.max_connections = max_connections;
    c
}

/// Reads until the peer closes (or `limit` passes); returns what arrived and whether it
/// closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

async fn health(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    read_until_closed(&mut s, Duration::from_secs(10)).await.0
}

#[tokio::test]
async fn silent_and_slow_clients_are_cut_off() {
    let addr = start(config(500, 64)).await;
    // Says nothing at all.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // Starts a request and never finishes its headers.
    let mut partial = TcpStream::connect(addr).await.expect("connect");
    partial
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .expect("write");
    // Gets an answer, then keeps the connection open doing nothing.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let t0 = Instant::now();
    for (name, s) in [
        ("silent", &mut silent),
        ("partial", &mut partial),
        ("idle", &mut idle),
    ] {
        let (_, closed) = read_until_closed(s, Duration::from_secs(10)).await;
        assert!(
            closed,
            "{name} connection still open after {:?}",
            t0.elapsed()
        );
    }
    let (reply, _) = {
        let mut again = TcpStream::connect(addr).await.expect("connect");
        again
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        read_until_closed(&mut again, Duration::from_secs(10)).await
    };
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn connection_limit_answers_json_503_and_recovers() {
    let addr = start(config(1000, 4)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = health(addr).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("application/json"), "{reply}");
    assert!(reply.contains("\"too_many_connections\""), "{reply}");
    // The silent connections time out and free their places.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = health(addr).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    drop(held);
}

/// The scenario: 150 half-open connections must not stop `/health` (they used to
/// hold every descriptor of a 128-descriptor process).
#[tokio::test]
async fn half_open_connections_do_not_block_health() {
    let addr = start(config(10_000, 256)).await;
    let mut held = Vec::new();
    for _ in 0..150 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(b"GET /health HTTP/1.1\r\n").await;
        held.push(s);
    }
    let reply = health(addr).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"running\""), "{reply}");
}
