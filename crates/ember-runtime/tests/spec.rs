//! Speculative decoding through the engine: greedy output token for token the output without
//! it (every proposer, real models, the shared reference prompts, 512-token generations, and
//! inside continuous batching), the target's sampling distribution kept exactly (a chi-square
//! test against the exact distribution of a tiny model), and clear errors for bad settings.

#[allow(dead_code)] // the fidelity tests use the rest of it
mod common;

use std::sync::Arc;

use ember_runtime::engine::{Engine, EngineConfig, EngineRequest, Event};
use ember_runtime::generate::{GenerateRequest, generate_with_draft};
use ember_runtime::loaded::LoadedModel;
use ember_runtime::sampling::{Sampler, SamplingParams};
use ember_runtime::spec::{Proposer, SpecConfig, SpecError, SpecOverride};

fn spec(proposer: Proposer) -> SpecConfig {
    SpecConfig {
        proposer,
        ..SpecConfig::default()
    }
}

fn greedy_request(prompt: &[u32], n: usize, ctx: usize, spec: SpecConfig) -> GenerateRequest {
    GenerateRequest {
        prompt_tokens: prompt.to_vec(),
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        ctx_size: ctx,
        // Exactly `n` tokens: the comparison covers the whole length.
        stop_at_eog: false,
        context_shift: None,
        kv: Default::default(),
        spec,
    }
}

/// Greedy runs of `prompt` with every proposer (the draft model is the target's own file: a
/// second copy with the same vocabulary) equal the plain run; returns the plain tokens and
/// each proposer's accepted count.
fn check_all_proposers(m: &LoadedModel, name: &str, prompt: &[u32], n: usize) -> Vec<u32> {
    let ctx = prompt.len() + n + 8;
    let run = |s: SpecConfig| {
        let draft = (s.proposer == Proposer::Draft).then_some(m);
        generate_with_draft(m, draft, &greedy_request(prompt, n, ctx, s), |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let plain = run(spec(Proposer::None));
    assert_eq!(plain.tokens.len(), n, "{name}");
    assert!(plain.spec.is_none(), "{name}: no speculation reported");
    for proposer in [Proposer::Lookup, Proposer::SelfSpec, Proposer::Draft] {
        let out = run(spec(proposer));
        let stats = out.spec.clone().expect("speculation reported");
        let first_diff = plain
            .tokens
            .iter()
            .zip(&out.tokens)
            .position(|(a, b)| a != b);
        assert_eq!(
            out.tokens, plain.tokens,
            "{name}: --spec {proposer} changed the greedy output (first difference at {first_diff:?}; {stats:?})"
        );
        assert_eq!(out.text, plain.text, "{name}: {proposer}");
        assert!(stats.accepted <= stats.drafted, "{name}: {stats:?}");
        if proposer == Proposer::Draft {
            // The same weights propose: most proposals pass (not all: the drafter computes
            // accepted tokens again as a batch, whose rounding can flip a close call, and a
            // rejection wastes the rest of that step's proposals).
            assert!(
                stats.accepted * 2 >= stats.drafted,
                "{name}: a draft model identical to the target had {stats:?}"
            );
        }
        if proposer != Proposer::Lookup {
            assert!(stats.drafted > 0, "{name}: {proposer} proposed nothing");
        }
        eprintln!("{name}: {proposer}: {stats:?}");
    }
    plain.tokens
}

/// Every shared reference prompt (and the project's longer-than-a-ubatch ones) with every
/// proposer: the reference's greedy tokens come out unchanged, and two prompts run on to
/// 512 tokens.
fn greedy_identity(model_env: &str, model_name: &str, prefix: &str) {
    let m = common::load(model_env, model_name);
    for (file, r) in common::references(prefix) {
        let Some(prompt) = r["prompt_token_ids"].as_array() else {
            continue;
        };
        let prompt: Vec<u32> = prompt
            .iter()
            .map(|v| v.as_u64().expect("token id") as u32)
            .collect();
        let want: Vec<u32> = r["greedy_generated_token_ids"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect())
            .unwrap_or_default();
        let long = file.contains("p1_") || file.contains("p6_");
        let n = if long { 512 } else { want.len().max(32) };
        let got = check_all_proposers(&m, &file, &prompt, n);
        // The plain run is llama.cpp's greedy output (as the fidelity tests check), so every
        // proposer's is too.
        let k = want.len().min(got.len());
        assert_eq!(got[..k], want[..k], "{file}: plain greedy vs llama.cpp");
    }
}

#[test]
fn greedy_speculation_is_plain_decoding_smollm2() {
    greedy_identity("EMBER_SMOLLM2", "smollm2-135m-instruct-q4_1", "smollm2_");
}

#[test]
fn greedy_speculation_is_plain_decoding_gemma3() {
    greedy_identity("EMBER_GEMMA3", "gemma3-270m-q4_k_m", "gemma3_");
}

/// Inside continuous batching: several streams speculate together (one pass verifies every
/// stream's proposals beside other streams' plain steps and prompt chunks), each one's output
/// is its solo plain output.
#[test]
fn greedy_speculation_inside_continuous_batching() {
    let m = Arc::new(common::load("EMBER_SMOLLM2", "smollm2-135m-instruct-q4_1"));
    let texts = [
        "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
        "Write a list of the numbers from one to twenty: one, two, three,",
        "The history of the river begins in the mountains, where",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "Once upon a time",
    ];
    let n = 96;
    let ctx = 256;
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenize_prompt(t).expect("tokenize"))
        .collect();
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate_with_draft(
                &m,
                None,
                &greedy_request(p, n, ctx, spec(Proposer::None)),
                |_| {},
            )
            .expect("solo")
            .tokens
        })
        .collect();
    for proposer in [Proposer::Lookup, Proposer::SelfSpec, Proposer::Draft] {
        let mut config = EngineConfig::new(4, ctx);
        config.spec = spec(proposer);
        // The draft model: a second handle on the same file (same vocabulary).
        let draft = (proposer == Proposer::Draft).then(|| Arc::clone(&m));
        let engine = Engine::start_with_draft(Arc::clone(&m), draft, config).expect("engine");
        let streams: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let req = EngineRequest {
                    prompt_tokens: p.clone(),
                    max_tokens: n,
                    sampling: SamplingParams::greedy(),
                    ignore_eos: true,
                    // One stream opts out: plain steps share passes with verification rows.
                    spec: SpecOverride {
                        proposer: (i == 2).then_some(Proposer::None),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                engine.submit(req).expect("submit")
            })
            .collect();
        let mut drafted = 0;
        for (i, mut stream) in streams.into_iter().enumerate() {
            let mut tokens = Vec::new();
            loop {
                match stream.blocking_next() {
                    Some(Event::Token { id, .. }) => tokens.push(id),
                    Some(Event::Done { spec, .. }) => {
                        assert_eq!(spec.is_none(), i == 2, "stream {i}: {spec:?}");
                        drafted += spec.map_or(0, |s| s.drafted);
                        break;
                    }
                    other => panic!("stream {i}: {other:?}"),
                }
            }
            assert_eq!(
                tokens, solo[i],
                "{proposer}: stream {i} differs from its solo run"
            );
        }
        assert!(drafted > 0, "{proposer}: nothing was proposed");
        // The scheduler publishes its counters after the step that sent the last event.
        let mut stats = engine.stats();
        for _ in 0..100 {
            if stats.spec_drafted_total == drafted && stats.kv_used_blocks == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            stats = engine.stats();
        }
        assert_eq!(stats.spec_drafted_total, drafted);
        assert!(stats.spec_accepted_total <= stats.spec_drafted_total);
        assert_eq!(stats.kv_used_blocks, 0, "every block given back");
    }
}

/// A tiny random model (288-token vocabulary, 2 layers) written to a temporary file.
fn tiny_model() -> LoadedModel {
    use ember_models::testing::tiny::{TinyArch, TinyDtype, gguf};
    let bytes = gguf(TinyArch::Mistral, TinyDtype::F32).expect("tiny model");
    let dir = std::env::temp_dir().join(format!("ember-spec-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tiny-mistral.gguf");
    std::fs::write(&path, bytes).expect("write tiny model");
    LoadedModel::open(&path, &ember_models::default_device()).expect("load tiny model")
}

/// The upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty; within
/// 1% of the tables for df >= 10).
fn chi2_critical_001(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232; // the standard normal's upper 0.1% point
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Sampling with speculation draws from exactly the target's distribution. The exact joint
/// distribution of the first three generated tokens is computed from the model's logits
/// through the whole sampling chain (repetition penalty, top-k, temperature); thousands of
/// seeded generations with each proposer must fit it (chi-square, significance 0.001).
/// Prompt lookup (a one-hot proposal) and self-speculation (a sampled draft distribution)
/// exercise both kinds of acceptance; the plain run checks the test itself.
#[test]
fn sampling_with_speculation_keeps_the_distribution() {
    let m = Arc::new(tiny_model());
    // Every ordinary token once, then the model's own greedy continuation: whatever is
    // sampled has occurred before (prompt lookup always has an n-gram to propose), and what
    // followed it in the greedy chain is often likely again (proposals are sometimes
    // accepted, sometimes not).
    let mut prompt: Vec<u32> = (0..284).collect();
    let chain = generate_with_draft(
        &m,
        None,
        &greedy_request(&prompt, 40, 400, spec(Proposer::None)),
        |_| {},
    )
    .expect("greedy chain")
    .tokens;
    prompt.extend_from_slice(&chain);
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 3,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.3,
        repeat_last_n: 64,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: None,
    };
    let n = 3;
    // Exact p(t1, t2, t3) from logits of the prompt and each prefix.
    let logits_after = |tokens: &[u32]| -> Vec<f32> {
        let mut cache = m.model.new_cache(512).expect("cache");
        ember_runtime::generate::last_logits(
            m.model
                .forward(tokens, &mut cache, ember_models::Logits::Last)
                .expect("forward"),
        )
    };
    let mut sampler = Sampler::new(params.clone());
    let mut exact: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 1.0)];
    for _ in 0..n {
        let mut next = Vec::new();
        for (seq, p) in &exact {
            let mut ctx = prompt.clone();
            ctx.extend_from_slice(seq);
            for (t, q) in sampler.distribution(&logits_after(&ctx), &ctx) {
                let mut s = seq.clone();
                s.push(t);
                next.push((s, p * q));
            }
        }
        exact = next;
    }
    let total: f64 = exact.iter().map(|e| e.1).sum();
    assert!(
        (total - 1.0).abs() < 1e-9,
        "exact distribution sums to {total}"
    );
    let index: std::collections::HashMap<Vec<u32>, usize> = exact
        .iter()
        .enumerate()
        .map(|(i, (s, _))| (s.clone(), i))
        .collect();

    // Many seeded requests through one engine (8 streams batched, the prompt served from the
    // prefix cache after the first): each request's three tokens are one draw.
    let draws = |proposer: Proposer, runs: u64| -> (f64, u64, u64) {
        let mut counts = vec![0u64; exact.len()];
        let (mut drafted, mut accepted) = (0, 0);
        let mut config = EngineConfig::new(8, prompt.len() + 8);
        config.spec = SpecConfig {
            proposer,
            layers: Some(1),
            draft_max: 4,
            ..SpecConfig::default()
        };
        let engine = Engine::start(Arc::clone(&m), config).expect("engine");
        let base: u64 = std::env::var("EMBER_SPEC_SEED_BASE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let seeds: Vec<u64> = (base..base + runs).collect();
        for wave in seeds.chunks(256) {
            let streams: Vec<_> = wave
                .iter()
                .map(|&seed| {
                    let req = EngineRequest {
                        prompt_tokens: prompt.clone(),
                        max_tokens: n,
                        sampling: SamplingParams {
                            seed: Some(seed),
                            ..params.clone()
                        },
                        ignore_eos: true,
                        ..Default::default()
                    };
                    engine.submit(req).expect("submit")
                })
                .collect();
            for mut stream in streams {
                let mut tokens = Vec::new();
                loop {
                    match stream.blocking_next() {
                        Some(Event::Token { id, .. }) => tokens.push(id),
                        Some(Event::Done { spec, .. }) => {
                            if let Some(s) = spec {
                                drafted += s.drafted;
                                accepted += s.accepted;
                            }
                            break;
                        }
                        other => panic!("{proposer}: {other:?}"),
                    }
                }
                let cell = index
                    .get(&tokens)
                    .unwrap_or_else(|| panic!("{proposer}: {tokens:?} has probability 0"));
                counts[*cell] += 1;
            }
        }
        let chi2: f64 = exact
            .iter()
            .zip(&counts)
            .map(|((_, p), &c)| {
                let e = p * runs as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        (chi2, drafted, accepted)
    };
    let df = exact.len() - 1;
    let critical = chi2_critical_001(df);
    for (proposer, runs) in [
        (Proposer::None, 6_000),
        (Proposer::Lookup, 20_000),
        (Proposer::SelfSpec, 20_000),
    ] {
        let (chi2, drafted, accepted) = draws(proposer, runs);
        eprintln!(
            "{proposer}: chi2 {chi2:.1} (df {df}, critical {critical:.1}), drafted {drafted}, accepted {accepted}"
        );
        assert!(
            chi2 < critical,
            "{proposer}: chi-square {chi2:.1} >= {critical:.1} (df {df}): the output distribution is not the model's"
        );
        if proposer != Proposer::None {
            assert!(drafted > 1000, "{proposer}: only {drafted} proposals");
            assert!(
                accepted > 0 && accepted < drafted,
                "{proposer}: both outcomes must occur ({accepted}/{drafted})"
            );
        }
    }
}

#[test]
fn bad_settings_are_clear_errors() {
    let m = Arc::new(common::load("EMBER_SMOLLM2", "smollm2-135m-instruct-q4_1"));
    let n_layer = m.model.config().n_layer;
    let err = |s: SpecConfig, draft: Option<Arc<LoadedModel>>| {
        let mut config = EngineConfig::new(1, 64);
        config.spec = s;
        match Engine::start_with_draft(Arc::clone(&m), draft, config) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let msg = err(spec(Proposer::Draft), None);
    assert!(msg.contains("--draft-model"), "{msg}");
    for layers in [0, n_layer] {
        let msg = err(
            SpecConfig {
                layers: Some(layers),
                ..spec(Proposer::SelfSpec)
            },
            None,
        );
        assert!(msg.contains("--spec-layers"), "{msg}");
    }
    let msg = err(
        SpecConfig {
            draft_max: 0,
            ..spec(Proposer::Lookup)
        },
        None,
    );
    assert!(msg.contains("--draft-max"), "{msg}");
    // A draft model with another vocabulary names the difference.
    let gemma = Arc::new(common::load("EMBER_GEMMA3", "gemma3-270m-q4_k_m"));
    let msg = err(spec(Proposer::Draft), Some(gemma));
    assert!(
        msg.contains("vocabulary") || msg.contains("tokens"),
        "{msg}"
    );
    assert_eq!(
        "bogus".parse::<Proposer>(),
        Err(SpecError::UnknownProposer("bogus".into()))
    );
    // Per request: a proposer the engine does not run is refused at submit.
    let mut config = EngineConfig::new(1, 64);
    config.spec = spec(Proposer::Lookup);
    let engine = Engine::start(Arc::clone(&m), config).expect("engine");
    let req = |o: SpecOverride| EngineRequest {
        prompt_tokens: vec![1, 2, 3],
        max_tokens: 4,
        spec: o,
        ..Default::default()
    };
    for o in [
        SpecOverride {
            proposer: Some(Proposer::SelfSpec),
            ..Default::default()
        },
        SpecOverride {
            proposer: Some(Proposer::Draft),
            ..Default::default()
        },
        SpecOverride {
            draft_max: Some(0),
            ..Default::default()
        },
    ] {
        assert!(engine.submit(req(o.clone())).is_err(), "{o:?} accepted");
    }
}
