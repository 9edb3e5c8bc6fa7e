//! Generate text from a prompt given on the command line, streamed to stdout.
//!
//! `cargo run --release -p ember --example generate -- [MODEL] [PROMPT]`
//! (default: SmolLM2-135M-Instruct, "The capital of France is").

use std::io::Write;

use ember::{GenerateParams, Model};

fn main() -> Result<(), ember::Error> {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .unwrap_or_else(|| "smollm2-135m-instruct-q4_1".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());
    let model = Model::load(&name)?;
    let params = GenerateParams::greedy().max_tokens(32);
    let mut stream = model.generate(&prompt, &params)?;
    print!("{prompt}");
    for piece in stream.by_ref() {
        print!("{}", piece?);
        let _ = std::io::stdout().flush();
    }
    let done = stream.finish()?;
    println!();
    let t = &done.timings;
    eprintln!(
        "{} prompt tokens, {} generated in {:.0} ms ({:.1} t/s), stopped by {:?}",
        done.prompt_tokens,
        t.predicted_n,
        t.predicted_ms,
        t.predicted_n as f64 * 1e3 / t.predicted_ms.max(1e-9),
        done.stop_reason
    );
    Ok(())
}
