//! Quantized checkpoints on the real SmolLM2-135M-Instruct Q4_1 GGUF: GGUF -> AWQ / GPTQ /
//! EXL2 / compressed-tensors HF directory -> GGUF f32, the scheme detection round trip, and
//! hostile configs and tensor files.
//!
//! Error bound (stated and asserted per format). Every format here quantizes round-to-nearest
//! on a uniform grid of step `s` per (output row, group), whose range covers the group's values
//! (min/max widened to include 0). For a symmetric grid (GPTQ sym, CT sym, EXL2) each element's
//! error is at most `s/2`; for an asymmetric grid (AWQ, GPTQ/CT asym) the rounded zero point
//! shifts the grid by up to `s/2`, so the error is at most `s`. With `s` computed from the
//! original weights and the bits (`(max − min)/(2^b − 1)` asymmetric, `2·amax/(2^b − 1)`
//! symmetric; EXL2: `(√base + √q_scale_max/16)²` with `base = amax/((2^b − 1)/2)`, the
//! largest scale its 4-bit scale codes rounded up can give), the relative RMS error
//! `‖W' − W‖/‖W‖` is at most `√(Σ (c·s_e)²)/‖W‖` (c = 1/2 or 1), times 1.01 for the f16
//! rounding of the stored scales. Uniform rounding noise predicts about `s/√12` per element;
//! both numbers and the measured one are printed.

use ember_quant::group::GroupTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ember_convert::{
    AwqVersion, ConvertError, CtStrategy, GroupSize, QuantScheme, QuantWriteFormat,
    QuantWriteOptions, QuantizeOptions, gguf_to_quantized_hf, hf_to_gguf,
};
use ember_formats::GgufFile;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::{SafetensorsFile, StWriteTensor, write_safetensors};
use ember_quant::GgmlType;
use ember_quant::group::GroupError;
use ember_quant::group::awq::AwqGemm;
use ember_quant::group::ct::{CtPacked, ScaleDtype};
use ember_quant::group::exl2::{Exl2, plan};
use ember_quant::group::gptq::{Gptq, GptqZeros};
use serde_json::json;

const MODEL: &str = "smollm2-135m-instruct-q4_1";
const LINEAR: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

fn model() -> GgufFile {
    GgufFile::open(ember_hub::resolve(MODEL).expect("resolve SmolLM2")).expect("open SmolLM2")
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ember-convq-{name}-{}", std::process::id()));
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

/// llama.cpp's Q/K permutation (HF rotate-half rows -> GGUF interleaved rows).
fn permute_hf_to_gguf(w: &[f32], k: usize, n_head: usize) -> Vec<f32> {
    let n = w.len() / k;
    let hd = n / n_head;
    let d = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..d {
            for j in 0..2 {
                let (g, hf) = (h * hd + 2 * i + j, h * hd + j * d + i);
                out[g * k..(g + 1) * k].copy_from_slice(&w[hf * k..(hf + 1) * k]);
            }
        }
    }
    out
}

fn t<'a>(c: &'a Checkpoint, prefix: &str, s: &str) -> &'a [u8] {
    c.tensor(&format!("{prefix}.{s}"))
        .unwrap_or_else(|| panic!("{prefix}.{s}"))
        .1
}

/// The grid each element was rounded on, for the bound.
enum Grid {
    Asym(u32),
    Sym(u32),
    Exl2(Vec<u32>),
}

/// `(Σ (c·s)², Σ (s²/12))` over `w` (`[n][k]`), groups of columns given by `col_group`.
fn step_sums(w: &[f32], k: usize, col_group: &[usize], groups: usize, grid: &Grid) -> (f64, f64) {
    let n = w.len() / k;
    let mut lo = vec![0f32; n * groups];
    let mut hi = vec![0f32; n * groups];
    let mut cnt = vec![0usize; groups];
    for (c, &g) in col_group.iter().enumerate() {
        cnt[g] += 1;
        for r in 0..n {
            let v = w[r * k + c];
            lo[r * groups + g] = lo[r * groups + g].min(v);
            hi[r * groups + g] = hi[r * groups + g].max(v);
        }
    }
    let mut qsm = vec![0f64; groups];
    if let Grid::Exl2(bits) = grid {
        for r in 0..n {
            for g in 0..groups {
                let amax = f64::from(lo[r * groups + g].abs().max(hi[r * groups + g]));
                let base = amax / ((f64::from((1u32 << bits[g]) - 1)) / 2.0);
                qsm[g] = qsm[g].max(base);
            }
        }
    }
    let (mut strict, mut uniform) = (0f64, 0f64);
    for r in 0..n {
        for g in 0..groups {
            let (mn, mx) = (f64::from(lo[r * groups + g]), f64::from(hi[r * groups + g]));
            let (s, c) = match grid {
                Grid::Asym(b) => ((mx - mn) / f64::from((1u32 << b) - 1), 1.0),
                Grid::Sym(b) => (2.0 * mn.abs().max(mx) / f64::from((1u32 << b) - 1), 0.5),
                Grid::Exl2(bits) => {
                    let base = mn.abs().max(mx) / (f64::from((1u32 << bits[g]) - 1) / 2.0);
                    ((base.sqrt() + qsm[g].sqrt() / 16.0).powi(2), 0.5)
                }
            };
            strict += (c * s).powi(2) * cnt[g] as f64;
            uniform += s * s / 12.0 * cnt[g] as f64;
        }
    }
    (strict, uniform)
}

fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// GGUF -> quantized HF -> GGUF f32. Returns (measured, strict bound, uniform estimate).
fn round_trip(label: &str, opts: QuantWriteOptions, expect: QuantScheme) -> (f64, f64, f64) {
    let orig = model();
    let dir = Scratch::new(label);
    let hf = dir.0.join("hf");
    let mut calls = 0usize;
    gguf_to_quantized_hf(&orig, &hf, &opts, &mut |p| {
        calls += 1;
        assert_eq!(p.done, calls);
    })
    .unwrap();
    assert_eq!(calls, orig.tensors().len());
    let ckpt = Checkpoint::open(&hf).unwrap();
    // The config round trip: what was written is detected as the same scheme.
    let detected = QuantScheme::detect(&ckpt)
        .unwrap()
        .expect("a quantized scheme");
    assert_eq!(detected, expect, "{label}: detected scheme");
    assert_eq!(
        ckpt.config()["quantization_config"],
        opts.quantization_config()
    );
    assert!(
        ckpt.tensor("model.layers.0.self_attn.q_proj.weight")
            .is_none()
    );
    assert_eq!(
        ckpt.tensor("model.embed_tokens.weight")
            .unwrap()
            .0
            .dtype
            .name(),
        "F16"
    );

    let out_path = dir.0.join("back.gguf");
    hf_to_gguf(
        &ckpt,
        &out_path,
        &QuantizeOptions {
            ty: GgmlType::F32,
            keep_output: false,
            keep_embeddings: false,
        },
        &mut |_| {},
    )
    .unwrap();
    let back = GgufFile::open(&out_path).unwrap();
    assert_eq!(back.tensors().len(), orig.tensors().len());

    let n_layer = 30;
    let (mut err2, mut norm2, mut strict2, mut uni2) = (0f64, 0f64, 0f64, 0f64);
    for l in 0..n_layer {
        for (g, h) in LINEAR {
            let gname = format!("blk.{l}.{g}.weight");
            let prefix = format!("model.layers.{l}.{h}");
            let info = orig.tensor(&gname).unwrap();
            let (k, n) = (info.dims[0] as usize, info.dims[1] as usize);
            // ember-quant's dequantization of what was written, built here independently.
            let mut deq = vec![0f32; n * k];
            let gs = opts.group_size.for_k(k);
            let (col_group, groups, grid) = match opts.format {
                QuantWriteFormat::Awq => {
                    AwqGemm {
                        k,
                        n,
                        group_size: gs,
                        bits: 4,
                        qweight: t(&ckpt, &prefix, "qweight"),
                        qzeros: t(&ckpt, &prefix, "qzeros"),
                        scales: t(&ckpt, &prefix, "scales"),
                    }
                    .dequantize_into(&mut deq)
                    .unwrap();
                    ((0..k).map(|c| c / gs).collect(), k / gs, Grid::Asym(4))
                }
                QuantWriteFormat::Gptq { sym, v2, .. } => {
                    let r = Gptq {
                        k,
                        n,
                        bits: opts.bits,
                        group_size: gs,
                        zeros: if v2 { GptqZeros::V2 } else { GptqZeros::V1 },
                        qweight: t(&ckpt, &prefix, "qweight"),
                        qzeros: t(&ckpt, &prefix, "qzeros"),
                        scales: t(&ckpt, &prefix, "scales"),
                        g_idx: Some(t(&ckpt, &prefix, "g_idx")),
                    };
                    r.dequantize_into(&mut deq).unwrap();
                    let gi: Vec<usize> = i32s(t(&ckpt, &prefix, "g_idx"))
                        .into_iter()
                        .map(|v| v as usize)
                        .collect();
                    let grid = if sym {
                        Grid::Sym(opts.bits)
                    } else {
                        Grid::Asym(opts.bits)
                    };
                    (gi, k.div_ceil(gs), grid)
                }
                QuantWriteFormat::Exl2 { target_bpw } => {
                    let inv = t(&ckpt, &prefix, "q_invperm");
                    Exl2 {
                        k,
                        n,
                        q_weight: t(&ckpt, &prefix, "q_weight"),
                        q_scale: t(&ckpt, &prefix, "q_scale"),
                        q_scale_max: t(&ckpt, &prefix, "q_scale_max"),
                        q_groups: t(&ckpt, &prefix, "q_groups"),
                        q_invperm: inv,
                    }
                    .dequantize_into(&mut deq)
                    .unwrap();
                    let bits = plan(k, gs, target_bpw).unwrap();
                    let cg = i32s(inv).into_iter().map(|p| p as usize / gs).collect();
                    (cg, bits.len(), Grid::Exl2(bits))
                }
                QuantWriteFormat::CompressedTensors { symmetric } => {
                    CtPacked {
                        k,
                        n,
                        bits: opts.bits,
                        group_size: gs,
                        scale_dtype: ScaleDtype::F16,
                        weight_packed: t(&ckpt, &prefix, "weight_packed"),
                        weight_scale: t(&ckpt, &prefix, "weight_scale"),
                        weight_shape: t(&ckpt, &prefix, "weight_shape"),
                        weight_zero_point: (!symmetric)
                            .then(|| t(&ckpt, &prefix, "weight_zero_point")),
                        weight_g_idx: None,
                    }
                    .dequantize_into(&mut deq)
                    .unwrap();
                    let grid = if symmetric {
                        Grid::Sym(opts.bits)
                    } else {
                        Grid::Asym(opts.bits)
                    };
                    ((0..k).map(|c| c / gs).collect(), k / gs, grid)
                }
            };
            let deq = match *g {
                "attn_q" => permute_hf_to_gguf(&deq, k, 9),
                "attn_k" => permute_hf_to_gguf(&deq, k, 3),
                _ => deq,
            };
            let got = dequant(&back, &gname);
            assert_eq!(back.tensor(&gname).unwrap().ggml_type, GgmlType::F32);
            assert!(
                got.iter()
                    .zip(&deq)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{label}: {gname} differs from ember-quant's dequantization"
            );
            let w = dequant(&orig, &gname);
            for (a, b) in got.iter().zip(&w) {
                err2 += f64::from(a - b).powi(2);
                norm2 += f64::from(*b).powi(2);
            }
            let (s, u) = step_sums(&w, k, &col_group, groups, &grid);
            strict2 += s;
            uni2 += u;
        }
    }
    // Non-linear tensors went through F16.
    let e = dequant(&orig, "output_norm.weight");
    let e16: Vec<f32> = e.iter().map(|&v| half_round(v)).collect::<Vec<_>>();
    assert_eq!(dequant(&back, "output_norm.weight"), e16);
    let measured = (err2 / norm2).sqrt();
    let strict = 1.01 * (strict2 / norm2).sqrt();
    let uniform = (uni2 / norm2).sqrt();
    eprintln!(
        "{label}: relative RMS error {measured:.5} (strict bound {strict:.5}, uniform-noise \
         estimate {uniform:.5})"
    );
    assert!(
        measured <= strict,
        "{label}: relative RMS error {measured} above the bound {strict}"
    );
    // Over ~10^8 elements the rounding errors behave as uniform noise: a second, statistical
    // check that is 3x tighter than the strict one for symmetric grids.
    assert!(
        measured <= 1.1 * uniform,
        "{label}: relative RMS error {measured} above 1.1 x the uniform-noise estimate {uniform}"
    );
    (measured, strict, uniform)
}

/// f32 -> f16 -> f32 (round to nearest even), without a `half` dependency.
fn half_round(v: f32) -> f32 {
    let bytes = ember_quant::convert::f32_to_f16_bytes(v);
    ember_quant::convert::f16_bytes_to_f32(bytes)
}

#[test]
fn awq_4bit_g64_round_trip() {
    round_trip(
        "awq",
        QuantWriteOptions {
            format: QuantWriteFormat::Awq,
            bits: 4,
            group_size: GroupSize::Size(64),
        },
        QuantScheme::Awq {
            version: AwqVersion::Gemm,
            bits: 4,
            group_size: GroupSize::Size(64),
            modules_to_not_convert: vec![],
        },
    );
}

#[test]
fn gptq_4bit_g64_act_order_round_trip() {
    round_trip(
        "gptq4",
        QuantWriteOptions {
            format: QuantWriteFormat::Gptq {
                act_order: true,
                sym: true,
                v2: false,
            },
            bits: 4,
            group_size: GroupSize::Size(64),
        },
        QuantScheme::Gptq {
            bits: 4,
            group_size: GroupSize::Size(64),
            desc_act: true,
            sym: true,
            zeros: GptqZeros::V1,
        },
    );
}

#[test]
fn gptq_8bit_per_channel_asym_v2_round_trip() {
    round_trip(
        "gptq8",
        QuantWriteOptions {
            format: QuantWriteFormat::Gptq {
                act_order: false,
                sym: false,
                v2: true,
            },
            bits: 8,
            group_size: GroupSize::PerChannel,
        },
        QuantScheme::Gptq {
            bits: 8,
            group_size: GroupSize::PerChannel,
            desc_act: false,
            sym: false,
            zeros: GptqZeros::V2,
        },
    );
}

#[test]
fn exl2_mixed_width_round_trips() {
    for bpw in [4.0f32, 3.5] {
        round_trip(
            &format!("exl2-{bpw}"),
            QuantWriteOptions {
                format: QuantWriteFormat::Exl2 { target_bpw: bpw },
                bits: 4,
                group_size: GroupSize::Size(64),
            },
            QuantScheme::Exl2 {
                bits: Some(f64::from(bpw)),
                head_bits: None,
            },
        );
    }
}

#[test]
fn compressed_tensors_round_trips() {
    round_trip(
        "ct4",
        QuantWriteOptions {
            format: QuantWriteFormat::CompressedTensors { symmetric: true },
            bits: 4,
            group_size: GroupSize::Size(64),
        },
        QuantScheme::CompressedTensors {
            bits: 4,
            strategy: CtStrategy::Group(64),
            symmetric: true,
            ignore: vec!["lm_head".into()],
        },
    );
    round_trip(
        "ct8",
        QuantWriteOptions {
            format: QuantWriteFormat::CompressedTensors { symmetric: false },
            bits: 8,
            group_size: GroupSize::PerChannel,
        },
        QuantScheme::CompressedTensors {
            bits: 8,
            strategy: CtStrategy::Channel,
            symmetric: false,
            ignore: vec!["lm_head".into()],
        },
    );
}

#[test]
fn group_size_that_does_not_divide_k_is_refused() {
    let orig = model();
    let dir = Scratch::new("g128");
    let err = gguf_to_quantized_hf(
        &orig,
        &dir.0.join("hf"),
        &QuantWriteOptions {
            format: QuantWriteFormat::Awq,
            bits: 4,
            group_size: GroupSize::Size(128),
        },
        &mut |_| {},
    )
    .unwrap_err();
    match err {
        ConvertError::GroupSizeDoesNotDivide {
            tensor,
            k,
            group_size,
        } => {
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight"); // the first linear in the file
            assert_eq!((k, group_size), (576, 128));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(!dir.0.join("hf").join("model.safetensors").exists());
    let err = gguf_to_quantized_hf(
        &orig,
        &dir.0.join("hf"),
        &QuantWriteOptions {
            format: QuantWriteFormat::Awq,
            bits: 3,
            group_size: GroupSize::Size(64),
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&err, ConvertError::UnsupportedQuantization { field, value, .. }
            if field == "bits" && value == "3"),
        "{err}"
    );
}

fn field_of(r: Result<Option<QuantScheme>, ConvertError>) -> (String, String) {
    match r {
        Err(ConvertError::UnsupportedQuantization { field, value, .. }) => (field, value),
        other => panic!("expected UnsupportedQuantization, got {other:?}"),
    }
}

#[test]
fn hostile_configs_are_typed_errors() {
    let q =
        |v: serde_json::Value| QuantScheme::from_config(&json!({ "quantization_config": v }), &[]);
    assert_eq!(
        field_of(q(
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true})
        )),
        ("quant_method".into(), "\"bitsandbytes\"".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "awq", "bits": 5, "group_size": 128,
                          "zero_point": true, "version": "gemm"})
        )),
        ("bits".into(), "5".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "awq", "bits": 4, "group_size": 128,
                          "version": "marlin"})
        )),
        ("version".into(), "\"marlin\"".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "awq", "bits": 4, "group_size": 128,
                          "version": "gemv_fast"})
        )),
        ("version".into(), "\"gemv_fast\"".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128,
                          "checkpoint_format": "marlin"})
        )),
        ("checkpoint_format".into(), "\"marlin\"".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "gptq", "bits": 6, "group_size": 128,
                          "format": "gptq_p"})
        )),
        ("format".into(), "\"gptq_p\"".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "gptq", "bits": 5, "group_size": 128})
        )),
        ("bits".into(), "5".into())
    );
    assert_eq!(
        field_of(q(
            json!({"quant_method": "gptq", "bits": 4, "group_size": 0})
        )),
        ("group_size".into(), "0".into())
    );
    let ct = |weights: serde_json::Value, input: serde_json::Value| {
        json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
               "quantization_status": "compressed",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                             "input_activations": input}}})
    };
    let w4 = json!({"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                    "group_size": 128});
    assert_eq!(
        field_of(q(ct(w4.clone(), json!({"num_bits": 8, "type": "int"})))),
        (
            "config_groups.group_0.input_activations".into(),
            "{\"num_bits\":8,\"type\":\"int\"}".into()
        )
    );
    assert_eq!(
        field_of(q(ct(
            json!({"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16}),
            serde_json::Value::Null
        ))),
        (
            "config_groups.group_0.weights.type".into(),
            "\"float\"".into()
        )
    );
    assert_eq!(
        field_of(q(ct(
            json!({"num_bits": 4, "type": "int", "strategy": "block"}),
            serde_json::Value::Null
        ))),
        (
            "config_groups.group_0.weights.strategy".into(),
            "\"block\"".into()
        )
    );
    let mut fq = ct(w4.clone(), serde_json::Value::Null);
    fq["format"] = json!("float-quantized");
    assert_eq!(
        field_of(q(fq)),
        ("format".into(), "\"float-quantized\"".into())
    );
    // Accepted: the defaults, and EXL2 by tensor names alone.
    assert_eq!(
        q(ct(w4, serde_json::Value::Null)).unwrap(),
        Some(QuantScheme::CompressedTensors {
            bits: 4,
            strategy: CtStrategy::Group(128),
            symmetric: true,
            ignore: vec![],
        })
    );
    assert_eq!(
        q(json!({"quant_method": "gptq", "bits": 3, "group_size": -1})).unwrap(),
        Some(QuantScheme::Gptq {
            bits: 3,
            group_size: GroupSize::PerChannel,
            desc_act: false,
            sym: true,
            zeros: GptqZeros::V1,
        })
    );
    let names = [
        "model.layers.0.mlp.up_proj.q_weight",
        "model.layers.0.mlp.up_proj.q_invperm",
    ];
    assert_eq!(
        QuantScheme::from_config(&json!({}), &names).unwrap(),
        Some(QuantScheme::Exl2 {
            bits: None,
            head_bits: None
        })
    );
    assert_eq!(
        field_of(QuantScheme::from_config(
            &json!({}),
            &["model.layers.0.mlp.up_proj.qweight"]
        )),
        ("quant_method".into(), "absent".into())
    );
    assert_eq!(QuantScheme::from_config(&json!({}), &[]).unwrap(), None);
}

/// Rewrites `dir/model.safetensors` through `edit` (tensor name, bytes) -> Option<bytes>.
fn rewrite(dir: &Path, edit: impl Fn(&str, &[u8]) -> Option<Vec<u8>>) {
    let path = dir.join("model.safetensors");
    let f = SafetensorsFile::open(&path).unwrap();
    let mut out = Vec::new();
    for info in f.tensors() {
        let data = f.data(info);
        if let Some(d) = edit(&info.name, data) {
            out.push(StWriteTensor::new(
                info.name.clone(),
                info.dtype,
                info.shape.clone(),
                d,
            ));
        }
    }
    let meta: BTreeMap<String, String> = f.metadata().clone();
    drop(f);
    write_safetensors(&path, &out, &meta).unwrap();
}

#[test]
fn hostile_quantized_files_are_typed_errors() {
    let orig = model();
    let dir = Scratch::new("hostile");
    let hf = dir.0.join("hf");
    gguf_to_quantized_hf(
        &orig,
        &hf,
        &QuantWriteOptions {
            format: QuantWriteFormat::Gptq {
                act_order: true,
                sym: true,
                v2: false,
            },
            bits: 4,
            group_size: GroupSize::Size(64),
        },
        &mut |_| {},
    )
    .unwrap();
    let out = dir.0.join("x.gguf");
    let opts = QuantizeOptions {
        ty: GgmlType::F16,
        keep_output: false,
        keep_embeddings: false,
    };
    // A g_idx entry out of range.
    rewrite(&hf, |name, d| {
        let mut d = d.to_vec();
        if name == "model.layers.3.mlp.down_proj.g_idx" {
            d[40..44].copy_from_slice(&999i32.to_le_bytes());
        }
        Some(d)
    });
    let err = hf_to_gguf(&Checkpoint::open(&hf).unwrap(), &out, &opts, &mut |_| {}).unwrap_err();
    match &err {
        ConvertError::QuantizedTensor { tensor, source } => {
            assert_eq!(tensor, "model.layers.3.mlp.down_proj");
            assert_eq!(
                *source,
                GroupError::GroupIndexOutOfRange {
                    tensor: "g_idx",
                    index: 10,
                    value: 999,
                    groups: 1536 / 64,
                }
            );
        }
        e => panic!("unexpected {e}"),
    }
    assert!(!out.exists());
    // A missing qzeros tensor.
    rewrite(&hf, |name, d| {
        (name != "model.layers.1.self_attn.k_proj.qzeros").then(|| d.to_vec())
    });
    let err = hf_to_gguf(&Checkpoint::open(&hf).unwrap(), &out, &opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, ConvertError::MissingTensor(t) if t == "model.layers.1.self_attn.k_proj.qzeros"),
        "{err}"
    );
    // A missing qweight with its companions present.
    rewrite(&hf, |name, d| {
        (name != "model.layers.2.mlp.up_proj.qweight").then(|| d.to_vec())
    });
    let err = hf_to_gguf(&Checkpoint::open(&hf).unwrap(), &out, &opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, ConvertError::MissingTensor(t) if t == "model.layers.2.mlp.up_proj.qweight"),
        "{err}"
    );
    assert!(!out.exists());
    // A config that says 5-bit AWQ.
    let cfg_path = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] =
        json!({"quant_method": "awq", "bits": 5, "group_size": 64, "version": "gemm"});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = hf_to_gguf(&Checkpoint::open(&hf).unwrap(), &out, &opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, ConvertError::UnsupportedQuantization { field, .. } if field == "bits"),
        "{err}"
    );
    assert!(!out.exists());
}
