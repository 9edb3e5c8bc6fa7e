//! `PassOptions` on real models: a pass over the first layers only (self-speculation's draft)
//! and a pass that leaves its positions uncommitted (speculative verification).

use std::path::PathBuf;

use ember_formats::GgufFile;
use ember_kv::{KvError, KvOptions, PagedKvCache, SeqId};
use ember_models::{BatchSeq, Logits, Model, ModelError, PassOptions, default_device, load};

fn model(env: &str, name: &str) -> Model {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => ember_hub::resolve(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}")),
    };
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("open {name}: {e}"));
    load(&file, &default_device()).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

fn smollm2() -> Model {
    model("EMBER_TEST_SMOLLM2", "smollm2-135m-instruct-q4_1")
}

fn gemma3() -> Model {
    model("EMBER_TEST_GEMMA3", "gemma3-270m-q4_k_m")
}

/// `n` token ids spread over the vocabulary (a fixed LCG: the same every run).
fn tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    let vocab = model.config().n_vocab as u64;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Skip the first ids (control tokens in both vocabularies).
            (1000 + (x >> 33) % (vocab - 2000)) as u32
        })
        .collect()
}

/// A cache for `layers` of the model's blocks (`None`: all) with one empty sequence.
fn cache_for(
    model: &Model,
    opts: &KvOptions,
    ctx: usize,
    layers: Option<usize>,
) -> (PagedKvCache, SeqId) {
    let config = match layers {
        None => model.kv_config(opts, ctx),
        Some(n) => model.kv_config_layers(opts, ctx, n),
    };
    let mut cache = PagedKvCache::new(&config).expect("cache");
    let (seq, _) = cache.add_sequence(&[]).expect("sequence");
    (cache, seq)
}

/// One pass of `tokens` for `seq`; the logits as raw bits (exact comparisons).
fn pass(
    model: &Model,
    cache: &mut PagedKvCache,
    seq: SeqId,
    tokens: &[u32],
    logits: Logits,
    opts: PassOptions,
) -> Result<Vec<u32>, ModelError> {
    let item = BatchSeq {
        seq,
        tokens,
        logits: Some(logits),
        solo_rows: None,
    };
    let out = model.forward_batch_with(&[item], cache, opts)?;
    let values = out.into_data().try_to_vec::<f32>().expect("f32 logits");
    Ok(values.iter().map(|v| v.to_bits()).collect())
}

fn layers(n: usize) -> PassOptions {
    PassOptions {
        layers: Some(n),
        defer_commit: false,
    }
}

const DEFERRED: PassOptions = PassOptions {
    layers: None,
    defer_commit: true,
};

/// Every stored K and V value of `layer` for `seq`'s positions, as bits.
fn kv_bits(cache: &PagedKvCache, layer: usize, seq: SeqId) -> Vec<u32> {
    let n = cache.len(seq).expect("len");
    let view = cache.attention(layer, &[(seq, 0, n)], 1.0).expect("view");
    let (k, v) = view.store.gather_f32(&view.seqs[0]).expect("gather");
    assert_eq!(k.len(), n * cache_row(cache, layer), "layer {layer}");
    k.iter().chain(&v).map(|x| x.to_bits()).collect()
}

fn cache_row(cache: &PagedKvCache, layer: usize) -> usize {
    let view = cache.attention(layer, &[], 1.0).expect("view");
    view.store.n_kv() * view.store.head_dim()
}

/// `Some(n_layer)` runs what the default runs, bit for bit: prompt and decode steps.
fn all_layers_is_the_default(model: &Model) {
    let n_layer = model.n_layers();
    assert_eq!(n_layer, model.config().n_layer);
    let prompt = tokens(model, 40, 1);
    let opts = KvOptions::default();
    let (mut a, sa) = cache_for(model, &opts, 64, None);
    let (mut b, sb) = cache_for(model, &opts, 64, Some(n_layer));
    let item = |seq, tokens| BatchSeq {
        seq,
        tokens,
        logits: Some(Logits::All),
        solo_rows: None,
    };
    let want = model
        .forward_batch(&[item(sa, &prompt)], &mut a)
        .expect("default");
    let want: Vec<u32> = want
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32")
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let got = pass(model, &mut b, sb, &prompt, Logits::All, layers(n_layer)).expect("all");
    assert_eq!(got, want, "prompt logits");
    for &t in &tokens(model, 3, 2) {
        let want = pass(
            model,
            &mut a,
            sa,
            &[t],
            Logits::Last,
            PassOptions::default(),
        );
        let got = pass(model, &mut b, sb, &[t], Logits::Last, layers(n_layer));
        assert_eq!(got.expect("step"), want.expect("step"), "decode logits");
    }
}

#[test]
fn all_layers_equal_the_default_pass_bit_for_bit() {
    all_layers_is_the_default(&smollm2());
    all_layers_is_the_default(&gemma3());
}

/// A pass over the first `k` blocks writes exactly the K/V the full model writes in those
/// layers (so a self-speculative draft cache is the target's first layers), and its logits
/// are the head applied after block `k - 1`: finite, deterministic, not the full model's.
fn first_layers(model: &Model, k: usize) {
    let n_layer = model.n_layers();
    assert!(k < n_layer);
    let opts = KvOptions::default();
    let prompt = tokens(model, 40, 3);
    let steps = tokens(model, 2, 4);
    let (mut full, sf) = cache_for(model, &opts, 64, None);
    let (mut short, ss) = cache_for(model, &opts, 64, Some(k));
    let (mut again, sa) = cache_for(model, &opts, 64, Some(k));
    assert_eq!(short.n_layers(), k);
    let none = PassOptions::default();
    let mut logits = Vec::new();
    for (i, chunk) in std::iter::once(&prompt[..])
        .chain(steps.chunks(1))
        .enumerate()
    {
        let which = if i == 0 { Logits::All } else { Logits::Last };
        let f = pass(model, &mut full, sf, chunk, which, none).expect("full");
        let s = pass(model, &mut short, ss, chunk, which, layers(k)).expect("short");
        let s2 = pass(model, &mut again, sa, chunk, which, layers(k)).expect("short again");
        assert_eq!(s, s2, "a {k}-layer pass is deterministic");
        assert_eq!(s.len(), f.len());
        assert_ne!(s, f, "{k} layers give the full model's logits");
        assert!(s.iter().all(|&b| f32::from_bits(b).is_finite()), "finite");
        for layer in 0..k {
            assert_eq!(
                kv_bits(&short, layer, ss),
                kv_bits(&full, layer, sf),
                "K/V of layer {layer} after chunk {i}"
            );
        }
        logits.push(s);
    }
    // The draft's next-token choice is not constant: the logits follow the input.
    assert_ne!(logits[1], logits[2]);
}

#[test]
fn fewer_layers_write_the_full_models_kv_and_their_own_logits() {
    let smol = smollm2();
    first_layers(&smol, smol.n_layers() / 2);
    first_layers(&smol, 1);
    // Gemma 3: layers 0..7 hold window layers and the global layer 5, each with its own
    // window and RoPE base, which must stay those of its true index.
    first_layers(&gemma3(), 7);
}

#[test]
fn bad_layer_counts_and_mismatched_caches_are_errors_that_change_nothing() {
    let model = smollm2();
    let n_layer = model.n_layers();
    let opts = KvOptions::default();
    let t = tokens(&model, 4, 5);
    let (mut full, sf) = cache_for(&model, &opts, 32, None);
    for n in [0, n_layer + 1] {
        let err = pass(&model, &mut full, sf, &t, Logits::Last, layers(n)).unwrap_err();
        assert!(
            matches!(err, ModelError::BadLayerCount { layers, n_layer: m } if layers == n && m == n_layer),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "the pass asks for {n} layers but the model has {n_layer}"
            )),
            "{msg}"
        );
    }
    // A full cache for a short pass, and a short cache for a full pass.
    let err = pass(&model, &mut full, sf, &t, Logits::Last, layers(3)).unwrap_err();
    assert!(
        matches!(err, ModelError::CacheLayers { cache, layers: 3 } if cache == n_layer),
        "{err:?}"
    );
    assert_eq!(full.len(sf).expect("len"), 0);
    let config = model.kv_config_layers(&opts, 32, 3);
    assert_eq!(config.layer_windows.len(), 3);
    let (mut short, ss) = cache_for(&model, &opts, 32, Some(3));
    let err = pass(
        &model,
        &mut short,
        ss,
        &t,
        Logits::Last,
        PassOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ModelError::CacheLayers { cache: 3, layers } if layers == n_layer),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("the KV cache has 3 layers"),
        "{err}"
    );
    assert_eq!(short.len(ss).expect("len"), 0);
    // Both still work with the right options.
    pass(
        &model,
        &mut full,
        sf,
        &t,
        Logits::Last,
        PassOptions::default(),
    )
    .expect("full");
    pass(&model, &mut short, ss, &t, Logits::Last, layers(3)).expect("short");
}

#[test]
fn deferred_pass_commits_nothing_and_rolls_back_exactly() {
    let model = smollm2();
    // Small blocks so the drafts fill whole blocks the prefix cache could register.
    let opts = KvOptions {
        block_size: 4,
        ..KvOptions::default()
    };
    let none = PassOptions::default();
    let prompt = tokens(&model, 10, 6);
    let drafts = tokens(&model, 6, 7);
    let x = tokens(&model, 1, 8);

    // Reference: a run that never saw the drafts.
    let (mut reference, sr) = cache_for(&model, &opts, 64, None);
    pass(&model, &mut reference, sr, &prompt, Logits::Last, none).expect("prompt");
    let want = pass(&model, &mut reference, sr, &x, Logits::Last, none).expect("x");

    let (mut cache, seq) = cache_for(&model, &opts, 64, None);
    pass(&model, &mut cache, seq, &prompt, Logits::Last, none).expect("prompt");
    pass(&model, &mut cache, seq, &drafts, Logits::All, DEFERRED).expect("drafts");
    assert_eq!(cache.allocator().committed_len(seq).expect("committed"), 10);
    assert_eq!(cache.len(seq).expect("len"), 16);
    // Nothing of the drafts is offered to a new prompt: only the committed full blocks.
    let mut long = prompt.clone();
    long.extend_from_slice(&drafts);
    long.push(x[0]);
    let (probe, cached) = cache.add_sequence(&long).expect("probe");
    assert_eq!(cached, 8, "uncommitted drafts entered the prefix cache");
    cache.free(probe).expect("free probe");
    // Reject every draft.
    cache.truncate(seq, 10).expect("truncate");
    cache.commit(seq).expect("commit");
    let got = pass(&model, &mut cache, seq, &x, Logits::Last, none).expect("x");
    assert_eq!(got, want, "logits after rolling back every draft");
    let (probe, cached) = cache.add_sequence(&long).expect("probe");
    assert_eq!(cached, 8, "rejected drafts entered the prefix cache");
    cache.free(probe).expect("free probe");

    // Accept two drafts: what follows does not depend on the rejected ones.
    let mut after = Vec::new();
    for tail in [drafts[2], drafts[3]] {
        let (mut c, s) = cache_for(&model, &opts, 64, None);
        pass(&model, &mut c, s, &prompt, Logits::Last, none).expect("prompt");
        let d = [drafts[0], drafts[1], tail, drafts[4]];
        pass(&model, &mut c, s, &d, Logits::All, DEFERRED).expect("drafts");
        assert_eq!(c.allocator().committed_len(s).expect("committed"), 10);
        c.truncate(s, 12).expect("truncate");
        c.commit(s).expect("commit");
        assert_eq!(c.allocator().committed_len(s).expect("committed"), 12);
        after.push(pass(&model, &mut c, s, &x, Logits::Last, none).expect("x"));
    }
    assert_eq!(after[0], after[1], "a rejected draft changed what follows");
}

/// Gemma 3's window layers release blocks at commit: a deferred pass over the window edge can
/// still be rolled back, and the logits after it are those of a run without the drafts.
#[test]
fn deferred_pass_over_the_sliding_window_edge_rolls_back() {
    let model = gemma3();
    let window = model
        .config()
        .sliding_window
        .map(|s| s.window)
        .expect("gemma3 has a sliding window");
    assert_eq!(window, 512);
    let opts = KvOptions::default();
    let none = PassOptions::default();
    // 540 + 40 positions: committing them would release the first two blocks of 32, which
    // a query at 540 still needs.
    let prompt = tokens(&model, 540, 9);
    let drafts = tokens(&model, 40, 10);
    let x = tokens(&model, 1, 11);

    let (mut cache, seq) = cache_for(&model, &opts, 640, None);
    model
        .forward_seq(&prompt, &mut cache, seq, Logits::Last)
        .expect("prompt");
    pass(&model, &mut cache, seq, &drafts, Logits::All, DEFERRED).expect("drafts");
    assert_eq!(
        cache.allocator().committed_len(seq).expect("committed"),
        540
    );
    cache
        .truncate(seq, 540)
        .expect("rollback over the window edge");
    cache.commit(seq).expect("commit");
    let got = pass(&model, &mut cache, seq, &x, Logits::Last, none).expect("x");

    let (mut reference, sr) = cache_for(&model, &opts, 640, None);
    model
        .forward_seq(&prompt, &mut reference, sr, Logits::Last)
        .expect("prompt");
    let want = pass(&model, &mut reference, sr, &x, Logits::Last, none).expect("x");
    assert_eq!(got, want, "logits after rolling back over the window edge");

    // The same drafts committed cannot be rolled back: the path above is the one that needs
    // the deferred commit.
    pass(&model, &mut reference, sr, &drafts, Logits::All, none).expect("drafts");
    let err = reference.truncate(sr, 541).unwrap_err();
    assert!(matches!(err, KvError::ReleasedPositions { .. }), "{err:?}");
}
