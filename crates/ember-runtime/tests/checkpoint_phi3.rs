//! Phi-3 checkpoint directories run: the tiny random Phi-3 (fused `qkv_proj`, fused
//! `gate_up_proj`, half-rotary heads) exported to Hugging Face directories, dense and in every
//! quantized format, loads with `LoadedModel::open` and gives the logits of its GGUF forms.
//! The fused layers are cut into their parts when the directory is read (dense rows as views,
//! packed layers at their output rows): these tests are what checks those cuts.

use std::path::{Path, PathBuf};

use ember_convert::{GroupSize, QuantWriteFormat, QuantWriteOptions, QuantizeOptions};
use ember_formats::GgufFile;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_models::testing::ScratchDir;
use ember_models::testing::tiny::{self, TinyArch, TinyDtype};
use ember_quant::GgmlType;
use ember_runtime::eval::teacher_forced_logits;
use ember_runtime::loaded::{LoadOptions, LoadedModel};

/// A fresh directory under the target dir's tmp, removed after the test.
fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(
        env!("CARGO_TARGET_TMPDIR"),
        &format!("checkpoint-phi3-{name}"),
    )
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

/// The tiny Phi-3 GGUF written to `root/tiny.gguf`.
fn tiny_gguf(root: &Path, dtype: TinyDtype) -> PathBuf {
    let path = root.join("tiny.gguf");
    std::fs::write(&path, tiny::gguf(TinyArch::Phi3, dtype).expect("tiny phi3")).expect("write");
    path
}

fn logits(m: &LoadedModel, batch: usize) -> Vec<Vec<f32>> {
    teacher_forced_logits(&m.model, &tiny::tokens(TinyArch::Phi3), batch).expect("logits")
}

/// The largest |a - b| over every logit (NaN if any is NaN; the shapes must agree).
fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (u, v) in x.iter().zip(y) {
            let d = (u - v).abs();
            worst = if d.is_nan() { f32::NAN } else { worst.max(d) };
        }
    }
    worst
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

/// Dense directories hold the GGUF's own matrices (F32 or F16 rows are the same bytes), so the
/// directory, with its fused layers cut into views, computes exactly what the GGUF does:
/// every logit equal, in one batch and one token at a time.
#[test]
fn phi3_dense_directories_give_the_gguf_logits_exactly() {
    for dtype in [TinyDtype::F32, TinyDtype::F16] {
        let root = scratch(dtype.name());
        let gguf_path = tiny_gguf(&root, dtype);
        let dir = root.join("hf");
        let st = match dtype {
            TinyDtype::F32 => StDtype::F32,
            TinyDtype::F16 => StDtype::F16,
        };
        let gguf = GgufFile::open(&gguf_path).expect("open");
        ember_convert::gguf_to_hf(&gguf, &dir, st, &mut |_| {}).expect("export");
        let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
        assert!(config.contains("\"Phi3ForCausalLM\""), "{config}");
        assert!(config.contains("\"partial_rotary_factor\""), "{config}");

        // F32 rows are the GGUF's own; an F16 export also rounds the f32 norms to F16, so
        // that directory is compared with its own conversion back (F16 matrices, the norms
        // as the directory holds them).
        let reference = match dtype {
            TinyDtype::F32 => gguf_path.clone(),
            TinyDtype::F16 => {
                let back = root.join("back.gguf");
                let ckpt = Checkpoint::open(&dir).expect("checkpoint");
                ember_convert::hf_to_gguf(
                    &ckpt,
                    &back,
                    &QuantizeOptions::new(GgmlType::F16),
                    &mut |_| {},
                )
                .expect("convert");
                back
            }
        };
        let from_dir = open(&dir, false);
        let from_gguf = open(&reference, false);
        assert_eq!(from_dir.model.config().architecture, "phi3");
        assert_eq!(
            from_dir.model.config().rope_dim,
            from_gguf.model.config().rope_dim
        );
        // The parts, not the fused tensors, are what the directory supplies.
        let external = from_dir
            .external
            .as_ref()
            .expect("a directory supplies its matrices");
        let names: Vec<&str> = external.iter().map(|(name, _)| name).collect();
        for part in [
            "blk.0.attn_q.weight",
            "blk.1.attn_v.weight",
            "blk.1.ffn_gate.weight",
        ] {
            assert!(names.contains(&part), "{part} not in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("attn_qkv")), "{names:?}");
        for batch in [64, 1] {
            let diff = max_diff(&logits(&from_dir, batch), &logits(&from_gguf, batch));
            assert_eq!(diff, 0.0, "{} batch {batch}", dtype.name());
        }
    }
}

/// Quantized directories (each format's writer on the tiny model, fused layers quantized
/// whole as the upstream tools do): run packed, run dequantized, and converted to an F16
/// GGUF. Dequantized-at-load and the converted GGUF hold the same F16 values, so they agree
/// exactly; the packed kernels differ only by their 8-bit activations.
#[test]
fn phi3_quantized_directories_run_packed_and_dequantized() {
    let root = scratch("quantized");
    let gguf_path = tiny_gguf(&root, TinyDtype::F32);
    let gguf = GgufFile::open(&gguf_path).expect("open");
    let g32 = GroupSize::Size(32);
    let cases = [
        ("awq", QuantWriteFormat::Awq, 4),
        (
            "gptq-act",
            QuantWriteFormat::Gptq {
                act_order: true,
                sym: true,
                v2: false,
            },
            4,
        ),
        (
            "gptq3",
            QuantWriteFormat::Gptq {
                act_order: false,
                sym: false,
                v2: false,
            },
            3,
        ),
        ("exl2", QuantWriteFormat::Exl2 { target_bpw: 4.0 }, 4),
        (
            "ct-asym",
            QuantWriteFormat::CompressedTensors { symmetric: false },
            4,
        ),
    ];
    for (name, format, bits) in cases {
        let dir = root.join(name);
        let opts = QuantWriteOptions {
            format,
            bits,
            group_size: g32,
        };
        ember_convert::gguf_to_quantized_hf(&gguf, &dir, &opts, &mut |_| {})
            .unwrap_or_else(|e| panic!("{name}: export: {e}"));
        let converted = root.join(format!("{name}.gguf"));
        let ckpt = Checkpoint::open(&dir).expect("checkpoint");
        ember_convert::hf_to_gguf(
            &ckpt,
            &converted,
            &QuantizeOptions::new(GgmlType::F16),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{name}: convert: {e}"));
        drop(ckpt);

        let packed = open(&dir, false);
        assert!(packed.scheme.is_some(), "{name}: no scheme detected");
        let k = packed
            .external
            .as_ref()
            .and_then(|e| e.get("blk.0.attn_k.weight"))
            .expect("the K part of qkv_proj");
        assert!(k.packed_weight().is_some(), "{name}: {}", k.type_name());
        assert_eq!((k.rows(), k.cols()), (32, 64), "{name}");
        let dense = open(&dir, true);
        let reference = open(&converted, false);
        let d = logits(&dense, 64);
        assert_eq!(
            d,
            logits(&reference, 64),
            "{name}: dequantized dir vs its GGUF"
        );
        let p = logits(&packed, 64);
        let mut worst = 0f32;
        let mut same_top = 0;
        for (x, y) in p.iter().zip(&d) {
            let spread = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            for (u, v) in x.iter().zip(y) {
                worst = worst.max((u - v).abs() / spread);
            }
            same_top += usize::from(argmax(x) == argmax(y));
        }
        eprintln!(
            "{name}: packed vs dequantized worst |dlogit|/max|logit| {worst:.2e}, same argmax \
             {same_top}/{}",
            p.len()
        );
        // 8-bit activations move logits by about 1e-2 of their spread at most; a part cut at
        // the wrong rows (K for V, gate for up) moves them by their own size.
        assert!(worst < 0.05, "{name}: packed vs dequantized {worst}");
        assert!(
            same_top + 2 >= p.len(),
            "{name}: argmax {same_top}/{}",
            p.len()
        );
    }
}

/// GGUF -> HF -> GGUF keeps every Phi-3 tensor bit for bit (fused `attn_qkv` and `ffn_up`
/// stay fused, nothing permuted) and every metadata value, the partial rotary count through
/// `partial_rotary_factor` included; the way back adds only the keys llama.cpp's converter
/// writes for phi3 that the tiny file leaves out.
#[test]
fn phi3_gguf_to_hf_and_back_is_exact() {
    let root = scratch("round-trip");
    let gguf_path = tiny_gguf(&root, TinyDtype::F32);
    let original = GgufFile::open(&gguf_path).expect("open");
    let dir = root.join("hf");
    ember_convert::gguf_to_hf(&original, &dir, StDtype::F32, &mut |_| {}).expect("export");
    let back_path = root.join("back.gguf");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    ember_convert::hf_to_gguf(
        &ckpt,
        &back_path,
        &QuantizeOptions::new(GgmlType::F32),
        &mut |_| {},
    )
    .expect("convert");
    let back = GgufFile::open(&back_path).expect("open back");

    assert_eq!(original.tensors().len(), back.tensors().len());
    for t in original.tensors() {
        let u = back
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!((&t.dims, t.ggml_type), (&u.dims, u.ggml_type), "{}", t.name);
        assert!(
            original.tensor_data(t) == back.tensor_data(u),
            "{}: bytes differ",
            t.name
        );
    }
    for (key, value) in original.metadata() {
        if key == "general.file_type" || key == "general.quantization_version" {
            continue;
        }
        assert_eq!(back.get(key), Some(value), "{key}");
    }
    let added: Vec<&String> = back
        .metadata()
        .iter()
        .map(|(k, _)| k)
        .filter(|k| original.get(k).is_none())
        .collect();
    for k in &added {
        assert!(
            [
                "general.type",
                "general.file_type",
                "general.quantization_version",
                "phi3.rope.scaling.original_context_length",
            ]
            .contains(&k.as_str()),
            "unexpected key {k}"
        );
    }
}
