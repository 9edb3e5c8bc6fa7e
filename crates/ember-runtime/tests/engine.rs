//! The continuous-batching engine on the real SmolLM2: batched streams give the tokens a
//! solo run gives, preemption and cancellation give every KV block back.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ember_runtime::engine::{Engine, EngineConfig, EngineRequest, Event, SubmitError};
use ember_runtime::generate::StopReason;
use ember_runtime::loaded::LoadedModel;
use ember_runtime::sampling::SamplingParams;

/// The file `env` names, else the manifest's `name` (pulled on first use), loaded once.
fn load(cell: &'static OnceLock<Arc<LoadedModel>>, env: &str, name: &str) -> Arc<LoadedModel> {
    Arc::clone(cell.get_or_init(|| {
        let path = match std::env::var_os(env) {
            Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
            _ => ember_hub::resolve(name).unwrap_or_else(|e| panic!("pull {name}: {e}")),
        };
        Arc::new(LoadedModel::open(&path, &ember_models::default_device()).expect("load"))
    }))
}

fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    load(&MODEL, "EMBER_TEST_SMOLLM2", "smollm2-135m-instruct-q4_1")
}

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite programming language is",
    "To make a cup of tea, first",
    "The largest planet in the solar system",
];

/// Gemma 3 270M Q4_K_M: its Q4_K and Q6_K matmuls take llama.cpp's batch-size-dependent
/// kernels, so batching only keeps its results if each row keeps its solo kernel.
fn gemma() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    load(&MODEL, "EMBER_TEST_GEMMA3", "gemma3-270m-q4_k_m")
}

fn request(prompt: &str, max_tokens: usize) -> EngineRequest {
    request_for(&model(), prompt, max_tokens)
}

fn request_for(m: &LoadedModel, prompt: &str, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt_tokens: m.tokenize_prompt(prompt).unwrap(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        ignore_eos: true,
        logprobs: None,
        ..Default::default()
    }
}

/// Runs a stream to its end: the token ids, the text and how it stopped.
fn collect(mut s: ember_runtime::engine::RequestStream) -> (Vec<u32>, String, StopReason) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match s.blocking_next().expect("stream ended without Done") {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done { stop_reason, .. } => return (ids, text, stop_reason),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

/// Each token with its top-5 log-probabilities as bits: two runs are the same computation
/// only if these are equal (a greedy token survives most small differences; these do not).
fn collect_exact(mut s: ember_runtime::engine::RequestStream) -> Vec<(u32, Vec<(u32, u32)>)> {
    let mut out = Vec::new();
    loop {
        match s.blocking_next().expect("stream ended without Done") {
            Event::Token { id, logprob, .. } => {
                let top = logprob.expect("asked for logprobs").top;
                out.push((id, top.iter().map(|&(t, l)| (t, l.to_bits())).collect()));
            }
            Event::Done { stop_reason, .. } => {
                assert_eq!(stop_reason, StopReason::Length);
                return out;
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

fn exact_request(prompt: &str, max_tokens: usize) -> EngineRequest {
    exact_request_for(&model(), prompt, max_tokens)
}

fn exact_request_for(m: &LoadedModel, prompt: &str, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        logprobs: Some(5),
        ..request_for(m, prompt, max_tokens)
    }
}

fn solo(prompt: &str, n: usize) -> Vec<u32> {
    let engine = Engine::start(model(), EngineConfig::new(1, 256)).unwrap();
    collect(engine.submit(request(prompt, n)).unwrap()).0
}

fn wait_idle(engine: &Engine) {
    let t0 = Instant::now();
    while engine.stats().running + engine.stats().waiting > 0 || engine.stats().kv_used_blocks > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Greedy tokens agree with the one-sequence generation loop, and with 8 streams batched
/// together each stream gets exactly the tokens it gets alone: SmolLM2's Q4_1/Q8_0 matmuls
/// are integer dots whose sums do not depend on the batch, and attention reads each
/// sequence's own blocks with the same per-sequence arithmetic.
#[test]
fn batched_streams_match_solo_runs() {
    let n = 24;
    let want: Vec<Vec<u32>> = PROMPTS.iter().map(|p| solo(p, n)).collect();

    let m = model();
    let solo_gen = ember_runtime::generate::generate(
        &m.model,
        &m.tokenizer,
        &ember_runtime::generate::GenerateRequest {
            prompt_tokens: m.tokenize_prompt(PROMPTS[0]).unwrap(),
            max_tokens: n,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ctx_size: 256,
            stop_at_eog: false,
            context_shift: None,
            kv: Default::default(),
            spec: Default::default(),
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(solo_gen.tokens, want[0], "engine vs generate()");

    let engine = Engine::start(model(), EngineConfig::new(8, 256)).unwrap();
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| engine.submit(request(p, n)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let (ids, _, reason) = collect(s);
        assert_eq!(reason, StopReason::Length);
        assert_eq!(ids, want[i], "prompt {i}: batched vs solo");
    }
    wait_idle(&engine);
    let st = engine.stats();
    assert_eq!(st.generated_tokens_total, 8 * n as u64);
}

/// A KV pool too small for every stream at once: sequences are preempted (counted) and
/// recomputed, and all of them still finish with their solo tokens.
#[test]
fn preemption_recomputes_and_finishes_every_stream() {
    let n = 40;
    let want: Vec<_> = PROMPTS[..4]
        .iter()
        .map(|p| {
            let engine = Engine::start(model(), EngineConfig::new(1, 128)).unwrap();
            collect_exact(engine.submit(exact_request(p, n)).unwrap())
        })
        .collect();
    let mut cfg = EngineConfig::new(4, 128);
    cfg.kv.block_size = 16;
    // Room for about two of the four sequences.
    cfg.kv_budget_tokens = 128;
    let engine = Engine::start(model(), cfg).unwrap();
    let streams: Vec<_> = PROMPTS[..4]
        .iter()
        .map(|p| engine.submit(exact_request(p, n)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert!(
            collect_exact(s) == want[i],
            "prompt {i}: preempted run differs from solo"
        );
    }
    wait_idle(&engine);
    assert!(engine.stats().preemptions_total > 0, "{:?}", engine.stats());
}

/// A prompt of a few hundred tokens (attention's tiled path, 64+ rows) with a generation
/// long enough to pass 512 cells (the split-KV decode path).
fn long_prompt() -> String {
    let text = "The river rose in the spring, as it did every year, and the people of the \
                valley moved their animals to the high pastures before the water reached \
                the lower fields. ";
    format!(
        "Summarize the following story in one paragraph.\n\n{}",
        text.repeat(9)
    )
}

/// Runs `count` identical greedy requests at once and checks every one against the solo
/// output: with prefill chunks cut by a small batch budget, prefix sharing between the
/// requests, decode rows batched beside prompt chunks, and (with `kv_budget_tokens`) KV
/// pressure that preempts some of them (`tight`: a pool of one context, which the shared
/// prompt blocks and a few sequences' own blocks fill).
fn identical_requests_equal_solo(m: Arc<LoadedModel>, count: usize, tight: bool) -> u64 {
    let prompt = long_prompt();
    let n = 24;
    let n_prompt = request_for(&m, &prompt, n).prompt_tokens.len();
    // Decode passes 256 cells, so its attention takes the split-KV path.
    assert!((257..490).contains(&n_prompt), "{n_prompt} prompt tokens");
    let ctx = (n_prompt + n).div_ceil(16) * 16;
    let want = {
        let engine = Engine::start(Arc::clone(&m), EngineConfig::new(1, ctx)).unwrap();
        collect_exact(engine.submit(exact_request_for(&m, &prompt, n)).unwrap())
    };
    let mut cfg = EngineConfig::new(8, ctx);
    cfg.max_batch_tokens = 96;
    cfg.kv.block_size = 16;
    if tight {
        cfg.kv_budget_tokens = ctx;
    }
    let engine = Engine::start(Arc::clone(&m), cfg).unwrap();
    let streams: Vec<_> = (0..count)
        .map(|_| engine.submit(exact_request_for(&m, &prompt, n)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let got = collect_exact(s);
        assert!(
            got == want,
            "request {i} of {count}: tokens or logprobs differ from solo"
        );
    }
    wait_idle(&engine);
    engine.stats().preemptions_total
}

#[test]
fn concurrent_identical_requests_equal_solo() {
    identical_requests_equal_solo(model(), 24, false);
}

#[test]
fn concurrent_identical_requests_equal_solo_under_kv_pressure() {
    let preempted = identical_requests_equal_solo(model(), 24, true);
    assert!(preempted > 0, "no preemption happened");
}

#[test]
fn gemma3_concurrent_identical_requests_equal_solo() {
    let preempted = identical_requests_equal_solo(gemma(), 24, true);
    assert!(preempted > 0, "no preemption happened");
}

/// Eight different prompts decoding together on Gemma 3 (Q4_K gemm/gemv and Q6_K tiled/dot
/// chosen per row by its solo batch, not by the 8 rows of the step) give each its solo
/// tokens and top-5 logprobs bit for bit.
#[test]
fn gemma3_batched_streams_match_solo_runs() {
    let g = gemma();
    let n = 16;
    let want: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let engine = Engine::start(Arc::clone(&g), EngineConfig::new(1, 256)).unwrap();
            collect_exact(engine.submit(exact_request_for(&g, p, n)).unwrap())
        })
        .collect();
    let mut cfg = EngineConfig::new(8, 256);
    cfg.max_batch_tokens = 24;
    let engine = Engine::start(Arc::clone(&g), cfg).unwrap();
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| engine.submit(exact_request_for(&g, p, n)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert!(
            collect_exact(s) == want[i],
            "prompt {i}: batched differs from solo"
        );
    }
}

/// More than one ubatch (512 tokens) of prompt: the engine slices it as llama.cpp does, so
/// a solo request equals the one-sequence `generate()` loop (which slices the same way) and
/// concurrent copies equal the solo one.
#[test]
fn prompt_longer_than_a_ubatch_matches_generate() {
    let prompt = format!("{}{}", long_prompt(), long_prompt().repeat(2));
    let m = model();
    let tokens = m.tokenize_prompt(&prompt).unwrap();
    assert!(tokens.len() > 512, "{} tokens", tokens.len());
    let n = 8;
    let solo_gen = ember_runtime::generate::generate(
        &m.model,
        &m.tokenizer,
        &ember_runtime::generate::GenerateRequest {
            prompt_tokens: tokens.clone(),
            max_tokens: n,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ctx_size: 1024,
            stop_at_eog: false,
            context_shift: None,
            kv: Default::default(),
            spec: Default::default(),
        },
        |_| {},
    )
    .unwrap()
    .tokens;
    let mut cfg = EngineConfig::new(4, 1024);
    cfg.max_batch_tokens = 200;
    let engine = Engine::start(model(), cfg).unwrap();
    let streams: Vec<_> = (0..3)
        .map(|_| engine.submit(request(&prompt, n)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(collect(s).0, solo_gen, "request {i}");
    }
}

/// Dropping a stream mid-generation cancels it and frees its blocks.
#[test]
fn dropped_stream_frees_its_blocks() {
    let engine = Engine::start(model(), EngineConfig::new(2, 256)).unwrap();
    let mut s = engine.submit(request(PROMPTS[2], 200)).unwrap();
    for _ in 0..3 {
        assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    }
    assert!(engine.stats().kv_used_blocks > 0);
    drop(s);
    wait_idle(&engine);
}

#[test]
fn refusals_are_typed() {
    let mut cfg = EngineConfig::new(1, 256);
    cfg.max_waiting = 1;
    let engine = Engine::start(model(), cfg).unwrap();
    let long = request(&"word ".repeat(300), 4);
    assert!(matches!(
        engine.submit(long),
        Err(SubmitError::PromptTooLong { ctx: 256, .. })
    ));
    let mut empty = request("x", 4);
    empty.prompt_tokens.clear();
    assert_eq!(engine.submit(empty).err(), Some(SubmitError::EmptyPrompt));
    // One running (its first token proves it was admitted; it has 200 more to go), one
    // waiting, and the third is refused.
    let mut a = engine.submit(request(PROMPTS[0], 200)).unwrap();
    assert!(matches!(a.blocking_next(), Some(Event::Token { .. })));
    let _b = engine.submit(request(PROMPTS[1], 8)).unwrap();
    let third = engine.submit(request(PROMPTS[2], 8));
    assert!(
        matches!(third, Err(SubmitError::QueueFull { .. })),
        "{:?}",
        third.err()
    );
}

/// The context ends a generation with `ContextFull`, after the last token that fits.
#[test]
fn context_full_stops_cleanly() {
    let engine = Engine::start(model(), EngineConfig::new(1, 12)).unwrap();
    let req = request(PROMPTS[0], 100);
    let n_prompt = req.prompt_tokens.len();
    let (ids, _, reason) = collect(engine.submit(req).unwrap());
    assert_eq!(reason, StopReason::ContextFull);
    assert_eq!(ids.len(), 12 - n_prompt + 1);
}

#[test]
fn logprobs_are_log_softmax_and_sorted() {
    let engine = Engine::start(model(), EngineConfig::new(1, 64)).unwrap();
    let mut req = request(PROMPTS[0], 3);
    req.logprobs = Some(4);
    let mut s = engine.submit(req).unwrap();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { id, logprob, .. } => {
                let lp = logprob.expect("asked for logprobs");
                assert_eq!(lp.id, id);
                assert_eq!(lp.top.len(), 4);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(lp.top[0].0, id);
                assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            }
            Event::Done { .. } => break,
            Event::Error(e) => panic!("{e}"),
        }
    }
}
