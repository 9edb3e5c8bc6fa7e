//! The training pipeline end to end on SmolLM2: the teacher's top-k cache built, saved and
//! read back (and refused when damaged), a run stopped at a checkpoint and resumed equal bit
//! for bit to an unbroken one, the loss going down.

use std::ops::ControlFlow;
use std::path::PathBuf;

use ember_distill::{
    Student, TeacherCache, TrainConfig, WarmupCosine, load_checkpoint, teacher_id, train,
};
use ember_formats::GgufFile;
use ember_models::testing::ScratchDir;
use ember_runtime::loaded::LoadedModel;

fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), &format!("distill-{name}"))
}

fn config(dir: Option<PathBuf>) -> TrainConfig {
    TrainConfig {
        steps: 6,
        batch: 2,
        accumulation: 2,
        schedule: WarmupCosine {
            peak: 2e-4,
            min: 2e-5,
            warmup: 2,
            total: 6,
        },
        weight_decay: 0.01,
        temperature: 2.0,
        hard_weight: 0.1,
        clip: Some(1.0),
        seed: 7,
        save_every: Some(3),
        checkpoint_dir: dir,
        manifest: Some("{}".into()),
    }
}

#[test]
fn cache_train_stop_resume() {
    let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("SmolLM2");
    let device = ember_models::default_device();
    let teacher = LoadedModel::open(&path, &device).expect("teacher");
    let file = GgufFile::open(&path).expect("open");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/perplexity-psf-license.txt"
    ))
    .expect("text");
    let tokens = teacher.tokenize_prompt(&text).expect("tokenize");
    let id = teacher_id(file.bytes());
    let mut seen = 0;
    let cache = TeacherCache::build(&teacher.model, id, &tokens[..5 * 40 + 7], 40, 16, |d, _| {
        seen = d;
        true
    })
    .expect("cache");
    assert_eq!((cache.len(), seen), (5, 5));

    let dir = scratch("pipeline");
    let cache_path = dir.join("teacher.topk");
    cache.save(&cache_path).expect("save cache");
    assert_eq!(TeacherCache::load(&cache_path).expect("load cache"), cache);
    let bytes = std::fs::read(&cache_path).expect("read");
    let cut = dir.join("cut.topk");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).expect("write");
    let e = TeacherCache::load(&cut).expect_err("a truncated cache");
    assert!(e.to_string().contains("bytes"), "{e}");
    let mut huge = bytes.clone();
    huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&cut, &huge).expect("write");
    assert!(TeacherCache::load(&cut).is_err());

    let keep = [0, 29];
    let fresh = || Student::from_teacher(&file, &keep, &device).expect("student");
    let mut losses = Vec::new();
    let (straight, last) = train(fresh(), None, 0, &cache, &config(None), &device, |r| {
        losses.push(r.loss);
        ControlFlow::Continue(())
    })
    .expect("train");
    assert_eq!(last, 6);
    eprintln!("losses {losses:?}");
    assert!(losses[5] < losses[0], "{losses:?}");

    // Stopped after step 3 (a checkpoint is written on stopping), then resumed.
    let ck = dir.join("ck");
    let (_, stopped) = train(
        fresh(),
        None,
        0,
        &cache,
        &config(Some(ck.clone())),
        &device,
        |r| {
            if r.step == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .expect("train to 3");
    assert_eq!(stopped, 3);
    let optim = burn::optim::AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init();
    let (student, optim, step) = load_checkpoint(&ck, fresh(), optim).expect("resume");
    assert_eq!(step, 3);
    let (resumed, last) = train(
        student,
        Some(optim),
        step,
        &cache,
        &config(Some(ck)),
        &device,
        |_| ControlFlow::Continue(()),
    )
    .expect("resume to 6");
    assert_eq!(last, 6);
    for ((name, _, a), (_, _, b)) in straight.tensors().iter().zip(&resumed.tensors()) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after resuming"
        );
    }
}
