//! Group-quantized weights in their packed form ([`QuantMatrix::packed`]): every format written
//! by ember-quant's own quantizers, multiplied through `quant_matmul` (burn-flex: the integer
//! kernel for small `m`, the dequantized-tile GEMM for large `m`), through
//! `cpu::quant_matmul_rows` (the integer kernel at every `m`) and through the generic fallback,
//! against an f64 reference `x @ dequantize_all()^T`; and the row accessors against the
//! format's own dequantization, bit for bit.
#![cfg(feature = "flex")]

use std::sync::Arc;

use burn::backend::Flex;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{Device, Tensor, TensorData};
use ember_kernels::cpu::quant_matmul_rows;
use ember_kernels::{QuantMatrix, Storage, quant_matmul, quant_matmul_fallback};
use ember_quant::GgmlType;
use ember_quant::group::{
    ByteView, GroupFormat, PackedLinear, awq, ct, exl2,
    gptq::{self, GptqOptions, GptqZeros},
};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn bv(v: &[u8]) -> ByteView {
    ByteView::from_vec(v.to_vec())
}

fn random(rng: &mut StdRng, len: usize, range: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-range..range)).collect()
}

fn awq_gemm(w: &[f32], n: usize, k: usize, g: usize) -> PackedLinear {
    let t = awq::quantize(w, n, k, g).unwrap();
    PackedLinear::AwqGemm {
        k,
        n,
        group_size: g,
        bits: 4,
        qweight: bv(&t.qweight),
        qzeros: bv(&t.qzeros),
        scales: bv(&t.scales),
    }
}

fn awq_gemv(w: &[f32], n: usize, k: usize, g: usize) -> PackedLinear {
    let p = awq::quantize_parts(w, n, k, g).unwrap();
    let t = awq::AwqParts {
        k,
        n,
        group_size: g,
        codes: &p.codes,
        zeros: &p.zeros,
        scales: &p.scales,
    }
    .pack_gemv()
    .unwrap();
    PackedLinear::AwqGemv {
        k,
        n,
        group_size: g,
        bits: 4,
        qweight: bv(&t.qweight),
        qzeros: bv(&t.qzeros),
        scales: bv(&t.scales),
    }
}

#[allow(clippy::too_many_arguments)]
fn gptq_w(
    rng: &mut StdRng,
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    g: usize,
    act_order: bool,
    sym: bool,
    format: GptqZeros,
    with_gidx: bool,
) -> PackedLinear {
    let mut perm: Vec<u32> = (0..k as u32).collect();
    perm.shuffle(rng);
    let t = gptq::quantize(
        w,
        n,
        k,
        &GptqOptions {
            bits,
            group_size: g,
            act_order: act_order.then_some(&perm[..]),
            sym,
            format,
        },
    )
    .unwrap();
    PackedLinear::Gptq {
        k,
        n,
        bits,
        group_size: g,
        zeros: format,
        qweight: bv(&t.qweight),
        qzeros: bv(&t.qzeros),
        scales: bv(&t.scales),
        g_idx: with_gidx.then(|| bv(&t.g_idx)),
    }
}

fn exl2_w(w: &[f32], n: usize, k: usize, bits: &[u32], g: usize, perm: bool) -> PackedLinear {
    let perm = if perm {
        exl2::Exl2Perm::ColumnNorm
    } else {
        exl2::Exl2Perm::Identity
    };
    let t = exl2::quantize(w, n, k, bits, g, perm).unwrap();
    PackedLinear::Exl2 {
        k,
        n,
        q_weight: bv(&t.q_weight),
        q_scale: bv(&t.q_scale),
        q_scale_max: bv(&t.q_scale_max),
        q_groups: bv(&t.q_groups),
        q_invperm: bv(&t.q_invperm),
    }
}

#[allow(clippy::too_many_arguments)]
fn ct_w(
    rng: &mut StdRng,
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    g: usize,
    sym: bool,
    dtype: ct::ScaleDtype,
    shuffled_gidx: bool,
) -> PackedLinear {
    let t = ct::quantize(w, n, k, bits, g, sym, dtype).unwrap();
    // A g_idx that is not non-decreasing (act-order): any valid group index per input gives a
    // valid weight, which is all the kernel comparison needs.
    let gidx = shuffled_gidx.then(|| {
        let mut gi: Vec<i32> = (0..k).map(|i| (i / g) as i32).collect();
        gi.shuffle(rng);
        bv(&gi.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
    });
    PackedLinear::Ct {
        k,
        n,
        bits,
        group_size: g,
        scale_dtype: dtype,
        weight_packed: bv(&t.weight_packed),
        weight_scale: bv(&t.weight_scale),
        weight_shape: bv(&t.weight_shape),
        weight_zero_point: t.weight_zero_point.as_deref().map(bv),
        weight_g_idx: gidx,
    }
}

/// Every case: a name and the weight.
fn cases(rng: &mut StdRng) -> Vec<(String, PackedLinear)> {
    let mut out = Vec::new();
    // AWQ: n a multiple of 8 but not of the 32-column tile.
    let (n, k) = (40, 192);
    let w = random(rng, n * k, 1.0);
    out.push(("awq-gemm g64".into(), awq_gemm(&w, n, k, 64)));
    out.push(("awq-gemm g32".into(), awq_gemm(&w, n, k, 32)));
    let (n, k) = (37, 256);
    let w = random(rng, n * k, 1.0);
    out.push(("awq-gemv g64".into(), awq_gemv(&w, n, k, 64)));
    out.push(("awq-gemv g128".into(), awq_gemv(&w, n, k, 128)));
    // GPTQ: 2/3/4/8 bits, v1/v2, sym/asym, act-order, a partial last group (k % g != 0).
    for bits in [2u32, 3, 4, 8] {
        // n·b and k·b multiples of 32 (3-bit: multiples of 32), n not a tile multiple where
        // the width allows.
        let (n, k) = match bits {
            2 => (48, 160),
            3 => (96, 160),
            4 => (40, 168),
            _ => (36, 164),
        };
        let w = random(rng, n * k, 1.0);
        for (format, sym) in [
            (GptqZeros::V1, true),
            (GptqZeros::V2, false),
            (GptqZeros::V1, false),
        ] {
            if format == GptqZeros::V1 && !sym && bits == 2 {
                continue; // a zero point of 0 (unrepresentable in v1) is likely at 2 bits
            }
            for act in [false, true] {
                let name = format!("gptq {bits}-bit {format:?} sym={sym} act-order={act} g64");
                out.push((
                    name,
                    gptq_w(rng, &w, n, k, bits, 64, act, sym, format, true),
                ));
            }
        }
        out.push((
            format!("gptq {bits}-bit per-channel no g_idx"),
            gptq_w(rng, &w, n, k, bits, k, false, true, GptqZeros::V2, false),
        ));
        out.push((
            format!("gptq {bits}-bit g32 no g_idx"),
            gptq_w(rng, &w, n, k, bits, 32, false, false, GptqZeros::V2, false),
        ));
    }
    // EXL2: mixed widths (non-increasing), a short last group, identity and permuted rows.
    let (n, k) = (45, 200);
    let w = random(rng, n * k, 1.0);
    for (bits, perm) in [
        (&[8u32, 6, 4, 3][..], true),
        (&[5, 4, 4, 2][..], true),
        (&[4, 4, 4, 4][..], false),
    ] {
        out.push((
            format!("exl2 {bits:?} perm={perm}"),
            exl2_w(&w, n, k, bits, 64, perm),
        ));
    }
    let plan = exl2::plan(k, 32, 4.1).unwrap();
    out.push((
        format!("exl2 ~4.1bpw {plan:?}"),
        exl2_w(&w, n, k, &plan, 32, true),
    ));
    // compressed-tensors: group (partial last group) and channel, sym and asym, 2..=8 bits.
    let (n, k) = (37, 100);
    let w = random(rng, n * k, 1.0);
    for bits in [2u32, 3, 4, 5, 8] {
        for sym in [true, false] {
            for (g, what) in [(32, "group"), (k, "channel")] {
                let dtype = match bits {
                    4 => ct::ScaleDtype::Bf16,
                    8 => ct::ScaleDtype::F32,
                    _ => ct::ScaleDtype::F16,
                };
                out.push((
                    format!("ct {bits}-bit {what} sym={sym}"),
                    ct_w(rng, &w, n, k, bits, g, sym, dtype, false),
                ));
            }
        }
        out.push((
            format!("ct {bits}-bit g32 act-order"),
            ct_w(rng, &w, n, k, bits, 32, false, ct::ScaleDtype::F16, true),
        ));
    }
    // compressed-tensors groups of 20: segments that start inside a packed word (4-bit: 8
    // codes a word, 8-bit: 4), natural and act-order (codes repacked in position order).
    for bits in [4u32, 8] {
        for act in [false, true] {
            out.push((
                format!("ct {bits}-bit g20 act-order={act}"),
                ct_w(rng, &w, n, k, bits, 20, false, ct::ScaleDtype::F16, act),
            ));
        }
    }
    out
}

fn device() -> Device {
    Device::flex()
}

/// Checks `got` (`[m, n]`) against `x @ wd^T` in f64.
///
/// Tolerance: the integer kernel quantizes each activation to 8 bits per segment of at most
/// 32 inputs, `x ≈ dx · xq` with `dx = max|x_seg| / 127`, so each term's error is at most
/// `dx / 2 · |w| ≤ max|x_row| / 254 · |w|`: in total `max|x_row| · Σ_k |w_jk| / 254`. On top,
/// f32 accumulation and EXL2's reference rounding every dequantized weight to f16 (the kernel
/// does not): `2^-9 · Σ_k |x_k · w_jk|`.
fn check(name: &str, path: &str, got: &[f32], x: &[f32], wd: &[f32], m: usize, n: usize) {
    let k = wd.len() / n;
    assert_eq!(got.len(), m * n, "{name} {path}");
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        let xmax = xr.iter().fold(0.0f64, |a, &v| a.max((v as f64).abs()));
        for j in 0..n {
            let wr = &wd[j * k..(j + 1) * k];
            let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let abs: f64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let wsum: f64 = wr.iter().map(|&b| (b as f64).abs()).sum();
            let tol = xmax * wsum / 254.0 + abs / 512.0 + 1e-6;
            let g = got[i * n + j] as f64;
            assert!(
                (g - want).abs() <= tol,
                "{name} {path} m={m} ({i},{j}): {g} vs {want} (tol {tol})"
            );
        }
    }
}

fn flex_matmul(qm: &Arc<QuantMatrix>, x: &[f32], m: usize) -> Vec<f32> {
    let xt = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [m, qm.cols()]), &device());
    quant_matmul(xt, qm)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn packed_matmul_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(0x9e0);
    for (name, w) in cases(&mut rng) {
        let view_desc = w.desc();
        let qm = Arc::new(QuantMatrix::packed(w).unwrap_or_else(|e| panic!("{name}: {e}")));
        let (n, k) = (qm.rows(), qm.cols());
        assert_eq!((n, k), (view_desc.n, view_desc.k));
        let wd = qm.dequantize_all();
        // m = 48 goes through the dequantized-tile GEMM on flex.
        for m in [1usize, 2, 7, 33, 48] {
            let x = random(&mut rng, m * k, 2.0);
            check(&name, "flex", &flex_matmul(&qm, &x, m), &x, &wd, m, n);
            check(&name, "rows", &quant_matmul_rows(&qm, &x, m), &x, &wd, m, n);
        }
        // The generic fallback (dequantize_all + the backend's matmul).
        let m = 3;
        let x = random(&mut rng, m * k, 2.0);
        let xt = Flex::float_from_data(TensorData::new(x.clone(), [m, k]), &Default::default());
        let got = quant_matmul_fallback::<Flex>(xt, &qm)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        check(&name, "fallback", &got, &x, &wd, m, n);
    }
}

#[test]
fn packed_rows_equal_group_dequantization_exactly() {
    let mut rng = StdRng::seed_from_u64(0x9e1);
    for (name, w) in cases(&mut rng) {
        let desc = w.desc();
        let (n, k) = (desc.n, desc.k);
        let mut want = vec![0.0f32; n * k];
        w.view().dequantize_into(&mut want).unwrap();
        let qm = QuantMatrix::packed(w.clone()).unwrap();
        assert!(matches!(qm.storage(), Storage::Packed(_)), "{name}");
        assert!(
            qm.packed_weight().is_some() && qm.bytes().is_empty(),
            "{name}"
        );
        assert_eq!(qm.ggml_type(), GgmlType::F32, "{name}");
        assert_eq!(qm.group_desc(), Some(desc), "{name}");
        assert_eq!(qm.storage_bytes(), w.packed_bytes(), "{name}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&qm.dequantize_all()),
            bits(&want),
            "{name}: dequantize_all"
        );
        let mut part = vec![0.0f32; 3 * k];
        qm.dequantize_rows_into(n - 3, &mut part);
        assert_eq!(bits(&part), bits(&want[(n - 3) * k..]), "{name}: rows_into");
        let ids = [n as u32 - 1, 0, 5, 5];
        let got = qm.gather_rows(&ids).unwrap();
        let mut row = vec![0.0f32; k];
        for (t, &id) in ids.iter().enumerate() {
            let r = id as usize;
            assert_eq!(
                bits(&got[t * k..(t + 1) * k]),
                bits(&want[r * k..(r + 1) * k]),
                "{name}: gather {id}"
            );
            qm.dequantize_row_into(r, &mut row).unwrap();
            assert_eq!(
                bits(&row),
                bits(&want[r * k..(r + 1) * k]),
                "{name}: row {id}"
            );
        }
        assert!(qm.dequantize_row_into(n, &mut row).is_err(), "{name}");
        assert!(qm.gather_rows(&[n as u32]).is_err(), "{name}");
    }
}

#[test]
fn packed_type_names_and_errors() {
    let mut rng = StdRng::seed_from_u64(1);
    let w = random(&mut rng, 64 * 128, 1.0);
    let qm = QuantMatrix::packed(awq_gemm(&w, 64, 128, 64)).unwrap();
    assert_eq!(qm.type_name(), "AWQ-GEMM 4-bit g64");
    let qm = QuantMatrix::packed(gptq_w(
        &mut rng,
        &w,
        64,
        128,
        4,
        128,
        false,
        true,
        GptqZeros::V1,
        true,
    ))
    .unwrap();
    assert_eq!(qm.type_name(), "GPTQ 4-bit per-channel");
    assert_eq!(
        QuantMatrix::quantize(GgmlType::Q4_0, 2, 32, &w[..64])
            .unwrap()
            .type_name(),
        "q4_0"
    );
    // A truncated tensor is a validation error, not a panic.
    let PackedLinear::AwqGemm {
        k,
        n,
        group_size,
        bits,
        qweight,
        qzeros,
        scales,
    } = awq_gemm(&w, 64, 128, 64)
    else {
        unreachable!()
    };
    let short = ByteView::from_vec(qweight.as_slice()[4..].to_vec());
    let err = QuantMatrix::packed(PackedLinear::AwqGemm {
        k,
        n,
        group_size,
        bits,
        qweight: short,
        qzeros,
        scales,
    })
    .unwrap_err();
    assert!(err.to_string().contains("qweight"), "{err}");
    let _ = GroupFormat::AwqGemm;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random shapes and options for GPTQ 4-bit and CT: the integer kernel (every m) matches
    /// the f64 reference within the activation-quantization bound.
    #[test]
    fn packed_matmul_random_shapes(
        seed in any::<u64>(),
        n8 in 1usize..9,
        k8 in 2usize..40,
        gs in prop::sample::select(vec![8usize, 16, 32, 48, 64, 1 << 20]),
        m in 1usize..41,
        act in any::<bool>(),
        sym in any::<bool>(),
        bits in prop::sample::select(vec![2u32, 3, 4, 5, 6, 7, 8]),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (n, k) = (n8 * 8, k8 * 8);
        let g = gs.min(k);
        let w = random(&mut rng, n * k, 1.0);
        let x = random(&mut rng, m * k, 2.0);
        let qm = QuantMatrix::packed(gptq_w(
            &mut rng, &w, n, k, 4, g, act, sym, GptqZeros::V2, true,
        ))
        .unwrap();
        let wd = qm.dequantize_all();
        check("gptq4 prop", "rows", &quant_matmul_rows(&qm, &x, m), &x, &wd, m, n);
        let n = n + 3; // CT takes any n
        let w = random(&mut rng, n * k, 1.0);
        let qm = QuantMatrix::packed(ct_w(
            &mut rng, &w, n, k, bits, g, sym, ct::ScaleDtype::Bf16, act,
        ))
        .unwrap();
        let wd = qm.dequantize_all();
        check("ct prop", "rows", &quant_matmul_rows(&qm, &x, m), &x, &wd, m, n);
    }
}
