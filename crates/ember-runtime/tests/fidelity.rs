//! The whole model against llama.cpp: SmolLM2-135M-Instruct Q4_1 on the reference prompts in
//! `shared/reference` (llama.cpp 0c1e570, CPU, 2 threads, f16 KV cache).
//!
//! Ember computes every operation with llama.cpp's arithmetic (the same activation
//! quantization, the same order of every float operation in the dot products, ggml's `expf`,
//! the same FMAs), so its logits are llama.cpp's bit for bit. The references store them with 6
//! decimals; every one of llama.cpp's top-5 logits, after the prompt and after each of its
//! 32 greedy tokens, must be matched to that precision, and greedy decoding must produce its
//! 32 tokens exactly.

mod common;

use std::sync::OnceLock;

use ember_kernels::cpu::q8::Isa;
use ember_runtime::eval::{teacher_forced_logits, top_k};
use ember_runtime::generate::{GenerateRequest, generate};
use ember_runtime::loaded::{LoadOptions, LoadedModel};
use ember_runtime::sampling::SamplingParams;

use common::{ids, reference_top5};

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| common::load("EMBER_TEST_SMOLLM2", "smollm2-135m-instruct-q4_1"))
}

fn references() -> Vec<(String, serde_json::Value)> {
    let refs = common::references("smollm2_");
    assert!(refs.len() >= 3, "expected SmolLM2 references");
    refs
}

#[test]
fn prompt_tokens_match_llama_cpp() {
    common::check_prompt_tokens(model(), &references());
}

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    common::check_logits_exact(model(), &references());
}

#[test]
fn teacher_forced_batches_match_llama_cpp() {
    // The four long references: two of 266 prompt tokens (one ubatch), two of 546 and 577
    // (two ubatches, the second under and over 64 rows).
    assert!(common::check_teacher_forced_exact(model(), &references()) >= 4);
}

#[test]
fn batch_sizes_at_kernel_switches_match_llama_cpp() {
    common::check_edges(model(), "smollm2");
}

#[test]
fn greedy_generation_is_llama_cpps() {
    common::check_greedy_tokens(model(), &references());
}

/// Repacking at load (the default) and `--no-repack` give the same logits bit for bit, one
/// row at a time (decode), in small batches and in a batch past 64 rows.
#[test]
fn repacked_and_mapped_weights_give_the_same_bits() {
    let m = model();
    let plain = common::load_with(
        "EMBER_TEST_SMOLLM2",
        "smollm2-135m-instruct-q4_1",
        &LoadOptions {
            no_repack: true,
            ..LoadOptions::default()
        },
    );
    assert_eq!(plain.model.repacked_bytes(), 0);
    if Isa::Avx512Vnni.supported() {
        // Every Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 matrix, the embedding counted as the tied head: as
        // many bytes as the file's (every row count here is a multiple of sixteen).
        use ember_quant::GgmlType::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
        let tied = m.file.tensor("output.weight").is_none();
        let want: u64 = m
            .file
            .tensors()
            .iter()
            .filter(|t| {
                matches!(t.ggml_type, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0) && t.dims.len() == 2
            })
            .filter(|t| tied || t.name != "token_embd.weight")
            .map(|t| t.n_bytes)
            .sum();
        assert!(want > 80 << 20, "{want}");
        assert_eq!(m.model.repacked_bytes(), want);
    } else {
        eprintln!("this CPU has no AVX-512 VNNI: nothing is repacked, both loads are the same");
    }
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let tokens = m.tokenize_prompt(&text).unwrap();
    assert!(tokens.len() > 64, "{}", tokens.len());
    for (n, ubatch) in [(12, 1), (23, 5), (tokens.len(), 512)] {
        let a = teacher_forced_logits(&m.model, &tokens[..n], ubatch).unwrap();
        let b = teacher_forced_logits(&plain.model, &tokens[..n], ubatch).unwrap();
        assert_eq!(a.len(), b.len());
        for (pos, (ra, rb)) in a.iter().zip(&b).enumerate() {
            let bits = |r: &[f32]| r.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(ra) == bits(rb), "ubatch {ubatch} position {pos}");
        }
    }
}

#[test]
fn one_batch_teacher_forcing_agrees_on_decided_tokens() {
    let m = model();
    for (name, r) in references() {
        let prompt = ids(&r["prompt_token_ids"]);
        let greedy = ids(&r["greedy_generated_token_ids"]);
        let all: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let rows = teacher_forced_logits(&m.model, &all, 512).unwrap();
        for (j, top5) in reference_top5(&r).iter().enumerate() {
            let pos = prompt.len() - 1 + j;
            if pos >= rows.len() || top5[0].1 - top5[1].1 <= 1.0 {
                continue;
            }
            assert_eq!(top_k(&rows[pos], 1)[0].0, top5[0].0, "{name} pos {pos}");
        }
    }
}

#[test]
fn prompt_longer_than_context_is_refused_not_truncated() {
    let m = model();
    let req = GenerateRequest {
        prompt_tokens: vec![504; 40],
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        ctx_size: 16,
        stop_at_eog: true,
        context_shift: None,
        kv: Default::default(),
        spec: Default::default(),
    };
    let err = generate(&m.model, &m.tokenizer, &req, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("40 tokens") && err.contains("16"), "{err}");
}

#[test]
fn same_seed_same_output() {
    let m = model();
    let prompt = m.tokenize_prompt("Once upon a time").unwrap();
    let run = |seed| {
        let req = GenerateRequest {
            prompt_tokens: prompt.clone(),
            max_tokens: 12,
            sampling: SamplingParams {
                seed: Some(seed),
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            ctx_size: 256,
            stop_at_eog: false,
            context_shift: None,
            kv: Default::default(),
            spec: Default::default(),
        };
        generate(&m.model, &m.tokenizer, &req, |_| {})
            .unwrap()
            .tokens
    };
    assert_eq!(run(42), run(42));
}
