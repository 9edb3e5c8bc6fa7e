//! compressed-tensors pack-quantized: the spec's worked examples (formats-spec.md §4.5) against
//! the literal `compressors/pack_quantized/helpers.py::pack_to_int32` (dense, ≥ 0.17) and the
//! legacy (pre-3f01c782) packer, dequant `quantization/lifecycle/forward_helpers.py::_dequantize`,
//! round trips and hostile inputs.

mod group_common;

use ember_quant::group::GroupError;
use ember_quant::group::GroupTensors;
use ember_quant::group::ct::{self, CtPacked, CtParts, ScaleDtype};
use group_common::*;
use proptest::prelude::*;

const Q: [[i8; 16]; 2] = [
    [-8, -7, -1, 0, 1, 2, 6, 7, 3, -3, 0, 0, 5, -5, 4, -4],
    [7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8],
];

fn w4_example() -> ct::CtTensors {
    let codes: Vec<i8> = Q.concat();
    CtParts {
        k: 16,
        n: 2,
        bits: 4,
        group_size: 8,
        codes: &codes,
        zero_points: None,
        scales: &[0.5, 0.25, 0.125, 1.0],
        scale_dtype: ScaleDtype::Bf16,
    }
    .pack()
    .unwrap()
}

#[test]
fn w4_sym_group_matches_pack_to_int32() {
    let v = vectors();
    let t = w4_example();
    assert_eq!(
        words(&t.weight_packed),
        vec![0xfea98710, 0x4c3d885b, 0x89abcdef, 0x01234567]
    );
    assert_eq!(words(&t.weight_packed), u32s(&v["ct4"]["weight_packed"]));
    assert!(t.weight_zero_point.is_none());
    let mut out = vec![0f32; 32];
    t.view().dequantize_into(&mut out).unwrap();
    assert_eq!(out, f32s(&v["ct4"]["dequant_nk"]));
    assert_eq!(&out[0..8], &[-4.0, -3.5, -0.5, 0.0, 0.5, 1.0, 3.0, 3.5]);
    // I32 weight_shape (legacy metadata) is accepted too.
    let shape32 = i32_bytes(&[2, 16]);
    let view = CtPacked {
        weight_shape: &shape32,
        ..t.view()
    };
    let mut row = vec![0f32; 16];
    view.dequantize_row(1, &mut row).unwrap();
    assert_eq!(&row[..], &out[16..]);
}

#[test]
fn asym_zero_point_packed_along_n() {
    // §4.5 channel zp [-3, 0, 5] -> weight_zero_point [1,1] = 0x00000d85.
    let v = vectors();
    let codes = vec![0i8; 3 * 8];
    let t = CtParts {
        k: 8,
        n: 3,
        bits: 4,
        group_size: 8,
        codes: &codes,
        zero_points: Some(&[-3, 0, 5]),
        scales: &[1.0, 1.0, 1.0],
        scale_dtype: ScaleDtype::F32,
    }
    .pack()
    .unwrap();
    let zp = words(t.weight_zero_point.as_ref().unwrap());
    assert_eq!(zp, vec![0x00000d85]);
    assert_eq!(zp, u32s(&v["ct_zp"]["packed"]));
    let mut out = vec![0f32; 24];
    t.view().dequantize_into(&mut out).unwrap();
    assert_eq!([out[0], out[8], out[16]], [3.0, 0.0, -5.0]);
}

#[test]
fn three_bit_dense_and_legacy() {
    // §4.5: 11 values -4..3,-4,-3,-2: dense 0x88fac688 0, legacy 0x08fac688 0x2.
    let v = vectors();
    assert_eq!(u32s(&v["ct3"]["dense"]), vec![0x88fac688, 0]);
    assert_eq!(u32s(&v["ct3"]["legacy"]), vec![0x08fac688, 2]);
    let codes: Vec<i8> = vec![-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, -2];
    let t = CtParts {
        k: 11,
        n: 1,
        bits: 3,
        group_size: 11,
        codes: &codes,
        zero_points: None,
        scales: &[1.0],
        scale_dtype: ScaleDtype::F16,
    }
    .pack()
    .unwrap();
    // 33 bits -> ceil(11*3/32) = 2 words; the 11th value's top bit spills into word 1.
    assert_eq!(words(&t.weight_packed), vec![0x88fac688, 0]);
}

#[test]
fn three_bit_asym_group_dense_and_legacy_readers() {
    // N=21, K=64, g=16 (G=4): codes and zero points from default_rng(3); dense pack_to_int32 and
    // the legacy packer (different widths: 6 vs 7 words per row), both read back identically.
    let v = vectors();
    let a = &v["ct3_asym"];
    let codes: Vec<i8> = a["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i8)
        .collect();
    let zp: Vec<i8> = a["zp"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i8)
        .collect();
    let scales: Vec<f32> = (0..84).map(|i| 0.25 + i as f32 / 64.0).collect();
    let t = CtParts {
        k: 64,
        n: 21,
        bits: 3,
        group_size: 16,
        codes: &codes,
        zero_points: Some(&zp),
        scales: &scales,
        scale_dtype: ScaleDtype::F32,
    }
    .pack()
    .unwrap();
    assert_eq!(words(&t.weight_packed), u32s(&a["weight_packed"]));
    assert_eq!(
        words(t.weight_zero_point.as_ref().unwrap()),
        u32s(&a["weight_zero_point"])
    );
    let mut dense = vec![0f32; 21 * 64];
    t.view().dequantize_into(&mut dense).unwrap();
    for n in 0..21 {
        for k in 0..64 {
            let g = k / 16;
            let want = (codes[n * 64 + k] as f32 - zp[n * 4 + g] as f32) * scales[n * 4 + g];
            assert_eq!(dense[n * 64 + k], want);
        }
    }
    let lp = bytes_of(&u32s(&a["legacy_packed"]));
    let lz = bytes_of(&u32s(&a["legacy_zero_point"]));
    let legacy = CtPacked {
        weight_packed: &lp,
        weight_zero_point: Some(&lz),
        ..t.view()
    };
    let mut out = vec![0f32; 21 * 64];
    legacy.dequantize_into(&mut out).unwrap();
    assert_eq!(out, dense);
    // g_idx: a permuted group assignment gives the per-element lookup.
    let gidx: Vec<i64> = (0..64).map(|k| (k * 7 % 64) as i64 / 16).collect();
    let gb = i32_bytes(&gidx);
    let with_g = CtPacked {
        weight_g_idx: Some(&gb),
        ..t.view()
    };
    with_g.dequantize_into(&mut out).unwrap();
    let g = gidx[5] as usize;
    assert_eq!(out[5], (codes[5] as f32 - zp[g] as f32) * scales[g]);
}

#[test]
fn hostile_inputs_give_typed_errors() {
    let t = w4_example();
    let view = t.view();
    assert_eq!(view.validate(), Ok(()));
    assert!(matches!(
        CtPacked { bits: 9, ..view }.validate(),
        Err(GroupError::UnsupportedBits { bits: 9, .. })
    ));
    assert!(matches!(
        CtPacked { bits: 1, ..view }.validate(),
        Err(GroupError::UnsupportedBits { bits: 1, .. })
    ));
    assert!(matches!(
        CtPacked {
            group_size: 0,
            ..view
        }
        .validate(),
        Err(GroupError::BadGroupSize { .. })
    ));
    assert_eq!(
        CtPacked {
            weight_packed: &t.weight_packed[4..],
            ..view
        }
        .validate(),
        Err(GroupError::Length {
            tensor: "weight_packed",
            expected: 16,
            actual: 12
        })
    );
    assert!(matches!(
        CtPacked {
            group_size: 4,
            ..view
        }
        .validate(),
        Err(GroupError::Length {
            tensor: "weight_scale",
            ..
        })
    ));
    assert!(matches!(
        CtPacked {
            scale_dtype: ScaleDtype::F32,
            ..view
        }
        .validate(),
        Err(GroupError::Length {
            tensor: "weight_scale",
            ..
        })
    ));
    let shape = i32_bytes(&[16, 2]);
    assert_eq!(
        CtPacked {
            weight_shape: &shape,
            ..view
        }
        .validate(),
        Err(GroupError::WeightShape {
            rows: 16,
            cols: 2,
            n: 2,
            k: 16
        })
    );
    assert!(matches!(
        CtPacked {
            weight_shape: &shape[..6],
            ..view
        }
        .validate(),
        Err(GroupError::Length {
            tensor: "weight_shape",
            ..
        })
    ));
    let zp = [0u8; 12];
    assert!(matches!(
        CtPacked {
            weight_zero_point: Some(&zp),
            ..view
        }
        .validate(),
        Err(GroupError::Length {
            tensor: "weight_zero_point",
            ..
        })
    ));
    let gi = i32_bytes(&[0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        CtPacked {
            weight_g_idx: Some(&gi),
            ..view
        }
        .validate(),
        Err(GroupError::GroupIndexOutOfRange {
            tensor: "weight_g_idx",
            index: 2,
            value: 2,
            groups: 2
        })
    );
    let mut row = vec![0f32; 16];
    assert_eq!(
        view.dequantize_row(2, &mut row),
        Err(GroupError::RowOutOfRange { row: 2, n: 2 })
    );
    // Writer: code out of the signed range.
    let codes = vec![8i8; 16];
    let p = CtParts {
        k: 16,
        n: 1,
        bits: 4,
        group_size: 8,
        codes: &codes,
        zero_points: None,
        scales: &[1.0, 1.0],
        scale_dtype: ScaleDtype::F16,
    };
    assert!(matches!(
        p.pack(),
        Err(GroupError::ValueOutOfRange {
            what: "codes",
            value: 8,
            min: -8,
            max: 7,
            ..
        })
    ));
    assert!(matches!(
        ct::quantize(&[f32::INFINITY; 16], 1, 16, 4, 8, true, ScaleDtype::F16),
        Err(GroupError::NonFinite { index: 0 })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// quantize → dequantize within one step `s` per group, any bits 2..=8, sym/asym, any scale
    /// dtype, group sizes that need not divide k.
    #[test]
    fn roundtrip_within_step(seed in any::<u64>(), bits in 2u32..9, n in 1usize..12, k in 1usize..80,
                             g in 1usize..40, sym in any::<bool>(), dsel in 0usize..3, amp in 0.01f32..10.0) {
        let dtype = [ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32][dsel];
        let w = weights(seed, n * k, amp);
        let p = ct::quantize_parts(&w, n, k, bits, g, sym, dtype).unwrap();
        let t = ct::quantize(&w, n, k, bits, g, sym, dtype).unwrap();
        prop_assert_eq!(t.weight_zero_point.is_some(), !sym);
        let mut out = vec![0f32; n * k];
        t.view().dequantize_into(&mut out).unwrap();
        let groups = k.div_ceil(g);
        for r in 0..n {
            for kk in 0..k {
                let s = p.scales[r * groups + kk / g];
                let e = (w[r * k + kk] - out[r * k + kk]).abs();
                // One step, plus the clipping that rounding s to its dtype (relative error eps)
                // can cause at the range ends: up to 2^b · eps steps. An f16 subnormal scale
                // (below 2^-14) is rounded to a multiple of 2^-24: relative error 2^-25 / s.
                let eps = [2f32.powi(-11).max(2f32.powi(-25) / s), 2f32.powi(-8), 1e-7][dsel];
                prop_assert!(e <= s * (1.0 + (1u32 << bits) as f32 * eps) + 1e-6, "r {} k {} err {} step {}", r, kk, e, s);
            }
        }
    }
}
