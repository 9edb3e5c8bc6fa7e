//! Paged attention time versus context length, SmolLM2-135M's attention shape (9 query heads,
//! 3 kv heads, head_dim 64) over an f16 cache in blocks of 32 positions, block table shuffled.
//!
//! Bench ids read `attention/<kernel>/<mode>/<context>`:
//! - `paged`: `cpu::paged_attention::paged_attention` on a `PagedLayerStore`;
//! - `dense`: the contiguous `cpu::attention::causal_attention` on the same values, for the
//!   cost of going through block tables;
//! - `decode`: one query at the end of the context (`Throughput::Bytes` = the K/V bytes that
//!   query reads, so criterion's GB/s is the effective cache bandwidth);
//! - `prefill512`: a chunk of 512 queries at the end of the context (the tiled path).
//!
//! The store's size per context length is printed once (it grows linearly: 2 x 3 heads x 64 x
//! 2 bytes = 768 bytes per position per layer). Defaults: 10 samples, 0.5 s warm-up, 2 s
//! measurement.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ember_kernels::cpu::attention::{AttnShape, causal_attention};
use ember_kernels::cpu::paged_attention::paged_attention;
use ember_kernels::{KvDtype, PagedAttention, PagedLayerStore, SeqAttn};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

const N_HEAD: usize = 9;
const N_KV: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK: usize = 32;
const CONTEXTS: [usize; 5] = [512, 1024, 2048, 4096, 8192];
const PREFILL: usize = 512;

struct Setup {
    store: Arc<PagedLayerStore>,
    table: Arc<[u32]>,
    /// Dense `[n_kv, t, d]` copies of the stored (f16-rounded) values.
    k: Vec<f32>,
    v: Vec<f32>,
}

fn setup(rng: &mut StdRng, t: usize) -> Setup {
    let n_blocks = t.div_ceil(BLOCK);
    let mut table: Vec<u32> = (0..n_blocks as u32).collect();
    table.shuffle(rng);
    let mut store = PagedLayerStore::new(KvDtype::F16, n_blocks, BLOCK, N_KV, HEAD_DIM)
        .expect("valid store shape");
    let mut k = vec![0.0f32; N_KV * t * HEAD_DIM];
    let mut v = vec![0.0f32; N_KV * t * HEAD_DIM];
    for p in 0..t {
        let kr: Vec<f32> = (0..N_KV * HEAD_DIM)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let vr: Vec<f32> = (0..N_KV * HEAD_DIM)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let (block, slot) = (table[p / BLOCK] as usize, p % BLOCK);
        store.write(block, slot, &kr, &vr).expect("in range");
        for h in 0..N_KV {
            let at = (h * t + p) * HEAD_DIM;
            store
                .k_row_f32(block, h, slot, &mut k[at..at + HEAD_DIM])
                .expect("in range");
            store
                .v_row_f32(block, h, slot, &mut v[at..at + HEAD_DIM])
                .expect("in range");
        }
    }
    Setup {
        store: Arc::new(store),
        table: table.into(),
        k,
        v,
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for t in CONTEXTS {
        let s = setup(&mut rng, t);
        eprintln!(
            "context {t:5}: store {} bytes ({:.2} MiB, {} bytes/position)",
            s.store.bytes(),
            s.store.bytes() as f64 / (1 << 20) as f64,
            s.store.bytes() / t
        );
        for (mode, n_q) in [("decode", 1), ("prefill512", PREFILL)] {
            let q: Vec<f32> = (0..n_q * N_HEAD * HEAD_DIM)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let attn = PagedAttention {
                store: Arc::clone(&s.store),
                seqs: vec![SeqAttn {
                    q_start: 0,
                    n_q,
                    n_past: t - n_q,
                    block_table: Arc::clone(&s.table),
                    window: None,
                    path_rows: n_q,
                }]
                .into(),
                scale,
            };
            if n_q == 1 {
                group.throughput(Throughput::Bytes(s.store.bytes() as u64));
            } else {
                group.throughput(Throughput::Elements(n_q as u64));
            }
            group.bench_function(BenchmarkId::new(format!("paged/{mode}"), t), |b| {
                b.iter(|| paged_attention(&q, n_q, N_HEAD, HEAD_DIM, &attn).expect("valid call"))
            });
            // The dense kernel takes q head-major: [n_head, n, d].
            let mut qh = vec![0.0f32; q.len()];
            for i in 0..n_q {
                for h in 0..N_HEAD {
                    qh[(h * n_q + i) * HEAD_DIM..(h * n_q + i + 1) * HEAD_DIM].copy_from_slice(
                        &q[(i * N_HEAD + h) * HEAD_DIM..(i * N_HEAD + h + 1) * HEAD_DIM],
                    );
                }
            }
            let shape = AttnShape {
                n_head: N_HEAD,
                n_kv: N_KV,
                n: n_q,
                t,
                head_dim: HEAD_DIM,
            };
            group.bench_function(BenchmarkId::new(format!("dense/{mode}"), t), |b| {
                b.iter(|| causal_attention(&qh, &s.k, &s.v, shape, scale))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
