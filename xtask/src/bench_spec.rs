//! `cargo xtask bench-spec`: speculative decoding against plain decoding, one stream and many.
//!
//! **One stream.** On each model x workload, in interleaved rounds (each round runs every
//! configuration once, the order rotated from round to round): `ember generate --temperature 0
//! --ignore-eos --json` with `--spec none` (plain), `lookup`, `self` and `draft` with the model
//! as its own draft (the only draft model with the same vocabulary there is: an upper bound on
//! acceptance and a worst case for speed, since the draft costs as much as the target), and
//! llama.cpp's `llama-lookup` on the same file, prompt, thread count and draft length. It
//! reports decode tokens/s (`predicted_n / predicted_ms` of `--json`'s timings; llama-lookup's
//! own "decoded N tokens in S seconds"), best and median, the acceptance rate, tokens per
//! forward pass, the speedup over plain and whether the tokens are plain's, token for token
//! (greedy speculation must not change them: a difference is flagged loudly).
//!
//! **Many streams.** `ember serve --parallel S --spec none|lookup|self` and S concurrent
//! non-streaming `/v1/completions` requests (the same prompt, `ignore_eos`, greedy), for each
//! S of `--streams`: aggregate generated tokens/s over the wall time, and the decode-only
//! aggregate from the responses' `timings`.
//!
//! Workloads are files in `xtask/bench-spec/`: `NAME.txt` is a user message, put into the
//! model's chat markup here (ChatML with the template's default system message, or Gemma's
//! turns); `NAME.raw.txt` is given to the model as it is.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::serve_bench::{free_port, start};
use crate::{best_median, llama_bin, root, utc_minute};

const DEFAULT_MODELS: &str = "smollm2-135m-instruct-q4_1,gemma3-270m-q4_k_m";
const WORKLOAD_DIR: &str = "xtask/bench-spec";
/// Workloads whose output is free generation (the target there: no proposer below 0.9x).
const FREE_WORKLOADS: &[&str] = &["story", "once"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Models: GGUF paths or manifest names (comma-separated or repeated).
    #[arg(short, long, value_delimiter = ',', default_value = DEFAULT_MODELS)]
    pub model: Vec<String>,
    /// Interleaved rounds (each runs every configuration once, the order rotated).
    #[arg(short, long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokens generated per run (`--ignore-eos`: every run generates exactly this many).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub n: usize,
    /// Threads for both engines (`RAYON_NUM_THREADS` for ember, `-t`/`-tb` for llama.cpp).
    #[arg(short, long, default_value_t = 2)]
    pub threads: usize,
    /// Workloads of the one-stream table: files in xtask/bench-spec/ (NAME.txt or NAME.raw.txt).
    #[arg(
        short,
        long,
        value_delimiter = ',',
        default_value = "rewrite,extract,story,once"
    )]
    pub workloads: Vec<String>,
    /// Proposers compared with plain decoding (draft: the model as its own draft model).
    #[arg(
        short,
        long,
        value_delimiter = ',',
        default_value = "lookup,self,draft",
        value_parser = clap::builder::PossibleValuesParser::new(["lookup", "self", "draft"])
    )]
    pub proposers: Vec<String>,
    /// Longest proposal (ember's --draft-max, llama-lookup's --spec-draft-n-max).
    #[arg(long, default_value_t = 8)]
    pub draft_max: usize,
    /// Leave out llama.cpp's llama-lookup.
    #[arg(long)]
    pub skip_llamacpp: bool,
    /// Concurrent streams of the aggregate-throughput runs (`ember serve`); 0 skips them.
    #[arg(short, long, value_delimiter = ',', default_value = "1,4,8")]
    pub streams: Vec<usize>,
    /// Workloads of the aggregate-throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "rewrite,story")]
    pub serve_workloads: Vec<String>,
    /// Leave out the one-stream runs (only the aggregate-throughput ones).
    #[arg(long)]
    pub skip_single: bool,
    /// Print one JSON object (every row of every table) instead of markdown tables.
    #[arg(long)]
    pub json: bool,
}

/// What runs: plain decoding, ember with a proposer, or llama.cpp's llama-lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Config {
    Plain,
    Lookup,
    SelfSpec,
    Draft,
    LlamaLookup,
}

impl Config {
    fn id(self) -> &'static str {
        match self {
            Config::Plain => "plain",
            Config::Lookup => "lookup",
            Config::SelfSpec => "self",
            Config::Draft => "draft",
            Config::LlamaLookup => "llama-lookup",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::Plain => "plain",
            Config::Lookup => "lookup",
            Config::SelfSpec => "self",
            Config::Draft => "draft (same model, upper bound)",
            Config::LlamaLookup => "llama.cpp llama-lookup",
        }
    }

    /// `ember --spec`'s value.
    fn spec(self) -> &'static str {
        match self {
            Config::Plain | Config::LlamaLookup => "none",
            Config::Lookup => "lookup",
            Config::SelfSpec => "self",
            Config::Draft => "draft",
        }
    }

    fn from_proposer(p: &str) -> Option<Config> {
        match p {
            "lookup" => Some(Config::Lookup),
            "self" => Some(Config::SelfSpec),
            "draft" => Some(Config::Draft),
            _ => None,
        }
    }
}

/// One generation's measurements.
#[derive(Clone, Debug, Default)]
pub(crate) struct Run {
    /// Decode tokens/s.
    pub(crate) tps: f64,
    pub(crate) predicted_n: u64,
    pub(crate) prompt_n: u64,
    pub(crate) drafted: u64,
    pub(crate) accepted: u64,
    /// Generated token ids (ember only).
    pub(crate) tokens: Vec<u64>,
    /// Generated text (for llama-lookup, what it printed after the prompt, when it could be
    /// told apart).
    pub(crate) text: Option<String>,
}

/// How a model's chat turn is written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Markup {
    /// `<|im_start|>role\n...<|im_end|>\n`, with the system message the template adds when
    /// the conversation has none.
    ChatMl { system: Option<String> },
    /// `<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n` (Gemma's files may
    /// carry no template: ember and llama.cpp fall back to this one).
    Gemma,
}

impl Markup {
    /// From the GGUF metadata that `ember inspect --json` prints.
    pub(crate) fn detect(meta: &Value) -> Option<Markup> {
        let template = meta["tokenizer.chat_template"].as_str().unwrap_or("");
        let arch = meta["general.architecture"].as_str().unwrap_or("");
        if template.contains("<|im_start|>") {
            return Some(Markup::ChatMl {
                system: default_system(template),
            });
        }
        if template.contains("<start_of_turn>")
            || (template.is_empty() && arch.starts_with("gemma"))
        {
            return Some(Markup::Gemma);
        }
        None
    }

    pub(crate) fn wrap(&self, user: &str) -> String {
        match self {
            Markup::ChatMl { system } => {
                let mut s = String::new();
                if let Some(sys) = system {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                s.push_str(&format!(
                    "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
                ));
                s
            }
            Markup::Gemma => {
                format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n")
            }
        }
    }
}

/// A literal default system message in a ChatML template (SmolLM2's: "You are a helpful AI
/// assistant named SmolLM, trained by Hugging Face"), if it has one.
fn default_system(template: &str) -> Option<String> {
    let at = template.find("<|im_start|>system")? + "<|im_start|>system".len();
    let rest = &template[at..];
    let rest = rest
        .strip_prefix("\\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let msg = &rest[..rest.find("<|im_end|>")?];
    // Quotes or Jinja in between: not a literal message (e.g. `' + message['content'] + '`).
    if msg.is_empty() || msg.contains(['{', '}', '\'', '"', '+']) {
        return None;
    }
    Some(msg.to_string())
}

pub(crate) struct Workload {
    pub(crate) name: String,
    /// The file's text: a user message, or (`raw`) the whole prompt.
    pub(crate) body: String,
    pub(crate) raw: bool,
}

pub(crate) fn load_workload(name: &str) -> Result<Workload> {
    let dir = root().join(WORKLOAD_DIR);
    let chat = dir.join(format!("{name}.txt"));
    let raw = dir.join(format!("{name}.raw.txt"));
    let (path, is_raw) = if chat.exists() {
        (chat, false)
    } else if raw.exists() {
        (raw, true)
    } else {
        let mut known: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| {
                    let n = e.ok()?.file_name().to_string_lossy().into_owned();
                    let stem = n.strip_suffix(".txt")?;
                    Some(stem.strip_suffix(".raw").unwrap_or(stem).to_string())
                })
                .collect()
            })
            .unwrap_or_default();
        known.sort();
        bail!(
            "no workload {name:?} in {} (there: {})",
            dir.display(),
            known.join(", ")
        );
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    // A file's final newline is the editor's, not the prompt's.
    let body = text.strip_suffix('\n').unwrap_or(&text).to_string();
    Ok(Workload {
        name: name.to_string(),
        body,
        raw: is_raw,
    })
}

/// A model under test and its prompts, one per workload name.
struct Model {
    name: String,
    path: PathBuf,
    prompts: BTreeMap<String, String>,
}

/// What every run needs.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) ember: PathBuf,
    pub(crate) llama: Option<PathBuf>,
    /// llama.cpp without weight repacking (its AMX path crashed on some hosts).
    pub(crate) no_repack: bool,
    pub(crate) n: usize,
    pub(crate) threads: usize,
    pub(crate) draft_max: usize,
    /// The draft model of [`Config::Draft`] (`None`: the target itself).
    pub(crate) draft: Option<PathBuf>,
}

impl Ctx {
    /// Context size: the longest workload prompt (about 1000 tokens) plus the generation.
    fn ctx_size(&self) -> usize {
        self.n + self.draft_max + 2048
    }
}

pub(crate) fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

pub(crate) fn ember_generate(ctx: &Ctx, model: &Path, prompt: &str, cfg: Config) -> Result<Run> {
    let path = model.to_string_lossy().to_string();
    let mut cmd = Command::new(&ctx.ember);
    cmd.env("RAYON_NUM_THREADS", ctx.threads.to_string())
        .args(["generate", "-m", &path, "--stdin", "-n"])
        .arg(ctx.n.to_string())
        .args(["--temperature", "0", "--ignore-eos", "--json", "--spec"])
        .arg(cfg.spec())
        .arg("--draft-max")
        .arg(ctx.draft_max.to_string())
        .arg("--ctx-size")
        .arg(ctx.ctx_size().to_string());
    if cfg == Config::Draft {
        let draft = ctx
            .draft
            .as_ref()
            .map_or(path.clone(), |d| d.to_string_lossy().to_string());
        cmd.args(["--draft-model", &draft]);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting ember generate")?;
    // The prompt (a few KiB) fits the pipe: write it, then close stdin.
    child
        .stdin
        .take()
        .context("ember's stdin")?
        .write_all(prompt.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ember generate --spec {} failed ({}): {}",
            cfg.spec(),
            out.status,
            last_line(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("ember generate --json")?;
    let t = &v["timings"];
    let predicted_n = t["predicted_n"].as_u64().context("timings.predicted_n")?;
    let predicted_ms = t["predicted_ms"].as_f64().context("timings.predicted_ms")?;
    let tokens: Vec<u64> = v["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    Ok(Run {
        tps: predicted_n as f64 * 1e3 / predicted_ms.max(1e-9),
        predicted_n,
        prompt_n: t["prompt_n"].as_u64().unwrap_or(0),
        drafted: v["spec"]["drafted"].as_u64().unwrap_or(0),
        accepted: v["spec"]["accepted"].as_u64().unwrap_or(0),
        tokens,
        text: v["text"].as_str().map(str::to_string),
    })
}

/// What llama-lookup prints on stderr at the end.
#[derive(Debug, PartialEq)]
struct LookupStats {
    prompt_n: u64,
    decoded: u64,
    seconds: f64,
    drafted: u64,
    accepted: u64,
}

/// Parses llama-lookup's "encoded N tokens", "decoded N tokens in S seconds", "n_drafted = D"
/// and "n_accept = A" lines.
fn parse_lookup(stderr: &str) -> Option<LookupStats> {
    let words_after = |key: &str| -> Option<Vec<String>> {
        stderr.lines().find_map(|l| {
            let (_, rest) = l.split_once(key)?;
            Some(rest.split_whitespace().map(str::to_string).collect())
        })
    };
    let value_of = |key: &str| -> Option<u64> {
        stderr.lines().find_map(|l| {
            let (_, rest) = l.split_once(key)?;
            rest.trim_start().strip_prefix('=')?.trim().parse().ok()
        })
    };
    let enc = words_after("encoded ")?;
    let dec = words_after("decoded ")?;
    Some(LookupStats {
        prompt_n: enc.first()?.parse().ok()?,
        decoded: dec.first()?.parse().ok()?,
        seconds: dec.get(3)?.parse().ok()?,
        drafted: value_of("n_drafted")?,
        accepted: value_of("n_accept ")?,
    })
}

/// The generated part of what llama-lookup printed on stdout: the prompt's pieces, then the
/// generated ones, between blank lines.
fn lookup_generated(stdout: &str, prompt: &str) -> Option<String> {
    let s = stdout.trim_start_matches('\n');
    let s = s.strip_prefix("<bos>").unwrap_or(s);
    Some(s.strip_prefix(prompt)?.trim_end_matches('\n').to_string())
}

fn llama_lookup(ctx: &Ctx, bin: &Path, model: &Path, prompt: &str) -> Result<Run> {
    let threads = ctx.threads.to_string();
    let mut cmd = Command::new(bin.join("llama-lookup"));
    cmd.arg("-m")
        .arg(model)
        .args(["-p", prompt, "-n"])
        .arg(ctx.n.to_string())
        .args(["-t", &threads, "-tb", &threads])
        // Greedy: temperature 0 and top-k 1.
        .args(["--temp", "0", "--top-k", "1", "-s", "1"])
        .arg("--spec-draft-n-max")
        .arg(ctx.draft_max.to_string())
        .args(["--ignore-eos", "--no-escape", "-c"])
        .arg(ctx.ctx_size().to_string());
    if ctx.no_repack {
        cmd.arg("--no-repack");
    }
    let out = cmd.output().context("running llama-lookup")?;
    if !out.status.success() {
        bail!(
            "llama-lookup failed ({}): {}",
            out.status,
            last_line(&out.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let Some(s) = parse_lookup(&stderr) else {
        bail!(
            "llama-lookup printed no timings; its stderr ended: {}",
            last_line(&out.stderr)
        );
    };
    Ok(Run {
        tps: s.decoded as f64 / s.seconds.max(1e-9),
        predicted_n: s.decoded,
        prompt_n: s.prompt_n,
        drafted: s.drafted,
        accepted: s.accepted,
        tokens: Vec::new(),
        text: lookup_generated(&String::from_utf8_lossy(&out.stdout), prompt),
    })
}

/// The first index where two token lists differ (a shorter list differs where it ends).
fn first_difference(a: &[u64], b: &[u64]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Characters two texts share from the start.
fn common_chars(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

/// One row of the one-stream table.
struct SingleRow {
    model: String,
    workload: String,
    config: Config,
    best: f64,
    median: f64,
    drafted: f64,
    accepted: f64,
    /// Generated tokens per forward pass: predicted_n / (predicted_n - accepted).
    per_pass: f64,
    speedup_median: f64,
    speedup_best: f64,
    /// Against plain's tokens: `None` when they are equal in every round, else the first
    /// differing index (over all rounds, the smallest).
    mismatch: Option<usize>,
    /// How the output compares with plain's, in words.
    identical: String,
    prompt_n: u64,
}

/// One row of the aggregate-throughput table.
struct ServeRow {
    model: String,
    workload: String,
    config: Config,
    streams: usize,
    wall_best: f64,
    wall_median: f64,
    decode_best: f64,
    decode_median: f64,
    drafted_per_stream: f64,
    accept_rate: f64,
    vs_plain_median: f64,
    /// Streams whose text differed from the plain server's one-stream text (all rounds).
    differing: usize,
    total: usize,
}

fn fmt_ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".into()
    }
}

fn fmt_pct(num: f64, den: f64) -> String {
    if den > 0.0 {
        format!("{:.0}%", 100.0 * num / den)
    } else {
        "-".into()
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn run(mut a: Args) -> Result<()> {
    a.workloads = unique(a.workloads);
    a.serve_workloads = unique(a.serve_workloads);
    a.model = unique(a.model);
    if a.rounds == 0 || a.n == 0 || a.threads == 0 || a.draft_max == 0 {
        bail!("--rounds, -n, --threads and --draft-max must be at least 1");
    }
    let streams: Vec<usize> = a.streams.iter().copied().filter(|&s| s > 0).collect();
    let ember = crate::build_ember()?;

    // Every workload named anywhere, read once.
    let mut names: Vec<String> = Vec::new();
    if !a.skip_single {
        names.extend(a.workloads.iter().cloned());
    }
    if !streams.is_empty() {
        names.extend(a.serve_workloads.iter().cloned());
    }
    let workloads: Vec<Workload> = unique(names)
        .iter()
        .map(|n| load_workload(n))
        .collect::<Result<_>>()?;
    let mut models = Vec::new();
    for name in &a.model {
        let path = ember_hub::resolve(name)?;
        let out = Command::new(&ember)
            .arg("inspect")
            .arg(&path)
            .arg("--json")
            .output()?;
        if !out.status.success() {
            bail!("ember inspect {name} failed: {}", last_line(&out.stderr));
        }
        let info: Value = serde_json::from_slice(&out.stdout)?;
        let markup = Markup::detect(&info["metadata"]);
        let mut prompts = BTreeMap::new();
        for w in &workloads {
            let prompt = if w.raw {
                w.body.clone()
            } else {
                match &markup {
                    Some(m) => m.wrap(&w.body),
                    None => bail!(
                        "{name}: no known chat markup (ChatML or Gemma) for workload {}; give it as {}.raw.txt",
                        w.name,
                        w.name
                    ),
                }
            };
            prompts.insert(w.name.clone(), prompt);
        }
        eprintln!("{name}: {} ({markup:?})", path.display());
        models.push(Model {
            name: name.clone(),
            path,
            prompts,
        });
    }

    let llama = if a.skip_llamacpp || a.skip_single {
        None
    } else {
        Some(llama_bin()?)
    };
    let mut ctx = Ctx {
        ember,
        llama,
        no_repack: false,
        n: a.n,
        threads: a.threads,
        draft_max: a.draft_max,
        draft: None,
    };
    let start_load = loadavg();
    let started = std::time::SystemTime::now();

    let mut configs = unique(
        std::iter::once(Config::Plain)
            .chain(a.proposers.iter().filter_map(|p| Config::from_proposer(p))),
    );
    let mut single_rows = Vec::new();
    let mut mismatches: Vec<String> = Vec::new();
    let mut llama_notes: Vec<String> = Vec::new();
    if !a.skip_single {
        if ctx.llama.is_some() {
            configs.push(Config::LlamaLookup);
        }
        // Warm-up (page cache) and the repacking probe: one short run per model and engine.
        for m in &models {
            let short = Ctx {
                n: 8,
                ..ctx.clone()
            };
            let p = m.prompts.values().next().map_or("Hello", String::as_str);
            ember_generate(&short, &m.path, p, Config::Plain)?;
            let Some(bin) = &ctx.llama else { continue };
            match llama_lookup(&short, bin, &m.path, p) {
                Ok(_) => {}
                Err(e) if !ctx.no_repack => {
                    eprintln!(
                        "llama-lookup failed with weight repacking ({e:#}); using --no-repack"
                    );
                    ctx.no_repack = true;
                    let short = Ctx {
                        n: 8,
                        ..ctx.clone()
                    };
                    llama_lookup(&short, bin, &m.path, p)?;
                }
                Err(e) => return Err(e),
            }
        }
        type Key = (usize, String, Config);
        let mut runs: BTreeMap<Key, Vec<Run>> = BTreeMap::new();
        for round in 0..a.rounds {
            eprintln!(
                "round {}/{} (one stream), load {}",
                round + 1,
                a.rounds,
                loadavg()
            );
            for (mi, m) in models.iter().enumerate() {
                for w in &a.workloads {
                    let prompt = &m.prompts[w];
                    let mut order = configs.clone();
                    let len = order.len();
                    order.rotate_left(round % len);
                    for cfg in order {
                        let r = match cfg {
                            Config::LlamaLookup => {
                                let bin = ctx.llama.as_ref().context("llama.cpp")?;
                                llama_lookup(&ctx, bin, &m.path, prompt)
                            }
                            _ => ember_generate(&ctx, &m.path, prompt, cfg),
                        };
                        let r = match r {
                            Ok(r) => r,
                            Err(e) => {
                                eprintln!("{} {w} {}: {e:#}", m.name, cfg.id());
                                continue;
                            }
                        };
                        eprintln!(
                            "  {} {w} {}: {:.1} t/s, {} tokens, {}/{} accepted",
                            m.name,
                            cfg.id(),
                            r.tps,
                            r.predicted_n,
                            r.accepted,
                            r.drafted
                        );
                        runs.entry((mi, w.clone(), cfg)).or_default().push(r);
                    }
                }
            }
        }
        // Greedy speculation must reproduce plain decoding token for token.
        for (mi, m) in models.iter().enumerate() {
            for w in &a.workloads {
                let plain_runs = runs.get(&(mi, w.clone(), Config::Plain));
                let reference = plain_runs.and_then(|v| v.first()).map(|r| r.tokens.clone());
                let mut plain_speed = plain_runs
                    .map(|v| v.iter().map(|r| r.tps).collect::<Vec<_>>())
                    .unwrap_or_default();
                let (plain_best, plain_median) = best_median(&mut plain_speed);
                let plain_text = plain_runs
                    .and_then(|v| v.first())
                    .and_then(|r| r.text.clone());
                for &cfg in &configs {
                    let Some(rs) = runs.get(&(mi, w.clone(), cfg)) else {
                        continue;
                    };
                    let mut speeds: Vec<f64> = rs.iter().map(|r| r.tps).collect();
                    let (best, median) = best_median(&mut speeds);
                    let drafted = mean(rs.iter().map(|r| r.drafted as f64));
                    let accepted = mean(rs.iter().map(|r| r.accepted as f64));
                    let predicted = mean(rs.iter().map(|r| r.predicted_n as f64));
                    let (mismatch, identical) = if cfg == Config::LlamaLookup {
                        let text = rs.first().and_then(|r| r.text.clone());
                        let words = match (text, &plain_text) {
                            (Some(l), Some(p)) => {
                                let (same, shorter) = (
                                    common_chars(&l, p),
                                    l.chars().count().min(p.chars().count()),
                                );
                                if same == shorter {
                                    format!("text same as ember plain ({same} chars)")
                                } else {
                                    format!("text differs from ember plain at char {same}")
                                }
                            }
                            _ => "text not compared".into(),
                        };
                        llama_notes.push(format!("{} {w}: {words}", m.name));
                        (None, format!("n/a ({words})"))
                    } else {
                        let diff = reference.as_ref().and_then(|refs| {
                            rs.iter()
                                .filter_map(|r| first_difference(refs, &r.tokens))
                                .min()
                        });
                        match (diff, &reference) {
                            (_, None) => (None, "no plain run".to_string()),
                            (None, Some(_)) => (None, "yes".to_string()),
                            (Some(i), Some(refs)) => {
                                let got = rs
                                    .iter()
                                    .find_map(|r| r.tokens.get(i).copied())
                                    .map_or("end".to_string(), |t| t.to_string());
                                let want = refs.get(i).map_or("end".to_string(), |t| t.to_string());
                                let msg = format!(
                                    "GREEDY OUTPUT MISMATCH: model {} workload {w} config {}: first differing token index {i} (plain {want}, got {got})",
                                    m.name,
                                    cfg.id()
                                );
                                eprintln!("!!! {msg}");
                                mismatches.push(msg);
                                (Some(i), format!("**NO: differs at token {i}**"))
                            }
                        }
                    };
                    single_rows.push(SingleRow {
                        model: m.name.clone(),
                        workload: w.clone(),
                        config: cfg,
                        best,
                        median,
                        drafted,
                        accepted,
                        per_pass: if predicted > accepted {
                            predicted / (predicted - accepted)
                        } else {
                            f64::NAN
                        },
                        speedup_median: median / plain_median,
                        speedup_best: best / plain_best,
                        mismatch,
                        identical,
                        prompt_n: rs.first().map_or(0, |r| r.prompt_n),
                    });
                }
            }
        }
    }

    let mut serve_rows = Vec::new();
    if !streams.is_empty() {
        let serve_configs = unique(
            std::iter::once(Config::Plain).chain(
                a.proposers
                    .iter()
                    .filter_map(|p| Config::from_proposer(p))
                    .filter(|c| matches!(c, Config::Lookup | Config::SelfSpec)),
            ),
        );
        serve_rows = serve_bench(&ctx, &models, &a, &streams, &serve_configs)?;
    }
    let end_load = loadavg();
    let date = utc_minute(started);

    let targets = targets(&single_rows);
    if a.json {
        let single: Vec<Value> = single_rows
            .iter()
            .map(|r| {
                json!({
                    "model": r.model, "workload": r.workload, "config": r.config.id(),
                    "label": r.config.label(), "tps_best": r.best, "tps_median": r.median,
                    "drafted": r.drafted, "accepted": r.accepted,
                    "tokens_per_pass": r.per_pass, "speedup_median": r.speedup_median,
                    "speedup_best": r.speedup_best, "first_mismatch": r.mismatch,
                    "identical": r.identical, "prompt_n": r.prompt_n,
                })
            })
            .collect();
        let serve: Vec<Value> = serve_rows
            .iter()
            .map(|r| {
                json!({
                    "model": r.model, "workload": r.workload, "config": r.config.id(),
                    "streams": r.streams, "tps_best": r.wall_best, "tps_median": r.wall_median,
                    "decode_tps_best": r.decode_best, "decode_tps_median": r.decode_median,
                    "drafted_per_stream": r.drafted_per_stream, "accept_rate": r.accept_rate,
                    "vs_plain_median": r.vs_plain_median,
                    "streams_differing_from_plain": r.differing, "streams_total": r.total,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "date": date, "machine": machine(), "loadavg_start": start_load,
                "loadavg_end": end_load, "rounds": a.rounds, "n": a.n, "threads": a.threads,
                "draft_max": a.draft_max, "llama_no_repack": ctx.no_repack,
                "single": single, "serve": serve, "mismatches": mismatches,
                "llama_text": llama_notes, "targets": targets,
            })
        );
        return if mismatches.is_empty() {
            Ok(())
        } else {
            bail!("{} greedy output mismatches", mismatches.len())
        };
    }

    println!(
        "{date}, {}, {} threads, {} interleaved rounds, -n {} (--ignore-eos), --draft-max {}, greedy; load average {start_load} at the start, {end_load} at the end{}",
        machine(),
        a.threads,
        a.rounds,
        a.n,
        a.draft_max,
        if ctx.no_repack {
            "; llama.cpp with --no-repack"
        } else {
            ""
        }
    );
    if !single_rows.is_empty() {
        println!();
        println!("One stream (`ember generate`), decode tokens/s:");
        println!();
        println!(
            "| model | workload | config | t/s best | t/s median | accepted / drafted | acceptance | tokens per pass | speedup median | speedup best | same tokens as plain |"
        );
        println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        for r in &single_rows {
            let spec = r.config != Config::Plain;
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
                r.model,
                r.workload,
                r.config.label(),
                r.best,
                r.median,
                if spec {
                    format!("{:.0} / {:.0}", r.accepted, r.drafted)
                } else {
                    "-".into()
                },
                if spec {
                    fmt_pct(r.accepted, r.drafted)
                } else {
                    "-".into()
                },
                if spec {
                    format!("{:.2}", r.per_pass)
                } else {
                    "1.00".into()
                },
                fmt_ratio(r.speedup_median),
                fmt_ratio(r.speedup_best),
                r.identical
            );
        }
        let lookups: Vec<(&SingleRow, &SingleRow)> = single_rows
            .iter()
            .filter(|r| r.config == Config::Lookup)
            .filter_map(|e| {
                single_rows
                    .iter()
                    .find(|l| {
                        l.config == Config::LlamaLookup
                            && l.model == e.model
                            && l.workload == e.workload
                    })
                    .map(|l| (e, l))
            })
            .collect();
        if !lookups.is_empty() {
            println!();
            println!(
                "ember lookup against llama.cpp's llama-lookup (same file, prompt, threads, draft length):"
            );
            println!();
            println!(
                "| model | workload | ember lookup t/s best / median | llama-lookup t/s best / median | ember / llama (median) | ember / llama (best) | acceptance ember / llama | prompt tokens ember / llama |"
            );
            println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            for (e, l) in lookups {
                println!(
                    "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {} | {} / {} | {} / {} |",
                    e.model,
                    e.workload,
                    e.best,
                    e.median,
                    l.best,
                    l.median,
                    fmt_ratio(e.median / l.median),
                    fmt_ratio(e.best / l.best),
                    fmt_pct(e.accepted, e.drafted),
                    fmt_pct(l.accepted, l.drafted),
                    e.prompt_n,
                    l.prompt_n
                );
            }
        }
    }
    if !serve_rows.is_empty() {
        println!();
        println!(
            "Aggregate throughput (`ember serve --parallel {} --spec X`, S concurrent `/v1/completions` with the same prompt), generated tokens/s over all streams:",
            streams.iter().max().unwrap_or(&1)
        );
        println!();
        println!(
            "| model | workload | streams | config | t/s best | t/s median | decode t/s best | decode t/s median | drafted per stream | acceptance | vs plain (median) | streams with plain's text |"
        );
        println!(
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &serve_rows {
            let spec = r.config != Config::Plain;
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {}/{} |",
                r.model,
                r.workload,
                r.streams,
                r.config.label(),
                r.wall_best,
                r.wall_median,
                r.decode_best,
                r.decode_median,
                if spec {
                    format!("{:.0}", r.drafted_per_stream)
                } else {
                    "-".into()
                },
                if spec {
                    format!("{:.0}%", 100.0 * r.accept_rate)
                } else {
                    "-".into()
                },
                fmt_ratio(r.vs_plain_median),
                r.total - r.differing,
                r.total
            );
        }
    }
    if !targets.is_empty() {
        println!();
        println!("Targets:");
        for t in &targets {
            println!("- {}", t.as_str().unwrap_or(""));
        }
    }
    if !llama_notes.is_empty() {
        println!();
        println!("llama-lookup's text against ember plain's:");
        for n in &llama_notes {
            println!("- {n}");
        }
    }
    if !mismatches.is_empty() {
        println!();
        println!("!!! GREEDY OUTPUT MISMATCHES (speculation changed the output: a bug):");
        for m in &mismatches {
            println!("- {m}");
        }
        bail!("{} greedy output mismatches", mismatches.len());
    }
    Ok(())
}

/// The items in their first order, each once.
fn unique<T: Clone + PartialEq>(xs: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for x in xs {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// The targets, each a line saying met or missed.
fn targets(rows: &[SingleRow]) -> Vec<Value> {
    let mut out = Vec::new();
    let find = |m: &str, w: &str, c: Config| {
        rows.iter()
            .find(|r| r.model == m && r.workload == w && r.config == c)
    };
    let models = unique(rows.iter().map(|r| r.model.as_str()));
    for m in models {
        if let Some(l) = find(m, "rewrite", Config::Lookup) {
            let fast = l.speedup_median >= 2.0;
            let same = l.mismatch.is_none();
            let llama = find(m, "rewrite", Config::LlamaLookup);
            let ahead = llama.map(|x| l.median > x.median);
            out.push(json!(format!(
                "{m} rewrite, lookup >= 2x plain with identical output{}: {} ({} median, {} best, identical: {}{})",
                if llama.is_some() {
                    " and ahead of llama-lookup"
                } else {
                    ""
                },
                if fast && same && ahead.unwrap_or(true) {
                    "met"
                } else {
                    "MISSED"
                },
                fmt_ratio(l.speedup_median),
                fmt_ratio(l.speedup_best),
                if same { "yes" } else { "NO" },
                llama.map_or(String::new(), |x| format!(
                    ", ember / llama-lookup {}",
                    fmt_ratio(l.median / x.median)
                )),
            )));
        }
        for w in FREE_WORKLOADS {
            for c in [Config::Lookup, Config::SelfSpec, Config::Draft] {
                if let Some(r) = find(m, w, c) {
                    let note = if c == Config::Draft {
                        " (the model as its own draft: every drafted token costs a full forward pass, so it cannot win; not a real configuration)"
                    } else {
                        ""
                    };
                    out.push(json!(format!(
                        "{m} {w}, {} >= 0.9x plain: {} ({} median){note}",
                        c.label(),
                        if r.speedup_median >= 0.9 {
                            "met"
                        } else {
                            "MISSED"
                        },
                        fmt_ratio(r.speedup_median),
                    )));
                }
            }
        }
    }
    out
}

/// One concurrent batch: every stream's response and when it arrived.
struct Batch {
    wall_tps: f64,
    decode_tps: f64,
    drafted: u64,
    accepted: u64,
    texts: Vec<String>,
}

fn complete(port: u16, prompt: &str, n: usize) -> Result<(Value, Instant)> {
    let v: Value = ureq::post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .timeout(Duration::from_secs(900))
        .send_json(json!({
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0.0,
            "ignore_eos": true,
        }))
        .context("completion request")?
        .into_json()
        .context("completion response")?;
    Ok((v, Instant::now()))
}

fn batch(port: u16, prompt: &str, n: usize, streams: usize) -> Result<Batch> {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let prompt = prompt.to_string();
            std::thread::spawn(move || complete(port, &prompt, n))
        })
        .collect();
    let mut tokens = 0;
    let (mut drafted, mut accepted) = (0, 0);
    let mut texts = Vec::new();
    let mut span: Option<(Instant, Instant)> = None;
    for h in handles {
        let (v, end) = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        let t = &v["timings"];
        let n = t["predicted_n"].as_u64().context("timings.predicted_n")?;
        let ms = t["predicted_ms"].as_f64().unwrap_or(0.0);
        tokens += n;
        drafted += t["draft_n"].as_u64().unwrap_or(0);
        accepted += t["draft_n_accepted"].as_u64().unwrap_or(0);
        texts.push(v["choices"][0]["text"].as_str().unwrap_or("").to_string());
        let first = end
            .checked_sub(Duration::from_secs_f64(ms / 1e3))
            .unwrap_or(t0);
        span = Some(span.map_or((first, end), |(a, b)| (a.min(first), b.max(end))));
    }
    let wall = t0.elapsed().as_secs_f64();
    let decode = span.map_or(f64::NAN, |(a, b)| b.duration_since(a).as_secs_f64());
    Ok(Batch {
        wall_tps: tokens as f64 / wall,
        decode_tps: tokens as f64 / decode,
        drafted,
        accepted,
        texts,
    })
}

fn serve_bench(
    ctx: &Ctx,
    models: &[Model],
    a: &Args,
    streams: &[usize],
    configs: &[Config],
) -> Result<Vec<ServeRow>> {
    let parallel = streams.iter().copied().max().unwrap_or(1);
    let logs = root().join("target/bench-spec");
    std::fs::create_dir_all(&logs)?;
    type Key = (usize, String, Config, usize);
    let mut batches: BTreeMap<Key, Vec<Batch>> = BTreeMap::new();
    for (mi, m) in models.iter().enumerate() {
        // One server per configuration, all up at once (an idle one takes no CPU).
        let mut servers = Vec::new();
        for &cfg in configs {
            let port = free_port()?;
            let stem = m
                .path
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned());
            let log = logs.join(format!("serve-{stem}-{}.log", cfg.id()));
            let mut cmd = Command::new(&ctx.ember);
            cmd.stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .env("RAYON_NUM_THREADS", ctx.threads.to_string())
                .arg("serve")
                .arg("-m")
                .arg(&m.path)
                .arg("--port")
                .arg(port.to_string())
                .arg("--parallel")
                .arg(parallel.to_string())
                .arg("--ctx-size")
                .arg(ctx.ctx_size().to_string())
                .args(["--spec", cfg.spec(), "--draft-max"])
                .arg(ctx.draft_max.to_string());
            let what = format!("ember serve --spec {}", cfg.spec());
            servers.push((cfg, start(cmd, port, &what, Some(&log))?));
        }
        for (_, s) in &servers {
            let p = m.prompts.values().next().map_or("Hello", String::as_str);
            batch(s.port, p, 8, 1)?;
        }
        for round in 0..a.rounds {
            eprintln!(
                "round {}/{} (aggregate, {}), load {}",
                round + 1,
                a.rounds,
                m.name,
                loadavg()
            );
            for w in &a.serve_workloads {
                let prompt = &m.prompts[w];
                let mut order: Vec<&(Config, crate::serve_bench::Server)> =
                    servers.iter().collect();
                let len = order.len();
                order.rotate_left(round % len);
                for (cfg, s) in order {
                    for &n_streams in streams {
                        let b = batch(s.port, prompt, ctx.n, n_streams)?;
                        eprintln!(
                            "  {} {w} {} x{n_streams}: {:.1} t/s ({:.1} decode), {}/{} accepted",
                            m.name,
                            cfg.id(),
                            b.wall_tps,
                            b.decode_tps,
                            b.accepted,
                            b.drafted
                        );
                        batches
                            .entry((mi, w.clone(), *cfg, n_streams))
                            .or_default()
                            .push(b);
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (mi, m) in models.iter().enumerate() {
        for w in &a.serve_workloads {
            let reference = batches
                .get(&(mi, w.clone(), Config::Plain, streams[0]))
                .and_then(|v| v.first())
                .and_then(|b| b.texts.first().cloned());
            for &n_streams in streams {
                let plain_median = batches
                    .get(&(mi, w.clone(), Config::Plain, n_streams))
                    .map_or(f64::NAN, |v| {
                        best_median(&mut v.iter().map(|b| b.wall_tps).collect::<Vec<_>>()).1
                    });
                for &cfg in configs {
                    let Some(bs) = batches.get(&(mi, w.clone(), cfg, n_streams)) else {
                        continue;
                    };
                    let (wall_best, wall_median) =
                        best_median(&mut bs.iter().map(|b| b.wall_tps).collect::<Vec<_>>());
                    let (decode_best, decode_median) =
                        best_median(&mut bs.iter().map(|b| b.decode_tps).collect::<Vec<_>>());
                    let drafted: u64 = bs.iter().map(|b| b.drafted).sum();
                    let accepted: u64 = bs.iter().map(|b| b.accepted).sum();
                    let total: usize = bs.iter().map(|b| b.texts.len()).sum();
                    let differing = bs
                        .iter()
                        .flat_map(|b| &b.texts)
                        .filter(|t| reference.as_ref() != Some(*t))
                        .count();
                    rows.push(ServeRow {
                        model: m.name.clone(),
                        workload: w.clone(),
                        config: cfg,
                        streams: n_streams,
                        wall_best,
                        wall_median,
                        decode_best,
                        decode_median,
                        drafted_per_stream: drafted as f64 / total.max(1) as f64,
                        accept_rate: if drafted > 0 {
                            accepted as f64 / drafted as f64
                        } else {
                            f64::NAN
                        },
                        vs_plain_median: wall_median / plain_median,
                        differing,
                        total,
                    });
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_lookup_stats() {
        let err = "0.00.201.379 I cmn          init: llama threadpool init, n_threads = 1
0.09.678.436 I encoded  341 tokens in    2.217 seconds, speed:  271.075 t/s
0.09.678.438 I decoded  260 tokens in    7.221 seconds, speed:   36.007 t/s
0.09.678.438 I 
0.09.678.439 I n_draft      = 8
0.09.678.439 I n_predict    = 260
0.09.678.440 I n_drafted    = 280
0.09.678.441 I t_draft_flat = 0.30 ms
0.09.678.442 I t_draft      = 1.28 ms, 4.56 us per token, 219435.74 tokens per second
0.09.678.442 I n_accept     = 200
0.09.678.443 I accept       = 71.429%
";
        assert_eq!(
            parse_lookup(err),
            Some(LookupStats {
                prompt_n: 341,
                decoded: 260,
                seconds: 7.221,
                drafted: 280,
                accepted: 200,
            })
        );
        assert_eq!(parse_lookup("no timings here"), None);
    }

    #[test]
    fn chat_markup_of_the_two_models() {
        let smol = json!({
            "general.architecture": "llama",
            "tokenizer.chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}",
        });
        let m = Markup::detect(&smol).unwrap();
        assert_eq!(
            m.wrap("Hi"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let plain_chatml = json!({
            "tokenizer.chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}",
        });
        assert_eq!(
            Markup::detect(&plain_chatml),
            Some(Markup::ChatMl { system: None })
        );
        let gemma = json!({ "general.architecture": "gemma3" });
        assert_eq!(
            Markup::detect(&gemma).unwrap().wrap("Hi"),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            Markup::detect(&json!({ "general.architecture": "phi3" })),
            None
        );
    }

    #[test]
    fn token_differences_and_lookup_text() {
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2]), Some(2));
        assert_eq!(
            lookup_generated("\n\n<bos>PROMPT and more\n\n", "PROMPT").as_deref(),
            Some(" and more")
        );
        assert_eq!(lookup_generated("\n\nother", "PROMPT"), None);
        assert_eq!(common_chars("abcd", "abxd"), 2);
    }

    #[test]
    fn the_workloads_in_the_repository_load() {
        for name in ["rewrite", "extract", "story", "once"] {
            let w = load_workload(name).unwrap();
            assert!(!w.body.is_empty() && !w.body.ends_with('\n'), "{name}");
        }
        assert!(load_workload("once").unwrap().raw);
        assert!(load_workload("no-such-workload").is_err());
    }
}
