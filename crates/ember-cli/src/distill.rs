//! `ember distill`: flags to an [`ember_distill::Job`], a progress bar, Ctrl-C to a checkpoint.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};
use clap::Args;
use ember_distill::{Event, ExportType, Job, Layers, Outcome, TrainSettings};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct DistillArgs {
    /// The teacher: a GGUF path or a model name from the manifest (llama-family).
    #[arg(
        short = 'm',
        long = "model",
        default_value = "smollm2-135m-instruct-q4_1"
    )]
    model: String,
    /// The student GGUF to write (through a temporary file renamed at the end).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Student layers: this many of the teacher's, spread evenly, first and last included.
    #[arg(
        long,
        conflicts_with = "keep_layers",
        required_unless_present = "keep_layers"
    )]
    layers: Option<usize>,
    /// Student layers: exactly these of the teacher's (0-based, increasing), e.g. 0,3,7.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    keep_layers: Option<Vec<usize>>,
    /// A narrower feed-forward: keep this many hidden units per layer (those with the largest
    /// weight norms); default the teacher's width.
    #[arg(long, value_parser = at_least_one)]
    ffn: Option<usize>,
    /// Text files to train on, tokenized with the teacher's tokenizer.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Also train on this many of the teacher's own answers (sampled, seeded).
    #[arg(long, default_value_t = 0)]
    self_generate: usize,
    /// Prompts for --self-generate, one per line (default: a built-in list of 40).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Tokens per generated answer, at most.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    gen_tokens: usize,
    /// Tokens per training sequence (at most the teacher's context).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Teacher logits cached per position (the KL runs over these, renormalised).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    top_k: usize,
    /// Share of the sequences held out of training for the report's perplexity.
    #[arg(long, default_value_t = 0.05)]
    holdout: f64,
    /// Optimizer steps; 0 exports the student as initialised from the teacher's layers (the
    /// untrained, layer-pruned copy).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    batch: usize,
    /// Micro-batches whose gradients make one step.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    accumulation: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 3e-4, value_parser = positive)]
    lr: f64,
    /// Learning rate at the end of the cosine decay (default: --lr / 10).
    #[arg(long, value_parser = non_negative)]
    min_lr: Option<f64>,
    /// Linear warm-up steps (default: a tenth of --steps, at most 100).
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    weight_decay: f64,
    /// Softmax temperature of the KL term (its loss is scaled by T^2).
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    temperature: f64,
    /// Weight of the hard-label (next token) cross-entropy added to the KL.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    hard_weight: f64,
    /// Clip the gradient's global L2 norm to this; 0 for no clipping.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    clip: f64,
    /// Seeds the data order and the generations: equal seeds, equal runs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write a checkpoint every this many steps (one is always written at the end and on
    /// Ctrl-C).
    #[arg(long, value_parser = at_least_one)]
    save_every: Option<usize>,
    /// Where checkpoints go (default: OUTPUT.ckpt).
    #[arg(long, conflicts_with = "resume")]
    checkpoint_dir: Option<PathBuf>,
    /// Continue the run whose checkpoint is in DIR, bit for bit (same flags required).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Stop after this step (with a checkpoint) and exit 0; continue later with --resume.
    #[arg(long, value_name = "STEP", value_parser = at_least_one)]
    stop_at: Option<usize>,
    /// Where the teacher's top-k is cached (default: OUTPUT.topk); reused when made the same
    /// way.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The student's matrix type.
    #[arg(long = "type", default_value = "q8_0", value_parser = export_type)]
    out_type: ExportType,
    /// After training, measure the report (held-out perplexity, speed and size of both
    /// models, acceptance as the teacher's draft) into OUTPUT.report.json and print it.
    #[arg(long)]
    report: bool,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: expected a whole number of at least 1")),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?}: expected a finite number above 0")),
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?}: expected a finite number, at least 0")),
    }
}

fn export_type(s: &str) -> Result<ExportType, String> {
    ExportType::from_name(s)
        .ok_or_else(|| format!("{s:?}: expected one of {}", ExportType::NAMES.join(", ")))
}

fn suffixed(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Ctrl-C presses so far: the first asks for a checkpoint and a clean stop, the second ends
/// the process at once.
fn interrupts() -> Result<Arc<AtomicUsize>> {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    ctrlc::set_handler(move || {
        if c.fetch_add(1, Ordering::SeqCst) >= 1 {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: stopping at the next safe point (after this training step, with a \
             checkpoint); Ctrl-C again to quit now"
        );
    })?;
    Ok(count)
}

fn bar(len: usize, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

pub fn run(a: DistillArgs) -> Result<()> {
    let teacher = ember_hub::resolve(&a.model)?;
    let device = ember_models::default_device();
    let layers = match (&a.keep_layers, a.layers) {
        (Some(keep), _) => Layers::Keep(keep.clone()),
        (None, Some(n)) => Layers::Count(n),
        (None, None) => bail!("give --layers N or --keep-layers L,..."),
    };
    let (checkpoints, resume) = match &a.resume {
        Some(dir) => (dir.clone(), true),
        None => (
            a.checkpoint_dir
                .clone()
                .unwrap_or_else(|| suffixed(&a.output, ".ckpt")),
            false,
        ),
    };
    let job = Job {
        teacher,
        layers,
        n_ff: a.ffn,
        data: a.data.clone(),
        self_generate: a.self_generate,
        prompts: a.prompts.clone(),
        gen_tokens: a.gen_tokens,
        seq_len: a.seq_len,
        top_k: a.top_k,
        holdout: a.holdout,
        train: TrainSettings {
            steps: a.steps,
            batch: a.batch,
            accumulation: a.accumulation,
            lr: a.lr,
            min_lr: a.min_lr.unwrap_or(a.lr / 10.0),
            warmup: a.warmup.unwrap_or((a.steps / 10).min(100)),
            weight_decay: a.weight_decay as f32,
            temperature: a.temperature as f32,
            hard_weight: a.hard_weight as f32,
            clip: (a.clip > 0.0).then_some(a.clip as f32),
            seed: a.seed,
        },
        save_every: a.save_every,
        checkpoints: checkpoints.clone(),
        resume,
        stop_at: a.stop_at,
        cache: a
            .cache
            .clone()
            .unwrap_or_else(|| suffixed(&a.output, ".topk")),
        output: a.output.clone(),
        out_type: a.out_type,
        report: a.report,
    };
    // The handler is in place before the first line is printed (a test waits for that line to
    // send SIGINT).
    let stop = interrupts()?;
    eprintln!("distilling {}", job.teacher.display());
    let mut pb = ProgressBar::hidden();
    let mut phase = String::new();
    let mut phase_total = 0usize;
    let mut logged = 0usize;
    let log_every = (a.steps / 50).max(1);
    let outcome = job.run(&device, |event| {
        match event {
            Event::Phase(name, total) => {
                pb.finish_and_clear();
                phase = name.to_string();
                phase_total = total;
                logged = 0;
                pb = match name {
                    "train" => bar(total, "train [{bar:30}] {pos}/{len} steps {msg} ETA {eta}"),
                    _ if total > 0 => bar(
                        total,
                        &format!("{name} [{{bar:30}}] {{pos}}/{{len}} ETA {{eta}}"),
                    ),
                    _ => {
                        eprintln!("{name}...");
                        ProgressBar::hidden()
                    }
                };
            }
            Event::Progress(done) => {
                pb.set_position(done as u64);
                // Without a terminal, the long data phases log every tenth (training logs
                // its steps itself).
                let tenth = done * 10 / phase_total.max(1);
                if pb.is_hidden() && phase != "train" && phase_total > 0 && tenth > logged {
                    logged = tenth;
                    eprintln!("{phase}: {done}/{phase_total}");
                }
            }
            Event::Step(r) => {
                let secs = r.forward_s + r.backward_s + r.optimizer_s;
                let line = format!(
                    "loss {:.4} lr {:.2e} |g| {:.2} {:.0} tok/s",
                    r.loss,
                    r.lr,
                    r.grad_norm,
                    r.tokens as f64 / secs.max(1e-9)
                );
                if pb.is_hidden() {
                    if r.step % log_every == 0 || r.step == a.steps {
                        eprintln!("step {}/{}: {line}", r.step, a.steps);
                    }
                } else {
                    pb.set_message(line);
                }
            }
            Event::Note(msg) => pb.suspend(|| eprintln!("{msg}")),
        }
        if stop.load(Ordering::SeqCst) > 0
            && matches!(phase.as_str(), "train" | "generate" | "teacher")
        {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    pb.finish_and_clear();
    let outcome = match outcome {
        Err(ember_distill::DistillError::Interrupted) => {
            eprintln!("error: {}", ember_distill::DistillError::Interrupted);
            std::process::exit(130);
        }
        other => other?,
    };
    match outcome {
        Outcome::Stopped { step, by_caller } => {
            eprintln!(
                "stopped at step {step}: checkpoint in {}; continue with --resume {} and the \
                 other flags unchanged (leave out --checkpoint-dir and --stop-at)",
                checkpoints.display(),
                checkpoints.display()
            );
            if by_caller {
                // As a shell reports a command ended by SIGINT.
                std::process::exit(130);
            }
        }
        Outcome::Done { step, report } => {
            eprintln!("trained {step} steps; wrote {}", a.output.display());
            if let Some(r) = report {
                print_report(&r);
                eprintln!("report: {}", suffixed(&a.output, ".report.json").display());
            }
        }
    }
    Ok(())
}

fn print_report(r: &ember_distill::report::Report) {
    let ppl = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.3}"));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{:<8} {:>6} {:>10} {:>12} {:>10} {:>10}",
        "model", "layers", "MiB", "perplexity", "pp64 t/s", "tg32 t/s"
    );
    for (name, m) in [("teacher", &r.teacher), ("student", &r.student)] {
        println!(
            "{:<8} {:>6} {:>10.1} {:>12} {:>10.1} {:>10.1}",
            name,
            m.layers,
            mib(m.bytes),
            ppl(m.perplexity),
            m.prompt_tokens_per_s,
            m.gen_tokens_per_s
        );
    }
    println!(
        "held-out tokens: {}; as draft (--spec draft, greedy, {} prompts): agrees with {:.1}% \
         of the teacher's tokens; the engine accepted {:.1}% ({}/{}), {:.1} -> {:.1} tok/s \
         ({:.2}x), same tokens: {}",
        r.held_out_tokens,
        r.draft.prompts,
        100.0 * r.draft.agreement,
        100.0 * r.draft.acceptance,
        r.draft.accepted,
        r.draft.drafted,
        r.draft.plain_tokens_per_s,
        r.draft.spec_tokens_per_s,
        r.draft.speedup,
        r.draft.same_tokens
    );
    let t = &r.training;
    println!(
        "training: {} steps, {} tokens, {:.1} tok/s (forward {:.0}s, backward {:.0}s, \
         optimizer {:.0}s), loss {} -> {}",
        t.steps,
        t.tokens,
        t.tokens_per_s,
        t.forward_s,
        t.backward_s,
        t.optimizer_s,
        t.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        t.last_loss.map_or("-".into(), |l| format!("{l:.4}"))
    );
}
