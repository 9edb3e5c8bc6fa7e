//! A whole distillation run, as `ember distill` does it: data, the teacher's cached top-k,
//! the student, training with checkpoints and resume, the GGUF export and the report.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use ember_runtime::loaded::LoadedModel;
use serde::Serialize;

use crate::corpus::{BUILTIN_PROMPTS, EVAL_PROMPTS, read_prompts, self_generate, text_documents};
use crate::report::{Report, TrainingFigures, evaluate};
use crate::{
    DistillError, ExportType, Fnv, StepReport, Student, TeacherCache, TrainConfig, WarmupCosine,
    checkpoint_manifest, export_gguf, load_checkpoint, teacher_id, train,
};

/// Everything a run is told.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// The teacher GGUF.
    pub teacher: PathBuf,
    /// The teacher's layers the student keeps.
    pub layers: Layers,
    /// A narrower feed-forward for the student (`None`: the teacher's width).
    pub n_ff: Option<usize>,
    /// Text files to train on.
    pub data: Vec<PathBuf>,
    /// Teacher generations to add to the data.
    pub self_generate: usize,
    /// Prompts for them, one per line (`None`: [`BUILTIN_PROMPTS`]).
    pub prompts: Option<PathBuf>,
    /// Tokens per generation, at most.
    pub gen_tokens: usize,
    /// Tokens per training chunk.
    pub seq_len: usize,
    /// Teacher logits kept per position.
    pub top_k: usize,
    /// Share of the chunks held out of training for the report's perplexity (the last ones).
    pub holdout: f64,
    /// Optimizer steps, micro-batch size, accumulation, schedule, loss and clipping.
    pub train: TrainSettings,
    /// Checkpoint every this many steps (besides the end and an interruption).
    pub save_every: Option<usize>,
    /// Where checkpoints go (and, with `resume`, where the run continues from).
    pub checkpoints: PathBuf,
    /// Continue from the checkpoint in `checkpoints`.
    pub resume: bool,
    /// Stop after this step with a checkpoint, to continue later with `resume` (a run cut
    /// into pieces; the pieces give what one unbroken run gives).
    pub stop_at: Option<usize>,
    /// Where the teacher's top-k cache is kept (reused when it was made the same way).
    pub cache: PathBuf,
    /// The student GGUF to write.
    pub output: PathBuf,
    /// Its matrices' type.
    pub out_type: ExportType,
    /// Measure and write the report (`<output>.report.json`).
    pub report: bool,
}

/// Which of the teacher's layers a student keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum Layers {
    /// This many, spread evenly with the first and last included
    /// ([`spread_layers`](crate::corpus::spread_layers)).
    Count(usize),
    /// Exactly these (0-based, increasing).
    Keep(Vec<usize>),
}

/// The training hyper-parameters of a [`Job`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Chunks per micro-batch.
    pub batch: usize,
    /// Micro-batches per step.
    pub accumulation: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW's weight decay.
    pub weight_decay: f32,
    /// KL temperature.
    pub temperature: f32,
    /// Hard-label cross-entropy weight.
    pub hard_weight: f32,
    /// Global gradient-norm clip.
    pub clip: Option<f32>,
    /// Data-order seed (and self-generation's).
    pub seed: u64,
}

/// What a run reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A phase begins (`total` units of work: chunks, generations, steps; 0 when unknown).
    Phase(&'a str, usize),
    /// `done` units of the current phase are finished.
    Progress(usize),
    /// An optimizer step was taken.
    Step(&'a StepReport),
    /// Something worth a line of output.
    Note(String),
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Trained to the last step and exported.
    Done {
        /// The step reached.
        step: usize,
        /// The report, when asked for.
        report: Option<Box<Report>>,
    },
    /// Stopped before the last step, after a checkpoint: by the caller (an [`Event::Step`]
    /// answered with `Break`) or at [`Job::stop_at`].
    Stopped {
        /// The step the checkpoint holds.
        step: usize,
        /// Whether the caller asked (rather than `stop_at`).
        by_caller: bool,
    },
}

/// What a resumed run must agree with, saved with every checkpoint as `job.json`.
#[derive(Debug, Serialize)]
struct Manifest<'a> {
    teacher_id: String,
    layers: &'a [usize],
    n_ff: Option<usize>,
    data_hash: String,
    chunks: usize,
    seq_len: usize,
    top_k: usize,
    train: &'a TrainSettings,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Fails early, before anything is computed, when `output` cannot be written: a missing
/// directory, no permission, or a directory in its place.
fn check_writable(output: &Path) -> Result<(), DistillError> {
    let err = |why: String| DistillError::Write {
        path: output.display().to_string(),
        why,
    };
    if output.is_dir() {
        return Err(err("it is a directory".into()));
    }
    let probe = with_suffix(output, ".partial");
    std::fs::File::create(&probe).map_err(|e| err(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

impl Job {
    /// The recipe hash of the data: the teacher, every data file's bytes, the generation
    /// settings and prompts, the chunking. Equal recipes make equal caches.
    fn recipe(&self, teacher: u64, prompts: &[String]) -> Result<u64, DistillError> {
        let mut h = Fnv::new();
        h.eat(&teacher.to_le_bytes());
        for p in &self.data {
            let bytes = std::fs::read(p)
                .map_err(|e| DistillError::Data(format!("{}: {e}", p.display())))?;
            h.eat(&(bytes.len() as u64).to_le_bytes());
            h.eat(&bytes);
        }
        for v in [self.seq_len, self.top_k, self.self_generate] {
            h.eat(&(v as u64).to_le_bytes());
        }
        // What the generations depend on, only when there are any.
        if self.self_generate > 0 {
            h.eat(&(self.gen_tokens as u64).to_le_bytes());
            h.eat(&self.train.seed.to_le_bytes());
            for p in prompts {
                h.eat(p.as_bytes());
                h.eat(&[0]);
            }
        }
        Ok(h.finish())
    }

    /// Runs the job: see the module docs. An error before the export leaves no file at
    /// `output` (the file is written whole and renamed).
    pub fn run(
        &self,
        device: &Device,
        mut on: impl FnMut(Event) -> ControlFlow<()>,
    ) -> Result<Outcome, DistillError> {
        check_writable(&self.output)?;
        if self.resume {
            checkpoint_manifest(&self.checkpoints)?;
        } else {
            crate::check_checkpoint_dir(&self.checkpoints)?;
        }
        if self.cache.exists() && !crate::data::is_teacher_cache(&self.cache) {
            return Err(DistillError::Data(format!(
                "{} is not a teacher cache: give another --cache path (it would be replaced)",
                self.cache.display()
            )));
        }
        // Sizes that would be allocated up front.
        let t = &self.train;
        let limits = [
            ("--self-generate", self.self_generate, 1_000_000),
            ("--batch", t.batch, 65_536),
            ("--accumulation", t.accumulation, 65_536),
            ("--steps", t.steps, 100_000_000),
            ("--top-k", self.top_k, 65_536),
        ];
        for (flag, value, max) in limits {
            if value > max {
                return Err(DistillError::Data(format!("{flag} {value} is above {max}")));
            }
        }
        if self.data.is_empty() && self.self_generate == 0 {
            return Err(DistillError::Data(
                "no data: give text files (--data) and/or --self-generate N".into(),
            ));
        }
        if !(0.0..0.9).contains(&self.holdout) {
            return Err(DistillError::Data(format!(
                "a held-out share of {}: it must be at least 0 and below 0.9",
                self.holdout
            )));
        }
        let teacher = LoadedModel::open(&self.teacher, device)
            .map_err(|e| DistillError::Data(format!("{}: {e}", self.teacher.display())))?;
        if teacher.external.is_some() {
            return Err(DistillError::UnsupportedArchitecture(
                "checkpoint directory (convert it to GGUF first: cargo xtask convert)".into(),
            ));
        }
        let n_layer = teacher.model.config().n_layer;
        let layers = match &self.layers {
            Layers::Count(n) => crate::corpus::spread_layers(n_layer, *n)?,
            Layers::Keep(keep) => keep.clone(),
        };
        crate::corpus::check_layers(&layers, n_layer)?;
        let _ = on(Event::Note(format!(
            "student: {} of the teacher's {n_layer} layers {layers:?}",
            layers.len()
        )));
        let ctx = teacher.model.config().context_length;
        if self.seq_len < 2 || self.seq_len > ctx {
            return Err(DistillError::Data(format!(
                "a sequence length of {}: it must be at least 2 and at most the teacher's \
                 context ({ctx})",
                self.seq_len
            )));
        }
        // The student is built first: an unsupported teacher fails before any data work.
        let student = Student::from_teacher_narrow(&teacher.file, &layers, self.n_ff, device)?;
        let tid = teacher_id(teacher.file.bytes());
        let prompts = match &self.prompts {
            Some(p) if self.self_generate > 0 => read_prompts(p)?,
            _ => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
        };
        let recipe = self.recipe(tid, &prompts)?;
        let cache = self.teacher_cache(&teacher, tid, recipe, &prompts, &mut on)?;
        let n_hold = (cache.len() as f64 * self.holdout).ceil() as usize;
        let n_train = cache.len() - n_hold.min(cache.len());
        if n_train == 0 {
            return Err(DistillError::Data(format!(
                "{} chunks of {} tokens leave none to train on after holding out {n_hold}",
                cache.len(),
                self.seq_len
            )));
        }
        let train_data = cache.head(n_train);
        let held: Vec<&[u32]> = cache.tokens[n_train..].iter().map(Vec::as_slice).collect();
        let _ = on(Event::Note(format!(
            "{} training chunks of {} tokens ({} tokens), {} held out",
            n_train,
            self.seq_len,
            n_train * self.seq_len,
            held.len()
        )));

        let manifest = serde_json::to_string_pretty(&Manifest {
            teacher_id: format!("{tid:016x}"),
            layers: &layers,
            n_ff: self.n_ff,
            data_hash: format!("{:016x}", train_data.tokens_hash()),
            chunks: n_train,
            seq_len: self.seq_len,
            top_k: self.top_k,
            train: &self.train,
        })
        .map_err(|e| DistillError::Data(e.to_string()))?;
        let config = TrainConfig {
            steps: t.steps,
            batch: t.batch,
            accumulation: t.accumulation,
            schedule: WarmupCosine {
                peak: t.lr,
                min: t.min_lr,
                warmup: t.warmup,
                total: t.steps,
            },
            weight_decay: t.weight_decay,
            temperature: t.temperature,
            hard_weight: t.hard_weight,
            clip: t.clip,
            seed: t.seed,
            save_every: self.save_every,
            checkpoint_dir: Some(self.checkpoints.clone()),
            manifest: Some(manifest.clone()),
        };
        let optim = burn::optim::AdamWConfig::new()
            .with_weight_decay(t.weight_decay)
            .with_epsilon(1e-8)
            .init();
        let (student, optim, start) = if self.resume {
            check_manifest(&self.checkpoints, &manifest)?;
            let (s, o, step) = load_checkpoint(&self.checkpoints, student, optim)?;
            if let Some(stop) = self.stop_at
                && stop <= step
            {
                return Err(DistillError::Resume(format!(
                    "--stop-at {stop} is not after the checkpoint's step {step}"
                )));
            }
            let _ = on(Event::Note(format!(
                "resuming at step {step} from {}",
                self.checkpoints.display()
            )));
            (s, Some(o), step)
        } else {
            (student, None, 0)
        };

        let csv_path = with_suffix(&self.output, ".train.csv");
        let mut csv = LossCsv::open(&csv_path, start)?;
        let _ = on(Event::Phase("train", t.steps));
        let _ = on(Event::Progress(start));
        let mut figures = TrainingFigures::default();
        let started = Instant::now();
        let mut by_caller = false;
        let stop_at = self.stop_at;
        let (student, step) = train(student, optim, start, &train_data, &config, device, |r| {
            figures.add(r);
            csv.row(r);
            let _ = on(Event::Progress(r.step));
            by_caller = on(Event::Step(r)).is_break();
            if by_caller || stop_at.is_some_and(|s| r.step >= s) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        figures.seconds = started.elapsed().as_secs_f64();
        csv.finish()?;
        if step < t.steps {
            return Ok(Outcome::Stopped { step, by_caller });
        }

        let _ = on(Event::Phase("export", 0));
        export_gguf(&student, &teacher.file, &self.output, self.out_type)?;
        let _ = on(Event::Note(format!(
            "wrote {} ({} layers, {})",
            self.output.display(),
            layers.len(),
            self.out_type.name()
        )));
        let report = if self.report {
            let _ = on(Event::Phase("report", 0));
            let eval_prompts: Vec<String> = EVAL_PROMPTS.iter().map(|p| p.to_string()).collect();
            let report = evaluate(
                &teacher,
                &self.teacher,
                &self.output,
                &held,
                &eval_prompts,
                figures,
                device,
                |msg| {
                    let _ = on(Event::Note(msg));
                },
            )?;
            let path = with_suffix(&self.output, ".report.json");
            let json = serde_json::to_string_pretty(&report)
                .map_err(|e| DistillError::Data(e.to_string()))?;
            std::fs::write(&path, json + "\n").map_err(|e| DistillError::Write {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
            Some(Box::new(report))
        } else {
            None
        };
        Ok(Outcome::Done { step, report })
    }

    /// The teacher's top-k over the run's data: read from `cache` when it was made by the same
    /// teacher from the same recipe, else made (texts tokenized, generations sampled, the
    /// teacher run over every chunk) and saved there.
    fn teacher_cache(
        &self,
        teacher: &LoadedModel,
        tid: u64,
        recipe: u64,
        prompts: &[String],
        on: &mut impl FnMut(Event) -> ControlFlow<()>,
    ) -> Result<TeacherCache, DistillError> {
        if self.cache.exists() {
            match TeacherCache::load(&self.cache) {
                Ok(c)
                    if c.teacher == tid
                        && c.recipe == recipe
                        && c.seq_len == self.seq_len
                        && c.k == self.top_k =>
                {
                    let _ = on(Event::Note(format!(
                        "teacher top-{} reused from {}",
                        self.top_k,
                        self.cache.display()
                    )));
                    return Ok(c);
                }
                _ => {
                    let _ = on(Event::Note(format!(
                        "{} was made another way: making it again",
                        self.cache.display()
                    )));
                }
            }
        }
        let mut docs = text_documents(teacher, &self.data)?;
        if self.self_generate > 0 {
            let _ = on(Event::Phase("generate", self.self_generate));
            let mut interrupted = false;
            docs.extend(self_generate(
                teacher,
                prompts,
                self.self_generate,
                self.gen_tokens,
                self.train.seed,
                |done, _| {
                    interrupted = on(Event::Progress(done)).is_break();
                    !interrupted
                },
            )?);
            if interrupted {
                return Err(DistillError::Interrupted);
            }
        }
        let tokens: Vec<u32> = docs.into_iter().flatten().collect();
        if tokens.len() < self.seq_len {
            return Err(DistillError::Data(format!(
                "the data holds {} tokens, less than one chunk of {}",
                tokens.len(),
                self.seq_len
            )));
        }
        let chunks = tokens.len() / self.seq_len;
        let _ = on(Event::Phase("teacher", chunks));
        let mut cache = TeacherCache::build(
            &teacher.model,
            tid,
            &tokens,
            self.seq_len,
            self.top_k,
            |done, _| on(Event::Progress(done)).is_continue(),
        )?;
        cache.recipe = recipe;
        cache.save(&self.cache)?;
        Ok(cache)
    }
}

/// Refuses to resume from a checkpoint whose run differs from this one, naming what differs.
fn check_manifest(dir: &Path, ours: &str) -> Result<(), DistillError> {
    let theirs = checkpoint_manifest(dir)?.ok_or_else(|| {
        DistillError::Resume(format!(
            "{} has no job.json: it was not written by a distillation run",
            dir.display()
        ))
    })?;
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
    let (Some(a), Some(b)) = (parse(ours), parse(&theirs)) else {
        return Err(DistillError::Resume(format!(
            "{}/job.json is not readable JSON",
            dir.display()
        )));
    };
    let mut differ = Vec::new();
    diff("", &a, &b, &mut differ);
    if differ.is_empty() {
        Ok(())
    } else {
        Err(DistillError::Resume(format!(
            "the checkpoint in {} is from another configuration: {}",
            dir.display(),
            differ.join(", ")
        )))
    }
}

/// The paths at which two JSON values differ, with both values.
fn diff(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            let null = serde_json::Value::Null;
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                diff(
                    &path,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{at} is {a} here but {b} there")),
        _ => {}
    }
}

/// The per-step log, `<output>.train.csv`: kept across a resume (rows after the step resumed
/// from are dropped, as that run is replaced), so it always holds one run's curve.
struct LossCsv {
    path: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
    error: Option<std::io::Error>,
}

const CSV_HEADER: &str =
    "step,loss,lr,grad_norm,tokens,forward_s,backward_s,optimizer_s,tokens_per_s";

impl LossCsv {
    fn open(path: &Path, start: usize) -> Result<Self, DistillError> {
        let err = |e: std::io::Error| DistillError::Write {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        let mut kept = String::from(CSV_HEADER);
        kept.push('\n');
        if start > 0
            && let Ok(old) = std::fs::read_to_string(path)
        {
            for line in old.lines().skip(1) {
                let step = line.split(',').next().and_then(|s| s.parse::<usize>().ok());
                if step.is_some_and(|s| s <= start) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        let mut f = std::fs::File::create(path).map_err(err)?;
        f.write_all(kept.as_bytes()).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: Some(std::io::BufWriter::new(f)),
            error: None,
        })
    }

    fn row(&mut self, r: &StepReport) {
        let secs = r.forward_s + r.backward_s + r.optimizer_s;
        if let Some(out) = &mut self.out
            && let Err(e) = writeln!(
                out,
                "{},{},{},{},{},{:.4},{:.4},{:.4},{:.1}",
                r.step,
                r.loss,
                r.lr,
                r.grad_norm,
                r.tokens,
                r.forward_s,
                r.backward_s,
                r.optimizer_s,
                r.tokens as f64 / secs.max(1e-9)
            )
            .and_then(|_| out.flush())
        {
            self.error.get_or_insert(e);
        }
    }

    fn finish(mut self) -> Result<(), DistillError> {
        drop(self.out.take());
        match self.error {
            Some(e) => Err(DistillError::Write {
                path: self.path.display().to_string(),
                why: e.to_string(),
            }),
            None => Ok(()),
        }
    }
}
