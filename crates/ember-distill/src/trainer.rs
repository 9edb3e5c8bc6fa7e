//! The training loop: AdamW on burn's autodiff, warmup + cosine, gradient accumulation,
//! seeded data order, checkpoints and resume.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::{DistillError, Student, TeacherCache, WarmupCosine, kl_topk};

/// How to train.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Chunks per micro-batch.
    pub batch: usize,
    /// Micro-batches whose gradients are summed into one step.
    pub accumulation: usize,
    /// The learning-rate schedule.
    pub schedule: WarmupCosine,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Softmax temperature of the KL term.
    pub temperature: f32,
    /// Weight of the hard-label cross-entropy (next token) added to the KL; 0 for none.
    pub hard_weight: f32,
    /// Clip the gradient to this global L2 norm (over every parameter at once, as PyTorch's
    /// `clip_grad_norm_`) before each step; `None` for no clipping.
    pub clip: Option<f32>,
    /// Seeds the data order.
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end) into `checkpoint_dir`.
    pub save_every: Option<usize>,
    /// Where checkpoints go.
    pub checkpoint_dir: Option<PathBuf>,
    /// Saved with every checkpoint (`job.json`): what a resumed run must agree with
    /// ([`crate::checkpoint_manifest`] reads it back).
    pub manifest: Option<String>,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step just taken (1-based).
    pub step: usize,
    /// Its mean loss over the micro-batches.
    pub loss: f32,
    /// Its learning rate.
    pub lr: f64,
    /// Tokens it trained on.
    pub tokens: usize,
    /// The global L2 norm of its gradient, before clipping.
    pub grad_norm: f32,
    /// Seconds in forward passes (loss included), backward passes and the optimizer.
    pub forward_s: f64,
    /// See `forward_s`.
    pub backward_s: f64,
    /// See `forward_s`.
    pub optimizer_s: f64,
}

/// A seeded permutation of `0..n` (splitmix64 + Fisher-Yates): the data order of one epoch.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// The chunk indices of micro-batch `m` (counted from the start of the run): epochs of
/// seeded permutations laid end to end, so a resumed run draws the same chunks.
fn micro_batch(m: usize, batch: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut epoch: Option<(usize, Vec<usize>)> = None;
    for i in m * batch..(m + 1) * batch {
        let e = i / n;
        if epoch.as_ref().is_none_or(|(have, _)| *have != e) {
            epoch = Some((e, permutation(n, epoch_seed(seed, e as u64))));
        }
        if let Some((_, p)) = &epoch {
            out.push(p[i % n]);
        }
    }
    out
}

/// The seed of epoch `epoch`: `(seed, epoch)` mixed, so that runs with neighbouring seeds do
/// not share epochs.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut z = seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

struct Batch {
    tokens: Tensor<2, Int>,
    ids: Tensor<3, Int>,
    logits: Tensor<3>,
    /// The next token at each position but the last, `[b, s - 1, 1]`.
    targets: Tensor<3, Int>,
}

fn make_batch(data: &TeacherCache, chunks: &[usize], device: &Device) -> Batch {
    let (b, s, k) = (chunks.len(), data.seq_len, data.k);
    let mut tokens = Vec::with_capacity(b * s);
    let mut ids = Vec::with_capacity(b * s * k);
    let mut logits = Vec::with_capacity(b * s * k);
    let mut targets = Vec::with_capacity(b * (s - 1).max(1));
    for &c in chunks {
        tokens.extend(data.tokens[c].iter().map(|&t| i64::from(t)));
        ids.extend(data.top[c].ids.iter().map(|&t| i64::from(t)));
        logits.extend_from_slice(&data.top[c].logits);
        targets.extend(data.tokens[c][1..].iter().map(|&t| i64::from(t)));
    }
    Batch {
        tokens: Tensor::from_data(TensorData::new(tokens, [b, s]), device),
        ids: Tensor::from_data(TensorData::new(ids, [b, s, k]), device),
        logits: Tensor::from_data(TensorData::new(logits, [b, s, k]), device),
        targets: Tensor::from_data(TensorData::new(targets, [b, s - 1, 1]), device),
    }
}

/// Sums the squares of every parameter's gradient.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sum += f64::from(scalar(g.powf_scalar(2.0).sum()));
        }
    }
}

/// Multiplies every parameter's gradient by `by`.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    by: f32,
}

impl ModuleVisitor for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.by));
        }
    }
}

/// The gradient's global L2 norm; when `max` is given and the norm exceeds it, every
/// gradient is scaled by `max / norm` (burn's own clipping is per tensor).
fn clip_global(student: &Student, grads: &mut GradientsParams, max: Option<f32>) -> f32 {
    let mut norm = SquaredNorm { grads, sum: 0.0 };
    student.visit(&mut norm);
    let norm = norm.sum.sqrt() as f32;
    if let Some(max) = max
        && norm > max
    {
        student.visit(&mut ScaleGrads {
            grads,
            by: max / norm,
        });
    }
    norm
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data()
        .try_to_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}

/// Checks the cache against the student before any tensor is built from it.
fn check_data(student: &Student, data: &TeacherCache) -> Result<(), DistillError> {
    let v = student.config().n_vocab as u32;
    if data.is_empty() {
        return Err(DistillError::Data("the data set is empty".into()));
    }
    if data.seq_len < 2 {
        return Err(DistillError::Data("chunks need at least 2 tokens".into()));
    }
    for (i, (tokens, top)) in data.tokens.iter().zip(&data.top).enumerate() {
        let shapes_ok = tokens.len() == data.seq_len
            && top.k == data.k
            && top.ids.len() == data.seq_len * data.k
            && top.logits.len() == data.seq_len * data.k;
        if !shapes_ok {
            return Err(DistillError::Data(format!("chunk {i} has the wrong size")));
        }
        if let Some(t) = tokens.iter().chain(&top.ids).find(|&&t| t >= v) {
            return Err(DistillError::Data(format!(
                "chunk {i} holds token {t}, outside the student's vocabulary ({v})"
            )));
        }
        if top.logits.iter().any(|x| !x.is_finite()) {
            return Err(DistillError::Data(format!(
                "chunk {i} holds a non-finite logit"
            )));
        }
    }
    Ok(())
}

/// Trains `student` on `data` from step `start` (0, or the step a checkpoint was written at)
/// with `optim` (fresh, or loaded with that checkpoint). `on_step` sees every step's report;
/// [`ControlFlow::Break`] stops the run after a checkpoint (when checkpoints are configured).
/// Returns the student (not tracked: ready to export) and the last step taken.
pub fn train(
    student: Student,
    optim: Option<ModuleOptimizer>,
    start: usize,
    data: &TeacherCache,
    config: &TrainConfig,
    device: &Device,
    mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<(Student, usize), DistillError> {
    if config.batch == 0 || config.accumulation == 0 {
        return Err(DistillError::Data(
            "batch and accumulation must be at least 1".into(),
        ));
    }
    if !(config.temperature.is_finite() && config.temperature > 0.0) {
        return Err(DistillError::Data(format!(
            "temperature {} must be a finite number above 0",
            config.temperature
        )));
    }
    if !(config.hard_weight.is_finite() && config.hard_weight >= 0.0) {
        return Err(DistillError::Data(format!(
            "hard-label weight {} must be a finite number, at least 0",
            config.hard_weight
        )));
    }
    if let Some(c) = config.clip
        && !(c.is_finite() && c > 0.0)
    {
        return Err(DistillError::Data(format!(
            "gradient clipping norm {c} must be a finite number above 0"
        )));
    }
    check_data(&student, data)?;
    let ad = device.clone().autodiff();
    let mut student = student.train();
    let mut optim = optim.unwrap_or_else(|| {
        AdamWConfig::new()
            .with_weight_decay(config.weight_decay)
            .with_epsilon(1e-8)
            .init()
    });
    let save = |student: &Student, optim: &ModuleOptimizer, step: usize| match &config
        .checkpoint_dir
    {
        Some(dir) => crate::save_checkpoint(dir, student, optim, step, config.manifest.as_deref()),
        None => Ok(()),
    };
    let mut step = start;
    while step < config.steps {
        let lr = config.schedule.at(step);
        let mut acc = GradientsAccumulator::new();
        let (mut fwd, mut bwd, mut loss_sum) = (0.0, 0.0, 0.0);
        for a in 0..config.accumulation {
            let m = step * config.accumulation + a;
            let chunks = micro_batch(m, config.batch, data.len(), config.seed);
            let b = make_batch(data, &chunks, &ad);
            let t0 = Instant::now();
            let logits = student.forward(b.tokens);
            let [bs, s, v] = logits.dims();
            let mut loss = kl_topk(logits.clone(), b.ids, b.logits, config.temperature);
            if config.hard_weight > 0.0 {
                let next = logits.narrow(1, 0, s - 1);
                let ce = log_softmax(next, 2)
                    .gather(2, b.targets)
                    .sum()
                    .neg()
                    .div_scalar((bs * (s - 1)) as f32);
                loss = loss + ce.mul_scalar(config.hard_weight);
            }
            let _ = v;
            let loss = loss.div_scalar(config.accumulation as f32);
            let value = scalar(loss.clone());
            if !value.is_finite() {
                // Never let AdamW apply a NaN: stop with the last checkpoint intact.
                return Err(DistillError::Data(format!(
                    "the loss is {value} at step {} (learning rate too high?)",
                    step + 1
                )));
            }
            loss_sum += value * config.accumulation as f32;
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(loss.backward(), &student);
            acc.accumulate(&student, grads);
            fwd += (t1 - t0).as_secs_f64();
            bwd += t1.elapsed().as_secs_f64();
        }
        let t2 = Instant::now();
        let mut grads = acc.grads();
        let grad_norm = clip_global(&student, &mut grads, config.clip);
        if !grad_norm.is_finite() {
            return Err(DistillError::Data(format!(
                "the gradient norm is {grad_norm} at step {} (learning rate too high?)",
                step + 1
            )));
        }
        student = optim.step(lr, student, grads);
        let opt = t2.elapsed().as_secs_f64();
        step += 1;
        let report = StepReport {
            step,
            loss: loss_sum / config.accumulation as f32,
            lr,
            tokens: config.batch * config.accumulation * data.seq_len,
            grad_norm,
            forward_s: fwd,
            backward_s: bwd,
            optimizer_s: opt,
        };
        let stop = on_step(&report).is_break();
        let due = config
            .save_every
            .is_some_and(|e| e > 0 && step.is_multiple_of(e));
        if due || stop || step == config.steps {
            save(&student, &optim, step)?;
        }
        if stop {
            break;
        }
    }
    Ok((student.valid(), step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_seeded_and_covers_every_chunk_each_epoch() {
        let n = 7;
        let epoch: Vec<usize> = (0..n).flat_map(|m| micro_batch(m, 1, n, 42)).collect();
        let mut sorted = epoch.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        assert_eq!(micro_batch(3, 2, n, 42), micro_batch(3, 2, n, 42));
        assert_ne!(
            (0..n)
                .flat_map(|m| micro_batch(m, 1, n, 42))
                .collect::<Vec<_>>(),
            (0..n)
                .flat_map(|m| micro_batch(m, 1, n, 43))
                .collect::<Vec<_>>()
        );
    }
}
