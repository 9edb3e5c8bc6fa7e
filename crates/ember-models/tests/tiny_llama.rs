//! A tiny random llama written to GGUF in code, run through the model, and checked against a
//! plain f64 implementation of the same architecture. Runs on whichever CPU backend the crate
//! is built with (burn-flex by default, burn-ndarray with `--features ndarray`).

use ember_formats::{GgufFile, GgufWriter};
use ember_models::{Logits, default_device, load};
use ember_quant::GgmlType;
use rand::{Rng, SeedableRng, rngs::StdRng};

const D: usize = 256;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const HD: usize = D / N_HEAD;
const FF: usize = 256;
const LAYERS: usize = 2;
const VOCAB: usize = 96;
const EPS: f32 = 1e-5;
const BASE: f32 = 10_000.0;
/// Weight range: small enough that the random network is not chaotic (large random weights
/// amplify 8-bit activation rounding into percent-level logit noise).
const SCALE: f32 = 0.1;

/// Tensor name -> (rows, cols, f32 values as the file holds them after quantization).
struct Tiny {
    bytes: Vec<u8>,
    weights: std::collections::HashMap<String, (usize, usize, Vec<f64>)>,
}

fn tiny_model(seed: u64) -> Tiny {
    tiny_model_with(seed, true)
}

/// `kquants: false` keeps to the 32-block formats, whose matmuls are bitwise independent of the
/// batch size (one integer path for every row count).
fn tiny_model_with(seed: u64, kquants: bool) -> Tiny {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama")
        .add("llama.block_count", LAYERS as u32)
        .add("llama.embedding_length", D as u32)
        .add("llama.feed_forward_length", FF as u32)
        .add("llama.attention.head_count", N_HEAD as u32)
        .add("llama.attention.head_count_kv", N_KV as u32)
        .add("llama.context_length", 128u32)
        .add("llama.rope.freq_base", BASE)
        .add("llama.attention.layer_norm_rms_epsilon", EPS)
        .add("llama.vocab_size", VOCAB as u32);
    let mut weights = std::collections::HashMap::new();
    let mut add =
        |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType, scale: f32| {
            let vals: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-scale..scale))
                .collect();
            let bytes = ember_quant::quantize(ty, &vals).unwrap();
            let mut back = vec![0.0f32; vals.len()];
            ember_quant::dequantize(ty, &bytes, &mut back).unwrap();
            let dims: Vec<u64> = if rows == 1 {
                vec![cols as u64]
            } else {
                vec![cols as u64, rows as u64]
            };
            w.add_tensor(name, &dims, ty, bytes).unwrap();
            weights.insert(
                name.to_string(),
                (rows, cols, back.into_iter().map(f64::from).collect()),
            );
        };
    add(&mut w, "token_embd.weight", VOCAB, D, GgmlType::Q8_0, 1.0);
    add(&mut w, "output_norm.weight", 1, D, GgmlType::F32, 1.5);
    for i in 0..LAYERS {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        add(&mut w, &n("attn_norm"), 1, D, GgmlType::F32, 1.5);
        add(&mut w, &n("ffn_norm"), 1, D, GgmlType::F32, 1.5);
        add(&mut w, &n("attn_q"), N_HEAD * HD, D, GgmlType::Q4_1, SCALE);
        add(&mut w, &n("attn_k"), N_KV * HD, D, GgmlType::Q5_0, SCALE);
        add(&mut w, &n("attn_v"), N_KV * HD, D, GgmlType::Q8_0, SCALE);
        add(
            &mut w,
            &n("attn_output"),
            D,
            N_HEAD * HD,
            GgmlType::Q4_0,
            SCALE,
        );
        add(&mut w, &n("ffn_gate"), FF, D, GgmlType::Q5_1, SCALE);
        let (up, down) = if kquants {
            (GgmlType::Q4_K, GgmlType::Q6_K)
        } else {
            (GgmlType::Q4_0, GgmlType::Q8_0)
        };
        add(&mut w, &n("ffn_up"), FF, D, up, SCALE);
        add(&mut w, &n("ffn_down"), D, FF, down, SCALE);
    }
    Tiny {
        bytes: w.to_bytes().unwrap(),
        weights,
    }
}

fn matvec(w: &(usize, usize, Vec<f64>), x: &[f64]) -> Vec<f64> {
    let (rows, cols, v) = w;
    (0..*rows)
        .map(|r| (0..*cols).map(|c| v[r * cols + c] * x[c]).sum())
        .collect()
}

fn rms(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + EPS as f64).sqrt();
    x.iter().zip(w).map(|(a, b)| a * inv * b).collect()
}

fn rope(v: &mut [f64], pos: usize) {
    for h in 0..v.len() / HD {
        for i in 0..HD / 2 {
            let theta = pos as f64 * (BASE as f64).powf(-2.0 * i as f64 / HD as f64);
            let (a, b) = (v[h * HD + 2 * i], v[h * HD + 2 * i + 1]);
            v[h * HD + 2 * i] = a * theta.cos() - b * theta.sin();
            v[h * HD + 2 * i + 1] = a * theta.sin() + b * theta.cos();
        }
    }
}

/// f64 forward over `tokens`, logits after every position.
fn reference(t: &Tiny, tokens: &[u32]) -> Vec<Vec<f64>> {
    let g = |n: &str| &t.weights[n];
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| g("token_embd.weight").2[id as usize * D..(id as usize + 1) * D].to_vec())
        .collect();
    for l in 0..LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, &g(&n("attn_norm")).2);
            let mut q = matvec(g(&n("attn_q")), &h);
            let mut k = matvec(g(&n("attn_k")), &h);
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(g(&n("attn_v")), &h));
        }
        for pos in 0..xs.len() {
            let mut attn = vec![0.0; D];
            for h in 0..N_HEAD {
                let kvh = h / (N_HEAD / N_KV);
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        (0..HD)
                            .map(|d| qs[pos][h * HD + d] * ks[j][kvh * HD + d])
                            .sum::<f64>()
                            / (HD as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..HD {
                    attn[h * HD + d] =
                        (0..=pos).map(|j| e[j] * vs[j][kvh * HD + d]).sum::<f64>() / z;
                }
            }
            let o = matvec(g(&n("attn_output")), &attn);
            xs[pos].iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let h = rms(&xs[pos], &g(&n("ffn_norm")).2);
            let gate = matvec(g(&n("ffn_gate")), &h);
            let up = matvec(g(&n("ffn_up")), &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(g(&n("ffn_down")), &act);
            xs[pos].iter_mut().zip(down).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .map(|x| matvec(g("token_embd.weight"), &rms(x, &g("output_norm.weight").2)))
        .collect()
}

fn logits_rows(t: burn::tensor::Tensor<2>) -> Vec<Vec<f32>> {
    let [n, v] = t.dims();
    let flat = t.into_data().try_to_vec::<f32>().unwrap();
    (0..n).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect()
}

#[test]
fn tiny_llama_matches_f64_reference() {
    for seed in 0..3 {
        let t = tiny_model(seed);
        let file = GgufFile::from_bytes(t.bytes.clone()).unwrap();
        let model = load(&file, &default_device()).unwrap();
        let tokens: Vec<u32> = (0..12)
            .map(|i| (i * 7 + seed as u32) % VOCAB as u32)
            .collect();
        let mut cache = model.new_cache(64).unwrap();
        let got = logits_rows(model.forward(&tokens, &mut cache, Logits::All).unwrap());
        let want = reference(&t, &tokens);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let scale = w.iter().fold(0.0f64, |a, b| a.max(b.abs()));
            let err = g
                .iter()
                .zip(w)
                .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - y).abs()));
            // 8-bit activations (as llama.cpp) and an f16 KV cache cost a few percent.
            assert!(
                err <= 0.05 * scale + 0.02,
                "seed {seed} pos {pos}: max err {err}, scale {scale}"
            );
        }
    }
}

#[test]
fn incremental_decoding_equals_one_batch() {
    let t = tiny_model_with(9, false);
    let file = GgufFile::from_bytes(t.bytes).unwrap();
    let model = load(&file, &default_device()).unwrap();
    let tokens: Vec<u32> = (0..10).map(|i| (i * 13 + 5) % VOCAB as u32).collect();
    let mut batch = model.new_cache(32).unwrap();
    let all = logits_rows(model.forward(&tokens, &mut batch, Logits::All).unwrap());
    let mut step = model.new_cache(32).unwrap();
    model
        .forward(&tokens[..4], &mut step, Logits::Last)
        .unwrap();
    for (i, &tok) in tokens[4..].iter().enumerate() {
        let row = &logits_rows(model.forward(&[tok], &mut step, Logits::Last).unwrap())[0];
        let pos = 4 + i;
        for (a, b) in row.iter().zip(&all[pos]) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "pos {pos}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn context_overflow_and_bad_tokens_are_errors() {
    let t = tiny_model(1);
    let file = GgufFile::from_bytes(t.bytes).unwrap();
    let model = load(&file, &default_device()).unwrap();
    let mut cache = model.new_cache(4).unwrap();
    let err = model
        .forward(&[1, 2, 3, 4, 5], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("context size of 4"), "{err}");
    let err = model
        .forward(&[VOCAB as u32], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert!(model.forward(&[], &mut cache, Logits::Last).is_err());
}

/// Two sequences in one paged cache: the second reuses the first's prompt blocks (prefix
/// cache) and computes only the rest, yet its logits equal a run from an empty cache.
#[test]
fn prefix_cached_sequence_matches_a_fresh_run() {
    use ember_kv::{KvOptions, PagedKvCache};
    let t = tiny_model_with(5, false);
    let file = GgufFile::from_bytes(t.bytes).unwrap();
    let model = load(&file, &default_device()).unwrap();
    let opts = KvOptions {
        block_size: 4,
        budget: Some(ember_kv::KvBudget::Tokens(64)),
        ..KvOptions::default()
    };
    let mut cache = PagedKvCache::new(&model.kv_config(&opts, 32)).unwrap();
    let shared: Vec<u32> = (0..9).map(|i| (i * 11 + 3) % VOCAB as u32).collect();
    let (a, cached) = cache.add_sequence(&shared).unwrap();
    assert_eq!(cached, 0);
    model
        .forward_seq(&shared, &mut cache, a, Logits::Last)
        .unwrap();

    let mut prompt_b = shared[..8].to_vec();
    prompt_b.extend([7, 8, 9]);
    let (b, cached) = cache.add_sequence(&prompt_b).unwrap();
    assert_eq!(cached, 8);
    let used_before = cache.used_blocks();
    let got = logits_rows(
        model
            .forward_seq(&prompt_b[cached..], &mut cache, b, Logits::All)
            .unwrap(),
    );
    // Only the new positions took blocks (one more block for positions 8..11).
    assert_eq!(cache.used_blocks(), used_before + 1);

    let mut fresh = model.new_cache(32).unwrap();
    let want = logits_rows(model.forward(&prompt_b, &mut fresh, Logits::All).unwrap());
    for (row, (g, w)) in got.iter().zip(&want[cached..]).enumerate() {
        for (x, y) in g.iter().zip(w) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "row {row}: {x} vs {y}"
            );
        }
    }
    cache.free(a).unwrap();
    cache.free(b).unwrap();
    assert_eq!(cache.used_blocks(), 0);
}

/// A refused batch (it would overflow the context) leaves the sequence as it was, and the
/// room it did not take is still there.
#[test]
fn refused_batch_leaves_the_sequence_unchanged() {
    let t = tiny_model(2);
    let file = GgufFile::from_bytes(t.bytes).unwrap();
    let model = load(&file, &default_device()).unwrap();
    let mut cache = model.new_cache(8).unwrap();
    model.forward(&[1, 2, 3], &mut cache, Logits::Last).unwrap();
    assert!(model.forward(&[4; 6], &mut cache, Logits::Last).is_err());
    assert_eq!(cache.len(), 3);
    model.forward(&[4; 5], &mut cache, Logits::Last).unwrap();
    assert_eq!(cache.len(), 8);
}

/// Forward passes started at once from several OS threads and from inside rayon's pool (each
/// keeps the pool's other workers polling while it runs) all finish, with the logits of a pass
/// run alone. A watchdog turns a deadlock into a failure instead of a hung test.
#[test]
fn concurrent_and_nested_passes_finish_with_the_same_logits() {
    use rayon::prelude::*;
    use std::sync::Arc;
    let t = tiny_model_with(5, false);
    let file = GgufFile::from_bytes(t.bytes).unwrap();
    let model = Arc::new(load(&file, &default_device()).unwrap());
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    fn run(model: &ember_models::Model, tokens: &[u32]) -> Vec<Vec<f32>> {
        let mut cache = model.new_cache(32).unwrap();
        let mut rows = logits_rows(
            model
                .forward(&tokens[..6], &mut cache, Logits::Last)
                .unwrap(),
        );
        for &tok in &tokens[6..] {
            rows.extend(logits_rows(
                model.forward(&[tok], &mut cache, Logits::Last).unwrap(),
            ));
        }
        rows
    }
    let alone = run(&model, &tokens);
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..4 {
        let (model, tx, tokens) = (Arc::clone(&model), tx.clone(), tokens.clone());
        std::thread::spawn(move || {
            let got = if i % 2 == 0 {
                vec![run(&model, &tokens)]
            } else {
                // Passes inside the pool, two at a time on its workers.
                (0..2)
                    .into_par_iter()
                    .map(|_| run(&model, &tokens))
                    .collect()
            };
            let _ = tx.send(got);
        });
    }
    drop(tx);
    for _ in 0..4 {
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a forward pass did not finish (deadlock?)");
        for rows in got {
            assert_eq!(rows, alone);
        }
    }
}
