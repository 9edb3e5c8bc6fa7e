//! GPTQ: the spec's worked examples (formats-spec.md §2.6) against the literal AutoGPTQ packer
//! (`auto_gptq/nn_modules/qlinear/qlinear_cuda.py::QuantLinear.pack`, 3-bit branch included;
//! dequant `qlinear_cuda_old.py::forward` v1 `+1`, GPTQModel `BaseQuantLinear.dequantize_weight`
//! v2), act-order `g_idx` (`auto_gptq/quantization/gptq.py::GPTQ.fasterquant`), the sym zero
//! constants (`quantizer.py::Quantizer.find_params`), round trips and hostile inputs.

mod group_common;

use ember_quant::group::GroupError;
use ember_quant::group::GroupTensors;
use ember_quant::group::gptq::{self, Gptq, GptqOptions, GptqParts, GptqZeros};
use group_common::*;
use half::f16;
use proptest::prelude::*;

/// §2.6 4-bit v1 act-order example: K=32 N=32 g=16, `q[k,n] = (5k+n) mod 16`, zeros group 0 = 8,
/// group 1 = (n mod 15)+1, scales group 0 = 2^-5, group 1 = 2^-6·(n+1), g_idx from perm.
fn gptq4_parts(g_idx: &[u32]) -> (Vec<u8>, Vec<u8>, Vec<f16>) {
    let (k, n) = (32usize, 32usize);
    let _ = g_idx;
    let codes = (0..n)
        .flat_map(|nn| (0..k).map(move |kk| ((5 * kk + nn) % 16) as u8))
        .collect();
    let zeros = (0..n).flat_map(|nn| [8u8, (nn % 15 + 1) as u8]).collect();
    let scales = (0..n)
        .flat_map(|nn| {
            [
                f16::from_f32(2f32.powi(-5)),
                f16::from_f32(2f32.powi(-6) * (nn + 1) as f32),
            ]
        })
        .collect();
    (codes, zeros, scales)
}

#[test]
fn gptq4_act_order_matches_pack() {
    let v = vectors();
    let g_idx: Vec<u32> = u32s(&v["gptq4"]["g_idx"]);
    let perm: Vec<u32> = u32s(&v["gptq4"]["perm"]);
    // fasterquant: g_idx = (arange(K)//g)[invperm]; our quantizer derives the same from perm.
    let w = weights(5, 32 * 32, 1.0);
    let opts = GptqOptions {
        bits: 4,
        group_size: 16,
        act_order: Some(&perm),
        sym: true,
        format: GptqZeros::V1,
    };
    assert_eq!(
        gptq::quantize_parts(&w, 32, 32, &opts).unwrap().g_idx,
        g_idx
    );
    assert_eq!(&g_idx[0..4], &[1, 0, 0, 0]);

    let (codes, zeros, scales) = gptq4_parts(&g_idx);
    let t = GptqParts {
        k: 32,
        n: 32,
        bits: 4,
        group_size: 16,
        format: GptqZeros::V1,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
        g_idx: Some(&g_idx),
    }
    .pack()
    .unwrap();
    let qw = words(&t.qweight);
    let qz = words(&t.qzeros);
    // §2.6 table: qweight[0,0], qweight[1,0], qzeros[0,0] (stored 7), qzeros[1,0] (stored 0..7).
    assert_eq!([qw[0], qw[32]], [0x3e94fa50, 0xb61c72d8]);
    assert_eq!([qz[0], qz[4]], [0x77777777, 0x76543210]);
    assert_eq!(qw, u32s(&v["gptq4"]["qweight"]));
    assert_eq!(qz, u32s(&v["gptq4"]["qzeros"]));
    assert_eq!(words(&t.g_idx), g_idx);

    let mut out = vec![0f32; 32 * 32];
    t.view().dequantize_into(&mut out).unwrap();
    assert_eq!(out, f32s(&v["gptq4"]["dequant_nk"]));
    // W^T[0, 0:4] = -0.015625 -0.03125 -0.046875 -0.0625 ; W^T[1, 0:4] = -0.09375 -0.0625 -0.03125 0
    assert_eq!(
        [out[0], out[32], out[64], out[96]],
        [-0.015625, -0.03125, -0.046875, -0.0625]
    );
    assert_eq!(
        [out[1], out[33], out[65], out[97]],
        [-0.09375, -0.0625, -0.03125, 0.0]
    );
    let mut row = vec![0f32; 32];
    for r in 0..32 {
        t.view().dequantize_row(r, &mut row).unwrap();
        assert_eq!(&row[..], &out[r * 32..(r + 1) * 32]);
    }
    // The v2 reading of the same qzeros is one lower (no +1).
    let mut v2 = t.view();
    v2.zeros = GptqZeros::V2;
    let mut out2 = vec![0f32; 32 * 32];
    v2.dequantize_into(&mut out2).unwrap();
    assert_eq!(out2[0], (0.0 - 0.0) * 2f32.powi(-6));
}

#[test]
fn gptq3_bitstream_matches_pack() {
    // §2.6 3-bit: q[k,n] = (k+n) mod 8, z[0,n] = (n mod 7)+1 (stored 0..6), s = 2^-4, K=N=g=32.
    let v = vectors();
    let codes: Vec<u8> = (0..32)
        .flat_map(|n| (0..32).map(move |k| ((k + n) % 8) as u8))
        .collect();
    let zeros: Vec<u8> = (0..32).map(|n| (n % 7 + 1) as u8).collect();
    let scales = vec![f16::from_f32(0.0625); 32];
    let t = GptqParts {
        k: 32,
        n: 32,
        bits: 3,
        group_size: 32,
        format: GptqZeros::V1,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
        g_idx: None,
    }
    .pack()
    .unwrap();
    let qw = words(&t.qweight);
    let qz = words(&t.qzeros);
    assert_eq!(
        [qw[0], qw[32], qw[64]],
        [0x88fac688, 0xc688fac6, 0xfac688fa]
    );
    assert_eq!(qz, vec![0xd11ac688, 0x6b1a2358, 0x688d6344]);
    assert_eq!(qw, u32s(&v["gptq3"]["qweight"]));
    assert_eq!(qz, u32s(&v["gptq3"]["qzeros"]));
    let mut out = vec![0f32; 32 * 32];
    t.view().dequantize_into(&mut out).unwrap();
    assert_eq!(out, f32s(&v["gptq3"]["dequant_nk"]));
    // g_idx absent means k / g.
    let mut no_gidx = t.view();
    no_gidx.g_idx = None;
    let mut out2 = vec![0f32; 32 * 32];
    no_gidx.dequantize_into(&mut out2).unwrap();
    assert_eq!(out, out2);
}

#[test]
fn sym_zero_constants() {
    // §2.4: sym zero = 2^(b-1); v1 stores 2^(b-1) - 1 in every field.
    let w = weights(9, 32 * 64, 2.0);
    let cases: [(u32, GptqZeros, &[u32]); 5] = [
        (4, GptqZeros::V1, &[0x77777777]),
        (8, GptqZeros::V1, &[0x7f7f7f7f]),
        (2, GptqZeros::V1, &[0x55555555]),
        (3, GptqZeros::V1, &[0xdb6db6db, 0xb6db6db6, 0x6db6db6d]),
        (4, GptqZeros::V2, &[0x88888888]),
    ];
    for (bits, format, expect) in cases {
        let opts = GptqOptions {
            bits,
            group_size: 32,
            act_order: None,
            sym: true,
            format,
        };
        let t = gptq::quantize(&w, 32, 64, &opts).unwrap();
        let qz = words(&t.qzeros);
        for (i, &z) in qz.iter().enumerate() {
            assert_eq!(z, expect[i % expect.len()], "bits {bits} word {i}");
        }
    }
}

fn view<'a>(
    bits: u32,
    g: usize,
    qw: &'a [u8],
    qz: &'a [u8],
    sc: &'a [u8],
    gi: Option<&'a [u8]>,
) -> Gptq<'a> {
    Gptq {
        k: 32,
        n: 32,
        bits,
        group_size: g,
        zeros: GptqZeros::V1,
        qweight: qw,
        qzeros: qz,
        scales: sc,
        g_idx: gi,
    }
}

#[test]
fn hostile_inputs_give_typed_errors() {
    let v = vectors();
    let g_idx = u32s(&v["gptq4"]["g_idx"]);
    let (codes, zeros, scales) = gptq4_parts(&g_idx);
    let t = GptqParts {
        k: 32,
        n: 32,
        bits: 4,
        group_size: 16,
        format: GptqZeros::V1,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
        g_idx: Some(&g_idx),
    }
    .pack()
    .unwrap();
    let (qw, qz, sc, gi) = (&t.qweight[..], &t.qzeros[..], &t.scales[..], &t.g_idx[..]);
    assert_eq!(view(4, 16, qw, qz, sc, Some(gi)).validate(), Ok(()));
    assert!(matches!(
        view(5, 16, qw, qz, sc, Some(gi)).validate(),
        Err(GroupError::UnsupportedBits { bits: 5, .. })
    ));
    assert!(matches!(
        view(4, 0, qw, qz, sc, Some(gi)).validate(),
        Err(GroupError::BadGroupSize { group_size: 0, .. })
    ));
    let mut badk = view(3, 16, qw, qz, sc, Some(gi));
    badk.k = 16;
    assert!(matches!(
        badk.validate(),
        Err(GroupError::BadDimension {
            dim: "k",
            value: 16,
            ..
        })
    ));
    assert_eq!(
        view(4, 16, &qw[4..], qz, sc, Some(gi)).validate(),
        Err(GroupError::Length {
            tensor: "qweight",
            expected: 512,
            actual: 508
        })
    );
    assert_eq!(
        view(4, 8, qw, qz, sc, Some(gi)).validate(),
        Err(GroupError::Length {
            tensor: "qzeros",
            expected: 64,
            actual: 32
        })
    );
    assert_eq!(
        view(4, 16, qw, qz, &sc[2..], Some(gi)).validate(),
        Err(GroupError::Length {
            tensor: "scales",
            expected: 128,
            actual: 126
        })
    );
    assert!(matches!(
        view(4, 16, qw, qz, sc, Some(&gi[..8])).validate(),
        Err(GroupError::Length {
            tensor: "g_idx",
            ..
        })
    ));
    let mut bad_gi = gi.to_vec();
    bad_gi[5 * 4..6 * 4].copy_from_slice(&2i32.to_le_bytes());
    assert_eq!(
        view(4, 16, qw, qz, sc, Some(&bad_gi)).validate(),
        Err(GroupError::GroupIndexOutOfRange {
            tensor: "g_idx",
            index: 5,
            value: 2,
            groups: 2
        })
    );
    bad_gi[5 * 4..6 * 4].copy_from_slice(&(-1i32).to_le_bytes());
    assert!(matches!(
        view(4, 16, qw, qz, sc, Some(&bad_gi)).validate(),
        Err(GroupError::GroupIndexOutOfRange { value: -1, .. })
    ));
    let mut out = vec![0f32; 32];
    assert!(matches!(
        view(4, 16, qw, qz, sc, Some(&bad_gi)).dequantize_row(0, &mut out),
        Err(GroupError::GroupIndexOutOfRange { .. })
    ));
    assert_eq!(
        view(4, 16, qw, qz, sc, Some(gi)).dequantize_row(40, &mut out),
        Err(GroupError::RowOutOfRange { row: 40, n: 32 })
    );
    // v1 writer cannot store zero point 0 (the sym=False overflow defect, §2.4).
    let mut z0 = zeros.clone();
    z0[2 * 3 + 1] = 0;
    let p = GptqParts {
        k: 32,
        n: 32,
        bits: 4,
        group_size: 16,
        format: GptqZeros::V1,
        codes: &codes,
        zeros: &z0,
        scales: &scales,
        g_idx: Some(&g_idx),
    };
    assert_eq!(
        p.pack().unwrap_err(),
        GroupError::V1ZeroUnrepresentable {
            group: 1,
            column: 3
        }
    );
    let p2 = GptqParts {
        format: GptqZeros::V2,
        ..p
    };
    assert!(p2.pack().is_ok());
    // act_order that is not a permutation.
    let w = weights(1, 32 * 32, 1.0);
    let mut perm: Vec<u32> = (0..32).collect();
    perm[7] = 3;
    let opts = GptqOptions {
        bits: 4,
        group_size: 16,
        act_order: Some(&perm),
        sym: true,
        format: GptqZeros::V1,
    };
    assert!(matches!(
        gptq::quantize(&w, 32, 32, &opts),
        Err(GroupError::NotPermutation {
            tensor: "act_order",
            index: 7,
            value: 3,
            ..
        })
    ));
    let opts = GptqOptions {
        act_order: Some(&perm[..5]),
        ..opts
    };
    assert!(matches!(
        gptq::quantize(&w, 32, 32, &opts),
        Err(GroupError::Length {
            tensor: "act_order",
            ..
        })
    ));
    // Codes too wide for the bit width; g_idx out of range in the writer.
    let mut c9 = codes.clone();
    c9[0] = 16;
    let p3 = GptqParts { codes: &c9, ..p2 };
    assert!(matches!(
        p3.pack(),
        Err(GroupError::ValueOutOfRange {
            what: "codes",
            value: 16,
            max: 15,
            ..
        })
    ));
    let mut g9 = g_idx.clone();
    g9[31] = 2;
    let p4 = GptqParts {
        g_idx: Some(&g9),
        ..p2
    };
    assert!(matches!(
        p4.pack(),
        Err(GroupError::GroupIndexOutOfRange { index: 31, .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// quantize → dequantize within one step `scale` per group (f16 scale, range widened to 0),
    /// for every bit width, sym/asym, v1/v2, with and without act-order.
    #[test]
    fn roundtrip_within_step(seed in any::<u64>(), bsel in 0usize..4, kb in 1usize..4, nb in 1usize..3,
                             gsel in 0usize..3, sym in any::<bool>(), act in any::<bool>(), amp in 0.01f32..10.0) {
        let bits = [2u32, 3, 4, 8][bsel];
        let (k, n) = (32 * kb, 32 * nb);
        let g = [16usize, 32, 24][gsel];
        let w = weights(seed, n * k, amp);
        let mut perm: Vec<u32> = (0..k as u32).collect();
        if act {
            let mut s = seed | 1;
            for i in (1..k).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                perm.swap(i, (s % (i as u64 + 1)) as usize);
            }
        }
        // v1 only when sym (the writer rule of §2.4).
        let format = if sym { GptqZeros::V1 } else { GptqZeros::V2 };
        let opts = GptqOptions { bits, group_size: g, act_order: act.then_some(&perm[..]), sym, format };
        let p = gptq::quantize_parts(&w, n, k, &opts).unwrap();
        let t = gptq::quantize(&w, n, k, &opts).unwrap();
        let mut out = vec![0f32; n * k];
        t.view().dequantize_into(&mut out).unwrap();
        let groups = k.div_ceil(g);
        for r in 0..n {
            for kk in 0..k {
                let gi = p.g_idx[kk] as usize;
                let s = p.scales[r * groups + gi].to_f32();
                let e = (w[r * k + kk] - out[r * k + kk]).abs();
                // one step; sym with an asymmetric range can clip the positive end by ≤ 1 step.
                prop_assert!(e <= 1.0 * s + 1e-6, "bits {} r {} k {} err {} step {}", bits, r, kk, e, s);
            }
        }
        let mut row = vec![0f32; k];
        t.view().dequantize_row(n - 1, &mut row).unwrap();
        prop_assert_eq!(&row[..], &out[(n - 1) * k..]);
    }
}
