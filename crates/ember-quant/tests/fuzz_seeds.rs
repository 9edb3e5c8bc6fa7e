//! Regenerates the seed inputs of the `group_tensors` fuzz target
//! (`fuzz/seeds/group_tensors/seed_*.bin`): valid AWQ GEMM/GEMV, GPTQ (v1 act-order, v2 3-bit
//! asymmetric), EXL2 and compressed-tensors (group, channel with zero points and `g_idx`)
//! tensor sets made by this crate's writers, encoded as the target reads its input (header,
//! then one explicit-length slot per tensor; see `fuzz/fuzz_targets/group_tensors.rs`):
//! `cargo test --release -p ember-quant --test fuzz_seeds -- --ignored`

use ember_quant::group::awq::{self, AwqParts};
use ember_quant::group::ct::{self, CtPacked, ScaleDtype};
use ember_quant::group::exl2::{self, Exl2Perm};
use ember_quant::group::gptq::{self, GptqOptions, GptqZeros};

/// A deterministic weight `[n][k]` holding both signs.
fn weight(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 37 + i / k * 11) % 101) as f32 / 25.0 - 2.0)
        .collect()
}

/// The target's header: format, k, n, bits, group size, flags.
fn header(format: u8, k: usize, n: usize, bits: u32, group_size: usize, flags: u8) -> Vec<u8> {
    let mut h = vec![format];
    h.extend((k as u16).to_le_bytes());
    h.extend((n as u16).to_le_bytes());
    h.push(bits as u8);
    h.extend((group_size as u16).to_le_bytes());
    h.push(flags);
    h
}

/// Appends a slot in mode 2: an explicit u24 length, then the bytes.
fn slot(out: &mut Vec<u8>, bytes: &[u8]) {
    assert!(bytes.len() < 1 << 19);
    out.push(2);
    out.extend(&(bytes.len() as u32).to_le_bytes()[..3]);
    out.extend_from_slice(bytes);
}

fn encode(head: Vec<u8>, tensors: &[&[u8]]) -> Vec<u8> {
    let mut out = head;
    for t in tensors {
        slot(&mut out, t);
    }
    out
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();

    // AWQ GEMM, k = 64, n = 16, g = 32.
    let (k, n, g) = (64, 16, 32);
    let t = awq::quantize(&weight(n, k), n, k, g).unwrap();
    t.gemm().validate().unwrap();
    let h = header(0, k, n, 4, g, 0);
    seeds.push((
        "seed_awq_gemm.bin",
        encode(h, &[&t.qweight, &t.qzeros, &t.scales]),
    ));

    // AWQ GEMV, k = 64, n = 8, g = 32 (zeros and scales padded).
    let (k, n, g) = (64, 8, 32);
    let p = awq::quantize_parts(&weight(n, k), n, k, g).unwrap();
    let t = AwqParts {
        k,
        n,
        group_size: g,
        codes: &p.codes,
        zeros: &p.zeros,
        scales: &p.scales,
    }
    .pack_gemv()
    .unwrap();
    t.gemv().validate().unwrap();
    let h = header(1, k, n, 4, g, 0);
    seeds.push((
        "seed_awq_gemv.bin",
        encode(h, &[&t.qweight, &t.qzeros, &t.scales]),
    ));

    // GPTQ 4-bit v1, symmetric, act-order g_idx, k = 64, n = 16, g = 32.
    let (k, n, g) = (64, 16, 32);
    let perm: Vec<u32> = (0..k as u32).map(|i| (i * 23) % k as u32).collect();
    let opts = GptqOptions {
        bits: 4,
        group_size: g,
        act_order: Some(&perm),
        sym: true,
        format: GptqZeros::V1,
    };
    let t = gptq::quantize(&weight(n, k), n, k, &opts).unwrap();
    t.view().validate().unwrap();
    let h = header(2, k, n, 4, g, 0b01);
    seeds.push((
        "seed_gptq_v1_act_order.bin",
        encode(h, &[&t.qweight, &t.qzeros, &t.scales, &t.g_idx]),
    ));

    // GPTQ 3-bit v2, asymmetric, no g_idx, k = 64, n = 32, g = 32.
    let (k, n, g) = (64, 32, 32);
    let opts = GptqOptions {
        bits: 3,
        group_size: g,
        act_order: None,
        sym: false,
        format: GptqZeros::V2,
    };
    let t = gptq::quantize(&weight(n, k), n, k, &opts).unwrap();
    let view = gptq::Gptq {
        g_idx: None,
        ..t.view()
    };
    view.validate().unwrap();
    let h = header(2, k, n, 3, g, 0b10);
    seeds.push((
        "seed_gptq_v2_3bit.bin",
        encode(h, &[&t.qweight, &t.qzeros, &t.scales]),
    ));

    // EXL2, k = 96 (groups of 32 rows: 6, 4 and 3 bits), n = 40 (padded to 64), permuted.
    let (k, n) = (96, 40);
    let t = exl2::quantize(&weight(n, k), n, k, &[6, 4, 3], 32, Exl2Perm::ColumnNorm).unwrap();
    t.view().validate().unwrap();
    let h = header(3, k, n, 6, 32, 0);
    seeds.push((
        "seed_exl2.bin",
        encode(
            h,
            &[
                &t.q_groups,
                &t.q_weight,
                &t.q_scale,
                &t.q_scale_max,
                &t.q_invperm,
            ],
        ),
    ));

    // compressed-tensors group, 4-bit symmetric, BF16 scales, k = 64, n = 8, g = 32.
    let (k, n, g) = (64, 8, 32);
    let t = ct::quantize(&weight(n, k), n, k, 4, g, true, ScaleDtype::Bf16).unwrap();
    t.view().validate().unwrap();
    let h = header(4, k, n, 4, g, 1 << 2);
    seeds.push((
        "seed_ct_group.bin",
        encode(h, &[&t.weight_packed, &t.weight_scale, &t.weight_shape]),
    ));

    // compressed-tensors channel, 5-bit asymmetric, F32 scales, zero points and an explicit
    // g_idx, k = 40, n = 12.
    let (k, n) = (40, 12);
    let t = ct::quantize(&weight(n, k), n, k, 5, k, false, ScaleDtype::F32).unwrap();
    let g_idx = vec![0u8; 4 * k];
    let zp = t.weight_zero_point.clone().unwrap();
    let view = CtPacked {
        weight_g_idx: Some(&g_idx),
        ..t.view()
    };
    view.validate().unwrap();
    let h = header(4, k, n, 5, 0xFFFF, 0b11 | (2 << 2));
    seeds.push((
        "seed_ct_channel_asym.bin",
        encode(
            h,
            &[
                &t.weight_packed,
                &t.weight_scale,
                &t.weight_shape,
                &zp,
                &g_idx,
            ],
        ),
    ));

    seeds
}

fn seed_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/group_tensors")
}

#[test]
#[ignore = "writes files into fuzz/seeds; run explicitly to regenerate them"]
fn write_group_tensors_fuzz_seeds() {
    let dir = seed_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn group_tensors_seeds_match_the_committed_files() {
    // The builders validate their sets; the committed seeds are what they produce
    // (regenerate them if this fails).
    for (name, bytes) in seeds() {
        assert_eq!(
            std::fs::read(seed_dir().join(name)).unwrap(),
            bytes,
            "{name}"
        );
    }
}
