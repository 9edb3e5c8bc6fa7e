//! AWQ GEMM/GEMV: the spec's worked examples (formats-spec.md §1.4) against the literal
//! AutoAWQ packers (`awq/modules/linear/gemm.py::WQLinear_GEMM.from_linear`,
//! `gemv.py::WQLinear_GEMV.from_linear`, dequant `awq/utils/packing_utils.py::dequantize_gemm`),
//! round trips and hostile inputs.

mod group_common;

use ember_quant::group::awq::{self, AwqGemm, AwqGemv, AwqParts};
use ember_quant::group::{GroupError, GroupFormat, GroupTensors};
use group_common::*;
use half::f16;
use proptest::prelude::*;

/// §1.4 GEMM inputs, `[n][k]` orientation: `q[k,n] = (n+3k+5) mod 16`, `z[j,n] = (4j+n) mod 16`,
/// `s[j,n] = 2^-(4+n mod 3)·(1+j)`; K=16, N=32, g=8.
fn gemm_example() -> awq::AwqTensors {
    let (k, n, g) = (16usize, 32usize, 8usize);
    let codes: Vec<u8> = (0..n)
        .flat_map(|nn| (0..k).map(move |kk| ((nn + 3 * kk + 5) % 16) as u8))
        .collect();
    let zeros: Vec<u8> = (0..n)
        .flat_map(|nn| (0..k / g).map(move |j| ((4 * j + nn) % 16) as u8))
        .collect();
    let scales: Vec<f16> = (0..n)
        .flat_map(|nn| {
            (0..k / g)
                .map(move |j| f16::from_f32(2f32.powi(-(4 + (nn % 3) as i32)) * (1 + j) as f32))
        })
        .collect();
    AwqParts {
        k,
        n,
        group_size: g,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
    }
    .pack_gemm()
    .unwrap()
}

#[test]
fn gemm_pack_matches_from_linear() {
    let v = vectors();
    let t = gemm_example();
    let qw = words(&t.qweight);
    let qz = words(&t.qzeros);
    // Spec §1.4 table (from WQLinear_GEMM.from_linear):
    assert_eq!(&qw[0..4], &[0xca86b975, 0x420e31fd, 0xca86b975, 0x420e31fd]);
    assert_eq!(qw[4], 0xfdb9eca8);
    assert_eq!(qz[0], 0x75316420);
    assert_eq!(qz[4], 0xb975a864);
    // Every word of the literal packer's output.
    assert_eq!(qw, u32s(&v["awq_gemm"]["qweight"]));
    assert_eq!(qz, u32s(&v["awq_gemm"]["qzeros"]));
}

#[test]
fn gemm_dequant_matches_dequantize_gemm() {
    let v = vectors();
    let t = gemm_example();
    let view = t.gemm();
    view.validate().unwrap();
    let mut out = vec![0f32; 32 * 16];
    view.dequantize_into(&mut out).unwrap();
    assert_eq!(out, f32s(&v["awq_gemm"]["dequant_nk"]));
    // W^T[k=0, 0:4] = 0.3125 0.15625 0.078125 0.3125 ; W^T[k=9, 12:16] = 1.5 0.75 0.375 1.5
    assert_eq!(
        [out[0], out[16], out[32], out[48]],
        [0.3125, 0.15625, 0.078125, 0.3125]
    );
    assert_eq!(
        [
            out[12 * 16 + 9],
            out[13 * 16 + 9],
            out[14 * 16 + 9],
            out[15 * 16 + 9]
        ],
        [1.5, 0.75, 0.375, 1.5]
    );
    let mut row = vec![0f32; 16];
    for r in 0..32 {
        view.dequantize_row(r, &mut row).unwrap();
        assert_eq!(&row[..], &out[r * 16..(r + 1) * 16]);
    }
    assert_eq!(GroupTensors::desc(&view).format, GroupFormat::AwqGemm);
}

#[test]
fn gemv_pack_and_dequant_match_from_linear() {
    // §1.4 GEMV: N=8, K=64, g=32, q[n,k] = (k+2n) mod 16, z[n,j] = (n+j+3) mod 16, s = 2^-(5+j).
    let v = vectors();
    let (n, k, g) = (8usize, 64usize, 32usize);
    let codes: Vec<u8> = (0..n)
        .flat_map(|nn| (0..k).map(move |kk| ((kk + 2 * nn) % 16) as u8))
        .collect();
    let zeros: Vec<u8> = (0..n)
        .flat_map(|nn| (0..2).map(move |j| ((nn + j + 3) % 16) as u8))
        .collect();
    let scales: Vec<f16> = (0..n)
        .flat_map(|_| (0..2).map(|j| f16::from_f32(2f32.powi(-(5 + j)))))
        .collect();
    let t = AwqParts {
        k,
        n,
        group_size: g,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
    }
    .pack_gemv()
    .unwrap();
    assert_eq!(awq::gemv_zeros_width(64, 32), Some(4));
    let qw = words(&t.qweight);
    let qz = words(&t.qzeros);
    assert_eq!(qw[0], 0x76543210);
    assert_eq!(&qz[0..4], &[0x43, 0, 0, 0]);
    assert_eq!(qw, u32s(&v["awq_gemv"]["qweight"]));
    assert_eq!(qz, u32s(&v["awq_gemv"]["qzeros"]));
    let sc: Vec<f32> = t
        .scales
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(sc, f32s(&v["awq_gemv"]["scales"]));
    let mut out = vec![0f32; n * k];
    t.gemv().dequantize_into(&mut out).unwrap();
    assert_eq!(out, f32s(&v["awq_gemv"]["dequant_nk"]));
}

fn gemm<'a>(k: usize, n: usize, g: usize, qw: &'a [u8], qz: &'a [u8], sc: &'a [u8]) -> AwqGemm<'a> {
    AwqGemm {
        k,
        n,
        group_size: g,
        bits: 4,
        qweight: qw,
        qzeros: qz,
        scales: sc,
    }
}

#[test]
fn hostile_inputs_give_typed_errors() {
    let t = gemm_example();
    let (qw, qz, sc) = (&t.qweight[..], &t.qzeros[..], &t.scales[..]);
    assert!(matches!(gemm(16, 32, 8, qw, qz, sc).validate(), Ok(())));
    assert!(matches!(
        gemm(16, 32, 5, qw, qz, sc).validate(),
        Err(GroupError::BadGroupSize {
            group_size: 5,
            k: 16,
            ..
        })
    ));
    assert!(matches!(
        gemm(16, 32, 0, qw, qz, sc).validate(),
        Err(GroupError::BadGroupSize { group_size: 0, .. })
    ));
    let mut b3 = gemm(16, 32, 8, qw, qz, sc);
    b3.bits = 3;
    assert!(matches!(
        b3.validate(),
        Err(GroupError::UnsupportedBits { bits: 3, .. })
    ));
    assert!(matches!(
        gemm(16, 30, 8, qw, qz, sc).validate(),
        Err(GroupError::BadDimension {
            dim: "n",
            value: 30,
            ..
        })
    ));
    assert_eq!(
        gemm(16, 32, 8, &qw[..qw.len() - 1], qz, sc).validate(),
        Err(GroupError::Length {
            tensor: "qweight",
            expected: 256,
            actual: 255
        })
    );
    assert_eq!(
        gemm(16, 32, 4, qw, qz, sc).validate(),
        Err(GroupError::Length {
            tensor: "qzeros",
            expected: 64,
            actual: 32
        })
    );
    assert_eq!(
        gemm(16, 32, 8, qw, qz, &sc[..10]).validate(),
        Err(GroupError::Length {
            tensor: "scales",
            expected: 128,
            actual: 10
        })
    );
    // Absurd dimensions: overflow is a length error, not a panic or a huge allocation.
    assert!(matches!(
        gemm(usize::MAX / 2 + 1, 1 << 40, 1, qw, qz, sc).validate(),
        Err(GroupError::Length {
            tensor: "qweight",
            expected: usize::MAX,
            ..
        })
    ));
    let view = gemm(16, 32, 8, qw, qz, sc);
    let mut row = vec![0f32; 16];
    assert_eq!(
        view.dequantize_row(32, &mut row),
        Err(GroupError::RowOutOfRange { row: 32, n: 32 })
    );
    assert!(matches!(
        view.dequantize_row(0, &mut row[..15]),
        Err(GroupError::Length { tensor: "out", .. })
    ));
    let mut all = vec![0f32; 10];
    assert!(matches!(
        view.dequantize_into(&mut all),
        Err(GroupError::Length { tensor: "out", .. })
    ));
    // GEMV group sizes other than 32, 64, >= 128 (calculate_zeros_width raises upstream).
    let gv = AwqGemv {
        k: 64,
        n: 8,
        group_size: 16,
        bits: 4,
        qweight: qw,
        qzeros: qz,
        scales: sc,
    };
    assert!(matches!(
        gv.validate(),
        Err(GroupError::BadGroupSize { group_size: 16, .. })
    ));
    // Writer: codes out of range, NaN weights.
    let codes = vec![16u8; 8 * 8];
    let zeros = vec![0u8; 8];
    let scales = vec![f16::ONE; 8];
    let p = AwqParts {
        k: 8,
        n: 8,
        group_size: 8,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
    };
    assert!(matches!(
        p.pack_gemm(),
        Err(GroupError::ValueOutOfRange {
            what: "codes",
            value: 16,
            ..
        })
    ));
    let mut w = vec![0.5f32; 64];
    w[9] = f32::NAN;
    assert_eq!(
        awq::quantize(&w, 8, 8, 8).unwrap_err(),
        GroupError::NonFinite { index: 9 }
    );
    assert!(matches!(
        awq::quantize(&w[..63], 8, 8, 8),
        Err(GroupError::Length {
            tensor: "weight",
            ..
        })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// quantize → dequantize stays within one step `(max − min)/15` (range widened to 0) per group.
    #[test]
    fn roundtrip_within_step(seed in any::<u64>(), nb in 1usize..5, groups in 1usize..4, gsel in 0usize..3, amp in 0.01f32..10.0) {
        let g = [8usize, 32, 64][gsel];
        let (n, k) = (nb * 8, groups * g);
        let w = weights(seed, n * k, amp);
        let t = awq::quantize(&w, n, k, g).unwrap();
        prop_assert_eq!(t.qweight.len(), k * n / 2);
        let mut out = vec![0f32; n * k];
        t.gemm().dequantize_into(&mut out).unwrap();
        for r in 0..n {
            for j in 0..groups {
                let x = &w[r * k + j * g..r * k + (j + 1) * g];
                let (mn, mx) = x.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                let step = (mx - mn).max(1e-5) / 15.0;
                for i in 0..g {
                    let e = (x[i] - out[r * k + j * g + i]).abs();
                    prop_assert!(e <= 0.51 * step + 1e-6, "row {} k {} err {} step {}", r, j * g + i, e, step);
                }
            }
        }
        // The same weight in GPTQ's layout dequantizes to the same bits.
        let gq = t.gemm().to_gptq().unwrap();
        let mut via_gptq = vec![0f32; n * k];
        gq.view().dequantize_into(&mut via_gptq).unwrap();
        prop_assert!(via_gptq.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()));
        // GEMV layout of the same parameters dequantizes identically (g = 32/64 only).
        if g >= 32 {
            let p = awq::quantize_parts(&w, n, k, g).unwrap();
            let gv = AwqParts { k, n, group_size: g, codes: &p.codes, zeros: &p.zeros, scales: &p.scales }.pack_gemv().unwrap();
            let mut out2 = vec![0f32; n * k];
            gv.gemv().dequantize_into(&mut out2).unwrap();
            prop_assert_eq!(out, out2);
        }
    }
}
