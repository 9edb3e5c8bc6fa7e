//! `paged_attention` through burn's dispatch against an f64 reference, and on burn-flex the CPU
//! kernel against the generic burn-op fallback: ragged batches with gaps between sequences,
//! windows, shuffled block tables with released blocks, every KV dtype.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use ember_kernels::{
    KvDtype, PagedAttention, PagedError, PagedLayerStore, SeqAttn, paged_attention, paged_write,
    try_paged_attention,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn device() -> Device {
    #[cfg(feature = "flex")]
    {
        Device::flex()
    }
    #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
    #[allow(deprecated)]
    {
        Device::ndarray()
    }
}

/// A random call: `q: [n_rows, n_head, d]` and the attention description. Sequences leave a
/// one-row gap between them; blocks before a sequence's first visible key are released.
struct Case {
    q: Vec<f32>,
    n_rows: usize,
    n_head: usize,
    d: usize,
    attn: PagedAttention,
}

fn random_case(rng: &mut StdRng, dtype: KvDtype) -> Case {
    let n_kv = rng.random_range(1..=3);
    let n_head = n_kv * rng.random_range(1..=3);
    let d = [32, 64][rng.random_range(0..2)];
    let block_size = [1, 4, 16, 32][rng.random_range(0..4)];
    // (n_past, n_q, window): decode, a short batch, a long batch (tiled path).
    let shapes: [(usize, usize, Option<usize>); 3] = [
        (rng.random_range(0..120), 1, None),
        (
            rng.random_range(0..120),
            rng.random_range(2..20),
            Some(rng.random_range(1..60)),
        ),
        (
            rng.random_range(0..60),
            rng.random_range(64..80),
            Some(rng.random_range(1..150)),
        ),
    ];
    let blocks: usize = shapes
        .iter()
        .map(|&(p, n, _)| (p + n).div_ceil(block_size))
        .sum();
    let mut pool: Vec<u32> = (0..blocks as u32 + 2).collect();
    pool.shuffle(rng);
    let mut store = PagedLayerStore::new(dtype, pool.len(), block_size, n_kv, d).unwrap();
    let mut seqs = Vec::new();
    let mut row = 1;
    for (n_past, n_q, window) in shapes {
        let t = n_past + n_q;
        let mut table: Vec<u32> = pool.drain(..t.div_ceil(block_size)).collect();
        for p in 0..t {
            let k: Vec<f32> = (0..n_kv * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let v: Vec<f32> = (0..n_kv * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let block = table[p / block_size] as usize;
            store.write(block, p % block_size, &k, &v).unwrap();
        }
        let mut seq = SeqAttn {
            q_start: row,
            n_q,
            n_past,
            block_table: Arc::from(&[][..]),
            window,
            path_rows: n_q,
        };
        table[..seq.visible_keys().start / block_size].fill(u32::MAX);
        seq.block_table = table.into();
        seqs.push(seq);
        row += n_q + 1;
    }
    let n_rows = row;
    let q = (0..n_rows * n_head * d)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    seqs.shuffle(rng);
    Case {
        q,
        n_rows,
        n_head,
        d,
        attn: PagedAttention {
            store: Arc::new(store),
            seqs: seqs.into(),
            scale: 1.0 / (d as f32).sqrt(),
        },
    }
}

/// Per-row f64 attention over the stored (rounded / dequantized) values; `None` for gap rows.
fn reference(c: &Case) -> Vec<Option<Vec<f64>>> {
    let s = &*c.attn.store;
    let (d, group) = (c.d, c.n_head / s.n_kv());
    let mut out = vec![None; c.n_rows];
    for seq in c.attn.seqs.iter() {
        let (k, v) = s.gather_f32(seq).unwrap();
        let keys = seq.visible_keys();
        let t = keys.len();
        for i in 0..seq.n_q {
            let (row, qp) = (seq.q_start + i, seq.n_past + i);
            let mut o = vec![0.0f64; c.n_head * d];
            for h in 0..c.n_head {
                let qrow = &c.q[(row * c.n_head + h) * d..(row * c.n_head + h + 1) * d];
                let kvh = h / group;
                let vis: Vec<usize> = (0..t)
                    .filter(|&j| {
                        let kp = keys.start + j;
                        kp <= qp && seq.window.is_none_or(|w| qp - kp < w)
                    })
                    .collect();
                let sc: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let krow = &k[(kvh * t + j) * d..(kvh * t + j + 1) * d];
                        let dot: f64 = qrow
                            .iter()
                            .zip(krow)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        dot * c.attn.scale as f64
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&j, w) in vis.iter().zip(&e) {
                    let vrow = &v[(kvh * t + j) * d..(kvh * t + j + 1) * d];
                    for (o, &x) in o[h * d..(h + 1) * d].iter_mut().zip(vrow) {
                        *o += w / z * x as f64;
                    }
                }
            }
            out[row] = Some(o);
        }
    }
    out
}

/// The Flex kernel's f16 one-row path keeps the V sum in f16 (llama.cpp's arithmetic): up to
/// ~3e-3 off the exact value over ~200 keys. Everything else is f32 on the stored values.
fn tolerance(dtype: KvDtype, n_q: usize) -> f64 {
    if cfg!(feature = "flex") && dtype == KvDtype::F16 && n_q < 64 {
        1e-2
    } else {
        1e-4
    }
}

#[test]
fn op_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    for dtype in KvDtype::ALL {
        for _ in 0..3 {
            let c = random_case(&mut rng, dtype);
            let q = Tensor::<3>::from_data(
                TensorData::new(c.q.clone(), [c.n_rows, c.n_head, c.d]),
                &device(),
            );
            let got = paged_attention(q, c.attn.clone())
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let want = reference(&c);
            let w = c.n_head * c.d;
            for (row, want) in want.iter().enumerate() {
                let got = &got[row * w..(row + 1) * w];
                let Some(want) = want else {
                    assert!(got.iter().all(|&x| x == 0.0), "gap row {row} not zero");
                    continue;
                };
                let n_q = c
                    .attn
                    .seqs
                    .iter()
                    .find(|s| s.q_start <= row && row < s.q_start + s.n_q)
                    .map_or(0, |s| s.n_q);
                let tol = tolerance(dtype, n_q);
                for (i, (&g, &x)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g as f64 - x).abs() <= tol,
                        "{dtype} row {row} [{i}]: {g} vs {x}"
                    );
                }
            }
        }
    }
}

#[test]
fn invalid_calls_are_errors_not_reads() {
    let mut rng = StdRng::seed_from_u64(22);
    let c = random_case(&mut rng, KvDtype::F16);
    let q = || {
        Tensor::<3>::from_data(
            TensorData::new(c.q.clone(), [c.n_rows, c.n_head, c.d]),
            &device(),
        )
    };
    // A released block that a query can see.
    let mut seqs = c.attn.seqs.to_vec();
    let mut table = seqs[0].block_table.to_vec();
    let last = table.len() - 1;
    table[last] = u32::MAX;
    seqs[0].block_table = table.into();
    let bad = PagedAttention {
        seqs: seqs.into(),
        ..c.attn.clone()
    };
    assert!(matches!(
        try_paged_attention(q(), bad),
        Err(PagedError::TableEntry { .. })
    ));
    let wrong_dim = Tensor::<3>::from_data(
        TensorData::new(
            vec![0.0f32; c.n_rows * c.n_head * 8],
            [c.n_rows, c.n_head, 8],
        ),
        &device(),
    );
    assert!(matches!(
        try_paged_attention(wrong_dim, c.attn.clone()),
        Err(PagedError::HeadDim { .. })
    ));
    assert!(try_paged_attention(q(), c.attn.clone()).is_ok());
}

/// The Flex kernel against the generic burn-op body, both run on Flex tensors.
#[cfg(feature = "flex")]
mod against_fallback {
    use super::*;
    use burn::backend::Flex;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::tensor::FloatTensor;
    use ember_kernels::{EmberBackend, paged_attention_fallback};

    fn flex(c: &Case) -> FloatTensor<Flex> {
        Flex::float_from_data(
            TensorData::new(c.q.clone(), [c.n_rows, c.n_head, c.d]),
            &Default::default(),
        )
    }

    fn host(t: FloatTensor<Flex>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn flex_kernel_matches_fallback() {
        let mut rng = StdRng::seed_from_u64(23);
        for dtype in KvDtype::ALL {
            for _ in 0..3 {
                let c = random_case(&mut rng, dtype);
                let a = host(<Flex as EmberBackend>::paged_attention(
                    flex(&c),
                    c.attn.clone(),
                ));
                let b = host(paged_attention_fallback::<Flex>(flex(&c), &c.attn));
                assert_eq!(a.len(), b.len());
                let w = c.n_head * c.d;
                for seq in c.attn.seqs.iter() {
                    let tol = tolerance(dtype, seq.n_q) as f32;
                    for i in seq.q_start * w..(seq.q_start + seq.n_q) * w {
                        assert!(
                            (a[i] - b[i]).abs() <= tol,
                            "{dtype} {seq:?} [{i}]: {} vs {}",
                            a[i],
                            b[i]
                        );
                    }
                }
                // Gap rows: zero in both.
                assert!(a[..w].iter().chain(&b[..w]).all(|&x| x == 0.0));
            }
        }
    }
}

/// `paged_write` into a host store stores what `write` stores, row by row in any slot order,
/// and refuses a wrong shape or a block out of range before writing anything.
#[test]
fn paged_write_on_a_host_store_equals_write() {
    let dev = device();
    let mut rng = StdRng::seed_from_u64(41);
    for dtype in KvDtype::ALL {
        let (n_blocks, bs, n_kv, d) = (4, 3, 2, 32);
        let mut a = PagedLayerStore::new(dtype, n_blocks, bs, n_kv, d).unwrap();
        let mut b = a.clone();
        let slots = [5u32, 0, 11, 7];
        let n = slots.len() * n_kv * d;
        let k: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        let row = n_kv * d;
        for (i, &at) in slots.iter().enumerate() {
            let (blk, slot) = (at as usize / bs, at as usize % bs);
            a.write(
                blk,
                slot,
                &k[i * row..(i + 1) * row],
                &v[i * row..(i + 1) * row],
            )
            .unwrap();
        }
        let t = |x: &[f32], rows: usize| {
            Tensor::<3>::from_data(
                TensorData::new(x[..rows * row].to_vec(), [rows, n_kv, d]),
                &dev,
            )
        };
        paged_write(&mut b, t(&k, 4), t(&v, 4), &slots).unwrap();
        let (mut x, mut y) = (vec![0.0f32; d], vec![0.0f32; d]);
        for blk in 0..n_blocks {
            for h in 0..n_kv {
                for slot in 0..bs {
                    a.k_row_f32(blk, h, slot, &mut x).unwrap();
                    b.k_row_f32(blk, h, slot, &mut y).unwrap();
                    assert_eq!(x, y, "{dtype} k {blk}/{h}/{slot}");
                    a.v_row_f32(blk, h, slot, &mut x).unwrap();
                    b.v_row_f32(blk, h, slot, &mut y).unwrap();
                    assert_eq!(x, y, "{dtype} v {blk}/{h}/{slot}");
                }
            }
        }
        let before = b.clone();
        let short = paged_write(&mut b, t(&k, 3), t(&v, 3), &slots);
        assert!(
            matches!(short, Err(PagedError::Length { what: "k", .. })),
            "{short:?}"
        );
        let far = paged_write(&mut b, t(&k, 4), t(&v, 4), &[1, 2, 12, 3]);
        assert!(
            matches!(
                far,
                Err(PagedError::Block {
                    block: 4,
                    n_blocks: 4
                })
            ),
            "{far:?}"
        );
        for blk in 0..n_blocks {
            before.k_row_f32(blk, 0, 0, &mut x).unwrap();
            b.k_row_f32(blk, 0, 0, &mut y).unwrap();
            assert_eq!(x, y, "a refused call wrote block {blk}");
        }
    }
}
