//! The facade against the layers it wraps, on the real SmolLM2: the same output as the
//! runtime's generation loop, typed errors for bad input, the engine's batched and async
//! outputs equal to a solo run.

use std::sync::OnceLock;

use ember::{
    ChatMessage, EngineOptions, Error, GenerateParams, KvDtype, Model, SpecConfig, StopReason,
};

const MODEL: &str = "smollm2-135m-instruct-q4_1";

fn model() -> &'static Model {
    static MODEL_ONCE: OnceLock<Model> = OnceLock::new();
    MODEL_ONCE.get_or_init(|| {
        Model::builder(MODEL)
            .ctx_size(512)
            .load()
            .expect("load SmolLM2")
    })
}

#[test]
fn generate_is_the_runtime_loop_and_the_stream_is_the_whole_text() {
    let m = model();
    let params = GenerateParams::greedy().max_tokens(40);
    let mut stream = m.generate("Once upon a time", &params).unwrap();
    let mut streamed = String::new();
    for piece in stream.by_ref() {
        let piece = piece.unwrap();
        assert!(!piece.is_empty(), "empty pieces are not yielded");
        streamed.push_str(&piece);
    }
    let done = stream.finish().unwrap();
    assert_eq!(streamed, done.text);
    assert_eq!(done.tokens.len(), 40);
    assert_eq!(done.stop_reason, StopReason::Length);
    assert_eq!(
        done.prompt_tokens,
        m.tokenize("Once upon a time").unwrap().len()
    );

    // The runtime's own entry point gives the same tokens.
    let req = ember_runtime::generate::GenerateRequest {
        prompt_tokens: m.tokenize("Once upon a time").unwrap(),
        max_tokens: 40,
        sampling: params.sampling.clone(),
        stop: Vec::new(),
        ctx_size: m.ctx_size(),
        stop_at_eog: true,
        context_shift: None,
        kv: m.kv_options().clone(),
        spec: SpecConfig::default(),
    };
    let out = ember_runtime::generate::generate_with_draft(m.loaded(), None, &req, |_| {}).unwrap();
    assert_eq!(out.tokens, done.tokens);
    assert_eq!(out.text, done.text);
}

#[test]
fn sampled_generation_is_reproducible_by_seed_and_stops_at_stop_strings() {
    let m = model();
    let params = GenerateParams::default().max_tokens(24).seed(1234);
    let a = m
        .generate("My favourite food is", &params)
        .unwrap()
        .finish()
        .unwrap();
    let b = m
        .generate("My favourite food is", &params)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(a.tokens, b.tokens);

    let greedy = GenerateParams::greedy().max_tokens(40);
    let full = m
        .generate("The capital of France is", &greedy)
        .unwrap()
        .text()
        .unwrap();
    // Stop at the first word of the greedy continuation's second half.
    let word = full
        .split_whitespace()
        .nth(3)
        .expect("a few words")
        .to_string();
    let stopped = m
        .generate(
            "The capital of France is",
            &greedy.clone().stop(word.clone()),
        )
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(stopped.stop_reason, StopReason::StopString);
    assert!(!stopped.text.contains(&word), "{:?}", stopped.text);
    assert!(full.starts_with(&stopped.text));
}

#[test]
fn chat_renders_the_template_and_replies() {
    let m = model();
    let messages = [
        ChatMessage::system("You are terse."),
        ChatMessage::user("Say hello."),
    ];
    let tokens = m.chat_tokens(&messages).unwrap();
    let expected = m
        .chat_template()
        .unwrap()
        .render_tokens(m.tokenizer(), &messages, true, true, None)
        .unwrap();
    assert_eq!(tokens, expected);
    let params = GenerateParams::greedy().max_tokens(64);
    let reply = m.chat(&messages, &params).unwrap().finish().unwrap();
    let direct = m
        .generate_tokens(tokens, &params)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(reply.tokens, direct.tokens);
    assert!(!reply.text.trim().is_empty());
}

#[test]
fn no_tokens_asked_runs_nothing() {
    let done = model()
        .generate("Hello", &GenerateParams::greedy().max_tokens(0))
        .unwrap()
        .finish()
        .unwrap();
    assert!(done.tokens.is_empty() && done.text.is_empty());
    assert_eq!(done.stop_reason, StopReason::Length);
}

#[test]
fn dropping_a_stream_stops_it_and_the_model_goes_on() {
    let m = model();
    let params = GenerateParams::greedy().max_tokens(200);
    let mut stream = m.generate("Count with me: 1, 2, 3,", &params).unwrap();
    let first: Vec<String> = stream.by_ref().take(2).map(Result::unwrap).collect();
    assert_eq!(first.len(), 2);
    assert!(stream.tokens().len() >= 2);
    drop(stream);
    let again = m
        .generate("Count with me: 1, 2, 3,", &params.clone().max_tokens(4))
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(again.tokens.len(), 4);
}

#[test]
fn bad_input_is_a_typed_error_before_anything_runs() {
    let m = model();
    // A prompt that leaves no room for a generated token (the context is 512).
    let long = "word ".repeat(600);
    let e = m.generate(&long, &GenerateParams::greedy()).err().unwrap();
    assert!(matches!(e, Error::PromptTooLong { ctx: 512, .. }), "{e}");
    assert!(e.to_string().contains("nothing was truncated"));

    for (params, option) in [
        (GenerateParams::default().top_p(2.0), "top_p"),
        (GenerateParams::default().min_p(-0.5), "min_p"),
        (
            GenerateParams::default().temperature(f32::NAN),
            "temperature",
        ),
        (
            GenerateParams::default().repeat_penalty(0.0),
            "repeat_penalty",
        ),
    ] {
        match m.generate("Hi", &params) {
            Err(Error::InvalidOption { option: o, .. }) => assert_eq!(o, option),
            other => panic!("{option}: {:?}", other.err()),
        }
    }

    let e = Model::builder(MODEL)
        .ctx_size(1_000_000)
        .kv_budget_mib(1.0)
        .load()
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Error::ContextOverBudget {
                ctx_size: 1_000_000,
                kv_type: KvDtype::F16,
                ..
            }
        ),
        "{e}"
    );
    let e = Model::builder(MODEL)
        .kv_budget_mib(0.000_01)
        .load()
        .err()
        .unwrap();
    assert!(matches!(e, Error::KvBudgetTooSmall { .. }), "{e}");
    let e = Model::builder(MODEL).kv_block_size(0).load().err().unwrap();
    assert!(matches!(e, Error::Kv(_)), "{e}");
    let e = Model::load("no-such-model-anywhere").err().unwrap();
    assert!(matches!(e, Error::Hub(_)), "{e}");
    let e = Model::builder(MODEL)
        .draft_model("gemma3-270m-q4_k_m")
        .load()
        .err()
        .unwrap();
    assert!(
        matches!(&e, Error::Draft { error, .. } if matches!(**error, Error::Vocab(_))),
        "{e}"
    );
}

#[test]
fn prompts_are_checked_on_both_paths() {
    let m = model();
    let engine = m.engine(&EngineOptions::default()).unwrap();
    let vocab = m.config().n_vocab as u32;
    let params = GenerateParams::greedy().max_tokens(4);
    for tokens in [vec![], vec![1, vocab + 7]] {
        let a = m.generate_tokens(tokens.clone(), &params).err().unwrap();
        let b = engine
            .generate_tokens(tokens.clone(), &params)
            .err()
            .unwrap();
        assert_eq!(a.to_string(), b.to_string());
        assert!(
            matches!(a, Error::EmptyPrompt | Error::TokenOutOfRange { .. }),
            "{a}"
        );
    }
    // Exactly a full context: refused unless nothing is generated.
    let full = vec![1; m.ctx_size()];
    assert!(matches!(
        m.generate_tokens(full.clone(), &params).err().unwrap(),
        Error::PromptTooLong { .. }
    ));
    assert!(
        m.generate_tokens(full, &params.clone().max_tokens(0))
            .is_ok()
    );
}

#[test]
fn facade_types_can_be_shared_across_threads_and_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Model>();
    send_sync::<ember::Engine>();
    send::<ember::EngineStream>();
    send::<ember::AsyncEngineStream>();
    send_sync::<Error>();
}

#[test]
fn an_engine_runs_while_a_stream_holds_it() {
    let params = GenerateParams::greedy().max_tokens(6);
    // The `Engine` handle is a temporary: the stream alone keeps the engine alive.
    let text = model()
        .engine(&EngineOptions::default())
        .unwrap()
        .generate("The sun is", &params)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(text.tokens.len(), 6);
    // The builder's context size is the engine's default too.
    assert_eq!(
        model()
            .engine(&EngineOptions::default())
            .unwrap()
            .ctx_size(),
        512
    );
}

#[test]
fn speculation_keeps_greedy_output() {
    let m = Model::builder(MODEL)
        .ctx_size(512)
        .spec(SpecConfig {
            proposer: ember::Proposer::Lookup,
            ..SpecConfig::default()
        })
        .load()
        .unwrap();
    let prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. \
                  Repeat after me: the quick brown fox";
    let params = GenerateParams::greedy().max_tokens(24);
    let spec = m.generate(prompt, &params).unwrap().finish().unwrap();
    let plain = model().generate(prompt, &params).unwrap().finish().unwrap();
    assert_eq!(spec.tokens, plain.tokens);
    let stats = spec.spec.expect("speculation stats");
    assert_eq!(stats.proposer, ember::Proposer::Lookup);
}

#[test]
fn the_engine_batches_requests_with_their_solo_outputs_blocking_and_async() {
    let m = model();
    let engine = m
        .engine(&EngineOptions {
            parallel: 3,
            ctx_size: Some(256),
            ..EngineOptions::default()
        })
        .unwrap();
    assert_eq!(engine.ctx_size(), 256);
    let params = GenerateParams::greedy().max_tokens(12);
    let prompts = ["The sun is", "Water boils at", "My name is"];
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.generate(p, &params).unwrap())
        .collect();
    let batched: Vec<String> = streams.into_iter().map(|s| s.text().unwrap()).collect();
    for (p, text) in prompts.iter().zip(&batched) {
        let solo = m.generate(p, &params).unwrap().text().unwrap();
        assert_eq!(&solo, text, "{p}");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let texts = rt.block_on(async {
        use futures_util::StreamExt;
        let mut out = Vec::new();
        for p in prompts {
            let mut s = engine.generate(p, &params).unwrap().into_async();
            let mut text = String::new();
            while let Some(piece) = s.next().await {
                text.push_str(&piece.unwrap());
            }
            out.push(text);
        }
        let done = engine
            .generate(prompts[0], &params)
            .unwrap()
            .into_async()
            .completion()
            .await
            .unwrap();
        assert_eq!(done.tokens.len(), 12);
        out
    });
    assert_eq!(texts, batched);

    let chat = engine
        .chat(&[ChatMessage::user("Hi!")], &params)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(
        chat.tokens,
        m.chat(&[ChatMessage::user("Hi!")], &params)
            .unwrap()
            .finish()
            .unwrap()
            .tokens
    );
    assert!(engine.stats().generated_tokens_total >= 12 * 7);

    let e = m
        .engine(&EngineOptions {
            parallel: 0,
            ..EngineOptions::default()
        })
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                option: "parallel",
                ..
            }
        ),
        "{e}"
    );
}
