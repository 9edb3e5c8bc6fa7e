//! The drafter on real models: SmolLM2 as its own draft model and as a self-speculative
//! target, Gemma 3 (sliding windows) self-speculating over a long context.

use std::path::PathBuf;

use ember_formats::GgufFile;
use ember_kv::{KvError, KvOptions, PagedKvCache};
use ember_models::{BatchSeq, Logits, Model, ModelError, PassOptions};
use ember_spec::drafter::{DraftItem, DraftSeq, Drafter};

fn model(env: &str, name: &str) -> Model {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => ember_hub::resolve(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}")),
    };
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("open {name}: {e}"));
    ember_models::load(&file, &ember_models::default_device())
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
}

fn smollm2() -> Model {
    model("EMBER_TEST_SMOLLM2", "smollm2-135m-instruct-q4_1")
}

fn gemma3() -> Model {
    model("EMBER_TEST_GEMMA3", "gemma3-270m-q4_k_m")
}

/// `n` token ids: a random phrase of 7 repeated, so the model continues it with confidence
/// (fixed LCG: the same every run).
fn prompt(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    let vocab = model.config().n_vocab as u64;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let phrase: Vec<u32> = (0..7)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Skip the first ids (control tokens in both vocabularies).
            (1000 + (x >> 33) % (vocab.min(40_000) - 1000)) as u32
        })
        .collect();
    phrase.iter().copied().cycle().take(n).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn greedy(_: usize, row: &[f32]) -> Option<u32> {
    Some(argmax(row))
}

/// One `propose` for one sequence; its proposals.
fn propose(
    drafter: &mut Drafter,
    model: &Model,
    seq: DraftSeq,
    context: &[u32],
    max: usize,
) -> Result<Vec<u32>, ModelError> {
    let mut items = [DraftItem {
        seq,
        context,
        max,
        proposed: vec![7],
    }];
    let r = drafter.propose(model, &mut items, greedy);
    let [item] = items;
    match r {
        Ok(()) => Ok(item.proposed),
        Err(e) => {
            assert!(item.proposed.is_empty(), "proposals left after {e}");
            Err(e)
        }
    }
}

/// What a fresh drafter proposes for `context`.
fn fresh(model: &Model, layers: Option<usize>, context: &[u32], max: usize) -> Vec<u32> {
    let mut d = Drafter::new(model, layers, &KvOptions::default(), 1024, 4096).expect("drafter");
    let seq = d.add_sequence().expect("seq");
    propose(&mut d, model, seq, context, max).expect("fresh proposals")
}

/// Greedy decoding of `n` tokens after `context` with plain single-sequence passes over the
/// first `layers` blocks (`None`: all, through `Model::forward`).
fn greedy_decode(model: &Model, layers: Option<usize>, context: &[u32], n: usize) -> Vec<u32> {
    let opts = KvOptions::default();
    let mut out = Vec::new();
    match layers {
        None => {
            let mut cache = model.new_cache(1024).expect("cache");
            let mut logits = model.forward(context, &mut cache, Logits::Last);
            for _ in 0..n {
                let row = logits.expect("forward").into_data();
                let t = argmax(&row.try_to_vec::<f32>().expect("f32"));
                out.push(t);
                logits = model.forward(&[t], &mut cache, Logits::Last);
            }
        }
        Some(k) => {
            let mut cache =
                PagedKvCache::new(&model.kv_config_layers(&opts, 1024, k)).expect("cache");
            let (seq, _) = cache.add_sequence(&[]).expect("seq");
            let mut tokens = context.to_vec();
            for _ in 0..n {
                let item = BatchSeq {
                    seq,
                    tokens: &tokens,
                    logits: Some(Logits::Last),
                    solo_rows: None,
                };
                let pass = PassOptions {
                    layers: Some(k),
                    defer_commit: false,
                };
                let row = model
                    .forward_batch_with(&[item], &mut cache, pass)
                    .expect("pass")
                    .into_data();
                let t = argmax(&row.try_to_vec::<f32>().expect("f32"));
                out.push(t);
                tokens = vec![t];
            }
        }
    }
    out
}

/// What the drafter's cache holds for `seq`: (all tokens, committed length).
fn held(drafter: &Drafter, seq: DraftSeq) -> (Vec<u32>, usize) {
    let sid = drafter.cache_seq(seq).expect("live");
    let a = drafter.cache().allocator();
    (
        a.tokens(sid).expect("tokens").to_vec(),
        a.committed_len(sid).expect("committed"),
    )
}

#[test]
fn full_layer_drafter_proposes_the_models_greedy_tokens_and_follows_rollbacks() {
    let model = smollm2();
    let p = prompt(&model, 30, 1);
    let mut d = Drafter::new(&model, None, &KvOptions::default(), 1024, 4096).expect("drafter");
    assert_eq!(d.layers(), None);
    let seq = d.add_sequence().expect("seq");
    let got = propose(&mut d, &model, seq, &p, 6).expect("propose");
    assert_eq!(
        got,
        greedy_decode(&model, None, &p, 6),
        "proposals vs greedy"
    );
    // The context is committed, the drafts fed after it are not.
    let (tokens, committed) = held(&d, seq);
    assert_eq!(committed, p.len());
    assert_eq!(tokens[..p.len()], p[..]);
    assert_eq!(tokens[p.len()..], got[..5]);

    // The target accepted two drafts, then sampled something else.
    let mut ctx = p.clone();
    ctx.extend_from_slice(&got[..2]);
    ctx.push(if got[2] == 500 { 501 } else { 500 });
    let next = propose(&mut d, &model, seq, &ctx, 5).expect("after rejection");
    assert_eq!(next.len(), 5);
    assert_eq!(next, fresh(&model, None, &ctx, 5), "after a rejection");
    let (tokens, committed) = held(&d, seq);
    assert_eq!(committed, ctx.len());
    assert_eq!(tokens[..ctx.len()], ctx[..]);

    // Every draft accepted plus the target's own next token.
    ctx.extend_from_slice(&next);
    ctx.push(901);
    let again = propose(&mut d, &model, seq, &ctx, 4).expect("after acceptance");
    assert_eq!(again, fresh(&model, None, &ctx, 4), "after full acceptance");

    // A context shift: the target dropped the end and wrote something else, shorter.
    let mut shifted = ctx[..20].to_vec();
    shifted.extend(prompt(&model, 9, 2));
    let got = propose(&mut d, &model, seq, &shifted, 4).expect("after a shift");
    assert_eq!(
        got,
        fresh(&model, None, &shifted, 4),
        "after a context shift"
    );
    assert_eq!(held(&d, seq).1, shifted.len());
    // And text sharing nothing with what the drafter holds.
    let other = prompt(&model, 12, 3);
    let got = propose(&mut d, &model, seq, &other, 3).expect("new text");
    assert_eq!(
        got,
        greedy_decode(&model, None, &other, 3),
        "unrelated text"
    );

    // max 0 only catches up.
    let mut ctx = other.clone();
    ctx.extend_from_slice(&got);
    assert!(
        propose(&mut d, &model, seq, &ctx, 0)
            .expect("catch up")
            .is_empty()
    );
    assert_eq!(held(&d, seq), (ctx.clone(), ctx.len()));
}

#[test]
fn batched_items_propose_what_each_would_alone() {
    let model = smollm2();
    let contexts = [
        prompt(&model, 25, 4),
        prompt(&model, 9, 5),
        prompt(&model, 40, 6),
    ];
    let maxes = [4, 0, 3];
    let mut d = Drafter::new(&model, None, &KvOptions::default(), 1024, 4096).expect("drafter");
    let seqs: Vec<DraftSeq> = (0..3).map(|_| d.add_sequence().expect("seq")).collect();
    let mut items: Vec<DraftItem<'_>> = seqs
        .iter()
        .zip(&contexts)
        .zip(maxes)
        .map(|((&seq, context), max)| DraftItem {
            seq,
            context,
            max,
            proposed: Vec::new(),
        })
        .collect();
    // The first item stops after two proposals (`choose` says no more).
    let mut calls = [0usize; 3];
    d.propose(&model, &mut items, |i, row| {
        calls[i] += 1;
        (i != 0 || calls[0] <= 2).then(|| argmax(row))
    })
    .expect("propose");
    assert_eq!(calls, [3, 0, 3]);
    assert_eq!(items[0].proposed, fresh(&model, None, &contexts[0], 2));
    assert!(items[1].proposed.is_empty());
    assert_eq!(items[2].proposed, fresh(&model, None, &contexts[2], 3));
    assert_eq!(held(&d, seqs[1]), (contexts[1].clone(), 9));
}

#[test]
fn context_limit_budget_and_bad_input() {
    let model = smollm2();
    let p = prompt(&model, 30, 7);
    // Room for the context and two proposals: the target verifies at most that.
    let mut d = Drafter::new(&model, None, &KvOptions::default(), 32, 4096).expect("drafter");
    let seq = d.add_sequence().expect("seq");
    let got = propose(&mut d, &model, seq, &p, 5).expect("propose");
    assert_eq!(got, greedy_decode(&model, None, &p, 2));
    let long = prompt(&model, 33, 7);
    let err = propose(&mut d, &model, seq, &long, 5).unwrap_err();
    assert!(
        matches!(err, ModelError::Kv(KvError::ContextFull { .. })),
        "{err}"
    );
    assert!(matches!(
        propose(&mut d, &model, seq, &[], 5).unwrap_err(),
        ModelError::EmptyBatch
    ));
    let mut items = [&p, &p].map(|context| DraftItem {
        seq,
        context,
        max: 1,
        proposed: Vec::new(),
    });
    assert!(matches!(
        d.propose(&model, &mut items, greedy).unwrap_err(),
        ModelError::DuplicateSequence(_)
    ));
    d.free(seq);
    d.free(seq);
    assert!(matches!(
        propose(&mut d, &model, seq, &p, 1).unwrap_err(),
        ModelError::Kv(KvError::UnknownSequence(_))
    ));

    // Three blocks of 32 for everything: a second long sequence does not fit. The error
    // costs the drafter nothing: the first sequence goes on, and the second works once the
    // first is freed.
    let opts = KvOptions {
        prefix_caching: false,
        ..KvOptions::default()
    };
    let mut d = Drafter::new(&model, None, &opts, 1024, 96).expect("drafter");
    let (a, b) = (d.add_sequence().expect("a"), d.add_sequence().expect("b"));
    let pa = prompt(&model, 60, 8);
    let pb = prompt(&model, 60, 9);
    let first = propose(&mut d, &model, a, &pa, 3).expect("a fits");
    let err = propose(&mut d, &model, b, &pb, 3).unwrap_err();
    assert!(
        matches!(err, ModelError::Kv(KvError::OutOfBlocks { .. })),
        "{err}"
    );
    assert!(held(&d, b).0.is_empty());
    assert_eq!(propose(&mut d, &model, a, &pa, 3).expect("a again"), first);
    d.free(a);
    assert_eq!(
        propose(&mut d, &model, b, &pb, 3).expect("b after a is freed"),
        greedy_decode(&model, None, &pb, 3)
    );
}

#[test]
fn self_speculation_drafts_with_the_first_layers() {
    let model = smollm2();
    let n_layer = model.n_layers();
    let half = n_layer / 2;
    let kv = KvOptions::default();
    for bad in [0, n_layer, n_layer + 3] {
        let err = Drafter::new(&model, Some(bad), &kv, 256, 1024).err();
        assert!(
            matches!(err, Some(ModelError::SelfDraftLayers { layers, n_layer: m }) if layers == bad && m == n_layer),
            "{bad}: {err:?}"
        );
    }
    let msg = ModelError::SelfDraftLayers {
        layers: n_layer,
        n_layer,
    }
    .to_string();
    assert!(msg.contains(&format!("1 to {}", n_layer - 1)), "{msg}");

    let mut d = Drafter::new(&model, Some(half), &kv, 256, 1024).expect("drafter");
    assert_eq!(d.layers(), Some(half));
    assert_eq!(d.cache().n_layers(), half);
    let seq = d.add_sequence().expect("seq");
    let p = prompt(&model, 30, 10);
    let got = propose(&mut d, &model, seq, &p, 5).expect("propose");
    assert_eq!(got, greedy_decode(&model, Some(half), &p, 5));
    // Something else than the full model, which the drafter would otherwise just be.
    let mut ctx = p.clone();
    ctx.push(got[0]);
    let next = propose(&mut d, &model, seq, &ctx, 4).expect("propose");
    assert_eq!(next, fresh(&model, Some(half), &ctx, 4));
}

/// Gemma 3 drafting with its first layers (sliding-window layers and a global one) across
/// its 512-token window, with rejections every round, then a context shift the window layers
/// can no longer roll back to: the drafter starts that sequence over. Without prefix caching
/// it then recomputes the context exactly as a fresh drafter does and agrees with it token for
/// token; with it, it reuses what the cache still holds (computed in other slices, so other
/// roundings) and just has to work.
#[test]
fn gemma3_self_speculation_over_the_window_with_rollbacks() {
    let model = gemma3();
    let layers = Some(7);
    let drafter = |prefix_caching| {
        let kv = KvOptions {
            prefix_caching,
            ..KvOptions::default()
        };
        let mut d = Drafter::new(&model, layers, &kv, 1024, 2048).expect("drafter");
        let seq = d.add_sequence().expect("seq");
        (d, seq)
    };
    let (mut exact, se) = drafter(false);
    let (mut reuse, sr) = drafter(true);
    let mut ctx = prompt(&model, 500, 11);
    let mut round = 0;
    while ctx.len() < 580 {
        let got = propose(&mut exact, &model, se, &ctx, 4).expect("propose");
        assert!(!got.is_empty());
        if round == 0 {
            assert_eq!(
                got,
                greedy_decode(&model, layers, &ctx, 4),
                "first proposals"
            );
        }
        // Same passes, so the same proposals; prefix caching only registers blocks here.
        let other = propose(&mut reuse, &model, sr, &ctx, 4).expect("propose");
        assert_eq!(other, got, "round {round}");
        for (d, seq) in [(&exact, se), (&reuse, sr)] {
            let (tokens, committed) = held(d, seq);
            assert_eq!(committed, ctx.len());
            assert_eq!(tokens[..ctx.len()], ctx[..]);
        }
        // Accept 0, 1, 2, ... of them, then a token of the target's own.
        let accept = (round % 3).min(got.len());
        ctx.extend_from_slice(&got[..accept]);
        ctx.push(1000 + round as u32);
        round += 1;
    }
    // Back to position 520: the window layers released blocks a query there needs.
    let mut shifted = ctx[..520].to_vec();
    shifted.extend(prompt(&model, 6, 12));
    let mut after = Vec::new();
    for (d, seq) in [(&mut exact, se), (&mut reuse, sr)] {
        let before = d.cache_seq(seq);
        let got = propose(d, &model, seq, &shifted, 3).expect("after the shift");
        assert_eq!(got.len(), 3);
        assert_ne!(d.cache_seq(seq), before, "the sequence was started over");
        let (tokens, committed) = held(d, seq);
        assert_eq!(committed, shifted.len());
        assert_eq!(tokens[..shifted.len()], shifted[..]);
        after.push(got);
    }
    assert_eq!(after[0], fresh(&model, layers, &shifted, 3));
}
