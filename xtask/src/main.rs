//! `cargo xtask <task>`: project chores that are programs rather than library code.
//!
//! - `bench-vs-llamacpp [--model NAME] [--threads T] [--rounds R] [-p 512] [-n 128]`: builds
//!   llama.cpp from the llama-cpp-python sdist once (cached, via `../shared/tools/build-llamacpp.sh`
//!   or `$EMBER_LLAMACPP_BIN`), then runs `llama-bench` and `ember bench` interleaved, one
//!   repetition each per round, on the same file and thread count, and prints best and median
//!   tokens/s and the ratio ember / llama.cpp for pp and tg.
//! - `bench-serve [--model NAME] [--clients N] [--tokens T] [--rounds R] [--threads T]`: starts
//!   `ember serve --parallel N` and llama.cpp's `llama-server -np N` (continuous batching) on
//!   the same file and thread count, and in interleaved rounds runs 1 and then N concurrent
//!   streaming `/v1/completions` clients (`ignore_eos`, T tokens each) against each; prints
//!   aggregate tokens/s, time to first token and time per output token (p50/p99).
//! - `tiny-models [--out DIR] [--build DIR] [-t THREADS]`: writes a tiny random GGUF per
//!   architecture (f32 and f16 weights) and llama.cpp's logits for them as fixtures in
//!   `tests/fixtures/tiny/` (see `tiny_models`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

mod serve_bench;
mod tiny_models;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench-vs-llamacpp") => bench_vs_llamacpp(&args[1..]),
        Some("bench-serve") => serve_bench::run(&args[1..]),
        Some("tiny-models") => tiny_models::run(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask bench-vs-llamacpp [--model NAME] [--threads T] [--rounds R] [-p N] [-n N]\n       cargo xtask bench-serve [--model NAME] [--clients N] [--tokens T] [--rounds R] [--threads T]\n       cargo xtask tiny-models [--out DIR] [--build DIR] [-t THREADS]"
            );
            bail!("unknown or missing task")
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn flag(args: &[String], names: &[&str], default: &str) -> String {
    args.windows(2)
        .find(|w| names.contains(&w[0].as_str()))
        .map_or(default.to_string(), |w| w[1].clone())
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

/// tokens/s of each test in a llama-bench-style JSON list, keyed "pp512" / "tg128".
fn rates(v: &Value) -> Vec<(String, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let (p, n) = (t["n_prompt"].as_u64()?, t["n_gen"].as_u64()?);
            let name = if p > 0 {
                format!("pp{p}")
            } else {
                format!("tg{n}")
            };
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

fn bench_vs_llamacpp(args: &[String]) -> Result<()> {
    let model = flag(args, &["--model", "-m"], "smollm2-135m-instruct-q4_1");
    let threads = flag(args, &["--threads", "-t"], "2");
    let rounds: usize = flag(args, &["--rounds", "-r"], "5").parse()?;
    let n_prompt = flag(args, &["-p"], "512");
    let n_gen = flag(args, &["-n"], "128");

    let path = ember_hub::resolve(&model)?;
    let bin = llama_bin()?;
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "ember-cli"])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("building ember failed");
    }
    let ember = root().join("target/release/ember");
    let model_arg = path.to_string_lossy().to_string();
    let llama = |extra: &[&str]| {
        let mut c = Command::new(bin.join("llama-bench"));
        c.args([
            "-m", &model_arg, "-t", &threads, "-p", &n_prompt, "-n", &n_gen, "-r", "1", "-o",
            "json",
        ])
        .args(extra);
        c
    };
    // llama.cpp's AMX path crashes on some hosts that report AMX (seen here): fall back to
    // `--repack 0` (no AMX/repacked weights), and say so in the output.
    let mut llama_extra: Vec<&str> = Vec::new();
    // The probe doubles as a warm-up of the page cache for both engines.
    if run_json(&mut llama(&[]))?.is_none() {
        eprintln!("llama-bench failed with weight repacking; using --repack 0");
        llama_extra.push("--repack");
        llama_extra.push("0");
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
            let v = if engine == "ember" {
                run_json(Command::new(&ember).args([
                    "bench", "-m", &model_arg, "-t", &threads, "-p", &n_prompt, "-n", &n_gen, "-r",
                    "1", "--json",
                ]))?
            } else {
                run_json(&mut llama(&llama_extra))?
            };
            for (test, ts) in v.as_ref().map(rates).unwrap_or_default() {
                samples.entry((test, engine)).or_default().push(ts);
            }
        }
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
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
        if llama_extra.is_empty() {
            ""
        } else {
            "(--repack 0)"
        }
    );
    println!();
    println!(
        "| test | llama.cpp best | llama.cpp median | ember best | ember median | ratio (median) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
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
    }
    Ok(())
}
