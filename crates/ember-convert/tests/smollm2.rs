//! Round trips on the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched by name through ember-hub):
//! GGUF -> HF -> GGUF, requantization, the exported tokenizer.json against Ember's GGUF
//! tokenizer, and gguf-py reading every file written here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_convert::{QuantizeOptions, gguf_to_hf, hf_to_gguf, requantize_gguf, target_type};
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_formats::{GgufFile, MetaValue};
use ember_quant::GgmlType;
use ember_text::tokenizer::GgufTokenizer;

const MODEL: &str = "smollm2-135m-instruct-q4_1";

/// Texts for the tokenizer comparisons: digits, spaces, unicode, newlines, special tokens.
const TEXTS: &[&str] = &[
    "Hello world",
    "The year 2024 had 365 days; 1234567 is a number.",
    "  leading and   multiple   spaces\tand tabs\n\nnew lines",
    "Unicode: café, naïve, 日本語のテキスト, emoji 🦀🔥, Ελληνικά",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's I'm we'll they've",
    "code: fn main() { println!(\"{}\", x[0] >= 3.14); }",
];

fn model() -> GgufFile {
    let path = ember_hub::resolve(MODEL).expect("resolve SmolLM2");
    GgufFile::open(path).expect("open SmolLM2")
}

/// A fresh scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ember-convert-{name}-{}", std::process::id()));
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

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Reads `paths` with gguf-py's GGUFReader; skipped (with a message) when gguf is not
/// importable, unless `EMBER_REQUIRE_GGUF_PY=1` (set by tests/run.sh, which installs it): then
/// a missing gguf-py fails the test.
fn check_with_gguf_py(paths: &[&Path]) {
    let probe = Command::new("python3").args(["-c", "import gguf"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("EMBER_REQUIRE_GGUF_PY").as_deref() != Ok("1"),
            "EMBER_REQUIRE_GGUF_PY=1 but `python3 -c 'import gguf'` fails"
        );
        eprintln!(
            "SKIPPED gguf-py check: `python3 -c 'import gguf'` fails (install it with \
             `python3 -m pip install gguf`)"
        );
        return;
    }
    let script = r#"
import sys, gguf
for p in sys.argv[1:]:
    r = gguf.GGUFReader(p)
    n = 0
    for t in r.tensors:
        assert t.data.nbytes == t.n_bytes, (p, t.name)
        n += 1
    arch = r.fields["general.architecture"].contents()
    print(p, arch, n, "tensors", len(r.fields), "fields")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf-py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}

fn meta_map(f: &GgufFile) -> BTreeMap<String, MetaValue> {
    f.metadata().iter().cloned().collect()
}

#[test]
fn gguf_to_hf_f32_to_gguf_f32_is_exact() {
    let orig = model();
    let dir = Scratch::new("rt32");
    let hf = dir.0.join("hf");
    let mut calls = 0usize;
    gguf_to_hf(&orig, &hf, StDtype::F32, &mut |p| {
        calls += 1;
        assert_eq!(p.done, calls);
        assert_eq!(p.total, orig.tensors().len());
    })
    .unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 576);
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);
    let tcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        tcfg["chat_template"],
        orig.get_str("tokenizer.chat_template").unwrap()
    );
    assert_eq!(tcfg["eos_token"], "<|im_end|>");
    assert_eq!(tcfg["add_bos_token"], false);

    let ckpt = Checkpoint::open(&hf).unwrap();
    // HF names and shapes; Q is permuted (rows differ), V is not.
    let (q, qb) = ckpt
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, [576, 576]);
    assert_eq!(q.dtype, StDtype::F32);
    let gq = dequant(&orig, "blk.0.attn_q.weight");
    let hq: Vec<f32> = qb
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // Head 0, d = 32: HF row 1 is GGUF row 2 and HF row 32 is GGUF row 1.
    assert_eq!(f32_bits(&hq[576..1152]), f32_bits(&gq[2 * 576..3 * 576]));
    assert_eq!(f32_bits(&hq[32 * 576..33 * 576]), f32_bits(&gq[576..1152]));

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
        assert_eq!(nt.ggml_type, GgmlType::F32, "{}", t.name);
        assert_eq!(
            f32_bits(&dequant(&b, &t.name)),
            f32_bits(&dequant(&orig, &t.name)),
            "{}",
            t.name
        );
    }
    // Metadata: the same keys and values, except general.file_type (f32 now).
    let (om, bm) = (meta_map(&orig), meta_map(&b));
    let ok: Vec<&String> = om.keys().collect();
    let bk: Vec<&String> = bm.keys().collect();
    assert_eq!(ok, bk, "metadata keys differ");
    for (k, v) in &om {
        if k == "general.file_type" {
            assert_eq!(bm[k], MetaValue::U32(0));
            continue;
        }
        assert_eq!(&bm[k], v, "metadata {k}");
    }

    // The converted file tokenizes like the original.
    let t0 = GgufTokenizer::from_gguf(&orig).unwrap();
    let t1 = GgufTokenizer::from_gguf(&b).unwrap();
    for text in TEXTS {
        assert_eq!(
            t0.encode(text, true, true).unwrap(),
            t1.encode(text, true, true).unwrap(),
            "{text:?}"
        );
    }
    check_with_gguf_py(&[&back]);
}

#[test]
fn exported_tokenizer_json_encodes_like_the_gguf() {
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
    }
    // Control tokens are special added tokens.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer.json")).unwrap()).unwrap();
    let im_end = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == "<|im_end|>")
        .unwrap();
    assert_eq!(im_end["special"], true);
    assert_eq!(im_end["id"], 2);
}

#[test]
fn hf_f16_to_gguf_f16_keeps_the_bits() {
    let orig = model();
    let dir = Scratch::new("rt16");
    let hf = dir.0.join("hf");
    gguf_to_hf(&orig, &hf, StDtype::F16, &mut |_| {}).unwrap();
    let ckpt = Checkpoint::open(&hf).unwrap();
    let out = dir.0.join("f16.gguf");
    hf_to_gguf(
        &ckpt,
        &out,
        &QuantizeOptions::new(GgmlType::F16),
        &mut |_| {},
    )
    .unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_u32("general.file_type"), Some(1));
    // An unpermuted tensor: the GGUF bytes are the checkpoint's bytes.
    let (_, hb) = ckpt.tensor("model.layers.3.mlp.down_proj.weight").unwrap();
    let t = g.tensor("blk.3.ffn_down.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::F16);
    assert_eq!(g.tensor_data(t), hb);
    for t in orig.tensors() {
        let nt = g.tensor(&t.name).unwrap();
        let want_f16 = ember_quant::quantize(GgmlType::F16, &dequant(&orig, &t.name)).unwrap();
        if t.dims.len() >= 2 {
            assert_eq!(nt.ggml_type, GgmlType::F16, "{}", t.name);
            assert_eq!(g.tensor_data(nt), &want_f16[..], "{}", t.name);
        } else {
            assert_eq!(nt.ggml_type, GgmlType::F32, "{}", t.name);
            let mut via = vec![0f32; want_f16.len() / 2];
            ember_quant::dequantize(GgmlType::F16, &want_f16, &mut via).unwrap();
            assert_eq!(
                f32_bits(&dequant(&g, &t.name)),
                f32_bits(&via),
                "{}",
                t.name
            );
        }
    }
    check_with_gguf_py(&[&out]);
}

#[test]
fn requantize_matches_ember_quant() {
    let orig = model();
    let dir = Scratch::new("rq");
    let q8 = dir.0.join("q8_0.gguf");
    let mut n = 0;
    requantize_gguf(
        &orig,
        &q8,
        &QuantizeOptions::new(GgmlType::Q8_0),
        &mut |_| n += 1,
    )
    .unwrap();
    assert_eq!(n, orig.tensors().len());
    let g = GgufFile::open(&q8).unwrap();
    assert_eq!(g.get_u32("general.file_type"), Some(7));
    for t in orig.tensors() {
        let nt = g.tensor(&t.name).unwrap();
        assert_eq!(nt.dims, t.dims);
        let data = g.tensor_data(nt);
        if t.dims.len() < 2 || t.ggml_type == GgmlType::Q8_0 {
            // Kept as is (norms) or already of the target type (token_embd): copied.
            assert_eq!(nt.ggml_type, t.ggml_type, "{}", t.name);
            assert_eq!(data, orig.tensor_data(t), "{}", t.name);
        } else {
            assert_eq!(nt.ggml_type, GgmlType::Q8_0, "{}", t.name);
            let want = ember_quant::quantize(GgmlType::Q8_0, &dequant(&orig, &t.name)).unwrap();
            assert_eq!(data, &want[..], "{}", t.name);
        }
    }
    // Metadata copied, file type updated.
    for (k, v) in orig.metadata() {
        if k != "general.file_type" {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
    }

    // q4_K: rows of 576 are not whole 256-blocks, so they fall back as llama-quantize does.
    let q4k = dir.0.join("q4_k.gguf");
    let opts = QuantizeOptions::new(GgmlType::Q4_K);
    requantize_gguf(&orig, &q4k, &opts, &mut |_| {}).unwrap();
    let k = GgufFile::open(&q4k).unwrap();
    assert_eq!(k.get_u32("general.file_type"), Some(14));
    assert_eq!(
        k.tensor("blk.0.ffn_down.weight").unwrap().ggml_type,
        GgmlType::Q4_K
    );
    assert_eq!(
        k.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q5_0
    );
    assert_eq!(
        k.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        k.tensor("blk.0.attn_norm.weight").unwrap().ggml_type,
        GgmlType::F32
    );
    for t in orig.tensors() {
        let want = target_type(&t.name, &t.dims, t.ggml_type, &opts, false);
        assert_eq!(k.tensor(&t.name).unwrap().ggml_type, want, "{}", t.name);
    }
    let kd = dequant(&k, "blk.0.ffn_down.weight");
    let od = dequant(&orig, "blk.0.ffn_down.weight");
    let err = kd
        .iter()
        .zip(&od)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 0.1, "max error {err}");
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    check_with_gguf_py(&[&q8, &q4k]);
}

#[test]
fn refusals_are_typed() {
    let orig = model();
    let dir = Scratch::new("refuse");
    let out = dir.0.join("x.gguf");
    let e = requantize_gguf(
        &orig,
        &out,
        &QuantizeOptions::new(GgmlType::IQ4_NL),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, ember_convert::ConvertError::UnsupportedType(_)),
        "{e}"
    );
    assert!(!out.exists());
    let e = gguf_to_hf(&orig, &dir.0.join("hf"), StDtype::I32, &mut |_| {}).unwrap_err();
    assert!(
        matches!(e, ember_convert::ConvertError::UnsupportedDtype(_)),
        "{e}"
    );
}

/// A Llama 3.1-style `rope_scaling` (`rope_type: llama3`) becomes the per-pair factors llama.cpp's
/// converter writes as `rope_freqs.weight`, in the converted file and in the image a checkpoint
/// directory runs from. SmolLM2's 32 pairs at base 100000: wavelengths under 8192 / 4 keep 1
/// (pairs 0-16), those over 8192 / 1 take the factor 8 (pairs 20-31), pairs 17-19 blend.
#[test]
fn llama3_rope_scaling_becomes_rope_freqs() {
    let orig = model();
    let dir = Scratch::new("llama3");
    let hf = dir.0.join("hf");
    gguf_to_hf(&orig, &hf, StDtype::F16, &mut |_| {}).unwrap();
    let cfg_path = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192
    });
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&hf).unwrap();
    let out = dir.0.join("llama3.gguf");
    hf_to_gguf(
        &ckpt,
        &out,
        &QuantizeOptions::new(GgmlType::F16),
        &mut |_| {},
    )
    .unwrap();
    let converted = GgufFile::open(&out).unwrap();
    let image = ember_convert::checkpoint_image(&ckpt, &Default::default())
        .unwrap()
        .gguf;
    for g in [&converted, &image] {
        let f = dequant(g, "rope_freqs.weight");
        assert_eq!(f.len(), 32);
        assert!(f[..17].iter().all(|&x| x == 1.0), "{f:?}");
        assert!(f[20..].iter().all(|&x| x == 8.0), "{f:?}");
        assert!(
            f[16..21].windows(2).all(|w| w[0] < w[1]),
            "blended factors rise from 1 to 8: {f:?}"
        );
        assert_eq!(g.get_str("llama.rope.scaling.type"), None);
    }
    check_with_gguf_py(&[&out]);

    // An unknown scaling type is still refused, naming it.
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&hf).unwrap();
    let e = hf_to_gguf(
        &ckpt,
        &dir.0.join("yarn.gguf"),
        &QuantizeOptions::new(GgmlType::F16),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("yarn"), "{e}");
}
