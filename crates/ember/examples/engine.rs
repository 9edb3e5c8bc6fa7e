//! Many concurrent requests through one engine, from several threads: the engine batches
//! their tokens into shared forward passes, and each output is the one it would get alone
//! (checked here against a run on its own).
//!
//! `cargo run --release -p ember --example engine -- [MODEL]`

use ember::{EngineOptions, GenerateParams, Model};

fn main() -> Result<(), ember::Error> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "smollm2-135m-instruct-q4_1".into());
    let model = Model::load(&name)?;
    let engine = model.engine(&EngineOptions {
        parallel: 4,
        ctx_size: Some(1024),
        ..Default::default()
    })?;
    let params = GenerateParams::greedy().max_tokens(16);
    let prompts = [
        "The quick brown fox",
        "In a hole in the ground there lived",
        "Rust is a programming language that",
        "The capital of Italy is",
        "To make a cup of tea,",
        "def fibonacci(n):",
    ];
    let started = std::time::Instant::now();
    let outputs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (engine, params) = (&engine, &params);
                s.spawn(move || engine.generate(p, params)?.text())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a request thread panicked"))
            .collect::<Result<_, _>>()
    })?;
    let elapsed = started.elapsed();
    for (p, o) in prompts.iter().zip(&outputs) {
        println!("{p}{o}");
    }
    let stats = engine.stats();
    println!(
        "{} requests, {} tokens generated in {:.2} s; {} preemptions",
        prompts.len(),
        stats.generated_tokens_total,
        elapsed.as_secs_f64(),
        stats.preemptions_total
    );
    // Batching does not change a request's output: the first one, alone.
    let alone = model.generate(prompts[0], &params)?.text()?;
    assert_eq!(
        alone, outputs[0],
        "a batched output differs from the same request alone"
    );
    println!("the first output equals its run alone");
    Ok(())
}
