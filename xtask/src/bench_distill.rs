//! `cargo xtask bench-distill`: distillation measured end to end on this machine.
//!
//! 1. `ember distill --steps 0`: the layer-pruned copy (the teacher's chosen layers, untrained),
//!    which also makes the data (the teacher's own answers, `--self-generate`) and its top-k
//!    cache, and reports the pruned copy's held-out perplexity.
//! 2. `ember distill` on the same cache: the trained student, its report (perplexity, training
//!    tokens/s per phase) and its per-step log.
//! 3. Both as draft models for the teacher (`ember generate --spec draft --draft-model`,
//!    greedy) on the speculative decoding workloads (`xtask/bench-spec/`), in interleaved
//!    rounds with plain decoding: the engine's acceptance rate, decode tokens/s and the
//!    speedup, and whether the tokens equal plain decoding's (greedy speculation must not
//!    change them). The engine stops drafting while a draft does not pay, so its acceptance
//!    counts few drafts; the agreement (`ember logits --top-k 1` of each draft on the teacher's
//!    greedy output: how many of its tokens the draft's argmax predicts) is the per-token
//!    acceptance rate of greedy speculation at every position.
//!
//! Writes into `--out`: the two GGUFs and their reports, `loss.csv` and `loss.png` (the loss
//! curve) and `summary.json`; prints a markdown summary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::bench_spec::{Config, Ctx, Markup, ember_generate, last_line, load_workload};
use crate::{best_median, root, utc_minute};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The teacher: a GGUF path or a manifest name.
    #[arg(short, long, default_value = "smollm2-135m-instruct-q4_1")]
    pub model: String,
    /// Student layers (spread evenly over the teacher's).
    #[arg(long, default_value_t = 10)]
    pub layers: usize,
    /// Teacher answers to train on (`ember distill --self-generate`).
    #[arg(long, default_value_t = 300)]
    pub self_generate: usize,
    /// Tokens per answer, at most.
    #[arg(long, default_value_t = 256)]
    pub gen_tokens: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// The students' matrix type.
    #[arg(long = "type", default_value = "q8_0")]
    pub out_type: String,
    /// Interleaved rounds of the draft comparison.
    #[arg(short, long, default_value_t = 2)]
    pub rounds: usize,
    /// Tokens generated per draft-comparison run.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n: usize,
    /// Workloads of the draft comparison (files in xtask/bench-spec/).
    #[arg(
        short,
        long,
        value_delimiter = ',',
        default_value = "rewrite,extract,story,once"
    )]
    pub workloads: Vec<String>,
    /// Threads (RAYON_NUM_THREADS) for every ember run.
    #[arg(short, long, default_value_t = 2)]
    pub threads: usize,
    /// Where everything is written.
    #[arg(short, long, default_value = "target/bench-distill")]
    pub out: PathBuf,
    /// Keep the pruned copy and the student already in --out (with their reports and loss
    /// log) and only rerun the draft comparison.
    #[arg(long)]
    pub reuse: bool,
}

/// `ember tokenize` of `text` by `model` (BOS as the model says, special tokens parsed).
fn tokenize(ember: &Path, model: &Path, text: &str) -> Result<Vec<u64>> {
    use std::io::Write as _;
    let mut child = Command::new(ember)
        .args([
            "tokenize",
            "-m",
            &model.display().to_string(),
            "--stdin",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("tokenize's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ember tokenize failed: {}", last_line(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .filter_map(Value::as_u64)
        .collect())
}

/// How many of `generated` (which followed `prompt`) the `draft` model's argmax predicts,
/// teacher-forced on the same prefix (`ember logits --top-k 1`): the per-token acceptance of
/// greedy speculation, whatever the engine's drafting policy.
fn agreement(ember: &Path, draft: &Path, prompt: &[u64], generated: &[u64]) -> Result<usize> {
    let seq: Vec<String> = prompt.iter().chain(generated).map(u64::to_string).collect();
    let out = Command::new(ember)
        .args([
            "logits",
            "-m",
            &draft.display().to_string(),
            "--top-k",
            "1",
            "--json",
        ])
        .args(["--tokens", &seq.join(",")])
        .output()?;
    if !out.status.success() {
        bail!("ember logits failed: {}", last_line(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let positions = v["positions"].as_array().context("positions")?;
    Ok(generated
        .iter()
        .enumerate()
        .filter(|&(i, &want)| {
            positions
                .get(prompt.len() - 1 + i)
                .and_then(|p| p["top"][0][0].as_u64())
                == Some(want)
        })
        .count())
}

fn distill(a: &Args, ember: &Path, out: &Path, steps: usize) -> Result<f64> {
    let started = Instant::now();
    let path = |name: &str| out.join(name).display().to_string();
    let output = path(if steps == 0 {
        "pruned.gguf"
    } else {
        "student.gguf"
    });
    let status = Command::new(ember)
        .env("RAYON_NUM_THREADS", a.threads.to_string())
        .args(["distill", "-m", &a.model, "-o", &output])
        .args(["--layers", &a.layers.to_string()])
        .args(["--self-generate", &a.self_generate.to_string()])
        .args(["--gen-tokens", &a.gen_tokens.to_string()])
        .args(["--seq-len", &a.seq_len.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--batch", &a.batch.to_string()])
        .args(["--lr", &a.lr.to_string()])
        .args(["--type", &a.out_type])
        .args(["--cache", &path("teacher.topk")])
        .args(["--save-every", "50", "--report"])
        .status()
        .context("running ember distill")?;
    if !status.success() {
        bail!("ember distill --steps {steps} failed ({status})");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// One draft configuration's runs over every workload and round.
#[derive(Default)]
struct DraftRuns {
    tps: Vec<f64>,
    drafted: u64,
    accepted: u64,
    mismatches: Vec<String>,
    /// Generated positions where the draft's argmax is the teacher's token, and positions.
    agree: usize,
    positions: usize,
}

pub fn run(a: Args) -> Result<()> {
    let ember = crate::build_ember()?;
    let out = if a.out.is_absolute() {
        a.out.clone()
    } else {
        root().join(&a.out)
    };
    std::fs::create_dir_all(&out)?;
    let started = std::time::SystemTime::now();

    // Wall times; `None` when --reuse kept earlier runs.
    let (pruned_s, student_s) = if a.reuse {
        (None, None)
    } else {
        eprintln!("== the layer-pruned copy (and the data, the teacher's top-k)");
        let pruned_s = distill(&a, &ember, &out, 0)?;
        eprintln!("== the trained student");
        (Some(pruned_s), Some(distill(&a, &ember, &out, a.steps)?))
    };
    let pruned = read_json(&out.join("pruned.gguf.report.json"))?;
    let student = read_json(&out.join("student.gguf.report.json"))?;
    std::fs::copy(out.join("student.gguf.train.csv"), out.join("loss.csv"))?;
    let losses = read_losses(&out.join("loss.csv"))?;
    plot::write_png(&out.join("loss.png"), &losses)?;

    eprintln!("== draft acceptance on the speculative decoding workloads");
    let teacher = ember_hub::resolve(&a.model)?;
    let info = Command::new(&ember)
        .args(["inspect", &teacher.display().to_string(), "--json"])
        .output()?;
    if !info.status.success() {
        bail!("ember inspect failed: {}", last_line(&info.stderr));
    }
    let info: Value = serde_json::from_slice(&info.stdout)?;
    let markup = Markup::detect(&info["metadata"]).context("the teacher's chat markup")?;
    let ctx = Ctx {
        ember: ember.clone(),
        llama: None,
        no_repack: false,
        n: a.n,
        threads: a.threads,
        draft_max: 8,
        draft: None,
    };
    let drafts = [
        ("plain", None),
        ("pruned", Some(out.join("pruned.gguf"))),
        ("student", Some(out.join("student.gguf"))),
    ];
    let mut rows = Vec::new();
    let mut all: Vec<DraftRuns> = (0..drafts.len()).map(|_| DraftRuns::default()).collect();
    for name in &a.workloads {
        let w = load_workload(name)?;
        let prompt = if w.raw {
            w.body.clone()
        } else {
            markup.wrap(&w.body)
        };
        let mut runs: Vec<DraftRuns> = (0..drafts.len()).map(|_| DraftRuns::default()).collect();
        let mut plain_tokens: Option<Vec<u64>> = None;
        for round in 0..a.rounds {
            for i in 0..drafts.len() {
                let k = (i + round) % drafts.len();
                let (label, draft) = &drafts[k];
                let c = Ctx {
                    draft: draft.clone(),
                    ..ctx.clone()
                };
                let cfg = if draft.is_some() {
                    Config::Draft
                } else {
                    Config::Plain
                };
                let r = ember_generate(&c, &teacher, &prompt, cfg)?;
                if k == 0 {
                    plain_tokens.get_or_insert(r.tokens.clone());
                }
                let run = &mut runs[k];
                run.tps.push(r.tps);
                run.drafted += r.drafted;
                run.accepted += r.accepted;
                if k > 0 && plain_tokens.as_ref().is_some_and(|p| *p != r.tokens) {
                    run.mismatches.push(format!("{name} round {round}"));
                }
                eprintln!(
                    "  {name} round {round} {label}: {:.1} tok/s, accepted {}/{}",
                    r.tps, r.accepted, r.drafted
                );
            }
        }
        if let Some(plain) = &plain_tokens {
            let ids = tokenize(&ember, &teacher, &prompt)?;
            for (k, (_, draft)) in drafts.iter().enumerate() {
                if let Some(d) = draft {
                    runs[k].agree = agreement(&ember, d, &ids, plain)?;
                    runs[k].positions = plain.len();
                }
            }
        }
        let plain_best = best_median(&mut runs[0].tps.clone()).0;
        for (k, run) in runs.iter().enumerate() {
            let (best, median) = best_median(&mut run.tps.clone());
            rows.push(json!({
                "workload": name,
                "draft": drafts[k].0,
                "tps_best": best,
                "tps_median": median,
                "speedup_best": best / plain_best.max(1e-9),
                "drafted": run.drafted,
                "accepted": run.accepted,
                "acceptance": run.accepted as f64 / run.drafted.max(1) as f64,
                "agreement": run.agree as f64 / run.positions.max(1) as f64,
                "mismatches": run.mismatches,
            }));
            let total = &mut all[k];
            total.drafted += run.drafted;
            total.accepted += run.accepted;
            total.agree += run.agree;
            total.positions += run.positions;
            total.mismatches.extend(run.mismatches.iter().cloned());
        }
    }

    let summary = json!({
        "date": utc_minute(started),
        "teacher": a.model,
        "layers": a.layers,
        "settings": {
            "self_generate": a.self_generate, "gen_tokens": a.gen_tokens, "seq_len": a.seq_len,
            "steps": a.steps, "batch": a.batch, "lr": a.lr, "type": a.out_type,
            "threads": a.threads, "n": a.n, "rounds": a.rounds,
        },
        "wall_s": { "pruned_and_data": pruned_s, "student": student_s },
        "pruned": pruned,
        "student": student,
        "draft_rows": rows,
        "acceptance": {
            "pruned": all[1].accepted as f64 / all[1].drafted.max(1) as f64,
            "student": all[2].accepted as f64 / all[2].drafted.max(1) as f64,
        },
        "agreement": {
            "pruned": all[1].agree as f64 / all[1].positions.max(1) as f64,
            "student": all[2].agree as f64 / all[2].positions.max(1) as f64,
        },
        "mismatches": all.iter().flat_map(|r| r.mismatches.clone()).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    print_summary(&summary);
    eprintln!("wrote {}/{{summary.json,loss.csv,loss.png}}", out.display());
    if !all.iter().all(|r| r.mismatches.is_empty()) {
        bail!("greedy speculation changed the tokens: see summary.json's mismatches");
    }
    Ok(())
}

fn read_losses(csv: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(csv)?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect())
}

fn print_summary(s: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    println!(
        "## bench-distill ({}, {})\n",
        s["teacher"].as_str().unwrap_or(""),
        s["date"].as_str().unwrap_or("")
    );
    println!("| model | layers | MiB | held-out ppl | pp64 t/s | tg32 t/s |");
    println!("|---|---|---|---|---|---|");
    for (name, r, who) in [
        ("teacher", &s["student"], "teacher"),
        ("pruned copy", &s["pruned"], "student"),
        ("trained student", &s["student"], "student"),
    ] {
        let m = &r[who];
        println!(
            "| {name} | {} | {:.1} | {} | {} | {} |",
            m["layers"],
            m["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            f(&m["perplexity"]),
            f(&m["prompt_tokens_per_s"]),
            f(&m["gen_tokens_per_s"])
        );
    }
    let t = &s["student"]["training"];
    println!(
        "\ntraining: {} steps, {} tokens in {:.0} s: {:.1} tok/s (forward {:.0} s, backward {:.0} s, optimizer {:.0} s); loss {} -> {}\n",
        t["steps"],
        t["tokens"],
        t["seconds"].as_f64().unwrap_or(0.0),
        t["tokens_per_s"].as_f64().unwrap_or(0.0),
        t["forward_s"].as_f64().unwrap_or(0.0),
        t["backward_s"].as_f64().unwrap_or(0.0),
        t["optimizer_s"].as_f64().unwrap_or(0.0),
        f(&t["first_loss"]),
        f(&t["last_loss"])
    );
    println!(
        "| workload | draft | agreement (greedy) | engine acceptance | tok/s best | median | speedup (best) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in s["draft_rows"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {:.1}% | {:.1}% ({}/{}) | {} | {} | {}x |",
            r["workload"].as_str().unwrap_or(""),
            r["draft"].as_str().unwrap_or(""),
            100.0 * r["agreement"].as_f64().unwrap_or(0.0),
            100.0 * r["acceptance"].as_f64().unwrap_or(0.0),
            r["accepted"],
            r["drafted"],
            f(&r["tps_best"]),
            f(&r["tps_median"]),
            f(&r["speedup_best"])
        );
    }
    println!(
        "\nover all workloads: agreement (greedy per-token acceptance) pruned {:.1}%, trained \
         {:.1}%; engine acceptance pruned {:.1}%, trained {:.1}%",
        100.0 * s["agreement"]["pruned"].as_f64().unwrap_or(0.0),
        100.0 * s["agreement"]["student"].as_f64().unwrap_or(0.0),
        100.0 * s["acceptance"]["pruned"].as_f64().unwrap_or(0.0),
        100.0 * s["acceptance"]["student"].as_f64().unwrap_or(0.0)
    );
}

/// The loss curve as a PNG. Drawn here into a pixel buffer and encoded with `png` (a line
/// chart with a few numeric labels does not need a plotting library's font stack, which would
/// need the system's fontconfig).
mod plot {
    use std::path::Path;

    use anyhow::Result;

    const W: usize = 800;
    const H: usize = 480;
    const LEFT: usize = 70;
    const RIGHT: usize = 20;
    const TOP: usize = 20;
    const BOTTOM: usize = 50;

    /// 3x5 glyphs, one row of 3 bits per line, top line first.
    fn glyph(c: char) -> Option<[u8; 5]> {
        Some(match c {
            '0' => [7, 5, 5, 5, 7],
            '1' => [2, 6, 2, 2, 7],
            '2' => [7, 1, 7, 4, 7],
            '3' => [7, 1, 7, 1, 7],
            '4' => [5, 5, 7, 1, 1],
            '5' => [7, 4, 7, 1, 7],
            '6' => [7, 4, 7, 5, 7],
            '7' => [7, 1, 1, 1, 1],
            '8' => [7, 5, 7, 5, 7],
            '9' => [7, 5, 7, 1, 7],
            '.' => [0, 0, 0, 0, 2],
            '-' => [0, 0, 7, 0, 0],
            _ => return None,
        })
    }

    struct Canvas(Vec<u8>);

    impl Canvas {
        fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
            if x < W && y < H {
                let i = 3 * (y * W + x);
                self.0[i..i + 3].copy_from_slice(&rgb);
            }
        }

        fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
            let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
            for i in 0..=n {
                let t = i as f64 / n as f64;
                let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
                for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                    self.set(x as usize + dx, y as usize + dy, rgb);
                }
            }
        }

        /// Text of digits, '.', '-', 3x scaled, its top left at (x, y).
        fn text(&mut self, x: usize, y: usize, s: &str) {
            for (k, c) in s.chars().enumerate() {
                let Some(g) = glyph(c) else { continue };
                for (row, bits) in g.iter().enumerate() {
                    for col in 0..3 {
                        if bits & (4 >> col) != 0 {
                            for dy in 0..3 {
                                for dx in 0..3 {
                                    self.set(x + k * 12 + col * 3 + dx, y + row * 3 + dy, [0; 3]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `points`: (step, loss). Axes from step 0 and loss 0 to their maxima, the curve in blue,
    /// ticks labelled with numbers.
    pub fn write_png(path: &Path, points: &[(f64, f64)]) -> Result<()> {
        let mut c = Canvas(vec![255; W * H * 3]);
        let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
        let max_y = points.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.05;
        let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
        let at = |x: f64, y: f64| {
            (
                LEFT as f64 + x / max_x * pw,
                TOP as f64 + (1.0 - y / max_y) * ph,
            )
        };
        for i in 0..=4 {
            let y = max_y * i as f64 / 4.0;
            let (_, py) = at(0.0, y);
            c.line((LEFT as f64, py), (W as f64 - RIGHT as f64, py), [220; 3]);
            c.text(4, (py as usize).saturating_sub(7), &format!("{y:.1}"));
            let x = max_x * i as f64 / 4.0;
            let (px, _) = at(x, 0.0);
            c.line((px, TOP as f64), (px, (H - BOTTOM) as f64), [220; 3]);
            c.text(
                (px as usize).saturating_sub(12),
                H - BOTTOM + 10,
                &format!("{x:.0}"),
            );
        }
        c.line(at(0.0, 0.0), at(max_x, 0.0), [0; 3]);
        c.line(at(0.0, 0.0), at(0.0, max_y), [0; 3]);
        for w in points.windows(2) {
            c.line(at(w[0].0, w[0].1), at(w[1].0, w[1].1), [31, 90, 200]);
        }
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut enc = png::Encoder::new(file, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&c.0)?;
        Ok(())
    }
}
