//! A Gemma 3 checkpoint directory runs: Gemma 3 270M exported to a Hugging Face F16 directory
//! (norms stored as `w`, not GGUF's `1 + w`) loads with `LoadedModel::open` and gives the
//! logits of the same directory converted back to GGUF.

use std::path::Path;

use ember_convert::QuantizeOptions;
use ember_formats::GgufFile;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_models::testing::ScratchDir;
use ember_quant::GgmlType;
use ember_runtime::eval::teacher_forced_logits;
use ember_runtime::loaded::LoadedModel;

/// A fresh directory under the target dir's tmp, removed after the test.
fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(
        env!("CARGO_TARGET_TMPDIR"),
        &format!("checkpoint-gemma3-{name}"),
    )
}

fn open(path: &Path) -> LoadedModel {
    LoadedModel::open(path, &ember_models::default_device())
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
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

/// The directory (F16 matrices read in place, norms shifted to `1 + w` into the in-memory
/// image) against its conversion to an F16 GGUF (the same f16 matrices, the same f32 norms):
/// the same weights through the same kernels, so the logits agree to rounding.
#[test]
fn gemma3_f16_directory_matches_its_gguf_conversion() {
    let root = scratch("f16");
    let gguf = GgufFile::open(ember_hub::resolve("gemma3-270m-q4_k_m").expect("Gemma 3 270M"))
        .expect("open Gemma 3 270M");
    let dir = root.join("hf");
    ember_convert::gguf_to_hf(&gguf, &dir, StDtype::F16, &mut |_| {}).expect("export");
    drop(gguf);
    let gguf_path = root.join("model.gguf");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    ember_convert::hf_to_gguf(
        &ckpt,
        &gguf_path,
        &QuantizeOptions::new(GgmlType::F16),
        &mut |_| {},
    )
    .expect("convert");
    drop(ckpt);

    let from_dir = open(&dir);
    let from_gguf = open(&gguf_path);
    assert_eq!(from_dir.model.config().architecture, "gemma3");
    let text = "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published \
                four papers that changed physics: on the photoelectric effect, Brownian motion, \
                special relativity and the equivalence of mass and energy. fn main() { \
                println!(\"hello\"); } Les élèves étudient à l'école; 日本語のテキスト. \
                The mitochondria is the powerhouse of the cell, and water boils at 100 degrees \
                Celsius at sea level.";
    let tokens = from_dir.tokenize_prompt(text).expect("tokenize");
    assert_eq!(tokens, from_gguf.tokenize_prompt(text).expect("tokenize"));
    assert!(tokens.len() >= 90, "{} tokens", tokens.len());
    let a = teacher_forced_logits(&from_dir.model, &tokens, 512).expect("dir logits");
    let b = teacher_forced_logits(&from_gguf.model, &tokens, 512).expect("gguf logits");
    let mut max_diff = 0f32;
    let mut max_abs = 0f32;
    let mut same_top = 0;
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            max_diff = max_diff.max((p - q).abs());
            max_abs = max_abs.max(p.abs());
        }
        same_top += usize::from(argmax(x) == argmax(y));
    }
    let n = tokens.len();
    eprintln!(
        "gemma3 dir vs gguf: {n} tokens, max |dlogit| {max_diff} (max |logit| {max_abs}), \
         same argmax at {same_top}/{n}"
    );
    // Both run the same f16 matrices and the same f32 `1 + w` norms (f16(w) + 1 in f32 on
    // either side), so only the order of floating-point sums could differ. A norm left
    // unshifted (w instead of 1 + w) or a wrong tensor moves whole logits by units.
    assert!(max_diff < 1e-2, "max |dlogit| {max_diff}");
    assert_eq!(same_top, n, "argmax agrees at {same_top}/{n}");

    // And they are Gemma: the original Q4_K_M file (the same values before the f16 rounding
    // of the export, run with 8-bit activations) predicts the same next tokens nearly always.
    let orig = open(&ember_hub::resolve("gemma3-270m-q4_k_m").expect("Gemma 3 270M"));
    let c = teacher_forced_logits(&orig.model, &tokens, 512).expect("original logits");
    let agree = a
        .iter()
        .zip(&c)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    eprintln!("gemma3 dir vs original Q4_K_M: same argmax at {agree}/{n}");
    assert!(
        agree * 10 >= n * 9,
        "argmax agrees with the original at {agree}/{n}"
    );
}
