//! `cargo xtask soak`: a real `ember serve` under the load of issue #14. In rounds, `--clients`
//! (64) streaming clients start at once, alternating `/v1/chat/completions` and
//! `/v1/completions`; every other one hangs up after a few chunks. The server runs with
//! `--parallel 8` and a KV budget far below 8 full contexts, so requests queue and sequences are
//! preempted, and a `--max-queue` below the client count, so some requests get the documented
//! 503. After each round, once the server is idle, its `/metrics` must show no KV block in use
//! and its RSS is sampled. The soak fails (non-zero exit) when
//! - a KV block is still in use after a round (a leak: every request has ended by then),
//! - any request fails other than with the documented 429 or 503 (another status, a transport
//!   error, an error event in the stream, a stream that ends without `[DONE]`), or the server
//!   exits,
//! - RSS keeps growing (see [`rss_verdict`]).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::serve_bench::{free_port, start};
use crate::{DEFAULT_MODEL, root, utc_minute};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF path or a manifest model name.
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Concurrent streaming clients per round; every other one disconnects mid-stream.
    #[arg(short, long, default_value_t = 64)]
    pub clients: usize,
    /// Keep starting rounds for this long (`150`, `150s`, `2m`); the round in progress
    /// finishes, and at least `--warmup` + 4 rounds run so that the RSS trend can be judged.
    #[arg(long, default_value = "2m", value_parser = parse_duration, conflicts_with = "rounds")]
    pub duration: Duration,
    /// Run exactly this many rounds instead of `--duration` (at least `--warmup` + 4).
    #[arg(short, long)]
    pub rounds: Option<usize>,
    /// Threads of the server (`RAYON_NUM_THREADS`).
    #[arg(short, long, default_value_t = 2)]
    pub threads: usize,
    /// The server's `--parallel`.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// The server's `--ctx-size`.
    #[arg(long, default_value_t = 256)]
    pub ctx_size: usize,
    /// The server's `--kv-budget-mib`: small, so that sequences are preempted.
    #[arg(long, default_value_t = 12.0)]
    pub kv_budget_mib: f64,
    /// The server's `--max-queue`: below the client count, so that some requests get 503.
    #[arg(long, default_value_t = 48)]
    pub max_queue: usize,
    /// `max_tokens` of each request (`ignore_eos`, so the clients that stay get all of them).
    #[arg(short = 'n', long, default_value_t = 64)]
    pub tokens: usize,
    /// A disconnecting client hangs up after 1 to this many chunks (varied by client).
    #[arg(long, default_value_t = 6)]
    pub disconnect_after: usize,
    /// Rounds not judged for RSS growth (allocator pools, page cache, first-use buffers).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// RSS growth over the judged rounds that counts as growing, in MiB.
    #[arg(long, default_value_t = 16)]
    pub rss_tolerance_mib: u64,
    /// The ember binary (default `target/release/ember`, built with cargo if missing).
    #[arg(long)]
    pub ember: Option<PathBuf>,
    /// Build `target/release/ember` with cargo first even if it exists.
    #[arg(long)]
    pub build: bool,
}

/// `150`, `150s`, `2m`, `1h`: a duration in whole seconds, minutes or hours.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: use seconds (150, 150s), 2m or 1h"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m or h)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// How one client's request ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// `[DONE]` arrived; the completion tokens the usage chunk reported.
    Done(u64),
    /// Hung up on purpose after this many text chunks.
    Disconnected(u64),
    /// The documented refusal under load (429 or 503).
    Refused(u16),
    /// Anything else.
    Failed(String),
}

struct Client {
    port: u16,
    index: usize,
    round: usize,
    chat: bool,
    /// Hang up after this many data events.
    hang_up_after: Option<usize>,
    tokens: usize,
}

const SYSTEM: &str = "You are a helpful assistant who answers in plain, complete sentences.";

const TOPICS: [&str; 8] = [
    "a lighthouse keeper and the sea",
    "how bread rises",
    "the history of the bicycle",
    "a cat who learns to read",
    "why the sky is blue",
    "building a stone bridge",
    "a journey across a desert",
    "the life of a honeybee",
];

impl Client {
    fn body(&self) -> Value {
        let topic = TOPICS[(self.index + self.round) % TOPICS.len()];
        let ask = format!(
            "Round {}, client {}: write a long story about {topic}.",
            self.round, self.index
        );
        let mut body = json!({
            "max_tokens": self.tokens,
            "temperature": 0.8,
            "seed": (self.round * 1000 + self.index) as u64,
            "ignore_eos": true,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if self.chat {
            body["messages"] = json!([
                { "role": "system", "content": SYSTEM },
                { "role": "user", "content": ask },
            ]);
        } else {
            body["prompt"] = json!(format!("{SYSTEM}\n{ask}\n"));
        }
        body
    }

    fn run(&self) -> Outcome {
        match self.stream() {
            Ok(o) => o,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    }

    fn stream(&self) -> Result<Outcome> {
        let path = if self.chat {
            "chat/completions"
        } else {
            "completions"
        };
        let url = format!("http://127.0.0.1:{}/v1/{path}", self.port);
        let resp = match ureq::post(&url)
            .timeout(Duration::from_secs(600))
            .send_json(self.body())
        {
            Ok(r) => r,
            Err(ureq::Error::Status(code @ (429 | 503), _)) => return Ok(Outcome::Refused(code)),
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                bail!("{path}: status {code}: {body}");
            }
            Err(e) => bail!("{path}: {e}"),
        };
        let (mut events, mut text_chunks) = (0, 0);
        // Dropping the reader closes the connection: ureq only pools a fully read body.
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.with_context(|| format!("{path}: reading the stream"))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data.trim() == "[DONE]" {
                bail!("{path}: [DONE] before the usage chunk");
            }
            let v: Value = serde_json::from_str(data)
                .with_context(|| format!("{path}: a chunk is not JSON: {data}"))?;
            if let Some(e) = v.get("error") {
                bail!("{path}: error event in the stream: {e}");
            }
            events += 1;
            let choice = &v["choices"][0];
            let text = if self.chat {
                &choice["delta"]["content"]
            } else {
                &choice["text"]
            };
            if text.as_str().is_some_and(|t| !t.is_empty()) {
                text_chunks += 1;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                return Ok(Outcome::Done(n));
            }
            if self.hang_up_after.is_some_and(|k| events >= k) {
                return Ok(Outcome::Disconnected(text_chunks));
            }
        }
        bail!("{path}: the stream ended without a usage chunk and [DONE]")
    }
}

/// The value of an unlabelled sample in Prometheus text (`name 12`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == name).then(|| it.next()?.parse().ok())?
    })
}

struct Engine {
    running: f64,
    waiting: f64,
    kv_used: f64,
    kv_total: f64,
    generated: f64,
    preemptions: f64,
}

fn scrape(port: u16) -> Result<Engine> {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(10))
        .call()
        .context("GET /metrics")?
        .into_string()?;
    let get = |name: &str| {
        metric(&text, name).with_context(|| format!("/metrics has no {name}:\n{text}"))
    };
    Ok(Engine {
        running: get("ember_requests_running")?,
        waiting: get("ember_requests_waiting")?,
        kv_used: get("ember_kv_cache_used_blocks")?,
        kv_total: get("ember_kv_cache_total_blocks")?,
        generated: get("ember_generated_tokens_total")?,
        preemptions: get("ember_preemptions_total")?,
    })
}

/// Waits until no request runs or waits (a hung-up client's request ends when the server next
/// writes to it) and returns the engine's state then, or the last one seen after `limit`.
fn settle(port: u16, limit: Duration) -> Result<(Engine, bool)> {
    let t0 = Instant::now();
    loop {
        let e = scrape(port)?;
        let idle = e.running == 0.0 && e.waiting == 0.0 && e.kv_used == 0.0;
        if idle || t0.elapsed() > limit {
            return Ok((e, idle));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Resident set size of a process, in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// The RSS criterion. The samples are taken after each round with the server idle. The first
/// `warmup` rounds are not judged: the allocator's arenas, the KV pool's pages and first-use
/// buffers grow to their working size there. Of the rest, RSS "keeps growing" when it rose by
/// more than `tolerance` from the first judged sample to the last AND was still rising in the
/// second half of them (by more than half the tolerance). A leak grows every round and so fails
/// both; allocator noise goes up and down, and a one-off step that then levels off fails only
/// the first. Needs at least 4 judged samples.
fn rss_verdict(samples_kib: &[u64], warmup: usize, tolerance_kib: u64) -> Result<(), String> {
    let judged = samples_kib.get(warmup..).unwrap_or_default();
    if judged.len() < 4 {
        return Err(format!(
            "{} rounds after the {warmup} warm-up rounds: at least 4 are needed to judge the RSS trend",
            judged.len()
        ));
    }
    let (first, mid, last) = (
        judged[0],
        judged[judged.len() / 2],
        judged[judged.len() - 1],
    );
    let total = last.saturating_sub(first);
    let late = last.saturating_sub(mid);
    if total > tolerance_kib && 2 * late > tolerance_kib {
        return Err(format!(
            "RSS kept growing after warm-up: {} -> {} -> {} MiB (first judged round, middle, last), \
             +{} MiB in all and +{} MiB in the second half (tolerance {} MiB)",
            first / 1024,
            mid / 1024,
            last / 1024,
            total / 1024,
            late / 1024,
            tolerance_kib / 1024,
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    done: usize,
    disconnected: usize,
    refused_429: usize,
    refused_503: usize,
    failed: Vec<String>,
    /// Tokens the clients received (usage of completed streams, text chunks of the others).
    streamed: u64,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Done(n) => {
                self.done += 1;
                self.streamed += n;
            }
            Outcome::Disconnected(n) => {
                self.disconnected += 1;
                self.streamed += n;
            }
            Outcome::Refused(429) => self.refused_429 += 1,
            Outcome::Refused(_) => self.refused_503 += 1,
            Outcome::Failed(e) => self.failed.push(e),
        }
    }
}

fn ember_binary(a: &Args) -> Result<PathBuf> {
    let root = root().canonicalize().context("workspace root")?;
    let default = root.join("target/release/ember");
    let path = a.ember.clone().unwrap_or_else(|| default.clone());
    if a.build || (a.ember.is_none() && !path.exists()) {
        eprintln!("building target/release/ember (cargo build --release -p ember-cli)");
        let status = Command::new("cargo")
            .args(["build", "--release", "-p", "ember-cli"])
            .current_dir(&root)
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("building ember failed; fix the build or pass --ember PATH to an ember binary");
        }
    }
    if let Some(p) = &a.ember
        && !p.exists()
    {
        bail!("--ember {}: no such file", p.display());
    }
    if !path.exists() {
        bail!(
            "no ember binary at {}: build it (cargo build --release -p ember-cli) or pass --ember PATH",
            path.display()
        );
    }
    Ok(path)
}

pub fn run(a: Args) -> Result<()> {
    if a.clients < 2 {
        bail!("--clients must be at least 2 (half of them disconnect)");
    }
    if a.tokens == 0 || a.disconnect_after == 0 || a.parallel == 0 {
        bail!("--tokens, --disconnect-after and --parallel must be at least 1");
    }
    let min_rounds = a.warmup + 4;
    if let Some(r) = a.rounds
        && r < min_rounds
    {
        bail!("--rounds {r} is too few: the RSS trend needs --warmup + 4 = {min_rounds} rounds");
    }
    let ember = ember_binary(&a)?;
    let model = ember_hub::resolve(&a.model)?;
    let log_dir = root()
        .canonicalize()
        .context("workspace root")?
        .join("target/soak");
    std::fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join("server.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let port = free_port()?;
    let mut cmd = Command::new(&ember);
    cmd.env("RAYON_NUM_THREADS", a.threads.to_string())
        .arg("serve")
        .arg("-m")
        .arg(&model)
        .args(["--port", &port.to_string()])
        .args(["--parallel", &a.parallel.to_string()])
        .args(["--ctx-size", &a.ctx_size.to_string()])
        .args(["--kv-budget-mib", &a.kv_budget_mib.to_string()])
        .args(["--max-queue", &a.max_queue.to_string()])
        .stdout(Stdio::null())
        .stderr(log);
    let started = utc_minute(SystemTime::now());
    let mut server = start(cmd, port, "ember serve", Some(&log_path))?;
    let pid = server.child.id();
    let built = std::fs::metadata(&ember)
        .and_then(|m| m.modified())
        .map_or_else(|_| "?".to_string(), utc_minute);
    println!(
        "soak: {} (built {built}), model {}, {} clients per round (half disconnect after 1-{} chunks), \
         --parallel {} --ctx-size {} --kv-budget-mib {} --max-queue {}, {} tokens per request, \
         {} threads, started {started}",
        ember.display(),
        model.display(),
        a.clients,
        a.disconnect_after,
        a.parallel,
        a.ctx_size,
        a.kv_budget_mib,
        a.max_queue,
        a.tokens,
        a.threads,
    );
    let idle = scrape(port)?;
    let rss0 = rss_kib(pid)?;
    println!("server idle: RSS {:.1} MiB", rss0 as f64 / 1024.0);
    println!();
    println!(
        "| round | ok | disconnected | 429 | 503 | errors | streamed tokens | streamed t/s | generated t/s (server) | preemptions | KV blocks used after | RSS MiB after |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );

    let t_start = Instant::now();
    let mut total = Tally::default();
    let mut rss = Vec::new();
    let mut problems = Vec::new();
    let (mut generated, mut preemptions) = (idle.generated, idle.preemptions);
    let mut wall = Duration::ZERO;
    let mut round = 0;
    loop {
        let enough = match a.rounds {
            Some(r) => round >= r,
            None => round >= min_rounds && t_start.elapsed() >= a.duration,
        };
        if enough {
            break;
        }
        let t0 = Instant::now();
        let handles: Vec<_> = (0..a.clients)
            .map(|index| {
                let client = Client {
                    port,
                    index,
                    round,
                    chat: index % 4 < 2,
                    hang_up_after: (index % 2 == 1).then(|| 1 + (index / 2) % a.disconnect_after),
                    tokens: a.tokens,
                };
                std::thread::spawn(move || client.run())
            })
            .collect();
        let mut tally = Tally::default();
        for h in handles {
            tally.add(
                h.join()
                    .unwrap_or_else(|_| Outcome::Failed("client thread panicked".into())),
            );
        }
        let elapsed = t0.elapsed();
        wall += elapsed;
        let (after, settled) = settle(port, Duration::from_secs(30))?;
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "ember serve exited ({status}) during round {round}; its log: {}",
                log_path.display()
            );
        }
        let r = rss_kib(pid)?;
        rss.push(r);
        let gen_delta = after.generated - generated;
        let pre_delta = after.preemptions - preemptions;
        (generated, preemptions) = (after.generated, after.preemptions);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.1} |",
            round + 1,
            tally.done,
            tally.disconnected,
            tally.refused_429,
            tally.refused_503,
            tally.failed.len(),
            tally.streamed,
            tally.streamed as f64 / elapsed.as_secs_f64(),
            gen_delta / elapsed.as_secs_f64(),
            pre_delta,
            after.kv_used,
            r as f64 / 1024.0,
        );
        if !settled {
            problems.push(format!(
                "after round {}: 30 s after the last client ended, the server still shows {} running, \
                 {} waiting, {} KV blocks used (a leak: every request has ended)",
                round + 1,
                after.running,
                after.waiting,
                after.kv_used
            ));
        }
        for e in &tally.failed {
            problems.push(format!("round {}: {e}", round + 1));
        }
        total.done += tally.done;
        total.disconnected += tally.disconnected;
        total.refused_429 += tally.refused_429;
        total.refused_503 += tally.refused_503;
        total.streamed += tally.streamed;
        total.failed.extend(tally.failed);
        round += 1;
        // A leak or an error already decides the verdict; later rounds only repeat it.
        if !problems.is_empty() {
            break;
        }
    }
    let end = scrape(port)?;
    drop(server);

    let judged = rss.get(a.warmup..).unwrap_or_default();
    let slope = match judged {
        [first, .., last] => (*last as f64 - *first as f64) / 1024.0 / (judged.len() - 1) as f64,
        _ => f64::NAN,
    };
    let slope = if slope.is_nan() {
        "n/a".to_string()
    } else {
        format!("{slope:+.2}")
    };
    println!();
    println!(
        "{round} rounds in {:.0} s: {} requests completed, {} disconnected on purpose, {} got 429, {} got 503, {} failed",
        t_start.elapsed().as_secs_f64(),
        total.done,
        total.disconnected,
        total.refused_429,
        total.refused_503,
        total.failed.len()
    );
    println!(
        "streamed {} tokens, {:.1} tokens/s over the rounds' wall time; the server generated {} tokens ({:.1}/s, recomputation after preemption and tokens of hung-up clients included), {} preemptions",
        total.streamed,
        total.streamed as f64 / wall.as_secs_f64(),
        end.generated - idle.generated,
        (end.generated - idle.generated) / wall.as_secs_f64(),
        end.preemptions - idle.preemptions,
    );
    println!(
        "RSS: {:.1} MiB idle before, {} MiB after each round; {slope} MiB per round after {} warm-up rounds",
        rss0 as f64 / 1024.0,
        rss.iter()
            .map(|r| format!("{:.1}", *r as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", "),
        a.warmup
    );
    println!(
        "KV blocks after the soak: {} used of {}; server log: {}",
        end.kv_used,
        end.kv_total,
        log_path.display()
    );
    if end.preemptions == idle.preemptions {
        eprintln!(
            "warning: no sequence was preempted: the KV budget was not under pressure (lower --kv-budget-mib or raise --tokens)"
        );
    }
    if problems.is_empty()
        && let Err(e) = rss_verdict(&rss, a.warmup, a.rss_tolerance_mib * 1024)
    {
        problems.push(e);
    }
    if !problems.is_empty() {
        for p in problems.iter().take(20) {
            eprintln!("FAIL: {p}");
        }
        if problems.len() > 20 {
            eprintln!("... and {} more", problems.len() - 20);
        }
        bail!(
            "soak failed after round {round}: {} problem(s) (the soak stops at the first failing round)",
            problems.len()
        );
    }
    println!("soak passed: no KV block leaked, no request failed outside 429/503, RSS flat");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("150"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("150s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "m", "2 minutes", "1.5m", "-3", "2d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn metric_reads_unlabelled_samples() {
        let text = "# HELP ember_kv_cache_used_blocks KV\n# TYPE ember_kv_cache_used_blocks gauge\n\
                    ember_kv_cache_used_blocks 3\nember_kv_cache_used_blocks_extra 9\n\
                    ember_generated_tokens_total 1234\n# EOF\n";
        assert_eq!(metric(text, "ember_kv_cache_used_blocks"), Some(3.0));
        assert_eq!(metric(text, "ember_generated_tokens_total"), Some(1234.0));
        assert_eq!(metric(text, "ember_kv_cache"), None);
    }

    const MIB: u64 = 1024;

    #[test]
    fn rss_flat_or_noisy_passes() {
        let s = [300, 380, 400, 404, 398, 401, 405, 399].map(|m| m * MIB);
        assert_eq!(rss_verdict(&s, 2, 16 * MIB), Ok(()));
    }

    #[test]
    fn rss_step_that_levels_off_passes() {
        let s = [300, 380, 400, 430, 431, 430, 432, 431].map(|m| m * MIB);
        assert_eq!(rss_verdict(&s, 2, 16 * MIB), Ok(()));
    }

    #[test]
    fn rss_steady_growth_fails() {
        // 5 MiB a round: 25 MiB over the judged rounds, 15 MiB in their second half.
        let s = [300, 380, 400, 405, 410, 415, 420, 425].map(|m| m * MIB);
        let e = rss_verdict(&s, 2, 16 * MIB).unwrap_err();
        assert!(e.contains("kept growing"), "{e}");
    }

    #[test]
    fn rss_needs_four_judged_rounds() {
        let s = [300, 380, 400, 400, 400].map(|m| m * MIB);
        assert!(
            rss_verdict(&s, 2, 16 * MIB)
                .unwrap_err()
                .contains("at least 4")
        );
    }

    #[test]
    fn outcomes_are_tallied() {
        let mut t = Tally::default();
        for o in [
            Outcome::Done(64),
            Outcome::Disconnected(3),
            Outcome::Refused(429),
            Outcome::Refused(503),
            Outcome::Failed("status 500".into()),
        ] {
            t.add(o);
        }
        assert_eq!(
            (
                t.done,
                t.disconnected,
                t.refused_429,
                t.refused_503,
                t.streamed
            ),
            (1, 1, 1, 1, 67)
        );
        assert_eq!(t.failed, ["status 500"]);
    }
}
