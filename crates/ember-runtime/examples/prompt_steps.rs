//! Runs a prompt as one batch, then each continuation token as a one-token step, as llama.cpp's
//! reference runs did, and prints the top-5 logits after each pass. With `EMBER_TRACE_DIR` set,
//! every pass's intermediate tensors are written there (see `ember_models::trace`).
//!
//! `cargo run --release -p ember-runtime --example prompt_steps -- MODEL.gguf 1,2,3 [4,5]`

use ember_runtime::eval::{prompt_then_step_logits, top_k};
use ember_runtime::loaded::LoadedModel;

fn ids(s: &str) -> Vec<u32> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.trim().parse().expect("token id"))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: prompt_steps MODEL.gguf PROMPT_IDS [STEP_IDS]");
        std::process::exit(2);
    }
    let model = LoadedModel::open(args[1].as_ref(), &ember_models::default_device())
        .unwrap_or_else(|e| panic!("load: {e}"));
    let prompt = ids(&args[2]);
    let steps = args.get(3).map(|s| ids(s)).unwrap_or_default();
    let rows = prompt_then_step_logits(&model.model, &prompt, &steps).expect("forward");
    for (i, row) in rows.iter().enumerate() {
        println!("{i}: {:?}", top_k(row, 5));
    }
}
