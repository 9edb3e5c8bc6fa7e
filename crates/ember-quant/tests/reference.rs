//! Checks against fixtures generated from ggml's reference implementations (see
//! fixtures/gen_fixtures.py): dequantization must reproduce the expected f32 values bit for
//! bit, and quantization must reproduce the expected block bytes exactly.

use ember_quant::{ALL_TYPES, GgmlType, dequantize, dot_row, quantize, supports_dequantize};
use serde_json::Value;

const FIXTURES: &str = include_str!("fixtures/reference.json");

fn fixtures() -> Value {
    serde_json::from_str(FIXTURES).expect("reference.json parses")
}

fn ty_named(name: &str) -> GgmlType {
    *ALL_TYPES
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn f32s(s: &str) -> Vec<f32> {
    hex(s)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn field<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("missing {key}"))
}

#[test]
fn dequantize_matches_reference_bit_exactly() {
    let fx = fixtures();
    let cases = fx["dequant"].as_array().expect("dequant cases");
    let mut covered = Vec::new();
    for case in cases {
        let ty = ty_named(field(case, "type"));
        let blocks = hex(field(case, "blocks"));
        let expected = f32s(field(case, "values"));
        let mut got = vec![0.0f32; expected.len()];
        dequantize(ty, &blocks, &mut got).expect("dequantize");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            let same = g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan());
            assert!(same, "{ty} element {i}: got {g:e} expected {e:e}");
        }
        covered.push(ty);
    }
    for ty in ALL_TYPES.iter().filter(|t| supports_dequantize(**t)) {
        assert!(covered.contains(ty), "no dequant fixture for {ty}");
    }
}

#[test]
fn quantize_matches_reference_bytes() {
    let fx = fixtures();
    let cases = fx["quant"].as_array().expect("quant cases");
    let mut covered = Vec::new();
    for case in cases {
        let ty = ty_named(field(case, "type"));
        let input = f32s(field(case, "input"));
        let expected = hex(field(case, "blocks"));
        let got = quantize(ty, &input).expect("quantize");
        assert_eq!(got.len(), expected.len(), "{ty}");
        if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            let block = i / ty.type_size();
            panic!(
                "{ty} ({}): first differing byte {i} (block {block}, offset {}): got {:#04x} expected {:#04x}",
                field(case, "source"),
                i % ty.type_size(),
                got[i],
                expected[i]
            );
        }
        covered.push(ty);
    }
    // Every quantized type has a byte-exact quantize fixture (F32 is a plain copy).
    for ty in ALL_TYPES
        .iter()
        .filter(|t| supports_dequantize(**t) && **t != GgmlType::F32)
    {
        assert!(covered.contains(ty), "no quant fixture for {ty}");
    }
}

#[test]
fn dot_row_matches_reference_values() {
    // The fixtures' blocks are random bit patterns: a good workout for dot_row's unpacking.
    let fx = fixtures();
    for case in fx["dequant"].as_array().expect("dequant cases") {
        let ty = ty_named(field(case, "type"));
        let blocks = hex(field(case, "blocks"));
        let w = f32s(field(case, "values"));
        if w.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let bs = ty.block_size().max(32);
        let x: Vec<f32> = (0..w.len())
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 37.0)
            .collect();
        // Dot each whole row of `bs` elements separately, as the matmul kernel does.
        let bytes_per = ty.bytes_for(bs as u64).expect("whole blocks") as usize;
        for r in 0..w.len() / bs {
            let (ws, xs) = (&w[r * bs..(r + 1) * bs], &x[r * bs..(r + 1) * bs]);
            let want: f64 = ws.iter().zip(xs).map(|(a, b)| *a as f64 * *b as f64).sum();
            // Error scale: max |w| times Σ|x| (covers the block offsets, see roundtrip.rs).
            let amax = ws.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            let mag = amax * xs.iter().map(|v| v.abs() as f64).sum::<f64>();
            let got = dot_row(ty, &blocks[r * bytes_per..(r + 1) * bytes_per], xs) as f64;
            assert!(
                (got - want).abs() <= 4e-6 * mag + 1e-30,
                "{ty} row {r}: got {got} want {want} (mag {mag})"
            );
        }
    }
}
