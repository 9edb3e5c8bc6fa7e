//! Async streaming on tokio: two requests to one engine, their pieces interleaved as the
//! engine produces them.
//!
//! `cargo run --release -p ember --example stream -- [MODEL]`

use ember::{EngineOptions, GenerateParams, Model};
use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), ember::Error> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "smollm2-135m-instruct-q4_1".into());
    // Loading maps the file and builds the model: quick, but blocking; a server would do it
    // in `spawn_blocking`.
    let model = Model::load(&name)?;
    let engine = model.engine(&EngineOptions::default())?;
    let params = GenerateParams::greedy().max_tokens(16);
    let a = engine
        .generate("Once upon a time", &params)?
        .into_async()
        .map(|p| ("a", p));
    let b = engine
        .generate("The three primary colours are", &params)?
        .into_async()
        .map(|p| ("b", p));
    let mut both = futures_util::stream::select(a, b);
    let (mut text_a, mut text_b) = (String::new(), String::new());
    while let Some((which, piece)) = both.next().await {
        let piece = piece?;
        println!("{which}: {piece:?}");
        match which {
            "a" => text_a.push_str(&piece),
            _ => text_b.push_str(&piece),
        }
    }
    println!("a: {text_a}\nb: {text_b}");
    // The async form of `finish`.
    let done = engine
        .generate("1, 2, 3,", &params)?
        .into_async()
        .completion()
        .await?;
    println!("c: {} ({:?})", done.text, done.stop_reason);
    Ok(())
}
