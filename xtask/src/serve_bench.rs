//! `cargo xtask bench-serve`: Ember's server against llama-server under concurrent streams.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::{DEFAULT_MODEL, best_median, llama_bin};

/// A server process, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `cmd` (its stdio as the caller set it) and waits until `/health` answers; fails at
/// once when the process exits first (pointing at `log`, where its stderr went, if given).
pub(crate) fn start(mut cmd: Command, port: u16, what: &str, log: Option<&Path>) -> Result<Server> {
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let mut server = Server { child, port };
    let t0 = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait()? {
            let see = log.map_or(String::new(), |l| format!("; its log: {}", l.display()));
            bail!("{what} exited ({status}) before answering /health{see}");
        }
        let ok = ureq::get(&format!("http://127.0.0.1:{port}/health"))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok();
        if ok {
            return Ok(server);
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{what} did not become healthy on port {port}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One streaming completion's tokens and when they arrived.
struct Stream {
    /// Sent the request.
    start: Instant,
    /// The first and the last token (`None` when no token came).
    first: Option<Instant>,
    last: Instant,
    /// Times between consecutive tokens.
    gaps: Vec<f64>,
    tokens: usize,
}

fn stream_once(port: u16, prompt: &str, tokens: usize, temperature: f64) -> Result<Stream> {
    let t0 = Instant::now();
    let resp = ureq::post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .timeout(Duration::from_secs(600))
        .send_json(json!({
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": temperature,
            "ignore_eos": true,
            "stream": true,
        }))
        .context("completion request")?;
    let mut first = None;
    let mut last = t0;
    let mut gaps = Vec::new();
    let mut n = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        let has_text = v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty());
        if !has_text {
            continue;
        }
        let now = Instant::now();
        n += 1;
        match first {
            None => first = Some(now),
            Some(_) => gaps.push(now.duration_since(last).as_secs_f64()),
        }
        last = now;
    }
    Ok(Stream {
        start: t0,
        first,
        last,
        gaps,
        tokens: n,
    })
}

struct RunResult {
    /// All streamed tokens over the wall time (prompt processing included).
    tokens_per_s: f64,
    /// The decode rate: tokens after each stream's first, over the span from the earliest
    /// first token to the latest last one (prompt processing excluded; for one stream, one
    /// over the mean time per output token).
    decode_per_s: f64,
    ttft: Vec<f64>,
    tpot: Vec<f64>,
}

/// `clients` concurrent streams, measured both as wall-clock throughput and as decode rate.
fn run_clients(port: u16, clients: usize, tokens: usize, temperature: f64) -> Result<RunResult> {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let prompt = format!(
                "Client {i} asks: write a long story about a lighthouse keeper and the sea."
            );
            std::thread::spawn(move || stream_once(port, &prompt, tokens, temperature))
        })
        .collect();
    let mut total = 0;
    let (mut ttft, mut tpot) = (Vec::new(), Vec::new());
    let (mut decoded, mut span) = (0, None::<(Instant, Instant)>);
    for h in handles {
        let s = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        total += s.tokens;
        ttft.push(
            s.first
                .map_or(f64::NAN, |f| f.duration_since(s.start).as_secs_f64()),
        );
        tpot.extend(s.gaps);
        if let Some(first) = s.first {
            decoded += s.tokens - 1;
            span = Some(span.map_or((first, s.last), |(a, b)| (a.min(first), b.max(s.last))));
        }
    }
    let decode_per_s = span.map_or(f64::NAN, |(a, b)| {
        decoded as f64 / b.duration_since(a).as_secs_f64()
    });
    Ok(RunResult {
        tokens_per_s: total as f64 / t0.elapsed().as_secs_f64(),
        decode_per_s,
        ttft,
        tpot,
    })
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF path or a manifest model name.
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Concurrent streams (and both servers' parallel slots).
    #[arg(short, long, default_value_t = 8)]
    pub clients: usize,
    /// Tokens generated per stream (`ignore_eos`).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub tokens: usize,
    /// Interleaved rounds.
    #[arg(short, long, default_value_t = 3)]
    pub rounds: usize,
    /// Threads for both servers.
    #[arg(short, long, default_value_t = 2)]
    pub threads: usize,
    /// Sampling temperature of every request (0: greedy; above 0 each server samples with
    /// its default chain, llama.cpp's top-k 40, top-p 0.95, min-p 0.05).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// An ember binary to run instead of building target/release/ember (to compare builds
    /// in turn, as `cargo xtask soak --ember` does).
    #[arg(long)]
    pub ember: Option<std::path::PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let Args {
        model,
        clients,
        tokens,
        rounds,
        threads,
        temperature,
        ember: ember_path,
    } = a;
    if clients == 0 {
        bail!("--clients must be at least 1");
    }
    let threads = threads.to_string();
    let ctx = 512;

    let path = ember_hub::resolve(&model)?;
    let model_arg = path.to_string_lossy().to_string();
    let bin = llama_bin()?;
    let ember_bin = match ember_path {
        Some(p) if p.exists() => p,
        Some(p) => bail!("--ember {}: no such file", p.display()),
        None => crate::build_ember()?,
    };

    let ember_port = free_port()?;
    let mut ember = Command::new(ember_bin);
    ember.stdout(Stdio::null()).stderr(Stdio::null());
    ember.env("RAYON_NUM_THREADS", &threads).args([
        "serve",
        "-m",
        &model_arg,
        "--port",
        &ember_port.to_string(),
        "--parallel",
        &clients.to_string(),
        "--ctx-size",
        &ctx.to_string(),
    ]);
    let llama_port = free_port()?;
    let mut llama = Command::new(bin.join("llama-server"));
    llama.stdout(Stdio::null()).stderr(Stdio::null());
    llama.args([
        "-m",
        &model_arg,
        "--port",
        &llama_port.to_string(),
        "-np",
        &clients.to_string(),
        "-c",
        &(ctx * clients).to_string(),
        "-t",
        &threads,
        "-tb",
        &threads,
        // This host reports AMX and llama.cpp's AMX matmul crashes on batches here.
        "--no-repack",
    ]);
    let servers = [
        ("ember", start(ember, ember_port, "ember serve", None)?),
        (
            "llama-server",
            start(llama, llama_port, "llama-server", None)?,
        ),
    ];
    // Warm up both (page cache, first-call costs).
    for (_, s) in &servers {
        run_clients(s.port, 1, 8, temperature)?;
    }

    type Key = (&'static str, usize);
    let mut rate: std::collections::BTreeMap<Key, Vec<f64>> = Default::default();
    let mut decode: std::collections::BTreeMap<Key, Vec<f64>> = Default::default();
    let mut ttft: std::collections::BTreeMap<Key, Vec<f64>> = Default::default();
    let mut tpot: std::collections::BTreeMap<Key, Vec<f64>> = Default::default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let order: Vec<&(&str, Server)> = if round % 2 == 0 {
            servers.iter().collect()
        } else {
            servers.iter().rev().collect()
        };
        for (name, s) in order {
            for n in [1, clients] {
                let r = run_clients(s.port, n, tokens, temperature)?;
                rate.entry((name, n)).or_default().push(r.tokens_per_s);
                decode.entry((name, n)).or_default().push(r.decode_per_s);
                ttft.entry((name, n)).or_default().extend(r.ttft);
                tpot.entry((name, n)).or_default().extend(r.tpot);
            }
        }
    }
    println!(
        "model {model}, {threads} threads, {tokens} tokens per stream, {rounds} interleaved rounds, ctx {ctx} per sequence"
    );
    println!();
    println!(
        "| server | streams | tokens/s best | tokens/s median | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | decode t/s best | decode t/s median |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut medians = std::collections::BTreeMap::new();
    let mut decode_medians = std::collections::BTreeMap::new();
    for (key, xs) in rate.iter_mut() {
        let (best, median) = best_median(xs);
        medians.insert(*key, median);
        let (d_best, d_median) = decode
            .get_mut(key)
            .map_or((f64::NAN, f64::NAN), |v| best_median(v));
        decode_medians.insert(*key, d_median);
        let t = ttft.get_mut(key).map_or(&mut [][..], |v| &mut v[..]);
        let (t50, t99) = (percentile(t, 0.5) * 1e3, percentile(t, 0.99) * 1e3);
        let p = tpot.get_mut(key).map_or(&mut [][..], |v| &mut v[..]);
        let (p50, p99) = (percentile(p, 0.5) * 1e3, percentile(p, 0.99) * 1e3);
        println!(
            "| {} | {} | {best:.1} | {median:.1} | {t50:.0} | {t99:.0} | {p50:.1} | {p99:.1} | {d_best:.1} | {d_median:.1} |",
            key.0, key.1
        );
    }
    let get = |k: Key| medians.get(&k).copied().unwrap_or(f64::NAN);
    println!();
    println!(
        "ember: {clients} streams / 1 stream = {:.2}x; ember / llama-server at {clients} streams = {:.2}x",
        get(("ember", clients)) / get(("ember", 1)),
        get(("ember", clients)) / get(("llama-server", clients)),
    );
    let dget = |k: Key| decode_medians.get(&k).copied().unwrap_or(f64::NAN);
    println!(
        "decode rate (prompt processing excluded): ember {clients} streams / 1 stream = {:.2}x; ember / llama-server at {clients} streams = {:.2}x",
        dget(("ember", clients)) / dget(("ember", 1)),
        dget(("ember", clients)) / dget(("llama-server", clients)),
    );
    Ok(())
}
