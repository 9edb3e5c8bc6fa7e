//! `cargo xtask <task>`: project chores that are programs rather than library code.
//!
//! - `bench-vs-llamacpp [--model NAME,...|all] [--threads T] [--rounds R] [-p 512] [-n 128]`:
//!   builds llama.cpp from the llama-cpp-python sdist once (cached, via
//!   `../shared/tools/build-llamacpp.sh` or `$EMBER_LLAMACPP_BIN`), then per model runs
//!   `llama-bench` and `ember bench` interleaved, one repetition each per round, on the same file
//!   and thread count, and prints best and median tokens/s and the ratio ember / llama.cpp for pp
//!   and tg; for tg also each engine's fraction of the bandwidth limit (a streaming-read probe
//!   run in the same invocation, over the weight bytes a token reads). A model is a path, a
//!   manifest name, or a written benchmark model (`llama-1b-q4_0`, see `bench-model`), made on
//!   first use; `all` is both real models and the 1B and 3B models in Q4_0 and Q4_K_M.
//! - `bench-model [--shape 1b|3b] [--type q4_0|q4_k_m|q8_0] [-o FILE]`: a llama GGUF with Llama
//!   3.2 1B or 3B shapes, random weights and SmolLM2's tokenizer, quantized with llama-quantize's
//!   type rules (see `bench_model`).
//! - `bench-serve [--model NAME] [--clients N] [--tokens T] [--rounds R] [--threads T]
//!   [--temperature 0]`: starts
//!   `ember serve --parallel N` and llama.cpp's `llama-server -np N` (continuous batching) on
//!   the same file and thread count, and in interleaved rounds runs 1 and then N concurrent
//!   streaming `/v1/completions` clients (`ignore_eos`, T tokens each) against each; prints
//!   aggregate tokens/s, time to first token and time per output token (p50/p99).
//! - `bench-spec [--model A,B] [--rounds 3] [-n 256] [--threads 2] [--workloads ...]
//!   [--proposers lookup,self,draft] [--skip-llamacpp] [--streams 1,4,8] [--json]`: speculative
//!   decoding against plain decoding, greedy, on the workloads in `xtask/bench-spec/`, one
//!   stream (`ember generate`, and llama.cpp's `llama-lookup`) and 1/4/8 concurrent streams
//!   (`ember serve`), interleaved rounds; prints tokens/s, acceptance, speedups and whether the
//!   output is plain decoding's token for token (see `bench_spec`).
//! - `tiny-models [--out DIR] [--build DIR] [--fixtures DIR] [-t THREADS]`: writes a tiny random
//!   GGUF per architecture (f32 and f16 weights) and llama.cpp's logits for them as fixtures in
//!   `tests/fixtures/tiny/` (see `tiny_models`).
//! - `soak [--model NAME] [--clients 64] [--duration 2m | --rounds R] [--threads T]`: 64
//!   streaming clients, half of them hanging up mid-stream, against a real `ember serve` under
//!   KV pressure; fails on a leaked KV block, an error other than 429/503, or growing RSS (see
//!   `soak`).
//! - `convert IN OUT [--to gguf|hf|awq|gptq|exl2|ct] [--type TYPE] [--bits B] [--group-size G]
//!   [--act-order] [--asym] [--keep-output] [--keep-embeddings] [--dtype f16|bf16|f32]`: GGUF ->
//!   requantized GGUF (as llama-quantize), GGUF -> Hugging Face checkpoint directory (plain, or
//!   AWQ/GPTQ/EXL2/compressed-tensors quantized), checkpoint (plain or quantized) -> GGUF,
//!   through `ember-convert` (see `convert`).
//!
//! Flags are parsed by clap: a misspelled or unknown flag is an error, and `--help` on each task
//! lists its flags and defaults.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

mod bench_distill;
mod bench_model;
mod bench_spec;
mod convert;
mod serve_bench;
mod soak;
mod tiny_models;

/// The default model of the benchmarks and the soak: a manifest name (`ember_hub::resolve`).
pub(crate) const DEFAULT_MODEL: &str = "smollm2-135m-instruct-q4_1";

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Ember's project chores"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// llama-bench and `ember bench` interleaved on the same file and thread count.
    BenchVsLlamacpp(BenchArgs),
    /// `ember serve` against llama-server under concurrent streaming clients.
    BenchServe(serve_bench::Args),
    /// Speculative decoding (lookup, self, draft) against plain decoding and llama-lookup,
    /// one stream and many.
    BenchSpec(bench_spec::Args),
    /// Distillation end to end: a trained student against the layer-pruned copy (perplexity,
    /// training tokens/s, loss curve, acceptance as the teacher's draft).
    BenchDistill(bench_distill::Args),
    /// A llama GGUF with real 1B or 3B shapes and random weights, for benchmarks.
    BenchModel(bench_model::Args),
    /// Tiny random GGUFs per architecture and llama.cpp's logits for them as fixtures.
    TinyModels(tiny_models::Args),
    /// Many streaming clients, half disconnecting, against a real `ember serve` under KV
    /// pressure: fails on leaked KV blocks, unexpected errors or growing RSS.
    Soak(soak::Args),
    /// Model conversion: GGUF <-> Hugging Face checkpoint, GGUF requantization.
    Convert(convert::Args),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Models, comma-separated (so paths must not contain commas): GGUF paths, manifest names,
    /// benchmark models
    /// (`llama-1b-q4_0`, `llama-3b-q4_k_m`, ...: written on first use), or `all`.
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Threads for both engines.
    #[arg(short, long, default_value_t = 2)]
    threads: usize,
    /// Interleaved rounds (one repetition of each engine per round).
    #[arg(short, long, default_value_t = 5)]
    rounds: usize,
    /// Prompt tokens of the pp test.
    #[arg(short = 'p', default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens of the tg test.
    #[arg(short = 'n', default_value_t = 128)]
    n_gen: usize,
    /// Tokens in the cache before each test (llama-bench's `-d`, passed to both engines).
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    n_depth: usize,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BenchVsLlamacpp(a) => bench_vs_llamacpp(a),
        Task::BenchServe(a) => serve_bench::run(a),
        Task::BenchSpec(a) => bench_spec::run(a),
        Task::BenchDistill(a) => bench_distill::run(a),
        Task::BenchModel(a) => bench_model::run(a),
        Task::TinyModels(a) => tiny_models::run(a),
        Task::Soak(a) => soak::run(a),
        Task::Convert(a) => convert::run(a),
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds `target/release/ember` (cargo does nothing when it is up to date) and returns it.
pub(crate) fn build_ember() -> Result<PathBuf> {
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "ember-cli"])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("building ember failed");
    }
    Ok(root().join("target/release/ember"))
}

pub(crate) fn llama_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EMBER_LLAMACPP_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = root().join("../shared/tools/build-llamacpp.sh");
    eprintln!(
        "building llama.cpp if needed (first time ~15 min): {}",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .context("running build-llamacpp.sh")?;
    if !out.status.success() {
        bail!(
            "build-llamacpp.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .context("build-llamacpp.sh printed no directory")?;
    Ok(PathBuf::from(dir.trim()))
}

fn run_json(cmd: &mut Command) -> Result<Option<Value>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        eprintln!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_slice(&out.stdout).context("parsing JSON output")?,
    ))
}

/// tokens/s of each test in a llama-bench-style JSON list, keyed "pp512" / "tg128" (at a
/// depth: "tg128 @ d4096").
fn rates(v: &Value) -> Vec<(String, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let (p, n) = (t["n_prompt"].as_u64()?, t["n_gen"].as_u64()?);
            let mut name = if p > 0 {
                format!("pp{p}")
            } else {
                format!("tg{n}")
            };
            // Both engines report `n_depth`; a test at depth is labelled as llama-bench does.
            if let Some(d) = t["n_depth"].as_u64().filter(|&d| d > 0) {
                name.push_str(&format!(" @ d{d}"));
            }
            Some((name, t["avg_ts"].as_f64()?))
        })
        .collect()
}

pub(crate) fn best_median(xs: &mut [f64]) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let best = xs.last().copied().unwrap_or(0.0);
    let mid = xs.len() / 2;
    let median = if xs.is_empty() {
        0.0
    } else if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    };
    (best, median)
}

/// What `bench-vs-llamacpp --model all` runs: both real models, then the written 1B and 3B.
const ALL_MODELS: &[&str] = &[
    DEFAULT_MODEL,
    "gemma3-270m-q4_k_m",
    "llama-1b-q4_0",
    "llama-1b-q4_k_m",
    "llama-3b-q4_0",
    "llama-3b-q4_k_m",
];

fn bench_vs_llamacpp(a: BenchArgs) -> Result<()> {
    let models: Vec<String> = if a.model == "all" {
        ALL_MODELS.iter().map(|s| s.to_string()).collect()
    } else {
        a.model.split(',').map(|s| s.trim().to_string()).collect()
    };
    // Every file first: a missing model fails before any benchmark runs.
    let mut paths = Vec::new();
    for m in &models {
        paths.push(match bench_model::ensure(m)? {
            Some(p) => p,
            None => ember_hub::resolve(m)?,
        });
    }
    let bin = llama_bin()?;
    let ember = crate::build_ember()?;
    let threads = a.threads;
    eprintln!("probing read bandwidth ({threads} threads)");
    let bandwidth = bench_model::read_bandwidth(threads, 5);
    for (model, path) in models.iter().zip(&paths) {
        bench_one(&a, model, path, &bin, &ember, bandwidth)?;
        println!();
    }
    Ok(())
}

fn bench_one(
    a: &BenchArgs,
    model: &str,
    path: &Path,
    bin: &Path,
    ember: &Path,
    bandwidth: f64,
) -> Result<()> {
    let rounds = a.rounds;
    let (threads, n_prompt, n_gen, n_depth) = (
        a.threads.to_string(),
        a.n_prompt.to_string(),
        a.n_gen.to_string(),
        a.n_depth.to_string(),
    );

    let model_arg = path.to_string_lossy().to_string();
    let llama = |p: &str, n: &str, extra: &[&str]| {
        let mut c = Command::new(bin.join("llama-bench"));
        c.args([
            "-m", &model_arg, "-t", &threads, "-p", p, "-n", n, "-d", &n_depth, "-r", "1", "-o",
            "json",
        ])
        .args(extra);
        c
    };
    // llama.cpp runs each test on its own, with its weight repacking where that runs: its AMX
    // prompt path crashes (SIGILL) on some hosts that report AMX (this one), while its
    // repacked decode runs and is its fastest. A test that crashes falls back to `--repack 0`
    // (no AMX, no repacked weights), and the output says so.
    let llama_tests: Vec<(&str, &str)> = [(n_prompt.as_str(), "0"), ("0", n_gen.as_str())]
        .into_iter()
        .filter(|(p, n)| (*p, *n) != ("0", "0"))
        .collect();
    let mut llama_extra: Vec<&[&str]> = Vec::new();
    let mut fell_back = Vec::new();
    // The probes double as a warm-up of the page cache for both engines.
    for &(p, n) in &llama_tests {
        if run_json(&mut llama(p, n, &[]))?.is_none() {
            let test = if p != "0" {
                format!("pp{p}")
            } else {
                format!("tg{n}")
            };
            eprintln!("llama-bench {test} failed with weight repacking; using --repack 0");
            if run_json(&mut llama(p, n, &["--repack", "0"]))?.is_none() {
                bail!("llama-bench {test} fails with and without weight repacking");
            }
            fell_back.push(test);
            llama_extra.push(&["--repack", "0"]);
        } else {
            llama_extra.push(&[]);
        }
    }
    let mut samples: std::collections::BTreeMap<(String, &str), Vec<f64>> = Default::default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // Alternate which engine goes first: neighbours' load on a shared host is one-sided.
        let order = if round % 2 == 0 {
            ["llama.cpp", "ember"]
        } else {
            ["ember", "llama.cpp"]
        };
        for engine in order {
            let runs = if engine == "ember" {
                vec![run_json(Command::new(ember).args([
                    "bench", "-m", &model_arg, "-t", &threads, "-p", &n_prompt, "-n", &n_gen, "-d",
                    &n_depth, "-r", "1", "--json",
                ]))?]
            } else {
                let mut runs = Vec::new();
                for (&(p, n), extra) in llama_tests.iter().zip(&llama_extra) {
                    runs.push(run_json(&mut llama(p, n, extra))?);
                }
                runs
            };
            for v in runs {
                for (test, ts) in v.as_ref().map(rates).unwrap_or_default() {
                    samples.entry((test, engine)).or_default().push(ts);
                }
            }
        }
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = utc_minute(std::time::SystemTime::now());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "model {model} ({}), {threads} threads, {rounds} interleaved rounds",
        path.display()
    );
    println!(
        "ember {commit}, llama.cpp from llama-cpp-python 0.3.36 {}, {date}, {cpu}",
        if fell_back.is_empty() {
            String::new()
        } else {
            format!("({} with --repack 0)", fell_back.join(", "))
        }
    );
    println!();
    println!(
        "| test | llama.cpp best | llama.cpp median | ember best | ember median | ratio (median) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut tg_medians = None;
    let tests: std::collections::BTreeSet<String> =
        samples.keys().map(|(t, _)| t.clone()).collect();
    for test in tests {
        let (lb, lm) = best_median(
            samples
                .get_mut(&(test.clone(), "llama.cpp"))
                .map_or(&mut [][..], |v| &mut v[..]),
        );
        let (eb, em) = best_median(
            samples
                .get_mut(&(test.clone(), "ember"))
                .map_or(&mut [][..], |v| &mut v[..]),
        );
        let ratio = if lm > 0.0 { em / lm } else { f64::NAN };
        println!("| {test} | {lb:.1} | {lm:.1} | {eb:.1} | {em:.1} | {ratio:.2}x |");
        if test.starts_with("tg") {
            tg_medians = Some((lb, lm, eb, em));
        }
    }
    // The physical anchor of decode: every token reads the weights once from DRAM.
    let file = ember_formats::GgufFile::open(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let per_token = bench_model::bytes_per_token(&file) as f64;
    let limit = bandwidth / per_token;
    println!();
    println!(
        "read bandwidth {:.1} GB/s ({} threads, 1 GiB streaming read, best of 5); {:.0} MB of \
         weights a token: tg limit {limit:.1} t/s (a model that fits in the last-level cache \
         can pass it)",
        bandwidth / 1e9,
        a.threads,
        per_token / 1e6
    );
    if a.n_depth > 0 {
        println!(
            "(at depth {} each token also reads the cache's K/V, which the limit leaves out)",
            a.n_depth
        );
    }
    if let Some((lb, lm, eb, em)) = tg_medians {
        println!(
            "fraction of the limit (best / median): llama.cpp {:.0}% / {:.0}%, ember {:.0}% / {:.0}%",
            100.0 * lb / limit,
            100.0 * lm / limit,
            100.0 * eb / limit,
            100.0 * em / limit
        );
    }
    Ok(())
}

/// `2026-12-04 23:16 UTC` for a time (what `date -u "+%Y-%m-%d %H:%M UTC"` printed, without
/// running `date`); times before 1970 print as 1970-01-01 00:00 UTC.
pub(crate) fn utc_minute(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::time::{Duration, UNIX_EPOCH};

    fn parse(args: &[&str]) -> Result<Task, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied())).map(|c| c.task)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn convert_flags_and_plans() {
        use convert::Plan;
        use ember_formats::safetensors::StDtype;
        use ember_quant::GgmlType;
        let args = |a: &[&str]| {
            let mut v = vec!["convert"];
            v.extend_from_slice(a);
            match parse(&v).unwrap() {
                Task::Convert(a) => a,
                other => panic!("wrong task {other:?}"),
            }
        };
        // --to follows the output's extension; --type/--dtype defaults.
        let a = args(&["m.gguf", "out.gguf", "--type", "Q4_K", "--keep-output"]);
        match convert::plan(&a, false).unwrap() {
            Plan::Requantize(o) => {
                assert_eq!(o.ty, GgmlType::Q4_K);
                assert!(o.keep_output && !o.keep_embeddings);
            }
            p => panic!("{p:?}"),
        }
        assert!(convert::plan(&args(&["m.gguf", "out.gguf"]), false).is_err());
        assert_eq!(
            convert::plan(&args(&["m.gguf", "outdir"]), false).unwrap(),
            Plan::GgufToHf(StDtype::F16)
        );
        assert_eq!(
            convert::plan(&args(&["m.gguf", "o", "--dtype", "bf16"]), false).unwrap(),
            Plan::GgufToHf(StDtype::BF16)
        );
        match convert::plan(&args(&["dir", "x.GGUF"]), true).unwrap() {
            Plan::HfToGguf(o) => assert_eq!(o.ty, GgmlType::F16),
            p => panic!("{p:?}"),
        }
        match convert::plan(&args(&["dir", "x", "--to", "gguf", "--type", "q8_0"]), true).unwrap() {
            Plan::HfToGguf(o) => assert_eq!(o.ty, GgmlType::Q8_0),
            p => panic!("{p:?}"),
        }
        // Quantized output.
        use ember_convert::{GroupSize, QuantWriteFormat, QuantWriteOptions};
        assert_eq!(
            convert::plan(
                &args(&["m.gguf", "o", "--to", "awq", "--group-size", "64"]),
                false
            )
            .unwrap(),
            Plan::GgufToQuantized(QuantWriteOptions {
                format: QuantWriteFormat::Awq,
                bits: 4,
                group_size: GroupSize::Size(64),
            })
        );
        assert_eq!(
            convert::plan(
                &args(&[
                    "m.gguf",
                    "o",
                    "--to",
                    "gptq",
                    "--bits",
                    "3",
                    "--act-order",
                    "--group-size",
                    "-1"
                ]),
                false
            )
            .unwrap(),
            Plan::GgufToQuantized(QuantWriteOptions {
                format: QuantWriteFormat::Gptq {
                    act_order: true,
                    sym: true,
                    v2: false
                },
                bits: 3,
                group_size: GroupSize::PerChannel,
            })
        );
        assert_eq!(
            convert::plan(&args(&["m.gguf", "o", "--to", "gptq", "--asym"]), false).unwrap(),
            Plan::GgufToQuantized(QuantWriteOptions {
                format: QuantWriteFormat::Gptq {
                    act_order: false,
                    sym: false,
                    v2: true
                },
                bits: 4,
                group_size: GroupSize::Size(128),
            })
        );
        assert_eq!(
            convert::plan(
                &args(&["m.gguf", "o", "--to", "exl2", "--bits", "3.5"]),
                false
            )
            .unwrap(),
            Plan::GgufToQuantized(QuantWriteOptions {
                format: QuantWriteFormat::Exl2 { target_bpw: 3.5 },
                bits: 4,
                group_size: GroupSize::Size(128),
            })
        );
        assert_eq!(
            convert::plan(
                &args(&["m.gguf", "o", "--to", "ct", "--bits", "8", "--asym"]),
                false
            )
            .unwrap(),
            Plan::GgufToQuantized(QuantWriteOptions {
                format: QuantWriteFormat::CompressedTensors { symmetric: false },
                bits: 8,
                group_size: GroupSize::Size(128),
            })
        );
        // Nonsensical: clear errors.
        for (a, dir) in [
            (&["m.gguf", "o", "--to", "awq", "--bits", "4.5"][..], false),
            (&["m.gguf", "o", "--to", "awq", "--group-size", "0"], false),
            (&["m.gguf", "o", "--to", "awq", "--act-order"], false),
            (&["m.gguf", "o", "--to", "exl2", "--asym"], false),
            (&["m.gguf", "o", "--to", "gptq", "--type", "q4_0"], false),
            (&["dir", "o", "--to", "gptq"], true),
            (
                &["m.gguf", "o.gguf", "--type", "q4_0", "--bits", "4"],
                false,
            ),
            (
                &["m.gguf", "o.gguf", "--type", "q4_0", "--group-size", "128"],
                false,
            ),
            (&["m.gguf", "o.gguf", "--type", "iq4_nl"], false),
            (&["m.gguf", "o", "--type", "q4_0"], false),
            (&["dir", "o"], true),
        ] {
            assert!(convert::plan(&args(a), dir).is_err(), "{a:?}");
        }
        assert!(parse(&["convert", "in"]).is_err());
        assert!(parse(&["convert", "a", "b", "--dtype", "f8"]).is_err());
        assert!(parse(&["convert", "a", "b", "--to", "onnx"]).is_err());
    }

    #[test]
    fn unknown_or_misspelled_flags_are_errors() {
        for args in [
            &["bench-vs-llamacpp", "--thread", "4"][..],
            &["bench-serve", "--client", "8"],
            &["tiny-models", "--output", "x"],
            &["soak", "--clientz", "3"],
            &["bench-serve", "extra"],
            &["no-such-task"],
            &[],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn bench_vs_llamacpp_flags_and_defaults_are_unchanged() {
        let Task::BenchVsLlamacpp(a) = parse(&["bench-vs-llamacpp"]).unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(
            (a.model.as_str(), a.threads, a.rounds, a.n_prompt, a.n_gen),
            (DEFAULT_MODEL, 2, 5, 512, 128)
        );
        assert_eq!(a.n_depth, 0);
        for depth in [&["-d", "4096"][..], &["--depth", "4096"]] {
            let args = [&["bench-vs-llamacpp"][..], depth].concat();
            let Task::BenchVsLlamacpp(a) = parse(&args).unwrap() else {
                panic!("wrong task");
            };
            assert_eq!(a.n_depth, 4096);
        }
        for args in [
            &[
                "bench-vs-llamacpp",
                "--model",
                "m",
                "--threads",
                "4",
                "--rounds",
                "3",
                "-p",
                "64",
                "-n",
                "16",
            ][..],
            &[
                "bench-vs-llamacpp",
                "-m",
                "m",
                "-t",
                "4",
                "-r",
                "3",
                "-p",
                "64",
                "-n",
                "16",
            ],
        ] {
            let Task::BenchVsLlamacpp(a) = parse(args).unwrap() else {
                panic!("wrong task");
            };
            assert_eq!(
                (a.model.as_str(), a.threads, a.rounds, a.n_prompt, a.n_gen),
                ("m", 4, 3, 64, 16)
            );
        }
        assert!(parse(&["bench-vs-llamacpp", "--rounds", "five"]).is_err());
    }

    #[test]
    fn rates_name_tests_as_llama_bench_does() {
        let v = serde_json::json!([
            {"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 10.0},
            {"n_prompt": 0, "n_gen": 128, "avg_ts": 20.0},
            {"n_prompt": 0, "n_gen": 64, "n_depth": 4096, "avg_ts": 30.0},
        ]);
        assert_eq!(
            rates(&v),
            [
                ("pp512".to_string(), 10.0),
                ("tg128".to_string(), 20.0),
                ("tg64 @ d4096".to_string(), 30.0)
            ]
        );
    }

    #[test]
    fn bench_serve_flags_and_defaults_are_unchanged() {
        let Task::BenchServe(a) = parse(&["bench-serve"]).unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(
            (a.model.as_str(), a.clients, a.tokens, a.rounds, a.threads),
            (DEFAULT_MODEL, 8, 128, 3, 2)
        );
        assert_eq!((a.temperature, a.ember.as_deref()), (0.0, None));
        let Task::BenchServe(a) = parse(&["bench-serve", "--ember", "/x/ember"]).unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(a.ember.as_deref(), Some(std::path::Path::new("/x/ember")));
        for args in [
            &[
                "bench-serve",
                "--model",
                "m",
                "--clients",
                "4",
                "--tokens",
                "9",
                "--rounds",
                "1",
                "--threads",
                "3",
            ][..],
            &[
                "bench-serve",
                "-m",
                "m",
                "-c",
                "4",
                "-n",
                "9",
                "-r",
                "1",
                "-t",
                "3",
            ],
        ] {
            let Task::BenchServe(a) = parse(args).unwrap() else {
                panic!("wrong task");
            };
            assert_eq!(
                (a.model.as_str(), a.clients, a.tokens, a.rounds, a.threads),
                ("m", 4, 9, 1, 3)
            );
        }
    }

    #[test]
    fn bench_distill_flags_and_defaults() {
        let Task::BenchDistill(a) = parse(&["bench-distill"]).unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(a.model, "smollm2-135m-instruct-q4_1");
        assert_eq!((a.layers, a.self_generate, a.gen_tokens), (10, 300, 256));
        assert_eq!((a.seq_len, a.steps, a.batch, a.lr), (128, 200, 8, 1e-3));
        assert_eq!((a.rounds, a.n, a.threads), (2, 128, 2));
        assert_eq!(a.out_type, "q8_0");
        assert_eq!(a.workloads, ["rewrite", "extract", "story", "once"]);
        let Task::BenchDistill(a) = parse(&[
            "bench-distill",
            "--layers",
            "6",
            "--steps",
            "50",
            "-w",
            "story",
        ])
        .unwrap() else {
            panic!("wrong task");
        };
        assert_eq!((a.layers, a.steps), (6, 50));
        assert_eq!(a.workloads, ["story"]);
        assert!(parse(&["bench-distill", "--stepz", "5"]).is_err());
    }

    #[test]
    fn bench_spec_flags_and_defaults() {
        let Task::BenchSpec(a) = parse(&["bench-spec"]).unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(
            a.model,
            ["smollm2-135m-instruct-q4_1", "gemma3-270m-q4_k_m"]
        );
        assert_eq!((a.rounds, a.n, a.threads, a.draft_max), (3, 256, 2, 8));
        assert_eq!(a.workloads, ["rewrite", "extract", "story", "once"]);
        assert_eq!(a.proposers, ["lookup", "self", "draft"]);
        assert_eq!(a.streams, [1, 4, 8]);
        assert_eq!(a.serve_workloads, ["rewrite", "story"]);
        assert!(!a.skip_llamacpp && !a.skip_single && !a.json);
        let Task::BenchSpec(a) = parse(&[
            "bench-spec",
            "--model",
            "a",
            "--model",
            "b,c",
            "--rounds",
            "1",
            "-n",
            "16",
            "--threads",
            "1",
            "--workloads",
            "story",
            "--proposers",
            "lookup",
            "--skip-llamacpp",
            "--streams",
            "1,2",
            "--json",
        ])
        .unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(a.model, ["a", "b", "c"]);
        assert_eq!((a.rounds, a.n, a.threads), (1, 16, 1));
        assert_eq!(
            (a.workloads, a.proposers),
            (vec!["story".to_string()], vec!["lookup".to_string()])
        );
        assert_eq!(a.streams, [1, 2]);
        assert!(a.skip_llamacpp && a.json);
        assert!(parse(&["bench-spec", "--proposers", "medusa"]).is_err());
        assert!(parse(&["bench-spec", "--stream", "4"]).is_err());
    }

    #[test]
    fn tiny_models_flags_and_defaults_are_unchanged() {
        let Task::TinyModels(a) = parse(&["tiny-models"]).unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(a.out, PathBuf::from("target/tiny-models"));
        assert_eq!(a.fixtures, PathBuf::from("tests/fixtures/tiny"));
        assert_eq!((a.threads, a.build), (2, None));
        let Task::TinyModels(a) = parse(&[
            "tiny-models",
            "--out",
            "o",
            "--build",
            "b",
            "--fixtures",
            "f",
            "-t",
            "4",
        ])
        .unwrap() else {
            panic!("wrong task");
        };
        assert_eq!(
            (a.out, a.build, a.fixtures, a.threads),
            ("o".into(), Some("b".into()), "f".into(), 4)
        );
    }

    #[test]
    fn utc_minute_formats_known_instants() {
        let at = |s: u64| utc_minute(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00 UTC");
        // `date -u -d @951782400`: the leap day of a century year divisible by 400.
        assert_eq!(at(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(at(1_709_164_799), "2024-02-28 23:59 UTC");
        assert_eq!(at(1_798_761_599), "2026-12-31 23:59 UTC");
        assert_eq!(at(4_107_542_400), "2100-03-01 00:00 UTC");
        assert_eq!(
            utc_minute(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01 00:00 UTC"
        );
    }
}
