//! Training moves the student toward the teacher: a 3-layer SmolLM2 student, trained with
//! AdamW on burn's autodiff against the teacher's top-k logits over a few chunks of text,
//! ends with a lower KL to the teacher than it started with, on the chunks it trained on and
//! on a held-out one.

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Int, Tensor, TensorData};
use ember_distill::{Student, TopK, kl_topk};
use ember_formats::GgufFile;
use ember_runtime::eval::teacher_forced_logits;
use ember_runtime::loaded::LoadedModel;

const SEQ: usize = 48;
const K: usize = 32;

fn batch(
    chunk: &[u32],
    top: &TopK,
    device: &burn::tensor::Device,
) -> (Tensor<2, Int>, Tensor<3, Int>, Tensor<3>) {
    let n = chunk.len();
    let tokens: Vec<i64> = chunk.iter().map(|&t| i64::from(t)).collect();
    let ids: Vec<i64> = top.ids.iter().map(|&t| i64::from(t)).collect();
    (
        Tensor::from_data(TensorData::new(tokens, [1, n]), device),
        Tensor::from_data(TensorData::new(ids, [1, n, K]), device),
        Tensor::from_data(TensorData::new(top.logits.clone(), [1, n, K]), device),
    )
}

fn loss_of(student: &Student, data: &[(Vec<u32>, TopK)], device: &burn::tensor::Device) -> f32 {
    let mut total = 0.0;
    for (chunk, top) in data {
        let (t, i, l) = batch(chunk, top, device);
        let v: Vec<f32> = kl_topk(student.forward(t), i, l, 1.0)
            .into_data()
            .try_to_vec::<f32>()
            .expect("loss");
        total += v[0];
    }
    total / data.len() as f32
}

#[test]
fn adamw_on_autodiff_lowers_the_kl_to_the_teacher() {
    let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("SmolLM2");
    let device = ember_models::default_device();
    let teacher = LoadedModel::open(&path, &device).expect("teacher");
    let file = GgufFile::open(&path).expect("open");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/perplexity-psf-license.txt"
    ))
    .expect("held text");
    let tokens = teacher.tokenize_prompt(&text).expect("tokenize");
    let chunks: Vec<Vec<u32>> = tokens
        .chunks_exact(SEQ)
        .take(5)
        .map(<[u32]>::to_vec)
        .collect();
    assert_eq!(chunks.len(), 5);
    let data: Vec<(Vec<u32>, TopK)> = chunks
        .into_iter()
        .map(|c| {
            let rows = teacher_forced_logits(&teacher.model, &c, 512).expect("teacher logits");
            let top = TopK::from_rows(&rows, K);
            (c, top)
        })
        .collect();
    let (train, held) = data.split_at(4);

    let student = Student::from_teacher(&file, &[0, 15, 29], &device).expect("student");
    let before = (
        loss_of(&student, train, &device),
        loss_of(&student, held, &device),
    );
    // `train` moves the parameters onto the autodiff form of their device, tracked.
    let mut student = student.train();
    let ad = device.clone().autodiff();
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    for step in 0..12 {
        let (chunk, top) = &train[step % train.len()];
        let (t, i, l) = batch(chunk, top, &ad);
        let loss = kl_topk(student.forward(t), i, l, 1.0);
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        student = optim.step(2e-4, student, grads);
    }
    let student = student.valid();
    let after = (
        loss_of(&student, train, &device),
        loss_of(&student, held, &device),
    );
    eprintln!(
        "KL train {:.4} -> {:.4}, held {:.4} -> {:.4}",
        before.0, after.0, before.1, after.1
    );
    assert!(after.0 < 0.8 * before.0, "train KL {before:?} -> {after:?}");
    assert!(after.1 < before.1, "held KL {before:?} -> {after:?}");
}

/// A run stopped after two steps and resumed from its checkpoint ends where an unbroken run
/// of four steps ends, bit for bit: parameters and AdamW's moments survive the round trip.
#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("SmolLM2");
    let device = ember_models::default_device();
    let teacher = LoadedModel::open(&path, &device).expect("teacher");
    let file = GgufFile::open(&path).expect("open");
    let tokens = teacher
        .tokenize_prompt("Resuming a run must give the very same parameters as never stopping it.")
        .expect("tokenize");
    let rows = teacher_forced_logits(&teacher.model, &tokens, 512).expect("teacher logits");
    let top = TopK::from_rows(&rows, K);
    let ad = device.clone().autodiff();
    let steps = |mut student: Student, mut optim: burn::optim::ModuleOptimizer, n: usize| {
        for _ in 0..n {
            let (t, i, l) = batch(&tokens, &top, &ad);
            let loss = kl_topk(student.forward(t), i, l, 1.0);
            let grads = GradientsParams::from_grads(loss.backward(), &student);
            student = optim.step(1e-4, student, grads);
        }
        (student, optim)
    };
    let fresh = || Student::from_teacher(&file, &[0, 29], &device).expect("student");
    let config = AdamWConfig::new().with_weight_decay(0.01);
    let (straight, _) = steps(fresh().train(), config.init(), 4);

    let root =
        ember_models::testing::ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), "distill-resume");
    let dir = root.join("ck");
    let (half, optim) = steps(fresh().train(), config.init(), 2);
    ember_distill::save_checkpoint(&dir, &half, &optim, 2, None).expect("save");
    drop((half, optim));
    let (student, optim, step) =
        ember_distill::load_checkpoint(&dir, fresh(), config.init()).expect("load");
    assert_eq!(step, 2);
    let (resumed, _) = steps(student, optim, 2);

    let (a, b) = (straight.valid().tensors(), resumed.valid().tensors());
    assert_eq!(a.len(), b.len());
    for ((name, _, x), (_, _, y)) in a.iter().zip(&b) {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name} differs after resuming");
    }
}
