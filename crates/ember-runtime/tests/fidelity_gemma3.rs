//! Gemma 3 270M Q4_K_M against llama.cpp on `shared/reference/gemma3_*`: prompt token ids,
//! every top-5 logit at every position (to the references' 6 decimals) and all 32 greedy
//! tokens, exactly as llama.cpp computed them. This exercises what SmolLM2 does not: Q5_0,
//! llama.cpp's repacked Q4_K kernels (gemm per sub-block pair for whole groups of four rows,
//! gemv per block for the rest), Q6_K's per-row dot and tiled kernel (8+ rows), NEOX RoPE,
//! QK-norm, GELU's f16 table, sliding-window layers and head dim 256, whose attention
//! accumulator llama.cpp's AVX512-FP16 build updates in f16 arithmetic.

mod common;

use std::sync::OnceLock;

use ember_runtime::loaded::LoadedModel;

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| common::load("EMBER_TEST_GEMMA3", "gemma3-270m-q4_k_m"))
}

#[test]
fn gemma3_prompt_tokens_match_llama_cpp() {
    common::check_prompt_tokens(model(), &common::references("gemma3_"));
}

#[test]
fn gemma3_logits_are_llama_cpps() {
    common::check_logits_exact(model(), &common::references("gemma3_"));
}

#[test]
fn gemma3_teacher_forced_batches_match_llama_cpp() {
    let refs = common::references("gemma3_");
    assert!(common::check_teacher_forced_exact(model(), &refs) >= 4);
}

#[test]
fn gemma3_batch_sizes_at_kernel_switches_match_llama_cpp() {
    common::check_edges(model(), "gemma3");
}

#[test]
fn gemma3_greedy_generation_is_llama_cpps() {
    common::check_greedy_tokens(model(), &common::references("gemma3_"));
}
