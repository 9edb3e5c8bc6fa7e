//! Checkpoint directories run: SmolLM2 exported to a Hugging Face directory (F16, and AWQ,
//! GPTQ, EXL2 and compressed-tensors packs made by ember-convert's writers) loads with
//! `LoadedModel::open`, gives the logits of the same weights converted to GGUF, runs its
//! packed layers as the dequantized ones do, and keeps perplexity within a bound set by its
//! bits.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ember_convert::{GroupSize, QuantWriteFormat, QuantWriteOptions, QuantizeOptions};
use ember_formats::GgufFile;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_models::testing::ScratchDir;
use ember_quant::GgmlType;
use ember_runtime::eval::{perplexity, prompt_then_step_logits, teacher_forced_logits};
use ember_runtime::loaded::{LoadOptions, LoadedModel};

fn smollm2() -> PathBuf {
    ember_hub::resolve("smollm2-135m-instruct-q4_1").expect("SmolLM2 from the manifest")
}

/// A fresh directory under the target dir's tmp, removed after the test.
fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), &format!("checkpoint-{name}"))
}

/// SmolLM2's weights as an F16 checkpoint directory (made once per test binary, shared by its
/// tests, so it stays: statics are never dropped).
fn f16_dir() -> &'static Path {
    static DIR: OnceLock<(ScratchDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let gguf = GgufFile::open(smollm2()).expect("open SmolLM2");
        let root = scratch("f16");
        let dir = root.join("hf");
        ember_convert::gguf_to_hf(&gguf, &dir, StDtype::F16, &mut |_| {}).expect("export");
        (root, dir)
    })
    .1
}

/// The quantized export and its scratch root, which removes it when dropped.
fn quantized_dir(name: &str, opts: QuantWriteOptions) -> (ScratchDir, PathBuf) {
    let gguf = GgufFile::open(smollm2()).expect("open SmolLM2");
    let root = scratch(name);
    let dir = root.join("hf");
    ember_convert::gguf_to_quantized_hf(&gguf, &dir, &opts, &mut |_| {}).expect("export");
    (root, dir)
}

fn open(path: &Path, dequantize: bool) -> LoadedModel {
    LoadedModel::open_with(
        path,
        &ember_models::default_device(),
        &LoadOptions {
            dequantize,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn held_text_tokens(m: &LoadedModel) -> Vec<u32> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("tests/fixtures/perplexity-psf-license.txt"))
        .expect("held text");
    m.tokenize_prompt(&text).expect("tokenize")
}

fn ppl(m: &LoadedModel, tokens: &[u32]) -> f64 {
    let bos = if m.tokenizer.add_bos() {
        m.tokenizer.bos_id()
    } else {
        None
    };
    perplexity(&m.model, tokens, 512, bos, |_, _, _| {})
        .expect("perplexity")
        .ppl
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

/// The directory (Hugging Face Q/K order, NeoX rotation, weights read in place) against the
/// same directory converted to an F16 GGUF (Q/K permuted, interleaved rotation): the same
/// arithmetic up to the order of the attention dot products' sums.
#[test]
fn f16_directory_matches_its_gguf_conversion() {
    let dir = f16_dir();
    let from_dir = open(dir, false);
    assert!(from_dir.scheme.is_none());
    let scratch_dir = scratch("f16-gguf");
    let gguf_path = scratch_dir.join("model.gguf");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    ember_convert::hf_to_gguf(
        &ckpt,
        &gguf_path,
        &QuantizeOptions::new(GgmlType::F16),
        &mut |_| {},
    )
    .expect("convert");
    let from_gguf = open(&gguf_path, false);
    // 600 tokens: two ubatches of the teacher-forced pass.
    let tokens: Vec<u32> = held_text_tokens(&from_dir)[..600].to_vec();
    let a = teacher_forced_logits(&from_dir.model, &tokens, 512).expect("dir logits");
    let b = teacher_forced_logits(&from_gguf.model, &tokens, 512).expect("gguf logits");
    let mut max_diff = 0f32;
    let mut same_top = 0;
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            max_diff = max_diff.max((p - q).abs());
        }
        same_top += usize::from(argmax(x) == argmax(y));
    }
    eprintln!("dir vs gguf: max |dlogit| {max_diff}, same argmax at {same_top}/600");
    // Seen: 0.016 on logits of magnitude ~20. The rotations differ in how their angles are
    // rounded (NeoX and interleaved kernels), and 30 layers amplify it; a wrong weight or
    // head order would change whole logits.
    assert!(max_diff < 5e-2, "max |dlogit| {max_diff}");
    assert!(same_top >= 597, "argmax agrees at {same_top}/600");
}

/// Each quantized format: the packed kernels against the dequantize-at-load weights on a
/// prompt and 16 single-token decode steps, and perplexity on a held text at ctx 512 against
/// the F16 directory's.
///
/// The perplexity bound: round-to-nearest noise has variance proportional to 4^-bits, and for
/// small noise ln(ppl_q / ppl_f16) grows with it, so the bound is
/// `ln(ppl_q / ppl_f16) <= 0.75 * 4^(4 - bits)`: a ratio of at most 2.12 at 4 bits and 20 at
/// 3 bits per weight. SmolLM2's weights are themselves Q4_1 (4-bit, groups of 32), so every
/// format here quantizes an already 4-bit grid onto another one: that is why the ratios are
/// larger than the same formats on an original f16 model.
#[test]
fn quantized_directories_run_packed_within_their_bounds() {
    let f16 = open(f16_dir(), false);
    let tokens = held_text_tokens(&f16);
    let base = ppl(&f16, &tokens);
    eprintln!("f16 directory: ppl {base:.4}");
    let gptq = |bits, g, act_order| QuantWriteOptions {
        format: QuantWriteFormat::Gptq {
            act_order,
            sym: true,
            v2: false,
        },
        bits,
        group_size: GroupSize::Size(g),
    };
    let cases: Vec<(&str, QuantWriteOptions, f64)> = vec![
        (
            "awq4-g64",
            QuantWriteOptions {
                format: QuantWriteFormat::Awq,
                bits: 4,
                group_size: GroupSize::Size(64),
            },
            4.0,
        ),
        // 128 does not divide SmolLM2's 576 inputs: GPTQ's last group is short.
        ("gptq4-g128-act", gptq(4, 128, true), 4.0),
        (
            "exl2-4.0",
            QuantWriteOptions {
                format: QuantWriteFormat::Exl2 { target_bpw: 4.0 },
                bits: 4,
                group_size: GroupSize::Size(64),
            },
            4.0,
        ),
        (
            "exl2-3.0",
            QuantWriteOptions {
                format: QuantWriteFormat::Exl2 { target_bpw: 3.0 },
                bits: 3,
                group_size: GroupSize::Size(64),
            },
            3.0,
        ),
        (
            "ct4-g64",
            QuantWriteOptions {
                format: QuantWriteFormat::CompressedTensors { symmetric: true },
                bits: 4,
                group_size: GroupSize::Size(64),
            },
            4.0,
        ),
    ];
    let prompt = &tokens[..40];
    let continuation = &tokens[40..56];
    // What 8-bit activations do to the same weights elsewhere: the Q4_1 GGUF (integer dots on
    // Q8_1 activations, as llama.cpp) against its own F16 export (float activations).
    let q4_1 = open(&smollm2(), false);
    let (baseline, _) = compare(&q4_1, &f16, prompt, continuation);
    eprintln!("Q4_1 GGUF vs its F16 export: worst |dlogit|/max|logit| {baseline:.2e}");
    for (name, opts, bits) in cases {
        let (_scratch, dir) = quantized_dir(name, opts);
        let packed = open(&dir, false);
        assert!(packed.scheme.is_some(), "{name}: no scheme detected");
        let dense = open(&dir, true);
        let (worst, same_top) = compare(&packed, &dense, prompt, continuation);
        let q = ppl(&packed, &tokens);
        let bound = 0.75 * 4f64.powf(4.0 - bits);
        let log_ratio = (q / base).ln();
        eprintln!(
            "{name}: ppl {q:.4} (ln ratio {log_ratio:.3}, bound {bound:.3}); packed vs \
             dequantized: worst |dlogit|/max|logit| {worst:.2e}, same argmax {same_top}/17"
        );
        // The packed kernels quantize activations to 8 bits per 32 inputs, as the Q4_1
        // kernels do, so they may move the logits by about as much. Seen: 1-2x the Q4_1
        // baseline at 4 bits, 3x for the 3-bit model (a noisier model is more sensitive). A
        // wrong code, scale or order moves logits by their own size (a ratio near 1).
        assert!(
            worst <= 4.0 * baseline,
            "{name}: packed and dequantized differ by {worst} (Q4_1's 8-bit activations: {baseline})"
        );
        // Near-ties flip under 8-bit activations (seen: 14 to 17 of 17); a wrong layout
        // leaves almost none in place.
        assert!(same_top >= 12, "{name}: argmax agrees at {same_top}/17");
        assert!(
            log_ratio <= bound,
            "{name}: ppl {q} vs f16 {base}: ln ratio {log_ratio} over the bound {bound}"
        );
    }
}

/// The worst logit difference of `a` against `b` relative to `b`'s largest logit, over a
/// prompt and single-token steps, and at how many of those positions the argmax agrees.
fn compare(a: &LoadedModel, b: &LoadedModel, prompt: &[u32], continuation: &[u32]) -> (f32, usize) {
    let x = prompt_then_step_logits(&a.model, prompt, continuation).expect("logits");
    let y = prompt_then_step_logits(&b.model, prompt, continuation).expect("logits");
    let mut worst = 0f32;
    let mut same_top = 0;
    for (p, q) in x.iter().zip(&y) {
        let spread = q.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (u, v) in p.iter().zip(q) {
            worst = worst.max((u - v).abs() / spread);
        }
        same_top += usize::from(argmax(p) == argmax(q));
    }
    (worst, same_top)
}
