//! A short conversation with the model's chat template: each reply is streamed, then added to
//! the history for the next turn.
//!
//! `cargo run --release -p ember --example chat -- [MODEL]`

use std::io::Write;

use ember::{ChatMessage, GenerateParams, Model};

fn main() -> Result<(), ember::Error> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "smollm2-135m-instruct-q4_1".into());
    let model = Model::builder(&name).ctx_size(4096).load()?;
    let params = GenerateParams::default().max_tokens(48).seed(7);
    let mut history = vec![ChatMessage::system("You are a concise assistant.")];
    for question in [
        "Name three colours.",
        "Which of them is the colour of the sky?",
    ] {
        println!("> {question}");
        history.push(ChatMessage::user(question));
        let mut reply = model.chat(&history, &params)?;
        for piece in reply.by_ref() {
            print!("{}", piece?);
            let _ = std::io::stdout().flush();
        }
        println!();
        history.push(ChatMessage::assistant(reply.text()?));
    }
    Ok(())
}
