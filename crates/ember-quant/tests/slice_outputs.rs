//! `PackedLinear::slice_outputs`: each part of a fused layer (Phi-3's `qkv_proj`, `gate_up_proj`)
//! dequantizes to exactly the whole's rows, for every format; misaligned, empty or out-of-range
//! ranges and malformed weights are errors, never panics.

mod group_common;

use std::ops::Range;

use ember_quant::group::awq::{self, AwqParts, AwqTensors};
use ember_quant::group::ct::{self, CtTensors, ScaleDtype};
use ember_quant::group::exl2::{self, Exl2Perm};
use ember_quant::group::gptq::{self, GptqOptions, GptqZeros};
use ember_quant::group::{ByteView, GroupError, PackedLinear};
use group_common::*;
use proptest::prelude::*;

fn bv(bytes: &[u8]) -> ByteView {
    ByteView::from_vec(bytes.to_vec())
}

fn dense(w: &PackedLinear) -> Vec<f32> {
    let d = w.desc();
    let mut out = vec![0f32; d.n * d.k];
    w.view().dequantize_into(&mut out).unwrap();
    out
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each range's slice dequantizes to the whole's rows, bit for bit.
fn check_slices(w: &PackedLinear, parts: &[Range<usize>]) {
    let whole = dense(w);
    let d = w.desc();
    for r in parts {
        let s = w
            .slice_outputs(r.clone())
            .unwrap_or_else(|e| panic!("{:?} rows {r:?}: {e}", d.format));
        let sd = s.desc();
        assert_eq!((sd.format, sd.k, sd.n), (d.format, d.k, r.len()));
        assert_eq!(
            bits_of(&dense(&s)),
            bits_of(&whole[r.start * d.k..r.end * d.k]),
            "{:?} rows {r:?}",
            d.format
        );
    }
}

fn bad_slice(w: &PackedLinear, r: Range<usize>) {
    match w.slice_outputs(r.clone()) {
        Err(GroupError::BadSlice { start, end, n, .. }) => {
            assert_eq!((start, end, n), (r.start, r.end, w.desc().n));
        }
        other => panic!("{:?} rows {r:?}: {other:?}", w.desc().format),
    }
}

/// Empty and out-of-range ranges for any format.
fn out_of_range(w: &PackedLinear) {
    let n = w.desc().n;
    for r in [
        0..0,
        32..32,
        n..n,
        0..n + 1,
        n..n + 32,
        usize::MAX - 1..usize::MAX,
    ] {
        bad_slice(w, r);
    }
    #[allow(clippy::reversed_empty_ranges)]
    bad_slice(w, 64..32);
}

/// Misaligned ranges for the formats that pack outputs into words.
fn misaligned(w: &PackedLinear) {
    let n = w.desc().n;
    for r in [8..40, 1..33, 16..n, 0..40, 32..48, 0..1] {
        if r.end <= n {
            bad_slice(w, r);
        }
    }
}

const K: usize = 128;

fn weight(seed: u64, n: usize) -> Vec<f32> {
    weights(seed, n * K, 1.0)
}

fn phi3_cuts(n: usize) -> Vec<Range<usize>> {
    // qkv-like thirds/uneven parts and a gate/up-like split.
    let mut v = vec![0..32, 32..n, 0..n];
    if n == 128 {
        v.extend([0..64, 64..96, 96..128]);
    } else if n == 96 {
        v.extend([0..64, 64..96, 32..64]);
    }
    v
}

fn gptq_packed(
    n: usize,
    bits: u32,
    group_size: usize,
    act: bool,
    sym: bool,
    zeros: GptqZeros,
    keep_gidx: bool,
) -> PackedLinear {
    let perm: Vec<u32> = (0..K as u32).map(|i| (i * 37 + 5) % K as u32).collect();
    let t = gptq::quantize(
        &weight(u64::from(bits) * 7 + n as u64, n),
        n,
        K,
        &GptqOptions {
            bits,
            group_size,
            act_order: act.then_some(&perm[..]),
            sym,
            format: zeros,
        },
    )
    .unwrap();
    PackedLinear::new(PackedLinear::Gptq {
        k: K,
        n,
        bits,
        group_size,
        zeros,
        qweight: bv(&t.qweight),
        qzeros: bv(&t.qzeros),
        scales: bv(&t.scales),
        g_idx: keep_gidx.then(|| bv(&t.g_idx)),
    })
    .unwrap()
}

#[test]
fn gptq_slices_match_rows() {
    for bits in [2u32, 3, 4, 8] {
        for (act, sym, zeros, keep) in [
            (false, false, GptqZeros::V2, false),
            (false, true, GptqZeros::V1, true),
            (true, false, GptqZeros::V1, true),
            (true, true, GptqZeros::V2, true),
        ] {
            for n in [96, 128] {
                let w = gptq_packed(n, bits, 32, act, sym, zeros, keep);
                check_slices(&w, &phi3_cuts(n));
                out_of_range(&w);
                misaligned(&w);
            }
        }
        if bits != 3 {
            // n = 80 (not a multiple of 32): the tail 64..80 ends at n.
            let w = gptq_packed(80, bits, 64, false, false, GptqZeros::V2, true);
            check_slices(&w, &[0..32, 32..80, 64..80, 0..64]);
            bad_slice(&w, 32..48);
        }
    }
}

fn awq_tensors(n: usize, group_size: usize, gemv: bool) -> AwqTensors {
    let p = awq::quantize_parts(&weight(11 + n as u64, n), n, K, group_size).unwrap();
    let parts = AwqParts {
        k: K,
        n,
        group_size,
        codes: &p.codes,
        zeros: &p.zeros,
        scales: &p.scales,
    };
    if gemv {
        parts.pack_gemv().unwrap()
    } else {
        parts.pack_gemm().unwrap()
    }
}

#[test]
fn awq_gemm_slices_match_rows() {
    for (n, g) in [(96, 32), (128, 64), (80, 128)] {
        let t = awq_tensors(n, g, false);
        let w = PackedLinear::new(PackedLinear::AwqGemm {
            k: K,
            n,
            group_size: g,
            bits: 4,
            qweight: bv(&t.qweight),
            qzeros: bv(&t.qzeros),
            scales: bv(&t.scales),
        })
        .unwrap();
        check_slices(&w, &phi3_cuts(n));
        if n == 80 {
            check_slices(&w, &[64..80, 0..80]);
        }
        out_of_range(&w);
        misaligned(&w);
    }
}

#[test]
fn awq_gemv_slices_match_rows_any_range_zero_copy() {
    for (n, g) in [(96, 32), (128, 64), (37, 128)] {
        let t = awq_tensors(n, g, true);
        let w = PackedLinear::new(PackedLinear::AwqGemv {
            k: K,
            n,
            group_size: g,
            bits: 4,
            qweight: bv(&t.qweight),
            qzeros: bv(&t.qzeros),
            scales: bv(&t.scales),
        })
        .unwrap();
        check_slices(&w, &phi3_cuts(n));
        check_slices(&w, &[0..5, 5..n, 3..4, n - 1..n]);
        out_of_range(&w);
        // Zero-copy: the part's qweight is the whole's bytes, shifted by the first row.
        let s = w.slice_outputs(5..n).unwrap();
        let (PackedLinear::AwqGemv { qweight: a, .. }, PackedLinear::AwqGemv { qweight: b, .. }) =
            (&w, &s)
        else {
            unreachable!()
        };
        assert_eq!(b.as_slice().as_ptr(), a.as_slice()[5 * K / 2..].as_ptr());
        // A slice of a slice narrows relative to the part.
        let ss = s.slice_outputs(10..20).unwrap();
        let whole = dense(&w);
        assert_eq!(bits_of(&dense(&ss)), bits_of(&whole[15 * K..25 * K]));
    }
}

fn exl2_packed(n: usize, bpw: f32, perm: Exl2Perm) -> PackedLinear {
    let bits = exl2::plan(K, 32, bpw).unwrap();
    let t = exl2::quantize(&weight(23 + n as u64, n), n, K, &bits, 32, perm).unwrap();
    PackedLinear::new(PackedLinear::Exl2 {
        k: K,
        n,
        q_weight: bv(&t.q_weight),
        q_scale: bv(&t.q_scale),
        q_scale_max: bv(&t.q_scale_max),
        q_groups: bv(&t.q_groups),
        q_invperm: bv(&t.q_invperm),
    })
    .unwrap()
}

#[test]
fn exl2_slices_match_rows() {
    for bpw in [2.5f32, 4.25, 6.0] {
        for n in [96, 128] {
            let w = exl2_packed(n, bpw, Exl2Perm::ColumnNorm);
            check_slices(&w, &phi3_cuts(n));
            out_of_range(&w);
            misaligned(&w);
        }
        // n = 80: tensors hold 96 columns; the tail 64..80 keeps padded_n(16) = 32 of them.
        let w = exl2_packed(80, bpw, Exl2Perm::Identity);
        check_slices(&w, &[0..32, 32..80, 64..80, 0..64]);
        let PackedLinear::Exl2 { q_weight, .. } = w.slice_outputs(64..80).unwrap() else {
            unreachable!()
        };
        let PackedLinear::Exl2 {
            q_weight: whole, ..
        } = &w
        else {
            unreachable!()
        };
        assert_eq!(q_weight.as_slice().len() * 96, whole.as_slice().len() * 32);
        bad_slice(&w, 32..48);
    }
}

/// Repacks a dense-packed CT set in the legacy (`32 / b` codes per word) layout.
fn to_legacy(t: &CtTensors) -> (Vec<u8>, Option<Vec<u8>>) {
    let b = t.bits as usize;
    let pf = 32 / b;
    let get = |bytes: &[u8], first: usize, stride: usize, e: usize| -> u32 {
        let p = e * b;
        let w = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as u64;
        let lo = w(first + p / 32 * stride);
        let hi = if p % 32 + b > 32 {
            w(first + (p / 32 + 1) * stride)
        } else {
            0
        };
        (((lo | hi << 32) >> (p % 32)) & ((1 << b) - 1)) as u32
    };
    let (k, n) = (t.k, t.n);
    let g = k.div_ceil(t.group_size);
    let (dw, lw) = ((k * b).div_ceil(32), k.div_ceil(pf));
    let mut wp = vec![0u32; n * lw];
    for row in 0..n {
        for kk in 0..k {
            wp[row * lw + kk / pf] |= get(&t.weight_packed, row * dw, 1, kk) << (kk % pf * b);
        }
    }
    let zp = t.weight_zero_point.as_ref().map(|z| {
        let mut out = vec![0u32; n.div_ceil(pf) * g];
        for row in 0..n {
            for j in 0..g {
                out[row / pf * g + j] |= get(z, j, g, row) << (row % pf * b);
            }
        }
        bytes_of(&out)
    });
    (bytes_of(&wp), zp)
}

#[derive(Clone, Copy)]
struct CtCase {
    n: usize,
    bits: u32,
    group_size: usize,
    symmetric: bool,
    dtype: ScaleDtype,
    legacy: bool,
    g_idx: bool,
    shape_i32: bool,
}

fn ct_packed(c: CtCase) -> PackedLinear {
    let CtCase { n, bits, .. } = c;
    let t = ct::quantize(
        &weight(31 + u64::from(bits) + n as u64, n),
        n,
        K,
        bits,
        c.group_size,
        c.symmetric,
        c.dtype,
    )
    .unwrap();
    let (mut wp, mut zp) = (t.weight_packed.clone(), t.weight_zero_point.clone());
    if c.legacy {
        (wp, zp) = to_legacy(&t);
        assert_ne!(wp.len(), t.weight_packed.len(), "legacy must differ");
    }
    let shape = if c.shape_i32 {
        i32_bytes(&[n as i64, K as i64])
    } else {
        t.weight_shape.clone()
    };
    let groups = K.div_ceil(c.group_size) as i64;
    let g_idx = i32_bytes(
        &(0..K as i64)
            .map(|i| (i * 5 + 3) % groups)
            .collect::<Vec<_>>(),
    );
    PackedLinear::new(PackedLinear::Ct {
        k: K,
        n,
        bits,
        group_size: c.group_size,
        scale_dtype: c.dtype,
        weight_packed: ByteView::from_vec(wp),
        weight_scale: bv(&t.weight_scale),
        weight_shape: ByteView::from_vec(shape),
        weight_zero_point: zp.map(ByteView::from_vec),
        weight_g_idx: c.g_idx.then(|| ByteView::from_vec(g_idx)),
    })
    .unwrap()
}

const CT_BASE: CtCase = CtCase {
    n: 96,
    bits: 4,
    group_size: 32,
    symmetric: false,
    dtype: ScaleDtype::Bf16,
    legacy: false,
    g_idx: false,
    shape_i32: false,
};

#[test]
fn ct_slices_match_rows() {
    for bits in [4u32, 8, 3] {
        for symmetric in [false, true] {
            // Group and channel strategy.
            for group_size in [32, K] {
                for n in [96, 128] {
                    let w = ct_packed(CtCase {
                        n,
                        bits,
                        group_size,
                        symmetric,
                        ..CT_BASE
                    });
                    check_slices(&w, &phi3_cuts(n));
                    out_of_range(&w);
                    if symmetric {
                        check_slices(&w, &[0..5, 5..n, 7..40]);
                    } else {
                        misaligned(&w);
                    }
                }
            }
        }
    }
    // Asymmetric tail not a multiple of 32, I32 weight_shape, g_idx, F16/F32 scales.
    for (dtype, bits) in [
        (ScaleDtype::F16, 4),
        (ScaleDtype::F32, 5),
        (ScaleDtype::Bf16, 8),
    ] {
        let w = ct_packed(CtCase {
            n: 80,
            bits,
            dtype,
            g_idx: true,
            shape_i32: true,
            ..CT_BASE
        });
        check_slices(&w, &[0..32, 32..80, 64..80, 0..64]);
        bad_slice(&w, 32..48);
        let PackedLinear::Ct { weight_shape, .. } = w.slice_outputs(32..80).unwrap() else {
            unreachable!()
        };
        assert_eq!(weight_shape.as_slice(), &i32_bytes(&[48, K as i64])[..]);
    }
}

#[test]
fn ct_slices_are_zero_copy() {
    let w = ct_packed(CT_BASE);
    let s = w.slice_outputs(32..96).unwrap();
    let (
        PackedLinear::Ct {
            weight_packed: a,
            weight_zero_point: Some(za),
            weight_shape,
            ..
        },
        PackedLinear::Ct {
            weight_packed: b,
            weight_zero_point: Some(zb),
            weight_shape: sb,
            ..
        },
    ) = (&w, &s)
    else {
        unreachable!()
    };
    // 4-bit k = 128: 16 words per row; zero points: 4 word rows of G = 4 groups per 32 outputs.
    assert_eq!(b.as_slice().as_ptr(), a.as_slice()[32 * 64..].as_ptr());
    assert_eq!(zb.as_slice().as_ptr(), za.as_slice()[4 * 4 * 4..].as_ptr());
    assert_eq!(weight_shape.as_slice().len(), 16);
    assert_eq!(
        sb.as_slice(),
        &[64i64.to_le_bytes(), (K as i64).to_le_bytes()].concat()[..]
    );
}

#[test]
fn ct_legacy_zero_points() {
    // 7-bit: 4 codes per word, any multiple of 32 is a word boundary.
    let w7 = ct_packed(CtCase {
        bits: 7,
        legacy: true,
        ..CT_BASE
    });
    check_slices(&w7, &phi3_cuts(96));
    misaligned(&w7);
    // 5-bit: 6 codes per word, so parts start at multiples of 96.
    let w5 = ct_packed(CtCase {
        n: 192,
        bits: 5,
        legacy: true,
        g_idx: true,
        ..CT_BASE
    });
    check_slices(&w5, &[0..96, 96..192, 0..192, 0..32, 96..128]);
    bad_slice(&w5, 32..64);
    bad_slice(&w5, 64..192);
    // 3-bit: 10 codes per word, parts start at multiples of 160. n = 200.
    let w3 = ct_packed(CtCase {
        n: 200,
        bits: 3,
        group_size: K,
        legacy: true,
        ..CT_BASE
    });
    check_slices(&w3, &[0..160, 0..32, 0..200]);
    bad_slice(&w3, 32..200);
    // The tail 160..200 (40 outputs): 4 words either way, which a reader takes for dense.
    bad_slice(&w3, 160..200);
    // A 192-output 3-bit set: the tail 160..192 is 32 outputs (3 dense vs 4 legacy words).
    let w3b = ct_packed(CtCase {
        n: 192,
        bits: 3,
        legacy: true,
        ..CT_BASE
    });
    check_slices(&w3b, &[0..160, 160..192, 0..32]);
}

#[test]
fn malformed_weights_are_errors() {
    let w = gptq_packed(96, 4, 32, false, false, GptqZeros::V2, true);
    let PackedLinear::Gptq {
        qweight,
        qzeros,
        scales,
        g_idx,
        ..
    } = w.clone()
    else {
        unreachable!()
    };
    let short = ByteView::from_vec(qweight.as_slice()[..100].to_vec());
    let broken = PackedLinear::Gptq {
        k: K,
        n: 96,
        bits: 4,
        group_size: 32,
        zeros: GptqZeros::V2,
        qweight: short,
        qzeros: qzeros.clone(),
        scales: scales.clone(),
        g_idx: g_idx.clone(),
    };
    assert!(matches!(
        broken.slice_outputs(0..32),
        Err(GroupError::Length { .. })
    ));
    // A huge n that the tensors do not hold: the range check passes, validation refuses.
    let huge = PackedLinear::Gptq {
        k: K,
        n: usize::MAX / 2,
        bits: 4,
        group_size: 32,
        zeros: GptqZeros::V2,
        qweight,
        qzeros,
        scales,
        g_idx,
    };
    assert!(huge.slice_outputs(0..1 << 40).is_err());
    let gemv = PackedLinear::AwqGemv {
        k: K,
        n: 1 << 50,
        group_size: 32,
        bits: 4,
        qweight: bv(&[0; 64]),
        qzeros: bv(&[0; 16]),
        scales: bv(&[0; 64]),
    };
    assert!(gemv.slice_outputs(0..1 << 49).is_err());
    // Messages name the format, the range and the requirement.
    let msg = w.slice_outputs(8..40).unwrap_err().to_string();
    assert!(
        msg.contains("Gptq") && msg.contains("8..40") && msg.contains("multiple of 32"),
        "{msg}"
    );
}

/// Every format at once, for the proptest; `true` when CT zero points use the legacy packing
/// (whose parts must also start at multiples of `32 / bits`).
fn any_format(sel: usize, n: usize, seed: u64) -> (PackedLinear, bool) {
    let bits = [2u32, 3, 4, 8][seed as usize % 4];
    let ct_bits = 2 + (seed % 7) as u32;
    let legacy = sel == 4 && seed.is_multiple_of(3) && !matches!(ct_bits, 2 | 4 | 8);
    let w = match sel {
        0 => gptq_packed(
            n,
            bits,
            32,
            seed.is_multiple_of(2),
            false,
            GptqZeros::V2,
            true,
        ),
        1 | 2 => {
            let t = awq_tensors(n, 64, sel == 2);
            let (qweight, qzeros, scales) = (bv(&t.qweight), bv(&t.qzeros), bv(&t.scales));
            PackedLinear::new(if sel == 1 {
                PackedLinear::AwqGemm {
                    k: K,
                    n,
                    group_size: 64,
                    bits: 4,
                    qweight,
                    qzeros,
                    scales,
                }
            } else {
                PackedLinear::AwqGemv {
                    k: K,
                    n,
                    group_size: 64,
                    bits: 4,
                    qweight,
                    qzeros,
                    scales,
                }
            })
            .unwrap()
        }
        3 => exl2_packed(n, 3.0 + (seed % 4) as f32, Exl2Perm::ColumnNorm),
        _ => ct_packed(CtCase {
            n,
            bits: ct_bits,
            symmetric: sel == 5,
            legacy,
            ..CT_BASE
        }),
    };
    (w, legacy)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Cutting at random multiples of 32 gives parts equal to the whole's rows; any range at
    /// all gives either an error or exactly the whole's rows (never a panic).
    #[test]
    fn random_cuts(sel in 0usize..6, m in 1usize..7, seed in any::<u64>(),
                   cuts in proptest::collection::vec(0usize..7, 0..4),
                   a in 0usize..230, b in 0usize..230) {
        let n = 32 * m;
        let (w, legacy) = any_format(sel, n, seed);
        let mut points: Vec<usize> = cuts.iter().map(|c| 32 * (c % m)).collect();
        points.extend([0, n]);
        points.sort_unstable();
        points.dedup();
        if !legacy {
            let parts: Vec<_> = points.windows(2).map(|p| p[0]..p[1]).collect();
            check_slices(&w, &parts);
        }
        let whole = dense(&w);
        if let Ok(s) = w.slice_outputs(a..b) {
            prop_assert!(a < b && b <= n);
            prop_assert_eq!(bits_of(&dense(&s)), bits_of(&whole[a * K..b * K]));
        }
    }
}
