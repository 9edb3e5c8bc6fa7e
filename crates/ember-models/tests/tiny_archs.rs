//! Tiny random qwen2, qwen3, phi3, Mistral-style and Llama 3-style llama models (f32 and f16
//! weights), regenerated in code byte for byte, against llama.cpp's teacher-forced logits for them
//! (`tests/fixtures/tiny/*.json`, written by `cargo xtask tiny-models`).
//!
//! Agreement: every logit within `1e-3 * m` of llama.cpp's, `m` the largest |logit| of
//! llama.cpp's row (relative to the row's scale, not to each logit: a logit near zero in a row
//! spanning +-20 carries the row's absolute rounding error).
//!
//! Most rows agree to the fixtures' 7 printed digits. The rest differ by a few 1e-5 to 2e-4
//! of the row's scale: where an f32 value (after matmuls summed in another order than
//! llama.cpp's) falls next to an f16 rounding boundary, the f16 KV cache, the f16 Q or the f16
//! attention accumulator rounds it the other way by one f16 ulp; a flipped K or V then
//! shifts every later position a little. (Which llama.cpp build made the f16 fixtures
//! matters more: see `tests/fixtures/tiny/README.md`.)

use std::path::PathBuf;

use ember_formats::{GgufFile, GgufWriter};
use ember_kv::{KvOptions, PagedKvCache};
use ember_models::testing::tiny::{self, TinyArch, TinyDtype};
use ember_models::{Logits, Model, default_device, load};
use ember_quant::GgmlType;
use serde_json::Value;

const TOLERANCE: f64 = 1e-3;

struct Fixture {
    tokens: Vec<u32>,
    logits: Vec<Vec<f64>>,
}

fn fixture(arch: TinyArch, dtype: TinyDtype, bytes: &[u8]) -> Fixture {
    let name = tiny::name(arch, dtype);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask tiny-models`)", path.display()));
    let v: Value = serde_json::from_str(&text).expect("fixture JSON");
    // A changed generator invalidates the fixture: say so rather than report a bad model.
    assert_eq!(
        v["gguf_fnv1a64"].as_str(),
        Some(format!("{:016x}", tiny::fingerprint(bytes)).as_str()),
        "{name}: the generator no longer writes the file the fixture was made from; \
         regenerate with `cargo xtask tiny-models`"
    );
    let tokens: Vec<u32> = v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("token id") as u32)
        .collect();
    assert_eq!(tokens, tiny::tokens(arch), "{name}: fixture tokens");
    let logits: Vec<Vec<f64>> = v["logits"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("logits row")
                .iter()
                .map(|x| x.as_f64().expect("logit"))
                .collect()
        })
        .collect();
    assert_eq!(logits.len(), tokens.len(), "{name}: one row per token");
    assert!(logits.iter().all(|r| r.len() == tiny::VOCAB));
    Fixture { tokens, logits }
}

fn rows(t: burn::tensor::Tensor<2>) -> Vec<Vec<f64>> {
    let [n, v] = t.dims();
    let flat = t.into_data().try_to_vec::<f32>().expect("f32 logits");
    (0..n)
        .map(|i| {
            flat[i * v..(i + 1) * v]
                .iter()
                .map(|&x| f64::from(x))
                .collect()
        })
        .collect()
}

/// Teacher-forced logits of every position, in one pass (as llama.cpp's fixture run), from a
/// cache whose layer windows are `windows` (default: the architecture's own).
fn ember_logits(
    model: &Model,
    tokens: &[u32],
    windows: Option<Vec<Option<usize>>>,
) -> Vec<Vec<f64>> {
    let mut config = model.kv_config(&KvOptions::default(), 64);
    if let Some(w) = windows {
        config.layer_windows = w;
    }
    let mut cache = PagedKvCache::new(&config).expect("cache");
    let (seq, cached) = cache.add_sequence(tokens).expect("sequence");
    assert_eq!(cached, 0);
    rows(
        model
            .forward_seq(tokens, &mut cache, seq, Logits::All)
            .expect("forward"),
    )
}

/// `(largest |ours - theirs| / max |theirs| of its row, largest |ours - theirs|, that row)`.
fn worst(ours: &[Vec<f64>], theirs: &[Vec<f64>]) -> (f64, f64, usize) {
    let mut w = (0.0f64, 0.0f64, 0);
    for (pos, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f64, |m, y| m.max(y.abs()));
        let d = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        w.1 = w.1.max(d);
        if d / scale > w.0 {
            (w.0, w.2) = (d / scale, pos);
        }
    }
    w
}

fn check(arch: TinyArch) {
    for dtype in [TinyDtype::F32, TinyDtype::F16] {
        let name = tiny::name(arch, dtype);
        let bytes = tiny::gguf(arch, dtype).expect("tiny model");
        let want = fixture(arch, dtype, &bytes);
        let file = GgufFile::from_bytes(bytes).expect("gguf");
        let model = load(&file, &default_device()).expect("load");
        let got = ember_logits(&model, &want.tokens, None);
        let (rel, abs, pos) = worst(&got, &want.logits);
        eprintln!("{name}: max |ours - llama.cpp| = {abs:.2e}; / row max = {rel:.2e} (pos {pos})");
        assert!(
            rel <= TOLERANCE,
            "{name}: logits differ from llama.cpp's by {rel:.3e} (scaled) at position {pos}"
        );
    }
}

#[test]
fn qwen2_matches_llama_cpp() {
    check(TinyArch::Qwen2);
}

#[test]
fn qwen3_matches_llama_cpp() {
    check(TinyArch::Qwen3);
}

#[test]
fn phi3_matches_llama_cpp() {
    check(TinyArch::Phi3);
}

#[test]
fn mistral_style_llama_matches_llama_cpp() {
    check(TinyArch::Mistral);
}

/// Gemma 3's blocks, and linear RoPE scaling on its global layer only (llama.cpp's
/// `rope_freq_scale_train_swa` is 1).
#[test]
fn gemma3_matches_llama_cpp() {
    check(TinyArch::Gemma3);
}

#[test]
fn llama3_rope_scaling_and_biases_match_llama_cpp() {
    check(TinyArch::Llama3);
}

/// The tiny Llama 3 file without the metadata keys and tensors `keep` rejects, rewritten.
fn without(bytes: Vec<u8>, keep: impl Fn(&str) -> bool) -> GgufFile {
    let file = GgufFile::from_bytes(bytes).expect("gguf");
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata().iter().filter(|(k, _)| keep(k)) {
        w.add(k.clone(), v.clone());
    }
    for t in file.tensors().iter().filter(|t| keep(&t.name)) {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, file.tensor_data(t))
            .expect("copy");
    }
    GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf")
}

/// The fixture pins down each of llama3's additions: the same file without its RoPE
/// frequency factors, without its linear RoPE scaling, or without its output and feed-forward
/// biases, lands far outside the tolerance (so a loader that dropped one would fail the test
/// above).
#[test]
fn dropping_rope_factors_or_projection_biases_would_fail() {
    let arch = TinyArch::Llama3;
    let bytes = tiny::gguf(arch, TinyDtype::F32).expect("tiny model");
    let want = fixture(arch, TinyDtype::F32, &bytes);
    let biases = |n: &str| n.ends_with("attn_output.bias") || n.contains(".ffn_");
    for (what, file) in [
        (
            "rope_freqs",
            without(bytes.clone(), |n| n != "rope_freqs.weight"),
        ),
        (
            "linear scaling",
            without(bytes.clone(), |n| !n.starts_with("llama.rope.scaling.")),
        ),
        (
            "projection biases",
            without(bytes.clone(), |n| !(biases(n) && n.ends_with(".bias"))),
        ),
    ] {
        let model = load(&file, &default_device()).expect("load");
        let got = ember_logits(&model, &want.tokens, None);
        let (rel, _, _) = worst(&got, &want.logits);
        assert!(
            rel > 10.0 * TOLERANCE,
            "without {what} the logits moved by only {rel:.2e}"
        );
    }
}

/// A frequency factor is a divisor: zero, negative or non-finite ones are refused at load.
#[test]
fn broken_rope_factors_are_refused() {
    let bytes = tiny::gguf(TinyArch::Llama3, TinyDtype::F32).expect("tiny model");
    let file = GgufFile::from_bytes(bytes).expect("gguf");
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata() {
            w.add(k.clone(), v.clone());
        }
        for t in file.tensors() {
            let mut data = file.tensor_data(t).to_vec();
            if t.name == "rope_freqs.weight" {
                data[4..8].copy_from_slice(&bad.to_le_bytes());
            }
            w.add_tensor(&t.name, &t.dims, t.ggml_type, data)
                .expect("copy");
        }
        let broken = GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf");
        let err = load(&broken, &default_device())
            .err()
            .unwrap_or_else(|| panic!("a factor of {bad} was accepted"));
        assert!(
            err.to_string().contains("rope_freqs.weight"),
            "unexpected error: {err}"
        );
    }
}

/// The phi3 and mistral files carry a sliding window of 4 that llama.cpp ignores; attending
/// through that window instead lands far outside the tolerance, so the fixtures do pin the
/// choice down.
#[test]
fn honouring_the_ignored_sliding_window_would_fail() {
    for arch in [TinyArch::Phi3, TinyArch::Mistral] {
        let bytes = tiny::gguf(arch, TinyDtype::F32).expect("tiny model");
        let want = fixture(arch, TinyDtype::F32, &bytes);
        let file = GgufFile::from_bytes(bytes).expect("gguf");
        let model = load(&file, &default_device()).expect("load");
        let windows = vec![Some(tiny::WINDOW as usize); model.config().n_layer];
        let got = ember_logits(&model, &want.tokens, Some(windows));
        let (rel, _, _) = worst(&got, &want.logits);
        assert!(
            rel > 100.0 * TOLERANCE,
            "{arch:?}: a window changed the logits by only {rel:.2e}"
        );
    }
}

/// llama.cpp also loads Q/K/V fused (`attn_qkv` and `attn_qkv.bias`, Q rows first) for these
/// architectures: the tiny qwen2 rewritten that way gives the same logits.
#[test]
fn fused_qkv_and_bias_equal_separate_ones() {
    let bytes = tiny::gguf(TinyArch::Qwen2, TinyDtype::F32).expect("tiny model");
    let file = GgufFile::from_bytes(bytes).expect("gguf");
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata() {
        w.add(k.clone(), v.clone());
    }
    for t in file.tensors() {
        let Some((prefix, suffix)) = t.name.split_once(".attn_q.") else {
            if !t.name.contains(".attn_k.") && !t.name.contains(".attn_v.") {
                w.add_tensor(&t.name, &t.dims, t.ggml_type, file.tensor_data(t))
                    .expect("copy");
            }
            continue;
        };
        // Row-major rows of Q, then K, then V: concatenating the bytes stacks the rows.
        let mut data = Vec::new();
        let mut rows = 0;
        for part in ["attn_q", "attn_k", "attn_v"] {
            let p = file
                .tensor(&format!("{prefix}.{part}.{suffix}"))
                .expect("part");
            data.extend_from_slice(file.tensor_data(p));
            rows += p.dims.last().copied().unwrap_or(0);
        }
        let dims = match t.dims.len() {
            1 => vec![rows],
            _ => vec![t.dims[0], rows],
        };
        w.add_tensor(
            format!("{prefix}.attn_qkv.{suffix}"),
            &dims,
            t.ggml_type,
            data,
        )
        .expect("fused");
    }
    let fused = GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf");
    assert!(fused.tensor("blk.0.attn_qkv.bias").is_some());
    assert!(fused.tensor("blk.0.attn_q.weight").is_none());
    let tokens = tiny::tokens(TinyArch::Qwen2);
    let separate = ember_logits(
        &load(&file, &default_device()).expect("load"),
        &tokens,
        None,
    );
    let fused = ember_logits(
        &load(&fused, &default_device()).expect("load"),
        &tokens,
        None,
    );
    let (rel, _, pos) = worst(&fused, &separate);
    assert!(rel <= 1e-6, "fused differs by {rel:.2e} at position {pos}");
}

/// What llama.cpp would compute and we cannot yet is refused at load, not run wrongly.
#[test]
fn unsupported_variants_are_refused() {
    let bytes = tiny::gguf(TinyArch::Phi3, TinyDtype::F32).expect("tiny model");
    let file = GgufFile::from_bytes(bytes).expect("gguf");
    let rewrite = |extra: &dyn Fn(&mut GgufWriter)| {
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata() {
            w.add(k.clone(), v.clone());
        }
        for t in file.tensors() {
            w.add_tensor(&t.name, &t.dims, t.ggml_type, file.tensor_data(t))
                .expect("copy");
        }
        extra(&mut w);
        GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf")
    };
    let longrope = rewrite(&|w| {
        w.add_tensor(
            "rope_factors_long.weight",
            &[4],
            GgmlType::F32,
            vec![0u8; 16],
        )
        .expect("tensor");
    });
    let yarn = rewrite(&|w| {
        w.add("phi3.rope.scaling.type", "yarn");
    });
    let attn_factor = rewrite(&|w| {
        w.add("phi3.rope.scaling.attn_factor", 1.2f32);
    });
    for (what, f) in [
        ("LongRoPE", longrope),
        ("yarn", yarn),
        ("attention factor", attn_factor),
    ] {
        let err = load(&f, &default_device()).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("not supported")),
            "{what}: {err:?}"
        );
    }
    // Linear scaling is taken (as llama.cpp, for every architecture here); YaRN on llama is
    // refused as on the others (it used to run unscaled).
    let linear = rewrite(&|w| {
        w.add("phi3.rope.scaling.factor", 4.0f32);
    });
    let config = load(&linear, &default_device())
        .expect("linear")
        .config()
        .clone();
    assert_eq!(config.rope_freq_scale, 0.25);
    let bytes = tiny::gguf(TinyArch::Mistral, TinyDtype::F32).expect("tiny model");
    let mistral = GgufFile::from_bytes(bytes).expect("gguf");
    let mut w = GgufWriter::new();
    for (k, v) in mistral.metadata() {
        w.add(k.clone(), v.clone());
    }
    w.add("llama.rope.scaling.type", "yarn");
    for t in mistral.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, mistral.tensor_data(t))
            .expect("copy");
    }
    let yarn = GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf");
    let err = load(&yarn, &default_device()).err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("'yarn'")),
        "llama yarn: {err:?}"
    );
    // A Mixtral-style llama (routed experts) is named as such.
    let mut w = GgufWriter::new();
    for (k, v) in mistral.metadata() {
        w.add(k.clone(), v.clone());
    }
    w.add("llama.expert_count", 8u32);
    w.add("llama.expert_used_count", 2u32);
    for t in mistral.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, mistral.tensor_data(t))
            .expect("copy");
    }
    let moe = GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf");
    let err = load(&moe, &default_device()).err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("mixture-of-experts") && e.contains("llama.expert_count")),
        "llama experts: {err:?}"
    );
}
