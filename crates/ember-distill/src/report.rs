//! The report on a trained student: held-out perplexity, speed and size of both models, and
//! how the student does as the teacher's draft model.

use std::path::Path;

use burn::tensor::Device;
use ember_models::Model;
use ember_runtime::generate::{generate, generate_with_draft};
use ember_runtime::loaded::LoadedModel;
use ember_runtime::sampling::SamplingParams;
use ember_runtime::spec::{Proposer, SpecConfig};
use serde::Serialize;

use crate::{DistillError, StepReport};

/// How training went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainingFigures {
    /// Steps taken in this run (a resumed run counts its own).
    pub steps: usize,
    /// Tokens trained on in them.
    pub tokens: usize,
    /// Wall time of the training loop, seconds.
    pub seconds: f64,
    /// Seconds in forward passes (the loss included).
    pub forward_s: f64,
    /// Seconds in backward passes.
    pub backward_s: f64,
    /// Seconds in the optimizer (clipping included).
    pub optimizer_s: f64,
    /// The first step's loss.
    pub first_loss: Option<f32>,
    /// The last step's loss.
    pub last_loss: Option<f32>,
    /// Training tokens per second over the compute phases.
    pub tokens_per_s: f64,
}

impl TrainingFigures {
    /// Counts one step.
    pub fn add(&mut self, r: &StepReport) {
        self.steps += 1;
        self.tokens += r.tokens;
        self.forward_s += r.forward_s;
        self.backward_s += r.backward_s;
        self.optimizer_s += r.optimizer_s;
        self.first_loss.get_or_insert(r.loss);
        self.last_loss = Some(r.loss);
        self.tokens_per_s =
            self.tokens as f64 / (self.forward_s + self.backward_s + self.optimizer_s).max(1e-9);
    }
}

/// One model's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ModelFigures {
    /// The file.
    pub path: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Size on disk, bytes.
    pub bytes: u64,
    /// Perplexity on the held-out chunks (every position predicting the next token); `None`
    /// when nothing was held out.
    pub perplexity: Option<f64>,
    /// Prompt processing, tokens per second (`ember bench`'s pp64, best of 3).
    pub prompt_tokens_per_s: f64,
    /// Generation, tokens per second (`ember bench`'s tg32, best of 3).
    pub gen_tokens_per_s: f64,
}

/// The student drafting for the teacher (`--spec draft`, greedy).
#[derive(Clone, Debug, Serialize)]
pub struct DraftFigures {
    /// Prompts generated from.
    pub prompts: usize,
    /// Tokens generated over all of them (with speculation).
    pub tokens: usize,
    /// Tokens the draft proposed.
    pub drafted: u64,
    /// Proposed tokens the teacher accepted.
    pub accepted: u64,
    /// `accepted / drafted` (the engine drafts adaptively: it pauses while drafting does not
    /// pay, so this counts few drafts when the student is slow or poor).
    pub acceptance: f64,
    /// The share of the teacher's greedy tokens the student predicts (its argmax, given the
    /// same prefix): the per-token acceptance rate of greedy speculation, measured at every
    /// generated position whatever the engine's drafting policy.
    pub agreement: f64,
    /// The teacher alone: generated tokens per second of the whole request (prompt included).
    pub plain_tokens_per_s: f64,
    /// With the draft, counted the same way (the draft's prompt pass included).
    pub spec_tokens_per_s: f64,
    /// `spec / plain`.
    pub speedup: f64,
    /// Whether speculation gave exactly the teacher's tokens (it must, greedy).
    pub same_tokens: bool,
}

/// The whole report (`<output>.report.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The teacher's figures.
    pub teacher: ModelFigures,
    /// The student's.
    pub student: ModelFigures,
    /// Tokens the perplexities were measured on.
    pub held_out_tokens: usize,
    /// The student as draft model.
    pub draft: DraftFigures,
    /// Training.
    pub training: TrainingFigures,
}

fn report_err(e: impl std::fmt::Display) -> DistillError {
    DistillError::Report(e.to_string())
}

/// Perplexity of `model` over `chunks`, each run from an empty cache with every position
/// predicting the next token; `None` without chunks.
pub fn held_out_perplexity(model: &Model, chunks: &[&[u32]]) -> Result<Option<f64>, DistillError> {
    let (mut nll, mut n) = (0.0f64, 0usize);
    for chunk in chunks {
        let rows =
            ember_runtime::eval::teacher_forced_logits(model, chunk, 512).map_err(report_err)?;
        for (row, &target) in rows.iter().zip(&chunk[1..]) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
            let logit = row
                .get(target as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            nll += sum.ln() - f64::from(logit - max);
            n += 1;
        }
    }
    Ok((n > 0).then(|| (nll / n as f64).exp()))
}

fn figures(
    loaded: &LoadedModel,
    path: &Path,
    held: &[&[u32]],
) -> Result<ModelFigures, DistillError> {
    let threads = rayon_threads();
    let best = |n_prompt, n_gen| -> Result<f64, DistillError> {
        let r = ember_runtime::bench::bench(&loaded.model, n_prompt, n_gen, 3, threads)
            .map_err(report_err)?;
        Ok(r.samples_ts.iter().copied().fold(0.0, f64::max))
    };
    Ok(ModelFigures {
        path: path.display().to_string(),
        layers: loaded.model.config().n_layer,
        bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        perplexity: held_out_perplexity(&loaded.model, held)?,
        prompt_tokens_per_s: best(64, 0)?,
        gen_tokens_per_s: best(0, 32)?,
    })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `draft` proposing for `target` (`--spec draft`, the engine's default draft lengths), greedy,
/// on up to 8 of `prompts` (chat-templated; the first ones, skipping any the context cannot
/// hold) for `max_tokens` each, against `target` alone on the same prompts.
pub fn draft_figures(
    target: &LoadedModel,
    draft: &LoadedModel,
    prompts: &[String],
    max_tokens: usize,
) -> Result<DraftFigures, DistillError> {
    let template = target.chat_template().ok();
    let ctx = target.model.config().context_length;
    let mut f = DraftFigures {
        prompts: 0,
        tokens: 0,
        drafted: 0,
        accepted: 0,
        acceptance: 0.0,
        agreement: 0.0,
        plain_tokens_per_s: 0.0,
        spec_tokens_per_s: 0.0,
        speedup: 0.0,
        same_tokens: true,
    };
    let (mut plain_ms, mut spec_ms, mut plain_n) = (0.0, 0.0, 0usize);
    let (mut agree, mut positions) = (0usize, 0usize);
    for prompt in prompts.iter().take(8) {
        let prompt_tokens =
            crate::corpus::chat_prompt(target, template.as_ref(), prompt).map_err(report_err)?;
        // A prompt the context cannot hold with room to generate is skipped.
        if prompt_tokens.len() + 8 > ctx {
            continue;
        }
        let max_tokens = max_tokens.min(ctx - prompt_tokens.len());
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let ctx_size = prompt_tokens.len() + max_tokens;
        let mut req = crate::corpus::request(prompt_tokens, max_tokens, ctx_size, greedy);
        let plain = generate(&target.model, &target.tokenizer, &req, |_| {}).map_err(report_err)?;
        req.spec = SpecConfig {
            proposer: Proposer::Draft,
            ..SpecConfig::default()
        };
        let spec = generate_with_draft(target, Some(draft), &req, |_| {}).map_err(report_err)?;
        f.prompts += 1;
        f.tokens += spec.tokens.len();
        f.same_tokens &= spec.tokens == plain.tokens;
        if let Some(s) = &spec.spec {
            f.drafted += s.drafted;
            f.accepted += s.accepted;
        }
        // The student's argmax after each prefix of the teacher's greedy output.
        let mut seq = req.prompt_tokens.clone();
        seq.extend_from_slice(&plain.tokens);
        let rows = ember_runtime::eval::teacher_forced_logits(&draft.model, &seq, 512)
            .map_err(report_err)?;
        let p = req.prompt_tokens.len();
        for (i, &want) in plain.tokens.iter().enumerate() {
            let top = ember_runtime::eval::top_k(&rows[p - 1 + i], 1);
            agree += usize::from(top.first().map(|t| t.0) == Some(want));
            positions += 1;
        }
        plain_ms += plain.timings.predicted_ms + plain.timings.prompt_ms;
        spec_ms += spec.timings.predicted_ms + spec.timings.prompt_ms;
        plain_n += plain.tokens.len();
    }
    f.acceptance = f.accepted as f64 / (f.drafted.max(1)) as f64;
    f.agreement = agree as f64 / positions.max(1) as f64;
    f.plain_tokens_per_s = plain_n as f64 * 1e3 / plain_ms.max(1e-9);
    f.spec_tokens_per_s = f.tokens as f64 * 1e3 / spec_ms.max(1e-9);
    f.speedup = f.spec_tokens_per_s / f.plain_tokens_per_s.max(1e-9);
    Ok(f)
}

/// Measures the report: `teacher` (loaded from `teacher_path`) and the student GGUF at
/// `student_path` on the held-out chunks, `ember bench`'s pp64/tg32, their sizes, and the
/// student drafting for the teacher on `prompts`. `note` hears what is being measured.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    teacher: &LoadedModel,
    teacher_path: &Path,
    student_path: &Path,
    held: &[&[u32]],
    prompts: &[String],
    training: TrainingFigures,
    device: &Device,
    mut note: impl FnMut(String),
) -> Result<Report, DistillError> {
    let student = LoadedModel::open(student_path, device)
        .map_err(|e| DistillError::Report(format!("loading {}: {e}", student_path.display())))?;
    note("measuring the teacher (perplexity, pp64, tg32)".into());
    let t = figures(teacher, teacher_path, held)?;
    note("measuring the student (perplexity, pp64, tg32)".into());
    let s = figures(&student, student_path, held)?;
    note("measuring the student as the teacher's draft (--spec draft)".into());
    let draft = draft_figures(teacher, &student, prompts, 128)?;
    Ok(Report {
        teacher: t,
        student: s,
        held_out_tokens: held.iter().map(|c| c.len().saturating_sub(1)).sum(),
        draft,
        training,
    })
}
