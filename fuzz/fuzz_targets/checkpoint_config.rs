//! Fuzz `QuantScheme::from_config`, the parser of a checkpoint's `quantization_config` (AWQ,
//! GPTQ, EXL2, compressed-tensors): any JSON value, given as `config.json` itself and as its
//! `quantization_config`, with several tensor-name sets, must give a scheme, `None` or a typed
//! error, never a panic. The answer is deterministic and ignores the tensor names whenever a
//! `quantization_config` is present; a parsed scheme holds only widths and group sizes its
//! format supports, prints, and survives a writer round trip: the `quantization_config` that
//! `QuantWriteOptions` writes for it parses back to the same scheme.
//!
//! `Checkpoint::open` is not fuzzed here: it reads a directory, and its
//! `model.safetensors.index.json` parsing is private to it (no in-memory constructor); the
//! safetensors files it maps are covered by `safetensors_reader`.
//!
//! Input: JSON text (seeds are real configs; dictionary `checkpoint_config.dict`).
#![no_main]

use ember_convert::{
    AwqVersion, CtStrategy, GroupSize, QuantScheme, QuantWriteFormat, QuantWriteOptions,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const NAME_SETS: [&[&str]; 5] = [
    &[],
    &["model.norm.weight", "lm_head.weight"],
    &[
        "model.layers.0.self_attn.q_proj.q_weight",
        "model.layers.0.self_attn.q_proj.q_invperm",
    ],
    &["model.layers.0.mlp.up_proj.qweight"],
    &["model.layers.0.mlp.up_proj.weight_packed"],
];

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    check(&v);
    check(&json!({ "quantization_config": v }));
});

fn check(config: &Value) {
    let first = QuantScheme::from_config(config, NAME_SETS[0]);
    let again = QuantScheme::from_config(config, NAME_SETS[0]);
    assert_eq!(
        summary(&first),
        summary(&again),
        "from_config is not deterministic"
    );
    let has_qc = config
        .get("quantization_config")
        .is_some_and(|q| !q.is_null());
    for names in &NAME_SETS[1..] {
        let r = QuantScheme::from_config(config, names);
        if has_qc {
            assert_eq!(
                summary(&r),
                summary(&first),
                "tensor names {names:?} change the answer despite a quantization_config"
            );
        }
        if let Ok(Some(s)) = &r {
            scheme_invariants(s);
        }
    }
    if let Ok(Some(s)) = &first {
        scheme_invariants(s);
    }
    if let Err(e) = &first {
        std::hint::black_box(e.to_string());
    }
}

/// A comparable form of a result (`ConvertError` has no `PartialEq`).
fn summary(r: &Result<Option<QuantScheme>, ember_convert::ConvertError>) -> String {
    match r {
        Ok(s) => format!("Ok({s:?})"),
        Err(e) => format!("Err({e})"),
    }
}

fn group_ok(g: GroupSize) {
    assert_ne!(g, GroupSize::Size(0), "a zero group size was accepted");
}

fn scheme_invariants(s: &QuantScheme) {
    std::hint::black_box(s.to_string());
    let (format, bits, group_size) = match s {
        QuantScheme::Awq {
            version,
            bits,
            group_size,
            ..
        } => {
            assert_eq!(*bits, 4, "AWQ with {bits} bits");
            group_ok(*group_size);
            // The writer only writes GEMM.
            if *version != AwqVersion::Gemm {
                return;
            }
            (QuantWriteFormat::Awq, *bits, *group_size)
        }
        QuantScheme::Gptq {
            bits,
            group_size,
            desc_act,
            sym,
            zeros,
        } => {
            assert!(matches!(bits, 2 | 3 | 4 | 8), "GPTQ with {bits} bits");
            group_ok(*group_size);
            let format = QuantWriteFormat::Gptq {
                act_order: *desc_act,
                sym: *sym,
                v2: *zeros == ember_quant::group::gptq::GptqZeros::V2,
            };
            (format, *bits, *group_size)
        }
        QuantScheme::Exl2 { .. } => return,
        QuantScheme::CompressedTensors {
            bits,
            strategy,
            symmetric,
            ..
        } => {
            assert!((2..=8).contains(bits), "compressed-tensors with {bits} bits");
            let g = match strategy {
                CtStrategy::Group(g) => GroupSize::Size(*g),
                CtStrategy::Channel => GroupSize::PerChannel,
            };
            group_ok(g);
            let format = QuantWriteFormat::CompressedTensors {
                symmetric: *symmetric,
            };
            (format, *bits, g)
        }
    };
    let opts = QuantWriteOptions {
        format,
        bits,
        group_size,
    };
    let written = json!({ "quantization_config": opts.quantization_config() });
    let back = match QuantScheme::from_config(&written, &[]) {
        Ok(Some(b)) => b,
        other => panic!(
            "the config written for {s:?} does not parse back: {}",
            summary(&other)
        ),
    };
    // Lists (modules_to_not_convert, ignore) are the writer's own; compare the rest.
    let same = match (s, &back) {
        (
            QuantScheme::Awq {
                version: v1,
                bits: b1,
                group_size: g1,
                ..
            },
            QuantScheme::Awq {
                version: v2,
                bits: b2,
                group_size: g2,
                ..
            },
        ) => (v1, b1, g1) == (v2, b2, g2),
        (QuantScheme::Gptq { .. }, QuantScheme::Gptq { .. }) => s == &back,
        (
            QuantScheme::CompressedTensors {
                bits: b1,
                strategy: s1,
                symmetric: y1,
                ..
            },
            QuantScheme::CompressedTensors {
                bits: b2,
                strategy: s2,
                symmetric: y2,
                ..
            },
        ) => (b1, s1, y1) == (b2, s2, y2),
        _ => false,
    };
    assert!(same, "writer round trip: {s:?} came back as {back:?}");
}
