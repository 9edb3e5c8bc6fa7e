//! Decode throughput with `B` sequences stepping together (as `ember serve` batches them),
//! in the spirit of llama-batched-bench: each sequence gets a short prompt, then `N` steps of
//! one token per sequence run as one ragged batch. Prints tokens/s for B = 1 and the given B.
//!
//! `cargo run --release -p ember-runtime --example batched_decode -- MODEL.gguf [B] [N] [--only]`

use std::time::Instant;

use ember_kv::{KvBudget, KvOptions};
use ember_models::{BatchSeq, Logits};
use ember_runtime::loaded::LoadedModel;

fn run(model: &ember_models::Model, b: usize, steps: usize) -> f64 {
    let opts = KvOptions {
        budget: Some(KvBudget::Tokens(b * (steps + 64))),
        ..KvOptions::default()
    };
    let mut cache =
        ember_kv::PagedKvCache::new(&model.kv_config(&opts, steps + 64)).expect("cache");
    let prompt: Vec<u32> = (0..8).map(|t| 504 + t).collect();
    let seqs: Vec<_> = (0..b)
        .map(|_| cache.add_sequence(&[]).expect("sequence").0)
        .collect();
    for &s in &seqs {
        let batch = [BatchSeq {
            seq: s,
            tokens: &prompt,
            logits: Some(Logits::Last),
            solo_rows: None,
        }];
        model.forward_batch(&batch, &mut cache).expect("prefill");
    }
    let toks: Vec<[u32; 1]> = (0..b).map(|i| [600 + i as u32]).collect();
    let start = Instant::now();
    for _ in 0..steps {
        let batch: Vec<BatchSeq<'_>> = seqs
            .iter()
            .zip(&toks)
            .map(|(&seq, t)| BatchSeq {
                seq,
                tokens: t,
                logits: Some(Logits::Last),
                solo_rows: None,
            })
            .collect();
        model.forward_batch(&batch, &mut cache).expect("step");
    }
    (b * steps) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: batched_decode MODEL.gguf [B] [N]");
    let b: usize = args.get(2).map_or(8, |s| s.parse().expect("B"));
    let steps: usize = args.get(3).map_or(128, |s| s.parse().expect("N"));
    let m = LoadedModel::open(path.as_ref(), &ember_models::default_device()).expect("load");
    if args.iter().any(|a| a == "--only") {
        // Just the batched run (for profiling it alone).
        let many = run(&m.model, b, steps);
        println!("B={b}: {many:.1} t/s");
        return;
    }
    let one = run(&m.model, 1, steps);
    let many = run(&m.model, b, steps);
    println!(
        "B=1: {one:.1} t/s   B={b}: {many:.1} t/s   ratio {:.2}x",
        many / one
    );
}
