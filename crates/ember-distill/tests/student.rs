//! The student computes what Ember's inference model computes: SmolLM2 (the real teacher)
//! made into a student of all its layers, of a third of them, and of a third with half the
//! feed-forward units, exported to an F32 GGUF and
//! run by ember-models; the student's own forward pass gives the same logits to the
//! rounding of the inference model's f16 KV cache.

use burn::tensor::{Int, Tensor, TensorData};
use ember_distill::{ExportType, Student, export_gguf};
use ember_formats::GgufFile;
use ember_models::testing::ScratchDir;
use ember_runtime::eval::teacher_forced_logits;
use ember_runtime::loaded::LoadedModel;

fn teacher() -> GgufFile {
    let path = ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("SmolLM2");
    GgufFile::open(path).expect("open SmolLM2")
}

fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), &format!("distill-{name}"))
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[test]
fn students_give_the_logits_of_their_exported_gguf() {
    let teacher = teacher();
    let device = ember_models::default_device();
    let loaded_teacher = LoadedModel::open(
        &ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("SmolLM2"),
        &device,
    )
    .expect("load teacher");
    let tokens = loaded_teacher
        .tokenize_prompt("The quick brown fox jumps over the lazy dog, and then it runs away.")
        .expect("tokenize");
    let n = tokens.len();
    for (name, keep, n_ff) in [
        ("all", (0..30).collect::<Vec<usize>>(), None),
        ("third", (0..30).step_by(3).collect(), None),
        // A narrower feed-forward (half the units): the export's feed_forward_length says so.
        ("narrow", (0..30).step_by(3).collect(), Some(768)),
    ] {
        let student =
            Student::from_teacher_narrow(&teacher, &keep, n_ff, &device).expect("student");
        assert_eq!(student.config().n_layer, keep.len());
        assert_eq!(student.config().n_ff, n_ff.unwrap_or(1536));
        let dir = scratch(name);
        let path = dir.join("student.gguf");
        export_gguf(&student, &teacher, &path, ExportType::F32).expect("export");
        let exported = LoadedModel::open(&path, &device).expect("Ember loads the export");
        assert_eq!(exported.model.config().n_layer, keep.len());
        assert_eq!(exported.model.config().n_ff, n_ff.unwrap_or(1536));

        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let logits = student.forward(input);
        let [_, t, v] = logits.dims();
        let ours: Vec<f32> = logits.into_data().try_to_vec::<f32>().expect("f32 logits");
        let theirs = teacher_forced_logits(&exported.model, &tokens, 512).expect("ember logits");
        assert_eq!((t, theirs.len()), (n, n));
        let mut worst = 0f32;
        let mut same = 0;
        for (pos, row) in theirs.iter().enumerate() {
            let mine = &ours[pos * v..(pos + 1) * v];
            let spread = row.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
            for (a, b) in mine.iter().zip(row) {
                worst = worst.max((a - b).abs() / spread);
            }
            same += usize::from(argmax(mine) == argmax(row));
        }
        eprintln!("{name}: worst |dlogit|/max|logit| {worst:.2e}, argmax equal {same}/{n}");
        assert!(worst < 1e-2, "{name}: {worst}");
        assert!(same + 1 >= n, "{name}: argmax {same}/{n}");
    }
}

/// A teacher whose blocks the student cannot copy (a bias, linear RoPE scaling, RoPE frequency
/// factors, all of which ember-models runs for llama) is refused by name, not copied without
/// them.
#[test]
fn a_teacher_with_parts_the_student_lacks_is_refused() {
    use ember_formats::{GgufWriter, MetaValue};
    use ember_models::testing::tiny::{self, TinyArch, TinyDtype};
    use ember_quant::GgmlType;
    let file =
        GgufFile::from_bytes(tiny::gguf(TinyArch::Mistral, TinyDtype::F32).unwrap()).expect("gguf");
    let device = ember_models::default_device();
    assert!(Student::from_teacher(&file, &[0], &device).is_ok());
    let with = |key: Option<(&str, MetaValue)>, tensor: Option<(&str, usize)>| {
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata() {
            w.add(k.clone(), v.clone());
        }
        if let Some((k, v)) = key {
            w.add(k, v);
        }
        for t in file.tensors() {
            w.add_tensor(&t.name, &t.dims, t.ggml_type, file.tensor_data(t))
                .expect("copy");
        }
        if let Some((name, len)) = tensor {
            w.add_tensor(name, &[len as u64], GgmlType::F32, vec![0u8; 4 * len])
                .expect("tensor");
        }
        GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf")
    };
    for (what, teacher) in [
        ("bias", with(None, Some(("blk.0.attn_output.bias", 64)))),
        (
            "scaling",
            with(
                Some(("llama.rope.scaling.factor", MetaValue::F32(4.0))),
                None,
            ),
        ),
        ("rope_freqs", with(None, Some(("rope_freqs.weight", 8)))),
    ] {
        let err = Student::from_teacher(&teacher, &[0], &device)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains(what)),
            "{what}: {err:?}"
        );
    }
}
