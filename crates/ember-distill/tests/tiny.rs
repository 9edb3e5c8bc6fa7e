//! The acceptance test on a tiny random llama teacher (`ember_models::testing`, 2
//! layers, 288 tokens): a 1-layer student trained a few dozen steps on the teacher's top-k
//! lowers its loss; its GGUF export loads in Ember and gives the student's own logits; a run
//! stopped at a checkpoint and resumed ends with the same weights as an unbroken one.

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use ember_distill::{
    ExportType, Student, TeacherCache, TrainConfig, WarmupCosine, export_gguf, load_checkpoint,
    teacher_id, train,
};
use ember_formats::GgufFile;
use ember_models::testing::ScratchDir;
use ember_models::testing::tiny::{TinyArch, TinyDtype, gguf};
use ember_runtime::eval::teacher_forced_logits;
use ember_runtime::loaded::LoadedModel;

fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), &format!("distill-tiny-{name}"))
}

fn config(steps: usize, dir: Option<PathBuf>) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 4,
        accumulation: 1,
        schedule: WarmupCosine {
            peak: 3e-3,
            min: 3e-4,
            warmup: 4,
            total: steps,
        },
        weight_decay: 0.0,
        temperature: 1.0,
        hard_weight: 0.0,
        clip: Some(1.0),
        seed: 3,
        save_every: Some(10),
        checkpoint_dir: dir,
        manifest: None,
    }
}

#[test]
fn a_tiny_student_learns_exports_and_resumes() {
    let dir = scratch("run");
    let path = dir.join("teacher.gguf");
    std::fs::write(
        &path,
        gguf(TinyArch::Mistral, TinyDtype::F32).expect("tiny"),
    )
    .expect("write");
    let device = ember_models::default_device();
    let teacher = LoadedModel::open(&path, &device).expect("teacher");
    let file = GgufFile::open(&path).expect("open");
    // Pseudo-random token chunks over the whole vocabulary.
    let n_vocab = teacher.model.config().n_vocab as u64;
    let mut s = 0x1234_5678_u64;
    let tokens: Vec<u32> = (0..16 * 32)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((s >> 33) % n_vocab) as u32
        })
        .collect();
    let cache = TeacherCache::build(
        &teacher.model,
        teacher_id(file.bytes()),
        &tokens,
        32,
        16,
        |_, _| true,
    )
    .expect("cache");
    let fresh = || Student::from_teacher(&file, &[1], &device).expect("student");

    let mut losses = Vec::new();
    let (trained, last) = train(fresh(), None, 0, &cache, &config(40, None), &device, |r| {
        losses.push(r.loss);
        ControlFlow::Continue(())
    })
    .expect("train");
    assert_eq!(last, 40);
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    let (early, late) = (mean(&losses[..5]), mean(&losses[35..]));
    eprintln!("loss {early} -> {late}");
    assert!(late < 0.8 * early, "{losses:?}");

    // The export runs in Ember with the student's logits.
    let out = dir.join("student.gguf");
    export_gguf(&trained, &file, &out, ExportType::F32).expect("export");
    let exported = LoadedModel::open(&out, &device).expect("Ember loads the student");
    assert_eq!(exported.model.config().n_layer, 1);
    let chunk = &cache.tokens[0];
    let ids: Vec<i64> = chunk.iter().map(|&t| i64::from(t)).collect();
    let ours: Vec<f32> = trained
        .forward(Tensor::<2, Int>::from_data(
            TensorData::new(ids, [1, chunk.len()]),
            &device,
        ))
        .into_data()
        .try_to_vec::<f32>()
        .expect("logits");
    let theirs = teacher_forced_logits(&exported.model, chunk, 512).expect("ember logits");
    let v = n_vocab as usize;
    for (pos, row) in theirs.iter().enumerate() {
        let spread = row.iter().fold(1f32, |m, x| m.max(x.abs()));
        for (a, b) in ours[pos * v..(pos + 1) * v].iter().zip(row) {
            assert!((a - b).abs() / spread < 1e-2, "position {pos}: {a} vs {b}");
        }
    }

    // Stopped at step 15 (checkpoint), resumed to 40: the unbroken run's weights, bit for bit.
    let ck = dir.join("ck");
    let (_, stopped) = train(
        fresh(),
        None,
        0,
        &cache,
        &config(40, Some(ck.clone())),
        &device,
        |r| {
            if r.step == 15 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .expect("train to 15");
    assert_eq!(stopped, 15);
    let optim = burn::optim::AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_epsilon(1e-8)
        .init();
    let (student, optim, step) = load_checkpoint(&ck, fresh(), optim).expect("resume");
    assert_eq!(step, 15);
    let (resumed, _) = train(
        student,
        Some(optim),
        step,
        &cache,
        &config(40, Some(ck)),
        &device,
        |_| ControlFlow::Continue(()),
    )
    .expect("resume to 40");
    for ((name, _, a), (_, _, b)) in trained.tensors().iter().zip(&resumed.tensors()) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after resuming"
        );
    }
}
