//! Round trips on the real Gemma 3 270M Q4_K_M GGUF (fetched by name through ember-hub):
//! GGUF -> HF (F32 and F16) -> GGUF, with Gemma's `1 + w` norms, its window hyper-parameters
//! and its SentencePiece-style vocabulary (tokenizer.json + tokenizer.model), and the exported
//! tokenizer.json against Ember's GGUF tokenizer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ember_convert::{QuantizeOptions, gguf_to_hf, hf_to_gguf};
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_formats::{GgufFile, MetaValue};
use ember_quant::GgmlType;
use ember_text::tokenizer::GgufTokenizer;

const MODEL: &str = "gemma3-270m-q4_k_m";

/// Texts for the tokenizer comparisons: ASCII, digits, whitespace runs, unicode, code,
/// Gemma's turn markers.
const TEXTS: &[&str] = &[
    "Hello world",
    "The year 2024 had 365 days; 1234567 is a number.",
    "  leading and   multiple   spaces\tand tabs\n\nnew lines\n\n\n   ",
    "Unicode: café, naïve, 日本語のテキスト, emoji 🦀🔥, Ελληνικά",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "code: fn main() { println!(\"{}\", x[0] >= 3.14); }\n    if a != b { return; }",
    "rare bytes: \u{1}\u{7f} \u{2029} \u{10FFFF}",
];

fn model() -> GgufFile {
    let path = ember_hub::resolve(MODEL).expect("resolve Gemma 3 270M");
    GgufFile::open(path).expect("open Gemma 3 270M")
}

/// A fresh scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("gemma3-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dequant(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap();
    let mut out = vec![0f32; t.n_elements() as usize];
    ember_quant::dequantize(t.ggml_type, f.tensor_data(t), &mut out).unwrap();
    out
}

fn meta_map(f: &GgufFile) -> BTreeMap<String, MetaValue> {
    f.metadata().iter().cloned().collect()
}

/// Equal metadata values; for arrays, the first differing element is named (not the whole
/// 262k-element arrays).
fn assert_meta_eq(k: &str, a: Option<&MetaValue>, b: Option<&MetaValue>) {
    if a == b {
        return;
    }
    if let (Some(MetaValue::Array(x)), Some(MetaValue::Array(y))) = (a, b) {
        let (dx, dy) = (format!("{x:?}"), format!("{y:?}"));
        let (xs, ys): (Vec<&str>, Vec<&str>) = (dx.split(", ").collect(), dy.split(", ").collect());
        let i = xs.iter().zip(&ys).position(|(p, q)| p != q);
        panic!(
            "metadata {k}: lengths {} / {}, first difference at {i:?}: {:?} / {:?}",
            x.len(),
            y.len(),
            i.map(|i| xs[i]),
            i.map(|i| ys[i])
        );
    }
    panic!("metadata {k}: {a:?} / {b:?}");
}

/// The tests write ~0.5-1 GB each: one at a time.
static DISK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn disk() -> std::sync::MutexGuard<'static, ()> {
    DISK.lock().unwrap_or_else(|e| e.into_inner())
}

fn f16_round(x: f32) -> f32 {
    let b = ember_quant::quantize(GgmlType::F16, &[x]).unwrap();
    let mut out = [0f32];
    ember_quant::dequantize(GgmlType::F16, &b, &mut out).unwrap();
    out[0]
}

/// `w - 1` and then `+ 1` in f32 is exact for the stored `1 + w` in [0.5, 2] (Sterbenz) and
/// elsewhere within one rounding of the intermediate `w`: half an ulp of `|w|`.
fn norm_round_trip_bound(x: f32) -> f32 {
    let w = (x - 1.0).abs();
    if (0.5..=2.0).contains(&x) {
        0.0
    } else {
        w * f32::EPSILON
    }
}

/// GGUF -> HF `dtype` -> GGUF F32: names, shapes, values (checked by `check`) and metadata.
fn round_trip(dtype: StDtype, check: impl Fn(&str, f32, f32)) {
    let _disk = disk();
    let orig = model();
    let dir = Scratch::new(&format!("rt-{}", dtype.name()));
    let hf = dir.0.join("hf");
    gguf_to_hf(&orig, &hf, dtype, &mut |_| {}).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["hidden_size"], 640);
    assert_eq!(cfg["intermediate_size"], 2048);
    assert_eq!(cfg["num_hidden_layers"], 18);
    assert_eq!(cfg["num_attention_heads"], 4);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["head_dim"], 256);
    assert_eq!(cfg["query_pre_attn_scalar"], 256);
    assert_eq!(cfg["sliding_window"], 512);
    assert_eq!(cfg["sliding_window_pattern"], 6);
    assert_eq!(cfg["layer_types"][5], "full_attention");
    assert_eq!(cfg["layer_types"][4], "sliding_attention");
    assert_eq!(cfg["rope_theta"].as_f64(), Some(1_000_000.0));
    assert_eq!(cfg["rope_local_base_freq"].as_f64(), Some(10_000.0));
    assert_eq!(cfg["hidden_activation"], "gelu_pytorch_tanh");
    assert_eq!(cfg["final_logit_softcapping"], serde_json::Value::Null);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["max_position_embeddings"], 32768);
    assert_eq!(cfg["vocab_size"], 262144);
    assert_eq!(cfg["bos_token_id"], 2);
    assert_eq!(cfg["eos_token_id"], 1);

    let ckpt = Checkpoint::open(&hf).unwrap();
    // HF norms hold `w`, GGUF `1 + w`.
    let (info, _) = ckpt
        .tensor("model.layers.0.post_feedforward_layernorm.weight")
        .unwrap();
    assert_eq!(info.shape, [640]);
    assert!(ckpt.tensor("lm_head.weight").is_none());

    let back = dir.0.join("back.gguf");
    hf_to_gguf(
        &ckpt,
        &back,
        &QuantizeOptions::new(GgmlType::F32),
        &mut |_| {},
    )
    .unwrap();
    let b = GgufFile::open(&back).unwrap();
    assert_eq!(b.tensors().len(), orig.tensors().len());
    for t in orig.tensors() {
        let nt = b
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(nt.dims, t.dims, "{}", t.name);
        let (x, y) = (dequant(&orig, &t.name), dequant(&b, &t.name));
        for (&x, &y) in x.iter().zip(&y) {
            check(&t.name, x, y);
        }
    }

    // Metadata: the same keys and values, except general.file_type (F32 now).
    let (om, bm) = (meta_map(&orig), meta_map(&b));
    let ok: Vec<&String> = om.keys().collect();
    let bk: Vec<&String> = bm.keys().collect();
    assert_eq!(ok, bk, "metadata keys differ");
    for (k, v) in &om {
        if k == "general.file_type" {
            assert_eq!(bm[k], MetaValue::U32(0));
            continue;
        }
        assert_meta_eq(k, Some(v), bm.get(k));
    }
    // And tokenizes the same.
    let t0 = GgufTokenizer::from_gguf(&orig).unwrap();
    let t1 = GgufTokenizer::from_gguf(&b).unwrap();
    for text in TEXTS {
        assert_eq!(
            t0.encode(text, true, true).unwrap(),
            t1.encode(text, true, true).unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn gguf_to_hf_f32_to_gguf_keeps_the_values() {
    round_trip(StDtype::F32, |name, x, y| {
        if name.ends_with("norm.weight") {
            let bound = norm_round_trip_bound(x);
            assert!((x - y).abs() <= bound, "{name}: {x} -> {y}");
        } else {
            assert_eq!(x.to_bits(), y.to_bits(), "{name}: {x} -> {y}");
        }
    });
}

#[test]
fn gguf_to_hf_f16_to_gguf_rounds_once() {
    round_trip(StDtype::F16, |name, x, y| {
        // The HF side holds f16(x - 1) for norms, f16(x) otherwise.
        let want = if name.ends_with("norm.weight") {
            f16_round(x - 1.0) + 1.0
        } else {
            f16_round(x)
        };
        assert_eq!(
            want.to_bits(),
            y.to_bits(),
            "{name}: {x} -> {y}, want {want}"
        );
    });
}

#[test]
fn exported_tokenizer_json_encodes_like_the_gguf() {
    let _disk = disk();
    let orig = model();
    let dir = Scratch::new("tok");
    let hf = dir.0.join("hf");
    gguf_to_hf(&orig, &hf, StDtype::BF16, &mut |_| {}).unwrap();
    let hf_tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let ember = GgufTokenizer::from_gguf(&orig).unwrap();
    assert_eq!(hf_tok.get_vocab_size(true), ember.vocab_size());
    for text in TEXTS {
        let want = ember.encode(text, false, true).unwrap();
        let got = hf_tok.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(
            hf_tok.decode(&got, false).unwrap(),
            *text,
            "decode {text:?}"
        );
        // With special tokens: BOS first, as add_bos_token says.
        let want = ember.encode(text, true, true).unwrap();
        let got = hf_tok.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?} with BOS");
    }
    let tcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tcfg["bos_token"], "<bos>");
    assert_eq!(tcfg["add_bos_token"], true);
    assert_eq!(tcfg["add_prefix_space"], false);
}

/// Without tokenizer.model the scores are derived from the merges: the values differ from
/// the original ones, the encoding does not.
#[test]
fn tokenizer_json_alone_imports_an_equivalent_vocabulary() {
    let _disk = disk();
    let orig = model();
    let dir = Scratch::new("tok-json");
    let hf = dir.0.join("hf");
    gguf_to_hf(&orig, &hf, StDtype::BF16, &mut |_| {}).unwrap();
    std::fs::remove_file(hf.join("tokenizer.model")).unwrap();
    let ckpt = Checkpoint::open(&hf).unwrap();
    let back = dir.0.join("back.gguf");
    hf_to_gguf(
        &ckpt,
        &back,
        &QuantizeOptions::new(GgmlType::BF16),
        &mut |_| {},
    )
    .unwrap();
    let b = GgufFile::open(&back).unwrap();
    for k in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.model",
    ] {
        assert_meta_eq(k, orig.get(k), b.get(k));
    }
    let t0 = GgufTokenizer::from_gguf(&orig).unwrap();
    let t1 = GgufTokenizer::from_gguf(&b).unwrap();
    for text in TEXTS {
        assert_eq!(
            t0.encode(text, true, true).unwrap(),
            t1.encode(text, true, true).unwrap(),
            "{text:?}"
        );
    }
}
